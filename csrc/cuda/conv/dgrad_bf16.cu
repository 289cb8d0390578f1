// dgrad, bf16 (dgrad.cuh): one instantiation per file.
#include "cuda/conv/dgrad.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool dgrad_supports<ConvDType::kBFloat16>(const ConvShape&);
template cudaError_t dgrad<ConvDType::kBFloat16>(const ConvShape&, const void*, const void*, void*, cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
