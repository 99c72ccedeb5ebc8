"""``accuracy_based_auto_calibration`` and ``analyze`` for TensorFlow models.

The evaluator's ``evaluate`` gets the user's model first (a Keras model as given; for a SavedModel or a frozen
graph, a callable that runs it in TensorFlow), then each trial as an ``OnnxModel``: a fake-quant ONNX model behind
the same call, ``m(x)`` on NHWC NumPy batches, returning NumPy. So one evaluate function, written as
``np.asarray(model(x))``, serves both. ``calibration`` gets the calibration model (``calibration_model(x)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from omct.analysis import analyze as _analyze
from omct.analysis.compare import AnalysisReport
from omct.analysis.metrics import Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.flow import AutoTarget, run_auto_calibration
from omct.auto.search import SearchResult
from omct.auto.strategy import SearchStrategy
from omct.feeds import FeedCheck
from omct.formats.config import load_config
from omct.frontend import PreparedModel
from omct.graph import metadata
from omct.graph.model_io import load_model
from omct.tensorflow.api import CalibrationModel, prepare, start_calibration
from omct.tensorflow.convert import load_source


class OnnxModel:
    """An ONNX model called like a Keras model: ``m(x)`` (a list for several inputs) -> NumPy (a list for several
    outputs); ``m.predict(x, batch_size=256)`` runs it in batches."""

    def __init__(self, path: str | os.PathLike):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self._inputs = self.session.get_inputs()
        self._check = FeedCheck(self._inputs, f"OnnxModel('{path}')")

    def __call__(self, x: Any) -> Any:
        arrays = list(x) if isinstance(x, (list, tuple)) and len(self._inputs) > 1 else [x]
        feeds = self._check.check({i.name: np.asarray(a) for i, a in zip(self._inputs, arrays, strict=False)})
        out = self.session.run(None, feeds)
        return out[0] if len(out) == 1 else out

    def predict(self, x: Any, batch_size: int = 256) -> Any:
        if len(self._inputs) > 1:
            return self(x)
        x = np.asarray(x)
        parts = [self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if not isinstance(parts[0], list) else [np.concatenate(p) for p in zip(*parts, strict=False)]


class TFModel:
    """A SavedModel or frozen graph called like a Keras model (what ``evaluate`` gets for the float model)."""

    def __init__(self, source) -> None:
        self.source = source

    def __call__(self, x: Any) -> Any:
        arrays = list(x) if isinstance(x, (list, tuple)) and len(self.source.inputs) > 1 else [x]
        out = self.source.run([np.asarray(a, dtype=d) for a, d in zip(arrays, self.source.dtypes, strict=False)])
        return out[0] if len(out) == 1 else out


def accuracy_based_auto_calibration(model: Any, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike, record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, *, input_names: list[str] | None = None,
                                    output_names: list[str] | None = None,
                                    strategy: str | SearchStrategy = "BinarySearch",
                                    sensitivity: str | Sensitivity = "CosineSimilarity",
                                    ranking_memory_mb: float = 256) -> SearchResult:
    """Quantize ``model`` with as many layers of ``config_file`` as the evaluator's metric allows.

    Writes into ``save_dir``: ``ranking_information.json``, ``final_config.json``, ``search_record.json``,
    ``model_fake_quant_model.onnx`` and ``model_deploy_model.onnx``. See the module docstring for what the
    evaluator gets.
    """
    keras_model = hasattr(model, "_flatten_layers")
    original = model if keras_model else TFModel(load_source(model, input_names, output_names))

    def start(modified: Path) -> tuple[PreparedModel, CalibrationModel]:
        p, calibrating = start_calibration(model, load_config(config_file), config_file, record_file, modified,
                                           input_names, output_names)
        return p.prepared, calibrating

    def feeds(_prepared: PreparedModel, kept: list) -> list[dict]:  # kept: the checked feeds of each batch
        return list(kept)

    target = AutoTarget(original=original, start=start, as_evaluated=OnnxModel, feeds=feeds, prefix="model")
    return run_auto_calibration(target, model_evaluator, config_file, record_file, save_dir, strategy, sensitivity,
                                ranking_memory_mb)


def analyze(model: Any, quant_model: str | os.PathLike, batches: Iterable, threshold: float = 0.99, *,
            input_names: list[str] | None = None, output_names: list[str] | None = None) -> AnalysisReport:
    """``omct analyze`` for a TensorFlow model: every quantized layer of ``quant_model`` (a fake-quant or deploy model
    that ``save_model`` wrote) against the float model, on ``batches`` of NHWC arrays (as ``model(x)`` takes them)."""
    quant = load_model(quant_model, "quantized model")
    fusion = json.loads(metadata.read(quant).get(metadata.FUSION, '{"do_fusion": true}'))
    p = prepare(model, None, input_names, output_names, fusion=fusion)
    names = [i.name for i in p.prepared.model.graph.input]
    feeds = []
    for b in batches:
        arrays = list(b) if isinstance(b, (list, tuple)) and len(names) > 1 else [b]
        feeds.append({n: np.asarray(a, dtype=d) for n, a, d in zip(names, arrays, p.source.dtypes, strict=False)})
    return _analyze(p.prepared.model, quant, feeds, threshold=threshold, batch_count=len(feeds))
