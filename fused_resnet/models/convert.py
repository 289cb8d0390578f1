"""``convert(model)``: fuse an existing torchvision-style ResNet (or Conv2d -> BatchNorm2d (-> ReLU) runs inside
an nn.Sequential) in place, without changing what the model computes.

What is fused. A module is fused only when its class computes exactly what a class fused_resnet knows computes:
its ``forward`` (and ``_forward_impl``, torchvision's ResNet's) is the very function of torchvision's ResNet,
Bottleneck or BasicBlock (looked up in ``torchvision.models.resnet`` when torchvision is imported), of the
in-tree reference (models/torchvision_reference.py), of nn.Sequential, or of fused_resnet's own fused classes.
Subclasses that only inherit it qualify; a class that overrides it, or one that merely has the same name or
the same children, does not. The children the fused forward reads directly (convolutions, BatchNorms, ReLU,
pool) must be exactly nn.Conv2d (no bias, zero padding), a 2-D BatchNorm, nn.ReLU and nn.MaxPool2d. Whatever
does not qualify is left as it is and listed in ``model.fused_resnet_report.skipped`` with the reason.

How. Everything happens by ``__class__`` swaps on the existing module objects (BatchNorm2d -> BatchNormAct2d
computing the same function, Bottleneck -> Fused<Bottleneck>, ...), so parameters, buffers, hooks,
state_dict keys and optimizer state stay valid, and every module keeps its meaning when called on its own
(``seq[:2]`` of a Sequential(conv, bn, relu) still returns pre-ReLU values). The whole model is checked first
and swapped afterwards: convert() either converts what it reports or leaves the model untouched.

At run time, the fused forwards still check on every call that nothing observes or replaces the modules they
read (hooks, parametrizations, pruning, a child swapped later), and run the original forward otherwise (see
models/blocks.py).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from typing import Optional

from torch import nn

from ..nn.batch_norm import BatchNormAct2d
from . import torchvision_reference as ref
from .blocks import (FusedBasicBlockMixin, FusedBottleneckMixin, FusedResNetMixin, FusedSequentialMixin,
                     fusable_bn, fusable_conv, fusable_relu, fused_class)

logger = logging.getLogger("fused_resnet")


@dataclass
class ConversionReport:
    fused: list = field(default_factory=list)    # "name: pattern"
    skipped: list = field(default_factory=list)  # "name: reason"

    def __str__(self) -> str:
        lines = [f"fused_resnet.convert: fused {len(self.fused)} pattern(s), left {len(self.skipped)} as they are"]
        lines += [f"  fused    {f}" for f in self.fused]
        lines += [f"  skipped  {s}" for s in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Which classes are known


_MIXIN_OF_KIND = {"resnet": FusedResNetMixin, "bottleneck": FusedBottleneckMixin, "basic": FusedBasicBlockMixin,
                  "sequential": FusedSequentialMixin}
_COMPUTE_METHODS = ("forward", "_forward_impl")  # what a module's call computes


def _known_classes() -> dict:
    """{class: kind} of the classes whose computation the fused forwards reproduce."""
    known = {ref.ResNet: "resnet", ref.Bottleneck: "bottleneck", ref.BasicBlock: "basic",
             nn.Sequential: "sequential"}
    tv = sys.modules.get("torchvision.models.resnet")  # a torchvision model implies an imported torchvision
    if tv is not None:
        for name, kind in (("ResNet", "resnet"), ("Bottleneck", "bottleneck"), ("BasicBlock", "basic")):
            cls = getattr(tv, name, None)
            if isinstance(cls, type):
                known[cls] = kind
    return known


def _same_computation(cls: type, known: type) -> bool:
    return all(getattr(cls, m, None) is getattr(known, m, None) for m in _COMPUTE_METHODS)


def _kind(cls: type) -> tuple[Optional[str], str]:
    """(kind, "") when ``cls`` computes what a known class computes, else (None, the reason)."""
    mixin = getattr(cls, "_fused_mixin", None)
    if mixin is not None and cls.forward is mixin.forward:
        # Already fused: the mixin's forward over a known base, with nothing of its own on top.
        base = cls._fused_base
        if all(getattr(cls, m, None) is getattr(base, m, None) for m in _COMPUTE_METHODS if m != "forward"):
            return _kind(base)
    known = _known_classes()
    for k, kind in known.items():
        if issubclass(cls, k) and _same_computation(cls, k):
            return kind, ""
    for k in known:
        if issubclass(cls, k):
            own = next(m for m in _COMPUTE_METHODS if getattr(cls, m, None) is not getattr(k, m, None))
            return None, (f"{cls.__name__}.{own} is its own, not {k.__module__}.{k.__qualname__}'s, so fused_resnet "
                          "cannot know what it computes")
    return None, ""


def _describe(name: str, m) -> str:
    if m is None:
        return f"{name} is missing"
    return f"{name} is a {type(m).__name__}"


def _conv_problem(name: str, m) -> Optional[str]:
    if fusable_conv(m):
        return None
    if type(m) is nn.Conv2d:
        what = "has a bias" if m.bias is not None else f"pads with {m.padding!r} / {m.padding_mode!r}"
        return f"{name} {what}"
    return f"{_describe(name, m)}, not an nn.Conv2d (the fused forward reads its weight directly)"


def _child_problems(m: nn.Module, kind: str) -> list:
    """Why the fused forward of ``kind`` cannot replace m's forward (empty: it can)."""
    g = lambda n: getattr(m, n, None)  # noqa: E731
    problems = []
    convs, bns = {"resnet": (("conv1",), ("bn1",)), "bottleneck": (("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3")),
                  "basic": (("conv1", "conv2"), ("bn1", "bn2"))}[kind]
    problems += [p for p in (_conv_problem(n, g(n)) for n in convs) if p]
    problems += [f"{_describe(n, g(n))}, not a 2-D BatchNorm without a ReLU of its own" for n in bns
                 if not fusable_bn(g(n))]
    if not fusable_relu(g("relu")):
        problems.append(f"{_describe('relu', g('relu'))}, not an nn.ReLU")
    if kind == "resnet":  # maxpool may be any module (nn.Identity in CIFAR-style stems): it is called
        problems += [f"{n} is missing" for n in ("maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc")
                     if not isinstance(g(n), nn.Module)]
    elif not hasattr(m, "downsample"):
        problems.append("it has no downsample attribute")
    elif g("downsample") is not None and not isinstance(g("downsample"), nn.Module):
        problems.append(f"downsample is a {type(g('downsample')).__name__}, not a module")
    return problems


