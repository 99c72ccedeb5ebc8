"""Statistics requested as points and collected once.

An algorithm asks for a statistic of a tensor (a ``StatPoint``: the tensor, a hashable key saying what to
collect, and how to make the accumulator). ``Statistics`` deduplicates the points, feeds every batch's
tensors to the accumulators (the tensors of a batch spread over the worker threads) and hands each
algorithm what it asked for. It only aggregates: turning statistics into quantization parameters is the
algorithms' business.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from omct.core.parallel import run_all


class Statistic(Protocol):
    def update(self, values: np.ndarray) -> None: ...

    def merge(self, other) -> None: ...


@dataclass(frozen=True)
class StatPoint:
    """Collect ``make()``'s statistic over ``tensor``; points with equal (tensor, key) share one accumulator."""

    tensor: str
    key: tuple
    make: Callable[[], Statistic] = field(compare=False, hash=False)


class Statistics:
    def __init__(self, points: Iterable[StatPoint]):
        self._stats: dict[tuple[str, tuple], Statistic] = {}
        self._by_tensor: dict[str, list[Statistic]] = {}
        for p in points:
            if (p.tensor, p.key) not in self._stats:
                stat = p.make()
                self._stats[(p.tensor, p.key)] = stat
                self._by_tensor.setdefault(p.tensor, []).append(stat)

    def tensors(self) -> list[str]:
        """The tensors to fetch each batch, in the order the points were given."""
        return list(self._by_tensor)

    def __getitem__(self, point: StatPoint) -> Statistic:
        return self._stats[(point.tensor, point.key)]

    def update(self, tensor: str, values: np.ndarray) -> None:
        """Feed one tensor's values of the current batch (frontends that see tensors one at a time)."""
        for stat in self._by_tensor.get(tensor, ()):
            stat.update(values)

    def observe(self, tensors: Mapping[str, np.ndarray], on_error: Callable[[str, ValueError], Exception]) -> None:
        """Feed every requested tensor of the current batch, spread over the worker threads; a ValueError
        (NaN/Inf) is turned into ``on_error(tensor, error)``. A tensor missing from ``tensors`` did not run in
        this batch (inside an If branch not taken) and is skipped."""
        names = [n for n in self.tensors() if n in tensors]

        def task(name: str) -> None:
            try:
                self.update(name, tensors[name])
            except ValueError as e:
                raise on_error(name, e) from None

        run_all([functools.partial(task, n) for n in names], costs=[np.size(tensors[n]) for n in names])

    def accumulators(self) -> dict[tuple[str, tuple], Statistic]:
        """Every accumulator, keyed like the points: what a distributed run gathers from each process."""
        return dict(self._stats)

    def merge_accumulators(self, parts: list[dict[tuple[str, tuple], Statistic]]) -> None:
        """Make every accumulator the merge of ``parts`` (each an ``accumulators()`` of one process), folded in
        the order given, so every process that merges the same parts gets the same statistics. Sketches merge
        exactly; sums (channel means) add."""
        for key, stat in self._stats.items():
            merged = copy.deepcopy(parts[0][key])
            for part in parts[1:]:
                merged.merge(part[key])
            stat.__dict__.update(merged.__dict__)
