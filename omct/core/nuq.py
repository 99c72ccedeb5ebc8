"""Non-uniform quantization (NUQ) of weights: keep ``num_steps`` of the 256 INT8 levels.

Why: after uniform 8-bit quantization (ARQ: one symmetric scale per output channel), most of a layer's codes
sit near 0; a table of 16 or 32 well chosen INT8 levels keeps almost all of the information, and each weight is
then an index of 4 or 5 bits. The integer kernels still see INT8 values (the levels), so deployment runs at
INT8 speed while the file stores packed indices.

Level selection: one table of levels per output channel (with its own scale). The error minimised is the
layer's output error under a diagonal approximation, ``sum_(i,k) E[x_i^2] * (w - s * level)^2`` over each
channel's weights: input channel ``i`` weighted by its mean square seen in calibration. Per channel, on the
histogram of its integer codes, this is a 1-D weighted k-means with integer centres, solved exactly by dynamic
programming over contiguous clusters (the optimal clusters of a 1-D quadratic quantizer are contiguous). Each of
``num_of_iteration`` refinement steps then refits every channel's scale by weighted least squares to its
assigned levels, requantizes and reselects the levels; each channel keeps the best result seen, so refinement
never makes it worse.
Deterministic: no random initialisation, ties go to the lower level.
"""

from __future__ import annotations

import numpy as np

from omct.core import gptq
from omct.core.adaround import apply_gaps, flip_descent, flip_gaps
from omct.core.bias_correction import ChannelMeans
from omct.core.params import MIN_SCALE

#: Numbers of levels a layer may keep (AMCT's ``num_steps``).
ALLOWED_STEPS = (16, 32, 64, 128)
#: Distinct level tables a layer's channels share by default (``share_tables``): 16 tables of NUQ-16 cost what
#: 512 packed weights do, where one table per channel costs 32 per channel.
DEFAULT_TABLES = 16
#: A layer's channels keep one level table each unless those tables would cost more than this share of the layer's
#: packed indices (depthwise and narrow 1x1 layers); only then do they share ``num_tables`` (``effective_tables``).
#: Measured: on ResNet-18 sharing everywhere cost 3-4 dB of logit SQNR for 1% of file; on MobileNetV2 the
#: depthwise layers' own tables would be 3.6x their NUQ-16 indices.
SHARE_ABOVE = 1 / 16
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
    """Index into sorted ``levels`` of the level nearest to each (float) code; ties to the lower level (and to
    the first of repeated levels)."""
    levels = np.asarray(levels, np.float64)
    mid = (levels[1:] + levels[:-1]) / 2
    return np.searchsorted(mid, codes, side="left")


def _rows(a: np.ndarray, out_axis: int | None) -> np.ndarray:
    """``a`` as [channels, -1] with the output axis first (one row when per-tensor)."""
    if out_axis is None:
        return a.reshape(1, -1)
    return np.moveaxis(a, out_axis, 0).reshape(a.shape[out_axis], -1)


def _unrows(rows: np.ndarray, shape: tuple[int, ...], out_axis: int | None) -> np.ndarray:
    if out_axis is None:
        return rows.reshape(shape)
    moved = (shape[out_axis],) + tuple(d for i, d in enumerate(shape) if i != out_axis)
    return np.moveaxis(rows.reshape(moved), 0, out_axis)


def level_table(levels, channels: int) -> np.ndarray:
    """The record's flat ``nuq_levels`` as a [channels, num_steps] table (one row per weight scale)."""
    return np.asarray(levels, np.int64).reshape(channels, -1)


def _importance_rows(shape: tuple[int, ...], out_axis: int | None, in_axis: int | None,
                     importance: np.ndarray | None) -> np.ndarray:
    """Per-element weight E[x_i^2] (input channel ``i``), as [channels, -1] rows."""
    w = np.ones(shape, np.float64)
    if importance is not None and in_axis is not None and np.size(importance) == shape[in_axis]:
        imp = np.asarray(importance, np.float64).reshape(-1)
        imp = np.where(np.isfinite(imp) & (imp > 0), imp, 0.0)
        imp = imp + 1e-3 * max(float(imp.mean()), 1e-30)  # a silent channel still counts a little
        b = [1] * len(shape)
        b[in_axis] = -1
        w = w * imp.reshape(b)
    return _rows(w, out_axis)


