"""Streaming error statistics between a reference tensor and its quantized counterpart.

Sums are accumulated batch by batch, so comparing a model over any number of batches needs memory for
one batch only.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np


class ErrorStats:
    """Cosine similarity, SQNR, MSE and max abs error of ``test`` against ``ref``, over all updates."""

    def __init__(self) -> None:
        self.count = 0
        self.dot = 0.0
        self.ref_sq = 0.0
        self.test_sq = 0.0
        self.err_sq = 0.0
        self.max_abs = 0.0

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        r = np.asarray(ref, np.float64).ravel()
        t = np.asarray(test, np.float64).ravel()
        if r.shape != t.shape:
            raise ValueError(f"shapes differ: {np.shape(ref)} vs {np.shape(test)}")
        d = t - r
        self.count += r.size
        self.dot += float(r @ t)
        self.ref_sq += float(r @ r)
        self.test_sq += float(t @ t)
        self.err_sq += float(d @ d)
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))

    @property
    def cosine(self) -> float:
        if self.ref_sq == 0.0 and self.test_sq == 0.0:
            return 1.0
        if self.ref_sq == 0.0 or self.test_sq == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.ref_sq * self.test_sq)

    @property
    def sqnr_db(self) -> float:
        if self.err_sq == 0.0:
            return math.inf
        if self.ref_sq == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.ref_sq / self.err_sq)

    @property
    def mse(self) -> float:
        return self.err_sq / self.count if self.count else 0.0


class Sensitivity(ABC):
    """How much a layer's quantized output differs from its float output.

    ``compare(data, other)`` gives the measure for one pair of arrays (AMCT's interface); ``score`` turns the
    accumulated statistics of all calibration batches into the number layers are ranked by (larger = more
    sensitive). A new sensitivity implements ``value`` and ``score``.
    """

    name: str

    def compare(self, data: np.ndarray, other: np.ndarray) -> float:
        stats = ErrorStats()
        stats.update(data, other)
        return self.value(stats)

    @abstractmethod
    def value(self, stats: ErrorStats) -> float:
        """The measure itself (e.g. the cosine similarity)."""

    @abstractmethod
    def score(self, stats: ErrorStats) -> float:
        """Sensitivity from accumulated statistics: larger means the layer suffers more from quantization."""


class CosineSimilarity(Sensitivity):
    name = "CosineSimilarity"

    def value(self, stats):
        return stats.cosine

    def score(self, stats):
        return 1.0 - stats.cosine


class MSE(Sensitivity):
    """Mean squared error; ranked relative to the float output's mean square, so layers of any scale compare."""

    name = "MSE"

    def value(self, stats):
        return stats.mse

    def score(self, stats):
        return stats.err_sq / stats.ref_sq if stats.ref_sq else 0.0


SENSITIVITIES: dict[str, type[Sensitivity]] = {"CosineSimilarity": CosineSimilarity, "MSE": MSE}
