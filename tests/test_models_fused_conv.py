"""Fused ResNets on the fused convolutions (ops/conv.py), on CPU: the Triton backend's kernels in Triton's
interpreter (fp32, TF32 off), against eager fp32 and a float64 reference.

- one training step of a ResNet with BasicBlocks and one with Bottlenecks (stem, downsample, every block
  kind): logits and loss by the 2x-eager rule, every gradient by the same rule scaled by the whole gradient's
  norm (as test_models.py's fp32 ResNet-50 test, for the same reason: fp32 ResNets are chaotic at test sizes);
- no ATen convolution runs in that step (counted with the profiler), and every convolution took the Triton
  kernels (dispatch's choice, recorded);
- eval (folded BatchNorms, the bias + residual + ReLU epilogue) by the 2x-eager rule;
- a channels_last model hands every BatchNorm and convolution kernel channels_last tensors, forward and
  backward (the head's pooling backward included).
Sizes are small: the interpreter runs each program in numpy (about 25 s per training step at 64x64 here).
"""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import dispatch
from fused_resnet.models import torchvision_reference as ref
from helpers import assert_2x_eager

ARCHS = {"basic": (ref.BasicBlock, [1, 1, 1, 1], {}), "bottleneck": (ref.Bottleneck, [1, 1, 1, 1],
                                                                     {"width_per_group": 16})}
ATEN_CONV = ("aten::convolution", "aten::_convolution", "aten::convolution_backward", "aten::conv2d",
             "aten::mkldnn_convolution", "aten::cudnn_convolution", "aten::_slow_conv2d_forward",
             "aten::thnn_conv2d")


def _models(arch, backend):
    block, layers, kwargs = ARCHS[arch]
    torch.manual_seed(0)
    eager = ref.ResNet(block, layers, num_classes=5, **kwargs)
    fused = fused_resnet.convert(copy.deepcopy(eager), backend=backend)
    return eager, fused


def _x():
    g = torch.Generator().manual_seed(1)
    # 64x64: 8 values per channel in the last BatchNorms (at 32x32, 2: degenerate, ill-conditioned in fp32)
    return torch.randn(2, 3, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)


def _step(model, x, target):
    model.train()
    model.zero_grad(set_to_none=True)
    logits = model(x)
    loss = nn.functional.cross_entropy(logits, target)
    loss.backward()
    return dict(logits=logits.detach(), loss=loss.detach()), {n: p.grad for n, p in model.named_parameters()}


def _needs_triton():
    x = torch.empty(1, 16, 1, 1)
    if not dispatch.supports_conv("triton", x, torch.empty(16, 16, 1, 1)):
        pytest.skip("the Triton convolutions need CUDA or TRITON_INTERPRET=1")


@pytest.mark.parametrize("arch", list(ARCHS))
def test_training_step_on_the_triton_convolutions(arch, monkeypatch):
    _needs_triton()
    eager, fused = _models(arch, "triton")
    ref64 = copy.deepcopy(eager).double()
    x, target = _x(), torch.tensor([1, 3])
    chosen = []
    choice = dispatch.conv_choice
    monkeypatch.setattr(dispatch, "conv_choice", lambda *a, **k: chosen.append(choice(*a, **k)) or chosen[-1])
    with torch.profiler.profile() as prof:
        out_f, grad_f = _step(fused, x, target)
    aten = sorted({e.name for e in prof.events() if e.name in ATEN_CONV})
    assert not aten, f"ATen convolutions ran in a fused training step on the Triton backend: {aten}"
    n_convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    assert chosen.count("triton") == len(chosen) == n_convs, chosen
    out_e, grad_e = _step(eager, x, target)
    out_r, grad_r = _step(ref64, x.double(), target)
    for name in ("logits", "loss"):
        assert_2x_eager(name, out_f[name], out_e[name], out_r[name], torch.float32)
    total = torch.sqrt(sum((g ** 2).sum() for g in grad_r.values()))
    for n, g in grad_r.items():
        e_fused = ((grad_f[n].double() - g).norm() / total).item()
        e_eager = ((grad_e[n].double() - g).norm() / total).item()
        assert e_fused <= 2 * e_eager + 2e-5, f"grad {n}: fused error {e_fused:.2e} vs eager {e_eager:.2e}"
    # The BN running statistics (from the convolutions' statistics epilogues) match eager's.
    for (n, b_f), (_, b_e) in zip(fused.named_buffers(), eager.named_buffers()):
        if b_f.is_floating_point():
            torch.testing.assert_close(b_f, b_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")
    # eval: folded BatchNorms in the convolutions' bias + residual + ReLU epilogue
    with torch.no_grad():
        logits = [m.eval()(x.to(dtype)) for m, dtype in ((fused, torch.float32), (eager, torch.float32),
                                                          (ref64, torch.float64))]
    assert_2x_eager("eval logits", *logits, torch.float32)


def test_profiler_sees_aten_convolutions_off_the_fused_path():
    """The count above can fail: the cpu backend's convolutions are ATen's."""
    _, fused = _models("basic", "cpu")
    with torch.profiler.profile() as prof:
        _step(fused, _x(), torch.tensor([1, 3]))
    assert {e.name for e in prof.events()} & set(ATEN_CONV)


def test_channels_last_end_to_end(monkeypatch):
    """Every tensor a BatchNorm or convolution kernel gets in a training step of a channels_last model has unit
    channel stride (dense channels_last, or the head's stride-0 expanded gradient), forward and backward."""
    from fused_resnet import reference

    seen = []

    def recording(name, fn):
        def wrapped(*args, **kwargs):
            for i, a in enumerate(args):
                if isinstance(a, torch.Tensor) and a.dim() == 4 and a.shape[1] > 1 and a.shape[2] * a.shape[3] > 1:
                    seen.append((name, i, tuple(a.shape), a.stride()))
            return fn(*args, **kwargs)
        return wrapped

    for name in ("bn_stats", "bn_act", "bn_backward_reduce", "bn_backward_elemt", "conv_fwd", "conv_dgrad",
                 "conv_wgrad", "conv_backward"):
        monkeypatch.setattr(reference, name, recording(name, getattr(reference, name)))
    dispatch.conv_functions.cache_clear()
    try:
        _, fused = _models("bottleneck", "eager")
        fused = fused.to(memory_format=torch.channels_last)
        _step(fused, _x(), torch.tensor([1, 3]))
    finally:
        dispatch.conv_functions.cache_clear()
    assert len({s[0] for s in seen}) >= 6, sorted({s[0] for s in seen})
    strided = [s for s in seen if s[3][1] != 1]
    assert not strided, f"tensors without unit channel stride reached the kernels: {strided[:5]}"
