"""Non-uniform quantization (NUQ) of weights: keep ``num_steps`` of the 256 INT8 levels.

Why: after uniform 8-bit quantization (ARQ: one symmetric scale per output channel), most of a layer's codes
sit near 0; a table of 16 or 32 well chosen INT8 levels keeps almost all of the information, and each weight is
then an index of 4 or 5 bits. The integer kernels still see INT8 values (the levels), so deployment runs at
INT8 speed while the file stores packed indices.

Level selection: one table of levels per layer, shared by all output channels (each channel keeps its own
scale, so its codes already span [-127, 127]). The error minimised is the layer's output error under a
diagonal approximation, ``sum_(o,i,k) E[x_i^2] * s_o^2 * (code - level)^2``: input channel ``i`` weighted by its
mean square seen in calibration, output channel ``o`` by its squared scale. On the histogram of integer codes
this is a 1-D weighted k-means with integer centres, solved exactly by dynamic programming over contiguous
clusters (the optimal clusters of a 1-D quadratic quantizer are contiguous). Each of ``num_of_iteration``
refinement steps then refits every channel's scale by weighted least squares to its assigned levels,
requantizes and reselects the levels; the best result seen is kept, so refinement never makes it worse.
Deterministic: no random initialisation, ties go to the lower level.
"""

from __future__ import annotations

import numpy as np

from omct.core.bias_correction import ChannelMeans
from omct.core.params import MIN_SCALE

#: Numbers of levels a layer may keep (AMCT's ``num_steps``).
ALLOWED_STEPS = (16, 32, 64, 128)
#: The INT8 grid the levels come from.
QMIN, QMAX = -128, 127


class ChannelMeanSquares(ChannelMeans):
    """Streaming per-channel mean of ``x**2`` along ``axis``: how much each input channel matters."""

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values, np.float32)
        super().update(x * x)


