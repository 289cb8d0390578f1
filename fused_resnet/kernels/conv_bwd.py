"""Backward convolutions as NHWC implicit GEMMs, then their launchers.

dgrad: the gradient of the convolution's input a (the prologue's output when a BatchNorm was fused in):
    da[m, c] = sum over (r, s, k) of dy[pixel_out(m, r, s), k] * w[k, c, r, s]
    rows m = input pixels (n, h, w); columns c = input channels of one group; reduction over the R * S taps
    times the output channels of the group. Output pixel (ho, wo) = ((h + pad - r * dil) / stride, ...)
    contributes only when the division is exact and in range (stride 2: masked taps, dilation: spread taps).
    The BatchNorm backward of the prologue (ReLU mask, dscale/dshift, dx) then runs on da in the BatchNorm
    kernels (ops/conv.py).

wgrad: the gradient of the weight, with the prologue recomputed from the saved pre-BatchNorm tensor x:
    dw[k, c, r, s] = sum over output pixels p of dy[p, k] * a[pixel_in(p, r, s), c],  a = prologue(x)
    rows k = output channels of one group; columns (r, s, c-block) = one filter tap and a block of input
    channels; reduction over the N * Ho * Wo output pixels, split into SPLITS contiguous ranges (split-K).
    The recomputed operand a lives only in registers (it goes into tl.dot from there); each split writes an
    fp32 partial, and a second kernel sums the splits in a fixed order (deterministic, no atomics).

Addressing and dtypes as kernels/conv_fwd.py: per-tensor (n, c, h, w) strides, int64 offsets, fp32
accumulation, DOT_PRECISION for fp32 inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import conv_configs
from .batch_norm import _sum_partials
from .conv_fwd import _apply_prologue, _nchw_strides, _pixel_coords, _prologue_consts, _tap, dot_precision


@triton.jit
def _conv_dgrad_kernel(
    dy_ptr, w_ptr, dx_ptr,
    x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, part_ptr,   # BN_REDUCE: the prologue's BatchNorm; part fp32
    M, H, W, Ho, Wo, C, C_g, K_g, num_n_g,                     #            [num_m_tiles, 2, C]
    sd_n, sd_c, sd_h, sd_w, sw_k, sw_c, sw_r, sw_s, sx_n, sx_c, sx_h, sx_w, sp_n, sp_c, sp_h, sp_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BN_REDUCE: tl.constexpr, RELU_MASK: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program: a tile of input pixels x a tile of input channels of one group (grouped program order).

    BN_REDUCE (the convolution had a BatchNorm + ReLU prologue): the epilogue, with the tile of da in
    registers, reads the pre-BatchNorm x (strides sp_*) at the same positions, applies the ReLU mask of the
    forward's prologue (recomputed with its expression), stores dz = da * mask instead of da, and writes the
    tile's partial (sum dz, sum dz * xhat) per input channel: the BatchNorm backward's reduction pass,
    fused (cuDNN's dgrad + dReLU + dBN fusion). Rows past M contribute nothing."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = num_n_g * (C // C_g)
    # Grouped order (Triton's matmul tutorial): GROUP_M row tiles share each column tile while it is hot.
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pm = first_m + (pid % width) % group_rows
    pn = (pid % width) // group_rows
    g = pn // num_n_g
    cloc = (pn - g * num_n_g) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask_out = cloc < C_g
    cin = g * C_g + cloc

    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    n_i, h, w = _pixel_coords(rows, H, W)
    dy_base = dy_ptr + n_i.to(tl.int64) * sd_n
    karange = tl.arange(0, BLOCK_K)
    num_kb = tl.cdiv(K_g, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kk in range(0, R * S * num_kb):
        r, s, kb = _tap(kk, num_kb, S)
        oh_num = h + pad_h - r * dil_h
        ow_num = w + pad_w - s * dil_w
        oh = oh_num // stride_h
        ow = ow_num // stride_w
        inside = (rmask & (oh_num >= 0) & (ow_num >= 0) & (oh * stride_h == oh_num) & (ow * stride_w == ow_num)
                  & (oh < Ho) & (ow < Wo))
        kloc = kb * BLOCK_K + karange
        kmask = kloc < K_g
        kout = g * K_g + kloc
        a = tl.load(dy_base[:, None] + oh.to(tl.int64)[:, None] * sd_h + ow.to(tl.int64)[:, None] * sd_w
                    + kout.to(tl.int64)[None, :] * sd_c, mask=inside[:, None] & kmask[None, :], other=0.0)
        b = tl.load(w_ptr + kout.to(tl.int64)[:, None] * sw_k + cloc.to(tl.int64)[None, :] * sw_c
                    + r * sw_r + s * sw_s, mask=kmask[:, None] & cmask_out[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    omask = rmask[:, None] & cmask_out[None, :]
    if BN_REDUCE:
        xv = tl.load(x_ptr + n_i.to(tl.int64)[:, None] * sp_n + (h * sp_h + w * sp_w)[:, None]
                     + (cin * sp_c)[None, :], mask=omask, other=0.0).to(tl.float32)
        mean, scale, beta = _prologue_consts(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, cin, cmask_out,
                                             HAS_BN_WEIGHT, HAS_BN_BIAS)
        if RELU_MASK:
            acc = tl.where((xv - mean[None, :]) * scale[None, :] + beta[None, :] > 0, acc, 0.0)
        acc = tl.where(omask, acc, 0.0)
        invstd = tl.load(invstd_ptr + cin, mask=cmask_out, other=0.0).to(tl.float32)
        xhat = (xv - mean[None, :]) * invstd[None, :]
        out = part_ptr + pm.to(tl.int64) * 2 * C + cin
        tl.store(out, tl.sum(acc, 0), mask=cmask_out)
        tl.store(out + C, tl.sum(acc * xhat, 0), mask=cmask_out)
    tl.store(dx_ptr + n_i.to(tl.int64)[:, None] * sx_n + h[:, None] * sx_h + w[:, None] * sx_w
             + cin.to(tl.int64)[None, :] * sx_c, acc.to(dx_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _conv_wgrad_kernel(
    dy_ptr, x_ptr, part_ptr,                      # part: fp32 [SPLITS, K, R, S, C_g] (the split's sum)
    mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr,
    P, H, W, Ho, Wo, K, C_g, K_g, num_m_g, num_n, rows_per_split,
    sd_n, sd_c, sd_h, sd_w, sx_n, sx_c, sx_h, sx_w,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    R: tl.constexpr, S: tl.constexpr,
    PROLOGUE: tl.constexpr, RELU_IN: tl.constexpr, HAS_BN_WEIGHT: tl.constexpr, HAS_BN_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Program (tile, split): tile = (group, output-channel tile, tap rs, input-channel tile); split = a
    contiguous range of output pixels. A = dy^T [BLOCK_M channels, BLOCK_K pixels]; B = a [BLOCK_K pixels,
    BLOCK_N channels], the prologue applied in registers."""
    tile = tl.program_id(0)
    split = tl.program_id(1)
    num_rs_n = R * S * num_n
    gm = tile // num_rs_n                                             # group * num_m_g + m tile
    rest = tile - gm * num_rs_n
    rs = rest // num_n
    pn = rest - rs * num_n
    g = gm // num_m_g
    pm = gm - g * num_m_g
    r = rs // S
    s = rs - r * S
    kloc = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    kmask = kloc < K_g
    kout = g * K_g + kloc
    cloc = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cloc < C_g
    cin = g * C_g + cloc
    if PROLOGUE:
        mean, scale, beta = _prologue_consts(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, cin, cmask,
                                             HAS_BN_WEIGHT, HAS_BN_BIAS)
    p_begin = split * rows_per_split
    p_end = tl.minimum(p_begin + rows_per_split, P)
    parange = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p0 in range(p_begin, p_end, BLOCK_K):
        p = p0 + parange
        pmask = p < p_end
        n_i, oh, ow = _pixel_coords(p, Ho, Wo)
        ih = oh * stride_h - pad_h + r * dil_h
        iw = ow * stride_w - pad_w + s * dil_w
        inside = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        n64 = n_i.to(tl.int64)
        dy_t = tl.load(dy_ptr + n64[None, :] * sd_n + oh.to(tl.int64)[None, :] * sd_h
                       + ow.to(tl.int64)[None, :] * sd_w + kout.to(tl.int64)[:, None] * sd_c,
                       mask=kmask[:, None] & pmask[None, :], other=0.0)
        valid = inside[:, None] & cmask[None, :]
        a = tl.load(x_ptr + n64[:, None] * sx_n + ih.to(tl.int64)[:, None] * sx_h + iw.to(tl.int64)[:, None] * sx_w
                    + cin.to(tl.int64)[None, :] * sx_c, mask=valid, other=0.0)
        if PROLOGUE:
            a = _apply_prologue(a, valid, mean, scale, beta, RELU_IN)
        acc = tl.dot(dy_t, a, acc, input_precision=DOT_PRECISION)
    # part[split, k, r, s, c] (contiguous): the weight gradient in (K, R, S, C_g) order, channels_last weights.
    out = (part_ptr + split.to(tl.int64) * K * R * S * C_g + kout.to(tl.int64)[:, None] * (R * S * C_g)
           + rs * C_g + cloc[None, :])
    tl.store(out, acc, mask=kmask[:, None] & cmask[None, :])


