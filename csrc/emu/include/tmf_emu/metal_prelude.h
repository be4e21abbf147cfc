// Metal Shading Language on a CPU: the types, address spaces, math and SIMD-group/threadgroup builtins
// that shaders/*.metal use, implemented for clang 19 on x86-64 (see docs/metal-on-cpu.md).
// Reached through the stand-in <metal_stdlib> header in front of each pre-processed shader.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "tmf_emu/runtime_api.h"

// ---- address spaces -------------------------------------------------------------------------------
// Plain builds: every address space is an ordinary pointer. The strict lint build maps them to clang
// address spaces so that mixing a threadgroup pointer with a device pointer is a compile error, as it is
// for Apple's compiler.
#ifdef TMF_STRICT_ADDRESS_SPACES
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define thread

// ---- scalar and vector types ----------------------------------------------------------------------
typedef _Float16 half;
#ifdef TMF_STRICT_BFLOAT
// Apple's compiler converts nothing to bfloat implicitly ("cannot initialize a variable of type 'bfloat' with an
// rvalue of type 'float'"); clang's __bf16 takes every arithmetic conversion. The strict pass (syntax only, never
// run) makes bfloat a class that converts to and from other types only when asked (static_cast, T(x)), so an
// implicit conversion in a bfloat instantiation fails here as it would on a Mac. Stricter than Metal on the
// widening side (bfloat to float is also explicit here): an explicit cast is valid Metal either way.
struct bfloat {
  __bf16 value;
  bfloat() = default;
  template <typename U, typename = std::enable_if_t<std::is_arithmetic_v<U> || std::is_same_v<U, _Float16>>>
  constexpr explicit bfloat(U x) : value(static_cast<__bf16>(x)) {}
  template <typename U, typename = std::enable_if_t<std::is_arithmetic_v<U> || std::is_same_v<U, _Float16>>>
  constexpr explicit operator U() const {
    return static_cast<U>(value);
  }
};
#else
typedef __bf16 bfloat;
#endif
#define __HAVE_BFLOAT__ 1
#define __METAL_VERSION__ 310
typedef unsigned short ushort;
typedef unsigned int uint;
typedef unsigned char uchar;
typedef unsigned long ulong;

#define TMF_VEC(T, N) typedef T T##N __attribute__((ext_vector_type(N)));
#define TMF_VECS(T) TMF_VEC(T, 2) TMF_VEC(T, 3) TMF_VEC(T, 4)
TMF_VECS(float)
TMF_VECS(half)
#ifndef TMF_STRICT_BFLOAT  // no vectors of a class type (the shaders use none of bfloat)
TMF_VECS(bfloat)
#endif
TMF_VECS(int)
TMF_VECS(uint)
TMF_VECS(long)
TMF_VECS(ulong)
TMF_VECS(short)
TMF_VECS(ushort)
TMF_VECS(char)
TMF_VECS(uchar)
TMF_VECS(bool)
#undef TMF_VECS
#undef TMF_VEC

// Metal's vector constructors — splat `float4(x)`, conversion `half4(v)`, assembly `float4(a.xy, b, c)` — have
// no ext_vector_type equivalent; the pre-pass rewrites `float4(...)` into `tmf_make<float4>(...)`.
template <typename T>
constexpr bool tmf_is_scalar_type =
    std::is_arithmetic_v<T> || std::is_same_v<T, _Float16> || std::is_same_v<T, bfloat>;

template <typename V>
using tmf_elem = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V>()[0])>>;

template <typename V, typename A>
inline void tmf_append(V& out, int& i, A a) {
  if constexpr (tmf_is_scalar_type<A>) {
    out[i++] = static_cast<tmf_elem<V>>(a);
  } else {
    for (int k = 0; k < int(__builtin_vectorelements(A)); ++k) out[i++] = static_cast<tmf_elem<V>>(a[k]);
  }
}

template <typename V, typename A>
inline V tmf_make(A a) {
  if constexpr (tmf_is_scalar_type<A>) {
    return V(static_cast<tmf_elem<V>>(a));  // splat
  } else {
    return __builtin_convertvector(a, V);  // element-wise conversion
  }
}

