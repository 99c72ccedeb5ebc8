"""From an ``nn.Module`` to an ONNX graph whose quantizable nodes carry the modules' qualified names.

Why markers instead of the exporter's node names: scope names say nothing about a module that runs twice,
a Linear that becomes MatMul + Add, or a weight used functionally. During export each candidate module's
output passes through an identity ``omct::Mark`` op that carries its name, so the node that produced the
output is known exactly; the markers are then removed. The marking hooks also count how often each module
runs (the export traces one forward pass), and the weights are checked for sharing, so every candidate left in
float has a reason.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from omct.errors import ModelError
from omct.graph.normalize import constant_identities_to_initializers, drop_unused_initializers, fold_pads, normalize
from omct.graph.ops import LayerSpec, Refusal, find_layers
from omct.ui import logger

# Supported module types (subclasses count) and the ONNX op each becomes.
SUPPORTED: dict[type, tuple[str, ...]] = {
    nn.Linear: ("Gemm", "MatMul"),
    nn.Conv1d: ("Conv",),
    nn.Conv2d: ("Conv",),
    nn.Conv3d: ("Conv",),
    nn.ConvTranspose2d: ("ConvTranspose",),
    nn.AvgPool2d: ("AveragePool",),
    nn.Embedding: ("Gather",),  # weight-only: the table is quantized per row, the lookup's output stays float
}
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
OPSET = 17
_MARK_DOMAIN = "omct"


def layer_type(module: nn.Module) -> str | None:
    """The supported type a module is (or derives from), e.g. 'Conv2d' for a 'same'-padding subclass."""
    for base in SUPPORTED:
        if isinstance(module, base):
            return base.__name__
    return None


def as_args(input_data) -> tuple:
    """``input_data`` as the positional arguments of ``model(...)`` (a tensor or a tuple of them)."""
    if isinstance(input_data, torch.Tensor):
        return (input_data,)
    if isinstance(input_data, tuple | list) and input_data:
        return tuple(input_data)
    raise ModelError(f"input_data must be a tensor or a tuple of tensors (as torch.onnx.export takes them), got "
                     f"{type(input_data).__name__}")


def default_dynamic_axes(input_names: list[str] | None, args: tuple) -> dict | None:
    """Dimension 0 of every input is the batch, unless the user says otherwise (an explicit ``dynamic_axes``).

    Exported with ``input_data``'s shapes as they are, the saved models would take only that batch size, and an
    evaluation or deployment at any other batch fails inside ONNX Runtime (``Got: 450 Expected: 1``). None when
    the inputs have no names to key the axes by (then the export keeps the shapes of ``input_data``).
    """
    if not input_names or len(input_names) != len(args):
        return None
    return {n: {0: "batch"} for n, a in zip(input_names, args, strict=True) if isinstance(a, torch.Tensor) and a.dim() > 0}


def default_input_names(model: nn.Module, args: tuple) -> list[str] | None:
    """The names of ``forward()``'s first ``len(args)`` positional parameters (``input_ids``, ``attention_mask``...).

    Without them the exporter calls inputs ``input.1``, ``input.3``; the saved models are fed by name, so the
    names the user wrote are the ones to keep. None when they cannot be known: ``*args``, fewer parameters
    than inputs, or an input that is not one tensor (a tuple or dict becomes several graph inputs, or none).
    """
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a forward without a Python signature
        return None
    names = []
    for p in params[:len(args)]:
        if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            return None
        names.append(p.name)
    return names if len(names) == len(args) else None


class _Mark(torch.autograd.Function):
    """Identity that only the exported graph sees (as ``omct::Mark``).

    It returns a copy, not its input: an input returned as-is is a view to autograd, and the in-place ops that
    follow modules in most CNNs (``nn.ReLU(inplace=True)``, ``out += identity``) may not modify such a view.
    Candidates (Conv, Linear, AvgPool) and BatchNorm never return an alias of their input, so the copy changes
    nothing the rest of ``forward()`` can see; it exists only during export, on omct's copy of the model.
    """

    @staticmethod
    def forward(ctx, x, name):  # noqa: ARG004
        return x.clone()

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{_MARK_DOMAIN}::Mark", x, name_s=name)
        out.setType(x.type())
        return out


@dataclass
class TracedModel:
    """The ONNX graph of a module, with what the PyTorch frontend found about each candidate."""

    model: onnx.ModelProto  # markers removed; each mapped layer node is named after its module
    layers: list[LayerSpec]  # quantizable, named after modules, in graph order
    refused: list[Refusal]
    types: dict[str, str]  # candidate module name -> supported type name
    batchnorm_after: dict[str, str] = field(default_factory=dict)  # conv module -> BN module it alone feeds
    module_names: set[str] = field(default_factory=set)
    mapped: set[str] = field(default_factory=set)  # modules whose node was found (named after them)
    reasons: dict[str, str] = field(default_factory=dict)  # why each refused candidate module stays float


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name and layer_type(m)}


@contextmanager
def _hooks(modules: dict[str, nn.Module], hook_factory) -> Iterator[None]:
    handles = [m.register_forward_hook(hook_factory(name)) for name, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_forward(model: nn.Module, args: tuple):
    """One forward pass of ``input_data``; a failure becomes one clear line."""
    try:
        with torch.no_grad():
            return model(*args)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported the same way
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ModelError(f"input_data does not run through the model: {type(e).__name__}: {first}") from None


def _torch_refusals(candidates: dict[str, nn.Module], calls: dict[str, int]) -> dict[str, str]:
    reasons: dict[str, str] = {}
    owners: dict[int, list[str]] = {}
    for name, m in candidates.items():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    for names in owners.values():
        if len(names) > 1:
            for n in names:
                others = ", ".join(f"'{o}'" for o in names if o != n)
                reasons[n] = f"shares its weight with {others}; layers that share weights stay in float"
    for name, m in candidates.items():
        if name in reasons:
            continue
        if calls[name] == 0:
            reasons[name] = ("never called by forward() with this input_data (its weight may be used functionally, "
                             "as nn.MultiheadAttention does with out_proj)")
        elif calls[name] > 1:
            reasons[name] = f"runs {calls[name]} times per forward pass; a module reused in several places stays in float"
        elif isinstance(m, CONVS) and getattr(m, "padding_mode", "zeros") != "zeros":
            reasons[name] = f"padding_mode '{m.padding_mode}' is not supported (only 'zeros')"
    return reasons


def _export(model: nn.Module, args: tuple, marked: dict[str, nn.Module], counted: dict[str, nn.Module], input_names,
            output_names, dynamic_axes, calls: dict[str, int], fed: dict[str, str]) -> bytes:
    """Export with every ``marked`` module's output marked; ``calls`` counts how often each marked or ``counted``
    module ran (the export traces one forward pass: no separate pass to count them), and ``fed`` gets, for each
    ``counted`` module whose input was a marked module's output (the very tensor), that module's name.

    Why BatchNorms are counted, not marked: a Mark after each of MobileNetV2's 52 BatchNorms made its export
    0.2-0.3 s slower (the tracer's graph building), while the conv -> BN pair is known without it: the BN's
    input tensor is the conv's marked output (tagged on the tensor), and the graph is checked below."""
    def factory(name):
        def hook(_m, _i, out):
            calls[name] += 1
            if not isinstance(out, torch.Tensor):
                return out
            result = _Mark.apply(out, name)
            result._omct_marked = name  # so that a counted module reading this very tensor knows whose it is
            return result
        return hook

    def counter(name):
        def hook(_m, inputs, _out):
            calls[name] += 1
            src = getattr(inputs[0], "_omct_marked", None) if inputs and isinstance(inputs[0], torch.Tensor) else None
            if src is not None:
                fed[name] = src
        return hook

    buf = _Sink()
    with _hooks(marked, factory), _hooks(counted, counter), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(model, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                              output_names=output_names, dynamic_axes=dynamic_axes,
                              custom_opsets={_MARK_DOMAIN: 1}, do_constant_folding=True)
        except Exception as e:  # noqa: BLE001
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            error = ModelError(f"torch.onnx.export could not export the model: {first}")
        else:
            error = None
    if error is not None:
        run_forward(model, args)  # a forward pass that fails is the error to report
        raise error
    for w in caught:
        logger.debug("torch.onnx.export: %s", w.message)
    return buf.data


class _Sink:
    """The file object ``torch.onnx.export`` writes its serialised model into (one ``write`` of the whole bytes):
    it keeps that bytes object, where ``io.BytesIO`` copies it (one model-size copy less at the export's peak)."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: bytes) -> int:
        self.data = data if not self.data and isinstance(data, bytes) else self.data + bytes(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class RawExport:
    """What one ``torch.onnx.export`` of a module gave (the serialised graph with its Mark nodes and how often
    each marked module ran) and the options it was given, so that the next trace of the same module in the
    same state can use it instead of exporting again (``export_cache``)."""

    data: bytes
    calls: dict[str, int]
    input_names: list[str] | None
    output_names: list[str] | None
    dynamic_axes: dict | None
    fed: dict[str, str] = field(default_factory=dict)  # BatchNorm module -> the marked module whose output it read

    def as_exported(self, input_names: list[str] | None, output_names: list[str] | None,
                    dynamic_axes: dict | None) -> onnx.ModelProto | None:
        """The graph an export with these options would give, or None when that cannot be derived from this one.

        Input names reach the exporter's shape inference only through the dynamic axes they key, so inputs are
        renamed when each keeps the same axes; output names and the outputs' dynamic axes are only written into
        the graph's signature (``torch.onnx.export``'s serialisation), so outputs are renamed and their axes set.
        """
        dyn_old = _axes_by_position(self.input_names, self.output_names, self.dynamic_axes)
        dyn_new = _axes_by_position(input_names, output_names, dynamic_axes)
        if dyn_old is None or dyn_new is None or dyn_old[0] != dyn_new[0]:
            return None
        if input_names != self.input_names and (input_names is None or self.input_names is None):
            return None
        if output_names != self.output_names and (output_names is None or self.output_names is not None
                                                  and output_names[:len(self.output_names)] != self.output_names):
            return None
        if any(dyn_old[1]) and dyn_old[1] != dyn_new[1]:
            return None
        model = onnx.load_from_string(self.data)
        graph = model.graph
        outputs = list(graph.output)
        rename = {}
        if input_names:
            feeds = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
            if len(feeds) < len(input_names):
                return None
            rename.update({i.name: n for i, n in zip(feeds, input_names, strict=False)})
        if output_names:
            if len(outputs) < len(output_names) or len({o.name for o in outputs}) != len(outputs):
                return None
            rename.update({o.name: n for o, n in zip(outputs, output_names, strict=False)})
        rename = {a: b for a, b in rename.items() if a != b}
        if rename:
            names = {n for g in _graphs(graph) for n in _names(g)}
            if len(set(rename.values())) != len(rename) or (set(rename.values()) - set(rename)) & names:
                return None  # a new name already taken by another tensor
            for g in _graphs(graph):
                for n in g.node:
                    n.input[:] = [rename.get(x, x) for x in n.input]
                    n.output[:] = [rename.get(x, x) for x in n.output]
                for v in list(g.input) + list(g.output) + list(g.value_info):
                    v.name = rename.get(v.name, v.name)
        # The exporter's shape inference names a symbolic dimension after the value it first appears on
        # (``<op kind><value name>_dim_<axis>``, e.g. ``Mark301_dim_0``), so a renamed output renames its symbols;
        # and an output's dynamic axis label replaces that axis' symbol wherever the symbol appears.
        symbols = {}
        for dim in _dims(graph):
            head, sep, axis = dim.dim_param.rpartition("_dim_")
            if sep and axis.isdigit():
                for old, new in rename.items():
                    if head.endswith(old) and head[:-len(old)].isalpha():
                        symbols[dim.dim_param] = f"{head[:-len(old)]}{new}_dim_{axis}"
        for o, axes in zip(outputs, dyn_new[1], strict=False):
            dims = o.type.tensor_type.shape.dim
            for axis, label in axes.items():
                if axis >= len(dims) or not dims[axis].dim_param:
                    return None  # a static axis made dynamic: not derivable here
                symbols[symbols.get(dims[axis].dim_param, dims[axis].dim_param)] = label
        if symbols:
            for dim in _dims(graph):
                if dim.dim_param:
                    first = symbols.get(dim.dim_param, dim.dim_param)
                    dim.dim_param = symbols.get(first, first)
        return model


def _axes_by_position(input_names, output_names, dynamic_axes) -> tuple[list[dict], list[dict]] | None:
    """``dynamic_axes`` as one {axis: label} per named input and per named output, in order; None when it
    names anything else or uses the list form (whose labels the exporter derives from the names)."""
    names = list(input_names or []) + list(output_names or [])
    axes = dynamic_axes or {}
    if any(k not in names or not isinstance(v, dict) for k, v in axes.items()):
        return None
    per = [{int(a): str(label) for a, label in axes.get(n, {}).items()} for n in names]
    return per[:len(input_names or [])], per[len(input_names or []):]


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for n in graph.node:
        for a in n.attribute:
            for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                yield from _graphs(g)


def _dims(graph: onnx.GraphProto) -> Iterator[onnx.TensorShapeProto.Dimension]:
    """Every dimension of the typed values (inputs, outputs, value_info) of ``graph`` and its bodies."""
    for g in _graphs(graph):
        for v in list(g.input) + list(g.output) + list(g.value_info):
            if v.type.HasField("tensor_type"):
                yield from v.type.tensor_type.shape.dim


def _names(graph: onnx.GraphProto) -> set[str]:
    return ({i.name for i in graph.input} | {t.name for t in graph.initializer} | {o.name for o in graph.output}
            | {x for n in graph.node for x in list(n.input) + list(n.output)})


def _layer_node(mark_input: str, producer: dict[str, onnx.NodeProto], initializers: set[str],
                expected: tuple[str, ...]) -> onnx.NodeProto | str:
    """The node that computes a marked module's output, or why there is none we can quantize."""
    node = producer.get(mark_input)
    if node is None:
        return "its output is not computed by any node of the exported graph"
    if node.op_type == "Add" and "MatMul" in expected:  # Linear on more than 2 dimensions: MatMul + Add
        for i in node.input:
            p = producer.get(i)
            if p is not None and p.op_type == "MatMul" and p.input[1] in initializers:
                return p
    if node.op_type not in expected:
        return f"it was exported as {node.op_type}, not {' or '.join(expected)}"
    return node


