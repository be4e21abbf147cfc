// Rotary position embedding of q and k, forward and backward (the transposed rotation), in one dispatch, float32 math
// for float32, float16 and bfloat16. Launch code: torch_metal_fused/backends/metal.py (rope_apply); used by torch_metal_fused/ops/rope.py.
//
// Hugging Face's apply_rotary_pos_emb computes q·cos + rotate_half(q)·sin (and the same for k) in four elementwise
// kernels per tensor, plus a rotate_half temporary; here one thread per (batch, position, slot) loads its cos/sin
// values once and walks every head of q, then of k (GQA: different head counts), reading each element once and
// writing it once: q and k in, q and k out, cos and sin once per position — the minimum traffic. Slots and the
// rotation are described at tmf::RopeParams (csrc/include/tmf/shader_args.h).
#include <metal_stdlib>
#include "tmf/shader_args.h"
using namespace metal;

// Rotates (or, with p.backward, rotates back) the pair (a, b) of every head of one tensor at one position.
//   forward:  out_a = x_a·cos_a - x_b·sin_a,  out_b = x_b·cos_b + x_a·sin_b
//   backward: out_a = x_a·cos_a + x_b·sin_b,  out_b = x_b·cos_b - x_a·sin_a   (x: the incoming gradient)
template <typename T>
inline void rope_rotate_heads(device const T* x, ulong x_base, uint head_stride, device T* out, ulong out_base,
                              uint heads, uint out_head_stride, uint a, uint b, float cos_a, float cos_b,
                              float sin_for_a, float sin_for_b) {
  for (uint h = 0; h < heads; ++h) {
    device const T* xr = x + x_base + ulong(h) * head_stride;
    device T* o = out + out_base + ulong(h) * out_head_stride;
    const float xa = float(xr[a]);
    const float xb = float(xr[b]);
    o[a] = static_cast<T>(xa * cos_a - xb * sin_for_a);
    o[b] = static_cast<T>(xb * cos_b + xa * sin_for_b);
  }
}

// Copies element e (past the rotary part: partial rotary) of every head of one tensor at one position.
template <typename T>
inline void rope_copy_heads(device const T* x, ulong x_base, uint head_stride, device T* out, ulong out_base,
                            uint heads, uint out_head_stride, uint e) {
  for (uint h = 0; h < heads; ++h) {
    out[out_base + ulong(h) * out_head_stride + e] = x[x_base + ulong(h) * head_stride + e];
  }
}

template <typename T>
[[kernel]] void rope_apply(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* cos_table [[buffer(2)]],
    device const T* sin_table [[buffer(3)]],
    device T* q_out [[buffer(4)]],
    device T* k_out [[buffer(5)]],
    constant tmf::RopeParams& p [[buffer(6)]],
    uint group [[threadgroup_position_in_grid]],
    uint tid [[thread_position_in_threadgroup]],
    uint threads [[threads_per_threadgroup]]) {
  const uint half_rotary = p.rotary_dim / 2;
  const uint slots = half_rotary + (p.head_dim - p.rotary_dim);
  const uint index = group * threads + tid;
  const uint position = index / slots;  // batch · seq + s
  if (position >= p.batch * p.seq) {
    return;
  }
  const uint slot = index - position * slots;
  const uint bi = position / p.seq;
  const uint s = position - bi * p.seq;
  const ulong q_base = ulong(bi) * p.q_batch_stride + ulong(s) * p.q_seq_stride;
  const ulong k_base = ulong(bi) * p.k_batch_stride + ulong(s) * p.k_seq_stride;
  // Outputs are contiguous (batch, heads, seq, head_dim): heads seq · head_dim apart.
  const uint out_head_stride = p.seq * p.head_dim;
  const ulong q_out_base = (ulong(bi) * p.q_heads * p.seq + s) * p.head_dim;
  const ulong k_out_base = (ulong(bi) * p.k_heads * p.seq + s) * p.head_dim;
  if (slot < half_rotary) {
    const uint a = p.interleaved != 0 ? 2 * slot : slot;
    const uint b = p.interleaved != 0 ? 2 * slot + 1 : slot + half_rotary;
    const ulong cs = ulong(bi) * p.cos_batch_stride + ulong(s) * p.rotary_dim;
    const float cos_a = float(cos_table[cs + a]);
    const float cos_b = float(cos_table[cs + b]);
    const float sin_a = float(sin_table[cs + a]);
    const float sin_b = float(sin_table[cs + b]);
    // The backward rotation is the transpose: each element takes its partner's sine, with the opposite sign.
    const float sin_for_a = p.backward != 0 ? -sin_b : sin_a;
    const float sin_for_b = p.backward != 0 ? -sin_a : sin_b;
    rope_rotate_heads(q, q_base, p.q_head_stride, q_out, q_out_base, p.q_heads, out_head_stride, a, b, cos_a, cos_b,
                      sin_for_a, sin_for_b);
    rope_rotate_heads(k, k_base, p.k_head_stride, k_out, k_out_base, p.k_heads, out_head_stride, a, b, cos_a, cos_b,
                      sin_for_a, sin_for_b);
  } else {
    const uint e = p.rotary_dim + (slot - half_rotary);
    rope_copy_heads(q, q_base, p.q_head_stride, q_out, q_out_base, p.q_heads, out_head_stride, e);
    rope_copy_heads(k, k_base, p.k_head_stride, k_out, k_out_base, p.k_heads, out_head_stride, e);
  }
}

// ---- instantiations: host names are <kernel>_<dtype>, as composed by tmf::launch::kernel_name ----------
template [[host_name("rope_apply_float")]] [[kernel]] decltype(rope_apply<float>) rope_apply<float>;
template [[host_name("rope_apply_half")]] [[kernel]] decltype(rope_apply<half>) rope_apply<half>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("rope_apply_bfloat")]] [[kernel]] decltype(rope_apply<bfloat>) rope_apply<bfloat>;
#endif
