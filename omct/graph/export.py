"""Build the fake-quant and deploy models from the base model, the plan, the config and the record.

Both models quantize exactly the same tensors with the same parameters:

* fake-quant: float weights already rounded to their quantized values, float bias rounded to its INT32
  grid, and quantize-dequantize of activations written in plain float ops; runs in float anywhere.
* deploy: INT8 weight initializers and INT32 bias behind DequantizeLinear, activations through
  QuantizeLinear -> DequantizeLinear. ONNX Runtime's graph optimiser fuses these into integer kernels
  (QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat, QLinearAveragePool; between them, chain ops:
  QLinearAdd, QLinearConcat, QLinearGlobalAveragePool, and uint8 MaxPool/Resize/Reshape/Transpose). A
  weight-only table lookup (Gather) gathers INT8 rows and scales them after the lookup.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from omct.core import nuq
from omct.core.adaround import apply_flips
from omct.core.params import QuantParams
from omct.core.weights import quantize_bias
from omct.errors import QuantizationError
from omct.formats.config import QuantConfig
from omct.formats.record import LayerRecord
from omct.graph.ops import HANDLERS, LayerSpec
from omct.graph.plan import Plan
from omct.graph.subgraphs import all_graphs, inner_first, locate, node_reads, used_names
from omct.graph.tensor_data import ExternalWriter, skeleton, tensor_array


class _Builder:
    """Adds quantization nodes and initializers to a copy of the base model; subclasses say how."""

    #: When set, initializers from 1 MiB on are written to this external-data file as they are made, not kept
    #: in the model (a big model is exported holding one weight at a time).
    sink: ExternalWriter | None = None

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        graphs = list(all_graphs(self.graph))  # names are unique across control-flow bodies (normalisation)
        self.names = {n for g in graphs for node in g.node for n in list(node.input) + list(node.output)}
        self.names |= {t.name for g in graphs for t in g.initializer} | {i.name for g in graphs for i in g.input}
        self.inits = {t.name: t for g in graphs for t in g.initializer}
        # Added nodes go into ``target``, the graph of the layer being quantized (a control-flow body: its Q/DQ
        # pairs must sit next to the op for ONNX Runtime to fuse them); added initializers go into the top
        # graph, which every body sees.
        self.target = self.graph
        self._added: dict[int, tuple[onnx.GraphProto, list[onnx.NodeProto]]] = {}

    @property
    def new_nodes(self) -> list[onnx.NodeProto]:
        """The nodes added to ``target`` so far."""
        return self._added.setdefault(id(self.target), (self.target, []))[1]

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def float_output(self, tensor: str, base: str) -> str:
        """The new name of quantized site ``base``'s float tensor (its dequantized copy takes ``tensor``)."""
        return self.unique(f"{tensor}.float")

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        if self.sink is not None and np.asarray(array).nbytes >= 2**20:
            self.graph.initializer.append(self.sink.add(np.asarray(array), name))
            return name
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output_base: str, **attrs) -> str:
        out = self.unique(output_base)
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=self.unique(f"{output_base}_{op}"), **attrs))
        return out

    def weight(self, codes: np.ndarray, params: QuantParams, base: str, levels: list[int] | None = None) -> str:
        """The tensor that replaces a layer's float weight, given its integer codes (on ``levels`` with NUQ)."""
        raise NotImplementedError

    #: Drop a Conv's kernel taps that read only padding (``trim_padding_taps``): the deploy model only.
    trims_padding_taps = False

    def bias(self, codes: np.ndarray, scale: np.ndarray, base: str) -> str:
        """The tensor that replaces a layer's float bias, given its INT32 codes and their scale."""
        raise NotImplementedError

    def lookup(self, node: onnx.NodeProto, codes: np.ndarray, params: QuantParams, base: str) -> None:
        """Quantize a weight-only table lookup (``Gather(table, ids)``, one scale per row) in place."""
        raise NotImplementedError

    def activation_qdq(self, tensor: str, params: QuantParams, base: str) -> str:
        """Quantize then dequantize ``tensor``; returns the name of the dequantized tensor."""
        raise NotImplementedError

    def finish(self) -> onnx.ModelProto:
        for graph, nodes in self._added.values():
            graph.node.extend(nodes)
        for graph in inner_first(self.graph):
            toposort(graph)
        used = used_names(self.graph)
        for graph in inner_first(self.graph):
            for i in reversed(range(len(graph.initializer))):  # in place: extend() would copy every weight
                if graph.initializer[i].name not in used:
                    del graph.initializer[i]
        return self.model


