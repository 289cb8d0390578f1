// C++ CPU implementation of the fused BatchNorm family (contract: csrc/ops.cpp).
//
// It is also the CPU twin of the GPU kernels' algorithm: reductions are split into fixed chunks of rows (a
// GPU program / thread block each); a chunk's statistics are accumulated on values shifted by its first row,
// tile by tile (exact two-pass tile mean and m2, then a Chan merge), and written as float64 (count, mean, m2);
// partials are Chan-merged in a fixed order. Results therefore do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/bn_math.h"
#include "../common/tensor_utils.h"

namespace fused_resnet {
namespace {

constexpr int64_t kTileRows = 64;     // rows reduced exactly (two passes) before each Chan merge
constexpr int64_t kChunkRows = 512;   // rows per partial result (one "program"): a fixed rule of M, so results
                                      // do not depend on the thread count, small enough to use every core
constexpr int64_t kApplyGrain = 64;   // rows per parallel task in elementwise passes

// Calls f(std::bool_constant<B>{}) for a runtime bool, so that branches inside f resolve at compile time and
// the channel loops vectorise (e.g. UNIT: every tensor has unit channel stride, the channels_last case).
template <typename F>
inline void with_flag(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// Per-channel scale = weight * invstd and bias in the accumulation type (weight 1 and bias 0 when absent).
template <typename acc_t>
void channel_scale_bias(const at::Tensor& invstd, const at::Tensor& weight, const at::Tensor& bias,
                        std::vector<acc_t>& scale, std::vector<acc_t>& beta) {
  const int64_t C = invstd.numel();
  const acc_t* ip = invstd.data_ptr<acc_t>();
  const acc_t* wp = weight.defined() ? weight.data_ptr<acc_t>() : nullptr;
  const acc_t* bp = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;
  scale.resize(C);
  beta.resize(C);
  for (int64_t c = 0; c < C; ++c) {
    scale[c] = (wp ? wp[c] : acc_t(1)) * ip[c];
    beta[c] = bp ? bp[c] : acc_t(0);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Statistics

template <typename scalar_t, bool UNIT>
void stats_chunks(const scalar_t* xp, const Layout& l, int64_t M, int64_t P, double* partial) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t C = l.C, sc = UNIT ? 1 : l.s_c;
  at::parallel_for(0, P, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<acc_t> shift_v(C), mean_v(C), m2_v(C), tile_mean_v(C), tile_m2_v(C);
    acc_t* __restrict__ shift = shift_v.data();
    acc_t* __restrict__ mean = mean_v.data();
    acc_t* __restrict__ m2 = m2_v.data();
    acc_t* __restrict__ tile_mean = tile_mean_v.data();
    acc_t* __restrict__ tile_m2 = tile_m2_v.data();
    for (int64_t p = p_begin; p < p_end; ++p) {
      std::fill(mean, mean + C, acc_t(0));
      std::fill(m2, m2 + C, acc_t(0));
      acc_t n = 0;
      const int64_t r_end = std::min(M, (p + 1) * kChunkRows);
      // Values are shifted by the chunk's first row: x - shift is exact for x near shift, which keeps the
      // accumulation accurate for data whose mean is large against its spread. m2 is shift-invariant.
      const scalar_t* first = xp + row_offset(l, p * kChunkRows);
      for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<acc_t>(first[c * sc]);
      for (int64_t t0 = p * kChunkRows; t0 < r_end; t0 += kTileRows) {
        const int64_t t1 = std::min(r_end, t0 + kTileRows);
        const acc_t nt = static_cast<acc_t>(t1 - t0);
        std::fill(tile_mean, tile_mean + C, acc_t(0));
        std::fill(tile_m2, tile_m2 + C, acc_t(0));
        for (int64_t m = t0; m < t1; ++m) {
          const scalar_t* row = xp + row_offset(l, m);
          for (int64_t c = 0; c < C; ++c) tile_mean[c] += static_cast<acc_t>(row[c * sc]) - shift[c];
        }
        for (int64_t c = 0; c < C; ++c) tile_mean[c] /= nt;
        for (int64_t m = t0; m < t1; ++m) {
          const scalar_t* row = xp + row_offset(l, m);
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = (static_cast<acc_t>(row[c * sc]) - shift[c]) - tile_mean[c];
            tile_m2[c] += d * d;
          }
        }
        for (int64_t c = 0; c < C; ++c) {
          acc_t n_c = n;
          welford_merge<acc_t>(n_c, mean[c], m2[c], nt, tile_mean[c], tile_m2[c]);
        }
        n += nt;
      }
      double* out = partial + p * 3 * C;  // (count, mean, m2), the shift added back in double
      for (int64_t c = 0; c < C; ++c) {
        out[c] = static_cast<double>(n);
        out[C + c] = static_cast<double>(mean[c]) + static_cast<double>(shift[c]);
        out[2 * C + c] = static_cast<double>(m2[c]);
      }
    }
  });
}

template <typename scalar_t>
at::Tensor stats_impl(const at::Tensor& x) {
  const Layout l = layout_of(x);
  const int64_t M = l.N * l.HW, C = l.C;
  const int64_t P = ceil_div(M, kChunkRows);
  // partial[p][k][c], k = (count, mean, m2)
  std::vector<double> partial(static_cast<size_t>(P * 3 * C));
  with_flag(l.s_c == 1, [&](auto unit) {
    stats_chunks<scalar_t, decltype(unit)::value>(x.const_data_ptr<scalar_t>(), l, M, P, partial.data());
  });
  at::Tensor stats = at::zeros({3, C}, x.options().dtype(at::kDouble));
  double* sp = stats.data_ptr<double>();
  for (int64_t p = 0; p < P; ++p) {  // Chan merges in a fixed order: deterministic
    const double* q = partial.data() + p * 3 * C;
    for (int64_t c = 0; c < C; ++c) welford_merge<double>(sp[c], sp[C + c], sp[2 * C + c], q[c], q[C + c], q[2 * C + c]);
  }
  return stats;
}

at::Tensor bn_stats_cpu(const at::Tensor& x_in) {
  check_activation(x_in, "x");
  const at::Tensor x = kernel_layout(x_in);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_stats_cpu",
                                         [&] { return stats_impl<scalar_t>(x); });
}

std::tuple<at::Tensor, at::Tensor> bn_finalize_cpu(const at::Tensor& stats_in,
                                                   const c10::optional<at::Tensor>& running_mean,
                                                   const c10::optional<at::Tensor>& running_var,
                                                   const c10::optional<at::Tensor>& num_batches_tracked,
                                                   c10::optional<double> momentum, double eps,
                                                   at::ScalarType dtype) {
  check_stats(stats_in);
  const at::Tensor stats = stats_in.contiguous();
  const int64_t C = stats.size(1);
  const bool update = present(running_mean);
  TORCH_CHECK(update == present(running_var),
              "fused_resnet: running_mean and running_var must be given together");
  at::Tensor rm, rv;
  double factor = 0.0;
  if (update) {
    check_channel_vector(*running_mean, C, stats.device(), "running_mean");
    check_channel_vector(*running_var, C, stats.device(), "running_var");
    if (momentum.has_value()) {
      factor = *momentum;
    } else {
      TORCH_CHECK(present(num_batches_tracked),
                  "fused_resnet: momentum=None (cumulative average) needs num_batches_tracked");
      factor = 1.0 / static_cast<double>(num_batches_tracked->item<int64_t>());
    }
    rm = running_mean->to(at::kDouble).contiguous();
    rv = running_var->to(at::kDouble).contiguous();
  }
  at::Tensor mean = at::empty({C}, stats.options());
  at::Tensor invstd = at::empty({C}, stats.options());
  const double* sp = stats.data_ptr<double>();
  double* mp = mean.data_ptr<double>();
  double* ip = invstd.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const double n = sp[c];
    double var;
    stats_to_mean_var(n, sp[C + c], sp[2 * C + c], &mp[c], &var);
    ip[c] = 1.0 / std::sqrt(var + eps);
    if (update && n > 0.0) {  // a channel nobody saw (an all-empty synchronized batch) keeps its buffers
      rm.data_ptr<double>()[c] = running_update(rm.data_ptr<double>()[c], mp[c], factor);
      rv.data_ptr<double>()[c] = running_update(rv.data_ptr<double>()[c], var * n / (n - 1.0), factor);
    }
  }
  if (update) {
    running_mean->copy_(rm);
    running_var->copy_(rv);
  }
  return {mean.to(dtype), invstd.to(dtype)};
}

