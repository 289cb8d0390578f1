// Launch configuration and dispatch of the fused BatchNorm CUDA kernels (see batch_norm_kernels.cuh for the
// thread mapping and the reduction structure).
//
// Launch configurations (every kernel: 256-thread blocks):
//   Block shape, chosen from x's layout:
//     channels-fastest (s_c == 1, or s_c <= s_hw): TX = smallest power of two >= ceil(C / VEC), capped at 32,
//       TY = 256 / TX; grid.x = ceil(C / (TX * VEC)).
//     rows-fastest (s_c != 1 and s_hw < s_c, e.g. contiguous NCHW): TX = 1, TY = 256, VEC = 1; grid.x = C.
//   VEC: the widest of 16 / sizeof(T), ..., 2 such that every tensor the kernel touches has s_c == 1,
//     C % VEC == 0, s_n % VEC == 0 (if N > 1), s_hw % VEC == 0 (if HW > 1) and a base pointer aligned to
//     VEC * sizeof(T); else 1 (scalar accesses).
//   Reductions: grid.y = P row chunks with grid.x * P ~= SMs * k{Stats,Backward}MinBlocksPerSM (one full
//     wave at the residency their __launch_bounds__ guarantees), at least kMinRowsPerThread rows per thread, at most kMaxRowsPerChunk rows per
//     chunk (fp32 counts stay exact), P <= 65535. A second kernel sums the P partials (skipped when P == 1).
//   Elementwise: grid.y = min(ceil(M / TY), kElemBlocksPerSM * SMs / grid.x, 65535), grid-stride over rows.
#include "batch_norm_launch.h"

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "batch_norm_kernels.cuh"

namespace fused_resnet {
namespace cuda_bn {
namespace {

constexpr int64_t kElemBlocksPerSM = 8;
constexpr int64_t kMaxGridY = 65535;
constexpr int64_t kMaxRowsPerChunk = int64_t(1) << 22;
constexpr int64_t kMinRowsPerThread = 16;
constexpr int kMaxCachedDevices = 64;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

int elem_size(DType dt) {
  switch (dt) {
    case DType::kHalf:
    case DType::kBFloat16:
      return 2;
    case DType::kFloat:
      return 4;
    case DType::kDouble:
      return 8;
  }
  return 0;
}

// Multiprocessor count of the current device, cached per device.
int sm_count() {
  static std::atomic<int> cache[kMaxCachedDevices];
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 1;  // the error surfaces at the launch check
  if (dev >= 0 && dev < kMaxCachedDevices) {
    const int v = cache[dev].load(std::memory_order_relaxed);
    if (v > 0) return v;
  }
  int v = 0;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || v <= 0) return 1;
  if (dev >= 0 && dev < kMaxCachedDevices) cache[dev].store(v, std::memory_order_relaxed);
  return v;
}

// One tensor a kernel accesses, for the vector-width check. check_ptr = false: layout only (planning).
struct TensorRef {
  const void* ptr;
  const Layout* layout;
  bool check_ptr;
};

bool vec_ok(const TensorRef& t, int vec, int esize) {
  const Layout& l = *t.layout;
  if (l.s_c != 1 || l.C % vec != 0) return false;
  if (l.N > 1 && l.s_n % vec != 0) return false;
  if (l.HW > 1 && l.s_hw % vec != 0) return false;
  if (t.check_ptr && reinterpret_cast<uintptr_t>(t.ptr) % static_cast<uintptr_t>(vec * esize) != 0) return false;
  return true;
}

int pick_vec(DType dt, const TensorRef* ts, int count) {
  const int esize = elem_size(dt);
  for (int vec = 16 / esize; vec > 1; vec /= 2) {
    bool ok = true;
    for (int i = 0; i < count && ok; ++i) ok = vec_ok(ts[i], vec, esize);
    if (ok) return vec;
  }
  return 1;
}

struct Shape {
  int tx, ty, vec;
  int64_t gx;  // blocks along channels
};

Shape choose_shape(const Layout& lx, int vec) {
  Shape s;
  if (lx.s_c != 1 && lx.s_hw < lx.s_c) {  // rows-fastest: threads along hw for coalescing
    s.tx = 1;
    s.ty = kBlockThreads;
    s.vec = 1;
    s.gx = lx.C;
    return s;
  }
  const int64_t cv = cdiv(lx.C, vec);
  int tx = 1;
  while (tx < 32 && tx < cv) tx *= 2;
  s.tx = tx;
  s.ty = kBlockThreads / tx;  // power of two: the reductions' tree merge relies on it
  s.vec = vec;
  s.gx = cdiv(cv, tx);
  return s;
}

int64_t plan_partials(int64_t M, const Shape& s, int64_t blocks_per_sm) {
  int64_t P = std::max<int64_t>(1, static_cast<int64_t>(sm_count()) * blocks_per_sm / s.gx);
  P = std::min(P, cdiv(M, static_cast<int64_t>(s.ty) * kMinRowsPerThread));
  P = std::max(P, cdiv(M, kMaxRowsPerChunk));
  P = std::min(P, kMaxGridY);
  P = std::max<int64_t>(P, 1);
  return cdiv(M, cdiv(M, P));  // every chunk non-empty
}

int64_t elem_grid_y(int64_t M, const Shape& s) {
  int64_t gy = std::max<int64_t>(1, static_cast<int64_t>(sm_count()) * kElemBlocksPerSM / s.gx);
  gy = std::min(gy, cdiv(M, s.ty));
  return std::max<int64_t>(1, std::min(gy, kMaxGridY));
}

template <typename T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<T>{}) for the element type of dt; false for an unknown dtype.
template <typename F>
bool dispatch_dtype(DType dt, F&& f) {
  switch (dt) {
    case DType::kHalf:
      f(TypeTag<__half>{});
      return true;
    case DType::kBFloat16:
      f(TypeTag<__nv_bfloat16>{});
      return true;
    case DType::kFloat:
      f(TypeTag<float>{});
      return true;
    case DType::kDouble:
      f(TypeTag<double>{});
      return true;
  }
  return false;
}

// Calls f(std::integral_constant<int, VEC>{}) for vec in {8, 4, 2, 1}, instantiating only widths with
// VEC * sizeof(T) <= 16.
template <typename T, typename F>
void dispatch_vec(int vec, F&& f) {
  constexpr int kMax = 16 / static_cast<int>(sizeof(T));
  if constexpr (kMax >= 8) {
    if (vec == 8) return f(std::integral_constant<int, 8>{});
  }
  if constexpr (kMax >= 4) {
    if (vec == 4) return f(std::integral_constant<int, 4>{});
  }
  if constexpr (kMax >= 2) {
    if (vec == 2) return f(std::integral_constant<int, 2>{});
  }
  f(std::integral_constant<int, 1>{});
}

bool grid_ok(const Shape& s, int64_t gy) { return s.gx >= 1 && s.gx <= INT_MAX && gy >= 1 && gy <= kMaxGridY; }

}  // namespace

