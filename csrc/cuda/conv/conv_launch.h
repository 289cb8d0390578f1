// Plain C++ launchers of the CUTLASS fused convolutions (no torch headers, no CUTLASS headers: the bindings
// include only this). Raw pointers, a ConvShape and a stream in; cudaError_t out. They allocate nothing.
// Each launcher is a function template over the element type (ConvDType: fp16 or bf16), instantiated once per
// type in its own .cu file (<op>_f16.cu, <op>_bf16.cu), so that the builds run in parallel.
//
// Layouts (all dense, packed):
//   x  activations NHWC  [N, H, W, C]  (a channels_last N,C,H,W tensor)
//   w  filter      KRSC  [K, R, S, C]  (a channels_last K,C,R,S tensor)
//   y  output      NPQK  [N, P, Q, K]  (channels_last N,K,P,Q)
// The BN-apply + ReLU prologue is relu(x * scale[c] + shift[c]) with scale = gamma * invstd and
// shift = beta - mean * scale, applied by CUTLASS's fprop mainloop fusion (example 25) to the activation
// fragments in registers, between shared memory and mma.sync. scale/shift are fp16 [C] for both element
// types (CUTLASS's scale/bias warp iterator loads 16-bit pairs with ldmatrix): fp16 activations use CUTLASS's
// transform (`fma.rn.f16x2.relu`, fp16 arithmetic), bf16 activations our specialization of it
// (bf16_scale_bias_relu.cuh: fp32 arithmetic, one rounding to bf16).
// Range: the caller divides scale and shift by `alpha`, a power of two >= 1 chosen so that both fit fp16
// (relu is positively homogeneous: relu(v) = alpha * relu(v / alpha)), and the epilogue multiplies the
// accumulator by alpha again: `alpha` is a device pointer to one fp32 (read by the kernel, no host sync).
// Padding: the mainloop fills out-of-bounds activations with the 16-bit marker 0x7eff and the transform maps
// it to 0, so padded taps contribute 0 (not relu(shift)), as in a convolution of the normalised tensor.
//
// Return codes: cudaSuccess; cudaErrorNotSupported when the instantiation cannot take the shape (the
// *_supports query says the same beforehand: callers fall back); cudaErrorInvalidValue for a bad shape;
// otherwise the launch's own error (cudaGetLastError()).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <type_traits>

