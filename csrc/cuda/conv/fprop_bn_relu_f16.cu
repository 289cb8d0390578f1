// fprop with the BN-apply + ReLU prologue, fp16 (fprop_bn_relu.cuh): one instantiation per file.
#include "cuda/conv/fprop_bn_relu.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool fprop_bn_relu_supports<ConvDType::kHalf>(const ConvShape&);
template cudaError_t fprop_bn_relu<ConvDType::kHalf>(const ConvShape&, const void*, const void*, const void*,
                                                    const void*, const float*, void*, double*, cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
