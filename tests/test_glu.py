"""swiglu / geglu (tmf.glu) against float64 autograd of torch's silu / gelu(approximate="tanh"): every dtype, odd
sizes, the layouts HF produces (separate projections, halves of a fused gate_up projection, offsets, strided incoming
gradients), empty tensors, ±inf/NaN and huge values; the harness moves each element once; the module and the HF MLP
patch equal the unfused code; bad input raises a clear error."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, LAYOUTS, AutogradCase, bytes_alive_after, draws, make_layout, randn
from nan_inf import INF, NAN, check_rows, nan_inf_contract

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches

F = torch.nn.functional
TORCH_ACT = {"silu": F.silu, "gelu_tanh": lambda g: F.gelu(g, approximate="tanh")}


def _check(gate, up, activation, dtype, dout=None, what=""):
    gate = gate.detach().requires_grad_(True)
    up = up.detach().requires_grad_(True)
    out = tmf.glu(gate, up, activation)
    if dout is None:
        dout = randn(out.shape, dtype, gate.device, seed=7)
    dgate, dup = torch.autograd.grad(out, (gate, up), dout)
    g64 = gate.detach().double().cpu().requires_grad_(True)
    u64 = up.detach().double().cpu().requires_grad_(True)
    out64 = TORCH_ACT[activation](g64) * u64
    dgate64, dup64 = torch.autograd.grad(out64, (g64, u64), dout.double().cpu())
    assert out.dtype == dtype and out.device == gate.device and out.is_contiguous()
    assert_matches(out, out64, dtype, f"{activation} forward {what}")
    assert_matches(dgate, dgate64, dtype, f"{activation} dgate {what}")
    assert_matches(dup, dup64, dtype, f"{activation} dup {what}")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 37), (2, 5, 1025), (4, 4096), (3, 11008)])
def test_contract(backend, activation, dtype, shape):
    gate = randn(shape, dtype, backend.device, scale=3.0)
    up = randn(shape, dtype, backend.device, seed=1)
    _check(gate, up, activation, dtype)


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_layouts(backend, activation, dtype, layout):
    """Each of gate, up and the incoming gradient in its own layout (the others contiguous, or all alike)."""
    shape = (6, 517)
    gate = make_layout(shape, dtype, backend.device, layout, scale=3.0)
    up = make_layout(shape, dtype, backend.device, layout, seed=1)
    dout = make_layout(shape, dtype, backend.device, layout, seed=2)
    _check(gate, up, activation, dtype, dout, f"all {layout}")
    _check(gate, randn(shape, dtype, backend.device, seed=1), activation, dtype, what=f"gate {layout}")
    _check(randn(shape, dtype, backend.device), up, activation, dtype, dout, f"up and dout {layout}")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_halves_of_a_fused_gate_up_projection(backend, activation, dtype):
    """Phi-3 style: gate, up = gate_up.chunk(2, -1): rows 2·I apart, up at an offset of I elements; odd I, so the
    rows are not 16-byte aligned either; 5003 takes several threadgroups per strided row."""
    for inter in (37, 1024, 5003):
        gate_up = randn((2, 3, 2 * inter), dtype, backend.device, scale=2.0)
        gate, up = gate_up.chunk(2, dim=-1)
        _check(gate, up, activation, dtype, what=f"chunked {inter}")


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_values(backend, activation, dtype):
    """±inf, NaN, huge and tiny gates (where exp overflows, tanh saturates and g³ overflows in float32), zero and
    huge up values: NaN/inf exactly where float64 torch has them."""
    big = torch.finfo(dtype).max / 4
    gate = torch.tensor(
        [float("inf"), -float("inf"), float("nan"), 0.0, -0.0, 1e-30, -1e-30, 88.0, -88.0, 89.0, -89.0, 20.0, -20.0]
        + [9.0, -9.0, 1e4, -1e4, big, -big, 0.5, -3.0, 6e4, -6e4],
        dtype=torch.float64,
    )
    gate = gate.to(dtype).to(torch.float64)  # what the dtype holds
    # |up|, |dout| <= 1 where the gate is huge: the products still fit the dtype (float16 stops at 65504)
    up = torch.linspace(-1.0, 1.0, gate.numel(), dtype=torch.float64)
    up[3] = 0.0
    up[5] = 1e3
    dout = torch.linspace(0.9, -0.9, gate.numel(), dtype=torch.float64)
    _check(
        gate.to(dtype).to(backend.device),
        up.to(dtype).to(backend.device),
        activation,
        dtype,
        dout.to(dtype).to(backend.device),
        "edge values",
    )


@pytest.mark.parametrize("shape", [(0,), (0, 7), (3, 0), (2, 0, 5)])
def test_empty(backend, shape):
    gate = torch.randn(shape, device=backend.device, requires_grad=True)
    up = torch.randn(shape, device=backend.device, requires_grad=True)
    out = tmf.swiglu(gate, up)
    assert out.shape == gate.shape
    out.sum().backward()
    assert gate.grad.shape == gate.shape and up.grad.shape == up.shape


def test_scalars_and_the_named_functions(backend):
    g, u = torch.tensor(1.5, device=backend.device), torch.tensor(-2.0, device=backend.device)
    torch.testing.assert_close(tmf.swiglu(g, u).cpu(), (F.silu(g) * u).cpu())
    torch.testing.assert_close(tmf.geglu(g, u).cpu(), (F.gelu(g, approximate="tanh") * u).cpu())


def test_gradcheck_reference():
    g = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    for act in ("silu", "gelu_tanh"):
        assert torch.autograd.gradcheck(lambda a, b: tmf.glu(a, b, act), (g, u))


def test_bad_input_is_a_clear_error():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        tmf.swiglu(g, torch.randn(4, 9))
    with pytest.raises(ValueError, match="gate and up must have the same shape"):
        tmf.swiglu(g, torch.randn(8))  # no broadcasting
    with pytest.raises(TypeError, match="up"):
        tmf.swiglu(g, g.double())
    with pytest.raises(ValueError, match="activation must be one of"):
        tmf.glu(g, g, "relu")
    with pytest.raises(TypeError, match="gate"):
        tmf.swiglu([1.0], g)


@pytest.mark.emulated
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "layout"), [((8, 11008), "contiguous"), ((3, 1001), "halves")])
def test_harness_moves_each_element_once(monkeypatch, dtype, shape, layout):
    """The traffic floor: forward reads gate and up and writes out, backward reads gate, up and dout and writes
    dgate and dup — each element once (the harness counts every device byte), in one dispatch each."""
    from torch_metal_fused.emulator import runner
    from torch_metal_fused.ops.glu import glu_backward

    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "metal-emulated")
    if layout == "halves":
        gate, up = randn((shape[0], 2 * shape[1]), dtype, "cpu").chunk(2, -1)
    else:
        gate, up = randn(shape, dtype, "cpu"), randn(shape, dtype, "cpu", seed=1)
    dout = randn(shape, dtype, "cpu", seed=2)
    nbytes = gate.numel() * gate.element_size()
    with runner.record() as fwd:
        tmf.swiglu(gate, up)
    with runner.record() as bwd:
        glu_backward(dout, gate, up, 0)
    (f,), (b,) = fwd, bwd
    suffix = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}[dtype]
    assert f.kernel == f"glu_forward_silu_{suffix}" and b.kernel == f"glu_backward_silu_{suffix}"
    n = nbytes
    assert f.traffic == {0: (n, 0), 1: (n, 0), 2: (0, n)}
    assert b.traffic == {0: (n, 0), 1: (n, 0), 2: (n, 0), 3: (0, n), 4: (0, n)}


# ---- an MLP's down projection of glu: the activation recomputed, gradients written over gate and up ---------------
def _projections(x, w_gate, w_up):
    """gate and up as an MLP's projections make them: F.linear of a 3-D input, gate without bias (a tensor of its
    own), up with a zero bias (a view of the product's base)."""
    return F.linear(x, w_gate), F.linear(x, w_up, torch.zeros_like(w_up[:, 0]))


def _mlp(x, w_gate, w_up, w_down, activation="silu"):
    """As patch_model's MLP: gate and up made for the op alone, down_of_glu."""
    from torch_metal_fused.ops.glu import down_of_glu

    return down_of_glu(lambda c: F.linear(c, w_down), *_projections(x, w_gate, w_up), activation)


def _mlp_inputs(dtype, device, seed=0):
    x = randn((2, 5, 24), dtype, device, seed=seed).requires_grad_(True)
    weights = [
        (randn(shape, dtype, device, seed=seed + i) * 0.5).requires_grad_(True)
        for i, shape in enumerate(((40, 24), (40, 24), (24, 40)), 1)
    ]
    return (x, *weights)


def _float64_mlp(inputs, dout, activation="silu"):
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    x, w_gate, w_up, w_down = leaves
    out = (TORCH_ACT[activation](x @ w_gate.t()) * (x @ w_up.t())) @ w_down.t()
    return out, torch.autograd.grad(out, leaves, dout.double().cpu())


def _gradient_pointers(out_fn, inputs):
    """out and the data pointers of (gate, up) and of the gradients autograd hands their producers."""
    from torch_metal_fused.ops import glu as glu_module

    seen = {}
    real = glu_module._glu

    def spy(gate, up, activation, inputs_private):
        seen["inputs"] = (gate.data_ptr(), up.data_ptr())
        gate.register_hook(lambda g: seen.__setitem__("dgate", g.data_ptr()))
        up.register_hook(lambda g: seen.__setitem__("dup", g.data_ptr()))
        return real(gate, up, activation, inputs_private)

    glu_module._glu = spy
    try:
        out = out_fn(*inputs)
    finally:
        glu_module._glu = real
    return out, seen


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mlp_writes_the_gradients_over_gate_and_up(backend, activation, dtype):
    """gate and up made for the op alone (patch_model's MLP, the nn layer): glu's gradients are written over them
    (no gate-sized allocation at the backward's peak); every gradient equals the float64 formula's, so the activation
    recomputed for the down projection's backward is glu's."""
    inputs = _mlp_inputs(dtype, backend.device)
    out, seen = _gradient_pointers(lambda *t: _mlp(*t, activation), inputs)
    dout = randn(out.shape, dtype, backend.device, seed=7)
    grads = torch.autograd.grad(out, inputs, dout)
    out64, grads64 = _float64_mlp(inputs, dout, activation)
    assert (seen["dgate"], seen["dup"]) == seen["inputs"], "the gradients were not written over gate and up"
    assert_matches(out, out64, dtype, "forward")
    for name, g, g64 in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, grads64):
        assert_matches(g, g64, dtype, name)


