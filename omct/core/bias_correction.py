"""Bias correction: quantized weights shift each output channel's mean by ``dW . E[x]``; subtracting that
from the bias removes the shift (the analytic form of the bias correction in Nagel et al., "Data-Free
Quantization", and NNCF's fast bias correction). Needs only the per-channel mean of each layer's input,
collected in the same calibration pass."""

from __future__ import annotations

import numpy as np


class ChannelMeans:
    """Streaming per-channel mean of a tensor along ``axis`` (1 for NCHW convolutions, -1 for features)."""

    def __init__(self, axis: int):
        self.axis = axis
        self.sums: np.ndarray | None = None
        self.count = 0

    def update(self, values: np.ndarray) -> None:
        x = np.asarray(values)
        axis = self.axis % x.ndim
        channels = x.shape[axis]
        lead = int(np.prod(x.shape[:axis], dtype=np.int64))
        # float32 pairwise sums along the contiguous inner axis (SIMD, accurate), float64 across the rest
        sums = x.reshape(lead, channels, -1).sum(axis=2).sum(axis=0, dtype=np.float64)
        if self.sums is None or self.sums.shape != sums.shape:
            self.sums, self.count = np.zeros_like(sums), 0
        self.sums += sums
        self.count += x.size // channels

    @property
    def mean(self) -> np.ndarray | None:
        return None if self.sums is None or self.count == 0 else self.sums / self.count


def correction(op_type: str, weight: np.ndarray, quantized: np.ndarray, mean: np.ndarray,
               weight_axis: int | None) -> np.ndarray | None:
    """Amount to add to the bias so that the layer's mean output is unchanged by weight quantization, or
    None where the shapes do not line up (the layer then keeps its plain bias)."""
    dw = quantized.astype(np.float64) - weight.astype(np.float64)
    c_in = mean.size
    if op_type == "Conv":
        out, cin_g = dw.shape[0], dw.shape[1]
        if cin_g == 0 or c_in % cin_g or out % (c_in // cin_g):
            return None
        groups = c_in // cin_g
        per = dw.reshape(out, cin_g, -1).sum(-1)
        means = mean.reshape(groups, cin_g)[np.arange(out) // (out // groups)]
        return -(per * means).sum(1)
    if op_type == "ConvTranspose":
        if dw.shape[0] != c_in:
            return None
        return -(dw.reshape(c_in, dw.shape[1], -1).sum(-1) * mean[:, None]).sum(0) if weight_axis == 1 else None
    if op_type in ("Gemm", "MatMul"):
        if weight_axis == 0 and dw.shape[1] == c_in:  # (out, in)
            return -(dw @ mean)
        if weight_axis == 1 and dw.shape[0] == c_in:  # (in, out)
            return -(mean @ dw)
    return None
