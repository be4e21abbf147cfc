"""Our Metal kernels' launch plans and host code: the one place that decides every Metal launch (which kernel and
variant, grid, threadgroup size, arguments) and allocates the outputs, for the "metal" backend (MPS tensors, through
torch.mps.compile_shader) and the "metal-emulated" backend (CPU tensors, through the harness's stand-in for it), so CI
executes exactly the Python a Mac executes. Every entry point takes and returns tensors as the other backends'.

Every launch selects all its pipelines and computes its plan before it encodes anything, so a KernelUnavailable leaves
nothing half-encoded and the caller serves the call with the reference (torch_metal_fused/ops/_dispatch.py)."""

from __future__ import annotations

import math

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
INDEX_MAX = 2**31 - 1


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def round_up(v: int, m: int) -> int:
    return ceil_div(v, m) * m


def round_down(v: int, m: int) -> int:
    return v // m * m


def check_index(family: str, value: int, what: str) -> None:
    """A size, stride or thread count the kernels take as a 32-bit uint. Their loops step 32-bit counters past the
    bound (`c += threads`, `(group + 1) * rows_per_group`), so the limit keeps 2^31 of headroom: past INDEX_MAX no
    launch plan fits the call, which the reference then serves (KernelUnavailable), as any call our kernels cannot
    take."""
    if value > INDEX_MAX:
        raise KernelUnavailable(family, "call", f"{what} ({value}) exceeds 2^31 - 1, the Metal kernels' index limit")


def kernel_name(base: str, variant: str, dtype: torch.dtype) -> str:
    return f"{base}_{variant}_{DTYPE_SUFFIX[dtype]}"


class Launcher:
    """The pipelines and GPU facts of the device a call runs on."""

    __slots__ = ("device", "family", "libraries")

    def __init__(self, family: str, device: torch.device) -> None:
        self.family = family
        self.device = device
        self.libraries: KernelLibraries = libraries_for(device)

    def pipeline(self, kernel: str) -> Pipeline:
        return self.libraries.pipeline(self.family, kernel)

    def gpu_cores(self) -> int:
        if self.device.type == "cpu":
            from torch_metal_fused.emulator import runner

            cores = runner.current_gpu_cores()
            return STAND_IN_GPU_CORES if cores is None else cores
        count = getattr(torch._C, "_mps_get_core_count", None)
        return int(count()) if count is not None else STAND_IN_GPU_CORES

    def plan(self, key: tuple, build):
        """build(), cached per key (the call's shapes, strides, dtype and scalars) where the libraries cache their
        pipelines (on a Mac): a warm call then only binds its tensors."""
        return self.libraries.plan((self.family, *key), build)

    def encode(self, *dispatches: Dispatch) -> None:
        self.libraries.encode(dispatches)


# Outputs on the CPU (the harness) are poisoned with NaN (bench/host_cost.py turns it off to time a Mac's allocation).
POISON_OUTPUTS = True


