"""The CUDA backend's float32-adapter LoRA route (torch_metal_fused/backends/cuda.py: bfloat16 hi + lo products)
against the float64 reference on a GPU, with and without a dropout mask: relative errors of y, h and every gradient.
Needs no build (the route is torch ops): `PYTHONPATH=$PWD python3 benchmarks/cuda_lora_float32_adapters.py [cpu]`."""

import sys

import torch

sys.path[:0] = ["."]
from torch_metal_fused import reference  # noqa: E402
from torch_metal_fused.backends import cuda  # noqa: E402

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
if dev == "cuda":
    print(torch.cuda.get_device_name(), torch.__version__, "mm out_dtype:", cuda._has_float32_output_mm("cuda"))
g = torch.Generator().manual_seed(0)


def rel(p, q):
    p, q = p.double().cpu(), q.double().cpu()
    return ((p - q).norm() / q.norm()).item()


shapes = ((70, 48, 40, 8), (4096, 2048, 2048, 16), (1100, 4096, 11008, 64)) if dev == "cuda" else ((70, 48, 40, 8),)
for tokens, fin, fout, r in shapes:
    x = torch.randn(tokens, fin, generator=g).to(dev, torch.bfloat16)
    w = (torch.randn(fout, fin, generator=g) * fin**-0.5).to(dev, torch.bfloat16)
    bias = torch.randn(fout, generator=g).to(dev, torch.bfloat16)
    a = (torch.randn(r, fin, generator=g) * fin**-0.5).to(dev)
    b = (torch.randn(fout, r, generator=g) * r**-0.5).to(dev)
    dy = torch.randn(tokens, fout, generator=g).to(dev, torch.bfloat16)
    for mask in (None, torch.empty_like(x).bernoulli_(0.9)):
        y, h = cuda.lora_forward(x, w, bias, a, b, 1.5, mask)
        grads = cuda.lora_backward(dy, x, w, a, b, h, 1.5, mask, (True,) * 5)
        t64 = [t.double().cpu() for t in (x, w, a, b, bias, dy)]
        m64 = None if mask is None else mask.double().cpu()
        y64, h64 = reference.lora_forward(t64[0], t64[1], t64[4], t64[2], t64[3], 1.5, m64)
        g64 = reference.lora_backward(t64[5], t64[0], t64[1], t64[2], t64[3], h64, 1.5, m64, (True,) * 5)
        errs = " ".join(f"{n} {rel(p, q):.1e}" for n, p, q in zip(("dx", "dw", "db", "da", "dlb"), grads, g64))
        print(
            tokens,
            fin,
            fout,
            r,
            "mask" if mask is not None else "-",
            f"y {rel(y, y64):.1e} h {rel(h, h64):.1e}",
            errs,
            y.dtype,
            h.dtype,
            grads[3].dtype,
            grads[4].dtype,
            flush=True,
        )
