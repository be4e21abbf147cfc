"""Our Metal kernels' launch plans and host code: the one place that decides every Metal launch (which kernel and
variant, grid, threadgroup size, arguments) and allocates the outputs, for the "metal" backend (MPS tensors, through
torch.mps.compile_shader) and the "metal-emulated" backend (CPU tensors, through the harness's stand-in for it), so CI
executes exactly the Python a Mac executes. Every entry point takes and returns tensors as the other backends'.

Every launch selects all its pipelines and computes its plan before it encodes anything, so a KernelUnavailable leaves
nothing half-encoded and the caller serves the call with the reference (torch_metal_fused/ops/_dispatch.py)."""

from __future__ import annotations

import torch

from torch_metal_fused import reference
from torch_metal_fused._errors import KernelUnavailable
from torch_metal_fused.backends.metal_library import SIMD_WIDTH, Dispatch, KernelLibraries, Pipeline, libraries_for
from torch_metal_fused.backends.shader_args import constant, params

DTYPE_SUFFIX = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat"}
READS_PER_THREAD = constant("kRowElementsPerThread")  # single_row variants: elements cached per thread
SIMD_ROWS_MAX_COLS = 256  # simd_rows variants: at most 8 elements per lane
SIMD_ROWS_PER_GROUP = 8  # simd_rows variants: rows (SIMD-groups) per threadgroup
# Threadgroups per GPU core a launch aims for before it packs more rows into a group (latency hiding).
GROUPS_PER_CORE = 4
# The GPU core count a launch plans for where the real one is not known: the harness's default, and on a Mac whose
# torch cannot tell. 10 is the largest base chip's (M2, M3, M4); Pro and Max chips have 14-40. The count only sizes
# grids and the RMSNorm backward's partial buffer: a wrong one costs speed, not results.
STAND_IN_GPU_CORES = 10
# A kernel that keeps a per-column operand in registers (RMSNorm's weight) re-reads it for every row walker (a
# threadgroup, or a SIMD-group in simd_rows): walking at least this many rows keeps the re-reads under
# 1 / (2 · 20) = 2.5 % of the traffic (x read and y written once per row).
MIN_ROWS_PER_OPERAND_READ = 20
U32_MAX = 2**32 - 1


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(v: int, m: int) -> int:
    return ceil_div(v, m) * m


def round_down(v: int, m: int) -> int:
    return v // m * m


def check_u32(value: int, what: str) -> None:
    if value > U32_MAX:
        raise ValueError(f"{what} ({value}) exceeds 2^32 - 1, the Metal kernels' limit")


def kernel_name(base: str, variant: str, dtype: torch.dtype) -> str:
    return f"{base}_{variant}_{DTYPE_SUFFIX[dtype]}"


class Launcher:
    """The pipelines and GPU facts of the device a call runs on."""

    def __init__(self, family: str, device: torch.device) -> None:
        self.family = family
        self.device = device
        self.libraries: KernelLibraries = libraries_for(device)

    def pipeline(self, kernel: str) -> Pipeline:
        return self.libraries.pipeline(self.family, kernel)

    def gpu_cores(self) -> int:
        if self.device.type == "cpu":
            from torch_metal_fused.emulator import runner

            return runner.current_gpu_cores()
        count = getattr(torch._C, "_mps_get_core_count", None)
        return int(count()) if count is not None else STAND_IN_GPU_CORES

    def encode(self, *dispatches: Dispatch) -> None:
        self.libraries.encode(dispatches)


