"""``omct.onnx.accuracy_based_auto_calibration`` and ``auto_nuq``: AMCT's automatic searches for ONNX models."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from omct.analysis.metrics import Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.flow import AutoTarget, run_auto_calibration
from omct.auto.nuq import AutoNuqEvaluatorBase, NuqSearchResult, NuqTarget, run_auto_nuq
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


@contextmanager
def _session_for(path: Path, session: CalibrationSession):
    """While the evaluator calibrates: ``onnxruntime.InferenceSession(path)`` returns ``session`` (AMCT's auto_nuq
    calibrates by running ``eval_model`` on the calibration model); any other file opens as usual."""
    import onnxruntime as ort

    real = ort.InferenceSession
    wanted = os.path.realpath(path)

    def open_session(path_or_bytes, *args, **kwargs):
        if isinstance(path_or_bytes, str | os.PathLike) and os.path.realpath(path_or_bytes) == wanted:
            return session
        return real(path_or_bytes, *args, **kwargs)

    ort.InferenceSession = open_session
    try:
        yield
    finally:
        ort.InferenceSession = real


def auto_nuq(model_file: str | os.PathLike, nuq_evaluator: AutoNuqEvaluatorBase, config_file: str | os.PathLike,
             record_file: str | os.PathLike, save_dir: str | os.PathLike, ranking_memory_mb: float = 256) -> NuqSearchResult:
    """AMCT's automatic NUQ: the smallest per-layer NUQ steps whose fake-quant model ``is_satisfied``.

    ``eval_model(model_file, None, batch_num)`` gets ONNX file paths: the float model, once the calibration model
    (open it with ``onnxruntime.InferenceSession``: omct hands back a ``CalibrationSession``, run ``batch_num``
    batches), then fake-quant trials. At most ``2 * ceil(log2 N) + 4`` calls for N layers that can take NUQ.
    Writes ``record_file`` and into ``save_dir``: ``final_config.json``, ``nuq_search_record.json`` and
    ``{model}_fake_quant_model.onnx`` / ``{model}_deploy_model.onnx``."""
    modified: dict[str, Path] = {}

    def start(config_for, modified_file: Path, calibration_record: Path):
        prepared = prepare(model_file, load_config(config_file))
        write_modified_model(config_for(prepared), config_file, prepared, modified_file, calibration_record, model_file)
        modified["path"] = modified_file
        return prepared, CalibrationSession(modified_file)

    def calibrate(session: CalibrationSession, run) -> None:
        with _session_for(modified["path"], session):
            run(str(modified["path"]))

    target = NuqTarget(original=str(model_file), start=start, calibrate=calibrate, as_evaluated=str,
                       feeds=lambda _prepared, kept: kept, prefix=Path(model_file).stem,
                       inputs=input_files("model_file", model_file))
    return run_auto_nuq(target, nuq_evaluator, config_file, record_file, save_dir, ranking_memory_mb)
