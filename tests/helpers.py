"""Tolerance rule and reference runners shared by the tests.

Rule (flash-attention's): against a float64 reference, the fused result's error may be at most twice eager
PyTorch's error in the same dtype, plus a floor (fp32 1e-5, fp16 1e-3, bf16 1e-2). Errors are measured as
max |a - ref| / max |ref|, so one floor serves outputs and summed gradients alike.
"""
from __future__ import annotations

import torch

FLOOR = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    assert a.shape == ref.shape, f"shape {tuple(a.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-30)
    return ((a - ref).abs().max() / scale).item()


def assert_2x_eager(name: str, fused: torch.Tensor, eager: torch.Tensor, ref: torch.Tensor,
                    dtype: torch.dtype, floor: float | None = None) -> None:
    assert torch.isfinite(fused).all(), f"{name}: non-finite values (an unwritten or NaN-poisoned element?)"
    floor = FLOOR[dtype] if floor is None else floor
    e_fused, e_eager = rel_err(fused, ref), rel_err(eager, ref)
    bound = 2 * e_eager + floor
    assert e_fused <= bound, (f"{name}: fused error {e_fused:.3e} exceeds 2 x eager error {e_eager:.3e} "
                              f"+ floor {floor:.0e}")


def make_input(shape, dtype, device, memory_format=torch.contiguous_format, mean=0.5, std=2.0):
    """Random, never-zero input (float64 draw, rounded to dtype)."""
    x = torch.randn(shape, dtype=torch.float64) * std + mean
    return x.to(dtype).to(device).contiguous(memory_format=memory_format)


def random_affine(*modules, c: int) -> None:
    """The same random weight/bias (weight in [0.5, 1.5], bias in [-0.5, 0.5]) on every module."""
    w = torch.rand(c, dtype=torch.float64) + 0.5
    b = torch.rand(c, dtype=torch.float64) - 0.5
    with torch.no_grad():
        for m in modules:
            if m.weight is not None:
                m.weight.copy_(w)
                m.bias.copy_(b)


def grads(*tensors):
    return [None if t is None else t.grad for t in tensors]


class StandInCudaTensor:
    """What dispatch.conv_choice reads of an input (device, dtype, shape, strides, layout), on CUDA: lets its
    choice logic be tested without a GPU."""

    device = torch.device("cuda")

    def __init__(self, dtype=torch.float32, shape=(2, 16, 8, 8)):
        self.dtype, self.shape = dtype, shape

    def is_contiguous(self, memory_format=None):
        return True

    def stride(self):
        return torch.empty(self.shape, device="meta").stride()
