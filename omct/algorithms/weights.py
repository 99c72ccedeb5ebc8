"""Weight quantization: the layer's weight algorithm (ARQ, MSE clip) per output channel or per tensor; with
``nuq_quantize``, ARQ's INT8 scales and then the levels NUQ keeps, weighted by each input channel's mean
square (collected in the calibration pass). A layer where NUQ would not make the weights smaller than INT8
(few weights per output channel) keeps uniform INT8 weights, with a log line."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core import nuq
from omct.core.params import QuantParams
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.graph.export import layer_float_weight
from omct.ui import logger


def _importance_point(spec) -> StatPoint:
    axis = spec.input_channel_axis
    return StatPoint(spec.input, ("channel_mean_squares", axis), lambda: nuq.ChannelMeanSquares(axis))


def _nuq_layers(plan, config):
    out = []
    for name, spec in plan.layers.items():
        wcfg = config.layers[name].weight_quant_params if name in config.layers else None
        if spec.weight is not None and wcfg is not None and wcfg.wts_algo == "nuq_quantize":
            out.append(spec)
    return out


class WeightQuantization(Algorithm):
    name = "weight_quantization"

    def points(self, plan, config):
        return [_importance_point(s) for s in _nuq_layers(plan, config) if not s.weight_only]

    def apply(self, ctx: RecordContext) -> None:
        nuq_names = {s.name for s in _nuq_layers(ctx.plan, ctx.config)}
        for name, spec in ctx.plan.layers.items():
            if spec.weight is None:
                continue
            wcfg = ctx.config.layers[name].weight_quant_params
            algo = WEIGHT_QUANTIZERS[wcfg.wts_algo if wcfg else "arq_quantize"]
            axis = spec.weight_axis if (wcfg is None or wcfg.channel_wise) else None
            weight = layer_float_weight(ctx.weight_of(spec.weight), ctx.records[name], spec)
            wp = algo(weight, wcfg.num_bits if wcfg else 8, axis)
            rec = ctx.records[name]
            options = wcfg.__pydantic_extra__ if name in nuq_names else {}
            if name in nuq_names and not nuq.worthwhile(weight.shape, axis, options["num_steps"], options["num_tables"]):
                per = weight.size // (weight.shape[axis] if axis is not None else 1)
                logger.info("layer '%s' keeps uniform INT8 weights: with %d weights per output channel, NUQ-%d level "
                            "tables would not make it smaller", name, per, options["num_steps"])
            elif name in nuq_names:
                importance = None if spec.weight_only else ctx.stats[_importance_point(spec)].mean
                scale, levels = nuq.fit(weight, wp.scale, axis, spec.weight_in_axis, options["num_steps"],
                                        options["num_of_iteration"], importance, options["num_tables"])
                wp = QuantParams(np.asarray(scale, np.float32), wp.offset, wp.num_bits, wp.axis)
                rec.nuq_levels = [int(v) for v in np.ravel(levels)]  # one row per weight scale
            ctx.weight_params[name] = wp
            rec.scale_w = [float(s) for s in np.ravel(wp.scale)]
            rec.offset_w = [0] * len(rec.scale_w)
