"""The compiled fused forward convolution, fused_resnet_C::conv_fwd (csrc/ops.cpp), and the convolution
implementation "cuda" of fused_resnet.dispatch that runs it (fused_resnet/ops/conv_compiled.py).

On this CPU the op runs its C++ twin (csrc/cpu/conv_cpu.cpp: ATen's convolution around the C++ BatchNorm
kernels), the same schema the CUTLASS kernels (csrc/cuda/conv/) implement on CUDA. Checked here: opcheck of
the schema and fake; the contract (prologue, eval epilogue, statistics, output layout) against a float64
reference by the 2x-eager rule over the ResNet shapes of tests/test_conv.py, both memory formats; the
conv_stats custom op with impl="cuda" forward and backward; dispatch's rules for "cuda" (never chosen on CPU,
not in the automatic choice until GPU-validated). The CUTLASS kernels themselves are only compile-checked
(tests/test_build.py); their GPU parity is for a CUDA machine (skipped here).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fused_resnet import backends, dispatch
from fused_resnet.ops import conv_compiled
from helpers import StandInCudaTensor, assert_2x_eager

pytestmark = pytest.mark.skipif(not backends.extension_loaded(), reason="needs the compiled extension")

# name: (N, C, H, W, K, R, S, stride, padding, dilation, groups), as tests/test_conv.py, plus CUTLASS-aligned ones.
CASES = {
    "1x1": (2, 65, 5, 7, 33, 1, 1, 1, 0, 1, 1),
    "1x1_s2_odd": (1, 24, 9, 7, 40, 1, 1, 2, 0, 1, 1),
    "3x3": (2, 16, 6, 5, 24, 3, 3, 1, 1, 1, 1),
    "3x3_s2_odd": (1, 20, 9, 7, 17, 3, 3, 2, 1, 1, 1),
    "3x3_dil2": (2, 16, 9, 8, 16, 3, 3, 1, 2, 2, 1),
    "3x3_groups": (2, 32, 6, 6, 32, 3, 3, 1, 1, 1, 4),
    "7x7_s2_stem": (1, 3, 17, 15, 16, 7, 7, 2, 3, 1, 1),
    "1x1_map": (3, 65, 1, 1, 20, 1, 1, 1, 0, 1, 1),
    "3x3_batch1_c8": (1, 8, 7, 9, 16, 3, 3, 1, 1, 1, 1),
    # Several CUTLASS tiles (128 x 128): M = 4 * 12 * 12 = 576 rows (5 row tiles, the last partial), K = 136
    # (2 column tiles, the second of 8 channels): the statistics epilogue's per-tile partials and their merge.
    "3x3_tiles": (4, 16, 12, 12, 136, 3, 3, 1, 1, 1, 1),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _inputs(case, dtype, memory_format, seed=0):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1.5 + 0.4
    w = torch.randn(K, C // groups, R, S, generator=g, dtype=torch.float64) / (C // groups * R * S) ** 0.5
    mean = torch.randn(C, generator=g, dtype=torch.float64) * 0.3 + 0.4
    invstd = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bn_w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    # Shifts above 0: relu(0 * scale + shift) > 0, so padding must be zero after the transform, not before.
    bn_b = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    bias = torch.randn(K, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    fmt = dict(memory_format=memory_format)
    return dict(x=x.to(dtype).contiguous(**fmt), w=w.to(dtype).contiguous(**fmt), mean=mean.to(acc),
                invstd=invstd.to(acc), bn_w=bn_w.to(acc), bn_b=bn_b.to(acc), bias=bias.to(acc))


def _eager(t, case, prologue, eval_epilogue, residual):
    """The contract in eager PyTorch ops: the BatchNorm apply in the accumulation dtype, the convolution and
    epilogue in x's dtype (float64 inputs give the reference)."""
    *_, stride, padding, dilation, groups = CASES[case]
    x = t["x"]
    a = x
    if prologue:
        scale = t["invstd"] * t["bn_w"]
        a = torch.relu((x.to(scale.dtype) - t["mean"][:, None, None]) * scale[:, None, None]
                       + t["bn_b"][:, None, None]).to(x.dtype)
    y = F.conv2d(a, t["w"], None, stride, padding, dilation, groups)
    if eval_epilogue:
        z = y.to(t["bias"].dtype) + t["bias"][:, None, None]
        if residual is not None:
            z = z + residual.to(z.dtype)
        y = torch.relu(z).to(x.dtype)
    var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
    return y, mean, var * (y.shape[0] * y.shape[2] * y.shape[3])


def _compiled(t, case, prologue, eval_epilogue, residual, stats=True):
    *_, stride, padding, dilation, groups = CASES[case]
    p = (t["mean"], t["invstd"], t["bn_w"], t["bn_b"], True) if prologue else None
    fwd = dispatch.conv_functions("cuda", "cpu").fwd  # asked for explicitly: the C++ twin on CPU tensors
    return fwd(t["x"], t["w"], [stride] * 2, [padding] * 2, [dilation] * 2, groups, prologue=p, stats=stats,
               bias=t["bias"] if eval_epilogue else None, residual=residual, relu=eval_epilogue)


def _residual(t, case, dtype, memory_format):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = CASES[case]
    ho = (H + 2 * padding - dilation * (R - 1) - 1) // stride + 1
    wo = (W + 2 * padding - dilation * (S - 1) - 1) // stride + 1
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, K, ho, wo, generator=g, dtype=torch.float64).to(dtype).contiguous(memory_format=memory_format)


