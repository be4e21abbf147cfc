"""Bad input raises a clear exception naming the argument and the problem."""

import pytest
import torch

import torch_metal_fused as tmf


def _lora_args(**over):
    args = {
        "x": torch.randn(3, 8),
        "weight": torch.randn(6, 8),
        "lora_a": torch.randn(2, 8),
        "lora_b": torch.randn(6, 2),
    }
    args.update(over)
    return args


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: tmf.softmax(torch.arange(4)), TypeError, "x must be a floating-point tensor.*int64"),
        (lambda: tmf.softmax(torch.ones(3, dtype=torch.bool)), TypeError, "x must be a floating-point"),
        (lambda: tmf.softmax([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: tmf.softmax(torch.randn(2, 3), 2), IndexError, "dim 2 is out of range"),
        (lambda: tmf.softmax(torch.randn(2, 3), -3), IndexError, "dim -3 is out of range"),
        (lambda: tmf.softmax(torch.randn(2, 3), 1.0), TypeError, "dim must be an int"),
        (lambda: tmf.rms_norm(torch.randn(2, 3), torch.randn(4)), ValueError, r"weight must have shape \(3,\)"),
        (
            lambda: tmf.rms_norm(torch.randn(2, 3), torch.randn(3, dtype=torch.float64)),
            TypeError,
            "weight has dtype torch.float64 but x has dtype torch.float32",
        ),
        (lambda: tmf.rms_norm(torch.randn(2, 3), torch.randn(3), eps=-1e-6), ValueError, "eps must be non-negative"),
        (lambda: tmf.rms_norm(torch.randn(2, 3), torch.randn(3), eps=float("nan")), ValueError, "eps must be finite"),
        (lambda: tmf.rms_norm(torch.randint(0, 3, (2, 3))), TypeError, "x must be a floating-point"),
        (lambda: tmf.rms_norm(torch.tensor(1.0)), ValueError, "at least one dimension"),
        (lambda: tmf.rms_norm(torch.randn(2, 3), None, offset=1.0), ValueError, "offset applies to a weight"),
        (
            lambda: tmf.rms_norm(torch.randn(2, 3), torch.randn(3), offset=float("inf")),
            ValueError,
            "offset must be finite",
        ),
        (lambda: tmf.rms_norm(torch.randn(2, 3), torch.ones(3, dtype=torch.int32)), TypeError, "weight must be"),
        (lambda: tmf.lora_linear(**_lora_args(x=torch.randn(3, 7))), ValueError, "x's last dimension"),
        (
            lambda: tmf.lora_linear(**_lora_args(lora_a=torch.randn(2, 9))),
            ValueError,
            r"lora_a must have shape \(r, 8\)",
        ),
        (
            lambda: tmf.lora_linear(**_lora_args(lora_b=torch.randn(6, 3))),
            ValueError,
            r"lora_b must have shape \(6, 2\)",
        ),
        (lambda: tmf.lora_linear(**_lora_args(lora_b=torch.randn(5, 2))), ValueError, "lora_b must have shape"),
        (lambda: tmf.lora_linear(**_lora_args(lora_a=torch.randn(8))), ValueError, "lora_a must be 2-D"),
        (
            lambda: tmf.lora_linear(**_lora_args(lora_a=torch.randn(0, 8), lora_b=torch.randn(6, 0))),
            ValueError,
            "r = 0",
        ),
        (lambda: tmf.lora_linear(**_lora_args(), bias=torch.randn(5)), ValueError, r"bias must have shape \(6,\)"),
        (lambda: tmf.lora_linear(**_lora_args(weight=torch.randn(6, 8).half())), TypeError, "weight has dtype"),
        (lambda: tmf.lora_linear(**_lora_args(), scale=float("inf")), ValueError, "scale must be finite"),
        (lambda: tmf.lora_linear(**_lora_args(), scale="2"), TypeError, "scale must be a real number"),
        (lambda: tmf.lora_linear(**_lora_args(), dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (lambda: tmf.lora_linear(**_lora_args(), dropout_p=-0.1), ValueError, "dropout_p"),
        (lambda: tmf.lora_linear(**_lora_args(x=torch.arange(24).view(3, 8))), TypeError, "x must be a floating"),
    ],
)
def test_bad_input_raises_clearly(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


@pytest.mark.skipif(not (torch.cuda.is_available() or torch.backends.mps.is_available()), reason="needs a GPU")
def test_mixed_devices():
    dev = "cuda" if torch.cuda.is_available() else "mps"
    with pytest.raises(ValueError, match="weight is on"):
        tmf.rms_norm(torch.randn(2, 3, device=dev), torch.randn(3))
    with pytest.raises(ValueError, match="lora_b is on"):
        tmf.lora_linear(
            **_lora_args(
                x=torch.randn(3, 8, device=dev),
                weight=torch.randn(6, 8, device=dev),
                lora_a=torch.randn(2, 8, device=dev),
            )
        )


def test_mixed_devices_meta():
    # A device mismatch is reported even without a GPU (meta tensors stand in for a second device).
    with pytest.raises(ValueError, match="weight is on meta but x is on cpu"):
        tmf.rms_norm(torch.randn(2, 3), torch.empty(3, device="meta"))


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TORCH_METAL_FUSED_BACKEND='bogus'"):
        tmf.backend_for(torch.randn(2))
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "reference")
    assert tmf.backend_for(torch.randn(2)) == "reference"
    monkeypatch.delenv("TORCH_METAL_FUSED_BACKEND")
    assert tmf.backend_for(torch.randn(2)) == "reference"
    assert tmf.backend_for(torch.randn(2, dtype=torch.float64)) == "reference"
    with pytest.raises(TypeError, match="torch.Tensor"):
        tmf.backend_for([1.0])


def test_torch_compile_traces_the_custom_ops():
    """Nobody needs torch.compile, but the ops survive it (fake implementations registered)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.randn(4, 8)
        y, rstd = torch.ops.torch_metal_fused.rms_norm_forward(x, torch.randn(8), 1e-6, 0.0)
        assert y.shape == (4, 8) and rstd.shape == (4,) and rstd.dtype == torch.float32
        assert torch.ops.torch_metal_fused.softmax_forward(x).shape == (4, 8)
        y, h = torch.ops.torch_metal_fused.lora_linear_forward(
            x, torch.randn(6, 8), None, torch.randn(2, 8), torch.randn(6, 2), 1.0, None
        )
        assert y.shape == (4, 6) and h.shape == (4, 2)
    torch.library.opcheck(torch.ops.torch_metal_fused.softmax_forward, (torch.randn(3, 5),))
    torch.library.opcheck(torch.ops.torch_metal_fused.rms_norm_forward, (torch.randn(3, 5), torch.randn(5), 1e-6, 0.0))


def test_torch_compile_aot_eager_forward_backward():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)

    def f(x, w):
        return tmf.softmax(tmf.rms_norm(x, w), -1).square().sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    gx, gw = torch.autograd.grad(compiled(x, w), (x, w))
    ex, ew = torch.autograd.grad(f(x, w), (x, w))
    assert torch.allclose(gx, ex) and torch.allclose(gw, ew)
