"""omct: an open model compression toolkit with AMCT's API, for ONNX Runtime and PyTorch."""

__version__ = "0.1.0"

from omct.errors import OmctError  # noqa: E402
from omct.ui import set_quiet  # noqa: E402

__all__ = ["OmctError", "__version__", "set_quiet"]
