"""Every public op behaves like PyTorch's own ops under autograd, on every backend:

- backward may run again on a retained graph (`retain_graph=True`) and gives the same gradients each time, also
  after the user edits `.grad` in place between the calls (gradient clipping does);
- no gradient handed to autograd shares storage with an input, a tensor the op still holds for backward, or another
  gradient (add_rms_norm's x and residual excepted: one tensor for both, as torch's own `x + residual` hands out);
- double backward (`create_graph=True`) equals the float64 formula where the op supports it, and raises an error
  naming the op where it does not (cross_entropy, linear_cross_entropy) — never a silently wrong second derivative;
- gradcheck and gradgradcheck (or the refusal) in float64 on the reference.

Each op's case (its inputs and its unfused torch composition, the float64 reference) is declared by the op's contract
file: `autograd_case(name, device, dtype, reduction)` in tests/test_<op>.py (helpers.AutogradCase).
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import PUBLIC_OPS, AutogradCase, contract_module, randn, rms64

import torch_metal_fused as tmf
from torch_metal_fused._families import OPS
from torch_metal_fused.testing import assert_matches

EPS = 1e-5


T = torch.tensor
TARGET = [3, 0, 38, -100, 7, 21, 39, 1, 12]  # one ignored row


def _case(name: str, device, dtype=torch.float32, reduction: str = "mean") -> AutogradCase:
    """The op's case, declared by its contract file (autograd_case in tests/test_<op>.py)."""
    (op,) = (op for op in OPS if op.name == name)
    return contract_module(op.contract).autograd_case(name, device, dtype, reduction)


def _leaves(case: AutogradCase) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in case.grad_inputs]


def _outputs(out) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _output_grads(outs, seed: int = 100) -> list[torch.Tensor]:
    return [randn(o.shape, o.dtype, o.device, seed=seed + i) for i, o in enumerate(outs)]


def _backward(outs, dys, scalar: bool, **kw) -> None:
    if scalar:
        outs[0].backward(**kw)  # loss.backward(): an output gradient of exactly 1, the eager fast path
    else:
        torch.autograd.backward(outs, dys, **kw)


CE_CASES = [
    pytest.param(op, red, id=f"{op}-{red}")
    for op in ("cross_entropy", "linear_cross_entropy")
    for red in ("mean", "sum", "none")
]
OP_CASES = [pytest.param(op, "mean", id=op) for op in PUBLIC_OPS if "cross_entropy" not in op] + CE_CASES


def test_the_contract_covers_every_public_op():
    """A new op cannot skip this contract: it must be added to PUBLIC_OPS (and so to _case)."""
    exported = {n for n in tmf.__all__ if n[0].islower() and callable(getattr(tmf, n))}
    not_ops = {"backend_for", "patch_model", "unpatch_model"}
    assert exported - not_ops == set(PUBLIC_OPS)
    for name in PUBLIC_OPS:
        _case(name, torch.device("cpu"))


