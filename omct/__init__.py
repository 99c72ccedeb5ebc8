"""omct: an open model compression toolkit with AMCT's API, for ONNX Runtime and PyTorch."""

from omct._version import __version__
from omct.errors import OmctError
from omct.ui import set_quiet

__all__ = ["OmctError", "__version__", "set_quiet"]
