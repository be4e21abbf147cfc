"""Fine-tune a small Llama-architecture model with PEFT LoRA in a plain training loop (no torch.compile).

The model is built from a transformers config with random weights (nothing is downloaded); the text is
examples/data/corpus.txt, tokenised by characters. LoRA goes on the attention and MLP projections.

    python examples/train_lora.py --device mps --steps 50            # fused kernels (default)
    python examples/train_lora.py --device mps --steps 50 --no-fused  # PEFT/transformers as they are
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

CORPUS = Path(__file__).parent / "data" / "corpus.txt"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_corpus() -> tuple[torch.Tensor, int]:
    text = CORPUS.read_text()
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text], dtype=torch.long)
    return ids, len(vocab)


def build_model(
    vocab_size: int,
    hidden: int = 64,
    layers: int = 2,
    lora_r: int = 8,
    lora_dropout: float = 0.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    arch: str = "llama",
):
    """A tiny Llama (or Gemma) model with random weights and PEFT LoRA adapters (B initialised non-zero, so
    the adapters matter from the first step)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    if arch == "gemma":
        model = GemmaForCausalLM(GemmaConfig(**common, head_dim=hidden // 4))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    model = model.to(dtype)
    config = LoraConfig(
        r=lora_r, lora_alpha=2 * lora_r, lora_dropout=lora_dropout, target_modules=TARGETS, init_lora_weights=False
    )
    return get_peft_model(model, config)


def batches(ids: torch.Tensor, batch: int, seq: int, steps: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, ids.numel() - seq - 1, (batch,), generator=g)
        yield torch.stack([ids[s : s + seq + 1] for s in starts.tolist()])


def train(
    model,
    ids: torch.Tensor,
    steps: int,
    batch: int = 8,
    seq: int = 64,
    lr: float = 3e-3,
    device: str = "cpu",
    log=print,
) -> list[float]:
    model.to(device).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step, cpu_chunk in enumerate(batches(ids, batch, seq, steps)):
        chunk = cpu_chunk.to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=chunk, labels=chunk)  # transformers shifts the labels itself
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
        dt = time.perf_counter() - t0
        log(f"step {step:4d}  loss {losses[-1]:.4f}  {batch * seq / dt:9.0f} tok/s  {_memory(device)}")
    return losses


def _memory(device: str) -> str:
    if device.startswith("cuda"):
        return f"peak {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    if device == "mps":
        return f"allocated {torch.mps.current_allocated_memory() / 2**20:.0f} MiB"
    return ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    default_device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    p.add_argument("--device", default=default_device)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    p.add_argument("--fused", action=argparse.BooleanOptionalAction, default=True)
    a = p.parse_args()
    ids, vocab = load_corpus()
    model = build_model(vocab, hidden=a.hidden, lora_dropout=0.05, dtype=getattr(torch, a.dtype))
    if a.fused:
        import torch_metal_fused as tmf

        print(tmf.patch_model(model, cross_entropy=True))  # the loss from hidden states: no logits
    model.print_trainable_parameters()
    losses = train(model, ids, a.steps, a.batch, a.seq, device=a.device)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {a.steps} steps ({'fused' if a.fused else 'unfused'})")


if __name__ == "__main__":
    main()
