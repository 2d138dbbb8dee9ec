"""Triton kernels of sampled BatchNorm (+ activation): forward and backward.

Chen et al., "Batch Normalization Sampling" (bn-sampling.txt): statistics from a sample
(§3.2 Eq. 3; FS patch / BS-NS rows §4.1; VDN virtual rows mixed by Eq. 4 §4.2), the whole
tensor normalised with them (Eq. 1), and the backward of App. C Eq. 5–6 in which only the
sampled points carry the statistics terms.

A tensor ``x`` of shape ``(N, C, *S)`` (``S`` of 0–3 spatial dims) is seen as
``(N, C, D, H, W)``. It must be dense in one of two layouts:

* channels-first (NCHW): the matrix ``(N*C, D*H*W)`` is contiguous, the channel of a row is
  ``row % C``;
* channels-last (NHWC): the matrix ``(N*D*H*W, C)`` is contiguous, the channel is the column.

A *region* is ``(nv, r0, r1, d0, d1, h0, h1, w0, w1)``: virtual rows ``[0, nv)`` (VDN,
the whole map) and the sampled group ``rows [r0, r1) x box [d0,d1) x [h0,h1) x [w0,w1)``
(absolute row indices). ``wv`` is the weight of the virtual group (Eq. 4's β, 0 without
virtual rows); the sampled group has weight ``1 - wv``.

Launches:

forward   ``_stats_partial_kernel`` (one per group; grid = channel blocks x splits, each split
          folds its tiles with Chan's parallel formula, so the variance never cancels)
          -> ``_stats_finalize_kernel`` (combines splits, mixes the groups by Eq. 4)
          -> ``_normalize_kernel`` (one read, one write: ``act((x - mean) * rstd * w + b)``);
          ``_running_update_kernel`` (a separate, mutating op) updates the running statistics.
backward  ``_grad_partial_kernel`` (Σ dy' and Σ dy'·x̂ per channel, dy' = dy·act'(z) with z
          recomputed from the saved x) -> ``_grad_finalize_kernel`` (dγ, dβ and the per-group
          coefficients of Eq. 6) -> ``_grad_input_kernel`` (one pass: dx = rstd·γ·(dy' − [i∈G]·
          (a_G/n_G)·(Σdy' + Σdy'x̂·rstd·(x_i − mean_G)))).

single    small layers (a program's channels hold at most :data:`SINGLE_PASS_MAX` elements, e.g.
pass      ResNet's 7² maps, and 14²/28² ones in NCHW): ``_forward_single_pass_kernel`` and
          ``_backward_single_pass_kernel`` do each direction's three steps above in one launch,
          one program per block of channels (same formulas, same saved tensors), so a step is
          2 launches instead of 6.

Only ``x`` (the input), the ``(4, C)`` float32 statistics ``[mean, var, mean_virtual,
mean_sampled]`` and the parameters are saved for backward; no full-size intermediate.
All arithmetic is float32 whatever the storage dtype (fp32, bf16, fp16).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .functional import whole_batch_region
from .launch import launch as launch_cached
from .layout import channels_last, like

ACTIVATIONS = {"none": 0, "relu": 1, "relu6": 2, "silu": 3, "leaky_relu": 4}

# elements per program of the elementwise passes and of one reduction tile
_ELEMENTWISE_TILE = 4096
_REDUCE_TILE = 2048


# ============================================================================ device helpers
@triton.jit
def _activation(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.where(z < 0.0, 0.0, z)
    elif ACT == 2:
        z = tl.where(z < 0.0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == 3:
        z = z * tl.sigmoid(z)
    elif ACT == 4:
        z = tl.where(z > 0.0, z, z * slope)
    return z


@triton.jit
def _activation_grad(dy, z, ACT: tl.constexpr, slope):
    """dy · act'(z), with PyTorch's conventions at the kinks (relu: z > 0; relu6: 0 < z < 6)."""
    if ACT == 1:
        dy = tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:
        dy = tl.where((z > 0.0) & (z < 6.0), dy, 0.0)
    elif ACT == 3:
        s = tl.sigmoid(z)
        dy = dy * (s * (1.0 + z * (1.0 - s)))
    elif ACT == 4:
        dy = tl.where(z > 0.0, dy, dy * slope)
    return dy


@triton.jit
def _tile_offsets(t, row0, nrows, P, tiles_per_row, bh, bw, d0, h0, w0,
                  stride_n, stride_d, stride_h, stride_w,
                  FLAT: tl.constexpr, FULL_BOX: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr):
    """Offsets and mask of the positions of reduction tile ``t`` (channel offset excluded).

    ``FLAT``: 0, a tile holds positions of one row; 1, channels-last over the whole map, whose
    (row, position) pairs have one uniform stride; 2, a tile holds ``BLOCK_P`` consecutive
    (row, position) pairs of any layout and box, split by division (the single-pass kernels:
    there a tile spans several rows of a small map)."""
    ps = tl.arange(0, BLOCK_P)
    if FLAT == 1:
        q = t * BLOCK_P + ps
        pmask = q < nrows * P
        if INT64:
            q = q.to(tl.int64)
        offs = (row0 * P + q) * stride_w
    else:
        if FLAT == 2:
            q = t * BLOCK_P + ps
            pmask = q < nrows * P
            n = row0 + q // P
            p = q % P
        else:
            n = row0 + t // tiles_per_row
            p = (t % tiles_per_row) * BLOCK_P + ps
            pmask = p < P
        if INT64:
            n = n.to(tl.int64)
            p = p.to(tl.int64)
        if FULL_BOX:
            offs = n * stride_n + p * stride_w
        else:
            hw = bh * bw
            dd = p // hw
            rem = p - dd * hw
            hh = rem // bw
            ww = rem - hh * bw
            offs = n * stride_n + (d0 + dd) * stride_d + (h0 + hh) * stride_h + (w0 + ww) * stride_w
    return offs, pmask


@triton.jit
def _in_box(s, H, W, d0, d1, h0, h1, w0, w1):
    """Whether map position ``s`` (flat over (D, H, W)) lies in the box [d0,d1) x [h0,h1) x [w0,w1)."""
    hw = H * W
    dd = s // hw
    rem = s - dd * hw
    hh = rem // W
    ww = rem - hh * W
    return (dd >= d0) & (dd < d1) & (hh >= h0) & (hh < h1) & (ww >= w0) & (ww < w1)


@triton.jit
def _elementwise_tile(R, K, C, CHANNEL_ON_ROWS: tl.constexpr, INT64: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """One tile of the (R, K) matrix an elementwise pass sees: its rows and columns, the channel
    of each row (NCHW) or column (channels-last) with its mask, and the tile's offsets and mask."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    if CHANNEL_ON_ROWS:
        ch = rows % C
        chmask = rows < R
    else:
        ch = cols
        chmask = cols < K
    r = rows
    if INT64:
        r = r.to(tl.int64)
    offs = r[:, None] * K + cols[None, :]
    m = (rows < R)[:, None] & (cols < K)[None, :]
    return rows, cols, ch, chmask, offs, m


@triton.jit
def _per_channel(v, CHANNEL_ON_ROWS: tl.constexpr):
    """A per-channel vector of :func:`_elementwise_tile` as an operand of the 2-D tile."""
    if CHANNEL_ON_ROWS:
        out = v[:, None]
    else:
        out = v[None, :]
    return out


