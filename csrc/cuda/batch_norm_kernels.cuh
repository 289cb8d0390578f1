// Device code of the fused BatchNorm family (contract: csrc/ops.cpp; reference algorithm:
// csrc/cpu/batch_norm_cpu.cpp). Only CUDA and standard headers plus common/bn_math.h: no torch, so plain
// nvcc compiles it. Launch configurations are chosen in batch_norm_launch.cu.
//
// Indexing. An activation tensor is described by a fused_resnet::Layout: element (n, c, hw) lives at
// n*s_n + c*s_c + hw*s_hw. A "row" m = n*HW + hw is one of the M = N*HW positions of a channel. Every tensor
// (x, residual, out, grad_out, y, dx, dz) carries its own Layout; they share N, C and HW.
//
// Thread mapping (all kernels use 2-D blocks of kBlockThreads = TX * TY threads):
//   threadIdx.x (TX threads) runs along channels: thread tx owns the VEC consecutive channels
//       c0 = (blockIdx.x * TX + tx) * VEC ... c0 + VEC - 1.
//     VEC > 1 only when s_c == 1 and every tensor's strides, C and base pointer allow aligned 16-byte (or
//     narrower) vector accesses (checked by the launcher), so one thread moves VEC channels of one row with
//     a single load/store.
//   threadIdx.y (TY threads) runs along rows.
//   Channels-last (s_c == 1): TX up to 32, e.g. bf16 C = 64 -> TX = 8, TY = 32; a warp reads 4 rows of
//     128 contiguous bytes each. Contiguous NCHW (s_hw == 1): TX = 1, TY = 256, one channel per block, and
//     consecutive threads read consecutive hw positions (coalesced along rows).
//
// Reductions (bn_stats, bn_backward_reduce) run in two kernels:
//   1. grid (channel blocks, P row chunks). Block (bx, p) owns rows [p*R, min(M, (p+1)*R)) of its channel
//      slice. Thread (tx, ty) reduces rows ty, ty + TY, ty + 2*TY, ... of the chunk, ROWS rows at a time
//      (all ROWS loads are issued before any arithmetic). The TY per-thread results of each channel are
//      merged by a shared-memory tree (fixed pairing: ty += ty + s for s = TY/2 ... 1), and ty == 0 writes
//      the block's partial to partials[p][k][c].
//   2. a second kernel combines the P partials of each channel in a fixed order: reduce_partials_kernel sums
//      them (bn_backward_reduce), merge_stats_partials_kernel Chan-merges them (bn_stats).
//   Everything is deterministic (no atomics) for a given launch configuration. When P == 1 the first kernel
//   writes the final result directly.
//   bn_stats: values are shifted by the block's first row (per channel, as the CPU twin's chunks); per
//   thread, each group of ROWS rows is reduced exactly (two passes: group mean, then sum of squared
//   deviations) and merged into the thread's running (count, mean, m2) with welford_merge (Chan); threads
//   are merged with welford_merge too; the block partial is stored as (count, mean + shift, m2) in double,
//   the statistics format of the contract, and the partials are Chan-merged in double.
//
// Elementwise kernels (bn_act, bn_backward_elemt): same thread mapping, grid (channel blocks, row blocks),
// grid-stride loop over rows; per-channel constants (mean, scale, bias, ...) are computed once per thread.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "common/bn_math.h"