class FakeQuantBuilder(_Builder):
    """Float weights already on their quantized values, activation quantize/dequantize in plain float ops
    (Div, Round, Add, Clip, Sub, Mul): ONNX Runtime re-quantizes float weights next to a
    QuantizeLinear/DequantizeLinear pair on its own (its WeightBiasQuantization pass), which would change the
    simulation."""

    def weight(self, codes, params, base, levels=None):
        return self.add_init(params.dequantize(codes), f"{base}.weight_fake_quant")

    def bias(self, codes, scale, base):
        return self.add_init((codes.astype(np.float64) * scale).astype(np.float32), f"{base}.bias_fake_quant")

    def lookup(self, node, codes, params, base):
        node.input[0] = self.weight(codes, params, base)

    def activation_qdq(self, tensor, params, base):
        s = self.add_init(np.asarray(params.scale, np.float32), f"{base}.scale")
        z = self.add_init(np.asarray(params.offset, np.float32), f"{base}.offset")
        lo = self.add_init(np.array(params.qmin, np.float32), f"{base}.qmin")
        hi = self.add_init(np.array(params.qmax, np.float32), f"{base}.qmax")
        r = self.node("Round", [self.node("Div", [tensor, s], f"{base}.scaled")], f"{base}.rounded")
        q = self.node("Clip", [self.node("Add", [r, z], f"{base}.shifted"), lo, hi], f"{base}.quantized")
        return self.node("Mul", [self.node("Sub", [q, z], f"{base}.centered"), s], f"{base}.dequantized")


