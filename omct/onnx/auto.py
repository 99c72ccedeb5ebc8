"""``omct.onnx.accuracy_based_auto_calibration``: AMCT's accuracy-based automatic quantization for ONNX models."""

from __future__ import annotations

import os
from pathlib import Path

from omct.analysis.metrics import Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.flow import AutoTarget, run_auto_calibration
from omct.auto.search import SearchResult
from omct.auto.strategy import SearchStrategy
from omct.formats.config import load_config
from omct.graph.model_io import input_files
from omct.onnx.api import CalibrationSession, prepare
from omct.workflow import write_modified_model


def accuracy_based_auto_calibration(model_file: str | os.PathLike, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike, record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, strategy: str | SearchStrategy = "BinarySearch",
                                    sensitivity: str | Sensitivity = "CosineSimilarity",
                                    ranking_memory_mb: float = 256) -> SearchResult:
    """Quantize ``model_file`` with as many layers of ``config_file`` as the evaluator's metric allows.

    Calibrates once (``model_evaluator.calibration`` gets a ``CalibrationSession``), evaluates the fully quantized
    model (``evaluate`` gets model paths: the float model first, then fake-quant models), and if it falls short
    ranks the layers by sensitivity on the calibration inputs (kept in memory up to ``ranking_memory_mb``) and
    lets ``strategy`` return the most sensitive ones to float. Writes into ``save_dir``:
    ``ranking_information.json``, ``final_config.json``, ``search_record.json`` and
    ``{model}_fake_quant_model.onnx`` / ``{model}_deploy_model.onnx``.
    """

    def start(modified: Path):
        prepared = prepare(model_file, load_config(config_file))
        write_modified_model(load_config(config_file), config_file, prepared, modified, record_file, model_file)
        return prepared, CalibrationSession(modified)

    target = AutoTarget(original=str(model_file), start=start, as_evaluated=str, feeds=lambda _prepared, kept: kept,
                        prefix=Path(model_file).stem, inputs=input_files("model_file", model_file))
    return run_auto_calibration(target, model_evaluator, config_file, record_file, save_dir, strategy, sensitivity,
                                ranking_memory_mb)
