"""AdaRound (``wts_algo: ada_quantize``): each such layer's rounding learned from a bounded sample of its
calibration inputs (``core.adaround.InputSamples``: at most 8 MiB per layer), stored in the record as the
weights that round the other way than round-to-nearest (``ada_flip``)."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.adaround import AdaRoundOptions, InputSamples, Window, layer_seed, learn_rounding, rounding_flips
from omct.core.params import QuantParams
from omct.graph.export import layer_float_weight

NAME = "ada_quantize"


def _window(spec) -> Window | None:
    if spec.op_type != "Conv":
        return None
    return Window(*(tuple(int(v) for v in part) for part in spec.window))


def input_samples_point(spec) -> StatPoint:
    """A bounded sample of the layer's input rows (dense inputs or conv patches), shared by every algorithm
    that fits a layer to its inputs (AdaRound, NUQ's output-aware assignment)."""
    window = _window(spec)
    return StatPoint(spec.input, ("input_samples", window),
                     lambda: InputSamples(window, layer_seed(f"{spec.input}{window}")))


def layer_input_rows(ctx: RecordContext, spec) -> np.ndarray | None:
    """The sampled input rows as the quantized layer reads them: divided by the ``dmq_balancer`` factors when
    the layer is balanced (its weight is then multiplied by them)."""
    rows = ctx.stats[input_samples_point(spec)].rows
    rec = ctx.records[spec.name]
    if rows is not None and rec.dmq_factor:
        s = np.asarray(rec.dmq_factor, np.float32)
        rows = rows / (np.repeat(s, rows.shape[1] // s.size) if spec.op_type == "Conv" else s)
    return rows


def learn_layer(weight: np.ndarray, params: QuantParams, spec, rows: np.ndarray, options: AdaRoundOptions,
                quantized_rows: np.ndarray | None = None) -> np.ndarray:
    """Integer codes of a Conv (out, in / groups, kh, kw) or dense (``weight_axis`` = outputs) weight."""
    if spec.op_type == "Conv":
        g = spec.groups
        w = weight.reshape(g, weight.shape[0] // g, -1)
        scale = np.broadcast_to(params.scale.astype(np.float32).reshape(-1), (weight.shape[0],)).reshape(g, -1, 1)
        return learn_rounding(w, scale, rows, params.qmin, params.qmax, options, quantized_rows).reshape(weight.shape)
    w = np.moveaxis(weight, spec.weight_axis, 0)
    scale = np.broadcast_to(params.scale.astype(np.float32).reshape(-1), (w.shape[0],)).reshape(1, -1, 1)
    codes = learn_rounding(w[None], scale, rows, params.qmin, params.qmax, options, quantized_rows)[0]
    return np.moveaxis(codes, 0, spec.weight_axis)


class AdaRound(Algorithm):
    name = "adaround"

    @staticmethod
    def _layers(plan, config):
        """Layers asking for AdaRound whose inputs it can sample: 2-D Conv (explicit pads), Gemm, 2-D MatMul."""
        out = []
        for name, spec in plan.layers.items():
            wcfg = config.layers[name].weight_quant_params
            if wcfg is None or wcfg.wts_algo != NAME or spec.weight is None or spec.weight_only:
                continue
            options = AdaRoundOptions(**wcfg.__pydantic_extra__)
            conv = spec.op_type == "Conv" and spec.window is not None
            dense = spec.op_type in ("Gemm", "MatMul") and spec.weight_axis is not None
            if (conv or dense) and options.num_iteration > 0:
                out.append((spec, options))
        return out

    def points(self, plan, config):
        return [input_samples_point(spec) for spec, _ in self._layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        for spec, options in self._layers(ctx.plan, ctx.config):
            wp = ctx.weight_params.get(spec.name)
            rec = ctx.records[spec.name]
            rows = layer_input_rows(ctx, spec)
            if wp is None or rows is None:
                continue
            weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32), rec, spec)
            quantized = None
            if options.quantized_input:  # the rows as the deployed layer reads them
                bits = ctx.plan.sites[ctx.plan.input_site[spec.name]].act.get("num_bits", 8)
                quantized = QuantParams(np.asarray(rec.scale_d, np.float32), np.asarray(rec.offset_d, np.int32),
                                        bits).fake_quant(rows)
            codes = learn_layer(weight, wp, spec, rows, options, quantized)
            rec.ada_flip = rounding_flips(weight, wp, codes)
