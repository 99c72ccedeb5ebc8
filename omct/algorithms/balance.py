"""``dmq_balancer`` (AMCT's name; per layer ``dmq_balancer_param``: the migration strength): per input channel
factors from the layer's calibration inputs and its weight, stored in the record (``dmq_factor``). Later
algorithms and export quantize the balanced weight (``graph.export.layer_float_weight``); the layer's input is
divided by the factors in front of its own quantization, whose range is the min-max of the balanced input
(exact from the per-channel ranges: no second pass over the data)."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.balance import ChannelRange, balance_factors
from omct.core.params import params_from_range


def _point(spec) -> StatPoint:
    axis = spec.input_channel_axis
    return StatPoint(spec.input, ("channel_range", axis), lambda: ChannelRange(axis))


def balanced_layers(plan, config) -> list:
    """Layers with a ``dmq_balancer_param`` that can be balanced: a 2-D Conv with one group, a Gemm or a 2-D
    MatMul, reading a quantized input (grouped convolutions mix no channels: nothing to balance against)."""
    out = []
    for name, spec in plan.layers.items():
        alpha = config.layers[name].dmq_balancer_param
        if alpha is None or spec.weight is None or spec.weight_only or name not in plan.input_site:
            continue
        if (spec.op_type == "Conv" and spec.window is not None and spec.groups == 1) or \
                (spec.op_type in ("Gemm", "MatMul") and spec.weight_axis is not None):
            out.append((spec, alpha))
    return out


class DMQBalancer(Algorithm):
    name = "dmq_balancer"

    def points(self, plan, config):
        return [_point(spec) for spec, _ in balanced_layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        for spec, alpha in balanced_layers(ctx.plan, ctx.config):
            stat = ctx.stats[_point(spec)]
            if stat.lo is None:
                continue
            weight = ctx.weight_of(spec.weight)
            w_in = np.moveaxis(weight, spec.weight_in_axis, 0).reshape(weight.shape[spec.weight_in_axis], -1)
            s = balance_factors(np.maximum(np.abs(stat.lo), np.abs(stat.hi)), np.abs(w_in).max(axis=1), alpha)
            site = ctx.plan.sites[ctx.plan.input_site[spec.name]]
            p = params_from_range(float((stat.lo / s).min()), float((stat.hi / s).max()), site.act.get("num_bits", 8),
                                  site.asymmetric)
            rec = ctx.records[spec.name]
            rec.dmq_factor = [float(v) for v in s]
            rec.scale_d, rec.offset_d = float(p.scale), int(p.offset)
