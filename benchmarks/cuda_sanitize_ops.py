"""Every CUDA kernel of torch_metal_fused, forward and backward, on the test shapes: run under
compute-sanitizer (memcheck, racecheck) by benchmarks/cuda_run.sh."""

import torch

import torch_metal_fused as tmf

assert tmf.backend_for(torch.empty(1, device="cuda")) == "cuda", "the CUDA kernels are not built"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    # vector kernels (16-byte rows), the pipelined RMSNorm backward with several rows per block (5000x1024,
    # 1500x4096), the looped vector softmax (40000), ragged and unaligned rows on the older kernels
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
    )
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(cols, device="cuda", dtype=dtype, requires_grad=True)
        (tmf.softmax(x) * tmf.rms_norm(x, w)).sum().backward()
        tmf.rms_norm(x[:, : cols // 2 + 1], None).sum().backward()
    x = torch.randn(2, 7, 65, device="cuda", dtype=dtype, requires_grad=True)
    w = torch.randn(33, 65, device="cuda", dtype=dtype)
    a = torch.randn(8, 65, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(33, 8, device="cuda", dtype=dtype, requires_grad=True)
    tmf.lora_linear(x, w, a, b, 2.0).sum().backward()
    tmf.lora_linear(x, w, a, b, 2.0, dropout_p=0.1, training=True).sum().backward()
torch.cuda.synchronize()
print("sanitized ops ran")
