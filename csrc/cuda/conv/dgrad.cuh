// dgrad (conv_launch.h): 16-bit dy (NPQK) and w (KRSC), dx (NHWC), fp32 accumulation. CUTLASS 2.x strided
// dgrad (kOptimized iterators, StrideSupport::kStrided with its phase swizzle), tiles 128 x 128 x 32
// (implicit-GEMM M = N*H*W rows by N = C, reduction over K*R*S), warps 64 x 64 x 32, mma.sync m16n8k16,
// 3 stages. No split-K.
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_dgrad.h"
#include "cutlass/conv/threadblock/threadblock_swizzle.h"
#include "cutlass/epilogue/thread/linear_combination.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct Dgrad {
  using E = Element<T>;
  using Epilogue = cutlass::epilogue::thread::LinearCombination<E, 8, float, float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dDgrad<
      E, cutlass::layout::TensorNHWC,                 // A: output gradient dy
      E, cutlass::layout::TensorNHWC,                 // B: filter (KRSC)
      E, cutlass::layout::TensorNHWC,                 // C / D: dx
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, const void* dy, const void* w, void* dx) {
    const typename Kernel::TensorRefC ref_dx(static_cast<E*>(dx), layout_input(s));
    // beta = 0: the epilogue never reads the source (C aliases D).
    return typename Operation::Arguments(problem_size(s), input_ref<typename Kernel::TensorRefA>(dy, layout_output(s)),
                                         input_ref<typename Kernel::TensorRefB>(w, layout_filter(s)), ref_dx, ref_dx,
                                         typename Epilogue::Params(1.f, 0.f));
  }
};

}  // namespace detail

template <ConvDType T>
bool dgrad_supports(const ConvShape& s) {
  using Op = detail::Dgrad<T>;
  return detail::shape_is_valid(s) &&
         detail::operation_supports<typename Op::Operation>(Op::arguments(s, nullptr, nullptr, nullptr),
                                                            /*workspace_ok=*/false);
}

template <ConvDType T>
cudaError_t dgrad(const ConvShape& s, const void* dy, const void* w, void* dx, cudaStream_t stream) {
  using Op = detail::Dgrad<T>;
  if (!dgrad_supports<T>(s)) return detail::shape_is_valid(s) ? cudaErrorNotSupported : cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(Op::arguments(s, dy, w, dx), nullptr, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
