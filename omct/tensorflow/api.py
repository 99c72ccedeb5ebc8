"""Implementation of ``omct.tensorflow``: AMCT's TensorFlow call sequence on the shared ONNX workflow."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from omct.errors import ConfigError, DataError, ModelError, RecordError
from omct.feeds import batch_rows, shape_text, warn_few_samples
from omct.fileio import check_outputs
from omct.formats.config import QuantConfig, load_config
from omct.frontend import PreparedModel
from omct.graph.model_io import output_files
from omct.graph.modified import ModifiedModel, read_modified
from omct.graph.normalize import fold_batchnorm, fold_pads, normalize
from omct.graph.ops import HANDLERS, LayerSpec, Refusal, find_layers
from omct.quantize import Calibration, CalibrationStatus, initializer_reader, ort_session
from omct.tensorflow.convert import Converted, TFGraph, check_float, convert_model
from omct.tensorflow.fold import fold_scale_shift
from omct.ui import format_table, hints, logger
from omct.workflow import save_model as _save_model
from omct.workflow import write_modified_model, write_quant_config

__all__ = ["CalibrationModel", "TFModelReport", "create_quant_config", "inspect_model", "prepare", "quantize_model",
           "save_model"]

#: Keras layer classes and TF op types omct quantizes (what ``override_layer_types`` / ``skip_layer_types`` take)
TYPE_NAMES = {"Conv2D", "DepthwiseConv2D", "Conv2DTranspose", "Dense", "AveragePooling2D", "Conv1D", "SeparableConv2D",
              "DepthwiseConv2dNative", "Conv2DBackpropInput", "MatMul", "AvgPool"}


@dataclass
class Prepared:
    prepared: PreparedModel
    converted: Converted

    @property
    def source(self) -> TFGraph:
        return self.converted.tf_graph


def prepare(model: Any, config: QuantConfig | None = None, input_names: list[str] | None = None,
            output_names: list[str] | None = None, fusion: dict | None = None) -> Prepared:
    """The TensorFlow frontend's side of the contract: convert, name, normalise, fold BatchNorm (when ``config``,
    or a saved model's ``fusion`` metadata, says so) and find the layers; types are Keras class names (or TF op
    types for graphs)."""
    conv = convert_model(model, input_names, output_names)
    norm, rep = normalize(conv.model)
    fold_pads(norm, rep)
    if config is not None:
        fusion = {"do_fusion": config.globals.do_fusion, "skip_fusion_layers": config.globals.skip_fusion_layers}
    if fusion is not None and fusion.get("do_fusion", True):
        skip = set(fusion.get("skip_fusion_layers", []))
        fold_batchnorm(norm, skip, rep)
        folded = fold_scale_shift(norm, skip)
        if rep.folded or folded:
            logger.info("folded %d BatchNorm(s) into the layers before them", len(rep.folded) + len(folded))
    layers, refused = find_layers(norm)
    shared = conv.tf_graph.shared  # as in the PyTorch frontend: a layer run twice per pass stays in float
    if shared:
        refused += [Refusal(s.name, s.op_type, "the Keras layer is called more than once per forward pass")
                    for s in layers if s.name in shared or s.name.rsplit("/", 1)[0] in shared]
        layers = [s for s in layers if not (s.name in shared or s.name.rsplit("/", 1)[0] in shared)]
    types = {s.name: conv.types.get(s.name, s.op_type) for s in layers}
    names = {n.name for n in norm.graph.node} | set(conv.types) | set(conv.aliases)
    prepared = PreparedModel(norm, layers, refused, types, conv.tf_graph.description, names,
                             set(HANDLERS) | TYPE_NAMES | set(conv.types.values()))
    return Prepared(prepared, conv)


def _translate(names: list[str] | None, aliases: dict[str, str]) -> list[str] | None:
    return None if names is None or isinstance(names, str) else [aliases.get(n, n) for n in names]


def tf_type_aliases(converted: Converted) -> dict[str, list[str]]:
    """For a Keras model: TF op type -> the Keras classes of the layers built on it, where the names differ
    (``DepthwiseConv2dNative`` -> ``DepthwiseConv2D``, ``MatMul`` -> ``Dense``, ``AvgPool`` -> ``AveragePooling2D``):
    AMCT's TensorFlow samples name layer types by TF op type in a .cfg."""
    if not converted.tf_graph.keras:
        return {}
    op_type = {n.name: n.op for n in converted.tf_graph.graph_def.node}
    keras_types = set(converted.types.values())
    found: dict[str, list[str]] = {}
    for op, name in converted.aliases.items():
        tf_type, keras_type = op_type.get(op), converted.types.get(name)
        if tf_type and keras_type and tf_type not in keras_types and keras_type not in found.get(tf_type, []):
            found.setdefault(tf_type, []).append(keras_type)
    return found