# ============================================================================ forward
@triton.jit
def _chan_moments(x_ptr, coff, cmask, t0, t1, row0, nrows, P, tiles_per_row, bh, bw, d0, h0, w0,
                  stride_n, stride_d, stride_h, stride_w,
                  FLAT: tl.constexpr, FULL_BOX: tl.constexpr, INT64: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """(mean, M2, count) per channel of tiles ``[t0, t1)`` of one group (Eq. 3).

    Each element of the tile keeps its own sums over the tiles, so the loop has no reduction
    across threads (one per tile was the cost of the channels-last statistics, whose tiles hold
    few positions) and no division: Σ(x−K) and Σ(x−K)² with K the first value that element
    saw, a sample of its channel, so the variance does not cancel (E[x²]−E[x]² would, for
    values far from 0). Chan et al.'s combination of the elements' (mean, M2, count) ends it
    (deviations from the combined mean)."""
    shift = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    s2 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    lane_n = tl.zeros([BLOCK_P], dtype=tl.float32)  # the same for every channel of a position
    for t in range(t0, t1):
        offs, pmask = _tile_offsets(t, row0, nrows, P, tiles_per_row, bh, bw, d0, h0, w0,
                                    stride_n, stride_d, stride_h, stride_w, FLAT, FULL_BOX, INT64, BLOCK_P)
        m = pmask[:, None] & cmask[None, :]
        xv = tl.load(x_ptr + offs[:, None] + coff[None, :], mask=m, other=0.0).to(tl.float32)
        shift = tl.where((lane_n == 0.0)[:, None], xv, shift)
        d = tl.where(m, xv - shift, 0.0)
        s1 += d
        s2 += d * d
        lane_n += pmask.to(tl.float32)
    counts = tl.broadcast_to(lane_n[:, None], [BLOCK_P, BLOCK_C])
    inv = 1.0 / tl.maximum(counts, 1.0)
    lane_mean = shift + s1 * inv
    lane_m2 = tl.maximum(s2 - s1 * s1 * inv, 0.0)
    cnt = tl.sum(counts, axis=0)
    mean = _weighted_mean(lane_mean, counts, cnt)
    dev = tl.where(counts > 0, lane_mean - mean[None, :], 0.0)
    m2 = tl.sum(lane_m2 + counts * dev * dev, axis=0)
    return mean, m2, cnt


@triton.jit
def _weighted_mean(means, counts, total):
    """Σ counts·means / total along axis 0, summed as deviations from a reference (the plain
    mean of the non-empty parts): Σ counts·means itself is total × |mean| large, and rounding it
    cost ~10 float32 ulps of a mean near 1000."""
    filled = counts > 0
    ref = tl.sum(tl.where(filled, means, 0.0), axis=0) / tl.maximum(tl.sum(filled.to(tl.float32), axis=0), 1.0)
    dev = tl.where(filled, means - ref[None, :], 0.0)
    return ref + tl.sum(counts * dev, axis=0) / tl.maximum(total, 1.0)


@triton.jit
def _channel_offsets(C, stride_c, INT64: tl.constexpr, BLOCK_C: tl.constexpr):
    """The channels of this program (axis 0), their mask and their offsets."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    coff = cs * stride_c
    if INT64:
        coff = coff.to(tl.int64)
    return cs, cs < C, coff


@triton.jit
def _stats_partial_kernel(x_ptr, part_ptr, C, splits, tiles_per_split, total_tiles,
                          row0, nrows, P, tiles_per_row, bh, bw, d0, h0, w0,
                          stride_n, stride_c, stride_d, stride_h, stride_w,
                          FLAT: tl.constexpr, FULL_BOX: tl.constexpr, INT64: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel and split: (mean, M2, count) of the split's tiles of one group (Eq. 3)."""
    pid_s = tl.program_id(1)
    cs, cmask, coff = _channel_offsets(C, stride_c, INT64, BLOCK_C)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, total_tiles)
    mean, m2, cnt = _chan_moments(x_ptr, coff, cmask, t0, t1, row0, nrows, P, tiles_per_row, bh, bw, d0, h0, w0,
                                  stride_n, stride_d, stride_h, stride_w, FLAT, FULL_BOX, INT64, BLOCK_P, BLOCK_C)
    base = pid_s * C + cs
    tl.store(part_ptr + base, mean, mask=cmask)
    tl.store(part_ptr + splits * C + base, m2, mask=cmask)
    tl.store(part_ptr + 2 * splits * C + base, cnt, mask=cmask)


