"""fused_resnet: fused conv + BatchNorm + ReLU + residual-add kernels (Triton, CUDA, C++) for ResNets.

    import fused_resnet
    bn = fused_resnet.nn.BatchNormAct2d(64, fuse_relu=True)      # drop-in nn.BatchNorm2d (+ add + ReLU)
    y = fused_resnet.batch_norm_act(x, rm, rv, w, b, training=True, residual=r, relu=True)
    fused_resnet.set_backend("triton")                            # or "cuda", "cpu", "eager", None (auto)
"""
import warnings

from . import backends, nn, ops
from .backends import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    build_info,
    get_backend,
    set_backend,
)
from .nn import BatchNormAct2d
from .ops import batch_norm_act, batch_norm_finalize, batch_norm_stats

__version__ = "0.1.0"

if not backends.extension_loaded():
    warnings.warn(
        f"fused_resnet: {backends.backend_status('cpu', 'cpu')[1]}. Falling back to Triton (CUDA tensors) and eager PyTorch.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "BackendUnavailableError", "BatchNormAct2d", "available_backends", "backend_status", "batch_norm_act",
    "batch_norm_finalize", "batch_norm_stats", "build_info", "get_backend", "nn", "ops", "set_backend",
]
