// dgrad with the prologue BatchNorm's ReLU mask and backward reduction in the epilogue (conv_launch.h):
// dz = dgrad(dy, w) * [bn(x) > 0] (16-bit NHWC), and per channel (sum dz, sum dz * xhat) in fp32, so that only
// the BatchNorm backward's elementwise pass remains (cuDNN's "dgrad + dReLU + dBN" fusion). CUTLASS 2.x
// unit-stride dgrad (StrideSupport::kUnity: the CTA's output tile is 128 consecutive rows of dx, which the
// tile epilogue needs; the strided dgrad's CTAs own one phase of the stride each), kOptimized iterators,
// tiles 128 x 128 x 32 (implicit-GEMM M = N*H*W rows by N = C, reduction over K*R*S), warps 64 x 64 x 32,
// mma.sync m16n8k16, 3 stages, then TileBnBackward (tile_epilogue.cuh). Stride 1 only; no split-K.
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_dgrad.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/tile_epilogue.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct DgradBn {
  using E = Element<T>;
  using Swizzle = cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<1>;
  using OutputOp =
      LinearCombinationWithTile<cutlass::epilogue::thread::LinearCombination<E, 8, float, float>, TileBnBackward>;
  using Default = cutlass::conv::kernel::DefaultConv2dDgrad<
      E, cutlass::layout::TensorNHWC,                 // A: output gradient dy
      E, cutlass::layout::TensorNHWC,                 // B: filter (KRSC)
      E, cutlass::layout::TensorNHWC,                 // C / D: dx, then dz
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<kDgradBnTileRows, kDgradBnTileCols, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, OutputOp, Swizzle, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kUnity>;
  using Kernel = cutlass::conv::kernel::ImplicitGemmConvolution<
      typename Default::Mma,
      EpilogueThenTile<typename Default::Epilogue, Swizzle, kDgradBnTileRows, kDgradBnTileCols>, Swizzle,
      cutlass::conv::Operator::kDgrad>;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, const void* dy, const void* w, const void* x,
                                                 const float* mean, const float* invstd, const float* weight,
                                                 const float* bias, bool relu, void* dz, float* partials) {
    const typename Kernel::TensorRefC ref_dz(static_cast<E*>(dz), layout_input(s));
    TileBnBackward tile;
    tile.dz = dz;
    tile.x = x;
    tile.mean = mean;
    tile.invstd = invstd;
    tile.weight = weight;
    tile.bias = bias;
    tile.partials = partials;
    tile.relu = relu;
    tile.M = int64_t(s.N) * s.H * s.W;
    tile.C = s.C;
    // beta = 0: the epilogue never reads the source (C aliases D).
    return typename Operation::Arguments(problem_size(s), input_ref<typename Kernel::TensorRefA>(dy, layout_output(s)),
                                         input_ref<typename Kernel::TensorRefB>(w, layout_filter(s)), ref_dz, ref_dz,
                                         typename OutputOp::Params(typename OutputOp::Base::Params(1.f, 0.f), tile));
  }
};

}  // namespace detail

template <ConvDType T>
bool dgrad_bn_supports(const ConvShape& s) {
  using Op = detail::DgradBn<T>;
  return detail::shape_is_valid(s) && s.stride_h == 1 && s.stride_w == 1 &&
         detail::operation_supports<typename Op::Operation>(
             Op::arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, true, nullptr, nullptr),
             /*workspace_ok=*/false);
}

template <ConvDType T>
cudaError_t dgrad_bn(const ConvShape& s, const void* dy, const void* w, const void* x, const float* mean,
                     const float* invstd, const float* weight, const float* bias, bool relu, void* dz, float* partials,
                     cudaStream_t stream) {
  using Op = detail::DgradBn<T>;
  if (!dgrad_bn_supports<T>(s)) return detail::shape_is_valid(s) ? cudaErrorNotSupported : cudaErrorInvalidValue;
  if (partials == nullptr) return cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(
      Op::arguments(s, dy, w, x, mean, invstd, weight, bias, relu, dz, partials), nullptr, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
