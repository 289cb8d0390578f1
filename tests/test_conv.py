"""The fused convolutions (ops/conv.py; Triton kernels in kernels/conv_fwd.py and conv_bwd.py, and the "aten"
path) against a float64 eager reference, by the 2x-eager rule (helpers.py), forward and backward.

Each case runs ``batch_norm_act_conv2d_stats`` (the previous BatchNorm's apply + ReLU in the prologue, with
batch statistics, a non-zero shift so that padding would not be zero after the transform, and the statistics
epilogue) or ``conv2d_stats`` (no prologue), then checks: the output, its (count, mean, m2) statistics, and
the gradients of the input, the conv weight and the BatchNorm's weight and bias. Shapes cover every
convolution of the ResNet family: 1x1 and 3x3 at stride 1 and 2, dilation 2, groups, the 7x7 stride-2 stem
with 3 input channels, a 1x1 map, C = 65, batch 1, H != W and odd sizes with stride 2. Under the interpreter
the kernels run with 16 x 16 x 16 tiles (several row, column and reduction tiles, several programs per
column, split-K); on CUDA with the launchers' own configurations.
"""
import pytest
import torch

from conftest import HAS_CUDA, skip_unsupported
from fused_resnet import dispatch
from fused_resnet.kernels import conv_configs
from fused_resnet.ops.conv import batch_norm_act_conv2d_stats, conv2d_bias_act, conv2d_stats
from helpers import StandInCudaTensor, assert_2x_eager

# name: (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CASES = {
    "1x1": (2, 65, 5, 7, 33, 1, 1, 1, 0, 1, 1),
    "1x1_s2_odd": (1, 24, 9, 7, 40, 1, 1, 2, 0, 1, 1),
    "3x3": (2, 16, 6, 5, 24, 3, 3, 1, 1, 1, 1),
    "3x3_s2_odd": (1, 20, 9, 7, 17, 3, 3, 2, 1, 1, 1),
    "3x3_dil2": (2, 16, 9, 8, 16, 3, 3, 1, 2, 2, 1),
    "3x3_groups": (2, 32, 6, 6, 32, 3, 3, 1, 1, 1, 4),
    "7x7_s2_stem": (1, 3, 17, 15, 16, 7, 7, 2, 3, 1, 1),
    "1x1_map": (3, 65, 1, 1, 20, 1, 1, 1, 0, 1, 1),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FLOORS = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _devices():
    out = [pytest.param("cpu", id="cpu")]
    out.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")))
    return out


@pytest.fixture(autouse=True)
def _small_tiles(monkeypatch):
    # Small tiles under the interpreter: shapes of a few dozen rows still span several tiles and programs.
    monkeypatch.setattr(conv_configs, "INTERPRET_CONFIG", conv_configs.Config(16, 16, 16, 4, 1))


