"""What every algorithm implements, and the context it works in."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from omct.algorithms.statistics import Statistics, StatPoint
from omct.core.params import QuantParams
from omct.formats.config import QuantConfig
from omct.formats.record import LayerRecord
from omct.graph.plan import Plan


@dataclass
class RecordContext:
    """Everything known when calibration ends; algorithms read it and fill ``records`` in pipeline order."""

    plan: Plan
    config: QuantConfig
    stats: Statistics
    weight_of: Callable[[str], np.ndarray]  # initializer name -> float array
    records: dict[str, LayerRecord] = field(default_factory=dict)
    site_params: list[QuantParams] = field(default_factory=list)  # one per plan site (activation ranges)
    weight_params: dict[str, QuantParams] = field(default_factory=dict)  # layer -> weight quantization
    # layer -> (its record's ``ada_flip`` list, the integer weight it gives): learned rounding's codes, which bias
    # correction reads instead of recomputing them while the record still holds that very list
    weight_codes: dict[str, tuple[list[int], np.ndarray]] = field(default_factory=dict)


class Algorithm(ABC):
    name: ClassVar[str]

    def points(self, plan: Plan, config: QuantConfig) -> list[StatPoint]:
        """The statistics this algorithm needs, collected in the calibration pass."""
        return []

    @abstractmethod
    def apply(self, ctx: RecordContext) -> None:
        """Fill this algorithm's part of ``ctx.records`` (and of the context, for later algorithms)."""
