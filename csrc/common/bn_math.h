// Per-channel and per-element math of the fused BatchNorm family, shared by the C++ CPU and the CUDA
// implementations so that both compute exactly the same formulas. Plain C++ (no torch headers): nvcc
// compiles it for the device, g++ for the host.
//
// Notation, per channel c over its n = N*H*W elements:
//   mean, invstd      batch (or running) statistics, invstd = 1 / sqrt(var + eps)
//   scale = weight * invstd
//   z = (x - mean) * scale + bias (+ residual)          y = relu(z) or z
//   dz = dy * [z > 0] (or dy without ReLU)          xhat = (x - mean) * invstd
//   dbias = sum(dz)   dweight = sum(dz * xhat)
//   training: dx = scale * (dz - sum(dz)/n - xhat * sum(dz*xhat)/n)
//   running statistics: dx = scale * dz
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FR_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FR_HOST_DEVICE inline
#endif

namespace fused_resnet {

// Geometry of an N,C,H,W tensor whose H and W dims merge into one "hw" dim: element (n, c, hw) lives at
// n*s_n + c*s_c + hw*s_hw. A "row" m = n*HW + hw indexes the N*H*W positions of one channel.
// Covers contiguous (s_hw = 1), channels_last (s_c = 1), slices along N/C/H and expanded (stride 0) tensors.
struct Layout {
  int64_t N, C, HW;
  int64_t s_n, s_c, s_hw;
  bool rows_merged;  // s_n == HW * s_hw: row m sits at m * s_hw, no division needed
};

FR_HOST_DEVICE int64_t row_offset(const Layout& l, int64_t m) {
  if (l.rows_merged) return m * l.s_hw;
  const int64_t n = m / l.HW;
  return n * l.s_n + (m - n * l.HW) * l.s_hw;
}

// Chan et al.'s merge of two partial (count, mean, m2) summaries; m2 = sum of squared deviations from
// the mean. Stable where raw sums of squares cancel catastrophically (mean 1e4, std 1 in fp32).
template <typename acc_t>
FR_HOST_DEVICE void welford_merge(acc_t& n_a, acc_t& mean_a, acc_t& m2_a, acc_t n_b, acc_t mean_b,
                                  acc_t m2_b) {
  const acc_t n = n_a + n_b;
  if (n_b == acc_t(0)) return;
  const acc_t delta = mean_b - mean_a;
  const acc_t frac_b = n_b / n;
  mean_a += delta * frac_b;
  m2_a += m2_b + delta * delta * n_a * frac_b;
  n_a = n;
}

// The statistics format shared by every implementation (and, later, the convolution epilogues): per channel,
// float64 (count, mean, m2), m2 = sum of squared deviations from the mean. Partials of it merge exactly with
// welford_merge; raw sums (count, sum x, sum x^2) would not: sum x^2 / n - mean^2 cancels catastrophically when
// |mean| >> std (1e-4 relative error at mean 1e6 / std 1 in float64, garbage at 1e8).
//
// Batch mean and biased variance from one (count, mean, m2) summary; the variance is clamped at 0 against
// rounding. Written as `v < 0` so that a NaN variance stays NaN (NaN data must not give finite statistics).
FR_HOST_DEVICE void stats_to_mean_var(double n, double mean, double m2, double* mean_out, double* var) {
  const double v = m2 / n;
  *mean_out = mean;
  *var = v < 0.0 ? 0.0 : v;
}

// The forward pre-activation without residual: (x - mean) * scale + bias, with scale = weight * invstd.
// Subtracting the mean first keeps eager PyTorch's accuracy when |mean| is large against the spread (the
// folded form x * scale + (bias - mean * scale) cancels catastrophically there). Forward and backward (which
// recomputes the ReLU mask from x) both go through this one expression, so they round identically.
template <typename acc_t>
FR_HOST_DEVICE acc_t bn_affine(acc_t x, acc_t mean, acc_t scale, acc_t bias) {
  return (x - mean) * scale + bias;
}

// ReLU that propagates NaN like torch.relu (a NaN compares false).
template <typename acc_t>
FR_HOST_DEVICE acc_t relu_nan(acc_t z) {
  return z < acc_t(0) ? acc_t(0) : z;
}

// One running-statistic update, as nn.BatchNorm2d: r = (1 - f) * r + f * batch_value.
FR_HOST_DEVICE double running_update(double running, double batch_value, double factor) {
  return (1.0 - factor) * running + factor * batch_value;
}

template <typename acc_t>
FR_HOST_DEVICE acc_t bn_grad_input_train(acc_t dz, acc_t xhat, acc_t scale, acc_t mean_dz,
                                         acc_t mean_dz_xhat) {
  return scale * (dz - mean_dz - xhat * mean_dz_xhat);
}

// ---------------------------------------------------------------------------------------------------------
// The prologue vectors of the CUTLASS convolutions (csrc/cuda/conv/): their mainloop transform computes
// relu(x * scale + shift) from fp16 scale / shift, the folded form (see bn_affine for what it costs when
// |mean| is large against the spread). Per channel, in fp32:
//   scale = invstd * weight (weight absent: 1)      shift = bias - mean * scale (bias absent: 0)
// then both divided by alpha, one power of two >= 1 for the whole vector, the smallest that brings
// max over channels of max(|scale|, |shift|) to <= kPrologueLimit (a quarter of fp16's largest finite
// value: headroom for x * scale + shift in the fp16 transform); the convolution's epilogue multiplies by
// alpha again (relu(v) = alpha * relu(v / alpha) for alpha > 0). A power of two keeps the division exact.
// NaN anywhere makes alpha NaN (and so the convolution's output), inf makes it inf: never a silently
// finite result from non-finite statistics.
constexpr float kPrologueLimit = 16384.0f;

FR_HOST_DEVICE void prologue_scale_shift(float mean, float invstd, float weight, float bias, float* scale,
                                         float* shift) {
  const float s = invstd * weight;
#if defined(__CUDA_ARCH__)
  const float ms = __fmul_rn(mean, s);  // never contracted into an fma with the subtraction: the host agrees
#else
  const float ms = mean * s;
#endif
  *scale = s;
  *shift = bias - ms;
}

// max(|a|, |b|, m) that returns NaN when any argument is NaN (fmaxf would drop it).
FR_HOST_DEVICE float prologue_amax(float m, float a, float b) {
  const float fa = a < 0.0f ? -a : a, fb = b < 0.0f ? -b : b;
  if (m != m || fa != fa || fb != fb) return fa + fb + m;  // NaN
  const float r = fa > fb ? fa : fb;
  return r > m ? r : m;
}

// alpha of the whole vector from its amax: 1 when amax <= kPrologueLimit, else the smallest power of two
// >= amax / kPrologueLimit (exact: frexp / ldexp); NaN and inf pass through.
FR_HOST_DEVICE float prologue_alpha(float amax) {
  if (amax != amax) return amax;                    // NaN
  const float v = amax / kPrologueLimit;            // exact: kPrologueLimit is a power of two
  if (!(v > 1.0f)) return 1.0f;
  if (v > 3.0e38f) return v;                        // inf (amax inf; finite amax gives v <= 2^114)
  int e = 0;
  const float m = frexpf(v, &e);                    // v = m * 2^e, m in [0.5, 1)
  return ldexpf(1.0f, m == 0.5f ? e - 1 : e);
}

}  // namespace fused_resnet
