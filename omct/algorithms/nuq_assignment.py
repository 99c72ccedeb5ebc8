"""NUQ's output-aware assignment and storage choice (omct): once the weight quantization has fitted a NUQ layer's
scales and level tables, each weight takes one of the two levels around it, chosen by the flip descent
(``core.adaround.flip_descent``, what the default's learned rounding and ``ada_quantize``'s ``solver: flips`` run)
on the layer's output error ``(Q - W) A (Q - W)^T - 2 B (Q - W)``, whose terms come from the input's second moments
accumulated during calibration (``core.adaround.InputGram``: 256 rows per batch, ``groups * d * d`` float32 per
layer; the inputs as the deployed layer reads them: quantized, ``dmq_balancer``-divided, minus their mean where
bias correction runs, ``algorithms.adaround.layer_gram_terms``). Stored as the weights that take the other level
(the record's ``ada_flip``), which ``graph.export.layer_weight_codes`` applies for every exported model and for
bias correction.

The uniform grid of the same bits (``uniform_grid``: -16..15 for NUQ-32 on uniform INT5's per-channel scale) is a
valid level table too: each layer is assigned on its own tables and on that grid under the same descent, and each
output channel keeps whichever gives it the smaller output error (channels are independent in it). So a NUQ-N
layer is never worse than uniform log2(N)-bit weights with the flip descent on the same moments, by construction.

With ``allocate`` (default) the layers' bytes are allocated (``allocate_layers``): each layer may keep one level
table per output channel, share ``num_tables`` tables, use the uniform grid alone (one table row) or keep uniform
INT8 weights (with the same descent); the choice is made for the whole model by ``core.nuq.allocate`` on each
option's output error after the descent (relative to the layer's output power) and bytes, under the bytes the fixed
rule (``nuq.effective_tables``) would take: the deploy file does not grow. Without it, a layer keeps its fitted
tables, each channel on the uniform grid where that is better, within the same bytes.

Layers with ``d <= GPTQ_MAX_D`` also start a second descent from GPTQ's assignment on the same ``A`` and keep, per
output channel, the better. Cost per layer with ``d`` inputs per output (Cin * kh * kw) and ``c`` output channels:
up to five options of one or two flip descents (at most ``d`` steps of ``O(c d)`` each, rows leave as they settle)
and their ``O(c d^2)`` error products, plus a ``d x d`` damped inverse per option on narrow layers (the held-out
choice among three GPTQ candidates this replaced took ResNet-18 NUQ-32 333 s, now 118 s, shared host)."""

from __future__ import annotations

import numpy as np

from omct.algorithms.adaround import (
    GRAM_ROWS_PER_BATCH,
    _grouped,
    _ungrouped,
    _window,
    layer_gram_terms,
)
from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.algorithms.weights import _importance_point
from omct.core import nuq
from omct.core.adaround import (
    InputGram,
    flip_gaps,
    layer_seed,
    learn_rounding_from_terms,
    rounding_flips,
)
from omct.core.params import QuantParams
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.graph.export import layer_float_weight
from omct.ui import logger

#: Layers whose outputs read at most this many values also start a descent from GPTQ's assignment
#: (``nuq.assign_output_aware`` on the same ``A``; a damped inverse of ``d x d``) and keep, per output channel, the
#: better of the two descents: GPTQ's error feedback reaches minima the descent from the nearest levels does not.
GPTQ_MAX_D = 1152


def _layers(plan, config):
    """Channel-wise NUQ layers asking for the output-aware assignment whose inputs can be sampled: 2-D Conv
    (explicit pads; grouped: one ``H`` per group), Gemm, MatMul with a 2-D weight."""
    out = []
    for name, spec in plan.layers.items():
        wcfg = config.layers[name].weight_quant_params if name in config.layers else None
        if (wcfg is None or wcfg.wts_algo != "nuq_quantize" or spec.weight is None or spec.weight_only
                or not wcfg.channel_wise or not wcfg.__pydantic_extra__.get("output_aware", False)):
            continue
        conv = spec.op_type == "Conv" and spec.window is not None
        dense = spec.op_type in ("Gemm", "MatMul") and spec.weight_axis is not None
        if conv or dense:
            out.append(spec)
    return out


