"""Input feeds checked against a model's inputs before ONNX Runtime sees them.

ONNX Runtime's own messages (``Got: 32 Expected: 1``, ``Unexpected input data type``) come as multi-line
tracebacks that do not say which input or what to pass; these checks name the input, what the model expects
and what was given, in one line. float64 arrays for float32 inputs (numpy's default dtype) are cast, with a
notice, because that is what the user meant.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from omct.errors import DataError
from omct.ui import logger

#: fewer calibration samples than this get a warning: the activation ranges then rest on a handful of values
#: per channel, and one outlier image sets the clipping for everything (AMCT's and ORT's examples use 100s)
MIN_CALIBRATION_SAMPLES = 32

#: ONNX Runtime's type strings -> numpy dtypes
ORT_DTYPES = {"tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(float16)": np.float16,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int16)": np.int16, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(uint16)": np.uint16, "tensor(bool)": np.bool_}


def shape_text(shape: Sequence) -> str:
    return "[" + ", ".join(str(d) if isinstance(d, int) and d >= 0 else str(d or "?") for d in shape) + "]"


def fixed_batch(inputs: Sequence) -> int | None:
    """The batch size every input fixes in its first dimension, or None when one of them leaves it free."""
    sizes = {i.shape[0] if i.shape and isinstance(i.shape[0], int) and i.shape[0] > 0 else None for i in inputs}
    return sizes.pop() if len(sizes) == 1 and None not in sizes else None


def batch_rows(feeds: Mapping[str, np.ndarray]) -> int:
    """Samples in a batch: the first dimension of its first array with one (0 for scalars only)."""
    return next((int(np.shape(v)[0]) for v in feeds.values() if np.ndim(v) > 0), 0)


def warn_few_samples(samples: int, batches: int, where: str) -> None:
    if 0 < samples < MIN_CALIBRATION_SAMPLES:
        logger.warning("%scalibration saw only %d sample(s) in %d batch(es): activation ranges from fewer than %d "
                       "samples rest on a few values, and one outlier sets the clipping; give more data (a few hundred "
                       "samples is usual)",
                       where, samples, batches, MIN_CALIBRATION_SAMPLES)


class FeedCheck:
    """Checks feeds against ``inputs`` (ONNX Runtime's ``get_inputs()``); ``where`` prefixes the messages."""

    def __init__(self, inputs: Sequence, where: str = ""):
        self.inputs = list(inputs)
        self.where = f"{where}: " if where else ""
        self._noticed = False

    def check(self, feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
        """The feeds as arrays ONNX Runtime takes (float64 cast to float32), or DataError naming the input."""
        names = [i.name for i in self.inputs]
        if not isinstance(feeds, Mapping):
            raise DataError(f"{self.where}feeds must be a dict of input name -> array (inputs {names}), "
                            f"got {type(feeds).__name__}")
        unknown = [k for k in feeds if k not in names]
        if unknown:
            raise DataError(f"{self.where}'{unknown[0]}' is not an input of the model; its inputs are {names}")
        out = {}
        for spec in self.inputs:
            if spec.name not in feeds:
                raise DataError(f"{self.where}no array for input '{spec.name}' (the model's inputs are {names}, "
                                f"given {list(feeds)})")
            value = np.asarray(feeds[spec.name])
            want = ORT_DTYPES.get(spec.type)
            expected = f"{np.dtype(want).name if want else spec.type} {shape_text(spec.shape)}"
            got = f"{value.dtype.name} {list(value.shape)}"
            if want is not None and value.dtype != want:
                if value.dtype == np.float64 and want in (np.float32, np.float16):
                    if not self._noticed:
                        logger.info("%sinput '%s' is float64; cast to %s as the model expects", self.where, spec.name,
                                    np.dtype(want).name)
                        self._noticed = True
                    value = value.astype(want)
                else:
                    raise DataError(f"{self.where}input '{spec.name}' expects {expected}, got {got}; convert the data "
                                    f"(e.g. array.astype(np.{np.dtype(want).name}))")
            if len(value.shape) != len(spec.shape):
                raise DataError(f"{self.where}input '{spec.name}' expects {len(spec.shape)} dimensions {expected}, "
                                f"got {len(value.shape)}: {got}")
            for axis, (d, n) in enumerate(zip(spec.shape, value.shape, strict=True)):
                if isinstance(d, int) and d > 0 and d != n:
                    hint = (" (the model's batch dimension is fixed: give batches of exactly that size, or export "
                            "the model with a dynamic batch axis)" if axis == 0 else "")
                    raise DataError(f"{self.where}input '{spec.name}' expects {expected}, got {got}: dimension {axis} "
                                    f"is {n}, not {d}{hint}")
            out[spec.name] = value
        return out
