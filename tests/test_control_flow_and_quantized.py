"""Models omct cannot quantize (yet) say exactly why: layers inside control-flow bodies (Silero VAD keeps every
convolution in the branches of an If), and models that are already quantized."""

import numpy as np
import onnx
import pytest
from conftest import ort_run, run_flow
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import conv_model, vi

import omct.onnx as amct
from omct.errors import ModelError
from omct.graph.ops import find_layers


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


def test_layers_inside_a_runtime_if_are_found_with_scoped_names(tmp_path, rng):
    path = tmp_path / "vad.onnx"
    onnx.save(_if_model(rng), path)
    rep = amct.inspect_model(str(path))
    assert {(s.name, s.scope) for s in rep.layers} == {("vad_if/then/then_conv", "vad_if/then"),
                                                       ("vad_if/else/else_conv", "vad_if/else")}
    assert not rep.refused


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


def test_fix_inputs_names_the_inputs_it_does_not_know(rng):
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


def _nested_if_model(rng):
    """An If (on ``c``) whose then-branch holds a conv and an If on the same flag reading that conv's output ``r``."""
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
    return model


def test_a_nested_if_reading_its_parent_branch_is_inlined_too(tmp_path, rng):
    """The inner If's branch reads ``r``, a tensor of the outer branch (renamed when that branch is inlined)."""
    from conftest import ort_run

    from omct.graph.normalize import fix_inputs, normalize

    model = _nested_if_model(rng)
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

    # The same scripted model quantized as it is: sr stays an input, each rate's batches calibrate its branch
    assert [s.name for s in amct.inspect_model(str(src)).layers] == ["/If/then/a/Conv", "/If/else/b/Conv"]
    batches = [{"x": rng.normal(size=(32, 4, 8)).astype(np.float32), "sr": np.array(sr, np.int64)} for sr in (16000, 8000)]
    _, deploy = run_flow(src, tmp_path, batches, prefix="both")
    for sr in (16000, 8000):
        feeds = {"x": x, "sr": np.array(sr, np.int64)}
        ref, out = ort_run(src, feeds)[0], ort_run(deploy, feeds)[0]
        assert 10 * np.log10(np.mean(ref ** 2) / np.mean((out - ref) ** 2)) > 25, sr


# Layers quantized in place inside run-time If branches and Loop / Scan bodies.


def _sqnr(ref, out) -> float:
    return float(10 * np.log10(np.mean(ref ** 2) / max(float(np.mean((out - ref) ** 2)), 1e-30)))