def _strip_marks(model: onnx.ModelProto) -> None:
    """Remove the Mark nodes: the tensor each one marked takes the name of its output."""
    graph = model.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    marks = [n for n in graph.node if n.domain == _MARK_DOMAIN]
    for mark in marks:
        src, dst = mark.input[0], mark.output[0]
        p = producer[src]
        p.output[list(p.output).index(src)] = dst
        producer[dst] = p
        for n in consumers.get(src, []):  # other readers of the unmarked tensor (rare) read the renamed one
            if n is not mark:
                renamed = [dst if i == src else i for i in n.input]
                del n.input[:]
                n.input.extend(renamed)
        consumers.setdefault(dst, []).extend(n for n in consumers.get(src, []) if n is not mark)
    for mark in marks:
        graph.node.remove(mark)
    keep = [o for o in model.opset_import if o.domain != _MARK_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)


def trace_model(model: nn.Module, input_data, input_names=None, output_names=None, dynamic_axes=None,
                reuse: RawExport | None = None, on_export: Callable[[RawExport], None] | None = None,
                with_layers: bool = True) -> TracedModel:
    """Export ``model`` (already in the state to quantize, e.g. eval mode) and map modules to ONNX nodes.

    ``reuse``: an earlier export of the same module in the same state (``export_cache``), taken instead of
    exporting again when these options' graph can be derived from it, and emptied (it is used once);
    ``on_export`` is given each new export. ``with_layers=False``: the layers and refusals are left empty, for
    a caller whose ``fold_traced`` finds them on the folded graph (once, not twice)."""
    args = as_args(input_data)
    if input_names is None:
        input_names = default_input_names(model, args)
    if dynamic_axes is None:
        dynamic_axes = default_dynamic_axes(input_names, args)
    candidates = _candidates(model)
    batchnorms = {n: m for n, m in model.named_modules() if isinstance(m, BATCHNORMS)}
    # Every candidate is marked and counted during the export; a module that ran more than once (several
    # marks under one name) or never is refused below, and its marks are stripped like the others.
    calls = dict.fromkeys({**candidates, **batchnorms}, 0)
    fed: dict[str, str] = {}
    exported = None
    if reuse is not None and reuse.calls.keys() == calls.keys():
        exported = reuse.as_exported(input_names, output_names, dynamic_axes)
        if exported is not None:
            calls, fed = dict(reuse.calls), dict(reuse.fed)
            logger.debug("reusing the export of create_quant_config")
    if reuse is not None:
        reuse.data = b""  # used once (the cache slot is empty): its bytes go before the graph is processed
    if exported is None:
        data = _export(model, args, candidates, batchnorms, input_names, output_names, dynamic_axes, calls, fed)
        if on_export is not None:
            on_export(RawExport(data, dict(calls), list(input_names) if input_names else input_names,
                                list(output_names) if output_names else output_names,
                                {k: dict(v) if isinstance(v, dict) else list(v) for k, v in dynamic_axes.items()}
                                if dynamic_axes else dynamic_axes, dict(fed)))
        exported = onnx.load_from_string(data)
        del data
    constant_identities_to_initializers(exported)  # before mapping: a Linear's weight may come through one
    reasons = _torch_refusals(candidates, calls)
    initializers = {t.name for t in exported.graph.initializer}
    mark_inputs = {next(a.s.decode() for a in n.attribute if a.name == "name"): n.input[0]
                   for n in exported.graph.node if n.domain == _MARK_DOMAIN}
    producer = {o: n for n in exported.graph.node for o in n.output}
    layer_nodes: dict[str, onnx.NodeProto] = {}
    for name, module in candidates.items():
        if name in reasons:
            continue
        if name not in mark_inputs:
            reasons[name] = "its output does not reach the exported graph"
            continue
        expected = next(ops for base, ops in SUPPORTED.items() if isinstance(module, base))
        node = _layer_node(mark_inputs[name], producer, initializers, expected)
        if isinstance(node, str):
            reasons[name] = node
        else:
            layer_nodes[name] = node
    batchnorm_after = _conv_bn_pairs(exported, layer_nodes, batchnorms, candidates, calls, fed)
    _strip_marks(exported)
    by_name = {n.name: n for n in exported.graph.node}
    for name, node in layer_nodes.items():
        other = by_name.get(name)
        if other is not None and other is not node:  # an exporter node already named like the module: rename it
            other.name = f"{other.name}__renamed"
        node.name = name
    norm, rep = normalize(exported, in_place=True)  # the export is ours: no copy of its weights
    fold_pads(norm, rep)  # the same graph steps as the ONNX frontend: zero Pads into the Convs after them
    types = {n: layer_type(m) for n, m in candidates.items()}
    module_names = {n for n, _ in model.named_modules() if n}
    if not with_layers:
        return TracedModel(norm, [], [], types, batchnorm_after, module_names, set(layer_nodes), reasons)
    return _with_layers(norm, set(layer_nodes), reasons, types, batchnorm_after, module_names)