def _inputs(case, dtype, device, memory_format, seed=0):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64) * 1.5 + 0.4
    w = torch.randn(K, C // groups, R, S, generator=g, dtype=torch.float64) / (C // groups * R * S) ** 0.5
    bn_w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    # Shifts well above 0: relu(0 * scale + shift) > 0, so zero padding must be applied after the transform.
    bn_b = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    grad = torch.randn(N, K, *_out_hw(case), generator=g, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return (x.to(**cast).contiguous(memory_format=memory_format), w.to(**cast).contiguous(memory_format=memory_format),
            bn_w.to(device), bn_b.to(device), grad.to(**cast))


def _out_hw(case):
    N, C, H, W, K, R, S, stride, padding, dilation, groups = CASES[case]
    return ((H + 2 * padding - dilation * (R - 1) - 1) // stride + 1,
            (W + 2 * padding - dilation * (S - 1) - 1) // stride + 1)


def _eager(x, w, bn_w, bn_b, grad, case, prologue):
    """The same computation in eager PyTorch ops, in x's dtype (or float64 for the reference)."""
    _, C, _, _, _, _, _, stride, padding, dilation, groups = CASES[case]
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    bn_w = bn_w.detach().clone().to(x.device).requires_grad_()
    bn_b = bn_b.detach().clone().to(x.device).requires_grad_()
    a = x
    if prologue:
        a = torch.relu(torch.nn.functional.batch_norm(x, None, None, bn_w.to(x.dtype), bn_b.to(x.dtype), True, 0.1,
                                                      1e-5))
    y = torch.nn.functional.conv2d(a, w, None, stride, padding, dilation, groups)
    (y * grad.to(y.dtype)).sum().backward()
    var, mean = torch.var_mean(y.detach().double(), dim=(0, 2, 3), correction=0)
    n = y.shape[0] * y.shape[2] * y.shape[3]
    out = dict(y=y.detach(), mean=mean, m2=var * n, dx=x.grad, dw=w.grad)
    if prologue:
        out.update(dbn_w=bn_w.grad, dbn_b=bn_b.grad)
    return out


def _fused(x, w, bn_w, bn_b, grad, case, prologue, backend):
    _, C, _, _, _, _, _, stride, padding, dilation, groups = CASES[case]
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    bn_w = bn_w.detach().clone().float().requires_grad_()
    bn_b = bn_b.detach().clone().float().requires_grad_()
    if prologue:
        y, stats = batch_norm_act_conv2d_stats(x, None, None, bn_w, bn_b, True, 0.1, 1e-5, w, stride, padding,
                                               dilation, groups, relu=True, backend=backend)
    else:
        y, stats = conv2d_stats(x, w, stride, padding, dilation, groups, backend=backend)
    assert stats.dtype == torch.float64 and stats.shape == (3, w.shape[0])
    (y * grad).sum().backward()
    out = dict(y=y.detach(), mean=stats[1], m2=stats[2], dx=x.grad, dw=w.grad)
    assert torch.all(stats[0] == y.shape[0] * y.shape[2] * y.shape[3]), "count"
    if prologue:
        out.update(dbn_w=bn_w.grad, dbn_b=bn_b.grad)
    return out, y


def _check(case, dtype, device, memory_format, prologue, backend, expect_impl):
    x, w, bn_w, bn_b, grad = _inputs(case, dtype, device, memory_format)
    ref = _eager(x.double().cpu(), w.double().cpu(), bn_w.cpu(), bn_b.cpu(), grad.double().cpu(), case, prologue)
    eager = _eager(x, w, bn_w, bn_b, grad, case, prologue)
    fused, y = _fused(x, w, bn_w, bn_b, grad, case, prologue, backend)
    assert y.is_contiguous(memory_format=memory_format), "the output keeps the input's memory format"
    floor = FLOORS[dtype]
    for name, r in ref.items():
        assert_2x_eager(f"{case} {name}", fused[name], eager[name], r, dtype, floor)
    assert _impl_used(x, w, backend) == expect_impl


def _impl_used(x, w, backend):
    return dispatch.conv_choice(backend, x, w, [1, 1], [0, 0], [1, 1], 1, False, "probe")


@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu_conv", "conv"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("device", _devices())
def test_triton_conv_matches_float64(device, case, dtype, prologue):
    """The Triton convolutions: output, statistics and every gradient by the 2x-eager rule."""
    if not dispatch.supports_conv("triton", torch.empty(1, 1, 1, 1, dtype=dtype, device=device),
                                  torch.empty(1, 1, 1, 1, dtype=dtype, device=device)):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    skip_unsupported("triton", device, dtype)
    memory_format = torch.channels_last if case != "3x3_dil2" else torch.contiguous_format
    _check(case, dtype, device, memory_format, prologue, "triton", "triton")


@pytest.mark.parametrize("case", ["3x3_s2_odd", "3x3_groups", "1x1"])
def test_aten_conv_path_matches_float64(case):
    """The "aten" path (ATen's convolution with the cpu backend's BatchNorm kernels around it) by the same rule."""
    _check(case, torch.float32, "cpu", torch.channels_last, True, "cpu", "aten")


@pytest.mark.parametrize("impl", ["triton", "aten", "cuda", "gemm"])
@pytest.mark.parametrize("geometry", [
    dict(hw=(2, 2), r=3, stride=2, padding=0, dilation=1),   # C++'s truncating division would say 1 x 1
    dict(hw=(4, 9), r=3, stride=1, padding=0, dilation=2),   # the dilated filter spans 5 > 4 rows
    dict(hw=(1, 1), r=3, stride=1, padding=0, dilation=1),
])
def test_filter_larger_than_the_padded_input_is_refused_as_conv2d_does(impl, geometry):
    """conv2d raises when the (dilated) filter is larger than the padded input; every implementation must too,
    not return an empty map (or, rounding the negative span towards zero, a 1 x 1 one)."""
    if impl == "triton" and not dispatch.supports_conv("triton", torch.empty(1, 16, 1, 1), torch.empty(1, 16, 1, 1)):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    if impl == "cuda" and not dispatch.backends.extension_loaded():
        pytest.skip("the compiled convolutions need the extension")
    x = torch.randn(1, 16, *geometry["hw"])
    w = torch.randn(16, 16, geometry["r"], geometry["r"])
    args = ([geometry["stride"]] * 2, [geometry["padding"]] * 2, [geometry["dilation"]] * 2, 1)
    with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size") as torch_error:
        torch.nn.functional.conv2d(x, w, None, *args)
    fns = dispatch.conv_functions(impl, "cpu")
    with pytest.raises(RuntimeError) as ours:
        fns.fwd(x, w, *args, stats=True)
    assert str(ours.value) == str(torch_error.value)
    # The limit itself is an output: padded input exactly the filter's span gives one position, as in conv2d.
    fit = torch.randn(1, 16, (geometry["r"] - 1) * geometry["dilation"] + 1, geometry["hw"][1] + 8)
    y, _ = fns.fwd(fit, w, *args, stats=True)
    assert y.shape == torch.nn.functional.conv2d(fit, w, None, *args).shape


@pytest.mark.parametrize("x_shape, channels_last, fits", [
    ((256, 64, 112, 112), True, True),          # ResNet-50's largest activation at batch 256
    ((1, 64, 8192, 4097), True, False),         # one image of over 2^31 elements: in-image offsets overflow
    ((1, 64, 8192, 4096), False, True),         # 2^31 elements: the last offset is 2^31 - 1, NCHW
    ((40000, 8, 256, 256), True, False),        # 2.6e9 pixel rows
])
def test_triton_convolutions_only_get_what_their_int32_indexing_holds(monkeypatch, x_shape, channels_last, fits):
    """The Triton kernels index pixel rows and in-image offsets in int32: dispatch must send larger
    convolutions to ATen (not run them with wrapped offsets), and the launchers refuse them when called
    directly."""
    from fused_resnet.kernels import conv_configs

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.empty(x_shape, device="meta").contiguous(memory_format=fmt)
    w = torch.empty(16, x_shape[1], 1, 1, device="meta")
    monkeypatch.setattr(dispatch, "supports_conv", lambda impl, *_: impl == "triton")
    candidates = dispatch.conv_candidates("triton", x, w, [1, 1], [0, 0], [1, 1], 1)
    assert ("triton" in candidates) == fits and "aten" in candidates
    y = torch.empty(x_shape[0], 16, *x_shape[2:], device="meta")
    rows = x_shape[0] * x_shape[2] * x_shape[3]
    if fits:
        conv_configs.check_int32_indexing("convolution", rows, x, y)
    else:
        with pytest.raises(ValueError, match="int32"):
            conv_configs.check_int32_indexing("convolution", rows, x, y)


def test_triton_batch_norm_refuses_rows_beyond_int32():
    from fused_resnet.kernels import batch_norm as kbn

    kbn._check_rows(256 * 112 * 112)
    with pytest.raises(ValueError, match="int32"):
        kbn._check_rows(2 ** 31 - 2 ** 10)


def test_statistics_epilogue_equals_the_bn_statistics_op():
    """The epilogue's (count, mean, m2) against bn_stats of the same (stored) output tensor."""
    from fused_resnet import batch_norm_stats

    x, w, *_ = _inputs("3x3", torch.float32, "cpu", torch.channels_last)
    if not dispatch.supports_conv("triton", x, w):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    y, stats = conv2d_stats(x, w, 1, 1, backend="triton")
    expected = batch_norm_stats(y, backend="cpu" if "cpu" in dispatch.backends.available_backends("cpu") else "eager")
    torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-6)


def test_padding_positions_are_zero_after_the_prologue():
    """The padding trap: with shift > 0 every interior activation is relu(shift) > 0 for x = mean, while the
    padded border must contribute 0: a 3x3 convolution of ones at a corner sees 4 taps, not 9."""
    x = torch.zeros(1, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    w = torch.ones(16, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    if not dispatch.supports_conv("triton", x, w):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    rm, rv = torch.zeros(16), torch.ones(16)
    bias = torch.full((16,), 0.25)
    y, _ = batch_norm_act_conv2d_stats(x, rm, rv, None, bias, False, 0.1, 0.0, w, 1, 1, backend="triton")
    a = 0.25  # relu((0 - 0) * 1 + 0.25)
    assert y[0, 0, 0, 0].item() == pytest.approx(4 * 16 * a)  # corner: 2 x 2 taps inside
    assert y[0, 0, 1, 1].item() == pytest.approx(9 * 16 * a)  # interior


@pytest.mark.parametrize("backend", ["triton", "cpu"])
def test_eval_conv_bias_residual_relu(backend):
    """Eval epilogue: relu(conv(x) + bias + residual), output and gradients against float64."""
    x, w, _, _, grad = _inputs("3x3_s2_odd", torch.float32, "cpu", torch.channels_last)
    if backend == "triton" and not dispatch.supports_conv("triton", x, w):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    bias = torch.linspace(-0.5, 0.5, w.shape[0])
    res = torch.randn_like(grad)
    results = {}
    for name, dt in (("fused", torch.float32), ("eager", torch.float32), ("ref", torch.float64)):
        xi, wi = x.to(dt).detach().requires_grad_(), w.to(dt).detach().requires_grad_()
        bi, ri = bias.to(dt).detach().requires_grad_(), res.to(dt).detach().requires_grad_()
        if name == "fused":
            y = conv2d_bias_act(xi, wi, bi, ri, 2, 1, backend=backend)
        else:
            y = torch.relu(torch.nn.functional.conv2d(xi, wi, bi, 2, 1) + ri)
        (y * grad.to(dt)).sum().backward()
        results[name] = dict(y=y.detach(), dx=xi.grad, dw=wi.grad, db=bi.grad, dr=ri.grad)
    for k, r in results["ref"].items():
        assert_2x_eager(k, results["fused"][k], results["eager"][k], r, torch.float32)


def test_selection_is_cached_per_shape_and_overridable(monkeypatch):
    """dispatch.conv_choice on CUDA: measured once per shape key, then cached; an override wins; a backend
    other than triton never gets the Triton convolutions; without a measurement, the heuristic."""
    calls = []
    w = torch.empty(32, 16, 3, 3)
    monkeypatch.setattr(dispatch, "supports_conv", lambda impl, x, w: True)
    monkeypatch.setattr(dispatch, "_conv_cache", {})

    def measure(impl):
        calls.append(impl)
        return {"triton": 2.0, "aten": 1.0}[impl]

    args = ([1, 1], [1, 1], [1, 1], 1, True, "t")
    assert dispatch.conv_choice("triton", StandInCudaTensor(), w, *args, measure) == "aten"
    assert dispatch.conv_choice("triton", StandInCudaTensor(), w, *args, measure) == "aten"
    assert calls == ["triton", "aten"], "measured once per shape"
    assert list(dispatch.conv_choices().values()) == ["aten"]
    dispatch.set_conv_impl("triton")
    try:
        assert dispatch.conv_choice("triton", StandInCudaTensor(), w, *args, measure) == "triton"
    finally:
        dispatch.set_conv_impl(None)
    assert dispatch.conv_choice("cpu", StandInCudaTensor(), w, *args, measure) == "aten"
    monkeypatch.setattr(dispatch, "_conv_cache", {})
    assert dispatch.conv_choice("triton", StandInCudaTensor(), w, *args, None) == "triton"  # heuristic: wide enough
    stem = torch.empty(64, 3, 7, 7)
    assert dispatch.conv_choice("triton", StandInCudaTensor(), stem, *args, None) == "aten"  # 3 input channels


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_module_forward_conv_and_forward_maxpool(backend):
    """BatchNormAct2d.forward_conv / forward_maxpool (kept for compatibility) compute conv(bn(x)) and pool(bn(x))
    like the modules in sequence, in float64 (cpu backend) or fp32 (Triton); with a hook, they run the
    modules so that it fires."""
    from torch import nn

    import fused_resnet

    dtype = torch.float64 if backend == "cpu" else torch.float32
    x, *_ = _inputs("3x3", dtype, "cpu", torch.channels_last)
    if backend == "triton" and not dispatch.supports_conv("triton", x, torch.empty(4, 16, 3, 3)):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1, bias=False).to(dtype)
    pool = nn.MaxPool2d(3, 2, 1)
    for relu in (True, False):
        bn = fused_resnet.BatchNormAct2d(16, fuse_relu=relu, backend=backend).to(dtype)
        ref = nn.BatchNorm2d(16).to(dtype)
        seq = (lambda t: torch.relu(ref(t))) if relu else ref
        tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(bn.forward_conv(x, conv), conv(seq(x)), **tol)
        torch.testing.assert_close(bn.forward_maxpool(x, pool), pool(seq(x)), **tol)
        torch.testing.assert_close(bn.running_var, ref.running_var, **tol)
    calls = []
    conv.register_forward_hook(lambda *a: calls.append("conv"))
    bn.forward_conv(x, conv)
    assert calls == ["conv"]


@pytest.mark.parametrize("P", [1, 255, 256, 257, 600, 70000])
def test_partials_are_summed_in_chunks_exactly_once(P):
    """kernels/batch_norm._sum_partials (the fused dgrad's BatchNorm partials, wgrad's split-K): chunks of 256
    partials per program, then the chunks' sums (70000: three levels). Against a float64 sum: each partial
    counted once, whatever the chunk boundaries."""
    if not dispatch.supports_conv("triton", torch.empty(1, 16, 1, 1), torch.empty(1, 16, 1, 1)):
        pytest.skip("the Triton kernels need CUDA or TRITON_INTERPRET=1")
    from fused_resnet.kernels import batch_norm as kbn

    g = torch.Generator().manual_seed(P)
    part = torch.randn(P, 2, 3, generator=g)
    out = torch.full((2, 3), float("nan"))
    kbn._sum_partials(part, out)
    ref = part.double().sum(0)
    bound = 2 * P * 2 ** -24 * part.double().abs().sum(0) + 1e-30  # fp32 summation error, order-independent
    assert torch.all((out.double() - ref).abs() <= bound), (out, ref)
