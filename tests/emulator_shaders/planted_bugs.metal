// Kernels with planted bugs that the harness must contain: out-of-bounds accesses, barriers some threads never
// reach, endless loops, a race that only another SIMD-group order exposes (tests/test_emulator_checker.py).
// The tests find lines by the "// BUG:" markers.
#include <metal_stdlib>
using namespace metal;

// out[i + shift] = i, with shift = params[0] elements: out of bounds for shift != 0.
[[kernel]] void store_shifted(
    device float* out [[buffer(0)]],
    device const long* params [[buffer(1)]],
    uint i [[thread_position_in_grid]]) {
  out[long(i) + params[0]] = float(i);  // BUG: store_shifted
}

// out[i] = in[i + shift]: out of bounds for shift != 0.
[[kernel]] void load_shifted(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    device const long* params [[buffer(2)]],
    uint i [[thread_position_in_grid]]) {
  out[i] = in[long(i) + params[0]];  // BUG: load_shifted
}

// Threads 16 and up never arrive at the barrier the others wait at.
[[kernel]] void barrier_not_reached(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_threadgroup]]) {
  if (tid < 16) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // BUG: barrier_not_reached
  }
  out[tid] = 1.0f;
}

// Odd and even threads wait at different barriers.
[[kernel]] void barriers_diverge(
    device float* out [[buffer(0)]],
    uint tid [[thread_position_in_threadgroup]]) {
  if (tid % 2 == 1) {
    threadgroup_barrier(mem_flags::mem_threadgroup);  // BUG: barriers_diverge
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = 1.0f;
}

// Thread 0 loops while in[] holds non-negative values (it always does), so the others wait at the barrier for
// ever. The store in the loop keeps it a loop: a C++ compiler may assume a loop without side effects ends, and
// in and out may alias, so the load is not hoisted either.
[[kernel]] void spin_before_barrier(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_position_in_threadgroup]]) {
  if (tid == 0) {
    for (uint j = 0; in[j % 4] >= 0.0f; ++j) out[0] += 1.0f;  // BUG: spin_before_barrier
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  out[tid] = 2.0f;
}

// An endless loop through SIMD-group operations: the threads keep blocking and resuming, never finishing.
[[kernel]] void spin_in_simd_ops(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    uint tid [[thread_position_in_threadgroup]]) {
  float v = fabs(in[tid]);
  while (simd_sum(v) >= 0.0f) {  // BUG: spin_in_simd_ops
    v = v + 1.0f;
  }
  out[tid] = v;
}

// Each thread publishes a value, then reads the one published by the same lane of SIMD-group 0, with no barrier
// between. In index order SIMD-group 0 always runs first and the result is right; in any other order a later
// SIMD-group reads poisoned (NaN) threadgroup memory.
[[kernel]] void read_without_barrier(
    device float* out [[buffer(0)]],
    uint gid [[thread_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]],
    uint lane [[thread_index_in_simdgroup]]) {
  threadgroup float published[1024];
  published[tid] = float(lane) + 1.0f;
  out[gid] = published[lane];  // BUG: read_without_barrier
}

// Threadgroup g (32 threads) reads rows g and g + 1 of x, then overwrites row g: threadgroup g - 1 read row g, and
// nothing orders threadgroups within a dispatch, so row g's overwrite races that read (a halo read in place).
[[kernel]] void halo_in_place(
    device float* x [[buffer(0)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_index_in_threadgroup]]) {
  const float a = x[group * 32 + tid];
  const float b = x[(group + 1) * 32 + tid];
  threadgroup_barrier(mem_flags::mem_device);
  x[group * 32 + tid] = a + b;  // BUG: halo_in_place
}

// Each thread writes x[tid], then reads its neighbour's x[tid + 1] after a barrier that orders threadgroup memory
// only (mem_threadgroup): device memory is not ordered by it on Metal. With device_barrier set, the barrier is
// mem_device and the kernel is correct.
[[kernel]] void neighbour_after_threadgroup_barrier(
    device float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& device_barrier [[buffer(2)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  x[tid] = float(tid);
  if (device_barrier != 0) {
    threadgroup_barrier(mem_flags::mem_device);
  } else {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  out[tid] = x[(tid + 1) % n];  // BUG: neighbour_after_threadgroup_barrier
}

// One storage bound at buffers 0 (read) and 1 (written): each thread writes 7 through buffer 1, then after a
// mem_device barrier reads its neighbour's element through buffer 0 into buffer 2. On the GPU (one storage) every
// element reads 7.
[[kernel]] void write_then_read_an_alias(
    device const float* in [[buffer(0)]],
    device float* out [[buffer(1)]],
    device float* seen [[buffer(2)]],
    uint tid [[thread_index_in_threadgroup]],
    uint n [[threads_per_threadgroup]]) {
  out[tid] = 7.0f;
  threadgroup_barrier(mem_flags::mem_device);
  seen[tid] = in[(tid + 1) % n];
}

// Thread tid writes its slot (threadgroup memory: scratch; device memory: x), waits at the barrier `barrier` picks,
// then reads the slot of thread tid ^ mask: in its own SIMD-group for mask 1, in the other one for mask 32 (64
// threads). A simdgroup_barrier orders memory between the lanes of one SIMD-group for the kinds of memory its
// mem_flags name, a threadgroup_barrier between all threads for those it names; anything else (a SIMD-group
// reduction too, though its lanes meet there) is a race.
[[kernel]] void exchange_after_barrier(
    device float* x [[buffer(0)]],
    device float* out [[buffer(1)]],
    constant uint& device_memory [[buffer(2)]],
    constant uint& barrier [[buffer(3)]],
    constant uint& mask [[buffer(4)]],
    threadgroup float* scratch [[threadgroup(0)]],
    uint tid [[thread_index_in_threadgroup]]) {
  if (device_memory != 0) {
    x[tid] = float(tid);
  } else {
    scratch[tid] = float(tid);
  }
  if (barrier == 0) {
    simdgroup_barrier(mem_flags::mem_none);
  } else if (barrier == 1) {
    simdgroup_barrier(mem_flags::mem_device);
  } else if (barrier == 2) {
    simdgroup_barrier(mem_flags::mem_threadgroup);
  } else if (barrier == 3) {
    threadgroup_barrier(mem_flags::mem_device);
  } else if (barrier == 4) {
    threadgroup_barrier(mem_flags::mem_threadgroup);
  } else {
    out[tid] = simd_sum(1.0f);  // a SIMD-group rendezvous that orders no memory
  }
  out[tid] = device_memory != 0 ? x[tid ^ mask] : scratch[tid ^ mask];  // BUG: exchange_after_barrier
}
