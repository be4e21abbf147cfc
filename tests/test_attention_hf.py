"""The fused attention in Hugging Face models: attn_implementation="tmf" (registered at import, without importing
transformers), hf_attention_forward's masks and causality against the eager formula, tiny Llama/Mistral/Qwen2/Qwen3/
Gemma/Gemma-2/Gemma-3 models with padded batches against eager and sdpa, 20 training steps patched with every option
against the unpatched model, PEFT, dropout's fallback, autocast, patch/unpatch. Head dim 32 throughout (the Metal
kernels' smallest)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap
import types
import warnings

import pytest
import torch
from helpers import TINY_DECODER, randn, record_kernel_calls

import torch_metal_fused as tmf
from torch_metal_fused import patch
from torch_metal_fused.testing import assert_matches

transformers = pytest.importorskip("transformers")
pytest.importorskip("transformers.masking_utils")  # transformers 4.53+ (the mask interface)

VOCAB, SEQ, PAD = 128, 24, 5
ALL_OPTIONS = dict(rms_norm=True, lora=True, softmax=True, cross_entropy=True, swiglu=True, rope=True, attention=True)
COMMON = dict(
    TINY_DECODER,
    vocab_size=VOCAB,
    max_position_embeddings=64,
    initializer_range=0.2,  # peaked attention probabilities, so that masks and windows change the result
)
# Sliding windows of 8 keys (sequences are 24 long): Mistral on every layer, Qwen2 on its second layer, Gemma-2/3 on
# their first; Gemma-2 soft-caps the attention logits and scales by query_pre_attn_scalar, not head_dim.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "sliding_window": 8,
            "attn_logit_softcapping": 2.0,
            "final_logit_softcapping": 10.0,
            "query_pre_attn_scalar": 16,
        },
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {"sliding_window": 8, "query_pre_attn_scalar": 16, "layer_types": ["sliding_attention", "full_attention"]},
    ),
}


def _config(family: str, **overrides):
    config_cls, _, extra = FAMILIES[family]
    return getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})


def _model(family: str, attn: str | None = None, dtype=torch.float32, seed: int = 0, **overrides):
    """A tiny random model of `family` (the same weights for the same seed whatever `attn` is)."""
    torch.manual_seed(seed)
    model_cls = getattr(transformers, FAMILIES[family][1])
    kwargs = {} if attn is None else {"attn_implementation": attn}
    return model_cls._from_config(_config(family, **overrides), **kwargs).to(dtype)


def _twin(model, attn: str, dtype=None):
    """A copy of `model` on another attention implementation (and dtype)."""
    twin = copy.deepcopy(model)
    twin.set_attn_implementation(attn)
    return twin if dtype is None else twin.to(dtype)


def _padded_batch(padding: str, device, seed: int = 0):
    """(ids, attention_mask) of 2 sequences of SEQ tokens: the first padded by PAD tokens on the left or the right (or
    not at all), the second by 2 on the other side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, SEQ), generator=g)
    mask = torch.ones(2, SEQ, dtype=torch.long)
    if padding == "left":
        mask[0, :PAD], mask[1, -2:] = 0, 0
    elif padding == "right":
        mask[0, -PAD:], mask[1, :2] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids.to(device), mask.to(device)


def _count_attention_calls(monkeypatch):
    return record_kernel_calls(monkeypatch, ("attention",))


