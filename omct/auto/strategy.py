"""Search strategies: which layers go back to float next, given the last verdict.

AMCT's interface: ``initialize(ranking_info)`` with the layers ranked most sensitive first, then
``update_quant_config(metric_eval)`` with the (ok, loss) of the configuration evaluated last (the first call
gets the fully quantized model's). It returns ``{"stop_flag": bool, "roll_back_config": {layer: bool}}``:
the next configuration to evaluate (True = that layer in float), or with stop_flag the final one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod


class SearchStrategy(ABC):
    def initialize(self, ranking_info: list[tuple[str, float]]) -> None:
        self.order = [name for name, _ in ranking_info]

    def config(self, k: int) -> dict[str, bool]:
        """The ``k`` most sensitive layers in float."""
        return {name: i < k for i, name in enumerate(self.order)}

    @abstractmethod
    def update_quant_config(self, metric_eval: tuple[bool, float]) -> dict:
        """The next configuration to evaluate, or the final one with stop_flag True."""


class BinarySearch(SearchStrategy):
    """Binary search on how many of the most sensitive layers stay in float: ceil(log2(N)) evaluations."""

    def initialize(self, ranking_info):
        super().initialize(ranking_info)
        self.lo, self.hi = 0, len(self.order)  # lo layers in float fails, hi passes (all float = the float model)
        self.pending: int | None = None

    def update_quant_config(self, metric_eval):
        ok = metric_eval[0]
        k = 0 if self.pending is None else self.pending
        if ok:
            self.hi = k
        else:
            self.lo = k
        if self.hi - self.lo <= 1:
            return {"stop_flag": True, "roll_back_config": self.config(self.hi)}
        self.pending = (self.lo + self.hi) // 2
        return {"stop_flag": False, "roll_back_config": self.config(self.pending)}


class Greedy(SearchStrategy):
    """One more layer in float at a time, most sensitive first, until the metric is met."""

    def initialize(self, ranking_info):
        super().initialize(ranking_info)
        self.k = 0

    def update_quant_config(self, metric_eval):
        if metric_eval[0] or self.k >= len(self.order):
            return {"stop_flag": True, "roll_back_config": self.config(self.k)}
        self.k += 1
        return {"stop_flag": False, "roll_back_config": self.config(self.k)}


STRATEGIES: dict[str, type[SearchStrategy]] = {"BinarySearch": BinarySearch, "Greedy": Greedy}
