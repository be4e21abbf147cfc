// Cross-entropy row pass in float32, float16 and bfloat16 (statistics in float32).
// Launch code: torch_metal_fused/backends/metal.py (cross_entropy_rows); used by torch_metal_fused/ops/cross_entropy.py for both
// cross_entropy and the chunked linear_cross_entropy (there on each chunk of logits, with the gradient written in
// place over the chunk).
//
// Variant "looped": one threadgroup per row (vocabulary rows are long: 32 000 - 262 144), up to 1024 threads
// striding over the row.
//   pass 1: z = logits (or softcap · tanh(logits / softcap)); per thread an online max and sum of exp(z - max) and
//           the sum of z (label smoothing), z[target]; threadgroup reductions give logsumexp; the loss of the row,
//           lse - (1 - ε)·z[target] - ε·mean(z), is written by thread 0 (0 for an ignored row).
//   pass 2 (want_grad): grad = row_scale · (exp(z - lse) - ε / vocab - (1 - ε)·[i == target]) (times 1 - tanh²
//           under soft-capping), 0 for an ignored row; each thread writes the elements it read, so grad may be the
//           logits buffer itself.
// Traffic per row: logits read twice with a gradient (once without), grad written once (3 x the logits' bytes with a
// gradient), the target and row scale 4 B each, the loss 4 B. One dispatch per call.
#include <metal_stdlib>
#include "tmf/shader_args.h"
#include "reduce.h"
using namespace metal;

inline float capped_logit(float x, float softcap) {
  return softcap > 0.0f ? softcap * precise::tanh(x / softcap) : x;
}

template <typename T>
[[kernel]] void cross_entropy_rows_looped(
    device const T* logits [[buffer(0)]],
    device const int* target [[buffer(1)]],
    device const float* row_scale [[buffer(2)]],
    device float* loss [[buffer(3)]],
    device T* grad [[buffer(4)]],
    constant tmf::CrossEntropyParams& p [[buffer(5)]],
    uint row [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]],
    uint n_simd [[simdgroups_per_threadgroup]]) {
  threadgroup float scratch[32];
  device const T* zr = logits + ulong(row) * p.logits_row_stride;
  const int t = load_uniform(target + ulong(row) * p.target_word_stride, 0, lane);
  const bool valid = t != p.ignore_index;
  // Pass 1: online max m and sum s of exp(z - m), and the sum of z.
  float m = -INFINITY;
  float s = 0.0f;
  float z_sum = 0.0f;
  float z_target = 0.0f;  // z[target], from the thread that reads it (no second read of the row)
  for (uint c = tid; c < p.vocab; c += threads) {
    const float z = capped_logit(float(zr[c]), p.softcap);
    z_sum += z;
    if (int(c) == t) {
      z_target = z;
    }
    if (z > m) {
      s = s * exp_nonpositive(m - z) + exp_nonpositive(z - z);  // exp(z - z): 1, or NaN for +inf (as torch)
      m = z;
    } else if (z != -INFINITY) {
      s += exp_nonpositive(z - m);  // NaN lands here and poisons the row, as in torch
    }
  }
  const float row_max = threadgroup_max(m, scratch, lane, simd_group, n_simd);
  // m = -inf (no finite or +inf element): s is 0, or NaN from a NaN element, and must stay so (not exp(-inf - -inf)
  // = NaN for an all -inf thread, not 0 for a NaN one: max drops a NaN, only the sum carries it to the row's lse).
  s = m == -INFINITY ? (isnan(s) ? s : 0.0f) : s * exp_nonpositive(m - row_max);
  const float lse = row_max + precise::log(threadgroup_sum(s, scratch, lane, simd_group, n_simd));
  z_sum = threadgroup_sum(z_sum, scratch, lane, simd_group, n_simd);
  // Reduced, not re-read by thread 0: with grad == logits another thread may already overwrite z[target] below.
  z_target = threadgroup_sum(z_target, scratch, lane, simd_group, n_simd);
  const float eps = p.label_smoothing;
  if (tid == 0) {
    float row_loss = 0.0f;
    if (valid) {
      row_loss = lse - (1.0f - eps) * z_target;
      if (eps > 0.0f) {
        row_loss -= eps * z_sum / float(p.vocab);
      }
    }
    loss[row] = row_loss;
  }
  if (p.want_grad == 0) {
    return;
  }
  // Pass 2: re-read the row, write the gradient (the same elements, by the same thread).
  device T* gr = grad + ulong(row) * p.vocab;
  const float scale = load_uniform(row_scale, row, lane);
  const float smooth = eps / float(p.vocab);
  for (uint c = tid; c < p.vocab; c += threads) {
    const float x = float(zr[c]);
    float g = 0.0f;
    if (valid) {
      const float z = capped_logit(x, p.softcap);
      g = exp_nonpositive(z - lse) - smooth - (int(c) == t ? 1.0f - eps : 0.0f);
      if (p.softcap > 0.0f) {
        const float th = z / p.softcap;
        g *= 1.0f - th * th;
      }
      g *= scale;
    }
    gr[c] = static_cast<T>(g);
  }
}

// ---- instantiations ----------------------------------------------------------------------------------
template [[host_name("cross_entropy_rows_looped_float")]] [[kernel]] decltype(cross_entropy_rows_looped<float>) cross_entropy_rows_looped<float>;
template [[host_name("cross_entropy_rows_looped_half")]] [[kernel]] decltype(cross_entropy_rows_looped<half>) cross_entropy_rows_looped<half>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("cross_entropy_rows_looped_bfloat")]] [[kernel]] decltype(cross_entropy_rows_looped<bfloat>) cross_entropy_rows_looped<bfloat>;
#endif
