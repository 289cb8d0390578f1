// Plain C++ launchers of the CUTLASS fused convolutions (no torch headers, no CUTLASS headers: the bindings
// include only this). Raw pointers, a ConvShape and a stream in; cudaError_t out. They allocate nothing.
//
// Layouts (all dense, packed):
//   x  activations NHWC  [N, H, W, C]  (a channels_last N,C,H,W tensor)
//   w  filter      KRSC  [K, R, S, C]  (a channels_last K,C,R,S tensor)
//   y  output      NPQK  [N, P, Q, K]  (channels_last N,K,P,Q)
// The BN-apply + ReLU prologue is relu(x * scale[c] + shift[c]) with scale = gamma * invstd and
// shift = beta - mean * scale, applied by CUTLASS's fprop mainloop fusion (example 25) to the activation
// fragments in registers, between shared memory and mma.sync. scale/shift are fp16 [C] (the operand type of
// that transform: its `fma.rn.f16x2.relu` takes fp16 pairs), so the caller rounds them from fp32 once.
// Padding: the mainloop fills out-of-bounds activations with the marker NaN 0x7eff and the transform maps
// it to 0, so padded taps contribute 0 (not relu(shift)), as in a convolution of the normalised tensor.
//
// Return codes: cudaSuccess; cudaErrorNotSupported when the instantiation cannot take the shape (the
// *_supports query says the same beforehand: callers fall back); cudaErrorInvalidValue for a bad shape;
// otherwise the launch's own error (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

namespace fused_resnet {
namespace cuda_conv {

struct ConvShape {
  int N, H, W, C;       // input
  int K, R, S;          // filter (K output channels, R x S taps)
  int P, Q;             // output spatial size
  int pad_h, pad_w;
  int stride_h, stride_w;
  int dilation_h, dilation_w;
};

// Output size of a cross-correlation (the caller's P, Q must equal it; the launchers check).
inline int conv_out_extent(int in, int filter, int pad, int stride, int dilation) {
  return (in + 2 * pad - dilation * (filter - 1) - 1) / stride + 1;
}

// ---------------------------------------------------------------------------------------------------------
// fprop with the BN-apply + ReLU prologue, fp16 x / w / y / scale / shift, fp32 accumulation, sm80 mma.sync
// (runs on sm80 and later, Hopper included: CUTLASS 2.x mainloop, no TMA / wgmma).
// Takes: C % 8 == 0 and K % 8 == 0 (128-bit accesses), groups 1, any R, S, stride, padding, dilation
// (one instantiation per tile shape; the iterator is CUTLASS's kOptimized one).

bool fprop_bn_relu_f16_supports(const ConvShape& s);
cudaError_t fprop_bn_relu_f16(const ConvShape& s, const void* x, const void* w, const void* scale,
                              const void* shift, void* y, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// fprop with the eval epilogue (a BatchNorm folded into w and bias, no prologue):
// y = relu(conv2d(x, w) + bias[k] + residual). fp16 x / w / residual / y, fp32 bias [K], fp32 accumulation and
// epilogue arithmetic, one rounding to fp16. CUTLASS's fprop with a broadcast epilogue
// (default_conv2d_fprop_with_broadcast.h, LinearCombinationResidualBlock: ReLU(acc + bias + residual)).
// residual is required (NPQK, y's shape): that epilogue always reads its source, so a call without a residual
// passes zeros. Takes: C % 8 == 0 and K % 8 == 0, groups 1, R, S <= 32.

bool fprop_bias_residual_relu_f16_supports(const ConvShape& s);
cudaError_t fprop_bias_residual_relu_f16(const ConvShape& s, const void* x, const void* w, const float* bias,
                                         const void* residual, void* y, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// wgrad with the prologue recomputed: dw[k, r, s, c] = sum over (n, p, q) of dy[n, p, q, k] *
// relu(x[n, h, w, c] * scale[c] + shift[c]) at the input position (h, w) of tap (r, s), i.e. the weight
// gradient of a convolution whose input was relu(bn(x)), without that input ever being stored. The
// transform is CUTLASS's wgrad mainloop fusion (example 26), applied to the activation operand (B) in
// registers; padded taps are 0 by the same NaN-marker rule as fprop. fp16 dy / x / scale / shift, fp32
// accumulation, fp32 dw (KRSC, the caller casts to the weight's dtype).
// Split-K: split_k_slices >= 1 slices of the N*P*Q reduction, combined by CUTLASS's serial split-K: slice i
// waits on a per-tile semaphore for slice i - 1 and adds its partial to dw in fp32, so the sum's order is
// fixed (deterministic) for a given split_k_slices. The semaphores live in `workspace`
// (wgrad_bn_relu_f16_workspace_size bytes, which the launcher zeroes on `stream`; nullptr when 0).
// Takes: C % 8 == 0 and K % 8 == 0, groups 1, R, S <= 32.

bool wgrad_bn_relu_f16_supports(const ConvShape& s, int split_k_slices);
size_t wgrad_bn_relu_f16_workspace_size(const ConvShape& s, int split_k_slices);
cudaError_t wgrad_bn_relu_f16(const ConvShape& s, int split_k_slices, const void* dy, const void* x,
                              const void* scale, const void* shift, float* dw, void* workspace,
                              cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// dgrad: dx[n, h, w, c] = sum over (k, r, s) of dy[n, p, q, k] * w[k, r, s, c] over the (p, q, r, s) with
// h = p * stride_h - pad_h + r and w likewise: the input gradient of the convolution. fp16 dy (NPQK), w (KRSC)
// and dx (NHWC), fp32 accumulation, one rounding. CUTLASS's strided dgrad (kStrided, one CTA per phase of
// the stride), which takes stride 1 too; every dx element is written once (phases without a filter tap,
// stride > filter, store their zero accumulators: to be confirmed by the GPU parity tests, 1x1 stride 2).
// Takes: C % 8 == 0 and K % 8 == 0, groups 1, dilation 1, R, S <= 32.

bool dgrad_f16_supports(const ConvShape& s);
cudaError_t dgrad_f16(const ConvShape& s, const void* dy, const void* w, void* dx, cudaStream_t stream);

}  // namespace cuda_conv
}  // namespace fused_resnet
