"""Triton kernels, one module per op family (kernels first, then their launchers).

Imported lazily by fused_resnet.backends so that `import fused_resnet` works without Triton.
"""