def _half_conv_on_cpu(dtype) -> bool:
    try:
        F.conv2d(torch.ones(1, 1, 2, 2, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype))
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("variant", ["bn_relu_conv_stats", "conv_stats", "conv_bias_residual_relu"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_twin_matches_float64(case, dtype, memory_format, variant):
    """Output (in x's memory format) and statistics by the 2x-eager rule against float64."""
    if not _half_conv_on_cpu(dtype):
        pytest.skip(f"this torch has no CPU convolution in {dtype}")
    prologue, eval_epilogue = variant == "bn_relu_conv_stats", variant == "conv_bias_residual_relu"
    t = _inputs(case, dtype, memory_format)
    t64 = {k: v.double() for k, v in t.items()}
    res = _residual(t, case, dtype, memory_format) if eval_epilogue else None
    ref = _eager(t64, case, prologue, eval_epilogue, None if res is None else res.double())
    eager = _eager(t, case, prologue, eval_epilogue, res)
    y, stats = _compiled(t, case, prologue, eval_epilogue, res)
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format), "x's dtype and memory format"
    assert stats.dtype == torch.float64 and stats.shape == (3, y.shape[1])
    assert torch.all(stats[0] == y.shape[0] * y.shape[2] * y.shape[3]), "count"
    floor = FLOORS[dtype]
    assert_2x_eager(f"{case} y", y, eager[0], ref[0], dtype, floor)
    assert_2x_eager(f"{case} mean", stats[1], eager[1], ref[1], dtype, floor)
    assert_2x_eager(f"{case} m2", stats[2], eager[2], ref[2], dtype, floor)


def test_float64_is_exact_to_rounding():
    t = _inputs("3x3_s2_odd", torch.float64, torch.channels_last)
    ref = _eager(t, "3x3_s2_odd", True, False, None)
    y, stats = _compiled(t, "3x3_s2_odd", True, False, None)
    torch.testing.assert_close(y, ref[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[1], ref[1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats[2], ref[2], rtol=1e-10, atol=1e-12)
    y2, none = _compiled(t, "3x3_s2_odd", True, False, None, stats=False)
    assert none is None and torch.equal(y2, y)


def _wgrad_eager(t, grad, case, prologue):
    """dw of sum(grad * conv2d(a, w)) in eager ops, a = the prologue's output in x's dtype (float64: reference)."""
    *_, stride, padding, dilation, groups = CASES[case]
    x = t["x"]
    a = x
    if prologue:
        scale = t["invstd"] * t["bn_w"]
        a = torch.relu((x.to(scale.dtype) - t["mean"][:, None, None]) * scale[:, None, None]
                       + t["bn_b"][:, None, None]).to(x.dtype)
    w = t["w"].detach().clone().requires_grad_()
    (F.conv2d(a, w, None, stride, padding, dilation, groups) * grad).sum().backward()
    return w.grad


@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu", "plain"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_twin_wgrad_matches_float64(case, dtype, memory_format, prologue):
    """conv_wgrad with the prologue recomputed, by the 2x-eager rule against float64; dw in x's memory format."""
    if not _half_conv_on_cpu(dtype):
        pytest.skip(f"this torch has no CPU convolution in {dtype}")
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, memory_format)
    t64 = {k: v.double() for k, v in t.items()}
    grad = _residual(t, case, dtype, memory_format)
    ref = _wgrad_eager(t64, grad.double(), case, prologue)
    eager = _wgrad_eager(t, grad, case, prologue)
    p = (t["mean"], t["invstd"], t["bn_w"], t["bn_b"], True) if prologue else None
    dw = dispatch.conv_functions("cuda", "cpu").wgrad(grad, t["x"], t["w"].shape, [stride] * 2, [padding] * 2,
                                                      [dilation] * 2, groups, dtype, p)
    assert dw.dtype == dtype and dw.shape == t["w"].shape and dw.is_contiguous(memory_format=memory_format)
    assert_2x_eager(f"{case} dw", dw, eager, ref, dtype, FLOORS[dtype])


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_twin_dgrad_matches_float64(case, dtype, memory_format):
    """conv_dgrad by the 2x-eager rule against float64; dx in grad_out's memory format."""
    if not _half_conv_on_cpu(dtype):
        pytest.skip(f"this torch has no CPU convolution in {dtype}")
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, memory_format)
    grad = _residual(t, case, dtype, memory_format)

    def eager(x, w, g):
        x = x.detach().clone().requires_grad_()
        (F.conv2d(x, w, None, stride, padding, dilation, groups) * g).sum().backward()
        return x.grad

    ref = eager(t["x"].double(), t["w"].double(), grad.double())
    dx = dispatch.conv_functions("cuda", "cpu").dgrad(grad, t["w"], t["x"].shape, [stride] * 2, [padding] * 2,
                                                      [dilation] * 2, groups, dtype, memory_format)
    assert dx.dtype == dtype and dx.shape == t["x"].shape and dx.is_contiguous(memory_format=memory_format)
    assert_2x_eager(f"{case} dx", dx, eager(t["x"], t["w"], grad), ref, dtype, FLOORS[dtype])


def _op_args(t, case, prologue, eval_epilogue, residual, stats):
    *_, stride, padding, dilation, groups = CASES[case]
    return (t["x"], t["w"], *((t["mean"], t["invstd"], t["bn_w"], t["bn_b"]) if prologue else (None,) * 4), prologue,
            t["bias"] if eval_epilogue else None, residual, eval_epilogue, [stride] * 2, [padding] * 2,
            [dilation] * 2, groups, stats)


@pytest.mark.parametrize("case", ["3x3_s2_odd", "1x1", "3x3_groups"])
@pytest.mark.parametrize("variant", ["bn_relu_conv_stats", "conv", "conv_bias_residual_relu"])
def test_opcheck(case, variant):
    """Schema, fake (output shape, dtype, strides) and dispatcher registration of fused_resnet_C::conv_fwd."""
    prologue, eval_epilogue = variant == "bn_relu_conv_stats", variant == "conv_bias_residual_relu"
    t = _inputs(case, torch.float32, torch.channels_last)
    res = _residual(t, case, torch.float32, torch.channels_last) if eval_epilogue else None
    torch.library.opcheck(torch.ops.fused_resnet_C.conv_fwd.default,
                          _op_args(t, case, prologue, eval_epilogue, res, variant != "conv"))


@pytest.mark.parametrize("case", ["3x3_s2_odd", "1x1", "3x3_groups"])
@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu", "plain"])
def test_opcheck_wgrad(case, prologue):
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, torch.float32, torch.channels_last)
    grad = _residual(t, case, torch.float32, torch.channels_last)
    bn = (t["mean"], t["invstd"], t["bn_w"], t["bn_b"]) if prologue else (None,) * 4
    torch.library.opcheck(torch.ops.fused_resnet_C.conv_wgrad.default,
                          (grad, t["x"], list(t["w"].shape), *bn, prologue, [stride] * 2, [padding] * 2,
                           [dilation] * 2, groups))


