"""Cross-entropy, and linear cross-entropy that never materialises the full logits.

`cross_entropy(logits, target)` computes each row's loss and, when a gradient is needed, d(loss)/d(logits) in one
pass, so backward only scales it (no softmax tensor is kept beside the logits). `linear_cross_entropy(hidden,
weight, target)` equals `cross_entropy(hidden @ weight.T + bias, target)` but walks the tokens in chunks: per chunk
the logits come from the native GEMM, turn into their gradient, and feed `dhidden[chunk] = dlogits @ weight` and
`dweight += dlogitsᵀ @ hidden[chunk]` (native GEMMs) — so the largest extra allocation is one chunk of logits, not
tokens × vocabulary. With reduction "mean" or "sum" the gradients are computed in forward (as Liger-Kernel does) and
backward only scales them; with "none" backward recomputes the chunks with the per-row output gradient.

The row pass (`cross_entropy_rows`: loss per row and, in one more pass over the row, the gradient) runs on our Metal
kernel for MPS tensors (shaders/cross_entropy.metal, launch code torch_metal_fused/backends/metal.py; the harness runs
the same code for metal-emulated), on its CUDA twin for CUDA tensors
(csrc/cuda/row_kernels.cuh, csrc/cuda/ops.cu), and on the plain-PyTorch reference (`reference.cross_entropy_rows`,
float32 for float16/bfloat16) elsewhere.
"""

from __future__ import annotations

import torch

from torch_metal_fused._autocast import (
    AUTOCAST_DTYPES,
    autocast_enabled,
    cast_like_linear,
    float32_loss_under_autocast,
)
from torch_metal_fused._backend import backend_for
from torch_metal_fused._validation import check_finite_number, check_same_device_dtype, check_tensor
from torch_metal_fused.ops._dispatch import as_rows, call, refuse_double_backward, run_kernel

REDUCTIONS = ("mean", "sum", "none")
# Extra memory the chunked op aims for, per chunk: the chunk's logits in their dtype (our kernels write the gradient
# over them), plus ~3 float32 temporaries per element where the plain-PyTorch reference does the row pass. The
# chunk's logits sit on top of every activation saved for backward (the loss runs at the end of the forward), so the
# chunk is a step's peak less what it saves. With a weight gradient each chunk also reads and writes all of dweight
# (vocab x hidden), so smaller chunks cost time there; without one (LoRA: the head is frozen) they cost only launches.
CHUNK_BUDGET_BYTES = 256 << 20
CHUNK_BUDGET_BYTES_NO_DWEIGHT = 64 << 20


