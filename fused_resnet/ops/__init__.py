"""Fused operators: the op contract (custom ops), dispatch to implementations, and the functional API."""
from .batch_norm import batch_norm_act, batch_norm_finalize, batch_norm_stats, merge_stats
from .bn_act_conv import batch_norm_act_conv
from .bn_act_maxpool import batch_norm_act_maxpool

__all__ = ["batch_norm_act", "batch_norm_act_conv", "batch_norm_act_maxpool", "batch_norm_finalize",
           "batch_norm_stats", "merge_stats"]
