// LoRA's base GEMM over K-concatenated operands on CUTLASS's Hopper GEMM: y = [x | h]·[W | s·B]ᵀ and
// dx = [dy | dh]·[W; A] in one GEMM each, so that neither W' = W + s·B·A nor a second write of y is needed. Shared by
// the op's route for large bf16 shapes (csrc/cuda/lora_kconcat_gemm.cuh, launched from lora_kconcat_cooperative.cu
// and lora_kconcat_pingpong.cu) and benchmarks/cuda_lora_kconcat_bench.cu (where it was measured: docs/cuda.md,
// ledger runs cuda-h200-2026-12-0[12]-lora-kconcat*). Needs CUTLASS 3.x/4.x headers and sm_90a, and
// -DNDEBUG (CUTLASS's device asserts otherwise serialize the wgmma pipeline).
//
// cuBLAS cannot run two operand pairs in one K loop, so the GEMM is CUTLASS's Hopper kernel (TMA, wgmma,
// warp-specialized, persistent) with our producer on top of CUTLASS's collective: KConcatMainloop inherits the stock
// collective's shared storage, pipeline and consumer (mma) and replaces the producer, which after the K tiles of the
// first pair loads one more K tile from the second pair (the rank-sized operands; the TMA fills the tile past the rank
// with zeros, as it does for the last partial tile of any K).
#pragma once

#include <type_traits>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace tmf::cuda::kconcat {
using namespace cute;

// ---- the mainloop: CUTLASS's sm90 TMA warp-specialized collective, one more K tile from a second operand pair ----
// The problem's K is the first pair's K plus one tile (kTileK): the kernel layer then runs that many k-tiles through
// the pipeline and the consumer, unchanged; the producer below takes the last one from the second pair. Both pairs
// share the strides' types (the same majorness) and the tile's shared-memory layout.
// kTileByIndex: which pair a K tile comes from is read from its index (the first pair's tiles, then the second pair's
// at index k_first_tiles), and the first operand's K extent counts the second pair's tile too, so that any kernel and
// scheduler finds K + one tile: the ping-pong kernel counts K tiles from that extent (size<3>(gA)), a stream-K
// scheduler hands a unit any range of them. Off, the producer takes the last tile of each unit as the second pair's,
// which holds only for the cooperative kernel's data-parallel scheduler (every unit all of K): the op's cooperative
// configuration. On: the op's ping-pong configuration and the benchmark's stream-K one (both checked against a float32
// reference by the benchmark; the ping-pong one also through the op's tests).
template <class Base, bool kTileByIndex = false>
struct KConcatMainloop : Base {
  using typename Base::ElementA;
  using typename Base::ElementB;
  using typename Base::StrideA;
  using typename Base::StrideB;
  using typename Base::TileShape;
  using typename Base::MainloopPipeline;
  using typename Base::PipelineState;
  using typename Base::TensorStorage;
  using typename Base::SmemLayoutA;
  using typename Base::SmemLayoutB;
  using typename Base::GmemTiledCopyA;
  using typename Base::GmemTiledCopyB;
  using typename Base::DispatchPolicy;
  static constexpr int kTileK = size<2>(TileShape{});

  struct Arguments {
    ElementA const* ptr_A;  // [M, K1] (first pair)
    StrideA dA;
    ElementB const* ptr_B;  // [N, K1]
    StrideB dB;
    ElementA const* ptr_A2;  // [M, k2] (second pair: the rank-sized operands, k2 <= kTileK; the TMA fills the tile's
    StrideA dA2;             // columns past k2 with zeros, as it does for the last partial tile of any K)
    ElementB const* ptr_B2;  // [N, k2]
    StrideB dB2;
    int k2 = kTileK;
  };

  struct Params : Base::Params {
    typename Base::Params::TMA_A tma_load_a2;
    typename Base::Params::TMA_B tma_load_b2;
    int k_first, k2;
    int k_first_tiles;  // the second pair's tile index (kTileByIndex)
  };

  static typename Base::Arguments first_args(Arguments const& a, bool second) {
    typename Base::Arguments b{};
    b.ptr_A = second ? a.ptr_A2 : a.ptr_A;
    b.dA = second ? a.dA2 : a.dA;
    b.ptr_B = second ? a.ptr_B2 : a.ptr_B;
    b.dB = second ? a.dB2 : a.dB;
    return b;
  }

