// The host side shared by the mainloop-fusion instantiations (one .cu per instantiation includes this and
// names its CUTLASS kernel type): ConvShape -> cutlass::conv::Conv2dProblemSize, the support checks, and one
// launch. Device code: CUTLASS 2.x's ImplicitGemmConvolutionFusion (include/cutlass/conv/kernel/
// default_conv2d_fprop_fusion.h and default_conv2d_wgrad_fusion.h, the scale-bias-ReLU mainloops of examples
// 25 and 26). Needs the CUTLASS include dir (setup.py takes it from the nvidia-cutlass wheel); compiled by
// plain nvcc, no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/conv/device/implicit_gemm_convolution_fusion.h"
#include "cutlass/cutlass.h"
#include "cutlass/layout/tensor.h"
#include "cuda/conv/conv_launch.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

inline bool shape_is_valid(const ConvShape& s) {
  return s.N > 0 && s.H > 0 && s.W > 0 && s.C > 0 && s.K > 0 && s.R > 0 && s.S > 0 && s.pad_h >= 0 &&
         s.pad_w >= 0 && s.stride_h > 0 && s.stride_w > 0 && s.dilation_h > 0 && s.dilation_w > 0 &&
         s.P == conv_out_extent(s.H, s.R, s.pad_h, s.stride_h, s.dilation_h) &&
         s.Q == conv_out_extent(s.W, s.S, s.pad_w, s.stride_w, s.dilation_w) && s.P > 0 && s.Q > 0;
}

// Cross-correlation (what torch's conv2d computes), symmetric padding. split_k_slices 1: one CTA sums the
// whole reduction of its tile, in a fixed order (the result does not depend on the grid); > 1: serial
// split-K (slices added in slice order through semaphores: deterministic too).
inline cutlass::conv::Conv2dProblemSize problem_size(const ConvShape& s, int split_k_slices = 1) {
  return cutlass::conv::Conv2dProblemSize(s.N, s.H, s.W, s.C, s.K, s.R, s.S, s.P, s.Q, s.pad_h, s.pad_w,
                                          s.stride_h, s.stride_w, s.dilation_h, s.dilation_w,
                                          cutlass::conv::Mode::kCrossCorrelation, split_k_slices,
                                          /*groups=*/1);
}

template <typename Operation>
typename Operation::Arguments fprop_fusion_arguments(const ConvShape& s, const void* x, const void* w,
                                                     const void* scale, const void* shift, void* y) {
  using K = typename Operation::ImplicitGemmFusionKernel;
  using ElementA = typename K::ElementA;
  using ElementB = typename K::ElementB;
  using ElementC = typename K::ElementC;
  using ElementScaleBias = typename K::ElementScaleBias;
  using Compute = typename Operation::ElementCompute;
  const cutlass::layout::TensorNHWC layout_x = cutlass::layout::TensorNHWC::packed({s.N, s.H, s.W, s.C});
  const cutlass::layout::TensorNHWC layout_w = cutlass::layout::TensorNHWC::packed({s.K, s.R, s.S, s.C});
  const cutlass::layout::TensorNHWC layout_y = cutlass::layout::TensorNHWC::packed({s.N, s.P, s.Q, s.K});
  // scale and shift: one row of C elements (RowMajor, leading dimension C).
  const cutlass::layout::RowMajor layout_v(s.C);
  ElementC* out = static_cast<ElementC*>(y);
  // CUTLASS's TensorRefs are non-const; the kernel only reads x, w, scale and shift.
  const typename K::TensorRefA ref_x(const_cast<ElementA*>(static_cast<const ElementA*>(x)), layout_x);
  const typename K::TensorRefB ref_w(const_cast<ElementB*>(static_cast<const ElementB*>(w)), layout_w);
  const typename K::TensorRefScaleBias ref_scale(
      const_cast<ElementScaleBias*>(static_cast<const ElementScaleBias*>(scale)), layout_v);
  const typename K::TensorRefScaleBias ref_shift(
      const_cast<ElementScaleBias*>(static_cast<const ElementScaleBias*>(shift)), layout_v);
  const typename K::TensorRefC ref_y(out, layout_y);
  // D = 1 * accumulator + 0 * C: beta == 0, so the epilogue never reads the source (C aliases D).
  return typename Operation::Arguments(problem_size(s), ref_x, ref_w, ref_scale, ref_shift, ref_y, ref_y,
                                       typename K::EpilogueOutputOp::Params(Compute(1), Compute(0)));
}

template <typename Operation>
bool fprop_fusion_supports(const ConvShape& s) {
  if (!shape_is_valid(s)) return false;
  const auto args = fprop_fusion_arguments<Operation>(s, nullptr, nullptr, nullptr, nullptr, nullptr);
  return Operation::can_implement(args) == cutlass::Status::kSuccess &&
         Operation::get_workspace_size(args) == 0;
}

