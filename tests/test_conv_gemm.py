"""The cpu backend's im2col + GEMM convolution (fused_resnet/conv_gemm.py) and its per-shape choice.

Parity: forced with set_conv_impl("gemm") (and checked to have run), the fused ops on the cpu backend against
eager PyTorch, both compared with a float64 reference by the 2x-eager rule (helpers.py): forward, the
statistics, and the gradients of the input, the conv weight and the prologue BatchNorm's parameters. Shapes:
the small maps the implementation takes (1x1 maps, 2x2 with stride 2, odd sizes, dilation, asymmetric
padding, batch 1, odd channel counts), channels_last and contiguous. Then the dispatch rules (which inputs it
takes, measured once per shape and cached, overrides) and a whole ResNet-18 trained with it in float64.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fused_resnet
from fused_resnet import backends, conv_gemm, dispatch
from fused_resnet.models import torchvision_reference as ref
from fused_resnet.ops.conv import batch_norm_act_conv2d_stats, conv2d, conv2d_stats
from helpers import assert_2x_eager

pytestmark = pytest.mark.skipif(not backends.backend_status("cpu", torch.device("cpu"))[0],
                                reason="the cpu backend needs the compiled extension")

EPS = 1e-5
# name: (N, C, H, W, K, R, S, stride, padding, dilation)
CASES = {
    "3x3_2x2map": (2, 33, 2, 2, 24, 3, 3, (1, 1), (1, 1), (1, 1)),
    "3x3_s2_odd": (1, 20, 5, 3, 17, 3, 3, (2, 2), (1, 1), (1, 1)),
    "1x1_s2": (3, 40, 4, 4, 65, 1, 1, (2, 2), (0, 0), (1, 1)),
    "1x1_map": (2, 65, 1, 1, 9, 1, 1, (1, 1), (0, 0), (1, 1)),
    "3x2_dil_asym_pad": (2, 7, 5, 6, 5, 3, 2, (1, 1), (2, 0), (2, 1)),
}


@pytest.fixture
def forced_gemm(monkeypatch):
    """set_conv_impl("gemm") for the test, and a count of the calls that reached conv_gemm."""
    calls = []
    for name in ("conv_fwd", "conv_backward", "conv_wgrad", "conv_dgrad"):
        fn = getattr(conv_gemm, name)
        monkeypatch.setattr(conv_gemm, name, lambda *a, _fn=fn, _name=name, **k: calls.append(_name) or _fn(*a, **k))
    dispatch.conv_functions.cache_clear()
    dispatch.set_conv_impl("gemm")
    yield calls
    dispatch.set_conv_impl(None)
    dispatch.conv_functions.cache_clear()


def _inputs(case, dtype, memory_format, seed=0):
    n, c, h, w, k, r, s, stride, padding, dilation = CASES[case]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64) * 1.5 + 0.4
    cw = torch.randn(k, c, r, s, generator=g, dtype=torch.float64) / (c * r * s) ** 0.5
    bn_w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    bn_b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5  # relu(0 * scale + shift) > 0: padding after bn
    ho = (h + 2 * padding[0] - dilation[0] * (r - 1) - 1) // stride[0] + 1
    wo = (w + 2 * padding[1] - dilation[1] * (s - 1) - 1) // stride[1] + 1
    grad = torch.randn(n, k, ho, wo, generator=g, dtype=torch.float64)
    return ([t.to(dtype).contiguous(memory_format=memory_format) for t in (x, cw)] + [bn_w, bn_b, grad.to(dtype)],
            dict(stride=stride, padding=padding, dilation=dilation))


def _run(fn, x, cw, bn_w, bn_b, grad, prologue: bool):
    leaves = [t.detach().clone().requires_grad_() for t in (x, cw, bn_w, bn_b)]
    y, stats = fn(*leaves)
    y.backward(grad)
    return [y.detach(), stats] + [t.grad for t in (leaves if prologue else leaves[:2])]


def _eager(args, prologue):
    def fn(x, cw, bn_w, bn_b):
        a = torch.relu(F.batch_norm(x, None, None, bn_w.to(x.dtype), bn_b.to(x.dtype), True, 0.0, EPS)) if prologue \
            else x
        y = F.conv2d(a, cw, None, **args)
        var, mean = torch.var_mean(y.double(), dim=(0, 2, 3), correction=0)
        return y, torch.stack([mean, var])
    return fn


def _fused(args, prologue):
    def fn(x, cw, bn_w, bn_b):
        if prologue:
            y, stats = batch_norm_act_conv2d_stats(x, None, None, bn_w, bn_b, True, 0.1, EPS, cw, relu=True,
                                                   backend="cpu", **args)
        else:
            y, stats = conv2d_stats(x, cw, backend="cpu", **args)
        return y, torch.stack([stats[1], stats[2] / stats[0]])  # (mean, biased variance) per channel
    return fn


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("prologue", [True, False], ids=["bn_relu_conv", "conv"])
@pytest.mark.parametrize("case", list(CASES))
def test_gemm_convolution_matches_float64(case, prologue, memory_format, forced_gemm):
    tensors, args = _inputs(case, torch.float32, memory_format)
    ref64 = _run(_eager(args, prologue), *[t.double() for t in tensors], prologue)
    eager = _run(_eager(args, prologue), *tensors, prologue)
    fused = _run(_fused(args, prologue), *tensors, prologue)
    assert {"conv_fwd", "conv_backward"} <= set(forced_gemm), forced_gemm
    assert fused[0].is_contiguous(memory_format=memory_format) and fused[2].is_contiguous(memory_format=memory_format)
    names = ["y", "stats", "grad_x", "grad_conv_weight", "grad_bn_weight", "grad_bn_bias"]
    for name, f, e, r in zip(names, fused, eager, ref64):
        assert_2x_eager(f"{case} {name}", f, e, r, torch.float32)


def test_gemm_plain_conv_and_eval_model(forced_gemm):
    """The eval path's plain convolution (ops.conv.conv2d) and an eval ResNet-18 on the cpu backend run the
    GEMM and agree with eager PyTorch (float64: to rounding), gradients included."""
    tensors, args = _inputs("3x3_2x2map", torch.float64, torch.channels_last)
    x, cw = (t.detach().requires_grad_() for t in tensors[:2])
    y = conv2d(x, cw, backend="cpu", **args)
    y.backward(tensors[4])
    x2, cw2 = (t.detach().requires_grad_() for t in tensors[:2])
    y2 = F.conv2d(x2, cw2, None, **args)
    y2.backward(tensors[4])
    assert "conv_fwd" in forced_gemm and "conv_backward" in forced_gemm
    for a, b in ((y, y2), (x.grad, x2.grad), (cw.grad, cw2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    torch.manual_seed(0)
    eager = ref.build("resnet18", num_classes=5).double().eval()
    fused = fused_resnet.convert(copy.deepcopy(eager), backend="cpu").eval()
    img = torch.randn(2, 3, 64, 64, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(fused(img), eager(img), rtol=1e-9, atol=1e-9)


def test_gemm_resnet18_training_matches_eager_float64(forced_gemm):
    """Two SGD steps of a ResNet-18 whose small-map convolutions all run the GEMM: logits, loss, every
    gradient and the parameters after the steps agree with eager PyTorch to float64 rounding."""
    torch.manual_seed(0)
    eager = ref.build("resnet18", num_classes=5).double()
    fused = fused_resnet.convert(copy.deepcopy(eager), backend="cpu")
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        x = torch.randn(2, 3, 64, 64, generator=g, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        target = torch.randint(0, 5, (2,), generator=g)
        out = {}
        for name, m in (("eager", eager), ("fused", fused)):
            m.zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(x), target)
            loss.backward()
            out[name] = loss.detach()
        torch.testing.assert_close(out["fused"], out["eager"], rtol=1e-9, atol=1e-12)
        for (n, p), q in zip(eager.named_parameters(), fused.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-7, atol=1e-9, msg=lambda m, n=n: f"step {step} {n}: {m}")
            with torch.no_grad():
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
    assert forced_gemm.count("conv_backward") >= 4  # layer3/layer4 maps (4x4 and 2x2 at a 64x64 input)


def test_gemm_applies_only_to_small_cpu_maps():
    w = torch.empty(8, 16, 3, 3)
    args = ([1, 1], [1, 1], [1, 1])
    assert conv_gemm.applies(torch.empty(2, 16, 4, 4), w, *args, 1)
    assert not conv_gemm.applies(torch.empty(2, 16, 9, 9), w, *args, 1)                      # 81 output pixels
    assert not conv_gemm.applies(torch.empty(2, 16, 4, 4, dtype=torch.float16), w.half(), *args, 1)
    assert not conv_gemm.applies(torch.empty(2, 16, 4, 4), torch.empty(8, 8, 3, 3), *args, 2)  # groups
    assert not conv_gemm.applies(torch.empty(0, 16, 4, 4), w, *args, 1)
    big = torch.empty(4096, 512, 8, 8, device="meta")                                      # im2col > 64 MiB
    assert not conv_gemm.applies(big, torch.empty(512, 512, 3, 3, device="meta"), *args, 1)
    assert dispatch.conv_candidates("cpu", torch.empty(2, 16, 4, 4), w, *args, 1) == ("aten", "gemm")
    assert dispatch.conv_candidates("eager", torch.empty(2, 16, 4, 4), w, *args, 1) == ("aten",)


def test_cpu_choice_is_measured_once_and_cached(monkeypatch):
    monkeypatch.setattr(dispatch, "_conv_cache", {})
    x, w = torch.empty(2, 16, 2, 2), torch.empty(8, 16, 3, 3)
    args = ([1, 1], [1, 1], [1, 1], 1, True, "probe")
    timed = []

    def measure(impl):
        timed.append(impl)
        return {"aten": 2.0, "gemm": 1.0}[impl]

    assert dispatch.conv_choice("cpu", x, w, *args, measure) == "gemm"
    assert dispatch.conv_choice("cpu", x, w, *args, measure) == "gemm"
    assert sorted(timed) == ["aten", "gemm"]  # measured once
    assert list(dispatch.conv_choices().values()) == ["gemm"]
    slower = lambda impl: {"aten": 1.0, "gemm": 3.0}[impl]  # noqa: E731
    assert dispatch.conv_choice("cpu", torch.empty(3, 16, 2, 2), w, *args, slower) == "aten"
    assert dispatch.conv_choice("cpu", torch.empty(1, 16, 2, 2), w, *args, None) == "aten"  # not measurable
    try:
        dispatch.set_conv_impl("triton")  # not a candidate on the cpu backend
        assert dispatch.conv_choice("cpu", torch.empty(4, 16, 2, 2), w, *args, measure) == "aten"
        dispatch.set_conv_impl("gemm")
        assert dispatch.conv_choice("cpu", torch.empty(4, 16, 2, 2), w, *args, measure) == "gemm"
        assert dispatch.conv_choice("cpu", torch.empty(4, 16, 20, 20), w, *args, measure) == "aten"  # large map
    finally:
        dispatch.set_conv_impl(None)
    with pytest.raises(ValueError, match="gemm"):
        dispatch.set_conv_impl("winograd")
