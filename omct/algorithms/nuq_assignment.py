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
one ``H`` per group (depthwise 3x3: 9 x 9 per channel), fitted group by group."""

from __future__ import annotations

import numpy as np

from omct.algorithms.adaround import input_samples_point, layer_input_rows
from omct.algorithms.base import Algorithm, RecordContext
from omct.core import gptq, nuq
from omct.graph.export import layer_float_weight

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
        for spec in _layers(ctx.plan, ctx.config):
            rec, wp = ctx.records[spec.name], ctx.weight_params.get(spec.name)
            rows = layer_input_rows(ctx, spec)
            if not rec.nuq_levels or wp is None or wp.axis is None or rows is None or len(rows) < 2:
                continue  # kept uniform (NUQ would not make it smaller), or no input seen
            weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32), rec, spec)
            groups = spec.groups if spec.op_type == "Conv" else 1
            rec.ada_flip = choose_flips(weight, wp.scale, wp.axis, rec.nuq_levels, rows, groups)


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
