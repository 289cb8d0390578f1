// CUDA registrations of conv_fwd, conv_wgrad and conv_dgrad (contract: csrc/ops.cpp) on the CUTLASS
// instantiations of this folder, through their torch-free launchers (conv_launch.h). Built only when setup.py builds the
// CUTLASS part (FUSED_RESNET_WITH_CUTLASS); not emulated on CPU (tests/cuda_emulation covers csrc/cuda/*, not
// this folder: tensor-core code has no CPU emulation). Same argument checks as the CPU twin
// (common/conv_checks.h).
//
// What the CUDA implementation takes today (fused_resnet/ops/conv_compiled.py offers it only these calls;
// any other is rejected here with a message, never computed differently): fp16 or bf16 x and weight, groups 1,
// C % 8 == 0 and K % 8 == 0, and
//   conv_fwd    the BN-apply + ReLU prologue (mean given, relu_in) without an eval epilogue, no prologue and
//               no epilogue, or the eval epilogue bias (+ residual) + ReLU without a prologue;
//   conv_wgrad  the BN-apply + ReLU prologue, recomputed, or none;
//   conv_dgrad  dilation 1 (CUTLASS's strided dgrad takes no dilation);
//   conv_dgrad_bn  stride 1 and dilation 1 (CUTLASS's unit-stride dgrad, the tile epilogue needs its
//               consecutive rows).
// Statistics: with the prologue, in the fprop's epilogue (tile_epilogue.cuh: per 128-row tile and
// channel, from the tile the CTA just stored), then Chan-merged in double in a fixed order
// (cuda_bn::launch_merge_stats_partials); deterministic, bn_stats' (count, mean, m2) format. With the eval
// epilogue (no statistics epilogue instantiated): bn_stats' kernels on the stored y, a second pass.
// Prologue numerics: the transform computes relu(x * scale + shift) with scale and shift rounded to fp16 here
// (from fp32 scale = bn_weight * invstd, shift = bn_bias - mean * scale), in fp16 arithmetic for fp16
// activations (CUTLASS's fma.rn.f16x2.relu) and fp32 for bf16 (bf16_scale_bias_relu.cuh); the Triton kernels
// and the CPU twin apply (x - mean) * scale + bias in fp32. The folded form cancels where |mean * scale| is
// large against the normalised values: the fp16 shift then carries an absolute error of about
// |shift| * 2^-11 that eager's (x - mean) * scale does not have (e.g. a near-constant channel, invstd =
// 1 / sqrt(eps), whose mean is far from 0). Unmeasured on a GPU; the reason the per-shape choice must not
// take CUTLASS before the GPU parity tests pass. Range: scale and shift are divided by a power of two
// alpha >= 1 (computed on the device, no sync) that brings them under kPrologueLimit (common/bn_math.h),
// and the epilogue multiplies the accumulator by alpha (relu(v) = alpha * relu(v / alpha)), so they never
// overflow fp16 into inf.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "common/conv_checks.h"
#include "common/tensor_utils.h"
#include "cuda/batch_norm_launch.h"
#include "cuda/conv/conv_launch.h"

#ifdef FUSED_RESNET_WITH_CUTLASS

