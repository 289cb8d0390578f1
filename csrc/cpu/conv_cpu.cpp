// CPU implementations of conv_fwd, conv_wgrad, conv_dgrad and conv_dgrad_bn (contract: csrc/ops.cpp): ATen's convolution with fused_resnet's own CPU
// BatchNorm kernels (bn_act, bn_stats, csrc/cpu/batch_norm_cpu.cpp) around it, called through the
// dispatcher. The prologue's output relu?(bn(x)) is materialised here. This is the twin of the CUDA
// implementation (csrc/cuda/conv/, CUTLASS) that lets opcheck and the contract tests run without a GPU; the
// argument checks are shared with it (common/conv_checks.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <tuple>

#include "common/conv_checks.h"
#include "common/tensor_utils.h"

namespace fused_resnet {
namespace {

using OptTensor = c10::optional<at::Tensor>;

at::Tensor call_bn_act(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const OptTensor& weight,
                       const OptTensor& bias, const OptTensor& residual, bool relu) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_resnet_C::bn_act", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&,
                                         const OptTensor&, const OptTensor&, bool)>();
  return op.call(x, mean, invstd, weight, bias, residual, relu);
}

at::Tensor call_bn_stats(const at::Tensor& x) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fused_resnet_C::bn_stats", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.call(x);
}

std::tuple<at::Tensor, at::Tensor> conv_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, const OptTensor& mean,
                                                const OptTensor& invstd, const OptTensor& bn_weight,
                                                const OptTensor& bn_bias, bool relu_in, const OptTensor& bias,
                                                const OptTensor& residual, bool relu_out, at::IntArrayRef stride,
                                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                                                bool stats) {
  check_conv_fwd_args(x, weight, mean, invstd, bn_weight, bn_bias, bias, residual, stride, padding, dilation,
                      groups);
  const at::Tensor a =
      present(mean) ? call_bn_act(x, *mean, *invstd, bn_weight, bn_bias, c10::nullopt, relu_in) : x;
  const auto format = x.suggest_memory_format();
  at::Tensor y = at::convolution(a, weight, c10::nullopt, stride, padding, dilation, /*transposed=*/false,
                                 /*output_padding=*/{0, 0}, groups)
                     .contiguous(format);
  if (present(bias) || present(residual) || relu_out) {
    const int64_t K = weight.size(0);
    const auto acc = acc_type_of(y);
    const at::Tensor zeros = at::zeros({K}, y.options().dtype(acc)), ones = at::ones({K}, y.options().dtype(acc));
    if (present(residual)) check_like(*residual, y, "residual");
    y = call_bn_act(y, zeros, ones, c10::nullopt, bias, residual, relu_out).contiguous(format);
  }
  at::Tensor s = stats ? call_bn_stats(y) : at::empty({0}, y.options().dtype(at::kDouble));
  return {y, s};
}

at::Tensor conv_wgrad_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_size,
                          const OptTensor& mean, const OptTensor& invstd, const OptTensor& bn_weight,
                          const OptTensor& bn_bias, bool relu_in, at::IntArrayRef stride, at::IntArrayRef padding,
                          at::IntArrayRef dilation, int64_t groups) {
  check_conv_wgrad_args(grad_out, x, weight_size, mean, invstd, bn_weight, bn_bias, stride, padding, dilation,
                        groups);
  const at::Tensor a =
      present(mean) ? call_bn_act(x, *mean, *invstd, bn_weight, bn_bias, c10::nullopt, relu_in) : x;
  const at::Tensor weight_like = at::empty({1}, x.options()).expand(weight_size);  // only its shape is read
  const at::Tensor dw = std::get<1>(at::convolution_backward(grad_out, a, weight_like, c10::nullopt, stride, padding,
                                                             dilation, /*transposed=*/false, {0, 0}, groups,
                                                             {false, true, false}));
  return dw.contiguous(x.suggest_memory_format());
}

at::Tensor conv_dgrad_cpu(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                          at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_dgrad_args(grad_out, weight, input_size, stride, padding, dilation, groups);
  const at::Tensor x_like = at::empty({1}, grad_out.options()).expand(input_size);  // only its shape is read
  const at::Tensor dx = std::get<0>(at::convolution_backward(grad_out, x_like, weight, c10::nullopt, stride, padding,
                                                             dilation, /*transposed=*/false, {0, 0}, groups,
                                                             {true, false, false}));
  return dx.contiguous(grad_out.suggest_memory_format());
}

// ATen's dgrad, then the mask and the reductions in ATen ops in x's accumulation type.
std::tuple<at::Tensor, at::Tensor> conv_dgrad_bn_cpu(const at::Tensor& grad_out, const at::Tensor& weight,
                                                     const at::Tensor& x, const at::Tensor& mean,
                                                     const at::Tensor& invstd, const OptTensor& bn_weight,
                                                     const OptTensor& bn_bias, bool relu, at::IntArrayRef stride,
                                                     at::IntArrayRef padding, at::IntArrayRef dilation,
                                                     int64_t groups) {
  check_conv_dgrad_bn_args(grad_out, weight, x, mean, invstd, bn_weight, bn_bias, stride, padding, dilation, groups);
  const auto format = x.suggest_memory_format();
  at::Tensor dz = std::get<0>(at::convolution_backward(grad_out, x, weight, c10::nullopt, stride, padding, dilation,
                                                       /*transposed=*/false, {0, 0}, groups, {true, false, false}))
                      .contiguous(format);
  const auto acc = acc_type_of(x);
  const at::Tensor xa = x.to(acc), mu = mean.view({1, -1, 1, 1}), is = invstd.view({1, -1, 1, 1});
  if (relu) {
    at::Tensor scale = is;
    if (present(bn_weight)) scale = scale * bn_weight->to(acc).view({1, -1, 1, 1});
    at::Tensor z = (xa - mu) * scale;  // bn_math.h's bn_affine: (x - mean) * scale + bias
    if (present(bn_bias)) z = z + bn_bias->to(acc).view({1, -1, 1, 1});
    dz = dz.masked_fill(z.le(0) | z.isnan(), 0).contiguous(format);  // keeps dz where z > 0 only
  }
  const at::Tensor d = dz.to(acc);
  const at::Tensor sums = at::stack({d.sum({0, 2, 3}), (d * ((xa - mu) * is)).sum({0, 2, 3})});
  return {dz, sums};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("conv_fwd", &conv_fwd_cpu);
  m.impl("conv_wgrad", &conv_wgrad_cpu);
  m.impl("conv_dgrad", &conv_dgrad_cpu);
  m.impl("conv_dgrad_bn", &conv_dgrad_bn_cpu);
}

}  // namespace fused_resnet
