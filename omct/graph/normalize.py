"""Graph normalisation before quantization.

* Constant nodes become initializers (exporters such as Paddle's keep weights in Constant nodes), and so do
  Identity nodes of an initializer (torch.onnx.export stores equal-valued parameters once and feeds the
  others through Identity: every zero bias of a freshly initialised Hugging Face model).
* Opsets below 13 are upgraded to 13 (per-channel QuantizeLinear/DequantizeLinear need it), or refused.
* Gemm's alpha and beta are folded into its constant B and C, transA becomes a Transpose in front, a constant
  C that broadcasts along the rows becomes a 1-D bias and any other constant C an Add after the Gemm, so that
  every Gemm is the plain ``A @ B' + bias`` that ONNX Runtime fuses into QGemm.
* Unnamed nodes are named ``{op_type}_{index}``, duplicate names get ``_1``, ``_2`` ...: stable and unique.
* Conv + BatchNormalization is folded (``do_fusion``), except for ``skip_fusion_layers``; inside control-flow
  bodies too, and so are the zero Pads below.
* A constant zero Pad in front of Convs (TF "same" padding, EfficientNet-Lite) is folded into their ``pads``
  (ONNX frontend): ONNX Runtime runs Pad in float between DequantizeLinear and QuantizeLinear, which splits the
  integer chain, and its own Pad + Conv fusion does not apply to a quantized graph.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from omct.errors import ModelError
from omct.graph.subgraphs import all_graphs, bodies, fresh_name, inner_first, node_reads, sub_graphs, taken_names, used_names
from omct.graph.tensor_data import tensor_array

MIN_OPSET = 13


@dataclass
class NormalizeReport:
    renamed: dict[str, str] = field(default_factory=dict)  # "#index (op)" or old name -> new name
    constants_moved: int = 0
    opset_from: int | None = None
    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, bn)
    gemms_rewritten: list[str] = field(default_factory=list)  # Gemm nodes whose alpha/beta/transA were folded
    pads_folded: list[str] = field(default_factory=list)  # Pad nodes folded into the Convs they feed
    ifs_inlined: list[tuple[str, str]] = field(default_factory=list)  # (If node, branch taken) replaced by the branch
    bodies_scoped: list[str] = field(default_factory=list)  # control-flow bodies whose names got their prefix


def default_opset(model: onnx.ModelProto) -> int:
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return op.version
    return 0


def upgrade_opset(model: onnx.ModelProto, report: NormalizeReport) -> onnx.ModelProto:
    version = default_opset(model)
    if version >= MIN_OPSET:
        return model
    try:
        upgraded = version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # the converter raises several exception types
        raise ModelError(f"the model uses opset {version}; omct needs opset >= {MIN_OPSET} for per-channel "
                         f"quantization and upgrading it failed ({str(e).splitlines()[0]}); re-export the model "
                         f"with opset {MIN_OPSET} or newer") from None
    report.opset_from = version
    return upgraded


def constants_to_initializers(model: onnx.ModelProto, report: NormalizeReport) -> None:
    graph = model.graph
    keep = []
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.attribute) == 1:
            attr = node.attribute[0]
            value = None
            if attr.name == "value":
                value = tensor_array(attr.t)
            elif attr.name in ("value_float", "value_floats"):
                value = np.array(attr.f if attr.name == "value_float" else list(attr.floats), np.float32)
            elif attr.name in ("value_int", "value_ints"):
                value = np.array(attr.i if attr.name == "value_int" else list(attr.ints), np.int64)
            if value is not None:
                graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
                report.constants_moved += 1
                continue
        keep.append(node)
    _keep_nodes(graph, keep)


def _keep_nodes(graph: onnx.GraphProto, keep: list[onnx.NodeProto]) -> None:
    """Leave only ``keep`` (in its order) in the graph, when anything was dropped."""
    if len(keep) != len(graph.node):
        del graph.node[:]
        graph.node.extend(keep)


def constant_identities_to_initializers(model: onnx.ModelProto, report: NormalizeReport | None = None) -> None:
    """Replace ``Identity(initializer)`` by a copy of the initializer under the Identity's output name, so that
    each layer has its own constant weight and bias again (a layer whose bias is computed is not quantized)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    keep = []
    for node in graph.node:
        if node.op_type == "Identity" and node.input and node.input[0] in inits and node.output[0] not in graph_outputs:
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            graph.initializer.append(copy)
            if report is not None:
                report.constants_moved += 1
            continue
        keep.append(node)
    _keep_nodes(graph, keep)