class DeployBuilder(_Builder):
    """INT8 weights and INT32 bias behind DequantizeLinear, activations through QuantizeLinear ->
    DequantizeLinear: the pattern ONNX Runtime fuses into integer kernels.

    Activations are stored as uint8 by default (``unsigned_activations``): the record keeps AMCT's signed
    mapping and the deploy model the same mapping shifted by 128, because ONNX Runtime's x86 kernels fuse far
    more convolutions with U8S8 than with S8S8.

    Layer names stay where people and tools look: on the layer's node and on its weight
    (``{layer}.weight_quantized``, or ``{layer}.weight_packed`` with NUQ). Every other added tensor (bias, level
    tables, scales, zero points, Q/DQ outputs, NUQ unpacking) is named by a short per-layer key (``q7.bias_quantized``,
    ``q7.ws``; see ``key``) and added nodes have no name: on a small model the long layer names repeated in each
    of them were a tenth of the deploy file."""

    trims_padding_taps = True
    #: float residual Adds read by a LayerNorm are written as Sum (``residual_sums``); off: as before issue 17
    writes_residual_sums = True

    def __init__(self, model: onnx.ModelProto, unsigned_activations: bool = True):
        super().__init__(model)
        self.unsigned = unsigned_activations
        self._shared: dict[str, str] = {}  # constants many layers read
        self._keys: dict[str, str] = {}
        self._weight_scale: dict[str, tuple[str, np.ndarray]] = {}  # layer -> its weight scale: name, value
        self._compact: set[str] = set()  # NUQ layers whose scales (float16) and bias (INT16 when it fits) are halved
        self._scales: dict[bytes, str] = {}  # scalar float32 scale value -> its initializer

    def key(self, base: str) -> str:
        """The short prefix of the plumbing tensors of layer or site ``base`` (``q0``, ``q1``, ...)."""
        if base not in self._keys:
            self._keys[base] = self.unique(f"q{len(self._keys)}")
        return self._keys[base]

    def float_output(self, tensor: str, base: str) -> str:
        return self.unique(f"{self.key(base)}.f")

    def node(self, op: str, inputs: list[str], output_base: str, **attrs) -> str:
        """An added node without a node name (ONNX makes it optional; ONNX Runtime names nodes itself)."""
        out = self.unique(output_base)
        self.new_nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def weight(self, codes, params, base, levels=None):
        qi = (self.add_init(codes.astype(np.int8), f"{base}.weight_quantized") if not levels
              else self.unpacked_levels(codes, levels, params.axis, base))
        k = self.key(base)
        scale = np.asarray(params.scale, np.float32)
        if levels and scale.size > 1 and np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
            # NUQ's per-channel scales are float16 numbers (nuq.fit): stored in half the bytes and cast back
            # (exact; folded at session creation), as the layer's bias when it fits in INT16
            self._compact.add(base)
            s = self.node("Cast", [self.add_init(scale.astype(np.float16), f"{k}.ws")], f"{k}.wsf",
                          to=onnx.TensorProto.FLOAT)
        else:
            s = self.add_init(params.scale, f"{k}.ws")
        self._weight_scale[base] = (s, scale)
        # all zeros: one initializer per channel count, shared (ONNX Runtime's Gemm fusion wants it present)
        z = self.shared(np.zeros(params.scale.shape, np.int8), f"zero.i8x{params.scale.size}")
        attrs = {"axis": params.axis} if params.axis is not None else {}
        return self.node("DequantizeLinear", [qi, s, z], f"{k}.w", **attrs)

    def scale(self, value: float | np.ndarray, base: str) -> str:
        """One initializer per scalar scale value: a bias scale's input scale is its input's activation scale."""
        value = np.asarray(value, np.float32)
        if value.ndim:
            return self.add_init(value, base)
        if value.tobytes() not in self._scales:
            self._scales[value.tobytes()] = self.add_init(value, base)
        return self._scales[value.tobytes()]

    def shared(self, array: np.ndarray, key: str) -> str:
        """One initializer for a constant that many layers read (NUQ unpacking constants, zero points)."""
        if key not in self._shared:
            self._shared[key] = self.add_init(array, key)
        return self._shared[key]

    def unpacked_levels(self, codes: np.ndarray, levels: list[int], axis: int | None, base: str) -> str:
        """NUQ: the INT8 weight stored as bit-packed indices into the layer's level tables (one row per output
        channel on ``axis``), expanded by standard ops on constants only (BitShift, Cast, Mod, Mul, ReduceSum,
        Reshape, Slice, GatherElements), which ONNX Runtime folds into an INT8 initializer when the session is
        created: the DequantizeLinear that follows then fuses into the integer kernel as with a uniform weight.
        Bit planes (one bit of every index per plane, 8 per byte) serve any table size with plain byte ops."""
        channels = codes.shape[axis] if axis is not None else 1
        table = nuq.level_table(levels, channels)  # [channels, num_steps]
        bits = nuq.index_bits(table.shape[1])
        rows = np.moveaxis(codes, axis, 0).reshape(channels, -1) if axis is not None else codes.reshape(1, -1)
        index = np.stack([np.searchsorted(table[c], rows[c]) for c in range(channels)])  # position in its row
        # the index in the weight's own layout: it is packed in that order and expanded back to that shape
        index = (np.moveaxis(index.reshape((channels,) + tuple(np.delete(codes.shape, axis))), 0, axis)
                 if axis is not None else index.reshape(codes.shape))
        packed = self.add_init(nuq.pack_indices(index, bits)[:, :, None], f"{base}.weight_packed")  # [bits, bytes, 1]
        steps, k = iter(range(100)), self.key(base)

        def op(op_type: str, inputs: list[str], **attrs) -> str:
            return self.node(op_type, inputs, f"{k}.u{next(steps)}", **attrs)

        bit = op("BitShift", [packed, self.shared(np.arange(7, -1, -1, dtype=np.uint8), "nuq.bit_shifts")],
                 direction="RIGHT")  # [bits, bytes, 8]
        bit = op("Mod", [op("Cast", [bit], to=onnx.TensorProto.INT32), self.shared(np.array(2, np.int32), "nuq.two")])
        values = (1 << np.arange(bits, dtype=np.int32)).reshape(bits, 1, 1)
        idx = op("ReduceSum", [op("Mul", [bit, self.shared(values, f"nuq.bit_values{bits}")]),
                               self.shared(np.array([0], np.int64), "nuq.zero")], keepdims=0)  # [bytes, 8]
        if codes.size % 8:  # the last byte of each plane is padded: cut the padding off
            idx = op("Slice", [op("Reshape", [idx, self.shared(np.array([-1], np.int64), "nuq.flat")]),
                               self.shared(np.array([0], np.int64), "nuq.zero"),
                               self.add_init(np.array([codes.size], np.int64), f"{k}.n")])
        # each weight looks up its channel's row: GatherElements on [channels, -1] (channels first) or, for a 2-D
        # weight with its channels last (MatMul), on [-1, channels] with the tables transposed
        last = axis is not None and axis == codes.ndim - 1 and axis != 0
        lookup = (-1, channels) if last else (channels, -1)
        idx = op("Reshape", [idx, self.add_init(np.array(lookup, np.int64), f"{k}.ls")])
        # channels that share a table (nuq.share_tables): each distinct row once, and each channel's row number
        # (uint8), expanded by Gather; also folded at session creation
        rows_used, row_of = np.unique(table, axis=0, return_inverse=True)
        if len(rows_used) <= 256 and rows_used.size + channels < table.size:
            distinct = self.add_init((rows_used.T if last else rows_used).astype(np.int8), f"{k}.weight_levels")
            which = op("Cast", [self.add_init(row_of.reshape(-1).astype(np.uint8), f"{k}.weight_table")],
                       to=onnx.TensorProto.INT64)
            levels_init = op("Gather", [distinct, which], axis=1 if last else 0)
        else:
            levels_init = self.add_init((table.T if last else table).astype(np.int8), f"{k}.weight_levels")
        w = op("GatherElements", [levels_init, idx], axis=0 if last else 1)
        shape = self.add_init(np.array(codes.shape, np.int64), f"{k}.s")
        return self.node("Reshape", [w, shape], f"{k}.wq")

    def bias(self, codes, scale, base):
        k = self.key(base)
        if base in self._compact and codes.size > 1 and np.abs(codes).max() <= np.iinfo(np.int16).max:
            # every value fits in 16 bits: stored as INT16 and cast back (lossless; folded at session creation)
            bi = self.node("Cast", [self.add_init(codes.astype(np.int16), f"{k}.bias_quantized")], f"{k}.bi",
                           to=onnx.TensorProto.INT32)
        else:
            bi = self.add_init(codes, f"{k}.bias_quantized")
        bs = self.bias_scale(np.asarray(scale, np.float32), base)
        # no zero point: absent means 0 of the input's type (INT32), and ONNX Runtime fuses it the same
        return self.node("DequantizeLinear", [bi, bs], f"{k}.b", axis=0)

    def bias_scale(self, scale: np.ndarray, base: str) -> str:
        """The bias scale is the weight scale times the input scale: stored as Mul(weight scale, input scale),
        which ONNX Runtime folds at session creation, when that float32 product is bit for bit the scale (the
        integer kernel reads no bias scale at all; an unfused float op reads the same value). Else stored."""
        k = self.key(base)
        name, w = self._weight_scale.get(base, ("", np.zeros(0, np.float32)))
        if w.shape == scale.shape and w.size > 1 and w[0] != 0:
            a = np.float32(np.float64(scale[0]) / np.float64(w[0]))
            if np.array_equal(w * a, scale):
                return self.node("Mul", [name, self.scale(a, f"{k}.is")], f"{k}.bs")
        return self.add_init(scale, f"{k}.bs")

    def lookup(self, node, codes, params, base):
        """Gather INT8 rows, then Cast and Mul by the gathered row scales: only the rows looked up are converted.
        A DequantizeLinear of the table in front of the Gather would dequantize the whole table on every run."""
        out, ids = node.output[0], node.input[1]
        node.input[0] = self.add_init(codes.astype(np.int8), f"{base}.weight_quantized")
        node.output[0] = self.unique(f"{out}.int8_rows")
        rows = self.node("Cast", [node.output[0]], f"{base}.rows", to=onnx.TensorProto.FLOAT)
        if params.axis is None:  # per-tensor (channel_wise false): one scale
            scale = self.add_init(np.asarray(params.scale, np.float32), f"{base}.weight_scale")
        else:  # [rows, 1]: the gathered scales broadcast over each row
            table = self.add_init(np.asarray(params.scale, np.float32).reshape(-1, 1), f"{base}.row_scale")
            scale = self.node("Gather", [table, ids], f"{base}.gathered_scale", axis=0)
        self.node("Mul", [rows, scale], f"{base}.dequantized")
        self.new_nodes[-1].output[0] = out  # the original name: readers and graph outputs are unchanged
        # The Mul that yields the layer's float output takes the layer's name (omct analyze lines layers up by it)
        self.new_nodes[-1].name, node.name = node.name, self.unique(f"{node.name}.int8_rows")

    def activation_qdq(self, tensor, params, base):
        half = 2 ** (params.num_bits - 1)
        offset = np.asarray(params.offset, np.int64)
        zp = (offset + half).astype(np.uint8) if self.unsigned else offset.astype(np.int8)
        k = self.key(base)
        s = self.scale(params.scale, f"{k}.s")
        z = self.add_init(zp, f"{k}.z")
        q = self.node("QuantizeLinear", [tensor, s, z], f"{k}.q")
        return self.node("DequantizeLinear", [q, s, z], f"{k}.dq")