namespace {
int64_t plan_num_partials(const Layout& lx, DType dtype, int64_t blocks_per_sm) {
  const int64_t M = lx.N * lx.HW;
  if (M <= 0 || lx.C <= 0 || elem_size(dtype) == 0) return 0;
  const TensorRef t{nullptr, &lx, false};
  return plan_partials(M, choose_shape(lx, pick_vec(dtype, &t, 1)), blocks_per_sm);
}
}  // namespace

int64_t stats_num_partials(const Layout& lx, DType dtype) {
  return plan_num_partials(lx, dtype, kStatsMinBlocksPerSM);
}

int64_t backward_reduce_num_partials(const Layout& lx, DType dtype) {
  return plan_num_partials(lx, dtype, kBackwardMinBlocksPerSM);
}

cudaError_t launch_bn_stats(const void* x, const Layout& lx, DType dtype, int64_t num_partials, double* partials,
                            double* stats, cudaStream_t stream) {
  const int64_t M = lx.N * lx.HW, C = lx.C;
  if (M <= 0 || C <= 0) return cudaSuccess;
  const int64_t P = num_partials;
  if (P < 1 || P > kMaxGridY || (P > 1 && partials == nullptr) || stats == nullptr) return cudaErrorInvalidValue;
  const TensorRef refs[] = {{x, &lx, true}};
  const Shape s = choose_shape(lx, pick_vec(dtype, refs, 1));
  if (!grid_ok(s, P)) return cudaErrorInvalidConfiguration;
  const int64_t rows_per_chunk = cdiv(M, P);
  double* dst = P == 1 ? stats : partials;
  const dim3 grid(static_cast<unsigned>(s.gx), static_cast<unsigned>(P));
  const dim3 block(s.tx, s.ty);
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccType<T>::type;
    dispatch_vec<T>(s.vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      constexpr int ROWS = VEC >= 4 ? 4 : 8;
      const size_t smem = static_cast<size_t>(2 * VEC + 1) * kBlockThreads * sizeof(A);
      bn_stats_partial_kernel<T, A, VEC, ROWS>
          <<<grid, block, smem, stream>>>(static_cast<const T*>(x), lx, M, rows_per_chunk, dst);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || P == 1) return err;
  const dim3 grid2(static_cast<unsigned>(cdiv(C, kPartialsTX)));
  merge_stats_partials_kernel<<<grid2, dim3(kPartialsTX, kPartialsTY), 0, stream>>>(partials, P, C, stats);
  return cudaGetLastError();
}

