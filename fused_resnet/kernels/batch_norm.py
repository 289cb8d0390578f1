"""Triton kernels of the fused BatchNorm family, then their launchers.

Contract: fused_resnet/ops/batch_norm.py (and csrc/ops.cpp). The launchers at the bottom have the same names
and signatures as the C++ ops and the eager reference, so the dispatcher can swap them.

Addressing. Every activation tensor (x, residual, out, grad_out and the outputs) is a rows x channels matrix:
row m = n*HW + hw, element (m, c) at ``n*s_n + c*s_c + hw*s_hw`` (see fused_resnet/_layout.py). Each
tensor brings its own strides, so a channels_last x may meet a contiguous residual or an expanded (stride-0)
grad_out. When ``s_n == HW*s_hw`` (every dense layout) the row offset is just ``m*s_hw`` (``ROWS_MERGED``);
otherwise n and hw are split with one division. Triton specialises strides equal to 1, so channels_last
(s_c = 1) gets contiguous, vectorised loads along channels.

Reductions (statistics, backward sums) run in two launches: a grid of (row chunk, channel block) programs
writes per-program partial results, and a second kernel combines them in a fixed order (a Chan merge of
(count, mean, m2) for the statistics, a sum for the backward). No atomics, so results are deterministic, and
a distributed merge can sit between the statistics and their use.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .._layout import INT32_LIMIT, ROW_MARGIN, acc_dtype_of, geometry, kernel_layout

# ---------------------------------------------------------------------------------------------------------
# Device helpers


@triton.jit
def _offsets(rows, cols, HW, s_n, s_c, s_hw, ROWS_MERGED: tl.constexpr):
    """[BLOCK_M, BLOCK_C] element offsets (int64) of rows x cols."""
    rows = rows.to(tl.int64)
    if ROWS_MERGED:
        row_off = rows * s_hw
    else:
        n = rows // HW
        row_off = n * s_n + (rows - n * HW) * s_hw
    return row_off[:, None] + cols.to(tl.int64)[None, :] * s_c


@triton.jit
def _channel_consts(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask,
                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr):
    """(mean, invstd, scale = weight * invstd, bias) for a block of channels (weight 1, bias 0 if absent)."""
    mean = tl.load(mean_ptr + cols, mask=cmask, other=0.0).to(ACC)
    invstd = tl.load(invstd_ptr + cols, mask=cmask, other=0.0).to(ACC)
    if HAS_WEIGHT:
        scale = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(ACC) * invstd
    else:
        scale = invstd
    if HAS_BIAS:
        beta = tl.load(b_ptr + cols, mask=cmask, other=0.0).to(ACC)
    else:
        beta = tl.zeros_like(invstd)
    return mean, invstd, scale, beta


@triton.jit
def _bn_affine(x, mean, scale, beta):
    """(x - mean) * scale + bias: the mean subtracted first keeps eager's accuracy when |mean| >> std.
    Forward and the backward's mask recomputation share it, so both round alike."""
    return (x - mean[None, :]) * scale[None, :] + beta[None, :]


@triton.jit
def _relu(z):
    # where(z < 0) rather than maximum(z, 0): NaN compares false and propagates, as in torch.relu.
    return tl.where(z < 0, 0.0, z)


# ---------------------------------------------------------------------------------------------------------
# Statistics


