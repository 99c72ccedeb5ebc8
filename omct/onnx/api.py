"""Implementation of ``omct.onnx``: thin calls into formats/ and graph/."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from omct.errors import ModelError
from omct.fileio import check_outputs
from omct.formats.config import LayerInfo, QuantConfig, load_config
from omct.graph.calibration import CalibrationStatus, Collector
from omct.graph.layers import LayerSpec, Refusal, find_layers
from omct.graph.model_io import SOURCE_KEY, input_files, load_model, output_files
from omct.graph.model_io import save_model as _save_onnx
from omct.graph.modified import read_modified, save_quantized
from omct.graph.normalize import NormalizeReport, default_opset, fold_batchnorm, normalize
from omct.graph.workflow import RECORD_KEY, write_modified_model, write_quant_config
from omct.ui import logger


@dataclass
class ModelReport:
    """What ``inspect_model`` finds: quantizable layers, refused candidates with reasons, and basics."""

    layers: list[LayerSpec]
    refused: list[Refusal]
    opset: int
    parameters: int
    normalize: NormalizeReport


def _prepare(model_file: str | os.PathLike) -> tuple[onnx.ModelProto, NormalizeReport, list[LayerSpec], list[Refusal]]:
    model = load_model(model_file)
    norm, report = normalize(model)
    layers, refused = find_layers(norm)
    return norm, report, layers, refused


def inspect_model(model_file: str | os.PathLike) -> ModelReport:
    norm, report, layers, refused = _prepare(model_file)
    params = sum(int(np.prod(t.dims)) for t in norm.graph.initializer)
    return ModelReport(layers, refused, default_opset(load_model(model_file)), params, report)


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
    norm, report, layers, refused = _prepare(model_file)
    if report.renamed:
        if updated_model:
            _save_onnx(norm, updated_model)
            logger.info("named %d node(s) and saved the renamed model to %s", len(report.renamed), updated_model)
        else:
            logger.info("named %d unnamed or duplicate node(s) (e.g. %s); pass updated_model=PATH to save the "
                        "renamed model", len(report.renamed), next(iter(report.renamed.values())))
    infos = [LayerInfo(s.name, s.op_type, s.weight is not None) for s in layers]
    infos += [LayerInfo(r.name, r.op_type, False, quantizable=False) for r in refused]
    write_quant_config(config_file, infos, model_desc=f"'{model_file}'", all_names={n.name for n in norm.graph.node},
                       skip_layers=skip_layers, batch_num=batch_num, activation_offset=activation_offset,
                       config_defination=config_defination, refused=refused)


def quantizable_graph(model_file: str | os.PathLike, config: QuantConfig) -> tuple[onnx.ModelProto, list[LayerSpec]]:
    """The normalised model, BatchNorm folded as ``config`` says, and its quantizable layers."""
    norm, report = normalize(load_model(model_file))
    if config.globals.do_fusion:
        fold_batchnorm(norm, set(config.globals.skip_fusion_layers), report)
        if report.folded:
            logger.info("folded %d BatchNormalization node(s) into convolutions", len(report.folded))
    return norm, find_layers(norm)[0]


def quantize_model(config_file: str | os.PathLike, model_file: str | os.PathLike, modified_onnx_file: str | os.PathLike,
                   record_file: str | os.PathLike) -> None:
    """Write the calibration model ``modified_onnx_file``; run it with ``CalibrationSession``."""
    check_outputs({**input_files("model_file", model_file), "config_file": config_file},
                  {**output_files("modified_onnx_file", modified_onnx_file), "record_file": record_file})
    config = load_config(config_file)
    norm, layers = quantizable_graph(model_file, config)
    norm.metadata_props.add(key=SOURCE_KEY, value=str(Path(model_file).resolve()))  # save_model must not overwrite it
    mod = write_modified_model(config, config_file, norm, layers, modified_onnx_file, record_file)
    logger.info("wrote %s: %d layers to calibrate, %d activation tensors observed; now run %d batch(es) through "
                "CalibrationSession", modified_onnx_file, len(mod.plan.layers), len(mod.plan.sites), config.batch_num)


class CalibrationSession(CalibrationStatus):
    """An ``onnxruntime.InferenceSession`` over the modified model that also calibrates.

    ``run`` returns exactly what the original model would; on the side it feeds the observed activations
    to the calibrators. After ``batch_num`` runs the record file is complete. Every other attribute is
    the underlying InferenceSession's.
    """

    def __init__(self, modified_onnx_file: str | os.PathLike, sess_options: Any = None, providers: list | None = None,
                 **kwargs: Any):
        import onnxruntime as ort

        mod = read_modified(modified_onnx_file)
        meta = {p.key: p.value for p in mod.model.metadata_props}
        self.record_file = meta.get(RECORD_KEY)
        if not self.record_file:
            raise ModelError(f"'{modified_onnx_file}' has no record file path; write it with quantize_model")
        weights = {t.name: t for t in mod.model.graph.initializer}
        if sess_options is None:
            # Between runs the statistics need the cores: ONNX Runtime's workers must not spin-wait on them.
            sess_options = ort.SessionOptions()
            sess_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(str(modified_onnx_file), sess_options,
                                             providers=providers or ["CPUExecutionProvider"], **kwargs)
        self._collector = Collector(mod.plan, mod.config, self.record_file,
                                    lambda name: numpy_helper.to_array(weights[name]))
        self._added = set(mod.added_outputs)
        self._site_tensors = mod.plan.site_tensors()
        self._user_outputs = [o.name for o in self._session.get_outputs() if o.name not in self._added]

    def get_outputs(self):
        return [o for o in self._session.get_outputs() if o.name not in self._added]

    def run(self, output_names, input_feed, run_options=None):
        wanted = list(output_names) if output_names else self._user_outputs
        if self._collector.done:
            return self._session.run(wanted, input_feed, run_options)
        fetch = wanted + [t for t in self._site_tensors if t not in wanted]

        def observe():
            values = self._session.run(fetch, input_feed, run_options)
            self._collector.observe(dict(zip(fetch, values, strict=False)))
            return values

        return self._collector.run_batch(observe)[: len(wanted)]

    def __getattr__(self, name: str):
        return getattr(self._session, name)


def save_model(modified_onnx_file: str | os.PathLike, record_file: str | os.PathLike, save_path: str | os.PathLike) -> None:
    """Write ``save_path + '_fake_quant_model.onnx'`` and ``save_path + '_deploy_model.onnx'``."""
    save_quantized(modified_onnx_file, record_file, save_path)
