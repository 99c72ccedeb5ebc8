"""Implementation of ``omct.caffe``: AMCT's Caffe call sequence on the shared ONNX workflow, with no Caffe.

``init`` reads the prototxt and caffemodel and converts them to ONNX (``omct.caffe.convert``); calibration runs
the converted graph in ONNX Runtime through the session ``quantize_model`` returns, fed with the arrays the
user would give Caffe. ``save_model`` writes the ONNX fake-quant and deploy models and a Caffe pair whose
weights carry their quantized values (``omct.caffe.writer``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omct.caffe.convert import HELPER_TYPES, Conversion, convert
from omct.caffe.netio import load_net, write_caffemodel, write_prototxt
from omct.caffe.writer import ACTIVATION_NOTE, write_quantized_caffe
from omct.errors import ConfigError, ModelError
from omct.fileio import check_outputs
from omct.formats.config import QuantConfig, load_config
from omct.formats.record import write_pending_record
from omct.frontend import PreparedModel
from omct.graph.model_io import output_files
from omct.graph.model_io import save_model as _save_onnx
from omct.graph.modified import ModifiedModel, make_modified
from omct.graph.normalize import fold_batchnorm, normalize
from omct.graph.ops import Refusal, find_layers
from omct.graph.plan import build_plan
from omct.quantize import CalibratingSession, QuantizedModel, observed_tensors, ort_session
from omct.ui import hints, logger
from omct.workflow import check_config_against_model, quantized_from, write_quant_config

__all__ = ["CaffeGraph", "CalibrationSession", "create_quant_config", "init", "prepare", "quantize_model",
           "save_model", "set_cpu_mode", "set_gpu_mode"]

#: the Caffe types (and helper ops) config.json, skip_layer_types and override_layer_types may name
TYPE_NAMES = {"Convolution", "Deconvolution", "InnerProduct", "Pooling", "Eltwise", "Concat", "Flatten", "Reshape",
              "Permute", *HELPER_TYPES.values()}
SAVE_TYPES = ("Both", "Fakequant", "Deploy")


@dataclass
class Prepared:
    """The frontend's side of the contract plus what the Caffe writer needs."""

    prepared: PreparedModel
    conversion: Conversion
    folded: list[tuple[str, str]]  # (Convolution layer, BatchNorm node folded into it)


def prepare(net, weights_file: str | os.PathLike, config: QuantConfig | None = None,
            description: str = "the Caffe model") -> Prepared:
    """Convert ``net`` (layers with their blobs) to ONNX, fold BatchNorm + Scale into convolutions when
    ``config`` says so, and find the layers; layer names are Caffe's, types are Caffe's."""
    conversion = convert(net, str(weights_file))
    model, report = normalize(conversion.model)
    if config is not None and config.globals.do_fusion:
        fold_batchnorm(model, set(config.globals.skip_fusion_layers), report)
        if report.folded:
            logger.info("folded %d BatchNorm (+ Scale) layer(s) into convolutions", len(report.folded))
    layers, refused = find_layers(model)

    def caffe_type(name: str, op_type: str) -> str:
        return conversion.layer_types.get(name, HELPER_TYPES.get(op_type, op_type))

    kept = []
    for spec in layers:
        reason = conversion.constraints.get(spec.name)
        if reason:
            refused.append(Refusal(spec.name, caffe_type(spec.name, spec.op_type), reason))
        else:
            kept.append(spec)
    refused = [Refusal(r.name, caffe_type(r.name, r.op_type), r.reason) for r in refused]
    prepared = PreparedModel(model, kept, refused, {s.name: caffe_type(s.name, s.op_type) for s in kept}, description,
                             {layer.name for layer in net.layer} | {n.name for n in model.graph.node}, set(TYPE_NAMES))
    return Prepared(prepared, conversion, list(report.folded))


def _load(model_file, weights_file, config: QuantConfig | None = None) -> tuple[Any, Prepared]:
    net = load_net(model_file, weights_file)
    return net, prepare(net, weights_file, config, f"'{model_file}'")


