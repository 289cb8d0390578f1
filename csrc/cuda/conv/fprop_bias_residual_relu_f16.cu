// fprop with the eval epilogue: y = relu(conv2d(x, w) + bias + residual), fp16 x (NHWC) / w (KRSC) /
// residual / y (NPQK), fp32 bias. Plain CUTLASS 2.x fprop mainloop (no prologue: the BatchNorm is folded into
// w and bias), tiles 128 x 128 x 32, warps 64 x 64 x 32, mma.sync m16n8k16, 3 stages, kOptimized iterators;
// the broadcast epilogue adds the per-output-channel bias vector and the residual tensor in fp32.
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_fprop_with_broadcast.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/activation.h"
#include "cutlass/epilogue/thread/linear_combination_residual_block.h"
#include "cutlass/functional.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cutlass/layout/tensor.h"
#include "cuda/conv/cutlass_fusion.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace {

using Element = cutlass::half_t;
using Accumulator = float;

// Z = ReLu(plus(Identity(1 * acc + bias), 1 * residual)); 8 fp16 per 128-bit access; no T output stored.
using Epilogue = cutlass::epilogue::thread::LinearCombinationResidualBlock<
    Element, Accumulator, Accumulator, Element, 8, cutlass::epilogue::thread::Identity, cutlass::plus,
    cutlass::epilogue::thread::ReLu, cutlass::epilogue::thread::detail::NoOp, /*StoreT=*/false,
    /*ElementVector=*/float>;

using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropWithBroadcast<
    Element, cutlass::layout::TensorNHWC,              // A: activations
    Element, cutlass::layout::TensorNHWC,              // B: filter (KRSC)
    Element, cutlass::layout::TensorNHWC,              // C: residual, D: output
    Accumulator, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
    cutlass::conv::StrideSupport::kStrided>::Kernel;

using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

typename Operation::Arguments arguments(const ConvShape& s, const void* x, const void* w, const float* bias,
                                        const void* residual, void* y) {
  using TensorNHWC = cutlass::layout::TensorNHWC;
  const TensorNHWC layout_x = TensorNHWC::packed({s.N, s.H, s.W, s.C});
  const TensorNHWC layout_w = TensorNHWC::packed({s.K, s.R, s.S, s.C});
  const TensorNHWC layout_y = TensorNHWC::packed({s.N, s.P, s.Q, s.K});
  // CUTLASS's TensorRefs are non-const; the kernel only reads x, w, bias and residual.
  const typename Kernel::TensorRefA ref_x(const_cast<Element*>(static_cast<const Element*>(x)), layout_x);
  const typename Kernel::TensorRefB ref_w(const_cast<Element*>(static_cast<const Element*>(w)), layout_w);
  const typename Kernel::TensorRefC ref_r(const_cast<Element*>(static_cast<const Element*>(residual)), layout_y);
  const typename Kernel::TensorRefC ref_y(static_cast<Element*>(y), layout_y);
  // alpha = beta = 1; bias: one vector read per output channel (ldr 0: the same row for every output pixel).
  return typename Operation::Arguments(detail::problem_size(s), ref_x, ref_w, ref_r, ref_y,
                                       typename Epilogue::Params(Accumulator(1), Accumulator(1)),
                                       cutlass::conv::SplitKMode::kSerial, const_cast<float*>(bias),
                                       /*ptr_Tensor=*/nullptr, /*ldr=*/0, /*ldt=*/0);
}

}  // namespace

bool fprop_bias_residual_relu_f16_supports(const ConvShape& s) {
  if (!detail::shape_is_valid(s)) return false;
  const auto args = arguments(s, nullptr, nullptr, nullptr, nullptr, nullptr);
  return Operation::can_implement(args) == cutlass::Status::kSuccess && Operation::get_workspace_size(args) == 0;
}

cudaError_t fprop_bias_residual_relu_f16(const ConvShape& s, const void* x, const void* w, const float* bias,
                                         const void* residual, void* y, cudaStream_t stream) {
  if (!detail::shape_is_valid(s)) return cudaErrorInvalidValue;
  const auto args = arguments(s, x, w, bias, residual, y);
  if (Operation::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Operation::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // no split-K: no workspace
  Operation op;
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  }
  if (op.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace cuda_conv
}  // namespace fused_resnet
