"""Fused operators: the op contract (custom ops), autograd and the functional API, one module per family."""
from .batch_norm import batch_norm_act, batch_norm_finalize, batch_norm_stats, merge_stats
from .bn_act_maxpool import batch_norm_act_maxpool
from .conv import batch_norm_act_conv, batch_norm_act_conv2d_stats, conv2d_bias_act, conv2d_stats

__all__ = ["batch_norm_act", "batch_norm_act_conv", "batch_norm_act_conv2d_stats", "batch_norm_act_maxpool",
           "batch_norm_finalize", "batch_norm_stats", "conv2d_bias_act", "conv2d_stats", "merge_stats"]
