"""A Mac user's first run must never crash because of our shaders: each failure mode of the Metal path is forced on
the harness (TORCH_METAL_FUSED_EMU_FAULTS / runner.faults) and must degrade as specified — the affected calls are
served by the reference with one warning naming the family and the reason, everything else stays on our kernels,
a failed family is never retried, and TORCH_METAL_FUSED_STRICT=1 turns the fallback into an error. The decisions
run in the same code for MPS (csrc/include/tmf/launch, torch_metal_fused/_backend.py)."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path

import pytest
import torch
from helpers import randn

import torch_metal_fused as tmf
from torch_metal_fused import _backend
from torch_metal_fused.emulator import runner
from torch_metal_fused.testing import assert_matches

pytestmark = pytest.mark.emulated


@pytest.fixture(autouse=True)
def _emulated_not_strict(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "metal-emulated")
    monkeypatch.setenv(_backend.STRICT_ENV, "0")
    monkeypatch.delenv(runner.FAULTS_ENV, raising=False)
    _backend.reset_fallbacks()
    yield
    _backend.reset_fallbacks()


def _run(fn):
    """(result, kernels dispatched, our fallback warnings) of fn()."""
    with warnings.catch_warnings(record=True) as caught, runner.record() as rec:
        warnings.simplefilter("always")
        out = fn()
    ours = [str(w.message) for w in caught if "torch_metal_fused:" in str(w.message)]
    return out, [d.kernel for d in rec], ours


def _softmax_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().requires_grad_(True)
    y = tmf.softmax(x)
    (dx,) = torch.autograd.grad((y * torch.linspace(-1, 1, x.shape[-1], dtype=x.dtype)).sum(), x)
    return y, dx


def _softmax_grad_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.detach().double().requires_grad_(True)
    y = torch.softmax(x64, -1)
    (dx,) = torch.autograd.grad((y * torch.linspace(-1, 1, x.shape[-1], dtype=torch.float64)).sum(), x64)
    return y, dx


def _rms_norm_grads(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x, w = x.detach().requires_grad_(True), w.detach().requires_grad_(True)
    y = tmf.rms_norm(x, w, eps=1e-6)
    return (y, *torch.autograd.grad((y * y).sum(), (x, w)))


def _rms_norm_grads_reference(x: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x64, w64 = x.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    y = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * w64
    return (y, *torch.autograd.grad((y * y).sum(), (x64, w64)))


def _assert_all_match(outs, refs, dtype):
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert_matches(out, ref, dtype, what=f"output {i}")


def test_a_shader_that_fails_to_compile_takes_down_only_its_family_once():
    x = randn((9, 300), torch.float32, "cpu")
    w = randn((300,), torch.float32, "cpu", seed=1)
    with runner.faults("compile:softmax"):
        (y, dx), kernels, warned = _run(lambda: _softmax_grad(x))
        _assert_all_match((y, dx), _softmax_grad_reference(x), torch.float32)
        assert not any(k.startswith("softmax") for k in kernels)
        assert len(warned) == 1, warned
        for part in ("softmax kernels", "compiling softmax.metal failed", "Metal-on-CPU harness", "doctor"):
            assert part in warned[0], warned[0]
        # RMSNorm's library is another file: still on our kernels.
        _, kernels, warned = _run(lambda: _rms_norm_grads(x, w))
        assert any(k.startswith("rms_norm_forward") for k in kernels) and not warned
    # Never retried: with the fault gone, softmax stays on the reference, silently.
    (y, dx), kernels, warned = _run(lambda: _softmax_grad(x))
    assert kernels == [] and warned == []
    _assert_all_match((y, dx), _softmax_grad_reference(x), torch.float32)
    assert tmf.backend_for(x, "softmax") == "reference"
    assert tmf.backend_for(x, "rms_norm") == "metal-emulated"
    assert _backend.unavailable_families("metal-emulated") == {
        "softmax": "compiling softmax.metal failed: injected fault (TORCH_METAL_FUSED_EMU_FAULTS)"
    }


def test_strict_mode_turns_the_fallback_into_an_error(monkeypatch):
    monkeypatch.setenv(_backend.STRICT_ENV, "1")
    x = randn((4, 64), torch.float32, "cpu")
    with runner.faults("compile:rms_norm"), pytest.raises(RuntimeError, match=r"rms_norm kernels.*STRICT=1"):
        tmf.rms_norm(x, None)
    with runner.faults("no_bfloat"), pytest.raises(RuntimeError, match="lacks bfloat"):
        tmf.softmax(x.bfloat16())


def test_the_fault_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv(runner.FAULTS_ENV, "simd_width:softmax=64")
    x = randn((3, 40), torch.float32, "cpu")
    y, kernels, warned = _run(lambda: tmf.softmax(x))
    assert kernels == [] and len(warned) == 1 and "threadExecutionWidth 64" in warned[0]
    assert_matches(y, torch.softmax(x.double(), -1), torch.float32)


@pytest.mark.parametrize(
    ("fault", "cols"),
    [
        ("pipeline:rms_norm_backward_dw_reduce_columns_float", 300),  # the second pipeline of the backward
        ("pipeline:rms_norm_backward_dx_dw_looped_float", 9000),  # only the looped variant
        ("pipeline:rms_norm_forward_simd_rows_float", 100),
    ],
)
def test_a_pipeline_that_cannot_be_built_serves_the_family_by_the_reference(fault, cols):
    x = randn((6, cols), torch.float32, "cpu")
    w = randn((cols,), torch.float32, "cpu", seed=1)
    kernel = fault.split(":", 1)[1]
    with runner.faults(fault):
        outs, kernels, warned = _run(lambda: _rms_norm_grads(x, w))
    _assert_all_match(outs, _rms_norm_grads_reference(x, w), torch.float32)
    assert kernel not in kernels
    assert len(warned) == 1 and f"building the pipeline for {kernel} failed" in warned[0], warned
    # Pipelines are selected before anything is encoded: the failing call dispatched nothing of its own, and the
    # family is off for the rest of the process.
    if "backward" in kernel:
        assert not any(k.startswith("rms_norm_backward") for k in kernels), kernels
    _, kernels, warned = _run(lambda: _rms_norm_grads(x, w))
    assert kernels == [] and warned == []


def test_a_kernel_call_that_raises_at_encode_time_serves_the_family_by_the_reference():
    """PyTorch's kernel call refusing its arguments (an API change, or a binding bug of ours) is found while encoding,
    possibly after other dispatches of the same call: the call is served by the reference from its inputs (the
    dispatches wrote only outputs the entry point allocated, now discarded) and the family is off for the process.
    The attention backward encodes three dispatches: the third one raises."""
    q, k, v = (randn((1, 2, 40, 32), torch.float32, "cpu", seed=s).requires_grad_(True) for s in (1, 2, 3))
    dout = randn((1, 2, 40, 32), torch.float32, "cpu", seed=4)

    def grads():
        out = tmf.attention(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))

    want, kernels, warned = _run(grads)
    assert "attention_backward_dkdv_d32_float" in kernels and not warned
    _backend.reset_fallbacks()
    with runner.faults("encode:attention_backward_dkdv_d32_float"):
        got, kernels, warned = _run(grads)
    assert "attention_backward_dq_d32_float" in kernels and "attention_backward_dkdv_d32_float" not in kernels
    assert len(warned) == 1 and "encoding attention_backward_dkdv_d32_float failed" in warned[0], warned
    for i, (a, b) in enumerate(zip(got, want)):
        assert_matches(a, b.double(), torch.float32, f"output {i}")
    _, kernels, warned = _run(grads)
    assert kernels == [] and warned == []


def test_a_non_32_wide_simd_group_falls_back_with_a_warning():
    x = randn((5, 1000), torch.float16, "cpu")
    w = randn((1000,), torch.float16, "cpu", seed=2)
    with runner.faults("simd_width:rms_norm=16"):
        outs, kernels, warned = _run(lambda: _rms_norm_grads(x, w))
        _assert_all_match(outs, _rms_norm_grads_reference(x, w), torch.float16)
        assert not any(k.startswith("rms_norm") for k in kernels)
        assert len(warned) == 1 and "threadExecutionWidth 16" in warned[0] and "32-wide" in warned[0]
        _, kernels, warned = _run(lambda: tmf.softmax(x))  # another family: unaffected
        assert kernels == ["softmax_forward_single_row_half"] and not warned


def test_lora_rank_above_the_pipelines_thread_cap_is_served_by_the_reference_for_that_call():
    """Never a ValueError: the call is served by the reference (one warning); calls the cap allows stay fused.
    Rank 200 needs 4 rank blocks of 32 token rows (128 threads); a pipeline capped at 64 threads cannot hold that."""
    x = randn((10, 20), torch.float32, "cpu")
    w = randn((30, 20), torch.float32, "cpu", seed=1)
    a, b = randn((200, 20), torch.float32, "cpu", seed=2), randn((30, 200), torch.float32, "cpu", seed=3)
    ref = x.double() @ w.double().t() + 0.5 * (x.double() @ a.double().t()) @ b.double().t()
    with runner.faults("max_threads:lora_linear=64"):
        y, kernels, warned = _run(lambda: tmf.lora_linear(x, w, a, b, 0.5))
        assert_matches(y, ref, torch.float32)
        assert kernels == [] and len(warned) == 1 and "rank 200 needs 128 threads" in warned[0]
        y, kernels, warned = _run(lambda: tmf.lora_linear(x, w, a[:100], b[:, :100], 0.5))  # 2 blocks: 64 threads
        assert kernels == ["lora_forward_h_tg1024_float", "lora_forward_y_tg512_float", "lora_forward_y_tg512_float"]
        assert not warned
        ref100 = x.double() @ w.double().t() + 0.5 * (x.double() @ a[:100].double().t()) @ b[:, :100].double().t()
        assert_matches(y, ref100, torch.float32)
        _, kernels, warned = _run(lambda: tmf.lora_linear(x, w, a, b, 0.5))  # again: no second warning
        assert kernels == [] and warned == []


def test_a_thread_cap_takes_the_next_valid_plan():
    """single_row capped below what a 2000-wide row needs (256 threads): the looped variant (uncapped) serves it."""
    x = randn((3, 2000), torch.float32, "cpu")
    with runner.faults("max_threads:softmax_forward_single_row_float=128"):
        y, kernels, warned = _run(lambda: tmf.softmax(x))
    assert kernels == ["softmax_forward_looped_float"] and not warned
    assert_matches(y, torch.softmax(x.double(), -1), torch.float32)


def test_a_pipeline_allowing_less_than_one_simd_group_has_no_plan():
    x = randn((3, 100), torch.float32, "cpu")
    with runner.faults("max_threads:softmax=16"):
        y, kernels, warned = _run(lambda: tmf.softmax(x))
    assert kernels == [] and len(warned) == 1 and "fewer than one SIMD-group" in warned[0]
    assert_matches(y, torch.softmax(x.double(), -1), torch.float32)


def test_without_bfloat_bfloat16_tensors_use_the_reference_and_the_rest_stays_fused():
    x = randn((7, 33), torch.bfloat16, "cpu")
    with runner.faults("no_bfloat"):
        assert tmf.backend_for(x, "softmax") == "reference"
        assert tmf.backend_for(x.float(), "softmax") == "metal-emulated"
        (y, dx), kernels, warned = _run(lambda: _softmax_grad(x))
        _assert_all_match((y, dx), _softmax_grad_reference(x), torch.bfloat16)
        assert kernels == [] and len(warned) == 1 and "lacks bfloat" in warned[0]
        _, kernels, warned = _run(lambda: tmf.softmax(x.float()))
        assert kernels == ["softmax_forward_simd_rows_float"] and not warned
    # Not a family failure: with bfloat back, bfloat16 is fused again.
    _, kernels, _ = _run(lambda: tmf.softmax(x))
    assert kernels == ["softmax_forward_simd_rows_bfloat"]


def test_kernel_unavailable_survives_pickling():
    """It crosses process boundaries (DataLoader workers, DDP) intact."""
    exc = pickle.loads(pickle.dumps(_backend.KernelUnavailable("softmax", "family", "boom")))
    assert (exc.family, exc.scope, exc.reason) == ("softmax", "family", "boom")


def test_every_kernel_belongs_to_the_family_of_its_shader_file():
    """The MPS side compiles one library per shader file and finds a kernel's library by its name's prefix
    (tmf::launch::family_of); the Python side maps entry points the same way."""
    shaders = Path(__file__).resolve().parent.parent / "shaders"
    names = runner.kernel_names()
    assert {p.stem for p in shaders.glob("*.metal")} == set(_backend.FAMILIES)
    for family, prefix in _backend.FAMILIES.items():
        source = (shaders / f"{family}.metal").read_text()
        kernels = [k for k in names if k.startswith(prefix)]
        assert kernels and all(f'host_name("{k}")' in source for k in kernels), family
    assert sum(any(k.startswith(p) for p in _backend.FAMILIES.values()) for k in names) == len(names)
    for entry in ("softmax_forward", "rms_norm_backward", "lora_forward", "lora_backward"):
        assert entry.startswith(_backend.FAMILIES[_backend.family_of_entry(entry)])


def test_the_op_manifest_matches_every_list_it_does_not_generate(tmp_path):
    """torch_metal_fused/_families.py is the one list of ops: the harness's C++ family table is generated from it
    (its encoder names a kernel's family from that table), every op's contract file exists, and the benchmark has
    exactly the manifest's bench ops."""
    import re

    from torch_metal_fused._families import OPS
    from torch_metal_fused.bench.cases import OPS as BENCH_OPS
    from torch_metal_fused.emulator.build import write_families_header

    root = Path(__file__).resolve().parent.parent
    header = write_families_header(tmp_path).read_text()
    table = header[header.index("kKernelFamilies[]") :].split("};")[0]
    assert dict(re.findall(r'\{"(\w+)", "(\w+)"\}', table)) == _backend.FAMILIES
    assert all((root / "tests" / op.contract).is_file() for op in OPS)
    assert set(BENCH_OPS) == {op.bench for op in OPS if op.bench}


def _new_op_cases():
    """(fault, family, kernels that must not run, fn, float64 reference) for the ops added after the fallback
    machinery: their kernels take the same path (launch code selects every pipeline before encoding, run_kernel
    serves KernelUnavailable)."""
    g, u = randn((5, 300), torch.float32, "cpu"), randn((5, 300), torch.float32, "cpu", seed=1)
    q, k = randn((2, 4, 3, 16), torch.float32, "cpu"), randn((2, 2, 3, 16), torch.float32, "cpu", seed=1)
    angles = torch.rand(1, 3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10
    cos, sin = (f(torch.cat((angles, angles), -1)).float() for f in (torch.cos, torch.sin))
    x, r = randn((6, 300), torch.float32, "cpu"), randn((6, 300), torch.float32, "cpu", seed=1)
    w = randn((300,), torch.float32, "cpu", seed=2)

    def rotate_half(t):
        return torch.cat((-t[..., 8:], t[..., :8]), -1)

    def grads(fn, inputs):
        ins = [t.detach().requires_grad_(True) for t in inputs]
        outs = fn(*ins)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return (*outs, *torch.autograd.grad(sum((o * o).sum() for o in outs), ins))

    def add_norm64(a, b, wt):
        h = a + b
        return h * torch.rsqrt(h.square().mean(-1, keepdim=True) + 1e-6) * wt, h

    return [
        (
            "compile:glu",
            "glu",
            "glu_",
            lambda: grads(tmf.swiglu, (g, u)),
            lambda: grads(lambda a, b: torch.nn.functional.silu(a) * b, (g.double(), u.double())),
        ),
        (
            "compile:rope",
            "rope",
            "rope_",
            lambda: grads(lambda a, b: tmf.rope(a, b, cos, sin), (q, k)),
            lambda: grads(
                lambda a, b: tuple(t * cos.double()[:, None] + rotate_half(t) * sin.double()[:, None] for t in (a, b)),
                (q.double(), k.double()),
            ),
        ),
        (
            "pipeline:rms_norm_add_backward_dx_dw_single_row_float",
            "rms_norm",
            "rms_norm_add_backward",  # nothing of the failing call encoded (its forward ran on our kernels before)
            lambda: grads(tmf.add_rms_norm, (x, r, w)),
            lambda: grads(add_norm64, (x.double(), r.double(), w.double())),
        ),
    ]


@pytest.mark.parametrize("case", range(3), ids=["swiglu", "rope", "add_rms_norm_backward"])
def test_the_new_ops_fall_back_like_the_others(case):
    fault, family, not_run, fn, ref_fn = _new_op_cases()[case]
    with runner.faults(fault):
        outs, kernels, warned = _run(fn)
    _assert_all_match(outs, ref_fn(), torch.float32)
    assert not any(k.startswith(not_run) for k in kernels), kernels
    assert len(warned) == 1 and f"{family} kernels" in warned[0], warned
    assert tmf.backend_for(outs[0], family) == "reference"


def _beyond_u32_cases() -> dict:
    """op -> (call, float64 formula): each call has a size or stride above 100, the limit the test sets."""
    F = torch.nn.functional
    x, g = randn((8, 160), torch.float32, "cpu"), randn((8, 160), torch.float32, "cpu", seed=1)
    w = randn((160,), torch.float32, "cpu", seed=2)
    lw, la, lb = (randn(s, torch.float32, "cpu", seed=i) for i, s in ((3, (24, 160)), (4, (4, 160)), (5, (24, 4))))
    target = torch.randint(0, 160, (8,))
    q, k, v = (randn((1, 2, 8, 64), torch.float32, "cpu", seed=i) for i in (6, 7, 8))
    angles = torch.rand(1, 8, 32, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 10
    cos, sin = (f(torch.cat((angles, angles), -1)) for f in (torch.cos, torch.sin))

    def rope64(t):  # (B, H, S, D) rotated by the (1, S, D) angles, as Hugging Face's rotate_half
        return t * cos[:, None] + torch.cat((-t[..., 32:], t[..., :32]), -1) * sin[:, None]

    return {
        "rope": (
            lambda: tmf.rope(q, k, cos.float(), sin.float()),
            lambda: (rope64(q.double()), rope64(k.double())),
        ),
        "softmax": (lambda: tmf.softmax(x), lambda: torch.softmax(x.double(), -1)),
        "rms_norm": (
            lambda: tmf.rms_norm(x, w, eps=1e-6),
            lambda: x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6) * w.double(),
        ),
        "cross_entropy": (
            lambda: tmf.cross_entropy(x, target, reduction="none"),
            lambda: F.cross_entropy(x.double(), target, reduction="none"),
        ),
        "glu": (lambda: tmf.swiglu(x, g), lambda: F.silu(x.double()) * g.double()),
        "lora_linear": (
            lambda: tmf.lora_linear(x, lw, la, lb, 0.5),
            lambda: x.double() @ lw.double().t() + 0.5 * (x.double() @ la.double().t()) @ lb.double().t(),
        ),
        "attention": (
            lambda: tmf.attention(q, k, v, causal=True),
            lambda: F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True),
        ),
    }


@pytest.mark.parametrize("op", list(_beyond_u32_cases()))
def test_a_call_past_the_kernels_32_bit_limits_is_served_by_the_reference(op, monkeypatch):
    """A size, stride or thread count past the kernels' index limit (2^31 - 1; here 100, lowered for the test) means
    no launch plan, like any call our kernels cannot take: the reference serves it with one warning naming the family
    and the limit, never a ValueError out of a training step."""
    from torch_metal_fused.backends import metal

    call, formula = _beyond_u32_cases()[op]
    monkeypatch.setattr(metal, "INDEX_MAX", 100)
    out, kernels, warned = _run(call)
    ref = formula()
    _assert_all_match(
        out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,), torch.float32
    )
    assert kernels == [] and len(warned) == 1, (kernels, warned)
    assert f"the {op} kernels" in warned[0] and "exceeds 2^31 - 1" in warned[0], warned


