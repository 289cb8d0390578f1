// Argument checks of conv_fwd (csrc/ops.cpp), shared by the CPU implementation (csrc/cpu/conv_cpu.cpp) and the
// CUDA one (csrc/cuda/conv/conv_cuda_ops.cpp), so both reject the same inputs with the same messages. Host
// only (ATen), not included by device code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "tensor_utils.h"

namespace fused_resnet {

inline void check_pair(at::IntArrayRef v, const char* name, int64_t minimum) {
  TORCH_CHECK(v.size() == 2, "fused_resnet: conv_fwd: ", name, " must have 2 elements, got ", v.size());
  TORCH_CHECK(v[0] >= minimum && v[1] >= minimum, "fused_resnet: conv_fwd: ", name, " must be >= ", minimum,
              ", got ", v);
}

inline void check_conv_fwd_args(const at::Tensor& x, const at::Tensor& weight,
                                const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& invstd,
                                const c10::optional<at::Tensor>& bn_weight,
                                const c10::optional<at::Tensor>& bn_bias, const c10::optional<at::Tensor>& bias,
                                const c10::optional<at::Tensor>& residual, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_activation(x, "x");
  TORCH_CHECK(weight.dim() == 4, "fused_resnet: conv_fwd: weight must be 4-D (K, C / groups, R, S), got ",
              weight.dim(), "-D");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "fused_resnet: conv_fwd: weight has dtype ",
              weight.scalar_type(), " but x has ", x.scalar_type());
  TORCH_CHECK(weight.device() == x.device(), "fused_resnet: conv_fwd: weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(groups >= 1 && x.size(1) == weight.size(1) * groups && weight.size(0) % groups == 0,
              "fused_resnet: conv_fwd: x has ", x.size(1), " channels, weight ", weight.sizes(), ", groups ",
              groups);
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(present(mean) == present(invstd), "fused_resnet: conv_fwd: mean and invstd must be given together");
  if (present(mean)) {
    const int64_t C = x.size(1);
    check_channel_vector(*mean, C, x.device(), "mean", acc_type_of(x));
    check_channel_vector(*invstd, C, x.device(), "invstd", acc_type_of(x));
    if (present(bn_weight)) check_channel_vector(*bn_weight, C, x.device(), "bn_weight");
    if (present(bn_bias)) check_channel_vector(*bn_bias, C, x.device(), "bn_bias");
  } else {
    TORCH_CHECK(!present(bn_weight) && !present(bn_bias),
                "fused_resnet: conv_fwd: bn_weight / bn_bias given without mean and invstd");
  }
  if (present(bias)) check_channel_vector(*bias, weight.size(0), x.device(), "bias");
  if (present(residual)) {
    TORCH_CHECK(residual->dim() == 4 && residual->size(1) == weight.size(0) &&
                    residual->scalar_type() == x.scalar_type() && residual->device() == x.device(),
                "fused_resnet: conv_fwd: residual must be a 4-D ", x.scalar_type(), " tensor of ", weight.size(0),
                " channels on ", x.device(), ", got ", residual->scalar_type(), " ", residual->sizes());
  }
}

// conv_wgrad: grad_out of x's dtype and device, 4-D with weight_size[0] channels; the prologue as conv_fwd's.
inline void check_conv_wgrad_args(const at::Tensor& grad_out, const at::Tensor& x, at::IntArrayRef weight_size,
                                  const c10::optional<at::Tensor>& mean, const c10::optional<at::Tensor>& invstd,
                                  const c10::optional<at::Tensor>& bn_weight,
                                  const c10::optional<at::Tensor>& bn_bias, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(weight_size.size() == 4 && weight_size[0] >= 0 && weight_size[1] >= 0 && weight_size[2] >= 1 &&
                  weight_size[3] >= 1,
              "fused_resnet: conv_wgrad: weight_size must be (K, C / groups, R, S), got ", weight_size);
  const at::Tensor weight_like = at::empty({1}, x.options()).expand(weight_size);
  check_conv_fwd_args(x, weight_like, mean, invstd, bn_weight, bn_bias, c10::nullopt, c10::nullopt, stride, padding,
                      dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) && grad_out.size(1) == weight_size[0] &&
                  grad_out.scalar_type() == x.scalar_type() && grad_out.device() == x.device(),
              "fused_resnet: conv_wgrad: grad_out must be a 4-D ", x.scalar_type(), " tensor [", x.size(0), ", ",
              weight_size[0], ", P, Q] on ", x.device(), ", got ", grad_out.scalar_type(), " ", grad_out.sizes());
}

// conv_dgrad: weight of grad_out's dtype and device with grad_out.size(1) filters; input_size (N, C, H, W).
inline void check_conv_dgrad_args(const at::Tensor& grad_out, const at::Tensor& weight, at::IntArrayRef input_size,
                                  at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups) {
  TORCH_CHECK(input_size.size() == 4 && input_size[0] >= 0 && input_size[1] >= 0 && input_size[2] >= 0 &&
                  input_size[3] >= 0,
              "fused_resnet: conv_dgrad: input_size must be (N, C, H, W), got ", input_size);
  const at::Tensor x_like = at::empty({1}, grad_out.options()).expand(input_size);
  check_conv_fwd_args(x_like, weight, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt, c10::nullopt,
                      c10::nullopt, stride, padding, dilation, groups);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input_size[0] && grad_out.size(1) == weight.size(0),
              "fused_resnet: conv_dgrad: grad_out must be 4-D [", input_size[0], ", ", weight.size(0),
              ", P, Q], got ", grad_out.sizes());
}

// conv_dgrad_bn: conv_dgrad's checks for input x.sizes(), x of grad_out's dtype, and the prologue BatchNorm's
// channel vectors as bn_act takes them.
inline void check_conv_dgrad_bn_args(const at::Tensor& grad_out, const at::Tensor& weight, const at::Tensor& x,
                                     const at::Tensor& mean, const at::Tensor& invstd,
                                     const c10::optional<at::Tensor>& bn_weight,
                                     const c10::optional<at::Tensor>& bn_bias, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_apply_args(x, mean, invstd, bn_weight, bn_bias);
  TORCH_CHECK(x.scalar_type() == grad_out.scalar_type() && x.device() == grad_out.device(),
              "fused_resnet: conv_dgrad_bn: x is ", x.scalar_type(), " on ", x.device(), " but grad_out is ",
              grad_out.scalar_type(), " on ", grad_out.device());
  check_conv_dgrad_args(grad_out, weight, x.sizes(), stride, padding, dilation, groups);
}

}  // namespace fused_resnet
