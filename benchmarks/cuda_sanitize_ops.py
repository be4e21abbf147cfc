"""Every CUDA kernel of torch_metal_fused, forward and backward, on the test shapes: run under
compute-sanitizer (memcheck, racecheck) by benchmarks/cuda_run.sh."""

import torch

import torch_metal_fused as tmf

assert tmf.backend_for(torch.empty(1, device="cuda")) == "cuda", "the CUDA kernels are not built"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # vector kernels (16-byte rows), the pipelined RMSNorm backward with several rows per block (5000x1024,
    # 1500x4096), narrow rows (warp-rows kernels), wide softmax rows in shared memory (10000-40000), ragged and
    # unaligned rows on the older kernels; add_rms_norm (the RMSNorm kernels with the residual add) on each
    shapes = (
        (3, 1),
        (5, 7),
        (9, 33),
        (4, 1000),
        (2, 4096),
        (2, 4097),
        (2, 10000),
        (3, 40000),
        (5000, 1024),
        (1500, 4096),
        (4423, 256),  # warp-rows forward (4 rows per warp in bf16, a ragged last block)
        (3, 20000),  # shared-memory softmax (y and dy staged in the backward)
        (2, 32768),  # shared-memory softmax forward (fp32: 128 KB, 1024 threads)
    )
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(cols, device="cuda", dtype=dtype, requires_grad=True)
        (tmf.softmax(x) * tmf.rms_norm(x, w)).sum().backward()
        tmf.rms_norm(x[:, : cols // 2 + 1], None).sum().backward()
        r = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        y, h = tmf.add_rms_norm(x, r, w, 1e-6, 1.0)
        torch.autograd.grad((y, h), (x, r, w), (torch.randn_like(y), torch.randn_like(h)))
    x = torch.randn(2, 7, 65, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(33, 65, device="cuda", dtype=dtype)
    a = torch.randn(8, 65, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(33, 8, device="cuda", dtype=dtype, requires_grad=True)
    tmf.lora_linear(x, w, a, b, 2.0).sum().backward()
    tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, training=True).sum().backward()
    # many tokens: the merged-weight route, W' from lora_expand in half precision (ragged rows and column steps); few
    # tokens at ranks 8 and 16: y = bias + s·h·Bᵀ by lora_expand with staged stores (ragged rows, 1000 columns;
    # 2000 x 4000: several 64-column steps per block)
    for tokens, fin, fout, rank, with_bias in (
        (1100, 72, 200, 8, False),
        (1100, 72, 200, 64, False),
        (37, 64, 1000, 8, False),
        (37, 64, 1000, 16, True),
        (2000, 2048, 4000, 8, True),
    ):
        x = torch.randn(tokens, fin, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(fout, fin, device="cuda", dtype=dtype)
        a = torch.randn(rank, fin, device="cuda", dtype=dtype, requires_grad=True)
        b = torch.randn(fout, rank, device="cuda", dtype=dtype, requires_grad=True)
        bias = torch.randn(fout, device="cuda", dtype=dtype) if with_bias else None
        tmf.lora_linear(x, w, a, b, 2.0, bias).sum().backward()
    # GLU: 16-byte packs over a flat row, ragged rows (scalar kernel), strided halves of a fused gate_up
    for gate_up in (
        torch.randn(6, 2 * 4096 + 16, device="cuda", dtype=dtype),
        torch.randn(5, 2 * 77, device="cuda", dtype=dtype),
    ):
        half = gate_up.shape[1] // 2
        g = gate_up[:, :half].detach().requires_grad_(True)
        u = gate_up[:, half:].detach().requires_grad_(True)
        (tmf.swiglu(g, u) + tmf.geglu(g, u)).sum().backward()
        gc, uc = g.detach().contiguous().requires_grad_(True), u.detach().contiguous().requires_grad_(True)
        tmf.swiglu(gc, uc).sum().backward()
    # RoPE: the head-parallel kernel (HF's transposed projections), the general kernel (interleaved, partial)
    for head_dim, rotary, interleaved in ((128, 128, False), (64, 32, False), (30, 30, True)):
        q = torch.randn(2, 9, 4, head_dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
        k = torch.randn(2, 9, 2, head_dim, device="cuda", dtype=dtype).transpose(1, 2).requires_grad_(True)
        ang = torch.rand(2, 9, rotary // 2, device="cuda")
        emb = torch.cat((ang, ang), -1) if not interleaved else ang.repeat_interleave(2, -1)
        qo, ko = tmf.rope(q, k, emb.cos().to(dtype), emb.sin().to(dtype), interleaved=interleaved)
        (qo.sum() + ko.sum()).backward()
torch.cuda.synchronize()
print("sanitized ops ran")