// ---------------------------------------------------------------------------------------------------------
// Forward apply: y = relu?((x - mean) * scale + bias [+ residual])

template <typename scalar_t>
void act_impl(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd, const at::Tensor& weight,
              const at::Tensor& bias, const at::Tensor& residual, bool relu, at::Tensor& y) {
  using acc_t = at::opmath_type<scalar_t>;
  std::vector<acc_t> scale_v, beta_v;
  channel_scale_bias<acc_t>(invstd, weight, bias, scale_v, beta_v);
  const acc_t* __restrict__ mp = mean.data_ptr<acc_t>();
  const acc_t* __restrict__ scale = scale_v.data();
  const acc_t* __restrict__ beta = beta_v.data();
  const Layout lx = layout_of(x), ly = layout_of(y);
  const bool has_res = residual.defined();
  const Layout lr = has_res ? layout_of(residual) : lx;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const scalar_t* rp = has_res ? residual.const_data_ptr<scalar_t>() : nullptr;
  scalar_t* yp = y.data_ptr<scalar_t>();
  const int64_t M = lx.N * lx.HW, C = lx.C;
  const bool unit = lx.s_c == 1 && ly.s_c == 1 && (!has_res || lr.s_c == 1);
  with_flag(has_res, [&](auto res_t) {
    with_flag(relu, [&](auto relu_t) {
      with_flag(unit, [&](auto unit_t) {
        constexpr bool RES = decltype(res_t)::value, RELU = decltype(relu_t)::value;
        constexpr bool UNIT = decltype(unit_t)::value;
        const int64_t sx = UNIT ? 1 : lx.s_c, sr = UNIT ? 1 : lr.s_c, sy = UNIT ? 1 : ly.s_c;
        at::parallel_for(0, M, kApplyGrain, [&](int64_t m0, int64_t m1) {
          for (int64_t m = m0; m < m1; ++m) {
            const scalar_t* __restrict__ xr = xp + row_offset(lx, m);
            const scalar_t* __restrict__ rr = RES ? rp + row_offset(lr, m) : nullptr;
            scalar_t* __restrict__ yr = yp + row_offset(ly, m);
            for (int64_t c = 0; c < C; ++c) {
              acc_t z = bn_affine<acc_t>(static_cast<acc_t>(xr[c * sx]), mp[c], scale[c], beta[c]);
              if constexpr (RES) z += static_cast<acc_t>(rr[c * sr]);
              if constexpr (RELU) z = relu_nan(z);
              yr[c * sy] = static_cast<scalar_t>(z);
            }
          }
        });
      });
    });
  });
}

