"""Cross-layer equalization (CLE; Nagel et al., "Data-Free Quantization", AIMET, NNCF's channel alignment).

For ``Conv A -> (Relu) -> Conv B``, scaling A's output channel ``i`` (weights and bias) by ``1 / s_i`` and B's
input channel ``i`` by ``s_i`` computes the same function (ReLU is positively homogeneous), and with
``s_i = sqrt(r_A,i / r_B,i)`` (``r``: max |w| of the channel) both channels get the same range
``sqrt(r_A,i * r_B,i)``. Per-channel weight scales then lose less on B, and A's output tensor, quantized per
tensor, no longer has a few channels that set the range for all. Depthwise B (group = channels) is scaled
per output channel. Chains (A -> B -> C) are iterated until the scales settle.

Only exact rewrites: a ReLU6 (``Clip(0, 6)``) between the two is left alone, since ``clip(y / s, 0, 6) * s`` is
not ``clip(y, 0, 6)``; AIMET swaps ReLU6 for ReLU first, which changes the float model. Data-free, in place,
applied before calibration when config.json's ``cross_layer_equalization`` is true.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from omct.graph.normalize import _links
from omct.graph.tensor_data import tensor_array


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def equalization_pairs(model: onnx.ModelProto) -> list[tuple[onnx.NodeProto, onnx.NodeProto]]:
    """(A, B) Conv pairs that can be equalized exactly: A's output reaches only B, directly or through one Relu."""
    graph = model.graph
    inits, consumers, _, graph_outputs = _links(graph)
    pairs = []
    for a in graph.node:
        if a.op_type != "Conv" or a.input[1] not in inits or len(inits[a.input[1]].dims) != 4:
            continue
        if len(a.input) > 2 and a.input[2] and a.input[2] not in inits:
            continue
        out = a.output[0]
        users = consumers.get(out, [])
        if len(users) == 1 and users[0].op_type == "Relu" and out not in graph_outputs:
            out = users[0].output[0]
            users = consumers.get(out, [])
        if len(users) != 1 or out in graph_outputs or users[0].op_type != "Conv" or users[0].input[0] != out:
            continue
        b = users[0]
        if b.input[1] not in inits or len(inits[b.input[1]].dims) != 4:
            continue
        channels, group = inits[a.input[1]].dims[0], _attr(b, "group", 1)
        wb = inits[b.input[1]].dims
        if (group == 1 and wb[1] == channels) or (group == channels and wb[1] == 1 and wb[0] % channels == 0):
            pairs.append((a, b))
    return pairs


def equalize(model: onnx.ModelProto, iterations: int = 20, tol: float = 1e-3) -> dict[tuple[str, str], np.ndarray]:
    """Equalize every exact pair in place; returns the accumulated scale per (A, B) node names (A's output
    channel ``i`` was divided by ``s_i``, B's input channel ``i`` multiplied), for frontends that must apply
    the same change to their own model (PyTorch modules)."""
    pairs = equalization_pairs(model)
    if not pairs:
        return {}
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    # private copies of the weights and biases changed (an initializer may be shared by other nodes)
    arrays: dict[tuple[str, int], np.ndarray] = {}
    for a, b in pairs:
        for node, port in ((a, 1), (a, 2), (b, 1)):
            if len(node.input) > port and node.input[port]:
                arrays[(node.name, port)] = tensor_array(inits[node.input[port]]).astype(np.float64)
    total = {(a.name, b.name): np.ones(arrays[(a.name, 1)].shape[0]) for a, b in pairs}
    for _ in range(iterations):
        change = 0.0
        for a, b in pairs:
            wa, wb = arrays[(a.name, 1)], arrays[(b.name, 1)]
            channels, group = wa.shape[0], _attr(b, "group", 1)
            ra = np.abs(wa).reshape(channels, -1).max(axis=1)
            if group == 1:
                rb = np.abs(wb).max(axis=(0, 2, 3))
            else:  # depthwise: B's output channels i*m .. i*m+m-1 read A's channel i
                rb = np.abs(wb).reshape(channels, -1).max(axis=1)
            s = np.where((ra > 0) & (rb > 0), np.sqrt(ra / np.where(rb > 0, rb, 1.0)), 1.0)
            wa /= s.reshape(-1, 1, 1, 1)
            if (a.name, 2) in arrays:
                arrays[(a.name, 2)] /= s
            if group == 1:
                wb *= s.reshape(1, -1, 1, 1)
            else:
                wb *= np.repeat(s, wb.shape[0] // channels).reshape(-1, 1, 1, 1)
            total[(a.name, b.name)] *= s
            change = max(change, float(np.abs(np.log(s)).max()))
        if change < tol:
            break
    for (name, port), value in arrays.items():
        node = next(n for n in graph.node if n.name == name)
        new = f"{name}.{'weight' if port == 1 else 'bias'}_equalized"
        graph.initializer.append(numpy_helper.from_array(value.astype(np.float32), new))
        node.input[port] = new
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return {k: v for k, v in total.items()}