namespace fused_resnet {
namespace {

using OptTensor = c10::optional<at::Tensor>;
using cuda_conv::ConvDType;
using cuda_conv::ConvDTypeTag;

// Calls f(ConvDTypeTag<T>{}) for the launchers' element type of t (fp16 or bf16; the callers checked).
template <typename F>
auto with_conv_dtype(at::ScalarType t, F&& f) {
  return t == at::kBFloat16 ? f(ConvDTypeTag<ConvDType::kBFloat16>{}) : f(ConvDTypeTag<ConvDType::kHalf>{});
}

bool is_conv_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16; }

int as_int(int64_t v, const char* what) {
  TORCH_CHECK(v >= 0 && v <= std::numeric_limits<int>::max(), "fused_resnet: conv_fwd (CUDA): ", what, " = ", v,
              " does not fit the CUTLASS kernels' 32-bit extents");
  return static_cast<int>(v);
}

// t (dense in `format`), or a copy (a fresh allocation: 512-byte aligned) where its data is not `bytes`-aligned:
// CUTLASS's vector accesses need it, and a view with a storage offset may not have it.
at::Tensor aligned(const at::Tensor& t, at::MemoryFormat format = at::MemoryFormat::Contiguous, int bytes = 16) {
  at::Tensor c = t.contiguous(format);
  if (reinterpret_cast<std::uintptr_t>(c.const_data_ptr()) % bytes != 0) c = c.clone(format);
  return c;
}

// A dense channels_last copy unless t already is one, 16-byte aligned.
at::Tensor channels_last_aligned(const at::Tensor& t) { return aligned(t, at::MemoryFormat::ChannelsLast); }

// Why an instantiation's *_supports refused a shape (the first condition that fails; ops/conv_compiled.py
// restates them, so that dispatch sends such calls to another implementation instead).
std::string refusal(const cuda_conv::ConvShape& s) {
  if (s.C % 8 != 0 || s.K % 8 != 0) return "it needs C % 8 == 0 and K % 8 == 0";
  if (s.R > cuda_conv::kMaxFilterTaps || s.S > cuda_conv::kMaxFilterTaps) return "it takes at most 32 x 32 filter taps";
  if (!cuda_conv::shape_fits(s)) return "it takes tensors under 2 GiB (CUTLASS's 32-bit offsets)";
  return "CUTLASS's can_implement refuses it";
}

// The launchers' shape of a convolution of x with a weight of weight_size (checked to fit their int32).
cuda_conv::ConvShape conv_shape(const at::Tensor& x, at::IntArrayRef weight_size, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation) {
  cuda_conv::ConvShape s{};
  s.N = as_int(x.size(0), "N");
  s.C = as_int(x.size(1), "C");
  s.H = as_int(x.size(2), "H");
  s.W = as_int(x.size(3), "W");
  s.K = as_int(weight_size[0], "K");
  s.R = as_int(weight_size[2], "R");
  s.S = as_int(weight_size[3], "S");
  s.pad_h = as_int(padding[0], "pad_h");
  s.pad_w = as_int(padding[1], "pad_w");
  s.stride_h = as_int(stride[0], "stride_h");
  s.stride_w = as_int(stride[1], "stride_w");
  s.dilation_h = as_int(dilation[0], "dilation_h");
  s.dilation_w = as_int(dilation[1], "dilation_w");
  s.P = cuda_conv::conv_out_extent(s.H, s.R, s.pad_h, s.stride_h, s.dilation_h);
  s.Q = cuda_conv::conv_out_extent(s.W, s.S, s.pad_w, s.stride_w, s.dilation_w);
  TORCH_CHECK(s.P > 0 && s.Q > 0, "fused_resnet: no convolution output for input ", x.sizes(), " and weight ",
              weight_size, ", padding ", padding, ", dilation ", dilation,
              ": Kernel size can't be greater than actual input size");
  // Element offsets inside the kernels' tensors must fit int32 as well as the extents.
  as_int(x.numel(), "x.numel()");
  as_int(int64_t(s.N) * s.P * s.Q * s.K, "y.numel()");
  return s;
}

// The prologue as the transforms take it: relu(x * scale + shift) with fp16 scale / alpha, shift / alpha and
// an fp32 alpha on the device (common/bn_math.h, prologue_alpha), from one kernel launch
// (cuda_bn::launch_bn_prologue_half, also the CUDA implementation of the bn_prologue_half op, which the CPU
// emulation tests against its CPU twin). Fresh allocations of the caching allocator: 16-byte aligned.
struct PrologueVectors {
  at::Tensor scale, shift, alpha;
};

PrologueVectors prologue_vectors(const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& bn_weight,
                                 const OptTensor& bn_bias) {
  const PrologueHalfArgs a = prepare_prologue_half(mean.to(at::kFloat), invstd.to(at::kFloat), bn_weight, bn_bias);
  const auto opts = a.mean.options();
  PrologueVectors v{at::empty({a.C}, opts.dtype(at::kHalf)), at::empty({a.C}, opts.dtype(at::kHalf)),
                    at::empty({1}, opts)};
  const cudaError_t err = cuda_bn::launch_bn_prologue_half(
      a.mean.const_data_ptr<float>(), a.invstd.const_data_ptr<float>(),
      a.weight.defined() ? a.weight.const_data_ptr<float>() : nullptr,
      a.bias.defined() ? a.bias.const_data_ptr<float>() : nullptr, a.C, v.scale.data_ptr(), v.shift.data_ptr(),
      v.alpha.data_ptr<float>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: prologue vectors launch failed: ", cudaGetErrorString(err));
  return v;
}

std::tuple<at::Tensor, at::Tensor> conv_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                 const OptTensor& mean, const OptTensor& invstd,
                                                 const OptTensor& bn_weight, const OptTensor& bn_bias,
                                                 bool relu_in, const OptTensor& bias, const OptTensor& residual,
                                                 bool relu_out, at::IntArrayRef stride, at::IntArrayRef padding,
                                                 at::IntArrayRef dilation, int64_t groups, bool stats) {
  check_conv_fwd_args(x, weight, mean, invstd, bn_weight, bn_bias, bias, residual, stride, padding, dilation,
                      groups);
  TORCH_CHECK(x.is_cuda(), "fused_resnet: conv_fwd: x must be a CUDA tensor here, got one on ", x.device());
  // The three instantiated variants: the training prologue, a plain convolution (both with the statistics
  // epilogue), or the eval epilogue with its ReLU.
  const bool bn_relu_prologue = present(mean) && relu_in && !present(bias) && !present(residual) && !relu_out;
  const bool plain = !present(mean) && !present(bias) && !present(residual) && !relu_out;
  const bool eval_epilogue = !present(mean) && present(bias) && relu_out;
  TORCH_CHECK(is_conv_dtype(x.scalar_type()) && groups == 1 && (bn_relu_prologue || plain || eval_epilogue),
              "fused_resnet: conv_fwd (CUDA, CUTLASS) takes fp16 or bf16, groups 1, and either the BN + ReLU prologue "
              "without an eval epilogue, no prologue and no epilogue, or bias (+ residual) + ReLU without a "
              "prologue; got ", x.scalar_type(),
              ", groups ", groups, ", prologue ", present(mean), ", relu_in ", relu_in, ", bias ", present(bias),
              ", residual ", present(residual), ", relu_out ", relu_out,
              " (fused_resnet.dispatch sends other calls to another implementation)");
  const c10::cuda::CUDAGuard guard(x.device());

  const cuda_conv::ConvShape s = conv_shape(x, weight.sizes(), stride, padding, dilation);
  const auto format = x.suggest_memory_format();
  at::Tensor y = at::empty({s.N, s.K, s.P, s.Q}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (s.N == 0 || s.K == 0) {  // an empty output: nothing to launch (an empty grid is a launch error)
    return {y.contiguous(format), stats ? at::zeros({3, s.K}, y.options().dtype(at::kDouble))
                                        : at::empty({0}, y.options().dtype(at::kDouble))};
  }
  TORCH_CHECK(s.C > 0, "fused_resnet: conv_fwd (CUDA, CUTLASS) needs at least one input channel");
  const at::Tensor xc = channels_last_aligned(x), wc = channels_last_aligned(weight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  const at::ScalarType dtype = x.scalar_type();
  const char* const shape_message = "fused_resnet: conv_fwd (CUTLASS) does not take this shape (";
  at::Tensor s_out = at::empty({0}, y.options().dtype(at::kDouble)), tile_stats;
  // The prologue and plain kernels compute the statistics in their epilogue: one (count, mean, m2) per row
  // tile and channel, merged below (one row tile: the result itself).
  const int64_t row_tiles = (int64_t(s.N) * s.P * s.Q + cuda_conv::kFpropTileRows - 1) / cuda_conv::kFpropTileRows;
  if (stats && !eval_epilogue) {
    s_out = at::empty({3, s.K}, y.options().dtype(at::kDouble));
    tile_stats = row_tiles > 1 ? at::empty({row_tiles, 3, s.K}, y.options().dtype(at::kDouble)) : s_out;
  }
  double* const tile_stats_ptr = tile_stats.defined() ? tile_stats.data_ptr<double>() : nullptr;
  if (bn_relu_prologue) {
    TORCH_CHECK(with_conv_dtype(dtype, [&](auto t) { return cuda_conv::fprop_bn_relu_supports<decltype(t)::value>(s); }),
                shape_message, refusal(s), "): input ", x.sizes(), ", weight ", weight.sizes());
    const PrologueVectors v = prologue_vectors(*mean, *invstd, bn_weight, bn_bias);
    err = with_conv_dtype(dtype, [&](auto t) {
      return cuda_conv::fprop_bn_relu<decltype(t)::value>(
          s, xc.const_data_ptr(), wc.const_data_ptr(), v.scale.const_data_ptr(), v.shift.const_data_ptr(),
          v.alpha.const_data_ptr<float>(), y.data_ptr(), tile_stats_ptr, stream);
    });
  } else if (plain) {
    TORCH_CHECK(with_conv_dtype(dtype, [&](auto t) { return cuda_conv::fprop_stats_supports<decltype(t)::value>(s); }),
                shape_message, refusal(s), "): input ", x.sizes(), ", weight ", weight.sizes());
    err = with_conv_dtype(dtype, [&](auto t) {
      return cuda_conv::fprop_stats<decltype(t)::value>(s, xc.const_data_ptr(), wc.const_data_ptr(), y.data_ptr(),
                                                        tile_stats_ptr, stream);
    });
  } else {
    TORCH_CHECK(
        with_conv_dtype(dtype, [&](auto t) { return cuda_conv::fprop_bias_residual_relu_supports<decltype(t)::value>(s); }),
        shape_message, refusal(s), "): input ", x.sizes(), ", weight ", weight.sizes());
    if (present(residual)) check_like(*residual, y, "residual");
    // The broadcast epilogue always reads a residual: zeros stand in for an absent one (an extra read of y's size).
    const at::Tensor r = present(residual) ? channels_last_aligned(*residual) : at::zeros_like(y);
    // The broadcast epilogue loads the bias as AlignedArray<float, 8>: 32-byte aligned vectors.
    const at::Tensor b = aligned(bias->to(at::kFloat), at::MemoryFormat::Contiguous, 32);
    err = with_conv_dtype(dtype, [&](auto t) {
      return cuda_conv::fprop_bias_residual_relu<decltype(t)::value>(
          s, xc.const_data_ptr(), wc.const_data_ptr(), b.const_data_ptr<float>(), r.const_data_ptr(), y.data_ptr(),
          stream);
    });
  }
  if (err == cudaSuccess && tile_stats.defined() && row_tiles > 1) {
    err = cuda_bn::launch_merge_stats_partials(tile_stats.const_data_ptr<double>(), row_tiles, s.K,
                                               s_out.data_ptr<double>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: CUTLASS conv_fwd failed: ", cudaGetErrorString(err));

  if (stats && eval_epilogue) {  // the eval-epilogue kernel has no statistics epilogue: bn_stats on y
    const Layout l = layout_of(y);
    const auto dt = dtype == at::kBFloat16 ? cuda_bn::DType::kBFloat16 : cuda_bn::DType::kHalf;
    const int64_t P = cuda_bn::stats_num_partials(l, dt);
    s_out = at::empty({3, s.K}, y.options().dtype(at::kDouble));
    at::Tensor partials = P > 1 ? at::empty({P, 3, s.K}, y.options().dtype(at::kDouble)) : at::Tensor();
    const cudaError_t e = cuda_bn::launch_bn_stats(y.const_data_ptr(), l, dt, P,
                                                   partials.defined() ? partials.data_ptr<double>() : nullptr,
                                                   s_out.data_ptr<double>(), stream);
    TORCH_CHECK(e == cudaSuccess, "fused_resnet: conv_fwd statistics launch failed: ", cudaGetErrorString(e));
  }
  return {y.contiguous(format), s_out};
}

// Serial split-K slices of the wgrad reduction (N*P*Q): enough CTAs for a large GPU when the dw tile grid is
// small (ResNet's deep layers: K and R*S*C of a few hundred, N*P*Q of tens of thousands), at least 1024 rows of
// the reduction per slice. A function of the shape only, so dw is bitwise the same on every GPU model.
int wgrad_split_k(const cuda_conv::ConvShape& s) {
  const int64_t tiles = ((int64_t(s.K) + 127) / 128) * ((int64_t(s.R) * s.S * s.C + 127) / 128);
  const int64_t rows = int64_t(s.N) * s.P * s.Q;
  const int64_t want = (256 + tiles - 1) / tiles;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({want, 16, rows / 1024})));
}

at::Tensor conv_wgrad_cuda(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_size,
                           const OptTensor& mean, const OptTensor& invstd, const OptTensor& bn_weight,
                           const OptTensor& bn_bias, bool relu_in, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, int64_t groups) {
  check_conv_wgrad_args(grad_out, x, weight_size, mean, invstd, bn_weight, bn_bias, stride, padding, dilation,
                        groups);
  TORCH_CHECK(x.is_cuda(), "fused_resnet: conv_wgrad: x must be a CUDA tensor here, got one on ", x.device());
  const bool prologue = present(mean);
  TORCH_CHECK(is_conv_dtype(x.scalar_type()) && grad_out.scalar_type() == x.scalar_type() && groups == 1 &&
                  (!prologue || relu_in),
              "fused_resnet: conv_wgrad (CUDA, CUTLASS) takes fp16 or bf16 (grad_out and x alike), groups 1 and the "
              "BN + ReLU prologue or none; got ", grad_out.scalar_type(), " / ",
              x.scalar_type(), ", groups ", groups, ", prologue ", present(mean), ", relu_in ", relu_in,
              " (fused_resnet.dispatch sends other calls to another implementation)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda_conv::ConvShape s = conv_shape(x, weight_size, stride, padding, dilation);
  TORCH_CHECK(grad_out.size(2) == s.P && grad_out.size(3) == s.Q, "fused_resnet: conv_wgrad: grad_out ",
              grad_out.sizes(), " is not the output size of this convolution");
  const auto format = x.suggest_memory_format();
  at::Tensor dw = at::empty(weight_size, x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  if (s.N == 0 || s.P == 0 || s.Q == 0) return dw.zero_().to(x.scalar_type()).contiguous(format);
  if (s.K == 0 || s.C == 0) return dw.to(x.scalar_type()).contiguous(format);
  const int split_k = wgrad_split_k(s);
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(with_conv_dtype(dtype, [&](auto t) {
                constexpr ConvDType T = decltype(t)::value;
                return prologue ? cuda_conv::wgrad_bn_relu_supports<T>(s, split_k)
                                : cuda_conv::wgrad_supports<T>(s, split_k);
              }),
              "fused_resnet: conv_wgrad (CUDA, CUTLASS) does not take this shape (", refusal(s), "): input ",
              x.sizes(), ", weight ", weight_size);
  const at::Tensor xc = channels_last_aligned(x), dyc = channels_last_aligned(grad_out);
  const size_t workspace_bytes = with_conv_dtype(dtype, [&](auto t) {
    constexpr ConvDType T = decltype(t)::value;
    return prologue ? cuda_conv::wgrad_bn_relu_workspace_size<T>(s, split_k)
                    : cuda_conv::wgrad_workspace_size<T>(s, split_k);
  });
  at::Tensor workspace = workspace_bytes > 0
                             ? at::empty({int64_t(workspace_bytes)}, x.options().dtype(at::kByte))
                             : at::Tensor();
  void* const ws = workspace.defined() ? workspace.data_ptr() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = cudaSuccess;
  if (prologue) {
    const PrologueVectors v = prologue_vectors(*mean, *invstd, bn_weight, bn_bias);
    err = with_conv_dtype(dtype, [&](auto t) {
      return cuda_conv::wgrad_bn_relu<decltype(t)::value>(
          s, split_k, dyc.const_data_ptr(), xc.const_data_ptr(), v.scale.const_data_ptr(), v.shift.const_data_ptr(),
          v.alpha.const_data_ptr<float>(), dw.data_ptr<float>(), ws, stream);
    });
  } else {
    err = with_conv_dtype(dtype, [&](auto t) {
      return cuda_conv::wgrad<decltype(t)::value>(s, split_k, dyc.const_data_ptr(), xc.const_data_ptr(),
                                                  dw.data_ptr<float>(), ws, stream);
    });
  }
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: CUTLASS conv_wgrad failed: ", cudaGetErrorString(err));
  return dw.to(x.scalar_type()).contiguous(format);
}

at::Tensor conv_dgrad_cuda(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                           at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                           int64_t groups) {
  check_conv_dgrad_args(grad_out, weight, input_size, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.is_cuda(), "fused_resnet: conv_dgrad: grad_out must be a CUDA tensor here, got one on ",
              grad_out.device());
  TORCH_CHECK(is_conv_dtype(grad_out.scalar_type()) && weight.scalar_type() == grad_out.scalar_type() &&
                  groups == 1 && dilation[0] == 1 && dilation[1] == 1,
              "fused_resnet: conv_dgrad (CUDA, CUTLASS) takes fp16 or bf16 (grad_out and weight alike), groups 1 "
              "and dilation 1; got ",
              grad_out.scalar_type(), ", groups ", groups, ", dilation ", dilation,
              " (fused_resnet.dispatch sends other calls to another implementation)");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor x_like = at::empty({1}, grad_out.options()).expand(input_size);
  const cuda_conv::ConvShape s = conv_shape(x_like, weight.sizes(), stride, padding, dilation);
  TORCH_CHECK(grad_out.size(2) == s.P && grad_out.size(3) == s.Q, "fused_resnet: conv_dgrad: grad_out ",
              grad_out.sizes(), " is not the output size of this convolution");
  const auto format = grad_out.suggest_memory_format();
  at::Tensor dx = at::empty(input_size, grad_out.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dx.numel() == 0) return dx.contiguous(format);
  if (s.K == 0) return dx.zero_().contiguous(format);
  const at::ScalarType dtype = grad_out.scalar_type();
  TORCH_CHECK(with_conv_dtype(dtype, [&](auto t) { return cuda_conv::dgrad_supports<decltype(t)::value>(s); }),
              "fused_resnet: conv_dgrad (CUDA, CUTLASS) does not take this shape (", refusal(s), "): input ",
              input_size, ", weight ", weight.sizes());
  const at::Tensor dyc = channels_last_aligned(grad_out), wc = channels_last_aligned(weight);
  const cudaError_t err = with_conv_dtype(dtype, [&](auto t) {
    return cuda_conv::dgrad<decltype(t)::value>(s, dyc.const_data_ptr(), wc.const_data_ptr(), dx.data_ptr(),
                                     c10::cuda::getCurrentCUDAStream().stream());
  });
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: CUTLASS conv_dgrad failed: ", cudaGetErrorString(err));
  return dx.contiguous(format);
}

// dgrad with the prologue BatchNorm's ReLU mask and backward reduction in the epilogue (dgrad_bn.cuh): stride 1,
// dilation 1, 16-bit, groups 1, C and K multiples of 8. The row tiles' fp32 partials are summed in a fixed
// order by bn_backward_reduce's second-pass kernel.
std::tuple<at::Tensor, at::Tensor> conv_dgrad_bn_cuda(const at::Tensor& grad_out, const at::Tensor& weight,
                                                      const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& invstd, const OptTensor& bn_weight,
                                                      const OptTensor& bn_bias, bool relu, at::IntArrayRef stride,
                                                      at::IntArrayRef padding, at::IntArrayRef dilation,
                                                      int64_t groups) {
  check_conv_dgrad_bn_args(grad_out, weight, x, mean, invstd, bn_weight, bn_bias, stride, padding, dilation, groups);
  TORCH_CHECK(x.is_cuda(), "fused_resnet: conv_dgrad_bn: x must be a CUDA tensor here, got one on ", x.device());
  TORCH_CHECK(is_conv_dtype(x.scalar_type()) && weight.scalar_type() == x.scalar_type() && groups == 1 &&
                  stride[0] == 1 && stride[1] == 1 && dilation[0] == 1 && dilation[1] == 1,
              "fused_resnet: conv_dgrad_bn (CUDA, CUTLASS) takes fp16 or bf16, groups 1, stride 1 and dilation 1; "
              "got ", x.scalar_type(), ", groups ", groups, ", stride ", stride, ", dilation ", dilation,
              " (fused_resnet.dispatch sends other calls to another implementation)");
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda_conv::ConvShape s = conv_shape(x, weight.sizes(), stride, padding, dilation);
  TORCH_CHECK(grad_out.size(2) == s.P && grad_out.size(3) == s.Q, "fused_resnet: conv_dgrad_bn: grad_out ",
              grad_out.sizes(), " is not the output size of this convolution");
  const auto format = x.suggest_memory_format();
  at::Tensor dz = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
  at::Tensor sums = at::zeros({2, s.C}, x.options().dtype(at::kFloat));
  if (dz.numel() == 0) return {dz.contiguous(format), sums};
  if (s.K == 0) return {dz.zero_().contiguous(format), sums};
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(with_conv_dtype(dtype, [&](auto t) { return cuda_conv::dgrad_bn_supports<decltype(t)::value>(s); }),
              "fused_resnet: conv_dgrad_bn (CUDA, CUTLASS) does not take this shape (", refusal(s), "): input ",
              x.sizes(), ", weight ", weight.sizes());
  const at::Tensor dyc = channels_last_aligned(grad_out), wc = channels_last_aligned(weight),
                   xc = channels_last_aligned(x);
  const at::Tensor mu = mean.contiguous(), is = invstd.contiguous();
  const at::Tensor bw = channel_param(bn_weight, at::kFloat), bb = channel_param(bn_bias, at::kFloat);
  const int64_t row_tiles =
      (int64_t(s.N) * s.H * s.W + cuda_conv::kDgradBnTileRows - 1) / cuda_conv::kDgradBnTileRows;
  at::Tensor partials = row_tiles > 1 ? at::empty({row_tiles, 2, s.C}, sums.options()) : sums;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaError_t err = with_conv_dtype(dtype, [&](auto t) {
    return cuda_conv::dgrad_bn<decltype(t)::value>(
        s, dyc.const_data_ptr(), wc.const_data_ptr(), xc.const_data_ptr(), mu.const_data_ptr<float>(),
        is.const_data_ptr<float>(), bw.defined() ? bw.const_data_ptr<float>() : nullptr,
        bb.defined() ? bb.const_data_ptr<float>() : nullptr, relu, dz.data_ptr(), partials.data_ptr<float>(), stream);
  });
  if (err == cudaSuccess && row_tiles > 1) {
    err = cuda_bn::launch_reduce_partials_float(partials.const_data_ptr<float>(), row_tiles, 2, s.C,
                                                sums.data_ptr<float>(), stream);
  }
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: CUTLASS conv_dgrad_bn failed: ", cudaGetErrorString(err));
  return {dz.contiguous(format), sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("conv_fwd", &conv_fwd_cuda);
  m.impl("conv_wgrad", &conv_wgrad_cuda);
  m.impl("conv_dgrad", &conv_dgrad_cuda);
  m.impl("conv_dgrad_bn", &conv_dgrad_bn_cuda);
}

}  // namespace fused_resnet

#endif  // FUSED_RESNET_WITH_CUTLASS
