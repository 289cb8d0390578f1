// The BN-apply + ReLU prologue transform for bf16 activations, which CUTLASS 2.x does not provide: its
// cutlass::conv::warp::FpropScaleBiasReluTransform / WgradScaleBiasReluTransform (conv/warp/
// scale_bias_relu_transform.h) are written for fp16 only (`fma.rn.f16x2.relu` on register pairs). The fusion
// mainloops (threadblock/implicit_gemm_{fprop,wgrad}_fusion_multistage.h) name those two class templates
// directly, with the warp's activation fragment type as the first argument, so a partial specialization for
// Array<bfloat16_t, N> fragments, declared before the kernel is instantiated, is what they use for bf16.
//
// What the specializations compute, per 16-bit lane of a 32-bit register pair (the pairing of activations,
// scales and shifts is CUTLASS's, unchanged: same fragments, same indexing as the fp16 transforms):
//   y = relu(float(x) * float(scale) + float(shift)), one fp32 fma, rounded once to bf16 (round to nearest);
//   y = 0 where x holds the out-of-bounds marker.
// - scale / shift stay fp16 (ElementScaleBias = half_t in the bf16 instantiations): the same shared-memory
//   and fragment layout as the fp16 kernels, and 11 significant bits for the per-channel shift instead of
//   bf16's 8. The arithmetic is fp32, then one rounding to the mma operand's bf16.
// - ReLU keeps NaN (as torch.relu does): y < 0 ? 0 : y.
// - The marker: the mainloops fill out-of-bounds shared memory with the 16-bit pattern 0x7eff
//   (cutlass::arch::OOB_NAN_F16, cp_async_nan) whatever the element type. In fp16 that is a NaN; in bf16 it
//   is the finite value 0x7eff = 1.6947e38, so input elements equal to exactly that value are read as
//   padding (0): in fprop a channel pair both of that value, in wgrad a single element. Activations of that
//   size overflow the BatchNorm statistics long before; documented, not checked.
// - fprop: CUTLASS's fp16 transform tests the whole 32-bit pair against the marker (C is even, so a pair is
//   in or out of bounds together); so does this one. wgrad: each lane separately (C * R * S may be odd).
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

#include "cutlass/arch/memory_sm80.h"
#include "cutlass/array.h"
#include "cutlass/conv/warp/scale_bias_relu_transform.h"
#include "cutlass/cutlass.h"
#include "cutlass/numeric_types.h"

namespace fused_resnet {
namespace cuda_conv {
namespace detail {

// relu(x * scale + shift) of the two bf16 lanes of `x`, with the two fp16 lanes of `scale` and `shift`.
CUTLASS_DEVICE
uint32_t bf16x2_scale_shift_relu(uint32_t x, uint32_t scale, uint32_t shift) {
  // bf16 -> fp32 is exact: the bf16 bits are the high half of the fp32 bits.
  const float x_lo = __uint_as_float(x << 16);
  const float x_hi = __uint_as_float(x & 0xffff0000u);
  const float s_lo = __half2float(__ushort_as_half(static_cast<unsigned short>(scale & 0xffffu)));
  const float s_hi = __half2float(__ushort_as_half(static_cast<unsigned short>(scale >> 16)));
  const float b_lo = __half2float(__ushort_as_half(static_cast<unsigned short>(shift & 0xffffu)));
  const float b_hi = __half2float(__ushort_as_half(static_cast<unsigned short>(shift >> 16)));
  float y_lo = fmaf(x_lo, s_lo, b_lo);
  float y_hi = fmaf(x_hi, s_hi, b_hi);
  y_lo = y_lo < 0.f ? 0.f : y_lo;
  y_hi = y_hi < 0.f ? 0.f : y_hi;
  uint32_t y = 0;
#if (defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 800))
  // d = {hi, lo}: the first source goes to the upper 16 bits. Round to nearest even, NaN stays NaN.
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(y) : "f"(y_hi), "f"(y_lo));
#else
  assert(0);  // the fusion mainloops are sm80+ (cp.async); never compiled for older device code
#endif
  return y;
}

}  // namespace detail
}  // namespace cuda_conv
}  // namespace fused_resnet

