"""patch_model / unpatch_model on torch, Hugging Face and PEFT modules; convergence of patched vs unpatched
training (as Liger-Kernel tests it) on the reference and Metal-emulated backends; DDP."""

import copy
import inspect
import os

import pytest
import torch
from helpers import TINY_DECODER, record_kernel_calls

import torch_metal_fused as tmf
from torch_metal_fused.testing import assert_matches, rel_error

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from train_lora import build_model, load_corpus, train  # noqa: E402

CPU_BACKENDS = [
    pytest.param("reference", id="reference"),
    pytest.param("metal-emulated", id="metal-emulated", marks=pytest.mark.emulated),
]


@pytest.fixture(params=CPU_BACKENDS)
def cpu_backend(request, monkeypatch):
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", request.param)
    return request.param


def _count_calls(monkeypatch):
    return record_kernel_calls(monkeypatch, ("softmax", "rms_norm", "lora_linear"))


def test_torch_rms_norm_patch_and_unpatch(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.RMSNorm(16, eps=1e-5), torch.nn.Softmax(-1))
    x = torch.randn(4, 8)
    before = model(x)
    report = tmf.patch_model(model, softmax=True)
    assert [n for n, _ in report.patched] == ["1", "2"]
    calls = _count_calls(monkeypatch)
    after = model(x)
    assert calls == ["rms_norm_forward", "softmax_forward"]
    assert_matches(after, before.double(), torch.float32)
    assert set(model.state_dict()) == {"0.weight", "0.bias", "1.weight"}
    assert tmf.unpatch_model(model) == 2
    calls.clear()
    model(x)
    assert calls == []
    assert "already patched" not in str(tmf.patch_model(model))


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (2, 3, 4, 5)], ids=lambda s: f"{len(s)}d")
def test_softmax_without_a_dim_keeps_torchs_implicit_choice(shape, monkeypatch):
    """nn.Softmax() with no dim: torch picks dim 0 for 0-, 1- and 3-D input and 1 otherwise (a legacy rule, with a
    deprecation warning); the patched module softmaxes over the same dim, fused."""
    model = torch.nn.Softmax()
    x = torch.randn(shape)
    with pytest.warns(UserWarning, match="Implicit dimension choice"):
        before = model(x)
    tmf.patch_model(model, softmax=True)
    calls = _count_calls(monkeypatch)
    after = model(x)
    assert calls == ["softmax_forward"]
    assert_matches(after, before.double(), torch.float32)


def test_report_explains_what_is_left():
    class FancyRMSNorm(torch.nn.Module):
        def forward(self, x):
            return x

    model = torch.nn.Sequential(torch.nn.RMSNorm((4, 8)), FancyRMSNorm())
    report = tmf.patch_model(model)
    assert report.patched == []
    reasons = dict(report.skipped)
    assert "several trailing dimensions" in reasons["0"]
    assert "not known to match" in reasons["1"]
    assert "left" in str(report)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_hf_rms_norms_match_exactly_in_float32(cpu_backend, arch):
    ids, vocab = load_corpus()
    model = build_model(vocab, arch=arch)
    with torch.no_grad():  # non-trivial norm weights (Gemma's start at zero)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0, 0.2)
    x = ids[:40].view(2, 20)
    ref = model(input_ids=x).logits
    report = tmf.patch_model(model)
    norm_kind = "Gemma formula" if arch == "gemma" else "Llama formula"
    assert sum(norm_kind in what for _, what in report.patched) == 5  # 2 per layer + final
    out = model(input_ids=x).logits
    assert_matches(out, ref.double(), torch.float32, f"{arch} logits")


def test_peft_patched_runs_fused_and_falls_back_exactly(monkeypatch):
    ids, vocab = load_corpus()
    model = build_model(vocab)
    x = ids[:30].view(2, 15)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        ref = model(input_ids=x).logits
        with model.disable_adapter():
            ref_disabled = model(input_ids=x).logits
        tmf.patch_model(model)
        calls = _count_calls(monkeypatch)
        fused = model(input_ids=x).logits
        assert calls.count("lora_forward") == 2 * 7 and calls.count("rms_norm_forward") == 5
        assert_matches(fused, ref.double(), torch.float32, "patched logits")
        calls.clear()
        with model.disable_adapter():  # disabled adapters: PEFT's forward (the base layer)
            assert_matches(model(input_ids=x).logits, ref_disabled.double(), torch.float32, "disabled adapters")
        assert "lora_forward" not in calls
        h = torch.randn(3, 64)
        unmerged = layer(h)
        layer.merge()  # merged adapters: PEFT's forward (the merged base layer)
        calls.clear()
        assert_matches(layer(h), unmerged.double(), torch.float32, "merged adapter")
        assert calls == []
        layer.unmerge()


