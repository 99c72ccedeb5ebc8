"""A bounded, mergeable summary of a stream of activation values.

Why: AMCT's IFMR keeps every calibration batch and ONNX Runtime's calibrators keep every output, so their
memory grows with the number of batches. This sketch has a fixed size whatever the number of batches:

* a histogram whose bins have a power-of-two width anchored at zero, holding per bin the count, the sum
  and the sum of squares of its values. Widening the range merges bins pairwise, so two sketches merge
  exactly at their common bin width and the batch order changes results only at float rounding level;
* the exact ``tail_size`` largest and smallest values, so extreme percentiles (IFMR's 0.999999) are exact
  for up to ``tail_size / (1 - percentile)`` values;
* exact count, minimum and maximum.

The quantization error of any candidate (scale, offset) is then computed in closed form per bin as
``sum(x^2) - 2 q sum(x) + n q^2`` with q the fake-quantized bin mean, which is exact whenever a bin
rounds to one level (bins are far narrower than a quantization step).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_MAX_BINS = 16384
DEFAULT_TAIL_SIZE = 4096


class ActivationSketch:
    def __init__(self, max_bins: int = DEFAULT_MAX_BINS, tail_size: int = DEFAULT_TAIL_SIZE):
        if max_bins < 64 or max_bins & (max_bins - 1):
            raise ValueError(f"max_bins must be a power of two >= 64, got {max_bins}")
        self.max_bins = max_bins
        self.tail_size = tail_size
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.exponent = 0  # bin width is 2**exponent
        self.first_index = 0  # index of bin 0: covers [first_index * w, (first_index + 1) * w)
        self.counts = np.zeros(0)
        self.sums = np.zeros(0)
        self.squares = np.zeros(0)
        self.top = np.zeros(0)  # largest values, any order
        self.bottom = np.zeros(0)  # smallest values, any order

    # ---------------------------------------------------------------- building
    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def update(self, values: np.ndarray) -> None:
        """Add a batch of values (any shape). Raises ValueError on NaN or Inf."""
        x = np.asarray(values)
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        x = x.ravel()
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ValueError(f"{bad} of {x.size} values are NaN or Inf")
        if self.count == 0:
            self._start(lo, hi)
        self._cover(lo, hi)
        # x / 2**e is exact in float32, so the bin of every value is exact too.
        idx = np.floor(x * np.float32(math.ldexp(1.0, -self.exponent))).astype(np.int32)
        idx -= self.first_index
        n = self.counts.size
        self.counts += np.bincount(idx, minlength=n)
        self.sums += np.bincount(idx, weights=x, minlength=n)
        self.squares += np.bincount(idx, weights=np.square(x, dtype=np.float64), minlength=n)
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        # Only values in the outermost bins holding tail_size values can belong to the tails: one
        # comparison instead of a partition of the whole batch.
        k = self.tail_size
        top_bin = n - 1 - int(np.searchsorted(np.cumsum(self.counts[::-1]), k))
        bottom_bin = int(np.searchsorted(np.cumsum(self.counts), k))
        high = x[x >= (self.first_index + max(top_bin, 0)) * self.width]
        low = x[x < (self.first_index + min(bottom_bin, n - 1) + 1) * self.width]
        self._keep_tails(high.astype(np.float64), low.astype(np.float64))

    def merge(self, other: ActivationSketch) -> None:
        """Fold ``other`` into this sketch (exact: the result equals one sketch fed both streams)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in other.__dict__.items()})
            return
        other = other.copy()
        while other.exponent < self.exponent:
            other._coarsen()
        while self.exponent < other.exponent:
            self._coarsen()
        self._cover(other.first_index * self.width, (other.first_index + other.counts.size - 1) * self.width)
        start = other.first_index - self.first_index
        for mine, theirs in ((self.counts, other.counts), (self.sums, other.sums), (self.squares, other.squares)):
            mine[start : start + theirs.size] += theirs
        self.count += other.count
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self._keep_tails(other.top, other.bottom)

    def copy(self) -> ActivationSketch:
        new = ActivationSketch.__new__(ActivationSketch)
        new.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})
        return new

    def _start(self, lo: float, hi: float) -> None:
        span = max(hi - lo, abs(hi), abs(lo), 1e-30)
        # Use half of the bins for the first batch, leaving room to grow before coarsening.
        self.exponent = math.ceil(math.log2(span / (self.max_bins // 2)))
        self.first_index = math.floor(lo / self.width)
        self.counts, self.sums, self.squares = (np.zeros(1) for _ in range(3))

    def _cover(self, lo: float, hi: float) -> None:
        """Grow (and coarsen as needed) so that [lo, hi] falls inside the bins."""
        while True:
            first = min(self.first_index, math.floor(lo / self.width))
            last = max(self.first_index + self.counts.size - 1, math.floor(hi / self.width))
            if last - first + 1 <= self.max_bins:
                break
            self._coarsen()
        before = self.first_index - first
        after = last - (self.first_index + self.counts.size - 1)
        if before or after:
            self.counts, self.sums, self.squares = (np.pad(a, (before, after)) for a in (self.counts, self.sums, self.squares))
            self.first_index = first

    def _coarsen(self) -> None:
        """Double the bin width, merging bins 2k and 2k+1 (indices relative to zero)."""
        idx = np.arange(self.first_index, self.first_index + self.counts.size) // 2
        new_first = int(idx[0])
        idx -= new_first
        self.counts, self.sums, self.squares = (np.bincount(idx, weights=a) for a in (self.counts, self.sums, self.squares))
        self.first_index = new_first
        self.exponent += 1

    def _keep_tails(self, high: np.ndarray, low: np.ndarray) -> None:
        self.top = _extreme(np.concatenate([self.top, high]), self.tail_size, largest=True)
        self.bottom = _extreme(np.concatenate([self.bottom, low]), self.tail_size, largest=False)

    # ---------------------------------------------------------------- queries
    def nonzero_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keep = self.counts > 0
        return self.counts[keep], self.sums[keep], self.squares[keep]

    def edges(self) -> np.ndarray:
        return (self.first_index + np.arange(self.counts.size + 1)) * self.width

    def largest(self, rank: int) -> float:
        """The value with ``rank`` values above it (rank 0 is the maximum)."""
        if rank < self.top.size:
            return float(np.sort(self.top)[::-1][rank])
        return self._quantile_from_bins(self.count - rank)

    def smallest(self, rank: int) -> float:
        """The value with ``rank`` values below it (rank 0 is the minimum)."""
        if rank < self.bottom.size:
            return float(np.sort(self.bottom)[rank])
        return self._quantile_from_bins(rank + 1)

    def _quantile_from_bins(self, position: float) -> float:
        """Value at 1-based ``position`` in sorted order, interpolated inside its bin."""
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        return float(np.clip(np.interp(position, cum, self.edges()), self.min, self.max))

    def cumulative(self, points: np.ndarray) -> np.ndarray:
        """Number of values below each point (linear inside a bin)."""
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(points, self.edges(), cum)

    def quant_error(self, scales: np.ndarray, offsets: np.ndarray, num_bits: int) -> np.ndarray:
        """Sum of squared fake-quant errors over all values, one per candidate (scale, offset).

        A bin that rounds to one level contributes ``sum(x^2) - 2 q sum(x) + n q^2`` exactly. A bin that
        straddles one rounding boundary is split there, assuming its values are spread evenly inside it.
        """
        keep = self.counts > 0
        n, s1, s2 = self.counts[keep], self.sums[keep], self.squares[keep]
        lo_edge = (self.first_index + np.nonzero(keep)[0]) * self.width
        hi_edge = lo_edge + self.width
        mean = s1 / n
        scales = np.asarray(scales, np.float64)[:, None]
        offsets = np.asarray(offsets, np.float64)[:, None]
        qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
        total_s2 = s2.sum()
        errors = np.empty(scales.shape[0])
        step = max(1, 1_000_000 // max(mean.size, 1))  # chunk candidates: bounded memory
        for i in range(0, scales.shape[0], step):
            s, o = scales[i : i + step], offsets[i : i + step]
            k_lo = np.clip(np.round(lo_edge / s) + o, qmin, qmax)
            k_hi = np.clip(np.round(hi_edge / s) + o, qmin, qmax)
            k_mean = np.clip(np.round(mean / s) + o, qmin, qmax)
            one_cut = (k_hi - k_lo) == 1
            # Split at the boundary between k_lo and k_hi: fraction f below it, sums from a uniform spread.
            cut = (k_lo - o + 0.5) * s
            f = np.where(one_cut, np.clip((cut - lo_edge) / self.width, 0.0, 1.0), 0.0)
            n1 = n * f
            sum1 = n1 * (lo_edge + cut) / 2
            q1 = (k_lo - o) * s
            q2 = (k_hi - o) * s
            qm = (k_mean - o) * s
            split = -2 * (q1 * sum1 + q2 * (s1 - sum1)) + n1 * q1 * q1 + (n - n1) * q2 * q2
            single = -2 * qm * s1 + n * qm * qm
            errors[i : i + step] = total_s2 + np.where(one_cut, split, single).sum(axis=1)
        return np.maximum(errors, 0.0)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.counts, self.sums, self.squares, self.top, self.bottom))


def _extreme(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The ``k`` largest (or smallest) of ``values``, in any order."""
    if values.size <= k:
        return values
    edge = values.max() if largest else values.min()
    ties = np.count_nonzero(values == edge)
    if ties >= k:  # e.g. the zeros of a ReLU: no partition needed
        return np.full(k, edge)
    return np.partition(values, values.size - k)[values.size - k :] if largest else np.partition(values, k - 1)[:k]