  template <class ProblemShape>
  static Params to_underlying_arguments(ProblemShape const& problem_shape, Arguments const& args, void* workspace) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    const int k_first = int(K) - kTileK;
    Params p;
    static_cast<typename Base::Params&>(p) = Base::to_underlying_arguments(
        make_shape(M, N, k_first, L), first_args(args, false), workspace);
    const typename Base::Params second = Base::to_underlying_arguments(
        make_shape(M, N, args.k2, L), first_args(args, true), workspace);
    p.tma_load_a2 = second.tma_load_a;
    p.tma_load_b2 = second.tma_load_b;
    p.k_first = k_first;
    p.k2 = args.k2;
    p.k_first_tiles = (k_first + kTileK - 1) / kTileK;
    return p;
  }

  template <class ProblemShape>
  static bool can_implement(ProblemShape const& problem_shape, Arguments const& args) {
    auto [M, N, K, L] = append<4>(problem_shape, 1);
    const int k_first = int(K) - kTileK;
    return k_first > 0 && args.k2 > 0 && args.k2 <= kTileK &&
           Base::can_implement(make_shape(M, N, k_first, L), first_args(args, false)) &&
           Base::can_implement(make_shape(M, N, args.k2, L), first_args(args, true));
  }

  CUTLASS_DEVICE static void prefetch_tma_descriptors(Params const& p) {
    Base::prefetch_tma_descriptors(p);
    cute::prefetch_tma_descriptor(p.tma_load_a2.get_tma_descriptor());
    cute::prefetch_tma_descriptor(p.tma_load_b2.get_tma_descriptor());
  }

  // (gA, gB) over the first pair's K tiles (the kernel layer walks its k-tile coordinates over gA's), then the
  // second pair's single K tile.
  template <class ProblemShape_MNKL>
  CUTLASS_DEVICE auto load_init(ProblemShape_MNKL const& problem_shape_MNKL, Params const& p) const {
    auto [M, N, K, L] = problem_shape_MNKL;
    using X = Underscore;
    // With kTileByIndex the first pair's coordinates run one tile further (k_first_tiles + 1 tiles: the TMA would
    // zero-fill that tile, but the producer loads the second pair's there instead).
    const int k_extent = kTileByIndex ? p.k_first_tiles * kTileK + kTileK : p.k_first;
    Tensor mA = p.tma_load_a.get_tma_tensor(make_shape(M, k_extent, L));
    Tensor mB = p.tma_load_b.get_tma_tensor(make_shape(N, k_extent, L));
    Tensor mA2 = p.tma_load_a2.get_tma_tensor(make_shape(M, p.k2, L));
    Tensor mB2 = p.tma_load_b2.get_tma_tensor(make_shape(N, p.k2, L));
    return cute::make_tuple(local_tile(mA, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}),
                            local_tile(mA2, TileShape{}, make_coord(_, _, _), Step<_1, X, _1>{}),
                            local_tile(mB2, TileShape{}, make_coord(_, _, _), Step<X, _1, _1>{}));
  }

  // The producer: k_tile_count - 1 tiles of the first pair, then the second pair's tile, each stage filled by one
  // TMA copy per operand (multicast across the cluster where the stock collective multicasts).
  template <class TensorA, class TensorB, class TensorA2, class TensorB2, class KTileIterator, class BlockCoord>
  CUTLASS_DEVICE void load(Params const& p, MainloopPipeline pipeline, PipelineState smem_pipe_write,
                           cute::tuple<TensorA, TensorB, TensorA2, TensorB2> const& load_inputs,
                           BlockCoord const& blk_coord, KTileIterator k_tile_iter, int k_tile_count, int thread_idx,
                           uint32_t block_rank_in_cluster, TensorStorage& shared_tensors) {
    if (!cute::elect_one_sync()) return;
    Tensor sA = make_tensor(make_smem_ptr(shared_tensors.smem_A.data()), SmemLayoutA{});
    Tensor sB = make_tensor(make_smem_ptr(shared_tensors.smem_B.data()), SmemLayoutB{});
    using Cluster = typename DispatchPolicy::ClusterShape;
    constexpr uint32_t cluster_x = get<0>(Cluster{});
    const uint32_t cx = block_rank_in_cluster % cluster_x, cy = block_rank_in_cluster / cluster_x;
    auto tma_a = p.tma_load_a.get_slice(cy), tma_a2 = p.tma_load_a2.get_slice(cy);
    auto tma_b = p.tma_load_b.get_slice(cx), tma_b2 = p.tma_load_b2.get_slice(cx);
    auto [m, n, k, l] = blk_coord;
    Tensor tAgA = tma_a.partition_S(get<0>(load_inputs)(_, _, m, _, l));
    Tensor tBgB = tma_b.partition_S(get<1>(load_inputs)(_, _, n, _, l));
    Tensor tAgA2 = tma_a2.partition_S(get<2>(load_inputs)(_, _, m, _, l));
    Tensor tBgB2 = tma_b2.partition_S(get<3>(load_inputs)(_, _, n, _, l));
    Tensor tAsA = tma_a.partition_D(sA);
    Tensor tBsB = tma_b.partition_D(sB);
    // A's tile goes to every block of the cluster with this block's m (one per n), B's to every block with its n.
    uint16_t mask_a = 0, mask_b = 0;
    auto blocks = Layout<Cluster>{};
    if constexpr (cute::is_same_v<GmemTiledCopyA, SM90_TMA_LOAD_MULTICAST>) {
      for (int j = 0; j < size<1>(blocks); ++j) mask_a |= uint16_t(1) << blocks(cx, j, Int<0>{});
    }
    if constexpr (cute::is_same_v<GmemTiledCopyB, SM90_TMA_LOAD_MULTICAST>) {
      for (int i = 0; i < size<0>(blocks); ++i) mask_b |= uint16_t(1) << blocks(i, cy, Int<0>{});
    }
    CUTLASS_PRAGMA_NO_UNROLL
    for (int t = 0; t < k_tile_count; ++t) {
      pipeline.producer_acquire(smem_pipe_write);
      auto* barrier = pipeline.producer_get_barrier(smem_pipe_write);
      const int stage = smem_pipe_write.index();
      const bool first_pair = kTileByIndex ? int(*k_tile_iter) < p.k_first_tiles : t < k_tile_count - 1;
      if (first_pair) {
        copy(p.tma_load_a.with(*barrier, mask_a), tAgA(_, _, _, *k_tile_iter), tAsA(_, _, _, stage));
        copy(p.tma_load_b.with(*barrier, mask_b), tBgB(_, _, _, *k_tile_iter), tBsB(_, _, _, stage));
        ++k_tile_iter;
      } else {
        copy(p.tma_load_a2.with(*barrier, mask_a), tAgA2(_, _, _, 0), tAsA(_, _, _, stage));
        copy(p.tma_load_b2.with(*barrier, mask_b), tBgB2(_, _, _, 0), tBsB(_, _, _, stage));
      }
      ++smem_pipe_write;
    }
  }
};