def test_peft_patched_runs_fused_under_autocast(monkeypatch):
    """A float32 model under torch.autocast (as HF Trainer's bf16=True runs one): every LoRA layer takes the fused
    op, including those whose input arrives in bfloat16 from the layer before (mixed dtypes are autocast's to cast).
    Against the float32 run, the fused logits and LoRA gradients are within bfloat16's tolerance or twice the error
    of PEFT's own forward under autocast (flash-attention's rule: assert_matches' baseline)."""
    ids, vocab = load_corpus()
    model = build_model(vocab)
    x = ids[:30].view(2, 15)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]

    def run(autocast: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=x).logits
        grads = torch.autograd.grad(logits.float().square().mean(), lora_params)
        return logits, grads

    exact, exact_grads = run(False)
    peft_out, peft_grads = run(True)
    tmf.patch_model(model)
    calls = _count_calls(monkeypatch)
    fused, fused_grads = run(True)
    assert calls.count("lora_forward") == 2 * 7
    assert fused.dtype == peft_out.dtype == torch.bfloat16
    assert_matches(fused, exact.double(), torch.bfloat16, "patched logits under autocast", baseline=peft_out)
    for i, (got, want, peft_grad) in enumerate(zip(fused_grads, exact_grads, peft_grads)):
        assert_matches(got, want.double(), torch.bfloat16, f"LoRA gradient {i}", baseline=peft_grad)


def test_peft_fan_in_fan_out_flag_on_a_linear_base_is_ignored_as_peft_does():
    """PEFT's forward calls an nn.Linear base layer as it is whatever fan_in_fan_out says (the flag only matters
    when merging); the patched forward used the transposed weight then: wrong values on square layers."""
    _, vocab = load_corpus()
    model = build_model(vocab)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    layer.fan_in_fan_out = True
    h = torch.randn(3, layer.base_layer.in_features)
    with torch.no_grad():
        ref = layer(h)
        tmf.patch_model(model)
        assert_matches(layer(h), ref.double(), torch.float32, "fan_in_fan_out=True on an nn.Linear base")


def test_peft_layers_the_fused_path_cannot_serve_are_reported():
    from peft import LoraConfig, get_peft_model

    holder = torch.nn.Module()
    holder.a = torch.nn.Linear(16, 16)
    holder.b = torch.nn.Linear(16, 16)
    model = get_peft_model(holder, LoraConfig(r=4, target_modules=["a"], use_dora=True))
    report = tmf.patch_model(model)
    assert any("DoRA" in why for _, why in report.skipped)
    holder2 = torch.nn.Module()
    holder2.a = torch.nn.Linear(16, 16)
    model2 = get_peft_model(holder2, LoraConfig(r=4, target_modules=["a"], lora_bias=True))
    assert any("LoRA bias" in why for _, why in tmf.patch_model(model2).skipped)


def test_peft_multiple_active_adapters_and_adapter_names():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(12, 10)
    model = get_peft_model(holder, LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False, use_rslora=True))
    layer = model.base_model.model.proj
    layer.set_adapter(["default", "second"])
    x = torch.randn(5, 12)
    ref = layer(x)
    ref_mixed = layer(x, adapter_names=["default", "second", "default", "__base__", "second"])
    tmf.patch_model(model)
    assert_matches(layer(x), ref.double(), torch.float32, "two active adapters")
    assert_matches(
        layer(x, adapter_names=["default", "second", "default", "__base__", "second"]),
        ref_mixed.double(),
        torch.float32,
        "mixed-batch adapter names",
    )


def test_state_dict_and_peft_save_load_unchanged(tmp_path):
    ids, vocab = load_corpus()
    model = build_model(vocab)
    keys = list(model.state_dict())
    tmf.patch_model(model)
    assert list(model.state_dict()) == keys
    model.save_pretrained(tmp_path / "adapter")
    fresh = build_model(vocab, seed=1)
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(fresh, load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    tmf.patch_model(fresh)
    x = ids[:20].view(1, 20)
    with torch.no_grad():
        a = model(input_ids=x).logits
    assert torch.isfinite(a).all()
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), fresh.named_parameters()):
        if "lora_" in n1:
            assert n1 == n2 and torch.equal(p1, p2)