def _cfg_with_layer_names(config_defination, converted: Converted, folder: str) -> str | os.PathLike | None:
    """A .cfg that names Keras layers by TF op name, or their types by TF op type (AMCT's forms), rewritten to layer
    names and Keras classes (a copy; else as is). Line numbers stay, so errors still point into the user's file."""
    aliases, types = converted.aliases, tf_type_aliases(converted)
    if not config_defination or not (aliases or types):
        return config_defination
    text = Path(config_defination).read_text()
    new = text
    for op, name in aliases.items():
        new = new.replace(f'"{op}"', f'"{name}"')
    for tf_type, keras_types in types.items():
        new = re.sub(rf'(skip_layer_types\s*:\s*)"{re.escape(tf_type)}"',
                     lambda m, ks=keras_types: " ".join(f'{m.group(1)}"{k}"' for k in ks), new)
        if len(keras_types) > 1 and re.search(rf'layer_type\s*:\s*"{re.escape(tf_type)}"', new):
            raise ConfigError(f"{config_defination}: override_layer_types '{tf_type}' is the TF op of several Keras layer "
                              f"types here ({', '.join(keras_types)}): override each by its Keras class name")
        new = re.sub(rf'(layer_type\s*:\s*)"{re.escape(tf_type)}"', lambda m, k=keras_types[0]: f'{m.group(1)}"{k}"', new)
    if new == text:
        return config_defination
    copy = Path(folder) / Path(config_defination).name
    copy.write_text(new)
    return copy


@dataclass
class TFModelReport:
    """What ``inspect_model`` finds: quantizable layers (the user's names and types) and refused candidates."""

    layers: list[LayerSpec]
    refused: list[Refusal]
    types: dict[str, str]
    aliases: dict[str, str]

    HEADERS = ("layer", "type", "TF op", "status")

    def rows(self) -> list[list[str]]:
        ops = {v: k for k, v in self.aliases.items()}
        return ([[s.name, self.types.get(s.name, s.op_type), ops.get(s.name, s.name), "quantizable"] for s in self.layers]
                + [[r.name, r.op_type, ops.get(r.name, r.name), f"float: {r.reason}"] for r in self.refused])

    def __str__(self) -> str:
        return (f"{len(self.layers)} quantizable layers, {len(self.refused)} left in float\n"
                + format_table(list(self.HEADERS), self.rows()))


def inspect_model(model: Any, input_names: list[str] | None = None, output_names: list[str] | None = None) -> TFModelReport:
    p = prepare(model, input_names=input_names, output_names=output_names)
    return TFModelReport(p.prepared.layers, p.prepared.refused, p.prepared.layer_types, p.converted.aliases)


def create_quant_config(config_file: str | os.PathLike, model: Any, skip_layers: list[str] | None = None,
                        batch_num: int = 1, activation_offset: bool = True,
                        config_defination: str | os.PathLike | None = None, *, input_names: list[str] | None = None,
                        output_names: list[str] | None = None) -> None:
    """Write config.json: every quantizable layer of ``model`` (Keras layer names, or TF op names for graphs).

    ``model``: a Keras model, a SavedModel directory, or a frozen .pb / tf.Graph with ``input_names`` and
    ``output_names``. Layers may also be named by their TF op (``"model/conv2d/Conv2D"``) in ``skip_layers`` and
    the .cfg, as AMCT's TensorFlow samples do. With ``config_defination`` the other three arguments are ignored.
    """
    check_outputs({"config_defination": config_defination}, {"config_file": config_file})
    p = prepare(model, input_names=input_names, output_names=output_names)
    with tempfile.TemporaryDirectory() as folder:
        cfg = _cfg_with_layer_names(config_defination, p.converted, folder)
        try:
            write_quant_config(config_file, p.prepared, skip_layers=_translate(skip_layers, p.converted.aliases),
                               batch_num=batch_num, activation_offset=activation_offset, config_defination=cfg)
        except ConfigError as e:  # name the user's .cfg, not the rewritten copy
            raise ConfigError(str(e).replace(str(cfg), str(config_defination))) from None


