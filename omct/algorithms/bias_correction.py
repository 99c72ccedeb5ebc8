"""Bias correction (on by default): each bias absorbs the mean shift its quantized weights cause, from the
per-channel means of the layer's input collected in the same calibration pass."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.bias_correction import ChannelMeans, correction
from omct.graph.export import layer_float_weight, layer_weight_codes


def means_point(spec) -> StatPoint:
    """The per-channel means of a layer's input (AdaRound reads them too, to fit what this leaves)."""
    axis = spec.input_channel_axis
    return StatPoint(spec.input, ("channel_means", axis), lambda: ChannelMeans(axis))


_point = means_point


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
            rec = ctx.records[spec.name]
            weight = layer_float_weight(ctx.weight_of(spec.weight), rec, spec)
            if rec.dmq_factor and mean.shape == (len(rec.dmq_factor),):
                mean = mean / np.asarray(rec.dmq_factor, np.float64)  # the balanced layer's input
            known = ctx.weight_codes.get(spec.name)
            # int32 codes (int64 beyond 16 bits): the same values dequantized, half the memory of the default int64
            codes = (known[1] if known is not None and known[0] is rec.ada_flip
                     else layer_weight_codes(weight, rec, wp, np.int32))
            quantized = wp.dequantize(codes)
            del codes  # not held through the correction
            shift = correction(weight, quantized, mean, spec.weight_axis, spec.weight_in_axis, spec.groups)
            if shift is not None and np.all(np.isfinite(shift)):
                # float32 as the record file stores it, so in-memory and file-based exports agree bit for bit
                ctx.records[spec.name].bias_correction = [float(v) for v in shift.astype(np.float32)]
