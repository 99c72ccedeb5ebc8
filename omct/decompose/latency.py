"""ONNX Runtime latency of one conv layer and of its decomposed replacement, measured side by side.

A decomposition that cuts MACs can still run slower (a ``K x 1`` conv over a narrow tensor, thin 1x1 convs):
the choice keeps it only when it measures faster. Convolution time does not depend on the weight values, so
a measurement is cached per shape (input, channels, kernel, stride, pads, form, ranks, batch, threads) for the
life of the process.
"""

from __future__ import annotations

import time
from functools import cache

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from omct.core.decomposition import ConvGeometry


def conv_chain_model(geometry: ConvGeometry, form: str | None, ranks: tuple[int, ...], batch: int) -> onnx.ModelProto:
    """A model of the original conv (``form`` None) or of its replacement, with random weights."""
    from omct.decompose.plan import child_specs

    g = geometry
    rng = np.random.default_rng(0)
    specs = [dict(cin=g.cin, cout=g.cout, kernel=(g.k, g.k), stride=g.stride, pads=g.pads, bias=True)] \
        if form is None else child_specs(form, ranks, g, bias=True)
    nodes, inits, prev = [], [], "x"
    for i, s in enumerate(specs):
        w = rng.standard_normal((s["cout"], s["cin"], *s["kernel"])).astype(np.float32) * 0.05
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        inputs = [prev, f"w{i}"]
        if s["bias"]:
            inits.append(numpy_helper.from_array(np.zeros(s["cout"], np.float32), f"b{i}"))
            inputs.append(f"b{i}")
        out = "y" if i == len(specs) - 1 else f"t{i}"
        nodes.append(helper.make_node("Conv", inputs, [out], kernel_shape=list(s["kernel"]), strides=list(s["stride"]),
                                      pads=[s["pads"][0], s["pads"][1], s["pads"][2], s["pads"][3]]))
        prev = out
    graph = helper.make_graph(nodes, "conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                            [batch, g.cin, *g.in_hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@cache
def measure(geometry: ConvGeometry, form: str, ranks: tuple[int, ...], batch: int = 1, threads: int = 1,
            rounds: int = 5) -> tuple[float, float]:
    """Median seconds per run of (original conv, replacement), measured in alternating rounds so that load on
    the machine hits both alike."""
    sessions = [_session(conv_chain_model(geometry, None, (), batch), threads),
                _session(conv_chain_model(geometry, form, ranks, batch), threads)]
    x = np.random.default_rng(1).standard_normal((batch, geometry.cin, *geometry.in_hw)).astype(np.float32)
    feeds = {"x": x}
    for s in sessions:
        s.run(None, feeds)
    t = time.perf_counter()
    sessions[0].run(None, feeds)
    runs = int(min(50, max(3, 0.004 / max(time.perf_counter() - t, 1e-7))))  # about 4 ms per round and model
    medians: list[list[float]] = [[], []]
    for _ in range(rounds):
        for s, med in zip(sessions, medians, strict=True):
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - t)
            med.append(float(np.median(times)))
    return float(np.median(medians[0])), float(np.median(medians[1]))
