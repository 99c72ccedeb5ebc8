"""Rebuild the bundled example shipped in omct/examples/: a small CNN trained on scikit-learn's digits.

    python examples/build_example.py

Writes omct/examples/digits_cnn.onnx and omct/examples/digits_data.npz (calibration and test images).
"""

import sys
from pathlib import Path

import numpy as np
import torch

from omct.examples import DIGITS_DATA, DIGITS_MODEL

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the model zoo lives with the tests
import zoo  # noqa: E402

torch.manual_seed(0)
data = zoo.load_digits(16)
model = zoo.build("small_cnn", data, DIGITS_MODEL, epochs=20, width=64)  # wide enough that INT8 pays off
np.savez_compressed(DIGITS_DATA, calibration=data.x_train[:256], test_x=data.x_test, test_y=data.y_test)
print(f"torch accuracy {zoo.accuracy_torch(model, data.x_test, data.y_test):.4f}; wrote {DIGITS_MODEL} and {DIGITS_DATA}")
