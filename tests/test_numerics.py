"""Numerics and argument checks (issue: drop-in you can trust, section 6), on every backend.

- float64 statistics of data with a large mean (up to 1e8 with std 1) stay as accurate as eager float64;
- float64 running statistics take momentum and eps in float64 (no fp32 drift);
- eps <= 0 in training raises ValueError, as eager does;
- double backward (create_graph=True) is right: gradgradcheck of every fused op, and a gradient penalty
  through a whole fused ResNet against eager;
- an invalid FUSED_RESNET_BACKEND is a one-line user error.
"""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import backend_device_params
from fused_resnet import batch_norm_act, batch_norm_finalize, batch_norm_stats
from fused_resnet.models import torchvision_reference as ref
from fused_resnet.nn import BatchNormAct2d
from fused_resnet.ops.conv import batch_norm_act_conv
from fused_resnet.ops.bn_act_maxpool import batch_norm_act_maxpool
from helpers import rel_err


@pytest.mark.parametrize("mean", [1e5, 1e6, 1e8])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_float64_statistics_with_a_large_mean(backend_device, mean):
    """Pattern: float64 data far from zero (mean 1e5 to 1e8, std 1). Today raw sums cancel: 1e-4 error at
    1e6, garbage at 1e8, while eager float64 stays below 2e-8."""
    backend, device = backend_device
    torch.manual_seed(0)
    x = (torch.randn(4, 6, 20, 20, dtype=torch.float64) + mean).to(device)
    var_ref, mean_ref = torch.var_mean(x.cpu(), dim=(0, 2, 3), correction=0)  # two-pass, float64
    stats = batch_norm_stats(x, backend=backend)
    m, invstd = batch_norm_finalize(stats, eps=0.0, dtype=torch.float64, backend=backend)
    var = invstd.cpu() ** -2
    assert ((var - var_ref).abs() / var_ref).max().item() < 1e-6, f"variance {var} vs {var_ref}"
    assert ((m.cpu() - mean_ref).abs()).max().item() < 1e-6
    bn, eager = BatchNormAct2d(6, backend=backend).double().to(device), nn.BatchNorm2d(6).double().to(device)
    y, y_eager = bn(x), eager(x)
    err = (y - y_eager).abs().max().item()
    assert err < 1e-6, f"normalised output differs from eager float64 by {err:.2e}"
    torch.testing.assert_close(bn.running_var, eager.running_var, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bn.running_mean, eager.running_mean, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_float64_running_statistics_take_momentum_and_eps_in_float64(backend_device):
    """Pattern: a float64 model. Today the Triton finalize gets momentum and eps as fp32 scalars, so the
    running statistics drift by about 2e-8 per update and invstd carries eps's fp32 rounding."""
    backend, device = backend_device
    torch.manual_seed(0)
    kwargs = dict(momentum=0.1, eps=1e-3)
    bn = BatchNormAct2d(5, backend=backend, **kwargs).double().to(device)
    eager = nn.BatchNorm2d(5, **kwargs).double().to(device)
    for step in range(10):
        x = (torch.randn(2, 5, 4, 4, dtype=torch.float64) * 0.03 + step).to(device)
        torch.testing.assert_close(bn(x), eager(x), rtol=1e-12, atol=1e-12, msg=lambda m: f"step {step}: {m}")
    torch.testing.assert_close(bn.running_mean, eager.running_mean, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(bn.running_var, eager.running_var, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_non_positive_eps_raises_in_training(backend_device, eps):
    """Pattern: eps <= 0. Eager raises ValueError in training; fused accepted it and gave NaN on a constant
    channel. In eval, eager accepts it, and so do we."""
    backend, device = backend_device
    x = torch.randn(2, 3, 4, 4, device=device)
    with pytest.raises(ValueError, match="eps must be positive"):
        BatchNormAct2d(3, eps=eps, backend=backend).to(device)(x)
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm_act(x, None, None, training=True, eps=eps, backend=backend)
    with pytest.raises(ValueError, match="eps must be positive"):
        batch_norm_act_conv(x, None, None, None, None, True, 0.1, eps, torch.randn(4, 3, 1, 1, device=device),
                            backend=backend)
    bn = BatchNormAct2d(3, eps=0.0, backend=backend).to(device).eval()
    torch.testing.assert_close(bn(x), nn.BatchNorm2d(3, eps=0.0).to(device).eval()(x))


def _gradgrad_inputs(device, residual, training):
    g = torch.Generator().manual_seed(3)
    shape = (2, 3, 3, 4)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) + 0.3).to(device).requires_grad_()
    w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    b = (torch.rand(3, generator=g, dtype=torch.float64) - 0.5).to(device).requires_grad_()
    r = torch.randn(shape, generator=g, dtype=torch.float64).to(device).requires_grad_() if residual else None
    rm = torch.rand(3, dtype=torch.float64, generator=g).to(device)
    rv = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5).to(device)
    return x, w, b, r, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("residual", [False, True], ids=["", "residual"])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_double_backward_bn_act(backend_device, residual, training):
    """Pattern: gradient penalties (WGAN-GP, R1), MAML and Hessian-vector products. Today the cpu backend
    returns a second derivative of exactly 0 and eager is wrong in training."""
    backend, device = backend_device
    x, w, b, r, rm, rv = _gradgrad_inputs(device, residual, training)

    def f(x, w, b, *res):
        return batch_norm_act(x, rm.clone(), rv.clone(), w, b, training=training, residual=res[0] if res else None,
                              relu=True, backend=backend)

    inputs = (x, w, b) + ((r,) if residual else ())
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_double_backward_bn_act_conv_and_maxpool(backend_device, training):
    backend, device = backend_device
    x, w, b, _, rm, rv = _gradgrad_inputs(device, False, training)
    cw = torch.randn(2, 3, 3, 3, dtype=torch.float64, device=device).requires_grad_()

    def conv(x, w, b, cw):
        return batch_norm_act_conv(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, cw, padding=1,
                                   backend=backend)

    def pool(x, w, b):
        return batch_norm_act_maxpool(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-5, kernel_size=2,
                                      stride=1, padding=0, backend=backend)

    assert torch.autograd.gradgradcheck(conv, (x, w, b, cw), eps=1e-6, atol=1e-5)
    assert torch.autograd.gradgradcheck(pool, (x, w, b), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradient_penalty_through_a_fused_resnet(training):
    """An R1-style penalty ||dL/dx||^2 through a whole fused ResNet-18, float64: the penalty's parameter
    gradients equal eager's."""
    torch.manual_seed(0)
    eager = ref.build("resnet18", num_classes=3).double()
    fused = fused_resnet.convert(copy.deepcopy(eager))
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)  # 8 values per channel in the last BatchNorms
    grads = []
    for m in (fused, eager):
        m.train(training)
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(m(xi).square().sum(), xi, create_graph=True)
        gx.square().sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[1].items():
        err = rel_err(grads[0][n], g)
        assert err <= 1e-8, f"{n}: error {err:.2e} of the penalty's gradient"


def test_invalid_backend_environment_is_a_user_error():
    """Pattern: a typo in FUSED_RESNET_BACKEND. Today `fused-resnet check` prints a traceback and exits 1
    (the 'checks failed' code)."""
    env = {**os.environ, "FUSED_RESNET_BACKEND": "garbage"}
    out = subprocess.run([sys.executable, "-m", "fused_resnet", "check", "--device", "cpu", "--no-model"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr and "FUSED_RESNET_BACKEND" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # The library imports, and the first op that resolves a backend says what is wrong.
    code = ("import torch, fused_resnet\n"
            "try:\n    fused_resnet.batch_norm_act(torch.randn(2, 3, 4, 4), None, None, training=True)\n"
            "except ValueError as e:\n    print('ValueError', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "ValueError" in out.stdout and "FUSED_RESNET_BACKEND" in out.stdout, out