def toposort(graph: onnx.GraphProto) -> None:
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [{producer[x] for x in node_reads(n) if x in producer} for n in nodes]  # bodies' outer reads too
    users: dict[int, list[int]] = {}
    for i, d in enumerate(deps):
        for j in d:
            users.setdefault(j, []).append(i)
    pending = [len(d) for d in deps]
    ready = deque(i for i, c in enumerate(pending) if c == 0)
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for u in users.get(i, []):
            pending[u] -= 1
            if pending[u] == 0:
                ready.append(u)
    if len(order) != len(nodes):
        raise RuntimeError("internal error: the quantized graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)


def residual_sums(model: onnx.ModelProto) -> int:
    """Write each float residual ``Add`` that only a LayerNormalization reads (or the ReduceMean + Sub that ONNX
    Runtime fuses into one, opset < 17 exports) as the equivalent two-input ``Sum``, in the model's graph and its bodies;
    returns how many. ONNX Runtime fuses Add + LayerNormalization on static 3-D shapes into
    SkipLayerNormalization, whose CPU kernel (1.32) runs 6-8x slower than the two ops it replaces (BERT-base and
    BERT-mini shapes alike); its own QDQ models escape it only by quantizing the residual stream (QLinearAdd),
    which costs accuracy. Sum computes the same values and matches no fusion (docs/ARCHITECTURE.md)."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 8:  # Sum broadcasts from opset 8 on
        return 0
    graphs = list(all_graphs(model.graph))
    if not any(n.op_type in ("LayerNormalization", "ReduceMean") for g in graphs for n in g.node):
        return 0  # no LayerNorm, written as one op or out: nothing to rewrite (a CNN), without mapping every reader
    count = 0
    for g in graphs:
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for x in set(node_reads(n)):
                readers.setdefault(x, []).append(n)
        constant = {t.name for t in g.initializer} | {o for n in g.node if n.op_type == "Constant" for o in n.output}
        outputs = {o.name for o in g.output}
        for n in g.node:
            if n.op_type != "Add" or n.domain not in ("", "ai.onnx") or len(n.input) != 2 or n.output[0] in outputs:
                continue
            if any(x in constant for x in n.input):  # a bias, not a residual
                continue
            users = readers.get(n.output[0], [])
            ops = sorted(u.op_type for u in users)
            norm = ops == ["LayerNormalization"] and users[0].input[0] == n.output[0]
            if ops == ["ReduceMean", "Sub"]:  # LayerNormalization written out: x - ReduceMean(x), ...
                mean, sub = sorted(users, key=lambda u: u.op_type)
                norm = list(sub.input) == [n.output[0], mean.output[0]]
            if norm:
                n.op_type = "Sum"
                count += 1
    return count


def weight_params(record: LayerRecord, num_bits: int, weight_axis: int | None) -> QuantParams:
    """The weight quantization a record describes: per channel on ``weight_axis`` or per tensor."""
    axis = weight_axis if len(record.scale_w) > 1 else None
    return QuantParams(np.array(record.scale_w if axis is not None else record.scale_w[0], np.float32),
                       np.zeros(len(record.scale_w) if axis is not None else (), np.int32), num_bits, axis)


def layer_float_weight(weight: np.ndarray, record: LayerRecord, spec: LayerSpec) -> np.ndarray:
    """The float weight a layer's codes approximate: the model's, times the ``dmq_balancer`` factors along its
    input-channel axis when the record has them (the layer then reads its input divided by them)."""
    if not record.dmq_factor:
        return weight
    shape = [1] * weight.ndim
    shape[spec.weight_in_axis] = -1
    return (weight * np.asarray(record.dmq_factor, np.float32).reshape(shape)).astype(np.float32)


def layer_weight_codes(weight: np.ndarray, record: LayerRecord, params: QuantParams,
                       dtype: type = np.int64) -> np.ndarray:
    """The integer weight of a layer from its float weight and its record: the one place export, and every
    algorithm that needs the quantized weight (bias correction), turn a weight into codes, so fake-quant,
    deploy and the corrections agree. Round to nearest unless the record says otherwise; a weight encoding
    with its own record fields (NUQ's ``nuq_levels``, AdaRound's ``ada_flip``) is one branch here."""
    if record.nuq_levels:  # with ada_flip: NUQ's output-aware assignment (the other level around w / s)
        return nuq.to_levels(weight, params.scale, params.axis, record.nuq_levels, record.ada_flip)
    if record.ada_flip:
        return apply_flips(weight, params, record.ada_flip)
    return params.quantize(weight, dtype)  # ``dtype`` (INT8 for export) only here: no int64 copy of a big table


def build(builder: _Builder, plan: Plan, config: QuantConfig, records: dict[str, LayerRecord],
          codes: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """Quantize ``builder.model`` (a copy of the base model) as ``plan`` and ``records`` say. ``codes``: integer
    weights by layer, read where present and filled in where not (the fake-quant and deploy models of one save
    compute them once)."""
    b = builder
    nodes = {n.name: n for g in all_graphs(b.graph) for n in g.node}
    _, graph_of = locate(b.model)  # the graph (top or a control-flow body) each node sits in
    # the static height and width of the inputs of Convs whose padding-only taps may be trimmed (deploy only)
    spatial = (_spatial_shapes(b.model) if b.trims_padding_taps and any(
        s.op_type == "Conv" and s.window is not None for s in plan.layers.values()) else {})

    # Weights and bias, one private copy per layer (weights shared between layers stay correct), wired into
    # the ports the op's handler names.
    for name, spec in plan.layers.items():
        if spec.weight is None:
            continue
        rec, node, handler = records[name], nodes[name], HANDLERS[spec.op_type]
        b.target = graph_of[name]
        wcfg = config.layers[name].weight_quant_params
        wp = weight_params(rec, wcfg.num_bits if wcfg else 8, spec.weight_axis)
        q = None if codes is None else codes.get(name)
        if q is None:
            try:
                w = layer_float_weight(tensor_array(b.inits[spec.weight]).astype(np.float32, copy=False), rec, spec)
                q = layer_weight_codes(w, rec, wp, np.int8 if wp.num_bits <= 8 else np.int64)
            except ValueError as e:
                raise QuantizationError(f"layer '{name}': record: {e}") from None
            if codes is not None:  # kept as INT8 (a quarter of the float weight) when the bits allow
                q = codes[name] = q.astype(np.int8, copy=False) if wp.num_bits <= 8 else q
        if spec.weight_only:
            b.lookup(node, q, wp, name)
            continue
        if spec.input in spatial and spec.op_type == "Conv" and spec.window is not None:
            q = trim_padding_taps(node, q, spec.window, spatial[spec.input])
        node.input[handler.weight_port] = b.weight(q, wp, name, rec.nuq_levels or None)
        if spec.bias is not None:
            bias = tensor_array(b.inits[spec.bias]).astype(np.float32)
            if len(rec.bias_correction) == bias.size:
                bias = (bias.astype(np.float64) + np.asarray(rec.bias_correction)).astype(np.float32)
            # per-channel weight scales, repeated for each group when the weight holds one group's outputs
            # (grouped ConvTranspose: weight (in, out / group, k...))
            channel_scale = np.tile(wp.scale, bias.size // wp.scale.size) if wp.scale.size > 1 else wp.scale
            bias_scale = (np.broadcast_to(channel_scale, bias.shape).astype(np.float64) * rec.scale_d).astype(np.float32)
            try:
                qb = quantize_bias(bias, bias_scale, 1.0)
            except OverflowError as e:
                raise QuantizationError(f"layer '{name}': INT32 bias overflow: {e}; add '{name}' to skip_layers to "
                                        "keep it in float") from None
            bias_tensor = b.bias(qb, bias_scale, name)
            if spec.bias_node is None:
                node.input[handler.bias_port] = bias_tensor
            else:  # the bias is added by another node (MatMul + Add): replace it where that node reads it
                reader = nodes[spec.bias_node]
                reader.input[list(reader.input).index(spec.bias)] = bias_tensor

    # Activations. Output sites are quantized for every reader (so the producer fuses into an integer
    # kernel); input-only sites only for the quantized layers that read them.
    producer = {o: n for g in all_graphs(b.graph) for n in g.node for o in n.output}
    tensor_graph = {o: g for g in all_graphs(b.graph) for n in g.node for o in n.output}
    for index, site in enumerate(plan.sites):
        # an input-only site is quantized as its first reader's record says; a balanced reader (dmq_balancer)
        # quantizes its own scaled copy below
        plain = [layer for layer in site.inputs_of if not records[layer].dmq_factor]
        if not site.output_of and not plain:
            continue
        owner = site.output_of[0] if site.output_of else plain[0]
        rec = records[owner]
        scale, offset = (rec.scale_o, rec.offset_o) if site.output_of else (rec.scale_d, rec.offset_d)
        params = QuantParams(np.asarray(scale, np.float32), np.asarray(offset, np.int32), site.act.get("num_bits", 8))
        base_name = f"{site.tensor}.site{index}"
        if site.output_of and site.tensor in producer:
            prod = producer[site.tensor]
            b.target = home = tensor_graph[site.tensor]
            raw = b.float_output(site.tensor, base_name)
            prod.output[list(prod.output).index(site.tensor)] = raw
            b.activation_qdq(raw, params, base_name)
            b.new_nodes[-1].output[0] = site.tensor  # the last dequantize node now produces the original name
            producer[raw], tensor_graph[raw] = prod, home
            producer[site.tensor] = b.new_nodes[-1]
            # Readers inside a control-flow body below the producer's graph get a Q/DQ pair of their own (exact:
            # the values are on the grid already), so that their op fuses into an integer kernel there too.
            readers = [n for n in site.inputs_of if graph_of[n] is not home and not records[n].dmq_factor]
        else:
            home, readers = None, plain
        for graph in {id(graph_of[n]): graph_of[n] for n in readers}.values():
            b.target = graph
            dq = b.activation_qdq(site.tensor, params, base_name)
            for layer in (n for n in readers if graph_of[n] is graph):
                spec = plan.layers[layer]
                if spec.chain is not None:  # every input that reads the tensor
                    nodes[layer].input[:] = [dq if x == site.tensor else x for x in nodes[layer].input]
                else:
                    nodes[layer].input[HANDLERS[spec.op_type].activation_port] = dq
    for name, spec in plan.layers.items():
        rec = records.get(name)
        if rec is None or not rec.dmq_factor or name not in plan.input_site:
            continue
        # dmq_balancer: the layer reads its input divided per channel by the factors, quantized as its record says
        port = HANDLERS[spec.op_type].activation_port
        b.target = graph_of[name]
        shape = (-1, 1, 1) if spec.op_type == "Conv" else (-1,)
        inv = b.add_init((1.0 / np.asarray(rec.dmq_factor, np.float32)).reshape(shape), f"{name}.dmq_inverse")
        scaled = b.node("Mul", [nodes[name].input[port], inv], f"{name}.dmq_balanced")
        bits = plan.sites[plan.input_site[name]].act.get("num_bits", 8)
        params = QuantParams(np.asarray(rec.scale_d, np.float32), np.asarray(rec.offset_d, np.int32), bits)
        nodes[name].input[port] = b.activation_qdq(scaled, params, f"{name}.dmq_input")
    return b.finish()


def live_taps(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int, dilation: int) -> tuple[int, int]:
    """The first and last kernel tap of one spatial axis that reads the input (not only padding) at some output
    position: taps outside that range multiply padding everywhere (a 3x3 kernel on a 1x1 feature map with pads 1
    only ever uses its centre)."""
    out = (size + pad_begin + pad_end - dilation * (kernel - 1) - 1) // stride + 1
    live = [t for t in range(kernel) if _tap_reads_input(t * dilation - pad_begin, stride, out, size)]
    return (live[0], live[-1]) if live else (0, kernel - 1)


def _tap_reads_input(first: int, stride: int, out: int, size: int) -> bool:
    """Whether a tap at input position ``first + p * stride`` for output positions ``p < out`` ever lands in
    ``[0, size)``: the first position at or past 0 decides (integer arithmetic, no array per tap)."""
    p = 0 if first >= 0 else (-first + stride - 1) // stride
    return p < out and first + p * stride < size


def trim_padding_taps(node: onnx.NodeProto, codes: np.ndarray, window: tuple, spatial: tuple[int, ...] | None) -> np.ndarray:
    """A 2-D Conv's integer weight without the kernel taps that read only padding, and ``node``'s pads shrunk to
    match; the output is unchanged (those taps multiply zeros, or the zero point in the integer kernel). ONNX
    Runtime's float NCHWc kernels skip such taps, its integer QLinearConv computes them: on small feature maps
    (ResNet-18's last stage at 32x32 inputs is 1x1) the untrimmed integer convolution ran 4x slower than float.
    Needs the input's static height and width (``spatial``); anything else is returned as it is."""
    if spatial is None or len(spatial) != 2:
        return codes
    kernel, strides, pads, dilations = window
    keep, new_pads = [], [0, 0, 0, 0]
    for axis in range(2):
        k, s, d, pb, pe = kernel[axis], strides[axis], dilations[axis], pads[axis], pads[axis + 2]
        first, last = live_taps(spatial[axis], k, s, pb, pe, d)
        out = (spatial[axis] + pb + pe - d * (k - 1) - 1) // s + 1
        k2, pb2 = last - first + 1, pb - first * d
        pe2 = max(0, (out - 1) * s + d * (k2 - 1) + 1 - spatial[axis] - pb2)
        if pb2 < 0 or (spatial[axis] + pb2 + pe2 - d * (k2 - 1) - 1) // s + 1 != out:
            return codes
        keep.append(slice(first, last + 1))
        new_pads[axis], new_pads[axis + 2] = pb2, pe2
    if all(sl.stop - sl.start == k for sl, k in zip(keep, kernel, strict=True)):
        return codes
    for a in node.attribute:
        if a.name == "pads":
            del a.ints[:]
            a.ints.extend(new_pads)
            break
    else:
        node.attribute.append(helper.make_attribute("pads", new_pads))
    for a in node.attribute:
        if a.name == "kernel_shape":
            del a.ints[:]
            a.ints.extend(sl.stop - sl.start for sl in keep)
    return np.ascontiguousarray(codes[:, :, keep[0], keep[1]])


def _spatial_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Static spatial dims (everything after batch and channels) of the 4-D tensors of ``model``, inferred on its
    skeleton; a tensor with a symbolic dim there is left out. Best-effort: a failed inference trims nothing."""
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton(model))
    except Exception:
        return {}
    shapes = {}
    for vi in list(inferred.graph.input) + list(inferred.graph.value_info):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) == 4 and all(d.HasField("dim_value") for d in dims[2:]):
            shapes[vi.name] = tuple(d.dim_value for d in dims[2:])
    return shapes


def _copy(base: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    return model


def _with_sink(builder: _Builder, sink: ExternalWriter | None) -> _Builder:
    builder.sink = sink
    return builder


def fake_quant_model(base: onnx.ModelProto, plan: Plan, config: QuantConfig, records: dict[str, LayerRecord],
                     sink: ExternalWriter | None = None, codes: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    return build(_with_sink(FakeQuantBuilder(_copy(base)), sink), plan, config, records, codes)


def deploy_model(base: onnx.ModelProto, plan: Plan, config: QuantConfig, records: dict[str, LayerRecord],
                 unsigned_activations: bool = True, sink: ExternalWriter | None = None,
                 codes: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    model = build(_with_sink(DeployBuilder(_copy(base), unsigned_activations), sink), plan, config, records, codes)
    if DeployBuilder.writes_residual_sums:
        residual_sums(model)  # the float residual Adds before LayerNorms: no slow SkipLayerNormalization
    return model
