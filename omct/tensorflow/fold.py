"""BatchNormalization of a Keras 3 model, folded into the layer before it.

Keras 3 computes inference BatchNorm as ``x * m + (beta - mean * m)`` (no FusedBatchNorm op), so tf2onnx writes a
Mul and an Add by per-channel constants after the convolution or MatMul. They are folded exactly as the ONNX
frontend folds a BatchNormalization node: the scale into the weight's output channels, the shift into the bias
(``do_fusion``; ``skip_fusion_layers`` names the layers whose chain stays). Any per-channel constant Mul/Add chain
right after such a layer is folded the same way (a Dense bias Add included), since the arithmetic is identical.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: op type -> (axis of the output channels in the weight, axis of the channels in the output; -1: last)
FOLDABLE = {"Conv": (0, 1), "ConvTranspose": (1, 1), "MatMul": (1, -1)}


def _per_channel(value: np.ndarray, out_rank: int, axis: int, channels: int) -> np.ndarray | None:
    """``value`` as one number per output channel, or None when it varies along another axis."""
    if value.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - value.ndim) + value.shape
    axis = axis % out_rank
    if any(d != 1 for i, d in enumerate(shape) if i != axis) or shape[axis] not in (1, channels):
        return None
    return np.broadcast_to(value.reshape(-1), (channels,)).astype(np.float64)


def fold_scale_shift(model: onnx.ModelProto, skip: set[str]) -> list[tuple[str, list[str]]]:
    """Fold Mul/Add-by-constant chains into the Conv/ConvTranspose/MatMul before them; returns (layer, folded nodes)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    folded: list[tuple[str, list[str]]] = []
    removed: set[int] = set()
    for node in list(graph.node):
        axes = FOLDABLE.get(node.op_type)
        if axes is None or node.name in skip or len(node.input) < 2 or node.input[1] not in inits:
            continue
        if node.op_type == "ConvTranspose" and any(a.name == "group" and a.i != 1 for a in node.attribute):
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        if node.op_type == "MatMul" and weight.ndim != 2:
            continue
        w_axis, o_axis = axes
        channels = weight.shape[w_axis]
        out_rank = 2 if node.op_type == "MatMul" else weight.ndim
        scale = np.ones(channels)
        shift = np.zeros(channels)
        if node.op_type != "MatMul" and len(node.input) > 2 and node.input[2]:
            if node.input[2] not in inits:
                continue
            shift = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64)
        chain: list[onnx.NodeProto] = []
        tensor = node.output[0]
        while tensor not in outputs:
            users = consumers.get(tensor, [])
            if len(users) != 1 or users[0].op_type not in ("Mul", "Add") or len(users[0].input) != 2:
                break
            nxt = users[0]
            const = [i for i in nxt.input if i in inits]
            if len(const) != 1 or nxt.input[0] == nxt.input[1]:
                break
            value = _per_channel(numpy_helper.to_array(inits[const[0]]), out_rank, o_axis, channels)
            if value is None:
                break
            if nxt.op_type == "Mul":
                scale, shift = scale * value, shift * value
            else:
                shift = shift + value
            chain.append(nxt)
            tensor = nxt.output[0]
        if not chain or (node.op_type == "MatMul" and all(c.op_type == "Add" for c in chain) and len(chain) == 1):
            continue
        shape = [1] * weight.ndim
        shape[w_axis] = channels
        new_w = (weight * scale.reshape(shape)).astype(np.float32)
        w_name = f"{node.name}.folded_weight"
        graph.initializer.append(numpy_helper.from_array(new_w, w_name))
        node.input[1] = w_name
        end = chain[-1].output[0]
        if node.op_type == "MatMul":  # the bias stays an Add after the MatMul (the MatMul handler reads it there)
            b_name = f"{node.name}.folded_bias"
            graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), b_name))
            mid = f"{node.name}.folded_out"
            node.output[0] = mid
            add = helper.make_node("Add", [mid, b_name], [end], name=chain[0].name)
            graph.node.insert(list(graph.node).index(node) + 1, add)
        else:
            b_name = f"{node.name}.folded_bias"
            graph.initializer.append(numpy_helper.from_array(shift.astype(np.float32), b_name))
            if len(node.input) > 2:
                node.input[2] = b_name
            else:
                node.input.append(b_name)
            node.output[0] = end
        removed.update(id(c) for c in chain)
        folded.append((node.name, [c.name for c in chain]))
    if removed:
        keep = [n for n in graph.node if id(n) not in removed]
        del graph.node[:]
        graph.node.extend(keep)
        used = {i for n in graph.node for i in n.input}
        alive = [t for t in graph.initializer if t.name in used]
        del graph.initializer[:]
        graph.initializer.extend(alive)
    return folded


