"""Models omct cannot quantize (yet) say exactly why: layers inside control-flow bodies (Silero VAD keeps every
convolution in the branches of an If), and models that are already quantized."""

import numpy as np
import onnx
import pytest
from conftest import run_flow
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import conv_model, vi

import omct.onnx as amct
from omct.errors import ModelError


def _if_model(rng):
    """y = If(flag) then conv_a(x) else conv_b(x), both convolutions inside the branches."""
    def branch(name):
        w = numpy_helper.from_array((rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(np.float32), f"{name}_w")
        node = helper.make_node("Conv", ["x", f"{name}_w"], [f"{name}_y"], name=f"{name}_conv", pads=[1, 1, 1, 1])
        return helper.make_graph([node], name, [], [vi(f"{name}_y", None)], [w])

    node = helper.make_node("If", ["flag"], ["y"], name="vad_if", then_branch=branch("then"), else_branch=branch("else"))
    graph = helper.make_graph([node], "g", [vi("x", ["N", 4, 6, 6]), helper.make_tensor_value_info("flag", TensorProto.BOOL, [])],
                              [vi("y", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_layers_inside_if_branches_are_named_with_the_reason(tmp_path, rng):
    path = tmp_path / "vad.onnx"
    onnx.save(_if_model(rng), path)
    rep = amct.inspect_model(str(path))
    assert not rep.layers
    assert {r.name for r in rep.refused} == {"vad_if/then_branch/then_conv", "vad_if/else_branch/else_conv"}
    with pytest.raises(ModelError, match=r"no quantizable layer .*inside the then_branch of If node 'vad_if'"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(path))


def test_an_already_quantized_model_is_named_as_such(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), src)
    _, deploy = run_flow(src, tmp_path, [rng.normal(size=(2, 8, 6, 6)).astype(np.float32)], feed_name="x")
    with pytest.raises(ModelError, match=r"is already quantized \(\d+ node\(s\) of type DequantizeLinear, QuantizeLinear.*FP32"):
        amct.create_quant_config(str(tmp_path / "again.json"), str(deploy))
