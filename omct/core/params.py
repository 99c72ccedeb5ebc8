"""Quantization parameters and AMCT's quantize / dequantize formulas.

q = clamp(round(x / s) + o, -2^(b-1), 2^(b-1) - 1) and x' = (q - o) * s, with round half to even
(the rounding of numpy and of ONNX QuantizeLinear, so simulation and deployment agree bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Scales below this become 1, as in AMCT (a constant or all-zero tensor still gets a valid scale).
MIN_SCALE = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class QuantParams:
    """Scale and offset of one tensor; per-tensor when ``axis`` is None, else one value per slice on ``axis``."""

    scale: np.ndarray
    offset: np.ndarray
    num_bits: int = 8
    axis: int | None = None

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    def _broadcast(self, values: np.ndarray, ndim: int) -> np.ndarray:
        if self.axis is None or values.ndim == 0:
            return values
        shape = [1] * ndim
        shape[self.axis] = -1
        return values.reshape(shape)

    def quantize(self, x: np.ndarray, dtype: type = np.int64) -> np.ndarray:
        """Integer codes of ``x`` (int64, or ``dtype`` when the codes fit it, inside [qmin, qmax])."""
        s = self._broadcast(self.scale.astype(np.float32), x.ndim)
        if self.num_bits > 16:  # levels beyond float32's exact integers (INT32 bias): offset added in int64
            o = self._broadcast(self.offset.astype(np.int64), x.ndim)
            q = np.round(x.astype(np.float32) / s).astype(np.int64) + o
            return np.clip(q, self.qmin, self.qmax)
        # In place in one float32 buffer (an embedding table's codes cost one table more, not four): the same
        # codes, since every level and offset is an exact float32 integer and anything beyond them is clipped.
        q = np.divide(x, s, dtype=np.float32)
        np.round(q, out=q)
        q += self._broadcast(self.offset.astype(np.float32), x.ndim)
        np.clip(q, self.qmin, self.qmax, out=q)
        return q.astype(dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        s = self._broadcast(self.scale.astype(np.float32), q.ndim)
        if self.num_bits > 16:
            o = self._broadcast(self.offset.astype(np.int64), q.ndim)
            return ((q - o) * s).astype(np.float32)
        # In float32, in place: q - o is an exact float32 integer and its float64 product with s is exact (at
        # most 17 + 24 bits), so rounding that product to float32 is what one float32 multiply gives.
        x = np.asarray(q).astype(np.float32)
        x -= self._broadcast(self.offset.astype(np.float32), q.ndim)
        x *= s
        return x

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        return self.dequantize(self.quantize(x))


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    return np.where(np.isfinite(scale) & (scale >= MIN_SCALE), scale, 1.0).astype(np.float32)


def params_from_range(lo: float, hi: float, num_bits: int = 8, asymmetric: bool = True) -> QuantParams:
    """AMCT's activation parameters for the clip range [lo, hi] (widened to include 0)."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    levels = 2**num_bits
    if asymmetric:
        scale = _safe_scale(np.array((hi - lo) / (levels - 1)))
        offset = np.round(-(2 ** (num_bits - 1)) - lo / float(scale))
        offset = np.clip(offset, -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1)
    else:
        scale = _safe_scale(np.array(max(abs(lo), abs(hi)) / (2 ** (num_bits - 1) - 1)))
        offset = np.array(0.0)
    return QuantParams(np.asarray(scale, np.float32), np.asarray(offset, np.int32), num_bits, None)


def symmetric_params(max_abs: np.ndarray, num_bits: int, axis: int | None) -> QuantParams:
    """Symmetric (offset 0) parameters for weights: s = max|w| / (2^(b-1) - 1), per slice on ``axis``."""
    scale = _safe_scale(np.asarray(max_abs, np.float64) / (2 ** (num_bits - 1) - 1))
    return QuantParams(scale, np.zeros(scale.shape, np.int32), num_bits, axis)


def candidate_params(lo: np.ndarray, hi: np.ndarray, num_bits: int, asymmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised ``params_from_range`` over arrays of candidate ranges: (scales, offsets) as float64."""
    lo = np.minimum(np.asarray(lo, np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, np.float64), 0.0)
    half = 2 ** (num_bits - 1)
    if asymmetric:
        scale = (hi - lo) / (2**num_bits - 1)
        scale = np.where(np.isfinite(scale) & (scale >= MIN_SCALE), scale, 1.0).astype(np.float32).astype(np.float64)
        offset = np.clip(np.round(-half - lo / scale), -half, half - 1)
    else:
        scale = np.maximum(np.abs(lo), np.abs(hi)) / (half - 1)
        scale = np.where(np.isfinite(scale) & (scale >= MIN_SCALE), scale, 1.0).astype(np.float32).astype(np.float64)
        offset = np.zeros_like(scale)
    return scale, offset