def name_nodes(model: onnx.ModelProto, report: NormalizeReport) -> None:
    used: set[str] = set()
    named = [n.name for n in model.graph.node if n.name]
    taken = set(named)
    for index, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{index}"
        if name in used or (not node.name and name in taken):
            base, k = name, 1
            while f"{base}_{k}" in used or f"{base}_{k}" in taken:
                k += 1
            name = f"{base}_{k}"
        if name != node.name:
            report.renamed[node.name or f"#{index} ({node.op_type})"] = name
            node.name = name
        used.add(name)


def normalize(model: onnx.ModelProto, in_place: bool = False) -> tuple[onnx.ModelProto, NormalizeReport]:
    """Return a normalised copy of ``model`` (the input proto is not modified; ``in_place``: no copy, for a
    model nobody else holds) and what was changed."""
    report = NormalizeReport()
    out = model
    if not in_place:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    out = upgrade_opset(out, report)
    inline_constant_ifs(out, report)
    constants_to_initializers(out, report)
    constant_identities_to_initializers(out, report)
    name_nodes(out, report)
    scope_bodies(out, report)
    plain_gemms(out, report)
    for body in _bodies(out.graph):  # the same steps inside If / Loop / Scan bodies
        constants_to_initializers(_GraphOnly(body), report)
        constant_identities_to_initializers(_GraphOnly(body), report)
        plain_gemms(_GraphOnly(body), report)
    return out, report