# ---- registration ------------------------------------------------------------------------------------------
def _run_python(code: str) -> None:
    env = {**os.environ, "TORCH_METAL_FUSED_BACKEND": "reference"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("order", ["torch_metal_fused first", "transformers first"])
def test_tmf_is_registered_at_import_without_importing_transformers(order):
    """`import torch_metal_fused` imports no transformers (its modeling code takes seconds to import), yet
    from_config(..., attn_implementation="tmf") works after it, whichever was imported first; the mask function is
    registered under the same name (without it transformers builds no mask for the name: padding would be lost)."""
    imports = (
        "import sys, torch_metal_fused\nassert 'transformers' not in sys.modules\n"
        if order == "torch_metal_fused first"
        else "import transformers\nfrom transformers import LlamaForCausalLM\nimport torch_metal_fused\n"
    )
    _run_python(
        imports
        + textwrap.dedent(
            """
        from transformers import AutoModelForCausalLM, LlamaConfig
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        config = LlamaConfig(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="tmf")
        assert model.config._attn_implementation == "tmf"
        assert ALL_ATTENTION_FUNCTIONS["tmf"] is torch_metal_fused.patch.hf_attention_forward
        assert ALL_MASK_ATTENTION_FUNCTIONS["tmf"] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
        import torch
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
        """
        )
    )


def test_register_hf_attention_is_idempotent():
    assert patch.register_hf_attention() and patch.register_hf_attention()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    assert ALL_ATTENTION_FUNCTIONS["tmf"] is patch.hf_attention_forward


# ---- hf_attention_forward against the eager formula ----------------------------------------------------------------
def _eager_reference(q, k, v, visible, scale, softcap=None, bias=None):
    """float64 softmax(q·kᵀ·scale (soft-capped) + bias, invisible keys dropped)·v, grouped heads repeated, rows with
    no visible key zero; (B, S, H, D) as the interface returns it."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    bias = None if bias is None else bias.cpu()
    visible = None if visible is None else visible.cpu()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if bias is not None:
        s = s + bias.double()
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p @ v).transpose(1, 2)


def _top_left(q_len, kv_len, window=None):
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    visible = j <= i
    return visible if window is None else visible & (j > i - window)


def test_hf_attention_forward_masks_and_causality(backend):
    """The interface's cases, each against the eager formula in float64: no mask (causal as sdpa: top-left, more keys
    than queries as an empty static cache gives them, more queries than keys, with a sliding window), causality turned
    off by the kwarg or the module, one query (decoding), 4-D boolean and additive masks (longer than the keys, in
    another dtype), soft-capping and scaling, grouped heads; a 2-D mask is refused."""
    dev = backend.device
    causal_module = types.SimpleNamespace(is_causal=True, training=False)
    q = randn((2, 4, 10, 32), torch.float32, dev, scale=2.0, seed=1)
    k = randn((2, 2, 10, 32), torch.float32, dev, scale=2.0, seed=2)
    v = randn((2, 2, 10, 32), torch.float32, dev, seed=3)
    scale = 32**-0.5

    def check(out, want, what):
        assert out.shape == want.shape, what
        assert_matches(out, want, torch.float32, what)

    def run(q_, k_, v_, mask=None, module=causal_module, **kwargs):
        out, weights = patch.hf_attention_forward(module, q_, k_, v_, mask, **kwargs)
        assert weights is None
        return out

    check(run(q, k, v), _eager_reference(q, k, v, _top_left(10, 10), scale), "causal, no mask")
    check(run(q, k, v, sliding_window=4), _eager_reference(q, k, v, _top_left(10, 10, 4), scale), "causal, window 4")
    q6 = q[:, :, :6]
    check(run(q6, k, v), _eager_reference(q6, k, v, _top_left(6, 10), scale), "6 queries, 10 keys: sdpa's top-left")
    k6, v6 = k[:, :, :6], v[:, :, :6]
    check(run(q, k6, v6), _eager_reference(q, k6, v6, _top_left(10, 6), scale), "10 queries, 6 keys: top-left")
    full = _eager_reference(q, k, v, None, scale)
    check(run(q, k, v, is_causal=False), full, "is_causal=False")
    check(run(q, k, v, module=types.SimpleNamespace(is_causal=False)), full, "module.is_causal False")
    q1 = q[:, :, -1:]
    check(run(q1, k, v), _eager_reference(q1, k, v, None, scale), "one query: every key")
    g = torch.Generator().manual_seed(4)
    visible = torch.rand(2, 1, 10, 13, generator=g) > 0.4
    visible[0, 0, 3] = False  # a row with no visible key: zeros
    mask = visible.to(dev)
    want = _eager_reference(q, k, v, visible[..., :10], scale)
    check(run(q, k, v, mask), want, "boolean mask longer than the keys (sliced)")
    additive = torch.zeros(2, 1, 10, 13, dtype=torch.float64).masked_fill(~visible, torch.finfo(torch.float32).min)
    additive[1] += torch.randn(1, 10, 13, generator=g, dtype=torch.float64)  # a bias, not only a mask
    got = run(q, k, v, additive.to(dev))  # float64: cast to the queries' float32
    want = _eager_reference(q, k, v, None, scale, bias=additive[..., :10].float())
    check(got[1], want[1], "additive float64 mask with a bias")
    check(got[0, :3], want[0, :3], "additive mask")  # the empty row: finfo.min everywhere is not -inf (eager: uniform)
    check(
        run(q, k, v, mask, scaling=0.3, softcap=1.5),
        _eager_reference(q, k, v, visible[..., :10], 0.3, softcap=1.5),
        "soft-capping and scaling",
    )
    with pytest.raises(ValueError, match="4-D attention masks"):
        run(q, k, v, torch.ones(2, 10, dtype=torch.bool, device=dev))


def test_unsupported_calls_run_eager_attention_with_one_warning(monkeypatch):
    """Dropout, attention sinks and a position bias have no fused path: the model's eager attention serves such a
    call, with sdpa's causal pattern made explicit and a warning per reason; output_attentions warns as sdpa's does."""
    model = _model("llama")
    module = model.model.layers[0].self_attn
    q = randn((1, 2, 7, 32), torch.float32, "cpu", seed=1)
    k = randn((1, 1, 7, 32), torch.float32, "cpu", seed=2)
    v = randn((1, 1, 7, 32), torch.float32, "cpu", seed=3)
    monkeypatch.setattr(patch, "_warned_attention", set())
    calls = _count_attention_calls(monkeypatch)
    want = _eager_reference(q, k, v, _top_left(7, 7), 32**-0.5)
    for kwargs, match in (({"s_aux": torch.zeros(2)}, "s_aux"), ({"position_bias": torch.zeros(1)}, "position_bias")):
        with pytest.warns(UserWarning, match=f"{match} is not supported .* eager attention"):
            out, _ = patch.hf_attention_forward(module, q, k, v, None, scaling=32**-0.5, **kwargs)
        assert_matches(out, want, torch.float32, f"eager fallback ({match})")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            patch.hf_attention_forward(module, q, k, v, None, scaling=32**-0.5, **kwargs)
    assert calls == []
    with pytest.warns(UserWarning, match="output_attentions"):
        out, weights = patch.hf_attention_forward(module, q, k, v, None, output_attentions=True)
    assert weights is None and calls == ["attention_forward"]


# ---- tiny models: padded batches against eager and sdpa ------------------------------------------------------------
@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_padded_batch_matches_eager_and_sdpa(backend, family, padding, monkeypatch):
    """Logits at the real tokens and every weight's gradient of a padded batch: the "tmf" model against the same
    model on eager attention and, where the family supports it, on sdpa, each within float32's tolerance (as the
    other patches are tested). Pad rows are not compared: with every key masked, eager attends uniformly (finfo.min
    is not -inf), sdpa and the fused op give zeros. (No float64 eager model: eager's softmax in float32 turns
    float64's finfo.min into -inf, so its fully masked rows are NaN, which spread to the real tokens.)"""
    model = _model(family, attn="tmf").to(backend.device)
    # sdpa is a reference where the family has it and it computes the model's attention: transformers versions that
    # give Gemma 2 sdpa (5.17) run it without the logit soft-capping (3.4 off eager's logits here); 5.25 refuses it.
    sdpa_exact = model._supports_sdpa and "attn_logit_softcapping" not in FAMILIES[family][2]
    references = [_twin(model, "eager")] + ([_twin(model, "sdpa")] if sdpa_exact else [])
    ids, mask = _padded_batch(padding, backend.device)
    real = mask.bool()

    def run(m):
        logits = m(input_ids=ids, attention_mask=mask).logits
        loss = logits[real].float().square().mean()
        names = [n for n, _ in m.named_parameters()]
        return logits[real], dict(zip(names, torch.autograd.grad(loss, list(m.parameters()))))

    calls = _count_attention_calls(monkeypatch)
    logits, grads = run(model)
    assert calls.count("attention_forward") == calls.count("attention_backward") == 2
    for ref in references:
        ref_logits, ref_grads = run(ref)
        what = f"{family}, {padding} padding, against {ref.config._attn_implementation}"
        assert_matches(logits, ref_logits.double(), torch.float32, f"{what}: logits")
        for name, grad in grads.items():
            assert_matches(grad, ref_grads[name].double(), torch.float32, f"{what}: {name}")


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2"])
def test_a_causal_padding_mask_reaches_the_op_as_causal_and_key_padding(family, monkeypatch):
    """transformers' boolean mask of a padded training batch is causality (and the sliding window) and key padding
    combined: the op gets causal=True, the window and a (B, S) key-padding mask — block skipping, no (B, S, S) bias —
    with the logits unchanged against eager."""
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", "reference")
    model = _model(family, attn="tmf")
    ids, mask = _padded_batch("left", "cpu")
    seen = []
    real_op = patch.fused_attention

    def op(*args, **kwargs):
        seen.append((args[3] is None, kwargs["causal"], kwargs["window"], kwargs["key_padding_mask"] is not None))
        return real_op(*args, **kwargs)

    monkeypatch.setattr(patch, "fused_attention", op)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        ref = _twin(model, "eager")(input_ids=ids, attention_mask=mask).logits
    assert len(seen) == model.config.num_hidden_layers
    assert all(no_mask and causal and padding for no_mask, causal, _, padding in seen), seen
    windows = {w for *_, w, _ in seen}
    assert windows == ({None} if family == "llama" else {8} if family == "mistral" else {8, None}), windows
    real = mask.bool()
    assert_matches(logits[real], ref[real].double(), torch.float32, f"{family}: logits")


def test_other_boolean_masks_are_passed_as_they_are():
    """A mask that is not causal and key padding (a bidirectional block, one query blind to an earlier real key) is
    handed to the op unchanged. The check is made once per mask tensor (transformers hands every layer the same one),
    and again for a mask changed in place since."""
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    padding = torch.tensor([[False, True, True, True, True, True], [True] * n])
    mask = (causal & padding[:, None, :])[:, None].clone()
    factors = patch._causal_padding_factors(mask, None)
    assert factors is not None and torch.equal(factors[0], padding) and factors[1] is None
    assert patch._causal_padding_factors(mask, None) is factors  # the second layer's call: from the cache
    assert patch._causal_padding_factors(mask, 3) is None  # not the window's band
    mask[0, 0, 2, 4] = True  # a later key seen (a bidirectional block): in place, so its version changes
    assert patch._causal_padding_factors(mask, None) is None
    holes = (causal & padding[:, None, :])[:, None].clone()
    holes[1, 0, 5, 1] = False  # one query blind to one earlier real key
    assert patch._causal_padding_factors(holes, None) is None
    assert patch._causal_padding_factors(holes.float(), None) is None  # additive masks: passed as they are
    band = torch.ones(n, n, dtype=torch.bool).tril() & ~torch.ones(n, n, dtype=torch.bool).tril(-3)
    windowed = (band & padding[:, None, :])[:, None]
    factors = patch._causal_padding_factors(windowed, 3)
    assert factors is not None and factors[1] == 3


def test_the_tiny_models_exercise_windows_and_soft_capping():
    """The configurations above matter at these sizes: without Gemma-2's window, its soft-capping or Mistral's
    window, the eager logits change (so the comparisons test them)."""
    ids, mask = _padded_batch("right", "cpu")

    def logits(family, **overrides):
        with torch.no_grad():
            return _model(family, attn="eager", **overrides)(input_ids=ids, attention_mask=mask).logits

    for family, overrides in (
        ("gemma2", {"sliding_window": 64}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma2", {"query_pre_attn_scalar": 32}),
        ("mistral", {"sliding_window": None}),
        ("qwen2", {"use_sliding_window": False}),
        ("gemma3", {"sliding_window": 64}),
    ):
        assert (logits(family) - logits(family, **overrides)).abs().max() > 1e-3, (family, overrides)


# ---- training: patched with every option against the unpatched model ----------------------------------------------
def _peft(model):
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))


