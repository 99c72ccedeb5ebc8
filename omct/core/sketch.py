"""A bounded, mergeable summary of a stream of activation values.

Why: AMCT's IFMR keeps every calibration batch and ONNX Runtime's calibrators keep every output, so their
memory grows with the number of batches. This sketch has a fixed size whatever the number of batches:

* a histogram of counts whose bins have a power-of-two width anchored at zero. Widening the range merges
  bins pairwise, so two sketches merge exactly at their common bin width and the batch order does not
  change the result. Counts only, because one unweighted ``bincount`` per batch is what keeps calibration
  as fast as a min-max pass (weighted sums per bin cost 3x more and changed no calibrated scale measurably);
* the exact ``tail_size`` largest and smallest values, so extreme percentiles (IFMR's 0.999999) are exact
  for up to ``tail_size / (1 - percentile)`` values. A calibrator that knows the rank it reads and the
  number of batches sizes the tail at the first batch (``tail_for``: twice the rank the whole stream needs,
  512 to 4096 values) instead of keeping 4096 of a tensor of a few thousand values;
* exact count, minimum and maximum.

Sampling: a batch of at least ``2 * sample_size`` values (default 65536) bins one value drawn at random
from each run of ``stride = size // sample_size`` values, counted ``stride`` times (plus the few values
after the last whole run, counted once): ``sample_size`` to ``1.5 * sample_size`` values binned, the same
draw for every batch of that size, so the same input gives the same record. The tails, count, minimum and
maximum still see every value. Merging stays exact: a sketch is the sum of its batches' contributions
whoever folds them. ``sample_size=0`` bins every value.

The quantization error of any candidate (scale, offset) is computed in closed form per bin, taking the
values of a bin as spread evenly inside it: the bins are far narrower than a quantization step (16384 bins
against 255 steps), so that is exact up to a term that does not depend on the candidate. Once sampled, the
values beyond the innermost kept tail values (where the clipping error lives) come from the exact tails.

Guarantee (tests/test_sketch_sampling.py, against a numpy brute force, Gaussian, Laplace, ReLU-shaped,
Student-t and outlier-heavy data, 0.3 to 4 million values in 1 to 8 batches, asymmetric and symmetric):
the clip IFMR picks from this sketch has a quantization MSE on all the data within 1% of the exact IFMR
optimum's (every value kept, every candidate ratio fake-quantizing all the data); HFMG's within 1% of the
MSE of HFMG's choice from an unsampled sketch. Measured worst cases there: IFMR 0.41%, HFMG 0.34%. The
sampling noise in the MSE shrinks as one over the square root of the values binned: with 8192 values
per batch the worst test case is at 0.62% and 3 million Gaussian values in one batch at 1.06%; with 1000,
6 of the 50 test cases fail. (A sample sized for the whole stream, 65536 values over 8 batches, held the MSE
guarantee too, worst case 0.41%, but moved IFMR's choice by one or two grid steps on flat curves and cost the
BERT-class benchmark 1.0 dB of logit SQNR: not taken.)
"""

from __future__ import annotations

import functools
import math

import numpy as np

from omct.core.parallel import scratch

DEFAULT_MAX_BINS = 16384
DEFAULT_TAIL_SIZE = 4096
QUANT_ERROR_VALUES = 1 << 13  # (candidate, level) pairs ``quant_error`` evaluates at a time
#: The bins' counts: integers (a sampled batch's are multiplied by its stride), uint32 while the stream has fewer than
#: ``2**32`` values (every bin holds fewer), float64 (exact to 2**53) from there on. Why not float64 throughout: the
#: bins are most of a sketch's memory (a small CNN's 64 sketches held 2.9 MB of float64 bins, issue 17 item 7);
#: every reading converts them to float64, so the results are the same.
COUNT_DTYPE = np.dtype(np.uint32)
DEFAULT_SAMPLE_SIZE = 1 << 16  # a batch of at least twice this many values bins a sample of this many to 1.5 times that


