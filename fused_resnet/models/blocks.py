"""Forward passes of torchvision-style ResNet modules on fused ops, as mixins, and the classes that carry them.

A fused block is the original block class with a fused forward mixed in (``fused_class``): same children
(conv1, bn1, ..., downsample.0/1), parameters, buffers and state_dict keys. So a block converts in place
(``__class__`` swap), keeping every parameter and optimizer state, and ``isinstance(block, Bottleneck)``
stays true.

Training (and eval without running statistics), [stats] marking a convolution's statistics epilogue:
    stem        conv1 [stats] -> [bn1 + ReLU + maxpool]
    Bottleneck  conv1 [stats] -> [bn1 + ReLU -> conv2 [stats]] -> [bn2 + ReLU -> conv3 [stats]]
                -> [bn3 + residual + ReLU], the downsample conv [stats] -> bn
    BasicBlock  conv1 [stats] -> [bn1 + ReLU -> conv2 [stats]] -> [bn2 + residual + ReLU]
    Sequential  every BatchNorm followed by a ReLU -> [bn + ReLU]
[bn + ReLU -> conv] applies the BatchNorm and ReLU in the convolution's prologue (ops/conv.py; with the
Triton convolutions the normalised activation never reaches memory); it and [bn + ReLU + maxpool] recompute
it in backward instead of keeping it; each BatchNorm takes its statistics from the convolution before it.
Eval with running statistics: every BatchNorm of a block is folded into its convolution (models/fold.py),
and bias + residual + ReLU run as one fused pass after the convolution.

The fused forward runs only when it computes exactly what the original forward would, decided on every call:
each module it replaces (the convolutions, BatchNorms, ReLU and pool it reads directly) is exactly of the
class whose forward it reproduces, and nothing observes or changes its call (no forward / backward hooks on it
or globally, no parametrization, which covers pruning and weight_norm). Otherwise the original class's forward
runs, through every module's own ``__call__``: slower, still right.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from .. import backends
from .._modules import no_global_hooks, unobserved
from ..nn.batch_norm import batch_norm_arguments, is_batch_norm_2d
from ..ops.batch_norm import batch_norm_act
from ..ops.bn_act_maxpool import batch_norm_act_maxpool
from ..ops.conv import batch_norm_act_conv2d_stats, conv2d_stats
from .fold import can_fold, conv_bias_act

# ---------------------------------------------------------------------------------------------------------
# Is a module's computation other than its class's stock forward? (Whether its call is observed:
# fused_resnet/_modules.py.)


def fusable_conv(m) -> bool:
    """An nn.Conv2d whose weight the fused ops may read directly: exactly nn.Conv2d (no subclass forward),
    zero padding given as numbers, no bias."""
    return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str) and m.bias is None


def fusable_bn(m) -> bool:
    """A 2-D BatchNorm that computes exactly nn.BatchNorm2d's function (no fused ReLU of its own)."""
    return is_batch_norm_2d(m) and not getattr(m, "fuse_relu", False)


def fusable_relu(m) -> bool:
    return type(m) is nn.ReLU


def fusable_maxpool(m) -> bool:
    return type(m) is nn.MaxPool2d and not m.return_indices


# The checks of each forward: the module's class is right and nothing observes or changes its call.
def plain_conv(m) -> bool:
    return fusable_conv(m) and unobserved(m)


def plain_bn(m) -> bool:
    return fusable_bn(m) and unobserved(m)


def plain_relu(m) -> bool:
    return fusable_relu(m) and unobserved(m)


def plain_maxpool(m) -> bool:
    return fusable_maxpool(m) and unobserved(m)


# ---------------------------------------------------------------------------------------------------------
# Fused steps on modules' tensors. A convolution feeding a BatchNorm returns that BatchNorm's statistics from
# its epilogue (``stats``), and the BatchNorm takes them instead of reducing its input again.


