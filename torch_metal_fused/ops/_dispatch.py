"""One place that routes a kernel entry point to the backend serving its tensors."""

from __future__ import annotations

import functools
import math
import sys

import torch

from torch_metal_fused import reference
from torch_metal_fused._autocast import autocast_device
from torch_metal_fused._backend import KernelUnavailable, fall_back, family_of_entry, kernels_for, select_backend


def run_kernel(entry_point: str, lead: torch.Tensor, *args):
    """Call `entry_point` (e.g. "softmax_forward") of the backend that serves `lead`. Where our kernels cannot
    serve the call (a shader that did not compile, a pipeline that could not be built, no launch plan for this
    shape), the reference serves it and the fallback is announced once (an error under TORCH_METAL_FUSED_STRICT=1):
    a training loop never crashes because of our shaders. Kernels raise KernelUnavailable before encoding
    anything, and every entry point returns fresh tensors, so calling the reference then is safe."""
    family = family_of_entry(entry_point)
    backend = select_backend(lead, family)
    if backend != "reference":
        try:
            return getattr(kernels_for(backend), entry_point)(lead, *args)
        except KernelUnavailable as exc:
            fall_back(backend, exc.family, exc.scope, exc.reason)
    return getattr(reference, entry_point)(lead, *args)


def call(op, impl, *args):
    """Call custom op `op` (whose body is `impl`) from an autograd.Function. Eager calls run `impl` directly,
    skipping the dispatcher round trip (host time per call, much of a small op's cost); under torch.compile
    the registered op is called, so tracing sees it with its fake implementation. Under torch.autocast the body
    runs with autocast off, in the dtypes the public function chose (torch_metal_fused/_autocast.py)."""
    if torch.compiler.is_compiling():
        return op(*args)
    device = autocast_device(*args)
    if device is None:
        return impl(*args)
    with torch.autocast(device, enabled=False):
        return impl(*args)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """t as (rows, last dimension), also where the last dimension is 0 (reshape(-1, 0) cannot infer the rows)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


def none_to_empty(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent gradient travels as a 0-element tensor."""
    return t if t is not None else like.new_empty(0)