def squeeze_to_flatten(model: onnx.ModelProto) -> list[str]:
    """``GlobalAveragePool -> Squeeze(axes 2, 3)`` (how tf2onnx writes Keras' GlobalAveragePooling2D) becomes
    ``GlobalAveragePool -> Flatten``: the same values, and Flatten is an integer-chain op, so a residual Add, the
    pooling and the Dense after it stay on integers (a Squeeze broke that chain into float ops)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    changed = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Squeeze" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        src = producer.get(node.input[0])
        axes = sorted(int(a) % 4 for a in numpy_helper.to_array(inits[node.input[1]]).ravel())
        if src is None or src.op_type != "GlobalAveragePool" or axes != [2, 3]:
            continue
        # named like a node tf2onnx adds for the pooling's TF op ("__0": its own counter starts at 2), so the frontend
        # names it after the pooling layer ("global_average_pooling2d/Flatten")
        name = f"{src.name}__0"
        graph.node[i].CopyFrom(helper.make_node("Flatten", [node.input[0]], list(node.output), name=name, axis=1))
        changed.append(name)
    return changed


def _const(name: str, inits: dict) -> np.ndarray | None:
    return numpy_helper.to_array(inits[name]) if name in inits else None


def _batch_dim_of(tensor: str, producer: dict, inits: dict) -> str | None:
    """The tensor whose dim 0 ``tensor`` (a 1-element shape vector) holds, when it is computed as tf2onnx writes
    ``tf.shape(x)[:1]``: Shape(x), optionally Gathered by a permutation that keeps axis 0 first, Cast, Sliced [0:1]."""
    node = producer.get(tensor)
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Slice" or len(node.input) < 3:
        return None
    starts, ends = _const(node.input[1], inits), _const(node.input[2], inits)
    axes = _const(node.input[3], inits) if len(node.input) > 3 and node.input[3] else np.zeros(1, np.int64)
    steps = _const(node.input[4], inits) if len(node.input) > 4 and node.input[4] else np.ones(1, np.int64)
    if any(v is None or v.size != 1 for v in (starts, ends, axes, steps)) or (int(starts[0]), int(ends[0]),
                                                                              int(axes[0]), int(steps[0])) != (0, 1, 0, 1):
        return None
    node = producer.get(node.input[0])
    while node is not None and node.op_type == "Cast":
        node = producer.get(node.input[0])
    if node is not None and node.op_type == "Gather":
        index = _const(node.input[1], inits)
        if index is None or index.ndim != 1 or index.size == 0 or int(index[0]) != 0 or any(
                a.name == "axis" and a.i != 0 for a in node.attribute):
            return None
        node = producer.get(node.input[0])
    if node is None or node.op_type != "Shape" or any(a.name in ("start", "end") for a in node.attribute):
        return None
    return node.input[0]


def reshapes_to_flatten(model: onnx.ModelProto) -> list[str]:
    """``Reshape(x, Concat(Shape(x)[:1], [k]))`` (how tf2onnx writes Keras' Flatten) becomes ``Flatten(x, axis=1)``.

    Both keep the batch dimension and flatten the rest (a Reshape to [n, k] must have k = the product of the other
    dimensions). The shape computation read the float value of a quantized tensor, so ONNX Runtime dequantized that
    tensor and ran Shape, Gather, Cast, Slice, Concat and Cast on every call just to find the batch size; Flatten needs
    none of that. ``x`` may also be the input of a Transpose that keeps axis 0 first whose output is reshaped (tf2onnx's
    optimizer moves the Shape above the layout Transpose)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    changed = []
    for i, node in enumerate(graph.node):
        if node.op_type != "Reshape" or len(node.input) != 2 or node.input[1] in inits:
            continue
        shape = producer.get(node.input[1])
        while shape is not None and shape.op_type == "Cast":
            shape = producer.get(shape.input[0])
        if shape is None or shape.op_type != "Concat" or len(shape.input) != 2:
            continue
        rest = _const(shape.input[1], inits)
        if rest is None or rest.size != 1:
            continue
        source = _batch_dim_of(shape.input[0], producer, inits)
        data = node.input[0]
        if source != data:
            t = producer.get(data)
            perm = [list(a.ints) for a in t.attribute if a.name == "perm"] if t is not None and t.op_type == "Transpose" \
                else []
            if not (perm and perm[0] and perm[0][0] == 0 and t.input[0] == source):
                continue
        graph.node[i].CopyFrom(helper.make_node("Flatten", [data], list(node.output), name=node.name, axis=1))
        changed.append(node.name)
    if changed:
        _drop_dead(model)
    return changed


def _drop_dead(model: onnx.ModelProto) -> None:
    """Nodes none of whose outputs are read any more (and the constants only they read)."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        keep = [n for n in graph.node if any(o in used for o in n.output)]
        del graph.node[:]
        graph.node.extend(keep)
    used = {i for n in graph.node for i in n.input} | outputs
    alive = [t for t in graph.initializer if t.name in used]
    if len(alive) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(alive)
