"""AdaRound (``wts_algo: ada_quantize``): each such layer's rounding learned from a bounded sample of its
calibration inputs (``core.adaround.InputSamples``: at most 8 MiB per layer), stored in the record as the
weights that round the other way than round-to-nearest (``ada_flip``). The default's learned rounding (flip
descent on ARQ layers) keeps no sample: it reads the inputs' Gram matrix, accumulated during calibration
(``core.adaround.InputGram``: ``groups * d * d`` float64 per layer)."""

from __future__ import annotations

import numpy as np

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.bias_correction import BiasCorrection, means_point
from omct.algorithms.statistics import StatPoint
from omct.core.adaround import (
    AdaRoundOptions,
    InputGram,
    InputSamples,
    Window,
    layer_seed,
    learn_rounding,
    learn_rounding_from_terms,
    recorded_rounding,
)
from omct.core.params import QuantParams
from omct.graph.export import layer_float_weight

NAME = "ada_quantize"
#: What ``learned_rounding`` (config.json global, on by default) runs on ARQ layers: the flip descent alone.
LEARNED_ROUNDING = AdaRoundOptions(solver="flips")
#: ``learned_rounding`` skips layers whose descent would cost more than this (``out * d * d``, d the values each
#: output reads; the ResNet-18 benchmark's 128-channel 3 x 3 convolutions are over it: with them the default's PTQ
#: wall was 3.2x round-to-nearest's, without 2.3x, at -0.1 dB); ``ada_quantize`` layers have no limit.
FLIP_COST_LIMIT = 2**27


#: ``learned_rounding`` keeps no input sample for a layer whose output channels read more values than this.
FLIP_MAX_D = 2048


def _window(spec) -> Window | None:
    if spec.op_type != "Conv":
        return None
    return Window(*(tuple(int(v) for v in part) for part in spec.window))


def _cheap(spec) -> bool:
    """Whether the default's flip descent on this layer stays cheap: ``out * d * d <= FLIP_COST_LIMIT`` and
    ``d <= FLIP_MAX_D`` from the weight's shape (unknown shape: decided at ``apply`` from the weight)."""
    shape = spec.weight_shape
    if not shape or spec.weight_axis is None:
        return True
    out = int(shape[spec.weight_axis])
    size = int(np.prod(shape))
    d = size // out  # what each output row reads (a Conv: in / groups * kh * kw)
    return d <= FLIP_MAX_D and out * d * d <= FLIP_COST_LIMIT


def input_samples_point(spec, options: AdaRoundOptions | None = None) -> StatPoint:
    """A bounded sample of the layer's input rows (dense inputs or conv patches), shared by the algorithms that
    fit a layer to its rows (AdaRound, NUQ's output-aware assignment; the default's learned rounding reads
    ``input_gram_point`` instead)."""
    window = _window(spec)
    return StatPoint(spec.input, ("input_samples", window),
                     lambda: InputSamples(window, layer_seed(f"{spec.input}{window}")))


#: Input rows per calibration batch whose Gram matrix the default's learned rounding accumulates (a seeded draw).
GRAM_ROWS_PER_BATCH = 256


def input_gram_point(spec) -> StatPoint:
    """The second moments of the layer's input rows (``core.adaround.InputGram``), accumulated during calibration:
    what the default's learned rounding fits, in ``groups * d * d`` floats instead of a sample of rows."""
    window = _window(spec)
    groups = spec.groups if spec.op_type == "Conv" else 1
    rows = GRAM_ROWS_PER_BATCH
    return StatPoint(spec.input, ("input_gram", window, groups, rows, FLIP_MAX_D),
                     lambda: InputGram(window, layer_seed(f"{spec.input}{window}"), groups, rows, FLIP_MAX_D))


def _fake_quant32(x: np.ndarray, p: QuantParams) -> np.ndarray:
    """``p.fake_quant(x)`` (per-tensor) in float32 throughout: the same values, without int64 temporaries."""
    s, o = np.float32(p.scale.reshape(-1)[0]), np.float32(p.offset.reshape(-1)[0])
    q = np.round(x / s)
    q += o
    np.clip(q, p.qmin, p.qmax, out=q)
    q -= o
    q *= s
    return q