namespace fused_resnet {
namespace cuda_conv {

// The 16-bit element type of x, w, dy, y and dx (scale / shift are fp16 for both).
enum class ConvDType { kHalf, kBFloat16 };
template <ConvDType T>
using ConvDTypeTag = std::integral_constant<ConvDType, T>;

struct ConvShape {
  int N, H, W, C;       // input
  int K, R, S;          // filter (K output channels, R x S taps)
  int P, Q;             // output spatial size
  int pad_h, pad_w;
  int stride_h, stride_w;
  int dilation_h, dilation_w;
};

// Output size of a cross-correlation (the caller's P, Q must equal it; the launchers check). 0 when the
// dilated filter is larger than the padded input (torch's conv2d raises there; C++'s division would round the
// negative span towards zero and report one output position).
inline int conv_out_extent(int in, int filter, int pad, int stride, int dilation) {
  const int span = in + 2 * pad - dilation * (filter - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// CUTLASS's own limits, for every instantiation below (each *_supports includes them, so that no launcher runs
// outside them; ops/conv_compiled.py's cutlass_takes and cutlass_shape_fits restate them):
//   - C and K multiples of 8, the elements of one 128-bit access of every operand and of the output
//     (CUTLASS's plain device operators check the output's alignment in can_implement, its fusion operators
//     do not: an fprop_bn_relu with K = 12 would store misaligned 16-byte vectors, into the next row too);
//   - at most 32 x 32 filter taps (the kOptimized iterators keep one mask bit per tap);
//   - every tensor under 2 GiB: the 16-bit x, w and y, and wgrad's fp32 dw (CUTLASS's iterators are
//     documented for 32-bit byte offsets: its plain operators refuse larger tensors, its fusion ones do not
//     check).
constexpr int kAlignment = 8;
constexpr int kMaxFilterTaps = 32;
constexpr long long kMaxTensorBytes = 1LL << 31;

inline bool shape_fits(const ConvShape& s) {
  const long long x = 1LL * s.N * s.H * s.W * s.C, w = 1LL * s.K * s.R * s.S * s.C, y = 1LL * s.N * s.P * s.Q * s.K;
  return s.C % kAlignment == 0 && s.K % kAlignment == 0 && s.R <= kMaxFilterTaps && s.S <= kMaxFilterTaps &&
         2 * x < kMaxTensorBytes && 4 * w < kMaxTensorBytes && 2 * y < kMaxTensorBytes;
}

// ---------------------------------------------------------------------------------------------------------
// fprop with the BN-apply + ReLU prologue: y = alpha * conv2d(relu(x * scale + shift), w). 16-bit x / w / y,
// fp16 scale / shift, fp32 accumulation and fp32 alpha, one rounding of y; sm80 mma.sync (runs on sm80 and
// later, Hopper included: CUTLASS 2.x mainloop, no TMA / wgmma).
// Takes: C % 8 == 0 and K % 8 == 0 (128-bit accesses), groups 1, R, S <= 32, any stride, padding, dilation
// (one instantiation per tile shape; the iterator is CUTLASS's kOptimized one).

// Statistics: tile_stats nullptr, or double [ceil(N*P*Q / kFpropTileRows), 3, K]: per row tile of
// kFpropTileRows output pixels and per output channel, the (count, mean, m2) of the stored y (exact two-pass
// in fp32 over the tile's rounded values), computed in the epilogue from the tile the CTA just stored
// (tile_epilogue.cuh). The caller Chan-merges the row tiles in a fixed order
// (cuda_bn::launch_merge_stats_partials); with one row tile, tile_stats is the [3, K] result itself.
constexpr int kFpropTileRows = 128;
constexpr int kFpropTileCols = 128;

template <ConvDType T>
bool fprop_bn_relu_supports(const ConvShape& s);
template <ConvDType T>
cudaError_t fprop_bn_relu(const ConvShape& s, const void* x, const void* w, const void* scale, const void* shift,
                          const float* alpha, void* y, double* tile_stats, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// fprop without a prologue: y = conv2d(x, w), 16-bit x / w / y, fp32 accumulation, one rounding; tile_stats as
// for fprop_bn_relu (nullptr: none). Takes: C % 8 == 0 and K % 8 == 0, groups 1, any stride, padding,
// dilation (R, S <= 32).

template <ConvDType T>
bool fprop_stats_supports(const ConvShape& s);
template <ConvDType T>
cudaError_t fprop_stats(const ConvShape& s, const void* x, const void* w, void* y, double* tile_stats,
                        cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// fprop with the eval epilogue (a BatchNorm folded into w and bias, no prologue):
// y = relu(conv2d(x, w) + bias[k] + residual). 16-bit x / w / residual / y, fp32 bias [K], fp32 accumulation
// and epilogue arithmetic, one rounding to the element type. CUTLASS's fprop with a broadcast epilogue
// (default_conv2d_fprop_with_broadcast.h, LinearCombinationResidualBlock: ReLU(acc + bias + residual)).
// residual is required (NPQK, y's shape): that epilogue always reads its source, so a call without a residual
// passes zeros. Takes: C % 8 == 0 and K % 8 == 0, groups 1, R, S <= 32.

template <ConvDType T>
bool fprop_bias_residual_relu_supports(const ConvShape& s);
template <ConvDType T>
cudaError_t fprop_bias_residual_relu(const ConvShape& s, const void* x, const void* w, const float* bias,
                                     const void* residual, void* y, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// wgrad with the prologue recomputed: dw[k, r, s, c] = sum over (n, p, q) of dy[n, p, q, k] *
// relu(x[n, h, w, c] * scale[c] + shift[c]) at the input position (h, w) of tap (r, s), i.e. the weight
// gradient of a convolution whose input was relu(bn(x)), without that input ever being stored. The
// transform is CUTLASS's wgrad mainloop fusion (example 26), applied to the activation operand (B) in
// registers; padded taps are 0 by the same marker rule as fprop. 16-bit dy / x, fp16 scale / shift (divided
// by *alpha, as for fprop; the epilogue multiplies by it), fp32 accumulation, fp32 dw (KRSC, the caller
// casts to the weight's dtype).
// Split-K: split_k_slices >= 1 slices of the N*P*Q reduction, combined by CUTLASS's serial split-K: slice i
// waits on a per-tile semaphore for slice i - 1 and adds its partial to dw in fp32, so the sum's order is
// fixed (deterministic) for a given split_k_slices. The semaphores live in `workspace`
// (wgrad_bn_relu_workspace_size bytes, which the launcher zeroes on `stream`; nullptr when 0).
// Takes: C % 8 == 0 and K % 8 == 0, groups 1, R, S <= 32.

template <ConvDType T>
bool wgrad_bn_relu_supports(const ConvShape& s, int split_k_slices);
template <ConvDType T>
size_t wgrad_bn_relu_workspace_size(const ConvShape& s, int split_k_slices);
template <ConvDType T>
cudaError_t wgrad_bn_relu(const ConvShape& s, int split_k_slices, const void* dy, const void* x, const void* scale,
                          const void* shift, const float* alpha, float* dw, void* workspace, cudaStream_t stream);

// wgrad without a prologue: the weight gradient of conv2d(x, w), as wgrad_bn_relu without the transform
// (same split-K rule, workspace and takes).

template <ConvDType T>
bool wgrad_supports(const ConvShape& s, int split_k_slices);
template <ConvDType T>
size_t wgrad_workspace_size(const ConvShape& s, int split_k_slices);
template <ConvDType T>
cudaError_t wgrad(const ConvShape& s, int split_k_slices, const void* dy, const void* x, float* dw, void* workspace,
                  cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// dgrad: dx[n, h, w, c] = sum over (k, r, s) of dy[n, p, q, k] * w[k, r, s, c] over the (p, q, r, s) with
// h = p * stride_h - pad_h + r and w likewise: the input gradient of the convolution. 16-bit dy (NPQK),
// w (KRSC) and dx (NHWC), fp32 accumulation, one rounding. CUTLASS's strided dgrad (kStrided, one CTA per phase of
// the stride), which takes stride 1 too. Every dx element is written once, so dx needs no zeroing: the
// swizzle launches every phase (StridedDgradIdentityThreadblockSwizzle), a phase without a filter tap
// (stride > filter: 3 of the 4 phases of a 1x1 stride-2 convolution) skips only the mainloop and stores its
// cleared accumulators (implicit_gemm_convolution_strided_dgrad.h: the early return is for phases with no dx
// row at all), and the strided-dgrad output iterator maps a phase's rows one to one onto its dx pixels (read
// from CUTLASS 4.2 and replayed on CPU over small shapes; the GPU parity tests' 1x1 stride-2 case checks it).
// Takes: C % 8 == 0 and K % 8 == 0, groups 1, dilation 1, R, S <= 32.

template <ConvDType T>
bool dgrad_supports(const ConvShape& s);
template <ConvDType T>
cudaError_t dgrad(const ConvShape& s, const void* dy, const void* w, void* dx, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------------------
// dgrad with the prologue BatchNorm's backward in the epilogue: dz = dgrad(dy, w) * [z > 0] (z = (x - mean) *
// weight * invstd + bias, the prologue's BatchNorm recomputed from x; no mask when !relu), 16-bit dy / w / x /
// dz, fp32 accumulation; and partials float [ceil(N*H*W / kDgradBnTileRows), 2, C] = per row tile and channel
// (sum dz, sum dz * xhat), xhat = (x - mean) * invstd, fp32 sums in row order over the tile's stored
// (rounded) dz. The caller sums the row tiles in a fixed order (cuda_bn::launch_reduce_partials_float).
// mean / invstd float [C]; weight / bias float [C] or nullptr. Takes: stride 1 (CUTLASS's unit-stride
// dgrad), dilation 1, C % 8 == 0 and K % 8 == 0, groups 1.
constexpr int kDgradBnTileRows = 128;
constexpr int kDgradBnTileCols = 128;

template <ConvDType T>
bool dgrad_bn_supports(const ConvShape& s);
template <ConvDType T>
cudaError_t dgrad_bn(const ConvShape& s, const void* dy, const void* w, const void* x, const float* mean,
                     const float* invstd, const float* weight, const float* bias, bool relu, void* dz, float* partials,
                     cudaStream_t stream);

}  // namespace cuda_conv
}  // namespace fused_resnet
