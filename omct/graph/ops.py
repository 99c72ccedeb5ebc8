"""Op handlers: everything omct knows about one ONNX op type, in one place.

A handler says which input ports carry the activation, the weight and the bias, which axes of the weight
and of the input are channels (the numpy core takes these axes, never op names), whether the op can be
quantized here (a ``LayerSpec``) or why not (a reason a user can read), and which integer kernel ONNX
Runtime fuses it into. Export asks the handler where to wire the quantized weight and bias.

Adding an op type is one ``OpHandler`` subclass and one ``HANDLERS`` row.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import ClassVar

import onnx

from omct.graph.subgraphs import LOOPS, all_graphs, bodies, local_names, node_reads
from omct.graph.tensor_data import skeleton, tensor_array


@dataclass(frozen=True)
class LayerSpec:
    name: str
    op_type: str
    input: str  # the activation tensor quantized in front of the layer
    weight: str | None = None
    weight_axis: int | None = None  # axis of the weight's output channels (per-channel scales)
    bias: str | None = None  # 1-D bias quantized to INT32
    output_site: str | None = None  # tensor quantized after the layer so the runtime fuses an integer kernel
    output_max: float | None = None  # upper bound of the output site's values (a ReLU6-style Clip's max)
    input_channel_axis: int = 1  # axis of the input that the weight contracts with (bias correction's means)
    weight_in_axis: int | None = None  # axis of the weight's input channels
    groups: int = 1
    bias_node: str | None = None  # the node that adds the bias when it is not the layer's own (MatMul + Add)
    weight_only: bool = False  # no activation is quantized (a table lookup): ``input`` is only read, never a site
    # Chain ops (no weights) keep a tensor integer between two quantized layers: ``inputs`` are all their
    # activation inputs; ``chain`` is "shared" (output quantized with its input's scale: data movement, MaxPool,
    # Pad) or "calibrated" (output range observed: Add, Concat, GlobalAveragePool requantize).
    inputs: tuple[str, ...] = ()
    chain: str | None = None
    nuq_refusal: str | None = "NUQ takes only Conv (4-D weight, dilation 1), Gemm and MatMul with a 2-D weight"
    # A 2-D Conv's (kernel, strides, pads, dilations) with explicit pads (None otherwise): AdaRound's im2col
    window: tuple | None = None
    # The control-flow body the layer sits in (``vad_if/then``, ``loop/body``), None at the top level
    scope: str | None = None
    weight_shape: tuple | None = None  # the weight initializer's shape (learned rounding's cost, before calibration)

    def to_dict(self) -> dict:
        # a shallow copy: the values are plain (str, int, tuples of numbers), and ``asdict``'s recursive copy cost
        # a ResNet's quantize_model ~5 ms (PTQ wall, issue 17 item 9)
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Refusal:
    name: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {self.reason}"


class GraphIndex:
    """Producers, consumers and constants of a graph, computed once. For a control-flow body (``graph``, with
    the index of the graph around it as ``outer``) the constants include the outer scopes' initializers that
    the body can see; a control-flow node counts as a consumer of what its bodies read from outside."""

    def __init__(self, model: onnx.ModelProto, graph: onnx.GraphProto | None = None, outer: GraphIndex | None = None):
        self.graph = model.graph if graph is None else graph
        visible = dict(outer.initializers) if outer is not None else {}
        for name in local_names(self.graph):  # the body's own tensors shadow the outer ones
            visible.pop(name, None)
        self.initializers = {**visible, **{t.name: t for t in self.graph.initializer}}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        self.producer: dict[str, onnx.NodeProto] = {}
        for node in self.graph.node:
            for name in node_reads(node):
                self.consumers.setdefault(name, []).append(node)
            for name in node.output:
                self.producer[name] = node
        self.graph_outputs = {o.name for o in self.graph.output}
        self.elem_types, self.ranks = (outer.elem_types, outer.ranks) if outer is not None else _tensor_types(model)

    def const_shape(self, name: str) -> tuple[int, ...] | None:
        t = self.initializers.get(name)
        return tuple(t.dims) if t is not None else None

    def const_dtype(self, name: str) -> int | None:
        t = self.initializers.get(name)
        return t.data_type if t is not None else None

    def array(self, name: str):
        return tensor_array(self.initializers[name])

    def output_site(self, node: onnx.NodeProto) -> tuple[str, float | None]:
        """The tensor quantized after ``node`` and an upper bound of its values, if known.

        That is the node's output, or the output of a Relu or ReLU6-style Clip that is its only consumer:
        ONNX Runtime drops such an activation in front of a QuantizeLinear whose range it already clamps to,
        which is why a Clip's max also bounds the calibrated range.
        """
        out = node.output[0]
        users = self.consumers.get(out, [])
        if len(users) != 1 or out in self.graph_outputs:
            return out, None
        act = users[0]
        if act.op_type == "Relu":
            return act.output[0], None
        if act.op_type == "Clip" and len(act.input) >= 2 and self._scalar(act.input[1]) == 0.0:
            high = self._scalar(act.input[2]) if len(act.input) > 2 else None
            return act.output[0], high
        return out, None

    def _scalar(self, name: str) -> float | None:
        if name not in self.initializers:
            return None
        value = self.array(name)
        return float(value) if value.size == 1 else None


def _tensor_types(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element type and rank of every tensor whose type is known (inferred when the model lacks them)."""
    types, ranks = {}, {}

    def note(vi) -> None:
        if vi.type.HasField("tensor_type"):
            types[vi.name] = vi.type.tensor_type.elem_type
            if vi.type.tensor_type.HasField("shape"):
                ranks[vi.name] = len(vi.type.tensor_type.shape.dim)

    def note_all(graph: onnx.GraphProto) -> None:  # names are unique across bodies after normalisation
        for g in all_graphs(graph):
            for vi in list(g.input) + list(g.value_info) + list(g.output):
                note(vi)

    note_all(model.graph)
    if len(types) <= len(model.graph.input) + len(model.graph.output) or len(model.graph.node) < sum(
            len(g.node) for g in all_graphs(model.graph)):
        try:  # infer intermediate types on the graph without its weights' data
            note_all(onnx.shape_inference.infer_shapes(skeleton(model)).graph)
        except Exception:  # shape inference is best-effort: unknown types are not refused
            pass
    return types, ranks


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _activation_problem(node, index: GraphIndex) -> str | None:
    x = node.input[0]
    if x in index.initializers:
        return f"its input '{x}' is a constant, not an activation"
    t = index.elem_types.get(x)
    if t is not None and t != onnx.TensorProto.FLOAT:
        return f"its input '{x}' is {onnx.TensorProto.DataType.Name(t)}; only FLOAT activations are quantized"
    return None