namespace cutlass {
namespace conv {
namespace warp {

// fprop: the activation operand A, pairs along the channel dimension (C % 2 == 0: both lanes of a pair are
// in bounds or neither). Same fragment walk as the fp16 primary template.
template <int N, typename FragmentScaleBias>
struct FpropScaleBiasReluTransform<Array<bfloat16_t, N, false>, FragmentScaleBias> {
  using FragmentActivations = Array<bfloat16_t, N, false>;
  static_assert(platform::is_same<typename FragmentScaleBias::Element, half_t>::value,
                "the bf16 prologue reads fp16 scale / shift pairs (ElementScaleBias = half_t)");
  static int const NumActivations = FragmentActivations::kElements;
  static int const MmaElements = 2;
  static int const MmaScaleBiasPair = 2;
  static int const MmaCols = 2;  // 16816: two columns of scale / shift pairs per fragment

  CUTLASS_DEVICE
  void operator()(FragmentActivations& activations, FragmentScaleBias const& scale_bias) {
    uint32_t* act = reinterpret_cast<uint32_t*>(&activations);
    uint32_t const* sb = reinterpret_cast<uint32_t const*>(&scale_bias);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < NumActivations / MmaElements; ++i) {
      // ScaleBiasOperand j = (i / 2) % 2 of the primary template: words 2j (scales) and 2j + 1 (shifts).
      const int j = (i / MmaScaleBiasPair) % MmaCols;
      const uint32_t x = act[i];
      const uint32_t y = ::fused_resnet::cuda_conv::detail::bf16x2_scale_shift_relu(x, sb[2 * j], sb[2 * j + 1]);
      act[i] = (x == cutlass::arch::OOB_NAN_F16x2) ? 0u : y;
    }
  }
};

// wgrad: the activation operand B; the two lanes of a pair are tested against the marker separately.
template <int N, typename FragmentScaleBias>
struct WgradScaleBiasReluTransform<Array<bfloat16_t, N, false>, FragmentScaleBias> {
  using FragmentActivations = Array<bfloat16_t, N, false>;
  // CUTLASS's wgrad mainloop hands the scale / shift fragment over as __half2 pairs.
  static_assert(platform::is_same<typename FragmentScaleBias::Element, __half2>::value,
                "the bf16 prologue reads fp16 scale / shift pairs (ElementScaleBias = half_t)");
  static int const NumActivations = FragmentActivations::kElements;
  static int const MmaElements = 2;
  static int const MmaRows = 2;  // 16816: two rows of activation pairs share one scale / shift pair

  CUTLASS_DEVICE
  void operator()(FragmentActivations& activations, FragmentScaleBias const& scale_bias) {
    uint32_t* act = reinterpret_cast<uint32_t*>(&activations);
    uint32_t const* sb = reinterpret_cast<uint32_t const*>(&scale_bias);
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < NumActivations / MmaElements; ++i) {
      // ScaleBiasOperand j = i / 2 of the primary template (Array<__half2, 2>): words 2j and 2j + 1.
      const int j = i / MmaRows;
      const uint32_t x = act[i];
      uint32_t y = ::fused_resnet::cuda_conv::detail::bf16x2_scale_shift_relu(x, sb[2 * j], sb[2 * j + 1]);
      if ((x & 0xffffu) == cutlass::arch::OOB_NAN_F16) y &= 0xffff0000u;
      if ((x >> 16) == cutlass::arch::OOB_NAN_F16) y &= 0x0000ffffu;
      act[i] = y;
    }
  }
};

}  // namespace warp
}  // namespace conv
}  // namespace cutlass
