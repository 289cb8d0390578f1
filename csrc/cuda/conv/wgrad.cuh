// wgrad without a prologue (conv_launch.h): dw = the weight gradient of conv2d(x, w), 16-bit dy (NPQK) and
// x (NHWC), fp32 accumulation and fp32 dw (KRSC). CUTLASS 2.x ImplicitGemmConvolution (default_conv2d_wgrad.h),
// the same tiles as the prologue wgrad (128 x 128 x 32, warps 64 x 32 x 32, 3 stages, kOptimized), serial
// split-K (deterministic).
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_wgrad.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct Wgrad {
  using E = Element<T>;
  // dw = acc (+ the previous slices' partial: serial split-K sets beta = 1 for slices after the first).
  using Epilogue = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgrad<
      E, cutlass::layout::TensorNHWC,                 // A: output gradient dy
      E, cutlass::layout::TensorNHWC,                 // B: activations x
      float, cutlass::layout::TensorNHWC,             // C / D: dw (KRSC)
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 32, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, int split_k_slices, const void* dy,
                                                 const void* x, float* dw) {
    const typename Kernel::TensorRefC ref_dw(dw, layout_filter(s));
    return typename Operation::Arguments(problem_size(s, split_k_slices),
                                         input_ref<typename Kernel::TensorRefA>(dy, layout_output(s)),
                                         input_ref<typename Kernel::TensorRefB>(x, layout_input(s)), ref_dw, ref_dw,
                                         typename Epilogue::Params(1.f, 0.f), cutlass::conv::SplitKMode::kSerial);
  }
};

}  // namespace detail

template <ConvDType T>
bool wgrad_supports(const ConvShape& s, int split_k_slices) {
  using Op = detail::Wgrad<T>;
  return detail::shape_is_valid(s) && split_k_slices >= 1 &&
         detail::operation_supports<typename Op::Operation>(
             Op::arguments(s, split_k_slices, nullptr, nullptr, nullptr), /*workspace_ok=*/true);
}

template <ConvDType T>
size_t wgrad_workspace_size(const ConvShape& s, int split_k_slices) {
  using Op = detail::Wgrad<T>;
  if (!detail::shape_is_valid(s) || split_k_slices < 1) return 0;
  return Op::Operation::get_workspace_size(Op::arguments(s, split_k_slices, nullptr, nullptr, nullptr));
}

template <ConvDType T>
cudaError_t wgrad(const ConvShape& s, int split_k_slices, const void* dy, const void* x, float* dw, void* workspace,
                  cudaStream_t stream) {
  using Op = detail::Wgrad<T>;
  if (!detail::shape_is_valid(s) || split_k_slices < 1) return cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(Op::arguments(s, split_k_slices, dy, x, dw), workspace,
                                                       stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
