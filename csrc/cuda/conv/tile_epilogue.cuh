// Work a CUTLASS convolution's CTA does on its output tile after CUTLASS's epilogue has stored it: the CTA
// reads the tile back (from L2: it was just written), one thread per column, and
//   TileStats        (fprop): writes one (count, mean, m2) summary per output channel of the tile, the
//                    BatchNorm statistics format (common/bn_math.h), so that no separate pass over y in HBM
//                    is needed;
//   TileBnBackward   (dgrad): applies the ReLU mask of the prologue's BatchNorm to the stored input gradient
//                    in place (dz = dx * [z > 0], z = bn(x) recomputed from x) and writes the tile's
//                    (sum dz, sum dz * xhat) per channel: the BatchNorm backward's reduction.
// Deterministic: one partial per (row tile, channel), in fp32 in row order over the tile's <= 128 stored
// (rounded) values (the statistics two-pass: mean, then m2 about it); the row tiles' partials are then combined in a fixed order by the BatchNorm kernels' second passes
// (cuda_bn::launch_merge_stats_partials, launch_reduce_partials_float), as the Triton kernels do.
//
// How it plugs into CUTLASS 2.x: its convolution kernels hand their epilogue nothing but the output op, the
// two tile iterators and the accumulators. So
//   - the output op (LinearCombinationWithTile) carries the work's parameters in its Params, the one piece
//     of user data the kernel passes through to the epilogue;
//   - the epilogue (EpilogueThenTile) derives from CUTLASS's (same types, same shared storage), runs it,
//     then __syncthreads() (the CTA's global stores are then visible to the whole CTA) and does the work.
// Thread mapping: thread t of the CTA owns column n0 + t (the CTA has exactly as many threads as the tile
// has columns: static_assert) and walks the tile's rows m0 .. m0 + rows - 1 (row m at m * columns + column:
// packed NHWC / NPQK); a warp reads 32 consecutive channels of a row, 64 contiguous bytes. The tile's rows
// must be consecutive rows of the tensor: true for fprop and for the unit-stride dgrad, not for CUTLASS's
// strided dgrad (its CTAs own one phase of the stride each), which therefore has no such epilogue.
#pragma once

#include <cstdint>

#include "cutlass/cutlass.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/platform/platform.h"
#include "common/bn_math.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

// fprop: the tile's statistics.
struct TileStats {
  const void* y = nullptr;      // the stored output, NPQK (row m = (n * P + p) * Q + q, row stride K)
  double* partials = nullptr;   // [ceil(M / tile rows), 3, K] (count, mean, m2); nullptr: no statistics
  int64_t M = 0;                // rows: N * P * Q
  int K = 0;                    // columns: output channels

  CUTLASS_HOST_DEVICE bool enabled() const { return partials != nullptr; }
  CUTLASS_HOST_DEVICE int64_t rows() const { return M; }
  CUTLASS_HOST_DEVICE int64_t columns() const { return K; }

  template <typename E>
  CUTLASS_DEVICE void run(int64_t tile_m, int64_t m0, int64_t rows, int64_t k) const {
    const E* col = static_cast<const E*>(y) + m0 * K + k;
    float sum = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < rows; ++r) sum += static_cast<float>(col[r * K]);
    const float mean = sum / static_cast<float>(rows);
    float m2 = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < rows; ++r) {
      const float d = static_cast<float>(col[r * K]) - mean;
      m2 += d * d;
    }
    double* out = partials + tile_m * 3 * K + k;
    out[0] = static_cast<double>(rows);
    out[K] = static_cast<double>(mean);
    out[2 * K] = static_cast<double>(m2);
  }
};

// dgrad: the prologue BatchNorm's ReLU mask and backward reduction. The convolution's input was
// a = relu?(z), z = (x - mean) * scale + bias, scale = weight * invstd (bn_math.h's bn_affine, fp32).
struct TileBnBackward {
  void* dz = nullptr;            // the stored dx (NHWC, row stride C), overwritten by dz
  const void* x = nullptr;       // the prologue's input, NHWC, same layout
  const float* mean = nullptr;   // [C]
  const float* invstd = nullptr; // [C]
  const float* weight = nullptr; // [C] or nullptr
  const float* bias = nullptr;   // [C] or nullptr
  float* partials = nullptr;     // [ceil(M / tile rows), 2, C] (sum dz, sum dz * xhat)
  bool relu = true;
  int64_t M = 0;                 // rows: N * H * W
  int C = 0;                     // columns: input channels

