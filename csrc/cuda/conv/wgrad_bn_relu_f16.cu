// wgrad with the BN-apply + ReLU prologue recomputed: fp16 dy (NPQK) and x (NHWC), fp16 scale/shift, fp32
// accumulation and fp32 dw (KRSC). Tiles 128 x 128 x 32 (implicit-GEMM M = K output channels by N = R*S*C,
// reduction over N*P*Q), warps 64 x 64 x 32, mma.sync m16n8k16, 3 stages (example 26 uses 5; 3 keeps the
// shared memory of the fprop instantiation), kOptimized iterators. Serial split-K (deterministic).
#include "cutlass/conv/kernel/default_conv2d_wgrad_fusion.h"
#include "cutlass/epilogue/thread/linear_combination.h"
#include "cutlass/gemm/threadblock/threadblock_swizzle.h"
#include "cuda/conv/cutlass_fusion.cuh"

namespace fused_resnet {
namespace cuda_conv {
namespace {

using Element = cutlass::half_t;
using Accumulator = float;
// 4 fp32 per 128-bit store; dw = 1 * acc (+ the previous slices' partial, added by serial split-K).
using Epilogue = cutlass::epilogue::thread::LinearCombination<float, 4, Accumulator, Accumulator>;

using Kernel = typename cutlass::conv::kernel::DefaultConv2dWgradFusion<
    Element, cutlass::layout::TensorNHWC,              // A: output gradient dy
    Element, cutlass::layout::TensorNHWC,              // B: activations x (transformed)
    Element, cutlass::layout::RowMajor,                // scale / shift vectors
    float, cutlass::layout::TensorNHWC,                // C / D: dw (KRSC)
    Accumulator, cutlass::arch::OpClassTensorOp, cutlass::arch::Sm80,
    cutlass::gemm::GemmShape<128, 128, 32>, cutlass::gemm::GemmShape<64, 64, 32>,
    cutlass::gemm::GemmShape<16, 8, 16>, Epilogue,
    cutlass::gemm::threadblock::GemmIdentityThreadblockSwizzle<>, /*Stages=*/3,
    cutlass::arch::OpMultiplyAdd, cutlass::conv::IteratorAlgorithm::kOptimized>::Kernel;

using Operation = cutlass::conv::device::ImplicitGemmConvolutionFusion<Kernel>;

}  // namespace

bool wgrad_bn_relu_f16_supports(const ConvShape& s, int split_k_slices) {
  return detail::wgrad_fusion_supports<Operation>(s, split_k_slices);
}

size_t wgrad_bn_relu_f16_workspace_size(const ConvShape& s, int split_k_slices) {
  return detail::wgrad_fusion_workspace_size<Operation>(s, split_k_slices);
}

cudaError_t wgrad_bn_relu_f16(const ConvShape& s, int split_k_slices, const void* dy, const void* x,
                              const void* scale, const void* shift, float* dw, void* workspace,
                              cudaStream_t stream) {
  return detail::wgrad_fusion_run<Operation>(s, split_k_slices, dy, x, scale, shift, dw, workspace, stream);
}

}  // namespace cuda_conv
}  // namespace fused_resnet
