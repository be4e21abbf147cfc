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
from helpers import randn, record_kernel_calls

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


KERNEL_MODULES = ("softmax", "rms_norm", "lora_linear", "cross_entropy", "glu", "rope")


def _record_kernel_calls(monkeypatch) -> list[tuple[str, bool, torch.dtype]]:
    """(entry point, autocast on for its lead tensor's device, lead dtype) of every kernel call."""
    return record_kernel_calls(
        monkeypatch, KERNEL_MODULES, lambda name, lead: (name, torch.is_autocast_enabled(lead.device.type), lead.dtype)
    )


def test_kernels_run_with_autocast_off_and_the_linear_part_in_the_autocast_dtype(backend, monkeypatch):
    """The mechanism itself (CPU autocast re-casts none of the torch ops our bodies use, so the comparisons above
    would not notice it gone): every kernel call, forward and backward, sees autocast off, and linear_cross_entropy's
    chunk logits reach the row kernel in the autocast dtype."""
    dev, low = backend.device, _autocast_dtype(backend.device)
    calls = _record_kernel_calls(monkeypatch)
    target = torch.randint(0, 40, (6,), generator=torch.Generator().manual_seed(1)).to(dev)
    with torch.autocast(dev.type, dtype=low):
        outs = [
            tmf.lora_linear(
                *_leaves(randn((6, 16), FP32, dev), randn((8, 16), FP32, dev, seed=1)),
                *_leaves(randn((4, 16), FP32, dev, seed=2), randn((8, 4), FP32, dev, seed=3)),
            ),
            tmf.linear_cross_entropy(*_leaves(randn((6, 16), FP32, dev), randn((40, 16), FP32, dev, seed=4)), target),
            tmf.softmax(*_leaves(randn((6, 16), FP32, dev))),
            tmf.rms_norm(*_leaves(randn((6, 16), FP32, dev), randn((16,), FP32, dev, seed=5))),
        ]
        sum(o.float().sum() for o in outs).backward()  # backward inside the autocast context, too
    names = [name for name, _, _ in calls]
    for entry in ("lora_forward", "lora_backward", "cross_entropy_rows", "softmax_forward", "softmax_backward"):
        assert entry in names, f"{entry} not called: {names}"
    assert not [c for c in calls if c[1]], f"kernels called with autocast on: {[c for c in calls if c[1]]}"
    assert {dtype for name, _, dtype in calls if name == "cross_entropy_rows"} == {low}
    assert {dtype for name, _, dtype in calls if name.startswith("lora")} == {low}


def test_linear_cross_entropy_float32_weight_gradient_over_many_chunks(backend):
    """A float32 weight under autocast: its gradient is summed over the chunks in float32 and rounded once, so it
    stays within twice the error of torch's own autocast result however many chunks there are (summed in the
    autocast dtype, the error grew with the chunk count: 3.7x torch's at 64 chunks)."""
    dev, low = backend.device, _autocast_dtype(backend.device)
    hidden, weight = randn((512, 32), FP32, dev), randn((64, 32), FP32, dev, 0.3, seed=1)
    target = torch.randint(0, 64, (512,), generator=torch.Generator().manual_seed(2)).to(dev)
    ours_in, torch_in, exact_in = _leaves(hidden, weight), _leaves(hidden, weight), _leaves(hidden, weight)
    with torch.autocast(dev.type, dtype=low):
        ours = tmf.linear_cross_entropy(*ours_in, target, chunk_size=4)  # 128 chunks
        theirs = F.cross_entropy(F.linear(*torch_in), target)
    exact = F.cross_entropy(F.linear(*(t.double() for t in exact_in)), target)
    dw_ours = torch.autograd.grad(ours, ours_in[1])[0]
    dw_torch = torch.autograd.grad(theirs, torch_in[1])[0]
    dw_exact = torch.autograd.grad(exact, exact_in[1])[0]
    assert dw_ours.dtype == FP32
    assert_matches(dw_ours, dw_exact, low, "dweight over 128 chunks", baseline=dw_torch)


def test_float64_losses_stay_float64_under_autocast(backend):
    dev, low = backend.device, _autocast_dtype(backend.device)
    if dev.type == "mps":
        pytest.skip("MPS has no float64")
    target = torch.randint(0, 20, (5,), generator=torch.Generator().manual_seed(1)).to(dev)
    logits = randn((5, 20), torch.float64, dev)
    hidden, weight = randn((5, 8), torch.float64, dev), randn((20, 8), torch.float64, dev, seed=1)
    with torch.autocast(dev.type, dtype=low):
        assert tmf.cross_entropy(logits, target).dtype == F.cross_entropy(logits, target).dtype == torch.float64
        assert tmf.linear_cross_entropy(hidden, weight, target).dtype == torch.float64
