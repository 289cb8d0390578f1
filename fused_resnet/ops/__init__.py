"""Fused operators: the op contract (custom ops), dispatch to implementations, and the functional API."""
from .batch_norm import batch_norm_act, batch_norm_stats, batch_norm_finalize

__all__ = ["batch_norm_act", "batch_norm_stats", "batch_norm_finalize"]