  CUTLASS_HOST_DEVICE bool enabled() const { return partials != nullptr; }
  CUTLASS_HOST_DEVICE int64_t rows() const { return M; }
  CUTLASS_HOST_DEVICE int64_t columns() const { return C; }

  template <typename E>
  CUTLASS_DEVICE void run(int64_t tile_m, int64_t m0, int64_t rows, int64_t c) const {
    E* g = static_cast<E*>(dz) + m0 * C + c;
    const E* xc = static_cast<const E*>(x) + m0 * C + c;
    const float mu = mean[c], is = invstd[c];
    const float scale = (weight != nullptr ? weight[c] : 1.f) * is;
    const float b = bias != nullptr ? bias[c] : 0.f;
    float sum_dz = 0.f, sum_dz_xhat = 0.f;
#pragma unroll 4
    for (int64_t r = 0; r < rows; ++r) {
      const float xv = static_cast<float>(xc[r * C]);
      float d = static_cast<float>(g[r * C]);
      if (relu && !(bn_affine(xv, mu, scale, b) > 0.f)) {
        d = 0.f;
        g[r * C] = E(0.f);
      }
      sum_dz += d;
      sum_dz_xhat += d * ((xv - mu) * is);
    }
    float* out = partials + tile_m * 2 * C + c;
    out[0] = sum_dz;
    out[C] = sum_dz_xhat;
  }
};

// A CUTLASS thread-level output op (Base: e.g. LinearCombination) whose Params also carry a Tile (TileStats
// or TileBnBackward).
template <typename BaseOp, typename TileWork>
class LinearCombinationWithTile : public BaseOp {
 public:
  using Base = BaseOp;
  using Tile = TileWork;
  struct Params : Base::Params {
    Tile tile;
    CUTLASS_HOST_DEVICE Params() {}
    CUTLASS_HOST_DEVICE Params(typename Base::Params const& base, Tile const& t) : Base::Params(base), tile(t) {}
  };

  CUTLASS_HOST_DEVICE explicit LinearCombinationWithTile(Params const& params) : Base(params), tile_(params.tile) {}

  CUTLASS_HOST_DEVICE Tile const& tile() const { return tile_; }

 private:
  Tile tile_;
};

// CUTLASS's threadblock epilogue BaseEpilogue (whose OutputOp is a LinearCombinationWithTile), then the
// tile's work. Swizzle: the kernel's threadblock swizzle, GemmIdentityThreadblockSwizzle<1> (log tile 0:
// CTA (blockIdx.x, blockIdx.y) is row tile x, column tile y), which is what lets the epilogue find its tile.
template <typename BaseEpilogue, typename Swizzle, int kTileRows, int kTileCols>
class EpilogueThenTile : public BaseEpilogue {
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
  EpilogueThenTile(SharedStorage& shared_storage, int thread_idx, int warp_idx, int lane_idx)
      : BaseEpilogue(shared_storage, thread_idx, warp_idx, lane_idx), thread_idx_(thread_idx) {}

  CUTLASS_DEVICE
  void operator()(OutputOp const& output_op, OutputTileIterator destination_iterator,
                  AccumulatorTile const& accumulators, OutputTileIterator source_iterator) {
    BaseEpilogue::operator()(output_op, destination_iterator, accumulators, source_iterator);
    typename OutputOp::Tile const& work = output_op.tile();
    if (!work.enabled()) return;  // uniform over the grid
    __syncthreads();              // the CTA's stores are visible to every thread of the CTA
    const cutlass::gemm::GemmCoord tile = Swizzle::get_tile_offset(0);
    const int64_t column = int64_t(tile.n()) * kTileCols + thread_idx_;
    if (column >= work.columns()) return;
    const int64_t m0 = int64_t(tile.m()) * kTileRows;
    const int64_t rows = work.rows() - m0 < kTileRows ? work.rows() - m0 : kTileRows;
    work.template run<ElementOutput>(tile.m(), m0, rows, column);
  }

 private:
  int thread_idx_;
};

}  // namespace detail
}  // namespace cuda_conv
}  // namespace fused_resnet
