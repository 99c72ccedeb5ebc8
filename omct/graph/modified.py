"""The modified (calibration) model file and ``save_model``, shared by every frontend.

The modified model is the normalised model (BN folded, nodes named) with the observed activation tensors
added as graph outputs, and the plan, config and record file path stored in its metadata, so
``save_model(modified_onnx_file, record_file, save_path)`` needs nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto, helper

from omct.errors import ModelError, OmctError
from omct.formats.config import QuantConfig
from omct.formats.record import read_record
from omct.graph.export import build_quantized, check_record
from omct.graph.model_io import check_save_outputs, load_model, save_models
from omct.graph.plan import Plan
from omct.ui import logger, progress

_PLAN, _CONFIG, _ADDED = "omct.plan", "omct.config", "omct.calibration_outputs"


@dataclass
class ModifiedModel:
    model: onnx.ModelProto  # with calibration outputs
    plan: Plan
    config: QuantConfig
    added_outputs: list[str]

    def base_model(self) -> onnx.ModelProto:
        """The normalised model without calibration outputs or omct metadata."""
        base = onnx.ModelProto()
        base.CopyFrom(self.model)
        keep = [o for o in base.graph.output if o.name not in self.added_outputs]
        del base.graph.output[:]
        base.graph.output.extend(keep)
        meta = [p for p in base.metadata_props if not p.key.startswith("omct.")]
        del base.metadata_props[:]
        base.metadata_props.extend(meta)
        return base


def make_modified(base: onnx.ModelProto, plan: Plan, config: QuantConfig) -> ModifiedModel:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    existing = {o.name for o in model.graph.output}
    added = [t for t in plan.site_tensors() if t not in existing]
    for t in added:
        model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    for key, value in ((_PLAN, plan.to_json()), (_CONFIG, json.dumps(config.to_dict())), (_ADDED, json.dumps(added))):
        model.metadata_props.add(key=key, value=value)
    return ModifiedModel(model, plan, config, added)


def read_modified(path: str | Path) -> ModifiedModel:
    model = load_model(path, "modified model")
    meta = {p.key: p.value for p in model.metadata_props}
    if _PLAN not in meta:
        raise ModelError(f"'{path}' is not a modified model written by omct's quantize_model; pass the "
                         "modified_onnx_file that quantize_model wrote")
    return ModifiedModel(model, Plan.from_json(meta[_PLAN]),
                         QuantConfig.from_dict(json.loads(meta[_CONFIG]), f"{path} (embedded config)"),
                         json.loads(meta[_ADDED]))


LAYERS_KEY, FUSION_KEY = "omct.layers", "omct.fusion"


def stamp_layers(model: onnx.ModelProto, plan: Plan, config: QuantConfig) -> None:
    """Record in a saved model which layers are quantized and which tensor shows each one's result, and how
    BatchNorm was folded, so that ``omct analyze`` can line it up with the float model."""
    layers = [{"name": n, "op_type": s.op_type,
               "output_site": plan.sites[plan.output_site[n]].tensor if n in plan.output_site else None}
              for n, s in plan.layers.items()]
    fusion = {"do_fusion": config.globals.do_fusion, "skip_fusion_layers": list(config.globals.skip_fusion_layers)}
    for key, value in ((LAYERS_KEY, layers), (FUSION_KEY, fusion)):
        model.metadata_props.add(key=key, value=json.dumps(value))


def save_quantized(modified_onnx_file: str | Path, record_file: str | Path, save_path: str | Path,
                   activation_dtype: str = "uint8") -> tuple[Path, Path]:
    """Write ``{save_path}_fake_quant_model.onnx`` and ``{save_path}_deploy_model.onnx``."""
    mod = read_modified(modified_onnx_file)
    check_save_outputs(mod.model, modified_onnx_file, record_file, save_path)
    records = read_record(record_file)
    base = mod.base_model()
    inits = {t.name: t for t in base.graph.initializer}
    check_record(mod.plan, records, str(record_file), lambda w: tuple(inits[w].dims))
    extra = sorted(set(records) - set(mod.plan.layers))
    if extra:
        logger.info("record file has factors for %d layer(s) that are not quantized here (e.g. '%s'); ignored",
                    len(extra), extra[0])
    save_path = str(save_path)
    if not Path(save_path).name:
        raise OmctError(f"save_path '{save_path}' must end with a file name prefix, e.g. './results/model'")
    fake_path = Path(save_path + "_fake_quant_model.onnx")
    deploy_path = Path(save_path + "_deploy_model.onnx")
    with progress("exporting", 2) as bar:
        fake = build_quantized(base, mod.plan, mod.config, records, deploy=False)
        deploy = build_quantized(base, mod.plan, mod.config, records, deploy=True, activation_dtype=activation_dtype)
        for model in (fake, deploy):
            stamp_layers(model, mod.plan, mod.config)
        save_models([(fake, fake_path), (deploy, deploy_path)])  # all or nothing: a previous pair stays intact on failure
        bar.advance(2)
    logger.info("wrote %s and %s (%d layers quantized)", fake_path, deploy_path, len(mod.plan.layers))
    return fake_path, deploy_path