def _with_layers(norm: onnx.ModelProto, mapped: set[str], reasons: dict[str, str], types: dict[str, str],
                 batchnorm_after: dict[str, str], module_names: set[str]) -> TracedModel:
    """The traced model of graph ``norm``, whose nodes ``mapped`` carry module names: its layers found by the
    ONNX op handlers, refusals from torch (``reasons``) and from the handlers."""
    reasons = dict(reasons)
    specs, onnx_refused = find_layers(norm)
    # Modules' layers, and the chain ops (Add, MaxPool, Pad, ...) between them under their ONNX node names:
    # quantized only between quantized tensors, so that the runtime runs integer chains, not islands.
    layers = [s for s in specs if s.name in mapped or s.chain is not None]
    for r in onnx_refused:
        if r.name in mapped:
            reasons[r.name] = r.reason
    unmapped = [s.name for s in specs if s.name not in mapped and s.chain is None]
    if unmapped:
        logger.debug("ONNX nodes not produced by a supported module, left in float: %s", ", ".join(unmapped))
    refused = [Refusal(n, t, reasons[n]) for n, t in types.items() if n in reasons]
    return TracedModel(norm, layers, refused, types, batchnorm_after, module_names, mapped, reasons)


def fold_traced(traced: TracedModel, model: nn.Module, folded: dict[str, str]) -> TracedModel:
    """``traced`` after ``fold_conv_bn(model, folded)``, without exporting again: each folded conv node takes
    its module's folded weight and bias (the very tensors a new export would hold) and the output of the
    BatchNormalization after it, which goes. Why: an export costs as much as the rest of quantize_model. The
    layers are found again (on ``traced`` as it is when nothing was folded)."""
    if not folded:
        return _with_layers(traced.model, traced.mapped, traced.reasons, traced.types, traced.batchnorm_after,
                            traced.module_names)
    graph = traced.model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    nodes = {n.name: n for n in graph.node}
    removed = set()
    for conv_name in folded:
        conv = nodes[conv_name]
        bns = consumers.get(conv.output[0], [])
        if len(bns) != 1 or bns[0].op_type != "BatchNormalization":
            raise AssertionError(f"traced graph: conv '{conv_name}' is not followed by its BatchNormalization")
        module = model.get_submodule(conv_name)
        w_name, b_name = f"{conv_name}.weight_folded", f"{conv_name}.bias_folded"
        graph.initializer.extend([numpy_helper.from_array(module.weight.detach().cpu().numpy(), w_name),
                                  numpy_helper.from_array(module.bias.detach().cpu().numpy(), b_name)])
        data_input = conv.input[0]
        del conv.input[:]
        conv.input.extend([data_input, w_name, b_name])
        conv.output[0] = bns[0].output[0]
        removed.add(id(bns[0]))
    keep = [n for n in graph.node if id(n) not in removed]
    del graph.node[:]
    graph.node.extend(keep)
    drop_unused_initializers(traced.model)
    return _with_layers(traced.model, traced.mapped, traced.reasons, traced.types, traced.batchnorm_after,
                        traced.module_names)


