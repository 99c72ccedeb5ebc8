"""AMCT's ``dmq_balancer``: per input channel, move activation outliers into the weights (SmoothQuant, Xiao et al.
2022). The layer computes ``(X / s) (s W)``: the same product, with ``s_j = max|X_j|^a / max|W_j|^(1 - a)``
(``a``: the migration strength), so that the per-tensor activation range is no longer set by a few channels and
the weights, quantized per output channel, absorb the difference."""

from __future__ import annotations

import numpy as np


class ChannelRange:
    """Streaming per-channel min and max of a tensor along ``axis``."""

    def __init__(self, axis: int):
        self.axis = axis
        self.lo: np.ndarray | None = None
        self.hi: np.ndarray | None = None

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        axis = self.axis % x.ndim
        rows = np.moveaxis(x, axis, 0).reshape(x.shape[axis], -1)
        lo, hi = rows.min(axis=1).astype(np.float64), rows.max(axis=1).astype(np.float64)
        if self.lo is None or self.lo.shape != lo.shape:
            self.lo, self.hi = lo, hi
        else:
            self.lo, self.hi = np.minimum(self.lo, lo), np.maximum(self.hi, hi)


def balance_factors(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-channel factors ``s`` (float32; 1 where a channel is all zero), normalised so that their
    geometric mean is 1 (the product is unchanged; only the balance between channels moves)."""
    a = np.asarray(act_absmax, np.float64)
    w = np.asarray(weight_absmax, np.float64)
    ok = (a > 0) & (w > 0)
    s = np.ones_like(a)
    s[ok] = a[ok] ** alpha / w[ok] ** (1 - alpha)
    if ok.any():
        s[ok] /= np.exp(np.log(s[ok]).mean())
    return s.astype(np.float32)