at::Tensor bn_act_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                      const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
                      const c10::optional<at::Tensor>& residual_in, bool relu) {
  check_apply_args(x_in, mean, invstd, weight, bias);
  const at::Tensor x = kernel_layout(x_in);
  at::Tensor residual;
  if (present(residual_in)) {
    check_like(*residual_in, x_in, "residual");
    residual = kernel_layout(*residual_in);
  }
  const auto acc = acc_type_of(x);
  at::Tensor y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_act_cpu", [&] {
    act_impl<scalar_t>(x, mean.contiguous(), invstd.contiguous(), channel_param(weight, acc),
                       channel_param(bias, acc), residual, relu, y);
  });
  return y;
}

// ---------------------------------------------------------------------------------------------------------
// Backward. dz = grad_out * [relu mask]; the mask is out > 0 when the output was saved (residual before
// the ReLU), else recomputed from x with the forward's own expression.

template <typename scalar_t>
struct BackwardInputs {
  using acc_t = at::opmath_type<scalar_t>;
  Layout ldy, lx, lo;
  const scalar_t* dy;
  const scalar_t* x;
  const scalar_t* out;  // nullptr: recompute the mask from x
  bool relu;
  std::vector<acc_t> scale, beta;
  const acc_t* mean;
  const acc_t* invstd;