def test_peft_wrappers_do_not_look_patched_when_the_model_inside_is():
    """PeftModel and LoraModel forward unknown attributes to the model they wrap: when the causal LM inside is patched,
    a second patch_model reported the wrappers "already patched" too, and unpatch_model deleted their (class) forward,
    an AttributeError."""
    ids, vocab = load_corpus()
    model = build_model(vocab)
    report = tmf.patch_model(model, cross_entropy=True)
    assert dict(report.patched)["base_model.model"] == "LlamaForCausalLM loss (linear cross-entropy)"
    again = dict(tmf.patch_model(model, cross_entropy=True).skipped)
    assert again["base_model.model"] == "already patched"
    assert "" not in again and "base_model" not in again
    assert tmf.unpatch_model(model) == len(report.patched)
    x = ids[:20].view(1, 20)
    assert model(input_ids=x, labels=x).logits is not None


# ---- causal-LM loss (patch_model(cross_entropy=True)) ------------------------------------------------------
def _tiny_causal_lm(family: str, dtype=torch.float32):
    """A tiny random model of each family patch_model's loss patch knows (Gemma-2/3 with soft-capping)."""
    import transformers as tf

    common = dict(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    config_cls, model_cls, extra = {
        "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
        "mistral": ("MistralConfig", "MistralForCausalLM", {}),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
        "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
        "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
        "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 8, "final_logit_softcapping": 2.0}),
    }[family]
    torch.manual_seed(0)
    config = getattr(tf, config_cls)(**common, **extra)
    config.tie_word_embeddings = family.startswith("gemma")  # both the tied and the untied head
    model = getattr(tf, model_cls)(config).to(dtype)
    if getattr(model.lm_head, "bias", None) is None and family == "mistral":  # a head with a bias, too
        model.lm_head.bias = torch.nn.Parameter(torch.randn(61, dtype=dtype) * 0.1)
    return model


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


CAUSAL_LM_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3"]


@pytest.mark.parametrize("family", CAUSAL_LM_FAMILIES)
def test_causal_lm_loss_patch_equals_hf_loss(cpu_backend, family):
    """Training forwards with labels: the loss and every gradient equal the original forward's (labels with
    ignored positions; with num_items_in_batch as gradient accumulation passes it; with shift_labels), and the
    logits are never built (lm_head's forward is not called). Without labels, or in eval mode: the original."""
    import copy

    model = _tiny_causal_lm(family)
    original = copy.deepcopy(model)
    report = tmf.patch_model(model, rms_norm=False, lora=False, cross_entropy=True)
    assert [what for _, what in report.patched] == [f"{type(model).__name__} loss (linear cross-entropy)"]
    head_calls = []
    model.lm_head.register_forward_hook(lambda *_: head_calls.append(1))
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 61, (3, 11), generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt that is not trained on
    labels[2, 7:] = -100  # padding
    shifted = torch.randint(0, 61, (3, 11), generator=g)
    shifted[1, ::3] = -100
    cases = [
        (labels, {}),
        (labels, {"num_items_in_batch": torch.tensor(25)}),
        (labels, {"num_items_in_batch": 19}),
        (labels, {"shift_labels": shifted}),
        (labels.masked_fill(labels == -100, 7), {"ignore_index": 7}),
    ]
    model.train()
    original.train()
    for labels_, extra in cases:
        for m in (model, original):
            m.zero_grad(set_to_none=True)
        ours = model(input_ids=ids, labels=labels_, **extra)
        ref = original(input_ids=ids, labels=labels_, **extra)
        assert ours.logits is None and head_calls == [], extra
        assert ours.loss.dtype == torch.float32
        torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=1e-6, msg=str(extra))
        ours.loss.backward()
        ref.loss.backward()
        ref_grads = _grads(original)
        ours_grads = _grads(model)
        assert ours_grads.keys() == ref_grads.keys()
        for name, grad in ours_grads.items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=f"{extra} {name}")
    loss_tuple = model(ids, labels=labels, return_dict=False)
    torch.testing.assert_close(loss_tuple[0], original(ids, labels=labels).loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no labels: logits as before; eval mode with labels: the original forward, logits too
        torch.testing.assert_close(model(input_ids=ids).logits, original(input_ids=ids).logits)
        model.eval()
        out = model(input_ids=ids, labels=labels)
        assert out.logits is not None and len(head_calls) == 2
    assert tmf.unpatch_model(model) == 1
    model.train()
    assert model(input_ids=ids, labels=labels).logits is not None


def test_causal_lm_loss_patch_bfloat16_autocast_and_what_is_left(cpu_backend):
    """bfloat16: the loss is float32 (HF upcasts the logits) and close to HF's; a float32 model under autocast takes
    the fused loss too (no logits), its loss and gradients within bfloat16's tolerance of the float32 run or twice
    the original's error under autocast; a PEFT-adapted lm_head and an unknown causal LM are left with the reason."""
    import copy

    model = _tiny_causal_lm("llama", torch.bfloat16)
    original = copy.deepcopy(model)
    tmf.patch_model(model, rms_norm=False, lora=False, cross_entropy=True)
    ids = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(2))
    ours, ref = model(input_ids=ids, labels=ids).loss, original(input_ids=ids, labels=ids).loss
    assert ours.dtype == ref.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=2e-2, atol=0)
    model32, original32 = _tiny_causal_lm("llama"), _tiny_causal_lm("llama")
    tmf.patch_model(model32, rms_norm=False, lora=False, cross_entropy=True)
    model32.train()
    original32.train()
    exact = original32(input_ids=ids, labels=ids).loss
    exact.backward()
    exact_grads = _grads(original32)
    original32.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model32(input_ids=ids, labels=ids)
        ref = original32(input_ids=ids, labels=ids)
    assert out.logits is None and ref.logits is not None  # fused under autocast; the original built its logits
    assert out.loss.dtype == ref.loss.dtype == torch.float32
    assert_matches(out.loss, exact.double(), torch.bfloat16, "loss under autocast", baseline=ref.loss)
    out.loss.backward()
    ref.loss.backward()
    ours_grads, ref_grads = _grads(model32), _grads(original32)
    assert ours_grads.keys() == ref_grads.keys() == exact_grads.keys()
    for name, grad in ours_grads.items():
        assert_matches(grad, exact_grads[name].double(), torch.bfloat16, name, baseline=ref_grads[name])

    from peft import LoraConfig, get_peft_model

    adapted = get_peft_model(_tiny_causal_lm("llama"), LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    report = tmf.patch_model(adapted, rms_norm=False, lora=False, cross_entropy=True)
    assert report.patched == []
    assert any("lm_head is not a plain nn.Linear" in why for _, why in report.skipped), report

    class ToyForCausalLM(torch.nn.Module):
        pass

    report = tmf.patch_model(ToyForCausalLM(), cross_entropy=True)
    assert "not among the causal LMs" in dict(report.skipped)[""]


ALL_OPTIONS = dict(rms_norm=True, lora=True, softmax=True, cross_entropy=True, swiglu=True, rope=True)


def _converge(dtype, fused: bool, steps: int = 20, device: str = "cpu", train_dtype=None, arch: str = "llama"):
    """Train 20 steps; `train_dtype` casts the model (built in `dtype`, so the same initial values) first."""
    ids, vocab = load_corpus()
    model = build_model(vocab, dtype=dtype, arch=arch)
    if train_dtype is not None:
        model.to(train_dtype)
    if fused:  # every option: RMSNorm, PEFT LoRA, SwiGLU/GeGLU, RoPE and the loss (no logits in the patched run)
        report = tmf.patch_model(model, **ALL_OPTIONS)
        assert len(report.patched) == 2 * 7 + 5 + 2 + 2 + 1, report
    initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train(model, ids, steps, batch=4, seq=32, device=device, log=lambda _: None)
    params = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return losses, params, initial


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_convergence_patched_equals_unpatched_float32(cpu_backend, arch):
    """Same seed and data, 20 AdamW steps in float32: per-step losses agree, and each trained weight tensor is
    as close to a float64 run as the unpatched float32 run is (2x), or within 1e-4 of how far training moved it.
    Adam's normalised steps turn rounding differences in near-zero gradients into differences of order lr in
    single elements, so an elementwise atol would only test the summation order."""
    ref_losses, ref_params, _ = _converge(torch.float32, fused=False, arch=arch)
    losses, params, _ = _converge(torch.float32, fused=True, arch=arch)
    _, truth, initial = _converge(torch.float32, fused=False, train_dtype=torch.float64, arch=arch)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-5, atol=0)
    assert losses[-1] < losses[0]
    for name, p in params.items():
        ours = (p.double() - truth[name]).norm().item()
        native = (ref_params[name].double() - truth[name]).norm().item()
        moved = (truth[name] - initial[name]).norm().item()
        assert ours <= 2 * native or ours <= 1e-4 * moved, (name, ours, native, moved)


