"""The user's side of automatic quantization: AMCT's ``AutoCalibrationEvaluatorBase``."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

from omct.errors import OmctError


class AutoCalibrationEvaluatorBase(ABC):
    """Subclass it and implement ``calibration`` and ``evaluate``; override ``metric_eval`` for your own rule.

    What the methods receive:

    * ONNX frontend: ``calibration(model)`` gets a ``CalibrationSession`` (an ``onnxruntime.InferenceSession``
      look-alike); run ``batch_num`` batches through ``model.run(None, feeds)``. ``evaluate(model)`` gets the
      path (str) of an ONNX model file: the float model first, then fake-quant models; open it with
      ``onnxruntime.InferenceSession(model)``.
    * PyTorch frontend: ``calibration(model)`` gets the calibration ``nn.Module``; run ``batch_num`` forward
      passes. ``evaluate(model)`` gets an ``nn.Module``: your float model first, then fake-quant models
      that run in ONNX Runtime behind an ``nn.Module`` (tensors in, tensors out).

    ``evaluate`` returns one number, higher is better by default. The default ``metric_eval`` accepts a loss
    (original - new, or new - original when ``higher_is_better`` is False) of at most ``max_loss``.
    """

    max_loss: float = 0.01
    higher_is_better: bool = True

    @abstractmethod
    def calibration(self, model: Any) -> None:
        """Run ``batch_num`` calibration batches through ``model``."""

    @abstractmethod
    def evaluate(self, model: Any) -> float:
        """The metric of ``model`` on your validation data (one number)."""

    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]:
        """Whether ``new_metric`` is acceptable next to ``original_metric``, and the loss."""
        loss = original_metric - new_metric if self.higher_is_better else new_metric - original_metric
        return loss <= self.max_loss + 1e-9 * max(1.0, abs(original_metric)), loss  # 0.962 - 0.958 is 0.0040000000000000036


def checked_metric(value: Any, what: str) -> float:
    """``evaluate``'s result as a float, or a clear error."""
    if isinstance(value, bool) or not isinstance(value, int | float) and not hasattr(value, "__float__"):
        raise OmctError(f"evaluate() must return one number (higher is better), but for {what} it returned "
                        f"{type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise OmctError(f"evaluate() returned {number} for {what}; it must be a finite number")
    return number


def checked_verdict(value: Any) -> tuple[bool, float]:
    """``metric_eval``'s result as (ok, loss), or a clear error."""
    if not (isinstance(value, tuple | list) and len(value) == 2):
        raise OmctError(f"metric_eval() must return (ok: bool, loss: float), got {value!r}")
    ok, loss = value
    return bool(ok), float(loss)
