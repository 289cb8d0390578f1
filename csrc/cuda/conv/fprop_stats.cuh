// fprop without a prologue (conv_launch.h): y = conv2d(x, w), 16-bit NHWC x, KRSC w, NPQK y, fp32
// accumulation, and (when asked) y's per-tile statistics in the epilogue (tile_epilogue.cuh, as the prologue
// fprop). For the ResNet convolutions whose input is a stored tensor, not a BatchNorm to fuse: the first
// convolution of each block (its input is the previous block's output) and the downsample convolutions. CUTLASS 2.x ImplicitGemmConvolution (default_conv2d_fprop.h),
// tiles 128 x 128 x 32, warps 64 x 64 x 32, mma.sync m16n8k16, 3 stages, kOptimized iterators, any stride.
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/tile_epilogue.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct FpropStats {
  using E = Element<T>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;
  using OutputOp =
      LinearCombinationWithTile<cutlass::epilogue::thread::LinearCombination<E, 8, float, float>, TileStats>;
  using Default = cutlass::conv::kernel::DefaultConv2dFprop<
      E, cutlass::layout::TensorNHWC,                 // A: activations
      E, cutlass::layout::TensorNHWC,                 // B: filter (KRSC)
      E, cutlass::layout::TensorNHWC,                 // C / D: output
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<kFpropTileRows, kFpropTileCols, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, OutputOp, Swizzle, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided>;
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolution<
      typename Default::Mma, EpilogueThenTile<typename Default::Epilogue, Swizzle, kFpropTileRows, kFpropTileCols>,
      Swizzle, cutlass::conv::Operator::kFprop>;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, const void* x, const void* w, void* y,
                                                 double* tile_stats) {
    const typename Kernel::TensorRefC ref_y(static_cast<E*>(y), layout_output(s));
    TileStats stats;
    stats.y = y;
    stats.partials = tile_stats;
    stats.M = int64_t(s.N) * s.P * s.Q;
    stats.K = s.K;
    // beta = 0: the epilogue never reads the source (C aliases D).
    return typename Operation::Arguments(problem_size(s), input_ref<typename Kernel::TensorRefA>(x, layout_input(s)),
                                         input_ref<typename Kernel::TensorRefB>(w, layout_filter(s)), ref_y, ref_y,
                                         typename OutputOp::Params(typename OutputOp::Base::Params(1.f, 0.f), stats));
  }
};

}  // namespace detail

template <ConvDType T>
bool fprop_stats_supports(const ConvShape& s) {
  using Op = detail::FpropStats<T>;
  return detail::shape_is_valid(s) &&
         detail::operation_supports<typename Op::Operation>(Op::arguments(s, nullptr, nullptr, nullptr, nullptr),
                                                            /*workspace_ok=*/false);
}

template <ConvDType T>
cudaError_t fprop_stats(const ConvShape& s, const void* x, const void* w, void* y, double* tile_stats,
                        cudaStream_t stream) {
  using Op = detail::FpropStats<T>;
  if (!fprop_stats_supports<T>(s)) return detail::shape_is_valid(s) ? cudaErrorNotSupported : cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(Op::arguments(s, x, w, y, tile_stats), nullptr, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
