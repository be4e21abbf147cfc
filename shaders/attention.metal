// Fused attention, forward and backward (FlashAttention-2's algorithm), in float32, float16 and bfloat16 with float32
// accumulation; products on 8x8 simdgroup matrices. Launch code and every size: torch_metal_fused/backends/metal.py
// (attention_*); the argument struct and its semantics: tmf::AttentionParams.
//   forward (attention_forward_d<D>): a threadgroup takes rows_per_group query rows of one (batch, head); each
//     SIMD-group owns 8 of them, holding their q (scores' left operand) and the output accumulators as D/8
//     simdgroup matrices each. K and V are staged block by block (BK rows: kAttentionTileFloats / D) in threadgroup
//     memory as float, shared by the group's SIMD-groups, so K and V are read once per group of query rows. Online
//     softmax: each lane holds two scores of a row per 8x8 tile (lane_matrix_position), rows reduce with two
//     shuffles; the accumulators are rescaled in registers. Writes out and the float32 log-sum-exp; nothing else is
//     kept for backward.
//   delta (attention_backward_delta_rows): delta = rowsum(dout * out) in float32, one SIMD-group per row.
//   dQ (attention_backward_dq_d<D>): as the forward, with q, dout and the dq accumulators in registers;
//     probabilities recomputed from the log-sum-exp, dS = P * (dP - delta).
//   dK/dV (attention_backward_dkdv_d<D>): a threadgroup takes rows_per_group key rows of one kv head; each
//     SIMD-group owns 8, holding k, v and the dk, dv accumulators in registers, and walks every query head of the
//     group (grouped-query attention sums in registers, no atomics) through blocks of q and dout staged in
//     threadgroup memory (the block's lse and delta one per lane, shared by shuffles).
// Blocks that no row of the group may see (causal, window) are skipped; a block's keys or queries past the end are
// zero-filled and dropped. Rows with no visible key give zeros (lse = -inf). NaN propagates: the row maxima keep
// NaN (MSL's max drops it), and exp_nonpositive passes it through.
#include <metal_stdlib>
#include "reduce.h"
#include "simdgroup_matrix.h"
#include "tmf/shader_args.h"
using namespace metal;

// Rows per staged block for head dim D: kAttentionTileFloats / D, a whole number of tiles, at most 32.
template <uint D>
struct AttentionBlock {
  static constant constexpr uint fitting = tmf::kAttentionTileFloats / D / TILE * TILE;
  static constant constexpr uint rows = fitting < tmf::kAttentionMaxBlockRows ? fitting : tmf::kAttentionMaxBlockRows;
};

inline float max_keep_nan(float a, float b) {
  return isnan(a) || isnan(b) ? a + b : max(a, b);
}

// The sum, then the max, over the four lanes that hold one row of an 8x8 simdgroup matrix.
inline float row_sum(float v) {
  v += simd_shuffle_xor(v, 1);
  return v + simd_shuffle_xor(v, 8);
}
inline float row_max(float v) {
  v = max_keep_nan(v, simd_shuffle_xor(v, 1));
  return max_keep_nan(v, simd_shuffle_xor(v, 8));
}

inline bool key_visible(uint qi, uint kj, constant tmf::AttentionParams& p) {
  if (qi >= p.q_len || kj >= p.kv_len) {
    return false;
  }
  if (p.causal == 0) {
    return true;
  }
  const long last = long(qi) + long(p.kv_len) - long(p.q_len);  // the last key query qi sees
  return long(kj) <= last && (p.window == 0 || long(kj) > last - long(p.window));
}

// The logit of query qi and key kj from their dot product: scaled, soft-capped (tanh_out: the tanh, for the
// backward's chain rule), the mask added; -inf where the key is not visible.
template <typename T>
inline float attention_logit(float dot, uint qi, uint kj, constant tmf::AttentionParams& p, device const T* mask,
                             thread float& tanh_out) {
  tanh_out = 0.0f;
  if (!key_visible(qi, kj, p)) {
    return -INFINITY;
  }
  float x = dot * p.scale;
  if (p.softcap > 0.0f) {
    tanh_out = precise::tanh(x / p.softcap);
    x = p.softcap * tanh_out;
  }
  if (p.has_mask != 0) {
    x += float(mask[ulong(qi) * p.mask_row_stride + kj]);
  }
  return x;
}

