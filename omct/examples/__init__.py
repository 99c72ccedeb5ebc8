"""The bundled example: a digits CNN as ONNX with its calibration and test data (`omct demo`)."""

from pathlib import Path

EXAMPLE_DIR = Path(__file__).resolve().parent
DIGITS_MODEL = EXAMPLE_DIR / "digits_cnn.onnx"
DIGITS_DATA = EXAMPLE_DIR / "digits_data.npz"