cudaError_t launch_bn_finalize(const double* stats, int64_t C, void* running_mean, void* running_var,
                               DType running_dtype, const int64_t* num_batches_tracked, bool has_momentum,
                               double momentum, double eps, void* mean_out, void* invstd_out, DType out_dtype,
                               cudaStream_t stream) {
  if (C <= 0) return cudaSuccess;
  const bool update = running_mean != nullptr;
  if (update != (running_var != nullptr)) return cudaErrorInvalidValue;
  if (update && !has_momentum && num_batches_tracked == nullptr) return cudaErrorInvalidValue;
  if (update && running_dtype != DType::kFloat && running_dtype != DType::kDouble) return cudaErrorInvalidValue;
  if (out_dtype != DType::kFloat && out_dtype != DType::kDouble) return cudaErrorInvalidValue;
  const int64_t blocks = cdiv(C, kBlockThreads);
  if (blocks > INT_MAX) return cudaErrorInvalidConfiguration;
  auto go = [&](auto rtag, auto otag) {
    using R = typename decltype(rtag)::type;
    using O = typename decltype(otag)::type;
    bn_finalize_kernel<R, O><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(
        stats, C, static_cast<R*>(running_mean), static_cast<R*>(running_var), num_batches_tracked, has_momentum,
        momentum, eps, static_cast<O*>(mean_out), static_cast<O*>(invstd_out));
  };
  const bool r_float = update && running_dtype == DType::kFloat;
  if (out_dtype == DType::kFloat) {
    if (r_float) go(TypeTag<float>{}, TypeTag<float>{});
    else go(TypeTag<double>{}, TypeTag<float>{});
  } else {
    if (r_float) go(TypeTag<float>{}, TypeTag<double>{});
    else go(TypeTag<double>{}, TypeTag<double>{});
  }
  return cudaGetLastError();
}

cudaError_t launch_bn_act(const void* x, const Layout& lx, const void* residual, const Layout& lr, void* y,
                          const Layout& ly, const void* mean, const void* invstd, const void* weight,
                          const void* bias, bool relu, DType dtype, cudaStream_t stream) {
  const int64_t M = lx.N * lx.HW, C = lx.C;
  if (M <= 0 || C <= 0) return cudaSuccess;
  TensorRef refs[3] = {{x, &lx, true}, {y, &ly, true}, {residual, &lr, true}};
  const Shape s = choose_shape(lx, pick_vec(dtype, refs, residual != nullptr ? 3 : 2));
  const int64_t gy = elem_grid_y(M, s);
  if (!grid_ok(s, gy)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(s.gx), static_cast<unsigned>(gy));
  const dim3 block(s.tx, s.ty);
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccType<T>::type;
    dispatch_vec<T>(s.vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      bn_act_kernel<T, A, VEC><<<grid, block, 0, stream>>>(
          static_cast<const T*>(x), lx, static_cast<const T*>(residual), lr, static_cast<T*>(y), ly,
          static_cast<const A*>(mean), static_cast<const A*>(invstd), static_cast<const A*>(weight),
          static_cast<const A*>(bias), relu, M);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_bn_backward_reduce(const void* grad_out, const Layout& ldy, const void* x, const Layout& lx,
                                      const void* out, const Layout& lo, const void* mean, const void* invstd,
                                      const void* weight, const void* bias, bool relu, DType dtype,
                                      int64_t num_partials, void* partials, void* sums, cudaStream_t stream) {
  const int64_t M = lx.N * lx.HW, C = lx.C;
  if (M <= 0 || C <= 0) return cudaSuccess;
  const int64_t P = num_partials;
  if (P < 1 || P > kMaxGridY || (P > 1 && partials == nullptr) || sums == nullptr) return cudaErrorInvalidValue;
  const bool use_out = relu && out != nullptr;
  TensorRef refs[3] = {{grad_out, &ldy, true}, {x, &lx, true}, {out, &lo, true}};
  const Shape s = choose_shape(lx, pick_vec(dtype, refs, use_out ? 3 : 2));
  if (!grid_ok(s, P)) return cudaErrorInvalidConfiguration;
  const int64_t rows_per_chunk = cdiv(M, P);
  const dim3 grid(static_cast<unsigned>(s.gx), static_cast<unsigned>(P));
  const dim3 block(s.tx, s.ty);
  cudaError_t err = cudaSuccess;
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccType<T>::type;
    A* dst = static_cast<A*>(P == 1 ? sums : partials);
    dispatch_vec<T>(s.vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      constexpr int ROWS = VEC >= 8 ? 1 : (VEC >= 4 ? 2 : 4);
      const size_t smem = static_cast<size_t>(2 * VEC) * kBlockThreads * sizeof(A);
      bn_backward_reduce_partial_kernel<T, A, VEC, ROWS><<<grid, block, smem, stream>>>(
          static_cast<const T*>(grad_out), ldy, static_cast<const T*>(x), lx,
          use_out ? static_cast<const T*>(out) : nullptr, lo, static_cast<const A*>(mean),
          static_cast<const A*>(invstd), static_cast<const A*>(weight), static_cast<const A*>(bias), relu, M,
          rows_per_chunk, dst);
    });
    err = cudaGetLastError();
    if (err != cudaSuccess || P == 1) return;
    const dim3 grid2(static_cast<unsigned>(cdiv(C, kPartialsTX)), 2);
    reduce_partials_kernel<A><<<grid2, dim3(kPartialsTX, kPartialsTY), 0, stream>>>(
        static_cast<const A*>(partials), P, 2, C, static_cast<A*>(sums));
    err = cudaGetLastError();
  });
  if (!known) return cudaErrorInvalidValue;
  return err;
}