@triton.jit
def _bn_stats_partial_kernel(
    x_ptr, part_ptr,                      # part: float64 [P, 3, C] = (count, mean, m2)
    M, C, HW, s_n, s_c, s_hw, rows_per_prog,
    ROWS_MERGED: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (p, cb) reduces rows [p*rows_per_prog, ...) of channels cb*BLOCK_C + [0, BLOCK_C).

    Every lane (row slot i, channel c) runs its own Welford recurrence over the tiles, on values shifted
    by the chunk's first row K[c] (x - K is exact for x near K, which keeps fp32 accurate for data with a
    large mean). The lanes of a channel are then combined exactly, without cancellation:
    mean = sum_i n_i mean_i / n and m2 = sum_i m2_i + sum_i n_i (mean_i - mean)^2.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    row_begin = pid_m * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)

    first = tl.full([1], 0, tl.int32) + row_begin
    shift = tl.load(x_ptr + _offsets(first, cols, HW, s_n, s_c, s_hw, ROWS_MERGED), mask=cmask[None, :],
                    other=0.0).to(ACC)
    mean = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    m2 = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    count = tl.zeros([BLOCK_M], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rmask = rows < row_end
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + _offsets(rows, cols, HW, s_n, s_c, s_hw, ROWS_MERGED), mask=mask, other=0.0)
        x = x.to(ACC) - shift
        count += rmask.to(ACC)
        delta = x - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0)[:, None], 0.0)
        m2 += tl.where(mask, delta * (x - mean), 0.0)
    n_c = tl.sum(count, 0)
    mean_c = tl.sum(mean * count[:, None], 0) / tl.maximum(n_c, 1.0)
    spread = mean - mean_c[None, :]
    m2_c = tl.sum(m2, 0) + tl.sum(spread * spread * count[:, None], 0)

    # (count, mean, m2) in float64, the shift added back: the contract's statistics format.
    out = part_ptr + pid_m * 3 * C + cols
    tl.store(out, n_c.to(tl.float64), mask=cmask)
    tl.store(out + C, mean_c.to(tl.float64) + tl.reshape(shift, [BLOCK_C]).to(tl.float64), mask=cmask)
    tl.store(out + 2 * C, m2_c.to(tl.float64), mask=cmask)


