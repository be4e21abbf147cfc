// Argument structs shared by the host launch code (C++/Objective-C++) and the Metal shaders, so their
// layouts cannot drift apart. Only 32-bit fields: identical layout in MSL and C++.
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

// LoRA low-rank kernels (shaders/lora_linear.metal, variant "tiled"): the largest rank the kernels take, the
// register accumulators per thread for the group's (token, rank) cells, the most token rows per threadgroup, and
// the two threadgroup tiles in floats (input rows / second factor, and first factor / the group's h).
TMF_SHARED_CONSTANT uint kLoraMaxRank = 256;
TMF_SHARED_CONSTANT uint kLoraAccumulatorsPerThread = 16;
TMF_SHARED_CONSTANT uint kLoraMaxTokensPerGroup = 128;
TMF_SHARED_CONSTANT uint kLoraRowTileFloats = 2048;
TMF_SHARED_CONSTANT uint kLoraRankTileFloats = 4096;

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
};

// LoRA low-rank kernels: one threadgroup per `tokens_per_group` token rows. Chosen by the host
// (tmf/launch/lora_linear.h) so that tokens_per_group * rank fits the accumulators and the rank tile,
// tokens_per_group * reduce_tile the row tile, rank * reduce_tile the rank tile and rank * out_tile the row tile.
struct LoraParams {
  uint tokens;
  uint in_features;
  uint out_features;
  uint rank;
  uint x_row_stride;   // forward: x; backward: unused
  uint dy_row_stride;  // backward: dy
  float scale;
  uint has_mask;  // dropout mask (pre-scaled by 1/(1-p)), contiguous (tokens, in)
  uint tokens_per_group;
  uint reduce_tile;  // columns of the reduced dimension (in forward, out backward) staged per step of h = in·Fᵀ
  uint out_tile;     // output columns staged per step of out += s·h·S
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
};

}  // namespace tmf