def empty_to_none(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return t if wanted else None


# ---- double backward ------------------------------------------------------------------------------------------
# Autograd runs an autograd.Function's backward with grad mode on only when the caller asked for a differentiable
# backward (`create_graph=True`: gradient penalties, Hessian-vector products, MAML). Our kernels' backward is not
# differentiable, so ops that support double backward then compute their backward with the reference's backward
# formula in torch ops, from inputs that carry their autograd history (intermediates such as RMSNorm's rstd are
# recomputed from them): autograd differentiates that formula exactly, and the second-order pass runs our
# first-order kernels again where it flows back through an op. Explicit formulas, not a nested autograd.grad over
# a recomputed forward: that would also run the graph upstream of the inputs (total derivatives through a weight
# shared with an earlier op). Ops that do not support double backward say so (`refuse_double_backward`) rather
# than return gradients whose own gradient would be silently wrong or missing.
def create_graph_requested() -> bool:
    """Inside an autograd.Function's backward: whether the caller asked for create_graph=True."""
    return torch.is_grad_enabled()


def refuse_double_backward(op: str) -> None:
    """Raise a clear error when the caller asked for a differentiable backward of `op`, which it does not support."""
    if create_graph_requested():
        raise RuntimeError(
            f"torch_metal_fused.{op} does not support double backward (backward with create_graph=True): its fused "
            "backward is not differentiable. Use the unfused PyTorch op where second derivatives are needed."
        )


def saved_tensors_pass_through() -> bool:
    """Whether what autograd saves now is kept as it is: no saved-tensor hooks in effect, or only hooks whose pack
    function is marked `passes_tensors_through` (it returns the tensor: a memory counter's). Other hooks (non-reentrant
    gradient checkpointing) recompute on their own and let each saved tensor be unpacked once, so an op that would
    remake a tensor from another node's saved tensors (instead of saving it) keeps it under them."""
    if not torch._C._autograd._saved_tensors_hooks_is_enabled():
        return False
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is None or getattr(top[0], "passes_tensors_through", False)


# ---- gradients written over saved inputs --------------------------------------------------------------------------
# A backward may write its gradients over inputs it saved (same shape and dtype), so that its peak holds no fresh
# tensors of their size (Liger's SwiGLU does this unconditionally), only where nothing can read those inputs again:
# the graph is freed by this backward (no retain_graph, no create_graph), eager mode, no vmap, and no tensor or
# Python reference besides the saved one holds their memory. The last is read from reference counts (Python
# references to the tensor and its base, C++ holders of the tensor such as another node that saved it, tensors
# sharing its storage), against the counts of a private saved tensor measured once in this process, so a torch or
# Python whose counts differ gets no in-place writes rather than wrong ones. The writes bump the tensors' version, so
# a holder the counts miss gets autograd's error about an in-place change instead of reading gradients as
# activations.
def _reference_counts(tensors: tuple[torch.Tensor, ...]) -> list[tuple[int, ...]]:
    storage_uses = torch._C._storage_Use_Count
    counts = []
    for t in tensors:
        base = t._base
        counts.append(
            (
                sys.getrefcount(t),
                t._use_count(),  # C++ holders of this TensorImpl: another node's SavedVariable, a DLPack capsule
                storage_uses(t.untyped_storage()._cdata),
                -1 if base is None else sys.getrefcount(base),
            )
        )
    return counts


@functools.cache
def _private_counts():
    """Measured on a fresh thread: none of the caller's thread-local state (saved-tensor hooks, dispatch modes,
    inference mode, vmap) can shift the calibration."""
    import threading

    result = []

    def target():
        try:
            result.append(_measure_private_counts())
        except Exception:
            result.append(None)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    return result[0]


def _measure_private_counts() -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """_reference_counts of a saved tensor nothing else holds, as a backward sees it: (plain, a view of a private
    base); None where a held tensor does not count higher than a private one (then nothing is written in place)."""
    seen: list = []

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(ctx, plain, view):
            ctx.save_for_backward(plain, view)
            return plain + view.sum()

        @staticmethod
        def backward(ctx, grad):
            plain, view = ctx.saved_tensors
            seen.append(_reference_counts((plain, view)))
            return grad, None

    def forward(held: list) -> torch.Tensor:  # its locals are gone when backward runs, as in a model's forward
        leaf = torch.ones(4, requires_grad=True)
        plain, view = leaf * 2, (leaf * 3).view(2, 2)
        held += [plain, view._base]
        return Probe.apply(plain, view)

    def run(hold: bool) -> list[tuple[int, ...]]:
        held: list = []
        out = forward(held)
        if not hold:
            held.clear()
        out.sum().backward()
        return seen.pop()

    with torch.enable_grad():  # first asked inside a backward, where grad mode is off
        private, held = run(False), run(True)
    if held[0][0] <= private[0][0] or held[1][3] <= private[1][3]:  # held: the plain tensor, the view's base
        return None
    return private[0], private[1]


def can_overwrite_saved(*tensors: torch.Tensor, grad: torch.Tensor) -> bool:
    """Inside an autograd.Function's backward with incoming gradient `grad`, `tensors` unpacked from
    ctx.saved_tensors into locals of the caller: whether the backward may write its gradients over them (the rules
    above). Contiguous tensors on distinct storages only."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if keep_graph is None or keep_graph() or create_graph_requested() or torch.compiler.is_compiling():
        return False
    functorch = torch._C._functorch
    if functorch.peek_interpreter_stack() is not None:  # vmap (jacobian(vectorize=True))
        return False
    if functorch.is_legacy_batchedtensor(grad) or functorch.is_batchedtensor(grad):  # is_grads_batched
        return False
    if not all(type(t) is torch.Tensor for t in tensors):  # wrapper subclasses have no storage of their own
        return False
    if not hasattr(torch.autograd.graph, "increment_version") or not hasattr(torch._C, "_storage_Use_Count"):
        return False
    if not all(t.is_contiguous() for t in tensors):
        return False
    if len({t.untyped_storage().data_ptr() for t in tensors}) != len(tensors):
        return False
    private = _private_counts()
    if private is None:
        return False
    counts = _reference_counts(tensors)
    return all(c == private[1] if t._base is not None else c == private[0] for t, c in zip(tensors, counts))


def mark_overwritten(*tensors: torch.Tensor) -> None:
    """After a kernel wrote over `tensors` (can_overwrite_saved): bump their version, as torch's in-place ops do."""
    for t in tensors:
        torch.autograd.graph.increment_version(t)
