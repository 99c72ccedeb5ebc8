"""Bias correction (on by default): each bias absorbs the mean shift its quantized weights cause, from the
per-channel means of the layer's input collected in the same calibration pass."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.bias_correction import ChannelMeans, correction
from omct.graph.export import integer_weight


def _point(spec) -> StatPoint:
    axis = spec.input_channel_axis
    return StatPoint(spec.input, ("channel_means", axis), lambda: ChannelMeans(axis))


class BiasCorrection(Algorithm):
    name = "bias_correction"

    @staticmethod
    def _layers(plan, config):
        if not config.globals.bias_correction:
            return []
        return [s for s in plan.layers.values() if s.weight is not None and s.bias is not None and s.weight_in_axis is not None]

    def points(self, plan, config):
        return [_point(s) for s in self._layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        for spec in self._layers(ctx.plan, ctx.config):
            mean = ctx.stats[_point(spec)].mean
            wp = ctx.weight_params.get(spec.name)
            if mean is None or wp is None:
                continue
            weight = ctx.weight_of(spec.weight)
            quantized = wp.dequantize(integer_weight(weight, ctx.records[spec.name], wp))
            shift = correction(weight, quantized, mean, spec.weight_axis, spec.weight_in_axis, spec.groups)
            if shift is not None and np.all(np.isfinite(shift)):
                # float32 as the record file stores it, so in-memory and file-based exports agree bit for bit
                ctx.records[spec.name].bias_correction = [float(v) for v in shift.astype(np.float32)]
