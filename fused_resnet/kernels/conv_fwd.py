"""Forward convolution as an NHWC implicit GEMM, with the BatchNorm around it fused in, then its launcher.

    y[m, k] = sum over (r, s, c) of a[pixel(m, r, s), c] * w[k, c, r, s]        (per group)

    rows m     the N * Ho * Wo output pixels, m = (n * Ho + ho) * Wo + wo
    columns k  the output channels of one group (K_g of them)
    reduction  the R * S filter taps times the C_g input channels of the group, taken as one flat loop
               kk = (r * S + s) * num_cb + cb over channel blocks cb (one loop: Triton pipelines it)

Prologue (optional): the previous BatchNorm's apply, a = relu?((x - mean) * scale + bias) with
scale = bn_weight * invstd, computed in fp32 on each A tile as it is loaded, then cast to the GEMM dtype.
Padded and out-of-range positions are forced to 0 after the transform: relu(0 * scale + bias) is not 0, so
loading 0 is not enough (the padding trap).

Epilogue, one of:
  stats   per output channel, (count, mean, m2) of the stored (rounded) output of the tile's rows, the
          BatchNorm statistics format (csrc/common/bn_math.h): an exact two-pass summary per tile in fp32,
          the tiles' summaries then merged in float64 in a fixed order (kernels/batch_norm.merge_stats).
          No atomics; rows past M never enter the sums.
  bias    eval: y = relu?(acc + bias[k] [+ residual]), the BatchNorm folded into the weights.

Addressing: every tensor brings its own strides in (n, c, h, w) order, so channels_last (s_c = 1, the fast
case: contiguous loads along channels) and contiguous NCHW both work. Each row's image base is an int64
pointer; offsets within one image (h, w, c) are int32, which holds for any image below 2^31 elements and
keeps the address arithmetic of the A tile at half the registers. Weights are read as w[k, c, r, s] with
their own strides (channels_last weights: contiguous along c).

The grid is one program per (row tile, column tile), column tiles fastest. The tile configurations per
device live in kernels/conv_configs.py; tests/test_triton_compile.py compiles every one the ResNet-50 shapes
use for sm_90 and checks registers, spills and wgmma.

Accumulation is fp32. fp32 inputs use DOT_PRECISION: "ieee" (TF32 off, as torch.backends.cudnn.allow_tf32
= False) or "tf32".
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch._prims_common import suggest_memory_format

from .._layout import conv_output_size
from . import conv_configs
from .batch_norm import merge_stats


@triton.jit
def _pixel_coords(idx, H, W):
    """(n, h, w) of flat pixel indices idx = (n * H + h) * W + w."""
    n = idx // (H * W)
    rem = idx - n * (H * W)
    h = rem // W
    return n, h, rem - h * W


@triton.jit
def _tap(kk, num_blocks, S):
    """(r, s, block) of the flat reduction index kk = (r * S + s) * num_blocks + block."""
    rs = kk // num_blocks
    r = rs // S
    return r, rs - r * S, kk - rs * num_blocks


@triton.jit
def _prologue_consts(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, cin, cmask,
                     HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr):
    """(mean, scale = weight * invstd, bias) of the previous BatchNorm for a block of input channels (fp32)."""
    mean = tl.load(mean_ptr + cin, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(invstd_ptr + cin, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BN_WEIGHT:
        scale = scale * tl.load(bnw_ptr + cin, mask=cmask, other=0.0).to(tl.float32)
    if HAS_BN_BIAS:
        beta = tl.load(bnb_ptr + cin, mask=cmask, other=0.0).to(tl.float32)
    else:
        beta = tl.zeros_like(mean)
    return mean, scale, beta


@triton.jit
def _apply_prologue(a, valid, mean, scale, beta, RELU_IN: tl.constexpr):
    """relu?((a - mean) * scale + bias) in fp32, zero where ``valid`` is false (padding, tails), in a's dtype."""
    z = (a.to(tl.float32) - mean[None, :]) * scale[None, :] + beta[None, :]
    if RELU_IN:
        z = tl.where(z < 0, 0.0, z)  # NaN propagates, as torch.relu
    return tl.where(valid, z, 0.0).to(a.dtype)


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, y_ptr, part_ptr,                # part: fp32 [num_m_tiles, 3, K] (count, mean, m2) per row tile
    mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr,       # prologue: the previous BatchNorm (per input channel)
    bias_ptr, res_ptr,                            # eval epilogue
    M, H, W, Ho, Wo, K, C_g, K_g, num_n_g,
    sx_n, sx_c, sx_h, sx_w, sw_k, sw_c, sw_r, sw_s, sy_n, sy_c, sy_h, sy_w, sr_n, sr_c, sr_h, sr_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, RELU_IN: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    STATS: tl.constexpr, BIAS: tl.constexpr, RESIDUAL: tl.constexpr, RELU_OUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program pid: row tile pm = pid // num_n, column tile pn = pid % num_n (group g, channels of the group).
    Consecutive programs share a row tile, so its activations come from L2 after the first read."""
    pid = tl.program_id(0)
    num_n = num_n_g * (K // K_g)
    pn = pid % num_n
    pm = pid // num_n
    g = pn // num_n_g
    kcol = (pn - g * num_n_g) * BLOCK_N + tl.arange(0, BLOCK_N)      # output channel within the group
    kmask = kcol < K_g
    co = g * K_g + kcol                                              # output channel
    karange = tl.arange(0, BLOCK_K)
    num_cb = tl.cdiv(C_g, BLOCK_K)

    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n_i, ho, wo = _pixel_coords(rows, Ho, Wo)
    ih0 = ho * stride_h - pad_h
    iw0 = wo * stride_w - pad_w
    x_rows = x_ptr + n_i.to(tl.int64) * sx_n                         # per-row image base (int64)
    w_cols = w_ptr + co.to(tl.int64) * sw_k
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, R * S * num_cb):
        r, s, cb = _tap(kk, num_cb, S)
        ih = ih0 + r * dil_h
        iw = iw0 + s * dil_w
        inside = rmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        cloc = cb * BLOCK_K + karange                                # input channel within the group
        cmask = cloc < C_g
        cin = g * C_g + cloc
        valid = inside[:, None] & cmask[None, :]
        a = tl.load(x_rows[:, None] + (ih * sx_h + iw * sx_w)[:, None] + (cin * sx_c)[None, :], mask=valid,
                    other=0.0)
        if PROLOGUE:
            mean, scale, beta = _prologue_consts(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, cin, cmask,
                                                 HAS_BN_WEIGHT, HAS_BN_BIAS)
            a = _apply_prologue(a, valid, mean, scale, beta, RELU_IN)
        b = tl.load(w_cols[None, :] + (cloc * sw_c)[:, None] + (r * sw_r + s * sw_s),
                    mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    omask = rmask[:, None] & kmask[None, :]
    if BIAS:
        acc += tl.load(bias_ptr + co, mask=kmask, other=0.0).to(tl.float32)[None, :]
    if RESIDUAL:
        res = tl.load(res_ptr + n_i.to(tl.int64)[:, None] * sr_n + (ho * sr_h + wo * sr_w)[:, None]
                      + (co * sr_c)[None, :], mask=omask, other=0.0)
        acc += res.to(tl.float32)
    if RELU_OUT:
        acc = tl.where(acc < 0, 0.0, acc)
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + n_i.to(tl.int64)[:, None] * sy_n + (ho * sy_h + wo * sy_w)[:, None] + (co * sy_c)[None, :],
             y, mask=omask)
    if STATS:
        # Exact two-pass summary of the stored (rounded) values of this tile; rows past M count for nothing.
        cnt = tl.sum(rmask.to(tl.float32), 0)
        t_mean = tl.sum(tl.where(omask, y.to(tl.float32), 0.0), 0) / cnt
        dev = tl.where(omask, y.to(tl.float32) - t_mean[None, :], 0.0)
        out = part_ptr + pm.to(tl.int64) * 3 * K + co
        tl.store(out, tl.zeros_like(t_mean) + cnt, mask=kmask)
        tl.store(out + K, t_mean, mask=kmask)
        tl.store(out + 2 * K, tl.sum(dev * dev, 0), mask=kmask)


# ---------------------------------------------------------------------------------------------------------
# Launcher


def _nchw_strides(t: Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 follows torch.backends.cudnn.allow_tf32 (IEEE when off, as cuDNN)."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def conv_fwd(x: Tensor, weight: Tensor, stride, padding, dilation, groups: int,
             prologue: Optional[tuple] = None, stats: bool = False, bias: Optional[Tensor] = None,
             residual: Optional[Tensor] = None, relu: bool = False) -> tuple[Tensor, Optional[Tensor]]:
    """y = conv2d(prologue(x), weight) with the chosen epilogue; returns (y, stats or None).

    prologue: None or (mean, invstd, bn_weight, bn_bias, relu) of the BatchNorm applied to x first.
    stats: also return the (count, mean, m2) float64 [3, K] statistics of y.
    bias / residual / relu: eval epilogue, relu?(conv + bias [+ residual]).
    y has x's dtype and memory format (channels_last in, channels_last out)."""
    N, C, H, W = x.shape
    K, C_g, R, S = weight.shape
    Ho, Wo = conv_output_size(H, W, R, S, stride, padding, dilation)
    K_g = K // groups
    y = torch.empty((N, K, Ho, Wo), dtype=x.dtype, device=x.device, memory_format=suggest_memory_format(x))
    M = N * Ho * Wo
    if M == 0 or K == 0:
        return y, (torch.zeros((3, K), dtype=torch.float64, device=x.device) if stats else None)
    conv_configs.check_int32_indexing("convolution", M, x, y, *(() if residual is None else (residual,)))
    cfg = conv_configs.fwd_config(x, M, K_g, C_g)
    num_n_g = triton.cdiv(K_g, cfg.block_n)
    num_m_tiles = triton.cdiv(M, cfg.block_m)
    part = torch.empty((num_m_tiles, 3, K), dtype=torch.float32, device=x.device) if stats else y
    if prologue is not None:
        mean, invstd, bn_weight, bn_bias, relu_in = prologue
    else:
        mean = invstd = bn_weight = bn_bias = None
        relu_in = False
    dummy = weight
    r_strides = _nchw_strides(residual) if residual is not None else (0, 0, 0, 0)
    grid = (num_m_tiles * num_n_g * groups,)
    _conv_fwd_kernel[grid](
        x, weight, y, part,
        mean if mean is not None else dummy, invstd if invstd is not None else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy,
        bias if bias is not None else dummy, residual if residual is not None else dummy,
        M, H, W, Ho, Wo, K, C_g, K_g, num_n_g,
        *_nchw_strides(x), *_nchw_strides(weight), *_nchw_strides(y), *r_strides,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R, S=S, PROLOGUE=prologue is not None, RELU_IN=bool(relu_in), HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None, STATS=stats, BIAS=bias is not None, RESIDUAL=residual is not None,
        RELU_OUT=relu, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if not stats:
        return y, None
    return y, merge_stats(part)


__all__ = ["conv_fwd", "dot_precision"]