namespace fused_resnet {
namespace cuda_bn {

constexpr int kBlockThreads = 256;  // every kernel: blockDim.x * blockDim.y == kBlockThreads
// Minimum resident blocks per SM requested from the compiler (__launch_bounds__) for the reduction kernels;
// the launcher sizes their grids to one full wave of SMs * this many blocks.
constexpr int kStatsMinBlocksPerSM = 2;     // <= 128 registers per thread
constexpr int kBackwardMinBlocksPerSM = 2;  // <= 128 registers per thread
constexpr int kPartialsTX = 32;  // reduce_partials_kernel block: 32 channels x 8 partial slices
constexpr int kPartialsTY = kBlockThreads / kPartialsTX;

// ---------------------------------------------------------------------------------------------------------
// Types and conversions. Explicit intrinsics only: torch builds with __CUDA_NO_HALF_CONVERSIONS__ and
// __CUDA_NO_BFLOAT16_CONVERSIONS__, so __half / __nv_bfloat16 have no implicit conversions.

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

// Round-to-nearest-even, like the CPU's static_cast<c10::Half / c10::BFloat16>(float).
template <typename T>
__device__ __forceinline__ T from_acc(typename AccType<T>::type v);
template <>
__device__ __forceinline__ float from_acc<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ double from_acc<double>(double v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// N consecutive elements moved as one aligned access (N * sizeof(T) <= 16 bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) VecT {
  T v[N];
};

// Loads the VEC channels c0 .. c0+VEC-1 of one row; p points at channel c0. VEC > 1 implies s_c == 1 and
// p aligned to VEC * sizeof(T) (launcher-checked).
template <typename T, int VEC, typename A>
__device__ __forceinline__ void load_channels(const T* __restrict__ p, A (&out)[VEC]) {
  if constexpr (VEC == 1) {
    out[0] = to_acc(p[0]);
  } else {
    const VecT<T, VEC> r = *reinterpret_cast<const VecT<T, VEC>*>(p);
#pragma unroll
    for (int j = 0; j < VEC; ++j) out[j] = to_acc(r.v[j]);
  }
}

template <typename T, int VEC, typename A>
__device__ __forceinline__ void store_channels(T* __restrict__ p, const A (&in)[VEC]) {
  if constexpr (VEC == 1) {
    p[0] = from_acc<T>(in[0]);
  } else {
    VecT<T, VEC> r;
#pragma unroll
    for (int j = 0; j < VEC; ++j) r.v[j] = from_acc<T>(in[j]);
    *reinterpret_cast<VecT<T, VEC>*>(p) = r;
  }
}

// ---------------------------------------------------------------------------------------------------------
// Row cursor: (n, hw) of row m, advanced by a fixed step without a division per row. The element offset
// n*s_n + hw*s_hw equals row_offset(l, m) of bn_math.h for every Layout (rows_merged or not), and one
// cursor serves all tensors of a kernel since they share N and HW.
struct RowCursor {
  int64_t n, hw;
  int64_t step_n, step_hw;  // step = step_n * HW + step_hw, 0 <= step_hw < HW

  __device__ __forceinline__ RowCursor(int64_t m, int64_t step, int64_t HW) {
    n = m / HW;
    hw = m - n * HW;
    step_n = step / HW;
    step_hw = step - step_n * HW;
  }
  __device__ __forceinline__ void advance(int64_t HW) {
    hw += step_hw;
    n += step_n;
    if (hw >= HW) {
      hw -= HW;
      ++n;
    }
  }
  __device__ __forceinline__ int64_t offset(const Layout& l) const { return n * l.s_n + hw * l.s_hw; }
};

// Per-thread per-channel constants: mean, invstd, scale = weight * invstd and bias (weight 1 and bias 0 if
// absent), for bn_affine's (x - mean) * scale + bias.
template <typename A, int VEC>
struct ChannelConsts {
  A mean[VEC], invstd[VEC], scale[VEC], beta[VEC];

  __device__ __forceinline__ void load(const A* __restrict__ mean_p, const A* __restrict__ invstd_p,
                                       const A* __restrict__ weight_p, const A* __restrict__ bias_p,
                                       int64_t c0, bool valid) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      if (valid) {
        const int64_t c = c0 + j;
        mean[j] = mean_p[c];
        invstd[j] = invstd_p[c];
        scale[j] = (weight_p ? weight_p[c] : A(1)) * invstd[j];
        beta[j] = bias_p ? bias_p[c] : A(0);
      } else {
        mean[j] = invstd[j] = scale[j] = beta[j] = A(0);
      }
    }
  }
};

// dz and xhat of one element, exactly as the CPU's BackwardInputs::at: the ReLU mask is out > 0 when out
// is used, else recomputed from x with the forward's own bn_affine.
template <typename A>
__device__ __forceinline__ void dz_xhat(A g, A xv, A ov, bool relu, bool use_out, A mean, A invstd, A scale,
                                        A beta, A* dz, A* xhat) {
  if (relu) {
    const bool active = use_out ? ov > A(0) : bn_affine<A>(xv, mean, scale, beta) > A(0);
    if (!active) g = A(0);
  }
  *dz = g;
  *xhat = (xv - mean) * invstd;
}

// Dynamic shared memory, typed per kernel (one extern array for all instantiations).
extern __shared__ __align__(16) unsigned char fr_dyn_smem[];

