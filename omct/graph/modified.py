"""The modified (calibration) model: the normalised model (BN folded, nodes named) with the observed
activation tensors added as graph outputs (tensors inside control-flow bodies carried out to one, see
``subgraphs.carry_out``), and the plan, config and record file path in its metadata, so that
AMCT's ``save_model(modified_onnx_file, record_file, save_path)`` needs nothing else."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from omct.errors import ModelError
from omct.formats.config import QuantConfig
from omct.graph import metadata
from omct.graph.model_io import load_model
from omct.graph.plan import Plan
from omct.graph.subgraphs import carried_values, carry_out, remove_carry


@dataclass
class ModifiedModel:
    model: onnx.ModelProto  # with calibration outputs
    plan: Plan
    config: QuantConfig
    added_outputs: list[str]
    carried: dict[str, tuple[str, int]] = field(default_factory=dict)  # tensor in a body -> (output, iteration axes)
    carry_nodes: dict[str, list[int]] = field(default_factory=dict)  # control-flow node -> [outputs, outputs added]

    def fetch_names(self, tensors: list[str]) -> list[str]:
        """The model outputs to fetch for ``tensors`` (a tensor inside a body: the output it is carried to)."""
        return [self.carried[t][0] if t in self.carried else t for t in tensors]

    def observed(self, tensors: list[str], values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``tensors``' values from a run's outputs by name (``fetch_names``); a tensor of a body that did not run
        (an If branch not taken) is left out, a loop body's iterations are stacked into the batch axis."""
        out = {t: values[t] for t in tensors if t not in self.carried}
        out.update(carried_values({t: self.carried[t] for t in tensors if t in self.carried}, values))
        return out

    def base_model(self, in_place: bool = False) -> onnx.ModelProto:
        """The normalised model without calibration outputs or omct metadata (``in_place``: ``self.model`` itself
        becomes it, no copy of the weights)."""
        base = self.model
        if not in_place:
            base = onnx.ModelProto()
            base.CopyFrom(self.model)
        added = set(self.added_outputs)
        keep = [o for o in base.graph.output if o.name not in added]
        del base.graph.output[:]
        base.graph.output.extend(keep)
        remove_carry(base, self.carry_nodes)
        metadata.strip(base)
        return base

    @property
    def record_file(self) -> str | None:
        return metadata.read(self.model).get(metadata.RECORD_FILE)


def make_modified(base: onnx.ModelProto, plan: Plan, config: QuantConfig, observed: list[str]) -> ModifiedModel:
    """``base`` with the ``observed`` tensors (what the calibration reads) added as outputs, and its metadata."""
    model = onnx.ModelProto()
    model.CopyFrom(base)
    existing = {o.name for o in model.graph.output}
    carried, nodes = carry_out(model, observed)  # tensors inside control-flow bodies: carried to new outputs
    added = [t for t in observed if t not in existing and t not in carried]
    for t in added:
        model.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    added += [name for name, _ in carried.values()]
    for key, value in ((metadata.PLAN, plan.to_json()), (metadata.CONFIG, json.dumps(config.to_dict())),
                       (metadata.ADDED_OUTPUTS, json.dumps(added))):
        model.metadata_props.add(key=key, value=value)
    if carried:
        model.metadata_props.add(key=metadata.CARRIED, value=json.dumps({"tensors": carried, "nodes": nodes}))
    return ModifiedModel(model, plan, config, added, carried, nodes)


def partial_model(model: onnx.ModelProto, outputs: list[str], available: set[str]) -> onnx.ModelProto | None:
    """The part of ``model`` that computes ``outputs`` from the tensors in ``available`` (they become FLOAT
    inputs), the model's own inputs and its initializers: the nodes between them, in graph order. Why: a
    frontend that sees most tensors already (the PyTorch hooks) computes the few others without running the
    whole model a second time. None when a needed node has a subgraph (its outer-scope reads are not traced)."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    inits = {t.name: t for t in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input if i.name not in inits}
    needed: set[int] = set()
    feeds: list[str] = []
    seen: set[str] = set()
    stack = list(outputs)
    while stack:
        t = stack.pop()
        if not t or t in seen:
            continue
        seen.add(t)
        if t in available or t in graph_inputs:
            feeds.append(t)
            continue
        if t in inits:
            continue
        node = producer.get(t)
        if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return None
        needed.add(id(node))
        stack.extend(node.input)
    nodes = [n for n in graph.node if id(n) in needed]
    used = {i for n in nodes for i in n.input}
    inputs = [graph_inputs[t] if t in graph_inputs else helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
              for t in sorted(feeds)]
    part = helper.make_graph(nodes, f"{graph.name}_part", inputs,
                             [helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in outputs],
                             [inits[t] for t in sorted(used & set(inits))])
    out = helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    out.functions.extend(model.functions)
    return out


def read_modified(path: str | Path) -> ModifiedModel:
    model = load_model(path, "modified model", lazy=True)
    meta = metadata.read(model)
    if metadata.PLAN not in meta:
        raise ModelError(f"'{path}' is not a modified model written by omct's quantize_model; pass the "
                         "modified_onnx_file that quantize_model wrote")
    carry = json.loads(meta.get(metadata.CARRIED, '{"tensors": {}, "nodes": {}}'))
    return ModifiedModel(model, Plan.from_json(meta[metadata.PLAN]),
                         QuantConfig.from_dict(json.loads(meta[metadata.CONFIG]), f"{path} (embedded config)"),
                         json.loads(meta[metadata.ADDED_OUTPUTS]),
                         {t: (name, int(n)) for t, (name, n) in carry["tensors"].items()}, carry["nodes"])


def stamp_layers(model: onnx.ModelProto, plan: Plan, config: QuantConfig, records: dict | None = None) -> None:
    """Record in a saved model which layers are quantized, which tensor shows each one's result and which range
    its input is quantized to, and how BatchNorm was folded, so that ``omct analyze`` can line it up with the
    float model and say how much of each input was clipped."""
    layers = []
    for n, s in plan.layers.items():
        entry = {"name": n, "op_type": s.op_type,
                 "output_site": plan.sites[plan.output_site[n]].tensor if n in plan.output_site else None}
        rec = (records or {}).get(n)
        if rec is not None and not s.weight_only and n in plan.input_site:
            bits = plan.sites[plan.input_site[n]].act.get("num_bits", 8)
            lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            entry.update(input=s.input, input_scale=rec.scale_d,
                         input_range=[(lo - rec.offset_d) * rec.scale_d, (hi - rec.offset_d) * rec.scale_d])
        layers.append(entry)
    fusion = {"do_fusion": config.globals.do_fusion, "skip_fusion_layers": list(config.globals.skip_fusion_layers)}
    if config.globals.cross_layer_equalization:
        fusion["cross_layer_equalization"] = True
    for key, value in ((metadata.LAYERS, layers), (metadata.FUSION, fusion)):
        model.metadata_props.add(key=key, value=json.dumps(value, separators=(",", ":")))
