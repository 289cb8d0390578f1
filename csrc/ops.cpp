// The one list of fused_resnet's compiled operators. Implementations register per device in
// csrc/cpu/*.cpp (CPU) and csrc/cuda/*_ops.cpp (CUDA); fake (meta) kernels and autograd live in Python
// (fused_resnet/ops/), so torch.compile sees every op without graph breaks.
//
// Contract (shared with the Triton and eager implementations, documented in fused_resnet/ops/batch_norm.py):
//   x, residual, out, grad_out: N,C,H,W; any dense or sliced layout whose H and W dims merge (others are
//   copied to their suggested memory format first); fp16, bf16, fp32 or fp64.
//   Per-channel tensors (mean, invstd, sums): fp32, or fp64 when x is fp64. stats and count: fp64.
//   weight / bias / running buffers: any floating dtype, read and accumulated in fp32 or better.
#include <Python.h>
#include <torch/library.h>

// A stub module init so that `import fused_resnet._C` loads the library and runs the registrations below.
// Two attributes say what was compiled in: WITH_CUDA (csrc/cuda) and WITH_CUTLASS (csrc/cuda/conv, the CUDA
// implementation of conv_fwd), set from the build's defines (setup.py).
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef FUSED_RESNET_WITH_CUDA
  const long with_cuda = 1;
#else
  const long with_cuda = 0;
#endif
#ifdef FUSED_RESNET_WITH_CUTLASS
  const long with_cutlass = 1;
#else
  const long with_cutlass = 0;
#endif
  if (PyModule_AddObject(module, "WITH_CUDA", PyBool_FromLong(with_cuda)) != 0 ||
      PyModule_AddObject(module, "WITH_CUTLASS", PyBool_FromLong(with_cutlass)) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
}

TORCH_LIBRARY(fused_resnet_C, m) {
  // Per-channel (count, mean, m2) as float64 [3, C], m2 = sum of squared deviations from the mean;
  // accumulated in fp32 (fp64 for fp64 x) as centred partials, Chan-merged in double in a fixed order.
  m.def("bn_stats(Tensor x) -> Tensor");
  // (mean, invstd) of `dtype` from stats; updates the running buffers in place when given
  // (factor = momentum, or 1 / num_batches_tracked when momentum is None; running_var is unbiased).
  m.def(
      "bn_finalize(Tensor stats, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
      "Tensor? num_batches_tracked, float? momentum, float eps, ScalarType dtype) -> (Tensor, Tensor)");
  // y = relu?(x * scale + shift [+ residual]) in x's dtype and layout.
  m.def(
      "bn_act(Tensor x, Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias, Tensor? residual, "
      "bool relu) -> Tensor");
  // [2, C]: (sum dz, sum dz * xhat). The ReLU mask is out > 0 when out is given, else recomputed from x.
  m.def(
      "bn_backward_reduce(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? bias, Tensor? out, bool relu) -> Tensor");
  // (grad_input, dz). With sums and count: the batch-statistics gradient; without: scale * dz.
  // dz (the gradient of a residual added before the ReLU) is written only when need_dz, else empty.
  m.def(
      "bn_backward_elemt(Tensor grad_out, Tensor x, Tensor mean, Tensor invstd, Tensor? weight, "
      "Tensor? bias, Tensor? out, Tensor? sums, Tensor? count, bool relu, bool need_dz) -> (Tensor, Tensor)");

  // The prologue vectors of the CUTLASS convolutions (common/bn_math.h, prologue_alpha): (scale / alpha,
  // shift / alpha) as fp16 [C] and alpha float32 [1], scale = invstd * weight, shift = bias - mean * scale,
  // alpha the smallest power of two >= 1 that brings max |scale|, |shift| under 16384. mean / invstd float32.
  m.def("bn_prologue_half(Tensor mean, Tensor invstd, Tensor? weight, Tensor? bias) -> (Tensor, Tensor, Tensor)");

  // The fused forward convolution (contract: fused_resnet/ops/conv.py; CPU: csrc/cpu/conv_cpu.cpp, ATen's
  // convolution around the BN kernels above; CUDA: csrc/cuda/conv/, CUTLASS, a subset of the arguments):
  //   a = relu_in?(bn(x)) with (mean, invstd, bn_weight, bn_bias) when mean is given, else x;
  //   y = conv2d(a, weight, stride, padding, dilation, groups), in x's dtype and suggested memory format;
  //   eval epilogue when bias, residual or relu_out is given: y = relu_out?(y + bias [+ residual]);
  //   stats: (count, mean, m2) float64 [3, K] of the stored y, as bn_stats(y), when `stats`, else empty [0].
  // mean / invstd: x's accumulation type (fp32, fp64 for fp64 x), given together.
  m.def(
      "conv_fwd(Tensor x, Tensor weight, Tensor? mean, Tensor? invstd, Tensor? bn_weight, Tensor? bn_bias, "
      "bool relu_in, Tensor? bias, Tensor? residual, bool relu_out, int[] stride, int[] padding, "
      "int[] dilation, int groups, bool stats) -> (Tensor, Tensor)");
  // conv_fwd's weight gradient, its input recomputed: dw = d/dw of sum(grad_out * conv2d(a, w)) with
  // a = relu_in?(bn(x)) as in conv_fwd (mean None: a = x); shape weight_size, in x's dtype and suggested
  // memory format. Deterministic on every implementation (no atomics; fixed summation order).
  m.def(
      "conv_wgrad(Tensor grad_out, Tensor x, int[] weight_size, Tensor? mean, Tensor? invstd, Tensor? bn_weight, "
      "Tensor? bn_bias, bool relu_in, int[] stride, int[] padding, int[] dilation, int groups) -> Tensor");
  // conv_fwd's input gradient (of the convolution's input a): dx of shape input_size, in grad_out's dtype and
  // suggested memory format.
  m.def(
      "conv_dgrad(Tensor grad_out, Tensor weight, int[] input_size, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> Tensor");
  // conv_dgrad followed by the prologue BatchNorm's ReLU mask and backward reduction (fused_resnet.ops.conv's
  // conv_dgrad_bn): x is the prologue's input (its shape is the convolution's input size), a = relu?(z) with
  // z = (x - mean) * bn_weight * invstd + bn_bias. Returns (dz, sums): dz = conv_dgrad * [z > 0] (no mask
  // when !relu) in x's dtype and suggested memory format, sums = (sum dz, sum dz * xhat) of x's accumulation
  // type, [2, C], xhat = (x - mean) * invstd, over the stored (rounded) dz.
  m.def(
      "conv_dgrad_bn(Tensor grad_out, Tensor weight, Tensor x, Tensor mean, Tensor invstd, Tensor? bn_weight, "
      "Tensor? bn_bias, bool relu, int[] stride, int[] padding, int[] dilation, int groups) -> (Tensor, Tensor)");
}
