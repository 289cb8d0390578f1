"""``convert(model)``: fuse an existing torchvision-style ResNet (or any model with recognisable
Conv2d -> BatchNorm2d (-> ReLU) patterns) in place.

Everything happens by ``__class__`` swaps on the existing module objects (BatchNorm2d -> BatchNormAct2d,
Bottleneck -> Fused<Bottleneck>, ...), so parameters, buffers, hooks, state_dict keys and optimizer state stay
valid. What is not recognised is left untouched and listed in the report with the reason.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..nn.batch_norm import BatchNormAct2d
from .fused_blocks import FusedBasicBlockMixin, FusedBottleneckMixin, FusedResNetMixin, fused_class

logger = logging.getLogger("fused_resnet")

_BN_TYPES = (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d)


@dataclass
class ConversionReport:
    fused: list = field(default_factory=list)    # "name: pattern"
    skipped: list = field(default_factory=list)  # "name: reason"

    def __str__(self) -> str:
        lines = [f"fused_resnet.convert: fused {len(self.fused)} pattern(s), left {len(self.skipped)} as they are"]
        lines += [f"  fused    {f}" for f in self.fused]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


def _is_bn(m) -> bool:
    return type(m) in _BN_TYPES


def _children(m: nn.Module) -> dict:
    return dict(m.named_children())


def _block_kind(m: nn.Module) -> Optional[str]:
    """'bottleneck' / 'basic' when m has exactly torchvision's block children (so its forward is known)."""
    ch = _children(m)
    names = set(ch)
    ds = ch.get("downsample")
    ds_ok = ds is None or (isinstance(ds, nn.Sequential) and len(ds) == 2 and isinstance(ds[0], nn.Conv2d)
                           and _is_bn(ds[1]))
    if not ds_ok:
        return None
    bottleneck = {"conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"}
    basic = {"conv1", "bn1", "conv2", "bn2", "relu"}
    if names - {"downsample"} == bottleneck and type(m).__name__.endswith("Bottleneck"):
        kind, bns = "bottleneck", ("bn1", "bn2", "bn3")
    elif names - {"downsample"} == basic and type(m).__name__.endswith("BasicBlock"):
        kind, bns = "basic", ("bn1", "bn2")
    else:
        return None
    convs_ok = all(isinstance(ch[f"conv{i}"], nn.Conv2d) for i in range(1, len(bns) + 1))
    return kind if convs_ok and all(_is_bn(ch[b]) for b in bns) else None


def _is_resnet(m: nn.Module) -> bool:
    ch = _children(m)
    need = {"conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"}
    return (set(ch) == need and type(m).__name__.endswith("ResNet") and isinstance(ch["conv1"], nn.Conv2d)
            and _is_bn(ch["bn1"]))


def _convert_block(block: nn.Module, kind: str, backend, name: str, report: ConversionReport) -> None:
    if kind == "bottleneck":
        BatchNormAct2d.fuse_(block.bn1, fuse_relu=True, backend=backend)
        BatchNormAct2d.fuse_(block.bn2, fuse_relu=True, backend=backend)
        BatchNormAct2d.fuse_(block.bn3, fuse_relu=True, backend=backend)
        block.__class__ = fused_class(type(block), FusedBottleneckMixin)
        pattern = "Bottleneck: bn1+relu+conv2, bn2+relu+conv3, bn3+add+relu"
    else:
        BatchNormAct2d.fuse_(block.bn1, fuse_relu=True, backend=backend)
        BatchNormAct2d.fuse_(block.bn2, fuse_relu=True, backend=backend)
        block.__class__ = fused_class(type(block), FusedBasicBlockMixin)
        pattern = "BasicBlock: bn1+relu+conv2, bn2+add+relu"
    if block.downsample is not None:
        BatchNormAct2d.fuse_(block.downsample[1], fuse_relu=False, backend=backend)
        pattern += ", downsample conv+bn"
    report.fused.append(f"{name}: {pattern}")


def _convert_sequential(seq: nn.Sequential, backend, name: str, report: ConversionReport) -> set:
    """Conv2d -> BN (-> ReLU) runs inside a Sequential; returns the indices handled."""
    handled = set()
    items = list(seq._modules.items())
    for i in range(len(items) - 1):
        (_, conv), (bn_key, bn) = items[i], items[i + 1]
        if not (isinstance(conv, nn.Conv2d) and _is_bn(bn)):
            continue
        relu = i + 2 < len(items) and type(items[i + 2][1]) is nn.ReLU
        BatchNormAct2d.fuse_(bn, fuse_relu=relu, backend=backend)
        handled.update({bn_key})
        if relu:
            relu_key = items[i + 2][0]
            seq._modules[relu_key] = nn.Identity()  # no parameters: state_dict keys unchanged
            handled.add(relu_key)
        report.fused.append(f"{name}.{bn_key}: conv+bn{'+relu' if relu else ''}".lstrip("."))
    return handled


def _convert(module: nn.Module, name: str, backend, report: ConversionReport) -> None:
    if _is_resnet(module):
        BatchNormAct2d.fuse_(module.bn1, fuse_relu=True, backend=backend)
        module.__class__ = fused_class(type(module), FusedResNetMixin)
        report.fused.append(f"{name or '(model)'}: stem conv1+bn1+relu")
        for child in ("layer1", "layer2", "layer3", "layer4", "fc"):
            _convert(getattr(module, child), f"{name}.{child}".lstrip("."), backend, report)
        return
    kind = _block_kind(module)
    if kind is not None:
        _convert_block(module, kind, backend, name, report)
        return
    handled = _convert_sequential(module, backend, name, report) if isinstance(module, nn.Sequential) else set()
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}".lstrip(".")
        if child_name in handled:
            continue
        if type(child) in (nn.BatchNorm2d, nn.SyncBatchNorm):
            report.skipped.append(f"{full}: BatchNorm2d not preceded by a Conv2d in a Sequential or a known block")
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, BatchNormAct2d):
            report.skipped.append(f"{full}: {type(child).__name__} is not a 2-D BatchNorm fused_resnet handles")
        else:
            _convert(child, full, backend, report)


def convert(model: nn.Module, backend: Optional[str] = None, sync_bn: Optional[bool] = None,
            process_group=None, verbose: bool = False) -> nn.Module:
    """Fuse ``model`` in place and return it.

    Recognised: torchvision's ResNet family (stem, BasicBlock, Bottleneck, downsample) and Conv2d ->
    BatchNorm2d (-> ReLU) runs inside nn.Sequential. Other BatchNorms are listed as skipped in
    ``model.fused_resnet_report`` (printed when ``verbose``, logged to the "fused_resnet" logger).
    ``sync_bn=True`` synchronises the statistics of every fused BatchNorm over ``process_group`` (default: the
    world) under torch.distributed, as nn.SyncBatchNorm; nn.SyncBatchNorm modules keep syncing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_resnet.convert expects an nn.Module, got {type(model).__name__}")
    report = ConversionReport()
    _convert(model, "", backend, report)
    if sync_bn is not None or process_group is not None:
        convert_sync_batchnorm(model, process_group, enabled=sync_bn if sync_bn is not None else True)
    model.fused_resnet_report = report
    logger.info("%s", report)
    if verbose:
        print(report)
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None, enabled: bool = True) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm for fused models: every BatchNormAct2d all-reduces its statistics
    (and their gradients) over ``process_group`` (default: the world) in training. In place; returns model."""
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            m.sync = enabled
            m.process_group = process_group
    return model