# ---------------------------------------------------------------------------------------------------------
# Launchers


def _dgrad(grad_out: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups: int,
           dtype: torch.dtype, memory_format, bn: Optional[tuple]) -> tuple[Tensor, Optional[Tensor]]:
    N, C, H, W = input_shape
    K, C_g, R, S = weight.shape
    _, _, Ho, Wo = grad_out.shape
    K_g = K // groups
    dx = torch.empty(input_shape, dtype=dtype, device=grad_out.device, memory_format=memory_format)
    M = N * H * W
    if M == 0 or C == 0 or K == 0 or grad_out.numel() == 0:
        sums = torch.zeros((2, C), dtype=torch.float32, device=grad_out.device) if bn is not None else None
        return (dx.zero_() if M and C else dx), sums
    conv_configs.check_int32_indexing("dgrad", M, grad_out, dx, *(() if bn is None else (bn[0],)))
    cfg = conv_configs.dgrad_config(grad_out, M, C_g, K_g, fused_bn=bn is not None)
    num_n_g = triton.cdiv(C_g, cfg.block_n)
    num_m_tiles = triton.cdiv(M, cfg.block_m)
    if bn is not None:
        x, mean, invstd, bn_weight, bn_bias, relu = bn
        part = torch.empty((num_m_tiles, 2, C), dtype=torch.float32, device=grad_out.device)
    else:
        x = mean = invstd = bn_weight = bn_bias = None
        relu, part = False, dx
    dummy = dx
    grid = (num_m_tiles * num_n_g * groups,)
    _conv_dgrad_kernel[grid](
        grad_out, weight, dx,
        x if x is not None else dummy, mean if mean is not None else dummy, invstd if invstd is not None else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy, part,
        M, H, W, Ho, Wo, C, C_g, K_g, num_n_g,
        *_nchw_strides(grad_out), *_nchw_strides(weight), *_nchw_strides(dx),
        *(_nchw_strides(x) if x is not None else (0, 0, 0, 0)),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R, S=S, DOT_PRECISION=dot_precision(grad_out.dtype),
        BN_REDUCE=bn is not None, RELU_MASK=bool(relu), HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=8,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if bn is None:
        return dx, None
    sums = torch.empty((2, C), dtype=torch.float32, device=grad_out.device)
    _sum_partials(part, sums)
    return dx, sums


def conv_dgrad(grad_out: Tensor, weight: Tensor, input_shape, stride, padding, dilation, groups: int,
               dtype: torch.dtype, memory_format=torch.channels_last) -> Tensor:
    """Gradient of conv2d's input (shape ``input_shape``) from grad_out, in ``dtype`` and ``memory_format``."""
    return _dgrad(grad_out, weight, input_shape, stride, padding, dilation, groups, dtype, memory_format, None)[0]


def conv_dgrad_bn(grad_out: Tensor, weight: Tensor, x: Tensor, mean: Tensor, invstd: Tensor,
                  bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], relu: bool, stride, padding, dilation,
                  groups: int, memory_format=torch.channels_last) -> tuple[Tensor, Tensor]:
    """(dz, (sum dz, sum dz * xhat) float32 [2, C]) for a convolution whose input was relu?(bn(x)): dgrad with
    the ReLU mask and the BatchNorm backward's reduction in its epilogue (x: the pre-BatchNorm tensor)."""
    return _dgrad(grad_out, weight, x.shape, stride, padding, dilation, groups, x.dtype, memory_format,
                  (x, mean, invstd, bn_weight, bn_bias, relu))