class NuqAssignment(Algorithm):
    name = "nuq_assignment"

    def points(self, plan, config):
        return [gram_point(spec) for spec in _layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        layers = [spec for spec in _layers(ctx.plan, ctx.config) if _usable(ctx, spec)]
        allocated = [spec for spec in layers if _options(ctx, spec).get("allocate", True)]
        fits = {}
        for spec in layers:  # every option a layer may need, then its d x d terms are released (peak memory)
            fits[spec.name] = _LayerFit(ctx, spec)
            fits[spec.name].prepare(spec in allocated)
        choices = allocate_layers(ctx, allocated, fits)
        for spec in layers:
            fit = fits[spec.name]
            kind = choices.get(spec.name) or fit.fixed_choice()
            fit.store(ctx, kind)
            logger.debug("layer '%s': NUQ stored as %s", spec.name, kind)


def gram_point(spec) -> StatPoint:
    """The second moments of the layer's input rows (``core.adaround.InputGram``, every input width: a NUQ layer
    has no cost limit), accumulated during calibration: what the flip descent fits."""
    window = _window(spec)
    groups = spec.groups if spec.op_type == "Conv" else 1
    return StatPoint(spec.input, ("input_gram", window, groups, GRAM_ROWS_PER_BATCH, None),
                     lambda: InputGram(window, layer_seed(f"{spec.input}{window}"), groups, GRAM_ROWS_PER_BATCH))


def uniform_grid(num_steps: int) -> np.ndarray:
    """The uniform ``log2(num_steps)``-bit grid as a NUQ level table: ``-(num_steps / 2) .. num_steps / 2 - 1``
    (INT8 values; with the per-channel scale of uniform weights of those bits, what uniform INT5 / INT4 store)."""
    return np.arange(-(num_steps // 2), num_steps // 2, dtype=np.int64)


class _LayerFit:
    """One NUQ layer's ways of storing its weight, each with its weights assigned by the flip descent on the
    layer's accumulated input moments (``flip_descent``: the output error ``(Q - W) A (Q - W)^T - 2 B (Q - W)``,
    the inputs as the deployed layer reads them, ``adaround.layer_gram_terms``) and its measured output error
    per output channel: ``channel`` (one level table per channel), ``shared`` (the layer's ``num_tables``
    tables), ``uniform`` (the uniform grid of the same bits: a valid level table), ``int8`` (uniform INT8, the
    same descent), and the mixtures where each channel keeps whichever of its NUQ table and the uniform grid
    gives it the smaller output error (channels are independent in this error). Each option computed on first
    use."""

    def __init__(self, ctx: RecordContext, spec):
        rec, wp, opts = ctx.records[spec.name], ctx.weight_params[spec.name], _options(ctx, spec)
        self.spec, self.opts = spec, opts
        self.weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32), rec, spec)
        self.axis = wp.axis
        self.start = WEIGHT_QUANTIZERS["nuq_quantize"](self.weight, 8, wp.axis)
        self.fixed = (np.asarray(wp.scale, np.float32), nuq.level_table(rec.nuq_levels, self.weight.shape[wp.axis]))
        self.importance = ctx.stats[_importance_point(spec)].mean
        stat = ctx.stats[gram_point(spec)]
        self.w = _grouped(self.weight, self.start, spec)[0]
        self.a, self.b = layer_gram_terms(ctx, spec, stat, self.weight)
        self.power = float((np.matmul(self.w, self.a) * self.w).sum(dtype=np.float64))
        self.const = 0.0 if self.b is None else -float((self.b.astype(np.float64) * self.w).sum())
        self._done: dict[str, tuple] = {}

    def _descend(self, scale: np.ndarray, table: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Codes (the weight's shape) after the flip descent from the nearest levels (``table`` None: uniform
        INT8, floor / ceil), and each output channel's output error."""
        spec = self.spec
        if table is None:
            s = _grouped(self.weight, self.start, spec)[1]
            codes = learn_rounding_from_terms(self.w, s, self.a, self.b, self.start.qmin,
                                              self.start.qmax).astype(np.int16)
            q = codes * s
            codes = _ungrouped(codes, self.weight, spec)
        else:
            params = QuantParams(np.asarray(scale, np.float32), np.zeros(1, np.int32), 8, self.axis)
            best = None
            starts = [None]
            if self.w.shape[-1] <= GPTQ_MAX_D:  # GPTQ's assignment as a second start (cheap at this width)
                starts.append(nuq.assign_output_aware(self.weight, scale, self.axis, table, self.a))
            for flips in starts:
                at, alt = nuq.bracket_levels(self.weight, scale, self.axis, table, flips)
                start, s = _grouped(at.astype(np.float32), params, spec)
                other = _grouped(alt.astype(np.float32), params, spec)[0]
                q, err = nuq.descend(s * start, s * other, self.w, self.a, self.b)
                codes = np.where(q != s * start, other, start).reshape(-1, start.shape[-1])
                if best is not None:  # per output row the better of the two descents (rows are independent)
                    keep = best[1] <= err
                    codes, err = np.where(keep[:, None], best[0], codes), np.where(keep, best[1], err)
                best = (codes, err)
            codes = best[0].reshape(self.w.shape).astype(np.int16)  # INT8 levels: small codes, kept per option
            return _ungrouped(codes, self.weight, spec), best[1]
        return codes, nuq.row_output_errors(q, self.w, self.a, self.b)

    def option(self, kind: str) -> tuple:
        """(scale, table or None for INT8, codes, per-channel error) of one way of storing the layer."""
        if kind not in self._done:
            self._done[kind] = self._option(kind)
        return self._done[kind]

    def _option(self, kind: str) -> tuple:
        if kind == "int8":
            return (self.start.scale, None, *self._descend(self.start.scale, None))
        if kind == "uniform":
            steps = self.fixed[1].shape[1]
            bits = nuq.index_bits(steps)
            scale = nuq._half(np.asarray(WEIGHT_QUANTIZERS["arq_quantize"](self.weight, bits, self.axis).scale,
                                         np.float32).reshape(-1))
            table = np.broadcast_to(uniform_grid(steps), (len(scale), steps)).copy()
            return (scale, table, *self._descend(scale, table))
        if kind.endswith("+uniform"):  # per channel the better of the NUQ table and the uniform grid
            return nuq.better_rows(self.option(kind[:-len("+uniform")]), self.option("uniform"), self.axis)
        if kind == "fixed":
            scale, table = self.fixed
        else:
            opts = self.opts
            options = nuq.fit_options(self.weight, self.start.scale, self.axis, self.spec.weight_in_axis,
                                      opts["num_steps"], opts["num_of_iteration"], self.importance,
                                      opts["num_tables"])
            scale, table = options[kind]
        return (np.asarray(scale, np.float32).reshape(-1), table, *self._descend(scale, table))

    def prepare(self, allocated: bool) -> None:
        """Compute every option the allocation (or, without it, ``fixed_choice``) will ask for, then drop the
        descent's terms: only the options' codes and errors are kept."""
        for kind in self.kinds() if allocated else ("fixed", "fixed+uniform", "uniform"):
            self.option(kind)
        self.a = self.b = self.w = None

    def kinds(self) -> list[str]:
        """The ways the allocation may choose between."""
        channels = self.weight.shape[self.axis]
        out = ["channel+uniform", "uniform", "int8"]
        opts = self.opts
        if 0 < opts["num_tables"] < channels and nuq.fit_options(
                self.weight, self.start.scale, self.axis, self.spec.weight_in_axis, opts["num_steps"],
                opts["num_of_iteration"], self.importance, opts["num_tables"]).get("shared") is not None:
            out[1:1] = ["shared", "shared+uniform"]
        return out

    def bytes(self, kind: str) -> int:
        """Deploy bytes of the weight stored this way; INT8 also counts the 4 bytes per channel its float32 scale
        and INT32 bias take over a NUQ layer's float16 and INT16 (``graph.export``): else moving a layer to INT8
        under the fixed rule's weight bytes grew the file (ResNet-18 NUQ-32 by 1 KB)."""
        table = self.option(kind)[1]
        if table is None:
            return self.weight.size + 4 * self.weight.shape[self.axis]
        return nuq.stored_table_bytes(self.weight.size, table)

    def error(self, kind: str) -> float:
        """The layer's output error relative to its output power (comparable across layers)."""
        return (float(self.option(kind)[3].sum()) + self.const) / max(self.power, 1e-30)

    def budget(self) -> int:
        """The deploy bytes of the weight as the weight algorithm fitted it (the fixed rule)."""
        return nuq.stored_table_bytes(self.weight.size, self.fixed[1])

    def fixed_choice(self) -> str:
        """Without the allocation: the fitted tables, each channel on the uniform grid where that is better, if the
        bytes stay within the fitted tables' (else the fitted tables alone)."""
        kinds = ["fixed", "fixed+uniform", "uniform"]
        costs = [self.bytes(k) for k in kinds]
        errors = [self.error(k) for k in kinds]
        return kinds[nuq.allocate([costs], [errors], self.budget())[0]]

    def store(self, ctx: RecordContext, kind: str) -> None:
        """Write the chosen way into the layer's record and weight parameters."""
        scale, table, codes, _ = self.option(kind)
        rec, wp = ctx.records[self.spec.name], ctx.weight_params[self.spec.name]
        if table is None:
            wp = self.start
            rec.nuq_levels = []
            rec.ada_flip = rounding_flips(self.weight, wp, codes)
        else:
            wp = QuantParams(np.asarray(scale, np.float32), wp.offset, wp.num_bits, wp.axis)
            rec.nuq_levels = [int(v) for v in np.ravel(table)]
            rec.ada_flip = flip_gaps(nuq.to_levels(self.weight, scale, self.axis, table),
                                     nuq._other_level(self.weight, scale, self.axis, table), codes)
        ctx.weight_params[self.spec.name] = wp
        rec.scale_w = [float(v) for v in np.ravel(wp.scale)]
        rec.offset_w = [0] * len(rec.scale_w)


def _options(ctx: RecordContext, spec) -> dict:
    return ctx.config.layers[spec.name].weight_quant_params.__pydantic_extra__


def _usable(ctx: RecordContext, spec) -> bool:
    """A NUQ layer (not kept uniform for being too small) whose inputs were seen."""
    rec, wp = ctx.records[spec.name], ctx.weight_params.get(spec.name)
    stat = ctx.stats.accumulators().get((spec.input, gram_point(spec).key))
    return bool(rec.nuq_levels) and wp is not None and wp.axis is not None and stat is not None and \
        stat.gram is not None and stat.n >= 2


def allocate_layers(ctx: RecordContext, specs: list, fits: dict) -> dict[str, str]:
    """Choose, for the whole model, how each NUQ layer of ``specs`` stores its weight (``_LayerFit.kinds``: its
    own level tables per channel, shared tables, the uniform grid of the same bits, or uniform INT8 where the
    layer is so small or so sensitive that one byte per weight pays), so that the summed relative output error of
    the layers, each with its weights assigned by the flip descent (what the final choice uses), is small under
    the bytes the fixed rule (``nuq.effective_tables``) gives them (``nuq.allocate``). Returns layer -> kind."""
    if not specs:
        return {}
    kinds = [fits[spec.name].kinds() for spec in specs]
    costs = [[fits[spec.name].bytes(k) for k in ks] for spec, ks in zip(specs, kinds, strict=True)]
    errors = [[fits[spec.name].error(k) for k in ks] for spec, ks in zip(specs, kinds, strict=True)]
    budget = sum(fits[spec.name].budget() for spec in specs)
    picked = nuq.allocate(costs, errors, budget)
    out = {spec.name: ks[i] for spec, ks, i in zip(specs, kinds, picked, strict=True)}
    counts: dict[str, int] = {}
    for kind in out.values():
        counts[kind] = counts.get(kind, 0) + 1
    used = sum(c[i] for c, i in zip(costs, picked, strict=True))
    logger.info("NUQ allocation over %d layers: %s; weight bytes %d of the fixed rule's %d", len(specs),
                ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), used, budget)
    return out