def test_convergence_patched_equals_unpatched_bfloat16(cpu_backend):
    """The same in bfloat16: losses within 2 %, weights within 2e-2."""
    ref_losses, ref_params, _ = _converge(torch.bfloat16, fused=False)
    losses, params, _ = _converge(torch.bfloat16, fused=True)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-2, atol=0)
    assert losses[-1] < losses[0]
    for name, p in params.items():
        torch.testing.assert_close(p.float(), ref_params[name].float(), rtol=0, atol=2e-2, msg=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize(
    ("dtype", "loss_rtol", "param_atol"),
    [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 2e-2)],
    ids=["float32", "bfloat16"],
)
def test_convergence_on_cuda(monkeypatch, dtype, loss_rtol, param_atol):
    """The same convergence check with our CUDA kernels (float32 looser than on CPU: cuBLAS may use TF32-free
    but differently ordered reductions, and the LoRA weight is merged before its GEMM)."""
    monkeypatch.delenv("TORCH_METAL_FUSED_BACKEND", raising=False)
    assert tmf.backend_for(torch.empty(1, device="cuda")) == "cuda"
    ref_losses, ref_params, _ = _converge(dtype, fused=False, device="cuda")
    losses, params, _ = _converge(dtype, fused=True, device="cuda")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=loss_rtol, atol=0)
    for name, p in params.items():
        torch.testing.assert_close(p.float(), ref_params[name].float(), rtol=0, atol=param_atol, msg=name)


