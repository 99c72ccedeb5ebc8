"""Weight quantization: the layer's weight algorithm (ARQ, MSE clip) per output channel or per tensor."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.graph.export import layer_float_weight


class WeightQuantization(Algorithm):
    name = "weight_quantization"

    def apply(self, ctx: RecordContext) -> None:
        for name, spec in ctx.plan.layers.items():
            if spec.weight is None:
                continue
            wcfg = ctx.config.layers[name].weight_quant_params
            algo = WEIGHT_QUANTIZERS[wcfg.wts_algo if wcfg else "arq_quantize"]
            axis = spec.weight_axis if (wcfg is None or wcfg.channel_wise) else None
            weight = layer_float_weight(ctx.weight_of(spec.weight), ctx.records[name], spec)
            wp = algo(weight, wcfg.num_bits if wcfg else 8, axis)
            ctx.weight_params[name] = wp
            rec = ctx.records[name]
            rec.scale_w = [float(s) for s in np.ravel(wp.scale)]
            rec.offset_w = [0] * len(rec.scale_w)
