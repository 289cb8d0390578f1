"""fused_resnet: fused conv + BatchNorm + ReLU + residual-add kernels (Triton, CUDA, C++) for ResNets.

    import fused_resnet
    model = fused_resnet.resnet50()                               # instead of torchvision.models.resnet50()
    fused_resnet.convert(torchvision_model)                       # or fuse an existing model in place
    bn = fused_resnet.nn.BatchNormAct2d(64, fuse_relu=True)      # drop-in nn.BatchNorm2d (+ add + ReLU)
    y = fused_resnet.batch_norm_act(x, rm, rv, w, b, training=True, residual=r, relu=True)
    fused_resnet.set_backend("triton")                            # or "cuda", "cpu", "eager", None (auto)
"""
import warnings

from . import backends, models, nn, ops
from .backends import (
    BackendUnavailableError,
    available_backends,
    backend_status,
    build_info,
    get_backend,
    set_backend,
)
from .models import (FusedResNet, convert, convert_sync_batchnorm, resnet18, resnet34, resnet50, resnet101,
                     resnet152, resnext50_32x4d, resnext101_32x8d, wide_resnet50_2, wide_resnet101_2)
from .nn import BatchNormAct2d
from .ops import batch_norm_act, batch_norm_finalize, batch_norm_stats

from ._version import __version__

if not backends.extension_loaded():
    warnings.warn(
        f"fused_resnet: {backends.backend_status('cpu', 'cpu')[1]}. Falling back to Triton (CUDA tensors) and eager PyTorch.",
        RuntimeWarning,
        stacklevel=2,
    )

__all__ = [
    "BackendUnavailableError", "BatchNormAct2d", "FusedResNet", "available_backends", "backend_status",
    "batch_norm_act", "batch_norm_finalize", "batch_norm_stats", "build_info", "convert", "convert_sync_batchnorm",
    "get_backend", "models", "nn", "ops", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "set_backend", "wide_resnet50_2", "wide_resnet101_2",
]
