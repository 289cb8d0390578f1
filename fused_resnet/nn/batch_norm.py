"""BatchNorm2d fused with an optional residual add and ReLU, as a drop-in nn.BatchNorm2d."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..ops.batch_norm import batch_norm_act


class BatchNormAct2d(nn.BatchNorm2d):
    """``relu?(BatchNorm2d(x) [+ residual])`` in one fused pass (forward) and two (backward).

    A subclass of ``nn.BatchNorm2d`` with the same parameters, buffers, state_dict and training semantics
    (momentum, momentum=None, ``track_running_stats``, ``affine``, eval with running statistics), so it
    loads BatchNorm2d checkpoints and ``isinstance(m, nn.BatchNorm2d)`` code keeps working.

    Args beyond BatchNorm2d's:
        fuse_relu: apply ReLU after the (optional) residual add.
        backend: "triton", "cuda", "cpu", "eager" or None (the process-wide choice, else the fastest
            available for the input's device); see fused_resnet.backends.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, fuse_relu: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.fuse_relu = fuse_relu
        self.backend = backend

    @classmethod
    def from_batch_norm(cls, bn: nn.BatchNorm2d, fuse_relu: bool = False,
                        backend: Optional[str] = None) -> "BatchNormAct2d":
        """A fused module sharing ``bn``'s parameters and buffers (no copies: optimizer state stays valid)."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.__dict__.update({k: v for k, v in bn.__dict__.items() if k not in ("_parameters", "_buffers")})
        fused._parameters = bn._parameters
        fused._buffers = bn._buffers
        fused.fuse_relu = fuse_relu
        fused.backend = backend
        return fused

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(x)
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return batch_norm_act(
            x,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            training=use_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            residual=residual,
            relu=self.fuse_relu,
            num_batches_tracked=self.num_batches_tracked if track else None,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fuse_relu={self.fuse_relu}, backend={self.backend or 'auto'}"