def _output(shape, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """A kernel output. In the harness poisoned with NaN: an element a kernel never writes fails the contract instead
    of silently keeping what the allocator held (on a Mac it holds garbage, and filling it would cost a pass)."""
    if POISON_OUTPUTS and like.is_cpu:
        return torch.full(tuple(shape), float("nan"), dtype=dtype)
    # Sizes unpacked as ints: parsing a torch.Size or tuple argument costs about a microsecond more host time.
    return torch.empty(*shape, dtype=dtype, device=like.device) if len(shape) else like.new_empty((), dtype=dtype)


def _output_like(t: torch.Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A kernel output of t's shape and dtype (empty_like: the cheapest allocation on the host), contiguous, or with
    torch.preserve_format t's strides where t is dense (a transposed (B, S, H, D) view stays one); poisoned as
    _output's."""
    out = torch.empty_like(t, memory_format=memory_format)
    if POISON_OUTPUTS and out.is_cpu:
        out.fill_(float("nan"))
    return out


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


def _row_params(
    family, rows, cols, x_row_stride, dy_row_stride, rows_per_group, eps=0.0, offset=0.0, residual_row_stride=0
):
    for v, what in ((rows, "rows"), (cols, "row length"), (x_row_stride, "row stride"), (dy_row_stride, "row stride")):
        check_index(family, v, what)
    check_index(family, residual_row_stride, "row stride")
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
    y = _output_like(x)
    if x.numel() == 0:
        return y
    x2 = _rows(x)
    rows, cols = x2.shape
    launcher = Launcher("softmax", x.device)

    def build():
        pipeline, groups, threads, rpg = plan_rows(launcher, "softmax_forward", x.dtype, rows, cols)
        return pipeline, groups, threads, _row_params("softmax", rows, cols, _row_stride(x2), 0, rpg)

    pipeline, groups, threads, p = launcher.plan(("forward", x.dtype, rows, cols, _row_stride(x2)), build)
    launcher.encode(Dispatch(pipeline, (x2, y, p), groups, threads))
    return y


def softmax_backward(y: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """dx = y * (dy - sum(dy * y)) over rows; y and dx contiguous, dy with its own row stride. One dispatch."""
    dx = _output_like(y)
    if y.numel() == 0:
        return dx
    y2, dy2 = _rows(y.contiguous()), _rows(dy)
    rows, cols = y2.shape
    launcher = Launcher("softmax", y.device)

    def build():
        pipeline, groups, threads, rpg = plan_rows(launcher, "softmax_backward", y.dtype, rows, cols)
        return pipeline, groups, threads, _row_params("softmax", rows, cols, cols, _row_stride(dy2), rpg)

    pipeline, groups, threads, p = launcher.plan(("backward", y.dtype, rows, cols, _row_stride(dy2)), build)
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
    residual_stride = _row_stride(residual2) if add else 0

    def build():
        # The weight is kept in registers and read once per row walker (plan_rows: >= 20 rows each).
        pipeline, groups, threads, rpg = plan_rows(launcher, base, x2.dtype, rows, cols, reuses_column_operand=True)
        return (
            pipeline,
            groups,
            threads,
            _row_params("rms_norm", rows, cols, _row_stride(x2), 0, rpg, eps, offset, residual_stride),
        )

    key = (base, x2.dtype, rows, cols, _row_stride(x2), residual_stride, eps, offset)
    pipeline, groups, threads, p = launcher.plan(key, build)
    # Metal wants every index bound: x stands in for the absent weight, residual and h (never read or written).
    args = (x2, weight if weight is not None else x2, y, rstd, p, residual2 if add else x2, h if add else x2)
    launcher.encode(Dispatch(pipeline, args, groups, threads))


def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 0.0):
    if x.shape[-1] == 0:  # no kernel work: empty y, rstd = rsqrt(eps) as the reference defines it
        return reference.rms_norm_forward(x, weight, eps, offset)
    y = _output_like(x)
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
    y, h = _output_like(x), _output_like(x)
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
    d_residual_stride = _row_stride(d_residual2) if add else 0
    mode = ("dx_dw" if wants_dw else "dx") if wants_dx else "dw"
    kernel = ("rms_norm_add_backward_" if add else "rms_norm_backward_") + mode

    def build():
        groups = rms_norm_backward_groups(rows, launcher.gpu_cores())
        for v, what in (
            (rows, "rows"),
            (cols, "row length"),
            (_row_stride(x2), "row stride"),
            (_row_stride(dy2), "row stride"),
            (d_residual_stride, "row stride"),
        ):
            check_index("rms_norm", v, what)
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
        # Both pipelines are selected before anything is encoded.
        needed = round_up(ceil_div(cols, READS_PER_THREAD), SIMD_WIDTH)
        rows_pipeline = launcher.pipeline(kernel_name(kernel, "single_row", x2.dtype))
        threads = needed
        if needed > rows_pipeline.max_threads:
            rows_pipeline = launcher.pipeline(kernel_name(kernel, "looped", x2.dtype))
            threads = min(1024, round_down(rows_pipeline.max_threads, SIMD_WIDTH))
        reduce = None
        if wants_dw:
            reduce_pipeline = launcher.pipeline(kernel_name("rms_norm_backward_dw_reduce", "columns", x2.dtype))
            # 32 columns x (threads / 32) slices of partial rows per threadgroup (see the kernel).
            reduce_threads = min(256, round_down(reduce_pipeline.max_threads, SIMD_WIDTH))
            columns = constant("kDwReduceColumns")
            reduce = (reduce_pipeline, (ceil_div(cols, columns), 1, 1), (reduce_threads, 1, 1))
        return groups, p, rows_pipeline, threads, reduce

    key = (kernel, x2.dtype, rows, cols, _row_stride(x2), _row_stride(dy2), d_residual_stride, weight is None, offset)
    groups, p, rows_pipeline, threads, reduce = launcher.plan(key, build)
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
        reduce_pipeline, reduce_groups, reduce_threads = reduce
        dispatches.append(Dispatch(reduce_pipeline, (partial, dw, p), reduce_groups, reduce_threads))
    launcher.encode(*dispatches)


def rms_norm_backward(dy, x, weight, rstd, needs_dx: bool, needs_dw: bool, offset: float = 0.0):
    cols = x.shape[-1]
    needs_dw = needs_dw and weight is not None
    dx = _output_like(x) if needs_dx else None
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
    dx = _output_like(h)
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
        raise KernelUnavailable("cross_entropy", "call", f"ignore_index {ignore_index} does not fit the kernels' int32")
    if want_grad and in_place and not logits.is_contiguous():
        raise ValueError("in_place needs contiguous logits")
    if target.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cross_entropy_rows: target must be int32 or int64, got {target.dtype}")
    logits2 = _rows(logits)
    # int64 targets are bound as they are (no conversion pass): the kernel reads each one's low 32-bit word.
    target_word_stride = (target.stride(0) if rows > 1 else 1) * (target.element_size() // 4)
    for v, what in (
        (rows, "rows"),
        (vocab, "vocabulary size"),
        (_row_stride(logits2), "row stride"),
        (target_word_stride, "target stride"),
    ):
        check_index("cross_entropy", v, what)
    launcher = Launcher("cross_entropy", logits.device)

    def build():
        pipeline = launcher.pipeline(kernel_name("cross_entropy_rows", "looped", logits.dtype))
        # Long rows: as many threads as the pipeline allows, but no more than the row has 32-element chunks.
        threads = min(1024, round_down(pipeline.max_threads, SIMD_WIDTH), round_up(vocab, SIMD_WIDTH))
        p = params(
            "CrossEntropyParams",
            rows=rows,
            vocab=vocab,
            logits_row_stride=_row_stride(logits2),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            softcap=softcap,
            want_grad=int(want_grad),
            target_word_stride=target_word_stride,
        )
        return pipeline, threads, p

    key = (logits.dtype, rows, vocab, _row_stride(logits2), target_word_stride, ignore_index, label_smoothing)
    key += (softcap, want_grad)
    pipeline, threads, p = launcher.plan(key, build)
    grad = (logits if in_place else _output_like(logits)) if want_grad else None
    scale = None
    if want_grad:
        scale = (row_scale if row_scale.dtype == torch.float32 else row_scale.to(torch.float32)).contiguous()
    # Without a gradient, unread/unwritten stand-ins keep every index bound (Metal wants them all).
    args = (logits2, target, scale if want_grad else loss, loss, grad if want_grad else logits2, p)
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
    flat = rows > 1 and rows * cols <= INDEX_MAX and all(s == cols for s in row_strides)
    if flat:
        cols, rows = cols * rows, 1
    for value, what in ((rows, "rows"), (cols, "row length"), *((s, "row stride") for s in row_strides)):
        check_index(launcher.family, value, what)
    pipeline = launcher.pipeline(kernel_name(base, GLU_VARIANTS[activation], dtype))
    per_thread = constant("kGluElementsPerThread")
    needed = round_up(ceil_div(cols, per_thread), SIMD_WIDTH)
    threads = min(needed, GLU_THREADS_PER_GROUP, round_down(pipeline.max_threads, SIMD_WIDTH))
    groups_per_row = ceil_div(cols, threads * per_thread)
    check_index(launcher.family, rows * groups_per_row, "threadgroups (rows x groups per row)")
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
    out = _output_like(gate)
    if gate.numel() == 0:
        return out
    g2, u2 = _rows(gate), _rows(up)
    launcher = Launcher("glu", gate.device)
    strides = [_row_stride(g2), _row_stride(u2)]
    pipeline, groups, threads, p = launcher.plan(
        ("forward", activation, gate.dtype, *g2.shape, *strides),
        lambda: _plan_glu(launcher, "glu_forward", activation, gate.dtype, *g2.shape, strides),
    )
    launcher.encode(Dispatch(pipeline, (g2, u2, out, p), groups, threads))
    return out


def glu_backward(dout, gate, up, activation: int, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/glu.metal: (dout · up · act'(gate), dout · act(gate)), both contiguous. One dispatch. `in_place`:
    written over gate and up (contiguous): each thread reads its elements before it writes them."""
    dgate, dup = (gate, up) if in_place else (_output_like(gate), _output_like(gate))
    if gate.numel() == 0:
        return dgate, dup
    g2, u2, d2 = _rows(gate), _rows(up), _rows(dout)
    launcher = Launcher("glu", gate.device)
    strides = [_row_stride(g2), _row_stride(u2), _row_stride(d2)]
    pipeline, groups, threads, p = launcher.plan(
        ("backward", activation, gate.dtype, *g2.shape, *strides),
        lambda: _plan_glu(launcher, "glu_backward", activation, gate.dtype, *g2.shape, strides),
    )
    launcher.encode(Dispatch(pipeline, (g2, u2, d2, dgate, dup, p), groups, threads))
    return dgate, dup


# ---- rotary position embedding -----------------------------------------------------------------------------------
# Threads per threadgroup: one thread per (batch, position, slot), each walking every head; nothing is shared within a
# group, so the size only spreads the work (an 8 x 4096-token batch with head_dim 128 is 2 M threads).
ROPE_THREADS_PER_GROUP = 256


def rope_apply(q, k, cos, sin, interleaved: bool, backward: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """shaders/rope.metal: q and k (batch, heads, seq, head_dim; any strides with head_dim contiguous) rotated by
    cos/sin (contiguous (1 or batch, seq, rotary_dim)) in one dispatch; outputs contiguous."""
    q_out, k_out = _output_like(q), _output_like(k)
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
    strides = [*q.stride()[:3], *k.stride()[:3]]
    launcher = Launcher("rope", q.device)

    def build():
        slots = rotary_dim // 2 + (head_dim - rotary_dim)
        total = batch * seq * slots
        check_index("rope", total, "threads (batch x seq x slots)")
        for v in (*strides, q_heads, k_heads, seq * head_dim, seq * rotary_dim):
            check_index("rope", v, "a stride or head count")
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
        return pipeline, (ceil_div(total, threads), 1, 1), (threads, 1, 1), p

    key = (q.dtype, *q.shape, k_heads, rotary_dim, *strides, cos.shape[0], interleaved, backward)
    pipeline, groups, threads, p = launcher.plan(key, build)
    launcher.encode(Dispatch(pipeline, (q, k, cos, sin, q_out, k_out, p), groups, threads))
    return q_out, k_out


# ---- LoRA ------------------------------------------------------------------------------------------------------
# The big GEMMs (x·Wᵀ, dy·W, dyᵀ·x, dyᵀ·h, dhᵀ·x) run on the platform's native matmul; shaders/lora_linear.metal does
# the rank-r work: a reduce dispatch (h = in·Fᵀ) and, unless only dh is wanted, an expand dispatch per rank block of
# 64 (out += s·h·S).
LORA_MAX_RANK = constant("kLoraMaxRank")
LORA_RANKS_PER_THREAD = constant("kLoraRanksPerThread")
# The merged-weight route: W' = W + s·B·A (a K = r product: one read and one write of W), then y = x·W'ᵀ and
# h = x·Aᵀ on the native matmul, and dx = dy·W' in backward (W' recomputed, not saved). It replaces the low-rank
# kernels' read-modify-write of y (tokens x out) with a pass over W (out x in): chosen when tokens > in_features (fewer
# bytes), never for few tokens (launch-bound either way), never with dropout (the adapter then sees another input than
# the base weight). W' is rounded to the weight's dtype once. The CUDA backend uses the same rule
# (tmf::launch::lora_use_merged_weight).
LORA_MERGED_MIN_TOKENS = 1024
# Threadgroup memory a kernel may use: 64 bytes per thread (16 KiB per 256 threads, so at least GROUPS_PER_CORE
# groups of 256 threads fit a GPU core: issue #13's budget), and never more than Apple GPUs' 32 KiB per group.
THREADGROUP_BYTES_PER_THREAD = 64
MAX_THREADGROUP_BYTES = 32 * 1024
# The kernels' static threadgroup arrays, one variant per size (floats): the largest within the budget is taken.
# 1536 serves three rank blocks at 32 token rows (8 staged columns x a rank of up to 192).
LORA_THREADGROUP_FLOATS = (512, 1024, 1536, 2048, 4096, 8192)
LORA_MAX_THREADS = 1024  # threads per threadgroup: up to 1024, whole SIMD-groups, within the pipeline's limit
# Reduce tiles hold this many token rows per rank entry: F (A or Bᵀ: rank x reduce_dim) is read once per tile, so its
# re-reads cost at most 1/16 of the input's bytes; at least LORA_REDUCE_MIN_TOKENS rows (small ranks: F re-read at
# most rank/256 of the input, and groups of >= 256 threads).
LORA_REDUCE_TOKENS_PER_RANK = 16
LORA_REDUCE_MIN_TOKENS = 256
# Expand groups walk this many token rows per rank entry: S (out_dim x rank) is read once per group, at most
# rank / (2 · 32 · rank) = 1/64 of out's read-and-write; at least LORA_REDUCE_MIN_TOKENS rows.
LORA_EXPAND_TOKENS_PER_RANK = 32
SIMDGROUP_MATRIX = 8  # products run on 8 x 8 simdgroup matrices: staged tiles come in whole 8-row/column steps
LORA_REDUCE_TILE_COLUMNS = 64  # reduced columns of F staged per step at most (64 x 64 floats: 16 KiB at rank 64)


def lora_use_merged_weight(tokens: int, in_features: int, has_dropout: bool) -> bool:
    return not has_dropout and tokens >= LORA_MERGED_MIN_TOKENS and tokens > in_features


def lora_threadgroup_floats(threads: int, max_floats: int = LORA_THREADGROUP_FLOATS[-1]) -> int:
    """The largest static threadgroup array (floats) within the budget of `threads` threads (and max_floats)."""
    budget = min(MAX_THREADGROUP_BYTES, threads * THREADGROUP_BYTES_PER_THREAD) // 4
    return max(c for c in LORA_THREADGROUP_FLOATS if c <= min(budget, max_floats) or c == LORA_THREADGROUP_FLOATS[0])


def _lora_threads_cap(max_threads: int) -> int:
    return min(LORA_MAX_THREADS, round_down(max_threads, SIMD_WIDTH))


def _lora_reduce_plan(max_threads, max_floats, tokens, reduce_dim, rank, in_row_stride, scale, has_mask):
    """The reduce dispatch: tiles of bm token rows (a multiple of 32: each SIMD-group shares one rank block, so its
    reads of staged F are broadcasts), bm · rank blocks threads, bm = 16 · rank (>= 256) within the threads cap and the
    tokens; the staging width fills the threadgroup array ([width][rank] F floats). Needs 32 threads per rank block (a
    SIMD-group of tokens each): a pipeline capped lower than that gets no plan, and the call is served by the
    reference. Returns (params, groups, threads, threadgroup floats)."""
    for value, what in ((tokens, "tokens"), (reduce_dim, "reduce_dim"), (in_row_stride, "row stride")):
        check_index("lora_linear", value, what)
    if not 1 <= rank <= LORA_MAX_RANK:
        raise ValueError(f"LoRA rank must be in [1, {LORA_MAX_RANK}] for the kernels")
    blocks, cap = ceil_div(rank, LORA_RANKS_PER_THREAD), _lora_threads_cap(max_threads)
    if cap < blocks * SIMD_WIDTH:
        raise KernelUnavailable(
            "lora_linear",
            "call",
            f"LoRA rank {rank} needs {blocks * SIMD_WIDTH} threads per threadgroup (32 token rows per rank block of "
            f"{LORA_RANKS_PER_THREAD}); this device allows {cap} for the LoRA kernels",
        )
    wanted = max(LORA_REDUCE_MIN_TOKENS, LORA_REDUCE_TOKENS_PER_RANK * rank)
    bm = min(wanted, round_down(cap // blocks, SIMD_WIDTH), round_up(max(tokens, 1), SIMD_WIDTH))
    threads = bm * blocks
    floats = lora_threadgroup_floats(threads, max_floats)
    rank8 = round_up(rank, SIMDGROUP_MATRIX)
    # F's staged columns: whole 8-column steps, as many as the array holds up to LORA_REDUCE_TILE_COLUMNS (fewer
    # barriers per byte staged); at least one step (the smallest array for these threads holds 8 x rank8 floats).
    width = max(
        SIMDGROUP_MATRIX,
        min(
            LORA_REDUCE_TILE_COLUMNS,
            round_down(floats // rank8, SIMDGROUP_MATRIX),
            round_up(max(reduce_dim, 1), SIMDGROUP_MATRIX),
        ),
    )
    p = params(
        "LoraReduceParams",
        tokens=tokens,
        reduce_dim=reduce_dim,
        rank=rank,
        in_row_stride=in_row_stride,
        scale=scale,
        has_mask=int(has_mask),
        tokens_per_group=bm,
        reduce_tile=width,
    )
    return p, (ceil_div(tokens, bm), 1, 1), (threads, 1, 1), floats


def _lora_expand_plans(max_threads, max_floats, tokens, out_dim, rank, scale, has_mask):
    """The expand dispatches, one per rank block of 64: one thread per output column (up to 1024 per group, so h is
    read once per 1024 columns), 32 · block rank token rows per group (>= 256), h staged as many rows per step as the
    threadgroup array holds. Returns [(params, groups, threads, threadgroup floats)]."""
    for value, what in ((tokens, "tokens"), (out_dim, "out_dim")):
        check_index("lora_linear", value, what)
    columns = min(_lora_threads_cap(max_threads), round_up(max(out_dim, 1), SIMD_WIDTH))
    floats = lora_threadgroup_floats(columns, max_floats)
    plans = []
    for j0 in range(0, rank, LORA_RANKS_PER_THREAD):
        nr = min(LORA_RANKS_PER_THREAD, rank - j0)
        tokens_per_group = min(max(tokens, 1), max(LORA_REDUCE_MIN_TOKENS, LORA_EXPAND_TOKENS_PER_RANK * nr))
        nr8 = round_up(nr, SIMDGROUP_MATRIX)
        step = min(round_up(tokens_per_group, SIMDGROUP_MATRIX), round_down(floats // nr8, SIMDGROUP_MATRIX))
        p = params(
            "LoraExpandParams",
            tokens=tokens,
            out_dim=out_dim,
            rank=rank,
            rank_offset=j0,
            rank_count=nr,
            scale=scale,
            has_mask=int(has_mask),
            columns_per_group=columns,
            tokens_per_group=tokens_per_group,
            tokens_per_step=step,
        )
        plans.append((p, (ceil_div(out_dim, columns), ceil_div(tokens, tokens_per_group), 1), (columns, 1, 1), floats))
    return plans


def lora_variant(floats: int, dtype: torch.dtype, adapter_dtype: torch.dtype) -> str:
    """The variant of a LoRA kernel: its threadgroup array, and "_float_adapters" for float32 adapters (and h) on
    half/bfloat activations (PEFT's default), which the kernels widen in registers."""
    return f"tg{floats}" + ("" if adapter_dtype == dtype else "_float_adapters")


def _lora_pipeline(launcher: Launcher, base: str, dtype, adapter_dtype, plan):
    """The pipeline of the variant whose threadgroup array the plan sizes, and the plan: planned for the smallest
    variant's thread limit; replanned if the chosen variant allows fewer threads, or with the next smaller array if
    its pipeline cannot be built (a 32 KiB array right at the device's limit), so LoRA stays fused on the others."""
    smallest = LORA_THREADGROUP_FLOATS[0]
    max_threads = launcher.pipeline(kernel_name(base, lora_variant(smallest, dtype, adapter_dtype), dtype)).max_threads
    max_floats = LORA_THREADGROUP_FLOATS[-1]
    for _ in range(2 * len(LORA_THREADGROUP_FLOATS)):
        planned = plan(max_threads, max_floats)
        floats = max(f for *_, f in planned)
        try:
            pipeline = launcher.pipeline(kernel_name(base, lora_variant(floats, dtype, adapter_dtype), dtype))
        except KernelUnavailable:
            if floats == smallest:
                raise
            max_floats = max(f for f in LORA_THREADGROUP_FLOATS if f < floats)
            continue
        if all(pipeline.max_threads >= math.prod(t) for _, _, t, _ in planned):
            return pipeline, planned
        max_threads = pipeline.max_threads
    raise KernelUnavailable("lora_linear", "call", f"no {base} variant's thread limit fits its own plan")


def _lora_lowrank(
    in2, factor_reduce, factor_expand, mask, reduce_out, expand_out, reduce_dim, out_dim, rank, scale, forward: bool
) -> None:
    """Forward: h = dropout(x)·Aᵀ written (saved for backward), then y += scale · h·Bᵀ in place (y holds x·Wᵀ + bias).
    Backward: dh = scale · dy·B written, and, if dx is given, dx += (dh·A) · mask in place (dx holds dy·W). Every
    pipeline and plan is chosen before anything is encoded. A missing mask binds the input in its place (never read:
    has_mask is 0)."""
    tokens = in2.shape[0]
    adapter_dtype = factor_reduce.dtype
    launcher = Launcher("lora_linear", in2.device)
    reduce_base, expand_base = (
        ("lora_forward_h", "lora_forward_y") if forward else ("lora_backward_dh", "lora_backward_dx")
    )
    has_mask = mask is not None
    reduce_scale, expand_scale = (1.0, scale) if forward else (scale, 1.0)
    reduce_mask, expand_mask = (has_mask, False) if forward else (False, has_mask)
    wants_expand = expand_out is not None

    def build():
        reduce_pipeline, (reduce_plan,) = _lora_pipeline(
            launcher,
            reduce_base,
            in2.dtype,
            adapter_dtype,
            lambda t, f: [
                _lora_reduce_plan(t, f, tokens, reduce_dim, rank, _row_stride(in2), reduce_scale, reduce_mask)
            ],
        )
        expand_pipeline, expands = None, []
        if wants_expand:
            expand_pipeline, expands = _lora_pipeline(
                launcher,
                expand_base,
                in2.dtype,
                adapter_dtype,
                lambda t, f: _lora_expand_plans(t, f, tokens, out_dim, rank, expand_scale, expand_mask),
            )
        return reduce_pipeline, reduce_plan, expand_pipeline, expands

    key = (
        forward,
        in2.dtype,
        adapter_dtype,
        tokens,
        reduce_dim,
        out_dim,
        rank,
        _row_stride(in2),
        scale,
        has_mask,
        wants_expand,
    )
    reduce_pipeline, reduce_plan, expand_pipeline, expands = launcher.plan(key, build)
    p, groups, threads, _ = reduce_plan
    dispatches = [
        Dispatch(reduce_pipeline, (in2, factor_reduce, mask if reduce_mask else in2, reduce_out, p), groups, threads)
    ]
    for p, groups, threads, _ in expands:
        args = (reduce_out, factor_expand, mask if expand_mask else reduce_out, expand_out, p)
        dispatches.append(Dispatch(expand_pipeline, args, groups, threads))
    launcher.encode(*dispatches)


# The native GEMMs in the harness run float16 in float32 and round once to float16: torch's CPU float16 GEMM is a slow
# fallback (torch 2.13.0: 56 s for 512x4096 @ 4096x4096, against 0.06 s in bfloat16), and a GPU's float16 GEMM
# accumulates in float32 too. On MPS the native matmul takes them as they are.
def _wide(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.float() if t is not None and t.dtype == torch.float16 and t.device.type == "cpu" else t


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (_wide(a) @ _wide(b)).to(a.dtype)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(_wide(x), _wide(weight), _wide(bias)).to(x.dtype)


def _merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """W' = W + s·B·A, rounded once to W's dtype (as the native addmm gives it)."""
    return torch.addmm(_wide(weight), _wide(lora_b), _wide(lora_a), alpha=scale).to(weight.dtype)


# Float32 adapters on half/bfloat activations: the two products that reduce over tokens (dA = dhᵀ·x, dB = dyᵀ·h) mix
# a float32 rank-r operand with the activations, which the native matmul does not take. They widen the activations
# a slice of tokens at a time, so no float32 copy of a whole activation exists (backward only, nothing saved).
WIDENED_SLICE_ELEMENTS = 1 << 24


def _adapter_mm(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """a·b in `dtype` (the adapters'): the native GEMM when both are in it, else float32 over token slices."""
    if a.dtype == b.dtype == dtype:
        return _mm(a, b)
    rows_per_token = a.shape[0] if a.dtype != dtype else b.shape[1]  # the activation operand's extent
    step = max(1, WIDENED_SLICE_ELEMENTS // max(1, rows_per_token))
    out = torch.zeros(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    for k0 in range(0, a.shape[1], step):
        out.addmm_(a[:, k0 : k0 + step].to(dtype), b[k0 : k0 + step].to(dtype))
    return out


def lora_forward(x, weight, bias, lora_a, lora_b, scale: float, dropout_mask):
    """(y, h): y = x·Wᵀ + bias + scale · dropout(x)·Aᵀ·Bᵀ, h = dropout(x)·Aᵀ saved for backward (in the adapters'
    dtype). Float32 adapters on half/bfloat x (PEFT's default) take the low-rank kernels' float_adapters variants:
    y = x·Wᵀ + bias rounded, then the adapter term added in float32 and rounded once, as PEFT's forward does."""
    tokens, in_features = x.shape
    rank = lora_a.shape[0]
    mixed = lora_a.dtype != x.dtype
    if rank > LORA_MAX_RANK:  # the kernels' tiles take rank <= kLoraMaxRank
        return reference.lora_forward(x, weight, bias, lora_a, lora_b, scale, dropout_mask)
    if not mixed and lora_use_merged_weight(tokens, in_features, dropout_mask is not None):
        merged = _merged_weight(weight, lora_a, lora_b, scale)  # W + s·B·A on the native matmul
        return _linear(x, merged, bias), _mm(x, lora_a.t())
    y = _linear(x, weight, bias).contiguous()  # the native GEMM; the expand adds the adapter in place
    h = _output((tokens, rank), lora_a.dtype, x)
    if tokens == 0:
        return y, h
    mask = dropout_mask.contiguous() if dropout_mask is not None else None
    _lora_lowrank(
        _rows(x),
        lora_a.contiguous(),
        lora_b.contiguous(),
        mask,
        h,
        y,
        in_features,
        weight.shape[0],
        rank,
        float(scale),
        forward=True,
    )
    return y, h


def lora_backward(dy, x, weight, lora_a, lora_b, h, scale: float, dropout_mask, needs):
    """(dx, dW, dbias, dA, dB) for the gradients `needs` asks for; dA and dB in the adapters' dtype."""
    needs_dx, needs_dw, needs_db, needs_da, needs_dlb = needs
    rank = lora_a.shape[0]
    tokens = x.shape[0]
    adapter_dtype = lora_a.dtype
    if rank > LORA_MAX_RANK:
        return reference.lora_backward(dy, x, weight, lora_a, lora_b, h, scale, dropout_mask, needs)
    dy2 = _rows(dy)
    dx = dw = dbias = da = dlb = None
    if adapter_dtype == x.dtype and lora_use_merged_weight(tokens, x.shape[1], dropout_mask is not None):
        if needs_dx:
            dx = _mm(dy2, _merged_weight(weight, lora_a, lora_b, scale))  # dy·W' = dy·W + dh·A
        if needs_da:
            da = _mm((_mm(dy2, lora_b) * scale).t(), x)
    elif needs_dx or needs_da:
        if needs_dx:
            dx = _mm(dy2, weight).contiguous()  # native GEMM; the expand adds (dh·A)·mask in place
        dh = _output((tokens, rank), adapter_dtype, x)
        if tokens:
            mask = dropout_mask.contiguous() if dropout_mask is not None else None
            _lora_lowrank(
                dy2,
                lora_b.contiguous(),
                lora_a.contiguous(),
                mask,
                dh,
                dx,
                weight.shape[0],
                x.shape[1],
                rank,
                float(scale),
                forward=False,
            )
        if needs_da:
            x_lora = x if dropout_mask is None else x * dropout_mask
            da = _adapter_mm(dh.t(), x_lora, adapter_dtype)
    if needs_dlb:
        dlb = _adapter_mm(dy2.t(), h, adapter_dtype) * scale
    if needs_dw:
        dw = _mm(dy2.t(), x)
    if needs_db:
        dbias = dy2.sum(0)
    return dx, dw, dbias, da, dlb


# ---- attention ---------------------------------------------------------------------------------------------------
# shaders/attention.metal: one forward dispatch; backward a delta pass, then the dQ and the dK/dV dispatches. A
# threadgroup takes 8 rows per SIMD-group, up to ATTENTION_SIMD_GROUPS of them: query rows (forward, dQ) or key rows
# (dK/dV). Its two staged tiles take 16 KiB, 64 bytes per thread at 256 threads (the budget of the LoRA kernels); K
# and V are read once per threadgroup of query rows (forward, dQ), q and dout once per threadgroup of key rows and
# query head (dK/dV). Head dims outside ATTENTION_HEAD_DIMS are served by the reference.
ATTENTION_HEAD_DIMS = (32, 64, 80, 96, 128, 256)
ATTENTION_SIMD_GROUPS = 8
ATTENTION_TILE_FLOATS = constant("kAttentionTileFloats")
ATTENTION_MAX_BLOCK_ROWS = constant("kAttentionMaxBlockRows")
DELTA_ROWS_PER_GROUP = 8  # the delta pass: one SIMD-group per row


def attention_block_rows(head_dim: int) -> int:
    """Rows of K and V (forward, dQ) or of q and dout (dK/dV) staged per block, as the shader computes them."""
    return min(ATTENTION_MAX_BLOCK_ROWS, ATTENTION_TILE_FLOATS // head_dim // SIMDGROUP_MATRIX * SIMDGROUP_MATRIX)


def _bhs_strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]


def _attention_params(shapes, strides: dict, causal: bool, window: int, scale: float, softcap: float, rows: int):
    batch, q_heads, kv_heads, q_len, kv_len, head_dim = shapes
    fields = {"batch": batch, "q_heads": q_heads, "kv_heads": kv_heads, "q_len": q_len, "kv_len": kv_len}
    fields["head_dim"] = head_dim
    for name in ("q", "k", "v", "o", "do", "dq", "dk", "dv", "mask"):
        for axis, value in zip(("batch", "head", "row"), strides.get(name, (0, 0, 0))):
            check_index("attention", value, f"{name}'s {axis} stride")
            fields[f"{name}_{axis}_stride"] = value
    for value, what in ((batch * q_heads * q_len, "batch x heads x q_len"), (kv_len, "kv_len")):
        check_index("attention", value, what)
    return params(
        "AttentionParams",
        **fields,
        has_mask=int("mask" in strides),
        causal=int(causal),
        window=min(window, kv_len),  # a window of kv_len keys or more hides none: the same call, within 32 bits
        scale=scale,
        softcap=softcap,
        rows_per_group=rows,
    )


def _attention_variant(head_dim: int) -> str:
    if head_dim not in ATTENTION_HEAD_DIMS:
        raise KernelUnavailable(
            "attention", "call", f"head_dim {head_dim} has no kernel (head dims {ATTENTION_HEAD_DIMS} do)"
        )
    return f"d{head_dim}"


def _row_groups(pipeline: Pipeline) -> tuple[int, int]:
    """(rows per threadgroup, threads per threadgroup): 8 rows per SIMD-group, ATTENTION_SIMD_GROUPS of them (fewer
    only where the pipeline allows fewer threads): the 16 KiB of staged tiles is then 64 bytes per thread, the
    occupancy budget, also for short sequences (whose idle SIMD-groups still stage)."""
    simd_groups = min(ATTENTION_SIMD_GROUPS, pipeline.max_threads // SIMD_WIDTH)
    return simd_groups * SIMDGROUP_MATRIX, simd_groups * SIMD_WIDTH


def attention_forward(q, k, v, bias, causal: bool, window: int, scale: float, softcap: float, heads_last: bool):
    """(out, lse) as reference.attention_forward: out (B, Hq, S, D), laid out (B, S, Hq, D) when heads_last; lse
    float32 (B, Hq, S)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q.numel() == 0 or kv_len == 0:
        return reference.attention_forward(q, k, v, bias, causal, window, scale, softcap, heads_last)
    shape = (batch, q_len, q_heads, head_dim) if heads_last else (batch, q_heads, q_len, head_dim)
    out = _output(shape, q.dtype, q)
    out = out.transpose(1, 2) if heads_last else out
    lse = _output((batch, q_heads, q_len), torch.float32, q)
    strides = {"q": _bhs_strides(q), "k": _bhs_strides(k), "v": _bhs_strides(v), "o": _bhs_strides(out)}
    if bias is not None:
        strides["mask"] = _bhs_strides(bias)
    shapes = (batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    launcher = Launcher("attention", q.device)

    def build():
        pipeline = launcher.pipeline(kernel_name("attention_forward", _attention_variant(head_dim), q.dtype))
        rows, threads = _row_groups(pipeline)
        p = _attention_params(shapes, strides, causal, window, scale, softcap, rows)
        return pipeline, p, (ceil_div(q_len, rows), q_heads, batch), (threads, 1, 1)

    key = ("forward", q.dtype, shapes, tuple(strides.items()), causal, window, scale, softcap)
    pipeline, p, groups, threads = launcher.plan(key, build)
    args = (q, k, v, q if bias is None else bias, out, lse, p)
    launcher.encode(Dispatch(pipeline, args, groups, threads))
    return out, lse


def attention_backward(dout, q, k, v, out, lse, bias, causal: bool, window: int, scale: float, softcap: float):
    """(dq, dk, dv) as reference.attention_backward, each laid out like its input where that is dense."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    if q.numel() == 0 or kv_len == 0:
        return reference.attention_backward(dout, q, k, v, out, lse, bias, causal, window, scale, softcap)
    dq, dk, dv = (_output_like(t, torch.preserve_format) for t in (q, k, v))
    delta = _output((batch, q_heads, q_len), torch.float32, q)
    strides = {name: _bhs_strides(t) for name, t in (("q", q), ("k", k), ("v", v), ("o", out), ("do", dout))}
    strides.update(dq=_bhs_strides(dq), dk=_bhs_strides(dk), dv=_bhs_strides(dv))
    if bias is not None:
        strides["mask"] = _bhs_strides(bias)
    shapes = (batch, q_heads, kv_heads, q_len, kv_len, head_dim)
    launcher = Launcher("attention", q.device)

    def build():
        variant = _attention_variant(head_dim)
        delta_pipeline = launcher.pipeline(kernel_name("attention_backward_delta", "rows", q.dtype))
        dq_pipeline = launcher.pipeline(kernel_name("attention_backward_dq", variant, q.dtype))
        dkdv_pipeline = launcher.pipeline(kernel_name("attention_backward_dkdv", variant, q.dtype))
        delta_rows = min(DELTA_ROWS_PER_GROUP, delta_pipeline.max_threads // SIMD_WIDTH)
        check_index("attention", batch * q_heads * q_len * SIMD_WIDTH, "delta pass threads (32 per query row)")
        plans = [
            (
                delta_pipeline,
                _attention_params(shapes, strides, causal, window, scale, softcap, delta_rows),
                (ceil_div(batch * q_heads * q_len, delta_rows), 1, 1),
                (delta_rows * SIMD_WIDTH, 1, 1),
            )
        ]
        for pipeline, rows_total, heads in ((dq_pipeline, q_len, q_heads), (dkdv_pipeline, kv_len, kv_heads)):
            rows, threads = _row_groups(pipeline)
            p = _attention_params(shapes, strides, causal, window, scale, softcap, rows)
            plans.append((pipeline, p, (ceil_div(rows_total, rows), heads, batch), (threads, 1, 1)))
        return plans

    key = ("backward", q.dtype, shapes, tuple(strides.items()), causal, window, scale, softcap)
    (delta_plan, dq_plan, dkdv_plan) = launcher.plan(key, build)
    mask = q if bias is None else bias
    launcher.encode(
        Dispatch(delta_plan[0], (out, dout, delta, delta_plan[1]), *delta_plan[2:]),
        Dispatch(dq_plan[0], (q, k, v, mask, dout, lse, delta, dq, dq_plan[1]), *dq_plan[2:]),
        Dispatch(dkdv_plan[0], (q, k, v, mask, dout, lse, delta, dk, dv, dkdv_plan[1]), *dkdv_plan[2:]),
    )
    return dq, dk, dv


__all__ = [
    "KernelUnavailable",
    "attention_backward",
    "attention_forward",
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
