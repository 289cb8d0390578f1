// fprop with the eval epilogue (conv_launch.h): y = relu(conv2d(x, w) + bias + residual), 16-bit x (NHWC) /
// w (KRSC) / residual / y (NPQK), fp32 bias. Plain CUTLASS 2.x fprop mainloop (no prologue: the BatchNorm is
// folded into w and bias), tiles 128 x 128 x 32, warps 64 x 64 x 32, mma.sync m16n8k16, 3 stages,
// kOptimized iterators; the broadcast epilogue (default_conv2d_fprop_with_broadcast.h,
// LinearCombinationResidualBlock) adds the per-output-channel bias vector and the residual tensor in fp32.
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_residual_block.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct FpropBiasResidualRelu {
  using E = Element<T>;
  // Z = ReLu(plus(Identity(1 * acc + bias), 1 * residual)); 8 elements per 128-bit access; no T output.
  using Epilogue = cutlass::epilogue::thread::LinearCombinationResidualBlock<
      E, float, float, E, 8, cutlass::epilogue::thread::Identity, cutlass::plus, cutlass::epilogue::thread::ReLu,
      cutlass::epilogue::thread::detail::NoOp, /*StoreT=*/false, /*ElementVector=*/float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
      E, cutlass::layout::TensorNHWC,                 // A: activations
      E, cutlass::layout::TensorNHWC,                 // B: filter (KRSC)
      E, cutlass::layout::TensorNHWC,                 // C: residual, D: output
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
      cutlass::conv::StrideSupport::kStrided>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, const void* x, const void* w,
                                                 const float* bias, const void* residual, void* y) {
    // alpha = beta = 1; bias: one vector read per output channel (ldr 0: the same row for every pixel).
    return typename Operation::Arguments(
        problem_size(s), input_ref<typename Kernel::TensorRefA>(x, layout_input(s)),
        input_ref<typename Kernel::TensorRefB>(w, layout_filter(s)),
        input_ref<typename Kernel::TensorRefC>(residual, layout_output(s)),
        typename Kernel::TensorRefC(static_cast<E*>(y), layout_output(s)), typename Epilogue::Params(1.f, 1.f),
        cutlass::conv::SplitKMode::kSerial, const_cast<float*>(bias), /*ptr_Tensor=*/nullptr, /*ldr=*/0,
        /*ldt=*/0);
  }
};

}  // namespace detail

template <ConvDType T>
bool fprop_bias_residual_relu_supports(const ConvShape& s) {
  using Op = detail::FpropBiasResidualRelu<T>;
  return detail::shape_is_valid(s) &&
         detail::operation_supports<typename Op::Operation>(
             Op::arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr), /*workspace_ok=*/false);
}

template <ConvDType T>
cudaError_t fprop_bias_residual_relu(const ConvShape& s, const void* x, const void* w, const float* bias,
                                     const void* residual, void* y, cudaStream_t stream) {
  using Op = detail::FpropBiasResidualRelu<T>;
  if (!fprop_bias_residual_relu_supports<T>(s)) {
    return detail::shape_is_valid(s) ? cudaErrorNotSupported : cudaErrorInvalidValue;
  }
  return detail::operation_run<typename Op::Operation>(Op::arguments(s, x, w, bias, residual, y), nullptr, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
