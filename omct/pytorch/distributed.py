"""torch.distributed in the PyTorch frontend: statistics reduced across ranks, files written by rank 0 only.

Every rank sees its share of the data; the sketches every calibrator keeps merge exactly (``ActivationSketch.merge``),
so gathering them and merging them in rank order gives every rank the same statistics, the ones one process
would have collected from all the data. The core stays numpy-only: only this module talks to torch.distributed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

from omct.algorithms.statistics import Statistics
from omct.errors import OmctError

T = TypeVar("T")


def active() -> bool:
    """True inside a torch.distributed run with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def barrier() -> None:
    if active():
        dist.barrier()


def reduce_statistics(stats: Statistics) -> None:
    """Replace every accumulator in ``stats`` by the merge of all ranks' (same order on every rank)."""
    if not active():
        return
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, stats.accumulators())
    stats.merge_accumulators(gathered)


def on_rank0(work: Callable[[], T]) -> T | None:
    """Run ``work`` on rank 0 only; the other ranks wait for it and raise the same error if it failed."""
    if not active():
        return work()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = work()
        except OmctError as e:
            error = e
    status = [None if error is None else (type(error), str(error))]
    dist.broadcast_object_list(status, src=0)
    if status[0] is not None:
        if error is not None:
            raise error
        kind, message = status[0]
        raise kind(f"rank 0: {message}")
    return result
