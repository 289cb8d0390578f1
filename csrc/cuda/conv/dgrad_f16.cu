// dgrad: fp16 dy (NPQK) and w (KRSC), fp16 dx (NHWC), fp32 accumulation. CUTLASS 2.x strided dgrad
// (kOptimized iterators, StrideSupport::kStrided with its phase swizzle), tiles 128 x 128 x 32 (implicit-GEMM
// M = N*H*W rows by N = C, reduction over K*R*S), warps 64 x 64 x 32, mma.sync m16n8k16, 3 stages. No split-K.
#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution.h"
#include "cutlass/conv/kernel/default_conv2d_dgrad.h"
#include "cutlass/conv/threadblock/threadblock_swizzle.h"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/layout/tensor.h"
#include "cuda/conv/cutlass_fusion.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace {

using Element = cutlass::half_t;
using Accumulator = float;
using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, 8, Accumulator, Accumulator>;

using Kernel = typename cutlass::conv::kernel::DefaultConv2dDgrad<
    Element, cutlass::layout::TensorNHWC,              // A: output gradient dy
    Element, cutlass::layout::TensorNHWC,              // B: filter (KRSC)
    Element, cutlass::layout::TensorNHWC,              // C / D: dx
    Accumulator, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
    cutlass::conv::threadblock::StridedDgradIdentityThreadblockSwizzle<1>, /*Stages=*/3,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized,
    cutlass::conv::StrideSupport::kStrided>::Kernel;

using Operation = cutlass::conv::device::ImplicitGemmConvolution<Kernel>;

typename Operation::Arguments arguments(const ConvShape& s, const void* dy, const void* w, void* dx) {
  using TensorNHWC = cutlass::layout::TensorNHWC;
  const TensorNHWC layout_dy = TensorNHWC::packed({s.N, s.P, s.Q, s.K});
  const TensorNHWC layout_w = TensorNHWC::packed({s.K, s.R, s.S, s.C});
  const TensorNHWC layout_dx = TensorNHWC::packed({s.N, s.H, s.W, s.C});
  // CUTLASS's TensorRefs are non-const; the kernel only reads dy and w.
  const typename Kernel::TensorRefA ref_dy(const_cast<Element*>(static_cast<const Element*>(dy)), layout_dy);
  const typename Kernel::TensorRefB ref_w(const_cast<Element*>(static_cast<const Element*>(w)), layout_w);
  const typename Kernel::TensorRefC ref_dx(static_cast<Element*>(dx), layout_dx);
  // beta = 0: the epilogue never reads the source (C aliases D).
  return typename Operation::Arguments(detail::problem_size(s), ref_dy, ref_w, ref_dx, ref_dx,
                                       typename Epilogue::Params(Accumulator(1), Accumulator(0)));
}

}  // namespace

bool dgrad_f16_supports(const ConvShape& s) {
  if (!detail::shape_is_valid(s)) return false;
  const auto args = arguments(s, nullptr, nullptr, nullptr);
  return Operation::can_implement(args) == cutlass::Status::kSuccess && Operation::get_workspace_size(args) == 0;
}

cudaError_t dgrad_f16(const ConvShape& s, const void* dy, const void* w, void* dx, cudaStream_t stream) {
  if (!detail::shape_is_valid(s)) return cudaErrorInvalidValue;
  const auto args = arguments(s, dy, w, dx);
  if (Operation::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Operation::get_workspace_size(args) != 0) return cudaErrorNotSupported;
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
