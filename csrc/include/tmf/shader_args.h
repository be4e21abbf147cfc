// Argument structs shared by the host launch code (torch_metal_fused/backends/shader_args.py reads this file) and the
// Metal shaders, so their layouts cannot drift apart. Only 32-bit fields: identical layout in MSL and on the host,
// where each struct is bound as int32 words (torch.mps.compile_shader's arg_casts).
#pragma once

#ifndef __METAL_VERSION__
#include <cstdint>
#define TMF_SHARED_CONSTANT constexpr
namespace tmf {
using uint = uint32_t;
#else
#define TMF_SHARED_CONSTANT constant constexpr
namespace tmf {
#endif

// Row kernels (softmax, RMSNorm), single_row variants: elements each thread keeps in registers, so rows up to
// 8 x 1024 = 8192 wide are read once; longer rows (or a pipeline allowing fewer threads) take the looped variants.
TMF_SHARED_CONSTANT uint kRowElementsPerThread = 8;

// LoRA low-rank kernels (shaders/lora_linear.metal, variant "tiled"): the largest rank the kernels take, and the
// rank entries one thread keeps in registers (a "rank block"): in the reduce kernels one token's accumulators, in the
// expand kernels one output column's factor values. Ranks above a block take several threads per token (reduce) or
// one expand dispatch per block.
TMF_SHARED_CONSTANT uint kLoraMaxRank = 256;
TMF_SHARED_CONSTANT uint kLoraRanksPerThread = 64;

// RMSNorm dw reduce: columns per threadgroup, and the most slices of partial rows summed side by side
// (threads / kDwReduceColumns of them).
TMF_SHARED_CONSTANT uint kDwReduceColumns = 32;
TMF_SHARED_CONSTANT uint kDwReduceMaxSlices = 32;

// Row-wise kernels (softmax, RMSNorm): `rows` rows of `cols` elements; row i of x starts at
// x + i * x_row_stride (elements; the last dimension is contiguous); outputs are contiguous.
struct RowParams {
  uint rows;
  uint cols;
  uint x_row_stride;
  uint dy_row_stride;  // backward kernels: the incoming gradient's row stride
  uint rows_per_group;  // rows handled by one threadgroup: rows [group * rows_per_group, +rows_per_group)
  float eps;            // RMSNorm
  float weight_offset;  // RMSNorm: y = x * rstd * (w + weight_offset) (Gemma's 1 + w)
  uint residual_row_stride;  // RMSNorm add variants: the residual's row stride (h = x + residual, contiguous)
};

// RMSNorm backward: each of `groups` threadgroups walks rows group, group + groups, ... and writes one
// float32 row of dw partial sums; rms_norm_backward_dw_reduce sums the `groups` partial rows.
struct RmsNormBackwardParams {
  uint rows;
  uint cols;
  uint x_row_stride;
  uint dy_row_stride;
  uint groups;
  uint has_weight;
  float weight_offset;
  uint d_residual_row_stride;  // add variants: the row stride of h's incoming gradient, added to dx
};

// LoRA reduce kernels (lora_forward_h, lora_backward_dh): h = scale · in·Fᵀ over `reduce_dim` columns, one
// threadgroup per `tokens_per_group` token rows, with tokens_per_group · ceil(rank / kLoraRanksPerThread) threads
// (one per token and rank block). Forward: in = x (dropout mask applied while staging), F = A, scale 1. Backward:
// in = dy, F = Bᵀ, scale = the adapter's scale. Chosen by the host (torch_metal_fused/backends/metal.py).
struct LoraReduceParams {
  uint tokens;
  uint reduce_dim;     // in_features forward, out_features backward
  uint rank;
  uint in_row_stride;  // elements between rows of the input (x or dy); the mask is contiguous (tokens x reduce_dim)
  float scale;
  uint has_mask;
  uint tokens_per_group;
  uint reduce_tile;  // reduced columns staged per step: [tokens_per_group][reduce_tile + 1] and [reduce_tile][rank]
};

// LoRA expand kernels (lora_forward_y, lora_backward_dx): out[t][o] += scale · Σ_j h[t][j]·S[j][o] (· mask[t][o]
// backward) for the rank block j in [rank_offset, rank_offset + rank_count). A threadgroup takes
// `columns_per_group` output columns (one per thread, its S values in registers) and `tokens_per_group` token
// rows, walked `tokens_per_step` rows of h at a time through threadgroup memory. Forward: h = dropout(x)·Aᵀ,
// S = Bᵀ, out = y. Backward: h = dh, S = A, out = dx, mask = the dropout mask (contiguous like dx).
struct LoraExpandParams {
  uint tokens;
  uint out_dim;  // out_features forward, in_features backward
  uint rank;     // h's row length
  uint rank_offset;
  uint rank_count;  // <= kLoraRanksPerThread
  float scale;
  uint has_mask;
  uint columns_per_group;
  uint tokens_per_group;
  uint tokens_per_step;
};

// Cross-entropy row pass (shaders/cross_entropy.metal): one threadgroup per row of `vocab` logits; the loss per row
// (float32) and, when want_grad, the gradient row_scale[row] · d(loss)/d(logits) written over `grad` (which may be
// the logits buffer itself: every element is read, then written, by the same thread).
struct CrossEntropyParams {
  uint rows;
  uint vocab;
  uint logits_row_stride;  // elements; grad rows are contiguous (vocab apart)
  int ignore_index;
  float label_smoothing;
  float softcap;  // 0: none; else z = softcap · tanh(logits / softcap)
  uint want_grad;
  // 32-bit words from one row's target to the next: int64 targets are read as their low word (Apple GPUs are
  // little-endian), exact because the op checks every target against [0, vocab) or ignore_index first.
  uint target_word_stride;
};

// Gated activations (shaders/glu.metal): out = act(gate) · up over `rows` rows of `cols` elements (gate, up and the
// incoming gradient with their own row strides, in elements; outputs contiguous). Each thread owns
// kGluElementsPerThread contiguous elements of one row; threadgroup g covers row g / groups_per_row, elements
// (g % groups_per_row) · threads · kGluElementsPerThread onwards. Contiguous inputs are launched as one flat row.
TMF_SHARED_CONSTANT uint kGluElementsPerThread = 4;
TMF_SHARED_CONSTANT uint kGluSilu = 0;      // act = silu (SwiGLU: Llama, Mistral, Qwen)
TMF_SHARED_CONSTANT uint kGluGeluTanh = 1;  // act = gelu, tanh approximation (GeGLU: Gemma's gelu_pytorch_tanh)
struct GluParams {
  uint rows;
  uint cols;
  uint groups_per_row;
  uint gate_row_stride;
  uint up_row_stride;
  uint dout_row_stride;  // backward
};

// Rotary position embedding (shaders/rope.metal) of q (batch, q_heads, seq, head_dim) and k (batch, k_heads, seq,
// head_dim) in one dispatch, each with its own strides (elements; head_dim contiguous); outputs contiguous in that
// order. cos and sin: (batch or 1, seq, rotary_dim), contiguous rows (cos_batch_stride 0 broadcasts one batch). One
// thread per (batch, position, slot) holds its cos/sin values in registers and walks every head of q, then of k, so
// cos and sin are read once per position. Slots: rotary_dim / 2 rotation pairs — (i, i + rotary_dim / 2) in the
// rotate_half convention (Hugging Face), (2i, 2i + 1) interleaved — then head_dim - rotary_dim elements copied as they
// are. Forward: out_a = x_a·cos_a - x_b·sin_a, out_b = x_b·cos_b + x_a·sin_b for a pair (a, b); backward (the
// transpose): dx_a = g_a·cos_a + g_b·sin_b, dx_b = g_b·cos_b - g_a·sin_a.
struct RopeParams {
  uint batch;
  uint seq;
  uint head_dim;
  uint rotary_dim;
  uint q_heads;
  uint k_heads;
  uint q_batch_stride;
  uint q_head_stride;
  uint q_seq_stride;
  uint k_batch_stride;
  uint k_head_stride;
  uint k_seq_stride;
  uint cos_batch_stride;  // 0: one batch of cos/sin for all; cos_seq_stride is rotary_dim
  uint interleaved;
  uint backward;
};

// Attention (shaders/attention.metal): rows of K and V (forward, dQ) or of Q and dout (dK/dV) are staged in
// threadgroup memory as float, kAttentionTileFloats / head_dim rows per block (a multiple of 8, at most
// kAttentionMaxBlockRows), two such tiles per threadgroup: 16 KiB.
TMF_SHARED_CONSTANT uint kAttentionTileFloats = 2048;
TMF_SHARED_CONSTANT uint kAttentionMaxBlockRows = 32;

// Attention kernels. Every tensor is (batch, heads, rows, head_dim) with a contiguous last dimension and these
// strides (elements); lse and delta are contiguous float32 (batch, q_heads, q_len). Query head h reads kv head
// h / (q_heads / kv_heads). Causal: query i sees key j <= i + kv_len - q_len; window > 0 (causal only) also drops
// keys j <= i + kv_len - q_len - window. softcap > 0: logits become softcap * tanh(logit / softcap). A threadgroup
// takes rows_per_group rows (8 per SIMD-group): query rows (forward, dQ, delta) or key rows (dK/dV).
struct AttentionParams {
  uint batch;
  uint q_heads;
  uint kv_heads;
  uint q_len;
  uint kv_len;
  uint head_dim;
  uint q_batch_stride;  // q (B, Hq, S, D)
  uint q_head_stride;
  uint q_row_stride;
  uint k_batch_stride;  // k (B, Hkv, Sk, D)
  uint k_head_stride;
  uint k_row_stride;
  uint v_batch_stride;  // v, like k
  uint v_head_stride;
  uint v_row_stride;
  uint o_batch_stride;  // out: written forward, read by the delta pass
  uint o_head_stride;
  uint o_row_stride;
  uint do_batch_stride;  // the incoming gradient dout (like out)
  uint do_head_stride;
  uint do_row_stride;
  uint dq_batch_stride;  // dq (like q)
  uint dq_head_stride;
  uint dq_row_stride;
  uint dk_batch_stride;  // dk (like k)
  uint dk_head_stride;
  uint dk_row_stride;
  uint dv_batch_stride;  // dv (like v)
  uint dv_head_stride;
  uint dv_row_stride;
  uint mask_batch_stride;  // the additive mask (B, Hq, S, Sk); 0 where broadcast
  uint mask_head_stride;
  uint mask_row_stride;
  uint has_mask;
  uint causal;
  uint window;  // 0: none
  float scale;
  float softcap;  // 0: none
  uint rows_per_group;
};

}  // namespace tmf