@pytest.mark.parametrize("case", ["3x3_s2_odd", "1x1", "3x3_groups", "3x3_dil2"])
def test_opcheck_dgrad(case):
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, torch.float32, torch.channels_last)
    grad = _residual(t, case, torch.float32, torch.channels_last)
    torch.library.opcheck(torch.ops.fused_resnet_C.conv_dgrad.default,
                          (grad, t["w"], list(t["x"].shape), [stride] * 2, [padding] * 2, [dilation] * 2, groups))


def test_conv_setting_measures_cuda_beside_the_others_and_restores(monkeypatch):
    """dispatch.conv_setting (the benchmarks' per-variant convolution setting): "auto+cuda" puts the compiled
    convolutions among the measured candidates, "auto" leaves them out (CUDA_CONV_AUTO off), a forced one
    wins; the two selections are cached apart; what was set before comes back, also after an exception;
    recording_conv_choices counts what was chosen."""
    monkeypatch.setattr(dispatch, "supports_conv", lambda impl, x, w: True)
    monkeypatch.setattr(dispatch, "_conv_cache", {})
    monkeypatch.setattr(dispatch, "_conv_override", None)

    measured = []

    def measure(impl):
        measured.append(impl)
        return {"triton": 2.0, "aten": 3.0, "cuda": 1.0}[impl]

    w = torch.empty(32, 16, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], 1, True, "t")
    with dispatch.recording_conv_choices() as counts:
        with dispatch.conv_setting("auto+cuda"):
            assert dispatch.CUDA_CONV_AUTO
            assert dispatch.conv_choice("triton", StandInCudaTensor(torch.float16), w, *args, measure) == "cuda"
        assert not dispatch.CUDA_CONV_AUTO
        assert sorted(measured) == ["aten", "cuda", "triton"]
        with dispatch.conv_setting("auto"):  # its own measurement: a cached "cuda" would be wrong here
            assert dispatch.conv_choice("triton", StandInCudaTensor(torch.float16), w, *args, measure) == "triton"
        assert len(measured) == 5 and len(dispatch.conv_choices()) == 2
        with dispatch.conv_setting("aten"):
            assert dispatch.conv_choice("triton", StandInCudaTensor(torch.float16), w, *args, measure) == "aten"
    assert counts == {"cuda": 1, "triton": 1, "aten": 1}
    dispatch.set_conv_impl("triton")
    try:
        with pytest.raises(RuntimeError), dispatch.conv_setting("cuda"):
            assert dispatch._conv_override == "cuda"
            raise RuntimeError("inside")
        assert dispatch._conv_override == "triton" and not dispatch.CUDA_CONV_AUTO
    finally:
        dispatch.set_conv_impl(None)
    with pytest.raises(ValueError, match="unknown convolution setting"), dispatch.conv_setting("cutlass"):
        pass


