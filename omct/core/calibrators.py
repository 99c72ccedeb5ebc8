"""Activation calibrators behind one streaming interface, and their registry.

Every calibrator feeds the same bounded ``ActivationSketch`` and differs only in how it picks the clip
range from it, so memory never grows with the number of batches. A new algorithm is one subclass (with
its ``Options`` dataclass) plus one ``CALIBRATORS`` entry; config.json, the .cfg messages and the command
line take their choices from that registry.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from omct.core.options import AlgorithmOptions, CfgPlacement, option
from omct.core.params import QuantParams, candidate_params, params_from_range
from omct.core.sketch import ActivationSketch


class Calibrator(ABC):
    """``update(array)`` per batch, ``compute()`` for the parameters; ``Options`` declares the algorithm's own
    settings (beyond ``num_bits`` and ``asymmetric``) and where they sit in a .cfg."""

    name: ClassVar[str]
    Options: ClassVar[type[AlgorithmOptions]]
    sample_size: ClassVar[int | None] = None  # the sketch's: None = its default (large batches sampled), 0 = exact

    def __init__(self, num_bits: int = 8, asymmetric: bool = True, sketch: ActivationSketch | None = None,
                 batch_num: int | None = None, **options):
        self.num_bits = num_bits
        self.asymmetric = asymmetric
        self.options = self.Options(**options)
        # ``batch_num`` (the batches calibration will see): the sketch keeps a tail sized for the ranks this
        # algorithm reads instead of the fixed DEFAULT_TAIL_SIZE
        self.sketch = sketch if sketch is not None else ActivationSketch(
            sample_size=self.sample_size, tail_fraction=self.tail_fraction(), batches=batch_num)

    def tail_fraction(self) -> float:
        """The largest fraction of the values, counted from either end, whose rank ``choose_range`` reads
        exactly (0: it reads the minimum and maximum, or the bins, only)."""
        return 0.0

    def update(self, values: np.ndarray) -> None:
        self.sketch.update(values)

    def merge(self, other: Calibrator) -> None:
        """Fold in another stream's statistics (exact: the sketches merge exactly)."""
        self.sketch.merge(other.sketch)

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
        """The clip range [lo, hi] this algorithm picks from ``self.sketch`` (never called on constant data)."""

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


def _ordered(v: tuple[float, float]) -> None:
    if not 0 < v[0] < v[1]:
        raise ValueError(f"must be [start, end] with 0 < start < end, got {list(v)}")


class IFMR(Calibrator):
    """AMCT's IFMR: percentile start values scaled by each search ratio; the smallest MSE wins."""

    name = "ifmr"

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("ifmr_quantize", 100, "FMRQuantize", shared=(("asymmetric", 6),))
        max_percentile: float = option(0.999999, cfg=4, gt=0.5, le=1.0)
        min_percentile: float = option(0.999999, cfg=5, gt=0.5, le=1.0)
        search_range: tuple[float, float] = option((0.7, 1.3), cfg=(("search_range_start", 1), ("search_range_end", 2)),
                                                   check=_ordered)
        search_step: float = option(0.01, cfg=3, gt=0.0, le=1.0)

    def tail_fraction(self) -> float:
        return 1.0 - min(self.options.max_percentile, self.options.min_percentile)

    def initial_range(self) -> tuple[float, float]:
        n = self.sketch.count
        hi = self.sketch.largest(n - math.ceil(self.options.max_percentile * n))
        lo = self.sketch.smallest(n - math.ceil(self.options.min_percentile * n))
        return lo, hi

    def choose_range(self):
        lo0, hi0 = self.initial_range()
        (start, end), step = self.options.search_range, self.options.search_step
        ratios = search_ratios(start, end, step)
        lo, hi = self._symmetric_candidates(lo0 * ratios, hi0 * ratios)
        return self._best_of(lo, hi)


