"""Forward passes of torchvision-style ResNet modules on fused ops, as mixins.

A fused block is the torchvision block class with this forward mixed in: same children (conv1, bn1, ...,
downsample.0/1), parameters, buffers and state_dict keys; its BatchNorm2d children are BatchNormAct2d. So a
block converts in place (``__class__`` swap), keeping every parameter and optimizer state, and
``isinstance(block, torchvision.models.resnet.Bottleneck)`` stays true.

Training (and eval without running statistics):
    stem        conv1 -> [bn1 + ReLU + maxpool]
    Bottleneck  conv1 -> [bn1 + ReLU + conv2] -> [bn2 + ReLU + conv3] -> [bn3 + residual + ReLU]
    BasicBlock  conv1 -> [bn1 + ReLU + conv2] -> [bn2 + residual + ReLU]
where [bn + ReLU + conv] (BatchNormAct2d.forward_conv) and [bn + ReLU + maxpool] (forward_maxpool) recompute
the ReLU output (and the pool's indices) in backward instead of keeping them, and the statistics come from the
fused reduction.
Eval with running statistics: every BatchNorm is folded into its convolution (weight scaled per output
channel, bias = shift), and bias + residual + ReLU run as one fused pass after the convolution.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import backends
from ..nn.batch_norm import BatchNormAct2d
from ..ops.batch_norm import bn_act_call
from ..ops.layout import acc_dtype_of


def _can_fold(bn: BatchNormAct2d) -> bool:
    return not bn.training and bn.track_running_stats and bn.running_mean is not None


def _fold_key(conv: nn.Conv2d, bn: BatchNormAct2d) -> tuple:
    tensors = [conv.weight, bn.running_mean, bn.running_var] + ([bn.weight, bn.bias] if bn.affine else [])
    return tuple((t._version, t.data_ptr(), t.dtype, t.device) for t in tensors) + (bn.eps,)


def folded_conv_bn(conv: nn.Conv2d, bn: BatchNormAct2d) -> tuple[Tensor, Tensor]:
    """(weight, bias) of the convolution with the (eval) BatchNorm after it folded in:
    weight * s per output channel and bias - running_mean * s, with s = gamma / sqrt(running_var + eps).

    Computed with differentiable ops while autograd records (gradients reach the conv and BN parameters) and
    under torch.compile; cached otherwise, keyed on the version counters and storage of every tensor involved,
    so an optimizer step, load_state_dict or a training pass that moves the running statistics refolds."""
    caching = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
    if caching:
        key = _fold_key(conv, bn)
        cached = bn.__dict__.get("_fused_fold")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
    acc = torch.float64 if conv.weight.dtype == torch.float64 else torch.float32
    with torch.autocast(conv.weight.device.type, enabled=False):
        scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
        if bn.affine:
            scale = scale * bn.weight.to(acc)
        weight = conv.weight * scale.to(conv.weight.dtype).view(-1, 1, 1, 1)
        bias = -bn.running_mean.to(acc) * scale
        if bn.affine:
            bias = bias + bn.bias.to(acc)
    if caching:
        bn.__dict__["_fused_fold"] = (key, weight, bias)
    return weight, bias


_UNIT = {}


def _unit_scale(c: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(zeros, ones) per channel, so that bn_act applies just bias (+ residual) (+ ReLU)."""
    if torch.compiler.is_compiling():
        return torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype)
    key = (c, device, dtype)
    if key not in _UNIT:
        # Never inference tensors (were the first call under torch.inference_mode): a later eval forward
        # with autograd recording saves these for backward, which inference tensors refuse.
        with torch.inference_mode(False):
            _UNIT[key] = (torch.zeros(c, device=device, dtype=dtype), torch.ones(c, device=device, dtype=dtype))
    return _UNIT[key]


def conv_bias_act(x: Tensor, conv: nn.Conv2d, bn: BatchNormAct2d, residual: Optional[Tensor] = None,
                  relu: bool = True) -> Tensor:
    """Eval: relu?(conv(x) with ``bn`` folded in [+ residual]): the convolution (ATen/cuDNN), then bias,
    residual and ReLU in one fused elementwise pass."""
    weight, bias = folded_conv_bn(conv, bn)
    y = conv._conv_forward(x, weight, None)
    zeros, ones = _unit_scale(y.shape[1], y.device, acc_dtype_of(y))
    if residual is not None and residual.dtype != y.dtype:
        residual = residual.to(y.dtype)
    return bn_act_call(y, zeros, ones, None, bias, residual, None, relu, backends.resolve(bn.backend, y.device),
                       None)


def _downsample(block, x: Tensor, fold: bool) -> Tensor:
    ds = block.downsample
    if ds is None:
        return x
    if fold and _is_conv_bn(ds) and _can_fold(ds[1]):
        return conv_bias_act(x, ds[0], ds[1], relu=False)
    return ds(x)


def _is_conv_bn(m: nn.Module) -> bool:
    return (isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d)
            and isinstance(m[1], BatchNormAct2d))


class FusedBottleneckMixin:
    """forward of torchvision's Bottleneck (conv1/bn1/conv2/bn2/conv3/bn3/downsample) on fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if _can_fold(self.bn1) and _can_fold(self.bn2) and _can_fold(self.bn3):
            out = conv_bias_act(x, self.conv1, self.bn1)
            out = conv_bias_act(out, self.conv2, self.bn2)
            return conv_bias_act(out, self.conv3, self.bn3, residual=_downsample(self, x, True))
        out = self.bn1.forward_conv(self.conv1(x), self.conv2)
        out = self.bn2.forward_conv(out, self.conv3)
        return self.bn3(out, residual=_downsample(self, x, False))


class FusedBasicBlockMixin:
    """forward of torchvision's BasicBlock (conv1/bn1/conv2/bn2/downsample) on fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if _can_fold(self.bn1) and _can_fold(self.bn2):
            out = conv_bias_act(x, self.conv1, self.bn1)
            return conv_bias_act(out, self.conv2, self.bn2, residual=_downsample(self, x, True))
        out = self.bn1.forward_conv(self.conv1(x), self.conv2)
        return self.bn2(out, residual=_downsample(self, x, False))


class FusedResNetMixin:
    """forward of torchvision's ResNet (stem conv1/bn1/relu/maxpool, layer1-4, avgpool, fc) on fused ops."""

    def forward(self, x: Tensor) -> Tensor:
        if _can_fold(self.bn1):
            x = self.maxpool(conv_bias_act(x, self.conv1, self.bn1))
        elif isinstance(self.maxpool, nn.MaxPool2d):
            x = self.bn1.forward_maxpool(self.conv1(x), self.maxpool)  # BN + ReLU + pool, recomputed in backward
        else:
            x = self.maxpool(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


_FUSED_CLASSES: dict = {}


def fused_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin``'s forward, cached so that every converted instance of cls shares one class."""
    if issubclass(cls, mixin):
        return cls
    key = (cls, mixin)
    if key not in _FUSED_CLASSES:
        _FUSED_CLASSES[key] = type(f"Fused{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _FUSED_CLASSES[key]
