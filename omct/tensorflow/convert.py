"""TensorFlow model -> ONNX graph whose candidate nodes carry the user's names.

Sources: a Keras model (Keras 3 or tf.keras), a SavedModel directory (its serving signature), a frozen GraphDef
``.pb`` file or a ``tf.Graph`` (with ``input_names`` / ``output_names``). Each becomes a frozen GraphDef, which
tf2onnx converts without TensorFlow's grappler (grappler folds BatchNorm multipliers into convolutions and names
the result after the multiplier, which would lose the layer). tf2onnx's own optimizer still runs: it pushes the
NHWC transposes through the graph so that convolutions run in NCHW without a transpose around each.

Names, exactly:

* A weighted ONNX node (Conv, ConvTranspose, MatMul, Gemm) is matched to the TF op (Conv2D,
  DepthwiseConv2dNative, Conv2DBackpropInput, MatMul) whose weight holds the same multiset of values: tf2onnx
  only transposes and reshapes weights, so the sorted values are identical, whatever it names the node.
* Other nodes keep the name of the TF op they came from (tf2onnx suffixes ``__N`` are dropped for the lookup).
* Keras: while the model is traced, every layer's ``call`` records the ops it creates (the innermost layer wins),
  so each TF op belongs to exactly one layer; the layer's name is its path from the model (``conv2d``,
  ``block/conv``). Graphs: the TF op name (``resnet_v1_50/conv1/Conv2D``), as in AMCT's TensorFlow edition.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from omct.errors import ModelError
from omct.graph.ops import HANDLERS
from omct.tensorflow.fold import reshapes_to_flatten, squeeze_to_flatten
from omct.ui import logger

OPSET = 17
#: TF op type -> the input index of its weight
TF_WEIGHTED = {"Conv2D": 1, "DepthwiseConv2dNative": 1, "Conv2DBackpropInput": 1, "MatMul": 1}
ONNX_WEIGHTED = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}
_SUFFIX = re.compile(r"(__\d+)+$")
#: ONNX op type -> the TF op types it converts (a node named after a TF op of another type was added by tf2onnx)
SAME_OP = {"Conv": {"Conv2D", "DepthwiseConv2dNative"}, "ConvTranspose": {"Conv2DBackpropInput"},
           "MatMul": {"MatMul", "BatchMatMulV2"}, "Gemm": {"MatMul"}, "AveragePool": {"AvgPool"},
           "Add": {"Add", "AddV2", "BiasAdd"}, "Concat": {"ConcatV2"}, "GlobalAveragePool": {"Mean"},
           "MaxPool": {"MaxPool", "MaxPoolV2"}, "Pad": {"Pad", "PadV2", "MirrorPad"},
           "Resize": {"ResizeBilinear", "ResizeNearestNeighbor"}, "Reshape": {"Reshape"}, "Transpose": {"Transpose"},
           "Flatten": {"Reshape"}}


def tensorflow():
    """Import TensorFlow and tf2onnx, or say in one line what to install."""
    try:
        import tensorflow as tf
        import tf2onnx  # noqa: F401
    except ImportError as e:
        raise ImportError(f"omct.tensorflow needs TensorFlow and tf2onnx: pip install 'omct[tensorflow]' ({e})") from None
    return tf


@dataclass
class TFGraph:
    """A frozen TF graph and what the frontend knows about it."""

    graph_def: Any
    inputs: list[str]  # tensor names ("image:0")
    outputs: list[str]
    shapes: list[tuple]  # per input, None for a free dimension
    dtypes: list[Any]  # numpy dtypes
    description: str
    run: Any  # callable: list of arrays -> list of arrays (TF itself, for the float check)
    keras: bool = False
    owner: dict[str, str] = field(default_factory=dict)  # TF op -> layer path (Keras)
    layer_types: dict[str, str] = field(default_factory=dict)  # layer path -> Keras class name
    shared: set[str] = field(default_factory=set)  # layer paths called more than once


@dataclass
class Converted:
    model: onnx.ModelProto  # candidate nodes renamed to the user's names
    types: dict[str, str]  # node name -> the user's type name (Conv2D, Dense, ...)
    aliases: dict[str, str]  # TF op name -> node name (AMCT's op-name form for Keras layers)
    tf_graph: TFGraph


# ---------------------------------------------------------------------------------------------- sources

def _layer_paths(model) -> dict[int, tuple[str, Any]]:
    """id(layer) -> (path from the model, layer), every nested layer once."""
    paths: dict[int, tuple[str, Any]] = {}

    def walk(layer, prefix: str) -> None:
        for sub in layer._flatten_layers(include_self=False, recursive=False):
            if id(sub) in paths:
                continue
            path = prefix + sub.name
            paths[id(sub)] = (path, sub)
            walk(sub, path + "/")

    walk(model, "")
    return paths


def _keras_specs(model, tf) -> list:
    inputs = getattr(model, "inputs", None)
    if not inputs:
        raise ModelError(f"the Keras model '{model.name}' has no known inputs (a subclassed model); wrap it: "
                         "x = keras.Input(shape); model = keras.Model(x, your_model(x))")
    specs = []
    for i, t in enumerate(inputs):
        name = re.sub(r"[^A-Za-z0-9_.\-/]", "_", getattr(t, "name", None) or f"input_{i}").split(":")[0]
        specs.append(tf.TensorSpec(tuple(t.shape), tf.as_dtype(t.dtype), name=name))
    return specs


def _freeze(concrete, tf) -> tuple[Any, list[str], list[str]]:
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False, aggressive_inlining=True)
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    inputs = [t.name for t in frozen.inputs if t.dtype != tf.resource]
    outputs = [t.name for t in frozen.outputs]
    return graph_def, inputs, outputs


def _as_list(out) -> list:
    if isinstance(out, dict):
        return [out[k] for k in sorted(out)]
    return list(out) if isinstance(out, (list, tuple)) else [out]


def from_keras(model) -> TFGraph:
    tf = tensorflow()
    specs = _keras_specs(model, tf)
    paths = _layer_paths(model)
    owner: dict[str, str] = {}
    calls: Counter = Counter()
    patched = []

    def wrap(path: str, layer):
        original = layer.call

        def call(*args, **kwargs):
            graph = tf.compat.v1.get_default_graph()
            before = len(graph.get_operations())
            out = original(*args, **kwargs)
            calls[path] += 1
            for op in graph.get_operations()[before:]:
                owner.setdefault(op.name, path)  # inner layers return first: the innermost layer owns an op
            return out
        return call

    try:
        for path, layer in paths.values():
            object.__setattr__(layer, "call", wrap(path, layer))
            patched.append(layer)
        multi = len(specs) > 1
        fn = tf.function(lambda *xs: model(list(xs) if multi else xs[0], training=False))
        concrete = fn.get_concrete_function(*specs)
    finally:
        for layer in patched:
            object.__delattr__(layer, "call")
    graph_def, inputs, outputs = _freeze(concrete, tf)
    shared = {p for p, n in calls.items() if n > 1}

    def run(arrays: list) -> list:
        out = model(arrays if multi else arrays[0], training=False)
        return [np.asarray(o) for o in _as_list(out)]

    return TFGraph(graph_def, inputs, outputs, [tuple(s.shape) for s in specs], [s.dtype.as_numpy_dtype for s in specs],
                   f"the Keras model '{model.name}'", run, keras=True, owner=owner,
                   layer_types={p: type(layer).__name__ for p, layer in paths.values()}, shared=shared)


def from_saved_model(path: Path, signature: str = "serving_default") -> TFGraph:
    tf = tensorflow()
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:  # noqa: BLE001 - TF raises many types for an unreadable SavedModel
        raise ModelError(f"SavedModel '{path}' cannot be loaded: {str(e).splitlines()[0]}") from None
    sigs = dict(getattr(loaded, "signatures", {}) or {})
    if signature not in sigs:
        raise ModelError(f"SavedModel '{path}' has no '{signature}' signature (it has {sorted(sigs) or 'none'}); save it "
                         "with model.export(path) or tf.saved_model.save(model, path, signatures=...)")
    concrete = sigs[signature]
    graph_def, inputs, outputs = _freeze(concrete, tf)
    kwargs = concrete.structured_input_signature[1] or {}
    specs = [t for t in concrete.inputs if t.dtype != tf.resource]
    keys = sorted(concrete.structured_outputs) if isinstance(concrete.structured_outputs, dict) else None

    def run(arrays: list) -> list:  # the frozen inputs are the signature's placeholders, named after its arguments
        named = {t.split(":")[0]: a for t, a in zip(inputs, arrays, strict=True)}
        out = concrete(**{k: tf.constant(named[k]) for k in kwargs}) if kwargs and set(kwargs) <= set(named) \
            else concrete(*[tf.constant(a) for a in arrays])
        return [np.asarray(out[k]) for k in keys] if keys else [np.asarray(o) for o in _as_list(out)]

    return TFGraph(graph_def, inputs, outputs, [tuple(t.shape.as_list()) for t in specs],
                   [t.dtype.as_numpy_dtype for t in specs], f"SavedModel '{path}'", run)


def _tensor_name(name: str) -> str:
    return name if ":" in name else name + ":0"


def from_graph_def(graph_def, input_names: list[str] | None, output_names: list[str] | None, where: str) -> TFGraph:
    tf = tensorflow()
    placeholders = [n.name for n in graph_def.node if n.op == "Placeholder"]
    if not input_names or not output_names:
        raise ModelError(f"{where} is a frozen graph: name its tensors with input_names= and output_names= "
                         f"(placeholders: {placeholders[:8]})")
    ops = {n.name: n for n in graph_def.node}
    for kind, names in (("input", input_names), ("output", output_names)):
        for name in names:
            if name.split(":")[0] not in ops:
                hint = f"; its placeholders are {placeholders[:8]}" if kind == "input" else ""
                raise ModelError(f"{where} has no {kind} '{name}'{hint}")
    inputs = [_tensor_name(n) for n in input_names]
    outputs = [_tensor_name(n) for n in output_names]
    wrapped = tf.compat.v1.wrap_function(lambda: tf.compat.v1.import_graph_def(graph_def, name=""), [])
    try:
        pruned = wrapped.prune([wrapped.graph.get_tensor_by_name(n) for n in inputs],
                               [wrapped.graph.get_tensor_by_name(n) for n in outputs])
    except (KeyError, ValueError) as e:
        raise ModelError(f"{where}: {str(e).splitlines()[0]}") from None
    shapes, dtypes = [], []
    for n in inputs:
        t = wrapped.graph.get_tensor_by_name(n)
        shapes.append(tuple(t.shape.as_list()) if t.shape.rank is not None else ())
        dtypes.append(t.dtype.as_numpy_dtype)

    def run(arrays: list) -> list:
        return [np.asarray(o) for o in _as_list(pruned(*[tf.constant(a) for a in arrays]))]

    return TFGraph(graph_def, inputs, outputs, shapes, dtypes, where, run)


def load_source(model, input_names: list[str] | None = None, output_names: list[str] | None = None) -> TFGraph:
    """Any supported TensorFlow model -> a frozen ``TFGraph``."""
    tf = tensorflow()
    if isinstance(model, tf.Graph):
        return from_graph_def(model.as_graph_def(), input_names, output_names, "the tf.Graph")
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_dir():
            if not (path / "saved_model.pb").is_file() and not (path / "saved_model.pbtxt").is_file():
                raise ModelError(f"'{path}' is a folder without saved_model.pb: not a SavedModel directory")
            return from_saved_model(path)
        if not path.is_file():
            raise ModelError(f"model '{path}' does not exist (give a Keras model, a SavedModel directory or a frozen .pb)")
        if path.suffix == ".keras":
            import keras

            return from_keras(keras.models.load_model(path))
        graph_def = tf.compat.v1.GraphDef()
        try:
            graph_def.ParseFromString(path.read_bytes())
        except Exception:  # noqa: BLE001 - protobuf's DecodeError and friends
            raise ModelError(f"'{path}' is not a frozen GraphDef (.pb) file") from None
        if not graph_def.node:
            raise ModelError(f"'{path}' is not a frozen GraphDef (.pb) file: it has no nodes")
        return from_graph_def(graph_def, input_names, output_names, f"'{path}'")
    if hasattr(model, "_flatten_layers") and callable(model):
        return from_keras(model)
    raise ModelError(f"model must be a Keras model, a SavedModel directory, a frozen .pb path or a tf.Graph, "
                     f"got {type(model).__name__}")


# ---------------------------------------------------------------------------------------------- conversion

def _fingerprint(values: np.ndarray) -> tuple[int, str]:
    flat = np.sort(np.asarray(values, np.float32).ravel())
    return flat.size, hashlib.sha1(flat.tobytes()).hexdigest()


def _tf_weights(graph_def, tf) -> dict[tuple[int, str], list[str]]:
    """Weight fingerprint -> TF ops (of a quantizable type) that read it."""
    nodes = {n.name: n for n in graph_def.node}
    found: dict[tuple[int, str], list[str]] = {}
    for node in graph_def.node:
        index = TF_WEIGHTED.get(node.op)
        if index is None or len(node.input) <= index:
            continue
        src = nodes.get(node.input[index].split(":")[0].lstrip("^"))
        while src is not None and src.op in ("Identity", "ReadVariableOp") and src.input:
            src = nodes.get(src.input[0].split(":")[0])
        if src is None or src.op != "Const":
            continue
        found.setdefault(_fingerprint(tf.make_ndarray(src.attr["value"].tensor)), []).append(node.name)
    return found


def _convert(src: TFGraph) -> onnx.ModelProto:
    tf = tensorflow()
    from tf2onnx import optimizer, utils
    from tf2onnx.tfonnx import process_tf_graph

    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # its errors are raised as one line below
    utils.INTERNAL_NAME = 1  # the counter in the names of the nodes it adds: the same names for the same graph
    with tf.Graph().as_default() as graph:
        tf.import_graph_def(src.graph_def, name="")
        try:
            g = process_tf_graph(graph, input_names=src.inputs, output_names=src.outputs, opset=OPSET)
        except Exception as e:  # noqa: BLE001 - tf2onnx raises plain exceptions with the op types in the text
            text = " ".join(str(e).split())
            ops = re.findall(r"Counter\(\{(.*?)\}\)", text)
            detail = f"unsupported TensorFlow op(s) {ops[0]}" if ops else text[:300]
            raise ModelError(f"{src.description} cannot be converted to ONNX by tf2onnx: {detail}") from None
        _zero_biases(g)
        g = optimizer.optimize_graph(g)
        return g.make_model(f"converted from {src.description}")


def _zero_biases(g) -> None:
    """A zero bias on every convolution without one. tf2onnx's transpose optimizer multiplies a following constant
    Mul (a Keras 3 BatchNorm) into a bias-less Conv's weight; the weight then matches no layer's. omct folds the
    BatchNorm itself (``fold.fold_scale_shift``), after the names are known."""
    for node in g.get_nodes():
        if node.type not in ("Conv", "ConvTranspose") or len(node.input) != 2:
            continue
        shape = g.get_shape(node.input[1])
        if not shape or len(shape) < 2 or any(d is None or d < 0 for d in shape[:2]):
            continue
        channels = shape[0] if node.type == "Conv" else shape[1] * (node.get_attr_value("group") or 1)
        zero = g.make_const(f"{node.name}/omct_zero_bias", np.zeros(channels, np.float32))
        g.replace_inputs(node, list(node.input) + [zero.output[0]])


_COUNTER = re.compile(r"^(.*?)((?:__\d+)+)(:\d+)?$")


def _graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph (If/Loop bodies) inside it."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)):
                yield from _graphs(sub)


def stable_names(model: onnx.ModelProto) -> int:
    """Renumber tf2onnx's counter suffixes (``Mean_Squeeze__362:0``) in graph order; returns how many names changed.

    tf2onnx's optimizer iterates over sets of strings, so which counter a node gets (and which of two equal constants
    survives its deduplication) depends on Python's hash seed: the same model converted in another process had other
    tensor names, and ``omct analyze`` (which converts the model again) could not find the saved model's tensors. The
    graph's node order is deterministic, so numbering by it gives every process the same names."""
    graphs = list(_graphs(model.graph))
    fixed = {v.name for v in list(model.graph.input) + list(model.graph.output)}
    order: list[str] = []  # names with a counter, keyed without the ":N" output index, in first-seen order
    seen: set[str] = set()
    keys: set[str] = set()

    def visit(name: str) -> None:
        m = _COUNTER.match(name)
        key = name if m is None else m.group(1) + m.group(2)
        keys.add(key)
        if m is not None and name not in fixed and key not in seen:
            seen.add(key)
            order.append(key)

    for graph in graphs:
        for node in graph.node:
            for name in [node.name, *node.output, *node.input]:
                if name:
                    visit(name)
        for t in graph.initializer:
            visit(t.name)
    taken = keys - seen
    mapping: dict[str, str] = {}
    k = 1  # "__0" is left for the Flatten that fold.squeeze_to_flatten adds
    for key in order:
        base = _COUNTER.match(key).group(1)
        while f"{base}__{k}" in taken:
            k += 1
        mapping[key] = f"{base}__{k}"
        taken.add(mapping[key])
        k += 1

    def new(name: str) -> str:
        m = _COUNTER.match(name) if name and name not in fixed else None
        if m is None:
            return name
        return mapping.get(m.group(1) + m.group(2), m.group(1) + m.group(2)) + (m.group(3) or "")

    changed = sum(1 for key, value in mapping.items() if key != value)
    for graph in graphs:
        for node in graph.node:
            node.name = new(node.name)
            node.input[:] = [new(n) for n in node.input]
            node.output[:] = [new(n) for n in node.output]
        for t in graph.initializer:
            t.name = new(t.name)
        for v in list(graph.value_info) + ([] if graph is model.graph else [*graph.input, *graph.output]):
            v.name = new(v.name)
    return changed + _name_shared_constants(graphs, fixed)