def test_mlp_keeps_no_activation_for_backward():
    """What a forward leaves allocated for backward: the plain composition keeps glu's output (down saves it);
    down_of_glu keeps exactly one tokens x intermediate tensor less, and the gradients stay equal."""
    inputs = _mlp_inputs(torch.float32, "cpu")
    held = []
    plain = bytes_alive_after(lambda: held.append(F.linear(tmf.glu(*_projections(*inputs[:3]), "silu"), inputs[3])))
    fused = bytes_alive_after(lambda: held.append(_mlp(*inputs)))
    assert plain - fused == 2 * 5 * 40 * 4
    dout = randn(held[0].shape, torch.float32, "cpu", seed=7)
    for a, b in zip(torch.autograd.grad(held[0], inputs, dout), torch.autograd.grad(held[1], inputs, dout)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_mlp_keeps_inputs_that_something_else_reads(backend):
    """Fresh gradients wherever gate or up may be read after the backward: the public op (the caller may hold them),
    a retained graph (a second backward gives the same gradients), create_graph (second-order gradients through the
    recomputed activation), a Python reference to gate, to a view or alias of it, to up or to up's base, gate and up
    halves of one tensor. What the caller holds keeps its values."""
    from torch_metal_fused.ops.glu import down_of_glu

    dtype = torch.float32
    inputs = _mlp_inputs(dtype, backend.device)
    dout = randn((2, 5, 24), dtype, backend.device, seed=7)
    _, grads64 = _float64_mlp(inputs, dout)
    held = []

    def holding(what):
        def fn(x, w_gate, w_up, w_down):
            gate, up = _projections(x, w_gate, w_up)
            held.append({"gate": gate, "view": gate[0], "alias": gate.detach(), "up": up, "up's base": up._base}[what])
            return down_of_glu(lambda c: F.linear(c, w_down), gate, up, "silu")

        return fn

    def halves(x, w_gate, w_up, w_down):
        gate_up = F.linear(x, torch.cat((w_gate, w_up)))
        return down_of_glu(lambda c: F.linear(c, w_down), gate_up[..., :40], gate_up[..., 40:], "silu")

    cases = {
        "public op": lambda x, wg, wu, wd: F.linear(tmf.glu(*_projections(x, wg, wu), "silu"), wd),
        **{f"held {what}": holding(what) for what in ("gate", "view", "alias", "up", "up's base")},
        "halves of one tensor": halves,
    }
    for name, fn in cases.items():
        held.clear()
        out, seen = _gradient_pointers(fn, inputs)
        before = held[0].detach().clone() if held else None
        grads = torch.autograd.grad(out, inputs, dout)
        assert seen["dgate"] != seen["inputs"][0] and seen["dup"] != seen["inputs"][1], name
        if held:
            assert torch.equal(held[0], before), f"{name}: what the caller holds was overwritten"
        for g, g64 in zip(grads, grads64):
            assert_matches(g, g64, dtype, name)
    out = _mlp(*inputs)
    first = torch.autograd.grad(out, inputs, dout, retain_graph=True)
    second = torch.autograd.grad(out, inputs, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b), "retain_graph: the second backward differs"
    x = inputs[0]
    (dx,) = torch.autograd.grad(_mlp(*inputs), x, dout, create_graph=True)
    ddx = torch.autograd.grad(dx.square().sum(), inputs)  # through the recomputed activation to every input
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    out64 = (F.silu(leaves[0] @ leaves[1].t()) * (leaves[0] @ leaves[2].t())) @ leaves[3].t()
    (dx64,) = torch.autograd.grad(out64, leaves[0], dout.double().cpu(), create_graph=True)
    for name, g, g64 in zip(("x", "w_gate", "w_up", "w_down"), ddx, torch.autograd.grad(dx64.square().sum(), leaves)):
        assert_matches(g, g64, dtype, f"double backward d{name}")


def test_another_node_that_saved_gate_keeps_it(backend):
    """Another op saved the same gate tensor (an activation penalty, say): a C++ holder no Python count sees, found
    by the tensor's use count. Whichever backward autograd runs first, every gradient is right and none raises: gate
    is overwritten only once that op's backward has run and released it."""
    from torch_metal_fused.ops.glu import down_of_glu

    inputs = _mlp_inputs(torch.float32, backend.device)

    def fn(x, w_gate, w_up, w_down):
        gate, up = _projections(x, w_gate, w_up)
        square = gate.square().sum()  # made before glu's node, so autograd runs it after glu's backward
        return down_of_glu(lambda c: F.linear(c, w_down), gate, up, "silu").sum() + square

    grads = torch.autograd.grad(fn(*inputs), inputs)
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in inputs]
    gate64 = leaves[0] @ leaves[1].t()
    out64 = ((F.silu(gate64) * (leaves[0] @ leaves[2].t())) @ leaves[3].t()).sum() + gate64.square().sum()
    for name, g, g64 in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, torch.autograd.grad(out64, leaves)):
        assert_matches(g, g64, torch.float32, name)


