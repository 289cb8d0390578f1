"""The fused ResNet family with torchvision's builders, signatures, initialisation and state_dict keys.

    model = fused_resnet.resnet50()          # instead of torchvision.models.resnet50()

A fused model is built exactly like the eager reference (same module tree, same initialisation, so the same
random state gives the same weights) and then fused in place by ``convert``. Checkpoints move freely between
the two (and torchvision) with ``strict=True``.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import torchvision_reference as ref
from .convert import convert
from .blocks import FusedBasicBlockMixin, FusedBottleneckMixin, FusedResNetMixin, register_fused_class


class FusedBasicBlock(FusedBasicBlockMixin, ref.BasicBlock):
    """The reference BasicBlock with its fused forward."""


class FusedBottleneck(FusedBottleneckMixin, ref.Bottleneck):
    """The reference Bottleneck with its fused forward."""


# convert() turns the reference blocks into these named (importable) classes.
register_fused_class(FusedBasicBlock, ref.BasicBlock, FusedBasicBlockMixin)
register_fused_class(FusedBottleneck, ref.Bottleneck, FusedBottleneckMixin)


_REFERENCE_BLOCK = {FusedBasicBlock: ref.BasicBlock, FusedBottleneck: ref.Bottleneck,
                    ref.BasicBlock: ref.BasicBlock, ref.Bottleneck: ref.Bottleneck}


def _check_norm_layer(norm_layer: Optional[Callable[..., nn.Module]]) -> None:
    if norm_layer is None:
        return
    probe = norm_layer(8)
    if type(probe) not in (nn.BatchNorm2d, nn.SyncBatchNorm):
        raise ValueError(f"fused_resnet fuses BatchNorm: norm_layer must build nn.BatchNorm2d (e.g. "
                         f"functools.partial(nn.BatchNorm2d, eps=1e-3)), got {type(probe).__name__}; for other "
                         "normalisations use torchvision's model")


class FusedResNet(FusedResNetMixin, ref.ResNet):
    """torchvision's ``ResNet(block, layers, num_classes, zero_init_residual, groups, width_per_group,
    replace_stride_with_dilation, norm_layer)`` with fused BatchNorm/add/ReLU, plus:

    backend: implementation of the fused ops ("triton", "cuda", "cpu", "eager"; None: the process-wide
        choice, else the fastest available on the input's device).
    sync_bn: synchronise BatchNorm statistics across processes (torch.distributed), like nn.SyncBatchNorm.
    """

    def __init__(self, block: type, layers: list[int], num_classes: int = 1000, zero_init_residual: bool = False,
                 groups: int = 1, width_per_group: int = 64,
                 replace_stride_with_dilation: Optional[list[bool]] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, backend: Optional[str] = None,
                 sync_bn: bool = False) -> None:
        if block not in _REFERENCE_BLOCK:
            raise ValueError(f"block must be BasicBlock or Bottleneck (fused or not), got {block!r}")
        _check_norm_layer(norm_layer)
        super().__init__(_REFERENCE_BLOCK[block], layers, num_classes, zero_init_residual, groups, width_per_group,
                         replace_stride_with_dilation, norm_layer)
        convert(self, backend=backend, sync_bn=sync_bn or None)
        if self.fused_resnet_report.skipped:  # cannot happen for the builders' own modules
            raise RuntimeError(f"fused_resnet: internal error: unfused modules\n{self.fused_resnet_report}")


# convert() of a reference ResNet makes it a FusedResNet (its __init__ is not run by a class swap).
register_fused_class(FusedResNet, ref.ResNet, FusedResNetMixin)


CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar", ".pkl", ".safetensors")


def _names_a_file(weights: Any) -> bool:
    """Whether ``weights`` is meant as a file: a path object, or a string with a folder separator, a leading
    "~" or ".", or a checkpoint suffix. torchvision's names ("IMAGENET1K_V2", "ResNet50_Weights.DEFAULT") have
    none of these."""
    if isinstance(weights, os.PathLike):
        return True
    if not isinstance(weights, str):
        return False
    separators = [s for s in (os.sep, os.altsep, "/") if s]
    return (any(s in weights for s in separators) or weights.startswith(("~", "."))
            or os.path.splitext(weights)[1].lower() in CHECKPOINT_SUFFIXES)


def load_weights(model: nn.Module, weights: Any, progress: bool = True) -> None:
    """Load ``weights`` into ``model`` with strict=True. weights: a state_dict, a path to one (torch.save), or a
    torchvision weights enum / its name (e.g. ResNet50_Weights.IMAGENET1K_V2, "IMAGENET1K_V2"), which needs
    torchvision and network access to download. A path that does not exist raises FileNotFoundError."""
    if isinstance(weights, Mapping):
        state_dict = weights
    elif isinstance(weights, (str, os.PathLike)) and os.path.isfile(os.path.expanduser(weights)):
        state_dict = torch.load(os.path.expanduser(weights), map_location="cpu", weights_only=True)
    elif _names_a_file(weights):
        path = os.path.abspath(os.path.expanduser(os.fspath(weights)))
        if os.path.isdir(path):
            raise IsADirectoryError(f"fused_resnet: weights={os.fspath(weights)!r} is a folder, not a checkpoint file")
        raise FileNotFoundError(f"fused_resnet: weights={os.fspath(weights)!r}: no such file ({path})")
    elif hasattr(weights, "get_state_dict") or isinstance(weights, str):
        state_dict = _torchvision_state_dict(model, weights, progress)
    else:
        raise TypeError(f"fused_resnet: weights must be a state_dict, a path or a torchvision weights enum, got "
                        f"{type(weights).__name__}")
    model.load_state_dict(state_dict, strict=True)


def _torchvision_state_dict(model, weights, progress):
    try:
        import torchvision.models as tvm
    except Exception as exc:  # torchvision missing or broken (it has no CPU build for every torch)
        raise RuntimeError(
            f"fused_resnet: weights={weights!r} is no file here, so it must name torchvision weights, but "
            f"torchvision cannot be imported ({exc}). Pass a state_dict or the path of a downloaded .pth file "
            "instead.") from exc
    if isinstance(weights, str):
        enum_name = f"{getattr(model, '_fused_resnet_arch', 'ResNet50')}_Weights"
        try:
            weights = tvm.get_weight(weights if "." in weights else f"{enum_name}.{weights}")
        except Exception as exc:
            raise ValueError(f"fused_resnet: unknown torchvision weights {weights!r}") from exc
    try:
        return weights.get_state_dict(progress=progress, check_hash=True)
    except Exception as exc:
        raise RuntimeError(
            f"fused_resnet: could not download {weights} ({type(exc).__name__}: {exc}). Without network access, "
            f"download {getattr(weights, 'url', 'the checkpoint')} elsewhere and pass weights=<path to the .pth "
            "file>.") from exc


_ENUM_NAMES = {"resnet18": "ResNet18", "resnet34": "ResNet34", "resnet50": "ResNet50", "resnet101": "ResNet101",
               "resnet152": "ResNet152", "resnext50_32x4d": "ResNeXt50_32X4D",
               "resnext101_32x8d": "ResNeXt101_32X8D", "wide_resnet50_2": "Wide_ResNet50_2",
               "wide_resnet101_2": "Wide_ResNet101_2"}


def _build(arch: str, weights, progress: bool, **kwargs) -> FusedResNet:
    block, layers, defaults = ref.ARCHITECTURES[arch]
    block = FusedBottleneck if block is ref.Bottleneck else FusedBasicBlock
    model = FusedResNet(block, layers, **{**defaults, **kwargs})
    model._fused_resnet_arch = _ENUM_NAMES[arch]
    if weights is not None:
        load_weights(model, weights, progress)
    return model


def resnet18(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    """ResNet-18 (torchvision.models.resnet18's signature; kwargs go to FusedResNet)."""
    return _build("resnet18", weights, progress, **kwargs)


def resnet34(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnet34", weights, progress, **kwargs)


def resnet50(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnet50", weights, progress, **kwargs)


def resnet101(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnet101", weights, progress, **kwargs)


def resnet152(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnet152", weights, progress, **kwargs)


def resnext50_32x4d(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnext50_32x4d", weights, progress, **kwargs)


def resnext101_32x8d(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("resnext101_32x8d", weights, progress, **kwargs)


def wide_resnet50_2(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("wide_resnet50_2", weights, progress, **kwargs)


def wide_resnet101_2(*, weights=None, progress: bool = True, **kwargs) -> FusedResNet:
    return _build("wide_resnet101_2", weights, progress, **kwargs)


BUILDERS = {name: globals()[name] for name in ref.ARCHITECTURES}
