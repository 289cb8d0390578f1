// fprop with the BN-apply + ReLU prologue: fp16 NHWC x, KRSC w, fp16 scale/shift, fp16 NHWC y, fp32
// accumulation. Tiles 128 x 128 x 32 (CTA, implicit-GEMM M = N*P*Q rows by N = K output channels), warps
// 64 x 64 x 32 (4 warps), mma.sync m16n8k16, 3 stages of cp.async (3 * (128 + 128) * 32 * 2 B = 48 KiB of
// operands plus the scale/shift tiles): the example-25 configuration with one stage fewer, so two CTAs fit
// per SM on sm80 and sm90 alike. kOptimized iterators (precomputed filter-position masks; R, S <= 32).
#include "cutlass/conv/kernel/default_conv2d_fprop_fusion.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/cutlass_fusion.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace {

using Element = cutlass::half_t;
using Accumulator = float;
// 8 fp16 per 128-bit store; D = alpha * acc + beta * C in fp32, rounded once to fp16.
using Epilogue = cutlass::epilogue::thread::LinearCombination<Element, 8, Accumulator, Accumulator>;

using Kernel = typename cutlass::conv::kernel::DefaultConv2dFpropFusion<
    Element, cutlass::layout::TensorNHWC,              // A: activations
    Element, cutlass::layout::TensorNHWC,              // B: filter (KRSC)
    Element, cutlass::layout::RowMajor,                // scale / shift vectors
    Element, cutlass::layout::TensorNHWC,              // C / D: output
    Accumulator, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;

using Operation = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;

}  // namespace

bool fprop_bn_relu_f16_supports(const ConvShape& s) { return detail::fprop_fusion_supports<Operation>(s); }

cudaError_t fprop_bn_relu_f16(const ConvShape& s, const void* x, const void* w, const void* scale,
                              const void* shift, void* y, cudaStream_t stream) {
  return detail::fprop_fusion_run<Operation>(s, x, w, scale, shift, y, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