def test_mlp_under_batched_gradients():
    """torch.autograd.grad(is_grads_batched=True) (vmap over incoming gradients): no in-place write into the
    unbatched gate and up; each batch entry's gradients equal a plain backward's."""
    inputs = _mlp_inputs(torch.float32, "cpu")
    douts = randn((3, 2, 5, 24), torch.float32, "cpu", seed=7)
    batched = torch.autograd.grad(_mlp(*inputs), inputs, douts, is_grads_batched=True)
    for i in range(3):
        for g, g_i in zip(batched, torch.autograd.grad(_mlp(*inputs), inputs, douts[i])):
            torch.testing.assert_close(g[i], g_i)


def test_mlp_steps_aside_where_its_hooks_would_change_what_autograd_checks(backend):
    """(1) glu's output changed in place inside the down projection (an in-place dropout) is saved as it is, not
    recomputed from gate and up; (2) a weight the down projection saved and that changed in place before backward
    raises autograd's error, as without the hooks (autograd skips its check for hooked saved tensors); (3) a forward
    hook on the down projection that builds a side loss on its input: that loss's own backward, after the step's,
    still works."""
    from torch_metal_fused.ops.glu import down_of_glu

    inputs = _mlp_inputs(torch.float32, backend.device)
    x, w_gate, w_up, w_down = inputs
    dout = randn((2, 5, 24), torch.float32, backend.device, seed=7)

    def scaled_in_place(c):
        return F.linear(c.mul_(2.0), w_down)

    out = down_of_glu(scaled_in_place, *_projections(x, w_gate, w_up), "silu")
    grads = torch.autograd.grad(out, inputs, dout)
    _, grads64 = _float64_mlp(inputs, dout * 2)
    for name, g, g64 in zip(("dx", "dw_gate", "dw_up", "dw_down"), grads, grads64):
        assert_matches(g, g64, torch.float32, f"in-place change inside down: {name}")

    w = w_down.detach().clone().requires_grad_(True)
    out = down_of_glu(lambda c: F.linear(c, w), *_projections(x, w_gate, w_up), "silu")
    with torch.no_grad():
        w.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out, inputs[:3], dout)

    down = torch.nn.Linear(40, 24, bias=False).to(backend.device)
    probe = torch.nn.Linear(40, 1, bias=False).to(backend.device)
    side = []
    down.register_forward_hook(lambda module, args, output: side.append(probe(args[0]).sum()))
    out = down_of_glu(down, *_projections(x, w_gate, w_up), "silu")
    torch.autograd.grad(out, inputs[:3], dout)
    (dprobe,) = torch.autograd.grad(side[0], probe.weight)
    assert torch.isfinite(dprobe).all()