def _output(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A kernel output. In the harness poisoned with NaN: an element a kernel never writes fails the contract instead
    of silently keeping what the allocator held (on a Mac it holds garbage, and filling it would cost a pass)."""
    if like.device.type == "cpu":
        return torch.full(tuple(shape), float("nan"), dtype=dtype)
    return torch.empty(tuple(shape), dtype=dtype, device=like.device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, cols) view of t with a unit inner stride (copying only when no such view exists)."""
    t2 = t.reshape(-1, t.shape[-1]) if t.ndim != 2 else t
    if t2.shape[-1] > 1 and t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


# ---- row kernels (softmax, RMSNorm) ------------------------------------------------------------------------------
# How a row-wise kernel family covers `rows` x `cols`:
#  - simd_rows  (cols <= 256): one SIMD-group per row, 8 SIMD-groups per threadgroup; each lane caches <= 8 elements.
#  - single_row (cols <= 8 * max threads, so up to 8192): one threadgroup per row, each thread caches 8 contiguous
#    elements in registers, so x is read once and y written once.
#  - looped     (longer rows): one threadgroup per row, up to 1024 threads striding over the row; reads the input
#    twice (see each kernel's notes).
# Row walkers (a SIMD-group in simd_rows, else a threadgroup) take one row each, unless the kernel re-reads a
# per-column operand per walker (`reuses_column_operand`: RMSNorm's weight): then each walks
# max(MIN_ROWS_PER_OPERAND_READ, rows / (GROUPS_PER_CORE · cores · walkers per group)) rows, so the operand costs
# <= 2.5 % of the traffic and, where there are enough rows, every core still gets GROUPS_PER_CORE groups.
def _rows_per_walker(rows: int, reuses_column_operand: bool, walkers_per_group: int, gpu_cores: int) -> int:
    if not reuses_column_operand:
        return 1
    walkers_wanted = GROUPS_PER_CORE * max(gpu_cores, 1) * walkers_per_group
    return max(MIN_ROWS_PER_OPERAND_READ, ceil_div(rows, walkers_wanted))


def plan_rows(launcher: Launcher, base: str, dtype: torch.dtype, rows: int, cols: int, reuses_column_operand=False):
    """(pipeline, groups, threads, rows_per_group) of a row kernel."""
    if cols <= SIMD_ROWS_MAX_COLS:
        pipeline = launcher.pipeline(kernel_name(base, "simd_rows", dtype))
        max_simd = min(SIMD_ROWS_PER_GROUP, pipeline.max_threads // SIMD_WIDTH)
        per_walker = _rows_per_walker(rows, reuses_column_operand, max_simd, launcher.gpu_cores())
        n_simd = min(ceil_div(rows, per_walker), max_simd)
        threads = n_simd * SIMD_WIDTH
        rows_per_group = n_simd * per_walker
    else:
        needed = round_up(ceil_div(cols, READS_PER_THREAD), SIMD_WIDTH)
        pipeline = launcher.pipeline(kernel_name(base, "single_row", dtype))
        if needed <= pipeline.max_threads:
            threads = needed
        else:
            pipeline = launcher.pipeline(kernel_name(base, "looped", dtype))
            threads = min(1024, round_down(pipeline.max_threads, SIMD_WIDTH))
        rows_per_group = _rows_per_walker(rows, reuses_column_operand, 1, launcher.gpu_cores())
    rows_per_group = min(rows_per_group, rows)
    return pipeline, (ceil_div(rows, rows_per_group), 1, 1), (threads, 1, 1), rows_per_group


def _row_params(rows, cols, x_row_stride, dy_row_stride, rows_per_group, eps=0.0, offset=0.0, residual_row_stride=0):
    for v, what in ((rows, "rows"), (cols, "row length"), (x_row_stride, "row stride"), (dy_row_stride, "row stride")):
        check_u32(v, what)
    check_u32(residual_row_stride, "row stride")
    return params(
        "RowParams",
        rows=rows,
        cols=cols,
        x_row_stride=x_row_stride,
        dy_row_stride=dy_row_stride,
        rows_per_group=rows_per_group,
        eps=eps,
        weight_offset=offset,
        residual_row_stride=residual_row_stride,
    )


def softmax_forward(x: torch.Tensor) -> torch.Tensor:
    """y = softmax(x) over rows. One dispatch."""
    y = _output(x.shape, x.dtype, x)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    rows, cols = x2.shape
    launcher = Launcher("softmax", x.device)
    pipeline, groups, threads, rpg = plan_rows(launcher, "softmax_forward", x.dtype, rows, cols)
    p = _row_params(rows, cols, _row_stride(x2), 0, rpg)
    launcher.encode(Dispatch(pipeline, (x2, y, p), groups, threads))
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)) over rows; y and dx contiguous, dy with its own row stride. One dispatch."""
    dx = _output(y.shape, y.dtype, y)
    if y.numel() == 0:
        return dx
    y2, dy2 = _rows(y.contiguous()), _rows(dy)
    rows, cols = y2.shape
    launcher = Launcher("softmax", y.device)
    pipeline, groups, threads, rpg = plan_rows(launcher, "softmax_backward", y.dtype, rows, cols)
    p = _row_params(rows, cols, cols, _row_stride(dy2), rpg)
    launcher.encode(Dispatch(pipeline, (y2, dy2, dx, p), groups, threads))
    return dx


# The backward dx kernel's threadgroups, each writing one float32 row of dw partial sums: GROUPS_PER_CORE per GPU
# core, and at most one per ROWS_PER_DW_PARTIAL_ROW rows, so writing and re-reading the partial rows (8 B per column
# each) plus the weight re-read per group stay small next to x, dy and dx (<= 10 % of the minimum traffic at 4096
# rows and more, <= 25 % from 1024 rows, with the stand-in core count and with 40 cores).
ROWS_PER_DW_PARTIAL_ROW = 16


def rms_norm_backward_groups(rows: int, gpu_cores: int) -> int:
    """Threadgroups of the backward dx kernel, and so rows of the float32 dw partial-sum buffer."""
    return min(max(rows // ROWS_PER_DW_PARTIAL_ROW, 1), GROUPS_PER_CORE * max(gpu_cores, 1))


def _rms_norm_forward(x2, weight, y, rstd, eps, offset, residual2=None, h=None) -> None:
    """y = x * rstd * (w + offset), rstd (float32 per row) saved for backward. One dispatch. With a residual
    (add_rms_norm; needs a weight) the row is h = x + residual (rounded to the dtype), written to h (contiguous) and
    normalised in the same pass."""
    rows, cols = x2.shape
    add = residual2 is not None
    if add and weight is None:
        raise ValueError("rms_norm_add_forward needs a weight")
    base = "rms_norm_add_forward" if add else "rms_norm_forward" if weight is not None else "rms_norm_forward_noweight"
    launcher = Launcher("rms_norm", x2.device)
    # The weight is kept in registers and read once per row walker (plan_rows: >= 20 rows each).
    pipeline, groups, threads, rpg = plan_rows(launcher, base, x2.dtype, rows, cols, reuses_column_operand=True)
    p = _row_params(rows, cols, _row_stride(x2), 0, rpg, eps, offset, _row_stride(residual2) if add else 0)
    # Metal wants every index bound: x stands in for the absent weight, residual and h (never read or written).
    args = (x2, weight if weight is not None else x2, y, rstd, p, residual2 if add else x2, h if add else x2)
    launcher.encode(Dispatch(pipeline, args, groups, threads))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0):
    if x.shape[-1] == 0:  # no kernel work: empty y, rstd = rsqrt(eps) as the reference defines it
        return reference.rms_norm_forward(x, weight, eps, offset)
    y = _output(x.shape, x.dtype, x)
    rstd = _output(x.shape[:-1], torch.float32, x)
    if x.numel() == 0:
        return y, rstd
    w = weight.contiguous() if weight is not None else None
    _rms_norm_forward(_rows(x), w, y, rstd, float(eps), float(offset))
    return y, rstd


def rms_norm_add_forward(x, residual, weight, eps: float, offset: float):
    """(y, h, rstd) with h = x + residual (contiguous) normalised in one pass."""
    if x.shape[-1] == 0 or x.numel() == 0:
        return reference.rms_norm_add_forward(x, residual, weight, eps, offset)
    y, h = _output(x.shape, x.dtype, x), _output(x.shape, x.dtype, x)
    rstd = _output(x.shape[:-1], torch.float32, x)
    _rms_norm_forward(_rows(x), weight.contiguous(), y, rstd, float(eps), float(offset), _rows(residual), h)
    return y, h, rstd


def _rms_norm_backward(dy2, x2, weight, rstd, dx, dw, offset, d_residual2=None) -> None:
    """dx (contiguous) and, if dw is given, dw: the dx kernel walks rows group, group + groups, ... keeping each
    thread's dw columns in registers and writes one float32 partial row per group; rms_norm_backward_dw_reduce then
    sums the partial rows into dw. Two dispatches with dw, one without. With d_residual (add_rms_norm), dx also gets
    h's incoming gradient."""
    rows, cols = x2.shape
    wants_dx, wants_dw, add = dx is not None, dw is not None, d_residual2 is not None
    if add and not wants_dx:
        raise ValueError("rms_norm_add_backward computes dx")
    launcher = Launcher("rms_norm", x2.device)
    groups = rms_norm_backward_groups(rows, launcher.gpu_cores())
    for v, what in (
        (rows, "rows"),
        (cols, "row length"),
        (_row_stride(x2), "row stride"),
        (_row_stride(dy2), "row stride"),
    ):
        check_u32(v, what)
    d_residual_stride = _row_stride(d_residual2) if add else 0
    check_u32(d_residual_stride, "row stride")
    p = params(
        "RmsNormBackwardParams",
        rows=rows,
        cols=cols,
        x_row_stride=_row_stride(x2),
        dy_row_stride=_row_stride(dy2),
        groups=groups,
        has_weight=int(weight is not None),
        weight_offset=offset,
        d_residual_row_stride=d_residual_stride,
    )
    mode = ("dx_dw" if wants_dw else "dx") if wants_dx else "dw"
    kernel = ("rms_norm_add_backward_" if add else "rms_norm_backward_") + mode
    # Both pipelines are selected before anything is encoded.
    needed = round_up(ceil_div(cols, READS_PER_THREAD), SIMD_WIDTH)
    rows_pipeline = launcher.pipeline(kernel_name(kernel, "single_row", x2.dtype))
    threads = needed
    if needed > rows_pipeline.max_threads:
        rows_pipeline = launcher.pipeline(kernel_name(kernel, "looped", x2.dtype))
        threads = min(1024, round_down(rows_pipeline.max_threads, SIMD_WIDTH))
    partial = _output((groups, cols), torch.float32, x2) if wants_dw else None
    dispatches = [
        Dispatch(
            rows_pipeline,
            (
                dy2,
                x2,
                weight if weight is not None else x2,
                rstd,
                dx if wants_dx else x2,
                partial if wants_dw else x2,
                p,
                d_residual2 if add else dy2,  # unread without add
            ),
            (groups, 1, 1),
            (threads, 1, 1),
        )
    ]
    if wants_dw:
        reduce_pipeline = launcher.pipeline(kernel_name("rms_norm_backward_dw_reduce", "columns", x2.dtype))
        # 32 columns x (threads / 32) slices of partial rows per threadgroup (see the kernel).
        reduce_threads = min(256, round_down(reduce_pipeline.max_threads, SIMD_WIDTH))
        columns = constant("kDwReduceColumns")
        dispatches.append(
            Dispatch(reduce_pipeline, (partial, dw, p), (ceil_div(cols, columns), 1, 1), (reduce_threads, 1, 1))
        )
    launcher.encode(*dispatches)