def create_quant_config(config_file: str | os.PathLike, model_file: str | os.PathLike, weights_file: str | os.PathLike,
                        skip_layers: list[str] | None = None, batch_num: int = 1, activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None) -> None:
    """Write config.json for a Caffe model: every quantizable layer (Caffe layer names) with default (or .cfg)
    parameters. With ``config_defination`` the arguments skip_layers, batch_num and activation_offset are
    ignored, as in AMCT; .cfg layer types are Caffe's (Convolution, InnerProduct, Deconvolution, Pooling, ...)."""
    check_outputs({"model_file": model_file, "weights_file": weights_file, "config_defination": config_defination},
                  {"config_file": config_file})
    _, prep = _load(model_file, weights_file)
    write_quant_config(config_file, prep.prepared, skip_layers=skip_layers, batch_num=batch_num,
                       activation_offset=activation_offset, config_defination=config_defination)


@dataclass
class CaffeGraph:
    """What ``init`` returns (AMCT's ``graph``): the Caffe network, its ONNX form and the files of the run."""

    model_file: str
    weights_file: str
    config_file: str
    record_file: str
    net: Any  # NetParameter with blobs
    config: QuantConfig
    prep: Prepared
    modified: ModifiedModel | None = None

    @property
    def model(self):
        """The converted (normalised, BatchNorm folded) ONNX graph."""
        return self.prep.prepared.model


def init(config_file: str | os.PathLike, model_file: str | os.PathLike, weights_file: str | os.PathLike,
         scale_offset_record_file: str | os.PathLike) -> CaffeGraph:
    """Read the Caffe model and the config; returns the graph ``quantize_model`` and ``save_model`` take."""
    check_outputs({"model_file": model_file, "weights_file": weights_file, "config_file": config_file},
                  {"scale_offset_record_file": scale_offset_record_file})
    config = load_config(config_file)
    net, prep = _load(model_file, weights_file, config)
    check_config_against_model(config, prep.prepared.layers, config_file)
    return CaffeGraph(str(model_file), str(weights_file), str(config_file), str(scale_offset_record_file), net,
                      config, prep)


class CalibrationSession(CalibratingSession):
    """Runs the converted model in ONNX Runtime and calibrates on the side; ``run(None, {"data": x})`` returns
    the output blobs in the order of ``get_outputs()``, as Caffe's forward would compute them. After
    ``batch_num`` runs the record file is complete."""

    def __init__(self, modified: ModifiedModel, record_file: str | os.PathLike):
        super().__init__(modified, record_file, ort_session(modified.model.SerializeToString()), "session.run")


def modified_model(graph: CaffeGraph) -> ModifiedModel:
    """The calibration graph of ``graph``'s config (the converted model with the observed tensors as outputs)."""
    prepared = graph.prep.prepared
    plan = build_plan(prepared.layers, graph.config)
    if not plan.layers:
        raise ConfigError(f"{graph.config_file}: no layer has quant_enable true; nothing to quantize")
    return make_modified(prepared.model, plan, graph.config, observed_tensors(plan, graph.config))


def quantize_model(graph: CaffeGraph, modified_model_file: str | os.PathLike,
                   modified_weights_file: str | os.PathLike) -> CalibrationSession:
    """Write the network omct calibrates as a Caffe pair (the float model, V1 files upgraded) and return the
    calibration session: run ``batch_num`` batches through it (``session.run(None, {"data": x})``)."""
    check_outputs({"model_file": graph.model_file, "weights_file": graph.weights_file, "config_file": graph.config_file},
                  {"modified_model_file": modified_model_file, "modified_weights_file": modified_weights_file,
                   "scale_offset_record_file": graph.record_file})
    graph.modified = modified_model(graph)
    write_prototxt(graph.net, modified_model_file)
    write_caffemodel(graph.net, modified_weights_file)
    write_pending_record(graph.record_file, 0, graph.config.batch_num, list(graph.modified.plan.layers))
    logger.info("wrote %s and %s: %d layers to calibrate, %d activation tensors observed", modified_model_file,
                modified_weights_file, len(graph.modified.plan.layers), len(graph.modified.plan.sites))
    hints.info("now run %d batch(es) through the returned session: session.run(None, {'%s': x})",
               graph.config.batch_num, next(iter(graph.prep.conversion.inputs), "data"))
    return CalibrationSession(graph.modified, graph.record_file)


