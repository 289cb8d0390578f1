// CUDA registrations of the fused BatchNorm family (contract: csrc/ops.cpp). Mirrors the CPU twin
// (csrc/cpu/batch_norm_cpu.cpp) argument for argument: same checks, same layouts of the outputs
// (empty_like(kernel_layout(x))), same treatment of optional arguments. The kernels themselves live in
// batch_norm_kernels.cuh and are launched through the torch-free launchers of batch_norm_launch.h; this file
// allocates (outputs and reduction scratch, through the caching allocator), picks the device and stream,
// and checks every launch.
//
// Stream: c10::cuda::getCurrentCUDAStream() (c10/cuda/CUDAStream.h), which is what
// at::cuda::getCurrentCUDAStream() forwards to; ATen/cuda/CUDAContext.h is avoided because it pulls in the
// cuBLAS / cuSPARSE / cuSOLVER headers, which the CI's CPU-side syntax check does not have.
// No host synchronisation anywhere (CUDA-graph capturable): even the momentum=None factor
// 1 / num_batches_tracked is read by the finalize kernel on the device.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <tuple>

#include "batch_norm_launch.h"
#include "common/bn_math.h"
#include "common/tensor_utils.h"

namespace fused_resnet {
namespace {

using cuda_bn::DType;

DType dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return DType::kHalf;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kFloat:
      return DType::kFloat;
    case at::kDouble:
      return DType::kDouble;
    default:
      break;
  }
  TORCH_CHECK(false, "fused_resnet: unsupported dtype ", t);
  return DType::kFloat;  // unreachable
}

// The CUDA kernels were selected by dispatch because some argument is a CUDA tensor; the tensor that picks
// the device must be one (the per-channel checks then require all others on the same device).
void check_cuda_tensor(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda(), "fused_resnet: ", name, " must be a CUDA tensor here, got one on ", t.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "fused_resnet: CUDA kernel launch failed in ", what, ": ",
              cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

const void* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }

// ---------------------------------------------------------------------------------------------------------
// Statistics