@pytest.mark.parametrize("name, reduction", OP_CASES)
def test_retain_graph_backward_three_times_with_in_place_grad_edits(backend, name, reduction):
    """loss.backward(retain_graph=True) three times accumulates the same gradient each time; halving .grad in
    place after the first (as clipping does) changes nothing the op holds. The linear cross-entropy bug this
    catches: the gradients computed in forward were handed to autograd and kept, so the second call accumulated
    into the kept tensors and the third raised 'modified by an inplace operation'."""
    case = _case(name, backend.device, reduction=reduction)
    leaves = _leaves(case)
    outs = _outputs(case.op(*leaves))
    dys = _output_grads(outs)
    _backward(outs, dys, case.scalar_output, retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad.mul_(0.5)
    _backward(outs, dys, case.scalar_output, retain_graph=True)
    _backward(outs, dys, case.scalar_output, retain_graph=True)
    for i, (t, g) in enumerate(zip(leaves, first)):
        torch.testing.assert_close(t.grad, 2.5 * g, rtol=1e-5, atol=1e-6, msg=f"{name}: input {i} after 3 backwards")
    # and the first gradient is right
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref_outs = _outputs(case.composite(*ref_leaves))
    _backward(ref_outs, [d.double().cpu() for d in dys], case.scalar_output)
    for i, (g, ref) in enumerate(zip(first, ref_leaves)):
        assert_matches(g, ref.grad, torch.float32, f"{name} gradient of input {i}")


def _custom_node(outs):
    """The op's autograd.Function node (its ctx) behind its first output."""
    todo, seen = [o.grad_fn for o in outs if o.grad_fn is not None], set()
    while todo:
        fn = todo.pop(0)
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        if hasattr(fn, "saved_tensors") and type(fn).__name__.endswith("FunctionBackward"):
            return fn
        todo += [f for f, _ in fn.next_functions]
    raise AssertionError("no autograd.Function node behind the op's output")


def _storages(tensors) -> dict[int, str]:
    return {t.untyped_storage().data_ptr(): what for what, t in tensors if t is not None and t.numel() > 0}


@pytest.mark.parametrize("name, reduction", OP_CASES)
def test_no_gradient_aliases_inputs_saved_state_or_another_gradient(backend, name, reduction):
    case = _case(name, backend.device, reduction=reduction)
    leaves = _leaves(case)
    outs = _outputs(case.op(*leaves))
    node = _custom_node(outs)
    if case.scalar_output:
        grads = torch.autograd.grad(outs[0], leaves, retain_graph=True)
    else:
        grads = torch.autograd.grad(outs, leaves, _output_grads(outs), retain_graph=True)
    held = [(f"saved tensor {i}", t) for i, t in enumerate(node.saved_tensors)]
    for attr, v in vars(node).items():  # tensors the Function still keeps on its ctx for the next backward
        for i, t in enumerate(v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(t, torch.Tensor):
                held.append((f"ctx.{attr}[{i}]", t))
    forbidden = _storages([(f"input {i}", t) for i, t in enumerate(leaves)] + held)
    seen: dict[int, int] = {}
    for i, g in enumerate(grads):
        if g is None or g.numel() == 0:
            continue
        ptr = g.untyped_storage().data_ptr()
        assert ptr not in forbidden, f"{name}: the gradient of input {i} shares storage with {forbidden[ptr]}"
        if ptr in seen:
            assert name == "add_rms_norm" and (seen[ptr], i) == (0, 1), (
                f"{name}: the gradients of inputs {seen[ptr]} and {i} share storage"
            )
        seen[ptr] = i
    # Leaves' .grad never alias (autograd copies a gradient it hands to two leaves).
    _backward(outs, _output_grads(outs), case.scalar_output)
    ptrs = [t.grad.untyped_storage().data_ptr() for t in leaves if t.grad is not None and t.grad.numel()]
    assert len(set(ptrs)) == len(ptrs), f"{name}: two inputs' .grad share storage"


def _vector_hessian_product(fn, leaves, dys, vs):
    """The first-order gradients g of Σ_j <fn(leaves)_j, dys_j> (create_graph=True) and the gradient of Σ_i <g_i, vs_i>
    with respect to the leaves and the output gradients dys (a Hessian-vector product and its mixed part)."""
    outs = _outputs(fn(*leaves))
    dys = [d.detach().requires_grad_(True) for d in dys]
    grads = torch.autograd.grad(outs, leaves, dys, create_graph=True)
    total = sum((g * v).sum() for g, v in zip(grads, vs) if g is not None)
    wrt = [*leaves, *dys]
    second = torch.autograd.grad(total, wrt, allow_unused=True)
    return grads, [torch.zeros_like(t) if s is None else s for s, t in zip(second, wrt)]


@pytest.mark.parametrize("name, reduction", OP_CASES)
def test_double_backward_equals_the_float64_formula_or_is_refused(backend, name, reduction):
    case = _case(name, backend.device, reduction=reduction)
    leaves = _leaves(case)
    outs = _outputs(case.op(*leaves))
    dys = [torch.ones_like(o) if case.scalar_output else d for o, d in zip(outs, _output_grads(outs))]
    if not case.double_backward:
        with pytest.raises(RuntimeError, match=rf"torch_metal_fused\.{name} does not support double backward"):
            torch.autograd.grad(outs, leaves, dys, create_graph=True)
        with pytest.raises(RuntimeError, match=rf"torch_metal_fused\.{name} does not support double backward"):
            outs[0].sum().backward(create_graph=True)
        return
    vs = [randn(t.shape, t.dtype, t.device, seed=200 + i) for i, t in enumerate(leaves)]
    grads, second = _vector_hessian_product(case.op, leaves, dys, vs)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    to64 = [t.double().cpu() for t in dys], [v.double().cpu() for v in vs]
    ref_grads, ref_second = _vector_hessian_product(case.composite, ref_leaves, *to64)
    for i in range(len(leaves)):
        assert_matches(grads[i], ref_grads[i], torch.float32, f"{name} create_graph gradient of input {i}")
    for i in range(len(second)):
        assert_matches(second[i], ref_second[i], torch.float32, f"{name} second derivative, input/output gradient {i}")


@pytest.mark.parametrize("name, reduction", OP_CASES)
def test_gradcheck_and_gradgradcheck_in_float64_on_the_reference(monkeypatch, name, reduction):
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "reference")
    case = _case(name, torch.device("cpu"), torch.float64, reduction)
    leaves = _leaves(case)
    assert torch.autograd.gradcheck(case.op, leaves)
    if case.double_backward:
        assert torch.autograd.gradgradcheck(case.op, leaves)
    else:
        with pytest.raises(RuntimeError, match=rf"torch_metal_fused\.{name} does not support double backward"):
            torch.autograd.gradgradcheck(case.op, leaves)


def test_linear_cross_entropy_retain_graph_repro_from_the_issue(backend):
    """The report's exact repro: three backward calls on a retained graph."""
    h = torch.randn(9, 16, device=backend.device, requires_grad=True)
    w = torch.randn(40, 16, device=backend.device, requires_grad=True)
    loss = tmf.linear_cross_entropy(h, w, torch.randint(0, 40, (9,), device=backend.device))
    grads = []
    for _ in range(3):
        loss.backward(retain_graph=True)
        grads.append((h.grad.clone(), w.grad.clone()))
    for k, (gh, gw) in enumerate(grads, start=1):
        torch.testing.assert_close(gh, k * grads[0][0])
        torch.testing.assert_close(gw, k * grads[0][1])
    assert math.isfinite(float(loss.detach()))


@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_retained_backwards_with_output_gradients_other_than_one(backend, name, reduction):
    """(loss · s).backward(retain_graph=True) for s = 2, 1, 1, 0.5: the first call scales the gradients computed in
    forward, the later ones recompute; each adds s times the float64 gradient. A recompute that dropped the output
    gradient, or a scaling rounded to the loss's dtype, fails here."""
    case = _case(name, backend.device, reduction=reduction)
    leaves = _leaves(case)
    loss = case.op(*leaves)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref_grads = torch.autograd.grad(case.composite(*ref_leaves), ref_leaves)
    total = 0.0
    for s in (2.0, 1.0, 1.0, 0.5):
        (loss * s).backward(retain_graph=True)
        total += s
        for i, (t, ref) in enumerate(zip(leaves, ref_grads)):
            assert_matches(
                t.grad, total * ref, torch.float32, f"{name} input {i} after output gradients summing to {total}"
            )


def test_linear_cross_entropy_keeps_nothing_after_a_scaled_backward_and_no_cast_weight(backend):
    """After a backward with an output gradient other than 1 (GradScaler, gradient accumulation) the op holds no
    gradient; under autocast it keeps the original float32 weight for a recompute, not the cast vocab x hidden copy."""
    h = randn((9, 16), torch.float32, backend.device).requires_grad_(True)
    w = randn((40, 16), torch.float32, backend.device, seed=1).requires_grad_(True)
    target = T(TARGET, device=backend.device)
    loss = tmf.linear_cross_entropy(h, w, target)
    node = _custom_node((loss,))
    (loss * 0.5).backward()
    assert node.eager_grads is None
    with torch.autocast(backend.device.type, dtype=torch.bfloat16):
        loss = tmf.linear_cross_entropy(h, w, target)
    node = _custom_node((loss,))
    assert all(t is None or t.numel() != w.numel() for t in node.saved_tensors)
    assert node.weight_before_cast is w
    g1 = torch.autograd.grad(loss, (h, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (h, w))  # the recompute, from the original weight cast again
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", ["rms_norm", "add_rms_norm"])
def test_double_backward_with_gemma_offset(backend, name):
    """offset=1 ((1 + weight), Gemma): the create_graph formula must use it too."""
    x, res = randn((5, 33), torch.float32, backend.device), randn((5, 33), torch.float32, backend.device, seed=1)
    w = randn((33,), torch.float32, backend.device, scale=0.1, seed=2)
    if name == "rms_norm":
        op = lambda x, w: tmf.rms_norm(x, w, EPS, offset=1.0)  # noqa: E731
        composite = lambda x, w: rms64(x, w + 1.0, EPS)  # noqa: E731
        leaves = [x, w]
    else:
        op = lambda x, r, w: tmf.add_rms_norm(x, r, w, EPS, offset=1.0)[0]  # noqa: E731
        composite = lambda x, r, w: rms64(x + r, w + 1.0, EPS)  # noqa: E731
        leaves = [x, res, w]
    leaves = [t.requires_grad_(True) for t in leaves]
    dys = [randn((5, 33), torch.float32, backend.device, seed=3)]
    vs = [randn(t.shape, t.dtype, t.device, seed=10 + i) for i, t in enumerate(leaves)]
    _, second = _vector_hessian_product(op, leaves, dys, vs)
    ref_leaves = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    _, ref = _vector_hessian_product(
        composite, ref_leaves, [d.double().cpu() for d in dys], [v.double().cpu() for v in vs]
    )
    for i, (a, b) in enumerate(zip(second, ref)):
        assert_matches(a, b, torch.float32, f"{name} offset=1 second derivative {i}")
