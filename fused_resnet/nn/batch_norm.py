"""BatchNorm2d fused with an optional residual add and ReLU, as a drop-in nn.BatchNorm2d."""
from __future__ import annotations

import sys
from typing import Optional

from torch import Tensor, nn

from .. import backends
from .._modules import no_global_hooks, unobserved
from ..ops.batch_norm import batch_norm_act


def sync_process_group(bn: nn.BatchNorm2d):
    """The process group whose statistics ``bn`` merges in this forward, or None: synchronized BN (an
    nn.SyncBatchNorm, or a BatchNormAct2d with ``sync``) in training mode, under torch.distributed with more
    than one process in the group, as nn.SyncBatchNorm decides."""
    if not bn.training or not (isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "sync", False)):
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = bn.process_group or dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def batch_norm_arguments(bn: nn.BatchNorm2d, x: Tensor) -> dict:
    """The arguments of the fused functional ops (``batch_norm_act`` and its conv / maxpool siblings) that make
    them compute what ``bn(x)`` computes, for an nn.BatchNorm2d, nn.SyncBatchNorm or BatchNormAct2d: batch or
    running statistics, which buffers to update, momentum, synchronisation. Counts the batch in
    num_batches_tracked as nn.BatchNorm2d's forward does, so call it once per forward."""
    bn._check_input_dim(x)
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    track = not bn.training or bn.track_running_stats
    return dict(
        running_mean=bn.running_mean if track else None,
        running_var=bn.running_var if track else None,
        weight=bn.weight,
        bias=bn.bias,
        training=use_batch_stats,
        momentum=bn.momentum,
        eps=bn.eps,
        num_batches_tracked=bn.num_batches_tracked if track else None,
        backend=getattr(bn, "backend", None),
        process_group=sync_process_group(bn) if use_batch_stats else None,
    )


def _called_by_torch_sync_converter() -> bool:
    """Whether the caller's caller is nn.SyncBatchNorm.convert_sync_batchnorm (see BatchNormAct2d.qconfig)."""
    frame = sys._getframe(2)
    return frame is not None and frame.f_code is nn.SyncBatchNorm.convert_sync_batchnorm.__func__.__code__