// MSL's clamp is declared for 32-bit and smaller integers; the bounds below are signed 64-bit.
inline long clamp_long(long v, long lo, long hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// [begin, end) of the keys any of the query rows [q0, q1) may see (q1 > q0).
inline uint2 key_range(uint q0, uint q1, constant tmf::AttentionParams& p) {
  if (p.causal == 0) {
    return uint2(0, p.kv_len);
  }
  const long offset = long(p.kv_len) - long(p.q_len);
  const long end = clamp_long(long(q1) - 1 + offset + 1, 0, long(p.kv_len));
  const long begin = p.window == 0 ? 0L : clamp_long(long(q0) + offset - long(p.window) + 1, 0, end);
  return uint2(uint(begin), uint(end));
}

// [begin, end) of the queries that may see any of the keys [k0, k1) (k1 > k0).
inline uint2 query_range(uint k0, uint k1, constant tmf::AttentionParams& p) {
  if (p.causal == 0) {
    return uint2(0, p.q_len);
  }
  const long offset = long(p.kv_len) - long(p.q_len);
  const long begin = clamp_long(long(k0) - offset, 0, long(p.q_len));
  if (p.window == 0) {
    return uint2(uint(begin), p.q_len);
  }
  const long end = clamp_long(long(k1) - 1 - offset + long(p.window), begin, long(p.q_len));
  return uint2(uint(begin), uint(end));
}

// rows [r0, r0 + n) of a (rows, D) operand -> tile[BLOCK][D] as float, zero past n.
template <typename T, uint D, uint BLOCK>
inline void stage_rows(device const T* src, uint row_stride, uint r0, uint n, threadgroup float* tile, uint tid,
                       uint threads) {
  for (uint e = tid; e < BLOCK * D; e += threads) {
    const uint r = e / D, c = e % D;
    tile[e] = r < n ? float(src[ulong(r0 + r) * row_stride + c]) : 0.0f;
  }
}

// This lane's elements of the 8 rows [r0, r0 + 8) of a (rows, D) operand as D/8 simdgroup matrices, zero past `rows`.
template <typename T, uint D>
inline void load_row_tiles(thread simdgroup_float8x8* tiles, device const T* src, uint row_stride, uint r0, uint rows,
                           LanePosition at) {
  const uint r = r0 + at.row;
  #pragma clang loop unroll(full)
  for (uint d = 0; d < D / TILE; ++d) {
    #pragma clang loop unroll(full)
    for (uint e = 0; e < 2; ++e) {
      tiles[d].thread_elements()[e] = r < rows ? float(src[ulong(r) * row_stride + d * TILE + at.col + e]) : 0.0f;
    }
  }
}

template <typename T, uint D>
inline void store_row_tiles(const thread simdgroup_float8x8* tiles, float factor, device T* dst, uint row_stride,
                            uint r0, uint rows, LanePosition at) {
  const uint r = r0 + at.row;
  if (r >= rows) {
    return;
  }
  #pragma clang loop unroll(full)
  for (uint d = 0; d < D / TILE; ++d) {
    #pragma clang loop unroll(full)
    for (uint e = 0; e < 2; ++e) {
      dst[ulong(r) * row_stride + d * TILE + at.col + e] = static_cast<T>(tiles[d].thread_elements()[e] * factor);
    }
  }
}

// acc[j] = rows x tile_rows[8j, 8j + 8)ᵀ: the (8 x BLOCK) products of 8 register rows with BLOCK staged rows.
template <uint D, uint BLOCK>
inline void products_with_staged(thread simdgroup_float8x8* acc, const thread simdgroup_float8x8* rows,
                                 const threadgroup float* tile) {
  #pragma clang loop unroll(full)
  for (uint j = 0; j < BLOCK / TILE; ++j) {
    acc[j] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    #pragma clang loop unroll(full)
    for (uint d = 0; d < D / TILE; ++d) {
      simdgroup_float8x8 staged_t;
      simdgroup_load(staged_t, tile + j * TILE * D + d * TILE, D, ulong2(0, 0), true);
      simdgroup_multiply_accumulate(acc[j], rows[d], staged_t, acc[j]);
    }
  }
}

// out[d] += weights (8 x BLOCK) x tile (BLOCK x D).
template <uint D, uint BLOCK>
inline void accumulate_weighted_rows(thread simdgroup_float8x8* out, const thread simdgroup_float8x8* weights,
                                     const threadgroup float* tile) {
  #pragma clang loop unroll(full)
  for (uint d = 0; d < D / TILE; ++d) {
    #pragma clang loop unroll(full)
    for (uint j = 0; j < BLOCK / TILE; ++j) {
      simdgroup_float8x8 staged;
      simdgroup_load(staged, tile + j * TILE * D + d * TILE, D);
      simdgroup_multiply_accumulate(out[d], weights[j], staged, out[d]);
    }
  }
}

template <typename T, uint D>
[[kernel]] void attention_forward(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device T* out [[buffer(4)]],
    device float* lse [[buffer(5)]],
    constant tmf::AttentionParams& p [[buffer(6)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint3 tid [[thread_position_in_threadgroup]],
    uint3 threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BK = AttentionBlock<D>::rows;
  constexpr uint DT = D / TILE, KT = BK / TILE;
  threadgroup float k_tile[BK * D];
  threadgroup float v_tile[BK * D];
  const uint b = group.z, h = group.y, hk = h / (p.q_heads / p.kv_heads);
  const uint q0 = group.x * p.rows_per_group, q1 = min(q0 + p.rows_per_group, p.q_len);
  const uint row0 = q0 + simd_group * TILE;  // this SIMD-group's 8 query rows
  const bool has_rows = row0 < p.q_len;      // uniform per SIMD-group
  const LanePosition at = lane_matrix_position(lane);
  const uint qi = row0 + at.row;  // this lane's query row
  device const T* q_bh = q + ulong(b) * p.q_batch_stride + ulong(h) * p.q_head_stride;
  device const T* k_bh = k + ulong(b) * p.k_batch_stride + ulong(hk) * p.k_head_stride;
  device const T* v_bh = v + ulong(b) * p.v_batch_stride + ulong(hk) * p.v_head_stride;
  device const T* mask_bh = mask + ulong(b) * p.mask_batch_stride + ulong(h) * p.mask_head_stride;
  simdgroup_float8x8 q_rows[DT], o_acc[DT];
  load_row_tiles<T, D>(q_rows, q_bh, p.q_row_stride, row0, p.q_len, at);
  #pragma clang loop unroll(full)
  for (uint d = 0; d < DT; ++d) {
    o_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  float m = -INFINITY, l = 0.0f;  // this lane's row: running max and sum
  const uint2 keys = key_range(q0, q1, p);
  for (uint k0 = keys.x; k0 < keys.y; k0 += BK) {
    const uint n = min(BK, p.kv_len - k0);
    stage_rows<T, D, BK>(k_bh, p.k_row_stride, k0, n, k_tile, tid.x, threads.x);
    stage_rows<T, D, BK>(v_bh, p.v_row_stride, k0, n, v_tile, tid.x, threads.x);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (has_rows) {
      simdgroup_float8x8 s[KT];
      products_with_staged<D, BK>(s, q_rows, k_tile);
      float block_max = -INFINITY;
      #pragma clang loop unroll(full)
      for (uint j = 0; j < KT; ++j) {
        #pragma clang loop unroll(full)
        for (uint e = 0; e < 2; ++e) {
          float t;
          const float x = attention_logit(s[j].thread_elements()[e], qi, k0 + j * TILE + at.col + e, p, mask_bh, t);
          s[j].thread_elements()[e] = x;
          block_max = max_keep_nan(block_max, x);
        }
      }
      const float m_new = max_keep_nan(m, row_max(block_max));
      const float base = m_new == -INFINITY ? 0.0f : m_new;  // no visible key yet: every p is 0
      const float alpha = exp_nonpositive(m - base);
      float sum = 0.0f;
      #pragma clang loop unroll(full)
      for (uint j = 0; j < KT; ++j) {
        #pragma clang loop unroll(full)
        for (uint e = 0; e < 2; ++e) {
          const float pe = exp_nonpositive(s[j].thread_elements()[e] - base);
          s[j].thread_elements()[e] = pe;
          sum += pe;
        }
      }
      l = l * alpha + row_sum(sum);
      m = m_new;
      #pragma clang loop unroll(full)
      for (uint d = 0; d < DT; ++d) {
        o_acc[d].thread_elements() *= alpha;
      }
      accumulate_weighted_rows<D, BK>(o_acc, s, v_tile);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);  // the tiles are restaged by the next block
  }
  if (!has_rows) {
    return;
  }
  const float inv = l == 0.0f ? 0.0f : 1.0f / l;  // no visible key: zeros (NaN stays NaN)
  store_row_tiles<T, D>(o_acc, inv, out + ulong(b) * p.o_batch_stride + ulong(h) * p.o_head_stride, p.o_row_stride,
                        row0, p.q_len, at);
  if (at.col == 0 && qi < p.q_len) {
    lse[(ulong(b) * p.q_heads + h) * p.q_len + qi] = l == 0.0f ? -INFINITY : m + log(l);
  }
}

// delta[row] = Σ_d dout[row][d] · out[row][d], one SIMD-group per (batch, head, query) row.
template <typename T>
[[kernel]] void attention_backward_delta(
    device const T* out [[buffer(0)]],
    device const T* dout [[buffer(1)]],
    device float* delta [[buffer(2)]],
    constant tmf::AttentionParams& p [[buffer(3)]],
    uint group [[threadgroup_position_in_grid]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  const ulong row = ulong(group) * p.rows_per_group + simd_group;
  if (row >= ulong(p.batch) * p.q_heads * p.q_len) {
    return;
  }
  const uint i = uint(row % p.q_len), h = uint(row / p.q_len % p.q_heads), b = uint(row / p.q_len / p.q_heads);
  device const T* o_row = out + ulong(b) * p.o_batch_stride + ulong(h) * p.o_head_stride + ulong(i) * p.o_row_stride;
  device const T* do_row =
      dout + ulong(b) * p.do_batch_stride + ulong(h) * p.do_head_stride + ulong(i) * p.do_row_stride;
  float sum = 0.0f;
  for (uint d = lane; d < p.head_dim; d += 32) {
    sum += float(do_row[d]) * float(o_row[d]);
  }
  sum = simd_sum(sum);
  if (lane == 0) {
    delta[row] = sum;
  }
}

template <typename T, uint D>
[[kernel]] void attention_backward_dq(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device const T* dout [[buffer(4)]],
    device const float* lse [[buffer(5)]],
    device const float* delta [[buffer(6)]],
    device T* dq [[buffer(7)]],
    constant tmf::AttentionParams& p [[buffer(8)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint3 tid [[thread_position_in_threadgroup]],
    uint3 threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BK = AttentionBlock<D>::rows;
  constexpr uint DT = D / TILE, KT = BK / TILE;
  threadgroup float k_tile[BK * D];
  threadgroup float v_tile[BK * D];
  const uint b = group.z, h = group.y, hk = h / (p.q_heads / p.kv_heads);
  const uint q0 = group.x * p.rows_per_group, q1 = min(q0 + p.rows_per_group, p.q_len);
  const uint row0 = q0 + simd_group * TILE;
  const bool has_rows = row0 < p.q_len;
  const LanePosition at = lane_matrix_position(lane);
  const uint qi = row0 + at.row;
  device const T* k_bh = k + ulong(b) * p.k_batch_stride + ulong(hk) * p.k_head_stride;
  device const T* v_bh = v + ulong(b) * p.v_batch_stride + ulong(hk) * p.v_head_stride;
  device const T* mask_bh = mask + ulong(b) * p.mask_batch_stride + ulong(h) * p.mask_head_stride;
  simdgroup_float8x8 q_rows[DT], do_rows[DT], dq_acc[DT];
  load_row_tiles<T, D>(q_rows, q + ulong(b) * p.q_batch_stride + ulong(h) * p.q_head_stride, p.q_row_stride, row0,
                       p.q_len, at);
  load_row_tiles<T, D>(do_rows, dout + ulong(b) * p.do_batch_stride + ulong(h) * p.do_head_stride, p.do_row_stride,
                       row0, p.q_len, at);
  #pragma clang loop unroll(full)
  for (uint d = 0; d < DT; ++d) {
    dq_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  const ulong stat = (ulong(b) * p.q_heads + h) * p.q_len + qi;
  const float row_lse = qi < p.q_len ? lse[stat] : -INFINITY;
  const float row_delta = qi < p.q_len ? delta[stat] : 0.0f;
  const uint2 keys = key_range(q0, q1, p);
  for (uint k0 = keys.x; k0 < keys.y; k0 += BK) {
    const uint n = min(BK, p.kv_len - k0);
    stage_rows<T, D, BK>(k_bh, p.k_row_stride, k0, n, k_tile, tid.x, threads.x);
    stage_rows<T, D, BK>(v_bh, p.v_row_stride, k0, n, v_tile, tid.x, threads.x);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (has_rows) {
      simdgroup_float8x8 s[KT], dp[KT];
      products_with_staged<D, BK>(s, q_rows, k_tile);
      products_with_staged<D, BK>(dp, do_rows, v_tile);
      #pragma clang loop unroll(full)
      for (uint j = 0; j < KT; ++j) {
        #pragma clang loop unroll(full)
        for (uint e = 0; e < 2; ++e) {
          float t;
          const float x = attention_logit(s[j].thread_elements()[e], qi, k0 + j * TILE + at.col + e, p, mask_bh, t);
          float ds = 0.0f;
          if (x != -INFINITY) {  // a dropped key has no gradient, whatever dP holds
            const float pe = exp_nonpositive(x - row_lse);  // x <= lse up to rounding
            ds = pe * (dp[j].thread_elements()[e] - row_delta) * (1.0f - t * t) * p.scale;
          }
          s[j].thread_elements()[e] = ds;
        }
      }
      accumulate_weighted_rows<D, BK>(dq_acc, s, k_tile);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  if (has_rows) {
    store_row_tiles<T, D>(dq_acc, 1.0f, dq + ulong(b) * p.dq_batch_stride + ulong(h) * p.dq_head_stride,
                          p.dq_row_stride, row0, p.q_len, at);
  }
}

template <typename T, uint D>
[[kernel]] void attention_backward_dkdv(
    device const T* q [[buffer(0)]],
    device const T* k [[buffer(1)]],
    device const T* v [[buffer(2)]],
    device const T* mask [[buffer(3)]],
    device const T* dout [[buffer(4)]],
    device const float* lse [[buffer(5)]],
    device const float* delta [[buffer(6)]],
    device T* dk [[buffer(7)]],
    device T* dv [[buffer(8)]],
    constant tmf::AttentionParams& p [[buffer(9)]],
    uint3 group [[threadgroup_position_in_grid]],
    uint3 tid [[thread_position_in_threadgroup]],
    uint3 threads [[threads_per_threadgroup]],
    uint lane [[thread_index_in_simdgroup]],
    uint simd_group [[simdgroup_index_in_threadgroup]]) {
  constexpr uint BQ = AttentionBlock<D>::rows;
  constexpr uint DT = D / TILE, QT = BQ / TILE;
  static_assert(BQ <= 32, "a block's lse and delta are held one per lane");
  threadgroup float q_tile[BQ * D];
  threadgroup float do_tile[BQ * D];
  const uint b = group.z, hk = group.y, heads_per_kv = p.q_heads / p.kv_heads;
  const uint k0 = group.x * p.rows_per_group, k1 = min(k0 + p.rows_per_group, p.kv_len);
  const uint row0 = k0 + simd_group * TILE;  // this SIMD-group's 8 key rows
  const bool has_rows = row0 < p.kv_len;
  const LanePosition at = lane_matrix_position(lane);
  const uint kj = row0 + at.row;  // this lane's key row
  simdgroup_float8x8 k_rows[DT], v_rows[DT], dk_acc[DT], dv_acc[DT];
  load_row_tiles<T, D>(k_rows, k + ulong(b) * p.k_batch_stride + ulong(hk) * p.k_head_stride, p.k_row_stride, row0,
                       p.kv_len, at);
  load_row_tiles<T, D>(v_rows, v + ulong(b) * p.v_batch_stride + ulong(hk) * p.v_head_stride, p.v_row_stride, row0,
                       p.kv_len, at);
  #pragma clang loop unroll(full)
  for (uint d = 0; d < DT; ++d) {
    dk_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
    dv_acc[d] = make_filled_simdgroup_matrix<float, 8, 8>(0.0f);
  }
  const uint2 queries = query_range(k0, k1, p);
  for (uint g = 0; g < heads_per_kv; ++g) {
    const uint h = hk * heads_per_kv + g;
    device const T* q_bh = q + ulong(b) * p.q_batch_stride + ulong(h) * p.q_head_stride;
    device const T* do_bh = dout + ulong(b) * p.do_batch_stride + ulong(h) * p.do_head_stride;
    device const T* mask_bh = mask + ulong(b) * p.mask_batch_stride + ulong(h) * p.mask_head_stride;
    const ulong stats = (ulong(b) * p.q_heads + h) * p.q_len;
    for (uint i0 = queries.x; i0 < queries.y; i0 += BQ) {
      const uint n = min(BQ, p.q_len - i0);
      stage_rows<T, D, BQ>(q_bh, p.q_row_stride, i0, n, q_tile, tid.x, threads.x);
      stage_rows<T, D, BQ>(do_bh, p.do_row_stride, i0, n, do_tile, tid.x, threads.x);
      threadgroup_barrier(mem_flags::mem_threadgroup);
      if (has_rows) {
        // The block's lse and delta, lane r holding query i0 + r's; each lane takes its columns' by shuffles. Kept
        // out of threadgroup memory, so the two tiles stay within the occupancy budget (64 bytes per thread).
        const float lane_lse = lane < n ? lse[stats + i0 + lane] : -INFINITY;
        const float lane_delta = lane < n ? delta[stats + i0 + lane] : 0.0f;
        simdgroup_float8x8 pt[QT], dpt[QT];  // (8 keys x BQ queries): probabilities, then dP
        products_with_staged<D, BQ>(pt, k_rows, q_tile);
        products_with_staged<D, BQ>(dpt, v_rows, do_tile);
        #pragma clang loop unroll(full)
        for (uint j = 0; j < QT; ++j) {
          #pragma clang loop unroll(full)
          for (uint e = 0; e < 2; ++e) {
            const uint c = j * TILE + at.col + e;
            const float c_lse = simd_shuffle(lane_lse, ushort(c)), c_delta = simd_shuffle(lane_delta, ushort(c));
            float t;
            const float x = attention_logit(pt[j].thread_elements()[e], i0 + c, kj, p, mask_bh, t);
            float pe = 0.0f, ds = 0.0f;
            if (x != -INFINITY) {
              pe = exp_nonpositive(x - c_lse);
              ds = pe * (dpt[j].thread_elements()[e] - c_delta) * (1.0f - t * t) * p.scale;
            }
            pt[j].thread_elements()[e] = pe;
            dpt[j].thread_elements()[e] = ds;
          }
        }
        accumulate_weighted_rows<D, BQ>(dv_acc, pt, do_tile);
        accumulate_weighted_rows<D, BQ>(dk_acc, dpt, q_tile);
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  if (has_rows) {
    store_row_tiles<T, D>(dk_acc, 1.0f, dk + ulong(b) * p.dk_batch_stride + ulong(hk) * p.dk_head_stride,
                          p.dk_row_stride, row0, p.kv_len, at);
    store_row_tiles<T, D>(dv_acc, 1.0f, dv + ulong(b) * p.dv_batch_stride + ulong(hk) * p.dv_head_stride,
                          p.dv_row_stride, row0, p.kv_len, at);
  }
}

template [[host_name("attention_backward_delta_rows_float")]] [[kernel]] decltype(attention_backward_delta<float>) attention_backward_delta<float>;
template [[host_name("attention_forward_d32_float")]] [[kernel]] decltype(attention_forward<float, 32>) attention_forward<float, 32>;
template [[host_name("attention_forward_d64_float")]] [[kernel]] decltype(attention_forward<float, 64>) attention_forward<float, 64>;
template [[host_name("attention_forward_d80_float")]] [[kernel]] decltype(attention_forward<float, 80>) attention_forward<float, 80>;
template [[host_name("attention_forward_d96_float")]] [[kernel]] decltype(attention_forward<float, 96>) attention_forward<float, 96>;
template [[host_name("attention_forward_d128_float")]] [[kernel]] decltype(attention_forward<float, 128>) attention_forward<float, 128>;
template [[host_name("attention_forward_d256_float")]] [[kernel]] decltype(attention_forward<float, 256>) attention_forward<float, 256>;
template [[host_name("attention_backward_dq_d32_float")]] [[kernel]] decltype(attention_backward_dq<float, 32>) attention_backward_dq<float, 32>;
template [[host_name("attention_backward_dq_d64_float")]] [[kernel]] decltype(attention_backward_dq<float, 64>) attention_backward_dq<float, 64>;
template [[host_name("attention_backward_dq_d80_float")]] [[kernel]] decltype(attention_backward_dq<float, 80>) attention_backward_dq<float, 80>;
template [[host_name("attention_backward_dq_d96_float")]] [[kernel]] decltype(attention_backward_dq<float, 96>) attention_backward_dq<float, 96>;
template [[host_name("attention_backward_dq_d128_float")]] [[kernel]] decltype(attention_backward_dq<float, 128>) attention_backward_dq<float, 128>;
template [[host_name("attention_backward_dq_d256_float")]] [[kernel]] decltype(attention_backward_dq<float, 256>) attention_backward_dq<float, 256>;
template [[host_name("attention_backward_dkdv_d32_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 32>) attention_backward_dkdv<float, 32>;
template [[host_name("attention_backward_dkdv_d64_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 64>) attention_backward_dkdv<float, 64>;
template [[host_name("attention_backward_dkdv_d80_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 80>) attention_backward_dkdv<float, 80>;
template [[host_name("attention_backward_dkdv_d96_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 96>) attention_backward_dkdv<float, 96>;
template [[host_name("attention_backward_dkdv_d128_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 128>) attention_backward_dkdv<float, 128>;
template [[host_name("attention_backward_dkdv_d256_float")]] [[kernel]] decltype(attention_backward_dkdv<float, 256>) attention_backward_dkdv<float, 256>;
template [[host_name("attention_backward_delta_rows_half")]] [[kernel]] decltype(attention_backward_delta<half>) attention_backward_delta<half>;
template [[host_name("attention_forward_d32_half")]] [[kernel]] decltype(attention_forward<half, 32>) attention_forward<half, 32>;
template [[host_name("attention_forward_d64_half")]] [[kernel]] decltype(attention_forward<half, 64>) attention_forward<half, 64>;
template [[host_name("attention_forward_d80_half")]] [[kernel]] decltype(attention_forward<half, 80>) attention_forward<half, 80>;
template [[host_name("attention_forward_d96_half")]] [[kernel]] decltype(attention_forward<half, 96>) attention_forward<half, 96>;
template [[host_name("attention_forward_d128_half")]] [[kernel]] decltype(attention_forward<half, 128>) attention_forward<half, 128>;
template [[host_name("attention_forward_d256_half")]] [[kernel]] decltype(attention_forward<half, 256>) attention_forward<half, 256>;
template [[host_name("attention_backward_dq_d32_half")]] [[kernel]] decltype(attention_backward_dq<half, 32>) attention_backward_dq<half, 32>;
template [[host_name("attention_backward_dq_d64_half")]] [[kernel]] decltype(attention_backward_dq<half, 64>) attention_backward_dq<half, 64>;
template [[host_name("attention_backward_dq_d80_half")]] [[kernel]] decltype(attention_backward_dq<half, 80>) attention_backward_dq<half, 80>;
template [[host_name("attention_backward_dq_d96_half")]] [[kernel]] decltype(attention_backward_dq<half, 96>) attention_backward_dq<half, 96>;
template [[host_name("attention_backward_dq_d128_half")]] [[kernel]] decltype(attention_backward_dq<half, 128>) attention_backward_dq<half, 128>;
template [[host_name("attention_backward_dq_d256_half")]] [[kernel]] decltype(attention_backward_dq<half, 256>) attention_backward_dq<half, 256>;
template [[host_name("attention_backward_dkdv_d32_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 32>) attention_backward_dkdv<half, 32>;
template [[host_name("attention_backward_dkdv_d64_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 64>) attention_backward_dkdv<half, 64>;
template [[host_name("attention_backward_dkdv_d80_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 80>) attention_backward_dkdv<half, 80>;
template [[host_name("attention_backward_dkdv_d96_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 96>) attention_backward_dkdv<half, 96>;
template [[host_name("attention_backward_dkdv_d128_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 128>) attention_backward_dkdv<half, 128>;
template [[host_name("attention_backward_dkdv_d256_half")]] [[kernel]] decltype(attention_backward_dkdv<half, 256>) attention_backward_dkdv<half, 256>;
#if defined(__HAVE_BFLOAT__)
template [[host_name("attention_backward_delta_rows_bfloat")]] [[kernel]] decltype(attention_backward_delta<bfloat>) attention_backward_delta<bfloat>;
template [[host_name("attention_forward_d32_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 32>) attention_forward<bfloat, 32>;
template [[host_name("attention_forward_d64_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 64>) attention_forward<bfloat, 64>;
template [[host_name("attention_forward_d80_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 80>) attention_forward<bfloat, 80>;
template [[host_name("attention_forward_d96_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 96>) attention_forward<bfloat, 96>;
template [[host_name("attention_forward_d128_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 128>) attention_forward<bfloat, 128>;
template [[host_name("attention_forward_d256_bfloat")]] [[kernel]] decltype(attention_forward<bfloat, 256>) attention_forward<bfloat, 256>;
template [[host_name("attention_backward_dq_d32_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 32>) attention_backward_dq<bfloat, 32>;
template [[host_name("attention_backward_dq_d64_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 64>) attention_backward_dq<bfloat, 64>;
template [[host_name("attention_backward_dq_d80_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 80>) attention_backward_dq<bfloat, 80>;
template [[host_name("attention_backward_dq_d96_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 96>) attention_backward_dq<bfloat, 96>;
template [[host_name("attention_backward_dq_d128_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 128>) attention_backward_dq<bfloat, 128>;
template [[host_name("attention_backward_dq_d256_bfloat")]] [[kernel]] decltype(attention_backward_dq<bfloat, 256>) attention_backward_dq<bfloat, 256>;
template [[host_name("attention_backward_dkdv_d32_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 32>) attention_backward_dkdv<bfloat, 32>;
template [[host_name("attention_backward_dkdv_d64_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 64>) attention_backward_dkdv<bfloat, 64>;
template [[host_name("attention_backward_dkdv_d80_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 80>) attention_backward_dkdv<bfloat, 80>;
template [[host_name("attention_backward_dkdv_d96_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 96>) attention_backward_dkdv<bfloat, 96>;
template [[host_name("attention_backward_dkdv_d128_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 128>) attention_backward_dkdv<bfloat, 128>;
template [[host_name("attention_backward_dkdv_d256_bfloat")]] [[kernel]] decltype(attention_backward_dkdv<bfloat, 256>) attention_backward_dkdv<bfloat, 256>;
#endif
