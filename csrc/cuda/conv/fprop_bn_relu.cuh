// fprop with the BN-apply + ReLU prologue (conv_launch.h): 16-bit NHWC x, KRSC w, fp16 scale / shift, NHWC y,
// fp32 accumulation, y = alpha * acc rounded once, and (when asked) y's per-tile statistics in the epilogue
// (tile_epilogue.cuh). CUTLASS 2.x ImplicitGemmConvolutionFusion (default_conv2d_
// fprop_fusion.h, example 25): the transform is applied to the activation fragments in registers, between
// shared memory and mma.sync (fp16: CUTLASS's; bf16: bf16_scale_bias_relu.cuh).
// Tiles 128 x 128 x 32 (CTA, implicit-GEMM M = N*P*Q rows by N = K output channels), warps 64 x 64 x 32
// (4 warps), mma.sync m16n8k16, 3 stages of cp.async (3 * (128 + 128) * 32 * 2 B = 48 KiB of operands plus
// the scale/shift tiles): the example-25 configuration with one stage fewer, so two CTAs fit per SM on sm80
// and sm90 alike. kOptimized iterators (precomputed filter-position masks; R, S <= 32).
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution_fusion.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_fusion.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/bf16_scale_bias_relu.cuh"
#include "cuda/conv/tile_epilogue.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct FpropBnRelu {
  using E = Element<T>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;
  // 8 elements per 128-bit store; D = alpha * acc + 0 * C in fp32, rounded once; its Params also carry the
  // statistics' destination (tile_epilogue.cuh).
  using OutputOp =
      LinearCombinationWithTile<cutlass::epilogue::thread::LinearCombination<E, 8, float, float>, TileStats>;
  using Default = cutlass::conv::kernel::DefaultConv2dFpropFusion<
      E, cutlass::layout::TensorNHWC,                 // A: activations
      E, cutlass::layout::TensorNHWC,                 // B: filter (KRSC)
      ElementScaleBias, cutlass::layout::RowMajor,    // scale / shift vectors
      E, cutlass::layout::TensorNHWC,                 // C / D: output
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<kFpropTileRows, kFpropTileCols, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, OutputOp, Swizzle, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>;
  // CUTLASS's fusion kernel with its mainloop and its epilogue, followed by the tile statistics.
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolutionFusion<
      typename Default::Mma,
      EpilogueThenTile<typename Default::Epilogue, Swizzle, kFpropTileRows, kFpropTileCols>, Swizzle,
      cutlass::conv::Operator::kFprop>;
  using Operation = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, const void* x, const void* w,
                                                 const void* scale, const void* shift, const float* alpha,
                                                 void* y, double* tile_stats) {
    using K = typename Operation::ImplicitGemmFusionKernel;
    const cutlass::layout::RowMajor layout_v(s.C);  // scale and shift: one row of C elements
    const typename K::TensorRefC ref_y(static_cast<E*>(y), layout_output(s));
    TileStats stats;
    stats.y = y;
    stats.partials = tile_stats;
    stats.M = int64_t(s.N) * s.P * s.Q;
    stats.K = s.K;
    // beta = 0 (no beta pointer): the epilogue never reads the source, which aliases D.
    return typename Operation::Arguments(
        problem_size(s), input_ref<typename K::TensorRefA>(x, layout_input(s)),
        input_ref<typename K::TensorRefB>(w, layout_filter(s)),
        input_ref<typename K::TensorRefScaleBias>(scale, layout_v),
        input_ref<typename K::TensorRefScaleBias>(shift, layout_v), ref_y, ref_y,
        typename OutputOp::Params(typename OutputOp::Base::Params(alpha, /*beta_ptr=*/nullptr), stats));
  }
};

}  // namespace detail

template <ConvDType T>
bool fprop_bn_relu_supports(const ConvShape& s) {
  using Op = detail::FpropBnRelu<T>;
  return detail::shape_is_valid(s) &&
         detail::operation_supports<typename Op::Operation>(
             Op::arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr), /*workspace_ok=*/false);
}

template <ConvDType T>
cudaError_t fprop_bn_relu(const ConvShape& s, const void* x, const void* w, const void* scale, const void* shift,
                          const float* alpha, void* y, double* tile_stats, cudaStream_t stream) {
  using Op = detail::FpropBnRelu<T>;
  if (!fprop_bn_relu_supports<T>(s)) return detail::shape_is_valid(s) ? cudaErrorNotSupported : cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(Op::arguments(s, x, w, scale, shift, alpha, y, tile_stats), nullptr,
                                                       stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
