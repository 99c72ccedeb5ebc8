"""Implementation of ``omct.onnx``: AMCT's ONNX call sequence as thin calls into the shared workflow."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from omct.errors import ModelError
from omct.fileio import check_outputs
from omct.formats.config import QuantConfig, load_config
from omct.frontend import PreparedModel
from omct.graph.equalize import equalize
from omct.graph.model_io import input_files, load_model, output_files
from omct.graph.model_io import save_model as _save_onnx
from omct.graph.modified import read_modified
from omct.graph.normalize import NormalizeReport, default_opset, fold_batchnorm, fold_pads, normalize
from omct.graph.ops import HANDLERS, LayerSpec, Refusal, find_layers
from omct.graph.subgraphs import all_graphs
from omct.quantize import CalibratingSession, QuantizedModel, ort_session
from omct.quantize import quantize as _quantize
from omct.ui import format_table, hints, logger
from omct.workflow import save_model, write_modified_model, write_quant_config

__all__ = ["CalibrationSession", "ModelReport", "create_quant_config", "inspect_model", "prepare", "quantize",
           "quantize_model", "save_model"]


@dataclass
class ModelReport:
    """What ``inspect_model`` finds: quantizable layers, refused candidates with reasons, and basics."""

    layers: list[LayerSpec]
    refused: list[Refusal]
    opset: int
    parameters: int
    normalize: NormalizeReport

    HEADERS = ("layer", "type", "weight", "status", "integer kernel in ONNX Runtime", "NUQ")

    def rows(self) -> list[list[str]]:
        """One row per candidate: the quantizable layers (with what the runtime fuses them into and whether NUQ
        can take their weights, or why not), then the ones left in float with their reason."""
        return ([[s.name, s.op_type, s.weight or "-", "quantizable (weight-only)" if s.weight_only else "quantizable",
                  HANDLERS[s.op_type].integer_kernel, _nuq_cell(s)] for s in self.layers]
                + [[r.name, r.op_type, "-", f"float: {r.reason}", "-", "-"] for r in self.refused])

    def summary(self) -> str:
        nuq = sum(1 for s in self.layers if s.weight is not None and not s.nuq_refusal)
        return (f"opset {self.opset}, {self.parameters:,} parameters, {len(self.layers)} quantizable layers "
                f"({nuq} can take NUQ), {len(self.refused)} left in float")

    def to_dict(self) -> dict:
        return {"opset": self.opset, "parameters": self.parameters,
                "layers": [{"name": s.name, "type": s.op_type, "weight": s.weight,
                            "nuq": s.weight is not None and not s.nuq_refusal,
                            **({"nuq_reason": _nuq_cell(s)[len("no: "):]} if s.weight is None or s.nuq_refusal else {})}
                           for s in self.layers],
                "float": [{"name": r.name, "type": r.op_type, "reason": r.reason} for r in self.refused]}

    def __str__(self) -> str:  # print(amct.inspect_model(...)) reads as a table, not dataclass reprs
        return self.summary() + "\n" + format_table(list(self.HEADERS), self.rows())


def _nuq_cell(spec: LayerSpec) -> str:
    if spec.weight is None:
        return "no: it has no weight"
    if spec.nuq_refusal:
        return f"no: {spec.nuq_refusal}"
    return f"yes (omct extension: group {spec.groups})" if spec.op_type == "Conv" and spec.groups > 1 else "yes"


def _model(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else load_model(model, lazy=True)  # weights read when used


def prepare(model: str | os.PathLike | onnx.ModelProto, config: QuantConfig | None = None,
            report: NormalizeReport | None = None) -> PreparedModel:
    """The ONNX frontend's side of the contract: the normalised graph (BatchNorm folded when ``config`` says
    so) and its layers, named after the nodes; types are ONNX op types."""
    norm, rep = normalize(_model(model), in_place=not isinstance(model, onnx.ModelProto))  # a model we loaded: no copy
    if report is not None:
        report.__dict__.update(rep.__dict__)
    fold_pads(norm, rep)
    if config is not None and config.globals.do_fusion:
        fold_batchnorm(norm, set(config.globals.skip_fusion_layers), rep)
        if rep.folded:
            logger.info("folded %d BatchNormalization node(s) into convolutions", len(rep.folded))
    if config is not None and config.globals.cross_layer_equalization:
        pairs = equalize(norm)
        logger.info("cross-layer equalization: %d Conv pair(s)", len(pairs))
    layers, refused = find_layers(norm)
    desc = "the model" if isinstance(model, onnx.ModelProto) else f"'{model}'"
    return PreparedModel(norm, layers, refused, {s.name: s.op_type for s in layers}, desc,
                         {n.name for n in norm.graph.node}, set(HANDLERS))


def inspect_model(model_file: str | os.PathLike) -> ModelReport:
    report = NormalizeReport()
    prepared = prepare(model_file, report=report)
    params = sum(int(np.prod(t.dims)) for g in all_graphs(prepared.model.graph) for t in g.initializer)
    return ModelReport(prepared.layers, prepared.refused, default_opset(load_model(model_file, lazy=True)), params, report)


def create_quant_config(config_file: str | os.PathLike, model_file: str | os.PathLike, skip_layers: list[str] | None = None,
                        batch_num: int = 1, activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None,
                        updated_model: str | os.PathLike | None = None) -> None:
    """Write config.json for ``model_file``: every quantizable layer with default (or .cfg) parameters.

    With ``config_defination`` (a simplified .cfg) the arguments skip_layers, batch_num and
    activation_offset are ignored, as in AMCT. Unnamed or duplicate node names are made unique
    (``{op_type}_{index}``); pass ``updated_model`` to save the renamed model.
    """
    check_outputs({**input_files("model_file", model_file), "config_defination": config_defination},
                  {"config_file": config_file, **output_files("updated_model", updated_model)})
    report = NormalizeReport()
    prepared = prepare(model_file, report=report)
    if report.renamed:
        if updated_model:
            _save_onnx(prepared.model, updated_model)
            logger.info("named %d node(s) and saved the renamed model to %s", len(report.renamed), updated_model)
        else:
            logger.info("named %d unnamed or duplicate node(s) (e.g. %s); pass updated_model=PATH to save the "
                        "renamed model", len(report.renamed), next(iter(report.renamed.values())))
    write_quant_config(config_file, prepared, skip_layers=skip_layers, batch_num=batch_num,
                       activation_offset=activation_offset, config_defination=config_defination)


def quantize_model(config_file: str | os.PathLike, model_file: str | os.PathLike, modified_onnx_file: str | os.PathLike,
                   record_file: str | os.PathLike) -> None:
    """Write the calibration model ``modified_onnx_file``; run it with ``CalibrationSession``."""
    check_outputs({**input_files("model_file", model_file), "config_file": config_file},
                  {**output_files("modified_onnx_file", modified_onnx_file), "record_file": record_file})
    config = load_config(config_file)
    mod = write_modified_model(config, config_file, prepare(model_file, config), modified_onnx_file, record_file,
                               model_file)
    logger.info("wrote %s: %d layers to calibrate, %d activation tensors observed", modified_onnx_file,
                len(mod.plan.layers), len(mod.plan.sites))
    hints.info("now run %d batch(es) through CalibrationSession", config.batch_num)


def quantize(model: str | os.PathLike | onnx.ModelProto, config: QuantConfig, batches) -> QuantizedModel:
    """The in-memory path: calibrate ``model`` on ``batches`` (input feeds) as ``config`` says, write nothing.
    ``result.save(save_path)`` writes the fake-quant and deploy models."""
    prepared = prepare(model, config)
    return _quantize(prepared.model, prepared.layers, config, batches)


class CalibrationSession(CalibratingSession):
    """An ``onnxruntime.InferenceSession`` over the modified model that also calibrates.

    ``run`` returns exactly what the original model would; on the side it feeds the observed activations
    to the calibration. After ``batch_num`` runs the record file is complete. Every other attribute is
    the underlying InferenceSession's.
    """

    def __init__(self, modified_onnx_file: str | os.PathLike, sess_options: Any = None, providers: list | None = None,
                 **kwargs: Any):
        mod = read_modified(modified_onnx_file)
        if not mod.record_file:
            raise ModelError(f"'{modified_onnx_file}' has no record file path; write it with quantize_model")
        super().__init__(mod, mod.record_file, ort_session(modified_onnx_file, sess_options, providers, **kwargs),
                         "CalibrationSession.run")