@pytest.mark.parametrize("args, takes", [
    (dict(), True),
    (dict(dtype=torch.bfloat16), True),
    (dict(dtype=torch.float32), False),
    (dict(dilation=(2, 2)), False),   # CUTLASS's strided dgrad takes no dilation
    (dict(groups=2), False),
    (dict(C=12), False),
    (dict(K=20), False),
])
def test_cutlass_takes_dgrad(args, takes):
    a = dict(dtype=torch.float16, C=16, K=24, groups=1, dilation=(1, 1)) | args
    g = torch.empty(2, a["K"], 5, 5, dtype=a["dtype"])
    w = torch.empty(a["K"], a["C"] // a["groups"], 3, 3, dtype=a["dtype"])
    assert conv_compiled.cutlass_takes_dgrad(g, w, (2, a["C"], 5, 5), a["dilation"], a["groups"]) == takes


@pytest.mark.parametrize("x_shape, w_shape, stride, takes", [
    ((2, 16, 40, 40), (24, 16, 32, 32), 1, True),         # 32 x 32 taps: the kOptimized iterators' mask bits
    ((2, 16, 40, 40), (24, 16, 33, 1), 1, False),
    ((2, 16, 40, 40), (24, 16, 1, 33), 1, False),
    ((1023, 64, 128, 128), (64, 64, 1, 1), 1, True),      # x, y: (2^30 - 2^20) 16-bit elements, under 2 GiB
    ((1024, 64, 128, 128), (64, 64, 1, 1), 2, False),     # x: 2^30 16-bit elements, 2 GiB (y is a quarter)
    ((512, 64, 128, 128), (128, 64, 1, 1), 1, False),     # y: 2 GiB (x is 1 GiB)
    ((1, 4096, 6, 6), (4096, 4096, 6, 6), 1, False),      # wgrad's fp32 dw: 2.4 GB (w itself 1.2 GB in 16 bits)
    ((1, 4096, 5, 5), (4096, 4096, 5, 5), 1, True),       # dw 1.7 GB
])
def test_cutlass_takes_only_what_fits_cutlass_limits(x_shape, w_shape, stride, takes):
    """CUTLASS's own limits (conv_launch.h, shape_fits): calls beyond them go to another implementation rather
    than to the binding, which would refuse them (or, for the fusion kernels, whose can_implement does not check
    tensor sizes, compute them with overflowing 32-bit offsets)."""
    x = torch.empty(x_shape, dtype=torch.float16, device="meta")
    w = torch.empty(w_shape, dtype=torch.float16, device="meta")
    geometry = ([stride] * 2, [0, 0], [1, 1])
    assert conv_compiled.cutlass_takes(x, w, 1, None, None, None, False, *geometry) == takes
    ho, wo = (x_shape[2] - w_shape[2]) // stride + 1, (x_shape[3] - w_shape[3]) // stride + 1
    dy = torch.empty(x_shape[0], w_shape[0], ho, wo, dtype=torch.float16, device="meta")
    assert conv_compiled.cutlass_takes_dgrad(dy, w, x_shape, [1, 1], 1) == takes


@pytest.mark.parametrize("bad, message", [
    ("weight_dtype", "weight has dtype"),
    ("mean_without_invstd", "mean and invstd must be given together"),
    ("bn_weight_without_mean", "without mean and invstd"),
    ("mean_dtype", "mean must be"),
    ("stride", "stride must have 2 elements"),
    ("groups", "groups"),
    ("bias_length", "bias must have shape"),
])
def test_argument_errors(bad, message):
    t = _inputs("3x3", torch.float32, torch.channels_last)
    args = list(_op_args(t, "3x3", True, False, None, True))
    if bad == "weight_dtype":
        args[1] = args[1].double()
    elif bad == "mean_without_invstd":
        args[3] = None
    elif bad == "bn_weight_without_mean":
        args[2] = args[3] = None
    elif bad == "mean_dtype":
        args[2] = args[2].double()
    elif bad == "stride":
        args[10] = [1, 1, 1]
    elif bad == "groups":
        args[13] = 3
    elif bad == "bias_length":
        args[7] = torch.zeros(5)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.fused_resnet_C.conv_fwd(*args)


def test_conv_stats_op_with_the_cuda_impl_matches_aten():
    """The conv_stats custom op run with impl="cuda" (the compiled op; backward: ATen's dgrad and wgrad with the
    backend's BatchNorm) gives the "aten" implementation's output, statistics and gradients."""
    x = torch.randn(2, 16, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(24, 16, 3, 3, dtype=torch.float64) / 12).contiguous(memory_format=torch.channels_last)
    stats = torch.ops.fused_resnet_C.bn_stats(x)
    mean, invstd = torch.ops.fused_resnet_C.bn_finalize(stats, None, None, None, 0.1, 1e-5, torch.float64)
    bn_w, bn_b = torch.rand(16, dtype=torch.float64) + 0.5, torch.rand(16, dtype=torch.float64)
    grad = torch.randn(2, 24, 4, 3, dtype=torch.float64)
    outs = []
    for impl in ("aten", "cuda"):
        xi, wi, bwi, bbi = (t.detach().clone().requires_grad_() for t in (x, w, bn_w, bn_b))
        y, s = torch.ops.fused_resnet.conv_stats(xi, wi, [2, 2], [1, 1], [1, 1], 1, mean, invstd, bwi, bbi,
                                                 stats[0].clone(), True, impl, "cpu", None)
        (y * grad).sum().backward()
        outs.append((y, s, xi.grad, wi.grad, bwi.grad, bbi.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_extension_reports_the_cutlass_build():
    import fused_resnet._C as ext

    assert isinstance(ext.WITH_CUTLASS, bool) and isinstance(ext.WITH_CUDA, bool)
    assert conv_compiled.cutlass_built() == ext.WITH_CUTLASS
    if not ext.WITH_CUDA:
        assert not ext.WITH_CUTLASS  # the CUTLASS convolutions are part of the CUDA build
    for op in ("conv_fwd", "conv_wgrad", "conv_dgrad"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet_C::{op}", "CUDA") == ext.WITH_CUTLASS
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_resnet_C::{op}", "CPU")
    assert backends.build_info()["extension_cutlass_convolutions"] == ext.WITH_CUTLASS


def test_dispatch_never_picks_cuda_on_cpu_or_automatically(monkeypatch):
    assert "cuda" in dispatch.CONV_IMPLS and not dispatch.CUDA_CONV_AUTO
    x = torch.randn(2, 16, 5, 5, dtype=torch.float16)
    w = torch.randn(16, 16, 3, 3, dtype=torch.float16)
    assert not dispatch.supports_conv("cuda", x, w)
    for backend in ("cuda", "cpu", "eager"):
        assert dispatch.conv_choice(backend, x, w, [1, 1], [1, 1], [1, 1], 1, True, "bn_conv") == "aten"
    monkeypatch.setattr(dispatch, "_conv_override", "cuda")
    # Asked for but not applicable (CPU tensors): the fallback, as for "triton".
    assert dispatch.conv_choice("cuda", x, w, [1, 1], [1, 1], [1, 1], 1, True, "bn_conv") == "aten"
    dispatch.set_conv_impl("cuda")
    dispatch.set_conv_impl(None)
    with pytest.raises(ValueError):
        dispatch.set_conv_impl("cutlass")


@pytest.mark.parametrize("args, takes", [
    (dict(), True),
    (dict(dtype=torch.bfloat16), True),      # our transform (csrc/cuda/conv/bf16_scale_bias_relu.cuh)
    (dict(dtype=torch.bfloat16, prologue=False, bias=True), True),
    (dict(dtype=torch.float32), False),      # 16-bit instantiations only
    (dict(C=12), False),                     # C % 8
    (dict(K=20), False),                     # K % 8
    (dict(groups=2), False),
    (dict(prologue=False), True),            # no prologue, no epilogue: the plain fprop / wgrad
    (dict(prologue=False, residual=True), False),  # a residual without the eval epilogue's bias + ReLU
    (dict(relu_in=False), False),
    (dict(bias=True), False),                # prologue and eval epilogue together: not instantiated
    (dict(prologue=False, bias=True), True),  # eval epilogue: bias + ReLU
    (dict(prologue=False, bias=True, residual=True), True),
    (dict(prologue=False, bias=True, relu=False), False),  # without its ReLU: not instantiated
    (dict(prologue=False, bias=True, C=12), False),
])
def test_cutlass_takes(args, takes):
    a = dict(dtype=torch.float16, C=16, K=24, groups=1, prologue=True, relu_in=True, bias=False, residual=False,
             relu=None) | args
    x = torch.empty(2, a["C"], 5, 5, dtype=a["dtype"])
    w = torch.empty(a["K"], a["C"] // a["groups"], 3, 3, dtype=a["dtype"])
    p = (None, None, None, None, a["relu_in"]) if a["prologue"] else None
    bias = torch.empty(a["K"]) if a["bias"] else None
    residual = torch.empty(2, a["K"], 5, 5, dtype=a["dtype"]) if a["residual"] else None
    relu = a["bias"] if a["relu"] is None else a["relu"]
    assert conv_compiled.cutlass_takes(x, w, a["groups"], p, bias, residual, relu, [1, 1], [1, 1], [1, 1]) == takes


# ---------------------------------------------------------------------------------------------------------
# The CUTLASS kernels themselves, on a CUDA device (skipped without one, or without the CUTLASS build). fp16
# and bf16, the shapes whose channel counts are multiples of 8 (what the instantiations take; cutlass_takes is asserted,
# so that a silent fallback to ATen cannot pass for them). Reference: float64 on CPU; eager: the same dtype on
# the GPU.

needs_cutlass_gpu = pytest.mark.skipif(not (torch.cuda.is_available() and conv_compiled.cutlass_built()),
                                       reason="needs a CUDA device and the CUTLASS build (FUSED_RESNET_CUTLASS)")
GPU_CASES = ["1x1_s2_odd", "3x3", "3x3_dil2", "3x3_batch1_c8", "3x3_tiles"]


def _on_cuda(t: dict) -> dict:
    return {k: v.cuda() for k, v in t.items()}  # .cuda() keeps each tensor's strides (memory format)


GPU_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@needs_cutlass_gpu
@pytest.mark.parametrize("variant", ["bn_relu_conv_stats", "conv_stats", "conv_bias_residual_relu"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES.values()), ids=list(GPU_DTYPES))
@pytest.mark.parametrize("case", GPU_CASES)
def test_cutlass_on_cuda_fwd_matches_float64(case, dtype, memory_format, variant):
    prologue, eval_epilogue = variant == "bn_relu_conv_stats", variant == "conv_bias_residual_relu"
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, memory_format)
    res = _residual(t, case, dtype, memory_format) if eval_epilogue else None
    ref = _eager({k: v.double() for k, v in t.items()}, case, prologue, eval_epilogue,
                 None if res is None else res.double())
    tc, resc = _on_cuda(t), None if res is None else res.cuda()
    eager = _eager(tc, case, prologue, eval_epilogue, resc)
    p = (tc["mean"], tc["invstd"], tc["bn_w"], tc["bn_b"], True) if prologue else None
    bias = tc["bias"] if eval_epilogue else None
    assert conv_compiled.cutlass_takes(tc["x"], tc["w"], groups, p, bias, resc, eval_epilogue, [stride] * 2,
                                       [padding] * 2, [dilation] * 2)
    y, stats = dispatch.conv_functions("cuda", "cuda").fwd(tc["x"], tc["w"], [stride] * 2, [padding] * 2,
                                                            [dilation] * 2, groups, prologue=p, stats=True,
                                                            bias=bias, residual=resc, relu=eval_epilogue)
    torch.cuda.synchronize()
    assert y.dtype == dtype and y.is_contiguous(memory_format=memory_format)
    assert_2x_eager(f"{case} y", y, eager[0], ref[0], dtype, FLOORS[dtype])
    assert_2x_eager(f"{case} mean", stats[1], eager[1], ref[1], dtype, FLOORS[dtype])
    assert_2x_eager(f"{case} m2", stats[2], eager[2], ref[2], dtype, FLOORS[dtype])


@needs_cutlass_gpu
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES.values()), ids=list(GPU_DTYPES))
@pytest.mark.parametrize("case", GPU_CASES)
def test_cutlass_on_cuda_wgrad_and_dgrad_match_float64(case, dtype, memory_format):
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, memory_format)
    grad = _residual(t, case, dtype, memory_format)
    t64 = {k: v.double() for k, v in t.items()}
    tc, gc = _on_cuda(t), grad.cuda()
    p = (tc["mean"], tc["invstd"], tc["bn_w"], tc["bn_b"], True)
    fns = dispatch.conv_functions("cuda", "cuda")
    geometry = ([stride] * 2, [padding] * 2, [dilation] * 2)
    assert conv_compiled.cutlass_takes(tc["x"], tc["w"], groups, p, None, None, False, *geometry)
    dw = fns.wgrad(gc, tc["x"], tc["w"].shape, [stride] * 2, [padding] * 2, [dilation] * 2, groups, dtype, p)
    assert_2x_eager(f"{case} dw", dw, _wgrad_eager(tc, gc, case, True), _wgrad_eager(t64, grad.double(), case, True),
                    dtype, FLOORS[dtype])
    assert conv_compiled.cutlass_takes(tc["x"], tc["w"], groups, None, None, None, False, *geometry)  # plain wgrad
    dw_plain = fns.wgrad(gc, tc["x"], tc["w"].shape, [stride] * 2, [padding] * 2, [dilation] * 2, groups, dtype, None)
    assert_2x_eager(f"{case} dw (no prologue)", dw_plain, _wgrad_eager(tc, gc, case, False),
                    _wgrad_eager(t64, grad.double(), case, False), dtype, FLOORS[dtype])
    if not conv_compiled.cutlass_takes_dgrad(gc, tc["w"], tc["x"].shape, [dilation] * 2, groups):
        return  # dilation: the dgrad instantiation does not take it (falls back to ATen by design)

    def eager_dx(x, w, g):
        x = x.detach().clone().requires_grad_()
        (F.conv2d(x, w, None, stride, padding, dilation, groups) * g).sum().backward()
        return x.grad

    dx = fns.dgrad(gc, tc["w"], tc["x"].shape, [stride] * 2, [padding] * 2, [dilation] * 2, groups, dtype,
                   memory_format)
    torch.cuda.synchronize()
    assert dx.is_contiguous(memory_format=memory_format)
    assert_2x_eager(f"{case} dx", dx, eager_dx(tc["x"], tc["w"], gc), eager_dx(t64["x"], t64["w"], grad.double()),
                    dtype, FLOORS[dtype])


@needs_cutlass_gpu
@pytest.mark.parametrize("dtype", list(GPU_DTYPES.values()), ids=list(GPU_DTYPES))
def test_cutlass_on_cuda_prologue_beyond_fp16_range(dtype):
    """A channel whose BatchNorm scale exceeds fp16's range (invstd 1e5: a near-constant channel) must not
    overflow the transform's fp16 scale into inf: the launcher divides scale and shift by a power of two and
    the epilogue multiplies it back (conv_cuda_ops.cpp, prologue_vectors). Fails (non-finite y / dw) without."""
    case = "3x3"
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, torch.channels_last)
    g = torch.Generator().manual_seed(7)
    # Channel 0: mean 0, values ~1e-5, invstd 1e5: normalised values of order 1, scale 1e5 * bn_w > 65504.
    x0 = torch.randn(t["x"].shape[0], *t["x"].shape[2:], generator=g, dtype=torch.float64) * 1e-5
    t["x"] = t["x"].clone()
    t["x"][:, 0] = x0.to(dtype)
    t["mean"] = t["mean"].clone()
    t["mean"][0] = 0.0
    t["invstd"] = t["invstd"].clone()
    t["invstd"][0] = 1e5
    t64 = {k: v.double() for k, v in t.items()}
    tc = _on_cuda(t)
    p = (tc["mean"], tc["invstd"], tc["bn_w"], tc["bn_b"], True)
    assert conv_compiled.cutlass_takes(tc["x"], tc["w"], groups, p, None, None, False, [stride] * 2, [padding] * 2,
                                       [dilation] * 2)
    fns = dispatch.conv_functions("cuda", "cuda")
    y, _ = fns.fwd(tc["x"], tc["w"], [stride] * 2, [padding] * 2, [dilation] * 2, groups, prologue=p, stats=False)
    ref = _eager(t64, case, True, False, None)
    eager = _eager(tc, case, True, False, None)
    assert_2x_eager(f"{case} y", y, eager[0], ref[0], dtype, FLOORS[dtype])
    grad = _residual(t, case, dtype, torch.channels_last)
    dw = fns.wgrad(grad.cuda(), tc["x"], tc["w"].shape, [stride] * 2, [padding] * 2, [dilation] * 2, groups, dtype, p)
    assert_2x_eager(f"{case} dw", dw, _wgrad_eager(tc, grad.cuda(), case, True),
                    _wgrad_eager(t64, grad.double(), case, True), dtype, FLOORS[dtype])


