// Host-side helpers shared by the CPU and CUDA op bindings: argument checks with clear messages and the
// tensor -> Layout conversion. Not included by device code.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "bn_math.h"

namespace fused_resnet {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// True when dims H and W of a 4-D tensor merge into one strided dim (the kernels' requirement).
inline bool hw_mergeable(const at::Tensor& t) {
  return t.size(2) == 1 || t.size(3) == 1 || t.stride(2) == t.size(3) * t.stride(3);
}

// The tensor itself when the kernels can index it, else a copy in its suggested memory format.
// Mirrors fused_resnet/_layout.py::kernel_layout; fake kernels rely on the two agreeing.
inline at::Tensor kernel_layout(const at::Tensor& t) {
  return hw_mergeable(t) ? t : t.contiguous(t.suggest_memory_format());
}

inline Layout layout_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4 && hw_mergeable(t), "fused_resnet: internal error: tensor not in kernel layout");
  Layout l;
  l.N = t.size(0);
  l.C = t.size(1);
  l.HW = t.size(2) * t.size(3);
  l.s_n = t.stride(0);
  l.s_c = t.stride(1);
  l.s_hw = t.size(3) == 1 ? t.stride(2) : t.stride(3);
  l.rows_merged = l.N <= 1 || l.s_n == l.HW * l.s_hw;
  return l;
}

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_activation(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fused_resnet: ", name, " must be 4-D (N, C, H, W), got ", t.dim(), "-D");
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "fused_resnet: ", name, " must be float16, bfloat16, float32 or float64, got ", dt);
}

inline void check_like(const at::Tensor& t, const at::Tensor& x, const char* name) {
  TORCH_CHECK(t.sizes() == x.sizes(), "fused_resnet: ", name, " has shape ", t.sizes(), " but x has ",
              x.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "fused_resnet: ", name, " has dtype ", t.scalar_type(),
              " but x has ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "fused_resnet: ", name, " is on ", t.device(), " but x is on ",
              x.device());
}

// A per-channel vector: 1-D, C elements, on x's device, of `dtype` (or any floating dtype if undefined).
inline void check_channel_vector(const at::Tensor& t, int64_t C, const at::Device& device, const char* name,
                                 c10::optional<at::ScalarType> dtype = c10::nullopt) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == C, "fused_resnet: ", name, " must have shape [", C, "], got ",
              t.sizes());
  TORCH_CHECK(t.device() == device, "fused_resnet: ", name, " is on ", t.device(), " but x is on ", device);
  if (dtype.has_value()) {
    TORCH_CHECK(t.scalar_type() == *dtype, "fused_resnet: ", name, " must be ", *dtype, ", got ",
                t.scalar_type());
  } else {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fused_resnet: ", name, " must be floating, got ",
                t.scalar_type());
  }
}

inline bool present(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// An optional per-channel parameter as a contiguous vector of the accumulation dtype (undefined if absent).
inline at::Tensor channel_param(const c10::optional<at::Tensor>& t, at::ScalarType acc) {
  return present(t) ? t->to(acc).contiguous() : at::Tensor();
}

// Checks shared by bn_act / bn_backward_*: x is an activation, mean/invstd are acc-typed channel vectors,
// weight/bias optional floating channel vectors.
inline void check_apply_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                             const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias) {
  check_activation(x, "x");
  const int64_t C = x.size(1);
  check_channel_vector(mean, C, x.device(), "mean", acc_type_of(x));
  check_channel_vector(invstd, C, x.device(), "invstd", acc_type_of(x));
  if (present(weight)) check_channel_vector(*weight, C, x.device(), "weight");
  if (present(bias)) check_channel_vector(*bias, C, x.device(), "bias");
}

inline void check_stats(const at::Tensor& stats) {
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == 3 && stats.scalar_type() == at::kDouble,
              "fused_resnet: stats must be float64 [3, C] (count, mean, m2), got ",
              stats.scalar_type(), " ", stats.sizes());
}

// The arguments of bn_backward_reduce / bn_backward_elemt, checked and in the form the kernels take: activations
// in kernel layout, parameters as contiguous acc-typed vectors (undefined when absent).
struct BackwardArgs {
  at::Tensor grad_out, x, out, weight, bias, mean, invstd;
};

inline BackwardArgs prepare_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                     const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                     const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out) {
  check_apply_args(x, mean, invstd, weight, bias);
  check_like(grad_out, x, "grad_out");
  if (present(out)) check_like(*out, x, "out");
  const auto acc = acc_type_of(x);
  return {kernel_layout(grad_out),
          kernel_layout(x),
          present(out) ? kernel_layout(*out) : at::Tensor(),
          channel_param(weight, acc),
          channel_param(bias, acc),
          mean.contiguous(),
          invstd.contiguous()};
}

// bn_backward_elemt's optional (sums, count): both or neither; sums acc-typed [2, C], count float64 [C], on x's
// device. Returns whether they are given and sets the contiguous versions.
inline bool batch_stats_sums(const c10::optional<at::Tensor>& sums_in, const c10::optional<at::Tensor>& count_in,
                             const at::Tensor& x, at::Tensor* sums, at::Tensor* count) {
  const bool given = present(sums_in);
  TORCH_CHECK(given == present(count_in), "fused_resnet: sums and count must be given together");
  if (!given) return false;
  const int64_t C = x.size(1);
  TORCH_CHECK(sums_in->dim() == 2 && sums_in->size(0) == 2 && sums_in->size(1) == C &&
                  sums_in->scalar_type() == acc_type_of(x),
              "fused_resnet: sums must be ", acc_type_of(x), " [2, ", C, "], got ", sums_in->scalar_type(), " ",
              sums_in->sizes());
  TORCH_CHECK(sums_in->device() == x.device(), "fused_resnet: sums is on ", sums_in->device(), " but x is on ",
              x.device());
  check_channel_vector(*count_in, C, x.device(), "count", at::kDouble);
  *sums = sums_in->contiguous();
  *count = count_in->contiguous();
  return true;
}

// bn_prologue_half's arguments as its implementations take them: float32 contiguous [C] vectors (weight and
// bias converted from any floating dtype, undefined when absent), after the contract's checks.
struct PrologueHalfArgs {
  at::Tensor mean, invstd, weight, bias;
  int64_t C;
};

inline PrologueHalfArgs prepare_prologue_half(const at::Tensor& mean, const at::Tensor& invstd,
                                              const c10::optional<at::Tensor>& weight,
                                              const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(mean.dim() == 1, "fused_resnet: bn_prologue_half: mean must be 1-D [C], got ", mean.sizes());
  const int64_t C = mean.size(0);
  check_channel_vector(mean, C, mean.device(), "mean", at::kFloat);
  check_channel_vector(invstd, C, mean.device(), "invstd", at::kFloat);
  if (present(weight)) check_channel_vector(*weight, C, mean.device(), "weight");
  if (present(bias)) check_channel_vector(*bias, C, mean.device(), "bias");
  return {mean.contiguous(), invstd.contiguous(), channel_param(weight, at::kFloat), channel_param(bias, at::kFloat),
          C};
}

}  // namespace fused_resnet
