// Plain C++ launchers of the fused BatchNorm CUDA kernels (no torch headers): raw pointers, Layouts, a dtype
// tag and a stream in; cudaGetLastError() out. They allocate nothing: the reductions' partial-result scratch
// is passed in by the caller (see stats_num_partials). Activation-typed pointers (x, residual, out, grad_out,
// y, dx, dz) point at `dtype` elements; per-channel pointers (mean, invstd, weight, bias, sums) at the
// accumulation type: float, or double when dtype == kDouble. nullptr marks an absent optional argument.
// All launches go to `stream` on the current device (the caller sets it).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/bn_math.h"

namespace fused_resnet {
namespace cuda_bn {

enum class DType : int { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

// Number P of row chunks (partial results per channel) that bn_stats / bn_backward_reduce use for an x of
// layout lx on the current device; P >= 1, or 0 when x is empty (M == 0 or C == 0: nothing to launch).
// Scratch to pass to the launchers: bn_stats P * 3 * C doubles, bn_backward_reduce P * 2 * C accumulation
// elements; none (nullptr is fine) when P == 1, the first pass then writes the result directly.
// Any P in [1, 65535] is correct; these are the tuned values.
int64_t stats_num_partials(const Layout& lx, DType dtype);
int64_t backward_reduce_num_partials(const Layout& lx, DType dtype);

// stats: double [3, C] contiguous (count, mean, m2). partials: double [P, 3, C] when P > 1.
cudaError_t launch_bn_stats(const void* x, const Layout& lx, DType dtype, int64_t num_partials, double* partials,
                            double* stats, cudaStream_t stream);

// stats: double [3, C] contiguous. running_mean / running_var: both or neither (nullptr), contiguous, of
// running_dtype (kFloat or kDouble), updated in place. Factor: momentum when has_momentum, else
// 1 / *num_batches_tracked (a device int64 scalar). mean_out / invstd_out: contiguous [C] of out_dtype
// (kFloat or kDouble).
cudaError_t launch_bn_finalize(const double* stats, int64_t C, void* running_mean, void* running_var,
                               DType running_dtype, const int64_t* num_batches_tracked, bool has_momentum,
                               double momentum, double eps, void* mean_out, void* invstd_out, DType out_dtype,
                               cudaStream_t stream);

// y = relu?(x * scale + shift [+ residual]); residual may be nullptr (lr is then ignored).
// mean, invstd: contiguous [C]; weight, bias: contiguous [C] or nullptr.
cudaError_t launch_bn_act(const void* x, const Layout& lx, const void* residual, const Layout& lr, void* y,
                          const Layout& ly, const void* mean, const void* invstd, const void* weight,
                          const void* bias, bool relu, DType dtype, cudaStream_t stream);

// sums: accumulation type [2, C] contiguous (sum dz, sum dz * xhat). partials: [P, 2, C] when P > 1.
// out may be nullptr (ReLU mask recomputed from x); it is only read when relu.
cudaError_t launch_bn_backward_reduce(const void* grad_out, const Layout& ldy, const void* x, const Layout& lx,
                                      const void* out, const Layout& lo, const void* mean, const void* invstd,
                                      const void* weight, const void* bias, bool relu, DType dtype,
                                      int64_t num_partials, void* partials, void* sums, cudaStream_t stream);

// dx (and dz when dz != nullptr). sums (accumulation type [2, C] contiguous) and count (double [C]) both
// or neither: batch-statistics gradient, else dx = scale * dz.
cudaError_t launch_bn_backward_elemt(const void* grad_out, const Layout& ldy, const void* x, const Layout& lx,
                                     const void* out, const Layout& lo, const void* mean, const void* invstd,
                                     const void* weight, const void* bias, const void* sums, const double* count,
                                     bool relu, void* dx, const Layout& ldx, void* dz, const Layout& ldz,
                                     DType dtype, cudaStream_t stream);

// The CUTLASS convolutions' prologue vectors (common/bn_math.h, prologue_alpha): scale_out / shift_out fp16
// [C] (2-byte elements), alpha_out one float. mean / invstd float [C]; weight / bias float [C] or nullptr.
// One block; C >= 1.
cudaError_t launch_bn_prologue_half(const float* mean, const float* invstd, const float* weight, const float* bias,
                                    int64_t C, void* scale_out, void* shift_out, float* alpha_out,
                                    cudaStream_t stream);

// stats: double [3, C] = the Chan merge, in a fixed order, of partials double [P, 3, C] (count, mean, m2):
// bn_stats' second pass, for statistics whose partials another kernel wrote (the CUTLASS fprop's epilogue).
cudaError_t launch_merge_stats_partials(const double* partials, int64_t P, int64_t C, double* stats,
                                        cudaStream_t stream);

// out: float [K, C] = the sums over p of partials float [P, K, C], in a fixed order: bn_backward_reduce's
// second pass, for partials another kernel wrote (the CUTLASS dgrad's BatchNorm epilogue).
cudaError_t launch_reduce_partials_float(const float* partials, int64_t P, int K, int64_t C, float* out,
                                         cudaStream_t stream);

}  // namespace cuda_bn
}  // namespace fused_resnet
