"""``omct.pytorch.accuracy_based_auto_calibration``: AMCT's accuracy-based automatic quantization for nn.Modules.

Calibration runs in PyTorch; the quantized candidates are fake-quant ONNX models, handed to the user's
``evaluate`` as ``OnnxModule``s (an nn.Module that runs the ONNX model in ONNX Runtime), so one evaluate
function serves the float model and every trial.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from omct.analysis import analyze
from omct.analysis.metrics import Sensitivity
from omct.auto.build import InputKeeper, TrialBuilder
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.search import SearchResult, check_evaluator, measure_original, search
from omct.auto.strategy import SearchStrategy
from omct.fileio import check_outputs
from omct.formats.config import load_config
from omct.onnx.auto import auto_outputs, calibrate_checked
from omct.pytorch.api import prepare_quantization
from omct.pytorch.calibration import CalibrationModel
from omct.ui import logger


class OnnxModule(nn.Module):
    """An ONNX model behind ``nn.Module``: positional tensors in (in the model's input order), tensors out on
    the first input's device; one output is returned as a tensor, several as a tuple."""

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.path = str(path)
        self.session = ort.InferenceSession(self.path, so, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: torch.Tensor) -> Any:
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(self.input_names, args, strict=False)}
        device = args[0].device if args else torch.device("cpu")
        outs = [torch.from_numpy(np.asarray(o)).to(device) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


class RecordingCalibrationModel(CalibrationModel):
    """A CalibrationModel that also keeps its inputs (up to ``limit_bytes``) for the sensitivity ranking."""

    def __init__(self, *args: Any, limit_bytes: int, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.inputs = InputKeeper(limit_bytes)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.complete:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.inputs.offer(sum(t.numel() * t.element_size() for t in tensors),
                              lambda: [t.detach().cpu().numpy().copy() for t in tensors])
        return super().forward(*args, **kwargs)


def accuracy_based_auto_calibration(model: nn.Module, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike, record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, input_data, input_names: list[str] | None = None,
                                    output_names: list[str] | None = None, dynamic_axes: dict | None = None,
                                    strategy: str | SearchStrategy = "BinarySearch",
                                    sensitivity: str | Sensitivity = "CosineSimilarity",
                                    ranking_memory_mb: float = 256) -> SearchResult:
    """Quantize ``model`` with as many layers of ``config_file`` as the evaluator's metric allows.

    ``model_evaluator.calibration`` gets the calibration nn.Module; ``evaluate`` gets ``model`` first, then
    ``OnnxModule`` wrappers of fake-quant models. Writes into ``save_dir``: ``ranking_information.json``,
    ``final_config.json``, ``search_record.json``, ``model_fake_quant_model.onnx`` and ``model_deploy_model.onnx``.
    """
    check_evaluator(model_evaluator)
    save_dir = Path(save_dir)
    check_outputs({"config_file": config_file}, auto_outputs(save_dir, "model", record_file))
    work = save_dir / "work"
    work.mkdir(parents=True, exist_ok=True)
    config = load_config(config_file)
    original = measure_original(model_evaluator, model)
    modified = work / "modified.onnx"
    module, traced, mod = prepare_quantization(config, config_file, modified, record_file, model, input_data,
                                               input_names=input_names, output_names=output_names,
                                               dynamic_axes=dynamic_axes)
    cal = RecordingCalibrationModel(module, mod, str(record_file), limit_bytes=int(ranking_memory_mb * 2**20))
    calibrate_checked(model_evaluator, cal)
    cal.inputs.report(cal.batch_num, ranking_memory_mb)
    build = TrialBuilder(config, traced.model, traced.layers, modified, Path(record_file), work).build
    feed_names = [i.name for i in traced.model.graph.input if i.name not in {t.name for t in traced.model.graph.initializer}]

    def evaluate_float_layers(float_layers: set[str]) -> Any:
        return model_evaluator.evaluate(OnnxModule(build(float_layers, work / "trial")))

    def rank(sens: Sensitivity) -> list[tuple[str, float]]:
        quant = build(set(), work / "all_quantized")
        feeds = [dict(zip(feed_names, arrays, strict=False)) for arrays in cal.inputs.kept]
        return analyze(traced.model, quant, feeds, batch_count=len(feeds)).ranking(sens)

    result = search(model_evaluator, original, config, save_dir, evaluate_float_layers, rank, strategy, sensitivity)
    build(set(result.float_layers), save_dir / "model")
    logger.info("wrote %s_fake_quant_model.onnx and _deploy_model.onnx", save_dir / "model")
    return result
