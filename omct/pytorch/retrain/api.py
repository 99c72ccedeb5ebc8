"""AMCT's retrain (quantization-aware training) call sequence for PyTorch.

    amct.create_quant_retrain_config(config_file, model, input_data, config_defination=None)
    qat_model = amct.create_quant_retrain_model(config_file, model, record_file, input_data)
    ... the user's training loop (any optimizer over qat_model.parameters(), any device, DDP) ...
    qat_model = amct.restore_quant_retrain_model(config_file, model, record_file, input_data, pth_file,
                                                 state_dict_name="state_dict")
    amct.save_quant_retrain_model(config_file, qat_model, record_file, save_path, input_data)

The learned factors go to AMCT's record file and the trained float weights through the same export as PTQ.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch
from torch import nn

from omct.errors import ConfigError, ModelError
from omct.fileio import check_outputs
from omct.formats.record import write_record
from omct.formats.retrain import RetrainConfig, build_retrain_config, load_retrain_config, save_retrain_config
from omct.graph.plan import build_plan
from omct.pytorch import distributed
from omct.pytorch.api import _eval_copy, prepare
from omct.pytorch.fold import fold_conv_bn
from omct.pytorch.retrain.model import RETRAIN_TYPES, QuantRetrainModel
from omct.pytorch.trace import TracedModel, as_args, fold_traced, trace_model
from omct.quantize import QuantizedModel
from omct.ui import logger
from omct.workflow import report_refusals

__all__ = ["create_quant_retrain_config", "create_quant_retrain_model", "restore_quant_retrain_model",
           "save_quant_retrain_model"]


def _retrain_layers(traced: TracedModel) -> list:
    return [s for s in traced.layers if traced.types.get(s.name) in RETRAIN_TYPES]


def create_quant_retrain_config(config_file: str | os.PathLike, model: nn.Module, input_data,
                                config_defination: str | os.PathLike | None = None) -> None:
    """Write the retrain config.json: every Conv1d/2d/3d, ConvTranspose2d and Linear module (by qualified name)
    with ULQ activations and ARQ-retrain INT8 weights, or what AMCT's retrain ``.cfg`` (``config_defination``)
    says."""
    check_outputs({"config_defination": config_defination}, {"config_file": config_file})
    as_args(input_data)
    traced = trace_model(_eval_copy(model), input_data)
    prepared = prepare(traced, model)
    names = {s.name for s in _retrain_layers(traced)}
    infos = [li for li in prepared.layer_infos() if li.name in names or not li.quantizable]
    if not names:
        reasons = "; ".join(str(r) for r in traced.refused[:3]) or f"it has no {', '.join(RETRAIN_TYPES)} module"
        raise ModelError(f"{prepared.description} has no layer to retrain ({reasons})")
    config = build_retrain_config(infos, config_defination=config_defination, all_names=prepared.all_names,
                                  type_names=set(RETRAIN_TYPES))
    report_refusals(traced.refused)
    distributed.on_rank0(lambda: save_retrain_config(config, config_file))  # every rank may call it; rank 0 writes
    logger.info("wrote %s: %d of %d layers enabled for quantization-aware training", config_file,
                len(config.enabled_layers()), len(config.layers))


def _device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _folded(model: nn.Module, input_data) -> tuple[nn.Module, TracedModel]:
    """An eval-mode copy with every Conv + BatchNorm pair folded, and its traced graph."""
    work = _eval_copy(model)
    traced = trace_model(work, input_data)
    pairs = traced.batchnorm_after
    folded = fold_conv_bn(work, pairs)
    if folded:
        traced = fold_traced(traced, work, {c: pairs[c] for c in folded})
    return work, traced


def _check_config(config: RetrainConfig, traced: TracedModel, config_file) -> None:
    names = {s.name for s in _retrain_layers(traced)}
    unknown = [n for n in config.layers if n not in names]
    if unknown:
        raise ConfigError(f"{config_file}: layer '{unknown[0]}' is not a layer of this model that can be retrained; was "
                          "the config created for another model? Re-run create_quant_retrain_config")
    if not config.enabled_layers():
        raise ConfigError(f"{config_file}: no layer has retrain_enable true; nothing to retrain")


def create_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                               input_data) -> QuantRetrainModel:
    """The model to train: BatchNorm folded into its convolution, fake quantization with learned ranges and
    scales on every enabled layer. Its first ``batch_num`` forward passes (training mode) initialise the
    activation ranges; train it as the original model. ``model`` itself is not changed."""
    check_outputs({"config_file": config_file}, {"record_file": record_file})
    config = load_retrain_config(config_file)
    work, traced = _folded(model, input_data)
    _check_config(config, traced, config_file)
    plan = build_plan(_retrain_layers(traced), config.to_quant_config())
    producers = {o: n.op_type for n in traced.model.graph.node for o in n.output}
    qat = QuantRetrainModel(work, plan, config, str(record_file), producers)
    logger.info("retrain model: %d layers, %d activation tensors quantized; the first %d batch(es) initialise "
                "the activation ranges", len(plan.layers), len(plan.sites), config.batch_num)
    return qat.to(_device(model)).train()


def _load_checkpoint(pth_file: str | os.PathLike, state_dict_name: str | None) -> dict:
    path = Path(pth_file)
    if not path.is_file():
        raise ModelError(f"checkpoint '{path}' does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"checkpoint '{path}' holds more than tensors and plain containers and was not loaded "
                         f"(torch.load with weights_only=True refused it: {first[:200]})") from None
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise ModelError(f"checkpoint '{path}' cannot be read: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from None
    if state_dict_name is not None:
        if not isinstance(data, dict) or state_dict_name not in data:
            keys = ", ".join(repr(k) for k in list(data)[:5]) if isinstance(data, dict) else type(data).__name__
            raise ModelError(f"checkpoint '{path}' has no '{state_dict_name}' (its top-level keys: {keys})")
        data = data[state_dict_name]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelError(f"checkpoint '{path}'" + (f"['{state_dict_name}']" if state_dict_name else "") +
                         " is not a state_dict (name -> tensor); pass state_dict_name if it is nested")
    if data and all(k.startswith("module.") for k in data):  # saved from the DistributedDataParallel wrapper
        data = {k[len("module."):]: v for k, v in data.items()}
    return data


def restore_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                                input_data, pth_file: str | os.PathLike, state_dict_name: str | None = None
                                ) -> QuantRetrainModel:
    """Rebuild the retrain model and load a checkpoint of it (``torch.load(weights_only=True)``: a checkpoint
    cannot run code while it loads)."""
    qat = create_quant_retrain_model(config_file, model, record_file, input_data)
    state = _load_checkpoint(pth_file, state_dict_name)
    own = qat.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    for what, keys in (("lacks", missing), ("has unexpected", extra), ("has wrong shapes for", wrong)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            raise ModelError(f"checkpoint '{pth_file}' {what} {len(keys)} key(s) of this retrain model ({shown}): it is "
                             "a checkpoint of another model or config")
    qat.load_state_dict(state)
    return qat


def save_quant_retrain_model(config_file: str | os.PathLike, model: nn.Module, record_file: str | os.PathLike,
                             save_path: str | os.PathLike, input_data, input_names: list[str] | None = None,
                             output_names: list[str] | None = None, dynamic_axes: dict | None = None
                             ) -> tuple[Path, Path] | None:
    """Write the learned factors to ``record_file`` (AMCT's record) and ``save_path + '_fake_quant_model.onnx'``
    and ``save_path + '_deploy_model.onnx'`` through the shared export. ``model`` is the retrain model or its
    DistributedDataParallel wrapper; under torch.distributed rank 0 writes and the other ranks wait."""
    qat = model.module if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel) else model
    if not isinstance(qat, QuantRetrainModel):
        raise ModelError(f"save_quant_retrain_model needs the model create_quant_retrain_model (or "
                         f"restore_quant_retrain_model) returned, got a plain {type(qat).__name__}")
    save_path = str(save_path)
    fake, deploy = save_path + "_fake_quant_model.onnx", save_path + "_deploy_model.onnx"
    check_outputs({"config_file": config_file}, {"record_file": record_file, "fake_quant_model": fake, "deploy_model": deploy})
    config = load_retrain_config(config_file)
    records = qat.records()  # every rank checks (the same parameters): a NaN range fails everywhere

    def export() -> tuple[Path, Path]:
        traced = trace_model(qat.float_model(), input_data, input_names=input_names, output_names=output_names,
                             dynamic_axes=dynamic_axes)
        _check_config(config, traced, config_file)
        layers = _retrain_layers(traced)
        qconfig = config.to_quant_config()
        plan = build_plan(layers, qconfig)
        if list(plan.layers) != list(qat.plan.layers) or len(plan.sites) != len(qat.plan.sites):
            raise ModelError("the retrain model's structure changed since create_quant_retrain_model (layers "
                             f"{list(qat.plan.layers)[:3]}... vs {list(plan.layers)[:3]}...); save the model it returned")
        write_record(record_file, records)
        return QuantizedModel(traced.model, layers, qconfig, records, plan).save(save_path)

    was_training = qat.training
    try:
        return distributed.on_rank0(export)
    finally:
        qat.train(was_training)