def rms_norm_backward(dy, x, weight, rstd, needs_dx: bool, needs_dw: bool, offset: float = 0.0):
    cols = x.shape[-1]
    needs_dw = needs_dw and weight is not None
    dx = _output(x.shape, x.dtype, x) if needs_dx else None
    if x.numel() == 0 or not (needs_dx or needs_dw):
        return dx, (torch.zeros(cols, dtype=x.dtype, device=x.device) if needs_dw else None)
    dw = _output((cols,), x.dtype, x) if needs_dw else None  # not zero-filled: the reduce writes every column
    w = weight.contiguous() if weight is not None else None
    _rms_norm_backward(_rows(dy), _rows(x), w, rstd.contiguous(), dx, dw, float(offset))
    return dx, dw


def rms_norm_add_backward(dy, dh, h, weight, rstd, needs_dw: bool, offset: float):
    """(dx, dw): dx = RMSNorm's dx from dy plus dh (the gradient of both x and the residual)."""
    if h.numel() == 0:
        return reference.rms_norm_add_backward(dy, dh, h, weight, rstd, needs_dw, offset)
    dx = _output(h.shape, h.dtype, h)
    dw = _output((h.shape[-1],), h.dtype, h) if needs_dw else None
    h2 = h.contiguous().reshape(-1, h.shape[-1])
    _rms_norm_backward(_rows(dy), h2, weight.contiguous(), rstd.contiguous(), dx, dw, float(offset), _rows(dh))
    return dx, dw


