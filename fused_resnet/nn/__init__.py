"""nn.Modules built on the fused ops."""
from .batch_norm import BatchNormAct2d

__all__ = ["BatchNormAct2d"]