# ---------------------------------------------------------------------------------------------------------
# bn_prologue_half: the CUTLASS prologue vectors (common/bn_math.h). The CPU twin against the formula written
# here in torch float32 ops (same roundings), exactly; its CUDA kernel is checked against this twin bitwise
# by the CPU emulation (tests/test_cuda_emulated.py::test_prologue_half).

def _prologue_half_formula(mean, invstd, weight, bias):
    scale = invstd * (weight.float() if weight is not None else 1.0)
    shift = (bias.float() if bias is not None else 0.0) - mean * scale
    amax = torch.maximum(scale.abs().max(), shift.abs().max()).item() if mean.numel() else 0.0
    if math.isnan(amax) or math.isinf(amax):
        alpha = amax
    else:
        v = amax / 16384.0
        m, e = math.frexp(v) if v > 1.0 else (0.0, 0)
        alpha = 1.0 if v <= 1.0 else math.ldexp(1.0, e - 1 if m == 0.5 else e)
    return (scale / alpha).half(), (shift / alpha).half(), torch.tensor([alpha], dtype=torch.float32)


@pytest.mark.parametrize("case", ["plain", "no_affine", "half_weight", "large_shift", "large_scale", "power_of_two",
                                  "nan", "inf", "empty"])
def test_bn_prologue_half_cpu_twin(case):
    g = torch.Generator().manual_seed(3)
    C = 0 if case == "empty" else 37
    mean, invstd = torch.randn(C, generator=g), torch.rand(C, generator=g) + 0.5
    weight, bias = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    if case == "no_affine":
        weight = bias = None
    elif case == "half_weight":
        weight = weight.half()
    elif case == "large_shift":
        mean[5], invstd[5] = 300.0, 316.2  # a near-constant channel: shift ~ -1e5 > fp16's range
    elif case == "large_scale":
        invstd[7] = 1e6
    elif case == "power_of_two":
        mean.zero_(), invstd.fill_(1.0), bias.zero_()
        weight[3] = 32768.0  # amax / 16384 == 2 exactly: alpha 2, not 4
    elif case == "nan":
        invstd[2] = float("nan")
    elif case == "inf":
        invstd[2] = float("inf")
    scale, shift, alpha = torch.ops.fused_resnet_C.bn_prologue_half(mean, invstd, weight, bias)
    want = _prologue_half_formula(mean, invstd, weight, bias)
    assert scale.dtype == shift.dtype == torch.float16 and alpha.dtype == torch.float32 and alpha.shape == (1,)
    assert torch.equal(alpha.isnan(), want[2].isnan()) and (alpha.isnan().all() or torch.equal(alpha, want[2]))
    for got, exp in zip((scale, shift), want[:2]):
        assert torch.equal(got.isnan(), exp.isnan())
        assert torch.equal(got[~got.isnan()], exp[~exp.isnan()])
    a = alpha.item()
    if case in ("large_shift", "large_scale"):
        assert a > 1 and math.frexp(a)[0] == 0.5  # a power of two
        assert max(scale.abs().max().item(), shift.abs().max().item()) <= 16384  # finite, in range
        x = torch.randn(C, generator=g) * 0.01 + mean
        y = torch.relu(x * invstd * weight + (bias - mean * invstd * weight))  # the folded form, fp32
        y16 = a * torch.relu(x * scale.float() + shift.float())
        assert torch.isfinite(y16).all()
        # fp16's rounding of scale and shift, relative to the terms of the folded form (not to y: they cancel)
        bound = 2 ** -10 * ((x * scale.float()).abs() * a + shift.float().abs() * a + 1)
        assert ((y16 - y).abs() <= bound).all()
    elif case == "power_of_two":
        assert a == 2.0
    elif case in ("nan", "inf"):
        assert math.isnan(a) if case == "nan" else math.isinf(a)
    elif case != "empty":
        assert a == 1.0


