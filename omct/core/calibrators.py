"""Activation calibrators behind one streaming, mergeable interface.

Every calibrator feeds the same bounded ``ActivationSketch`` and differs only in how it picks the clip
range from it, so memory never grows with the number of batches and a new algorithm is one subclass
plus one registry entry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

from omct.core.params import QuantParams, candidate_params, params_from_range
from omct.core.sketch import ActivationSketch


class Calibrator(ABC):
    """``update(array)`` per batch, ``merge(other)`` to combine workers, ``compute()`` for the parameters."""

    name: ClassVar[str]

    def __init__(self, num_bits: int = 8, asymmetric: bool = True, sketch: ActivationSketch | None = None):
        self.num_bits = num_bits
        self.asymmetric = asymmetric
        self.sketch = sketch if sketch is not None else ActivationSketch()

    def update(self, values: np.ndarray) -> None:
        self.sketch.update(values)

    def merge(self, other: Calibrator) -> None:
        self.sketch.merge(other.sketch)

    @property
    def batches_seen(self) -> int:
        return self.sketch.count

    def compute(self, upper: float | None = None) -> QuantParams:
        """Parameters for the observed data; ``upper`` caps the range where the values are known to be
        bounded (a search may try a wider range than the data, which then only wastes levels)."""
        if self.sketch.count == 0:
            raise ValueError("no data was observed")
        if self.sketch.min == self.sketch.max:  # constant tensor: its exact range (always includes 0)
            return params_from_range(self.sketch.min, self.sketch.max, self.num_bits, self.asymmetric)
        lo, hi = self.choose_range()
        if upper is not None:
            hi = min(hi, upper)
        return params_from_range(lo, hi, self.num_bits, self.asymmetric)

    @abstractmethod
    def choose_range(self) -> tuple[float, float]:
        """The clip range [lo, hi] this algorithm picks from ``self.sketch``."""

    def _best_of(self, lo: np.ndarray, hi: np.ndarray) -> tuple[float, float]:
        """The candidate range with the smallest fake-quant squared error (first one on ties)."""
        scales, offsets = candidate_params(lo, hi, self.num_bits, self.asymmetric)
        errors = self.sketch.quant_error(scales, offsets, self.num_bits)
        best = int(np.argmin(errors))
        return float(np.atleast_1d(lo)[best]), float(np.atleast_1d(hi)[best])

    def _symmetric_candidates(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.asymmetric:
            return lo, hi
        m = np.maximum(np.abs(lo), np.abs(hi))
        return -m, m


def search_ratios(start: float, end: float, step: float) -> np.ndarray:
    """IFMR's candidate ratios: start, start + step, ... below end (as ``numpy.arange``)."""
    n = max(1, math.ceil((end - start) / step - 1e-9))
    return start + step * np.arange(n)


class IFMR(Calibrator):
    """AMCT's IFMR: percentile start values scaled by each search ratio; the smallest MSE wins."""

    name = "ifmr"

    def __init__(self, num_bits=8, asymmetric=True, max_percentile=0.999999, min_percentile=0.999999,
                 search_range=(0.7, 1.3), search_step=0.01, sketch=None):
        super().__init__(num_bits, asymmetric, sketch)
        self.max_percentile, self.min_percentile = max_percentile, min_percentile
        self.search_range, self.search_step = tuple(search_range), search_step

    def initial_range(self) -> tuple[float, float]:
        n = self.sketch.count
        hi = self.sketch.largest(n - math.ceil(self.max_percentile * n))
        lo = self.sketch.smallest(n - math.ceil(self.min_percentile * n))
        return lo, hi

    def choose_range(self):
        lo0, hi0 = self.initial_range()
        ratios = search_ratios(self.search_range[0], self.search_range[1], self.search_step)
        lo, hi = self._symmetric_candidates(lo0 * ratios, hi0 * ratios)
        return self._best_of(lo, hi)