def _weight_problem(node, index: GraphIndex, i: int, ranks: tuple[int, ...], what: str) -> str | None:
    if len(node.input) <= i or node.input[i] not in index.initializers:
        name = node.input[i] if len(node.input) > i else "?"
        return f"its {what} '{name}' is computed at run time, not a constant (activation x activation products stay float)"
    if index.const_dtype(node.input[i]) != onnx.TensorProto.FLOAT:
        return f"its {what} '{node.input[i]}' is not FLOAT"
    rank = len(index.const_shape(node.input[i]))
    if rank not in ranks:
        return f"its {what} has rank {rank}; supported: {', '.join(map(str, ranks))}"
    return None


def _bias_add(node: onnx.NodeProto, index: GraphIndex, channels: int) -> onnx.NodeProto | None:
    """The Add that adds a constant FLOAT bias of ``channels`` values to ``node``'s output, its only reader."""
    out = node.output[0]
    users = index.consumers.get(out, [])
    if len(users) != 1 or users[0].op_type != "Add" or out in index.graph_outputs:
        return None
    add = users[0]
    others = [i for i in add.input if i != out]
    if len(others) != 1 or others[0] not in index.initializers:
        return None
    if index.const_shape(others[0]) != (channels,) or index.const_dtype(others[0]) != onnx.TensorProto.FLOAT:
        return None
    return add