# ---------------------------------------------------------------------------------------------------------
# Planning (checks only) and applying (swaps only)


class _Plan:
    """The swaps convert() will make, collected while nothing is changed yet."""

    def __init__(self, backend):
        self.backend = backend
        self.report = ConversionReport()
        self.bns: list = []       # BatchNorms to become BatchNormAct2d (computing the same function)
        self.classes: list = []   # (module, fused class)
        self.seen: set = set()

    def fuse_bn(self, bn) -> None:
        if id(bn) not in self.seen:
            self.seen.add(id(bn))
            self.bns.append(bn)

    def apply(self) -> None:
        undo = []
        try:
            for bn in self.bns:
                undo.append((bn, bn.__class__, {k: bn.__dict__[k] for k in ("fuse_relu", "backend", "sync",
                                                                              "process_group") if k in bn.__dict__}))
                BatchNormAct2d.fuse_(bn, fuse_relu=False,
                                     backend=self.backend if self.backend is not None else getattr(bn, "backend", None))
            for module, cls in self.classes:
                undo.append((module, module.__class__, {}))
                module.__class__ = cls
        except BaseException:
            for obj, cls, attrs in reversed(undo):
                obj.__class__ = cls
                for k in ("fuse_relu", "backend", "sync", "process_group"):
                    obj.__dict__.pop(k, None)
                obj.__dict__.update(attrs)
            raise


def _plan_block(block: nn.Module, kind: str, name: str, plan: _Plan) -> None:
    bns = ("bn1", "bn2", "bn3") if kind == "bottleneck" else ("bn1", "bn2")
    for b in bns:
        plan.fuse_bn(getattr(block, b))
    plan.classes.append((block, fused_class(type(block), _MIXIN_OF_KIND[kind])))
    pattern = ("Bottleneck: bn1+relu+conv2, bn2+relu+conv3, bn3+add+relu" if kind == "bottleneck"
               else "BasicBlock: bn1+relu+conv2, bn2+add+relu")
    ds = block.downsample
    if (type(ds) in (nn.Sequential, fused_class(nn.Sequential, FusedSequentialMixin)) and len(ds) == 2
            and isinstance(ds[0], nn.Conv2d) and fusable_bn(ds[1])):
        plan.fuse_bn(ds[1])
        pattern += ", downsample conv+bn"
    elif ds is not None:
        _plan(ds, f"{name}.downsample", plan)
    plan.report.fused.append(f"{name}: {pattern}")


