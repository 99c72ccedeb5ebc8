"""AMCT's file contract, shared by every frontend once it has an ONNX graph whose quantizable nodes carry the
layer names: config.json, the modified (calibration) model with a pending record file, and ``save_model``
from the modified model and the record. Thin wrappers over the in-memory core (``omct.quantize``).

The ONNX frontend names layers after the nodes; the PyTorch frontend after the modules' qualified names.
"""

from __future__ import annotations

import os
from pathlib import Path

from omct.errors import ConfigError, ModelError, RecordError
from omct.formats.cfg import read_cfg
from omct.formats.config import QuantConfig, build_config, check_layer_names, save_config
from omct.formats.record import LayerRecord, read_record, write_pending_record
from omct.frontend import PreparedModel
from omct.graph import metadata
from omct.graph.model_io import check_save_outputs
from omct.graph.model_io import save_model as save_onnx
from omct.graph.modified import ModifiedModel, make_modified, read_modified
from omct.graph.ops import LayerSpec, Refusal, quantization_nodes
from omct.graph.plan import Plan, build_plan, with_float_layers, without_layers
from omct.graph.subgraphs import all_graphs
from omct.quantize import QuantizedModel, observed_tensors
from omct.ui import logger


def report_refusals(refused: list[Refusal]) -> None:
    for r in refused:
        logger.info("left in float: %s", r)


def write_quant_config(config_file: str | os.PathLike, prepared: PreparedModel, *, skip_layers: list[str] | None,
                       batch_num: int, activation_offset: bool, config_defination: str | os.PathLike | None) -> QuantConfig:
    """Build, check and save config.json for a frontend's prepared model (AMCT's ``create_quant_config``)."""
    layers, all_names, refused = prepared.layer_infos(), prepared.all_names, prepared.refused
    if skip_layers is not None and (isinstance(skip_layers, str) or not all(isinstance(s, str) for s in skip_layers)):
        raise ConfigError(f"skip_layers must be a list of layer names, got {skip_layers!r}")
    simplified = read_cfg(config_defination) if config_defination else None
    config = build_config(layers, batch_num=batch_num, activation_offset=activation_offset, skip_layers=skip_layers,
                          simplified=simplified, all_names=all_names, type_names=prepared.type_names)
    check_layer_names(config.globals.skip_fusion_layers, all_names, "skip_fusion_layers")
    quantizable = [info for info in layers if info.quantizable]
    done = quantization_nodes(prepared.model)
    if done:
        kinds = sorted({n.op_type for n in done})
        raise ModelError(f"{prepared.description} is already quantized ({len(done)} node(s) of type {', '.join(kinds)}, e.g. "
                         f"'{done[0].name}'); omct quantizes float models: give the FP32 model it was made from")
    if not quantizable:
        reasons = "; ".join(str(r) for r in refused[:3]) or "it has no layer of a quantizable type"
        raise ModelError(f"{prepared.description} has no quantizable layer ({reasons})")
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
        wcfg = cfg.weight_quant_params if cfg is not None else None
        if wcfg is not None and wcfg.wts_algo == "nuq_quantize" and spec.nuq_refusal:
            raise ConfigError(f"{config_file}: layer '{spec.name}' ({spec.op_type}) asks wts_algo nuq_quantize, which it "
                              f"cannot take: {spec.nuq_refusal}")


def write_modified_model(config: QuantConfig, config_file: str | os.PathLike, prepared: PreparedModel,
                         modified_onnx_file: str | os.PathLike, record_file: str | os.PathLike,
                         model_file: str | os.PathLike | None = None) -> ModifiedModel:
    """Plan the layers the config enables, save the modified model and a pending record file (AMCT's
    ``quantize_model``)."""
    check_config_against_model(config, prepared.layers, config_file)
    plan = build_plan(prepared.layers, config)
    if not plan.layers:
        raise ConfigError(f"{config_file}: no layer has quant_enable true; nothing to quantize")
    mod = make_modified(prepared.model, plan, config, observed_tensors(plan, config))
    mod.model.metadata_props.add(key=metadata.RECORD_FILE, value=str(Path(record_file).resolve()))
    if model_file is not None:  # so that save_model can refuse to overwrite it
        mod.model.metadata_props.add(key=metadata.MODEL_FILE, value=str(Path(model_file).resolve()))
    save_onnx(mod.model, modified_onnx_file)
    write_pending_record(record_file, 0, config.batch_num, list(plan.layers))
    return mod


def check_record(plan: Plan, records: dict[str, LayerRecord], record_file: str, weight_shape) -> None:
    """The record has factors of the right shape for every layer of the plan (else it belongs elsewhere)."""
    missing = [n for n in plan.layers if n not in records]
    if missing:
        raise RecordError(f"record file '{record_file}' has no factors for {len(missing)} layer(s) of the model "
                          f"(e.g. '{missing[0]}'): it belongs to another model or calibration did not finish")
    for name, spec in plan.layers.items():
        rec = records[name]
        if spec.weight is not None:
            channels = 1 if spec.weight_axis is None else weight_shape(spec.weight)[spec.weight_axis]
            if len(rec.scale_w) not in (1, channels):
                raise RecordError(f"record file '{record_file}': layer '{name}' has {len(rec.scale_w)} weight scales "
                                  f"but its weight has {channels} output channels: the record belongs to another model")
        if name in plan.output_site and rec.scale_o is None:
            raise RecordError(f"record file '{record_file}': layer '{name}' has no output factors (scale_o)")


def quantized_from(mod: ModifiedModel, record_file: str | os.PathLike) -> QuantizedModel:
    """The calibrated model that AMCT's two files describe: the modified model and its record. ``mod.model``
    becomes the result's base model (not copied)."""
    records = read_record(record_file)
    base = mod.base_model(in_place=True)  # mod.model is not used again: no copy
    inits = {t.name: t for g in all_graphs(base.graph) for t in g.initializer}
    plan, config = mod.plan, mod.config
    unreached = {n for n, spec in plan.layers.items() if n not in records and spec.scope}
    if unreached:  # layers of a control-flow body no calibration batch ran: calibration kept them float
        plan, config = without_layers(plan, unreached), with_float_layers(config, unreached)
        logger.warning("record file has no factors for %d layer(s) in control-flow bodies calibration never ran "
                       "(e.g. '%s'): they stay in float", len(mod.plan.layers) - len(plan.layers), sorted(unreached)[0])
    check_record(plan, records, str(record_file), lambda w: tuple(inits[w].dims))
    extra = sorted(set(records) - set(plan.layers))
    if extra:
        logger.info("record file has factors for %d layer(s) that are not quantized here (e.g. '%s'); ignored",
                    len(extra), extra[0])
    return QuantizedModel(base, list(plan.layers.values()), config, records, plan)


def save_model(modified_onnx_file: str | os.PathLike, record_file: str | os.PathLike,
               save_path: str | os.PathLike) -> tuple[Path, Path]:
    """AMCT's ``save_model``: write ``save_path + '_fake_quant_model.onnx'`` and ``save_path + '_deploy_model.onnx'``."""
    mod = read_modified(modified_onnx_file)
    check_save_outputs(mod.model, modified_onnx_file, record_file, save_path)  # before anything is written
    return quantized_from(mod, record_file).save(save_path)
