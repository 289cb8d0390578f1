// fprop without a prologue, with the statistics epilogue, bf16 (fprop_stats.cuh): one instantiation per file.
#include "cuda/conv/fprop_stats.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool fprop_stats_supports<ConvDType::kBFloat16>(const ConvShape&);
template cudaError_t fprop_stats<ConvDType::kBFloat16>(const ConvShape&, const void*, const void*, void*, double*,
                                                  cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