def _conv_bn_pairs(exported: onnx.ModelProto, layer_nodes: dict[str, onnx.NodeProto], batchnorms: dict[str, nn.Module],
                   candidates: dict[str, nn.Module], calls: dict[str, int], fed: dict[str, str]) -> dict[str, str]:
    """Conv module -> BatchNorm module, where the BN reads only that conv's output and both run once: the BN
    module's input was the conv's marked output (``fed``), the one node reading that output is a
    BatchNormalization, and that node's running mean and variance are the module's (so it is the module's node)."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in exported.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    pairs = {}
    tensors: dict[str, onnx.TensorProto] = {t.name: t for t in exported.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in exported.graph.node if n.op_type == "Constant"
                    and len(n.attribute) == 1 and n.attribute[0].name == "value"})
    for bn_name, conv in fed.items():
        node = layer_nodes.get(conv)
        if node is None or not isinstance(candidates[conv], CONVS) or node.op_type != "Conv":
            continue
        if calls.get(conv) != 1 or calls.get(bn_name) != 1:
            continue
        mark = consumers.get(node.output[0], [])
        if len(mark) != 1 or mark[0].domain != _MARK_DOMAIN:
            continue
        readers = consumers.get(mark[0].output[0], [])
        if len(readers) == 1 and readers[0].op_type == "BatchNormalization" and \
                _same_statistics(tensors, readers[0], batchnorms[bn_name]):
            pairs[conv] = bn_name
    return pairs


def _same_statistics(tensors: dict[str, onnx.TensorProto], node: onnx.NodeProto, bn: nn.Module) -> bool:
    """Whether BatchNormalization ``node`` holds ``bn``'s running mean and variance (value for value)."""
    stats = [getattr(bn, "running_mean", None), getattr(bn, "running_var", None)]
    if len(node.input) < 5 or not all(isinstance(t, torch.Tensor) for t in stats):
        return False
    for name, want in zip(node.input[3:5], stats, strict=True):
        proto = tensors.get(name)
        if proto is None:
            return False
        got = numpy_helper.to_array(proto).astype(np.float32)
        w = want.detach().cpu().float().numpy()
        if got.shape != w.shape or not np.array_equal(got, w):
            return False
    return True