def conv_wgrad(grad_out: Tensor, x: Tensor, weight_shape, stride, padding, dilation, groups: int,
               dtype: torch.dtype, prologue: Optional[tuple] = None) -> Tensor:
    """Gradient of conv2d's weight (``weight_shape``, returned in channels_last weight layout and ``dtype``),
    from grad_out and the convolution's input a = prologue(x) (recomputed, never stored)."""
    K, C_g, R, S = weight_shape
    N, C, H, W = x.shape
    _, _, Ho, Wo = grad_out.shape
    K_g = K // groups
    P = N * Ho * Wo
    if P == 0:
        return torch.zeros(weight_shape, dtype=dtype, device=x.device).contiguous(memory_format=torch.channels_last)
    conv_configs.check_int32_indexing("wgrad", max(P, N * H * W), grad_out, x)
    cfg = conv_configs.wgrad_config(x, K_g, C_g, P)
    num_m_g = triton.cdiv(K_g, cfg.block_m)
    num_n = triton.cdiv(C_g, cfg.block_n)
    tiles = groups * num_m_g * R * S * num_n
    splits = conv_configs.wgrad_splits(x.device, tiles, P, cfg.block_k)
    rows_per_split = triton.cdiv(triton.cdiv(P, splits), cfg.block_k) * cfg.block_k
    splits = triton.cdiv(P, rows_per_split)
    part = torch.empty((splits, K, R, S, C_g), dtype=torch.float32, device=x.device)
    if prologue is not None:
        mean, invstd, bn_weight, bn_bias, relu_in = prologue
    else:
        mean = invstd = bn_weight = bn_bias = None
        relu_in = False
    dummy = part
    _conv_wgrad_kernel[(tiles, splits)](
        grad_out, x, part,
        mean if mean is not None else dummy, invstd if invstd is not None else dummy,
        bn_weight if bn_weight is not None else dummy, bn_bias if bn_bias is not None else dummy,
        P, H, W, Ho, Wo, K, C_g, K_g, num_m_g, num_n, rows_per_split,
        *_nchw_strides(grad_out), *_nchw_strides(x),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        R=R, S=S, PROLOGUE=prologue is not None, RELU_IN=bool(relu_in), HAS_BN_WEIGHT=bn_weight is not None,
        HAS_BN_BIAS=bn_bias is not None, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits == 1:
        summed = part[0]
    else:
        summed = torch.empty((K, R, S, C_g), dtype=torch.float32, device=x.device)
        _sum_partials(part, summed)
    # (K, R, S, C_g) contiguous is the channels_last layout of a (K, C_g, R, S) weight.
    return summed.permute(0, 3, 1, 2).to(dtype)


__all__ = ["conv_dgrad", "conv_dgrad_bn", "conv_wgrad"]
