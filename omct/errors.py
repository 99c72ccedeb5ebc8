"""Errors omct raises. Every message names the layer, file or key at fault and says what to do."""


class OmctError(Exception):
    """Base class of omct's errors; the command line prints these as one line."""


class ModelError(OmctError):
    """The model file is missing, unreadable, or has a shape omct cannot handle."""


class ConfigError(OmctError):
    """A config.json or simplified .cfg file (or an API argument) is invalid."""


class CalibrationError(OmctError):
    """Calibration data or the calibration run is unusable (NaN/Inf, too few batches)."""


class RecordError(OmctError):
    """The record file is missing, incomplete or does not match the model."""


class QuantizationError(OmctError):
    """A layer cannot be quantized with the requested parameters (e.g. bias overflow)."""


class OutputPathError(OmctError):
    """An output path would overwrite an input file (or another output) of the same call."""


class DataError(OmctError):
    """Input arrays that do not fit the model's inputs (name, dtype, rank or a fixed dimension)."""