def _plan_sequential(seq: nn.Sequential, name: str, plan: _Plan) -> set:
    """Conv2d -> BatchNorm (-> ReLU) runs; returns the keys of the BatchNorms handled."""
    handled, pairs = set(), False
    items = list(seq._modules.items())
    for i in range(len(items) - 1):
        (_, conv), (bn_key, bn) = items[i], items[i + 1]
        if not (isinstance(conv, nn.Conv2d) and fusable_bn(bn)):  # (a BatchNormAct2d with its own ReLU stays)
            continue
        relu = i + 2 < len(items) and type(items[i + 2][1]) is nn.ReLU
        pairs = pairs or relu
        plan.fuse_bn(bn)
        handled.add(bn_key)
        plan.report.fused.append(f"{name}.{bn_key}: conv+bn{'+relu' if relu else ''}".lstrip("."))
    if pairs:
        plan.classes.append((seq, fused_class(type(seq), FusedSequentialMixin)))
    return handled


def _plan(module: nn.Module, name: str, plan: _Plan) -> None:
    label = name or "(model)"
    kind, reason = _kind(type(module))
    handled: set = set()
    if kind in ("resnet", "bottleneck", "basic"):
        problems = _child_problems(module, kind)
        if problems:
            plan.report.skipped.append(f"{label}: left as it is: {'; '.join(problems)}")
        elif kind == "resnet":
            plan.fuse_bn(module.bn1)
            plan.classes.append((module, fused_class(type(module), FusedResNetMixin)))
            plan.report.fused.append(f"{label}: stem conv1+bn1+relu")
            handled = {"bn1"}
        else:
            _plan_block(module, kind, name, plan)
            return
    elif kind == "sequential":
        handled = _plan_sequential(module, name, plan)
    elif reason:
        plan.report.skipped.append(f"{label}: left as it is: {reason}")
    for child_name, child in module.named_children():
        full = f"{name}.{child_name}".lstrip(".")
        if child_name in handled:
            continue
        if type(child) in (nn.BatchNorm2d, nn.SyncBatchNorm):
            plan.report.skipped.append(f"{full}: BatchNorm2d not preceded by a Conv2d in a Sequential or a known block")
        elif isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, BatchNormAct2d):
            plan.report.skipped.append(f"{full}: {type(child).__name__} is not a 2-D BatchNorm fused_resnet handles")
        else:
            _plan(child, full, plan)


def convert(model: nn.Module, backend: Optional[str] = None, sync_bn: Optional[bool] = None,
            process_group=None, verbose: bool = False) -> nn.Module:
    """Fuse ``model`` in place and return it (see the module docstring for what qualifies).

    The report, ``model.fused_resnet_report``, lists what was fused and what was left alone with the reason
    (printed when ``verbose``, logged at DEBUG to the "fused_resnet" logger). ``sync_bn=True`` synchronises the
    statistics of every fused BatchNorm over ``process_group`` (default: the world) under torch.distributed, as
    nn.SyncBatchNorm; nn.SyncBatchNorm modules keep syncing.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fused_resnet.convert expects an nn.Module, got {type(model).__name__}")
    plan = _Plan(backend)
    _plan(model, "", plan)
    plan.apply()
    if sync_bn is not None or process_group is not None:
        convert_sync_batchnorm(model, process_group, enabled=sync_bn if sync_bn is not None else True)
    model.fused_resnet_report = plan.report
    logger.debug("%s", plan.report)  # every model build converts: the report is there to ask for, not news
    if verbose:
        print(plan.report)
    return model


def convert_sync_batchnorm(model: nn.Module, process_group=None, enabled: bool = True) -> nn.Module:
    """nn.SyncBatchNorm.convert_sync_batchnorm for fused models: every BatchNormAct2d merges its statistics
    (and all-reduces their gradients) over ``process_group`` (default: the world) in training, keeping its
    class, its fused ReLU and everything else. In place; returns model."""
    for m in model.modules():
        if isinstance(m, BatchNormAct2d):
            m.sync = enabled
            m.process_group = process_group
    return model
