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

from omct.analysis.metrics import Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.flow import AutoTarget, run_auto_calibration
from omct.auto.nuq import AutoNuqEvaluatorBase, NuqSearchResult, NuqTarget, run_auto_nuq
from omct.auto.search import SearchResult
from omct.auto.strategy import SearchStrategy
from omct.feeds import FeedCheck
from omct.formats.config import load_config
from omct.frontend import PreparedModel
from omct.pytorch.api import prepare, prepare_quantization
from omct.pytorch.calibration import CalibrationModel
from omct.pytorch.trace import as_args


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
        self._check = FeedCheck(self.session.get_inputs(), f"OnnxModule('{path}')")

    def forward(self, *args: torch.Tensor) -> Any:
        feeds = {n: a.detach().cpu().numpy() for n, a in zip(self.input_names, args, strict=False)}
        feeds = self._check.check(feeds)  # one line naming the input (e.g. a fixed batch), not ORT's traceback
        device = args[0].device if args else torch.device("cpu")
        outs = [torch.from_numpy(np.asarray(o)).to(device) for o in self.session.run(None, feeds)]
        return outs[0] if len(outs) == 1 else tuple(outs)


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

    def start(modified: Path):
        module, traced, mod = prepare_quantization(load_config(config_file), config_file, modified, record_file, model,
                                                   input_data, input_names=input_names, output_names=output_names,
                                                   dynamic_axes=dynamic_axes)
        return prepare(traced, model), CalibrationModel(module, mod, str(record_file), example=as_args(input_data))

    def feeds(prepared: PreparedModel, kept: list) -> list[dict]:  # kept: positional input arrays of each batch
        inits = {t.name for t in prepared.model.graph.initializer}
        names = [i.name for i in prepared.model.graph.input if i.name not in inits]
        return [dict(zip(names, arrays, strict=False)) for arrays in kept]

    target = AutoTarget(original=model, start=start, as_evaluated=OnnxModule, feeds=feeds, prefix="model")
    return run_auto_calibration(target, model_evaluator, config_file, record_file, save_dir, strategy, sensitivity,
                                ranking_memory_mb)


def auto_nuq(model: nn.Module, nuq_evaluator: AutoNuqEvaluatorBase, config_file: str | os.PathLike,
             record_file: str | os.PathLike, save_dir: str | os.PathLike, input_data, input_names: list[str] | None = None,
             output_names: list[str] | None = None, dynamic_axes: dict | None = None,
             ranking_memory_mb: float = 256) -> NuqSearchResult:
    """AMCT's automatic NUQ for an nn.Module: the smallest per-layer NUQ steps whose fake-quant model
    ``is_satisfied``. ``eval_model(model, None, batch_num)`` gets ``model`` first, then once the calibration
    module (run ``batch_num`` forward passes), then ``OnnxModule`` wrappers of fake-quant trials; at most
    ``2 * ceil(log2 N) + 4`` calls. Writes ``record_file`` and into ``save_dir``: ``final_config.json``,
    ``nuq_search_record.json``, ``model_fake_quant_model.onnx`` and ``model_deploy_model.onnx``."""

    def start(config_for, modified: Path, calibration_record: Path):
        module, traced, mod = prepare_quantization(load_config(config_file), config_file, modified, calibration_record,
                                                   model, input_data, config_for=config_for, input_names=input_names,
                                                   output_names=output_names, dynamic_axes=dynamic_axes)
        return prepare(traced, model), CalibrationModel(module, mod, str(calibration_record), example=as_args(input_data))

    def feeds(prepared: PreparedModel, kept: list) -> list[dict]:
        inits = {t.name for t in prepared.model.graph.initializer}
        names = [i.name for i in prepared.model.graph.input if i.name not in inits]
        return [dict(zip(names, arrays, strict=False)) for arrays in kept]

    def calibrate(module: CalibrationModel, run) -> None:
        with torch.no_grad():
            run(module)

    target = NuqTarget(original=model, start=start, calibrate=calibrate, as_evaluated=OnnxModule, feeds=feeds,
                       prefix="model")
    return run_auto_nuq(target, nuq_evaluator, config_file, record_file, save_dir, ranking_memory_mb)