# ---- cross-entropy -----------------------------------------------------------------------------------------------
def cross_entropy_rows(logits, target, ignore_index: int, label_smoothing: float, softcap: float, row_scale, in_place):
    """shaders/cross_entropy.metal: the loss of each row (float32) and, with row_scale (float32 per row),
    row_scale · d(loss)/d(logits) into a contiguous gradient (over the logits themselves when in_place). One
    threadgroup per row, one dispatch."""
    rows, vocab = logits.shape
    loss = _output((rows,), torch.float32, logits)
    want_grad = row_scale is not None
    if rows == 0:
        return loss, (logits if in_place else torch.empty_like(logits)) if want_grad else None
    if vocab == 0:
        raise ValueError("cross-entropy over an empty vocabulary")
    if not -(2**31) <= ignore_index < 2**31:
        raise ValueError("ignore_index must fit in 32 bits for the kernels")
    if want_grad and in_place and not logits.is_contiguous():
        raise ValueError("in_place needs contiguous logits")
    logits2 = _rows(logits)
    for v, what in ((rows, "rows"), (vocab, "vocabulary size"), (_row_stride(logits2), "row stride")):
        check_u32(v, what)
    launcher = Launcher("cross_entropy", logits.device)
    pipeline = launcher.pipeline(kernel_name("cross_entropy_rows", "looped", logits.dtype))
    # Long rows: as many threads as the pipeline allows, but no more than the row has 32-element chunks.
    threads = min(1024, round_down(pipeline.max_threads, SIMD_WIDTH), round_up(vocab, SIMD_WIDTH))
    grad = (logits if in_place else _output(logits.shape, logits.dtype, logits)) if want_grad else None
    p = params(
        "CrossEntropyParams",
        rows=rows,
        vocab=vocab,
        logits_row_stride=_row_stride(logits2),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        softcap=softcap,
        want_grad=int(want_grad),
    )
    target32 = target.to(torch.int32).contiguous()
    scale = row_scale.to(torch.float32).contiguous() if want_grad else None
    # Without a gradient, unread/unwritten stand-ins keep every index bound (Metal wants them all).
    args = (logits2, target32, scale if want_grad else loss, loss, grad if want_grad else logits2, p)
    launcher.encode(Dispatch(pipeline, args, (rows, 1, 1), (threads, 1, 1)))
    return loss, grad


