"""Accuracy-based automatic calibration, the flow every frontend shares.

A frontend supplies what only it knows: the float model as its users evaluate it, how to start calibration
(its prepared graph and calibration object), how a fake-quant model file is handed to ``evaluate``, and how
kept calibration inputs become ONNX Runtime feeds. Everything else is here: the float evaluation, one
calibration, trials built in memory from that calibration (no config, modified model or record is written
per trial; only the fake-quant model the evaluator reads), the sensitivity ranking, the search and the files.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omct.analysis import analyze
from omct.analysis.metrics import Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.search import SearchResult, check_evaluator, measure_original, search
from omct.auto.strategy import SearchStrategy
from omct.errors import CalibrationError
from omct.fileio import check_outputs
from omct.formats.config import load_config
from omct.frontend import PreparedModel
from omct.graph.model_io import output_files, save_model
from omct.quantize import QuantizedModel
from omct.ui import logger


@dataclass
class AutoTarget:
    """A frontend's part in the search."""

    original: Any  # what evaluate() gets for the float model
    start: Callable[[Path], tuple[PreparedModel, Any]]  # modified-model path -> (prepared graph, calibration object)
    as_evaluated: Callable[[Path], Any]  # a fake-quant model file -> what evaluate() gets
    feeds: Callable[[PreparedModel, list], list[dict]]  # kept calibration inputs -> feeds of the prepared graph
    prefix: str  # file name prefix of the final models in save_dir
    inputs: dict = field(default_factory=dict)  # argument name -> input file, which no output may overwrite


def calibrate_checked(evaluator: AutoCalibrationEvaluatorBase, model: Any) -> None:
    """Run the evaluator's calibration on ``model`` (a frontend's calibration object) and check it finished."""
    evaluator.calibration(model)
    if not model.complete:
        raise CalibrationError(f"evaluator.calibration() ran {model.batches_seen} of batch_num={model.batch_num} "
                               "batches; it must run at least batch_num batches through the model it is given")


def auto_outputs(save_dir: Path, prefix: str, record_file: str | os.PathLike) -> dict[str, Path | str | os.PathLike]:
    """Every file the automatic search writes (record, save_dir's results and work files), for ``check_outputs``."""
    outs: dict[str, Path | str | os.PathLike] = {"record_file": record_file}
    names = ["ranking_information.json", "final_config.json", "search_record.json"]
    outs.update({f"save_dir's {n}": save_dir / n for n in names})
    for m in ["work/modified.onnx", "work/trial_fake_quant_model.onnx"] + [
            f"{prefix}_{kind}_model.onnx" for kind in ("fake_quant", "deploy")]:
        outs.update(output_files(f"save_dir's {m}", save_dir / m))
    return outs


def run_auto_calibration(target: AutoTarget, evaluator: AutoCalibrationEvaluatorBase, config_file: str | os.PathLike,
                         record_file: str | os.PathLike, save_dir: str | os.PathLike, strategy: str | SearchStrategy,
                         sensitivity: str | Sensitivity, ranking_memory_mb: float) -> SearchResult:
    check_evaluator(evaluator)
    save_dir = Path(save_dir)
    check_outputs({**target.inputs, "config_file": config_file}, auto_outputs(save_dir, target.prefix, record_file))
    work = save_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(config_file)
    original = measure_original(evaluator, target.original)

    prepared, calibrating = target.start(work / "modified.onnx")
    kept = calibrating.calibration.keep_inputs_up_to(int(ranking_memory_mb * 2**20))
    calibrate_checked(evaluator, calibrating)
    kept.report(calibrating.batch_num, ranking_memory_mb)
    config = calibrating.calibration.config  # without the layers of control-flow bodies no batch ran
    quantized = QuantizedModel(prepared.model, prepared.layers, config, calibrating.calibration.records)

    def evaluate_float_layers(float_layers: set[str]) -> Any:
        path = work / "trial_fake_quant_model.onnx"
        save_model(quantized.with_float_layers(float_layers).fake_quant_model(), path)
        return evaluator.evaluate(target.as_evaluated(path))

    def rank(sens: Sensitivity) -> list[tuple[str, float]]:
        feeds = target.feeds(prepared, kept.kept)
        return analyze(prepared.model, quantized.fake_quant_model(), feeds, batch_count=len(feeds)).ranking(sens)

    # counted over the layers the fully quantized model really quantizes: not a config layer this graph keeps
    # float (a chain op between float tensors, a module the PyTorch frontend's export cannot quantize)
    result = search(evaluator, original, config, save_dir, evaluate_float_layers, rank, strategy, sensitivity,
                    quantized=list(quantized.plan.layers))
    final = quantized.with_float_layers(result.float_layers)
    final.save(save_dir / target.prefix)
    if final.all_float:
        logger.warning("wrote %s_fake_quant_model.onnx and _deploy_model.onnx: both are the float model (every layer "
                       "in float)", save_dir / target.prefix)
    else:
        logger.info("wrote %s_fake_quant_model.onnx and _deploy_model.onnx", save_dir / target.prefix)
    return result
