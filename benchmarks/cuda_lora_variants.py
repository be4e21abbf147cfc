"""CUDA LoRA linear: candidate compositions side by side in one run (issue #14), before choosing the route in
csrc/cuda/lora_linear.cu. Plain PyTorch (cuBLAS) plus one NVRTC kernel (the merged weight W' = W + s·B·A in one
pass over W), timed like the benchmark suite (torch_metal_fused.bench.run.time_fn: CUDA events around each call,
a 1 GiB buffer cleared before each call, median). W frozen; x, A and B trainable (bench/cases.py _prepare_lora:
bias without gradient, scale 2). Every variant is checked against a float64 reference first.

Run on the device: python3 benchmarks/cuda_lora_variants.py [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from torch_metal_fused.bench.run import time_fn

SHAPES = [(8192, 4096, 4096, 16), (8192, 4096, 4096, 64), (2048, 4096, 11008, 16), (2048, 4096, 11008, 64)]
SCALE = 2.0

# W'[o, c] = W[o, c] + scale · Σ_k B[o, k] · A[k, c], written at row stride ld (so W' can land inside a larger
# buffer: [W'; A] rows or [W' | s·B] columns). One thread per column holds A[:, c] in registers; B's rows of the
# block's row tile are staged in shared memory and read as broadcasts. bf16 as raw bits (NVRTC without headers).
MERGE_SRC = r"""
#define R %(rank)d
#define ROWS 32
__device__ __forceinline__ float ld(const %(T)s* p, long i) { return %(load)s; }
__device__ __forceinline__ void st(%(T)s* p, long i, float v) { %(store)s; }
extern "C" __global__ void merge_weight(const %(T)s* __restrict__ w, const %(T)s* __restrict__ a,
                                        const %(T)s* __restrict__ b, %(T)s* __restrict__ dst,
                                        int out_f, int in_f, int ld_dst, double scale) {
  __shared__ float bs[ROWS][R];
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  const int o0 = blockIdx.y * ROWS;
  for (int i = threadIdx.x; i < ROWS * R; i += blockDim.x) {
    const int o = o0 + i / R;
    bs[i / R][i %% R] = o < out_f ? ld(b, (long)o * R + i %% R) * (float)scale : 0.f;
  }
  __syncthreads();
  if (c >= in_f) return;
  float av[R];
#pragma unroll
  for (int k = 0; k < R; ++k) av[k] = ld(a, (long)k * in_f + c);
  const int rows = min(ROWS, out_f - o0);
#pragma unroll 4
  for (int r = 0; r < rows; ++r) {
    float acc = ld(w, (long)(o0 + r) * in_f + c);
#pragma unroll
    for (int k = 0; k < R; ++k) acc = fmaf(bs[r][k], av[k], acc);
    st(dst, (long)(o0 + r) * ld_dst + c, acc);
  }
}
"""

_KERNELS: dict = {}


def merge_kernel(dtype: torch.dtype, rank: int):
    key = (dtype, rank)
    if key not in _KERNELS:
        if dtype == torch.bfloat16:
            fmt = dict(
                T="unsigned short",
                load="__uint_as_float(((unsigned)p[i]) << 16)",
                store="unsigned u = __float_as_uint(v); u += 0x7fffu + ((u >> 16) & 1u); "
                "p[i] = (unsigned short)(u >> 16)",
            )
        else:
            fmt = dict(T="float", load="p[i]", store="p[i] = v")
        _KERNELS[key] = torch.cuda._compile_kernel(MERGE_SRC % dict(rank=rank, **fmt), "merge_weight")
    return _KERNELS[key]


def merge_into(dst: torch.Tensor, w, a, b, scale):
    out_f, in_f = w.shape
    k = merge_kernel(w.dtype, a.shape[0])
    k(
        grid=((in_f + 255) // 256, (out_f + 31) // 32, 1),
        block=(256, 1, 1),
        args=[w, a, b, dst, out_f, in_f, dst.stride(0), float(scale)],
    )


# ---- forward variants: each returns (y, h) -----------------------------------------------------------------------
def fwd_lowrank(x, w, bias, a, b, s):  # the low-rank route as shipped before: y = x·Wᵀ + bias, then y += s·h·Bᵀ
    h = x @ a.t()
    y = torch.nn.functional.linear(x, w, bias)
    y.addmm_(h, b.t(), alpha=s)
    return y, h


def fwd_lowrank_beta(x, w, bias, a, b, s):  # y0 = bias + s·h·Bᵀ first, then the base GEMM accumulates (beta = 1)
    h = x @ a.t()
    y = torch.addmm(bias, h, b.t(), alpha=s)
    y.addmm_(x, w.t())
    return y, h


def fwd_merged(x, w, bias, a, b, s):  # the merged route as shipped before: W' by cuBLAS addmm, h by cuBLAS
    h = x @ a.t()
    return torch.nn.functional.linear(x, torch.addmm(w, b, a, alpha=s), bias), h


def fwd_fold_cublas(x, w, bias, a, b, s):  # [W'; A] in one buffer (W' by cuBLAS), one GEMM gives y and h
    out_f, r = w.shape[0], a.shape[0]
    buf = torch.empty(out_f + r, w.shape[1], device=w.device, dtype=w.dtype)
    torch.addmm(w, b, a, alpha=s, out=buf[:out_f])
    buf[out_f:].copy_(a)
    yh = torch.addmm(torch.cat((bias, bias.new_zeros(r))), x, buf.t())
    return yh[:, :out_f], yh[:, out_f:]


def fwd_fold_kernel(x, w, bias, a, b, s):  # [W'; A], W' by the one-pass kernel
    out_f, r = w.shape[0], a.shape[0]
    buf = torch.empty(out_f + r, w.shape[1], device=w.device, dtype=w.dtype)
    merge_into(buf, w, a, b, s)
    buf[out_f:].copy_(a)
    yh = torch.addmm(torch.cat((bias, bias.new_zeros(r))), x, buf.t())
    return yh[:, :out_f], yh[:, out_f:]


def fwd_merged_kernel(x, w, bias, a, b, s):  # W' by the kernel, h by cuBLAS (no fold)
    wm = torch.empty_like(w)
    merge_into(wm, w, a, b, s)
    return torch.nn.functional.linear(x, wm, bias), x @ a.t()


# ---- backward variants (W frozen): (dx, dA, dB) -----------------------------------------------------------------
def bwd_lowrank(dy, x, w, a, b, h, s):  # as shipped before for tokens <= in
    dh = (dy @ b).mul_(s)
    dx = torch.addmm(dh @ a, dy, w)
    return dx, dh.t() @ x, (dy.t() @ h).mul_(s)


def bwd_merged(dy, x, w, a, b, h, s):  # as shipped before for tokens > in: W' recomputed by cuBLAS
    dh = (dy @ b).mul_(s)
    dx = dy @ torch.addmm(w, b, a, alpha=s)
    return dx, dh.t() @ x, (dy.t() @ h).mul_(s)


def bwd_fold(dy, x, w, a, b, h, s, kernel=False):  # [W' | s·B]: one GEMM gives dx and dh
    out_f, in_f, r = w.shape[0], w.shape[1], a.shape[0]
    buf = torch.empty(out_f, in_f + r, device=w.device, dtype=w.dtype)
    if kernel:
        merge_into(buf, w, a, b, s)
    else:
        torch.addmm(w, b, a, alpha=s, out=buf[:, :in_f])
    torch.mul(b, s, out=buf[:, in_f:])
    dxdh = dy @ buf
    dh = dxdh[:, in_f:]
    return dxdh[:, :in_f], dh.t() @ x, (dy.t() @ h).mul_(s)


def bwd_fold_kernel(dy, x, w, a, b, h, s):
    return bwd_fold(dy, x, w, a, b, h, s, kernel=True)


def bwd_merged_kernel(dy, x, w, a, b, h, s):
    dh = (dy @ b).mul_(s)
    wm = torch.empty_like(w)
    merge_into(wm, w, a, b, s)
    return dy @ wm, dh.t() @ x, (dy.t() @ h).mul_(s)


FWD = {
    "lowrank": fwd_lowrank,
    "lowrank_beta": fwd_lowrank_beta,
    "merged": fwd_merged,
    "merged_kernel": fwd_merged_kernel,
    "fold_cublas": fwd_fold_cublas,
    "fold_kernel": fwd_fold_kernel,
}
BWD = {
    "lowrank": bwd_lowrank,
    "merged": bwd_merged,
    "merged_kernel": bwd_merged_kernel,
    "fold_cublas": bwd_fold,
    "fold_kernel": bwd_fold_kernel,
}
# forward+backward pairs (the backward that goes with each forward route)
PAIRS = {
    "lowrank": ("lowrank", "lowrank"),
    "lowrank_beta": ("lowrank_beta", "lowrank"),
    "merged": ("merged", "merged"),
    "merged_kernel": ("merged_kernel", "merged_kernel"),
    "fold_cublas": ("fold_cublas", "fold_cublas"),
    "fold_kernel": ("fold_kernel", "fold_kernel"),
    "fold_fwd+merged_bwd": ("fold_cublas", "merged"),
}


def rel(got, ref):
    return ((got.double() - ref).norm() / ref.norm()).item()


def median_us(fn, device):
    _, times = time_fn(fn, device)
    return statistics.median(times) * 1e3


def copy_bandwidth_gbs(dev) -> float:
    """Device-to-device copy of 1 GiB, bytes read + written: the floors' bandwidth."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    return 2 * src.numel() / (median_us(lambda: dst.copy_(src), dev) * 1e-6) / 1e9


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--dtypes", default="bfloat16,float32")
    args = p.parse_args()
    dev = torch.device("cuda")
    lines = [
        f"# {torch.cuda.get_device_name()} torch {torch.__version__}; median µs (bench.run.time_fn: events, "
        f"cold L2); W frozen, x/A/B trainable, bias without grad, scale {SCALE}"
    ]
    bw = copy_bandwidth_gbs(dev)
    lines.append(f"copy bandwidth {bw:.0f} GB/s")
    for dtype in [getattr(torch, d) for d in args.dtypes.split(",")]:
        # float32 GEMMs run ~16x longer than bf16 ones (no TF32): the rank-r overheads shrink in proportion, so
        # the rank-16 shapes are enough there and keep the run short.
        for tokens, fin, fout, r in SHAPES if dtype == torch.bfloat16 else [sh for sh in SHAPES if sh[3] == 16]:
            g = torch.Generator(device="cpu").manual_seed(0)
            rnd = lambda *s, sc=1.0: (torch.randn(*s, generator=g) * sc).to(dev, dtype)  # noqa: E731
            w, bias = rnd(fout, fin, sc=fin**-0.5), rnd(fout)
            a, b = rnd(r, fin, sc=fin**-0.5), rnd(fout, r, sc=r**-0.5)
            x, dy = rnd(tokens, fin), rnd(tokens, fout)
            # float64 reference
            xd, wd, bd, ad, bbd, dyd = (t.double() for t in (x, w, bias, a, b, dy))
            hd = xd @ ad.t()
            yd = xd @ wd.t() + bd + SCALE * hd @ bbd.t()
            dhd = SCALE * dyd @ bbd
            ref_b = (dyd @ wd + dhd @ ad, dhd.t() @ xd, SCALE * dyd.t() @ hd)
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
            es = x.element_size()
            head = f"{str(dtype)[6:]} {tokens}x{fin}->{fout} r{r}"
            base = median_us(lambda: x @ w.t(), dev)
            base_dx = median_us(lambda: torch.mm(dy, w), dev)
            wcopy = median_us(w.clone, dev)
            res = [
                f"{head}: base GEMM x·Wᵀ {base:.1f}, dy·W {base_dx:.1f}, W clone {wcopy:.1f} "
                f"(floor at {bw:.0f} GB/s: W r+w {2 * w.numel() * es / bw / 1e3:.1f}, x read "
                f"{x.numel() * es / bw / 1e3:.1f}, dy read {dy.numel() * es / bw / 1e3:.1f})"
            ]
            fwd_t = {}
            for name, fn in FWD.items():
                try:
                    y, h = fn(x, w, bias, a, b, SCALE)
                except Exception as exc:  # an NVRTC failure must not cost the other variants
                    res.append(f"  fwd {name}: FAILED {exc!r:.200}")
                    continue
                e = max(rel(y, yd), rel(h, hd))
                if not e < tol:
                    res.append(f"  fwd {name}: WRONG rel err {e:.2e}")
                    continue
                fwd_t[name] = median_us(lambda fn=fn: fn(x, w, bias, a, b, SCALE), dev)
                res.append(f"  fwd {name:14s} {fwd_t[name]:8.1f} = {fwd_t[name] / base:.3f}x base  (err {e:.1e})")
            h = x @ a.t()
            bwd_t = {}
            for name, fn in BWD.items():
                try:
                    got = fn(dy, x, w, a, b, h, SCALE)
                except Exception as exc:
                    res.append(f"  bwd {name}: FAILED {exc!r:.200}")
                    continue
                e = max(rel(gv, rv) for gv, rv in zip(got, ref_b))
                if not e < tol:
                    res.append(f"  bwd {name}: WRONG rel err {e:.2e}")
                    continue
                bwd_t[name] = median_us(lambda fn=fn: fn(dy, x, w, a, b, h, SCALE), dev)
                res.append(f"  bwd {name:14s} {bwd_t[name]:8.1f} = {bwd_t[name] / base_dx:.3f}x dy·W")
            for name, (fname, bname) in PAIRS.items():
                if fname not in fwd_t or bname not in bwd_t:
                    continue

                def fwd_bwd(fname=fname, bname=bname):
                    h = FWD[fname](x, w, bias, a, b, SCALE)[1]
                    return BWD[bname](dy, x, w, a, b, h, SCALE)

                tt = median_us(fwd_bwd, dev)
                res.append(f"  fwd+bwd {name:20s} {tt:8.1f} = {tt / (base + base_dx):.3f}x (x·Wᵀ + dy·W)")
            print("\n".join(res), flush=True)
            lines += res
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