def default_chunk_size(
    rows: int, vocab: int, dtype: torch.dtype, fused_rows: bool = False, needs_dweight: bool = True
) -> int:
    """Rows per chunk: as many as fit the budget (CHUNK_BUDGET_BYTES, or CHUNK_BUDGET_BYTES_NO_DWEIGHT without a
    weight gradient; a multiple of 8 above 8, so the GEMMs stay efficient), at most `rows`. `fused_rows`: our row
    kernel serves the chunk (no float32 temporaries)."""
    per_row = vocab * (torch.finfo(dtype).bits // 8 + (0 if fused_rows else 12))
    budget = CHUNK_BUDGET_BYTES if needs_dweight else CHUNK_BUDGET_BYTES_NO_DWEIGHT
    n = max(1, budget // max(per_row, 1))
    if n > 8:
        n -= n % 8
    return max(1, min(n, rows))


# ---- custom ops (the row pass, and the chunked linear pass) ----------------------------------------------------
def _rows_impl(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    row_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    args = (target, ignore_index, label_smoothing, softcap, row_scale, False)
    loss, grad = run_kernel("cross_entropy_rows", logits, *args)
    return loss.to(_loss_dtype(logits.dtype)), grad if grad is not None else logits.new_empty(0)


cross_entropy_rows = torch.library.custom_op("torch_metal_fused::cross_entropy_rows", _rows_impl, mutates_args=())


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@cross_entropy_rows.register_fake
def _(logits, target, ignore_index, label_smoothing, softcap, row_scale):
    grad = torch.empty_like(logits) if row_scale is not None else logits.new_empty(0)
    return logits.new_empty(logits.shape[:1], dtype=_loss_dtype(logits.dtype)), grad


def _linear_impl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float,
    row_scale: torch.Tensor | None,
    chunk_size: int,
    needs: list[bool],
    dweight_float32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row losses and, with row_scale, (dhidden, dweight, dbias) of Σ row_scale·loss; gradients not needed come
    back as 0-element tensors. dweight_float32: dweight summed over the chunks in float32 (returned in float32; the
    autograd Function's caller rounds it once), for a float32 weight cast to half precision under autocast."""
    needs_dh, needs_dw, needs_db = needs
    rows = hidden.shape[0]
    loss = hidden.new_empty(rows, dtype=_loss_dtype(hidden.dtype))
    grads_wanted = row_scale is not None
    dh = torch.empty_like(hidden) if grads_wanted and needs_dh else hidden.new_empty(0)
    dw_dtype = torch.float32 if dweight_float32 else weight.dtype
    dw = torch.zeros(weight.shape, dtype=dw_dtype, device=weight.device) if grads_wanted and needs_dw else None
    db = torch.zeros(weight.shape[0], dtype=_loss_dtype(hidden.dtype), device=hidden.device) if needs_db else None
    for start in range(0, rows, chunk_size):
        end = min(rows, start + chunk_size)
        h = hidden[start:end]
        logits = torch.nn.functional.linear(h, weight, bias)  # the only chunk-sized tensor of the input dtype
        scale = row_scale[start:end] if grads_wanted else None
        # The gradient is written over the chunk's logits (a buffer we own): no second chunk-sized tensor.
        loss[start:end], g = run_kernel(
            "cross_entropy_rows", logits, target[start:end], ignore_index, label_smoothing, softcap, scale, True
        )
        if g is not None:
            if needs_dh:
                torch.mm(g, weight, out=dh[start:end])
            if dw is not None:
                if dw.dtype == g.dtype:
                    dw.addmm_(g.t(), h)
                else:  # each chunk's product rounded once, the sum over chunks in float32
                    dw += torch.mm(g.t(), h)
            if needs_db:
                db += g.sum(0, dtype=db.dtype)
        # Free this chunk before the next one's GEMM allocates its logits: otherwise `logits = linear(...)` keeps the
        # old chunk alive while it builds the new one, two chunks at the peak.
        del logits, g
    dw = dw if dw is not None else hidden.new_empty(0)
    return loss, dh, dw, db.to(hidden.dtype) if grads_wanted and needs_db else hidden.new_empty(0)


linear_cross_entropy_chunked = torch.library.custom_op(
    "torch_metal_fused::linear_cross_entropy_chunked", _linear_impl, mutates_args=()
)


@linear_cross_entropy_chunked.register_fake
def _(hidden, weight, bias, target, ignore_index, label_smoothing, softcap, row_scale, chunk_size, needs, dw32=False):
    grads = row_scale is not None
    shapes = (hidden.shape, weight.shape, weight.shape[:1])
    dtypes = (hidden.dtype, torch.float32 if dw32 else weight.dtype, hidden.dtype)
    return (
        hidden.new_empty(hidden.shape[:1], dtype=_loss_dtype(hidden.dtype)),
        *(hidden.new_empty(s if grads and need else (0,), dtype=d) for s, d, need in zip(shapes, dtypes, needs)),
    )


# ---- autograd ------------------------------------------------------------------------------------------------
def _row_scale(target: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype) -> torch.Tensor:
    """What each row's loss is multiplied by in the reduced loss: 1 / (rows not ignored) for "mean" (1 when every
    row is ignored: the loss is then 0, not torch's NaN), 1 otherwise."""
    ones = torch.ones(target.shape, dtype=dtype, device=target.device)
    if reduction != "mean":
        return ones
    count = (target != ignore_index).sum().clamp(min=1)
    return ones / count.to(dtype)


def _reduce(loss_rows: torch.Tensor, row_scale: torch.Tensor, reduction: str, shape, dtype) -> torch.Tensor:
    if reduction == "none":
        return loss_rows.reshape(shape).to(dtype)
    return (loss_rows * row_scale).sum().to(dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """Keeps only d(loss)/d(logits), computed in forward (not the logits): double backward is refused."""

    @staticmethod
    def forward(ctx, logits, target, ignore_index, reduction, label_smoothing, softcap, out_dtype):
        logits2, target2 = as_rows(logits), target.reshape(-1)
        row_scale = _row_scale(target2, ignore_index, reduction, _loss_dtype(logits.dtype))
        wanted = row_scale if logits.requires_grad else None
        loss_rows, grad = call(
            cross_entropy_rows, _rows_impl, logits2, target2, ignore_index, label_smoothing, softcap, wanted
        )
        ctx.save_for_backward(grad)
        ctx.reduction, ctx.shape = reduction, logits.shape
        return _reduce(loss_rows, row_scale, reduction, target.shape, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("cross_entropy")
        (grad,) = ctx.saved_tensors
        scale = grad_out.reshape(-1, 1) if ctx.reduction == "none" else grad_out
        return (grad * scale.to(grad.dtype)).reshape(ctx.shape), None, None, None, None, None, None


class LinearCrossEntropyFunction(torch.autograd.Function):
    """With reduction "mean" or "sum" the gradients are computed in forward. The first backward scales them in place
    by the output gradient (a Python float: one device sync per loss backward), hands them to autograd without a
    copy of dweight (the largest tensor of the step, as Liger-Kernel's fused linear cross-entropy does) and lets go
    of them; a later backward on a retained graph recomputes the chunks from the saved inputs. So no returned
    gradient shares storage with state this Function still holds. For that recompute it keeps hidden (tokens x
    hidden) and, where autocast cast the weight, the original weight (alive anyway) rather than the cast copy.
    Double backward is refused."""

    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        softcap,
        chunk_size,
        out_dtype,
        dweight_float32=False,
        weight_before_cast=None,
    ):
        hidden2, target2 = as_rows(hidden), target.reshape(-1)
        row_scale = _row_scale(target2, ignore_index, reduction, _loss_dtype(hidden.dtype))
        needs = [hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad]
        eager = any(needs) and reduction != "none"  # with "none", backward recomputes with the rows' gradients
        args = (hidden2, weight, bias, target2, ignore_index, label_smoothing, softcap)
        loss_rows, dh, dw, db = call(
            linear_cross_entropy_chunked,
            _linear_impl,
            *args,
            row_scale if eager else None,
            chunk_size,
            needs,
            dweight_float32,
        )
        ctx.needs, ctx.hidden_shape = needs, hidden.shape
        ctx.args = (ignore_index, label_smoothing, softcap, chunk_size)
        ctx.dweight_float32 = dweight_float32
        # The eager gradients live on ctx (not save_for_backward) so that backward can drop them once handed over.
        ctx.eager_grads = [dh, dw, db] if eager else None
        ctx.row_scale = row_scale if eager else None
        # Under autocast `weight` is a cast copy (vocab x hidden): keep the original (a parameter) and cast again in
        # the recompute, rather than hold the copy until backward.
        ctx.weight_before_cast, ctx.weight_dtype = weight_before_cast, weight.dtype
        ctx.save_for_backward(hidden2, weight if weight_before_cast is None else None, bias, target2)
        return _reduce(loss_rows, row_scale, reduction, target.shape, out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        refuse_double_backward("linear_cross_entropy")
        needs = ctx.needs
        if ctx.eager_grads is not None:
            grads = [t if need else None for t, need in zip(ctx.eager_grads, needs)]
            ctx.eager_grads = None  # autograd owns them now; a retained graph's next backward recomputes
            scale = float(grad_out)  # a Python float: each tensor scaled at its own precision, not in grad_out's
            if scale != 1.0:
                for t in grads:
                    if t is not None:
                        t.mul_(scale)  # in place: no second copy of dweight
        else:
            hidden2, weight, bias, target2 = ctx.saved_tensors
            if weight is None:
                weight = ctx.weight_before_cast.to(ctx.weight_dtype)
            ignore_index, label_smoothing, softcap, chunk_size = ctx.args
            if ctx.row_scale is not None:  # "mean"/"sum" after the hand-over: each row's scale times the output's
                row_scale = ctx.row_scale * grad_out.to(ctx.row_scale.dtype)
            else:  # "none": the rows' own output gradients
                row_scale = grad_out.reshape(-1).to(_loss_dtype(hidden2.dtype))
            args = (hidden2, weight, bias, target2, ignore_index, label_smoothing, softcap, row_scale, chunk_size)
            _, dh, dw, db = call(linear_cross_entropy_chunked, _linear_impl, *args, needs, ctx.dweight_float32)
            grads = [t if need else None for t, need in zip((dh, dw, db), needs)]
        dh, dw, db = grads
        if dh is not None:
            dh = dh.reshape(ctx.hidden_shape)
        return dh, dw, None, db, None, None, None, None, None, None, None, None


# ---- public functions ----------------------------------------------------------------------------------------
def _check_ce_common(target, ignore_index, reduction, label_smoothing, softcap, lead_shape, vocab, device):
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor of class indices, got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"target must hold class indices (int64 or int32), got {target.dtype}")
    if target.device != device:
        raise ValueError(f"target is on {target.device} but the logits' inputs are on {device}")
    if tuple(target.shape) != tuple(lead_shape):
        raise ValueError(f"target must have shape {tuple(lead_shape)} (one class per row), got {tuple(target.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    label_smoothing = check_finite_number("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if softcap is None:
        softcap = 0.0
    else:
        softcap = check_finite_number("softcap", softcap)
        if softcap <= 0:
            raise ValueError(f"softcap must be positive (or None), got {softcap}")
    if vocab == 0 and target.numel() > 0:
        raise ValueError("the vocabulary (last dimension of the logits) is empty")
    # One reduction on the device: a class index outside [0, vocab) that is not ignore_index would be a silent
    # wrong loss (or an out-of-range read in a kernel).
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if target.numel() and bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(
            f"target holds class index {first}, outside [0, {vocab}) and not ignore_index ({ignore_index})"
        )
    return label_smoothing, softcap


def _check_out_dtype(out_dtype: torch.dtype | None, input_dtype: torch.dtype) -> torch.dtype:
    if out_dtype is None:
        return input_dtype
    if not isinstance(out_dtype, torch.dtype) or not out_dtype.is_floating_point:
        raise ValueError(f"out_dtype must be a floating-point torch.dtype (or None), got {out_dtype!r}")
    return out_dtype


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`torch.nn.functional.cross_entropy(logits, target)` over the last dimension of `logits` (..., vocab) with
    class-index targets (...,), optionally with Gemma-2's final-logit soft-capping `softcap·tanh(logits/softcap)`.
    Computed in float32 for float16/bfloat16; the loss has the logits' dtype unless `out_dtype` says otherwise
    (torch.float32 returns the float32 accumulation unrounded, as Hugging Face's loss, which upcasts the logits, does).
    Unlike torch, "mean" over rows that are all ignored is 0 (with zero gradient), not NaN, and an ignored row gets a
    zero gradient even when it holds NaN (torch's is NaN there). Under torch.autocast the loss is float32 unless
    `out_dtype` says otherwise, as F.cross_entropy's is there. Double backward is refused (a RuntimeError)."""
    if out_dtype is None and isinstance(logits, torch.Tensor) and float32_loss_under_autocast(logits):
        out_dtype = torch.float32
    check_tensor("logits", logits)
    if logits.ndim < 1:
        raise ValueError("logits must have at least one dimension (..., vocab)")
    label_smoothing, softcap = _check_ce_common(
        target, ignore_index, reduction, label_smoothing, softcap, logits.shape[:-1], logits.shape[-1], logits.device
    )
    out_dtype = _check_out_dtype(out_dtype, logits.dtype)
    return CrossEntropyFunction.apply(logits, target, ignore_index, reduction, label_smoothing, softcap, out_dtype)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`cross_entropy(hidden @ weight.T + bias, target, ...)` without materialising the logits: tokens are processed
    `chunk_size` rows at a time (default: default_chunk_size, about 256 MB of logits (and temporaries), 64 MB when
    the weight gets no gradient). hidden
    (..., hidden_size), weight (vocab, hidden_size), target (...). A weight with requires_grad=False (LoRA training)
    gets no dweight work. `out_dtype`: the loss's dtype (default hidden's, as F.cross_entropy on the logits gives;
    torch.float32 returns the float32 accumulation unrounded). Under torch.autocast, as F.cross_entropy(F.linear())
    there: hidden, weight and bias cast to the autocast dtype, the loss in float32 unless out_dtype says otherwise."""
    dweight_float32 = False
    weight_before_cast = None
    if isinstance(hidden, torch.Tensor) and autocast_enabled(hidden.device.type):
        if out_dtype is None and hidden.dtype in AUTOCAST_DTYPES:  # F.cross_entropy's float32 loss there
            out_dtype = torch.float32
        original = weight
        hidden, weight, bias = cast_like_linear(hidden.device.type, hidden, weight, bias)
        if isinstance(original, torch.Tensor) and weight is not original:
            weight_before_cast = original
        dweight_float32 = weight_before_cast is not None and weight_before_cast.dtype == torch.float32
    check_tensor("hidden", hidden)
    check_tensor("weight", weight)
    check_same_device_dtype("hidden", hidden, weight=weight, bias=bias)
    if hidden.ndim < 1 or weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must have shape (vocab, {hidden.shape[-1] if hidden.ndim else '?'}) to match hidden's last "
            f"dimension, got {tuple(weight.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    label_smoothing, softcap = _check_ce_common(
        target, ignore_index, reduction, label_smoothing, softcap, hidden.shape[:-1], weight.shape[0], hidden.device
    )
    rows = target.numel()
    if chunk_size is None:
        fused_rows = backend_for(hidden, "cross_entropy") != "reference"
        needs_dweight = weight.requires_grad and torch.is_grad_enabled()
        chunk_size = default_chunk_size(rows, weight.shape[0], hidden.dtype, fused_rows, needs_dweight)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (or None), got {chunk_size!r}")
    out_dtype = _check_out_dtype(out_dtype, hidden.dtype)
    return LinearCrossEntropyFunction.apply(
        hidden,
        weight,
        target,
        bias,
        ignore_index,
        reduction,
        label_smoothing,
        softcap,
        max(1, chunk_size),
        out_dtype,
        dweight_float32,
        weight_before_cast,
    )


__all__ = ["CrossEntropyFunction", "LinearCrossEntropyFunction", "cross_entropy", "linear_cross_entropy"]


def self_test_cases(dtype: torch.dtype, device: str) -> list:
    """The doctor's self-test: the chunked linear cross-entropy (its row pass is cross_entropy's kernel), an odd
    vocabulary."""
    from torch_metal_fused.testing import SelfTestCase, sample

    target = torch.arange(37, dtype=torch.long) * 27 % 1001
    hidden, weight = sample((37, 24), dtype, device, 7), sample((1001, 24), dtype, device, 8) * 0.2
    return [
        SelfTestCase(
            lambda t: linear_cross_entropy(t[0], t[1], target.to(t[0].device), reduction="none", chunk_size=16),
            lambda t: torch.nn.functional.cross_entropy(t[0] @ t[1].t(), target, reduction="none"),
            [hidden, weight],
        )
    ]