class _GraphOnly:
    """A body graph where a pass expects a model (the passes read ``model.graph`` only)."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph


def _bodies(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """Every graph nested in ``graph``, inner ones first (the passes rebuild node lists)."""
    return [g for g in inner_first(graph) if g is not graph]


def scope_bodies(model: onnx.ModelProto, report: NormalizeReport) -> None:
    """Give every node and tensor defined inside an If / Loop / Scan body the prefix ``<node>/<label>/``
    (``then``, ``else``, ``body``; nested bodies nest), so that names are unique in the whole model and layers
    read as the inlining of a constant If names them (``vad_if/then/conv1``). Outer-scope reads keep their
    names. Run after the top-level nodes are named."""
    taken = taken_names(model)
    for node in model.graph.node:
        _scope_node(node, taken, report)


def _scope_node(node: onnx.NodeProto, taken: set[str], report: NormalizeReport) -> None:
    fresh = functools.partial(fresh_name, taken)

    for label, body in bodies(node):
        prefix = f"{node.name}/{label}/"
        local = [i.name for i in body.input] + [t.name for t in body.initializer] + \
            [o for n in body.node for o in n.output if o]
        rename = {t: fresh(prefix + t.lstrip("/")) for t in dict.fromkeys(local)}
        for value in list(body.input) + list(body.output) + list(body.value_info):
            value.name = rename.get(value.name, value.name)
        for t in body.initializer:
            t.name = rename[t.name]
        for index, inner in enumerate(body.node):
            inner.input[:] = [rename.get(x, x) for x in inner.input]
            inner.output[:] = [rename.get(x, x) if x else x for x in inner.output]
            inner.name = fresh(prefix + (inner.name.lstrip("/") or f"{inner.op_type}_{index}"))
            for attr in inner.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    _rename_reads(sub, rename)
        report.bodies_scoped.append(prefix[:-1])
        for inner in body.node:
            _scope_node(inner, taken, report)


def plain_gemms(model: onnx.ModelProto, report: NormalizeReport) -> None:
    """Fold alpha into a constant B and beta into a constant C (new initializers: shared ones stay intact), and
    turn transA into a Transpose of A. The rewritten graph computes the same; what cannot be folded (a computed
    B or C) is left for the Gemm handler to refuse."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    added: list[tuple[int, onnx.NodeProto]] = []

    def scaled(name: str, factor: float, new_name: str) -> str:
        value = (tensor_array(inits[name]).astype(np.float64) * factor).astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(value, new_name))
        inits[new_name] = graph.initializer[-1]
        return new_name

    for position, node in enumerate(graph.node):
        if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx"):
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        alpha, beta, trans_a = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0)), int(attrs.get("transA", 0))
        has_c = len(node.input) > 2 and bool(node.input[2])
        changed = False
        if alpha != 1.0 and node.input[1] in inits:
            node.input[1] = scaled(node.input[1], alpha, f"{node.name}.B_alpha")
            alpha, changed = 1.0, True
        if beta != 1.0 and (not has_c or node.input[2] in inits):
            if has_c:
                node.input[2] = scaled(node.input[2], beta, f"{node.name}.C_beta")
            beta, changed = 1.0, True
        if has_c and node.input[2] in inits and node.input[1] in inits:
            c = tensor_array(inits[node.input[2]])
            b_dims = inits[node.input[1]].dims
            n_out = b_dims[0] if attrs.get("transB", 0) else b_dims[-1]
            if c.shape != (n_out,) and (c.size == 1 or c.shape == (1, n_out)):  # the same value for every row
                bias = np.broadcast_to(c.reshape(-1), (n_out,)).astype(c.dtype)
                graph.initializer.append(numpy_helper.from_array(bias, f"{node.name}.bias"))
                inits[f"{node.name}.bias"] = graph.initializer[-1]
                node.input[2], changed = f"{node.name}.bias", True
            elif c.shape != (n_out,):  # a value per row: an elementwise Add after the product
                product = f"{node.name}.product"
                added.append((position + 1, onnx.helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                                                   name=f"{node.name}.C")))
                node.output[0] = product
                del node.input[2]
                changed = True
        if trans_a and node.input[1] in inits:
            transposed = f"{node.name}.A_transposed"
            added.append((position, onnx.helper.make_node("Transpose", [node.input[0]], [transposed], perm=[1, 0],
                                                           name=f"{node.name}.transA")))
            node.input[0] = transposed
            trans_a, changed = 0, True
        if changed:
            keep = [a for a in node.attribute if a.name not in ("alpha", "beta", "transA")]
            del node.attribute[:]
            node.attribute.extend(keep)
            node.attribute.extend(onnx.helper.make_attribute(k, v) for k, v in
                                  (("alpha", alpha), ("beta", beta), ("transA", trans_a)) if v != (1.0 if k != "transA" else 0))
            report.gemms_rewritten.append(node.name)
    for offset, (position, new_node) in enumerate(sorted(added, key=lambda item: item[0])):  # stable: graph order
        graph.node.insert(position + offset, new_node)