  BackwardInputs(const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& out_,
                 const at::Tensor& mean_, const at::Tensor& invstd_, const at::Tensor& weight,
                 const at::Tensor& bias, bool relu_)
      : ldy(layout_of(grad_out)),
        lx(layout_of(x_)),
        lo(out_.defined() ? layout_of(out_) : lx),
        dy(grad_out.const_data_ptr<scalar_t>()),
        x(x_.const_data_ptr<scalar_t>()),
        out(out_.defined() ? out_.const_data_ptr<scalar_t>() : nullptr),
        relu(relu_),
        mean(mean_.const_data_ptr<acc_t>()),
        invstd(invstd_.const_data_ptr<acc_t>()) {
    channel_scale_bias<acc_t>(invstd_, weight, bias, scale, beta);
  }

  // dz and xhat of element c of a row, given the three row base pointers. RELU, OUT (mask from the saved
  // output rather than recomputed) and UNIT (unit channel strides) are compile-time, so the channel loops
  // that call this vectorise.
  template <bool RELU, bool OUT, bool UNIT>
  inline void at(const scalar_t* dyr, const scalar_t* xr, const scalar_t* orow, int64_t c, acc_t* dz,
                 acc_t* xhat) const {
    const acc_t xv = static_cast<acc_t>(xr[c * (UNIT ? 1 : lx.s_c)]);
    acc_t g = static_cast<acc_t>(dyr[c * (UNIT ? 1 : ldy.s_c)]);
    if constexpr (RELU) {
      bool active;
      if constexpr (OUT) {
        active = static_cast<acc_t>(orow[c * (UNIT ? 1 : lo.s_c)]) > acc_t(0);
      } else {
        active = bn_affine<acc_t>(xv, mean[c], scale[c], beta[c]) > acc_t(0);
      }
      g = active ? g : acc_t(0);
    }
    *dz = g;
    *xhat = (xv - mean[c]) * invstd[c];
  }

  bool unit() const { return lx.s_c == 1 && ldy.s_c == 1 && (out == nullptr || lo.s_c == 1); }

  // f(RELU, OUT, UNIT) as std::bool_constant values for this input's flags.
  template <typename F>
  void dispatch(F&& f) const {
    with_flag(relu, [&](auto relu_t) {
      with_flag(relu && out != nullptr, [&](auto out_t) {
        with_flag(unit(), [&](auto unit_t) { f(relu_t, out_t, unit_t); });
      });
    });
  }
};

template <typename scalar_t>
at::Tensor backward_reduce_impl(const BackwardInputs<scalar_t>& in, at::ScalarType acc_dtype,
                                const at::Device& device) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t M = in.lx.N * in.lx.HW, C = in.lx.C;
  const int64_t P = ceil_div(M, kChunkRows);
  std::vector<acc_t> partial(static_cast<size_t>(P * 2 * C));
  at::parallel_for(0, P, 1, [&](int64_t p_begin, int64_t p_end) {
    // Two levels, like the GPU's per-thread then per-block sums: a tile of rows is summed first, then
    // tiles are added to the chunk's totals (one long fp32 running sum over 4096 rows loses ~5e-5).
    std::vector<acc_t> t_dz(C), t_dzx(C);
    for (int64_t p = p_begin; p < p_end; ++p) {
      acc_t* s_dz = partial.data() + p * 2 * C;
      acc_t* s_dzx = s_dz + C;
      const int64_t r_end = std::min(M, (p + 1) * kChunkRows);
      for (int64_t t0 = p * kChunkRows; t0 < r_end; t0 += kTileRows) {
        const int64_t t1 = std::min(r_end, t0 + kTileRows);
        std::fill(t_dz.begin(), t_dz.end(), acc_t(0));
        std::fill(t_dzx.begin(), t_dzx.end(), acc_t(0));
        in.dispatch([&](auto relu_t, auto out_t, auto unit_t) {
          constexpr bool RELU = decltype(relu_t)::value, OUT = decltype(out_t)::value;
          constexpr bool UNIT = decltype(unit_t)::value;
          acc_t* __restrict__ td = t_dz.data();
          acc_t* __restrict__ tdx = t_dzx.data();
          for (int64_t m = t0; m < t1; ++m) {
            const scalar_t* dyr = in.dy + row_offset(in.ldy, m);
            const scalar_t* xr = in.x + row_offset(in.lx, m);
            const scalar_t* orow = OUT ? in.out + row_offset(in.lo, m) : nullptr;
            for (int64_t c = 0; c < C; ++c) {
              acc_t dz, xhat;
              in.template at<RELU, OUT, UNIT>(dyr, xr, orow, c, &dz, &xhat);
              td[c] += dz;
              tdx[c] += dz * xhat;
            }
          }
        });
        for (int64_t c = 0; c < C; ++c) {
          s_dz[c] += t_dz[c];
          s_dzx[c] += t_dzx[c];
        }
      }
    }
  });
  at::Tensor sums = at::zeros({2, C}, at::TensorOptions().dtype(acc_dtype).device(device));
  acc_t* sp = sums.data_ptr<acc_t>();
  for (int64_t p = 0; p < P; ++p) {
    for (int64_t k = 0; k < 2 * C; ++k) sp[k] += partial[p * 2 * C + k];
  }
  return sums;
}