def _cluster_costs(weights: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cost[i, j] and centre[i, j] of one cluster holding support points i..j (i <= j): the weighted squared
    error around the best integer centre, which is the weighted mean rounded (the error is quadratic)."""
    s0 = np.concatenate([[0.0], np.cumsum(weights)])
    s1 = np.concatenate([[0.0], np.cumsum(weights * values)])
    s2 = np.concatenate([[0.0], np.cumsum(weights * values * values)])
    w0 = s0[None, 1:] - s0[:-1, None]  # [i, j]: points i..j
    w1 = s1[None, 1:] - s1[:-1, None]
    w2 = s2[None, 1:] - s2[:-1, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(w0 > 0, w1 / np.where(w0 > 0, w0, 1.0), (values[:, None] + values[None, :]) / 2)
    centre = np.round(mean)
    cost = np.maximum(w2 - 2 * centre * w1 + centre * centre * w0, 0.0)
    upper = np.triu(np.ones_like(cost, dtype=bool))
    return np.where(upper, cost, np.inf), centre


def select_levels(values: np.ndarray, weights: np.ndarray, num_steps: int) -> np.ndarray:
    """The at most ``num_steps`` integer levels minimising ``sum weights * (values - nearest level)^2``.

    ``values``: distinct integers (the support, e.g. the INT8 codes present), ``weights``: their non-negative
    total weights. Exact (dynamic programming over contiguous clusters). Returns sorted distinct int levels;
    fewer than ``num_steps`` only when there are fewer support points."""
    order = np.argsort(values, kind="stable")
    v = np.asarray(values, np.float64)[order]
    w = np.asarray(weights, np.float64)[order]
    n = v.size
    if n == 0:
        return np.zeros(1, np.int64)
    if n <= num_steps:
        return v.astype(np.int64)
    cost, centre = _cluster_costs(w, v)
    # best[j]: least cost of points 0..j in k + 1 clusters; each args[k - 1][j]: first point of the last cluster
    best = cost[0].copy()
    args = []
    for _ in range(1, num_steps):
        total = np.full((n, n), np.inf)
        total[1:] = best[:-1, None] + cost[1:]  # [i, j]: 0..i-1 in k clusters, i..j in one
        arg = np.argmin(total, axis=0)  # the first minimum: deterministic
        best = total[arg, np.arange(n)]
        args.append(arg)
    levels, j = [], n - 1
    for arg in reversed(args):
        start = int(arg[j])
        levels.append(centre[start, j])
        j = start - 1
    levels.append(centre[0, j])
    return np.unique(np.asarray(levels, np.int64))


def nearest_level(codes: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Index into sorted ``levels`` of the level nearest to each (float) code; ties to the lower level."""
    levels = np.asarray(levels, np.float64)
    mid = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(mid, codes, side="left")


def _moved(a: np.ndarray, out_axis: int | None, in_axis: int | None) -> np.ndarray:
    """``a`` with the output axis first (a leading axis of 1 when per-tensor)."""
    return np.moveaxis(a, out_axis, 0) if out_axis is not None else a[None]


def _element_weights(shape: tuple[int, ...], scale: np.ndarray, out_axis: int | None, in_axis: int | None,
                     importance: np.ndarray | None) -> np.ndarray:
    """Per-element weight ``E[x_i^2] * s_o^2`` broadcast to ``shape``."""
    ndim = len(shape)
    w = np.ones(shape, np.float64)
    if importance is not None and in_axis is not None and np.size(importance) == shape[in_axis]:
        imp = np.asarray(importance, np.float64).reshape(-1)
        imp = np.where(np.isfinite(imp) & (imp > 0), imp, 0.0)
        imp = imp + 1e-3 * max(float(imp.mean()), 1e-30)  # a silent channel still counts a little
        b = [1] * ndim
        b[in_axis] = -1
        w = w * imp.reshape(b)
    s = np.asarray(scale, np.float64)
    if out_axis is not None and s.ndim and s.size == shape[out_axis]:
        b = [1] * ndim
        b[out_axis] = -1
        w = w * (s * s).reshape(b)
    else:
        w = w * float(np.ravel(s)[0]) ** 2
    return w


def _scaled(weight: np.ndarray, scale: np.ndarray, out_axis: int | None) -> np.ndarray:
    s = np.asarray(scale, np.float64)
    if out_axis is not None and s.ndim:
        b = [1] * weight.ndim
        b[out_axis] = -1
        s = s.reshape(b)
    return np.asarray(weight, np.float64) / s


def to_levels(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, levels) -> np.ndarray:
    """The integer weight on the levels: each ``w / s`` goes to its nearest level (int64 codes)."""
    levels = np.asarray(levels, np.int64)
    return levels[nearest_level(_scaled(weight, np.asarray(scale, np.float32), out_axis), levels)]


def weighted_error(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, in_axis: int | None, levels,
                   importance: np.ndarray | None = None) -> float:
    """The objective NUQ minimises (in the weights' own units): importance-weighted squared error."""
    codes = to_levels(weight, scale, out_axis, levels)
    s = np.asarray(scale, np.float32).astype(np.float64)
    if out_axis is not None and s.ndim:
        b = [1] * weight.ndim
        b[out_axis] = -1
        s = s.reshape(b)
    err = (codes * s - np.asarray(weight, np.float64)) ** 2
    return float((err * _element_weights(weight.shape, np.ones_like(np.asarray(scale, np.float64)), out_axis, in_axis,
                                         importance)).sum())


def _histogram(codes: np.ndarray, elem_w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hist = np.bincount((codes.reshape(-1) - QMIN).astype(np.int64), weights=elem_w.reshape(-1), minlength=QMAX - QMIN + 1)
    present = np.bincount((codes.reshape(-1) - QMIN).astype(np.int64), minlength=QMAX - QMIN + 1) > 0
    support = np.nonzero(present)[0]
    return (support + QMIN).astype(np.int64), hist[support]


def fit(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, in_axis: int | None, num_steps: int,
        num_of_iteration: int = 1, importance: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """NUQ of one layer's weight: (per-channel scales, sorted INT8 levels, at most ``num_steps``).

    ``scale``: the uniform INT8 scales to start from (ARQ), one per slice on ``out_axis`` (or one);
    ``importance``: the mean square of each input channel (on ``in_axis``), or None for equal weights."""
    if num_steps not in ALLOWED_STEPS:
        raise ValueError(f"num_steps must be one of {', '.join(map(str, ALLOWED_STEPS))}, got {num_steps!r}")
    w = np.asarray(weight, np.float64)
    scale = np.asarray(scale, np.float32)

    def levels_for(s: np.ndarray) -> np.ndarray:
        codes = np.clip(np.round(_scaled(w, s, out_axis)), QMIN, QMAX)
        values, hist = _histogram(codes, _element_weights(w.shape, s, out_axis, in_axis, importance))
        return select_levels(values, hist, num_steps)

    levels = levels_for(scale)
    best = (weighted_error(w, scale, out_axis, in_axis, levels, importance), scale, levels)
    imp_w = _element_weights(w.shape, np.ones_like(scale, dtype=np.float64), out_axis, in_axis, importance)
    for _ in range(max(int(num_of_iteration), 0)):
        q = to_levels(w, scale, out_axis, levels).astype(np.float64)
        num = _moved(imp_w * w * q, out_axis, in_axis).reshape((scale.size if out_axis is not None else 1), -1).sum(1)
        den = _moved(imp_w * q * q, out_axis, in_axis).reshape((scale.size if out_axis is not None else 1), -1).sum(1)
        refit = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.ravel(scale).astype(np.float64))
        refit = np.where(np.isfinite(refit) & (refit >= MIN_SCALE), refit, np.ravel(scale))
        scale = refit.astype(np.float32).reshape(scale.shape)
        levels = levels_for(scale)
        err = weighted_error(w, scale, out_axis, in_axis, levels, importance)
        if err < best[0]:
            best = (err, scale, levels)
    return best[1], best[2]


def index_bits(num_steps: int) -> int:
    """Bits per packed index: log2 of the table size."""
    return max(int(np.ceil(np.log2(max(num_steps, 2)))), 1)


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """Indices as ``bits`` bit planes, each packed 8 per byte (MSB first): uint8 array [bits, ceil(n / 8)]."""
    idx = np.asarray(indices, np.int64).reshape(-1)
    planes = ((idx[None, :] >> np.arange(bits)[:, None]) & 1).astype(np.uint8)
    return np.packbits(planes, axis=1)


def unpack_indices(planes: np.ndarray, count: int) -> np.ndarray:
    """The inverse of ``pack_indices`` (numpy reference of what the deploy graph computes)."""
    bits = np.unpackbits(np.asarray(planes, np.uint8), axis=1)[:, :count].astype(np.int64)
    return (bits << np.arange(planes.shape[0])[:, None]).sum(0)


def packed_bytes(count: int, num_steps: int) -> int:
    """Bytes of ``count`` packed indices plus their INT8 level table."""
    return index_bits(num_steps) * -(-count // 8) + num_steps