// The epilogue adds an optional bias per output column (LinCombPerColBias: `thread.bias_ptr`, null for none) in
// float32 before the one rounding to bfloat16; no C operand is read.
// The cooperative kernel with CUTLASS's default (persistent, data-parallel) tile scheduler, whose work units each
// cover all of K, runs KConcatMainloop<..., false>; a stream-K or split-K scheduler, or the ping-pong kernel, needs
// kTileByIndex (TMF_GEMM_CONFIG's SCHEDULER argument other than void turns it on, as does the ping-pong
// schedule).
// ---- the GEMMs: bf16 operands, float32 accumulation, bf16 row-major D, no C ----------------------------------------
// A configuration: tile, cluster, kernel and epilogue schedules; each gives the forward GEMM (B = W [N, K] row-major:
// ColumnMajor) and the backward one (B = W [K, N] row-major: RowMajor), plain and K-concatenated. Macros, not
// templates: GCC rejects CUTLASS's epilogue builder in a dependent context.
#define TMF_GEMM_PAIR(NAME, EPI, LAYOUT_B, TILE, CLUSTER, SCHEDULE, SCHEDULER, BY_INDEX)                             \
  struct NAME {                                                                                                    \
    using T = cutlass::bfloat16_t;                                                                                 \
    using Epilogue = EPI;                                                                                          \
    using Mainloop = cutlass::gemm::collective::CollectiveBuilder<                                                 \
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, T, cutlass::layout::RowMajor, 8, T, LAYOUT_B, 8,      \
        float, TILE, CLUSTER,                                                                                      \
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(Epilogue::SharedStorage))>,      \
        SCHEDULE>::CollectiveOp;                                                                                   \
    using Plain = cutlass::gemm::device::GemmUniversalAdapter<                                                     \
        cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue, SCHEDULER>>;           \
    using KConcat = cutlass::gemm::device::GemmUniversalAdapter<                                                   \
        cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, KConcatMainloop<Mainloop, BY_INDEX>,       \
                                             Epilogue, SCHEDULER>>;                                                \
    using StrideA = Mainloop::StrideA;                                                                             \
    using StrideB = Mainloop::StrideB;                                                                             \
    using StrideD = Plain::GemmKernel::StrideD;                                                                    \
    static constexpr int kTileK = size<2>(TILE{});                                                                 \
  }