def conv_stats(conv: nn.Conv2d, x: Tensor, bn_after: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """(conv(x), statistics of it for ``bn_after``), on bn_after's backend."""
    return conv2d_stats(x, conv.weight, conv.stride, conv.padding, conv.dilation, conv.groups,
                        backend=getattr(bn_after, "backend", None))


def bn_relu_conv_stats(bn: nn.BatchNorm2d, x: Tensor, stats: Tensor, conv: nn.Conv2d) -> tuple[Tensor, Tensor]:
    """(conv(relu(bn(x))), its statistics): bn + ReLU in the convolution's prologue, never stored."""
    return batch_norm_act_conv2d_stats(x, conv_weight=conv.weight, stride=conv.stride, padding=conv.padding,
                                       dilation=conv.dilation, groups=conv.groups, relu=True, stats=stats,
                                       **batch_norm_arguments(bn, x))


def bn_act(bn: nn.BatchNorm2d, x: Tensor, residual: Optional[Tensor] = None, relu: bool = True,
           stats: Optional[Tensor] = None) -> Tensor:
    """relu?(bn(x) [+ residual]) in one fused pass (``stats``: x's, from the convolution that produced it)."""
    return batch_norm_act(x, residual=residual, relu=relu, stats=stats, **batch_norm_arguments(bn, x))


def bn_relu_maxpool(bn: nn.BatchNorm2d, x: Tensor, pool: nn.MaxPool2d, stats: Optional[Tensor] = None) -> Tensor:
    """pool(relu(bn(x))) keeping neither the pool's input nor its argmax indices for backward."""
    return batch_norm_act_maxpool(x, kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                                  dilation=pool.dilation, ceil_mode=pool.ceil_mode, relu=True, stats=stats,
                                  **batch_norm_arguments(bn, x))


class _GlobalAvgPool(torch.autograd.Function):
    """x.mean((2, 3), keepdim=True) whose backward hands on a channels_last-shaped gradient: grad / HW expanded
    over (H, W), a stride-0 view with unit channel stride, which the BatchNorm kernels read as channels_last.
    (ATen's adaptive_avg_pool2d and mean backwards return a dense NCHW gradient, which would send the last
    BatchNorm of a channels_last model down its strided path.)"""

    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        return (grad / (ctx.shape[2] * ctx.shape[3])).expand(ctx.shape)


def global_avg_pool(pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(x)`` for the ResNet head: the channels_last-preserving pool for an unobserved
    nn.AdaptiveAvgPool2d(1), the module's own call otherwise."""
    if type(pool) is nn.AdaptiveAvgPool2d and pool.output_size in (1, (1, 1)) and unobserved(pool):
        return _GlobalAvgPool.apply(x)
    return pool(x)


def _plain_conv_bn(m) -> bool:
    """An unobserved nn.Sequential(Conv2d, BatchNorm) (torchvision's downsample) that may be folded."""
    return (isinstance(m, nn.Sequential) and type(m).forward in (nn.Sequential.forward, FusedSequentialMixin.forward)
            and len(m) == 2 and plain_conv(m[0]) and plain_bn(m[1]) and unobserved(m))


def _identity_eval(block, x: Tensor) -> Tensor:
    ds = block.downsample
    if ds is None:
        return x
    if _plain_conv_bn(ds) and can_fold(ds[1]):
        return conv_bias_act(x, ds[0], ds[1], relu=False)
    return ds(x)


def _identity_train(block, x: Tensor) -> Tensor:
    ds = block.downsample
    if ds is None:
        return x
    if _plain_conv_bn(ds):  # fused (an nn.SyncBatchNorm synchronises through it, on CPU too)
        y, stats = conv_stats(ds[0], x, ds[1])
        return bn_act(ds[1], y, relu=False, stats=stats)
    return ds(x)


# ---------------------------------------------------------------------------------------------------------
# Mixins. Each class made by fused_class(base, mixin) has ``_fused_base`` (the original class, whose forward
# is the fallback) and ``_fused_mixin``.


class FusedBottleneckMixin:
    """forward of torchvision's Bottleneck (conv1/bn1/conv2/bn2/conv3/bn3/relu/downsample) on fused ops."""

    def _fusable(self) -> bool:
        return (no_global_hooks() and plain_conv(self.conv1) and plain_conv(self.conv2) and plain_conv(self.conv3)
                and plain_bn(self.bn1) and plain_bn(self.bn2) and plain_bn(self.bn3) and plain_relu(self.relu))

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self._fused_base.forward(self, x)
        if can_fold(self.bn1) and can_fold(self.bn2) and can_fold(self.bn3):
            out = conv_bias_act(x, self.conv1, self.bn1)
            out = conv_bias_act(out, self.conv2, self.bn2)
            return conv_bias_act(out, self.conv3, self.bn3, residual=_identity_eval(self, x))
        y1, s1 = conv_stats(self.conv1, x, self.bn1)
        y2, s2 = bn_relu_conv_stats(self.bn1, y1, s1, self.conv2)
        y3, s3 = bn_relu_conv_stats(self.bn2, y2, s2, self.conv3)
        return bn_act(self.bn3, y3, residual=_identity_train(self, x), stats=s3)


class FusedBasicBlockMixin:
    """forward of torchvision's BasicBlock (conv1/bn1/conv2/bn2/relu/downsample) on fused ops."""

    def _fusable(self) -> bool:
        return (no_global_hooks() and plain_conv(self.conv1) and plain_conv(self.conv2) and plain_bn(self.bn1)
                and plain_bn(self.bn2) and plain_relu(self.relu))

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self._fused_base.forward(self, x)
        if can_fold(self.bn1) and can_fold(self.bn2):
            out = conv_bias_act(x, self.conv1, self.bn1)
            return conv_bias_act(out, self.conv2, self.bn2, residual=_identity_eval(self, x))
        y1, s1 = conv_stats(self.conv1, x, self.bn1)
        y2, s2 = bn_relu_conv_stats(self.bn1, y1, s1, self.conv2)
        return bn_act(self.bn2, y2, residual=_identity_train(self, x), stats=s2)


class FusedResNetMixin:
    """forward of torchvision's ResNet (stem conv1/bn1/relu/maxpool, layer1-4, avgpool, fc) on fused ops; the
    layers, the pool and the classifier run through their own ``__call__``."""

    def _fusable(self) -> bool:
        return no_global_hooks() and plain_conv(self.conv1) and plain_bn(self.bn1) and plain_relu(self.relu)

    def extra_repr(self) -> str:
        # What runs for the model's tensors where they are now: "backend=auto->triton", "backend=cpu", ...
        where = next((t.device for t in (self.bn1.weight, self.conv1.weight) if t is not None), "cpu")
        return f"backend={backends.describe(getattr(self.bn1, 'backend', None), where)}"

    def forward(self, x: Tensor) -> Tensor:
        if not self._fusable():
            return self._fused_base.forward(self, x)
        if can_fold(self.bn1):
            x = self.maxpool(conv_bias_act(x, self.conv1, self.bn1))
        else:
            y, stats = conv_stats(self.conv1, x, self.bn1)
            if plain_maxpool(self.maxpool):
                x = bn_relu_maxpool(self.bn1, y, self.maxpool, stats)  # recomputed in backward
            else:  # a replaced pool (nn.Identity in CIFAR-style stems) runs through its own __call__
                x = self.maxpool(bn_act(self.bn1, y, stats=stats))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(global_avg_pool(self.avgpool, x), 1))


class FusedSequentialMixin:
    """nn.Sequential's forward, with each BatchNorm that is followed by a ReLU run as one fused [bn + ReLU] pass.
    Every child keeps its class and meaning, so slices (``seq[:2]``, a pre-ReLU feature tap), indexing and
    edits after convert() compute what they hold."""

    def forward(self, x):
        modules = list(self._modules.values())
        fuse = no_global_hooks()
        i = 0
        while i < len(modules):
            m = modules[i]
            if fuse and i + 1 < len(modules) and plain_bn(m) and plain_relu(modules[i + 1]):
                x = bn_act(m, x, relu=True)
                i += 2
            else:
                x = m(x)
                i += 1
        return x


MIXINS = (FusedResNetMixin, FusedBottleneckMixin, FusedBasicBlockMixin, FusedSequentialMixin)

# ---------------------------------------------------------------------------------------------------------
# Fused classes


def _rebuild(base: type, mixin: type):
    """Unpickling: the fused class of (base, mixin), made again in a process that has not converted anything."""
    cls = fused_class(base, mixin)
    return cls.__new__(cls)


def _reduce_ex(self, protocol):
    # Pickled as (base class, mixin) plus the module state: the class itself is made at run time, in no module.
    return _rebuild, (self._fused_base, self._fused_mixin), self.__getstate__()


_FUSED_CLASSES: dict = {}


def register_fused_class(cls: type, base: type, mixin: type) -> type:
    """Declare ``cls`` (an importable class deriving from ``mixin`` and ``base``) as the fused class of base."""
    cls._fused_base, cls._fused_mixin = base, mixin
    _FUSED_CLASSES[(base, mixin)] = cls
    return cls


def fused_class(cls: type, mixin: type) -> type:
    """``cls`` with ``mixin``'s forward, cached so that every converted instance of cls shares one class. A class
    made here pickles by (cls, mixin), so whole models save and load (torch.save / torch.load)."""
    if issubclass(cls, mixin):
        return cls
    key = (cls, mixin)
    if key not in _FUSED_CLASSES:
        made = type(f"Fused{cls.__name__}", (mixin, cls),
                    {"__module__": cls.__module__, "__qualname__": f"Fused{cls.__qualname__}",
                     "__reduce_ex__": _reduce_ex})
        register_fused_class(made, cls, mixin)
    return _FUSED_CLASSES[key]


class FusedSequential(FusedSequentialMixin, nn.Sequential):
    """nn.Sequential with BatchNorm + ReLU pairs fused (what convert() makes of a Sequential with such pairs)."""


register_fused_class(FusedSequential, nn.Sequential, FusedSequentialMixin)
