// wgrad without a prologue, bf16 (wgrad.cuh): one instantiation per file.
#include "cuda/conv/wgrad.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool wgrad_supports<ConvDType::kBFloat16>(const ConvShape&, int);
template size_t wgrad_workspace_size<ConvDType::kBFloat16>(const ConvShape&, int);
template cudaError_t wgrad<ConvDType::kBFloat16>(const ConvShape&, int, const void*, const void*, float*, void*,
                                            cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
