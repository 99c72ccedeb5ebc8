"""Fake quantization that trains: the quantizers a retrain model puts on activations and weights.

Forward: AMCT's formulas, ``q = clamp(round(x / s) + o, qmin, qmax)``, ``x' = (q - o) * s``, computed in the
order the fake-quant ONNX model computes them (Div, Round, Add, Clip, Sub, Mul), so that the exported model
reproduces the trained one. Backward: the rounding is a straight-through estimator (gradient 1), the clamp
passes no gradient outside the range, and the scale receives LSQ's gradient ``round(x/s) - x/s`` inside the
range and ``qmax - o`` / ``qmin - o`` at its ends (what ULQ's clip gradients are, written through autograd).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from omct.core.params import MIN_SCALE
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.errors import QuantizationError


class _RoundSTE(torch.autograd.Function):
    """Round half to even (as numpy and ONNX Round) forward; identity backward."""

    @staticmethod
    def forward(ctx, x):  # noqa: ARG004
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: ARG004
        return grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return _RoundSTE.apply(x)


def fake_quant(x: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize then dequantize ``x``; ``offset`` holds integer values (a float tensor, or 0). Per tensor
    (scalar scale and offset): one fused autograd function; per channel: plain ops with the rounding STE."""
    if scale.dim() == 0 and offset.dim() == 0:
        return _FakeQuant.apply(x, scale, offset, qmin, qmax)
    return (torch.clamp(round_ste(x / scale) + offset, qmin, qmax) - offset) * scale