@triton.jit
def _merge_stats_kernel(part_ptr, out_ptr, P, C, chunk, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Program (channel block, g): out[g, :, c] = the merge of the partials p in [g * chunk, (g + 1) * chunk)
    of part ([P, 3, C], (count, mean, m2), fp32 or float64), in float64, in two vectorised passes over
    [BLOCK_P, BLOCK_C] tiles in a fixed order (deterministic):
        count = sum n_i,  mean = sum n_i mean_i / count,  m2 = sum m2_i + sum n_i (mean_i - mean)^2.
    Each is a weighted mean or a sum of non-negative terms: nothing cancels. Empty partials add nothing."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    g = tl.program_id(1)
    p_begin = g * chunk
    p_end = tl.minimum(p_begin + chunk, P)
    n = tl.zeros([BLOCK_C], dtype=tl.float64)
    weighted = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(p_begin, p_end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < p_end)[:, None] & cmask[None, :]
        q = part_ptr + ps.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n_i = tl.load(q, mask=mask, other=0.0).to(tl.float64)
        mean_i = tl.load(q + C, mask=mask, other=0.0).to(tl.float64)
        n += tl.sum(n_i, 0)
        weighted += tl.sum(tl.where(n_i > 0, n_i * mean_i, 0.0), 0)
    mean = weighted / tl.where(n > 0, n, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float64)
    for p0 in range(p_begin, p_end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < p_end)[:, None] & cmask[None, :]
        q = part_ptr + ps.to(tl.int64)[:, None] * 3 * C + cols[None, :]
        n_i = tl.load(q, mask=mask, other=0.0).to(tl.float64)
        spread = tl.where(n_i > 0, tl.load(q + C, mask=mask, other=0.0).to(tl.float64) - mean[None, :], 0.0)
        m2 += tl.sum(tl.load(q + 2 * C, mask=mask, other=0.0).to(tl.float64) + n_i * spread * spread, 0)
    out = out_ptr + g.to(tl.int64) * 3 * C + cols
    tl.store(out, n, mask=cmask)
    tl.store(out + C, mean, mask=cmask)
    tl.store(out + 2 * C, m2, mask=cmask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, K, chunk, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (column block, g): out[g, k] = the sum over p in [g * chunk, (g + 1) * chunk) of part[p, k]
    (contiguous [P, K]), in the partials' dtype and a fixed order."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = ks < K
    g = tl.program_id(1)
    p_begin = g * chunk
    p_end = tl.minimum(p_begin + chunk, P)
    acc = tl.zeros([BLOCK_K], dtype=part_ptr.dtype.element_ty)
    for p0 in range(p_begin, p_end, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps < p_end)[:, None] & kmask[None, :]
        acc += tl.sum(tl.load(part_ptr + ps[:, None].to(tl.int64) * K + ks[None, :], mask=mask, other=0.0), 0)
    tl.store(out_ptr + g.to(tl.int64) * K + ks, acc, mask=kmask)


@triton.jit
def _bn_finalize_kernel(
    stats_ptr, mean_ptr, invstd_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
    C, momentum_hi, momentum_mid, momentum_lo, eps_hi, eps_mid, eps_lo,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per channel, in float64: mean, biased var = m2 / n -> invstd; running buffers updated in their own dtype.

    Triton passes Python floats as fp32 scalars, so momentum and eps arrive as three fp32 parts each
    (hi + mid + lo, see _float64_parts), summed back exactly in float64 (each part is promoted by the float64
    zeros it is added to, which works compiled and in the interpreter alike)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    zero = tl.zeros([BLOCK_C], dtype=tl.float64)
    eps = ((zero + eps_hi) + eps_mid) + eps_lo
    n = tl.load(stats_ptr + cols, mask=cmask, other=2.0)
    mean = tl.load(stats_ptr + C + cols, mask=cmask, other=0.0)
    var = tl.load(stats_ptr + 2 * C + cols, mask=cmask, other=0.0) / n
    var = tl.where(var < 0.0, 0.0, var)  # rounding guard; NaN passes
    invstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + cols, mean.to(mean_ptr.dtype.element_ty), mask=cmask)
    tl.store(invstd_ptr + cols, invstd.to(invstd_ptr.dtype.element_ty), mask=cmask)
    if UPDATE_RUNNING:
        if CUMULATIVE:  # momentum=None: cumulative average over num_batches_tracked (read on device)
            factor = 1.0 / tl.load(nbt_ptr).to(tl.float64)
        else:
            factor = ((zero + momentum_hi) + momentum_mid) + momentum_lo
        rmean = tl.load(rmean_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
        rvar = tl.load(rvar_ptr + cols, mask=cmask, other=0.0).to(tl.float64)
        seen = n > 0  # a channel nobody saw (an all-empty synchronized batch) keeps its buffers
        rmean = tl.where(seen, (1.0 - factor) * rmean + factor * mean, rmean)
        rvar = tl.where(seen, (1.0 - factor) * rvar + factor * (var * n / (n - 1.0)), rvar)
        tl.store(rmean_ptr + cols, rmean.to(rmean_ptr.dtype.element_ty), mask=cmask)
        tl.store(rvar_ptr + cols, rvar.to(rvar_ptr.dtype.element_ty), mask=cmask)


# ---------------------------------------------------------------------------------------------------------
# Forward apply


@triton.jit
def _bn_act_kernel(
    x_ptr, res_ptr, y_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr,
    M, C, HW,
    x_sn, x_sc, x_shw, r_sn, r_sc, r_shw, y_sn, y_sc, y_shw,
    X_MERGED: tl.constexpr, R_MERGED: tl.constexpr, Y_MERGED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y = relu?((x - mean) * scale + bias [+ residual]) on one BLOCK_M x BLOCK_C tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    mean, _, scale, beta = _channel_consts(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_WEIGHT, HAS_BIAS,
                                           ACC)
    x = tl.load(x_ptr + _offsets(rows, cols, HW, x_sn, x_sc, x_shw, X_MERGED), mask=mask, other=0.0).to(ACC)
    z = _bn_affine(x, mean, scale, beta)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + _offsets(rows, cols, HW, r_sn, r_sc, r_shw, R_MERGED), mask=mask, other=0.0)
        z += r.to(ACC)
    if RELU:
        z = _relu(z)
    tl.store(y_ptr + _offsets(rows, cols, HW, y_sn, y_sc, y_shw, Y_MERGED),
             z.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Backward


@triton.jit
def _dz_xhat(dy_ptr, x_ptr, out_ptr, rows, cols, mask, HW,
             dy_sn, dy_sc, dy_shw, x_sn, x_sc, x_shw, o_sn, o_sc, o_shw,
             mean, invstd, scale, beta,
             DY_MERGED: tl.constexpr, X_MERGED: tl.constexpr, O_MERGED: tl.constexpr,
             HAS_OUT: tl.constexpr, RELU: tl.constexpr, ACC: tl.constexpr):
    """dz = dy * relu mask and xhat = (x - mean) * invstd on a tile.

    The mask is out > 0 when the output was saved (a residual entered before the ReLU), else it is
    recomputed from x with the forward's own expression.
    """
    x = tl.load(x_ptr + _offsets(rows, cols, HW, x_sn, x_sc, x_shw, X_MERGED), mask=mask, other=0.0).to(ACC)
    dz = tl.load(dy_ptr + _offsets(rows, cols, HW, dy_sn, dy_sc, dy_shw, DY_MERGED), mask=mask,
                 other=0.0).to(ACC)
    if RELU:
        if HAS_OUT:
            o = tl.load(out_ptr + _offsets(rows, cols, HW, o_sn, o_sc, o_shw, O_MERGED), mask=mask, other=0.0)
            active = o.to(ACC) > 0
        else:
            active = _bn_affine(x, mean, scale, beta) > 0
        dz = tl.where(active, dz, 0.0)
    xhat = (x - mean[None, :]) * invstd[None, :]
    return dz, xhat


@triton.jit
def _bn_backward_reduce_kernel(
    dy_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, part_ptr,  # part: ACC [P, 2, C]
    M, C, HW,
    dy_sn, dy_sc, dy_shw, x_sn, x_sc, x_shw, o_sn, o_sc, o_shw, rows_per_prog,
    DY_MERGED: tl.constexpr, X_MERGED: tl.constexpr, O_MERGED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr, RELU: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Per program: sum(dz) and sum(dz * xhat) over its row chunk, accumulated lane-wise, reduced once."""
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mean, invstd, scale, beta = _channel_consts(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_WEIGHT,
                                                HAS_BIAS, ACC)
    row_begin = pid_m * rows_per_prog
    row_end = tl.minimum(row_begin + rows_per_prog, M)
    acc_dz = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    acc_dzx = tl.zeros([BLOCK_M, BLOCK_C], dtype=ACC)
    for start in range(row_begin, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        mask = (rows < row_end)[:, None] & cmask[None, :]
        dz, xhat = _dz_xhat(dy_ptr, x_ptr, out_ptr, rows, cols, mask, HW,
                            dy_sn, dy_sc, dy_shw, x_sn, x_sc, x_shw, o_sn, o_sc, o_shw,
                            mean, invstd, scale, beta, DY_MERGED, X_MERGED, O_MERGED, HAS_OUT, RELU, ACC)
        acc_dz += dz
        acc_dzx += dz * xhat
    out = part_ptr + pid_m * 2 * C + cols
    tl.store(out, tl.sum(acc_dz, 0), mask=cmask)
    tl.store(out + C, tl.sum(acc_dzx, 0), mask=cmask)


@triton.jit
def _bn_backward_elemt_kernel(
    dy_ptr, x_ptr, out_ptr, mean_ptr, invstd_ptr, w_ptr, b_ptr, sums_ptr, count_ptr, dx_ptr, dz_ptr,
    M, C, HW,
    dy_sn, dy_sc, dy_shw, x_sn, x_sc, x_shw, o_sn, o_sc, o_shw, dx_sn, dx_sc, dx_shw, dz_sn, dz_sc, dz_shw,
    DY_MERGED: tl.constexpr, X_MERGED: tl.constexpr, O_MERGED: tl.constexpr, DX_MERGED: tl.constexpr,
    DZ_MERGED: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OUT: tl.constexpr, RELU: tl.constexpr,
    BATCH_STATS: tl.constexpr, STORE_DZ: tl.constexpr,
    ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dx = scale * (dz - sum(dz)/n - xhat * sum(dz*xhat)/n) with batch statistics, else scale * dz."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < M)[:, None] & cmask[None, :]
    mean, invstd, scale, beta = _channel_consts(mean_ptr, invstd_ptr, w_ptr, b_ptr, cols, cmask, HAS_WEIGHT,
                                                HAS_BIAS, ACC)
    dz, xhat = _dz_xhat(dy_ptr, x_ptr, out_ptr, rows, cols, mask, HW,
                        dy_sn, dy_sc, dy_shw, x_sn, x_sc, x_shw, o_sn, o_sc, o_shw,
                        mean, invstd, scale, beta, DY_MERGED, X_MERGED, O_MERGED, HAS_OUT, RELU, ACC)
    if BATCH_STATS:
        inv_n = (1.0 / tl.load(count_ptr + cols, mask=cmask, other=1.0)).to(ACC)
        mean_dz = tl.load(sums_ptr + cols, mask=cmask, other=0.0) * inv_n
        mean_dzx = tl.load(sums_ptr + C + cols, mask=cmask, other=0.0) * inv_n
        dx = scale[None, :] * (dz - mean_dz[None, :] - xhat * mean_dzx[None, :])
    else:
        dx = scale[None, :] * dz
    tl.store(dx_ptr + _offsets(rows, cols, HW, dx_sn, dx_sc, dx_shw, DX_MERGED),
             dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_DZ:
        tl.store(dz_ptr + _offsets(rows, cols, HW, dz_sn, dz_sc, dz_shw, DZ_MERGED),
                 dz.to(dz_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------------
# Launchers

_TL_ACC = {torch.float32: tl.float32, torch.float64: tl.float64}


def _tile(M: int, C: int, channels_fast: bool) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_C) of about 4096 elements. Channels-contiguous tensors take wide channel blocks for
    long vector loads along C; others (NCHW) take tall row blocks so that a warp reads along hw."""
    if channels_fast:
        block_c = min(triton.next_power_of_2(C), 64)
        return max(16, 4096 // block_c), block_c
    block_m = min(triton.next_power_of_2(M), 128)
    return block_m, min(triton.next_power_of_2(C), max(4096 // block_m, 1))


def _reduce_grid(M: int, C: int, block_m: int, block_c: int, device: torch.device) -> tuple[int, int]:
    """(rows per program, number of row chunks P) aiming at a few waves of programs on the device."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:  # the interpreter runs programs one by one: fewer, larger programs are faster
        target = 4
    chunks = max(1, target // triton.cdiv(C, block_c))
    rows_per_prog = triton.cdiv(triton.cdiv(M, chunks), block_m) * block_m
    return rows_per_prog, triton.cdiv(M, rows_per_prog)


def _check_rows(M: int) -> None:
    """The kernels' pixel-row indices are int32 (element offsets are int64): a clear error, not wrapped rows."""
    if M + ROW_MARGIN > INT32_LIMIT:
        raise ValueError(f"fused_resnet: the Triton BatchNorm kernels index N*H*W = {M} rows in int32 (at most "
                         f"{INT32_LIMIT - ROW_MARGIN}); use the eager or cuda backend for this tensor")


def _channels_fast(x: Tensor) -> bool:
    s_n, s_c, s_hw, _ = geometry(x)
    return s_c <= s_hw or x.shape[2] * x.shape[3] == 1


_MERGE_CHUNK = 256  # partials merged (summed) by one program; more partials are merged in a second level


def _sum_partials(part: Tensor, out: Tensor) -> None:
    """out = part.sum(0) for contiguous partials [P, ...] (out: part[0]'s shape), in a fixed order: chunks
    of _MERGE_CHUNK partials per program, then the chunks' sums the same way. One level would leave a few
    programs to read every partial (the fused dgrad's BatchNorm partials: thousands of row tiles, K = 2C
    columns: one program for C = 64)."""
    P, K = part.shape[0], part[0].numel()
    groups = triton.cdiv(P, _MERGE_CHUNK)
    dst = torch.empty((groups, *part.shape[1:]), dtype=part.dtype, device=part.device) if groups > 1 else out
    block_k = min(triton.next_power_of_2(K), 256)
    _sum_partials_kernel[(triton.cdiv(K, block_k), groups)](part, dst, P, K, _MERGE_CHUNK, BLOCK_P=16,
                                                           BLOCK_K=block_k)
    if groups > 1:
        _sum_partials(dst, out)


def merge_stats(part: Tensor) -> Tensor:
    """The (count, mean, m2) float64 [3, C] statistics merged from the partials ``part`` ([P, 3, C], fp32 or
    float64, contiguous): one level of programs over chunks of partials, then, for more than one chunk, the
    same over the chunks' results. Deterministic for a given P."""
    P, _, C = part.shape
    groups = triton.cdiv(P, _MERGE_CHUNK)
    out = torch.empty((groups, 3, C) if groups > 1 else (3, C), dtype=torch.float64, device=part.device)
    block_c = min(triton.next_power_of_2(C), 64)
    _merge_stats_kernel[(triton.cdiv(C, block_c), groups)](part, out, P, C, _MERGE_CHUNK, BLOCK_P=16,
                                                           BLOCK_C=block_c)
    return merge_stats(out) if groups > 1 else out


def _float64_parts(v: float) -> tuple[float, float, float]:
    """v as hi + mid + lo, each exactly representable in fp32 (24 + 24 + 24 >= 53 bits): the sum in float64
    is v itself for every v whose parts stay in fp32's normal range (|v| > ~1e-30)."""
    hi = float(np.float32(v))
    mid = float(np.float32(v - hi))
    return hi, mid, float(np.float32(v - hi - mid))


def bn_stats(x: Tensor) -> Tensor:
    x = kernel_layout(x)
    N, C, H, W = x.shape
    M = N * H * W
    _check_rows(M)
    if M == 0 or C == 0:
        return torch.zeros((3, C), dtype=torch.float64, device=x.device)
    block_m, block_c = _tile(M, C, _channels_fast(x))
    rows_per_prog, P = _reduce_grid(M, C, block_m, block_c, x.device)
    part = torch.empty((P, 3, C), dtype=torch.float64, device=x.device)
    s_n, s_c, s_hw, merged = geometry(x)
    _bn_stats_partial_kernel[(P, triton.cdiv(C, block_c))](
        x, part, M, C, H * W, s_n, s_c, s_hw, rows_per_prog,
        ROWS_MERGED=merged, ACC=_TL_ACC[acc_dtype_of(x)], BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return merge_stats(part)


def bn_finalize(stats: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: Optional[float], eps: float,
                dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    C = stats.shape[1]
    stats = stats.contiguous()
    mean = torch.empty(C, dtype=dtype, device=stats.device)
    invstd = torch.empty(C, dtype=dtype, device=stats.device)
    if C == 0:
        return mean, invstd
    update = running_mean is not None
    # The kernel updates contiguous buffers in place; anything else goes through a contiguous copy.
    rm = running_mean if not update or running_mean.is_contiguous() else running_mean.contiguous()
    rv = running_var if not update or running_var.is_contiguous() else running_var.contiguous()
    block_c = min(triton.next_power_of_2(C), 1024)
    _bn_finalize_kernel[(triton.cdiv(C, block_c),)](
        stats, mean, invstd, rm if update else mean, rv if update else mean,
        num_batches_tracked if num_batches_tracked is not None else stats,
        C, *_float64_parts(0.0 if momentum is None else momentum), *_float64_parts(eps),
        UPDATE_RUNNING=update, CUMULATIVE=momentum is None, BLOCK_C=block_c,
    )
    if update and rm is not running_mean:
        running_mean.copy_(rm)
    if update and rv is not running_var:
        running_var.copy_(rv)
    return mean, invstd


def _param_or(t: Optional[Tensor], fallback: Tensor) -> Tensor:
    return t if t is not None else fallback


def bn_act(x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
           residual: Optional[Tensor], relu: bool) -> Tensor:
    x = kernel_layout(x)
    y = torch.empty_like(x)
    N, C, H, W = x.shape
    M = N * H * W
    _check_rows(M)
    if M == 0 or C == 0:
        return y
    res = kernel_layout(residual) if residual is not None else x
    block_m, block_c = _tile(M, C, _channels_fast(x))
    gx, gr, gy = geometry(x), geometry(res), geometry(y)
    _bn_act_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        x, res, y, mean, invstd, _param_or(weight, mean), _param_or(bias, mean),
        M, C, H * W, *gx[:3], *gr[:3], *gy[:3],
        X_MERGED=gx[3], R_MERGED=gr[3], Y_MERGED=gy[3],
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        RELU=relu, ACC=_TL_ACC[mean.dtype], BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return y


def bn_backward_reduce(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], out: Optional[Tensor], relu: bool) -> Tensor:
    x, grad_out = kernel_layout(x), kernel_layout(grad_out)
    N, C, H, W = x.shape
    M = N * H * W
    _check_rows(M)
    sums = torch.zeros((2, C), dtype=mean.dtype, device=x.device)
    if M == 0 or C == 0:
        return sums
    o = kernel_layout(out) if out is not None else x
    block_m, block_c = _tile(M, C, _channels_fast(x))
    rows_per_prog, P = _reduce_grid(M, C, block_m, block_c, x.device)
    part = torch.empty((P, 2, C), dtype=mean.dtype, device=x.device)
    gdy, gx, go = geometry(grad_out), geometry(x), geometry(o)
    _bn_backward_reduce_kernel[(P, triton.cdiv(C, block_c))](
        grad_out, x, o, mean, invstd, _param_or(weight, mean), _param_or(bias, mean), part,
        M, C, H * W, *gdy[:3], *gx[:3], *go[:3], rows_per_prog,
        DY_MERGED=gdy[3], X_MERGED=gx[3], O_MERGED=go[3],
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_OUT=out is not None, RELU=relu,
        ACC=_TL_ACC[mean.dtype], BLOCK_M=block_m, BLOCK_C=block_c,
    )
    _sum_partials(part, sums)
    return sums


def bn_backward_elemt(grad_out: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor],
                      bias: Optional[Tensor], out: Optional[Tensor], sums: Optional[Tensor],
                      count: Optional[Tensor], relu: bool, need_dz: bool) -> tuple[Tensor, Tensor]:
    x, grad_out = kernel_layout(x), kernel_layout(grad_out)
    dx = torch.empty_like(x)
    dz = torch.empty_like(x) if need_dz else x.new_empty((0,))
    N, C, H, W = x.shape
    M = N * H * W
    _check_rows(M)
    if M == 0 or C == 0:
        return dx, dz
    o = kernel_layout(out) if out is not None else x
    dz_t = dz if need_dz else dx
    block_m, block_c = _tile(M, C, _channels_fast(x))
    gdy, gx, go, gdx, gdz = geometry(grad_out), geometry(x), geometry(o), geometry(dx), geometry(dz_t)
    batch_stats = sums is not None
    _bn_backward_elemt_kernel[(triton.cdiv(M, block_m), triton.cdiv(C, block_c))](
        grad_out, x, o, mean, invstd, _param_or(weight, mean), _param_or(bias, mean),
        sums.contiguous() if batch_stats else mean, count.contiguous() if batch_stats else mean, dx, dz_t,
        M, C, H * W, *gdy[:3], *gx[:3], *go[:3], *gdx[:3], *gdz[:3],
        DY_MERGED=gdy[3], X_MERGED=gx[3], O_MERGED=go[3], DX_MERGED=gdx[3], DZ_MERGED=gdz[3],
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, HAS_OUT=out is not None, RELU=relu,
        BATCH_STATS=batch_stats, STORE_DZ=need_dz,
        ACC=_TL_ACC[mean.dtype], BLOCK_M=block_m, BLOCK_C=block_c,
    )
    return dx, dz
