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


def _vad_like(rng):
    """Silero VAD's shape: ``If(Equal(sr, 16000))`` picks one of two convolution stacks. The 16 kHz branch reads
    one weight from the outer graph (outer scope) and one from a Constant node of its own, and copies the outer
    ``state`` through as its second output; the 8 kHz branch has its own weight."""
    def w(*shape):
        return (rng.normal(size=shape) * 0.3).astype(np.float32)

    c1 = helper.make_node("Conv", ["x", "w_outer"], ["h"], name="conv1", pads=[1, 1])
    relu = helper.make_node("Relu", ["h"], ["r"], name="relu")
    w2 = helper.make_node("Constant", [], ["w2"], value=numpy_helper.from_array(w(4, 8, 3), "w2"))
    c2 = helper.make_node("Conv", ["r", "w2"], ["y16"], name="conv2", pads=[1, 1])
    s16 = helper.make_node("Identity", ["state"], ["s16"], name="state_copy")
    then = helper.make_graph([c1, relu, w2, c2, s16], "then", [], [vi("y16", None), vi("s16", None)])
    c3 = helper.make_node("Conv", ["x", "w8"], ["y8"], name="conv8", pads=[1, 1])
    s8 = helper.make_node("Relu", ["state"], ["s8"], name="state_relu")
    other = helper.make_graph([c3, s8], "else", [], [vi("y8", None), vi("s8", None)],
                              [numpy_helper.from_array(w(4, 4, 3), "w8")])
    is16 = helper.make_node("Equal", ["sr", "k16000"], ["is16"], name="is16")
    node = helper.make_node("If", ["is16"], ["y", "state_out"], name="vad_if", then_branch=then, else_branch=other)
    graph = helper.make_graph([is16, node], "g", [vi("x", ["N", 4, 16]), vi("state", ["N", 2]),
                                                  helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
                              [vi("y", None), vi("state_out", None)],
                              [numpy_helper.from_array(w(8, 4, 3), "w_outer"),
                               numpy_helper.from_array(np.array(16000, np.int64), "k16000")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_an_input_driven_if_names_the_input_to_fix(tmp_path, rng):
    path = tmp_path / "vad.onnx"
    onnx.save(_vad_like(rng), path)
    rep = amct.inspect_model(str(path))
    assert not rep.layers
    assert all("depends on the model input(s) 'sr'" in r.reason for r in rep.refused)
    from omct.graph.normalize import fix_inputs

    with pytest.raises(ModelError, match=r"fix_inputs: 'rate' is not an input of the model \(inputs: x, state, sr\)"):
        fix_inputs(_vad_like(rng), {"rate": 16000})


@pytest.mark.parametrize("sr, branch, names", [(16000, "then", {"vad_if/then/conv1", "vad_if/then/conv2"}),
                                               (8000, "else", {"vad_if/else/conv8"})])
def test_fixed_condition_inlines_the_branch_and_quantizes_it(tmp_path, rng, sr, branch, names):
    from conftest import ort_run

    from omct.graph.normalize import fix_inputs

    model = _vad_like(rng)
    fixed = tmp_path / "vad_fixed.onnx"
    onnx.save(fix_inputs(model, {"sr": sr}), fixed)
    rep = amct.inspect_model(str(fixed))
    assert {spec.name for spec in rep.layers} == names
    assert not rep.refused
    batches = [{"x": rng.normal(size=(16, 4, 16)).astype(np.float32),
                "state": rng.normal(size=(16, 2)).astype(np.float32)} for _ in range(2)]
    fake, deploy = run_flow(fixed, tmp_path, batches)  # also: every weight runs on an integer kernel
    feeds = batches[0]
    ref = ort_run(model.SerializeToString(), {**feeds, "sr": np.array(sr, np.int64)})
    fq, dp = ort_run(fake, feeds), ort_run(deploy, feeds)
    for name, r, f, d in zip(("y", "state_out"), ref, fq, dp, strict=True):
        noise = float(np.mean((d - r) ** 2))
        sqnr = 10 * np.log10(float(np.mean(r ** 2)) / max(noise, 1e-30))
        assert sqnr > 25, (name, sqnr)
        assert np.abs(d - f).max() <= 0.05 * np.abs(r).max(), name  # deploy follows fake-quant
    assert np.array_equal(dp[1], ref[1])  # the state passes through (then) or is a float Relu (else): exact


def test_a_nested_if_reading_its_parent_branch_is_inlined_too(tmp_path, rng):
    """The inner If's branch reads ``r``, a tensor of the outer branch (renamed when that branch is inlined)."""
    from conftest import ort_run

    from omct.graph.normalize import fix_inputs, normalize

    w = {k: (rng.normal(size=(4, 4, 3)) * 0.3).astype(np.float32) for k in ("wa", "wb", "wc")}
    inner_then = helper.make_graph([helper.make_node("Conv", ["r", "wb"], ["y_in"], name="conv_in", pads=[1, 1])],
                                   "inner_then", [], [vi("y_in", None)])
    inner_else = helper.make_graph([helper.make_node("Relu", ["r"], ["z_in"], name="relu_in")], "inner_else", [],
                                   [vi("z_in", None)])
    outer_then = helper.make_graph([helper.make_node("Conv", ["x", "wa"], ["r"], name="conv_out", pads=[1, 1]),
                                    helper.make_node("If", ["c"], ["y_then"], name="inner_if", then_branch=inner_then,
                                                     else_branch=inner_else)], "outer_then", [], [vi("y_then", None)])
    outer_else = helper.make_graph([helper.make_node("Conv", ["x", "wc"], ["y_else"], name="conv_else", pads=[1, 1])],
                                   "outer_else", [], [vi("y_else", None)])
    node = helper.make_node("If", ["c"], ["y"], name="outer_if", then_branch=outer_then, else_branch=outer_else)
    graph = helper.make_graph([node], "g", [vi("x", ["N", 4, 8]), helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                              [vi("y", None)], [numpy_helper.from_array(v, k) for k, v in w.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    flat, report = normalize(fix_inputs(model, {"c": True}))
    assert report.ifs_inlined == [("outer_if", "then"), ("outer_if/then/inner_if", "then")]
    assert [n.name for n in flat.graph.node] == ["outer_if/then/conv_out", "outer_if/then/inner_if/then/conv_in"]
    x = rng.normal(size=(3, 4, 8)).astype(np.float32)
    ref = ort_run(model.SerializeToString(), {"x": x, "c": np.array(True)})[0]
    np.testing.assert_array_equal(ort_run(flat.SerializeToString(), {"x": x})[0], ref)


def test_a_scripted_pytorch_if_on_the_sample_rate(tmp_path, rng):
    """torch.jit.script + the TorchScript exporter: ``if sr == 16000`` becomes Constant/Equal/Cast -> If with the
    weights in the outer graph (outer scope) and torch's ``/a/Conv`` names inside the branches."""
    import warnings

    import torch
    from conftest import ort_run

    from omct.graph.normalize import fix_inputs

    class Vad(torch.nn.Module):  # no __init__ of its own: TorchScript then compiles forward only
        def forward(self, x, sr):
            if sr == 16000:
                return self.a(x)
            return torch.relu(self.b(x))

    torch.manual_seed(0)
    vad = Vad()
    vad.a, vad.b = torch.nn.Conv1d(4, 4, 3, padding=1), torch.nn.Conv1d(4, 4, 3, padding=1)
    src = tmp_path / "vad.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(vad), (torch.randn(2, 4, 8), torch.tensor(16000)), str(src),
                          dynamo=False, input_names=["x", "sr"], output_names=["y"], opset_version=17,
                          dynamic_axes={"x": {0: "n"}})
    fixed = tmp_path / "vad_8k.onnx"
    onnx.save(fix_inputs(onnx.load(src), {"sr": 8000}), fixed)
    assert [s.name for s in amct.inspect_model(str(fixed)).layers] == ["/If/else/b/Conv"]
    x = rng.normal(size=(32, 4, 8)).astype(np.float32)
    _, deploy = run_flow(fixed, tmp_path, [x], feed_name="x")
    ref = ort_run(src, {"x": x, "sr": np.array(8000, np.int64)})[0]
    out = ort_run(deploy, {"x": x})[0]
    assert 10 * np.log10(np.mean(ref ** 2) / np.mean((out - ref) ** 2)) > 25
