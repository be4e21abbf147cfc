// Gated activations of the MLP of Llama-family models (SwiGLU: silu) and Gemma (GeGLU: gelu, tanh approximation),
// forward and backward, in float32 math for float32, float16 and bfloat16.
// Launch code: torch_metal_fused/backends/metal.py (glu_*); used by torch_metal_fused/ops/glu.py.
//   forward:  out = act(gate) · up
//   backward: dgate = dout · up · act'(gate), dup = dout · act(gate) — act recomputed from gate, so training saves
//             only the two inputs (no activation tensor).
// Elementwise: each thread owns kGluElementsPerThread contiguous elements of one row (full blocks load without
// bounds checks, so the compiler can issue wide loads; the row's tail goes element by element). Traffic: forward
// reads gate and up and writes out, backward reads gate, up and dout and writes dgate and dup — each element once,
// the minimum. One dispatch per call.
#include <metal_stdlib>
#include "tmf/shader_args.h"
#include "row_io.h"
using namespace metal;

// silu(g) = g · σ(g). σ from exp(-g): for g < -88 exp overflows to +inf and σ = 0, so silu is -0 (and NaN for
// g = -inf, as torch's g · sigmoid(g)); silu'(g) = σ · (1 + g · (1 - σ)), torch's formula (NaN at +inf, as torch).
struct SiluActivation {
  static float sigma(float g) { return 1.0f / (1.0f + precise::exp(-g)); }
  static float value(float g) { return g * sigma(g); }
  static float derivative(float g) {
    const float s = sigma(g);
    return s * (1.0f + g * (1.0f - s));
  }
};

// gelu_tanh(g) = g/2 · (1 + tanh(β (g + κ g³))), β = √(2/π), κ = 0.044715 (PyTorch's approximate="tanh").
// Its derivative's second term, g/2 · (1 - tanh²) · β (1 + 3κ g²), is 0 where tanh² rounds to 1 for a finite g
// (|g| > ~9): computing it would give 0 · inf = NaN once g² overflows, where the exact value is ~0.
struct GeluTanhActivation {
  static float inner_tanh(float g) { return precise::tanh(0.7978845608028654f * (g + 0.044715f * g * g * g)); }
  static float value(float g) { return 0.5f * g * (1.0f + inner_tanh(g)); }
  static float derivative(float g) {
    const float t = inner_tanh(g);
    const float sech2 = 1.0f - t * t;
    const float slope =
        sech2 == 0.0f && isfinite(g) ? 0.0f : 0.5f * g * sech2 * 0.7978845608028654f * (1.0f + 0.134145f * g * g);
    return 0.5f * (1.0f + t) + slope;
  }
};

// Which row and first element a thread owns (see tmf::GluParams).
inline uint glu_row(constant tmf::GluParams& p, uint group) { return group / p.groups_per_row; }
inline uint glu_first_element(constant tmf::GluParams& p, uint group, uint tid, uint threads) {
  return ((group % p.groups_per_row) * threads + tid) * tmf::kGluElementsPerThread;
}

template <typename Activation, typename T>
inline void glu_forward_elements(device const T* gate, device const T* up, device T* out,
                                 constant tmf::GluParams& p, uint group, uint tid, uint threads) {
  constexpr uint N = tmf::kGluElementsPerThread;
  const uint row = glu_row(p, group);
  const uint c0 = glu_first_element(p, group, tid, threads);
  if (c0 >= p.cols) {
    return;
  }
  float g[N];
  float u[N];
  load_row_elements<N>(gate + ulong(row) * p.gate_row_stride, c0, p.cols, 0.0f, g);
  load_row_elements<N>(up + ulong(row) * p.up_row_stride, c0, p.cols, 0.0f, u);
  float o[N];
  for (uint i = 0; i < N; ++i) {
    o[i] = Activation::value(g[i]) * u[i];
  }
  store_row_elements<N>(out + ulong(row) * p.cols, c0, p.cols, o);
}