def _body_ops(path, tmp_path) -> dict[str, list[str]]:
    """Op types of each control-flow body in ONNX Runtime's optimised graph of ``path``, by the node's name."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized_bodies.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    found: dict[str, list[str]] = {}

    def walk(graph):
        for n in graph.node:
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    found.setdefault(f"{n.name}/{a.name}", []).extend(x.op_type for x in a.g.node)
                    walk(a.g)

    walk(onnx.load(so.optimized_model_filepath).graph)
    return found


def _assert_sorted(path) -> None:
    """Every node of every graph (bodies too) reads only what is defined before it or in an enclosing scope."""
    def check(graph, outer):
        known = set(outer) | {i.name for i in graph.input} | {t.name for t in graph.initializer}
        for n in graph.node:
            assert all(not i or i in known for i in n.input), (path, n.op_type, list(n.input))
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    check(a.g, known)
            known |= set(n.output)

    check(onnx.load(path).graph, set())


def _vad_batch(rng, sr, n=16):
    return {"x": rng.normal(size=(n, 4, 16)).astype(np.float32), "state": rng.normal(size=(n, 2)).astype(np.float32),
            "sr": np.array(sr, np.int64)}


def test_a_runtime_if_is_calibrated_on_both_branches_and_quantized_in_place(tmp_path, rng, caplog):
    """Silero VAD's If(Equal(sr, 16000)) with sr a model input: batches at 16 kHz calibrate the then branch, batches
    at 8 kHz the else branch; the deploy model keeps the If and both sample rates, with integer convolutions in the
    branches (the weights live in the outer graph, the 16 kHz branch reads one from the outer scope)."""
    src = tmp_path / "vad.onnx"
    onnx.save(_vad_like(rng), src)
    assert {s.name for s in amct.inspect_model(str(src)).layers} == {"vad_if/then/conv1", "vad_if/then/conv2",
                                                                      "vad_if/else/conv8"}
    batches = [_vad_batch(rng, sr) for sr in (16000, 8000, 16000, 8000)]
    with caplog.at_level("WARNING", logger="omct"):
        fake, deploy = run_flow(src, tmp_path, batches)  # also: no weight dequantized into a float op
    assert "no calibration batch ran" not in caplog.text
    _assert_sorted(fake), _assert_sorted(deploy)
    bodies = _body_ops(deploy, tmp_path)
    assert bodies["vad_if/then_branch"].count("QLinearConv") == 2 and "Conv" not in bodies["vad_if/then_branch"]
    assert bodies["vad_if/else_branch"].count("QLinearConv") == 1 and "Conv" not in bodies["vad_if/else_branch"]
    for sr in (16000, 8000):
        feeds = _vad_batch(rng, sr)
        ref, fq, dp = ort_run(str(src), feeds), ort_run(fake, feeds), ort_run(deploy, feeds)
        assert _sqnr(ref[0], dp[0]) > 30, sr
        assert np.abs(dp[0] - fq[0]).max() <= 0.02 * np.abs(ref[0]).max(), sr  # deploy follows fake-quant
        assert np.array_equal(dp[1], ref[1])  # the state: passed through (16 kHz) or a float Relu (8 kHz)
    # its deploy model has Q/DQ only inside the branches: still recognised as quantized
    with pytest.raises(ModelError, match=r"is already quantized \(\d+ node\(s\) of type DequantizeLinear, QuantizeLinear"):
        amct.create_quant_config(str(tmp_path / "again.json"), str(deploy))


def test_an_if_branch_no_batch_takes_is_named_and_stays_float(tmp_path, rng, caplog):
    src = tmp_path / "vad.onnx"
    onnx.save(_vad_like(rng), src)
    with caplog.at_level("WARNING", logger="omct"):
        fake, deploy = run_flow(src, tmp_path, [_vad_batch(rng, 16000) for _ in range(2)])
    assert "no calibration batch ran 'vad_if/else'" in caplog.text and "vad_if/else/conv8 stay in float" in caplog.text
    bodies = _body_ops(deploy, tmp_path)
    assert "QLinearConv" in bodies["vad_if/then_branch"]
    assert bodies["vad_if/else_branch"].count("Conv") == 1 and "QuantizeLinear" not in bodies["vad_if/else_branch"]
    feeds = _vad_batch(rng, 8000)
    ref, out = ort_run(str(src), feeds), ort_run(deploy, feeds)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-6)  # the else branch is the float one
    layers = {entry["name"] for entry in __import__("json").loads(
        {p.key: p.value for p in onnx.load(deploy).metadata_props}["omct.layers"])}
    assert layers == {"vad_if/then/conv1", "vad_if/then/conv2"}
    # the in-memory path keeps it float the same way
    from omct.formats.config import load_config

    result = amct.quantize(str(src), load_config(str(tmp_path / "q.json")), [_vad_batch(rng, 16000) for _ in range(2)])
    assert sorted(result.plan.layers) == ["vad_if/then/conv1", "vad_if/then/conv2"]
    assert not result.config.layers["vad_if/else/conv8"].quant_enable
    np.testing.assert_allclose(ort_run(result.deploy_model().SerializeToString(), feeds)[0], ref[0], rtol=1e-5, atol=1e-6)


def _loop_conv_model(rng):
    """h <- Relu(Conv(h) + b) for ``steps`` iterations (a model input), every step's h stacked as a scan output;
    the weight is an initializer of the body, the bias one of the outer graph."""
    w = numpy_helper.from_array((rng.normal(size=(4, 4, 3)) * 0.4).astype(np.float32), "w")
    body = helper.make_graph(
        [helper.make_node("Conv", ["h_in", "w", "b"], ["c"], name="conv", pads=[1, 1]),
         helper.make_node("Relu", ["c"], ["h_out"], name="relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Identity", ["h_out"], ["h_step"], name="step")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("h_in", None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("h_out", None), vi("h_step", None)], [w])
    loop = helper.make_node("Loop", ["steps", "", "x"], ["h_last", "h_all"], name="rnn", body=body)
    graph = helper.make_graph([loop], "g", [vi("x", ["N", 4, 16]), helper.make_tensor_value_info("steps", TensorProto.INT64, [])],
                              [vi("h_last", None), vi("h_all", None)],
                              [numpy_helper.from_array((rng.normal(size=4) * 0.1).astype(np.float32), "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_loop_body_is_calibrated_on_every_iteration_and_quantized_in_place(tmp_path, rng):
    src = tmp_path / "loop.onnx"
    onnx.save(_loop_conv_model(rng), src)
    assert [(s.name, s.weight, s.input) for s in amct.inspect_model(str(src)).layers] == [
        ("rnn/body/conv", "rnn/body/w", "rnn/body/h_in")]
    batches = [{"x": rng.normal(size=(8, 4, 16)).astype(np.float32), "steps": np.array(k, np.int64)} for k in (3, 0, 4)]
    fake, deploy = run_flow(src, tmp_path, batches)  # a batch that runs no iteration is no error

    # The input range covers every iteration's h (the last ones are all >= 0, the first is x itself): with only
    # the first iteration observed the negative values of later feeds would be clipped, with none the layer fails.
    from omct.formats.record import read_record

    rec = read_record(tmp_path / "q_record.txt")["rnn/body/conv"]
    assert rec.offset_d != -128  # the range reaches below 0: x (iteration 0) was seen
    assert "QLinearConv" in _body_ops(deploy, tmp_path)["rnn/body"]
    feeds = {"x": rng.normal(size=(8, 4, 16)).astype(np.float32), "steps": np.array(3, np.int64)}
    ref, fq, dp = ort_run(str(src), feeds), ort_run(fake, feeds), ort_run(deploy, feeds)
    assert dp[1].shape == (3, 8, 4, 16)
    assert _sqnr(ref[1], dp[1]) > 25 and _sqnr(ref[0], dp[0]) > 25
    assert np.abs(dp[1] - fq[1]).max() <= 0.02 * np.abs(ref[1]).max()


def test_a_scripted_pytorch_rnn_loop_quantizes_its_gemms(tmp_path, rng):
    """torch.jit.script'ed ``for t in range(x.size(1))`` over Linear layers: a Loop whose body slices x (outer
    scope), runs two Gemms on weights of the outer graph and carries h."""
    import warnings

    import torch

    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.out = torch.nn.Linear(8, 32), torch.nn.Linear(32, 32), torch.nn.Linear(32, 4)

        def forward(self, x):
            h = torch.zeros(x.size(0), 32)
            for t in range(x.size(1)):
                h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            return self.out(h)

    torch.manual_seed(0)
    src = tmp_path / "rnn.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(Rnn()), (torch.randn(2, 5, 8),), str(src), dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "n", 1: "t"}})
    rep = amct.inspect_model(str(src))
    assert [s.name for s in rep.layers if s.chain is None] == ["/Loop/body/inp/Gemm", "/Loop/body/rec/Gemm", "/out/Gemm"]
    x = rng.normal(size=(4, 32, 6, 8)).astype(np.float32)
    fake, deploy = run_flow(src, tmp_path, list(x), feed_name="x")
    assert _body_ops(deploy, tmp_path)["/Loop/body"].count("Gemm") == 0  # both run on integers
    test = rng.normal(size=(64, 7, 8)).astype(np.float32)
    ref, dp = ort_run(str(src), {"x": test})[0], ort_run(deploy, {"x": test})[0]
    assert _sqnr(ref, dp) > 25


def _scan_model(rng):
    """A hand-built Scan over axis 1 of x [N, T, 8]: h <- Relu(x_t @ Wx + h @ Wh), y_t = h @ Wo stacked."""
    def w(*shape):
        return (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)

    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_t", "wx"], ["a"], name="in_proj"),
         helper.make_node("MatMul", ["h_in", "wh"], ["r"], name="rec_proj"),
         helper.make_node("Add", ["a", "r"], ["s"], name="sum"),
         helper.make_node("Relu", ["s"], ["h_out"], name="relu"),
         helper.make_node("MatMul", ["h_out", "wo"], ["y_t"], name="out_proj")],
        "body", [vi("h_in", ["N", 16]), vi("x_t", ["N", 8])], [vi("h_out", ["N", 16]), vi("y_t", ["N", 4])],
        [numpy_helper.from_array(w(8, 16), "wx"), numpy_helper.from_array(w(16, 4), "wo")])
    scan = helper.make_node("Scan", ["h0", "x"], ["h_last", "ys"], name="scan", body=body, num_scan_inputs=1,
                            scan_input_axes=[1], scan_output_axes=[1])
    graph = helper.make_graph([scan], "g", [vi("h0", ["N", 16]), vi("x", ["N", "T", 8])],
                              [vi("h_last", None), vi("ys", None)], [numpy_helper.from_array(w(16, 16), "wh")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_a_scan_body_is_calibrated_and_quantized_in_place(tmp_path, rng):
    src = tmp_path / "scan.onnx"
    onnx.save(_scan_model(rng), src)
    assert [s.name for s in amct.inspect_model(str(src)).layers if s.chain is None] == ["scan/body/in_proj", "scan/body/rec_proj",
                                                                      "scan/body/out_proj"]
    batches = [{"h0": np.zeros((16, 16), np.float32), "x": rng.normal(size=(16, 10, 8)).astype(np.float32)}
               for _ in range(3)]
    fake, deploy = run_flow(src, tmp_path, batches)
    ops = _body_ops(deploy, tmp_path)["scan/body"]
    assert "MatMul" not in ops and "Gemm" not in ops, ops
    feeds = {"h0": np.zeros((32, 16), np.float32), "x": rng.normal(size=(32, 12, 8)).astype(np.float32)}
    ref, fq, dp = ort_run(str(src), feeds), ort_run(fake, feeds), ort_run(deploy, feeds)
    assert dp[1].shape == (32, 12, 4)  # scan_output_axes kept
    assert _sqnr(ref[1], dp[1]) > 25 and _sqnr(ref[0], dp[0]) > 25
    assert np.abs(dp[1] - fq[1]).max() <= 0.05 * np.abs(ref[1]).max()


def _loop_with_if(rng, condition: str):
    """``_loop_conv_model`` whose body ends in ``If(condition)``: Conv(h_out) or Relu(h_out), stacked per step."""
    model = _loop_conv_model(rng)
    loop_body = model.graph.node[0].attribute[0].g
    branch = helper.make_graph([helper.make_node("Conv", ["h_out", "w"], ["z"], name="conv_in_if", pads=[1, 1])],
                               "then", [], [vi("z", None)])
    other = helper.make_graph([helper.make_node("Relu", ["h_out"], ["z2"], name="relu_in_if")], "else", [], [vi("z2", None)])
    loop_body.node.append(helper.make_node("If", [condition], ["h_if"], name="first", then_branch=branch,
                                           else_branch=other))
    loop_body.output.append(vi("h_if", None))
    model.graph.node[0].output.append("h_if_all")
    model.graph.output.append(vi("h_if_all", None))
    return model


def test_an_if_inside_a_loop_whose_branch_may_change_per_iteration_is_refused_with_the_reason(rng):
    from omct.graph.normalize import normalize

    layers, refused = find_layers(normalize(_loop_with_if(rng, "cond_in"))[0])
    assert [s.name for s in layers] == ["rnn/body/conv"]
    assert [(r.name, r.reason) for r in refused] == [
        ("rnn/body/first/then/conv_in_if", "it sits inside the then_branch of If node 'rnn/body/first', inside the body "
         "of 'rnn', and its condition 'rnn/body/cond_in' is computed from the loop's inputs: each iteration may take "
         "another branch, which calibration cannot stack")]


def test_a_loop_inside_a_loop_running_a_varying_number_of_steps_is_refused(rng):
    """A triangular loop (the inner one runs i steps in the outer one's step i) stacks differently shaped steps."""
    from omct.graph.normalize import normalize

    model = _loop_conv_model(rng)
    outer_body = model.graph.node[0].attribute[0].g
    inner = _loop_conv_model(rng).graph.node[0]
    inner.input[:] = ["i", "", "h_out"]
    inner.output[:] = ["g_last", "g_all"]
    inner.name = "inner"
    outer_body.node.append(inner)
    layers, refused = find_layers(normalize(model)[0])
    assert [s.name for s in layers] == ["rnn/body/conv"]
    assert [r.name for r in refused] == ["rnn/body/inner/body/conv"]
    assert "its number of iterations may change from one iteration to the next" in refused[0].reason


def test_an_if_inside_a_loop_on_a_loop_invariant_condition_is_quantized(tmp_path, rng):
    """The condition comes from a model input (outer scope): every iteration takes the same branch."""
    model = _loop_with_if(rng, "flag")
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    src = tmp_path / "loop_if.onnx"
    onnx.save(model, src)
    assert [s.name for s in amct.inspect_model(str(src)).layers] == ["rnn/body/conv", "rnn/body/first/then/conv_in_if"]
    batches = [{"x": rng.normal(size=(8, 4, 16)).astype(np.float32), "steps": np.array(3, np.int64),
                "flag": np.array(f)} for f in (True, False)]
    fake, deploy = run_flow(src, tmp_path, batches)
    assert _body_ops(deploy, tmp_path)["rnn/body/first/then_branch"].count("QLinearConv") == 1
    for f in (True, False):
        feeds = {**batches[0], "flag": np.array(f)}
        ref, dp = ort_run(str(src), feeds), ort_run(deploy, feeds)
        assert _sqnr(ref[2], dp[2]) > 25, f


def test_nested_runtime_ifs_carry_their_tensors_out_level_by_level(tmp_path, rng):
    """An If in a branch of an If, both on a run-time flag: the inner branch's tensors leave through both Ifs (an
    empty placeholder where a branch lacks them); a batch per flag value calibrates every layer."""
    model = _nested_if_model(rng)
    src = tmp_path / "nested.onnx"
    onnx.save(model, src)
    assert {s.name for s in amct.inspect_model(str(src)).layers} == {
        "outer_if/then/conv_out", "outer_if/then/inner_if/then/conv_in", "outer_if/else/conv_else"}
    batches = [{"x": rng.normal(size=(16, 4, 8)).astype(np.float32), "c": np.array(c)} for c in (True, False)]
    fake, deploy = run_flow(src, tmp_path, batches)
    bodies = _body_ops(deploy, tmp_path)
    assert bodies["outer_if/then/inner_if/then_branch"].count("QLinearConv") == 1
    for c in (True, False):
        feeds = {"x": rng.normal(size=(16, 4, 8)).astype(np.float32), "c": np.array(c)}
        ref, fq, dp = ort_run(str(src), feeds)[0], ort_run(fake, feeds)[0], ort_run(deploy, feeds)[0]
        assert _sqnr(ref, dp) > 30 and np.abs(dp - fq).max() <= 0.02 * np.abs(ref).max(), c
    deployed = onnx.load(deploy)
    from omct.graph.subgraphs import all_graphs

    leftovers = [n.name for g in all_graphs(deployed.graph) for n in g.node if n.name.startswith("omct.observe")]
    assert not leftovers and [len(n.output) for n in deployed.graph.node if n.op_type == "If"] == [1]


def test_a_silero_vad_replica_quantized_with_its_sample_rate_and_state_inputs(tmp_path, rng):
    """Silero VAD v5's structure, scripted and exported as its ONNX file is: one network per sample rate in the
    branches of If(sr == 16000), an LSTM cell on the ``state`` input. Calibrated at both rates, the deploy model
    keeps (input, state, sr) -> (output, stateN) and runs every convolution of both branches on integers."""
    import warnings

    import torch
    from real_models import silero_vad

    torch.manual_seed(0)
    src = tmp_path / "silero_vad.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(silero_vad(width=64)), (torch.randn(2, 512), torch.zeros(2, 2, 64), 16000),
                          str(src), dynamo=False, input_names=["input", "state", "sr"], output_names=["output", "stateN"],
                          opset_version=17, dynamic_axes={"input": {0: "n", 1: "samples"}, "state": {1: "n"}})
    convs = [s.name for s in amct.inspect_model(str(src)).layers if s.op_type == "Conv"]
    assert len(convs) == 12 and {"/If/then/_model/stft/conv/Conv", "/If/else/_model_8k/decoder/Conv"} <= set(convs)

    def batch(sr, n=32):
        return {"input": rng.normal(size=(n, 512 if sr == 16000 else 256)).astype(np.float32),
                "state": (rng.normal(size=(2, n, 64)) * 0.5).astype(np.float32), "sr": np.array(sr, np.int64)}

    fake, deploy = run_flow(src, tmp_path, [batch(sr) for sr in (16000, 8000, 16000, 8000)])
    bodies = _body_ops(deploy, tmp_path)
    assert bodies["/If/then_branch"].count("QLinearConv") == 6 and bodies["/If/else_branch"].count("QLinearConv") == 6
    for sr in (16000, 8000):
        feeds = batch(sr, 64)
        ref, dp = ort_run(str(src), feeds), ort_run(deploy, feeds)
        assert [o.shape for o in dp] == [(64, 1), (2, 64, 64)]
        sqnr = [10 * np.log10(np.var(r) / np.mean((d - r) ** 2)) for r, d in zip(ref, dp, strict=True)]
        assert sqnr[0] > 20 and sqnr[1] > 40, (sr, sqnr)  # measured 26.5 / 35.6 dB (output), 74 dB (state)