def _assign(rows: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Each row's values (codes, float) on the nearest level of that row's table (a single row serves all)."""
    out = np.empty(rows.shape, np.int64)
    for c in range(rows.shape[0]):
        levels = table[c if table.shape[0] > 1 else 0]
        out[c] = levels[nearest_level(rows[c], levels)]
    return out


def _code_rows(weight: np.ndarray, scale: np.ndarray, out_axis: int | None) -> np.ndarray:
    """``w / s`` as [channels, -1] rows (the values the level tables are compared with)."""
    scale = np.asarray(scale, np.float32).astype(np.float64).reshape(-1)
    return _rows(np.asarray(weight, np.float64), out_axis) / scale[:, None]


def to_levels(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, levels,
              flips: list[int] | None = None) -> np.ndarray:
    """The integer weight on the levels: each ``w / s`` goes to the nearest level of its channel's table
    (``levels``: [channels, num_steps], or the record's flat list), as int64 codes in the weight's shape;
    except, with ``flips`` (the record's gap-coded ``ada_flip``), those weights take the level on the other
    side of ``w / s`` (output-aware assignment, ``assign_output_aware``)."""
    rows = _code_rows(weight, scale, out_axis)
    table = level_table(levels, rows.shape[0])
    nearest = _unrows(_assign(rows, table), np.shape(weight), out_axis)
    if not flips:
        return nearest
    return apply_gaps(nearest, _other_level(weight, scale, out_axis, levels), flips)


def output_error(weight: np.ndarray, scale: np.ndarray, out_axis: int, levels, h: np.ndarray,
                 flips: list[int] | None = None) -> float:
    """The layer's output error ``sum (W - Q) H (W - Q)^T`` with its weights on the levels (and ``flips``)."""
    s = np.asarray(scale, np.float32).astype(np.float64).reshape(-1, 1)
    q = _rows(to_levels(weight, scale, out_axis, levels, flips), out_axis) * s
    w = _rows(np.asarray(weight, np.float64), out_axis)
    hs = _per_group(h)
    per = len(w) // len(hs)
    return float(sum(gptq.output_error(w[g * per:(g + 1) * per], q[g * per:(g + 1) * per], hs[g]).sum()
                     for g in range(len(hs))))


def _per_group(h: np.ndarray) -> np.ndarray:
    """``h`` as [groups, d, d]: a grouped convolution's output channels of group g read only its inputs."""
    return h[None] if h.ndim == 2 else h


def _other_level(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, levels) -> np.ndarray:
    """Each weight's level on the other side of ``w / s`` from its nearest level (the nearest one itself at
    the ends of the table or exactly on a level), in the weight's shape."""
    rows = _code_rows(weight, scale, out_axis)
    table = level_table(levels, rows.shape[0]).astype(np.float64)
    table = np.broadcast_to(table, (rows.shape[0], table.shape[1]))
    _, other = gptq.bracket_indices(rows, table)
    return _unrows(np.take_along_axis(table, other, 1).astype(np.int64), np.shape(weight), out_axis)


def assign_output_aware(weight: np.ndarray, scale: np.ndarray, out_axis: int, levels,
                        h: np.ndarray) -> list[int]:
    """GPTQ's assignment of a channel-wise NUQ weight to its level tables with the second moment ``h`` of the
    layer's input (columns in the order of the weight's non-output axes, i.e. im2col's (in, kh, kw)): each
    weight takes one of the two levels around ``w / s``, chosen so that the layer's output error
    ``(W - Q) H (W - Q)^T`` is small rather than each weight's own. Returned as the gap-coded flat indices of
    the weights that take the other level (the record's ``ada_flip``; ``to_levels`` applies them).

    Rows are scaled by their own scale (``w / s`` against integer levels): each row's problem is independent
    of the others and of its scale, and the bracket is then computed exactly as ``to_levels`` computes it.
    A grouped convolution passes one ``h`` per group ([groups, d, d]): its output channels are in group order."""
    rows = _code_rows(weight, scale, out_axis)
    table = level_table(levels, rows.shape[0]).astype(np.float64)
    hs = _per_group(h)
    per = len(rows) // len(hs)
    idx = np.concatenate([gptq.assign(rows[g * per:(g + 1) * per], table[g * per:(g + 1) * per], hs[g], bracket=True)
                          for g in range(len(hs))])
    codes = _unrows(np.take_along_axis(table, idx, 1).astype(np.int64), np.shape(weight), out_axis)
    nearest = to_levels(weight, scale, out_axis, levels)
    return flip_gaps(nearest, _other_level(weight, scale, out_axis, levels), codes)


def bracket_levels(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, levels,
                   flips: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each weight's level (int codes, the weight's shape) with ``flips`` applied, and the other level of its
    bracket (the level around ``w / s`` it does not take; the same level where there is no other): the two
    choices the output-aware assignment and its polish decide between."""
    nearest = to_levels(weight, scale, out_axis, levels)
    other = _other_level(weight, scale, out_axis, levels)
    codes = apply_gaps(nearest, other, flips) if flips else nearest
    return codes, np.where(codes == nearest, other, nearest)


def polish_flips(weight: np.ndarray, scale: np.ndarray, out_axis: int, levels, h: np.ndarray,
                 flips: list[int] | None = None, max_steps: int | None = None) -> list[int]:
    """``flips`` improved by single flips between each weight's two bracket levels while one lowers the
    layer's output error ``(W - Q) H (W - Q)^T`` (``core.adaround.flip_descent``, in weight units): GPTQ
    quantizes the inputs one after another and never revisits a decision; the descent ends where no single
    flip helps. ``h`` as for ``assign_output_aware`` (one per group for a grouped convolution). Returned as
    the record's gap-coded flips."""
    codes, alt = bracket_levels(weight, scale, out_axis, levels, flips)
    s = np.asarray(scale, np.float32).reshape(-1, 1)
    hs = np.asarray(_per_group(h), np.float32)
    start, other = _rows(codes, out_axis), _rows(alt, out_axis)
    g, d = len(hs), start.shape[1]
    shape = (g, start.shape[0] // g, d)
    w = _rows(np.asarray(weight, np.float32), out_axis).reshape(shape)
    values = (start * s).astype(np.float32).reshape(shape)
    final = flip_descent(values, (other * s).astype(np.float32).reshape(shape), w, hs, None, max_steps)
    polished = _unrows(np.where(final.reshape(start.shape) != values.reshape(start.shape), other, start),
                       np.shape(weight), out_axis)
    return flip_gaps(to_levels(weight, scale, out_axis, levels), _other_level(weight, scale, out_axis, levels),
                     polished)


def weighted_error(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, in_axis: int | None, levels,
                   importance: np.ndarray | None = None) -> float:
    """The objective NUQ minimises (in the weights' own units): importance-weighted squared error."""
    return float(_row_errors(weight, scale, out_axis, in_axis, levels, importance).sum())


def _row_errors(weight, scale, out_axis, in_axis, levels, importance) -> np.ndarray:
    codes = _rows(to_levels(weight, scale, out_axis, levels), out_axis)
    s = np.asarray(scale, np.float32).astype(np.float64).reshape(-1, 1)
    err = (codes * s - _rows(np.asarray(weight, np.float64), out_axis)) ** 2
    return (err * _importance_rows(np.shape(weight), out_axis, in_axis, importance)).sum(axis=1)


def _row_levels(codes: np.ndarray, weights: np.ndarray, num_steps: int) -> np.ndarray:
    """The levels of one channel from its codes and their weights, padded to ``num_steps`` entries by
    repeating the highest (a fixed-size table row; the repeats are never chosen)."""
    values, inverse = np.unique(codes.astype(np.int64), return_inverse=True)
    levels = select_levels(values, np.bincount(inverse, weights=weights, minlength=values.size), num_steps)
    return np.concatenate([levels, np.full(num_steps - levels.size, levels[-1], np.int64)])


def fit(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, in_axis: int | None, num_steps: int,
        num_of_iteration: int = 1, importance: np.ndarray | None = None,
        num_tables: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """NUQ of one layer's weight: (per-channel scales, level table [channels, num_steps] of INT8 values; one
    row when per-tensor).

    One table per output channel: on the benchmark models (logit SQNR at NUQ-16, bias correction on) per-channel
    tables gave 27.2 dB (ResNet) and 27.8 dB (transformer) where one table per layer gave 20.0 and 17.1 (uniform
    INT4: 17.4 and 24.5), for ``num_steps`` bytes per channel. ``scale``: the uniform INT8 scales to start from
    (ARQ); ``importance``: the mean square of each input channel (on ``in_axis``), or None for equal weights.
    ``num_tables``: when positive and below the number of channels, the channels share that many distinct
    tables (``share_tables``; the deploy file then stores each distinct row once) where ``effective_tables``
    says so."""
    w = np.asarray(weight)
    channels = w.shape[out_axis] if out_axis is not None else 1
    shared = effective_tables(w.size, num_steps, channels, num_tables)
    options = fit_options(weight, scale, out_axis, in_axis, num_steps, num_of_iteration, importance,
                          shared)
    return options["shared" if shared else "channel"]


#: Results of fit_options' stages by the digest of their inputs (the weight algorithm fits each layer and NUQ's
#: allocation, ``algorithms.nuq_assignment``, asks again for the same layer's options): at most this many kept.
_MEMO_SIZE = 2048
_memo: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _digest(*parts) -> tuple:
    """A key for the inputs: each array's dtype, shape and the hash of its bytes (in-process only)."""
    key = []
    for p in parts:
        a = np.ascontiguousarray(p) if isinstance(p, np.ndarray) else None
        key.append(repr(p) if a is None else (a.dtype.str, a.shape, hash(a.tobytes())))
    return tuple(key)


def _remembered(key: tuple, compute):
    if key not in _memo:
        if len(_memo) >= _MEMO_SIZE:
            _memo.clear()
        _memo[key] = compute()
    return tuple(np.array(v, copy=True) for v in _memo[key])


def fit_options(weight: np.ndarray, scale: np.ndarray, out_axis: int | None, in_axis: int | None, num_steps: int,
                num_of_iteration: int = 1, importance: np.ndarray | None = None,
                num_tables: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The ways ``fit`` can store one layer: ``"channel"``, one level table per output channel, and, when
    ``num_tables`` is positive, below the number of channels and sharing makes the tables smaller,
    ``"shared"``, the channels on ``num_tables`` shared tables (each: (scales, table), as ``fit`` returns).
    Deterministic; each stage remembered by the digest of its inputs, so asking again for the same layer costs
    nothing."""
    if num_steps not in ALLOWED_STEPS:
        raise ValueError(f"num_steps must be one of {', '.join(map(str, ALLOWED_STEPS))}, got {num_steps!r}")
    w = np.asarray(weight, np.float64)
    rows = _rows(w, out_axis)
    imp = _importance_rows(w.shape, out_axis, in_axis, importance)
    base = _digest(np.asarray(weight), np.asarray(scale, np.float32), out_axis, in_axis, num_steps,
                   num_of_iteration, None if importance is None else np.asarray(importance))
    table, start = _remembered((base, "channel"), lambda: _channel_tables(
        w, scale, out_axis, in_axis, num_steps, num_of_iteration, importance))
    channels = table.shape[0]
    out = {"channel": table}
    if 0 < num_tables < channels and num_tables <= 256 and num_steps * num_tables + channels < num_steps * channels:
        out["shared"] = _remembered((base, num_tables), lambda: (share_tables(
            rows / start.astype(np.float64)[:, None], imp, table, num_tables),))[0]
    final = {}
    for k, t in out.items():
        s = _half(_keep_norm(rows, imp, start, t))
        final[k] = (s if out_axis is not None else s.reshape(()), t)
    return final


def _channel_tables(w, scale, out_axis, in_axis, num_steps, num_of_iteration, importance):
    """One level table per channel and the scales it was fitted with (before ``_keep_norm``)."""
    rows = _rows(w, out_axis)
    imp = _importance_rows(w.shape, out_axis, in_axis, importance)
    scale = np.asarray(scale, np.float32).reshape(-1)

    def tables(s: np.ndarray) -> np.ndarray:
        codes = np.clip(np.round(rows / s.astype(np.float64)[:, None]), QMIN, QMAX)
        return np.stack([_row_levels(codes[c], imp[c], num_steps) for c in range(rows.shape[0])])

    table = tables(scale)
    best_err = _row_errors(w, scale, out_axis, in_axis, table, importance)
    best_scale, best_table = scale.copy(), table.copy()
    for _ in range(max(int(num_of_iteration), 0)):
        q = _assign(rows / scale.astype(np.float64)[:, None], table).astype(np.float64)
        num, den = (imp * rows * q).sum(1), (imp * q * q).sum(1)
        refit = np.where(den > 0, num / np.where(den > 0, den, 1.0), scale)
        scale = np.where(np.isfinite(refit) & (refit >= MIN_SCALE), refit, scale).astype(np.float32)
        table = tables(scale)
        err = _row_errors(w, scale, out_axis, in_axis, table, importance)
        better = err < best_err  # channels are independent: each keeps its best
        best_err = np.where(better, err, best_err)
        best_scale[better], best_table[better] = scale[better], table[better]
    return best_table, best_scale


def allocate(costs: list, errors: list, budget: float, fill: bool = True) -> list[int]:
    """For each layer the option (index into its ``costs`` / ``errors``) that makes the total error small with the
    total cost at most ``budget``: greedy on each layer's lower convex hull of (cost, error), taking the steps that
    lower the error most per unit of cost first (the Lagrangian solution of this knapsack: no choice of options
    costing at most what the steps taken cost has a smaller total error), then, with ``fill``, any remaining step
    that still fits, steepest first. Starts from each layer's cheapest option (the least error among equally cheap);
    if even those exceed the budget, returns them. Deterministic: ties go to the earlier layer, then option."""
    hulls = []
    for c, e in zip(costs, errors, strict=True):
        order = sorted(range(len(c)), key=lambda i: (c[i], e[i], i))
        hull = [order[0]]
        for i in order[1:]:
            if e[i] >= e[hull[-1]]:
                continue  # no cheaper way to this error or a lower one
            while len(hull) >= 2:  # drop a point above the segment from its predecessor to this one
                a, b = hull[-2], hull[-1]
                if (e[a] - e[b]) * (c[i] - c[a]) <= (e[a] - e[i]) * (c[b] - c[a]):
                    hull.pop()
                else:
                    break
            hull.append(i)
        hulls.append(hull)
    at = [0] * len(hulls)  # position on each hull
    total = sum(costs[n][h[0]] for n, h in enumerate(hulls))

    def slope(n: int) -> float:
        h, i = hulls[n], at[n]
        a, b = h[i], h[i + 1]
        return (errors[n][a] - errors[n][b]) / max(costs[n][b] - costs[n][a], 1e-300)

    while True:
        steps = [n for n in range(len(hulls)) if at[n] + 1 < len(hulls[n])]
        if not steps:
            break
        n = max(steps, key=lambda k: (slope(k), -k))
        extra = costs[n][hulls[n][at[n] + 1]] - costs[n][hulls[n][at[n]]]
        if total + extra > budget:
            break
        total += extra
        at[n] += 1
    while fill:
        steps = [n for n in range(len(hulls)) if at[n] + 1 < len(hulls[n])
                 and total + costs[n][hulls[n][at[n] + 1]] - costs[n][hulls[n][at[n]]] <= budget]
        if not steps:
            break
        n = max(steps, key=lambda k: (slope(k), -k))
        total += costs[n][hulls[n][at[n] + 1]] - costs[n][hulls[n][at[n]]]
        at[n] += 1
    return [h[i] for h, i in zip(hulls, at, strict=True)]


def share_tables(codes: np.ndarray, imp: np.ndarray, tables: np.ndarray, num_tables: int,
                 rounds: int = 4) -> np.ndarray:
    """Per-channel level tables ([channels, num_steps]) replaced by at most ``num_tables`` distinct ones, each
    channel on the one that serves it best: the file then stores ``num_tables`` rows and one small index per
    channel instead of a row per channel (a NUQ-16 row costs as much as 32 packed weights).

    ``codes``: each channel's ``w / s`` ([channels, -1]), ``imp``: the importance weights. A k-means over
    channels: start from the tables of ``num_tables`` channels spread over the order of their tables' spread
    (deterministic), then alternately put each channel on the table with the least weighted error and choose
    each shared table exactly (``select_levels``) for the pooled, weighted codes of its channels."""
    channels, steps = tables.shape
    ints = np.clip(np.round(codes), QMIN, QMAX).astype(np.int64) - QMIN  # histogram bins 0..255
    hist = np.stack([np.bincount(ints[c], weights=imp[c], minlength=QMAX - QMIN + 1) for c in range(channels)])
    spread = np.argsort(tables.std(axis=1), kind="stable")
    shared = tables[spread[np.linspace(0, channels - 1, num_tables).round().astype(np.int64)]]
    grid = np.arange(QMIN, QMAX + 1, dtype=np.float64)
    member = None
    for _ in range(rounds):
        # error of every channel on every table, from its histogram: sum_bins hist * (bin - nearest level)^2
        err = np.stack([hist @ (grid - t[nearest_level(grid, t)]) ** 2 for t in shared], axis=1)  # [channels, K]
        new = np.argmin(err, axis=1)
        if member is not None and np.array_equal(new, member):
            break
        member = new
        for k in range(len(shared)):
            pooled = hist[member == k].sum(0)
            if pooled.any():
                values = np.flatnonzero(pooled)
                levels = select_levels(values + QMIN, pooled[values], steps)
                shared[k] = np.concatenate([levels, np.full(steps - levels.size, levels[-1], np.int64)])
    return shared[member]


def _half(scale: np.ndarray) -> np.ndarray:
    """The scales rounded to float16 numbers (a relative change below 0.05%) where they are normal float16
    numbers: the deploy file then stores them in half the bytes, exactly (``graph.export``)."""
    half = scale.astype(np.float16).astype(np.float32)
    ok = np.isfinite(half) & (np.abs(scale) >= np.finfo(np.float16).tiny) & (half >= MIN_SCALE)
    return np.where(ok, half, scale).astype(np.float32)


def _keep_norm(rows: np.ndarray, imp: np.ndarray, scale: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Scales that give each channel's quantized weight the (importance-weighted) norm of the float one.

    Least-squares levels are weighted means, so each channel's quantized weight is a little shorter than the
    float one; through a deep CNN without normalisation the shrinkage compounds (ResNet-18 w64 at NUQ-16: logits
    at 0.922 of FP32's norm, 20.9 dB logit SQNR; with the norm kept 0.952 and 24.3 dB, uniform INT4 23.7 dB;
    NUQ-32 29.0 -> 30.4 dB; `benchmarks/bench_nuq.py`). The weighted error grows slightly; the output's gain
    no longer drifts."""
    energy = (imp * rows * rows).sum(1)
    for _ in range(3):  # the assignment moves with the scale: a few fixed-point steps
        q = _assign(rows / scale.astype(np.float64)[:, None], table).astype(np.float64)
        got = (imp * q * q).sum(1) * scale.astype(np.float64) ** 2
        gain = np.sqrt(np.where(got > 0, energy / np.where(got > 0, got, 1.0), 1.0))
        new = scale * gain
        scale = np.where(np.isfinite(new) & (new >= MIN_SCALE), new, scale).astype(np.float32)
    return scale


def stored_bytes(shape: tuple[int, ...], out_axis: int | None, num_steps: int, num_tables: int = 0) -> int:
    """Bytes of a NUQ weight in the deploy file: packed indices plus the level tables (one per output channel,
    or ``num_tables`` shared ones and a one-byte table number per channel)."""
    return packed_bytes(int(np.prod(shape)), num_steps, shape[out_axis] if out_axis is not None else 1, num_tables)


def worthwhile(shape: tuple[int, ...], out_axis: int | None, num_steps: int, num_tables: int = 0) -> bool:
    """Whether NUQ stores the weight in fewer bytes than INT8 (one byte per weight): with few weights per
    output channel the tables outweigh the saving (with a table per channel NUQ-16 needs more than 32 per
    channel, NUQ-32 more than 85, NUQ-64 more than 256, NUQ-128 more than 1024; with shared tables far fewer),
    and such a layer keeps uniform INT8 weights."""
    return stored_bytes(shape, out_axis, num_steps, num_tables) < int(np.prod(shape))


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


def stored_table_bytes(count: int, table: np.ndarray) -> int:
    """Bytes of ``count`` packed indices on ``table`` ([channels, num_steps]) in the deploy file: each distinct
    row once and a byte per channel where that is smaller (and at most 256 rows), else every row
    (``graph.export``'s rule, from the table itself)."""
    table = np.asarray(table)
    channels, steps = table.shape
    distinct = len(np.unique(table, axis=0))
    rows = steps * distinct + channels if distinct <= 256 and steps * distinct + channels < table.size else table.size
    return index_bits(steps) * -(-count // 8) + rows


def effective_tables(count: int, num_steps: int, channels: int, num_tables: int) -> int:
    """The number of shared level tables a layer of ``count`` weights over ``channels`` output channels uses with
    ``num_tables`` asked: 0 (one table per channel) when sharing saves nothing or per-channel tables cost at most
    ``SHARE_ABOVE`` of the packed indices."""
    if not 0 < num_tables < channels or num_tables > 256 or num_steps * num_tables + channels >= num_steps * channels:
        return 0
    if channels * num_steps <= SHARE_ABOVE * index_bits(num_steps) * count / 8:
        return 0
    return num_tables


def packed_bytes(count: int, num_steps: int, channels: int = 1, num_tables: int = 0) -> int:
    """Bytes of ``count`` packed indices plus their INT8 level tables: one row per channel, or, where the layer
    shares tables (``effective_tables``), those rows and one byte per channel (the deploy file's rule,
    ``graph.export``)."""
    rows = num_steps * channels
    if effective_tables(count, num_steps, channels, num_tables):
        rows = num_steps * num_tables + channels
    return index_bits(num_steps) * -(-count // 8) + rows


def row_output_errors(q: np.ndarray, w: np.ndarray, gram: np.ndarray, lin: np.ndarray | None = None) -> np.ndarray:
    """Each output row's output error for quantized weights ``q`` of ``w`` (groups, out, d), from the quadratic
    terms ``flip_descent`` minimises (``gram`` A (groups, d, d), ``lin`` B or None):
    ``delta A delta' - 2 B . delta - B . W`` with ``delta = q - w``. With ``InputGram.terms`` (A = X'X / N + D,
    B = -W D for input rounding noise D) the last term is ``W D W'``, so this is the expected output error
    itself, comparable between weight grids and layers. Returns [groups * out] float64."""
    delta = (np.asarray(q, np.float32) - w).astype(np.float32)
    err = (np.matmul(delta, gram) * delta).sum(-1, dtype=np.float64)
    if lin is not None:
        err = err - 2 * (lin * delta).sum(-1, dtype=np.float64) - (lin * w).sum(-1, dtype=np.float64)
    return err.reshape(-1)


def descend(start: np.ndarray, other: np.ndarray, w: np.ndarray, gram: np.ndarray,
            lin: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The flip descent (``core.adaround.flip_descent``) between each weight's two allowed values ``start`` and
    ``other`` (groups, out, d; any grid, in the weights' units) from ``start``, and each row's output error after
    it (``row_output_errors``): the same rounding optimisation for every grid a layer may be stored on, so their
    errors compare like for like."""
    final = flip_descent(start, other, w, gram, lin)
    return final, row_output_errors(final, w, gram, lin)


def better_rows(first: tuple, second: tuple, out_axis: int) -> tuple:
    """Per output channel the better of two ways of storing a layer, each ``(scale [channels], table [channels,
    steps], codes (the weight's shape), errors [channels])``: rows are independent in the output error (each output
    channel's error depends on its own weights only), so the mixture's error is the per-row minimum. Ties keep
    ``first``."""
    s1, t1, c1, e1 = first
    s2, t2, c2, e2 = second
    take = np.asarray(e2) < np.asarray(e1)
    shape = [1] * np.ndim(c1)
    shape[out_axis] = -1
    return (np.where(take, s2, s1).astype(np.float32), np.where(take[:, None], t2, t1),
            np.where(take.reshape(shape), c2, c1), np.where(take, e2, e1))