def _bias(node, index: GraphIndex, i: int, channels: int) -> str | None:
    if len(node.input) > i and node.input[i]:
        b = node.input[i]
        if b in index.initializers and index.const_shape(b) == (channels,) and index.const_dtype(b) == onnx.TensorProto.FLOAT:
            return b
    return None


class OpHandler:
    """How omct quantizes one op type. Subclasses set the ports and implement ``layer``."""

    op_type: ClassVar[str]
    activation_port: ClassVar[int] = 0
    weight_port: ClassVar[int | None] = None
    bias_port: ClassVar[int | None] = None
    integer_kernel: ClassVar[str] = "none"  # what ONNX Runtime (CPU) fuses the quantized op into

    def layer(self, node: onnx.NodeProto, index: GraphIndex) -> LayerSpec | str | None:
        """How to quantize ``node``, or why it stays in float (None: not a candidate at all)."""
        raise NotImplementedError

    def _runtime_bias(self, node: onnx.NodeProto, index: GraphIndex, what: str = "bias") -> str | None:
        port = self.bias_port
        if port is not None and len(node.input) > port and node.input[port] and node.input[port] not in index.initializers:
            return f"its {what} '{node.input[port]}' is computed at run time, not a constant"
        return None


class ConvHandler(OpHandler):
    op_type = "Conv"
    weight_port, bias_port = 1, 2
    integer_kernel = "QLinearConv (2D)"

    def layer(self, node, index):
        problem = (_activation_problem(node, index) or _weight_problem(node, index, 1, (3, 4, 5), "weight")
                   or self._runtime_bias(node, index))
        if problem:
            return problem
        out_ch = index.const_shape(node.input[1])[0]
        return LayerSpec(node.name, node.op_type, node.input[0], node.input[1], 0, _bias(node, index, 2, out_ch),
                         *index.output_site(node), input_channel_axis=1, weight_in_axis=1, groups=_attr(node, "group", 1),
                         nuq_refusal=self._nuq_refusal(node, index),
                         window=_conv_window(node, index))

    @staticmethod
    def _nuq_refusal(node, index) -> str | None:
        """AMCT's NUQ restrictions on Conv: a 4-D weight, dilation 1. AMCT also asks for group 1; omct takes
        grouped (depthwise) convolutions too, an extension (their weights are MobileNets' per-channel bytes)."""
        rank = len(index.const_shape(node.input[1]))
        if rank != 4:
            return f"its weight has rank {rank}; NUQ takes 4-D (2-D convolution) weights only"
        if any(d != 1 for d in _attr(node, "dilations", [])):
            return f"dilations {list(_attr(node, 'dilations'))}; NUQ takes dilation 1 only"
        return None