def test_bn_prologue_half_errors():
    m, i = torch.zeros(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="mean must be Float"):
        torch.ops.fused_resnet_C.bn_prologue_half(m.double(), i, None, None)
    with pytest.raises(RuntimeError, match=r"invstd must have shape \[4\]"):
        torch.ops.fused_resnet_C.bn_prologue_half(m, torch.ones(5), None, None)
    with pytest.raises(RuntimeError, match="1-D"):
        torch.ops.fused_resnet_C.bn_prologue_half(m[None], i, None, None)


def test_opcheck_bn_prologue_half():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(24, generator=g), torch.rand(24, generator=g) + 0.5, torch.rand(24, generator=g),
            torch.randn(24, generator=g))
    torch.library.opcheck(torch.ops.fused_resnet_C.bn_prologue_half.default, args)


@needs_cutlass_gpu
@pytest.mark.parametrize("dtype", list(GPU_DTYPES.values()), ids=list(GPU_DTYPES))
def test_cutlass_on_cuda_is_deterministic(dtype):
    """y, its epilogue statistics (several row and column tiles, merged in a fixed order) and dw (serial
    split-K) are bitwise the same on a second run."""
    case = "3x3_tiles"
    *_, stride, padding, dilation, groups = CASES[case]
    tc = _on_cuda(_inputs(case, dtype, torch.channels_last))
    grad = _residual(_inputs(case, dtype, torch.channels_last), case, dtype, torch.channels_last).cuda()
    p = (tc["mean"], tc["invstd"], tc["bn_w"], tc["bn_b"], True)
    fns = dispatch.conv_functions("cuda", "cuda")
    runs = []
    for _ in range(2):
        y, s = fns.fwd(tc["x"], tc["w"], [stride] * 2, [padding] * 2, [dilation] * 2, groups, prologue=p, stats=True)
        dw = fns.wgrad(grad, tc["x"], tc["w"].shape, [stride] * 2, [padding] * 2, [dilation] * 2, groups, dtype, p)
        runs.append((y, s, dw))
    torch.cuda.synchronize()
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------
# conv_dgrad_bn: dgrad, then the prologue BatchNorm's ReLU mask and backward reduction (the CUTLASS
# implementation does both in its epilogue; on CPU its C++ twin).

