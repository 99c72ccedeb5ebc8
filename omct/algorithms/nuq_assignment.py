"""NUQ's output-aware assignment (omct): once the weight quantization has fixed a NUQ layer's scales and level
tables, each weight takes one of the two levels around it, chosen GPTQ's way (``core.gptq``) so that the
layer's output error is small, not each weight's own. The layer's input second moment ``H`` comes from the
bounded sample of its calibration inputs that AdaRound also uses (``core.adaround.InputSamples``: at most
8 MiB and 4096 rows per layer). Stored as the weights that take the other level (the record's ``ada_flip``),
which ``graph.export.layer_weight_codes`` applies for every exported model and for bias correction.

Cost per layer with ``d`` inputs per output (Cin * kh * kw) and ``c`` output channels: ``O(c d^2 + d^3)``
flops and about ``4 d^2`` float64 values at once (0.7 GB at d = 4608, ResNet-18's widest convolutions), one
layer at a time."""

from __future__ import annotations

import numpy as np

from omct.algorithms.adaround import input_samples_point, layer_input_rows
from omct.algorithms.base import Algorithm, RecordContext
from omct.core import nuq
from omct.graph.export import layer_float_weight


def _layers(plan, config):
    """Channel-wise NUQ layers asking for the output-aware assignment whose inputs can be sampled: 2-D Conv of
    one group (explicit pads), Gemm, MatMul with a 2-D weight."""
    out = []
    for name, spec in plan.layers.items():
        wcfg = config.layers[name].weight_quant_params if name in config.layers else None
        if (wcfg is None or wcfg.wts_algo != "nuq_quantize" or spec.weight is None or spec.weight_only
                or not wcfg.channel_wise or not wcfg.__pydantic_extra__.get("output_aware", False)):
            continue
        conv = spec.op_type == "Conv" and spec.window is not None and spec.groups == 1
        dense = spec.op_type in ("Gemm", "MatMul") and spec.weight_axis is not None
        if conv or dense:
            out.append(spec)
    return out


class NuqAssignment(Algorithm):
    name = "nuq_assignment"

    def points(self, plan, config):
        return [input_samples_point(spec) for spec in _layers(plan, config)]

    def apply(self, ctx: RecordContext) -> None:
        for spec in _layers(ctx.plan, ctx.config):
            rec, wp = ctx.records[spec.name], ctx.weight_params.get(spec.name)
            rows = layer_input_rows(ctx, spec)
            if not rec.nuq_levels or wp is None or wp.axis is None or rows is None:
                continue  # kept uniform (NUQ would not make it smaller), or no input seen
            rows = rows.astype(np.float64)
            h = rows.T @ rows / len(rows)
            weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32), rec, spec)
            rec.ada_flip = nuq.assign_output_aware(weight, wp.scale, wp.axis, rec.nuq_levels, h)