def _distributed_worker(rank: int, world: int, rendezvous: str, out: str, backend_name: str, wrapper: str):
    """One rank of a 2-process gloo run on the CPU: the patched model (every patch option on) wrapped in DDP, or
    sharded with FSDP2 (fully_shard on each decoder layer, then the root), trained on half of each global batch."""
    import datetime

    import torch.distributed as dist

    os.environ["TORCH_METAL_FUSED_BACKEND"] = backend_name
    dist.init_process_group(
        "gloo",
        init_method=f"file://{rendezvous}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),
    )
    ids, vocab = load_corpus()
    model = build_model(vocab)
    tmf.patch_model(model, **ALL_OPTIONS)
    if wrapper == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        run = DDP(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for module in model.modules():
            if type(module).__name__.endswith("DecoderLayer"):
                fully_shard(module, mesh=mesh)
        run = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    from train_lora import batches

    losses = []
    for chunk in batches(ids, 4, 32, 6):
        part = chunk[rank * 2 : rank * 2 + 2]  # each rank takes half of the same global batch
        opt.zero_grad()
        loss = run(input_ids=part, labels=part).loss
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    if rank == 0:
        torch.save(losses, out)
    dist.barrier()
    # Leave without Python teardown: destroying DDP's reducer after the work is done can deadlock inside
    # torch's gloo process group (its destructor joins a thread that waits for the GIL), about one run in six.
    os._exit(0)


def _two_processes_match_one(tmp_path, backend_name, wrapper):
    import time

    import torch.multiprocessing as mp

    out = tmp_path / "losses.pt"
    # File rendezvous (no ports); a bounded wait so that a stuck collective fails the test instead of CI.
    args = (2, str(tmp_path / "rdzv"), str(out), backend_name, wrapper)
    ctx = mp.spawn(_distributed_worker, args=args, nprocs=2, join=False)
    deadline = time.time() + 300
    while not ctx.join(timeout=5):
        if time.time() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{wrapper} workers did not finish within 300 s")
    two = torch.load(out)
    # One process, the same global batches: with equal halves, the mean of the halves' losses is the
    # full batch's loss, and the averaged (DDP) or reduce-scattered (FSDP2) gradient is the full batch's.
    ids, vocab = load_corpus()
    model = build_model(vocab)
    tmf.patch_model(model, **ALL_OPTIONS)
    single = train(model, ids, 6, batch=4, seq=32, log=lambda _: None)
    torch.testing.assert_close(torch.tensor(two), torch.tensor(single), rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_ddp_two_processes_match_one(tmp_path, backend_name, monkeypatch):
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", backend_name)
    _two_processes_match_one(tmp_path, backend_name, "ddp")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fsdp2_two_processes_match_one(tmp_path, backend_name, monkeypatch):
    """FSDP2 (fully_shard) unshards parameters before a module's forward: the patched forwards see ordinary
    tensors, so sharded training equals one process."""
    monkeypatch.setenv("TORCH_METAL_FUSED_BACKEND", backend_name)
    _two_processes_match_one(tmp_path, backend_name, "fsdp2")


def test_peft_default_float32_adapters_on_a_bfloat16_model_run_fused(cpu_backend, monkeypatch):
    """PEFT's default (autocast_adapter_dtype=True) keeps adapters in float32 on a bfloat16 model, the configuration
    most users have: patch_model reports every LoRA layer patched with no caveat, every one of them runs the fused op
    forward and backward (no warning, no fallback to PEFT's forward), and the loss and every adapter gradient match
    PEFT's own run of the same model."""
    import warnings

    from train_lora import batches

    ids, vocab = load_corpus()
    chunk = next(batches(ids, 4, 32, 1))
    runs = []
    for patched in (False, True):
        model = build_model(vocab, dtype=torch.bfloat16)
        layers = [n for n, m in model.named_modules() if _is_peft_linear(m)]
        adapters = [p for n, p in model.named_parameters() if p.requires_grad]
        assert layers and all(p.dtype == torch.float32 for p in adapters)  # PEFT's default, which users have
        calls = []
        if patched:
            report = tmf.patch_model(model)
            assert {n for n, what in report.patched if what == "PEFT lora.Linear"} == set(layers)
            calls = _count_calls(monkeypatch)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss = model(input_ids=chunk, labels=chunk).loss
            loss.backward()
        if patched:
            assert calls.count("lora_forward") == calls.count("lora_backward") == len(layers)
        runs.append((loss.detach(), [p.grad for p in adapters]))
    (ref_loss, ref_grads), (loss, grads) = runs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == torch.float32 and rel_error(g, r) <= 2e-2


def test_peft_several_active_adapters_on_a_bfloat16_model(monkeypatch):
    """Two active adapters on a bfloat16 layer. float32 adapters (PEFT's default): PEFT sums them onto the base output
    in float32 and rounds once, so such a call runs PEFT's forward, exactly. bfloat16 adapters: the first is fused, the
    second added by PEFT's formula, within bfloat16 rounding of PEFT's result."""
    from peft import LoraConfig, get_peft_model

    x = torch.randn(6, 12, dtype=torch.bfloat16)
    for autocast_adapter_dtype in (True, False):
        torch.manual_seed(0)
        config = LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False)
        model = get_peft_model(_holder_bf16(), config, autocast_adapter_dtype=autocast_adapter_dtype)
        model.add_adapter("second", config)
        layer = model.base_model.model.proj
        if not autocast_adapter_dtype:  # add_adapter keeps PEFT's default (float32) for the new adapter
            layer.lora_A["second"].to(torch.bfloat16)
            layer.lora_B["second"].to(torch.bfloat16)
        layer.set_adapter(["default", "second"])
        for adapter in ("default", "second"):  # PEFT initialises B to zero: make both adapters matter
            torch.nn.init.normal_(layer.lora_B[adapter].weight, std=0.5)
        ref = layer(x)
        tmf.patch_model(model)
        calls = _count_calls(monkeypatch)
        out = layer(x)
        assert out.dtype == torch.bfloat16
        if autocast_adapter_dtype:
            assert layer.lora_A["second"].weight.dtype == torch.float32
            assert calls == [] and torch.equal(out, ref)
        else:
            assert calls == ["lora_forward"]
            assert_matches(out, ref.double(), torch.bfloat16, "two bf16 adapters")
        tmf.unpatch_model(model)


def _is_peft_linear(module: torch.nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    return isinstance(module, Linear)


def test_peft_adapters_in_a_dtype_the_op_does_not_take_are_reported_and_warned(monkeypatch):
    """float16 adapters on a bfloat16 base: the fused op serves such a layer only under autocast. The report says so
    (never a plain "patched" for a layer whose every call outside autocast runs PEFT's forward), a call outside
    autocast warns once and equals PEFT's, and under autocast the fused op runs."""
    from peft import LoraConfig, get_peft_model

    from torch_metal_fused import patch

    torch.manual_seed(0)
    model = get_peft_model(_holder_bf16(), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    layer = model.base_model.model.proj
    layer.lora_A["default"].half()
    layer.lora_B["default"].half()
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    ref = layer(x)
    report = tmf.patch_model(model)
    (what,) = [w for n, w in report.patched if n.endswith("proj")]
    assert "fused only under torch.autocast" in what and "float16 on a bfloat16 base" in what
    monkeypatch.setattr(patch, "_warned_lora_dtypes", set())
    calls = _count_calls(monkeypatch)
    with pytest.warns(UserWarning, match="mixes dtypes .* runs PEFT's own"):
        out = layer(x)
    assert calls == [] and torch.equal(out, ref)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert calls == ["lora_forward"]


def _holder_bf16() -> torch.nn.Module:
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(12, 10, dtype=torch.bfloat16)
    return holder


def _checkpointed_llama(dropout: float, reentrant: bool | None):
    """A tiny PEFT-LoRA Llama (head_dim 32: the attention kernels' smallest) with gradient checkpointing as
    transformers enables it (`gradient_checkpointing_enable`, reentrant or not; None: off)."""
    lora = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear", init_lora_weights=False)
    model = peft.get_peft_model(_tiny_llama_for_users(), peft.LoraConfig(**lora))
    if reentrant is not None:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.enable_input_require_grads()  # the reentrant variant needs an input that requires grad (PEFT's advice)
    model.train()
    return model


def _checkpointed_step(model, seed: int = 5):
    """Loss and the adapters' gradients of one padded training batch, the dropout masks drawn from `seed`."""
    ids = torch.randint(1, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding
    labels = ids.masked_fill(mask == 0, -100)
    torch.manual_seed(seed)
    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_with_every_patch(cpu_backend, reentrant, monkeypatch):
    """Hugging Face's gradient checkpointing (what memory-bound fine-tuning turns on), both of torch's variants, on a
    PEFT model patched with every option, attention included: loss and every adapter gradient equal the unpatched
    checkpointed model's; with LoRA dropout, equal to the patched model's without checkpointing (the recomputed
    forward draws the same dropout masks); the layers' fused forward runs twice per step (the recomputation) and
    their backward once."""
    ref_loss, ref_grads = _checkpointed_step(_checkpointed_llama(0.0, reentrant))
    model = _checkpointed_llama(0.0, reentrant)
    tmf.patch_model(model, **ALL_OPTIONS, attention=True)
    calls = record_kernel_calls(monkeypatch, ("attention", "lora_linear"))
    loss, grads = _checkpointed_step(model)
    assert calls.count("attention_forward") == 2 * 2 and calls.count("attention_backward") == 2, calls
    assert calls.count("lora_forward") == 2 * 2 * 7 and calls.count("lora_backward") == 2 * 7, calls
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=0)
    assert grads.keys() == ref_grads.keys() and len(grads) == 2 * 7 * 2
    for name, grad in grads.items():
        assert_matches(grad, ref_grads[name].double(), torch.float32, name)

    with_dropout = [_checkpointed_llama(0.25, r) for r in (reentrant, None)]
    for m in with_dropout:
        tmf.patch_model(m, **ALL_OPTIONS, attention=True)
    (loss, grads), (plain_loss, plain_grads) = (_checkpointed_step(m) for m in with_dropout)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def _tiny_llama_for_users(peft_lora: bool = False):
    """A tiny random Llama with head_dim 32 (the attention kernels' smallest), optionally with PEFT LoRA adapters."""
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DECODER))
    if peft_lora:
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return model


def test_patched_forwards_show_the_original_signature():
    """transformers' generate and Trainer decide what to pass from inspect.signature(model.forward): every forward
    patch_model installs shows the one it replaced (a bare (*args, **kwargs) made generate re-feed the prompt on
    top of its cache and Trainer drop input_ids)."""
    model = _tiny_llama_for_users(peft_lora=True)
    report = tmf.patch_model(model, **ALL_OPTIONS, attention=True)
    patched = [m for m in model.modules() if tmf.patch._is_patched(m)]
    assert len(patched) >= len(report.patched) - 1  # the attention switch installs no forward
    for module in patched:
        original = getattr(module, tmf.patch._ORIGINAL)
        assert inspect.signature(module.forward) == inspect.signature(original), type(module).__name__
    base = model.get_base_model()
    assert "attention_mask" in inspect.signature(base.forward).parameters


def test_generate_continues_from_a_returned_cache(cpu_backend):
    """A second generate() from the cache the first returned (a chat's next turn) gives the scores of a fresh
    generate over the whole sequence, as the unpatched model does (it silently re-fed the prompt over the cache)."""
    ref = _tiny_llama_for_users().eval()
    model = copy.deepcopy(ref)
    tmf.patch_model(model, **ALL_OPTIONS, attention=True)
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(1))
    kw = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_scores=True, max_new_tokens=4)
    scores = {}
    for name, m in (("unpatched", ref), ("patched", model)):
        first = m.generate(input_ids=ids, **kw)
        turn2 = torch.cat([first.sequences, torch.arange(3, 8)[None]], 1)
        cont = m.generate(input_ids=turn2, past_key_values=first.past_key_values, **kw)
        fresh = m.generate(input_ids=turn2, **kw)
        for a, b in zip(cont.scores, fresh.scores):
            assert_matches(a, b.double(), torch.float32, f"{name}: continued against fresh")
        scores[name] = torch.stack(cont.scores)
    assert_matches(scores["patched"], scores["unpatched"].double(), torch.float32, "patched against unpatched")