// FUSION: the epilogue's operation; TMF_GEMM_CONFIG takes the per-column bias (the op's), and the benchmark also
// sweeps a plain linear combination, to see what the bias path costs when the bias is absent.
using PerColBias = cutlass::epilogue::fusion::LinCombPerColBias<cutlass::bfloat16_t, float, cutlass::bfloat16_t, void,
                                                                 float>;
#define TMF_GEMM_CONFIG_FUSION(NAME, TILE, CLUSTER, SCHEDULE, EPI_SCHEDULE, SCHEDULER, FUSION)                       \
  namespace NAME {                                                                                                 \
  using Epilogue = cutlass::epilogue::collective::CollectiveBuilder<                                               \
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TILE, CLUSTER,                                          \
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, cutlass::layout::RowMajor, 8,           \
      cutlass::bfloat16_t, cutlass::layout::RowMajor, 8, EPI_SCHEDULE, FUSION>::CollectiveOp;                      \
  constexpr bool kByIndex = !std::is_void_v<SCHEDULER> ||                                                          \
                           std::is_same_v<SCHEDULE, cutlass::gemm::KernelTmaWarpSpecializedPingpong>;             \
  TMF_GEMM_PAIR(Fwd, Epilogue, cutlass::layout::ColumnMajor, TILE, CLUSTER, SCHEDULE, SCHEDULER, kByIndex);        \
  TMF_GEMM_PAIR(Bwd, Epilogue, cutlass::layout::RowMajor, TILE, CLUSTER, SCHEDULE, SCHEDULER, kByIndex);           \
  }
#define TMF_GEMM_CONFIG(NAME, TILE, CLUSTER, SCHEDULE, EPI_SCHEDULE, SCHEDULER) \
  TMF_GEMM_CONFIG_FUSION(NAME, TILE, CLUSTER, SCHEDULE, EPI_SCHEDULE, SCHEDULER, PerColBias)

// The op's two configurations (launch::lora_kconcat_gemm_for picks one per GEMM by its output's shape; the
// measurements behind the choice are in tmf/launch/lora_linear.h):
// - cooperative, 128x256x64 tiles, 2x1 clusters, for tall outputs: a few % behind cuBLAS's own GEMM at 8192 tokens
//   (ledger: lora, kernel, H200, bfloat16 8192x4096x4096x16, run cuda-h200-2026-12-01-lora-kconcat, variants
//   "y = x·Wᵀ, CUTLASS" against "base y = x·Wᵀ, cuBLAS");
using Tile128x256 = Shape<_128, _256, _64>;
using Cluster2x1 = Shape<_2, _1, _1>;
TMF_GEMM_CONFIG(coop_128x256_c2x1, Tile128x256, Cluster2x1, cutlass::gemm::KernelTmaWarpSpecializedCooperative,
                cutlass::epilogue::TmaWarpSpecializedCooperative, void)
// - ping-pong (two consumer warp groups on alternate 128x128 tiles, one's epilogue overlapping the other's MMAs), 2x1
//   clusters, with kTileByIndex, for wide outputs.
using Tile128x128 = Shape<_128, _128, _64>;
TMF_GEMM_CONFIG(pingpong_128x128_c2x1, Tile128x128, Cluster2x1, cutlass::gemm::KernelTmaWarpSpecializedPingpong,
                cutlass::epilogue::TmaWarpSpecialized, void)

}  // namespace tmf::cuda::kconcat