def test_an_attention_window_past_32_bits_runs_as_no_window():
    """A sliding window of 2^33 keys hides no key: the kernels serve it as the plain causal call (the window clamped
    to the key count in the launch parameters, not a struct.error while packing them)."""
    q, k, v = (randn((1, 2, 9, 32), torch.float32, "cpu", seed=i) for i in (1, 2, 3))
    out, kernels, warned = _run(lambda: tmf.attention(q, k, v, causal=True, window=2**33))
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    assert_matches(out, ref, torch.float32)
    assert kernels == ["attention_forward_d32_float"] and not warned, (kernels, warned)
    # fewer queries than keys (bottom-right causal): the clamp is to the key count, not the query count
    out, kernels, _ = _run(lambda: tmf.attention(q[:, :, :5], k, v, causal=True, window=2**33))
    plain, _, _ = _run(lambda: tmf.attention(q[:, :, :5], k, v, causal=True))
    assert kernels == ["attention_forward_d32_float"]
    assert torch.equal(out, plain)


def test_arguments_past_the_kernels_32_bit_fields_are_served_without_a_crash():
    """An ignore_index outside int32 is a call the kernels cannot take (the reference serves it, one warning); a
    finite eps or softcap past float32's range goes to the kernels as infinity, as torch rounds it in the
    reference's float32 math (it was an OverflowError while packing the arguments): the same results as the
    reference, NaN where softcap · tanh(z / softcap) is inf · 0."""
    F = torch.nn.functional
    x, w = randn((4, 40), torch.float32, "cpu"), randn((40,), torch.float32, "cpu", seed=1)
    target = torch.tensor([3, 2**31 + 5, 7, 1])
    out, kernels, warned = _run(lambda: tmf.cross_entropy(x, target, ignore_index=2**31 + 5, reduction="none"))
    ref = F.cross_entropy(x.double(), target, ignore_index=2**31 + 5, reduction="none")
    assert_matches(out, ref, torch.float32)
    assert kernels == [] and len(warned) == 1 and "ignore_index" in warned[0], (kernels, warned)
    y, kernels, warned = _run(lambda: tmf.rms_norm(x, w, eps=1e39))
    assert kernels and not warned and torch.equal(y, torch.zeros_like(y))  # x / sqrt(inf): 0, as torch's
    loss, kernels, warned = _run(lambda: tmf.cross_entropy(x, target.clamp(max=39), reduction="none", softcap=1e39))
    assert kernels and not warned and torch.isnan(loss).all()
