"""Control-flow bodies (If branches, Loop and Scan bodies): walking them, and carrying their tensors out.

After normalisation every tensor and node inside a body has a model-wide unique name
(``<if>/then/<name>``, ``<loop>/body/<name>``), so the rest of omct addresses them by name like any other.

ONNX Runtime returns only top-level tensors. To observe a tensor inside a body, calibration instruments the
model (``carry_out``): the tensor leaves its body as an extra output of the body and of its control-flow node,
body by body up to a graph output. A Loop or Scan stacks the extra output over the iterations (an extra scan
output), so the observer sees the value of every iteration; an If gets the extra output in every branch, an
empty placeholder in the branches that do not hold the tensor (ONNX Runtime accepts branches whose outputs
differ in shape), so a batch that takes the other branch yields an empty array and is skipped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

#: op type -> graph attribute -> the label in the names of the body's nodes and tensors
CONTROL_FLOW = {"If": {"then_branch": "then", "else_branch": "else"}, "Loop": {"body": "body"}, "Scan": {"body": "body"}}
LOOPS = ("Loop", "Scan")
#: name prefix of the nodes ``carry_out`` adds (removed again by ``remove_carry``)
OBSERVE = "omct.observe"


def bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(label, body) of an If / Loop / Scan node of the default domain; [] for any other node."""
    labels = CONTROL_FLOW.get(node.op_type) if node.domain in ("", "ai.onnx") else None
    if not labels:
        return []
    return [(labels[a.name], a.g) for a in node.attribute if a.name in labels and a.type == onnx.AttributeProto.GRAPH]


_GRAPH, _GRAPHS, _UNDEFINED = onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS, onnx.AttributeProto.UNDEFINED


def sub_graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """Every graph attribute of ``node`` (control flow or not). By the attribute's type: reading ``graphs`` of
    every attribute cost a whole ResNet's export ~10 ms of protobuf wrappers (PTQ wall, issue 17 item 9)."""
    found = []
    for a in node.attribute:
        kind = a.type
        if kind == _GRAPH:
            found.append(a.g)
        elif kind == _GRAPHS or kind == _UNDEFINED:
            found.extend(a.graphs)
    return found


def all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in it, each before the graphs inside it."""
    yield graph
    for node in graph.node:
        for sub in sub_graphs(node):
            yield from all_graphs(sub)


def inner_first(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``all_graphs`` with every graph after the graphs inside it: the order for passes that rebuild a graph's
    node list (``del graph.node[:]`` + ``extend`` copies the nodes, so a nested graph reached before its
    parent was rebuilt would be a detached copy)."""
    return list(all_graphs(graph))[::-1]


def local_names(graph: onnx.GraphProto) -> set[str]:
    """The tensors ``graph`` itself defines: its inputs, initializers and node outputs."""
    return ({i.name for i in graph.input} | {t.name for t in graph.initializer}
            | {o for n in graph.node for o in n.output if o})


def taken_names(model: onnx.ModelProto) -> set[str]:
    """Every tensor and node name in ``model``, its bodies included: what a new name must avoid."""
    return {n for g in all_graphs(model.graph) for n in local_names(g) | {x.name for x in g.node}}


def fresh_name(taken: set[str], base: str) -> str:
    """``base``, with underscores appended until it is not in ``taken``; the name returned is added to it."""
    name = base
    while name in taken:
        name += "_"
    taken.add(name)
    return name


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """The tensors ``graph`` (or a graph nested in it) reads from an enclosing scope."""
    reads = {o.name for o in graph.output}
    for node in graph.node:
        reads.update(i for i in node.input if i)
        for sub in sub_graphs(node):
            reads |= outer_reads(sub)
    return reads - local_names(graph)


def node_reads(node: onnx.NodeProto) -> list[str]:
    """What ``node`` reads: its inputs and, for a control-flow node, what its bodies read from outside."""
    reads = [i for i in node.input if i]
    for sub in sub_graphs(node):
        reads += sorted(outer_reads(sub) - set(reads))
    return reads


def used_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name ``graph``'s nodes and outputs read, inside bodies too."""
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(node.input)
        for sub in sub_graphs(node):
            used |= used_names(sub)
    return used


Step = tuple[onnx.NodeProto, str, onnx.GraphProto]  # control-flow node, body label, body


