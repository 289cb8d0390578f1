"""Tile configurations of the convolution kernels, per pass, device and problem size.

On a GPU: Hopper-sized tiles (128 x 128 x 64 for 16-bit inputs, 8 warps, 4 stages: 4 x 32 KiB of shared
memory for the A and B tiles, within sm_90's 227 KiB), narrowed for narrow problems (64 channels, grouped
convolutions, the 3-channel stem). Every configuration the launchers can choose for the ResNet-50 shapes at
batch 256 is compiled for sm_90 in CI (tests/test_triton_compile.py: registers, spills, wgmma).

Under TRITON_INTERPRET=1 (the CPU tests) one fixed small configuration: the interpreter runs programs one at
a time in numpy, where big tiles only cost time.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from .. import _layout


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


INTERPRET_CONFIG = Config(128, 128, 64, 4, 1)


def check_int32_indexing(what: str, rows: int, *tensors: torch.Tensor) -> None:
    """A ValueError (instead of wrapped int32 offsets, silently wrong) beyond int32_indexing_fits;
    fused_resnet.dispatch sends such convolutions to ATen before they get here."""
    if not _layout.int32_indexing_fits(rows, *((t.shape, t.stride()) for t in tensors)):
        raise ValueError(f"fused_resnet: the Triton {what} kernel indexes pixel rows and in-image offsets in int32: "
                         f"{rows} rows, tensors {[tuple(t.shape) for t in tensors]} exceed 2^31 (use ATen for "
                         f"this convolution: FUSED_RESNET_CONV=aten, or split the batch)")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def gpu_tiles(device: torch.device) -> bool:
    """Whether launches on ``device`` use the GPU configurations (the compile check forces them for meta
    tensors, to compile exactly what a GPU would run)."""
    return device.type == "cuda" and not interpreting()


def fma_dot(dtype: torch.dtype) -> bool:
    """fp32 with TF32 off (torch.backends.cudnn.allow_tf32 False): tl.dot in IEEE fp32 has no tensor-core
    instruction and runs as FMAs on the CUDA cores, where the tensor-core tiles spill (128 x 128 wgrad: 6.5 KB
    of stack per thread on sm_90): such launches take the FMA_* tiles below instead. The same condition as
    kernels/conv_fwd.py's dot_precision(dtype) == "ieee" for fp32."""
    return dtype == torch.float32 and not torch.backends.cudnn.allow_tf32


FMA_TILE = 64   # rows and columns at most
FMA_K = 16
# Warps and stages per pass: the combination without spills at the ResNet-50 shapes on sm_90 under both
# Triton 3.9 and 3.6 (tests/test_triton_compile.py compiles it with 3.9): dgrad at 4 warps stopped at 128
# registers with 8-24 bytes of stack, forward at 8 warps had 8-16 bytes of stack under 3.6, wgrad at 8 warps
# 8 bytes.
FMA_FWD = (4, 2)
FMA_DGRAD = (8, 2)
FMA_WGRAD = (4, 3)


def _fma(cfg: Config, warps_stages: tuple) -> Config:
    return Config(min(cfg.block_m, FMA_TILE), min(cfg.block_n, FMA_TILE), min(cfg.block_k, FMA_K), *warps_stages)


def _narrow(n: int, widest: int) -> int:
    """The column tile for n columns: n rounded up to a power of two, between 16 and ``widest``."""
    return max(16, min(widest, triton.next_power_of_2(n)))


def _k_block(dtype: torch.dtype, reduction: int) -> int:
    widest = 64 if dtype in (torch.float16, torch.bfloat16) else 32
    return max(16, min(widest, triton.next_power_of_2(reduction)))


def fwd_config(x: torch.Tensor, m: int, n: int, per_tap: int) -> Config:
    """Forward GEMM of m output pixels x n output channels (of a group); the reduction runs over the filter
    taps and, per tap, ``per_tap`` input channels (C_g), in blocks of block_k."""
    if not gpu_tiles(x.device):
        return INTERPRET_CONFIG
    block_n = _narrow(n, 128)
    block_m = 128 if block_n >= 64 else 64
    block_k = _k_block(x.dtype, max(1, per_tap))
    stages = 4 if x.dtype in (torch.float16, torch.bfloat16) else 3
    # 8 warps (two warpgroups, each issuing wgmma on 64 rows) from 128 x 64 tiles on: with 4, the BatchNorm
    # prologue's fp32 transform of the A tile pushed 128 x 64 forward tiles to 255 registers and a spill
    # (tests/test_triton_compile.py).
    cfg = Config(block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 64 else 4, stages)
    return _fma(cfg, FMA_FWD) if fma_dot(x.dtype) else cfg


def dgrad_config(grad_out: torch.Tensor, m: int, n: int, per_tap: int, fused_bn: bool = False) -> Config:
    """dgrad GEMM: m input pixels x n input channels (of a group), per tap a reduction over K_g channels.
    With the BatchNorm-backward epilogue (``fused_bn``) at most 64 columns: its x, mask and xhat tiles beside
    the accumulator spilled 128 x 128 tiles under Triton 3.6 (tests/triton_compile.py)."""
    cfg = fwd_config(grad_out, m, n, per_tap)
    if gpu_tiles(grad_out.device) and fma_dot(grad_out.dtype):
        cfg = Config(cfg.block_m, cfg.block_n, cfg.block_k, *FMA_DGRAD)
    if fused_bn and cfg.block_n > 64:
        return Config(cfg.block_m, 64, cfg.block_k, cfg.num_warps, cfg.num_stages)
    return cfg


def wgrad_config(x: torch.Tensor, k_g: int, c_g: int, pixels: int) -> Config:
    """wgrad GEMM: k_g output channels x c_g input channels per tap, reduction over the pixels (split-K)."""
    if not gpu_tiles(x.device):
        return INTERPRET_CONFIG
    block_m = _narrow(k_g, 128)
    block_n = _narrow(c_g, 128)
    block_k = 64 if x.dtype in (torch.float16, torch.bfloat16) else 32
    stages = 4 if x.dtype in (torch.float16, torch.bfloat16) else 3
    cfg = Config(block_m, block_n, block_k, 8 if block_m * block_n >= 128 * 128 else 4, stages)
    return _fma(cfg, FMA_WGRAD) if fma_dot(x.dtype) else cfg


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def wgrad_splits(device: torch.device, tiles: int, pixels: int, block_k: int) -> int:
    """Split-K factor of wgrad: enough programs for two waves, each split at least 8 pixel blocks long."""
    if not gpu_tiles(device):
        return min(2, triton.cdiv(pixels, block_k))
    want = triton.cdiv(2 * _sm_count(device), max(tiles, 1))
    return max(1, min(want, triton.cdiv(pixels, 8 * block_k)))