// ---------------------------------------------------------------------------------------------------------
// bn_stats, pass 1: partial (count, sum, sum of squares) per (row chunk p, channel c) in double,
// partials[(p * 3 + k) * C + c]. Dynamic shared memory: (2 * VEC + 1) * kBlockThreads * sizeof(A).
template <typename T, typename A, int VEC, int ROWS>
__global__ void __launch_bounds__(kBlockThreads, kStatsMinBlocksPerSM)
    bn_stats_partial_kernel(const T* __restrict__ x, const Layout lx, const int64_t M,
                            const int64_t rows_per_chunk, double* __restrict__ partials) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t C = lx.C;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * VEC;
  const bool c_ok = c0 < C;  // VEC > 1 implies C % VEC == 0: the whole vector is in range
  const int64_t p = blockIdx.y;
  const int64_t r0 = p * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;

  A n = A(0);  // rows merged so far by this thread (same for its VEC channels)
  A mean[VEC], m2[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) mean[j] = m2[j] = A(0);

  // Values are shifted by the chunk's first row (as the CPU twin): x - shift is exact for x near shift,
  // which keeps the fp32 accumulation accurate when the mean is large against the spread (m2 is
  // shift-invariant; the shift is added back to the mean in double).
  A shift[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) shift[j] = A(0);

  if (c_ok) {
    const T* xc = x + c0 * lx.s_c;
    if (r0 < r1) load_channels<T, VEC>(xc + row_offset(lx, r0), shift);
    RowCursor cur(r0 + ty, TY, lx.HW);
    for (int64_t base = r0 + ty; base < r1; base += static_cast<int64_t>(ROWS) * TY) {
      // Rows base, base + TY, ..., base + (ROWS-1)*TY; the valid ones are a prefix of k >= 1 rows.
      A v[ROWS][VEC];
      int k = 0;
#pragma unroll
      for (int u = 0; u < ROWS; ++u) {
        if (base + static_cast<int64_t>(u) * TY < r1) {
          load_channels<T, VEC>(xc + cur.offset(lx), v[u]);
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[u][j] -= shift[j];
          ++k;
        } else {
#pragma unroll
          for (int j = 0; j < VEC; ++j) v[u][j] = A(0);
        }
        cur.advance(lx.HW);
      }
      // Exact two-pass (mean, m2) of the group, then a Chan merge into the running summary.
      const A nb = static_cast<A>(k);
      const A inv_nb = A(1) / nb;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A s = A(0);
#pragma unroll
        for (int u = 0; u < ROWS; ++u) s += v[u][j];  // invalid rows hold 0
        const A gm = s * inv_nb;
        A q = A(0);
#pragma unroll
        for (int u = 0; u < ROWS; ++u) {
          if (u < k) {
            const A d = v[u][j] - gm;
            q += d * d;
          }
        }
        A n_c = n;
        welford_merge<A>(n_c, mean[j], m2[j], nb, gm, q);
      }
      n += nb;
    }
  }

  // Block merge over ty. Shared layout: s_mean[(ty * VEC + j) * TX + tx], same for s_m2; s_n[ty * TX + tx].
  const int nthreads = TX * TY;
  A* s_mean = reinterpret_cast<A*>(fr_dyn_smem);
  A* s_m2 = s_mean + nthreads * VEC;
  A* s_n = s_m2 + nthreads * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_mean[(ty * VEC + j) * TX + tx] = mean[j];
    s_m2[(ty * VEC + j) * TX + tx] = m2[j];
  }
  s_n[ty * TX + tx] = n;
  __syncthreads();
  // Level s: threads ty < s merge row ty + s into their registers and publish the result at row ty.
  // Reads (rows s .. 2s-1) and writes (rows 0 .. s-1) of one level never overlap.
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int o = ty + s;
      const A nb = s_n[o * TX + tx];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        A n_c = n;
        welford_merge<A>(n_c, mean[j], m2[j], nb, s_mean[(o * VEC + j) * TX + tx], s_m2[(o * VEC + j) * TX + tx]);
      }
      n += nb;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s_mean[(ty * VEC + j) * TX + tx] = mean[j];
        s_m2[(ty * VEC + j) * TX + tx] = m2[j];
      }
      s_n[ty * TX + tx] = n;
    }
    __syncthreads();
  }

  if (ty == 0 && c_ok) {
    double* out = partials + p * 3 * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const int64_t c = c0 + j;
      out[c] = static_cast<double>(n);
      out[C + c] = static_cast<double>(mean[j]) + static_cast<double>(shift[j]);
      out[2 * C + c] = static_cast<double>(m2[j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Pass 2 of both reductions: out[k * C + c] = sum over p of partials[(p * K + k) * C + c].
// Block (kPartialsTX, kPartialsTY), grid (ceil(C / kPartialsTX), K). Thread ty sums p = ty, ty + TY, ...
// in order, then a fixed shared-memory tree over ty: deterministic.
template <typename S>
__global__ void __launch_bounds__(kBlockThreads)
    reduce_partials_kernel(const S* __restrict__ partials, const int64_t P, const int K, const int64_t C,
                           S* __restrict__ out) {
  __shared__ S buf[kPartialsTY][kPartialsTX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kPartialsTX + tx;
  const int k = blockIdx.y;
  S acc = S(0);
  if (c < C) {
    const S* src = partials + static_cast<int64_t>(k) * C + c;
    const int64_t stride = static_cast<int64_t>(K) * C;
#pragma unroll 4
    for (int64_t p = ty; p < P; p += kPartialsTY) acc += src[p * stride];
  }
  buf[ty][tx] = acc;
  __syncthreads();
#pragma unroll
  for (int s = kPartialsTY / 2; s > 0; s >>= 1) {
    if (ty < s) buf[ty][tx] += buf[ty + s][tx];
    __syncthreads();
  }
  if (ty == 0 && c < C) out[static_cast<int64_t>(k) * C + c] = buf[0][tx];
}

// Pass 2 of bn_stats: stats[:, c] = the Chan merge of the P partials (count, mean, m2) of channel c.
// Block (kPartialsTX, kPartialsTY), grid ceil(C / kPartialsTX). Thread ty merges p = ty, ty + TY, ... in
// order, then a fixed shared-memory tree over ty (as the statistics kernel's block merge): deterministic.
__global__ void __launch_bounds__(kBlockThreads)
    merge_stats_partials_kernel(const double* __restrict__ partials, const int64_t P, const int64_t C,
                                double* __restrict__ stats) {
  __shared__ double s_n[kPartialsTY][kPartialsTX];
  __shared__ double s_mean[kPartialsTY][kPartialsTX];
  __shared__ double s_m2[kPartialsTY][kPartialsTX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kPartialsTX + tx;
  double n = 0.0, mean = 0.0, m2 = 0.0;
  if (c < C) {
    // kBatch partials loaded before they are merged: the loads overlap, instead of each waiting behind the
    // previous merge's division (the CUTLASS fprop passes one partial per 128-row tile: thousands). Same order.
    constexpr int kBatch = 8;
    for (int64_t p0 = ty; p0 < P; p0 += kBatch * kPartialsTY) {
      double bn[kBatch], bmean[kBatch], bm2[kBatch];
#pragma unroll
      for (int u = 0; u < kBatch; ++u) {
        const int64_t p = p0 + static_cast<int64_t>(u) * kPartialsTY;
        const double* q = partials + p * 3 * C + c;
        const bool in = p < P;  // an absent partial is the empty one (count 0): merging it changes nothing
        bn[u] = in ? q[0] : 0.0;
        bmean[u] = in ? q[C] : 0.0;
        bm2[u] = in ? q[2 * C] : 0.0;
      }
#pragma unroll
      for (int u = 0; u < kBatch; ++u) welford_merge<double>(n, mean, m2, bn[u], bmean[u], bm2[u]);
    }
  }
  s_n[ty][tx] = n;
  s_mean[ty][tx] = mean;
  s_m2[ty][tx] = m2;
  __syncthreads();
#pragma unroll
  for (int s = kPartialsTY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      welford_merge<double>(n, mean, m2, s_n[ty + s][tx], s_mean[ty + s][tx], s_m2[ty + s][tx]);
      s_n[ty][tx] = n;
      s_mean[ty][tx] = mean;
      s_m2[ty][tx] = m2;
    }
    __syncthreads();
  }
  if (ty == 0 && c < C) {
    stats[c] = n;
    stats[C + c] = mean;
    stats[2 * C + c] = m2;
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_finalize: one thread per channel. stats is contiguous double [3, C]. Running buffers (both or neither,
// contiguous, of type R) are read, updated in double and stored back. The cumulative-average factor
// 1 / num_batches_tracked is read on the device (no host sync; CUDA-graph safe).
template <typename R, typename O>
__global__ void __launch_bounds__(kBlockThreads)
    bn_finalize_kernel(const double* __restrict__ stats, const int64_t C, R* __restrict__ running_mean,
                       R* __restrict__ running_var, const int64_t* __restrict__ num_batches_tracked,
                       const bool has_momentum, const double momentum, const double eps, O* __restrict__ mean_out,
                       O* __restrict__ invstd_out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double n = stats[c];
  double mean, var;
  stats_to_mean_var(n, stats[C + c], stats[2 * C + c], &mean, &var);
  const double invstd = 1.0 / sqrt(var + eps);
  if (running_mean != nullptr && n > 0.0) {  // a channel nobody saw keeps its buffers
    const double factor = has_momentum ? momentum : 1.0 / static_cast<double>(num_batches_tracked[0]);
    running_mean[c] = static_cast<R>(running_update(static_cast<double>(running_mean[c]), mean, factor));
    running_var[c] =
        static_cast<R>(running_update(static_cast<double>(running_var[c]), var * n / (n - 1.0), factor));
  }
  mean_out[c] = static_cast<O>(mean);
  invstd_out[c] = static_cast<O>(invstd);
}

// ---------------------------------------------------------------------------------------------------------
// bn_act: y = relu?(bn_affine(x, mean, scale, bias) [+ residual]). residual may be nullptr. Grid-stride over
// rows along gridDim.y * TY.
template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bn_act_kernel(const T* __restrict__ x, const Layout lx, const T* __restrict__ residual, const Layout lr,
                  T* __restrict__ y, const Layout ly, const A* __restrict__ mean, const A* __restrict__ invstd,
                  const A* __restrict__ weight, const A* __restrict__ bias, const bool relu, const int64_t M) {
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= lx.C) return;  // no block-level synchronisation in this kernel
  ChannelConsts<A, VEC> cc;
  cc.load(mean, invstd, weight, bias, c0, true);
  const T* xc = x + c0 * lx.s_c;
  const T* rc = residual != nullptr ? residual + c0 * lr.s_c : nullptr;
  T* yc = y + c0 * ly.s_c;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  RowCursor cur(m, step, lx.HW);
  for (; m < M; m += step) {
    A xv[VEC], z[VEC];
    load_channels<T, VEC>(xc + cur.offset(lx), xv);
#pragma unroll
    for (int j = 0; j < VEC; ++j) z[j] = bn_affine<A>(xv[j], cc.mean[j], cc.scale[j], cc.beta[j]);
    if (rc != nullptr) {
      A rv[VEC];
      load_channels<T, VEC>(rc + cur.offset(lr), rv);
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] += rv[j];
    }
    if (relu) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) z[j] = relu_nan<A>(z[j]);
    }
    // The rows_merged form of the same offset: with cur.offset alone nvcc splits the 16-byte store into 2-byte
    // ones (checked in the PTX; scripts/check_cuda_compile.sh checks the SASS).
    store_channels<T, VEC>(yc + (ly.rows_merged ? m * ly.s_hw : cur.offset(ly)), z);
    cur.advance(lx.HW);
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_backward_reduce, pass 1: partials[(p * 2 + k) * C + c], k = (sum dz, sum dz * xhat), in A.
// out may be nullptr (mask recomputed from x); it is read only when relu. Dynamic shared memory:
// 2 * VEC * kBlockThreads * sizeof(A).
template <typename T, typename A, int VEC, int ROWS>
__global__ void __launch_bounds__(kBlockThreads, kBackwardMinBlocksPerSM)
    bn_backward_reduce_partial_kernel(const T* __restrict__ grad_out, const Layout ldy, const T* __restrict__ x,
                                      const Layout lx, const T* __restrict__ out, const Layout lo,
                                      const A* __restrict__ mean, const A* __restrict__ invstd,
                                      const A* __restrict__ weight, const A* __restrict__ bias, const bool relu,
                                      const int64_t M, const int64_t rows_per_chunk, A* __restrict__ partials) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int TX = blockDim.x, TY = blockDim.y;
  const int64_t C = lx.C;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * TX + tx) * VEC;
  const bool c_ok = c0 < C;
  const int64_t p = blockIdx.y;
  const int64_t r0 = p * rows_per_chunk;
  const int64_t r1 = r0 + rows_per_chunk < M ? r0 + rows_per_chunk : M;
  const bool use_out = relu && out != nullptr;

  A s_dz[VEC], s_dzx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) s_dz[j] = s_dzx[j] = A(0);

  if (c_ok) {
    ChannelConsts<A, VEC> cc;
    cc.load(mean, invstd, weight, bias, c0, true);
    const T* dyc = grad_out + c0 * ldy.s_c;
    const T* xc = x + c0 * lx.s_c;
    const T* oc = use_out ? out + c0 * lo.s_c : nullptr;
    RowCursor cur(r0 + ty, TY, lx.HW);
    for (int64_t base = r0 + ty; base < r1; base += static_cast<int64_t>(ROWS) * TY) {
      A g[ROWS][VEC], xv[ROWS][VEC], ov[ROWS][VEC];
      bool ok[ROWS];
#pragma unroll
      for (int u = 0; u < ROWS; ++u) {
        ok[u] = base + static_cast<int64_t>(u) * TY < r1;
        if (ok[u]) {
          load_channels<T, VEC>(dyc + cur.offset(ldy), g[u]);
          load_channels<T, VEC>(xc + cur.offset(lx), xv[u]);
          if (use_out) {
            load_channels<T, VEC>(oc + cur.offset(lo), ov[u]);
          } else {
#pragma unroll
            for (int j = 0; j < VEC; ++j) ov[u][j] = A(0);
          }
        }
        cur.advance(lx.HW);
      }
#pragma unroll
      for (int u = 0; u < ROWS; ++u) {
        if (!ok[u]) continue;  // invalid rows must not contribute (0 * inf would be NaN)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          A dz, xhat;
          dz_xhat<A>(g[u][j], xv[u][j], ov[u][j], relu, use_out, cc.mean[j], cc.invstd[j], cc.scale[j],
                     cc.beta[j], &dz, &xhat);
          s_dz[j] += dz;
          s_dzx[j] += dz * xhat;
        }
      }
    }
  }

  // Block sum over ty. Shared layout: s_a[(ty * VEC + j) * TX + tx], s_b likewise.
  const int nthreads = TX * TY;
  A* s_a = reinterpret_cast<A*>(fr_dyn_smem);
  A* s_b = s_a + nthreads * VEC;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    s_a[(ty * VEC + j) * TX + tx] = s_dz[j];
    s_b[(ty * VEC + j) * TX + tx] = s_dzx[j];
  }
  __syncthreads();
  for (int s = TY / 2; s > 0; s >>= 1) {
    if (ty < s) {
      const int o = ty + s;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        s_dz[j] += s_a[(o * VEC + j) * TX + tx];
        s_dzx[j] += s_b[(o * VEC + j) * TX + tx];
        s_a[(ty * VEC + j) * TX + tx] = s_dz[j];
        s_b[(ty * VEC + j) * TX + tx] = s_dzx[j];
      }
    }
    __syncthreads();
  }

  if (ty == 0 && c_ok) {
    A* dst = partials + p * 2 * C;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dst[c0 + j] = s_dz[j];
      dst[C + c0 + j] = s_dzx[j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_backward_elemt: dx = bn_grad_input_train(dz, xhat, scale, sums[0]/count, sums[1]/count) when sums
// (A [2, C], contiguous) and count (double [C]) are given, else scale * dz. dz is stored when dz_out != nullptr.
template <typename T, typename A, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bn_backward_elemt_kernel(const T* __restrict__ grad_out, const Layout ldy, const T* __restrict__ x,
                             const Layout lx, const T* __restrict__ out, const Layout lo,
                             const A* __restrict__ mean, const A* __restrict__ invstd, const A* __restrict__ weight,
                             const A* __restrict__ bias, const A* __restrict__ sums,
                             const double* __restrict__ count, const bool relu, T* __restrict__ dx,
                             const Layout ldx, T* __restrict__ dz_out, const Layout ldz, const int64_t M) {
  const int64_t C = lx.C;
  const int64_t c0 = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (c0 >= C) return;  // no block-level synchronisation in this kernel
  const bool use_out = relu && out != nullptr;
  const bool batch_stats = sums != nullptr;
  ChannelConsts<A, VEC> cc;
  cc.load(mean, invstd, weight, bias, c0, true);
  A mean_dz[VEC], mean_dzx[VEC];
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    if (batch_stats) {
      const A inv_n = static_cast<A>(1.0 / count[c0 + j]);  // as the CPU: 1/count in double, then A
      mean_dz[j] = sums[c0 + j] * inv_n;
      mean_dzx[j] = sums[C + c0 + j] * inv_n;
    } else {
      mean_dz[j] = mean_dzx[j] = A(0);
    }
  }
  const T* dyc = grad_out + c0 * ldy.s_c;
  const T* xc = x + c0 * lx.s_c;
  const T* oc = use_out ? out + c0 * lo.s_c : nullptr;
  T* dxc = dx + c0 * ldx.s_c;
  T* dzc = dz_out != nullptr ? dz_out + c0 * ldz.s_c : nullptr;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  int64_t m = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  RowCursor cur(m, step, lx.HW);
  for (; m < M; m += step) {
    A g[VEC], xv[VEC], ov[VEC];
    load_channels<T, VEC>(dyc + cur.offset(ldy), g);
    load_channels<T, VEC>(xc + cur.offset(lx), xv);
    if (use_out) {
      load_channels<T, VEC>(oc + cur.offset(lo), ov);
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) ov[j] = A(0);
    }
    A gx[VEC], dzv[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      A xhat;
      dz_xhat<A>(g[j], xv[j], ov[j], relu, use_out, cc.mean[j], cc.invstd[j], cc.scale[j], cc.beta[j], &dzv[j],
                 &xhat);
      gx[j] = batch_stats ? bn_grad_input_train<A>(dzv[j], xhat, cc.scale[j], mean_dz[j], mean_dzx[j])
                          : cc.scale[j] * dzv[j];
    }
    // As in bn_act: the rows_merged form keeps both stores 16-byte wide.
    store_channels<T, VEC>(dxc + (ldx.rows_merged ? m * ldx.s_hw : cur.offset(ldx)), gx);
    if (dzc != nullptr) store_channels<T, VEC>(dzc + (ldz.rows_merged ? m * ldz.s_hw : cur.offset(ldz)), dzv);
    cur.advance(lx.HW);
  }
}