def _dgrad_bn_eager(t, grad, case, relu, with_affine=True):
    """(dz, (sum dz, sum dz * xhat)) in eager ops: dgrad in x's dtype, mask and sums in the accumulation dtype
    (float64 inputs give the reference)."""
    *_, stride, padding, dilation, groups = CASES[case]
    x = t["x"]
    xx = x.detach().clone().requires_grad_()
    (F.conv2d(xx, t["w"], None, stride, padding, dilation, groups) * grad).sum().backward()
    dx = xx.grad
    acc = t["mean"].dtype
    xa = x.to(acc)
    mu, inv = t["mean"][:, None, None], t["invstd"][:, None, None]
    if relu:
        scale = (t["invstd"] * t["bn_w"] if with_affine else t["invstd"])[:, None, None]
        z = (xa - mu) * scale + (t["bn_b"][:, None, None] if with_affine else 0)
        dx = torch.where(z > 0, dx, torch.zeros((), dtype=dx.dtype))
    d = dx.to(acc)
    return dx, torch.stack([d.sum(dim=(0, 2, 3)), (d * ((xa - mu) * inv)).sum(dim=(0, 2, 3))])


@pytest.mark.parametrize("relu, affine", [(True, True), (False, True), (True, False)], ids=["relu", "norelu", "noaffine"])
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["cl", "nchw"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_twin_dgrad_bn_matches_float64(case, dtype, memory_format, relu, affine):
    if dtype != torch.float32 and not _half_conv_on_cpu(dtype):
        pytest.skip(f"this torch has no CPU {dtype} convolution")
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, memory_format)
    grad = _residual(t, case, dtype, memory_format)
    t64 = {k: v.double() for k, v in t.items()}
    bw, bb = (t["bn_w"], t["bn_b"]) if affine else (None, None)
    dz, sums = dispatch.conv_functions("cuda", "cpu").dgrad_bn(
        grad, t["w"], t["x"], t["mean"], t["invstd"], bw, bb, relu, [stride] * 2, [padding] * 2, [dilation] * 2,
        groups, memory_format)
    assert dz.dtype == dtype and dz.is_contiguous(memory_format=memory_format)
    assert sums.dtype == t["mean"].dtype and sums.shape == (2, t["x"].shape[1])
    eager = _dgrad_bn_eager(t, grad, case, relu, affine)
    ref = _dgrad_bn_eager(t64, grad.double(), case, relu, affine)
    floor = FLOORS[dtype]
    assert_2x_eager(f"{case} dz", dz, eager[0], ref[0], dtype, floor)
    assert_2x_eager(f"{case} sum dz", sums[0], eager[1][0], ref[1][0], dtype, floor)
    assert_2x_eager(f"{case} sum dz xhat", sums[1], eager[1][1], ref[1][1], dtype, floor)
    if relu:  # the mask is applied: dz is exactly 0 wherever the prologue's z <= 0
        scale = (t64["invstd"] * t64["bn_w"] if affine else t64["invstd"])[:, None, None]
        z = (t64["x"] - t64["mean"][:, None, None]) * scale + (t64["bn_b"][:, None, None] if affine else 0)
        assert bool((dz.double()[z <= 0] == 0).all()) and bool((z <= 0).any())


@pytest.mark.parametrize("case", ["3x3", "1x1", "3x3_groups"])
def test_opcheck_dgrad_bn(case):
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, torch.float32, torch.channels_last)
    grad = _residual(t, case, torch.float32, torch.channels_last)
    torch.library.opcheck(torch.ops.fused_resnet_C.conv_dgrad_bn.default,
                          (grad, t["w"], t["x"], t["mean"], t["invstd"], t["bn_w"], t["bn_b"], True, [stride] * 2,
                           [padding] * 2, [dilation] * 2, groups))


