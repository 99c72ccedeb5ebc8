"""Build the fake-quant and deploy models from the base model, the plan, the config and the record.

Both models quantize exactly the same tensors with the same parameters:

* fake-quant: float weights already rounded to their quantized values, float bias rounded to its INT32
  grid, and quantize-dequantize of activations written in plain float ops; runs in float anywhere.
* deploy: INT8 weight initializers and INT32 bias behind DequantizeLinear, activations through
  QuantizeLinear -> DequantizeLinear. ONNX Runtime's graph optimiser fuses these into integer kernels
  (QLinearConv, QLinearMatMul, QGemm, MatMulIntegerToFloat, QLinearAveragePool).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import onnx
from onnx import helper, numpy_helper

from omct.core.params import QuantParams
from omct.core.weights import quantize_bias
from omct.errors import QuantizationError, RecordError
from omct.formats.config import QuantConfig
from omct.formats.record import LayerRecord
from omct.graph.plan import Plan


class _Builder:
    def __init__(self, model: onnx.ModelProto, deploy: bool, activation_dtype: str):
        self.model = model
        self.graph = model.graph
        self.deploy = deploy
        self.unsigned = activation_dtype == "uint8"
        self.names = {n for node in self.graph.node for n in list(node.input) + list(node.output)}
        self.names |= {t.name for t in self.graph.initializer} | {i.name for i in self.graph.input}
        self.inits = {t.name: t for t in self.graph.initializer}
        self.new_nodes: list[onnx.NodeProto] = []

    def unique(self, base: str) -> str:
        name, k = base, 1
        while name in self.names:
            name, k = f"{base}_{k}", k + 1
        self.names.add(name)
        return name

    def add_init(self, array: np.ndarray, base: str) -> str:
        name = self.unique(base)
        self.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], output_base: str, **attrs) -> str:
        out = self.unique(output_base)
        self.new_nodes.append(helper.make_node(op, inputs, [out], name=self.unique(f"{output_base}_{op}"), **attrs))
        return out

    def activation_qdq(self, tensor: str, scale: float, offset: int, base: str) -> str:
        """Quantize then dequantize ``tensor``; returns the name of the dequantized tensor.

        Deploy: QuantizeLinear -> DequantizeLinear (the runtime fuses them into integer kernels).
        Fake-quant: the same arithmetic in plain float ops (Div, Round, Add, Clip, Sub, Mul), because ONNX
        Runtime re-quantizes float weights next to a QuantizeLinear/DequantizeLinear pair on its own
        (its WeightBiasQuantization pass), which would change the simulation.
        """
        if self.deploy:
            zp = np.array(offset + 128, np.uint8) if self.unsigned else np.array(offset, np.int8)
            s = self.add_init(np.array(scale, np.float32), f"{base}.scale")
            z = self.add_init(zp, f"{base}.zero_point")
            q = self.node("QuantizeLinear", [tensor, s, z], f"{base}.quantized")
            return self.node("DequantizeLinear", [q, s, z], f"{base}.dequantized")
        s = self.add_init(np.array(scale, np.float32), f"{base}.scale")
        z = self.add_init(np.array(offset, np.float32), f"{base}.offset")
        lo = self.add_init(np.array(-128, np.float32), f"{base}.qmin")
        hi = self.add_init(np.array(127, np.float32), f"{base}.qmax")
        r = self.node("Round", [self.node("Div", [tensor, s], f"{base}.scaled")], f"{base}.rounded")
        q = self.node("Clip", [self.node("Add", [r, z], f"{base}.shifted"), lo, hi], f"{base}.quantized")
        return self.node("Mul", [self.node("Sub", [q, z], f"{base}.centered"), s], f"{base}.dequantized")

    def finish(self) -> onnx.ModelProto:
        self.graph.node.extend(self.new_nodes)
        toposort(self.graph)
        used = {n for node in self.graph.node for n in node.input} | {o.name for o in self.graph.output}
        keep = [t for t in self.graph.initializer if t.name in used]
        del self.graph.initializer[:]
        self.graph.initializer.extend(keep)
        return self.model


def toposort(graph: onnx.GraphProto) -> None:
    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    deps = [{producer[x] for x in n.input if x in producer} for n in nodes]
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


def check_record(plan: Plan, records: dict[str, LayerRecord], record_file: str, weight_shape) -> None:
    missing = [n for n in plan.layers if n not in records]
    if missing:
        raise RecordError(f"record file '{record_file}' has no factors for {len(missing)} layer(s) of the model "
                          f"(e.g. '{missing[0]}'): it belongs to another model or calibration did not finish")
    for name, spec in plan.layers.items():
        rec = records[name]
        if spec.weight is not None:
            channels = weight_shape(spec.weight)[spec.weight_axis]
            if len(rec.scale_w) not in (1, channels):
                raise RecordError(f"record file '{record_file}': layer '{name}' has {len(rec.scale_w)} weight scales "
                                  f"but its weight has {channels} output channels: the record belongs to another model")
        if name in plan.output_site and rec.scale_o is None:
            raise RecordError(f"record file '{record_file}': layer '{name}' has no output factors (scale_o)")


def build_quantized(base: onnx.ModelProto, plan: Plan, config: QuantConfig, records: dict[str, LayerRecord],
                    deploy: bool, activation_dtype: str = "uint8") -> onnx.ModelProto:
    model = onnx.ModelProto()
    model.CopyFrom(base)
    b = _Builder(model, deploy, activation_dtype)
    nodes = {n.name: n for n in model.graph.node}

    # Weights and bias, one private copy per layer (weights shared between layers stay correct).
    for name, spec in plan.layers.items():
        if spec.weight is None:
            continue
        rec, node = records[name], nodes[name]
        wcfg = config.layers[name].weight_quant_params
        bits = wcfg.num_bits if wcfg else 8
        w = numpy_helper.to_array(b.inits[spec.weight]).astype(np.float32)
        axis = spec.weight_axis if len(rec.scale_w) > 1 else None
        wp = QuantParams(np.array(rec.scale_w if axis is not None else rec.scale_w[0], np.float32),
                         np.zeros(len(rec.scale_w) if axis is not None else (), np.int32), bits, axis)
        q = wp.quantize(w)
        if deploy:
            qi = b.add_init(q.astype(np.int8), f"{name}.weight_quantized")
            s = b.add_init(wp.scale, f"{name}.weight_scale")
            z = b.add_init(np.zeros(wp.scale.shape, np.int8), f"{name}.weight_zero_point")
            attrs = {"axis": axis} if axis is not None else {}
            node.input[1] = b.node("DequantizeLinear", [qi, s, z], f"{name}.weight_dequantized", **attrs)
        else:
            node.input[1] = b.add_init(wp.dequantize(q), f"{name}.weight_fake_quant")
        if spec.bias is not None:
            bias = numpy_helper.to_array(b.inits[spec.bias]).astype(np.float32)
            if len(rec.bias_correction) == bias.size:
                bias = (bias.astype(np.float64) + np.asarray(rec.bias_correction)).astype(np.float32)
            bias_scale = (np.broadcast_to(wp.scale, bias.shape).astype(np.float64) * rec.scale_d).astype(np.float32)
            try:
                qb = quantize_bias(bias, bias_scale, 1.0)
            except OverflowError as e:
                raise QuantizationError(f"layer '{name}': INT32 bias overflow: {e}; add '{name}' to skip_layers to "
                                        "keep it in float") from None
            if deploy:
                bi = b.add_init(qb, f"{name}.bias_quantized")
                bs = b.add_init(bias_scale, f"{name}.bias_scale")
                bz = b.add_init(np.zeros(bias.shape, np.int32), f"{name}.bias_zero_point")
                node.input[2] = b.node("DequantizeLinear", [bi, bs, bz], f"{name}.bias_dequantized", axis=0)
            else:
                node.input[2] = b.add_init((qb.astype(np.float64) * bias_scale).astype(np.float32), f"{name}.bias_fake_quant")

    # Activations. Output sites are quantized for every reader (so the producer fuses into an integer
    # kernel); input-only sites only for the quantized layers that read them.
    producer = {o: n for n in model.graph.node for o in n.output}
    for index, site in enumerate(plan.sites):
        owner = site.output_of[0] if site.output_of else site.inputs_of[0]
        rec = records[owner]
        scale, offset = (rec.scale_o, rec.offset_o) if site.output_of else (rec.scale_d, rec.offset_d)
        base_name = f"{site.tensor}.site{index}"
        if site.output_of and site.tensor in producer:
            raw = b.unique(f"{site.tensor}.float")
            prod = producer[site.tensor]
            prod.output[list(prod.output).index(site.tensor)] = raw
            b.activation_qdq(raw, scale, offset, base_name)
            b.new_nodes[-1].output[0] = site.tensor  # the last dequantize node now produces the original name
            producer[raw] = prod
            producer[site.tensor] = b.new_nodes[-1]
        else:
            dq = b.activation_qdq(site.tensor, scale, offset, base_name)
            for layer in site.inputs_of:
                node = nodes[layer]
                node.input[0] = dq
    return b.finish()
