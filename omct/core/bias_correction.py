"""Bias correction: quantized weights shift each output channel's mean by ``dW . E[x]``; subtracting that
from the bias removes the shift (the analytic form of the bias correction in Nagel et al., "Data-Free
Quantization", and NNCF's fast bias correction). Needs only the per-channel mean of each layer's input,
collected in the same calibration pass."""

from __future__ import annotations

import functools

import numpy as np

#: Rows summed in the tensor's own dtype before the float64 total: float32 sums of 32 values stay within a few
#: 1e-8 of the exact mean relative to its scale.
ROWS = 32


@functools.lru_cache(maxsize=8)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    ones = np.ones(n, dtype)
    ones.flags.writeable = False
    return ones


class ChannelMeans:
    """Streaming per-channel mean of a tensor along ``axis`` (1 for NCHW convolutions, -1 for features)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.sums: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        axis = self.axis % x.ndim
        channels = x.shape[axis]
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        y = x.reshape(lead, -1)
        # the rows (batch, ...) first, ``ROWS`` at a time, as one matrix-vector product each (BLAS: one vectorised
        # pass over the tensor, 2-5x faster than numpy's reductions along a short inner or an outer axis), then
        # the positions of each channel and the row blocks in float64
        sums = None
        for start in range(0, lead, ROWS):
            rows = y[start : start + ROWS]
            part = (_ones(rows.shape[0], x.dtype) @ rows).reshape(channels, -1).sum(axis=1, dtype=np.float64)
            sums = part if sums is None else sums + part
        if sums is None:
            return
        if self.sums is None or self.sums.shape != sums.shape:
            self.sums, self.count = np.zeros_like(sums), 0
        self.sums += sums
        self.count += x.size // channels

    def merge(self, other: ChannelMeans) -> None:
        """Fold in another stream's sums (a distributed run's other process)."""
        if other.sums is None:
            return
        if self.sums is None:
            self.sums, self.count = other.sums.copy(), other.count
            return
        self.sums = self.sums + other.sums
        self.count += other.count

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sums is None or self.count == 0 else self.sums / self.count


#: Weight values whose float64 difference is formed at a time (``_tap_sums``): 512 KB of scratch.
TAP_SUM_CHUNK = 1 << 16


def _tap_sums(weight: np.ndarray, quantized: np.ndarray, out_axis: int, in_axis: int) -> np.ndarray:
    """``quantized - weight`` in float64, summed over every axis but ``out_axis`` and ``in_axis``: (out, in).
    A block of output channels at a time. Why: the whole float64 difference (and its float64 copies of both
    weights) was 4x the float32 weight and the peak of the records' computation on a small CNN (issue 17 item 7);
    each row's sum is the same contiguous float64 reduction as on the whole array, so the result is identical."""
    w, q = (np.moveaxis(a, (out_axis, in_axis), (0, 1)) for a in (weight, quantized))
    out = np.empty(w.shape[:2])
    step = max(1, TAP_SUM_CHUNK // max(1, w[0].size))
    for start in range(0, w.shape[0], step):
        dw = np.ascontiguousarray(np.subtract(q[start : start + step], w[start : start + step], dtype=np.float64))
        out[start : start + step] = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(-1)
    return out


def correction(weight: np.ndarray, quantized: np.ndarray, mean: np.ndarray, out_axis: int, in_axis: int,
               groups: int = 1) -> np.ndarray | None:
    """Amount to add to the bias so that the layer's mean output is unchanged by weight quantization, or
    None where the shapes do not line up (the layer then keeps its plain bias).

    ``out_axis`` / ``in_axis`` are the weight's output- and input-channel axes (the op handler knows them);
    every other axis (a kernel's taps) is summed, since each tap sees the same channel mean. With ``groups``
    either the input axis holds one group's channels (Conv: ``(out, in / groups, k...)``) or the output axis
    does (ConvTranspose: ``(in, out / groups, k...)``).
    """
    per = _tap_sums(weight, quantized, out_axis, in_axis)  # (weight out, weight in)
    w_out, w_in = per.shape
    c_in = mean.size
    if groups < 1 or c_in % groups:
        return None
    if w_in * groups == c_in and w_out % groups == 0:  # each output channel reads one group of inputs
        group_of_out = np.arange(w_out) // (w_out // groups)
        means = mean.reshape(groups, w_in)[group_of_out]
        return -(per * means).sum(1)
    if w_in == c_in and groups > 1 and c_in % groups == 0:  # weight holds all inputs, outputs per group
        per_group = c_in // groups
        out = np.zeros(groups * w_out)
        for g in range(groups):
            inputs = slice(g * per_group, (g + 1) * per_group)
            out[g * w_out:(g + 1) * w_out] = -(per[:, inputs] @ mean[inputs])
        return out
    return None