@triton.jit
def _combine_splits(part_ptr, splits, C, cs, cmask, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Mean and biased variance from per-split (mean, M2, count). The mean is split 0's plus the
    count-weighted deviations of the others from it (see :func:`_weighted_mean`)."""
    ref = tl.load(part_ptr + cs, mask=cmask, other=0.0)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < splits)[:, None] & cmask[None, :]
        idx = ss[:, None] * C + cs[None, :]
        mu = tl.load(part_ptr + idx, mask=m, other=0.0)
        n = tl.load(part_ptr + 2 * splits * C + idx, mask=m, other=0.0)
        total += tl.sum(n, axis=0)
        weighted += tl.sum(n * tl.where(m, mu - ref[None, :], 0.0), axis=0)
    mean = ref + weighted / tl.maximum(total, 1.0)
    m2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < splits)[:, None] & cmask[None, :]
        idx = ss[:, None] * C + cs[None, :]
        mu = tl.load(part_ptr + idx, mask=m, other=0.0)
        q = tl.load(part_ptr + splits * C + idx, mask=m, other=0.0)
        n = tl.load(part_ptr + 2 * splits * C + idx, mask=m, other=0.0)
        d = mu - mean[None, :]
        m2 += tl.sum(q + n * d * d, axis=0)
    var = tl.maximum(m2 / tl.maximum(total, 1.0), 0.0)
    return mean, var


@triton.jit
def _store_statistics(stats_ptr, C, cs, cmask, mean, var, mean_v, mean_s, rm_ptr, rv_ptr, momentum, unbias,
                      tracked_ptr, HAS_RUNNING: tl.constexpr, HAS_TRACKED: tl.constexpr):
    """The saved statistics rows [mean, var, mean_virtual, mean_sampled]; with ``HAS_RUNNING``
    also the running-statistics EMA; with ``HAS_TRACKED`` program 0 adds 1 to the int64
    ``num_batches_tracked`` (in eager mode: no separate ``add_`` launch per layer step)."""
    tl.store(stats_ptr + cs, mean, mask=cmask)
    tl.store(stats_ptr + C + cs, var, mask=cmask)
    tl.store(stats_ptr + 2 * C + cs, mean_v, mask=cmask)
    tl.store(stats_ptr + 3 * C + cs, mean_s, mask=cmask)
    if HAS_RUNNING:
        _running_ema(rm_ptr, rv_ptr, cs, cmask, mean, var, momentum, unbias)
    if HAS_TRACKED:
        if tl.program_id(0) == 0:
            tl.store(tracked_ptr, tl.load(tracked_ptr) + 1)


@triton.jit
def _stats_finalize_kernel(part_s_ptr, splits_s, part_v_ptr, splits_v, stats_ptr, C, wv,
                           rm_ptr, rv_ptr, tracked_ptr, momentum, unbias,
                           HAS_S: tl.constexpr, HAS_V: tl.constexpr, HAS_RUNNING: tl.constexpr,
                           HAS_TRACKED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Eq. 4 mixing of the groups into the saved statistics; with ``HAS_RUNNING`` also the
    running-statistics EMA (eager mode: one launch fewer than the separate update op)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    var = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_v = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_V:
        mean_v, var_v = _combine_splits(part_v_ptr, splits_v, C, cs, cmask, BLOCK_S, BLOCK_C)
        mean += wv * mean_v
        var += wv * var_v
    if HAS_S:
        mean_s, var_s = _combine_splits(part_s_ptr, splits_s, C, cs, cmask, BLOCK_S, BLOCK_C)
        mean += (1.0 - wv) * mean_s
        var += (1.0 - wv) * var_s
    _store_statistics(stats_ptr, C, cs, cmask, mean, var, mean_v, mean_s, rm_ptr, rv_ptr, momentum, unbias,
                      tracked_ptr, HAS_RUNNING, HAS_TRACKED)


@triton.jit
def _window_moments(mean_t, var_t, past_mean_ptr, past_sq_ptr, h, stats_ptr, C, cs, cmask):
    """Cross-iteration BN's window statistics (cross-iteration-bn.txt Eqs. 9–11): the current
    batch's (μ_t, var_t) mixed with h compensated past (μ_τ, ν_τ), stored in ``stats_ptr``.

    μ̄ = mean of the k = h + 1 means; σ̄² = (1/k)Σ max(ν_τ − μ_τ², 0) + (1/k)Σ (μ_τ − μ̄)² with
    ν_t − μ_t² = var_t (the cancellation-free form of ``window_statistics``). Stored rows:
    [μ̄, σ̄², 0, μ̄, μ_t, var_t] -- rows 0–3 in the layout the backward kernels read (one sampled
    group whose mean is μ̄), rows 4–5 the batch's own moments for the history and running stats.
    Returns (μ̄, σ̄²)."""
    mean_sum = mean_t
    var_sum = var_t
    for i in range(0, h):
        mu = tl.load(past_mean_ptr + i * C + cs, mask=cmask, other=0.0)
        nu = tl.load(past_sq_ptr + i * C + cs, mask=cmask, other=0.0)
        mean_sum += mu
        var_sum += tl.maximum(nu - mu * mu, 0.0)                                         # Eq. 10
    k = h + 1.0  # h may be the constexpr 1 (Triton specialises ints equal to 1): no .to() then
    mean = mean_sum / k                                                                   # Eq. 9
    spread = (mean_t - mean) * (mean_t - mean)
    for i in range(0, h):
        d = tl.load(past_mean_ptr + i * C + cs, mask=cmask, other=0.0) - mean
        spread += d * d
    var = (var_sum + spread) / k                                                          # Eq. 11
    tl.store(stats_ptr + cs, mean, mask=cmask)
    tl.store(stats_ptr + C + cs, var, mask=cmask)
    tl.store(stats_ptr + 2 * C + cs, tl.zeros_like(mean), mask=cmask)
    tl.store(stats_ptr + 3 * C + cs, mean, mask=cmask)
    tl.store(stats_ptr + 4 * C + cs, mean_t, mask=cmask)
    tl.store(stats_ptr + 5 * C + cs, var_t, mask=cmask)
    return mean, var


@triton.jit
def _window_finalize_kernel(part_ptr, splits, past_mean_ptr, past_sq_ptr, h, stats_ptr, C,
                            BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_window_moments` of the batch's partials (6, C) into ``stats_ptr``."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mean_t, var_t = _combine_splits(part_ptr, splits, C, cs, cmask, BLOCK_S, BLOCK_C)
    _window_moments(mean_t, var_t, past_mean_ptr, past_sq_ptr, h, stats_ptr, C, cs, cmask)


@triton.jit
def _running_update_kernel(stats_ptr, rm_ptr, rv_ptr, C, momentum, unbias, BLOCK_C: tl.constexpr):
    """PyTorch's running-statistics EMA, with the unbiased variance of the sampled values."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    mean = tl.load(stats_ptr + cs, mask=cmask, other=0.0)
    var = tl.load(stats_ptr + C + cs, mask=cmask, other=0.0)
    _running_ema(rm_ptr, rv_ptr, cs, cmask, mean, var, momentum, unbias)


@triton.jit
def _running_ema(rm_ptr, rv_ptr, cs, cmask, mean, var, momentum, unbias):
    rm = tl.load(rm_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    rv = tl.load(rv_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    rm = rm * (1.0 - momentum) + mean * momentum
    rv = rv * (1.0 - momentum) + var * unbias * momentum
    tl.store(rm_ptr + cs, rm.to(rm_ptr.dtype.element_ty), mask=cmask)
    tl.store(rv_ptr + cs, rv.to(rv_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _normalize_kernel(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, R, K, C, eps, slope,
                      CHANNEL_ON_ROWS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      ACT: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """y = act((x − mean)·rstd·γ + β) over the whole tensor: one read, one write (Eq. 1)."""
    rows, cols, ch, chmask, offs, m = _elementwise_tile(R, K, C, CHANNEL_ON_ROWS, INT64, BLOCK_R, BLOCK_K)
    mean = tl.load(stats_ptr + ch, mask=chmask, other=0.0)
    var = tl.load(stats_ptr + C + ch, mask=chmask, other=1.0)
    scale = 1.0 / tl.sqrt(var + eps)
    if HAS_W:
        scale = scale * tl.load(w_ptr + ch, mask=chmask, other=1.0).to(tl.float32)
    if HAS_B:
        shift = tl.load(b_ptr + ch, mask=chmask, other=0.0).to(tl.float32)
    else:
        shift = tl.zeros_like(scale)
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    z = (x - _per_channel(mean, CHANNEL_ON_ROWS)) * _per_channel(scale, CHANNEL_ON_ROWS)
    y = _activation(z + _per_channel(shift, CHANNEL_ON_ROWS), ACT, slope)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=m)


# ============================================================================ backward
@triton.jit
def _grad_sums(dy_ptr, x_ptr, coff, cmask, mean, rstd, w, b, t0, t1, nrows, P, tiles_per_row, stride_n, stride_w,
               slope, FLAT: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Σ dy' and Σ dy'·x̂ per channel over tiles ``[t0, t1)`` of the whole map (per-element
    accumulators, reduced across the tile once at the end, as in :func:`_chan_moments`)."""
    acc_dy = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    acc_dyx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for t in range(t0, t1):
        offs, pmask = _tile_offsets(t, 0, nrows, P, tiles_per_row, 1, 1, 0, 0, 0,
                                    stride_n, 0, 0, stride_w, FLAT, True, INT64, BLOCK_P)
        m = pmask[:, None] & cmask[None, :]
        o = offs[:, None] + coff[None, :]
        x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + o, mask=m, other=0.0).to(tl.float32)
        xhat = (x - mean[None, :]) * rstd[None, :]
        if ACT != 0:
            g = _activation_grad(g, xhat * w[None, :] + b[None, :], ACT, slope)
        g = tl.where(m, g, 0.0)
        acc_dy += g
        acc_dyx += g * xhat
    return tl.sum(acc_dy, axis=0), tl.sum(acc_dyx, axis=0)


@triton.jit
def _affine(w_ptr, b_ptr, cs, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_C: tl.constexpr):
    """γ and β of the channels ``cs`` in fp32 (1 and 0 without affine)."""
    if HAS_W:
        w = tl.load(w_ptr + cs, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_B:
        b = tl.load(b_ptr + cs, mask=cmask, other=0.0).to(tl.float32)
    else:
        b = tl.zeros([BLOCK_C], dtype=tl.float32)
    return w, b


@triton.jit
def _channel_params(stats_ptr, w_ptr, b_ptr, C, cs, cmask, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    """mean, rstd, γ and β of the channels ``cs`` from the saved statistics."""
    mean = tl.load(stats_ptr + cs, mask=cmask, other=0.0)
    rstd = 1.0 / tl.sqrt(tl.load(stats_ptr + C + cs, mask=cmask, other=1.0) + eps)
    w, b = _affine(w_ptr, b_ptr, cs, cmask, HAS_W, HAS_B, BLOCK_C)
    return mean, rstd, w, b


@triton.jit
def _grad_partial_kernel(dy_ptr, x_ptr, stats_ptr, w_ptr, b_ptr, part_ptr, C, splits, tiles_per_split,
                         total_tiles, nrows, P, tiles_per_row, stride_n, stride_c, stride_w, eps, slope,
                         FLAT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                         INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per channel and split: Σ dy' and Σ dy'·x̂ over every point (App. C Eq. 5: the
    reductions keep length m after sampling, since every point was normalised)."""
    pid_s = tl.program_id(1)
    cs, cmask, coff = _channel_offsets(C, stride_c, INT64, BLOCK_C)
    mean, rstd, w, b = _channel_params(stats_ptr, w_ptr, b_ptr, C, cs, cmask, eps, HAS_W, HAS_B, BLOCK_C)
    t0 = pid_s * tiles_per_split
    t1 = tl.minimum(t0 + tiles_per_split, total_tiles)
    sum_dy, sum_dyx = _grad_sums(dy_ptr, x_ptr, coff, cmask, mean, rstd, w, b, t0, t1, nrows, P, tiles_per_row,
                                 stride_n, stride_w, slope, FLAT, ACT, INT64, BLOCK_P, BLOCK_C)
    base = pid_s * C + cs
    tl.store(part_ptr + base, sum_dy, mask=cmask)
    tl.store(part_ptr + splits * C + base, sum_dyx, mask=cmask)


@triton.jit
def _grad_finalize_kernel(part_ptr, splits, stats_ptr, w_ptr, coef_ptr, dw_ptr, db_ptr, C, eps,
                          wv, n_v, n_s, HAS_W: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """dγ = Σ dy'·x̂, dβ = Σ dy', and per group G (weight a_G, count n_G) the coefficients
    A_G = a_G/n_G·Σdy', B_G = a_G/n_G·Σdy'x̂·rstd of Eq. 6 (a_G/n_G replaces 1/m)."""
    cs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cs < C
    sum_dy = tl.zeros([BLOCK_C], dtype=tl.float32)
    sum_dyx = tl.zeros([BLOCK_C], dtype=tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        ss = s0 + tl.arange(0, BLOCK_S)
        m = (ss < splits)[:, None] & cmask[None, :]
        idx = ss[:, None] * C + cs[None, :]
        sum_dy += tl.sum(tl.load(part_ptr + idx, mask=m, other=0.0), axis=0)
        sum_dyx += tl.sum(tl.load(part_ptr + splits * C + idx, mask=m, other=0.0), axis=0)
    tl.store(dw_ptr + cs, sum_dyx, mask=cmask)
    tl.store(db_ptr + cs, sum_dy, mask=cmask)
    rstd = 1.0 / tl.sqrt(tl.load(stats_ptr + C + cs, mask=cmask, other=1.0) + eps)
    if HAS_W:
        w = tl.load(w_ptr + cs, mask=cmask, other=1.0).to(tl.float32)
    else:
        w = tl.full([BLOCK_C], 1.0, tl.float32)
    a_s = (1.0 - wv) / n_s
    a_v = wv / n_v
    tl.store(coef_ptr + cs, rstd * w, mask=cmask)
    tl.store(coef_ptr + C + cs, a_s * sum_dy, mask=cmask)
    tl.store(coef_ptr + 2 * C + cs, a_s * sum_dyx * rstd, mask=cmask)
    tl.store(coef_ptr + 3 * C + cs, a_v * sum_dy, mask=cmask)
    tl.store(coef_ptr + 4 * C + cs, a_v * sum_dyx * rstd, mask=cmask)


@triton.jit
def _grad_input_kernel(dy_ptr, x_ptr, stats_ptr, w_ptr, b_ptr, coef_ptr, dx_ptr, R, K, C, S, H, W,
                       nv, r0, r1, d0, d1, h0, h1, w0, w1, eps, slope,
                       CHANNEL_ON_ROWS: tl.constexpr, ALL_SAMPLED: tl.constexpr, HAS_S: tl.constexpr,
                       HAS_V: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                       INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """App. C Eq. 6 in one pass: every point gets dy'·rstd·γ; the points of a group G also
    get −rstd·γ·(A_G + B_G·(x − mean_G))."""
    rows, cols, ch, chmask, offs, m = _elementwise_tile(R, K, C, CHANNEL_ON_ROWS, INT64, BLOCK_R, BLOCK_K)
    mean = _per_channel(tl.load(stats_ptr + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    rstd = _per_channel(1.0 / tl.sqrt(tl.load(stats_ptr + C + ch, mask=chmask, other=1.0) + eps), CHANNEL_ON_ROWS)
    k1 = _per_channel(tl.load(coef_ptr + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    a_s = _per_channel(tl.load(coef_ptr + C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    b_s = _per_channel(tl.load(coef_ptr + 2 * C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    a_v = _per_channel(tl.load(coef_ptr + 3 * C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    b_v = _per_channel(tl.load(coef_ptr + 4 * C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    mean_v = _per_channel(tl.load(stats_ptr + 2 * C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    mean_s = _per_channel(tl.load(stats_ptr + 3 * C + ch, mask=chmask, other=0.0), CHANNEL_ON_ROWS)
    if HAS_W:
        w = _per_channel(tl.load(w_ptr + ch, mask=chmask, other=1.0).to(tl.float32), CHANNEL_ON_ROWS)
    else:
        w = 1.0
    if HAS_B:
        b = _per_channel(tl.load(b_ptr + ch, mask=chmask, other=0.0).to(tl.float32), CHANNEL_ON_ROWS)
    else:
        b = 0.0
    # the group membership of each point
    if CHANNEL_ON_ROWS:
        n = rows // C
        s = cols
    else:
        n = rows // S
        s = rows - n * S
    if not ALL_SAMPLED:
        in_box = _in_box(s, H, W, d0, d1, h0, h1, w0, w1)
        in_rows = (n >= r0) & (n < r1)
        in_virtual = n < nv
        if CHANNEL_ON_ROWS:
            in_s = in_rows[:, None] & in_box[None, :]
            in_v = in_virtual[:, None]
        else:
            in_s = (in_rows & in_box)[:, None]
            in_v = in_virtual[:, None]
    x = tl.load(x_ptr + offs, mask=m, other=0.0).to(tl.float32)
    g = tl.load(dy_ptr + offs, mask=m, other=0.0).to(tl.float32)
    if ACT != 0:
        g = _activation_grad(g, (x - mean) * rstd * w + b, ACT, slope)
    if ALL_SAMPLED:
        g = g - (a_s + b_s * (x - mean_s))
    else:
        if HAS_S:
            g = g - tl.where(in_s, a_s + b_s * (x - mean_s), 0.0)
        if HAS_V:
            g = g - tl.where(in_v, a_v + b_v * (x - mean_v), 0.0)
    tl.store(dx_ptr + offs, (k1 * g).to(dx_ptr.dtype.element_ty), mask=m)


# ============================================================================ single pass
# A layer with few values per channel (ResNet's 14² and 7² maps) costs the host more than the
# device: each launch's host time exceeds its kernel time (benchmarks/kernel_overhead.py). There
# one program per block of channels does a whole direction -- statistics, then the normalise pass
# over its channels; or both backward reductions, then dx -- so a step is 2 launches, not 6,
# and needs no partials. A program's channels are small, so their second read mostly hits L2.

@triton.jit
def _forward_single_pass_kernel(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, rm_ptr, rv_ptr, tracked_ptr, C, N, S, tiles_map,
                                nv, tiles_v, r0, nrows_s, P_s, tiles_s, bh, bw, d0, h0, w0,
                                stride_n, stride_c, stride_d, stride_h, stride_w, wv, eps, slope, momentum, unbias,
                                FULL_BOX_S: tl.constexpr, HAS_S: tl.constexpr, HAS_V: tl.constexpr,
                                HAS_RUNNING: tl.constexpr, HAS_TRACKED: tl.constexpr, HAS_W: tl.constexpr,
                                HAS_B: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr, BLOCK_P: tl.constexpr,
                                BLOCK_C: tl.constexpr):
    """:func:`_stats_partial_kernel` + :func:`_stats_finalize_kernel` + :func:`_normalize_kernel`
    for the channels of one program (Eq. 3 per group, Eq. 4 mixing, Eq. 1 over every point)."""
    cs, cmask, coff = _channel_offsets(C, stride_c, INT64, BLOCK_C)
    mean = tl.zeros([BLOCK_C], dtype=tl.float32)
    var = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_v = tl.zeros([BLOCK_C], dtype=tl.float32)
    mean_s = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_V:
        mean_v, m2_v, cnt_v = _chan_moments(x_ptr, coff, cmask, 0, tiles_v, 0, nv, S, 1, 1, 1, 0, 0, 0,
                                            stride_n, stride_d, stride_h, stride_w, 2, True, INT64, BLOCK_P, BLOCK_C)
        mean += wv * mean_v
        var += wv * tl.maximum(m2_v / tl.maximum(cnt_v, 1.0), 0.0)
    if HAS_S:
        mean_s, m2_s, cnt_s = _chan_moments(x_ptr, coff, cmask, 0, tiles_s, r0, nrows_s, P_s, 1, bh, bw, d0, h0, w0,
                                            stride_n, stride_d, stride_h, stride_w, 2, FULL_BOX_S, INT64, BLOCK_P,
                                            BLOCK_C)
        mean += (1.0 - wv) * mean_s
        var += (1.0 - wv) * tl.maximum(m2_s / tl.maximum(cnt_s, 1.0), 0.0)
    _store_statistics(stats_ptr, C, cs, cmask, mean, var, mean_v, mean_s, rm_ptr, rv_ptr, momentum, unbias,
                      tracked_ptr, HAS_RUNNING, HAS_TRACKED)
    _normalize_channels(x_ptr, y_ptr, w_ptr, b_ptr, coff, cs, cmask, mean, var, N, S, tiles_map, stride_n, stride_w,
                        eps, slope, HAS_W, HAS_B, ACT, INT64, BLOCK_P, BLOCK_C)


@triton.jit
def _normalize_channels(x_ptr, y_ptr, w_ptr, b_ptr, coff, cs, cmask, mean, var, N, S, tiles_map, stride_n, stride_w,
                        eps, slope, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                        INT64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """y = act((x − mean)·rstd·γ + β) over every point of this program's channels (Eq. 1).
    ``mean``/``var`` come from the registers, not from the stored statistics: other threads of
    the program stored those, and nothing orders their stores before these loads."""
    w, b = _affine(w_ptr, b_ptr, cs, cmask, HAS_W, HAS_B, BLOCK_C)
    scale = w / tl.sqrt(var + eps)
    for t in range(0, tiles_map):
        offs, pmask = _tile_offsets(t, 0, N, S, 1, 1, 1, 0, 0, 0, stride_n, 0, 0, stride_w, 2, True, INT64, BLOCK_P)
        m = pmask[:, None] & cmask[None, :]
        o = offs[:, None] + coff[None, :]
        xv = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        y = _activation((xv - mean[None, :]) * scale[None, :] + b[None, :], ACT, slope)
        tl.store(y_ptr + o, y.to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _window_single_pass_kernel(x_ptr, y_ptr, stats_ptr, w_ptr, b_ptr, past_mean_ptr, past_sq_ptr, h, C, N, S,
                               tiles_map, stride_n, stride_c, stride_w, eps, slope,
                               HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Cross-iteration BN's forward for the channels of one program: the batch's moments, the
    window statistics (:func:`_window_moments`, Eqs. 9–11) and the normalise pass (Eq. 12)."""
    cs, cmask, coff = _channel_offsets(C, stride_c, INT64, BLOCK_C)
    mean_t, m2, cnt = _chan_moments(x_ptr, coff, cmask, 0, tiles_map, 0, N, S, 1, 1, 1, 0, 0, 0,
                                    stride_n, 0, 0, stride_w, 2, True, INT64, BLOCK_P, BLOCK_C)
    var_t = tl.maximum(m2 / tl.maximum(cnt, 1.0), 0.0)
    mean, var = _window_moments(mean_t, var_t, past_mean_ptr, past_sq_ptr, h, stats_ptr, C, cs, cmask)
    _normalize_channels(x_ptr, y_ptr, w_ptr, b_ptr, coff, cs, cmask, mean, var, N, S, tiles_map, stride_n, stride_w,
                        eps, slope, HAS_W, HAS_B, ACT, INT64, BLOCK_P, BLOCK_C)


@triton.jit
def _backward_single_pass_kernel(dy_ptr, x_ptr, stats_ptr, w_ptr, b_ptr, dx_ptr, dw_ptr, db_ptr, C, N, S, H, W,
                                 tiles_map, nv, r0, r1, d0, d1, h0, h1, w0, w1, stride_n, stride_c, stride_w,
                                 wv, n_v, n_s, eps, slope,
                                 ALL_SAMPLED: tl.constexpr, HAS_S: tl.constexpr, HAS_V: tl.constexpr,
                                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr, INT64: tl.constexpr,
                                 BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """:func:`_grad_partial_kernel` + :func:`_grad_finalize_kernel` + :func:`_grad_input_kernel`
    for the channels of one program (App. C Eq. 5, then Eq. 6 in one pass over every point)."""
    cs, cmask, coff = _channel_offsets(C, stride_c, INT64, BLOCK_C)
    mean, rstd, w, b = _channel_params(stats_ptr, w_ptr, b_ptr, C, cs, cmask, eps, HAS_W, HAS_B, BLOCK_C)
    sum_dy, sum_dyx = _grad_sums(dy_ptr, x_ptr, coff, cmask, mean, rstd, w, b, 0, tiles_map, N, S, 1,
                                 stride_n, stride_w, slope, 2, ACT, INT64, BLOCK_P, BLOCK_C)
    tl.store(dw_ptr + cs, sum_dyx, mask=cmask)
    tl.store(db_ptr + cs, sum_dy, mask=cmask)
    k1 = (rstd * w)[None, :]
    a_s = ((1.0 - wv) / n_s * sum_dy)[None, :]
    b_s = ((1.0 - wv) / n_s * sum_dyx * rstd)[None, :]
    a_v = (wv / n_v * sum_dy)[None, :]
    b_v = (wv / n_v * sum_dyx * rstd)[None, :]
    mean_v = tl.load(stats_ptr + 2 * C + cs, mask=cmask, other=0.0)[None, :]
    mean_s = tl.load(stats_ptr + 3 * C + cs, mask=cmask, other=0.0)[None, :]
    for t in range(0, tiles_map):
        q = t * BLOCK_P + tl.arange(0, BLOCK_P)
        pmask = q < N * S
        n = q // S
        p = q - n * S
        if INT64:
            offs = n.to(tl.int64) * stride_n + p.to(tl.int64) * stride_w
        else:
            offs = n * stride_n + p * stride_w
        m = pmask[:, None] & cmask[None, :]
        o = offs[:, None] + coff[None, :]
        x = tl.load(x_ptr + o, mask=m, other=0.0).to(tl.float32)
        g = tl.load(dy_ptr + o, mask=m, other=0.0).to(tl.float32)
        if ACT != 0:
            g = _activation_grad(g, (x - mean[None, :]) * rstd[None, :] * w[None, :] + b[None, :], ACT, slope)
        if ALL_SAMPLED:
            g = g - (a_s + b_s * (x - mean_s))
        else:
            if HAS_S:
                in_s = ((n >= r0) & (n < r1) & _in_box(p, H, W, d0, d1, h0, h1, w0, w1))[:, None]
                g = g - tl.where(in_s, a_s + b_s * (x - mean_s), 0.0)
            if HAS_V:
                g = g - tl.where((n < nv)[:, None], a_v + b_v * (x - mean_v), 0.0)
        tl.store(dx_ptr + o, (k1 * g).to(dx_ptr.dtype.element_ty), mask=m)


# ============================================================================ host side
def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _target_programs(x: torch.Tensor) -> int:
    if x.is_cuda:
        return 4 * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter runs programs one after another: few, large splits


class Geometry:
    """How a dense ``(N, C, *S)`` tensor is laid out, seen as ``(N, C, D, H, W)``."""

    def __init__(self, shape: tuple[int, ...], is_channels_last: bool):
        self.N, self.C = int(shape[0]), int(shape[1])
        spatial = [int(s) for s in shape[2:]]
        if len(spatial) > 3:
            raise ValueError(f"at most 3 spatial dims, got input shape {tuple(shape)}")
        self.D, self.H, self.W = [1] * (3 - len(spatial)) + spatial
        self.S = self.D * self.H * self.W
        self.channels_last = is_channels_last
        if self.channels_last:
            sw = self.C
            self.stride_n, self.stride_c = self.S * self.C, 1
        else:
            sw = 1
            self.stride_n, self.stride_c = self.C * self.S, self.S
        self.stride_w, self.stride_h, self.stride_d = sw, sw * self.W, sw * self.W * self.H
        self.int64 = self.N * self.C * self.S >= 2 ** 31 - 1
        # the elementwise passes see a contiguous matrix (R, K)
        if self.channels_last:
            self.R, self.K = self.N * self.S, self.C
        else:
            self.R, self.K = self.N * self.C, self.S


def _reduce_tiling(g: Geometry, full_box: bool, box_positions: int):
    """(BLOCK_P, BLOCK_C, FLAT) of a reduction over positions with channels across."""
    if g.channels_last:
        block_c = min(_pow2(g.C), 128)
        block_p = max(16, _REDUCE_TILE // block_c)
        return block_p, block_c, full_box
    block_p = min(_pow2(box_positions), 1024)
    block_c = max(1, min(_pow2(g.C), _REDUCE_TILE // block_p))
    return block_p, block_c, False


def _elementwise_tiling(g: Geometry):
    block_k = min(_pow2(g.K), 1024 if not g.channels_last else 256)
    block_r = max(1, min(_pow2(g.R), _ELEMENTWISE_TILE // block_k))
    return block_r, block_k


def _splits(programs: int, total_tiles: int, channel_blocks: int) -> tuple[int, int]:
    want = max(1, -(-programs // channel_blocks))
    splits = max(1, min(total_tiles, want))
    per_split = max(1, -(-total_tiles // splits))
    return -(-total_tiles // per_split), per_split


class _Launch(NamedTuple):
    """One kernel launch with its shape-derived arguments: ``kernel[grid](*tensors, *args, **meta)``."""
    grid: tuple[int, ...]
    args: tuple
    meta: dict


def _elementwise_launch(g: Geometry, **meta) -> _Launch:
    block_r, block_k = _elementwise_tiling(g)
    return _Launch((-(-g.R // block_r), -(-g.K // block_k)), (),
                   dict(meta, CHANNEL_ON_ROWS=not g.channels_last, INT64=g.int64, BLOCK_R=block_r, BLOCK_K=block_k,
                        num_warps=8 if block_r * block_k >= 4096 else 4))


def _group_launch(g: Geometry, row0: int, nrows: int, box, programs: int) -> tuple[_Launch, int]:
    """The partial-statistics launch of one group (rows x box) and its number of splits."""
    (d0, d1), (h0, h1), (w0, w1) = box
    bd, bh, bw = d1 - d0, h1 - h0, w1 - w0
    P = bd * bh * bw
    full_box = P == g.S
    block_p, block_c, flat = _reduce_tiling(g, full_box, P)
    if flat:
        tiles_per_row = 0
        total_tiles = -(-(nrows * P) // block_p)
    else:
        tiles_per_row = -(-P // block_p)
        total_tiles = nrows * tiles_per_row
    cblocks = -(-g.C // block_c)
    splits, per_split = _splits(programs, total_tiles, cblocks)
    args = (g.C, splits, per_split, total_tiles, row0, nrows, P, max(tiles_per_row, 1), bh, bw, d0, h0, w0,
            g.stride_n, g.stride_c, g.stride_d, g.stride_h, g.stride_w)
    meta = dict(FLAT=flat, FULL_BOX=full_box, INT64=g.int64, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return _Launch((cblocks, splits), args, meta), splits


class _ForwardPlan(NamedTuple):
    sampled: tuple[_Launch, int] | None     # partial statistics of the sampled group, splits
    virtual: tuple[_Launch, int] | None     # ... of the virtual rows (VDN)
    finalize: _Launch
    normalize: _Launch
    C: int
    window_finalize: _Launch                # Cross-iteration BN's finalize instead of ``finalize``


class _BackwardPlan(NamedTuple):
    partial: _Launch
    splits: int
    finalize: _Launch
    grad_input: _Launch
    C: int
    counts: tuple[float, float]             # n_v, n_s of Eq. 6


def _region_parts(region):
    nv, r0, r1, d0, d1, h0, h1, w0, w1 = (int(v) for v in region)
    return nv, r0, r1, ((d0, d1), (h0, h1), (w0, w1))


# Launch arguments depend only on the shape, layout, region and flags, which a layer repeats
# step after step: computing them once keeps the host's work per step to the launches (small
# ResNet layers are host-bound, see benchmarks/kernel_overhead.py).
@functools.lru_cache(maxsize=1024)
def _forward_plan(shape, is_channels_last: bool, region: tuple[int, ...], has_v: bool, has_s: bool,
                  act: str, has_w: bool, has_b: bool, programs: int) -> _ForwardPlan:
    g = Geometry(shape, is_channels_last)
    nv, r0, r1, box = _region_parts(region)
    sampled = _group_launch(g, r0, r1 - r0, box, programs) if has_s else None
    full = ((0, g.D), (0, g.H), (0, g.W))
    virtual = _group_launch(g, 0, nv, full, programs) if has_v else None
    block_c = min(_pow2(g.C), 64)
    finalize = _Launch((-(-g.C // block_c),), (),
                       dict(HAS_S=has_s, HAS_V=has_v, BLOCK_S=32, BLOCK_C=block_c, num_warps=4))
    normalize = _normalize_launch(shape, is_channels_last, act, has_w, has_b)
    window_finalize = _Launch(finalize.grid, (), dict(BLOCK_S=32, BLOCK_C=block_c, num_warps=4))
    return _ForwardPlan(sampled, virtual, finalize, normalize, g.C, window_finalize)


@functools.lru_cache(maxsize=1024)
def _normalize_launch(shape, is_channels_last: bool, act: str, has_w: bool, has_b: bool) -> _Launch:
    g = Geometry(shape, is_channels_last)
    launch = _elementwise_launch(g, HAS_W=has_w, HAS_B=has_b, ACT=ACTIVATIONS[act])
    return launch._replace(args=(g.R, g.K, g.C))


@functools.lru_cache(maxsize=1024)
def _backward_plan(shape, is_channels_last: bool, region: tuple[int, ...], has_v: bool, has_s: bool,
                   act: str, has_w: bool, has_b: bool, programs: int) -> _BackwardPlan:
    g = Geometry(shape, is_channels_last)
    nv, r0, r1, box = _region_parts(region)
    (d0, d1), (h0, h1), (w0, w1) = box
    n_s = (r1 - r0) * (d1 - d0) * (h1 - h0) * (w1 - w0)
    n_v = nv * g.S
    all_sampled = has_s and not has_v and n_s == g.N * g.S
    block_p, block_c, flat = _reduce_tiling(g, True, g.S)
    if flat:
        tiles_per_row = 1
        total_tiles = -(-(g.N * g.S) // block_p)
    else:
        tiles_per_row = -(-g.S // block_p)
        total_tiles = g.N * tiles_per_row
    cblocks = -(-g.C // block_c)
    splits, per_split = _splits(programs, total_tiles, cblocks)
    act_id = ACTIVATIONS[act]
    partial = _Launch((cblocks, splits),
                      (g.C, splits, per_split, total_tiles, g.N, g.S, tiles_per_row, g.stride_n, g.stride_c, g.stride_w),
                      dict(FLAT=flat, HAS_W=has_w, HAS_B=has_b, ACT=act_id, INT64=g.int64, BLOCK_P=block_p,
                           BLOCK_C=block_c, num_warps=4))
    fc = min(_pow2(g.C), 64)
    finalize = _Launch((-(-g.C // fc),), (), dict(HAS_W=has_w, BLOCK_S=32, BLOCK_C=fc, num_warps=4))
    grad_input = _elementwise_launch(g, ALL_SAMPLED=all_sampled, HAS_S=has_s, HAS_V=has_v, HAS_W=has_w, HAS_B=has_b,
                                     ACT=act_id)
    grad_input = grad_input._replace(args=(g.R, g.K, g.C, g.S, g.H, g.W, nv, r0, r1, d0, d1, h0, h1, w0, w1))
    return _BackwardPlan(partial, splits, finalize, grad_input, g.C, (float(max(n_v, 1)), float(max(n_s, 1))))


# Elements one single-pass program covers (values per channel x its channels) up to which a
# layer runs the single-pass kernels. Below it a step is bound by the host's 6 launches of the
# split kernels (see the single-pass section above); above it a program would loop over too
# many tiles and the split kernels' parallelism over rows wins. BNREWRITE_SINGLE_PASS_MAX
# overrides it (0: never); benchmarks/bn_layer_speed.py times both sequences side by side.
SINGLE_PASS_MAX = int(os.environ.get("BNREWRITE_SINGLE_PASS_MAX", 1 << 17))
# Elements of one single-pass tile (8 warps: 16 per thread, as in the elementwise passes). With
# 8192 the kernels needed up to 255 registers and spilled up to 120 bytes per thread on sm_90
# (benchmarks/kernel_resources.py); with 4096 at most 180 and 8 bytes.
_SINGLE_PASS_TILE = 4096


def single_pass(x: torch.Tensor) -> bool:
    """Whether a training step on ``x`` runs the single-pass kernels (see :data:`SINGLE_PASS_MAX`)."""
    key = _flags(x, whole_batch_region(x.shape), 0.0, "none", None, None)
    return _single_pass_plan(*key, SINGLE_PASS_MAX) is not None


class _SinglePassPlan(NamedTuple):
    forward: _Launch
    backward: _Launch
    window: _Launch                  # Cross-iteration BN's forward (whole batch, no sample)
    counts: tuple[float, float]      # n_v, n_s of Eq. 6
    C: int


def _single_pass_tiling(g: Geometry, programs: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of a single-pass program: its channels, and the (row, position) pairs
    of one tile. Channels-last reads need ≥ 16 adjacent channels per row to fill a memory
    sector; channels-first ones read each channel's positions contiguously, so there few
    channels per program keep the programs many. With one position per row (``(N, C)``) both
    layouts have adjacent channels."""
    if g.channels_last or g.S == 1:
        block_c = min(_pow2(g.C), 64)
        while block_c > 16 and -(-g.C // block_c) < programs:
            block_c //= 2
    else:
        block_c = 1
        while block_c < 4 and -(-g.C // (2 * block_c)) >= programs:
            block_c *= 2
    block_p = max(1, min(_pow2(g.N * g.S), _SINGLE_PASS_TILE // block_c))
    return block_c, block_p


@functools.lru_cache(maxsize=1024)
def _single_pass_plan(shape, is_channels_last: bool, region: tuple[int, ...], has_v: bool, has_s: bool,
                      act: str, has_w: bool, has_b: bool, programs: int, limit: int) -> _SinglePassPlan | None:
    """The single-pass launches of a call, or None when a program would cover more than ``limit``
    elements (the split kernels run it)."""
    g = Geometry(shape, is_channels_last)
    block_c, block_p = _single_pass_tiling(g, programs)
    if g.N * g.S * min(block_c, g.C) > limit:
        return None
    nv, r0, r1, box = _region_parts(region)
    (d0, d1), (h0, h1), (w0, w1) = box
    bh, bw = h1 - h0, w1 - w0
    P_s = (d1 - d0) * bh * bw
    n_s = (r1 - r0) * P_s
    n_v = nv * g.S

    def tiles(pairs: int) -> int:
        return -(-pairs // block_p)

    grid = (-(-g.C // block_c),)
    meta = dict(HAS_S=has_s, HAS_V=has_v, HAS_W=has_w, HAS_B=has_b, ACT=ACTIVATIONS[act], INT64=g.int64,
                BLOCK_P=block_p, BLOCK_C=block_c, num_warps=8 if block_p * block_c >= 4096 else 4)
    forward = _Launch(grid, (g.C, g.N, g.S, tiles(g.N * g.S), nv, tiles(n_v), r0, r1 - r0, P_s, tiles(n_s), bh, bw,
                             d0, h0, w0, g.stride_n, g.stride_c, g.stride_d, g.stride_h, g.stride_w),
                      dict(meta, FULL_BOX_S=P_s == g.S))
    backward = _Launch(grid, (g.C, g.N, g.S, g.H, g.W, tiles(g.N * g.S), nv, r0, r1, d0, d1, h0, h1, w0, w1,
                              g.stride_n, g.stride_c, g.stride_w),
                       dict(meta, ALL_SAMPLED=has_s and not has_v and n_s == g.N * g.S))
    window = _Launch(grid, (g.C, g.N, g.S, tiles(g.N * g.S), g.stride_n, g.stride_c, g.stride_w),
                     {k: v for k, v in meta.items() if k not in ("HAS_S", "HAS_V")})
    return _SinglePassPlan(forward, backward, window, (float(max(n_v, 1)), float(max(n_s, 1))), g.C)


def _flags(x: torch.Tensor, region, wv: float, act: str, weight, bias) -> tuple:
    """The plan key of a call: everything its launch arguments depend on."""
    region = tuple(region)
    return (x.shape, channels_last(x), region, wv > 0.0 and region[0] > 0, wv < 1.0, act,
            weight is not None, bias is not None, _target_programs(x))


def on_device_of(index: int):
    """Run the decorated entry point with argument ``index``'s CUDA device current: Triton launches
    on the current device, and a model moved to ``cuda:1`` without ``torch.cuda.set_device(1)``
    (a DDP rank that only calls ``model.to(rank)``) would have its kernels launched on ``cuda:0``."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            t = args[index]
            if t.is_cuda and t.device.index is not None and t.device.index != torch.cuda.current_device():
                with torch.cuda.device(t.device):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)
        return run
    return wrap


@on_device_of(2)
def update_running_stats(running_mean, running_var, stats, momentum: float, unbias: float) -> None:
    launch_cached(_running_update_kernel, _running_update_launch(int(stats.shape[1])), (stats, running_mean, running_var),
                  (float(momentum), float(unbias)))


@functools.lru_cache(maxsize=1024)
def _running_update_launch(C: int) -> _Launch:
    block_c = min(_pow2(C), 256)
    return _Launch((-(-C // block_c),), (C,), dict(BLOCK_C=block_c, num_warps=4))


@on_device_of(0)
def forward(x: torch.Tensor, weight, bias, region, wv: float, eps: float, act: str,
            slope: float, running=None, tracked=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled BN (+ activation) forward. ``x`` must be dense (see :func:`.layout.dense`).
    Returns ``(y, stats)`` with ``stats = [mean, var, mean_virtual, mean_sampled]`` (4, C) fp32.
    ``running = (running_mean, running_var, momentum, unbias)``: also update those in place, as
    :func:`update_running_stats` does, in the same launch that finalizes the statistics;
    ``tracked``: an int64 one-element tensor (``num_batches_tracked``) that launch adds 1 to."""
    key = _flags(x, region, wv, act, weight, bias)
    single = _single_pass_plan(*key, SINGLE_PASS_MAX)
    if single is not None:
        return _forward_single_pass(x, weight, bias, wv, eps, slope, running, tracked, single)
    plan = _forward_plan(*key)
    dummy = stats = torch.empty((4, plan.C), device=x.device, dtype=torch.float32)
    partials = []
    for group in (plan.sampled, plan.virtual):
        if group is None:
            partials += [dummy, 0]
            continue
        launch, splits = group
        part = torch.empty((3, splits, plan.C), device=x.device, dtype=torch.float32)
        launch_cached(_stats_partial_kernel, launch, (x, part))
        partials += [part, splits]
    rm, rv, momentum, unbias = running if running is not None else (stats, stats, 0.0, 1.0)
    fin = plan.finalize
    launch_cached(_stats_finalize_kernel, fin, (*partials, stats, plan.C, float(wv), rm, rv,
                                                stats if tracked is None else tracked, float(momentum),
                                                float(unbias)), HAS_RUNNING=running is not None,
                  HAS_TRACKED=tracked is not None)
    return _normalize(x, stats, weight, bias, eps, slope, plan.normalize), stats


def _forward_single_pass(x, weight, bias, wv: float, eps: float, slope: float, running, tracked,
                         plan: _SinglePassPlan) -> tuple[torch.Tensor, torch.Tensor]:
    stats = torch.empty((4, plan.C), device=x.device, dtype=torch.float32)
    y = torch.empty_like(x)
    rm, rv, momentum, unbias = running if running is not None else (stats, stats, 0.0, 1.0)
    launch = plan.forward
    launch_cached(_forward_single_pass_kernel, launch,
                  (x, y, stats, stats if weight is None else weight, stats if bias is None else bias, rm, rv,
                   stats if tracked is None else tracked),
                  (float(wv), float(eps), float(slope), float(momentum), float(unbias)),
                  HAS_RUNNING=running is not None, HAS_TRACKED=tracked is not None)
    return y, stats


@on_device_of(0)
def window_forward(x: torch.Tensor, weight, bias, past_mean: torch.Tensor, past_sq_mean: torch.Tensor,
                   eps: float, act: str, slope: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-iteration BN forward (Eqs. 9–12): one reduction over the batch, the window finalize
    (:func:`_window_finalize_kernel`) with the (h, C) compensated past statistics, one normalise
    pass; with few values per channel (:func:`single_pass`) all three in one launch. Returns
    ``(y, stats)``, ``stats`` (6, C) fp32 as that kernel stores it; :func:`backward` with the
    whole batch as the one group of count k·M differentiates it."""
    key = _flags(x, whole_batch_region(x.shape), 0.0, act, weight, bias)
    past_mean = past_mean.to(torch.float32).contiguous()
    past_sq_mean = past_sq_mean.to(torch.float32).contiguous()
    plan = _single_pass_plan(*key, SINGLE_PASS_MAX)
    if plan is not None:
        stats = torch.empty((6, plan.C), device=x.device, dtype=torch.float32)
        y = torch.empty_like(x)
        launch = plan.window
        launch_cached(_window_single_pass_kernel, launch,
                      (x, y, stats, stats if weight is None else weight, stats if bias is None else bias, past_mean,
                       past_sq_mean, int(past_mean.shape[0])), (float(eps), float(slope)))
        return y, stats
    plan = _forward_plan(*key)
    launch, splits = plan.sampled
    part = torch.empty((3, splits, plan.C), device=x.device, dtype=torch.float32)
    launch_cached(_stats_partial_kernel, launch, (x, part))
    stats = torch.empty((6, plan.C), device=x.device, dtype=torch.float32)
    launch_cached(_window_finalize_kernel, plan.window_finalize,
                  (part, splits, past_mean, past_sq_mean, int(past_mean.shape[0]), stats, plan.C))
    return _normalize(x, stats, weight, bias, eps, slope, plan.normalize), stats


def _normalize(x, stats, weight, bias, eps: float, slope: float, launch: _Launch) -> torch.Tensor:
    y = torch.empty_like(x)
    launch_cached(_normalize_kernel, launch,
                  (x, y, stats, stats if weight is None else weight, stats if bias is None else bias),
                  (float(eps), float(slope)))
    return y


@on_device_of(0)
def normalize(x, stats, weight, bias, eps: float, act: str, slope: float) -> torch.Tensor:
    """The normalise(+affine+activation) pass alone (one read and one write of the tensor)."""
    launch = _normalize_launch(x.shape, channels_last(x), act, weight is not None, bias is not None)
    return _normalize(x, stats, weight, bias, eps, slope, launch)


@on_device_of(1)
def backward(dy: torch.Tensor, x: torch.Tensor, weight, bias, stats: torch.Tensor, region, wv: float,
             eps: float, act: str, slope: float, group_count: float | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dweight, dbias) of :func:`forward` (App. C Eq. 5–6); dweight/dbias in float32.
    ``group_count``: the sampled group's n_G in Eq. 6 instead of its size (k·M for
    :func:`window_forward`, whose statistics give the batch a 1/k share)."""
    key = _flags(x, region, wv, act, weight, bias)
    has_v = key[3]
    dy = like(dy, x)
    w_arg = stats if weight is None else weight
    b_arg = stats if bias is None else bias
    single = _single_pass_plan(*key, SINGLE_PASS_MAX)
    plan = single if single is not None else _backward_plan(*key)
    counts = plan.counts if group_count is None else (plan.counts[0], float(group_count))
    device, C = x.device, plan.C
    dw = torch.empty(C, device=device, dtype=torch.float32)
    db = torch.empty(C, device=device, dtype=torch.float32)
    dx = torch.empty_like(x)
    if single is not None:
        launch_cached(_backward_single_pass_kernel, plan.backward, (dy, x, stats, w_arg, b_arg, dx, dw, db),
                      (float(wv if has_v else 0.0), *counts, float(eps), float(slope)))
        return dx, dw, db
    part = torch.empty((2, plan.splits, C), device=device, dtype=torch.float32)
    launch_cached(_grad_partial_kernel, plan.partial, (dy, x, stats, w_arg, b_arg, part), (float(eps), float(slope)))
    coef = torch.empty((5, C), device=device, dtype=torch.float32)
    launch_cached(_grad_finalize_kernel, plan.finalize, (part, plan.splits, stats, w_arg, coef, dw, db, C),
                  (float(eps), float(wv if has_v else 0.0), *counts))
    launch_cached(_grad_input_kernel, plan.grad_input, (dy, x, stats, w_arg, b_arg, coef, dx),
                  (float(eps), float(slope)))
    return dx, dw, db


def is_interpreted() -> bool:
    """Whether the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction  # not imported by triton itself when compiling

    return isinstance(_normalize_kernel, InterpretedFunction)
