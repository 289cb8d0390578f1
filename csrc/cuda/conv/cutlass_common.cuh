// The host side shared by the CUTLASS instantiations (each op's header, <op>.cuh, names its CUTLASS kernel
// type as a template over the element type; one .cu per (op, element type) instantiates it): ConvDType ->
// CUTLASS element, ConvShape -> cutlass::conv::Conv2dProblemSize, the support query and one launch.
// Needs the CUTLASS include dir (setup.py takes it from the nvidia-cutlass wheel); compiled by plain nvcc,
// no torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <type_traits>

#include "cutlass/conv/conv2d_problem_size.h"
#include "cutlass/cutlass.h"
#include "cutlass/device_kernel.h"
#include "cutlass/layout/tensor.h"
#include "cutlass/numeric_types.h"
#include "cuda/conv/conv_launch.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

template <ConvDType T>
struct ElementOf;
template <>
struct ElementOf<ConvDType::kHalf> {
  using type = cutlass::half_t;
};
template <>
struct ElementOf<ConvDType::kBFloat16> {
  using type = cutlass::bfloat16_t;
};
template <ConvDType T>
using Element = typename ElementOf<T>::type;

// The scale / shift element of the prologue, for both activation types (conv_launch.h).
using ElementScaleBias = cutlass::half_t;

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

// Packed NHWC layouts of the three tensors of a convolution (KRSC for the filter).
inline cutlass::layout::TensorNHWC layout_input(const ConvShape& s) {
  return cutlass::layout::TensorNHWC::packed({s.N, s.H, s.W, s.C});
}
inline cutlass::layout::TensorNHWC layout_filter(const ConvShape& s) {
  return cutlass::layout::TensorNHWC::packed({s.K, s.R, s.S, s.C});
}
inline cutlass::layout::TensorNHWC layout_output(const ConvShape& s) {
  return cutlass::layout::TensorNHWC::packed({s.N, s.P, s.Q, s.K});
}

// CUTLASS's TensorRefs are non-const; the kernels only read their inputs.
template <typename TensorRef>
TensorRef input_ref(const void* p, typename TensorRef::Layout layout) {
  return TensorRef(const_cast<typename TensorRef::Element*>(static_cast<const typename TensorRef::Element*>(p)),
                   layout);
}

// Whether `Operation` takes `args` (with a workspace only when `workspace_ok`), within CUTLASS's limits on the
// extents (conv_launch.h, shape_fits).
template <typename Operation>
bool operation_supports(const typename Operation::Arguments& args, bool workspace_ok) {
  const cutlass::conv::Conv2dProblemSize& p = args.problem_size;
  const ConvShape s{p.N, p.H, p.W, p.C, p.K, p.R, p.S, p.P, p.Q, p.pad_h, p.pad_w, p.stride_h, p.stride_w,
                    p.dilation_h, p.dilation_w};
  return shape_fits(s) && Operation::can_implement(args) == cutlass::Status::kSuccess &&
         (workspace_ok || Operation::get_workspace_size(args) == 0);
}

// The __global__ kernel of a CUTLASS 2.x device operator (ImplicitGemmConvolution names it UnderlyingKernel,
// ImplicitGemmConvolutionFusion ImplicitGemmFusionKernel).
template <typename Operation, typename = void>
struct KernelOf {
  using type = typename Operation::UnderlyingKernel;
};
template <typename Operation>
struct KernelOf<Operation, std::void_t<typename Operation::ImplicitGemmFusionKernel>> {
  using type = typename Operation::ImplicitGemmFusionKernel;
};

// Why a CUTLASS launch failed. Its initialize() / run() read the CUDA error themselves (cudaGetLastError,
// which clears it) and return only kErrorInternal, so the cause is asked again of the kernel: no kernel image
// for this GPU (the extension was built for another architecture: TORCH_CUDA_ARCH_LIST) or an invalid device
// function; otherwise `otherwise`.
template <typename Operation>
cudaError_t launch_failure(cudaError_t otherwise) {
  cudaFuncAttributes attributes;
  const cudaError_t err = cudaFuncGetAttributes(&attributes, cutlass::Kernel<typename KernelOf<Operation>::type>);
  if (err != cudaSuccess) return err;
  const cudaError_t pending = cudaGetLastError();
  return pending != cudaSuccess ? pending : otherwise;
}

// One launch: initialize() raises the dynamic shared-memory limit when the kernel needs more than 48 KiB and
// zeroes serial split-K's semaphores (cudaMemsetAsync on `stream`); run() launches.
template <typename Operation>
cudaError_t operation_run(const typename Operation::Arguments& args, void* workspace, cudaStream_t stream) {
  if (!operation_supports<Operation>(args, /*workspace_ok=*/true)) return cudaErrorNotSupported;
  if (Operation::get_workspace_size(args) != 0 && workspace == nullptr) return cudaErrorInvalidValue;
  Operation op;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) {
    return launch_failure<Operation>(cudaErrorInvalidConfiguration);
  }
  if (op.run(stream) != cutlass::Status::kSuccess) return launch_failure<Operation>(cudaErrorLaunchFailure);
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda_conv
}  // namespace fused_resnet