def _name_shared_constants(graphs: list, fixed: set[str]) -> int:
    """A constant that several nodes read (tf2onnx keeps one of equal constants, whichever a set yields first) is
    named after its first reader in graph order: ``<reader>/<what it was>``."""
    readers: dict[str, list[str]] = {}
    for graph in graphs:
        for node in graph.node:
            for name in dict.fromkeys(node.input):
                readers.setdefault(name, []).append(node.name)
    order = {name: i for i, name in enumerate(readers)}  # first use in graph order, not the initializer list's order
    shared = sorted((t for graph in graphs for t in graph.initializer
                     if t.name not in fixed and len(readers.get(t.name, [])) > 1), key=lambda t: order[t.name])
    names = {n for graph in graphs for n in [*(t.name for t in graph.initializer), *(o for x in graph.node
                                                                                     for o in x.output)]}
    names -= {t.name for t in shared}
    mapping: dict[str, str] = {}
    for t in shared:
        leaf = _COUNTER.sub(r"\1", t.name.rsplit("/", 1)[-1].split(":")[0])
        new, k = f"{readers[t.name][0]}/{leaf}", 1
        while new in names:
            new, k = f"{readers[t.name][0]}/{leaf}_{k}", k + 1
        names.add(new)
        mapping[t.name] = new
    for graph in graphs:
        for node in graph.node:
            node.input[:] = [mapping.get(n, n) for n in node.input]
        for t in graph.initializer:
            t.name = mapping.get(t.name, t.name)
        for v in graph.value_info:
            v.name = mapping.get(v.name, v.name)
    return len(mapping)