@pytest.mark.parametrize("peft_lora", [False, True], ids=["full", "peft"])
def test_trainer_trains_a_patched_model(peft_lora, tmp_path):
    """transformers' Trainer with its defaults (remove_unused_columns=True keeps the dataset columns the forward's
    signature names): the patched model trains, with the unpatched model's loss."""
    pytest.importorskip("accelerate")
    ids = torch.randint(3, 128, (4, 12), generator=torch.Generator().manual_seed(2))
    data = [dict(input_ids=row, attention_mask=torch.ones_like(row), labels=row) for row in ids]
    args = dict(per_device_train_batch_size=2, max_steps=2, report_to=[], use_cpu=True, save_strategy="no")
    losses = {}
    for fused in (False, True):
        model = _tiny_llama_for_users(peft_lora)
        if fused:
            tmf.patch_model(model, **ALL_OPTIONS, attention=True)
        run = transformers.TrainingArguments(output_dir=str(tmp_path / str(fused)), seed=0, **args)
        trainer = transformers.Trainer(model=model, args=run, train_dataset=data)
        losses[fused] = trainer.train().training_loss
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_inference_mode_with_a_padded_batch(cpu_backend):
    """torch.inference_mode() (pipelines, evaluation loops) with a padded batch and the fused attention: the mask's
    causal and padding factors are found without its version counter, which inference tensors lack (a
    RuntimeError before); the logits equal the unpatched model's."""
    ref = _tiny_llama_for_users().eval()
    model = copy.deepcopy(ref)
    tmf.patch_model(model, **ALL_OPTIONS, attention=True)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask).logits
        want = ref(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert_matches(out[real], want[real].double(), torch.float32, "inference_mode logits")


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(lora_bias=True)], ids=["dora", "lora_bias"])
def test_an_adapter_the_op_cannot_compute_added_after_patching_runs_peft(variant, monkeypatch):
    """An adapter added after patch_model that the op does not compute (DoRA, a LoRA bias): its layers run PEFT's
    forward, with one warning naming why (they ran as plain LoRA before: logits 0.9 off, silently)."""
    model = _tiny_llama_for_users(peft_lora=True)
    tmf.patch_model(model)
    ref = copy.deepcopy(model)
    tmf.unpatch_model(ref)
    for m in (model, ref):
        torch.manual_seed(1)
        m.add_adapter("late", peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **variant))
        m.set_adapter("late")
        with torch.no_grad():
            for name, p in m.named_parameters():
                if "late" in name:
                    p.normal_(0, 0.5)  # LoRA B, DoRA's magnitudes and the LoRA bias away from their neutral values
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    tmf.patch._warned_lora_adapters.clear()
    calls = record_kernel_calls(monkeypatch, ("lora_linear",))
    with pytest.warns(UserWarning, match="added after patch_model") as caught:
        out = model(input_ids=ids).logits
    assert sum("added after patch_model" in str(w.message) for w in caught) == 1
    assert calls == []
    assert_matches(out, ref(input_ids=ids).logits.double(), torch.float32, "logits")


