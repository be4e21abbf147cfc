// 8x8 simdgroup_matrix helpers shared by the kernels that multiply on them (LoRA, attention).
#pragma once
#include <metal_stdlib>
using namespace metal;

constant constexpr uint TILE = 8;  // simdgroup matrices are 8 x 8

// The two elements of an 8x8 simdgroup matrix that a lane holds: (row, col) and (row, col + 1). Apple's layout,
// as MLX uses it (steel/gemm/mma.h): lanes 0-7 rows 0-3 x columns 0-3, lanes 8-15 rows 0-3 x columns 4-7, lanes
// 16-31 rows 4-7 alike. The harness implements the same (csrc/emu/include/tmf_emu/runtime_api.h). The four lanes
// holding one row differ in lane bits 0 and 3: a row's reduction is two simd_shuffle_xor steps (1, then 8).
struct LanePosition {
  uint row, col;
};
inline LanePosition lane_matrix_position(uint lane) {
  const uint quad = lane / 4;
  return LanePosition{(quad & 4) + (lane / 2) % 4, (quad & 2) * 2 + (lane % 2) * 2};
}
