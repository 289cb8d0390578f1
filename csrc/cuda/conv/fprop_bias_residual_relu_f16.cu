// fprop with the eval epilogue bias + residual + ReLU, fp16 (fprop_bias_residual_relu.cuh): one instantiation
// per file.
#include "cuda/conv/fprop_bias_residual_relu.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool fprop_bias_residual_relu_supports<ConvDType::kHalf>(const ConvShape&);
template cudaError_t fprop_bias_residual_relu<ConvDType::kHalf>(const ConvShape&, const void*, const void*,
                                                               const float*, const void*, void*, cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
