// dgrad with the BatchNorm ReLU-mask / backward-reduction epilogue, fp16 (dgrad_bn.cuh): one instantiation
// per file.
#include "cuda/conv/dgrad_bn.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool dgrad_bn_supports<ConvDType::kHalf>(const ConvShape&);
template cudaError_t dgrad_bn<ConvDType::kHalf>(const ConvShape&, const void*, const void*, const void*, const float*,
                                               const float*, const float*, const float*, bool, void*, float*,
                                               cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