@pytest.mark.parametrize("takes", [True, False], ids=["dgrad_bn", "dgrad_then_bn_backward"])
def test_backward_uses_dgrad_bn_only_where_it_takes_the_call(monkeypatch, takes):
    """The fused BN -> conv backward on the "cuda" implementation: conv_dgrad_bn where dgrad_bn_takes says it
    computes the call in one kernel; elsewhere (CUTLASS's stride 2) dgrad, then the BatchNorm backward, which
    applies the ReLU mask itself, instead of conv_dgrad_bn's fallback and its extra pass over dz. Both by the
    2x-eager rule against float64 (the C++ twin stands in for CUTLASS here)."""
    from fused_resnet.ops.conv import batch_norm_act_conv2d_stats
    fns = dispatch.conv_functions("cuda", "cpu")
    calls, real = [], fns.dgrad_bn
    monkeypatch.setattr(fns, "dgrad_bn", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    monkeypatch.setattr(fns, "dgrad_bn_takes", lambda *a: takes)
    monkeypatch.setattr(dispatch, "conv_candidates", lambda *a: ("aten", "cuda"))
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(2, 8, 7, 6, generator=g, dtype=torch.float64) * 2 + 0.5
    w64 = torch.randn(16, 8, 3, 3, generator=g, dtype=torch.float64) * 0.2
    bw64, bb64 = torch.rand(8, generator=g, dtype=torch.float64) + 0.5, torch.rand(8, generator=g, dtype=torch.float64) - 0.5
    dy64 = torch.randn(2, 16, 7, 6, generator=g, dtype=torch.float64)
    runs = {}
    for name, dtype in (("fused", torch.float32), ("eager", torch.float32), ("ref", torch.float64)):
        x, w, bw, bb = (t.to(dtype).requires_grad_() for t in (x64, w64, bw64, bb64))
        x_in = x.contiguous(memory_format=torch.channels_last)
        if name == "fused":
            with dispatch.conv_setting("cuda"), dispatch.recording_conv_choices() as counts:
                y, _ = batch_norm_act_conv2d_stats(x_in, None, None, bw, bb, True, 0.1, 1e-5, w, 1, 1, backend="cpu")
                y.backward(dy64.to(dtype))
            assert counts == {"cuda": 1}
        else:
            z = F.batch_norm(x_in, None, None, bw, bb, True, 0.1, 1e-5)
            F.conv2d(torch.relu(z), w, None, 1, 1).backward(dy64.to(dtype))
        runs[name] = dict(dx=x.grad, dw=w.grad, dbw=bw.grad, dbb=bb.grad)
    assert len(calls) == (1 if takes else 0)
    for k in runs["ref"]:
        assert_2x_eager(k, runs["fused"][k], runs["eager"][k], runs["ref"][k], torch.float32)


@pytest.mark.parametrize("args, takes", [
    (dict(), True),
    (dict(dtype=torch.bfloat16), True),
    (dict(stride=(2, 2)), False),          # the unit-stride dgrad only: strided tiles are not consecutive rows
    (dict(dilation=(2, 2)), False),
    (dict(C=12), False),
    (dict(mean_dtype=torch.float64), False),
])
def test_cutlass_takes_dgrad_bn(args, takes):
    a = dict(dtype=torch.float16, C=16, K=24, stride=(1, 1), dilation=(1, 1), mean_dtype=torch.float32) | args
    g = torch.empty(2, a["K"], 5, 5, dtype=a["dtype"])
    w = torch.empty(a["K"], a["C"], 3, 3, dtype=a["dtype"])
    x = torch.empty(2, a["C"], 5, 5, dtype=a["dtype"])
    assert conv_compiled.cutlass_takes_dgrad_bn(g, w, x, torch.empty(a["C"], dtype=a["mean_dtype"]), a["stride"],
                                                a["dilation"], 1) == takes


@needs_cutlass_gpu
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "norelu"])
@pytest.mark.parametrize("dtype", list(GPU_DTYPES.values()), ids=list(GPU_DTYPES))
@pytest.mark.parametrize("case", GPU_CASES)
def test_cutlass_on_cuda_dgrad_bn_matches_float64(case, dtype, relu):
    """CUTLASS's dgrad with the BatchNorm epilogue where it takes the call (stride 1, dilation 1), the
    fallback (dgrad + bn_backward_reduce + mask) elsewhere; both against float64 by the 2x-eager rule."""
    *_, stride, padding, dilation, groups = CASES[case]
    t = _inputs(case, dtype, torch.channels_last)
    grad = _residual(t, case, dtype, torch.channels_last)
    t64 = {k: v.double() for k, v in t.items()}
    tc, gc = _on_cuda(t), grad.cuda()
    takes = conv_compiled.cutlass_takes_dgrad_bn(gc, tc["w"], tc["x"], tc["mean"], [stride] * 2, [dilation] * 2, groups)
    assert takes == (stride == 1 and dilation == 1)
    dz, sums = dispatch.conv_functions("cuda", "cuda").dgrad_bn(
        gc, tc["w"], tc["x"], tc["mean"], tc["invstd"], tc["bn_w"], tc["bn_b"], relu, [stride] * 2, [padding] * 2,
        [dilation] * 2, groups, torch.channels_last)
    torch.cuda.synchronize()
    eager = _dgrad_bn_eager(tc, gc, case, relu)
    ref = _dgrad_bn_eager(t64, grad.double(), case, relu)
    assert_2x_eager(f"{case} dz", dz, eager[0], ref[0], dtype, FLOORS[dtype])
    assert_2x_eager(f"{case} sum dz", sums[0], eager[1][0], ref[1][0], dtype, FLOORS[dtype])
    assert_2x_eager(f"{case} sum dz xhat", sums[1], eager[1][1], ref[1][1], dtype, FLOORS[dtype])