def _train(model, device, steps: int = 20) -> list[float]:
    """`steps` AdamW steps on random tokens (4 sequences of SEQ, the first left-padded by PAD: its pad positions and
    the first real token, which a pad position predicts, carry no label)."""
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        ids = torch.randint(1, VOCAB, (4, SEQ), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :PAD] = 0
        ids = ids.masked_fill(mask == 0, 0)
        labels = ids.masked_fill(mask == 0, -100)
        labels[0, PAD] = -100
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama-peft", "gemma2", "mistral"])
def test_convergence_patched_with_attention_equals_unpatched_float32(backend, family, monkeypatch):
    """20 AdamW steps in float32 from the same weights and data (a padded sequence in every batch): the model patched
    with every option, attention included, against the unpatched one (sdpa; eager for Gemma-2): the loss of every
    step within 1e-4 relative, and it falls. LoRA adapters on Llama (PEFT), full fine-tuning of Gemma-2 (window,
    soft-capping, query_pre_attn_scalar, GeGLU, final soft-capping) and Mistral (window on every layer)."""
    base = family.removesuffix("-peft")

    def build():
        # Gemma 2 on eager: transformers versions that give it sdpa (5.17) run sdpa without the logit soft-capping
        model = _model(base, attn="eager" if "attn_logit_softcapping" in FAMILIES[base][2] else None)
        return _peft(model) if family.endswith("-peft") else model

    ref_losses = _train(build(), backend.device)
    model = build()
    report = tmf.patch_model(model, **ALL_OPTIONS)
    (what,) = [w for _, w in report.patched if "attention:" in w]
    assert "-> 'tmf'" in what, report
    calls = _count_attention_calls(monkeypatch)
    losses = _train(model, backend.device)
    assert calls.count("attention_forward") == calls.count("attention_backward") == 2 * 20
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert losses[-1] < losses[0]