# ---- module and HF patch -------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_swiglu_mlp_module_matches_hf_mlp(backend, activation):
    transformers = pytest.importorskip("transformers")
    cfg_cls, mlp_mod = (
        ("LlamaConfig", "llama.modeling_llama.LlamaMLP")
        if activation == "silu"
        else ("GemmaConfig", "gemma.modeling_gemma.GemmaMLP")
    )
    import importlib

    module_path, cls_name = mlp_mod.rsplit(".", 1)
    hf_cls = getattr(importlib.import_module(f"transformers.models.{module_path}"), cls_name)
    config = getattr(transformers, cfg_cls)(hidden_size=24, intermediate_size=70, num_attention_heads=4, head_dim=6)
    torch.manual_seed(0)
    hf = hf_cls(config).to(backend.device)
    ours = tmf.nn.SwiGLUMLP(24, 70, activation=activation).to(backend.device)
    ours.load_state_dict(hf.state_dict())  # same keys, same shapes
    x = randn((3, 5, 24), torch.float32, backend.device).requires_grad_(True)
    y, y_ref = ours(x), hf(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    (dx,) = torch.autograd.grad(y.square().sum(), x)
    (dx_ref,) = torch.autograd.grad(y_ref.square().sum(), x)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="activation must be one of"):
        tmf.nn.SwiGLUMLP(4, 8, activation="relu")


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_patched_mlps_equal_hf_and_peft_projections_keep_working(backend, arch):
    """patch_model(swiglu=True) on a PEFT-wrapped tiny Llama (SwiGLU) or Gemma (GeGLU): the LoRA-adapted
    gate/up/down projections stay PEFT's (or our LoRA path); logits and every trainable gradient equal the
    unpatched model's; unpatch restores."""
    pytest.importorskip("peft")
    from train_lora import build_model

    model = build_model(50, arch=arch)
    x = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=x, labels=x)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    report = tmf.patch_model(model, rms_norm=False, lora=False, swiglu=True)
    kind = "SwiGLU" if arch == "llama" else "GeGLU"
    assert sum(f"({kind} fused)" in what for _, what in report.patched) == 2, report
    out = model(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, ref.logits, rtol=1e-5, atol=1e-5)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert tmf.unpatch_model(model) == 2


