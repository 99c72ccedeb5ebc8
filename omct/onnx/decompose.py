"""Tensor decomposition on an ONNX model: each qualifying Conv node (constant weight, groups 1, dilation 1,
square kernel of 3 or more, stride at most 2) becomes two (``K x 1``, ``1 x K``) or three (1x1, ``K x K``, 1x1)
Conv nodes named ``<node>.0``, ``<node>.1``...; the result is checked in ONNX Runtime before it is written.

    import omct.onnx as amct
    changes = amct.auto_decomposition("model.onnx", "model_decomposed.onnx", decompose_info_path=None)
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import helper, numpy_helper

from omct.core.decomposition import FORMS
from omct.decompose.info import layer_entry, write_info
from omct.decompose.plan import DecomposeOptions, child_specs, decide, geometry, refusal
from omct.errors import ConfigError, ModelError
from omct.fileio import check_outputs
from omct.graph.model_io import input_files, load_model, output_files, save_model, session_input
from omct.graph.normalize import NormalizeReport, name_nodes
from omct.graph.tensor_data import tensor_array
from omct.ui import logger

#: images per layer kept for the data-aware fit
MAX_IMAGES = 256


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Static spatial sizes of 4-D tensors, from ONNX shape inference (empty where unknown)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - sizes are optional: nominal ones are used
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            out[vi.name] = (dims[2].dim_value, dims[3].dim_value)
    return out


def _candidates(model: onnx.ModelProto) -> tuple[list[onnx.NodeProto], dict[str, str]]:
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    uses: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            uses[i] = uses.get(i, 0) + 1
    convs, kept = [], {}
    for node in graph.node:
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        a = _attrs(node)
        w = node.input[1]
        if w not in inits:
            kept[node.name] = "weight is not a constant initializer"
            continue
        shape = next(t.dims for t in graph.initializer if t.name == w)
        kernel = tuple(shape[2:])
        nd = len(kernel)
        why = refusal(a.get("group", 1), a.get("dilations", [1] * nd), kernel, a.get("strides", [1] * nd))
        if why is None and a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            why = f"auto_pad {a['auto_pad']!r} (explicit pads only)"
        if why is None and (uses.get(w, 0) > 1 or (len(node.input) > 2 and node.input[2] and uses.get(node.input[2], 0) > 1)):
            why = "weight shared with another node"
        if why is None and len(node.input) > 2 and node.input[2] and node.input[2] not in inits:
            why = "bias is not a constant initializer"
        if why:
            kept[node.name] = why
        else:
            convs.append(node)
    return convs, kept


def _as_batches(calibration_data) -> list[dict[str, np.ndarray]]:
    if calibration_data is None:
        return []
    batches = [calibration_data] if isinstance(calibration_data, dict) else list(calibration_data)
    if not all(isinstance(b, dict) for b in batches):
        raise ConfigError("calibration_data must be a dict of input name -> array, or a list of such dicts")
    return batches


def _session(model: onnx.ModelProto):
    """A session on ``model`` without copying a lazily loaded model's weights (``model_io.session_input``)."""
    import tempfile

    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        source, folder = session_input(model, tmp)
        if folder is not None:
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
        return ort.InferenceSession(source if isinstance(source, bytes) else str(source), so,
                                    providers=["CPUExecutionProvider"])


