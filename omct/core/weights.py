"""Weight and bias quantization: ARQ (AMCT's max-abs) and an MSE-optimal clipping search, and their registry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from omct.core.adaround import AdaRoundOptions
from omct.core.nuq import ALLOWED_STEPS, DEFAULT_TABLES
from omct.core.options import AlgorithmOptions, CfgPlacement, option
from omct.core.params import QuantParams, symmetric_params

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _per_slice(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``w`` as a 2-D array with one row per slice on ``axis`` (one row in all when per-tensor)."""
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def arq(weight: np.ndarray, num_bits: int = 8, axis: int | None = 0) -> QuantParams:
    """AMCT's ARQ: symmetric, scale from the max |w| of each output channel (or of the whole tensor)."""
    rows = _per_slice(np.asarray(weight), axis)
    # max |w| as max(max w, -min w): exact in the weight's own dtype, and no weight-sized temporaries
    max_abs = np.maximum(rows.max(axis=1), -rows.min(axis=1)).astype(np.float64)
    return symmetric_params(max_abs if axis is not None else max_abs[0], num_bits, axis)


def mse_clip(weight: np.ndarray, num_bits: int = 8, axis: int | None = 0, num_candidates: int = 100) -> QuantParams:
    """Symmetric weights clipped at the fraction of max |w| (per channel) with the least squared error."""
    rows = _per_slice(np.asarray(weight, np.float64), axis)
    max_abs = np.abs(rows).max(axis=1)
    qmax = 2 ** (num_bits - 1) - 1
    best_err = np.full(rows.shape[0], np.inf)
    best = max_abs.copy()
    for ratio in np.linspace(1.0, 0.3, num_candidates):
        clip = max_abs * ratio
        s = np.where(clip > 0, clip / qmax, 1.0)[:, None]
        err = ((np.clip(np.round(rows / s), -qmax - 1, qmax) * s - rows) ** 2).sum(axis=1)
        better = err < best_err
        best_err[better], best[better] = err[better], clip[better]
    return symmetric_params(best if axis is not None else best[0], num_bits, axis)


@dataclass(frozen=True)
class WeightQuantizer:
    """A registry entry: the quantizing function and its ``Options`` (options of its own, if any, and its
    .cfg placement). Called as ``quantizer(weight, num_bits, axis)``."""

    name: str
    quantize: Callable[..., QuantParams]
    Options: type[AlgorithmOptions]

    def __call__(self, weight: np.ndarray, num_bits: int = 8, axis: int | None = 0, **options) -> QuantParams:
        return self.quantize(weight, num_bits, axis, **self.Options(**options).as_dict())


@dataclass(frozen=True)
class ARQOptions(AlgorithmOptions):
    cfg = CfgPlacement("arq_quantize", 13, "ARQuantize", shared=(("channel_wise", 1), ("quant_bits", 10)))


@dataclass(frozen=True)
class MSEClipOptions(AlgorithmOptions):
    cfg = CfgPlacement("mse_clip_quantize", 1000, "MSEClipQuantize", shared=(("channel_wise", 1), ("quant_bits", 10)))


@dataclass(frozen=True)
class NUQOptions(AlgorithmOptions):
    """Non-uniform quantization (``omct.core.nuq``): ARQ's INT8 scales, then ``num_steps`` of the 256 levels.
    In a .cfg it sits in AMCT's ``nuq_config { nuq_quantize { ... } }`` or in a layer's calibration_config."""

    num_steps: int = option(32, cfg=1, choices=ALLOWED_STEPS, help="INT8 levels each layer keeps")
    num_of_iteration: int = option(1, cfg=2, ge=0, le=10, help="refinement steps (scale refit, levels reselected)")
    output_aware: bool = option(True, cfg=1000, help="assign weights to the levels GPTQ's way with the layer's "
                                "input second moment (omct)")
    num_tables: int = option(DEFAULT_TABLES, cfg=1001, ge=0, le=256, help="distinct level tables per layer, shared "
                             "by its channels (0: one per output channel; omct)")
    allocate: bool = option(True, cfg=1002, help="spend the layers' table bytes where the measured output error "
                            "drops most per byte, not by a fixed rule (needs output_aware; omct)")
    cfg = CfgPlacement("nuq_quantize", 1013, "NUQuantize", shared=(("channel_wise", 3), ("quant_bits", 10)))


def nuq_uniform_start(weight: np.ndarray, num_bits: int = 8, axis: int | None = 0, num_steps: int = 32,
                      num_of_iteration: int = 1, output_aware: bool = True,
                      num_tables: int = DEFAULT_TABLES, allocate: bool = True) -> QuantParams:
    """NUQ's uniform stage (ARQ); the levels are chosen by the weight algorithm with the input statistics (and,
    ``output_aware``, the weights assigned to them by ``omct.algorithms.nuq_assignment``)."""
    return arq(weight, num_bits, axis)


def ada_scale(weight: np.ndarray, num_bits: int = 8, axis: int | None = 0, **_options) -> QuantParams:
    """AdaRound's scale is ARQ's; its options steer the rounding, learned later from the layer's inputs
    (``omct.algorithms.adaround``)."""
    return arq(weight, num_bits, axis)


#: The weight algorithms by config.json name (``wts_algo``). Register a new one with one entry here.
WEIGHT_QUANTIZERS: dict[str, WeightQuantizer] = {q.name: q for q in (
    WeightQuantizer("arq_quantize", arq, ARQOptions),
    WeightQuantizer("mse_clip", mse_clip, MSEClipOptions),
    WeightQuantizer("nuq_quantize", nuq_uniform_start, NUQOptions),
    WeightQuantizer("ada_quantize", ada_scale, AdaRoundOptions),
)}


def quantize_bias(bias: np.ndarray, weight_scale: np.ndarray, act_scale: float) -> np.ndarray:
    """INT32 bias ``round(b / (s_w * s_d))``; raises OverflowError (never wraps) when it does not fit."""
    scale = np.asarray(weight_scale, np.float64) * float(act_scale)
    q = np.round(np.asarray(bias, np.float64) / scale)
    if np.any(q > INT32_MAX) or np.any(q < INT32_MIN):
        worst = int(np.argmax(np.abs(q)))
        raise OverflowError(
            f"bias[{worst}] = {float(np.ravel(bias)[worst]):.4g} needs {abs(q.ravel()[worst]):.3g} steps of "
            f"{float(np.ravel(scale)[worst] if np.ndim(scale) else scale):.3g}, beyond INT32"
        )
    return q.astype(np.int32)