template <typename V, typename A, typename B, typename... C>
inline V tmf_make(A a, B b, C... c) {
  V out;
  int i = 0;
  tmf_append(out, i, a);
  tmf_append(out, i, b);
  (tmf_append(out, i, c), ...);
  return out;
}

namespace metal {

template <typename T, int N>
using vec = T __attribute__((ext_vector_type(N)));

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
inline mem_flags operator|(mem_flags a, mem_flags b) { return mem_flags(int(a) | int(b)); }

template <typename T>
struct numeric_limits : std::numeric_limits<T> {};

// ---- math ----------------------------------------------------------------------------------------
// Computed in float (double for double) and rounded back, as the GPU does for half and bfloat.
template <typename T>
using tmf_wide = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
constexpr bool tmf_is_scalar = std::is_arithmetic_v<T> || std::is_same_v<T, half> || std::is_same_v<T, bfloat>;

#define TMF_UNARY(name, expr)                                                 \
  template <typename T, typename = std::enable_if_t<tmf_is_scalar<T>>>        \
  inline T name(T x) {                                                        \
    tmf_wide<T> v = static_cast<tmf_wide<T>>(x);                              \
    return static_cast<T>(expr);                                              \
  }
TMF_UNARY(exp, std::exp(v))
TMF_UNARY(exp2, std::exp2(v))
TMF_UNARY(log, std::log(v))
TMF_UNARY(sqrt, std::sqrt(v))
TMF_UNARY(rsqrt, 1 / std::sqrt(v))
TMF_UNARY(abs, std::fabs(v))
TMF_UNARY(fabs, std::fabs(v))
TMF_UNARY(tanh, std::tanh(v))
TMF_UNARY(floor, std::floor(v))
TMF_UNARY(ceil, std::ceil(v))
#undef TMF_UNARY

namespace precise {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::rsqrt;
using metal::sqrt;
using metal::tanh;
}  // namespace precise
namespace fast {
using metal::exp;
// fast::exp2 of a NaN is not documented by Apple: the harness returns 0 (the worst case for a softmax, which would
// then drop the NaN), so a kernel must pass NaN through itself to keep the IEEE contract.
inline float exp2(float x) { return x != x ? 0.0f : metal::exp2(x); }
using metal::log;
using metal::rsqrt;
using metal::sqrt;
}  // namespace fast

// max/min/fmax/fmin as the Metal Shading Language specification documents fmax/fmin (as OpenCL does): when one
// argument is a NaN the other is returned, NaN only when both are. Whatever Apple's compiler does for `max` on a
// given GPU, a kernel must not rely on a max or min carrying a NaN: it carries NaN through sums (IEEE), and these
// NaN-dropping semantics make a kernel that relies on a max fail here. Vectors: element by element.
template <typename T>
inline T tmf_select_non_nan(T a, T b, bool greater) {
  if constexpr (tmf_is_scalar<T>) {
    if (a != a) return b;
    if (b != b) return a;
    return (greater ? a > b : a < b) ? a : b;
  } else {
    T r = a;
    for (int i = 0; i < int(__builtin_vectorelements(T)); ++i) r[i] = tmf_select_non_nan(a[i], b[i], greater);
    return r;
  }
}
template <typename T>
inline T max(T a, T b) {
  return tmf_select_non_nan(a, b, true);
}
template <typename T>
inline T min(T a, T b) {
  return tmf_select_non_nan(a, b, false);
}
template <typename T>
inline T fmax(T a, T b) {
  return tmf_select_non_nan(a, b, true);
}
template <typename T>
inline T fmin(T a, T b) {
  return tmf_select_non_nan(a, b, false);
}
template <typename T>
inline T fma(T a, T b, T c) {
  return static_cast<T>(std::fma(static_cast<tmf_wide<T>>(a), static_cast<tmf_wide<T>>(b),
                                 static_cast<tmf_wide<T>>(c)));
}
template <typename T>
inline bool isnan(T x) {
  return x != x;
}
template <typename T>
inline bool isinf(T x) {
  return std::isinf(static_cast<tmf_wide<T>>(x));
}
template <typename T>
inline bool isfinite(T x) {
  return std::isfinite(static_cast<tmf_wide<T>>(x));
}
template <typename T>
inline T clamp(T x, T lo, T hi) {
  return min(max(x, lo), hi);
}

// ---- synchronisation -----------------------------------------------------------------------------
inline void threadgroup_barrier(mem_flags flags = mem_flags::mem_none, const char* file = __builtin_FILE(),
                                int line = __builtin_LINE()) {
  ::tmf_emu::barrier(file, line, int(flags));
}
// Its mem_flags order the SIMD-group's own accesses to threadgroup (device) memory, which the checker honours.
inline void simdgroup_barrier(mem_flags flags = mem_flags::mem_none, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  ::tmf_emu::simd_collective<bool>(true, uint32_t(flags), ::tmf_emu::SimdOp::none, file, line);
}

// ---- SIMD-group functions: a rendezvous of the lanes of one SIMD-group that reach the same call site --
#define TMF_SIMD_REDUCE(name, op)                                                        \
  template <typename T>                                                                  \
  inline T name(T x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { \
    return ::tmf_emu::simd_collective<T>(x, 0, ::tmf_emu::SimdOp::op, file, line);      \
  }
TMF_SIMD_REDUCE(simd_sum, sum)
TMF_SIMD_REDUCE(simd_max, max)
TMF_SIMD_REDUCE(simd_min, min)
TMF_SIMD_REDUCE(simd_prefix_exclusive_sum, prefix_exclusive_sum)
TMF_SIMD_REDUCE(simd_prefix_inclusive_sum, prefix_inclusive_sum)
TMF_SIMD_REDUCE(simd_broadcast_first, broadcast_first)
#undef TMF_SIMD_REDUCE

#define TMF_SIMD_SHUFFLE(name, op)                                                                   \
  template <typename T>                                                                              \
  inline T name(T x, ushort arg, const char* file = __builtin_FILE(), int line = __builtin_LINE()) { \
    return ::tmf_emu::simd_collective<T>(x, arg, ::tmf_emu::SimdOp::op, file, line);                \
  }
TMF_SIMD_SHUFFLE(simd_shuffle, shuffle)
TMF_SIMD_SHUFFLE(simd_shuffle_xor, shuffle_xor)
TMF_SIMD_SHUFFLE(simd_shuffle_down, shuffle_down)
TMF_SIMD_SHUFFLE(simd_shuffle_up, shuffle_up)
TMF_SIMD_SHUFFLE(simd_broadcast, broadcast)
#undef TMF_SIMD_SHUFFLE

inline bool simd_all(bool x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::tmf_emu::simd_collective<bool>(x, 0, ::tmf_emu::SimdOp::all, file, line);
}
inline bool simd_any(bool x, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::tmf_emu::simd_collective<bool>(x, 0, ::tmf_emu::SimdOp::any, file, line);
}
inline bool simd_is_first(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::tmf_emu::simd_collective<bool>(true, 0, ::tmf_emu::SimdOp::is_first, file, line);
}

// ---- simdgroup_matrix<T, 8, 8> (Apple7+): each lane holds two elements (tmf_emu::simdgroup_matrix_position) ----
// Loads, stores and multiply-accumulates are collectives of the SIMD-group's 32 lanes (a rendezvous at the call
// site, like the SIMD functions: a lane missing is reported as divergence). Loads and stores move each lane's own
// two elements through ordinary loads and stores, so the checker sees them (bounds, races, traffic). Products
// are computed in float and rounded to d's element type.
template <typename T, int Rows, int Cols>
struct simdgroup_matrix {
  static_assert(Rows == 8 && Cols == 8, "the harness emulates 8x8 simdgroup matrices");
  vec<T, 2> tmf_elements;
  thread vec<T, 2>& thread_elements() { return tmf_elements; }
  const thread vec<T, 2>& thread_elements() const { return tmf_elements; }
};
typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

template <typename T, int Rows, int Cols>
inline simdgroup_matrix<T, Rows, Cols> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, Rows, Cols> m;
  m.tmf_elements = vec<T, 2>(value);
  return m;
}

// Where this lane's element e (of the two it holds) lives, for simdgroup_load and simdgroup_store alike: element
// (i, j) of the matrix is at (origin.y + i) * elements_per_row + origin.x + j (origin = (column, row)), or, transposed,
// at (origin.y + j) * elements_per_row + origin.x + i.
inline ulong tmf_simdgroup_matrix_offset(uint32_t e, ulong elements_per_row, ulong2 matrix_origin,
                                         bool transpose_matrix) {
  uint32_t row, col;
  ::tmf_emu::simdgroup_matrix_position(::tmf_emu::simd_lane(), row, col);
  const ulong i = row, j = col + e;
  const ulong r = transpose_matrix ? j : i, c = transpose_matrix ? i : j;
  return (matrix_origin.y + r) * elements_per_row + matrix_origin.x + c;
}

template <typename T, typename P>
inline void simdgroup_load(thread simdgroup_matrix<T, 8, 8>& d, P* src, ulong elements_per_row = 8,
                           ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false,
                           const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::tmf_emu::simd_collective<bool>(true, 0, ::tmf_emu::SimdOp::matrix, file, line);
  for (uint32_t e = 0; e < 2; ++e) {
    const ulong at = tmf_simdgroup_matrix_offset(e, elements_per_row, matrix_origin, transpose_matrix);
    d.tmf_elements[e] = static_cast<T>(src[at]);
  }
}

template <typename T, typename P>
inline void simdgroup_store(const thread simdgroup_matrix<T, 8, 8>& a, P* dst, ulong elements_per_row = 8,
                            ulong2 matrix_origin = ulong2(0), bool transpose_matrix = false,
                            const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::tmf_emu::simd_collective<bool>(true, 0, ::tmf_emu::SimdOp::matrix, file, line);
  for (uint32_t e = 0; e < 2; ++e) {
    dst[tmf_simdgroup_matrix_offset(e, elements_per_row, matrix_origin, transpose_matrix)] = a.tmf_elements[e];
  }
}

template <typename T, typename A, typename B, typename C>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<T, 8, 8>& d, const thread simdgroup_matrix<A, 8, 8>& a,
                                          const thread simdgroup_matrix<B, 8, 8>& b,
                                          const thread simdgroup_matrix<C, 8, 8>& c,
                                          const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::tmf_emu::SimdgroupMmaIn in;
  for (int e = 0; e < 2; ++e) {
    in.a[e] = float(a.tmf_elements[e]), in.b[e] = float(b.tmf_elements[e]), in.c[e] = float(c.tmf_elements[e]);
  }
  ::tmf_emu::SimdgroupMmaIn out;  // the rendezvous copies as many bytes out as in: d's elements come first
  ::tmf_emu::simd_rendezvous(&::tmf_emu::resolve_simdgroup_mma, ::tmf_emu::SimdOp::matrix_multiply_accumulate, &in,
                             &out, sizeof(in), 0, file, line);
  d.tmf_elements[0] = static_cast<T>(out.a[0]);
  d.tmf_elements[1] = static_cast<T>(out.a[1]);
}

template <typename T, typename A, typename B>
inline void simdgroup_multiply(thread simdgroup_matrix<T, 8, 8>& d, const thread simdgroup_matrix<A, 8, 8>& a,
                               const thread simdgroup_matrix<B, 8, 8>& b, const char* file = __builtin_FILE(),
                               int line = __builtin_LINE()) {
  simdgroup_multiply_accumulate(d, a, b, make_filled_simdgroup_matrix<T, 8, 8>(T(0)), file, line);
}

}  // namespace metal

// Kernel-local `threadgroup T name[N];` declarations are rewritten by the pre-pass into references to
// per-threadgroup storage that the runner allocates (shared by the group's threads, poisoned).
#define TMF_THREADGROUP_LOCAL(site, ...) \
  (*(threadgroup __VA_ARGS__*)::tmf_emu::threadgroup_local(site, sizeof(__VA_ARGS__), __FILE__, __LINE__))