class _FakeQuant(torch.autograd.Function):
    """``(clamp(round(x / s) + o, qmin, qmax) - o) * s`` with the gradients autograd would give through the
    straight-through rounding, without recording its seven element-wise ops (they cost as much as the
    convolutions of a small CNN's training step): ``dx = g`` inside the range, 0 outside;
    ``ds = sum(g * t)`` with LSQ's term ``t = round(x/s) - x/s`` inside and the clamped level ``q - o`` outside;
    ``do = -s * sum(g)`` outside. ``t`` is formed in the forward pass from what it computes anyway and saved
    instead of ``x``, so the backward pass is one multiply and a dot product, not a recomputation of the
    forward (torch.profiler, MobileNet step: the fake quantization's share fell from 1.5x to under 0.5x its
    convolutions' time)."""

    @staticmethod
    def forward(ctx, x, scale, offset, qmin, qmax):
        xs = x / scale
        q = torch.round(xs).add_(offset)
        level = q.clamp(qmin, qmax)
        inside = torch.eq(level, q, out=q)  # a float 0/1 mask: multiplying by a bool mask converts it every time
        level.sub_(offset)  # the clamped level's distance from o
        out = level * scale
        term = level.sub_(xs.mul_(inside)) if ctx.needs_input_grad[1] else None  # t, in place
        ctx.save_for_backward(inside, scale, term)
        return out

    @staticmethod
    def backward(ctx, grad):
        inside, scale, term = ctx.saved_tensors
        grad_x = grad * inside
        grad_s = grad_o = None
        if ctx.needs_input_grad[1]:
            grad_s = torch.dot(grad.reshape(-1), term.reshape(-1)).reshape(scale.shape).to(scale.dtype)
        if ctx.needs_input_grad[2]:
            grad_o = (-scale * (grad.sum() - grad_x.sum())).reshape(scale.shape).to(scale.dtype)
        return grad_x if ctx.needs_input_grad[0] else None, grad_s, grad_o, None, None


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` forward, its gradient multiplied by ``factor`` (LSQ's step-size gradient scaling)."""
    return (x - x * factor).detach() + x * factor


class ActivationULQ(nn.Module):
    """ULQ for one activation tensor: a learned clip range [clip_min, clip_max], 8-bit asymmetric.

    ``fixed_min`` pins clip_min at 0 (non-negative inputs: ReLU outputs). ``upper`` caps clip_max where the
    graph clips the tensor anyway (ReLU6). The range is initialised by IFMR over the first ``batch_num``
    batches (or from the .cfg's ``clip_max_min``); ``initialized`` is a buffer, so it travels in checkpoints.
    """

    def __init__(self, name: str, num_bits: int = 8, fixed_min: bool | None = None, upper: float | None = None):
        super().__init__()
        self.name = name  # the layer(s) named in errors
        self.num_bits = num_bits
        self.fixed_min = fixed_min
        self.upper = upper
        self.clip_max = nn.Parameter(torch.tensor(1.0))
        self.clip_min = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("min_fixed", torch.tensor(bool(fixed_min)))

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    @torch.no_grad()
    def set_range(self, lo: float, hi: float, fixed_min: bool) -> None:
        self.clip_min.fill_(0.0 if fixed_min else min(lo, 0.0))
        self.clip_max.fill_(max(hi, 0.0))
        self.min_fixed.fill_(fixed_min)
        self.initialized.fill_(True)

    def scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) of the current range, differentiable in clip_max / clip_min (offset by STE)."""
        hi = torch.clamp(self.clip_max, min=0.0)
        if self.upper is not None:
            hi = torch.clamp(hi, max=self.upper)
        # a pinned minimum still takes part (times 0): DistributedDataParallel expects every parameter used
        lo = self.clip_min * 0.0 if bool(self.min_fixed) else torch.clamp(self.clip_min, max=0.0)
        scale = (hi - lo) / (2**self.num_bits - 1)
        s = float(scale.detach())
        if not math.isfinite(s) or s < MIN_SCALE:
            lo_, hi_ = float(self.clip_min.detach()), float(self.clip_max.detach())
            raise QuantizationError(
                f"layer '{self.name}': the learned activation clip range collapsed (clip_min {lo_:.4g}, clip_max "
                f"{hi_:.4g}); lower the learning rate or the weight decay of the clip parameters, or add the layer "
                "to skip_layers")
        offset = torch.clamp(round_ste(self.qmin - lo / scale), self.qmin, self.qmax)
        return scale, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, offset = self.scale_offset()
        return fake_quant(x, scale.to(x.dtype), offset.to(x.dtype), self.qmin, self.qmax)

    def record_params(self) -> tuple[float, int]:
        """The (scale_d, offset_d) the record gets: float32 scale, integer offset, as the forward uses them."""
        with torch.no_grad():
            scale, offset = self.scale_offset()
        return float(scale.to(torch.float32)), int(offset)


class WeightQuantizer(nn.Module):
    """A weight parametrization: the module's ``weight`` is ``fake_quant(original)``; symmetric, per output
    channel (``axis``) or per tensor.

    ``arq_retrain``: the scale is max|w| / qmax of the current weights, every step (no gradient through it).
    ``ulq_retrain``: the scale is learned, initialised by MSE clipping, its gradient scaled by
    1 / sqrt(numel * qmax) as in LSQ (Esser et al.), so that it trains at the weights' pace. The parameter is its
    logarithm (``log_scale``): positive by construction, and an optimizer step changes it by a fraction of itself.
    Learned directly, a small scale crossed zero under Adam, whose step (about the learning rate, 2e-4) is of the
    order of an INT8 scale (1e-3 on the benchmark transformer's layers: training stopped with a zero scale after a
    few steps).
    """

    def __init__(self, name: str, weight: torch.Tensor, num_bits: int, axis: int | None, learned: bool):
        super().__init__()
        self.name = name
        self.num_bits = num_bits
        self.axis = axis
        self.learned = learned
        if learned:
            self.log_scale = nn.Parameter(torch.log(self._initial_scale(weight.detach()).clamp_min(MIN_SCALE)))
            per = weight.numel() // (weight.shape[axis] if axis is not None else 1)
            self.grad_factor = 1.0 / math.sqrt(per * self.qmax)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.num_bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.num_bits - 1) - 1

    def _shape(self, w: torch.Tensor) -> list[int]:
        shape = [1] * w.dim()
        if self.axis is not None:
            shape[self.axis] = -1
        return shape

    def _arq_scale(self, w: torch.Tensor) -> torch.Tensor:
        if self.axis is None:
            max_abs = w.abs().max()
        else:
            max_abs = w.abs().transpose(0, self.axis).reshape(w.shape[self.axis], -1).max(dim=1).values
        scale = max_abs / self.qmax
        return torch.where(torch.isfinite(scale) & (scale >= MIN_SCALE), scale, torch.ones_like(scale))

    def _initial_scale(self, w: torch.Tensor) -> torch.Tensor:
        """The MSE-optimal clip of the trained weights (PTQ's ``mse_clip``): at 4 bits the max-abs scale wastes
        levels on outliers, and a learned scale only has a short fine-tune to walk away from its start."""
        params = WEIGHT_QUANTIZERS["mse_clip"](w.to(torch.float32).cpu().numpy(), self.num_bits, self.axis)
        scale = torch.as_tensor(np.asarray(params.scale, np.float32).reshape(-1), device=w.device)
        return scale.reshape(()) if self.axis is None else scale

    @property
    def scale(self) -> torch.Tensor:
        """The learned scale (``ulq_retrain``), ``exp(log_scale)``."""
        return self.log_scale.exp()

    def current_scale(self, w: torch.Tensor) -> torch.Tensor:
        if not self.learned:
            return self._arq_scale(w.detach())
        log_scale = _scale_grad(self.log_scale, self.grad_factor) if self.training else self.log_scale
        scale = log_scale.exp()
        if not torch.isfinite(scale).all() or bool((scale.detach() < MIN_SCALE).any()):
            raise QuantizationError(f"layer '{self.name}': the learned weight scale became zero, infinite or NaN; "
                                    "lower the learning rate of the ulq_retrain scales or use arq_retrain")
        return scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        scale = self.current_scale(w).reshape(self._shape(w)).to(w.dtype)
        return fake_quant(w, scale, torch.zeros((), dtype=w.dtype, device=w.device), self.qmin, self.qmax)

    def record_scales(self, w: torch.Tensor) -> list[float]:
        with torch.no_grad():
            return [float(v) for v in self.current_scale(w).to(torch.float32).reshape(-1)]


class BiasQuantizer(nn.Module):
    """A bias parametrization: the bias on the INT32 grid of step ``scale_w * scale_d`` that the exported models
    use, with a straight-through gradient. The weight and input quantizers are read, not owned (their
    parameters stay where they are in the state_dict)."""

    def __init__(self, weights: WeightQuantizer, inputs: ActivationULQ, weight_of):
        super().__init__()
        self._refs = (weights, inputs, weight_of)  # a tuple: not registered as submodules

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        weights, inputs, weight_of = self._refs
        if not bool(inputs.initialized):
            return b
        with torch.no_grad():
            s_w = weights.current_scale(weight_of()).reshape(-1).to(torch.float64)
            s_d, _ = inputs.scale_offset()
            if s_w.numel() > 1 and b.numel() != s_w.numel():  # grouped ConvTranspose: scales repeat per group
                s_w = s_w.repeat(b.numel() // s_w.numel())
            step = (s_w * s_d.to(torch.float64)).to(torch.float32).to(b.dtype)
        return round_ste(b / step) * step