def default_modified_file(record_file: str | os.PathLike) -> Path:
    """Where ``quantize_model`` keeps the calibration graph that ``save_model`` reads: beside the record file."""
    record = Path(record_file)
    return record.with_name(record.stem + "_modified.onnx")


def _name(tensor: str) -> str:
    return tensor[:-2] if tensor.endswith(":0") else tensor


class CalibrationModel(CalibrationStatus):
    """Call it like the model, ``calibration_model(x)``, on ``batch_num`` batches (NHWC arrays or tf tensors; a list
    or dict for several inputs); it returns what the model returns, as NumPy, and feeds the calibration. The first
    batch is also run through TensorFlow to check the conversion (the difference is logged)."""

    def __init__(self, mod: ModifiedModel, modified_file: Path, source: TFGraph, record_file: str):
        self.record_file = record_file
        self.modified_file = modified_file
        self.source = source
        self._session = ort_session(str(modified_file))
        self.calibration = Calibration(mod.plan, mod.config, initializer_reader(mod.model), record_file)
        added = set(mod.added_outputs)
        self._inputs = self._session.get_inputs()
        self._user_outputs = [o.name for o in self._session.get_outputs() if o.name not in added]
        self._site_tensors = self.calibration.tensors()
        self._mod = mod
        self._checked = False
        self._samples = 0
        self._extra = 0

    def feeds(self, x: Any) -> dict[str, np.ndarray]:
        """``x`` as ONNX Runtime feeds, checked: DataError names the input, what it expects and what came."""
        names = [_name(i.name) for i in self._inputs]
        if isinstance(x, Mapping):
            unknown = [k for k in x if _name(k) not in names]
            if unknown:
                raise DataError(f"calibration_model: '{unknown[0]}' is not an input of the model; its inputs are {names}")
            arrays = [x.get(n, x.get(n + ":0")) for n in names]
        elif isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and len(self._inputs) > 1:
            arrays = list(x)
        else:
            arrays = [x]
        if len(arrays) != len(names) or any(a is None for a in arrays):
            raise DataError(f"calibration_model: the model takes {len(names)} input(s) {names}, got {len(arrays)}")
        out = {}
        for spec, name, a, shape, dtype in zip(self._inputs, names, arrays, self.source.shapes, self.source.dtypes,
                                               strict=True):
            value = np.asarray(a)
            if value.dtype != dtype and value.dtype.kind == "f" and np.dtype(dtype).kind == "f":
                value = value.astype(dtype)
            elif value.dtype != dtype:
                raise DataError(f"calibration_model: input '{name}' expects {np.dtype(dtype).name}, got {value.dtype.name}")
            expected = shape_text([d if d is not None else "?" for d in shape])
            bad = len(value.shape) != len(shape) or any(d is not None and d != n for d, n in zip(shape, value.shape,
                                                                                                   strict=False))
            if bad:
                hint = ""
                if len(shape) == 4 and value.ndim == 4 and shape[3] is not None and value.shape[1] == shape[3] \
                        and value.shape[3] != shape[3]:
                    hint = " (that looks like NCHW; TensorFlow models take NHWC: x.transpose(0, 2, 3, 1))"
                raise DataError(f"calibration_model: input '{name}' expects shape {expected} as the model takes it, got "
                                f"{list(value.shape)}{hint}")
            out[spec.name] = value
        return out

    def __call__(self, x: Any) -> Any:
        feeds = self.feeds(x)
        if self.calibration.done:
            self._extra += 1
            if self._extra == 1:
                logger.warning("calibration_model: calibration finished after batch_num=%d batches; further batches are "
                               "not used (raise batch_num to use them)", self.batch_num)
            return self._result(self._session.run(self._user_outputs, feeds))
        self.calibration.keep_inputs(sum(v.nbytes for v in feeds.values()),
                                     lambda: {k: v.copy() for k, v in feeds.items()})
        wanted = self._user_outputs
        fetch = wanted + [t for t in self._mod.fetch_names(self._site_tensors) if t not in wanted]

        def observe():
            values = self._session.run(fetch, feeds)
            self.calibration.observe(self._mod.observed(self._site_tensors, dict(zip(fetch, values, strict=False))))
            return values[: len(wanted)]

        out = self.calibration.run_batch(observe)
        if not self._checked:
            self._checked = True
            check_float(lambda _arrays: out, self.source, list(feeds.values()), "calibration_model")
        self._samples += batch_rows(feeds)
        if self.calibration.done:
            warn_few_samples(self._samples, self.calibration.batches, "")
        return self._result(out)

    @staticmethod
    def _result(values: list) -> Any:
        return values[0] if len(values) == 1 else list(values)


