"""BatchNorm2d fused with an optional residual add and ReLU, as a drop-in nn.BatchNorm2d."""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..ops.batch_norm import batch_norm_act
from ..ops.bn_act_conv import batch_norm_act_conv
from ..ops.bn_act_maxpool import batch_norm_act_maxpool


class BatchNormAct2d(nn.BatchNorm2d):
    """``relu?(BatchNorm2d(x) [+ residual])`` in one fused pass (forward) and two (backward).

    A subclass of ``nn.BatchNorm2d`` with the same parameters, buffers, state_dict and training semantics
    (momentum, momentum=None, ``track_running_stats``, ``affine``, eval with running statistics), so it
    loads BatchNorm2d checkpoints and ``isinstance(m, nn.BatchNorm2d)`` code keeps working.

    Args beyond BatchNorm2d's:
        fuse_relu: apply ReLU after the (optional) residual add.
        backend: "triton", "cuda", "cpu", "eager" or None (the process-wide choice, else the fastest
            available for the input's device); see fused_resnet.backends.
        sync, process_group: synchronized BN (as nn.SyncBatchNorm): in training, statistics and their
            gradients are all-reduced over ``process_group`` (default: the whole world) when
            torch.distributed is initialised with more than one process.
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

    def _functional_args(self, x: Tensor) -> dict:
        """nn.BatchNorm2d's forward logic: count the batch, pick batch or running statistics and buffers."""
        self._check_input_dim(x)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return dict(
            running_mean=self.running_mean if track else None,
            running_var=self.running_var if track else None,
            weight=self.weight,
            bias=self.bias,
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            relu=self.fuse_relu,
            num_batches_tracked=self.num_batches_tracked if track else None,
            backend=self.backend,
            process_group=self._sync_group() if use_batch_stats else None,
        )

    def _sync_group(self):
        """The process group to synchronise statistics over (synchronized BN), or None."""
        if not getattr(self, "sync", False):
            return None
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return batch_norm_act(x, residual=residual, **self._functional_args(x))

    def forward_conv(self, x: Tensor, conv: nn.Conv2d) -> Tensor:
        """``conv(self(x))`` without keeping this module's output for backward (it is recomputed).
        Falls back to the plain sequence for convolutions the fused op does not cover (bias, non-zero
        padding modes, string padding)."""
        if conv.bias is not None or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            return conv(self(x))
        return batch_norm_act_conv(x, conv_weight=conv.weight, stride=conv.stride, padding=conv.padding,
                                   dilation=conv.dilation, groups=conv.groups, **self._functional_args(x))

    def forward_maxpool(self, x: Tensor, pool: nn.MaxPool2d) -> Tensor:
        """``pool(self(x))`` keeping neither the pool's input nor its argmax indices for backward."""
        if pool.return_indices:
            return pool(self(x))
        return batch_norm_act_maxpool(x, kernel_size=pool.kernel_size, stride=pool.stride, padding=pool.padding,
                                      dilation=pool.dilation, ceil_mode=pool.ceil_mode, **self._functional_args(x))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fuse_relu={self.fuse_relu}, backend={self.backend or 'auto'}"
