"""A short demo that runs every op and layer once, forward and backward, on the best local device."""

from __future__ import annotations

import torch

import torch_metal_fused as tmf


def main() -> None:
    device = "mps" if torch.backends.mps.is_available() else "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(4, 128, 512, device=device, requires_grad=True)
    print(f"device={device} torch={torch.__version__} backend={tmf.backend_for(x)}")
    norm = tmf.nn.RMSNorm(512, device=device)
    lora = tmf.nn.LoRALinear(512, 512, r=8, alpha=16, device=device)
    h = tmf.softmax(lora(norm(x)), dim=-1)
    h.square().sum().backward()
    for name, p in [("x", x), *norm.named_parameters(prefix="norm"), *lora.named_parameters(prefix="lora")]:
        grad = "frozen (no grad)" if p.grad is None else f"grad norm {p.grad.norm():.4g}"
        print(f"  {name:14s} {tuple(p.shape)!s:12s} {grad}")


if __name__ == "__main__":
    main()