def start_calibration(model: Any, config: QuantConfig, config_file, record_file, modified_file: Path,
                      input_names=None, output_names=None) -> tuple[Prepared, CalibrationModel]:
    p = prepare(model, config, input_names, output_names)
    mod = write_modified_model(config, config_file, p.prepared, modified_file, record_file)
    logger.info("wrote %s: %d layers to calibrate, %d activation tensors observed", modified_file, len(mod.plan.layers),
                len(mod.plan.sites))
    hints.info("now run %d batch(es) through the returned calibration model", config.batch_num)
    return p, CalibrationModel(mod, Path(modified_file), p.source, str(record_file))


def quantize_model(model: Any, config_file: str | os.PathLike, record_file: str | os.PathLike, *,
                   input_names: list[str] | None = None, output_names: list[str] | None = None,
                   modified_onnx_file: str | os.PathLike | None = None) -> CalibrationModel:
    """Return the calibration model; run ``batch_num`` batches through it, then ``save_model``.

    The calibration graph is written to ``modified_onnx_file`` (default: ``<record>_modified.onnx`` beside the
    record file), where ``save_model`` finds it.
    """
    modified = Path(modified_onnx_file) if modified_onnx_file else default_modified_file(record_file)
    check_outputs({"config_file": config_file}, {**output_files("modified_onnx_file", modified), "record_file": record_file})
    config = load_config(config_file)
    return start_calibration(model, config, config_file, record_file, modified, input_names, output_names)[1]


def save_model(model: Any, *args: Any, modified_onnx_file: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """AMCT's ``save_model``: ``save_model(model, record_file, save_path)``, or the TensorFlow edition's graph form
    ``save_model(pb_model, outputs, record_file, save_path)``. Writes ``save_path + '_fake_quant_model.onnx'`` and
    ``save_path + '_deploy_model.onnx'``."""
    if len(args) == 3:
        outputs, record_file, save_path = args
    elif len(args) == 2:
        outputs, (record_file, save_path) = None, args
    else:
        raise TypeError("save_model(model, record_file, save_path) or save_model(pb_model, outputs, record_file, save_path)")
    modified = Path(modified_onnx_file) if modified_onnx_file else default_modified_file(record_file)
    if not modified.is_file():
        raise RecordError(f"'{modified}' (the calibration graph quantize_model writes beside the record file) does not "
                          "exist: run quantize_model with this record_file first")
    mod = read_modified(modified)
    if outputs is not None:
        have = [_name(o.name) for o in mod.model.graph.output if o.name not in set(mod.added_outputs)]
        want = [_name(o if ":" in o else o + ":0") for o in ([outputs] if isinstance(outputs, str) else outputs)]
        if sorted(want) != sorted(have):
            raise ModelError(f"save_model: outputs {want} are not the outputs the model was quantized with ({have})")
    _check_same_model(model, mod)
    return _save_model(modified, record_file, save_path)


def _check_same_model(model: Any, mod: ModifiedModel) -> None:
    """For a Keras model: every quantized layer is one of its layers (else the files belong to another model)."""
    if not hasattr(model, "_flatten_layers"):
        return
    from omct.tensorflow.convert import _layer_paths

    paths = {p for p, _ in _layer_paths(model).values()}
    for name, spec in mod.plan.layers.items():
        # a layer's second weighted op (SeparableConv2D's pointwise convolution) is named "<layer>/<op type>"
        if spec.weight is not None and name not in paths and name.rsplit("/", 1)[0] not in paths:
            raise RecordError(f"save_model: layer '{name}' of the calibration graph is not a layer of the Keras model "
                              f"'{model.name}': the record belongs to another model")