template <typename Operation>
cudaError_t fprop_fusion_run(const ConvShape& s, const void* x, const void* w, const void* scale,
                             const void* shift, void* y, cudaStream_t stream) {
  if (!shape_is_valid(s)) return cudaErrorInvalidValue;
  const auto args = fprop_fusion_arguments<Operation>(s, x, w, scale, shift, y);
  if (Operation::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Operation::get_workspace_size(args) != 0) return cudaErrorNotSupported;  // no split-K: no workspace
  Operation op;
  // initialize() raises the kernel's dynamic shared-memory limit when it needs more than 48 KiB.
  if (op.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  }
  if (op.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

// wgrad: A = dy (NPQK), B = x (NHWC, transformed by scale / shift), C = D = dw (KRSC).
template <typename Operation>
typename Operation::Arguments wgrad_fusion_arguments(const ConvShape& s, int split_k_slices, const void* dy,
                                                     const void* x, const void* scale, const void* shift,
                                                     void* dw) {
  using K = typename Operation::ImplicitGemmFusionKernel;
  using ElementA = typename K::ElementA;
  using ElementB = typename K::ElementB;
  using ElementC = typename K::ElementC;
  using ElementScaleBias = typename K::ElementScaleBias;
  using Compute = typename Operation::ElementCompute;
  const cutlass::layout::TensorNHWC layout_dy = cutlass::layout::TensorNHWC::packed({s.N, s.P, s.Q, s.K});
  const cutlass::layout::TensorNHWC layout_x = cutlass::layout::TensorNHWC::packed({s.N, s.H, s.W, s.C});
  const cutlass::layout::TensorNHWC layout_dw = cutlass::layout::TensorNHWC::packed({s.K, s.R, s.S, s.C});
  const cutlass::layout::RowMajor layout_v(s.C);
  ElementC* out = static_cast<ElementC*>(dw);
  const typename K::TensorRefA ref_dy(const_cast<ElementA*>(static_cast<const ElementA*>(dy)), layout_dy);
  const typename K::TensorRefB ref_x(const_cast<ElementB*>(static_cast<const ElementB*>(x)), layout_x);
  const typename K::TensorRefScaleBias ref_scale(
      const_cast<ElementScaleBias*>(static_cast<const ElementScaleBias*>(scale)), layout_v);
  const typename K::TensorRefScaleBias ref_shift(
      const_cast<ElementScaleBias*>(static_cast<const ElementScaleBias*>(shift)), layout_v);
  const typename K::TensorRefC ref_dw(out, layout_dw);
  // beta = 0: slice 0 (or the only slice) overwrites dw; serial split-K's later slices add to it themselves.
  return typename Operation::Arguments(problem_size(s, split_k_slices), ref_dy, ref_x, ref_scale, ref_shift, ref_dw,
                                       ref_dw, typename K::EpilogueOutputOp::Params(Compute(1), Compute(0)),
                                       cutlass::conv::SplitKMode::kSerial);
}

template <typename Operation>
bool wgrad_fusion_supports(const ConvShape& s, int split_k_slices) {
  if (!shape_is_valid(s) || split_k_slices < 1) return false;
  const auto args = wgrad_fusion_arguments<Operation>(s, split_k_slices, nullptr, nullptr, nullptr, nullptr, nullptr);
  return Operation::can_implement(args) == cutlass::Status::kSuccess;
}

template <typename Operation>
size_t wgrad_fusion_workspace_size(const ConvShape& s, int split_k_slices) {
  if (!shape_is_valid(s) || split_k_slices < 1) return 0;
  return Operation::get_workspace_size(
      wgrad_fusion_arguments<Operation>(s, split_k_slices, nullptr, nullptr, nullptr, nullptr, nullptr));
}

template <typename Operation>
cudaError_t wgrad_fusion_run(const ConvShape& s, int split_k_slices, const void* dy, const void* x,
                             const void* scale, const void* shift, void* dw, void* workspace,
                             cudaStream_t stream) {
  if (!shape_is_valid(s) || split_k_slices < 1) return cudaErrorInvalidValue;
  const auto args = wgrad_fusion_arguments<Operation>(s, split_k_slices, dy, x, scale, shift, dw);
  if (Operation::can_implement(args) != cutlass::Status::kSuccess) return cudaErrorNotSupported;
  if (Operation::get_workspace_size(args) != 0 && workspace == nullptr) return cudaErrorInvalidValue;
  Operation op;
  // initialize() zeroes the semaphores (cudaMemsetAsync on stream) and raises the shared-memory limit.
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorInvalidConfiguration;
  }
  if (op.run(stream) != cutlass::Status::kSuccess) {
    const cudaError_t err = cudaGetLastError();
    return err != cudaSuccess ? err : cudaErrorLaunchFailure;
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda_conv
}  // namespace fused_resnet
