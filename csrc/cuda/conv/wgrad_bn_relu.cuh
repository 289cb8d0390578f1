// wgrad with the BN-apply + ReLU prologue recomputed (conv_launch.h): 16-bit dy (NPQK) and x (NHWC), fp16
// scale / shift, fp32 accumulation and fp32 dw (KRSC) = alpha * acc. CUTLASS 2.x ImplicitGemmConvolutionFusion
// (default_conv2d_wgrad_fusion.h, example 26): the transform is applied to the activation operand (B) in
// registers (fp16: CUTLASS's; bf16: bf16_scale_bias_relu.cuh). Tiles 128 x 128 x 32 (implicit-GEMM M = K
// output channels by N = R*S*C, reduction over N*P*Q), warps 64 x 32 x 32 (8 warps), mma.sync m16n8k16,
// 3 stages (example 26 uses 5; 3 keeps the shared memory of the fprop instantiation), kOptimized iterators.
// Serial split-K (deterministic). Warps of 64 x 64 (4 warps, example 26's) hit ptxas's 255-register cap and
// spill 80 (fp16) / 108 (bf16) bytes on sm_90; 64 x 32 uses 184-189 registers, no spill, and keeps 8 warps
// per SM (1 CTA of 8 instead of 2 of 4). Which is faster is for a GPU session to measure.
#pragma once

// First: the CUTLASS headers below use Conv2dProblemSize without including it.
#include "cuda/conv/cutlass_common.cuh"
#include "cutlass/conv/device/implicit_gemm_convolution_fusion.h"
#include "cutlass/conv/kernel/default_conv2d_wgrad_fusion.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/bf16_scale_bias_relu.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct WgradBnRelu {
  using E = Element<T>;
  // 4 fp32 per 128-bit store; dw = alpha * acc (+ the previous slices' partial: serial split-K sets beta = 1
  // for slices after the first, so the epilogue must keep the default scale type, which reads C then).
  using Epilogue = cutlass::epilogue::thread::LinearCombination<float, 4, float, float>;
  using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgradFusion<
      E, cutlass::layout::TensorNHWC,                 // A: output gradient dy
      E, cutlass::layout::TensorNHWC,                 // B: activations x (transformed)
      ElementScaleBias, cutlass::layout::RowMajor,    // scale / shift vectors
      float, cutlass::layout::TensorNHWC,             // C / D: dw (KRSC)
      float, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
      cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 32, 32>,
      cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
      cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
      cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;
  using Operation = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;

  static typename Operation::Arguments arguments(const ConvShape& s, int split_k_slices, const void* dy,
                                                 const void* x, const void* scale, const void* shift,
                                                 const float* alpha, float* dw) {
    using K = typename Operation::ImplicitGemmFusionKernel;
    const cutlass::layout::RowMajor layout_v(s.C);
    const typename K::TensorRefC ref_dw(dw, layout_filter(s));
    // beta = 0: slice 0 (or the only slice) overwrites dw; serial split-K's later slices add to it.
    return typename Operation::Arguments(
        problem_size(s, split_k_slices), input_ref<typename K::TensorRefA>(dy, layout_output(s)),
        input_ref<typename K::TensorRefB>(x, layout_input(s)),
        input_ref<typename K::TensorRefScaleBias>(scale, layout_v),
        input_ref<typename K::TensorRefScaleBias>(shift, layout_v), ref_dw, ref_dw,
        typename Epilogue::Params(alpha, /*beta_ptr=*/nullptr), cutlass::conv::SplitKMode::kSerial);
  }
};

}  // namespace detail

template <ConvDType T>
bool wgrad_bn_relu_supports(const ConvShape& s, int split_k_slices) {
  using Op = detail::WgradBnRelu<T>;
  return detail::shape_is_valid(s) && split_k_slices >= 1 &&
         detail::operation_supports<typename Op::Operation>(
             Op::arguments(s, split_k_slices, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr),
             /*workspace_ok=*/true);
}

template <ConvDType T>
size_t wgrad_bn_relu_workspace_size(const ConvShape& s, int split_k_slices) {
  using Op = detail::WgradBnRelu<T>;
  if (!detail::shape_is_valid(s) || split_k_slices < 1) return 0;
  return Op::Operation::get_workspace_size(
      Op::arguments(s, split_k_slices, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));
}

template <ConvDType T>
cudaError_t wgrad_bn_relu(const ConvShape& s, int split_k_slices, const void* dy, const void* x, const void* scale,
                          const void* shift, const float* alpha, float* dw, void* workspace, cudaStream_t stream) {
  using Op = detail::WgradBnRelu<T>;
  if (!detail::shape_is_valid(s) || split_k_slices < 1) return cudaErrorInvalidValue;
  return detail::operation_run<typename Op::Operation>(
      Op::arguments(s, split_k_slices, dy, x, scale, shift, alpha, dw), workspace, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