class ActivationSketch:
    def __init__(self, max_bins: int = DEFAULT_MAX_BINS, tail_size: int = DEFAULT_TAIL_SIZE,
                 sample_size: int | None = None, tail_fraction: float | None = None, batches: int | None = None):
        if not 64 <= max_bins <= 2**20 or max_bins & (max_bins - 1):  # 2**20: bin indices stay exact in float32
            raise ValueError(f"max_bins must be a power of two from 64 to 2**20, got {max_bins}")
        if sample_size is None:
            sample_size = DEFAULT_SAMPLE_SIZE  # read at construction, so a process can change the default
        if sample_size < 0:
            raise ValueError(f"sample_size must be 0 (bin every value) or positive, got {sample_size}")
        if tail_fraction is not None and not 0.0 <= tail_fraction < 1.0:
            raise ValueError(f"tail_fraction must be in [0, 1), got {tail_fraction}")
        self.max_bins = max_bins
        self.tail_size = tail_size
        # With both: the tail is sized at the first batch for the rank the calibrator reads (``tail_for``)
        self._tail_need = (tail_fraction, batches) if tail_fraction is not None and batches else None
        self.sample_size = sample_size
        self.sampled = False  # some batch's histogram counts come from a sample
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.exponent = 0  # bin width is 2**exponent
        self.first_index = 0  # index of bin 0: covers [first_index * w, (first_index + 1) * w)
        self.counts = np.zeros(0)
        # Largest / smallest values, any order: at least min(tail_size, count) of them and every value of the
        # stream beyond the innermost one, up to 2 * tail_size (cut to tail_size when read: ``top``, ``bottom``),
        # so that the partition that keeps them runs every few batches, not on every one.
        self._top = np.zeros(0)
        self._bottom = np.zeros(0)

    # ---------------------------------------------------------------- building
    @property
    def width(self) -> float:
        return math.ldexp(1.0, self.exponent)

    def update(self, values: np.ndarray) -> None:
        """Add a batch of values (any shape). Raises ValueError on NaN or Inf."""
        x = np.asarray(values)
        if x.dtype != np.float32 and x.dtype != np.float64:
            x = x.astype(np.float32)
        x = x.reshape(-1)
        if x.size == 0:
            return
        k = self.tail_size
        stride = x.size // self.sample_size if self.sample_size else 0
        scanned = None
        if stride >= 2 and self._top.size >= k and self._bottom.size >= k:
            # the steady state of a large tensor: its range, tail candidates and sample in one pass (below)
            scanned = _scan(x, stride, float(self._top.min()), float(self._bottom.max()))
            lo, hi = scanned[0], scanned[1]
        else:
            lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            bad = int(np.count_nonzero(~np.isfinite(x)))
            raise ValueError(f"{bad} of {x.size} values are NaN or Inf")
        if self.count == 0:
            self._start(lo, hi)
            if self._tail_need is not None:
                self.tail_size = tail_for(*self._tail_need, x.size, self.tail_size)
            k = self.tail_size
        self._cover(lo, hi)
        # Once a tail is full only values beyond its innermost one can change it: that test runs on each
        # chunk while it is in cache, and not at all when the batch's extreme cannot pass it. Before
        # that, the cut comes from the bins after this batch.
        full_top, full_bottom = self._top.size >= k, self._bottom.size >= k
        above = float(self._top.min()) if full_top else math.inf  # every stream value above it is kept
        below = float(self._bottom.max()) if full_bottom else -math.inf
        above, below = above if hi > above else None, below if lo < below else None
        if scanned is not None:
            sample, high, low = scanned[2:]
            counts = _bin_and_cut(sample, self.exponent, self.first_index, self.counts.size, None, None)[0]
            counts *= stride
            used = x.size - x.size % stride
            if used < x.size:
                counts += _bin_and_cut(x[used:], self.exponent, self.first_index, self.counts.size, None, None)[0]
            self.sampled = True
        elif stride >= 2:
            # One value drawn at random from each run of ``stride`` values (the same draw for every batch of
            # this size, so the record is reproducible) stands for the run; the few values after the last
            # whole run are binned as they are. The tails still see every value.
            used = x.size - x.size % stride
            sample = np.take(x, _sample_index(x.size, stride))
            counts = _bin_and_cut(sample, self.exponent, self.first_index, self.counts.size, None, None)[0]
            counts *= stride
            if used < x.size:  # sizes are often multiples of the stride: no second set of bins then
                counts += _bin_and_cut(x[used:], self.exponent, self.first_index, self.counts.size, None, None)[0]
            high, low = _cut(x, above, below)
            self.sampled = True
        else:
            counts, high, low = _bin_and_cut(x, self.exponent, self.first_index, self.counts.size, above, below)
        self._room_for(x.size)
        np.add(self.counts, counts, out=self.counts, casting="unsafe")  # exact: _room_for keeps every bin in range
        self.count += x.size
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        n = self.counts.size
        # Before a tail is full its cut comes from the bins. Bins counted from a sample can put the cut too
        # far out, so the cut asks for twice the values then; if it still holds too few, the batch's own
        # extremes are taken exactly (any k values at or beyond the cut hold the k most extreme ones).
        want = 2 * k if self.sampled else k
        if not full_top:
            high = self._spike(x, hi, k)
            if high is None:
                top_bin = n - 1 - int(np.searchsorted(np.cumsum(self.counts[::-1]), want))
                cut = (self.first_index + max(top_bin, 0)) * self.width
                high = x[x >= cut]
                if high.size + np.count_nonzero(self._top >= cut) < min(k, self.count):
                    high = _extreme(x, k, largest=True)
        if not full_bottom:
            low = self._spike(x, lo, k)
            if low is None:
                bottom_bin = int(np.searchsorted(np.cumsum(self.counts), want))
                cut = (self.first_index + min(bottom_bin, n - 1) + 1) * self.width
                low = x[x < cut]
                if low.size + np.count_nonzero(self._bottom < cut) < min(k, self.count):
                    low = _extreme(x, k, largest=False)
        # The k most extreme first, in the batch's dtype: a cut on a spike (a ReLU's zeros, a ReLU6's sixes)
        # holds a large part of the batch, not worth converting.
        # Kept without a partition only when the batch added every value beyond the innermost kept one (a full
        # tail, candidates not cut to k); else cut to k now, as the union is exact only in its k most extreme.
        kept_high, kept_low = _extreme(high, k, largest=True), _extreme(low, k, largest=False)
        self._keep_tails(kept_high.astype(np.float64), kept_low.astype(np.float64),
                         cut=(not full_top or kept_high.size < high.size, not full_bottom or kept_low.size < low.size))

    def _spike(self, x: np.ndarray, edge: float, k: int) -> np.ndarray | None:
        """``k`` copies of the batch's extreme ``edge`` where at least ``k`` of its values equal it (a ReLU's
        zeros, a ReLU6's sixes: then they are exactly its ``k`` most extreme), else None. Why: the cut from the
        bins then holds a large part of the batch, and selecting it cost the first batch 3x a later one. Checked
        only where the bin holding ``edge`` has at least ``k`` values (the bins include this batch)."""
        if self.counts[math.floor(edge / self.width) - self.first_index] < k or np.count_nonzero(x == edge) < k:
            return None
        return np.full(k, edge, x.dtype)

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
        self._room_for(other.count, other.counts.dtype)
        self.counts[start : start + other.counts.size] += other.counts
        self.count += other.count
        self.sampled = self.sampled or other.sampled
        self.min, self.max = min(self.min, other.min), max(self.max, other.max)
        self.tail_size = min(self.tail_size, other.tail_size)  # the union is exact to the shallower tail's depth
        self._keep_tails(other.top, other.bottom, cut=(True, True))

    def copy(self) -> ActivationSketch:
        new = ActivationSketch.__new__(ActivationSketch)
        new.__dict__.update({k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in self.__dict__.items()})
        return new

    def _start(self, lo: float, hi: float) -> None:
        span = max(hi - lo, abs(hi), abs(lo), 1e-30)
        # Use half of the bins for the first batch, leaving room to grow before coarsening.
        self.exponent = math.ceil(math.log2(span / (self.max_bins // 2)))
        self.first_index = math.floor(lo / self.width)
        self.counts = np.zeros(1, COUNT_DTYPE)

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
        if before or after:  # np.pad costs ~20x more in Python overhead than this, on every growing batch
            grown = np.zeros(before + self.counts.size + after, self.counts.dtype)
            grown[before : before + self.counts.size] = self.counts
            self.counts = grown
            self.first_index = first

    def _room_for(self, more: int, other: np.dtype = COUNT_DTYPE) -> None:
        """Make the bins hold ``more`` values (float64 once the stream reaches ``2**32`` values: no bin can count
        more than the stream's values; or when merging float64 bins)."""
        if self.counts.dtype == COUNT_DTYPE and (self.count + more >= 2**32 or other != COUNT_DTYPE):
            self.counts = self.counts.astype(np.float64)

    def _coarsen(self) -> None:
        """Double the bin width, merging bins 2k and 2k+1 (indices relative to zero)."""
        idx = np.arange(self.first_index, self.first_index + self.counts.size) // 2
        new_first = int(idx[0])
        idx -= new_first
        self.counts = np.bincount(idx, weights=self.counts).astype(self.counts.dtype)  # sums of integers: exact
        self.first_index = new_first
        self.exponent += 1

    def _keep_tails(self, high: np.ndarray, low: np.ndarray, cut: tuple[bool, bool] = (False, False)) -> None:
        """Add values beyond the innermost kept ones (``cut``: then keep only the tail_size most extreme)."""
        k = self.tail_size
        if high.size or cut[0]:
            self._top = np.concatenate([self._top, high]) if high.size else self._top
            if cut[0] or self._top.size > 2 * k:
                self._top = _extreme(self._top, k, largest=True)
        if low.size or cut[1]:
            self._bottom = np.concatenate([self._bottom, low]) if low.size else self._bottom
            if cut[1] or self._bottom.size > 2 * k:
                self._bottom = _extreme(self._bottom, k, largest=False)

    @property
    def top(self) -> np.ndarray:
        """The ``tail_size`` largest values (all of them while fewer were seen), any order."""
        self._top = _extreme(self._top, self.tail_size, largest=True)
        return self._top

    @property
    def bottom(self) -> np.ndarray:
        """The ``tail_size`` smallest values (all of them while fewer were seen), any order."""
        self._bottom = _extreme(self._bottom, self.tail_size, largest=False)
        return self._bottom

    # ---------------------------------------------------------------- queries
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
        """Number of values below each point (linear inside a bin; exact in the kept tails once sampled)."""
        if self.sampled:
            return self.moments(points, orders=1)[0]
        cum = np.concatenate([[0.0], np.cumsum(self.counts)])
        return np.interp(points, self.edges(), cum)

    def moments(self, points: np.ndarray, orders: int = 3, cum: tuple | None = None) -> tuple[np.ndarray, ...]:
        """Count, sum and sum of squares of the values below each point (the first ``orders`` of them).

        Exact path: read off the bins, values spread evenly in a bin. Once a batch was sampled, the values
        beyond the innermost kept tail values are all in the tails, so they come from there exactly (they
        make the clipping error, where a sample is poorest); the bins give the shape of the rest, scaled to
        its exact count (``count`` minus the exact tails). ``cum``: ``_cumulative_bins()``, when already known.
        """
        points = np.asarray(points, np.float64)
        if not self.sampled or self.top.size < self.tail_size or self.bottom.size < self.tail_size:
            return self._bin_moments(points, orders, cum)
        t_lo, t_hi = float(self.bottom.max()), float(self.top.min())
        outer_lo, outer_hi = np.sort(self.bottom[self.bottom < t_lo]), np.sort(self.top[self.top > t_hi])
        middle = self.count - outer_lo.size - outer_hi.size  # values in [t_lo, t_hi]
        bins = self._bin_moments(np.concatenate([[t_lo, t_hi], np.clip(points.ravel(), t_lo, t_hi)]), orders, cum)
        binned_middle = bins[0][1] - bins[0][0]
        if t_hi <= t_lo or binned_middle <= 0:  # the middle is one value (ties) or the bins saw none of it
            at = (t_lo + t_hi) / 2
            inner_at = [np.where(points > at, middle * at**k, 0.0) for k in range(orders)]
        else:
            inner_at = [middle / binned_middle * (m[2:].reshape(points.shape) - m[0]) for m in bins]
        # the outer tails below each point: all of the lower one and none of the upper one inside [t_lo, t_hi],
        # so only the points outside look theirs up (a search per point was a third of IFMR's search)
        flat = points.ravel()
        below, above = np.flatnonzero(flat < t_lo), np.flatnonzero(flat > t_hi)
        i_lo, i_hi = np.searchsorted(outer_lo, flat[below]), np.searchsorted(outer_hi, flat[above])
        out = []
        for k in range(orders):
            lo_k, hi_k = (np.concatenate([[0.0], np.cumsum(v**k)]) for v in (outer_lo, outer_hi))
            at = inner_at[k].ravel() + lo_k[-1]
            at[below] = lo_k[i_lo] + inner_at[k].ravel()[below]
            at[above] += hi_k[i_hi]
            out.append(at.reshape(points.shape))
        return tuple(out)

    def _bin_moments(self, points: np.ndarray, orders: int = 3, cum: tuple | None = None) -> tuple[np.ndarray, ...]:
        """Count, sum and sum of squares (the first ``orders``) of the binned values below each point (values
        spread evenly in a bin)."""
        w, e0 = self.width, self.first_index * self.width
        t = np.clip(np.asarray(points, np.float64), e0, e0 + self.counts.size * w)
        i = np.clip(np.floor((t - e0) / w).astype(np.int64), 0, self.counts.size - 1)
        lo = e0 + i * w
        density = self.counts[i] / w
        cum = self._cumulative_bins() if cum is None else cum
        out = [cum[0][i] + density * (t - lo)]
        if orders > 1:
            out.append(cum[1][i] + density * (t * t - lo * lo) / 2)
        if orders > 2:
            out.append(cum[2][i] + density * (t * t * t - lo * lo * lo) / 3)
        return tuple(out)

    def _cumulative_bins(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Count, sum and sum of squares of the bins below each bin edge (``quant_error`` computes them once for
        its two readings)."""
        w, e0 = self.width, self.first_index * self.width
        mid = e0 + (np.arange(self.counts.size) + 0.5) * w
        cum = (np.concatenate([[0.0], np.cumsum(self.counts)]), np.concatenate([[0.0], np.cumsum(self.counts * mid)]),
               np.concatenate([[0.0], np.cumsum(self.counts * (mid * mid + w * w / 12))]))
        return cum

    def quant_error(self, scales: np.ndarray, offsets: np.ndarray, num_bits: int) -> np.ndarray:
        """Sum of squared fake-quant errors over all values, one per candidate (scale, offset).

        Level k collects the values between its two rounding boundaries, so the error is
        ``sum over k of S2_k - 2 q_k S1_k + n_k q_k^2``, with the moments read off the histogram at the
        255 boundaries: the cost does not depend on the number of bins or values. The ``S2_k`` add up to the
        sum of squares of all values whatever the candidate, so only counts and sums are read at the
        boundaries (a third less work than all three moments; float64 keeps the error to ~1e-11 of itself).
        """
        scales = np.asarray(scales, np.float64).reshape(-1)
        offsets = np.broadcast_to(np.asarray(offsets, np.float64).reshape(-1), scales.shape)
        qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
        levels = np.arange(qmin, qmax + 1, dtype=np.float64)[None, :]
        cum = self._cumulative_bins()
        total_s2 = self.moments(np.array([np.inf]), 3, cum)[2][0]
        out = np.empty(scales.size)
        # A block of candidates at a time: each one's error is its own row, so blocks give the same values, and
        # the dozen (candidates x levels) float64 temporaries stay small (issue 17 item 7: they were the peak of
        # the activation ranges' computation, 1.7 MB on a small CNN).
        rows = max(1, QUANT_ERROR_VALUES // levels.size)
        for start in range(0, scales.size, rows):
            s, o = scales[start : start + rows, None], offsets[start : start + rows, None]
            q = (levels - o) * s  # value each level stands for
            cuts = (levels[:, :-1] - o + 0.5) * s  # boundary between level k and k + 1
            lo_end, hi_end = np.full_like(s, -np.inf), np.full_like(s, np.inf)
            n, s1 = (np.diff(m, axis=1) for m in self.moments(np.concatenate([lo_end, cuts, hi_end], axis=1), 2, cum))
            out[start : start + rows] = np.maximum(total_s2 - (q * (2 * s1 - n * q)).sum(axis=1), 0.0)
        return out

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.counts, self._top, self._bottom))


#: The fewest tail values a sized tail keeps (``tail_for``): once a batch is sampled, the clipping error beyond
#: the innermost kept value is read from the tails (tests/test_sketch_sampling.py holds with it).
MIN_TAIL_SIZE = 512


def tail_for(fraction: float, batches: int, batch_size: int, cap: int = DEFAULT_TAIL_SIZE) -> int:
    """The tail a calibrator needs: it reads ranks up to ``fraction`` of the values (IFMR 0.999999: 1e-6)
    of a stream of ``batches`` batches like the first one; twice that for batches up to twice as large,
    at least ``MIN_TAIL_SIZE``, at most ``cap``. Why: a tail of 4096 on a tensor of a few thousand values per
    batch made the tail upkeep (partitions of every batch's values until the tail was full) most of a small
    CNN's statistics time. A stream that outgrows it reads deeper ranks from the bins (interpolated)."""
    return int(min(cap, max(MIN_TAIL_SIZE, 2 * math.ceil(fraction * batches * batch_size) + 1)))


CHUNK = 1 << 17  # values binned at a time: the scratch buffers stay in the core's cache
def _buffers(dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """This thread's chunk buffers (values in ``dtype``, bin indices), reused across calls (``core.parallel.scratch``).
    int32 bin indices (below 2**21): the float-to-int32 cast is 5x cheaper than to intp, more than bincount's own
    conversion of them costs (binning 12% faster, the same counts)."""
    return scratch("bin values", CHUNK, dtype), scratch("bin indices", CHUNK, np.int32)


def _bin_and_cut(x: np.ndarray, exponent: int, first: int, n: int, above: float | None,
                 below: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin counts of ``x`` (bin ``floor(x / 2**exponent) - first``, ``n`` bins), and the values above
    ``above`` and below ``below`` (empty where None), one cache-sized chunk at a time.

    Why chunks: binning is a handful of elementwise passes and one ``bincount``; on whole activation
    tensors every pass streams the tensor from memory and allocates tensor-sized temporaries.
    The bin arithmetic is exact: ``x * 2**-exponent`` only moves the exponent, and its magnitude stays
    below 1.5 * max_bins <= 2**21 (the first batch sets the width to at least 2 / max_bins of its largest
    magnitude, widths only grow, and the bins always cover that first batch), so ``floor``, the
    subtraction and the cast to an integer are exact too.
    """
    step = x.dtype.type(math.ldexp(1.0, -exponent))
    scratch, index = _buffers(x.dtype)
    counts = None  # the first chunk's bincount (a bin array is 128 KB: every extra one is a page-faulting allocation)
    highs, lows = [], []
    for start in range(0, x.size, CHUNK):
        chunk = x[start : start + CHUNK]
        f, i = scratch[: chunk.size], index[: chunk.size]
        np.multiply(chunk, step, out=f)
        np.floor(f, out=f)
        if first:
            np.subtract(f, first, out=f)
        np.copyto(i, f, casting="unsafe")
        if counts is None:
            counts = np.bincount(i, minlength=n)
        else:
            counts += np.bincount(i, minlength=n)
        if above is not None:
            highs.append(chunk[chunk > above])
        if below is not None:
            lows.append(chunk[chunk < below])
    if counts is None:
        counts = np.zeros(n, np.int64)
    if counts.size != n:
        raise AssertionError("sketch bins do not cover the batch")  # _cover guarantees they do
    empty = np.zeros(0, x.dtype)
    return counts, np.concatenate(highs) if highs else empty, np.concatenate(lows) if lows else empty


def _cut(x: np.ndarray, above: float | None, below: float | None) -> tuple[np.ndarray, np.ndarray]:
    """The values of ``x`` above ``above`` and below ``below`` (empty where None), a chunk at a time."""
    highs, lows = [], []
    if above is not None or below is not None:
        for start in range(0, x.size, CHUNK):
            chunk = x[start : start + CHUNK]
            if above is not None:
                highs.append(chunk[chunk > above])
            if below is not None:
                lows.append(chunk[chunk < below])
    empty = np.zeros(0, x.dtype)
    return np.concatenate(highs) if highs else empty, np.concatenate(lows) if lows else empty


def _scan(x: np.ndarray, stride: int, above: float, below: float) -> tuple:
    """One pass over a large batch whose tails are full: its minimum and maximum, its values above ``above`` and
    below ``below``, and its sample (``_sample_index``), a cache-sized chunk at a time. Equal to the separate
    passes (the same values in the same order). Why: a calibration batch's observed tensors come fresh from
    ONNX Runtime, out of the cache; the minimum, maximum, the tails' test and the sample would each read them
    from memory again."""
    los, his, highs, lows, samples = [], [], [], [], []
    for start in range(0, x.size, CHUNK):
        chunk = x[start : start + CHUNK]
        los.append(chunk.min())
        his.append(chunk.max())
        highs.append(chunk[chunk > above])
        lows.append(chunk[chunk < below])
        positions = _sample_positions(x.size, stride, start, start + chunk.size)
        positions -= start
        samples.append(np.take(chunk, positions))
    return (float(min(los)), float(max(his)), np.concatenate(samples), np.concatenate(highs), np.concatenate(lows))


def _sample_index(size: int, stride: int) -> np.ndarray:
    """One position drawn from each whole run of ``stride`` values, from a fixed seed: every value of the
    runs is drawn with probability ``1 / stride`` (an unbiased count once multiplied by ``stride``) and no
    regular pattern of the tensor's layout (channels, rows) can line up with the draw. Ascending."""
    return _sample_positions(size, stride, 0, size)


def _sample_positions(size: int, stride: int, start: int, end: int) -> np.ndarray:
    """The positions of ``_sample_index(size, stride)`` in [start, end), ascending (numpy's index type)."""
    offsets = _sample_offsets(size, stride)
    first, last = _drawn_below(offsets, stride, start), _drawn_below(offsets, stride, end)
    positions = np.arange(first, last, dtype=np.intp)
    positions *= stride
    positions += offsets[first:last]
    return positions


def _drawn_below(offsets: np.ndarray, stride: int, bound: int) -> int:
    """How many drawn positions lie below ``bound``: every run that ends by it, and the run it falls in when
    that run's draw is below it (a run's draw lies inside the run)."""
    run = bound // stride
    if run >= offsets.size:
        return offsets.size
    return run + int(run * stride + int(offsets[run]) < bound)


@functools.lru_cache(maxsize=16)
def _sample_offsets(size: int, stride: int) -> np.ndarray:
    """Where in its run each run's drawn value lies, in the smallest integer type that holds ``stride - 1``.
    Cached per tensor size; why the offsets and not the positions: one byte per drawn value for the usual
    strides instead of four (issue 17 item 7: the cache held 0.8-1 MB on a small CNN, up to 6 MB at 16 sizes)."""
    runs = size // stride
    rng = np.random.default_rng([size, stride])
    offsets = rng.integers(0, stride, runs)
    dtype = np.uint8 if stride <= 1 << 8 else np.uint16 if stride <= 1 << 16 else np.uint32 if stride <= 1 << 32 else np.int64
    offsets = offsets.astype(dtype)
    offsets.flags.writeable = False
    return offsets


def _extreme(values: np.ndarray, k: int, largest: bool) -> np.ndarray:
    """The ``k`` largest (or smallest) of ``values``, in any order."""
    if values.size <= k:
        return values
    edge = values.max() if largest else values.min()
    ties = np.count_nonzero(values == edge)
    if ties >= k:  # e.g. the zeros of a ReLU: no partition needed
        return np.full(k, edge)
    return np.partition(values, values.size - k)[values.size - k :] if largest else np.partition(values, k - 1)[:k]