def _links(graph: onnx.GraphProto) -> tuple[dict, dict[str, list[onnx.NodeProto]], dict[str, onnx.NodeProto], set[str]]:
    """Initializers, readers and producer of each tensor, and the graph outputs: what the folding passes look up.
    A control-flow node reads what its bodies read from outside (a tensor they read is not the folder's to move)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node_reads(node):
            consumers.setdefault(name, []).append(node)
    return ({t.name: t for t in graph.initializer}, consumers, {o: n for n in graph.node for o in n.output},
            {o.name for o in graph.output})


def _scopes(model: onnx.ModelProto) -> list[tuple[onnx.GraphProto, tuple[onnx.GraphProto, ...]]]:
    """Every graph of ``model`` with its enclosing graphs (outermost first), inner graphs before their parents
    (as ``inner_first``: a pass may rebuild a graph's node list, which copies the bodies in it)."""
    found = []

    def walk(graph: onnx.GraphProto, outer: tuple[onnx.GraphProto, ...]) -> None:
        found.append((graph, outer))
        for node in graph.node:
            for sub in sub_graphs(node):
                walk(sub, (*outer, graph))

    walk(model.graph, ())
    return found[::-1]


def _visible_initializers(graph: onnx.GraphProto, outer: tuple[onnx.GraphProto, ...]) -> dict:
    """The initializers ``graph`` can read: those of the graphs around it and its own (names are unique)."""
    return {t.name: t for g in (*outer, graph) for t in g.initializer}


def fold_batchnorm(model: onnx.ModelProto, skip: set[str], report: NormalizeReport) -> None:
    """Fold BatchNormalization into the Conv that feeds it (in place) when the Conv feeds nothing else; inside
    If / Loop / Scan bodies too (a body's weights may be initializers of an enclosing graph: the folded ones
    are new initializers of the body, named uniquely in the whole model)."""
    before, taken = len(report.folded), None
    for graph, outer in _scopes(model):
        if any(n.op_type == "BatchNormalization" for n in graph.node):
            taken = taken_names(model) if taken is None else taken
            _fold_batchnorm_in(graph, _visible_initializers(graph, outer), skip, report, taken)
    if len(report.folded) > before:
        _drop_unused_initializers(model)


def _fold_batchnorm_in(graph: onnx.GraphProto, inits: dict, skip: set[str], report: NormalizeReport,
                       taken: set[str]) -> None:
    _, consumers, producers, graph_outputs = _links(graph)
    removed = set()
    for bn in list(graph.node):
        if bn.op_type != "BatchNormalization" or any(bn.output[1:]):
            continue
        conv = producers.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or conv.name in skip:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in graph_outputs:
            continue
        names = [conv.input[1], *bn.input[1:5]] + ([conv.input[2]] if len(conv.input) > 2 and conv.input[2] else [])
        if not all(n in inits for n in names):
            continue
        if any(a.name == "training_mode" and a.i for a in bn.attribute):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        w = tensor_array(inits[conv.input[1]]).astype(np.float64)
        gamma, beta, mean, var = (tensor_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        b = tensor_array(inits[conv.input[2]]).astype(np.float64) if len(names) == 6 else np.zeros(w.shape[0])
        factor = gamma / np.sqrt(var + eps)
        new_w = (w * factor.reshape(-1, *([1] * (w.ndim - 1)))).astype(np.float32)
        new_b = ((b - mean) * factor + beta).astype(np.float32)
        w_name, b_name = fresh_name(taken, f"{conv.name}.weight_folded"), fresh_name(taken, f"{conv.name}.bias_folded")
        graph.initializer.extend([numpy_helper.from_array(new_w, w_name), numpy_helper.from_array(new_b, b_name)])
        data_input = conv.input[0]
        del conv.input[:]
        conv.input.extend([data_input, w_name, b_name])
        conv.output[0] = bn.output[0]
        removed.add(id(bn))
        report.folded.append((conv.name, bn.name))
    if removed:
        _keep_nodes(graph, [n for n in graph.node if id(n) not in removed])


def _constant(name: str, inits: dict, producers: dict, limit: int = 32) -> tuple[np.ndarray, list] | None:
    """The value of ``name`` when it is an initializer or computed from initializers alone by a few nodes (the
    pads torch.onnx.export computes for ``F.pad`` with Concat/Slice/Transpose/Reshape/Cast), and those nodes."""
    if name in inits:
        return tensor_array(inits[name]), []
    order: list[onnx.NodeProto] = []
    leaves: set[str] = set()

    def visit(t: str) -> bool:
        if t in inits:
            leaves.add(t)
            return True
        node = producers.get(t)
        if node is None or len(order) >= limit or node.domain not in ("", "ai.onnx"):
            return False
        if any(n is node for n in order):
            return True
        if not all(visit(i) for i in node.input if i):
            return False
        order.append(node)
        return True

    if not visit(name):
        return None
    from onnx.reference import ReferenceEvaluator

    graph = onnx.helper.make_graph(order, "pads", [], [onnx.helper.make_tensor_value_info(name, 0, None)],
                                   [inits[t] for t in sorted(leaves)])
    try:
        return np.asarray(ReferenceEvaluator(onnx.helper.make_model(graph)).run(None, {})[0]), order
    except Exception:  # not evaluable here (an op the reference runtime lacks): the Pad stays
        return None


def _zero_spatial_pads(pad: onnx.NodeProto, inits: dict, producers: dict) -> tuple[list[int], list] | None:
    """A Pad's [begin..., end...] pads of the spatial axes, when it pads with zeros on those axes only, and the
    nodes that compute them."""
    mode = next((a.s.decode() for a in pad.attribute if a.name == "mode"), "constant")
    if mode != "constant" or len(pad.input) < 2 or (len(pad.input) > 3 and pad.input[3]):
        return None
    if len(pad.input) > 2 and pad.input[2]:
        value = _constant(pad.input[2], inits, producers)
        if value is None or value[0].size != 1 or float(value[0].ravel()[0]) != 0.0:
            return None
    found = _constant(pad.input[1], inits, producers)
    if found is None:
        return None
    pads = found[0].astype(np.int64).ravel().tolist()
    rank = len(pads) // 2
    if rank < 3 or any(p < 0 for p in pads) or pads[0] or pads[1] or pads[rank] or pads[rank + 1]:
        return None
    return pads[2:rank] + pads[rank + 2:], found[1]


def fold_pads(model: onnx.ModelProto, report: NormalizeReport) -> None:
    """Fold a constant zero Pad into the Convs that read it (in place): Conv's own ``pads`` say the same. Inside
    If / Loop / Scan bodies too (pads computed from initializers of an enclosing graph included)."""
    before = len(report.pads_folded)
    for graph, outer in _scopes(model):
        if any(n.op_type == "Pad" for n in graph.node):
            _fold_pads_in(graph, _visible_initializers(graph, outer), report)
    if len(report.pads_folded) > before:
        _drop_unused_initializers(model)


def _fold_pads_in(graph: onnx.GraphProto, inits: dict, report: NormalizeReport) -> None:
    _, consumers, producers, graph_outputs = _links(graph)
    removed, computing = set(), []
    for pad in graph.node:
        if pad.op_type != "Pad" or pad.domain not in ("", "ai.onnx") or pad.output[0] in graph_outputs:
            continue
        users = consumers.get(pad.output[0], [])
        if not users or any(u.op_type != "Conv" or u.input[0] != pad.output[0] for u in users):
            continue
        found = _zero_spatial_pads(pad, inits, producers)
        extra = found[0] if found else None
        if extra is None or not users or any(u.op_type != "Conv" or u.input[0] != pad.output[0] for u in users):
            continue
        if any(a.name == "auto_pad" and a.s.decode() not in ("NOTSET", "") for u in users for a in u.attribute):
            continue
        for conv in users:
            old = next((a for a in conv.attribute if a.name == "pads"), None)
            base = list(old.ints) if old is not None else [0] * len(extra)
            if old is not None:
                conv.attribute.remove(old)
            conv.attribute.append(onnx.helper.make_attribute("pads", [a + b for a, b in zip(base, extra, strict=True)]))
            conv.input[0] = pad.input[0]
        removed.add(id(pad))
        computing += found[1]
        report.pads_folded.append(pad.name)
    # the nodes that computed the folded pads, once nothing else reads them
    used = {i for n in graph.node if id(n) not in removed for i in node_reads(n)} | graph_outputs
    for node in reversed(computing):
        if id(node) not in removed and not any(o in used for o in node.output):
            removed.add(id(node))
            used = {i for n in graph.node if id(n) not in removed for i in node_reads(n)} | graph_outputs
    if removed:
        _keep_nodes(graph, [n for n in graph.node if id(n) not in removed])


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove the initializers nothing reads, in every graph (reads inside nested bodies count); in place:
    ``extend`` would copy every weight kept."""
    for graph in all_graphs(model.graph):
        used = used_names(graph)
        for i in reversed(range(len(graph.initializer))):
            if graph.initializer[i].name not in used:
                del graph.initializer[i]


drop_unused_initializers = _drop_unused_initializers  # for the frontends that rewrite a graph (pytorch.trace)


def fix_inputs(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of ``model`` with the graph inputs in ``values`` replaced by constants (Silero VAD's sample rate):
    an ``If`` whose condition then is constant is replaced by the branch it takes when the model is normalised,
    so that the layers in that branch are found, calibrated and quantized like any other."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inputs = {i.name: i for i in out.graph.input}
    for name, value in values.items():
        if name not in inputs:
            raise ModelError(f"fix_inputs: '{name}' is not an input of the model (inputs: {', '.join(inputs)})")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(inputs[name].type.tensor_type.elem_type)
        out.graph.initializer.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    keep = [i for i in out.graph.input if i.name not in values]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    return out


def _used_names(nodes, outputs) -> set[str]:
    """Every tensor name read by ``nodes`` or in the bodies of their control-flow nodes (outer-scope reads)."""
    used = {o.name for o in outputs}
    for node in nodes:
        used.update(node.input)
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                used |= _used_names(body.node, body.output)
    return used


def _rename_reads(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Rename the outer-scope reads of a nested body (its own tensors shadow the outer ones and keep their names)."""
    own = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {o for n in graph.node for o in n.output}
    outer = {k: v for k, v in rename.items() if k not in own}
    for node in graph.node:
        node.input[:] = [outer.get(x, x) for x in node.input]
        for attr in node.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _rename_reads(body, outer)
    for o in graph.output:
        o.name = outer.get(o.name, o.name)


def _inline_branch(node: onnx.NodeProto, branch: onnx.GraphProto, label: str, taken: set[str]):
    """The nodes and initializers of ``branch`` renamed into the outer graph: its own tensors and nodes get the
    prefix ``<if node>/<label>/`` (unique, readable layer names), outer-scope reads keep their names, and its
    outputs are produced under the If node's output names."""
    prefix = f"{node.name or 'If'}/{label}/"
    fresh = functools.partial(fresh_name, taken)

    local = [t.name for t in branch.initializer] + [o for n in branch.node for o in n.output if o]
    rename = {t: fresh(prefix + t.lstrip("/")) for t in local}  # torch's "/a/Conv" -> "/If/then/a/Conv"
    tail, done = [], set()
    for inner, outer in zip(branch.output, node.output, strict=False):
        if not outer:
            continue
        if inner.name in rename and inner.name not in done:
            rename[inner.name] = outer
            done.add(inner.name)
        else:  # an outer-scope tensor or a second output of the same tensor
            tail.append(onnx.helper.make_node("Identity", [rename.get(inner.name, inner.name)], [outer],
                                              name=fresh(f"{prefix}output_{outer}")))
    nodes = []
    for index, inner in enumerate(branch.node):
        new = onnx.NodeProto()
        new.CopyFrom(inner)
        new.name = fresh(prefix + (inner.name.lstrip("/") or f"{inner.op_type}_{index}"))
        new.input[:] = [rename.get(x, x) for x in inner.input]
        new.output[:] = [rename.get(x, x) if x else x for x in inner.output]
        for attr in new.attribute:
            for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                _rename_reads(body, rename)
        nodes.append(new)
    inits = []
    for t in branch.initializer:
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename[t.name]
        inits.append(copy)
    return nodes + tail, inits


def inline_constant_ifs(model: onnx.ModelProto, report: NormalizeReport) -> None:
    """Replace each top-level ``If`` whose condition is constant by the branch it takes (nested ones follow once
    they are top level). Layers inside a branch become ``<if node>/then/<layer>``; ONNX Runtime then sees one
    flat graph and fuses their Q/DQ into integer kernels as anywhere else."""
    graph = model.graph
    while True:
        inits, consumers, producers, outputs = _links(graph)
        for position, node in enumerate(graph.node):
            if node.op_type != "If" or node.domain not in ("", "ai.onnx"):
                continue
            found = _constant(node.input[0], inits, producers)
            if found is None or found[0].size != 1:
                continue
            value, order = found
            label = "then" if bool(value.reshape(-1)[0]) else "else"
            branch = next(a.g for a in node.attribute if a.name == f"{label}_branch")
            taken = {n for x in graph.node for n in list(x.input) + list(x.output)} | set(inits) | \
                {i.name for i in graph.input} | {x.name for x in graph.node}
            new_nodes, new_inits = _inline_branch(node, branch, label, taken)
            nodes = list(graph.node)
            nodes[position:position + 1] = new_nodes
            used, freed = _used_names(nodes, graph.output), set(node.input)
            for dead in reversed(order):  # the condition's own computation, when nothing else reads it
                if not any(o in used for o in dead.output):
                    nodes = [n for n in nodes if n is not dead]
                    used, freed = _used_names(nodes, graph.output), freed | set(dead.input)
            report.ifs_inlined.append((node.name, label))
            del graph.node[:]
            graph.node.extend(nodes)
            graph.initializer.extend(new_inits)
            for i in reversed(range(len(graph.initializer))):  # in place: extend() would copy every weight
                if graph.initializer[i].name in freed - used:
                    del graph.initializer[i]
            break
        else:
            return
