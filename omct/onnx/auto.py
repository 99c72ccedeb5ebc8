"""``omct.onnx.accuracy_based_auto_calibration``: AMCT's accuracy-based automatic quantization for ONNX models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from omct.analysis import analyze
from omct.analysis.metrics import Sensitivity
from omct.auto.build import InputKeeper, TrialBuilder
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.search import SearchResult, check_evaluator, measure_original, search
from omct.auto.strategy import SearchStrategy
from omct.errors import CalibrationError
from omct.fileio import check_outputs
from omct.formats.config import load_config
from omct.graph.model_io import input_files, output_files
from omct.onnx.api import CalibrationSession, quantizable_graph, quantize_model
from omct.ui import logger


class RecordingSession(CalibrationSession):
    """A CalibrationSession that also keeps the input feeds (up to ``limit_bytes``) for the sensitivity ranking."""

    def __init__(self, *args: Any, limit_bytes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.inputs = InputKeeper(limit_bytes)

    def run(self, output_names, input_feed, run_options=None):
        if not self.complete:
            self.inputs.offer(sum(np.asarray(v).nbytes for v in input_feed.values()),
                              lambda: {k: np.array(v, copy=True) for k, v in input_feed.items()})
        return super().run(output_names, input_feed, run_options)


def calibrate_checked(evaluator: AutoCalibrationEvaluatorBase, model: Any) -> None:
    """Run the evaluator's calibration on ``model`` (a frontend's calibration object) and check it finished."""
    evaluator.calibration(model)
    if not model.complete:
        raise CalibrationError(f"evaluator.calibration() ran {model.batches_seen} of batch_num={model.batch_num} "
                               "batches; it must run at least batch_num batches through the model it is given")


def auto_outputs(save_dir: Path, prefix: str, record_file: str | os.PathLike) -> dict[str, Path | str | os.PathLike]:
    """Every file the automatic search writes (record, save_dir's results and work files), for ``check_outputs``."""
    outs: dict[str, Path | str | os.PathLike] = {"record_file": record_file}
    names = ["ranking_information.json", "final_config.json", "search_record.json", "work/trial_config.json",
             "work/trial_pending_record.txt"]
    models = ["work/modified.onnx", "work/trial_modified.onnx"] + [
        f"{p}_{kind}_model.onnx" for p in (prefix, "work/trial", "work/all_quantized") for kind in ("fake_quant", "deploy")]
    outs.update({f"save_dir's {n}": save_dir / n for n in names})
    for m in models:
        outs.update(output_files(f"save_dir's {m}", save_dir / m))
    return outs


def accuracy_based_auto_calibration(model_file: str | os.PathLike, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike, record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, strategy: str | SearchStrategy = "BinarySearch",
                                    sensitivity: str | Sensitivity = "CosineSimilarity",
                                    ranking_memory_mb: float = 256) -> SearchResult:
    """Quantize ``model_file`` with as many layers of ``config_file`` as the evaluator's metric allows.

    Calibrates once (``model_evaluator.calibration``), evaluates the fully quantized model, and if it falls
    short ranks the layers by sensitivity on the calibration inputs (kept in memory up to
    ``ranking_memory_mb``) and lets ``strategy`` return the most sensitive ones to float. Writes into
    ``save_dir``: ``ranking_information.json``, ``final_config.json``, ``search_record.json`` and
    ``{model}_fake_quant_model.onnx`` / ``{model}_deploy_model.onnx``.
    """
    check_evaluator(model_evaluator)
    save_dir = Path(save_dir)
    check_outputs({**input_files("model_file", model_file), "config_file": config_file},
                  auto_outputs(save_dir, Path(model_file).stem, record_file))
    work = save_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(config_file)
    original = measure_original(model_evaluator, str(model_file))

    modified = work / "modified.onnx"
    quantize_model(config_file, model_file, modified, record_file)
    session = RecordingSession(modified, limit_bytes=int(ranking_memory_mb * 2**20))
    calibrate_checked(model_evaluator, session)
    session.inputs.report(session.batch_num, ranking_memory_mb)

    norm, layers = quantizable_graph(model_file, config)

    build = TrialBuilder(config, norm, layers, modified, Path(record_file), work).build

    def evaluate_float_layers(float_layers: set[str]) -> Any:
        return model_evaluator.evaluate(str(build(float_layers, work / "trial")))

    def rank(sens: Sensitivity) -> list[tuple[str, float]]:
        quant = build(set(), work / "all_quantized")
        return analyze(model_file, quant, session.inputs.kept, batch_count=len(session.inputs.kept)).ranking(sens)

    result = search(model_evaluator, original, config, save_dir, evaluate_float_layers, rank, strategy, sensitivity)
    build(set(result.float_layers), save_dir / Path(model_file).stem)
    logger.info("wrote %s_fake_quant_model.onnx and _deploy_model.onnx", save_dir / Path(model_file).stem)
    return result