at::Tensor bn_backward_reduce_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                                  const at::Tensor& invstd, const c10::optional<at::Tensor>& weight,
                                  const c10::optional<at::Tensor>& bias, const c10::optional<at::Tensor>& out,
                                  bool relu) {
  const BackwardArgs a = prepare_backward(grad_out, x, mean, invstd, weight, bias, out);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_backward_reduce_cpu", [&] {
    BackwardInputs<scalar_t> in(a.grad_out, a.x, a.out, a.mean, a.invstd, a.weight, a.bias, relu);
    return backward_reduce_impl<scalar_t>(in, acc_type_of(a.x), a.x.device());
  });
}

std::tuple<at::Tensor, at::Tensor> bn_backward_elemt_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& out, const c10::optional<at::Tensor>& sums_in,
    const c10::optional<at::Tensor>& count_in, bool relu, bool need_dz) {
  const BackwardArgs a = prepare_backward(grad_out, x, mean, invstd, weight, bias, out);
  const int64_t C = a.x.size(1);
  at::Tensor sums, count;
  const bool batch_stats = batch_stats_sums(sums_in, count_in, a.x, &sums, &count);
  at::Tensor dx = at::empty_like(a.x);
  at::Tensor dz_out = need_dz ? at::empty_like(a.x) : at::empty({0}, a.x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.x.scalar_type(), "bn_backward_elemt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BackwardInputs<scalar_t> in(a.grad_out, a.x, a.out, a.mean, a.invstd, a.weight, a.bias, relu);
    std::vector<acc_t> mean_dz(C, acc_t(0)), mean_dzx(C, acc_t(0));
    if (batch_stats) {
      for (int64_t c = 0; c < C; ++c) {
        const acc_t inv_n = static_cast<acc_t>(1.0 / count.data_ptr<double>()[c]);
        mean_dz[c] = sums.data_ptr<acc_t>()[c] * inv_n;
        mean_dzx[c] = sums.data_ptr<acc_t>()[C + c] * inv_n;
      }
    }
    const Layout ldx = layout_of(dx);
    const Layout ldz = need_dz ? layout_of(dz_out) : ldx;
    scalar_t* dxp = dx.data_ptr<scalar_t>();
    scalar_t* dzp = need_dz ? dz_out.data_ptr<scalar_t>() : nullptr;
    const int64_t M = in.lx.N * in.lx.HW;
    const bool unit = in.unit() && ldx.s_c == 1 && (!need_dz || ldz.s_c == 1);
    const acc_t* __restrict__ scale = in.scale.data();
    const acc_t* __restrict__ k_dz = mean_dz.data();
    const acc_t* __restrict__ k_dzx = mean_dzx.data();
    in.dispatch([&](auto relu_t, auto out_t, auto) {
      with_flag(unit, [&](auto unit_t) {
        with_flag(batch_stats, [&](auto train_t) {
          with_flag(need_dz, [&](auto store_dz_t) {
            constexpr bool RELU = decltype(relu_t)::value, OUT = decltype(out_t)::value;
            constexpr bool UNIT = decltype(unit_t)::value, TRAIN = decltype(train_t)::value;
            constexpr bool STORE_DZ = decltype(store_dz_t)::value;
            const int64_t sdx = UNIT ? 1 : ldx.s_c, sdz = UNIT ? 1 : ldz.s_c;
            at::parallel_for(0, M, kApplyGrain, [&](int64_t m0, int64_t m1) {
              for (int64_t m = m0; m < m1; ++m) {
                const scalar_t* dyr = in.dy + row_offset(in.ldy, m);
                const scalar_t* xr = in.x + row_offset(in.lx, m);
                const scalar_t* orow = OUT ? in.out + row_offset(in.lo, m) : nullptr;
                scalar_t* __restrict__ dxr = dxp + row_offset(ldx, m);
                scalar_t* __restrict__ dzr = STORE_DZ ? dzp + row_offset(ldz, m) : nullptr;
                for (int64_t c = 0; c < C; ++c) {
                  acc_t dz, xhat;
                  in.template at<RELU, OUT, UNIT>(dyr, xr, orow, c, &dz, &xhat);
                  acc_t g;
                  if constexpr (TRAIN) {
                    g = bn_grad_input_train<acc_t>(dz, xhat, scale[c], k_dz[c], k_dzx[c]);
                  } else {
                    g = scale[c] * dz;
                  }
                  dxr[c * sdx] = static_cast<scalar_t>(g);
                  if constexpr (STORE_DZ) dzr[c * sdz] = static_cast<scalar_t>(dz);
                }
              }
            });
          });
        });
      });
    });
  });
  return {dx, dz_out};
}

