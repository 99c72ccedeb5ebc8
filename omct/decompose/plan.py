"""Per layer: does the conv qualify (AMCT's conditions), and which form and rank replace it.

The choice is the cheapest candidate (MACs) within the error allowed (``core.decomposition.rank_order``)
that also runs faster than the original layer in ONNX Runtime (``latency.measure``); a layer for which no
candidate qualifies keeps its conv, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from omct.core import decomposition as dec
from omct.errors import ConfigError

#: the output spatial size assumed for a layer whose input size is unknown (no input data given)
NOMINAL_OUT = 14


@dataclass(frozen=True)
class DecomposeOptions:
    """How ranks are chosen. ``rank_budget``: fraction of each layer's MACs kept, in (0, 1]; ``max_error``:
    relative weight error allowed; neither: AMCT's EVBMF estimate. ``rank_multiple``: ranks are multiples of
    it (8 or 16 for the hardware's channel granule). ``check_latency``: keep a decomposition only when it
    measures at least ``min_speedup`` times faster in ONNX Runtime (``latency_batch`` images, ``threads``)."""

    rank_budget: float | None = None
    max_error: float | None = None
    rank_multiple: int = 16
    forms: tuple[str, ...] = dec.FORMS
    check_latency: bool = True
    min_speedup: float = 1.05
    latency_batch: int = 1
    threads: int = 1
    tries: int = 4

    def __post_init__(self):
        try:
            dec.check_budget(self.rank_budget)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.max_error is not None and not (isinstance(self.max_error, (int, float)) and self.max_error > 0):
            raise ConfigError(f"max_error must be a positive number (relative error allowed), got {self.max_error!r}")
        if not (isinstance(self.rank_multiple, int) and self.rank_multiple >= 1):
            raise ConfigError(f"rank_multiple must be a positive integer, got {self.rank_multiple!r}")
        bad = [f for f in self.forms if f not in dec.FORMS]
        if bad or not self.forms:
            raise ConfigError(f"forms must be a non-empty subset of {list(dec.FORMS)}, got {list(self.forms)}")


def refusal(groups: int, dilation: tuple[int, ...], kernel: tuple[int, ...], stride: tuple[int, ...],
            padding_mode: str = "zeros") -> str | None:
    """Why a conv cannot be decomposed (AMCT's conditions), or None."""
    if len(kernel) != 2:
        return f"{len(kernel)}-D kernel (only 2-D convolutions)"
    if groups != 1:
        return f"groups={groups} (only groups 1)"
    if any(d != 1 for d in dilation):
        return f"dilation {tuple(dilation)} (only 1)"
    if kernel[0] != kernel[1]:
        return f"kernel {kernel[0]}x{kernel[1]} is not square"
    if kernel[0] < 3:
        return f"kernel {kernel[0]}x{kernel[1]} (needs 3x3 or larger)"
    if any(s > 2 for s in stride):
        return f"stride {tuple(stride)} (at most 2)"
    if padding_mode != "zeros":
        return f"padding_mode '{padding_mode}' (only zeros)"
    return None


def geometry(cout: int, cin: int, k: int, stride, pads, in_hw=None) -> dec.ConvGeometry:
    """The layer's geometry; without a known input size, one giving a NOMINAL_OUT square output."""
    if in_hw is None:
        in_hw = tuple(NOMINAL_OUT * s + k - 1 - p0 - p1 - (s - 1) for s, p0, p1 in
                      ((stride[0], pads[0], pads[2]), (stride[1], pads[1], pads[3])))
    return dec.ConvGeometry(cout, cin, k, tuple(stride), tuple(pads), tuple(int(v) for v in in_hw))


def child_specs(form: str, ranks, g: dec.ConvGeometry, bias: bool) -> list[dict]:
    """The convolutions that replace the layer, in order: channels, kernel, stride, pads (t, l, b, r), bias."""
    t, left, b, r = g.pads
    if form == "svd":
        (rank,) = ranks
        return [dict(cin=g.cin, cout=rank, kernel=(g.k, 1), stride=(g.stride[0], 1), pads=(t, 0, b, 0), bias=False),
                dict(cin=rank, cout=g.cout, kernel=(1, g.k), stride=(1, g.stride[1]), pads=(0, left, 0, r), bias=bias)]
    r_in, r_out = ranks
    return [dict(cin=g.cin, cout=r_in, kernel=(1, 1), stride=(1, 1), pads=(0, 0, 0, 0), bias=False),
            dict(cin=r_in, cout=r_out, kernel=(g.k, g.k), stride=g.stride, pads=g.pads, bias=False),
            dict(cin=r_out, cout=g.cout, kernel=(1, 1), stride=(1, 1), pads=(0, 0, 0, 0), bias=bias)]


@dataclass
class LayerDecision:
    """What happened to one conv: its replacement (``chosen``) or why it stays (``reason``), and the figures."""

    name: str
    geometry: dec.ConvGeometry | None = None
    chosen: dec.Decomposition | None = None
    reason: str = ""
    rule: str = ""
    latency_ms: tuple[float, float] | None = None
    tried: list[str] = field(default_factory=list)

    def summary(self) -> str:
        if self.chosen is None:
            return f"{self.name}: kept ({self.reason})"
        c = self.chosen
        lat = f", ORT {self.latency_ms[0]:.3f} -> {self.latency_ms[1]:.3f} ms" if self.latency_ms else ""
        kind = "output" if c.data_aware else "weight"
        return (f"{self.name}: {c.form} ranks {list(c.ranks)}, MACs x{c.macs / self.geometry.macs():.2f}, "
                f"{kind} error {c.error:.3g}{lat}")


def decide(name: str, weight: np.ndarray, bias: np.ndarray | None, g: dec.ConvGeometry, options: DecomposeOptions,
           inputs: np.ndarray | None = None, targets=None) -> LayerDecision:
    """The replacement of one qualifying conv (weight OIHW), or the reason it stays. ``inputs``: the layer's real
    inputs for the data-aware fit; ``targets`` (or a function giving them): the original layer's outputs to fit,
    when ``inputs`` come from the model decomposed so far (its error is then compensated)."""
    d = LayerDecision(name, g)
    cands = dec.candidates(weight, bias, g, options.rank_multiple, options.forms)
    if not cands:
        d.reason = f"no rank (multiple of {options.rank_multiple}) costs fewer MACs ({g.cout}x{g.cin} channels)"
        return d
    ordered, d.rule = dec.rank_order(cands, g, weight, options.rank_multiple, options.rank_budget, options.max_error)
    if not ordered:
        d.reason = d.rule
        return d
    remaining, failed = list(ordered), {f: 0 for f in options.forms}
    for _ in range(options.tries):
        if not remaining:
            break
        # the next candidate in order, from the form that has measured slower the fewest times
        c = min(remaining, key=lambda c: failed[c.form])
        remaining.remove(c)
        if options.check_latency:
            before, after = measure_latency(g, c.form, c.ranks, options)
            d.tried.append(f"{c.form}{list(c.ranks)}: {after / before:.2f}x time")
            if after * options.min_speedup > before:
                failed[c.form] += 1
                continue
            d.latency_ms = (before * 1e3, after * 1e3)
        data = None
        if inputs is not None:
            data = dec.LayerData(inputs, weight, bias, g, target=targets() if callable(targets) else targets)
        d.chosen = dec.refine(c, weight, bias, data)
        return d
    d.reason = "slower in ONNX Runtime than the original (" + "; ".join(d.tried) + ")"
    return d


def measure_latency(g: dec.ConvGeometry, form: str, ranks, options: DecomposeOptions) -> tuple[float, float]:
    from omct.decompose.latency import measure

    return measure(g, form, tuple(ranks), options.latency_batch, options.threads)