def _unsupported(model: onnx.ModelProto, src: TFGraph) -> None:
    """tf2onnx leaves a TF op it cannot convert in the graph under its TF type: name the first one."""
    bad = [n for n in model.graph.node if n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)]
    if bad:
        raise ModelError(f"{src.description}: TensorFlow op '{bad[0].name}' ({bad[0].op_type}) has no ONNX conversion in "
                         f"tf2onnx ({len(bad)} such op(s)); replace it, or quantize the part of the model without it")


def convert(src: TFGraph) -> Converted:
    """Convert and name: see the module docstring."""
    tf = tensorflow()
    model = _convert(src)
    _unsupported(model, src)
    stable_names(model)
    squeeze_to_flatten(model)
    reshapes_to_flatten(model)
    tf_nodes = {n.name: n for n in src.graph_def.node}
    by_weight = _tf_weights(src.graph_def, tf)
    inits = {t.name: t for t in model.graph.initializer}

    def tf_op_of(node: onnx.NodeProto) -> str | None:
        index = ONNX_WEIGHTED.get(node.op_type)
        if index is not None and len(node.input) > index and node.input[index] in inits:
            ops = by_weight.get(_fingerprint(numpy_helper.to_array(inits[node.input[index]])), [])
            if len(ops) == 1:
                return ops[0]
            base = _SUFFIX.sub("", node.name)
            near = [op for op in ops if base.startswith(op.rsplit("/", 1)[0] + "/")]
            if len(near) == 1:
                return near[0]
        base = _SUFFIX.sub("", node.name)
        return base if base in tf_nodes else None

    def user_name(op: str) -> tuple[str, str]:
        """TF op -> (name, type) as the user knows them."""
        if src.keras and op in src.owner:
            path = src.owner[op]
            return path, src.layer_types.get(path, tf_nodes[op].op)
        return op, tf_nodes[op].op

    candidates = [n for n in model.graph.node if n.op_type in HANDLERS and n.domain in ("", "ai.onnx")]
    tf_ops = {id(n): tf_op_of(n) for n in candidates}
    primary: dict[str, onnx.NodeProto] = {}
    for node in candidates:
        op = tf_ops[id(node)]
        if op is None:
            continue
        name = user_name(op)[0]
        main = tf_nodes[op].op in SAME_OP.get(node.op_type, ())  # the op's own conversion, not a node tf2onnx added
        if main and name not in primary:
            primary[name] = node
    types: dict[str, str] = {}
    aliases: dict[str, str] = {}
    new_names: dict[int, str] = {}
    taken: set[str] = set(primary)
    kinds: Counter = Counter()
    for node in candidates:
        op = tf_ops[id(node)]
        if op is None:  # inserted by tf2onnx with a counter-based name: named by type and position, stable
            base, kind = f"{node.op_type}_{kinds[node.op_type]}", node.op_type
            kinds[node.op_type] += 1
        else:
            base, kind = user_name(op)
            if primary.get(base) is not node:  # a second op of the same layer (an inserted Reshape, the bias Add)
                base, kind = f"{base}/{node.op_type}", node.op_type
        name, k = base, 1
        while name in taken and primary.get(name) is not node:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        new_names[id(node)] = name
        types[name] = kind
        if op is not None and op != name and primary.get(name) is node:
            aliases[op] = name
    others = {n.name for n in model.graph.node if id(n) not in new_names}
    for node in candidates:
        name = new_names[id(node)]
        if name in others:  # a non-candidate node already has that name: keep tf2onnx's
            types[node.name] = types.pop(name)
            continue
        node.name = name
    return Converted(model, types, aliases, src)