def _conv_window(node: onnx.NodeProto, index: GraphIndex) -> tuple | None:
    """(kernel, strides, pads, dilations) of a 2-D Conv with explicit padding; None for other ranks or auto_pad."""
    shape = index.const_shape(node.input[1])
    if len(shape) != 4 or _attr(node, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    return (tuple(shape[2:]), tuple(_attr(node, "strides", [1, 1])), tuple(_attr(node, "pads", [0, 0, 0, 0])),
            tuple(_attr(node, "dilations", [1, 1])))


class ConvTransposeHandler(OpHandler):
    op_type = "ConvTranspose"
    weight_port, bias_port = 1, 2
    integer_kernel = "none on CPU (runs as QDQ)"

    def layer(self, node, index):
        problem = (_activation_problem(node, index) or _weight_problem(node, index, 1, (3, 4, 5), "weight")
                   or self._runtime_bias(node, index))
        if problem:
            return problem
        # weight (in, out / group, k...): per-channel scales on axis 1 serve every group's channel of that index
        groups = _attr(node, "group", 1)
        out_ch = index.const_shape(node.input[1])[1] * groups
        return LayerSpec(node.name, node.op_type, node.input[0], node.input[1], 1, _bias(node, index, 2, out_ch), None,
                         input_channel_axis=1, weight_in_axis=0, groups=groups)


class GemmHandler(OpHandler):
    op_type = "Gemm"
    weight_port, bias_port = 1, 2
    integer_kernel = "QGemm"

    def layer(self, node, index):
        if _attr(node, "transA", 0):
            return "transA 1 is not supported (only transA 0)"
        for key in ("alpha", "beta"):
            if abs(_attr(node, key, 1.0) - 1.0) > 1e-12:
                return f"{key} {_attr(node, key):g} is not supported (only 1)"
        problem = (_activation_problem(node, index) or _weight_problem(node, index, 1, (2,), "weight B")
                   or self._runtime_bias(node, index, "bias C"))
        if problem:
            return problem
        axis = 0 if _attr(node, "transB", 0) else 1
        out_ch = index.const_shape(node.input[1])[axis]
        return LayerSpec(node.name, node.op_type, node.input[0], node.input[1], axis, _bias(node, index, 2, out_ch), None,
                         input_channel_axis=-1, weight_in_axis=1 - axis, nuq_refusal=None)


class MatMulHandler(OpHandler):
    op_type = "MatMul"
    weight_port = 1
    integer_kernel = "QGemm / QLinearMatMul / MatMulIntegerToFloat"

    def layer(self, node, index):
        problem = _activation_problem(node, index) or _weight_problem(node, index, 1, (2, 3), "second input")
        if problem:
            return problem
        rank = len(index.const_shape(node.input[1]))
        if rank == 3:  # a batch of weight matrices (AMCT's ONNX table lists it): no bias fusion
            # per tensor: ONNX Runtime's MatMulIntegerToFloat takes no per-column zero points for a rank-3 weight
            x_rank = index.ranks.get(node.input[0])
            if x_rank is not None and x_rank < 3:
                return f"its input has rank {x_rank} against a rank-3 weight; only batched inputs of rank 3 are supported"
            return LayerSpec(node.name, node.op_type, node.input[0], node.input[1], None, None, input_channel_axis=-1,
                             nuq_refusal="its weight is a batch of matrices (rank 3); NUQ takes 2-D weights only")
        # The bias Add that follows (a Linear exported as MatMul + Add) belongs to the layer: its constant is
        # quantized to INT32 like a Gemm's. Left in float, ONNX Runtime rewrites MatMul + Add into a float Gemm
        # behind Reshapes when shapes are static, before its QDQ fusion, and every weight is dequantized on
        # each run; with an INT32 bias it fuses QGemm (static) or MatMulIntegerToFloat (dynamic) either way.
        out_ch = index.const_shape(node.input[1])[1]
        add = _bias_add(node, index, out_ch)
        last = add or node
        # A 2D MatMul turns into a float Gemm in ONNX Runtime unless its output is quantized; with more
        # dimensions (tokens) it becomes MatMulIntegerToFloat without one, and an output Q would only add error
        # (measured: the benchmark transformer lost 0.4 points to it).
        site = index.output_site(last) if index.ranks.get(node.input[0]) == 2 else (None, None)
        bias = next((i for i in add.input if i in index.initializers), None) if add else None
        return LayerSpec(node.name, node.op_type, node.input[0], node.input[1], 1, bias, *site,
                         input_channel_axis=-1, weight_in_axis=0, bias_node=add.name if add else None, nuq_refusal=None)


class AveragePoolHandler(OpHandler):
    op_type = "AveragePool"
    integer_kernel = "QLinearAveragePool"

    def layer(self, node, index):
        problem = _activation_problem(node, index)
        if problem:
            return problem
        if any(d != 1 for d in _attr(node, "dilations", [])):
            # ONNX Runtime fuses a quantized AveragePool into QLinearAveragePool, which has no dilations: the
            # deploy model would not load
            return f"dilations {_attr(node, 'dilations')} are not supported (QLinearAveragePool has none)"
        return LayerSpec(node.name, node.op_type, node.input[0], output_site=node.output[0])


class GatherHandler(OpHandler):
    """A lookup in a constant table (word embeddings): weight-only, one symmetric INT8 scale per row.

    Its output feeds a LayerNorm, so it stays float; only the table shrinks (4x), which in a BERT-class model is
    most of the file. The deploy model gathers INT8 rows and scales them after the lookup, so the runtime never
    dequantizes the whole table."""

    op_type = "Gather"
    activation_port, weight_port = 1, 0  # Gather(data, indices): the indices are what runs, the data is the weight
    integer_kernel = "Gather of INT8 rows, scaled after the lookup (weight-only)"
    min_values: ClassVar[int] = 1024  # smaller tables (token types, short position tables) are not worth a node

    def layer(self, node, index):
        table, ids = node.input[0], node.input[1]
        if table not in index.initializers:
            if ids in index.initializers or index.elem_types.get(table, onnx.TensorProto.FLOAT) != onnx.TensorProto.FLOAT:
                return None  # slicing an activation (x[:, 0]) or shape arithmetic, not a table lookup: no candidate
            return f"its table '{table}' is computed at run time, not a constant"
        if index.const_dtype(table) != onnx.TensorProto.FLOAT:
            dtype = onnx.TensorProto.DataType.Name(index.const_dtype(table))
            return f"its table '{table}' is {dtype}; only FLOAT tables are quantized"
        shape = index.const_shape(table)
        if len(shape) != 2:
            return f"its table has rank {len(shape)}; only 2-D tables (one embedding per row) are quantized"
        axis = _attr(node, "axis", 0)
        if axis % 2 != 0:
            return f"axis {axis} is not supported (only 0: a lookup of rows)"
        if ids in index.initializers:
            return f"its indices '{ids}' are constants: ONNX Runtime folds the lookup when it loads the model"
        if shape[0] * shape[1] < self.min_values:
            return f"its table has {shape[0] * shape[1]} values (< {self.min_values}): too small for quantization to matter"
        return LayerSpec(node.name, node.op_type, ids, table, 0, weight_only=True)
class ChainHandler(OpHandler):
    """An op without weights between quantized layers. It is quantized only where every activation input is
    already quantized by the plan (the output of a quantized layer or of another chain op), so no tensor is
    quantized twice and the runtime sees DequantizeLinear -> op -> QuantizeLinear: a QLinear kernel (Add,
    Concat, GlobalAveragePool) or, with ``shared`` scales, the Q/DQ pair dropped around it (MaxPool, Reshape,
    Transpose, Resize). Its record holds the first input's factors (``_d``) and the output's (``_o``)."""

    shared: ClassVar[bool] = True  # output quantized with the input's scale and offset (no calibration)
    ports: ClassVar[tuple[int, ...]] = (0,)  # activation inputs; other inputs are constants or shapes

    def layer(self, node, index):
        """The chain op's spec, or None where it cannot carry quantized tensors (not a refusal: these ops are
        only quantized opportunistically, and a bias Add or a reflect Pad is no candidate a user asked for)."""
        inputs = tuple(node.input[i] for i in self.ports if i < len(node.input)) if self.ports else tuple(node.input)
        if (_activation_problem(node, index) or self._problem(node, index)
                or any(x in index.initializers or index.elem_types.get(x, 1) != onnx.TensorProto.FLOAT for x in inputs)):
            return None
        if self.shared:
            return LayerSpec(node.name, node.op_type, node.input[0], output_site=node.output[0], inputs=inputs,
                             chain="shared")
        return LayerSpec(node.name, node.op_type, node.input[0], None, None, None, *index.output_site(node), inputs=inputs,
                         chain="calibrated")

    def _problem(self, node, index) -> str | None:
        return None


class AddHandler(ChainHandler):
    op_type = "Add"
    shared, ports = False, (0, 1)
    integer_kernel = "QLinearAdd"


class ConcatHandler(ChainHandler):
    op_type = "Concat"
    shared, ports = False, ()  # every input (QLinearConcat requantizes each input to the output's scale)
    integer_kernel = "QLinearConcat"


class GlobalAveragePoolHandler(ChainHandler):
    op_type = "GlobalAveragePool"
    shared = False
    integer_kernel = "QLinearGlobalAveragePool"


class MaxPoolHandler(ChainHandler):
    op_type = "MaxPool"
    integer_kernel = "MaxPool (uint8, Q/DQ dropped)"

    def _problem(self, node, index):
        return "its second output (indices) is used" if len(node.output) > 1 and node.output[1] else None


class PadHandler(ChainHandler):
    """Constant zero padding: 0 is exactly representable (the zero point is an integer), so the padded tensor
    keeps its input's scale. ONNX Runtime has no QDQ rule for Pad and runs it in float between DQ and Q; a Pad
    in front of Convs is folded into them before this (normalize.fold_pads). Quantized here, a Pad that feeds
    other chain ops (a TF-style padded MaxPool) keeps them integer."""

    op_type = "Pad"
    integer_kernel = "none (float between DQ and Q; folded into a following Conv)"

    def _problem(self, node, index):
        mode = _attr(node, "mode", b"constant")
        if (mode.decode() if isinstance(mode, bytes) else mode) != "constant":
            return f"mode '{mode.decode() if isinstance(mode, bytes) else mode}' is not supported (only constant)"
        if len(node.input) < 2 or node.input[1] not in index.initializers:
            return "its pads are computed at run time, not a constant"
        if len(node.input) > 2 and node.input[2]:
            value = index._scalar(node.input[2])
            if value != 0.0:
                return "its constant_value is not 0 (only zero padding keeps the input's quantization)"
        if len(node.input) > 3 and node.input[3]:
            return "its axes input is not supported"
        return None


class ResizeHandler(ChainHandler):
    op_type = "Resize"
    integer_kernel = "Resize (uint8, Q/DQ dropped)"


class ReshapeHandler(ChainHandler):
    op_type = "Reshape"
    integer_kernel = "none needed (Q/DQ dropped)"


class TransposeHandler(ChainHandler):
    op_type = "Transpose"
    integer_kernel = "none needed (Q/DQ dropped)"


class FlattenHandler(ChainHandler):
    op_type = "Flatten"
    integer_kernel = "none needed (runs on uint8)"


#: op type -> handler: the one table of what omct quantizes.
HANDLERS: dict[str, OpHandler] = {h.op_type: h for h in (ConvHandler(), ConvTransposeHandler(), GemmHandler(),
                                                           MatMulHandler(), AveragePoolHandler(), GatherHandler())}
#: chain ops: no weights, quantized only between quantized tensors (see ``ChainHandler``)
HANDLERS.update({h.op_type: h for h in (AddHandler(), ConcatHandler(), GlobalAveragePoolHandler(), MaxPoolHandler(),
                                        PadHandler(), ResizeHandler(), ReshapeHandler(), TransposeHandler(),
                                        FlattenHandler())})


def find_layers(model: onnx.ModelProto) -> tuple[list[LayerSpec], list[Refusal]]:
    """Quantizable layers in graph order (a control-flow body's layers where its node is), and the candidates
    left in float with their reasons."""
    layers: list[LayerSpec] = []
    refused: list[Refusal] = []
    _find_in(model, model.graph, GraphIndex(model), None, None, layers, refused)
    return layers, refused


# the nearest Loop/Scan around a graph, and the graphs from the outermost loop body down to it
_LoopContext = tuple[str, tuple[onnx.GraphProto, ...]]


def _find_in(model: onnx.ModelProto, graph: onnx.GraphProto, index: GraphIndex, scope: str | None,
             loop: _LoopContext | None, layers: list[LayerSpec], refused: list[Refusal]) -> None:
    """``find_layers`` for ``graph`` (``scope``: the body it is, ``loop``: the Loop/Scan around it, if any)."""
    for node in graph.node:
        handler = HANDLERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        result = handler.layer(node, index) if handler is not None else None
        if isinstance(result, str):
            refused.append(Refusal(node.name, node.op_type, result))
        elif result is not None:
            init = index.initializers.get(result.weight) if result.weight else None
            layers.append(replace(result, scope=scope, weight_shape=None if init is None else tuple(init.dims)))
        found = bodies(node)
        if not found:
            refused += _subgraph_candidates(node, "it sits inside a subgraph of {op} node '{node}' (omct quantizes layers in "
                                            "If, Loop and Scan bodies only)")
            continue
        problem = _changes_per_iteration(node, loop[1]) if loop is not None else None
        if problem:
            # calibration stacks a body's tensors over the iterations: their shapes must not change between them
            refused += _subgraph_candidates(node, "it sits inside the {attr} of {op} node '{node}', inside the body of "
                                            f"'{loop[0]}', and {problem}, which calibration cannot stack")
            continue
        for label, body in found:
            inner = ((node.name, (loop[1] if loop else ()) + (body,)) if node.op_type in LOOPS
                     else (loop[0], loop[1] + (body,)) if loop else None)
            _find_in(model, body, GraphIndex(model, body, index), f"{node.name}/{label}", inner, layers, refused)


def _changes_per_iteration(node: onnx.NodeProto, loop_graphs: tuple[onnx.GraphProto, ...]) -> str | None:
    """Why the tensors of control-flow ``node``, inside a loop body, would change shape from one iteration of the
    loop to the next (None: they do not): an If whose condition is computed from the loop's inputs may take the
    other branch, a Loop whose trip count or stop condition is may run another number of iterations."""
    def varies(tensor: str) -> bool:  # computed from what a loop body gets anew each iteration
        producers = {o: n for g in loop_graphs for n in g.node for o in n.output}
        inputs = {i.name for g in loop_graphs for i in g.input}
        todo, seen = [tensor], set()
        while todo:
            t = todo.pop()
            if not t or t in seen:
                continue
            seen.add(t)
            if t in inputs:
                return True
            if t in producers:
                todo += node_reads(producers[t])
        return False

    if node.op_type == "If" and varies(node.input[0]):
        return f"its condition '{node.input[0]}' is computed from the loop's inputs: each iteration may take another branch"
    if node.op_type == "Loop":
        body = next(b for _, b in bodies(node))
        cond_in, cond_out = body.input[1].name, body.output[0].name
        producer = {o: n for n in body.node for o in n.output}.get(cond_out)
        stops = not (cond_out == cond_in or cond_out in {t.name for t in body.initializer}
                     or (producer is not None and producer.op_type == "Identity" and producer.input[0] == cond_in))
        if varies(node.input[0]) or (len(node.input) > 1 and varies(node.input[1])) or stops:
            return "its number of iterations may change from one iteration to the next"
    return None


def _subgraph_candidates(node: onnx.NodeProto, reason: str) -> list[Refusal]:
    """The candidates inside ``node``'s subgraphs, refused with ``reason`` (formatted with the node's op type
    and name and the graph attribute's name)."""
    found = []
    for attr in node.attribute:
        for body in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
            for g in all_graphs(body):
                for inner in g.node:
                    if inner.op_type in HANDLERS and inner.domain in ("", "ai.onnx"):
                        found.append(Refusal(inner.name or f"{node.name}/{attr.name}/{inner.op_type}", inner.op_type,
                                             reason.format(op=node.op_type, node=node.name, attr=attr.name)))
    return found


#: op types that only appear in a model that is already quantized
QUANTIZED_OPS = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger",
                 "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearAveragePool", "MatMulIntegerToFloat")


def quantization_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes that show a model is already quantized (QDQ, QLinear*, integer ops), in control-flow bodies too."""
    return [n for g in all_graphs(model.graph) for n in g.node
            if n.op_type in QUANTIZED_OPS or n.op_type.startswith("QLinear")]
