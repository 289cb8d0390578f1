// wgrad with the BN-apply + ReLU prologue recomputed, bf16 (wgrad_bn_relu.cuh): one instantiation per file.
#include "cuda/conv/wgrad_bn_relu.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool wgrad_bn_relu_supports<ConvDType::kBFloat16>(const ConvShape&, int);
template size_t wgrad_bn_relu_workspace_size<ConvDType::kBFloat16>(const ConvShape&, int);
template cudaError_t wgrad_bn_relu<ConvDType::kBFloat16>(const ConvShape&, int, const void*, const void*, const void*,
                                                    const void*, const float*, float*, void*, cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