def test_a_deepcopy_of_a_patched_model_unpatches_on_its_own(monkeypatch):
    """copy.deepcopy of a patched model (a DPO reference or an EMA copy) runs fused like the original; unpatching
    the original leaves the copy's fused RoPE in place, and unpatching the copy restores it fully (it raised
    KeyError half-way, and unpatching the original switched the copy's RoPE back to Hugging Face's)."""
    model = _tiny_llama_for_users()
    tmf.patch_model(model, **ALL_OPTIONS, attention=True)
    twin = copy.deepcopy(model)
    ids = torch.randint(3, 128, (1, 8), generator=torch.Generator().manual_seed(5))
    calls = record_kernel_calls(monkeypatch, ("rope",))
    with torch.no_grad():
        want = twin(input_ids=ids).logits
        assert calls.count("rope_apply") == 2
        assert tmf.unpatch_model(model) > 0
        calls.clear()
        assert_matches(twin(input_ids=ids).logits, want.double(), torch.float32, "copy after the original's unpatch")
        assert calls.count("rope_apply") == 2
        assert tmf.unpatch_model(twin) > 0
        assert not any(tmf.patch._is_patched(m) for m in twin.modules())
        calls.clear()
        assert_matches(twin(input_ids=ids).logits, want.double(), torch.float32, "copy unpatched")
        assert calls == []