def test_mlp_with_an_activation_without_kernel_is_left_with_the_reason():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = LlamaMLP(
        transformers.LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="relu")
    )
    report = tmf.patch_model(mlp, swiglu=True)
    assert report.patched == [] and "has no fused kernel" in dict(report.skipped)[""]


# ---- the autograd contract's case (tests/test_autograd_contract.py) --------------------------------------------
def autograd_case(name, device, dtype, reduction) -> AutogradCase:
    fn = {"glu": lambda g, u: tmf.glu(g, u, "silu"), "swiglu": tmf.swiglu, "geglu": tmf.geglu}[name]
    F = torch.nn.functional
    act = (lambda g: F.gelu(g, approximate="tanh")) if name == "geglu" else F.silu
    ins = [randn((5, 67), dtype, device, scale=2.0, seed=1), randn((5, 67), dtype, device, seed=2)]
    return AutogradCase(fn, lambda g, u: act(g) * u, ins)


# ---- every kernel of the family, for tests/test_emulator_kernels.py's drive -------------------------------------
def every_kernel(dtype):
    """Zero-argument calls that dispatch every GLU kernel in `dtype`: both activations, forward and backward."""
    gate, up = randn((3, 50), dtype, "cpu").requires_grad_(True), randn((3, 50), dtype, "cpu").requires_grad_(True)
    for act in ("silu", "gelu_tanh"):
        yield lambda act=act: tmf.glu(gate, up, act).sum().backward()