// ---------------------------------------------------------------------------------------------------------
// bn_prologue_half: the CUTLASS convolutions' fp16 prologue vectors (bn_math.h, prologue_alpha). One block:
// each thread computes the (scale, shift) of channels tid, tid + kBlockThreads, ... and their amax; a
// shared-memory tree (fixed pairing) reduces the amax, thread 0's result is the block's alpha; then each
// thread writes its channels' scale / alpha and shift / alpha rounded to fp16. weight / bias may be nullptr.
// ResNet's C is at most 2048: 8 channels per thread, a few microseconds, one launch instead of the ~16 ATen
// ops of the same formula.
__global__ void __launch_bounds__(kBlockThreads)
    bn_prologue_half_kernel(const float* __restrict__ mean, const float* __restrict__ invstd,
                            const float* __restrict__ weight, const float* __restrict__ bias, const int64_t C,
                            __half* __restrict__ scale_out, __half* __restrict__ shift_out,
                            float* __restrict__ alpha_out) {
  __shared__ float amax[kBlockThreads];
  const int tid = static_cast<int>(threadIdx.x);
  float m = 0.0f;
  for (int64_t c = tid; c < C; c += kBlockThreads) {
    float scale, shift;
    prologue_scale_shift(mean[c], invstd[c], weight != nullptr ? weight[c] : 1.0f, bias != nullptr ? bias[c] : 0.0f,
                         &scale, &shift);
    m = prologue_amax(m, scale, shift);
  }
  amax[tid] = m;
  __syncthreads();
  for (int s = kBlockThreads / 2; s > 0; s >>= 1) {
    if (tid < s) amax[tid] = prologue_amax(amax[tid], amax[tid + s], 0.0f);
    __syncthreads();
  }
  const float alpha = prologue_alpha(amax[0]);
  const float inv_alpha = 1.0f / alpha;  // exact: a power of two (or NaN / 0 for NaN / inf alpha)
  for (int64_t c = tid; c < C; c += kBlockThreads) {
    float scale, shift;
    prologue_scale_shift(mean[c], invstd[c], weight != nullptr ? weight[c] : 1.0f, bias != nullptr ? bias[c] : 0.0f,
                         &scale, &shift);
    scale_out[c] = __float2half_rn(scale * inv_alpha);
    shift_out[c] = __float2half_rn(shift * inv_alpha);
  }
  if (tid == 0) alpha_out[0] = alpha;
}

}  // namespace cuda_bn
}  // namespace fused_resnet
