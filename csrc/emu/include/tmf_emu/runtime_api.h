// The Metal-on-CPU runner's interface to compiled shaders: barriers, SIMD-group rendezvous, threadgroup
// storage, and kernel registration with per-parameter bindings (taken from the [[...]] attributes by the
// pre-pass in torch_metal_fused/emulator/prepass.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

namespace tmf_emu {

// ---- SIMD-group operations --------------------------------------------------------------------------
enum class SimdOp : int {
  none,  // simdgroup_barrier: a rendezvous without data
  sum,
  max,
  min,
  prefix_exclusive_sum,
  prefix_inclusive_sum,
  broadcast_first,
  shuffle,
  shuffle_xor,
  shuffle_down,
  shuffle_up,
  broadcast,
  all,
  any,
  is_first,
  matrix,                     // simdgroup_load/store: a rendezvous of all 32 lanes, each moving its own elements
  matrix_multiply_accumulate,  // simdgroup_multiply_accumulate: d = a·b + c over the lanes' elements
};

inline bool is_simdgroup_matrix_op(SimdOp op) {
  return op == SimdOp::matrix || op == SimdOp::matrix_multiply_accumulate;
}

constexpr int kSimdWidth = 32;
constexpr size_t kMaxSimdValueBytes = 64;

struct LaneIO {
  alignas(16) unsigned char in[kMaxSimdValueBytes];
  alignas(16) unsigned char out[kMaxSimdValueBytes];
  uint32_t arg;
};

// Computes every active lane's result; returns a mask of lanes that read an inactive lane.
using SimdResolver = uint32_t (*)(SimdOp op, LaneIO* lanes, uint32_t active_mask);

void simd_rendezvous(SimdResolver resolver, SimdOp op, const void* in, void* out, size_t size, uint32_t arg,
                     const char* file, int line);
void barrier(const char* file, int line, int mem_flags);  // mem_flags: Metal's, as an int
void* threadgroup_local(uint64_t site, size_t bytes, const char* file, int line);

template <typename T>
T tmf_load(const unsigned char* p) {
  T v;
  std::memcpy(&v, p, sizeof(T));
  return v;
}

template <typename T>
uint32_t resolve_simd(SimdOp op, LaneIO* lanes, uint32_t active) {
  uint32_t bad = 0;
  int first = __builtin_ctz(active);
  auto out = [&](int lane, T v) { std::memcpy(lanes[lane].out, &v, sizeof(T)); };
  auto in = [&](int lane) { return tmf_load<T>(lanes[lane].in); };
  auto read_lane = [&](int lane, int src, bool keep_if_outside) {
    if (src < 0 || src >= kSimdWidth) {
      if (keep_if_outside) return in(lane);
      src &= kSimdWidth - 1;
    }
    if (!(active >> src & 1u)) {
      bad |= 1u << lane;
      T poison;
      std::memset(&poison, 0xFF, sizeof(T));
      return poison;
    }
    return in(src);
  };
  if constexpr (std::is_same_v<T, bool>) {
    bool all = true, any = false;
    for (int l = 0; l < kSimdWidth; ++l)
      if (active >> l & 1u) all = all && in(l), any = any || in(l);
    for (int l = 0; l < kSimdWidth; ++l) {
      if (!(active >> l & 1u)) continue;
      switch (op) {
        case SimdOp::all: out(l, all); break;
        case SimdOp::any: out(l, any); break;
        case SimdOp::is_first: out(l, l == first); break;
        default: out(l, in(l)); break;
      }
    }
    return 0;
  } else {
    T total = in(first);
    T running = T(0);
    if (op == SimdOp::sum) {
      total = T(0);
      for (int l = 0; l < kSimdWidth; ++l)
        if (active >> l & 1u) total = total + in(l);
    }
    if constexpr (std::is_arithmetic_v<T> || sizeof(T) <= 2) {  // scalars, half and bfloat included
      if (op == SimdOp::max || op == SimdOp::min) {
        for (int l = 0; l < kSimdWidth; ++l) {
          if (!(active >> l & 1u)) continue;
          T v = in(l);
          // NaN is dropped, as Metal's fmax/fmin drop it (metal_prelude.h): the result is NaN only when every
          // active lane holds one, so a kernel cannot rely on simd_max/simd_min carrying a NaN.
          if (v != v) continue;
          if (total != total || (op == SimdOp::max ? v > total : v < total)) total = v;
        }
      }
    }
    for (int l = 0; l < kSimdWidth; ++l) {
      if (!(active >> l & 1u)) continue;
      switch (op) {
        case SimdOp::sum:
        case SimdOp::max:
        case SimdOp::min: out(l, total); break;
        case SimdOp::prefix_exclusive_sum: out(l, running); running = running + in(l); break;
        case SimdOp::prefix_inclusive_sum: running = running + in(l); out(l, running); break;
        case SimdOp::broadcast_first: out(l, in(first)); break;
        case SimdOp::shuffle:
        case SimdOp::broadcast: out(l, read_lane(l, int(lanes[l].arg), false)); break;
        case SimdOp::shuffle_xor: out(l, read_lane(l, l ^ int(lanes[l].arg), false)); break;
        case SimdOp::shuffle_down: out(l, read_lane(l, l + int(lanes[l].arg), true)); break;
        case SimdOp::shuffle_up: out(l, read_lane(l, l - int(lanes[l].arg), true)); break;
        default: out(l, in(l)); break;
      }
    }
    return bad;
  }
}

// ---- simdgroup_matrix<T, 8, 8> ------------------------------------------------------------------------------
// Each lane of the SIMD-group holds two elements of the 8x8 matrix, (row, col) and (row, col + 1): Apple's
// layout as MLX uses it (steel/gemm/mma.h): lanes 0-7 hold rows 0-3 x columns 0-3, lanes 8-15 rows 0-3 x
// columns 4-7, lanes 16-31 rows 4-7 alike.
inline void simdgroup_matrix_position(uint32_t lane, uint32_t& row, uint32_t& col) {
  const uint32_t quad = lane / 4;
  row = (quad & 4) + (lane / 2) % 4;
  col = (quad & 2) * 2 + (lane % 2) * 2;
}

struct SimdgroupMmaIn {
  float a[2], b[2], c[2];  // this lane's elements of a, b and c, as float
};

// d = a·b + c in float (the sum over k in order 0..7, then + c), every lane's two elements of d out. Elements of
// inactive lanes are NaN (resolve_simd_ops reports the divergence).
inline uint32_t resolve_simdgroup_mma(SimdOp, LaneIO* lanes, uint32_t active) {
  float a[8][8], b[8][8], c[8][8];
  for (auto* m : {&a, &b, &c})
    for (auto& row : *m)
      for (float& v : row) v = __builtin_nanf("");
  for (uint32_t l = 0; l < uint32_t(kSimdWidth); ++l) {
    if (!(active >> l & 1u)) continue;
    SimdgroupMmaIn in;
    std::memcpy(&in, lanes[l].in, sizeof(in));
    uint32_t row, col;
    simdgroup_matrix_position(l, row, col);
    for (int e = 0; e < 2; ++e) a[row][col + e] = in.a[e], b[row][col + e] = in.b[e], c[row][col + e] = in.c[e];
  }
  for (uint32_t l = 0; l < uint32_t(kSimdWidth); ++l) {
    if (!(active >> l & 1u)) continue;
    uint32_t row, col;
    simdgroup_matrix_position(l, row, col);
    float d[2];
    for (int e = 0; e < 2; ++e) {
      float sum = 0.0f;
      for (int k = 0; k < 8; ++k) sum += a[row][k] * b[k][col + e];
      d[e] = sum + c[row][col + e];
    }
    std::memcpy(lanes[l].out, d, sizeof(d));
  }
  return 0;
}

uint32_t simd_lane();  // the calling thread's thread_index_in_simdgroup

template <typename T>
inline T simd_collective(T x, uint32_t arg, SimdOp op, const char* file, int line) {
  static_assert(sizeof(T) <= kMaxSimdValueBytes, "SIMD value too large");
  T result;
  simd_rendezvous(&resolve_simd<T>, op, &x, &result, sizeof(T), arg, file, line);
  return result;
}

// ---- kernel parameters and registration ---------------------------------------------------------------
enum class Role : int {
  buffer,
  threadgroup_memory,
  thread_position_in_grid,
  thread_position_in_threadgroup,
  threadgroup_position_in_grid,
  threads_per_threadgroup,
  threadgroups_per_grid,
  threads_per_grid,
  thread_index_in_threadgroup,
  thread_index_in_simdgroup,
  simdgroup_index_in_threadgroup,
  simdgroups_per_threadgroup,
  threads_per_simdgroup,
};

struct Binding {
  Role role;
  int index;
};

void* buffer_address(int index, size_t min_bytes);
void* threadgroup_argument(int index);
void thread_attribute(Role role, uint32_t out[3]);

template <typename P>
P make_arg(const Binding& b) {
  if constexpr (std::is_pointer_v<P>) {
    void* p = b.role == Role::threadgroup_memory ? threadgroup_argument(b.index) : buffer_address(b.index, 0);
    return (P)p;
  } else if constexpr (std::is_reference_v<P>) {
    using V = std::remove_reference_t<P>;
    return *(V*)buffer_address(b.index, sizeof(V));
  } else {
    uint32_t v[3];
    thread_attribute(b.role, v);
    if constexpr (std::is_arithmetic_v<P>) {
      return P(v[0]);
    } else {
      P r;
      for (int i = 0; i < int(__builtin_vectorelements(P)); ++i) r[i] = v[i];
      return r;
    }
  }
}

using KernelInvoker = void (*)(const Binding* bindings);

// What the runner needs to know about a kernel's buffer parameter to place its private copy: the alignment
// its type promises the compiler (the copy ends as close to a guard page as that allows), and whether the
// kernel may write through it (const-qualified ones are never copied back).
struct ParamInfo {
  uint32_t alignment;  // 0: not a buffer (a thread attribute)
  bool writable;
};

template <typename P>
constexpr ParamInfo param_info() {
  if constexpr (std::is_pointer_v<P> || std::is_reference_v<P>) {
    using V = std::remove_reference_t<std::remove_pointer_t<P>>;
    if constexpr (std::is_void_v<V>) return ParamInfo{16, !std::is_const_v<V>};
    else return ParamInfo{uint32_t(alignof(V)), !std::is_const_v<V>};
  } else {
    return ParamInfo{0, false};
  }
}

template <typename F>
struct Invoker;
template <typename... P>
struct Invoker<void(P...)> {
  template <void (*Fn)(P...), size_t... I>
  static void call(const Binding* b, std::index_sequence<I...>) {
    Fn(make_arg<P>(b[I])...);
  }
  template <void (*Fn)(P...)>
  static void run(const Binding* b) {
    call<Fn>(b, std::index_sequence_for<P...>{});
  }
  static constexpr size_t arity = sizeof...(P);
  static constexpr ParamInfo params[sizeof...(P) + 1] = {param_info<P>()..., ParamInfo{0, false}};
};

struct KernelRegistrar {
  KernelRegistrar(const char* host_name, KernelInvoker invoker, const Binding* bindings, size_t count,
                  size_t arity, const ParamInfo* params, const char* file, int line);
};

}  // namespace tmf_emu

#define TMF_CAT2(a, b) a##b
#define TMF_CAT(a, b) TMF_CAT2(a, b)
// Replaces `template [[host_name("name")]] [[kernel]] decltype(fn<T>) fn<T>;` (see the pre-pass).
#define TMF_INSTANTIATE(host_name, base, ...)                                                            \
  static ::tmf_emu::KernelRegistrar TMF_CAT(tmf_registrar_, __LINE__)(                                  \
      host_name, &::tmf_emu::Invoker<decltype(__VA_ARGS__)>::template run<&__VA_ARGS__>,                \
      tmf_bindings_##base, sizeof(tmf_bindings_##base) / sizeof(::tmf_emu::Binding),                   \
      ::tmf_emu::Invoker<decltype(__VA_ARGS__)>::arity, ::tmf_emu::Invoker<decltype(__VA_ARGS__)>::params,  \
      __FILE__, __LINE__);