# ---- calls that differ in one thing a launch plan depends on (tests/test_compile_shader.py's plan-cache test) -----
def plan_cache_calls() -> list:
    """(backend entry point, arguments): back to back, each must get its own plan."""
    r = draws()

    gate, up = r(4, 300), r(4, 300)
    return [("glu_forward", (gate, up, 0)), ("glu_forward", (gate, up, 1))]  # the activation


# ---- NaN and ±inf as torch (tests/nan_inf.py: the contract and its helpers) ------------------------------------------
@nan_inf_contract("glu", "swiglu", "geglu")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("entry", ["swiglu", "geglu", "glu_silu", "glu_gelu_tanh"])
def test_nan_inf(backend, entry, dtype):
    """NaN/±inf in gate, up and the incoming gradient at the first, middle and last element of rows 1027 wide
    (strided rows: launched per row, the last thread's chunk partial) and of a flat contiguous tensor."""
    activation = {"swiglu": "silu", "geglu": "gelu_tanh"}.get(entry, entry[4:])
    fn = {"swiglu": tmf.swiglu, "geglu": tmf.geglu}.get(entry, lambda g, u: tmf.glu(g, u, activation))
    cols = 1027
    rows = 6
    for layout in ("strided_rows", "contiguous"):
        base_g = randn((rows, cols + 5), dtype, backend.device, scale=3.0)
        base_u = randn((rows, cols + 5), dtype, backend.device, seed=1)
        gate = base_g[:, 2 : 2 + cols] if layout == "strided_rows" else base_g[:, :cols].contiguous()
        up = base_u[:, 2 : 2 + cols] if layout == "strided_rows" else base_u[:, :cols].contiguous()
        for (row, col), value in {(1, 0): NAN, (1, cols // 2): INF, (1, cols - 1): -INF, (3, 5): 1e30}.items():
            gate[row, col] = value
        for (row, col), value in {(2, 0): INF, (2, cols // 2): NAN, (2, cols - 1): -INF, (1, cols // 2): 0.0}.items():
            up[row, col] = value
        gate, up = gate.detach().requires_grad_(True), up.detach().requires_grad_(True)
        out = fn(gate, up)
        dout = randn(out.shape, dtype, backend.device, seed=2)
        dout[4, 0], dout[4, cols - 1], dout[3, cols // 2] = NAN, INF, -INF
        dgate, dup = torch.autograd.grad(out, (gate, up), dout)
        g64 = gate.detach().double().cpu().requires_grad_(True)
        u64 = up.detach().double().cpu().requires_grad_(True)
        out64 = TORCH_ACT[activation](g64) * u64
        dgate64, dup64 = torch.autograd.grad(out64, (g64, u64), dout.double().cpu())
        tag = f"{entry} {layout}"
        check_rows(out, out64, dtype, f"{tag} forward", [0, 5])
        check_rows(dgate, dgate64, dtype, f"{tag} dgate", [0, 5])
        check_rows(dup, dup64, dtype, f"{tag} dup", [0, 5])