class HFMG(Calibrator):
    """AMCT's HFMG: a ``num_of_bins`` histogram trimmed bin by bin from its lighter side; least L2 error wins."""

    name = "hfmg"
    max_candidates = 512

    def __init__(self, num_bits=8, asymmetric=True, num_of_bins=4096, sketch=None):
        super().__init__(num_bits, asymmetric, sketch)
        self.num_of_bins = num_of_bins

    def choose_range(self):
        sk = self.sketch
        lo, hi = (sk.min, sk.max) if self.asymmetric else (-max(-sk.min, sk.max), max(-sk.min, sk.max))
        edges = np.linspace(lo, hi, self.num_of_bins + 1)
        counts = np.diff(sk.cumulative(edges))
        left, right = 0, self.num_of_bins  # candidate keeps bins [left, right)
        cands = [(left, right)]
        while right - left > max(2, self.num_of_bins // 64):
            if not self.asymmetric:  # symmetric ranges shrink on both sides at once
                left, right = left + 1, right - 1
            elif counts[left] <= counts[right - 1]:
                left += 1
            else:
                right -= 1
            cands.append((left, right))
        cands = cands[:: max(1, len(cands) // self.max_candidates)]
        los = np.array([edges[a] for a, _ in cands])
        his = np.array([edges[b] for _, b in cands])
        return self._best_of(los, his)


class MinMax(Calibrator):
    """The observed minimum and maximum (ONNX Runtime's MinMax)."""

    name = "minmax"

    def choose_range(self):
        return self.sketch.min, self.sketch.max


class Percentile(Calibrator):
    """Clip at a percentile of the values (ONNX Runtime's Percentile, 99.999 by default)."""

    name = "percentile"

    def __init__(self, num_bits=8, asymmetric=True, percentile=99.999, sketch=None):
        super().__init__(num_bits, asymmetric, sketch)
        self.percentile = percentile

    def choose_range(self):
        n = self.sketch.count
        drop = n - math.ceil(self.percentile / 100.0 * n)
        if self.asymmetric:
            return self.sketch.smallest(drop), self.sketch.largest(drop)
        # Symmetric: percentile of |x|, from both tails.
        m = max(abs(self.sketch.smallest(drop // 2)), abs(self.sketch.largest(drop // 2)))
        return -m, m


class MSE(Calibrator):
    """Search clip ranges from 1% to 100% of the observed range for the least squared error."""

    name = "mse"

    def __init__(self, num_bits=8, asymmetric=True, num_candidates=200, sketch=None):
        super().__init__(num_bits, asymmetric, sketch)
        self.num_candidates = num_candidates

    def choose_range(self):
        ratios = np.linspace(1.0 / self.num_candidates, 1.0, self.num_candidates)
        lo, hi = self._symmetric_candidates(self.sketch.min * ratios, self.sketch.max * ratios)
        return self._best_of(lo, hi)


class KL(Calibrator):
    """Entropy calibration (TensorRT style): the threshold whose 128-level histogram diverges least."""

    name = "kl"

    def __init__(self, num_bits=8, asymmetric=True, num_bins=2048, sketch=None):
        super().__init__(num_bits, asymmetric, sketch)
        self.num_bins = num_bins

    def choose_range(self):
        sk = self.sketch
        top = max(abs(sk.min), abs(sk.max))
        edges = np.linspace(0.0, top, self.num_bins + 1)
        # Histogram of |x|: fold the negative side onto the positive one.
        hist = np.diff(sk.cumulative(edges)) + np.diff(sk.cumulative(-edges[::-1]))[::-1]
        levels = 2 ** (self.num_bits - 1)
        best_kl, best_i = math.inf, self.num_bins
        for i in range(levels, self.num_bins + 1, max(1, (self.num_bins - levels) // 256)):
            ref = hist[:i].copy()
            ref[-1] += hist[i:].sum()
            groups = np.array_split(np.arange(i), levels)
            quant = np.zeros(i)
            for g in groups:
                nz = hist[g] > 0
                if nz.any():
                    quant[g[nz]] = hist[g].sum() / nz.sum()
            p = ref / max(ref.sum(), 1e-30)
            q = quant / max(quant.sum(), 1e-30)
            mask = p > 0
            kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
            if kl < best_kl:
                best_kl, best_i = kl, i
        t = edges[best_i]
        return max(sk.min, -t), min(sk.max, t)


CALIBRATORS: dict[str, type[Calibrator]] = {c.name: c for c in (IFMR, HFMG, MinMax, Percentile, MSE, KL)}


def make_calibrator(name: str, num_bits: int = 8, asymmetric: bool = True, **options) -> Calibrator:
    """Instantiate the calibrator registered under ``name`` with its algorithm ``options``."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown activation algorithm '{name}'; choose one of {sorted(CALIBRATORS)}") from None
    return cls(num_bits=num_bits, asymmetric=asymmetric, **options)
