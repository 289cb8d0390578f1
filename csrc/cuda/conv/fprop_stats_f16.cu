// fprop without a prologue, with the statistics epilogue, fp16 (fprop_stats.cuh): one instantiation per file.
#include "cuda/conv/fprop_stats.cuh"

namespace fused_resnet {
namespace cuda_conv {

template bool fprop_stats_supports<ConvDType::kHalf>(const ConvShape&);
template cudaError_t fprop_stats<ConvDType::kHalf>(const ConvShape&, const void*, const void*, void*, double*,
                                                  cudaStream_t);

}  // namespace cuda_conv
}  // namespace fused_resnet
