"""The steps every frontend shares once it has an ONNX graph whose quantizable nodes carry the layer names:
write config.json, and write the modified (calibration) model with a pending record file.

The ONNX frontend names layers after the nodes; the PyTorch frontend after the modules' qualified names.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from omct.errors import ConfigError, ModelError
from omct.formats.cfg import read_cfg
from omct.formats.config import LayerInfo, QuantConfig, build_config, check_layer_names, save_config
from omct.formats.record import write_pending_record
from omct.graph.layers import LayerSpec, Refusal
from omct.graph.model_io import save_model
from omct.graph.modified import ModifiedModel, make_modified
from omct.graph.plan import build_plan
from omct.ui import logger

RECORD_KEY = "omct.record_file"


def report_refusals(refused: list[Refusal]) -> None:
    for r in refused:
        logger.info("left in float: %s", r)


def write_quant_config(config_file: str | os.PathLike, layers: list[LayerInfo], *, model_desc: str,
                       all_names: set[str], skip_layers: list[str] | None, batch_num: int, activation_offset: bool,
                       config_defination: str | os.PathLike | None, refused: list[Refusal]) -> QuantConfig:
    """Build, check and save config.json; ``layers`` lists quantizable and refused candidates."""
    if skip_layers is not None and (isinstance(skip_layers, str) or not all(isinstance(s, str) for s in skip_layers)):
        raise ConfigError(f"skip_layers must be a list of layer names, got {skip_layers!r}")
    simplified = read_cfg(config_defination) if config_defination else None
    config = build_config(layers, batch_num=batch_num, activation_offset=activation_offset, skip_layers=skip_layers,
                          simplified=simplified, all_names=all_names)
    check_layer_names(config.globals.skip_fusion_layers, all_names, "skip_fusion_layers")
    quantizable = [info for info in layers if info.quantizable]
    if not quantizable:
        reasons = "; ".join(str(r) for r in refused[:3]) or "it has no layer of a quantizable type"
        raise ModelError(f"{model_desc} has no quantizable layer ({reasons})")
    report_refusals(refused)
    save_config(config, config_file)
    logger.info("wrote %s: %d of %d quantizable layers enabled", config_file, len(config.enabled_layers()), len(quantizable))
    return config


def check_config_against_model(config: QuantConfig, layers: list[LayerSpec], config_file) -> None:
    names = {s.name for s in layers}
    unknown = [n for n in config.layers if n not in names]
    if unknown:
        raise ConfigError(f"{config_file}: layer '{unknown[0]}' is not a quantizable layer of this model; was the "
                          "config created for another model? Re-run create_quant_config")
    for spec in layers:
        cfg = config.layers.get(spec.name)
        if cfg is not None and spec.weight is not None and cfg.weight_quant_params is None:
            raise ConfigError(f"{config_file}: layer '{spec.name}' ({spec.op_type}) has weights but no weight_quant_params")


def write_modified_model(config: QuantConfig, config_file: str | os.PathLike, model: onnx.ModelProto,
                         layers: list[LayerSpec], modified_onnx_file: str | os.PathLike,
                         record_file: str | os.PathLike) -> ModifiedModel:
    """Plan the layers the config enables, save the modified model and a pending record file."""
    check_config_against_model(config, layers, config_file)
    plan = build_plan(layers, config)
    if not plan.layers:
        raise ConfigError(f"{config_file}: no layer has quant_enable true; nothing to quantize")
    mod = make_modified(model, plan, config)
    mod.model.metadata_props.add(key=RECORD_KEY, value=str(Path(record_file).resolve()))
    save_model(mod.model, modified_onnx_file)
    write_pending_record(record_file, 0, config.batch_num, list(plan.layers))
    return mod