class BatchNormAct2d(nn.BatchNorm2d):
    """``relu?(BatchNorm2d(x) [+ residual])`` in one fused pass (forward) and two (backward).

    A subclass of ``nn.BatchNorm2d`` with the same parameters, buffers, state_dict and training semantics
    (momentum, momentum=None, ``track_running_stats``, ``affine``, eval with running statistics), so it
    loads BatchNorm2d checkpoints and ``isinstance(m, nn.BatchNorm2d)`` code keeps working. Without a residual
    and with ``fuse_relu=False`` it computes exactly what nn.BatchNorm2d computes; that is how convert() and
    the fused models use it (the fused blocks pass the ReLU and the residual to the ops themselves).

    Args beyond BatchNorm2d's:
        fuse_relu: apply ReLU after the (optional) residual add.
        backend: "triton", "cuda", "cpu", "eager" or None (the process-wide choice, else the fastest
            available for the input's device); see fused_resnet.backends.
        sync, process_group: synchronized BN (as nn.SyncBatchNorm): in training, statistics and their
            gradients are merged over ``process_group`` (default: the whole world) when torch.distributed is
            initialised with more than one process.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, fuse_relu: bool = False,
                 backend: Optional[str] = None, sync: bool = False, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.fuse_relu = fuse_relu
        self.backend = backend
        self.sync = sync
        self.process_group = process_group

    @classmethod
    def fuse_(cls, bn: nn.BatchNorm2d, fuse_relu: bool = False, backend: Optional[str] = None) -> "BatchNormAct2d":
        """Turn ``bn`` (exactly an nn.BatchNorm2d or nn.SyncBatchNorm) into a BatchNormAct2d in place: the same
        module object, parameters, buffers and hooks, so optimizer state and references stay valid."""
        if type(bn) not in (nn.BatchNorm2d, nn.SyncBatchNorm, cls):
            raise TypeError(f"fused_resnet: can only fuse nn.BatchNorm2d / nn.SyncBatchNorm, not {type(bn).__name__}")
        sync = isinstance(bn, nn.SyncBatchNorm) or getattr(bn, "sync", False)
        bn.__class__ = cls
        bn.fuse_relu, bn.backend = fuse_relu, backend
        bn.sync, bn.process_group = sync, getattr(bn, "process_group", None)
        return bn

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return batch_norm_act(x, residual=residual, relu=self.fuse_relu, **batch_norm_arguments(self, x))

    def forward_conv(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        """``conv(self(x))`` without keeping this module's output for backward (fused_resnet.ops
        batch_norm_act_conv). The plain sequence for what that op does not cover: a conv with a bias, non-zero
        padding modes or string padding, or hooks on either module (so that they fire)."""
        from ..ops.conv import batch_norm_act_conv

        if (conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
                or not (no_global_hooks() and unobserved(self) and unobserved(conv)) or type(conv) is not nn.Conv2d):
            return conv(self(x))
        return batch_norm_act_conv(x, conv_weight=conv.weight, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, groups=conv.groups, relu=self.fuse_relu,
                                   **batch_norm_arguments(self, x))

    def forward_maxpool(self, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        """``pool(self(x))`` keeping neither the pool's input nor its argmax indices for backward (the plain
        sequence for a pool returning indices, or hooks on either module)."""
        from ..ops.bn_act_maxpool import batch_norm_act_maxpool

        if (pool.return_indices or not (no_global_hooks() and unobserved(self) and unobserved(pool))
                or type(pool) is not nn.MaxPool2d):
            return pool(self(x))
        return batch_norm_act_maxpool(x, kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                                      dilation=pool.dilation, ceil_mode=pool.ceil_mode, relu=self.fuse_relu,
                                      **batch_norm_arguments(self, x))

    # nn.SyncBatchNorm.convert_sync_batchnorm (torchvision's reference script calls it for --sync-bn) replaces
    # every BatchNorm with a plain nn.SyncBatchNorm. For this module with fuse_relu=True that silently drops the
    # ReLU. The converter offers no hook, but it asks ``hasattr(module, "qconfig")`` before finishing a module:
    # this property answers that question with an error naming the converter that keeps the ReLU. Everywhere
    # else qconfig is an ordinary attribute.
    @property
    def qconfig(self):
        if self.fuse_relu and _called_by_torch_sync_converter():
            raise TypeError(
                "fused_resnet: nn.SyncBatchNorm.convert_sync_batchnorm would replace this BatchNormAct2d(fuse_relu="
                "True) with a plain nn.SyncBatchNorm and drop its ReLU; call fused_resnet.convert_sync_batchnorm("
                "model) instead (it keeps the module and synchronises its statistics)")
        try:
            return self.__dict__["qconfig"]
        except KeyError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute 'qconfig'") from None

    @qconfig.setter
    def qconfig(self, value) -> None:
        self.__dict__["qconfig"] = value

    @qconfig.deleter
    def qconfig(self) -> None:
        self.__dict__.pop("qconfig", None)

    def extra_repr(self) -> str:
        # The backend that runs for this module's tensors where they are now ("auto->cpu", "triton", ...).
        where = next((t.device for t in (self.weight, self.running_mean) if t is not None), "cpu")
        return f"{super().extra_repr()}, fuse_relu={self.fuse_relu}, backend={backends.describe(self.backend, where)}"


def is_batch_norm_2d(m: nn.Module) -> bool:
    """Exactly an nn.BatchNorm2d, nn.SyncBatchNorm or BatchNormAct2d: a module whose forward fused_resnet knows."""
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d)


__all__ = ["BatchNormAct2d", "batch_norm_arguments", "is_batch_norm_2d", "sync_process_group"]
