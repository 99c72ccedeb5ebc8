"""NUQ's output-aware assignment (omct): once the weight quantization has fixed a NUQ layer's scales and level
tables, each weight takes one of the two levels around it, chosen GPTQ's way (``core.gptq``) so that the
layer's output error is small, not each weight's own. The layer's input second moment ``H`` comes from the
bounded sample of its calibration inputs that AdaRound also uses (``core.adaround.InputSamples``: at most
8 MiB and 4096 rows per layer). Stored as the weights that take the other level (the record's ``ada_flip``),
which ``graph.export.layer_weight_codes`` applies for every exported model and for bias correction.

Each layer chooses, on sampled rows it was not fitted to, between GPTQ, GPTQ with ``H`` shrunk towards its
diagonal, and the nearest levels, each as it is and polished by single flips (``choose_flips``). Cost per layer
with ``d`` inputs per output (Cin * kh * kw) and ``c`` output channels: three GPTQ runs and four flip descents
(at most ``d`` steps of ``O(c d)`` each), ``O(c d^2 + d^3)`` flops each, and about 5 ``d^2`` float64 values
at once (0.85 GB at d = 4608, ResNet-18's widest convolutions), one layer at a time. A grouped convolution has
one ``H`` per group (depthwise 3x3: 9 x 9 per channel), fitted group by group.

Before that, with ``allocate`` (default), the layers' bytes are allocated (``allocate_layers``): each layer may
keep one level table per output channel, share ``num_tables`` tables, or keep uniform INT8 weights; the choice is
made for the whole model by ``core.nuq.allocate`` on each option's measured output error (relative to the layer's
output power, on all sampled rows, nearest levels) and bytes, under the bytes the fixed rule
(``nuq.effective_tables``) would take: the deploy file does not grow, the bytes go where they lower the error most."""

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
from omct.core import gptq, nuq
from omct.core.adaround import (
    InputGram,
    flip_descent,
    flip_gaps,
    layer_seed,
    learn_rounding_from_terms,
    rounding_flips,
)
from omct.core.params import QuantParams
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.graph.export import layer_float_weight
from omct.ui import logger

#: How far ``H`` is shrunk towards its diagonal in the candidates (``choose_flips``).
SHRINK = (0.0, 0.5)


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
        fits = {spec.name: _LayerFit(ctx, spec) for spec in layers}
        allocated = [spec for spec in layers if _options(ctx, spec).get("allocate", True)]
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
            codes = learn_rounding_from_terms(self.w, _grouped(self.weight, self.start, spec)[1], self.a, self.b,
                                              self.start.qmin, self.start.qmax)
            q = codes * _grouped(self.weight, self.start, spec)[1]
            codes = _ungrouped(codes, self.weight, spec)
        else:
            near, alt = nuq.bracket_levels(self.weight, scale, self.axis, table)
            params = QuantParams(np.asarray(scale, np.float32), np.zeros(1, np.int32), 8, self.axis)
            start, s = _grouped(near.astype(np.float32), params, spec)
            other = _grouped(alt.astype(np.float32), params, spec)[0]
            q = flip_descent(s * start, s * other, self.w, self.a, self.b)
            codes = _ungrouped(np.where(q != s * start, other, start).astype(np.int64), self.weight, spec)
        delta = (q - self.w).astype(np.float32)
        err = (np.matmul(delta, self.a) * delta).sum(-1, dtype=np.float64)
        if self.b is not None:
            err = err - 2 * (self.b * delta).sum(-1, dtype=np.float64) - (self.b * self.w).sum(-1, dtype=np.float64)
        return codes, err.reshape(-1)

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
            s1, t1, c1, e1 = self.option(kind[:-len("+uniform")])
            s2, t2, c2, e2 = self.option("uniform")
            take = e2 < e1
            axis_shape = [1] * self.weight.ndim
            axis_shape[self.axis] = -1
            pick = take.reshape(axis_shape)
            return (np.where(take, s2, s1).astype(np.float32), np.where(take[:, None], t2, t1),
                    np.where(pick, c2, c1), np.where(take, e2, e1))
        if kind == "fixed":
            scale, table = self.fixed
        else:
            opts = self.opts
            options = nuq.fit_options(self.weight, self.start.scale, self.axis, self.spec.weight_in_axis,
                                      opts["num_steps"], opts["num_of_iteration"], self.importance,
                                      opts["num_tables"])
            scale, table = options[kind]
        return (np.asarray(scale, np.float32).reshape(-1), table, *self._descend(scale, table))

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
        table = self.option(kind)[1]
        return self.weight.size if table is None else nuq.stored_table_bytes(self.weight.size, table)

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


def _second_moment(rows: np.ndarray, groups: int) -> np.ndarray:
    """``X^T X / n`` (float32), or one per group ([groups, d, d]) when each group reads its own columns."""
    x = rows.astype(np.float32)
    if groups == 1:
        return x.T @ x / len(x)
    x = x.reshape(len(x), groups, -1)
    return np.einsum("ngi,ngj->gij", x, x) / len(x)


def choose_flips(weight: np.ndarray, scale: np.ndarray, axis: int, levels, rows: np.ndarray,
                 groups: int = 1) -> list[int]:
    """The output-aware assignment that does best on inputs it was not fitted to: fitted on every other sampled
    row and scored on the rest, GPTQ with ``H`` as estimated, GPTQ with ``H`` shrunk halfway to its diagonal,
    or the nearest levels (no flips), each also polished by single flips (``nuq.polish_flips``: descent to where
    no single flip lowers the fitted output error); the winner is then fitted (and polished) on all rows. On few
    rows of many correlated inputs (a MobileNet projection after 4x4 pixels) GPTQ fits the sample and loses on
    new inputs; elsewhere it wins by 5-15 dB of layer output error (``benchmarks/nuq_layer_error.py``)."""
    h_fit, h_held = _second_moment(rows[0::2], groups), _second_moment(rows[1::2], groups)
    fitted: dict[tuple[float | None, bool], list[int]] = {(None, False): []}
    for alpha in SHRINK:
        fitted[(alpha, False)] = nuq.assign_output_aware(weight, scale, axis, levels, gptq.shrunk(h_fit, alpha))
    for alpha in (None, *SHRINK):
        fitted[(alpha, True)] = nuq.polish_flips(weight, scale, axis, levels, h_fit, fitted[(alpha, False)])
    scores = {key: nuq.output_error(weight, scale, axis, levels, h_held, flips) for key, flips in fitted.items()}
    del h_fit, h_held, fitted
    # a tie keeps the nearest levels, then the unpolished assignment
    alpha, polish = min(scores, key=lambda k: (scores[k], k[0] is not None, k[1]))
    h = _second_moment(rows, groups)
    flips = [] if alpha is None else nuq.assign_output_aware(weight, scale, axis, levels, gptq.shrunk(h, alpha))
    return nuq.polish_flips(weight, scale, axis, levels, h, flips) if polish else flips
