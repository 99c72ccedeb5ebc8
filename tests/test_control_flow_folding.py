"""Normalisation inside control-flow bodies (issue 17 leftover): Conv + BatchNormalization and zero Pad + Conv in
an If branch and a Loop body are folded as at the top level, so the quantized body runs integer convolutions
with no float BatchNormalization or Pad between them; and ``omct analyze`` compares the layers in bodies."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from conftest import ort_run, run_flow
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import vi

from omct.analysis import analyze
from omct.graph.normalize import fold_batchnorm, fold_pads, normalize
from omct.graph.subgraphs import all_graphs, taken_names


def _bn(rng, prefix, c):
    """BatchNormalization parameters as initializers named ``prefix``.{scale,bias,mean,var}."""
    return [numpy_helper.from_array(v.astype(np.float32), f"{prefix}.{k}") for k, v in
            (("scale", rng.uniform(0.5, 1.5, c)), ("bias", rng.normal(size=c) * 0.2),
             ("mean", rng.normal(size=c) * 0.2), ("var", rng.uniform(0.5, 2.0, c)))]


def _model(rng) -> onnx.ModelProto:
    """y = If(flag) then Relu(BN(Conv(x))) else Relu(Conv(Pad(x))); then a Loop of ``steps`` iterations
    h <- Relu(BN(Conv(Pad(h)))) from h = y, every h stacked. The then branch's conv weight and the loop's BN
    parameters are initializers of the outer graph (outer-scope reads), the rest live in their bodies."""
    def w(*shape):
        return (rng.normal(size=shape) * 0.3).astype(np.float32)

    then = helper.make_graph(
        [helper.make_node("Conv", ["x", "w_then"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "bn_then.scale", "bn_then.bias", "bn_then.mean", "bn_then.var"],
                          ["b"], name="bn"),
         helper.make_node("Relu", ["b"], ["y_then"], name="relu")],
        "then", [], [vi("y_then", None)], _bn(rng, "bn_then", 4))
    other = helper.make_graph(
        [helper.make_node("Pad", ["x", "pads_else"], ["p"], name="pad"),
         helper.make_node("Conv", ["p", "w_else"], ["c"], name="conv"),
         helper.make_node("Relu", ["c"], ["y_else"], name="relu")],
        "else", [], [vi("y_else", None)],
        [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_else"),
         numpy_helper.from_array(w(4, 4, 3, 3), "w_else")])
    body = helper.make_graph(
        [helper.make_node("Pad", ["h_in", "pads_loop"], ["p"], name="pad"),
         helper.make_node("Conv", ["p", "w_loop"], ["c"], name="conv"),
         helper.make_node("BatchNormalization", ["c", "bn_loop.scale", "bn_loop.bias", "bn_loop.mean", "bn_loop.var"],
                          ["b"], name="bn"),
         helper.make_node("Relu", ["b"], ["h_out"], name="relu"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="keep_going"),
         helper.make_node("Identity", ["h_out"], ["h_step"], name="step")],
        "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []), vi("h_in", None)],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []), vi("h_out", None), vi("h_step", None)],
        [numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads_loop"),
         numpy_helper.from_array(w(4, 4, 3, 3), "w_loop")])
    nodes = [helper.make_node("If", ["flag"], ["y"], name="blk", then_branch=then, else_branch=other),
             helper.make_node("Loop", ["steps", "", "y"], ["h_last", "h_all"], name="rnn", body=body)]
    graph = helper.make_graph(nodes, "g", [vi("x", ["N", 4, 8, 8]), helper.make_tensor_value_info("flag", TensorProto.BOOL, []),
                                           helper.make_tensor_value_info("steps", TensorProto.INT64, [])],
                              [vi("y", None), vi("h_last", None), vi("h_all", None)],
                              [numpy_helper.from_array(w(4, 4, 3, 3), "w_then"), *_bn(rng, "bn_loop", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _feeds(rng, flag, steps=2, n=8):
    return {"x": rng.normal(size=(n, 4, 8, 8)).astype(np.float32), "flag": np.array(flag),
            "steps": np.array(steps, np.int64)}


def _ops(graph) -> list[str]:
    return [n.op_type for g in all_graphs(graph) if g is not graph for n in g.node]


def test_folding_inside_bodies_is_exact_with_unique_names(rng):
    """The folded model computes what the float model computes (both branches, every iteration), no
    BatchNormalization or Pad is left in a body, and every name stays unique in the whole model."""
    src = _model(rng)
    norm, rep = normalize(src)
    names_before = taken_names(norm)
    fold_pads(norm, rep)
    fold_batchnorm(norm, set(), rep)
    assert sorted(rep.pads_folded) == ["blk/else/pad", "rnn/body/pad"]
    assert sorted(rep.folded) == [("blk/then/conv", "blk/then/bn"), ("rnn/body/conv", "rnn/body/bn")]
    assert not {"BatchNormalization", "Pad"} & set(_ops(norm.graph))
    new = [t.name for g in all_graphs(norm.graph) for t in g.initializer if t.name not in names_before]
    assert sorted(new) == ["blk/then/conv.bias_folded", "blk/then/conv.weight_folded",
                           "rnn/body/conv.bias_folded", "rnn/body/conv.weight_folded"]
    outer = {t.name for t in norm.graph.initializer}
    assert not outer & {"w_then", "bn_loop.scale", "bn_loop.var"}  # the unfolded weights are gone
    for flag in (True, False):
        feeds = _feeds(rng, flag, steps=3)
        for ref, got in zip(ort_run(src.SerializeToString(), feeds), ort_run(norm.SerializeToString(), feeds), strict=True):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def _body_ops(path, tmp_path) -> list[str]:
    """Op types in the bodies of ONNX Runtime's optimised graph of ``path``."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized_bodies.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(so.optimized_model_filepath).graph)