def check_float(model_run, src: TFGraph, arrays: list, where: str) -> None:
    """The converted float model computes what TF computes on ``arrays`` (one line in the log, or ModelError)."""
    ref = src.run(arrays)
    got = model_run(arrays)
    worst = 0.0
    for i, (r, g) in enumerate(zip(ref, got, strict=False)):
        r, g = np.asarray(r, np.float64), np.asarray(g, np.float64)
        if r.shape != g.shape:
            raise ModelError(f"{where}: the converted model's output {i} has shape {list(g.shape)}, TensorFlow's "
                             f"{list(r.shape)}")
        scale = max(float(np.abs(r).max(initial=0.0)), 1e-6)
        err = float(np.abs(r - g).max(initial=0.0)) / scale
        worst = max(worst, err)
    tol = 1e-3
    if worst > tol:
        raise ModelError(f"{where}: the converted ONNX model differs from TensorFlow by {worst:.2e} (relative to the "
                         f"output's largest value; tolerance {tol:g}); the conversion is wrong for this model")
    logger.info("converted model matches TensorFlow on the first batch: max |difference| %.1e of the output range "
                "(tolerance %g)", worst, tol)


_LAST: list = []  # (key, Converted): the last conversion, reused by the next call on the same, unchanged model


def _cache_key(model, input_names, output_names) -> tuple | None:
    """Identifies a model and its weights: a Keras model by identity and a hash of every variable (a model trained
    further between create_quant_config and quantize_model is converted again), a file or folder by its files'
    paths, sizes and modification times."""
    names = (tuple(input_names or ()), tuple(output_names or ()))
    if hasattr(model, "_flatten_layers") and hasattr(model, "weights"):
        digest = hashlib.sha1()
        for v in model.weights:
            digest.update(np.ascontiguousarray(np.asarray(v)).tobytes())
        return ("keras", id(model), model.name, digest.hexdigest(), names)
    if isinstance(model, (str, os.PathLike)) and Path(model).exists():
        path = Path(model).resolve()
        files = sorted(path.rglob("*")) if path.is_dir() else [path]
        return ("path", str(path), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()),
                names)
    return None


def convert_model(model, input_names: list[str] | None = None, output_names: list[str] | None = None) -> Converted:
    """``convert(load_source(...))``, reusing the previous conversion when the same unchanged model comes again (AMCT's
    sequence converts the model in create_quant_config and again in quantize_model; tf2onnx takes seconds)."""
    key = _cache_key(model, input_names, output_names)
    if key is not None and _LAST and _LAST[0][0] == key:
        done = _LAST[0][1]
    else:
        done = convert(load_source(model, input_names, output_names))
        _LAST[:] = [(key, done)] if key is not None else []
    copy = onnx.ModelProto()
    copy.CopyFrom(done.model)
    return Converted(copy, dict(done.types), dict(done.aliases), done.tf_graph)
