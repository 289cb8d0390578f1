"""Compatibility module: ``batch_norm_act_conv`` lives in fused_resnet/ops/conv.py with the other fused
convolutions (importable from here as before)."""
from .conv import batch_norm_act_conv, conv_dtype_for

__all__ = ["batch_norm_act_conv", "conv_dtype_for"]
