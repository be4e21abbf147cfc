"""The ops under torch.autocast (torch_metal_fused/_autocast.py), on every backend parameter.

lora_linear and linear_cross_entropy follow F.linear's autocast rule (inputs in the autocast dtype, mixed input
dtypes accepted), cross_entropy returns a float32 loss as F.cross_entropy does there, and the row ops compute
exactly what they compute without autocast. Before, lora_linear and linear_cross_entropy with float32 tensors failed
under autocast ("self and mat2 must have the same dtype"): the torch ops inside them were re-cast one by one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import randn

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

FP32 = torch.float32


def _autocast_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "mps" else torch.bfloat16


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 9) -> list[torch.Tensor]:
    g = randn(tuple(out.shape), out.dtype, out.device, seed=seed)
    return list(torch.autograd.grad(out, inputs, g))


@pytest.mark.parametrize("x_dtype", [FP32, "autocast"], ids=["float32 x", "x in the autocast dtype"])
def test_lora_linear_follows_f_linear(backend, x_dtype):
    dev, low = backend.device, _autocast_dtype(backend.device)
    x = randn((3, 5, 64), low if x_dtype == "autocast" else FP32, dev)
    w, a = randn((48, 64), FP32, dev, 0.1, seed=1), randn((8, 64), FP32, dev, 0.1, seed=2)
    b, bias = randn((48, 8), FP32, dev, 0.1, seed=3), randn((48,), FP32, dev, seed=4)
    ours_in, torch_in = _leaves(x, w, a, b, bias), _leaves(x, w, a, b, bias)
    with torch.autocast(dev.type, dtype=low):
        ours = tmf.lora_linear(*ours_in[:4], scale=2.0, bias=ours_in[4])
        xt, wt, at, bt, biast = torch_in
        want = F.linear(xt, wt, biast) + F.linear(F.linear(xt, at), bt) * 2.0
    assert ours.dtype == want.dtype == low
    assert_matches(ours, want.double(), low, "y")
    for name, got, ref, leaf in zip("x w a b bias".split(), _grads(ours, ours_in), _grads(want, torch_in), ours_in):
        assert got.dtype == leaf.dtype, f"d{name}: {got.dtype}, not its input's {leaf.dtype}"
        assert_matches(got, ref.double(), low, f"d{name}")


def test_linear_cross_entropy_follows_f_cross_entropy_of_f_linear(backend):
    dev, low = backend.device, _autocast_dtype(backend.device)
    hidden, weight = randn((2, 7, 32), FP32, dev), randn((100, 32), FP32, dev, 0.2, seed=1)
    target = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(3)).to(dev)
    ours_in, torch_in = _leaves(hidden, weight), _leaves(hidden, weight)
    with torch.autocast(dev.type, dtype=low):
        ours = tmf.linear_cross_entropy(*ours_in, target)
        want = F.cross_entropy(F.linear(*torch_in).flatten(0, 1), target.flatten())
    assert ours.dtype == want.dtype == FP32
    assert_matches(ours, want.double(), low, "loss")
    for name, got, ref in zip(("dhidden", "dweight"), _grads(ours, ours_in), _grads(want, torch_in)):
        assert got.dtype == FP32
        assert_matches(got, ref.double(), low, name)


def test_cross_entropy_loss_is_float32_as_torch_gives(backend):
    dev, low = backend.device, _autocast_dtype(backend.device)
    logits = randn((6, 50), low, dev, 2.0)
    target = torch.randint(0, 50, (6,), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.autocast(dev.type, dtype=low):
        ours = tmf.cross_entropy(logits, target)
        assert ours.dtype == F.cross_entropy(logits, target).dtype == FP32
        assert tmf.cross_entropy(logits, target, out_dtype=low).dtype == low  # an explicit out_dtype stands
    assert torch.equal(ours, tmf.cross_entropy(logits, target, out_dtype=FP32))


ROW_OPS = {
    "softmax": (lambda dt, dev: [randn((4, 33), dt, dev, 3.0)], tmf.softmax),
    "rms_norm": (lambda dt, dev: [randn((4, 33), dt, dev), randn((33,), dt, dev, seed=1)], tmf.rms_norm),
    "add_rms_norm": (
        lambda dt, dev: [randn((4, 32), dt, dev), randn((4, 32), dt, dev, seed=1), randn((32,), dt, dev, seed=2)],
        lambda x, r, w: tmf.add_rms_norm(x, r, w)[0],
    ),
    "swiglu": (lambda dt, dev: [randn((4, 33), dt, dev), randn((4, 33), dt, dev, seed=1)], tmf.swiglu),
    "rope": (
        lambda dt, dev: [randn((1, 2, 5, 16), dt, dev), randn((1, 2, 5, 16), dt, dev, seed=1)],
        lambda q, k: tmf.rope(q, k, *_tables(q))[0],
    ),
}


def _tables(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    angle = torch.arange(5, dtype=torch.float64)[:, None] * torch.arange(1, 17, dtype=torch.float64)[None, :] / 7
    return angle.cos()[None].to(q.dtype).to(q.device), angle.sin()[None].to(q.dtype).to(q.device)


@pytest.mark.parametrize("name", list(ROW_OPS))
@pytest.mark.parametrize("dtype", [FP32, "autocast"], ids=["float32", "autocast dtype"])
def test_row_ops_compute_what_they_compute_without_autocast(backend, name, dtype):
    dev, low = backend.device, _autocast_dtype(backend.device)
    make, op = ROW_OPS[name]
    inputs = make(low if dtype == "autocast" else dtype, dev)
    plain_in, auto_in = _leaves(*inputs), _leaves(*inputs)
    plain = op(*plain_in)
    with torch.autocast(dev.type, dtype=low):
        auto = op(*auto_in)
    assert auto.dtype == plain.dtype
    assert torch.equal(auto, plain), f"{name}: autocast changed the output"
    for got, want in zip(_grads(auto, auto_in), _grads(plain, plain_in)):
        assert torch.equal(got, want), f"{name}: autocast changed a gradient"