at::Tensor bn_stats_cuda(const at::Tensor& x_in) {
  check_activation(x_in, "x");
  check_cuda_tensor(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in);
  const Layout l = layout_of(x);
  const int64_t M = l.N * l.HW, C = l.C;
  const auto opts = x.options().dtype(at::kDouble);
  if (M == 0 || C == 0) return at::zeros({3, C}, opts);  // count 0
  const DType dt = dtype_of(x.scalar_type());
  const int64_t P = cuda_bn::stats_num_partials(l, dt);
  at::Tensor stats = at::empty({3, C}, opts);
  at::Tensor partials = P > 1 ? at::empty({P, 3, C}, opts) : at::Tensor();
  check_launch(cuda_bn::launch_bn_stats(x.const_data_ptr(), l, dt, P,
                                        partials.defined() ? partials.data_ptr<double>() : nullptr,
                                        stats.data_ptr<double>(), current_stream()),
               "bn_stats");
  return stats;
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cuda(const at::Tensor& stats_in,
                                                    const c10::optional<at::Tensor>& running_mean,
                                                    const c10::optional<at::Tensor>& running_var,
                                                    const c10::optional<at::Tensor>& num_batches_tracked,
                                                    c10::optional<double> momentum, double eps,
                                                    at::ScalarType dtype) {
  check_stats(stats_in);
  check_cuda_tensor(stats_in, "stats");
  const c10::cuda::CUDAGuard guard(stats_in.device());
  const at::Tensor stats = stats_in.contiguous();
  const int64_t C = stats.size(1);
  const bool update = present(running_mean);
  TORCH_CHECK(update == present(running_var),
              "fused_resnet: running_mean and running_var must be given together");
  // Running buffers the kernel updates in place: the buffers themselves when both are contiguous fp32 or
  // both contiguous fp64, else fp64 copies written back with copy_ (async, stream-ordered).
  at::Tensor rm, rv, nbt;
  bool direct = false;
  if (update) {
    check_channel_vector(*running_mean, C, stats.device(), "running_mean");
    check_channel_vector(*running_var, C, stats.device(), "running_var");
    if (!momentum.has_value()) {
      TORCH_CHECK(present(num_batches_tracked),
                  "fused_resnet: momentum=None (cumulative average) needs num_batches_tracked");
      TORCH_CHECK(num_batches_tracked->numel() == 1,
                  "fused_resnet: num_batches_tracked must hold one element, got ", num_batches_tracked->sizes());
      // No .item(): the kernel reads the count on the device. A no-op for the usual int64 CUDA buffer.
      nbt = num_batches_tracked->to(stats.device(), at::kLong).contiguous();
    }
    const auto rt = running_mean->scalar_type();
    direct = rt == running_var->scalar_type() && (rt == at::kFloat || rt == at::kDouble) &&
             running_mean->is_contiguous() && running_var->is_contiguous();
    if (direct) {
      rm = *running_mean;
      rv = *running_var;
    } else {
      rm = running_mean->to(at::kDouble).contiguous();
      rv = running_var->to(at::kDouble).contiguous();
    }
  }
  // The kernel writes fp32 or fp64; any other requested dtype is converted afterwards (as the CPU's .to).
  const at::ScalarType kernel_dtype = dtype == at::kFloat ? at::kFloat : at::kDouble;
  at::Tensor mean = at::empty({C}, stats.options().dtype(kernel_dtype));
  at::Tensor invstd = at::empty({C}, stats.options().dtype(kernel_dtype));
  if (C > 0) {
    check_launch(cuda_bn::launch_bn_finalize(
                     stats.const_data_ptr<double>(), C, update ? rm.data_ptr() : nullptr,
                     update ? rv.data_ptr() : nullptr, update ? dtype_of(rm.scalar_type()) : DType::kDouble,
                     nbt.defined() ? nbt.const_data_ptr<int64_t>() : nullptr, momentum.has_value(),
                     momentum.value_or(0.0), eps, mean.data_ptr(), invstd.data_ptr(), dtype_of(kernel_dtype),
                     current_stream()),
                 "bn_finalize");
  }
  if (update && !direct) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  if (kernel_dtype != dtype) return {mean.to(dtype), invstd.to(dtype)};
  return {mean, invstd};
}

// ---------------------------------------------------------------------------------------------------------
// Forward apply: y = relu?(x * scale + shift [+ residual])

at::Tensor bn_act_cuda(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                       const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                       const c10::optional<at::Tensor>& residual_in, bool relu) {
  check_apply_args(x_in, mean, invstd, weight, bias);
  check_cuda_tensor(x_in, "x");
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = kernel_layout(x_in);
  at::Tensor residual;
  if (present(residual_in)) {
    check_like(*residual_in, x_in, "residual");
    residual = kernel_layout(*residual_in);
  }
  const auto acc = acc_type_of(x);
  at::Tensor y = at::empty_like(x);
  if (y.numel() == 0) return y;
  const at::Tensor mean_c = mean.contiguous(), invstd_c = invstd.contiguous();
  const at::Tensor w = channel_param(weight, acc), b = channel_param(bias, acc);
  const Layout lx = layout_of(x), ly = layout_of(y);
  const Layout lr = residual.defined() ? layout_of(residual) : lx;
  check_launch(cuda_bn::launch_bn_act(x.const_data_ptr(), lx, ptr_or_null(residual), lr, y.data_ptr(), ly,
                                      mean_c.const_data_ptr(), invstd_c.const_data_ptr(), ptr_or_null(w),
                                      ptr_or_null(b), relu, dtype_of(x.scalar_type()), current_stream()),
               "bn_act");
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Backward. dz = grad_out * [relu mask]; the mask is out > 0 when the output was saved (residual before
// the ReLU), else recomputed from x with the forward's own expression.

at::Tensor bn_backward_reduce_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                   const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                   const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out,
                                   bool relu) {
  check_activation(x, "x");
  check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const BackwardArgs a = prepare_backward(grad_out, x, mean, invstd, weight, bias, out);
  const Layout lx = layout_of(a.x);
  const int64_t M = lx.N * lx.HW, C = lx.C;
  const auto opts = at::TensorOptions().dtype(acc_type_of(a.x)).device(a.x.device());
  if (M == 0 || C == 0) return at::zeros({2, C}, opts);
  const DType dt = dtype_of(a.x.scalar_type());
  const int64_t P = cuda_bn::backward_reduce_num_partials(lx, dt);
  at::Tensor sums = at::empty({2, C}, opts);
  at::Tensor partials = P > 1 ? at::empty({P, 2, C}, opts) : at::Tensor();
  const Layout ldy = layout_of(a.grad_out);
  const Layout lo = a.out.defined() ? layout_of(a.out) : lx;
  check_launch(cuda_bn::launch_bn_backward_reduce(
                   a.grad_out.const_data_ptr(), ldy, a.x.const_data_ptr(), lx, ptr_or_null(a.out), lo,
                   a.mean.const_data_ptr(), a.invstd.const_data_ptr(), ptr_or_null(a.weight), ptr_or_null(a.bias),
                   relu, dt, P, partials.defined() ? partials.data_ptr() : nullptr, sums.data_ptr(),
                   current_stream()),
               "bn_backward_reduce");
  return sums;
}

std::tuple<at::Tensor, at::Tensor> bn_backward_elemt_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& sums_in,
    const c10::optional<at::Tensor>& count_in, bool relu, bool need_dz) {
  check_activation(x, "x");
  check_cuda_tensor(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const BackwardArgs a = prepare_backward(grad_out, x, mean, invstd, weight, bias, out);
  at::Tensor sums, count;
  const bool batch_stats = batch_stats_sums(sums_in, count_in, a.x, &sums, &count);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dz_out = need_dz ? at::empty_like(a.x) : at::empty({0}, a.x.options());
  if (dx.numel() == 0) return {dx, dz_out};
  const Layout lx = layout_of(a.x), ldy = layout_of(a.grad_out), ldx = layout_of(dx);
  const Layout lo = a.out.defined() ? layout_of(a.out) : lx;
  const Layout ldz = need_dz ? layout_of(dz_out) : ldx;
  check_launch(cuda_bn::launch_bn_backward_elemt(
                   a.grad_out.const_data_ptr(), ldy, a.x.const_data_ptr(), lx, ptr_or_null(a.out), lo,
                   a.mean.const_data_ptr(), a.invstd.const_data_ptr(), ptr_or_null(a.weight), ptr_or_null(a.bias),
                   ptr_or_null(sums), batch_stats ? count.const_data_ptr<double>() : nullptr, relu, dx.data_ptr(),
                   ldx, need_dz ? dz_out.data_ptr() : nullptr, ldz, dtype_of(a.x.scalar_type()), current_stream()),
               "bn_backward_elemt");
  return {dx, dz_out};
}

// ---------------------------------------------------------------------------------------------------------
// The CUTLASS convolutions' prologue vectors (one kernel launch, no host sync).

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prologue_half_cuda(const at::Tensor& mean_in,
                                                                     const at::Tensor& invstd_in,
                                                                     const c10::optional<at::Tensor>& weight_in,
                                                                     const c10::optional<at::Tensor>& bias_in) {
  check_cuda_tensor(mean_in, "mean");
  const c10::cuda::CUDAGuard guard(mean_in.device());
  const PrologueHalfArgs a = prepare_prologue_half(mean_in, invstd_in, weight_in, bias_in);
  const auto opts = a.mean.options();
  at::Tensor scale = at::empty({a.C}, opts.dtype(at::kHalf)), shift = at::empty({a.C}, opts.dtype(at::kHalf));
  if (a.C == 0) return {scale, shift, at::ones({1}, opts)};
  at::Tensor alpha = at::empty({1}, opts);
  check_launch(cuda_bn::launch_bn_prologue_half(a.mean.const_data_ptr<float>(), a.invstd.const_data_ptr<float>(),
                                                a.weight.defined() ? a.weight.const_data_ptr<float>() : nullptr,
                                                a.bias.defined() ? a.bias.const_data_ptr<float>() : nullptr, a.C,
                                                scale.data_ptr(), shift.data_ptr(), alpha.data_ptr<float>(),
                                                current_stream()),
               "bn_prologue_half");
  return {scale, shift, alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CUDA, m) {
  m.impl("bn_stats", &bn_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("bn_act", &bn_act_cuda);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cuda);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cuda);
  m.impl("bn_prologue_half", &bn_prologue_half_cuda);
}

}  // namespace fused_resnet