# ---- patch_model / unpatch_model ----------------------------------------------------------------------------------
def test_patch_and_unpatch_switch_the_implementation_and_compose_with_rope(monkeypatch):
    """attention=True switches the model (and its inner decoder, which shares the config) to "tmf", reported like the
    other options, with rope's wrapper on the same attention modules; unpatch restores sdpa and the rope function; a
    second patch says it is already done; attention=False (the default) leaves the implementation alone."""
    model = _model("llama")
    ids, mask = _padded_batch("left", "cpu")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    assert tmf.patch_model(copy.deepcopy(model)).patched and model.config._attn_implementation == "sdpa"
    modeling_llama = type(model.model.layers[0].self_attn).__module__
    rope_users = patch.rope_users(modeling_llama)  # models of other tests may still be patched
    report = tmf.patch_model(model, rope=True, attention=True)
    assert ("", "LlamaForCausalLM attention: attn_implementation 'sdpa' -> 'tmf' (2 LlamaAttention modules)") in (
        report.patched
    )
    assert sum("rotary embedding fused" in w for _, w in report.patched) == 2
    assert model.config._attn_implementation == model.model.config._attn_implementation == "tmf"
    calls = record_kernel_calls(monkeypatch, ("attention", "rope"))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert calls.count("attention_forward") == calls.count("rope_apply") == 2
    real = mask.bool()
    assert_matches(out[real], ref[real].double(), torch.float32, "patched logits")
    assert "already runs attn_implementation 'tmf'" in str(tmf.patch_model(model, attention=True))
    assert tmf.unpatch_model(model) == 1 + 2 + 5  # the attention switch, 2 rope wrappers, 5 RMSNorms
    assert model.config._attn_implementation == "sdpa"
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    assert calls == []
    assert patch.rope_users(modeling_llama) == rope_users  # rope's users of Llama's module: as before