// The reference of bn_prologue_half's CUDA kernel: the same bn_math.h functions in the same order (channels
// in order; the amax is order-independent, max being exact), fp16 by round-to-nearest-even as __float2half_rn.
std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_prologue_half_cpu(const at::Tensor& mean_in,
                                                                    const at::Tensor& invstd_in,
                                                                    const c10::optional<at::Tensor>& weight_in,
                                                                    const c10::optional<at::Tensor>& bias_in) {
  const PrologueHalfArgs a = prepare_prologue_half(mean_in, invstd_in, weight_in, bias_in);
  const auto opts = a.mean.options();
  at::Tensor scale = at::empty({a.C}, opts.dtype(at::kHalf)), shift = at::empty({a.C}, opts.dtype(at::kHalf));
  at::Tensor alpha = at::empty({1}, opts);
  const float* mean = a.mean.const_data_ptr<float>();
  const float* invstd = a.invstd.const_data_ptr<float>();
  const float* weight = a.weight.defined() ? a.weight.const_data_ptr<float>() : nullptr;
  const float* bias = a.bias.defined() ? a.bias.const_data_ptr<float>() : nullptr;
  std::vector<float> sc(a.C), sh(a.C);
  float amax = 0.0f;
  for (int64_t c = 0; c < a.C; ++c) {
    prologue_scale_shift(mean[c], invstd[c], weight != nullptr ? weight[c] : 1.0f, bias != nullptr ? bias[c] : 0.0f,
                         &sc[c], &sh[c]);
    amax = prologue_amax(amax, sc[c], sh[c]);
  }
  const float alpha_v = prologue_alpha(amax);
  const float inv_alpha = 1.0f / alpha_v;
  at::Half* scale_p = scale.data_ptr<at::Half>();
  at::Half* shift_p = shift.data_ptr<at::Half>();
  for (int64_t c = 0; c < a.C; ++c) {
    scale_p[c] = at::Half(sc[c] * inv_alpha);
    shift_p[c] = at::Half(sh[c] * inv_alpha);
  }
  alpha.data_ptr<float>()[0] = alpha_v;
  return {scale, shift, alpha};
}

}  // namespace

TORCH_LIBRARY_IMPL(fused_resnet_C, CPU, m) {
  m.impl("bn_stats", &bn_stats_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("bn_act", &bn_act_cpu);
  m.impl("bn_backward_reduce", &bn_backward_reduce_cpu);
  m.impl("bn_backward_elemt", &bn_backward_elemt_cpu);
  m.impl("bn_prologue_half", &bn_prologue_half_cpu);
}

}  // namespace fused_resnet