cudaError_t launch_bn_backward_elemt(const void* grad_out, const Layout& ldy, const void* x, const Layout& lx,
                                     const void* out, const Layout& lo, const void* mean, const void* invstd,
                                     const void* weight, const void* bias, const void* sums, const double* count,
                                     bool relu, void* dx, const Layout& ldx, void* dz, const Layout& ldz,
                                     DType dtype, cudaStream_t stream) {
  const int64_t M = lx.N * lx.HW, C = lx.C;
  if (M <= 0 || C <= 0) return cudaSuccess;
  if ((sums != nullptr) != (count != nullptr)) return cudaErrorInvalidValue;
  const bool use_out = relu && out != nullptr;
  TensorRef refs[5];
  int nrefs = 0;
  refs[nrefs++] = {grad_out, &ldy, true};
  refs[nrefs++] = {x, &lx, true};
  refs[nrefs++] = {dx, &ldx, true};
  if (use_out) refs[nrefs++] = {out, &lo, true};
  if (dz != nullptr) refs[nrefs++] = {dz, &ldz, true};
  const Shape s = choose_shape(lx, pick_vec(dtype, refs, nrefs));
  const int64_t gy = elem_grid_y(M, s);
  if (!grid_ok(s, gy)) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(s.gx), static_cast<unsigned>(gy));
  const dim3 block(s.tx, s.ty);
  const bool known = dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    using A = typename AccType<T>::type;
    dispatch_vec<T>(s.vec, [&](auto vtag) {
      constexpr int VEC = decltype(vtag)::value;
      bn_backward_elemt_kernel<T, A, VEC><<<grid, block, 0, stream>>>(
          static_cast<const T*>(grad_out), ldy, static_cast<const T*>(x), lx,
          use_out ? static_cast<const T*>(out) : nullptr, lo, static_cast<const A*>(mean),
          static_cast<const A*>(invstd), static_cast<const A*>(weight), static_cast<const A*>(bias),
          static_cast<const A*>(sums), count, relu, static_cast<T*>(dx), ldx, static_cast<T*>(dz), ldz, M);
    });
  });
  if (!known) return cudaErrorInvalidValue;
  return cudaGetLastError();
}

cudaError_t launch_bn_prologue_half(const float* mean, const float* invstd, const float* weight, const float* bias,
                                    int64_t C, void* scale_out, void* shift_out, float* alpha_out,
                                    cudaStream_t stream) {
  if (C <= 0) return cudaErrorInvalidValue;  // alpha of nothing: the caller handles empty vectors
  bn_prologue_half_kernel<<<1, kBlockThreads, 0, stream>>>(mean, invstd, weight, bias, C,
                                                           static_cast<__half*>(scale_out),
                                                           static_cast<__half*>(shift_out), alpha_out);
  return cudaGetLastError();
}

cudaError_t launch_merge_stats_partials(const double* partials, int64_t P, int64_t C, double* stats,
                                        cudaStream_t stream) {
  if (P <= 0 || C <= 0) return cudaErrorInvalidValue;
  if (cdiv(C, kPartialsTX) > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(cdiv(C, kPartialsTX)));
  merge_stats_partials_kernel<<<grid, dim3(kPartialsTX, kPartialsTY), 0, stream>>>(partials, P, C, stats);
  return cudaGetLastError();
}

cudaError_t launch_reduce_partials_float(const float* partials, int64_t P, int K, int64_t C, float* out,
                                         cudaStream_t stream) {
  if (P <= 0 || C <= 0 || K <= 0 || K > 65535) return cudaErrorInvalidValue;
  if (cdiv(C, kPartialsTX) > INT_MAX) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(cdiv(C, kPartialsTX)), static_cast<unsigned>(K));
  reduce_partials_kernel<float><<<grid, dim3(kPartialsTX, kPartialsTY), 0, stream>>>(partials, P, K, C, out);
  return cudaGetLastError();
}

}  // namespace cuda_bn
}  // namespace fused_resnet