def _dmq_divisor(rec, spec, rows: np.ndarray | int | None) -> np.ndarray | None:
    """What each sampled input column (of ``rows``, or that many columns) is divided by when the layer is
    ``dmq_balancer``-balanced (None: it is not): the channel's factor, repeated over a conv patch's taps."""
    if rows is None or not rec.dmq_factor:
        return None
    d = rows if isinstance(rows, int) else rows.shape[1]
    s = np.asarray(rec.dmq_factor, np.float32)
    return np.repeat(s, d // s.size) if spec.op_type == "Conv" else s


def _grouped(weight: np.ndarray, params: QuantParams, spec) -> tuple[np.ndarray, np.ndarray]:
    """A Conv (out, in / groups, kh, kw) or dense (``weight_axis`` = outputs) weight as (groups, out / groups, d)
    and its scales as (groups, out / groups, 1): the layout ``learn_rounding`` fits."""
    if spec.op_type == "Conv":
        g = spec.groups
        w = weight.reshape(g, weight.shape[0] // g, -1)
    else:
        w = np.moveaxis(weight, spec.weight_axis, 0)[None]
    scale = np.broadcast_to(params.scale.astype(np.float32).reshape(-1), (w.shape[0] * w.shape[1],))
    return w, scale.reshape(w.shape[0], -1, 1)


def _ungrouped(codes: np.ndarray, weight: np.ndarray, spec) -> np.ndarray:
    """``_grouped``'s inverse for the codes."""
    if spec.op_type == "Conv":
        return codes.reshape(weight.shape)
    return np.moveaxis(codes[0], 0, spec.weight_axis)


def learn_layer(weight: np.ndarray, params: QuantParams, spec, rows: np.ndarray, options: AdaRoundOptions,
                quantized_rows: np.ndarray | None = None, channel_mean: np.ndarray | None = None) -> np.ndarray:
    """Integer codes of a Conv (out, in / groups, kh, kw) or dense (``weight_axis`` = outputs) weight.
    ``channel_mean``: the input's mean per channel that bias correction will use after this (None: none)."""
    w, scale = _grouped(weight, params, spec)
    center = None if channel_mean is None else np.repeat(channel_mean, rows.shape[1] // channel_mean.size)
    codes = learn_rounding(w, scale, rows, params.qmin, params.qmax, options, quantized_rows, center)
    return _ungrouped(codes, weight, spec)


def learn_layer_from_gram(weight: np.ndarray, params: QuantParams, spec, gram: InputGram, step: float | None,
                          channel_mean: np.ndarray | None = None, divisor: np.ndarray | None = None) -> np.ndarray:
    """``learn_layer`` from the input's accumulated moments (the default's learned rounding): ``step``, the input's
    quantization step (None: fit on float inputs); ``divisor``: the ``dmq_balancer`` factor of each column."""
    w, scale = _grouped(weight, params, spec)
    d = gram.sums.size
    center = None if channel_mean is None else np.repeat(channel_mean, d // channel_mean.size)
    a, b = gram.terms(w, center, step, divisor)
    return _ungrouped(learn_rounding_from_terms(w, scale, a, b, params.qmin, params.qmax), weight, spec)


class AdaRound(Algorithm):
    name = "adaround"

    @staticmethod
    def _layers(plan, config):
        """Layers asking for AdaRound whose inputs it can sample: 2-D Conv (explicit pads), Gemm, 2-D MatMul;
        with ``learned_rounding`` (global, on by default) also ARQ layers, with ``solver: flips`` (skipped at
        ``apply`` when their descent would be costly: ``FLIP_MAX_D``, ``FLIP_COST_LIMIT``)."""
        out = []
        for name, spec in plan.layers.items():
            wcfg = config.layers[name].weight_quant_params
            if wcfg is None or spec.weight is None or spec.weight_only:
                continue
            conv = spec.op_type == "Conv" and spec.window is not None
            dense = spec.op_type in ("Gemm", "MatMul") and spec.weight_axis is not None
            if not (conv or dense):
                continue
            if wcfg.wts_algo == NAME:
                options = AdaRoundOptions(**wcfg.__pydantic_extra__)
                if options.num_iteration > 0 or options.solver == "flips":
                    out.append((spec, options))
            elif wcfg.wts_algo == "arq_quantize" and config.globals.learned_rounding and _cheap(spec):
                out.append((spec, LEARNED_ROUNDING))
        return out

    def points(self, plan, config):
        corrected = {s.name for s in BiasCorrection._layers(plan, config)}
        return [p for spec, o in self._layers(plan, config)
                for p in ([input_gram_point(spec) if o is LEARNED_ROUNDING else input_samples_point(spec, o)]
                          + ([means_point(spec)] if spec.name in corrected else []))]

    def apply(self, ctx: RecordContext) -> None:
        corrected = {s.name for s in BiasCorrection._layers(ctx.plan, ctx.config)}
        # a search trial's config may ask for layers the calibration config did not sample: those round to nearest
        stats = ctx.stats.accumulators()
        for spec, options in self._layers(ctx.plan, ctx.config):
            wp = ctx.weight_params.get(spec.name)
            point = input_gram_point(spec) if options is LEARNED_ROUNDING else input_samples_point(spec, options)
            stat = stats.get((point.tensor, point.key))
            if wp is None or stat is None:
                continue
            moments = options is LEARNED_ROUNDING
            rows = None if moments else stat.rows
            if (stat.gram is None) if moments else (rows is None):
                continue
            d = stat.sums.size if moments else rows.shape[1]
            rec = ctx.records[spec.name]
            weight = layer_float_weight(ctx.weight_of(spec.weight).astype(np.float32, copy=False), rec, spec)
            if moments and weight.size * d // max(1, spec.groups) > FLIP_COST_LIMIT:
                continue  # out * d * d: the default's descent stays cheap
            div = _dmq_divisor(rec, spec, d)
            mean = _fitted_mean(ctx, spec, stats, corrected, options, d, div)
            act = None
            if options.quantized_input:  # the input as the deployed layer reads it
                act = QuantParams(np.asarray(rec.scale_d, np.float32), np.asarray(rec.offset_d, np.int32),
                                  ctx.plan.sites[ctx.plan.input_site[spec.name]].act.get("num_bits", 8))
            if moments:
                step = None if act is None else float(act.scale.reshape(-1)[0])
                codes = learn_layer_from_gram(weight, wp, spec, stat, step, mean, div)
            else:
                rows = rows if div is None else rows / div
                quantized = None if act is None else _fake_quant32(rows, act)
                codes = learn_layer(weight, wp, spec, rows, options, quantized, mean)
            rec.ada_flip, kept = recorded_rounding(weight, wp, codes)
            ctx.weight_codes[spec.name] = (rec.ada_flip, kept.astype(np.int8) if wp.num_bits <= 8 else kept)


def _fitted_mean(ctx: RecordContext, spec, stats: dict, corrected: set, options: AdaRoundOptions, d: int,
                 div: np.ndarray | None) -> np.ndarray | None:
    """The per-channel input mean the rounding is fitted around (float32), or None: bias correction, which runs
    after, removes ``(Wq - W) E[x]``, so the rounding fits what it leaves; a balanced layer (``div``) reads its
    input divided by the ``dmq_balancer`` factors."""
    mp = means_point(spec)
    if spec.name not in corrected or not options.center or (mp.tensor, mp.key) not in stats:
        return None
    mean = stats[(mp.tensor, mp.key)].mean
    taps = int(np.prod(_window(spec).kernel)) if spec.op_type == "Conv" else 1
    if mean is None or mean.size * taps != d:
        return None
    if div is not None:
        mean = mean / np.asarray(ctx.records[spec.name].dmq_factor, np.float32)
    return np.asarray(mean, np.float32)


def layer_gram_terms(ctx: RecordContext, spec, gram: InputGram, weight: np.ndarray,
                     options: AdaRoundOptions = LEARNED_ROUNDING) -> tuple[np.ndarray, np.ndarray | None]:
    """``flip_descent``'s ``A`` and ``B`` for a layer's float ``weight`` (as ``layer_float_weight`` gives it) from
    its accumulated input moments, the inputs taken as the default's learned rounding takes them (``apply``): as
    the deployed layer reads them (quantized with the layer's input step, divided by ``dmq_balancer`` factors) and
    minus their mean where bias correction runs after. For other weight grids on the same layer (NUQ's levels,
    ``algorithms.nuq_assignment``): the same error, so the same rounding optimisation."""
    rec = ctx.records[spec.name]
    w, _ = _grouped(np.asarray(weight, np.float32), QuantParams(np.ones(1, np.float32), np.zeros(1, np.int32), 8),
                    spec)
    d = gram.sums.size
    corrected = {s.name for s in BiasCorrection._layers(ctx.plan, ctx.config)}
    div = _dmq_divisor(rec, spec, d)
    mean = _fitted_mean(ctx, spec, ctx.stats.accumulators(), corrected, options, d, div)
    center = None if mean is None else np.repeat(np.asarray(mean, np.float32), d // mean.size)
    step = None
    if options.quantized_input and rec.scale_d:
        step = float(np.asarray(rec.scale_d, np.float32).reshape(-1)[0])
    return gram.terms(w, center, step, div)
