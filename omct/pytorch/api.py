"""Implementation of ``omct.pytorch``: AMCT's PyTorch call sequence on top of the shared ONNX workflow."""

from __future__ import annotations

import copy
import os
from collections import OrderedDict
from dataclasses import dataclass

import onnx
import torch
from torch import nn

from omct.errors import ModelError
from omct.fileio import check_outputs
from omct.formats.config import QuantConfig, load_config
from omct.frontend import PreparedModel
from omct.graph.equalize import equalize
from omct.graph.model_io import output_files
from omct.graph.modified import ModifiedModel, read_modified
from omct.graph.ops import LayerSpec, Refusal
from omct.pytorch import distributed
from omct.pytorch.calibration import CalibrationModel
from omct.pytorch.export_cache import CACHE, fingerprint
from omct.pytorch.fold import equalize_modules, fold_conv_bn
from omct.pytorch.trace import SUPPORTED, TracedModel, as_args, fold_traced, trace_model
from omct.ui import format_table, hints, logger
from omct.workflow import save_model, write_modified_model, write_quant_config

__all__ = ["ModuleReport", "create_quant_config", "inspect_model", "prepare", "quantize_model", "save_model"]


def _eval_copy(model: nn.Module, share_weights: bool = False) -> nn.Module:
    """A copy of the model in eval mode: the user's module is never changed. ``share_weights``: the copy's
    parameters are the user's own tensors (one copy of the weights in memory, not two), for work that never
    changes a parameter in place (PTQ: ``fold_conv_bn`` and ``equalize_modules`` set new ones)."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        logger.warning("the model is in training mode; omct quantizes an eval-mode copy (BatchNorm uses its running "
                       "statistics, Dropout is off) and leaves your model as it is. Call model.eval() to silence this")
    try:
        work = _tree_copy(model) if share_weights and _plain_tree(model) else \
            copy.deepcopy(model, {id(p): p for p in model.parameters()} if share_weights else None)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"the model cannot be copied (copy.deepcopy failed: {e}); omct quantizes a copy so that "
                         "your model is not changed") from None
    return work.eval()


def _plain_tree(model: nn.Module) -> bool:
    """Whether every module deep-copies as its ``__dict__`` (no custom copy or pickled state, not TorchScript;
    a ``__setstate__`` such as ``_ConvNd``'s only fills in attributes of older pickles)."""
    base = nn.Module
    for m in model.modules():
        cls = type(m)
        if (isinstance(m, torch.jit.ScriptModule) or hasattr(cls, "__deepcopy__") or hasattr(cls, "__slots__")
                or cls.__getstate__ is not base.__getstate__ or cls.__reduce_ex__ is not base.__reduce_ex__
                or cls.__reduce__ is not base.__reduce__):
            return False
    return True


def _tree_copy(module: nn.Module, copies: dict[int, nn.Module] | None = None) -> nn.Module:
    """``copy.deepcopy(module)`` with the parameters shared, in a few dict copies per module: the module tree,
    hook and parameter tables and containers are new, buffers and other tensors are cloned, other attribute
    values are shared (deepcopy took 40-120 ms per call on the benchmark CNNs, twice per quantization)."""
    copies = {} if copies is None else copies
    if id(module) in copies:  # a submodule used at two places stays one module
        return copies[id(module)]
    cls = type(module)
    new = cls.__new__(cls)
    copies[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        kind = type(value)
        if key == "_modules":
            value = kind((k, None if c is None else _tree_copy(c, copies)) for k, c in value.items())
        elif key == "_parameters":
            value = kind(value)
        elif key == "_buffers":
            value = kind((k, None if b is None else b.clone()) for k, b in value.items())
        elif isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
            value = value.clone()
        elif kind in (dict, OrderedDict, list, set):
            value = kind(value)
        state[key] = value
    new.__dict__.update(state)
    return new


@dataclass
class ModuleReport:
    """What ``inspect_model`` finds: quantizable layers (module names), refused candidates with reasons, and
    Conv + BatchNorm pairs that ``do_fusion`` folds."""

    layers: list[LayerSpec]
    refused: list[Refusal]
    types: dict[str, str]
    foldable: dict[str, str]

    HEADERS = ("layer", "type", "status")

    def rows(self) -> list[list[str]]:
        """One row per candidate module: the quantizable ones (and the BatchNorm folded into them), then the
        ones left in float with their reason."""
        rows = []
        for s in self.layers:
            bn = self.foldable.get(s.name)
            rows.append([s.name, self.types.get(s.name, s.op_type), "quantizable" + (f" (folds {bn})" if bn else "")])
        return rows + [[r.name, r.op_type, f"float: {r.reason}"] for r in self.refused]

    def __str__(self) -> str:  # print(amct.inspect_model(...)) reads as a table, not dataclass reprs
        head = f"{len(self.layers)} quantizable modules, {len(self.refused)} left in float"
        return head + "\n" + format_table(list(self.HEADERS), self.rows())


def inspect_model(model: nn.Module, input_data) -> ModuleReport:
    traced = trace_model(_eval_copy(model, share_weights=True), input_data)
    # modules only: the chain ops between them (Add, MaxPool, ...) are quantized where their neighbours are
    modules = [s for s in traced.layers if s.chain is None]
    return ModuleReport(modules, traced.refused, traced.types, traced.batchnorm_after)


def prepare(traced: TracedModel, model: nn.Module) -> PreparedModel:
    """The PyTorch frontend's side of the contract: the traced graph, layers named after modules, and the
    modules' type names (Conv2d, Linear, ...)."""
    return PreparedModel(traced.model, traced.layers, traced.refused, dict(traced.types),
                         f"the {type(model).__name__} model", traced.module_names, {t.__name__ for t in SUPPORTED})


def create_quant_config(config_file: str | os.PathLike, model: nn.Module, input_data, skip_layers: list[str] | None = None,
                        batch_num: int = 1, activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None) -> None:
    """Write config.json: every quantizable module (by qualified name) with default (or .cfg) parameters.

    ``input_data`` is a tensor or a tuple of tensors that runs through ``model`` (as for torch.onnx.export).
    With ``config_defination`` (a simplified .cfg) skip_layers, batch_num and activation_offset are ignored.
    Layer types in the .cfg are PyTorch's: Conv2d, Linear, ConvTranspose2d, AvgPool2d, Conv1d, Conv3d.
    """
    check_outputs({"config_defination": config_defination}, {"config_file": config_file})
    args = as_args(input_data)
    work = _eval_copy(model, share_weights=True)
    key = fingerprint(model, args)  # the state this export is of, for quantize_model to reuse it
    traced = trace_model(work, input_data, on_export=lambda raw: CACHE.remember(model, key, raw))
    write_quant_config(config_file, prepare(traced, model), skip_layers=skip_layers, batch_num=batch_num,
                       activation_offset=activation_offset, config_defination=config_defination)


def quantize_model(config_file: str | os.PathLike, modified_onnx_model: str | os.PathLike, record_file: str | os.PathLike,
                   model: nn.Module, input_data, input_names: list[str] | None = None,
                   output_names: list[str] | None = None, dynamic_axes: dict | None = None) -> CalibrationModel:
    """Write the modified ONNX model and return the calibration module.

    Run ``batch_num`` forward passes through the returned module (it computes what ``model`` computes, on
    the model's own device); then the record file holds the factors and ``save_model`` can run.
    """
    check_outputs({"config_file": config_file},
                  {**output_files("modified_onnx_model", modified_onnx_model), "record_file": record_file})
    config = load_config(config_file)
    work, traced, mod = prepare_quantization(config, config_file, modified_onnx_model, record_file, model, input_data,
                                             input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes)
    return CalibrationModel(work, mod, str(record_file), release_statistics=True, example=as_args(input_data))


def _float_in_this_export(config: QuantConfig, traced: TracedModel, prepared: PreparedModel) -> QuantConfig:
    """``config`` without the layers it lists that this export cannot quantize, each named in a warning.

    Why: AMCT's ``create_quant_config`` takes no ``dynamic_axes``, so its export may differ from
    ``quantize_model``'s. A fully static export (``dynamic_axes={}``) makes BERT's position ids constants: the
    position-embedding lookup becomes a constant the runtime folds, and the config lists a layer this graph
    cannot quantize. Such a layer stays in float. Only a module of the model that this trace refused (with its
    reason) is forgiven: any other unknown name (a typo) is still ``check_config_against_model``'s one-line
    error."""
    here = {s.name for s in prepared.layers}
    dropped = {n: traced.reasons[n] for n in config.layers if n not in here and n in traced.reasons}
    for name, why in dropped.items():
        if config.layers[name].quant_enable:
            logger.warning("config layer '%s' stays in float: in quantize_model's export %s (create_quant_config takes "
                           "no dynamic_axes; another export may differ: a static shape folds constants)", name, why)
    if not dropped:
        return config
    return QuantConfig(config.globals, {n: c for n, c in config.layers.items() if n not in dropped})


def prepare_quantization(config: QuantConfig, config_file, modified_onnx_model, record_file, model: nn.Module, input_data,
                         config_for=None, **export) -> tuple[nn.Module, TracedModel, ModifiedModel]:
    """The eval-mode, BN-folded copy of ``model``, its traced ONNX graph, and the modified model written to disk.
    ``config_for(prepared)``, when given, turns the prepared model into the config the modified model is planned
    with (automatic NUQ: every layer that can take it calibrates NUQ's statistics)."""
    work = _eval_copy(model, share_weights=True)
    # create_quant_config's export of the same model in the same state, if any (dropped here in any case)
    reuse = CACHE.take(model, fingerprint(model, as_args(input_data))) if CACHE.holds(model) else None
    # with do_fusion the layers are found once, on the folded graph
    traced = trace_model(work, input_data, reuse=reuse, with_layers=not config.globals.do_fusion, **export)
    if config.globals.do_fusion:
        skip = set(config.globals.skip_fusion_layers)
        pairs = {c: b for c, b in traced.batchnorm_after.items() if c not in skip}
        folded = fold_conv_bn(work, pairs)
        if folded:
            logger.info("folded %d BatchNorm module(s) into convolutions", len(folded))
        traced = fold_traced(traced, work, {c: pairs[c] for c in folded})
    if config.globals.cross_layer_equalization:
        graph = onnx.ModelProto()
        graph.CopyFrom(traced.model)
        done = equalize_modules(work, equalize(graph))
        logger.info("cross-layer equalization: %d Conv2d pair(s)", len(done))
        if done:
            traced = trace_model(work, input_data, **export)
    prepared = prepare(traced, model)
    if config_for is not None:
        config = config_for(prepared)
    config = _float_in_this_export(config, traced, prepared)
    # Under torch.distributed rank 0 writes the modified model and the pending record; the others read it back.
    mod = distributed.on_rank0(lambda: write_modified_model(config, config_file, prepared, modified_onnx_model, record_file))
    if mod is None:
        mod = read_modified(modified_onnx_model)
    logger.info("wrote %s: %d layers to calibrate, %d activation tensors observed", modified_onnx_model,
                len(mod.plan.layers), len(mod.plan.sites))
    hints.info("now run %d batch(es) through the returned calibration model", config.batch_num)
    return work, traced, mod