def test_peft_model_patched_and_unpatched(monkeypatch):
    """Under a PEFT wrapper the wrapped causal LM is switched (reported at its name) and the LoRA layers fused; the
    logits equal the unpatched model's; unpatch restores sdpa."""
    model = _peft(_model("qwen3"))
    ids, mask = _padded_batch("right", "cpu")
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    report = tmf.patch_model(model, attention=True)
    names = dict(report.patched)
    assert "-> 'tmf'" in names["base_model.model"]
    assert sum(w.startswith("PEFT lora.Linear") for w in names.values()) == 2 * 7
    calls = record_kernel_calls(monkeypatch, ("attention", "lora_linear"))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).logits
    assert calls.count("attention_forward") == 2 and calls.count("lora_forward") == 2 * 7
    real = mask.bool()
    assert_matches(out[real], ref[real].double(), torch.float32, "PEFT model, fused attention")
    tmf.unpatch_model(model)
    assert model.base_model.model.config._attn_implementation == "sdpa"


def test_models_with_other_attention_classes_are_left_alone():
    """A model whose attention class was never tested with the op (GPT-2's) keeps its implementation, with the
    reason; attn_implementation="tmf" given explicitly still selects the op."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=1, n_head=2, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    before = model.config._attn_implementation
    report = tmf.patch_model(model, attention=True)
    assert model.config._attn_implementation == before
    assert any("GPT2Attention not among the attention classes tested" in why for _, why in report.skipped), report


def test_attention_dropout_trains_on_eager_attention_with_a_warning(monkeypatch):
    """attention_dropout > 0: the report says so; training forwards (Hugging Face passes the dropout only then) run
    the model's eager attention, with one warning, and equal the eager model's under the same seed; eval forwards run
    the fused op."""
    model = _model("gemma2", attn="eager", attention_dropout=0.3)
    eager = copy.deepcopy(model)
    report = tmf.patch_model(model, attention=True)
    assert any("attention_dropout 0.3" in w for _, w in report.patched), report
    ids, mask = _padded_batch("left", "cpu")
    real = mask.bool()
    monkeypatch.setattr(patch, "_warned_attention", set())
    calls = _count_attention_calls(monkeypatch)
    model.train()
    eager.train()
    torch.manual_seed(5)
    with pytest.warns(UserWarning, match=r"attention dropout \(p=0.3\) .* eager attention"):
        out = model(input_ids=ids, attention_mask=mask).logits
    torch.manual_seed(5)
    want = eager(input_ids=ids, attention_mask=mask).logits
    assert calls == []
    torch.testing.assert_close(out[real], want[real], rtol=0, atol=0)
    model.eval()
    eager.eval()
    with torch.no_grad():
        out, want = model(input_ids=ids, attention_mask=mask).logits, eager(input_ids=ids, attention_mask=mask).logits
    assert calls == ["attention_forward"] * 2
    assert_matches(out[real], want[real].double(), torch.float32, "eval forward, fused")


def test_autocast_casts_as_sdpa(backend, monkeypatch):
    """A float32 model under bfloat16 autocast: the rotary embedding leaves q and k in float32 and v in bfloat16;
    the op gets all three in bfloat16, as autocast casts sdpa's inputs. Logits within bfloat16's tolerance of the
    float32 run, or twice sdpa's error under autocast."""
    device_type = backend.device.type
    if device_type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
        pytest.skip("bfloat16 autocast on MPS needs macOS 14")
    model = _model("llama", attn="tmf").to(backend.device)
    sdpa = _twin(model, "sdpa")
    ids, mask = _padded_batch("left", backend.device)
    real = mask.bool()
    calls = record_kernel_calls(monkeypatch, ("attention",), entry=lambda name, lead: (name, lead.dtype))
    with torch.no_grad():
        exact = sdpa(input_ids=ids, attention_mask=mask).logits
        with torch.autocast(device_type, dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask).logits
            base = sdpa(input_ids=ids, attention_mask=mask).logits
    assert calls == [("attention_forward", torch.bfloat16)] * 2
    assert_matches(out[real], exact[real].double(), torch.bfloat16, "logits under autocast", baseline=base[real])