class HFMG(Calibrator):
    """AMCT's HFMG: a ``num_of_bins`` histogram trimmed bin by bin from its lighter side; least L2 error wins."""

    name = "hfmg"
    max_candidates = 512
    # every value binned: HFMG trims the histogram bin by bin from its lighter side, and a sampled histogram's
    # noisy tail bins moved its choice (ResNet benchmark logit SQNR 41.4 -> 40.5 dB with sampling)
    sample_size = 0

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("hfmg_quantize", 101, "HFMGQuantize", shared=(("asymmetric", 2),))
        num_of_bins: int = option(4096, cfg=1, choices=(1024, 2048, 4096, 8192))

    def choose_range(self):
        sk, bins = self.sketch, self.options.num_of_bins
        lo, hi = (sk.min, sk.max) if self.asymmetric else (-max(-sk.min, sk.max), max(-sk.min, sk.max))
        edges = np.linspace(lo, hi, bins + 1)
        counts = np.diff(sk.cumulative(edges))
        left, right = 0, bins  # candidate keeps bins [left, right)
        cands = [(left, right)]
        while right - left > max(2, bins // 64):
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

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("minmax_quantize", 1001, "MinMaxQuantize", shared=(("asymmetric", 1),))

    def choose_range(self):
        return self.sketch.min, self.sketch.max


class Percentile(Calibrator):
    """Clip at a percentile of the values (ONNX Runtime's Percentile, 99.999 by default)."""

    name = "percentile"

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("percentile_quantize", 1002, "PercentileQuantize", shared=(("asymmetric", 2),))
        percentile: float = option(99.999, cfg=1, gt=50.0, le=100.0)

    def tail_fraction(self) -> float:
        return 1.0 - self.options.percentile / 100.0

    def choose_range(self):
        n = self.sketch.count
        drop = n - math.ceil(self.options.percentile / 100.0 * n)
        if self.asymmetric:
            return self.sketch.smallest(drop), self.sketch.largest(drop)
        # Symmetric: percentile of |x|, from both tails.
        m = max(abs(self.sketch.smallest(drop // 2)), abs(self.sketch.largest(drop // 2)))
        return -m, m


class MSE(Calibrator):
    """Search clip ranges from 1% to 100% of the observed range for the least squared error."""

    name = "mse"

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("mse_quantize", 1003, "MSEQuantize", shared=(("asymmetric", 1),))
        num_candidates: int = option(200, cfg=2, ge=1, le=10000, help="clip ranges tried, evenly spaced")

    def choose_range(self):
        n = self.options.num_candidates
        ratios = np.linspace(1.0 / n, 1.0, n)
        lo, hi = self._symmetric_candidates(self.sketch.min * ratios, self.sketch.max * ratios)
        return self._best_of(lo, hi)


class KL(Calibrator):
    """Entropy calibration (TensorRT style): the threshold whose 128-level histogram diverges least."""

    name = "kl"

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("kl_quantize", 1004, "KLQuantize", shared=(("asymmetric", 1),))
        num_bins: int = option(2048, cfg=2, ge=256, le=65536, help="histogram bins of |x|")

    def choose_range(self):
        sk, num_bins = self.sketch, self.options.num_bins
        top = max(abs(sk.min), abs(sk.max))
        edges = np.linspace(0.0, top, num_bins + 1)
        # Histogram of |x|: fold the negative side onto the positive one.
        hist = np.diff(sk.cumulative(edges)) + np.diff(sk.cumulative(-edges[::-1]))[::-1]
        levels = 2 ** (self.num_bits - 1)
        best_kl, best_i = math.inf, num_bins
        for i in range(levels, num_bins + 1, max(1, (num_bins - levels) // 256)):
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


#: The activation algorithms by config.json name (``act_algo``). Register a new one with one entry here.
CALIBRATORS: dict[str, type[Calibrator]] = {c.name: c for c in (IFMR, HFMG, MinMax, Percentile, MSE, KL)}


def make_calibrator(name: str, num_bits: int = 8, asymmetric: bool = True, batch_num: int | None = None,
                    **options) -> Calibrator:
    """Instantiate the calibrator registered under ``name`` with its algorithm ``options`` (``batch_num``: the
    batches it will see, which sizes its sketch's tails)."""
    try:
        cls = CALIBRATORS[name]
    except KeyError:
        raise ValueError(f"unknown activation algorithm '{name}'; choose one of {sorted(CALIBRATORS)}") from None
    known = {spec.name for spec in cls.Options.specs()}
    for key in options:
        if key not in known:
            raise ValueError(f"'{key}' is not an option of activation algorithm '{name}' "
                             f"(its options: {', '.join(sorted(known)) or 'none'})")
    return cls(num_bits=num_bits, asymmetric=asymmetric, batch_num=batch_num, **options)