def locate(model: onnx.ModelProto) -> tuple[dict[str, tuple[Step, ...]], dict[str, onnx.GraphProto]]:
    """Where each tensor defined inside a body lives (the control-flow steps from the top graph down to its
    body), and the graph holding each named node."""
    where: dict[str, tuple[Step, ...]] = {}
    graph_of: dict[str, onnx.GraphProto] = {}

    def walk(graph: onnx.GraphProto, path: tuple[Step, ...]) -> None:
        if path:
            for name in local_names(graph):
                where.setdefault(name, path)
        for node in graph.node:
            graph_of[node.name] = graph
            for label, body in bodies(node):
                walk(body, path + ((node, label, body),))

    walk(model.graph, ())
    return where, graph_of


def scope_of(path: tuple[Step, ...]) -> str:
    """``outer_if/then/loop/body``: where a body sits, as its names are prefixed."""
    return f"{path[-1][0].name}/{path[-1][1]}" if path else ""


def carry_out(model: onnx.ModelProto, tensors: list[str]) -> tuple[dict[str, tuple[str, int]], dict[str, list[int]]]:
    """Instrument ``model`` (in place) so that each tensor of ``tensors`` that lives inside a body reaches a graph
    output. Returns tensor -> (graph output, number of stacked iteration axes in front of its value) and, for
    ``remove_carry``, control-flow node -> [outputs it had, outputs added]."""
    where, _ = locate(model)
    taken = taken_names(model)
    carried: dict[str, tuple[str, int]] = {}
    added: dict[str, list[int]] = {}
    fresh = functools.partial(fresh_name, taken)

    for tensor in tensors:
        path = where.get(tensor)
        if not path:
            continue
        name, stacked = tensor, 0
        for node, label, _ in reversed(path):  # innermost body first
            entry = added.setdefault(node.name, [len(node.output), 0])
            for other_label, body in bodies(node):
                out = fresh(f"{OBSERVE}/{tensor}/{other_label}")
                if other_label == label:
                    body.node.append(helper.make_node("Identity", [name], [out], name=fresh(f"{OBSERVE}/{out}")))
                else:  # the branch without the tensor: an empty placeholder
                    body.node.append(helper.make_node("Constant", [], [out], name=fresh(f"{OBSERVE}/{out}"),
                                                      value=numpy_helper.from_array(np.zeros(0, np.float32))))
                body.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
            name = fresh(f"{OBSERVE}/{tensor}")
            node.output.append(name)
            entry[1] += 1
            if node.op_type == "Scan":
                for a in node.attribute:
                    if a.name in ("scan_output_axes", "scan_output_directions"):
                        a.ints.append(0)
            stacked += node.op_type in LOOPS
        model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        carried[tensor] = (name, stacked)
    return carried, added


def remove_carry(model: onnx.ModelProto, added: Mapping[str, list[int]]) -> None:
    """Undo ``carry_out``'s changes to the bodies and control-flow nodes (in place; the graph outputs it added
    are removed by the caller, with the other calibration outputs)."""
    if not added:
        return
    for graph in inner_first(model.graph):
        keep = [n for n in graph.node if not n.name.startswith(OBSERVE + "/")]
        if len(keep) != len(graph.node):
            del graph.node[:]
            graph.node.extend(keep)
        for node in graph.node:
            if node.name not in added:
                continue
            count, extra = added[node.name]
            del node.output[count:]
            for _, body in bodies(node):
                del body.output[len(body.output) - extra:]
            for a in node.attribute:
                if a.name in ("scan_output_axes", "scan_output_directions") and len(a.ints) >= extra:
                    del a.ints[len(a.ints) - extra:]


def carried_values(carried: Mapping[str, tuple[str, int]], values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The observed tensors from a run's outputs: a tensor carried out of a body is read from its output, its
    iteration axes merged into the batch axis ([iterations, N, C, ...] -> [iterations * N, C, ...]); an empty
    value (a branch not taken, a loop that ran no iteration) is left out."""
    out = {}
    for tensor, (name, stacked) in carried.items():
        value = np.asarray(values[name])
        if value.size == 0:
            continue
        if stacked:
            value = value.reshape((-1,) + value.shape[stacked + 1:]) if value.ndim > stacked else value.reshape(-1)
        out[tensor] = value
    return out