def _tensors(model: onnx.ModelProto, names: list[str], batches) -> dict[str, np.ndarray]:
    """Tensors of ``model`` on the calibration batches (ONNX Runtime, the tensors as extra outputs), at most
    MAX_IMAGES images each."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    have = {o.name for o in probe.graph.output}
    wanted = sorted(set(names))
    for t in wanted:
        if t not in have:
            probe.graph.output.append(helper.make_value_info(t, onnx.TypeProto()))
    sess = _session(probe)
    got: dict[str, list[np.ndarray]] = {t: [] for t in wanted}
    for b in batches:
        for t, v in zip(wanted, sess.run(wanted, b), strict=True):
            if sum(len(x) for x in got[t]) < MAX_IMAGES:
                got[t].append(v)
    return {t: np.concatenate(v)[:MAX_IMAGES] for t, v in got.items()}


def _rewrite(graph: onnx.GraphProto, node: onnx.NodeProto, decision) -> list[str]:
    c, g = decision.chosen, decision.geometry
    specs = child_specs(c.form, c.ranks, g, bias=c.bias is not None)
    position = list(graph.node).index(node)
    new_nodes, names = [], []
    prev = node.input[0]
    for i, (s, w) in enumerate(zip(specs, c.weights, strict=True)):
        name = f"{node.name}.{i}"
        graph.initializer.append(numpy_helper.from_array(w, f"{name}.weight"))
        inputs = [prev, f"{name}.weight"]
        if s["bias"]:
            graph.initializer.append(numpy_helper.from_array(c.bias, f"{name}.bias"))
            inputs.append(f"{name}.bias")
        out = node.output[0] if i == len(specs) - 1 else f"{name}.output"
        new_nodes.append(helper.make_node("Conv", inputs, [out], name=name, kernel_shape=list(s["kernel"]),
                                          strides=list(s["stride"]), pads=list(s["pads"]), dilations=[1, 1], group=1))
        names.append(name)
        prev = out
    old_inputs = [i for i in node.input[1:] if i]
    graph.node.remove(node)
    for k, n in enumerate(new_nodes):
        graph.node.insert(position + k, n)
    for t in [t for t in graph.initializer if t.name in old_inputs]:
        graph.initializer.remove(t)
    return names


def auto_decomposition(model_file: str | os.PathLike, save_path: str | os.PathLike,
                       decompose_info_path: str | os.PathLike | None = None, calibration_data=None,
                       rank_budget: float | None = None, max_error: float | None = None, rank_multiple: int = 16,
                       forms: tuple[str, ...] = FORMS, check_latency: bool = True,
                       latency_batch: int = 1) -> dict[str, list[str]]:
    """Decompose the qualifying Conv nodes of ``model_file`` and write the model to ``save_path``; returns
    ``changes`` (node name -> new node names). ``calibration_data`` (feeds dict or list of them, optional): the
    factors are fitted to the layers' real inputs, and the outputs of both models are compared on it. Ranks
    and checks as in ``omct.pytorch.auto_decomposition``. Fine-tune (or accept the reported error) afterwards."""
    check_outputs({**input_files("model_file", model_file)},
                  {**output_files("save_path", save_path), "decompose_info_path": decompose_info_path})
    options = DecomposeOptions(rank_budget=rank_budget, max_error=max_error, rank_multiple=rank_multiple,
                               forms=tuple(forms), check_latency=check_latency, latency_batch=latency_batch)
    batches = _as_batches(calibration_data)
    model = load_model(model_file)
    name_nodes(model, NormalizeReport())
    convs, kept = _candidates(model)
    shapes = _spatial_shapes(model)
    seen = _tensors(model, [n.input[0] for n in convs] + [n.output[0] for n in convs], batches) if batches and convs else {}
    inits = {t.name: t for t in model.graph.initializer}
    changes, entries = {}, {}
    for node in convs:
        a = _attrs(node)
        weight = tensor_array(inits[node.input[1]]).astype(np.float64)
        bias = tensor_array(inits[node.input[2]]).astype(np.float64) if len(node.input) > 2 and node.input[2] else None
        x = seen.get(node.input[0])
        in_hw = x.shape[2:] if x is not None else shapes.get(node.input[0])
        if x is not None and changes:  # the inputs the layer gets once those before it are decomposed
            x = _tensors(model, [node.input[0]], batches)[node.input[0]]
        g = geometry(weight.shape[0], weight.shape[1], weight.shape[2], a.get("strides", [1, 1]),
                     a.get("pads", [0, 0, 0, 0]), in_hw)
        d = decide(node.name, weight, bias, g, options, x, seen.get(node.output[0]))
        logger.info(d.summary())
        if d.chosen is None:
            kept[node.name] = d.reason
            continue
        changes[node.name] = _rewrite(model.graph, node, d)
        entries[node.name] = layer_entry(d, changes[node.name], d.chosen.bias is not None)
    if not changes:
        logger.warning(f"auto_decomposition: nothing decomposable in '{model_file}' (" +
                       ("; ".join(f"{n}: {r}" for n, r in kept.items()) or "no Conv node") + "); written unchanged")
    elif batches:
        _check_outputs(model_file, model, batches[0])
    save_model(model, save_path)
    if decompose_info_path is not None:
        write_info(decompose_info_path, entries, kept, {"rank_budget": rank_budget, "max_error": max_error,
                                                        "rank_multiple": rank_multiple, "forms": list(forms)})
    return changes


def _check_outputs(model_file, model: onnx.ModelProto, feeds: dict) -> None:
    """Run the decomposed model in ONNX Runtime next to the original and report how close the outputs are."""
    try:
        new = _session(model).run(None, feeds)
    except Exception as e:  # noqa: BLE001 - a model ORT cannot run must not be written
        raise ModelError(f"the decomposed model of '{model_file}' does not run in ONNX Runtime: {e}") from None
    old = _session(load_model(model_file)).run(None, feeds)
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        rel = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
        logger.info(f"output #{i}: relative error {rel:.3g} against the original on the calibration data")