def test_bodies_run_integer_convolutions_without_float_bn_or_pad(tmp_path, rng):
    """Through the ONNX call sequence: the deploy model's bodies hold QLinearConv and neither a float
    BatchNormalization nor a Pad (before: BN after an integer conv, Pad between DQ and Q), and its outputs follow
    the float model's; ``omct analyze`` compares all four body layers."""
    src = tmp_path / "cf.onnx"
    onnx.save(_model(rng), src)
    batches = [_feeds(rng, flag, steps) for flag, steps in ((True, 2), (False, 3), (True, 1), (False, 2))]
    fake, deploy = run_flow(src, tmp_path, batches)
    ops = _body_ops(deploy, tmp_path)
    assert ops.count("QLinearConv") == 3 and not {"BatchNormalization", "Pad", "Conv", "FusedConv"} & set(ops), ops
    for flag in (True, False):
        feeds = _feeds(rng, flag, steps=2)
        ref, out = ort_run(str(src), feeds), ort_run(str(deploy), feeds)
        for r, o in zip(ref, out, strict=True):
            assert 10 * np.log10(np.mean(r ** 2) / np.mean((o - r) ** 2)) > 25, flag

    report = analyze(str(src), str(fake), batches)
    assert {e.layer for e in report.layers} == {"blk/then/conv", "blk/else/conv", "rnn/body/conv"}
    assert not report.not_compared
    for e in report.layers:
        assert e.accumulated.count and e.isolated.cosine > 0.99, e.layer
    # the then branch's output site is the If's output y: its accumulated error is y's, on the batches that took it
    taken = [b for b in batches if b["flag"]]
    ref = np.concatenate([ort_run(str(src), b)[0].ravel() for b in taken]).astype(np.float64)
    out = np.concatenate([ort_run(str(fake), b)[0].ravel() for b in taken]).astype(np.float64)
    then = next(e for e in report.layers if e.layer == "blk/then/conv")
    assert then.accumulated.count == ref.size
    np.testing.assert_allclose(then.cosine, ref @ out / np.linalg.norm(ref) / np.linalg.norm(out), rtol=1e-6)

    # a branch no batch takes is named, with the reason, instead of being left out silently
    only_then = analyze(str(src), str(fake), taken)
    assert only_then.not_compared == {"blk/else/conv": "no batch ran 'blk/else', the body it is in"}
    assert {e.layer for e in only_then.layers} == {"blk/then/conv", "rnn/body/conv"}
    assert only_then.to_dict()["not_compared"] == only_then.not_compared
    from omct.analysis.report import render_html

    assert "not compared: <code>blk/else/conv</code>: no batch ran &#x27;blk/else&#x27;" in render_html(only_then)
