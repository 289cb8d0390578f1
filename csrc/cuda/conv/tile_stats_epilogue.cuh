// The statistics epilogue of the CUTLASS fprop: after CUTLASS's epilogue has stored the CTA's tile of y, the
// CTA reads that tile back (from L2: it was just written) and writes one (count, mean, m2) summary per output
// channel of the tile, the BatchNorm statistics format (common/bn_math.h), so that no separate pass over y
// in HBM is needed. Deterministic: one summary per (row tile, channel), exact two-pass in fp32 over the tile's
// <= 128 stored (rounded) values, stored in double; the row tiles' summaries are then Chan-merged in double
// in a fixed order (cuda_bn::launch_merge_stats_partials), as the Triton kernels do.
//
// How it plugs into CUTLASS 2.x: ImplicitGemmConvolutionFusion hands its epilogue nothing but the output op,
// the two tile iterators and the accumulators. So
//   - the output op (LinearCombinationWithTileStats) carries the statistics' destination in its Params, the
//     one piece of user data the kernel passes through to the epilogue;
//   - the epilogue (EpilogueWithTileStats) derives from CUTLASS's (same types, same shared storage), runs it,
//     then __syncthreads() (the CTA's global stores are then visible to the whole CTA) and reduces.
// Thread mapping of the reduction: thread t of the CTA owns column n0 + t (the CTA has exactly as many
// threads as the tile has columns: static_assert), and walks the tile's rows; a warp reads 32 consecutive
// channels of a row, 64 contiguous bytes.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/platform/platform.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

struct TileStatsParams {
  const void* y = nullptr;      // the stored output, NPQK (row m = (n * P + p) * Q + q, row stride K)
  double* partials = nullptr;   // [ceil(M / tile rows), 3, K] (count, mean, m2); nullptr: no statistics
  int64_t M = 0;                // rows: N * P * Q
  int K = 0;                    // columns: output channels
};

// A CUTLASS thread-level output op (Base: e.g. LinearCombination) whose Params also carry TileStatsParams.
template <typename BaseOp>
class LinearCombinationWithTileStats : public BaseOp {
 public:
  using Base = BaseOp;
  struct Params : Base::Params {
    TileStatsParams stats;
    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(typename Base::Params const& base, TileStatsParams const& s)
        : Base::Params(base), stats(s) {}
  };

  CUTLASS_HOST_DEVICE explicit LinearCombinationWithTileStats(Params const& params)
      : Base(params), stats_(params.stats) {}

  CUTLASS_HOST_DEVICE TileStatsParams const& tile_stats() const { return stats_; }

 private:
  TileStatsParams stats_;
};

// CUTLASS's threadblock epilogue BaseEpilogue (whose OutputOp is a LinearCombinationWithTileStats), then the
// tile's statistics. Swizzle: the kernel's threadblock swizzle, GemmIdentityThreadblockSwizzle<1> (log tile
// 0: CTA (blockIdx.x, blockIdx.y) is row tile x, column tile y), which is what lets the epilogue find its tile.
template <typename BaseEpilogue, typename Swizzle, int kTileRows, int kTileCols>
class EpilogueWithTileStats : public BaseEpilogue {
 public:
  using OutputOp = typename BaseEpilogue::OutputOp;
  using OutputTileIterator = typename BaseEpilogue::OutputTileIterator;
  using AccumulatorTile = typename BaseEpilogue::AccumulatorTile;
  using SharedStorage = typename BaseEpilogue::SharedStorage;
  using ElementOutput = typename BaseEpilogue::ElementOutput;
  static_assert(BaseEpilogue::kBlockThreads == kTileCols, "one thread per column of the tile");
  static_assert(cutlass::platform::is_same<Swizzle, cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>>::value,
                "the tile index is read with log tile 0");

  CUTLASS_DEVICE
  EpilogueWithTileStats(SharedStorage& shared_storage, int thread_idx, int warp_idx, int lane_idx)
      : BaseEpilogue(shared_storage, thread_idx, warp_idx, lane_idx), thread_idx_(thread_idx) {}

  CUTLASS_DEVICE
  void operator()(OutputOp const& output_op, OutputTileIterator destination_iterator,
                  AccumulatorTile const& accumulators, OutputTileIterator source_iterator) {
    BaseEpilogue::operator()(output_op, destination_iterator, accumulators, source_iterator);
    TileStatsParams const& p = output_op.tile_stats();
    if (p.partials == nullptr) return;  // uniform over the grid
    __syncthreads();                    // the CTA's stores of y are visible to every thread of the CTA
    const cutlass::gemm::GemmCoord tile = Swizzle::get_tile_offset(0);
    const int64_t k = int64_t(tile.n()) * kTileCols + thread_idx_;
    if (k >= p.K) return;
    const int64_t m0 = int64_t(tile.m()) * kTileRows;
    const int64_t rows = p.M - m0 < kTileRows ? p.M - m0 : kTileRows;
    const ElementOutput* col = static_cast<const ElementOutput*>(p.y) + m0 * p.K + k;
    float sum = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < rows; ++r) sum += static_cast<float>(col[r * p.K]);
    const float mean = sum / static_cast<float>(rows);
    float m2 = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < rows; ++r) {
      const float d = static_cast<float>(col[r * p.K]) - mean;
      m2 += d * d;
    }
    double* out = p.partials + int64_t(tile.m()) * 3 * p.K + k;
    out[0] = static_cast<double>(rows);
    out[p.K] = static_cast<double>(mean);
    out[2 * p.K] = static_cast<double>(m2);
  }

 private:
  int thread_idx_;
};

}  // namespace detail
}  // namespace cuda_conv
}  // namespace fused_resnet
