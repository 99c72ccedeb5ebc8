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

from omct.algorithms.adaround import input_samples_point, layer_input_rows
from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.weights import _importance_point
from omct.core import gptq, nuq
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
        return [input_samples_point(spec) for spec in _layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        layers = [spec for spec in _layers(ctx.plan, ctx.config) if _usable(ctx, spec)]
        allocate_layers(ctx, [spec for spec in layers if _options(ctx, spec).get("allocate", True)])
        for spec in layers:
            rec, wp = ctx.records[spec.name], ctx.weight_params.get(spec.name)
            rows = layer_input_rows(ctx, spec)
            if not rec.nuq_levels:
                continue  # kept uniform INT8 by the allocation
            weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32), rec, spec)
            groups = spec.groups if spec.op_type == "Conv" else 1
            rec.ada_flip = choose_flips(weight, wp.scale, wp.axis, rec.nuq_levels, rows, groups)


def _options(ctx: RecordContext, spec) -> dict:
    return ctx.config.layers[spec.name].weight_quant_params.__pydantic_extra__


def _usable(ctx: RecordContext, spec) -> bool:
    """A NUQ layer (not kept uniform for being too small) whose inputs were seen."""
    rec, wp = ctx.records[spec.name], ctx.weight_params.get(spec.name)
    rows = layer_input_rows(ctx, spec)
    return bool(rec.nuq_levels) and wp is not None and wp.axis is not None and rows is not None and len(rows) >= 2


def _relative_error(weight: np.ndarray, codes: np.ndarray, scale: np.ndarray, axis: int, h: np.ndarray) -> float:
    """``sum (W - Q) H (W - Q)^T / sum W H W^T`` (per group for a grouped convolution): the layer's output error
    relative to its output power, comparable across layers."""
    w = np.moveaxis(np.asarray(weight, np.float64), axis, 0).reshape(weight.shape[axis], -1)
    q = np.moveaxis(np.asarray(codes, np.float64), axis, 0).reshape(w.shape) * \
        np.asarray(scale, np.float64).reshape(-1, 1)
    hs = h[None] if h.ndim == 2 else h
    per = len(w) // len(hs)
    err = power = 0.0
    for g in range(len(hs)):
        err += float(gptq.output_error(w[g * per:(g + 1) * per], q[g * per:(g + 1) * per], hs[g]).sum())
        power += float(gptq.output_error(w[g * per:(g + 1) * per], 0 * w[g * per:(g + 1) * per], hs[g]).sum())
    return err / power if power > 0 else err


def allocate_layers(ctx: RecordContext, specs: list) -> None:
    """Choose, for the whole model, how each NUQ layer of ``specs`` stores its weight: one level table per output
    channel (``channel``), its ``num_tables`` shared tables (``shared``), or uniform INT8 (``int8``, where the
    layer is so small or so sensitive that one byte per weight pays), so that the summed relative output error of
    the layers is small under the bytes the fixed rule (``nuq.effective_tables``) gives them (``nuq.allocate``).
    Updates the layers' records and weight parameters; the output-aware assignment then runs on the choice."""
    if not specs:
        return
    choices, costs, errors, budget = [], [], [], 0
    for spec in specs:
        rec, wp, opts = ctx.records[spec.name], ctx.weight_params[spec.name], _options(ctx, spec)
        weight = layer_float_weight(ctx.weight_of(spec.weight), rec, spec)  # as the weight algorithm fitted it
        start = WEIGHT_QUANTIZERS["nuq_quantize"](weight, 8, wp.axis)
        importance = ctx.stats[_importance_point(spec)].mean
        options = nuq.fit_options(weight, start.scale, wp.axis, spec.weight_in_axis, opts["num_steps"],
                                  opts["num_of_iteration"], importance, opts["num_tables"])
        rows = layer_input_rows(ctx, spec)
        h = _second_moment(rows, spec.groups if spec.op_type == "Conv" else 1)
        kinds = {k: (scale, table, nuq.stored_table_bytes(weight.size, table))
                 for k, (scale, table) in options.items()}
        kinds["int8"] = (start.scale, None, weight.size)
        err = {k: _relative_error(weight, start.quantize(weight) if t is None else
                                  nuq.to_levels(weight, s, wp.axis, t), s, wp.axis, h)
               for k, (s, t, _) in kinds.items()}
        budget += nuq.stored_table_bytes(weight.size, nuq.level_table(rec.nuq_levels, weight.shape[wp.axis]))
        choices.append((spec, start, kinds))
        costs.append([b for _, _, b in kinds.values()])
        errors.append(list(err.values()))
        del h
    picked = nuq.allocate(costs, errors, budget)
    counts: dict[str, int] = {}
    for (spec, start, kinds), i in zip(choices, picked, strict=True):
        kind = list(kinds)[i]
        counts[kind] = counts.get(kind, 0) + 1
        scale, table, _ = kinds[kind]
        rec, wp = ctx.records[spec.name], ctx.weight_params[spec.name]
        if table is None:
            rec.nuq_levels = []
            wp = start
        else:
            rec.nuq_levels = [int(v) for v in np.ravel(table)]
            wp = QuantParams(np.asarray(scale, np.float32), wp.offset, wp.num_bits, wp.axis)
        ctx.weight_params[spec.name] = wp
        rec.scale_w = [float(v) for v in np.ravel(wp.scale)]
        rec.offset_w = [0] * len(rec.scale_w)
        logger.debug("layer '%s': NUQ allocation chose %s", spec.name, kind)
    used = sum(c[i] for c, i in zip(costs, picked, strict=True))
    logger.info("NUQ allocation over %d layers: %s; weight bytes %d of the fixed rule's %d", len(specs),
                ", ".join(f"{v} {k}" for k, v in sorted(counts.items())), used, budget)


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