# ---- gated activations -------------------------------------------------------------------------------------------
# Threads per threadgroup of the elementwise GLU kernels: no reduction or threadgroup memory ties a group's size to
# the row, so this only sets how many groups the GPU's cores share (256 · 4 = 1024 elements per group: an
# 8192 x 11008 MLP activation is ~88 000 groups; the tail group of a row idles the rest of its threads).
GLU_THREADS_PER_GROUP = 256
GLU_VARIANTS = {constant("kGluSilu"): "silu", constant("kGluGeluTanh"): "gelu_tanh"}


def _plan_glu(launcher: Launcher, base: str, activation: int, dtype, rows: int, cols: int, row_strides: list[int]):
    """rows x cols elements, each operand with its own row stride (elements). Operands laid out as one contiguous
    block (every row stride == cols) are launched as a single flat row, so short rows waste no threads."""
    if activation not in GLU_VARIANTS:
        raise ValueError(f"unknown GLU activation code {activation}")
    flat = rows > 1 and rows * cols <= U32_MAX and all(s == cols for s in row_strides)
    if flat:
        cols, rows = cols * rows, 1
    check_u32(rows, "rows"), check_u32(cols, "row length")
    for s in row_strides:
        check_u32(s, "row stride")
    pipeline = launcher.pipeline(kernel_name(base, GLU_VARIANTS[activation], dtype))
    per_thread = constant("kGluElementsPerThread")
    needed = round_up(ceil_div(cols, per_thread), SIMD_WIDTH)
    threads = min(needed, GLU_THREADS_PER_GROUP, round_down(pipeline.max_threads, SIMD_WIDTH))
    groups_per_row = ceil_div(cols, threads * per_thread)
    check_u32(rows * groups_per_row, "threadgroups (rows x groups per row)")
    strides = [cols] * 3 if flat else [*row_strides, cols][:3]
    p = params(
        "GluParams",
        rows=rows,
        cols=cols,
        groups_per_row=groups_per_row,
        gate_row_stride=strides[0],
        up_row_stride=strides[1],
        dout_row_stride=strides[2],
    )
    return pipeline, (rows * groups_per_row, 1, 1), (threads, 1, 1), p