template <typename Activation, typename T>
inline void glu_backward_elements(device const T* gate, device const T* up, device const T* dout, device T* dgate,
                                  device T* dup, constant tmf::GluParams& p, uint group, uint tid, uint threads) {
  constexpr uint N = tmf::kGluElementsPerThread;
  const uint row = glu_row(p, group);
  const uint c0 = glu_first_element(p, group, tid, threads);
  if (c0 >= p.cols) {
    return;
  }
  float g[N];
  float u[N];
  float d[N];
  load_row_elements<N>(gate + ulong(row) * p.gate_row_stride, c0, p.cols, 0.0f, g);
  load_row_elements<N>(up + ulong(row) * p.up_row_stride, c0, p.cols, 0.0f, u);
  load_row_elements<N>(dout + ulong(row) * p.dout_row_stride, c0, p.cols, 0.0f, d);
  float dg[N];
  float du[N];
  for (uint i = 0; i < N; ++i) {
    dg[i] = d[i] * u[i] * Activation::derivative(g[i]);
    du[i] = d[i] * Activation::value(g[i]);
  }
  store_row_elements<N>(dgate + ulong(row) * p.cols, c0, p.cols, dg);
  store_row_elements<N>(dup + ulong(row) * p.cols, c0, p.cols, du);
}

template <typename T>
[[kernel]] void glu_forward_silu(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant tmf::GluParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  glu_forward_elements<SiluActivation>(gate, up, out, p, group, tid, threads);
}

template <typename T>
[[kernel]] void glu_forward_gelu_tanh(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device T* out [[buffer(2)]],
    constant tmf::GluParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  glu_forward_elements<GeluTanhActivation>(gate, up, out, p, group, tid, threads);
}

template <typename T>
[[kernel]] void glu_backward_silu(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device const T* dout [[buffer(2)]],
    device T* dgate [[buffer(3)]],
    device T* dup [[buffer(4)]],
    constant tmf::GluParams& p [[buffer(5)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  glu_backward_elements<SiluActivation>(gate, up, dout, dgate, dup, p, group, tid, threads);
}

template <typename T>
[[kernel]] void glu_backward_gelu_tanh(
    device const T* gate [[buffer(0)]],
    device const T* up [[buffer(1)]],
    device const T* dout [[buffer(2)]],
    device T* dgate [[buffer(3)]],
    device T* dup [[buffer(4)]],
    constant tmf::GluParams& p [[buffer(5)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  glu_backward_elements<GeluTanhActivation>(gate, up, dout, dgate, dup, p, group, tid, threads);
}

// ---- instantiations: host names are <kernel>_<dtype>, as composed by tmf::launch::kernel_name ----------
template [[host_name("glu_forward_silu_float")]] [[kernel]] decltype(glu_forward_silu<float>) glu_forward_silu<float>;
template [[host_name("glu_forward_silu_half")]] [[kernel]] decltype(glu_forward_silu<half>) glu_forward_silu<half>;
template [[host_name("glu_forward_gelu_tanh_float")]] [[kernel]] decltype(glu_forward_gelu_tanh<float>) glu_forward_gelu_tanh<float>;
template [[host_name("glu_forward_gelu_tanh_half")]] [[kernel]] decltype(glu_forward_gelu_tanh<half>) glu_forward_gelu_tanh<half>;
template [[host_name("glu_backward_silu_float")]] [[kernel]] decltype(glu_backward_silu<float>) glu_backward_silu<float>;
template [[host_name("glu_backward_silu_half")]] [[kernel]] decltype(glu_backward_silu<half>) glu_backward_silu<half>;
template [[host_name("glu_backward_gelu_tanh_float")]] [[kernel]] decltype(glu_backward_gelu_tanh<float>) glu_backward_gelu_tanh<float>;
template [[host_name("glu_backward_gelu_tanh_half")]] [[kernel]] decltype(glu_backward_gelu_tanh<half>) glu_backward_gelu_tanh<half>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("glu_forward_silu_bfloat")]] [[kernel]] decltype(glu_forward_silu<bfloat>) glu_forward_silu<bfloat>;
template [[host_name("glu_forward_gelu_tanh_bfloat")]] [[kernel]] decltype(glu_forward_gelu_tanh<bfloat>) glu_forward_gelu_tanh<bfloat>;
template [[host_name("glu_backward_silu_bfloat")]] [[kernel]] decltype(glu_backward_silu<bfloat>) glu_backward_silu<bfloat>;
template [[host_name("glu_backward_gelu_tanh_bfloat")]] [[kernel]] decltype(glu_backward_gelu_tanh<bfloat>) glu_backward_gelu_tanh<bfloat>;
#endif
