"""Hand-built ONNX models, one per op kind, with random weights (for graph-level tests)."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inputs, outputs, inits, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def conv_model(rng, dims=2, groups=1, cin=8, cout=8, dilation=1, opset=17, relu=True, relu6=False):
    k = [3] * dims
    w = (rng.normal(size=(cout, cin // groups, *k)) * 0.3).astype(np.float32)
    b = rng.normal(size=cout).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", group=groups, pads=[1] * (2 * dims),
                              dilations=[dilation] * dims)]
    inits = {"w": w, "b": b}
    if relu6:  # ReLU6 as PyTorch exports it
        nodes.append(helper.make_node("Clip", ["c", "lo", "hi"], ["y"], name="act"))
        inits.update(lo=np.array(0, np.float32), hi=np.array(6, np.float32))
    else:
        nodes.append(helper.make_node("Relu" if relu else "Identity", ["c"], ["y"], name="act"))
    return make_model(nodes, [vi("x", ["N", cin] + [6] * dims)], [vi("y", None)], inits, opset)


def linear_model(rng, kind="Gemm", trans_b=1, trans_a=0, alpha=1.0, tokens=False):
    w = (rng.normal(size=(16, 12) if trans_b else (12, 16)) * 0.3).astype(np.float32)
    b = rng.normal(size=16).astype(np.float32) * 0.1
    if kind == "Gemm":
        node = helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=trans_b, transA=trans_a, alpha=alpha)
        shape = ["N", 12]
    else:
        w = w if not trans_b else w.T.copy()
        node = helper.make_node("MatMul", ["x", "w"], ["m"], name="fc")
        shape = ["N", 5, 12] if tokens else ["N", 12]
    nodes = [node]
    inits = {"w": w}
    if kind == "Gemm":
        inits["b"] = b
    else:
        nodes.append(helper.make_node("Add", ["m", "b"], ["y"], name="bias_add"))
        inits["b"] = b
    return make_model(nodes, [vi("x", shape)], [vi("y", None)], inits)


def conv_transpose_model(rng, groups=1):
    w = (rng.normal(size=(8, 4 // groups if groups > 1 else 4, 3, 3)) * 0.3).astype(np.float32)
    b = rng.normal(size=4 * (groups if groups > 1 else 1)).astype(np.float32) * 0.1
    node = helper.make_node("ConvTranspose", ["x", "w", "b"], ["y"], name="deconv", strides=[2, 2], group=groups)
    return make_model([node], [vi("x", ["N", 8, 5, 5])], [vi("y", None)], {"w": w, "b": b})


def avgpool_model():
    node = helper.make_node("AveragePool", ["x"], ["y"], name="pool", kernel_shape=[2, 2], strides=[2, 2])
    return make_model([node], [vi("x", ["N", 4, 6, 6])], [vi("y", None)], {})


def as_bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def chain_model(rng, kind: str):
    """Conv layers around one chain op ``kind`` (Pad, Add, MaxPool, Concat, GlobalAveragePool, Resize): the op
    reads quantized conv outputs and feeds a quantized layer, so the deploy model can keep it integer."""
    c = 8

    def conv(name, x, y, cin=c, cout=c, **attrs):
        inits[f"{name}.w"] = (rng.normal(size=(cout, cin, 3, 3)) * 0.3).astype(np.float32)
        inits[f"{name}.b"] = (rng.normal(size=cout) * 0.1).astype(np.float32)
        attrs.setdefault("pads", [1, 1, 1, 1])
        nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.c"], name=name, **attrs))
        nodes.append(helper.make_node("Relu", [f"{name}.c"], [y], name=f"{name}.relu"))

    nodes: list = []
    inits: dict = {}
    conv("conv1", "x", "a", cin=4)
    out_shape = None
    if kind == "Pad":  # TF "same" padding before a stride-2 conv
        inits["pads"] = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64)
        nodes.append(helper.make_node("Pad", ["a", "pads"], ["t"], name="pad"))
        conv("conv2", "t", "y", strides=[2, 2], pads=[0, 0, 0, 0])
    elif kind == "Add":
        conv("conv_b", "x", "b", cin=4)
        nodes.append(helper.make_node("Add", ["a", "b"], ["t"], name="add"))
        conv("conv2", "t", "y")
    elif kind == "MaxPool":
        nodes.append(helper.make_node("MaxPool", ["a"], ["t"], name="pool", kernel_shape=[2, 2], strides=[2, 2]))
        conv("conv2", "t", "y")
    elif kind == "Concat":
        conv("conv_b", "x", "b", cin=4)
        nodes.append(helper.make_node("Concat", ["a", "b"], ["t"], name="concat", axis=1))
        conv("conv2", "t", "y", cin=2 * c)
    elif kind == "GlobalAveragePool":
        nodes.append(helper.make_node("GlobalAveragePool", ["a"], ["g"], name="gap"))
        nodes.append(helper.make_node("Flatten", ["g"], ["t"], name="flatten"))
        inits["fc.w"] = (rng.normal(size=(10, c)) * 0.3).astype(np.float32)
        inits["fc.b"] = (rng.normal(size=10) * 0.1).astype(np.float32)
        nodes.append(helper.make_node("Gemm", ["t", "fc.w", "fc.b"], ["y"], name="fc", transB=1))
        out_shape = ["N", 10]
    elif kind == "Resize":
        inits["scales"] = np.array([1, 1, 2, 2], np.float32)
        nodes.append(helper.make_node("Resize", ["a", "", "scales"], ["t"], name="resize", mode="nearest"))
        conv("conv2", "t", "y")
    else:
        raise ValueError(kind)
    return make_model(nodes, [vi("x", ["N", 4, 8, 8])], [vi("y", out_shape)], inits)