def save_outputs(save_path: str, save_type: str) -> dict[str, str]:
    files = {}
    if save_type in ("Both", "Fakequant"):
        files.update(output_files("save_path's fake-quant model", save_path + "_fake_quant_model.onnx"))
        files["save_path's fake-quant prototxt"] = save_path + "_fake_quant_model.prototxt"
        files["save_path's fake-quant caffemodel"] = save_path + "_fake_quant_weights.caffemodel"
    if save_type in ("Both", "Deploy"):
        files.update(output_files("save_path's deploy model", save_path + "_deploy_model.onnx"))
    return files


def save_quantized(graph: CaffeGraph, quantized: QuantizedModel, save_type: str, save_path: str | os.PathLike) -> list[Path]:
    """Write what ``save_type`` asks for from a calibrated model of ``graph``."""
    if save_type not in SAVE_TYPES:
        raise ConfigError(f"save_type '{save_type}' is not one of {', '.join(SAVE_TYPES)}")
    save_path = str(save_path)
    if not Path(save_path).name:
        raise ConfigError(f"save_path '{save_path}' must end with a file name prefix, e.g. './results/model'")
    written = []
    fake = quantized.fake_quant_model() if not quantized.all_float else quantized.base
    if save_type == "Both":
        written += list(quantized.save(save_path))
    elif save_type == "Fakequant":
        written += _save_onnx(fake, save_path + "_fake_quant_model.onnx")[:1]
    else:
        deploy = quantized.deploy_model() if not quantized.all_float else quantized.base
        written += _save_onnx(deploy, save_path + "_deploy_model.onnx")[:1]
    if save_type in ("Both", "Fakequant"):
        written += write_quantized_caffe(graph.net, graph.prep.conversion, graph.prep.folded, fake,
                                         save_path + "_fake_quant_model.prototxt",
                                         save_path + "_fake_quant_weights.caffemodel")
        logger.info(ACTIVATION_NOTE)
    return written


def save_model(graph: CaffeGraph, save_type: str, save_path: str | os.PathLike) -> list[Path]:
    """AMCT's Caffe ``save_model``: ``"Fakequant"`` writes ``save_path + '_fake_quant_model.onnx'`` and the Caffe
    pair ``_fake_quant_model.prototxt`` / ``_fake_quant_weights.caffemodel`` (weights on their quantized
    values); ``"Deploy"`` writes ``save_path + '_deploy_model.onnx'`` (INT8, integer kernels); ``"Both"`` all."""
    if not isinstance(graph, CaffeGraph):
        raise ModelError(f"save_model takes the graph init returned, got {type(graph).__name__}")
    if graph.modified is None:
        raise ModelError("save_model: call quantize_model(graph, ...) and run the calibration batches first")
    check_outputs({"model_file": graph.model_file, "weights_file": graph.weights_file, "config_file": graph.config_file,
                   "scale_offset_record_file": graph.record_file}, save_outputs(str(save_path), save_type))
    return save_quantized(graph, quantized_from(graph.modified, graph.record_file), save_type, save_path)


def set_cpu_mode() -> None:
    """AMCT's switch for weight calibration on the CPU: omct always calibrates with ONNX Runtime on the CPU; kept
    so that AMCT scripts run unchanged."""


def set_gpu_mode() -> None:
    """AMCT's switch for weight calibration on a GPU: accepted and ignored (omct calibrates on the CPU)."""
    logger.info("set_gpu_mode: omct calibrates with ONNX Runtime on the CPU; ignored")