def glu_forward(gate: torch.Tensor, up: torch.Tensor, activation: int) -> torch.Tensor:
    """shaders/glu.metal: act(gate) · up (contiguous). One dispatch."""
    out = _output(gate.shape, gate.dtype, gate)
    if gate.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    launcher = Launcher("glu", gate.device)
    pipeline, groups, threads, p = _plan_glu(
        launcher, "glu_forward", activation, gate.dtype, *g2.shape, [_row_stride(g2), _row_stride(u2)]
    )
    launcher.encode(Dispatch(pipeline, (g2, u2, out, p), groups, threads))
    return out


def glu_backward(dout, gate, up, activation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/glu.metal: (dout · up · act'(gate), dout · act(gate)), both contiguous. One dispatch."""
    dgate, dup = _output(gate.shape, gate.dtype, gate), _output(gate.shape, gate.dtype, gate)
    if gate.numel() == 0:
        return dgate, dup
    g2, u2, d2 = _rows(gate), _rows(up), _rows(dout)
    launcher = Launcher("glu", gate.device)
    strides = [_row_stride(g2), _row_stride(u2), _row_stride(d2)]
    pipeline, groups, threads, p = _plan_glu(launcher, "glu_backward", activation, gate.dtype, *g2.shape, strides)
    launcher.encode(Dispatch(pipeline, (g2, u2, d2, dgate, dup, p), groups, threads))
    return dgate, dup


# ---- rotary position embedding -----------------------------------------------------------------------------------
# Threads per threadgroup: one thread per (batch, position, slot), each walking every head; nothing is shared within a
# group, so the size only spreads the work (an 8 x 4096-token batch with head_dim 128 is 2 M threads).
ROPE_THREADS_PER_GROUP = 256


def rope_apply(q, k, cos, sin, interleaved: bool, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/rope.metal: q and k (batch, heads, seq, head_dim; any strides with head_dim contiguous) rotated by
    cos/sin (contiguous (1 or batch, seq, rotary_dim)) in one dispatch; outputs contiguous."""
    q_out, k_out = _output(q.shape, q.dtype, q), _output(k.shape, k.dtype, k)
    if q.numel() + k.numel() == 0:
        return q_out, k_out
    q, k = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    batch, q_heads, seq, head_dim = q.shape
    k_heads = k.shape[1]
    rotary_dim = cos.shape[-1]
    if batch == 0 or seq == 0 or head_dim == 0 or q_heads + k_heads == 0:
        return q_out, k_out
    if rotary_dim % 2 != 0 or rotary_dim > head_dim:
        raise ValueError("rotary_dim must be even and at most head_dim")
    slots = rotary_dim // 2 + (head_dim - rotary_dim)
    total = batch * seq * slots
    check_u32(total, "threads (batch x seq x slots)")
    strides = [*q.stride()[:3], *k.stride()[:3]]
    for v in (*strides, q_heads, k_heads, seq * head_dim, seq * rotary_dim):
        check_u32(v, "a stride or head count")
    launcher = Launcher("rope", q.device)
    pipeline = launcher.pipeline(kernel_name("rope", "apply", q.dtype))
    threads = min(
        round_up(min(total, ROPE_THREADS_PER_GROUP), SIMD_WIDTH),
        ROPE_THREADS_PER_GROUP,
        round_down(pipeline.max_threads, SIMD_WIDTH),
    )
    p = params(
        "RopeParams",
        batch=batch,
        seq=seq,
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        q_heads=q_heads,
        k_heads=k_heads,
        q_batch_stride=strides[0],
        q_head_stride=strides[1],
        q_seq_stride=strides[2],
        k_batch_stride=strides[3],
        k_head_stride=strides[4],
        k_seq_stride=strides[5],
        cos_batch_stride=0 if cos.shape[0] == 1 else seq * rotary_dim,
        interleaved=int(interleaved),
        backward=int(backward),
    )
    launcher.encode(
        Dispatch(pipeline, (q, k, cos, sin, q_out, k_out, p), (ceil_div(total, threads), 1, 1), (threads, 1, 1))
    )
    return q_out, k_out


# ---- LoRA ------------------------------------------------------------------------------------------------------
# Not yet on these launch plans: the LoRA kernels size their staging tiles with setThreadgroupMemoryLength, which
# compile_shader cannot do, so they still launch from C++ (csrc/include/tmf/launch/lora_linear.h): on a Mac through
# the compiled extension, in the harness through its per-op C entry points (backends/emulated.py).
def _lora_kernels(lead: torch.Tensor):
    if lead.device.type == "cpu":
        from torch_metal_fused.backends import emulated

        return emulated
    from torch_metal_fused import _backend

    if not _backend.has_metal_extension():
        raise KernelUnavailable(
            "lora_linear",
            "family",
            "the LoRA kernels still launch from the compiled extension (dynamic threadgroup memory), which is not "
            "installed; reinstall with `pip install -e .` and Xcode's command-line tools on the Mac",
        )
    return _backend._compiled_extension()


def lora_forward(x, weight, bias, lora_a, lora_b, scale: float, dropout_mask):
    return _lora_kernels(x).lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)


def lora_backward(dy, x, weight, lora_a, lora_b, h, scale: float, dropout_mask, needs):
    return _lora_kernels(dy).lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)


__all__ = [
    "KernelUnavailable",
    "cross_entropy_rows",
    "glu_backward",
    "glu_forward",
    "lora_backward",
    "lora_forward",
    "rms_norm_add_backward",
    "rms_norm_add_forward",
    "rms_norm_backward",
    "rms_norm_forward",
    "rope_apply",
    "softmax_backward",
    "softmax_forward",
]
