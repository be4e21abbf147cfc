"""Where one LoRA training step's GPU time goes, kernel by kernel, through the real op (CUDA).

A bf16 LoRA layer (W frozen; x, A, B trainable; a bias), forward then backward, after a warm-up. By default
torch.profiler sums each kernel's CUDA time over --steps steps and the step's own time is taken by CUDA events; with
--ncu the script runs one step between cudaProfilerStart and cudaProfilerStop, for
`ncu --profile-from-start off` (benchmarks/cuda_run.sh, step lora-step). Run it once per configuration of the
K-concatenated GEMM (TORCH_METAL_FUSED_LORA_KCONCAT_GEMM) to see which kernels differ between them.
"""

from __future__ import annotations

import argparse

import torch

import torch_metal_fused as tmf


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="8192,4096,4096,16", help="tokens,in,out,rank")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--ncu", action="store_true", help="profile one step between cudaProfilerStart/Stop")
    args = p.parse_args()
    tokens, fin, fout, rank = map(int, args.shape.split(","))
    dev, dt = torch.device("cuda"), torch.bfloat16
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, scale: float = 1.0, grad: bool = False) -> torch.Tensor:
        t = (torch.randn(*shape, generator=g) * scale).to(dev, dt)
        return t.requires_grad_(grad)

    x = randn(tokens, fin, grad=True)
    w, bias = randn(fout, fin, scale=fin**-0.5), randn(fout)
    a, b = randn(rank, fin, scale=fin**-0.5, grad=True), randn(fout, rank, scale=rank**-0.5, grad=True)
    dy = randn(tokens, fout)

    def step() -> None:
        tmf.lora_linear(x, w, a, b, 2.0, bias=bias).backward(dy)

    from torch_metal_fused import _C

    gemms = {_C.lora_kconcat_gemm_for(tokens, fout), _C.lora_kconcat_gemm_for(tokens, fin)}
    taken = _C.lora_takes_kconcat_route(x, w, a)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.shape} bf16: K-concatenated route "
        f"{'taken, ' + '/'.join(sorted(gemms)) if taken else 'not taken'}",
        flush=True,
    )
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    if args.ncu:
        torch.cuda.cudart().cudaProfilerStart()
        step()
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()
        return
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(args.steps):
        step()
    end.record()
    torch.cuda.synchronize()
    print(f"step: {start.elapsed_time(end) * 1e3 / args.steps:.1f} µs (mean of {args.steps}, back to back)")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90))


if __name__ == "__main__":
    main()
