"""Weight and bias quantization: ARQ (AMCT's max-abs) and an MSE-optimal clipping search."""

from __future__ import annotations

import numpy as np

from omct.core.params import QuantParams, symmetric_params

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def _per_slice(w: np.ndarray, axis: int | None) -> np.ndarray:
    """``w`` as a 2-D array with one row per slice on ``axis`` (one row in all when per-tensor)."""
    if axis is None:
        return w.reshape(1, -1)
    return np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)


def arq(weight: np.ndarray, num_bits: int = 8, axis: int | None = 0) -> QuantParams:
    """AMCT's ARQ: symmetric, scale from the max |w| of each output channel (or of the whole tensor)."""
    rows = _per_slice(np.asarray(weight, np.float64), axis)
    max_abs = np.abs(rows).max(axis=1)
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


WEIGHT_QUANTIZERS = {"arq_quantize": arq, "mse_clip": mse_clip}


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
