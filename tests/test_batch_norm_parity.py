"""Parity of the fused BatchNorm(+residual)(+ReLU) with eager PyTorch, for every backend.

One training step (forward + backward) per case: output, grads of input/residual/weight/bias against a float64
eager reference (2x-eager rule, see helpers.py), running buffers (rtol 1e-5) and num_batches_tracked (exact).
"""
import pytest
import torch
from torch import nn

from conftest import backend_device_params, skip_unsupported
from fused_resnet.nn import BatchNormAct2d
from helpers import assert_2x_eager, make_input, random_affine

# Every C in {3, 64, 65, 129, 2048}, HxW in {1x1, 7x7, 7x9, 56x56} and N in {1, 2, 3, 32} appears.
SHAPES = [(1, 3, 56, 56), (2, 64, 7, 9), (3, 65, 7, 7), (32, 129, 1, 1), (2, 2048, 7, 7), (32, 64, 7, 7)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
MODES = {"bn": (False, False), "bn_relu": (True, False), "bn_add": (False, True), "bn_add_relu": (True, True)}


class Trio:
    """The fused module, eager PyTorch in the activation dtype, and a float64 eager reference (on CPU), all
    starting from the same parameters and buffers."""

    def __init__(self, c, backend, device, relu, **bn_kwargs):
        self.relu = relu
        self.fused = BatchNormAct2d(c, fuse_relu=relu, backend=backend, **bn_kwargs).to(device)
        self.eager = nn.BatchNorm2d(c, **bn_kwargs).to(device)
        self.ref = nn.BatchNorm2d(c, **bn_kwargs).double()
        if self.fused.affine:
            random_affine(self.fused, self.eager, self.ref, c=c)

    def train(self, mode=True):
        for m in (self.fused, self.eager, self.ref):
            m.train(mode)

    def _eager_forward(self, module, x, residual):
        y = module(x)
        if residual is not None:
            y = y + residual
        return torch.relu(y) if self.relu else y

    def step(self, x, residual, grad_out):
        """Forward + backward through all three; returns {name: (fused, eager, reference)}."""
        runs = {}
        for name, module in (("fused", self.fused), ("eager", self.eager), ("ref", self.ref)):
            to = (lambda t: t.detach().double().cpu()) if name == "ref" else (lambda t: t.detach())
            xi = to(x).requires_grad_()
            ri = None if residual is None else to(residual).requires_grad_()
            if name == "fused":
                y = module(xi, ri)
            else:
                y = self._eager_forward(module, xi, ri)
            y.backward(to(grad_out))
            runs[name] = dict(y=y, dx=xi.grad, dr=None if ri is None else ri.grad,
                              dw=None if module.weight is None else module.weight.grad.clone(),
                              db=None if module.bias is None else module.bias.grad.clone())
            if module.weight is not None:
                module.weight.grad = None
                module.bias.grad = None
        return {k: (runs["fused"][k], runs["eager"][k], runs["ref"][k]) for k in runs["fused"]}

    def check_buffers(self):
        f, r = self.fused, self.ref
        if r.running_mean is None:
            assert f.running_mean is None and f.running_var is None
            return
        torch.testing.assert_close(f.running_mean.double().cpu(), r.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(f.running_var.double().cpu(), r.running_var, rtol=1e-5, atol=1e-6)
        assert f.num_batches_tracked.item() == r.num_batches_tracked.item()


def check_step(results, dtype, x):
    y_fused = results["y"][0]
    assert y_fused.dtype == x.dtype, "output must keep the activation dtype"
    assert y_fused.shape == x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        assert y_fused.is_contiguous(memory_format=torch.channels_last), "channels_last must be kept"
    for name, (fused, eager, ref) in results.items():
        if ref is None:
            assert fused is None, f"{name}: unexpected gradient"
            continue
        assert fused is not None, f"{name}: missing gradient"
        assert_2x_eager(name, fused, eager, ref, dtype)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_train_step_parity(backend_device, shape, dtype, layout, mode):
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    relu, with_residual = MODES[mode]
    trio = Trio(shape[1], backend, device, relu)
    x = make_input(shape, dtype, device, LAYOUTS[layout])
    # The residual deliberately comes in the other layout: kernels must honour each tensor's strides.
    residual = make_input(shape, dtype, device, mean=0.0, std=1.0) if with_residual else None
    grad_out = make_input(shape, dtype, device, mean=0.0, std=1.0)
    check_step(trio.step(x, residual, grad_out), dtype, x)
    trio.check_buffers()
    assert trio.fused.running_mean.dtype == torch.float32, "buffers stay fp32 under mixed precision"
    assert trio.fused.weight.dtype == torch.float32
