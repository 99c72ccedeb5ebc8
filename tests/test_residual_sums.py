"""Deploy models of transformers run Add + LayerNormalization, not ONNX Runtime's SkipLayerNormalization (issue 17
item 2): on static 3-D shapes the runtime fuses a residual Add with the LayerNorm after it, and its CPU kernel for
the fused op runs 6-8x slower than the two ops (benchmarks/results/ptq.md). The deploy model writes those Adds as
the equivalent Sum; these tests check ONNX Runtime's optimised graph (structure, not timing) on a BERT exported
the ways users export it, through both frontends, and that Sum computes exactly what Add did."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import real_models
import torch
from conftest import optimized_ops, run_flow
from onnx import TensorProto, helper, numpy_helper

import omct.pytorch as amct_pt
from omct.graph.export import residual_sums

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
B, S, H, LAYERS = 16, 32, 64, 2


def _session(model: onnx.ModelProto, disabled=()):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(disabled))


def _graph_ops(model: onnx.ModelProto, tmp_path) -> list[str]:
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    return optimized_ops(path, tmp_path)


def _residual_model(kind: str) -> onnx.ModelProto:
    """x + r -> LayerNormalization on static 3-D shapes, as a BERT block ends; ``kind`` varies what reads the sum
    or what is added."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(H).astype(np.float32), n) for n in ("g", "b", "c")]
    second = "c" if kind == "bias" else "r"
    nodes = [helper.make_node("Add", ["x", second], ["s"], name="residual")]
    if kind == "decomposed":  # LayerNormalization written out (opset < 17 exports), which ONNX Runtime fuses back
        nodes += [helper.make_node("ReduceMean", ["s"], ["m"], axes=[-1]), helper.make_node("Sub", ["s", "m"], ["d"]),
                  helper.make_node("Pow", ["d", "two"], ["d2"]), helper.make_node("ReduceMean", ["d2"], ["v"], axes=[-1]),
                  helper.make_node("Add", ["v", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                  helper.make_node("Div", ["d", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
                  helper.make_node("Add", ["ng", "b"], ["y"])]
        inits += [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (("eps", 1e-12), ("two", 2.0))]
    else:
        nodes.append(helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-12))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [B, S, H])]
    if kind == "two_readers":
        nodes.append(helper.make_node("Relu", ["s"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [B, S, H]))
    if kind == "graph_output":
        outputs.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, [B, S, H]))
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [B, S, H]) for n in ("x", "r")]
    opset = 13 if kind == "decomposed" else 17
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("kind", ["layernorm", "decomposed"])
def test_residual_add_before_layernorm_becomes_sum_with_the_same_values(kind, rng, tmp_path):
    model = _residual_model(kind)
    assert "SkipLayerNormalization" in _graph_ops(model, tmp_path)  # what the runtime makes of Add + LayerNorm
    feeds = {n: rng.standard_normal((B, S, H)).astype(np.float32) for n in ("x", "r")}
    expected = _session(model, ["SkipLayerNormFusion"]).run(None, feeds)[0]  # the two unfused ops
    s = feeds["x"].astype(np.float64) + feeds["r"]
    reference = (s - s.mean(-1, keepdims=True)) / np.sqrt(s.var(-1, keepdims=True) + 1e-12)  # numpy, gamma/beta below
    g, b = (numpy_helper.to_array(t) for t in model.graph.initializer[:2])
    np.testing.assert_allclose(expected, reference * g + b, rtol=1e-4, atol=1e-4)

    assert residual_sums(model) == 1
    assert [n.op_type for n in model.graph.node if n.name == "residual"] == ["Sum"]
    ops = _graph_ops(model, tmp_path)
    assert "SkipLayerNormalization" not in ops and "LayerNormalization" in ops
    np.testing.assert_array_equal(_session(model).run(None, feeds)[0], expected)  # bit-identical to Add + LayerNorm


@pytest.mark.parametrize("kind", ["bias", "two_readers", "graph_output"])
def test_other_adds_stay_adds(kind):
    model = _residual_model(kind)
    assert residual_sums(model) == 0
    assert [n.op_type for n in model.graph.node if n.name == "residual"] == ["Add"]


@pytest.fixture(scope="module")
def bert_setup():
    """An untrained BERT-mini (random weights: the test is about graph structure) and calibration batches of
    token ids with padding, as a tokenizer makes them."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = real_models.bert_mini(vocab_size=200, hidden_size=H, num_hidden_layers=LAYERS, num_attention_heads=4,
                                  intermediate_size=2 * H, max_position_embeddings=64, num_labels=10).eval()
    batches = []
    for _ in range(2):
        mask = (np.arange(S)[None] < rng.integers(S // 2, S + 1, B)[:, None]).astype(np.int64)
        ids = rng.integers(3, 200, (B, S)) * mask
        types = (np.arange(S)[None] >= S // 2).astype(np.int64) * mask
        batches.append(tuple(torch.tensor(a) for a in (ids, mask, types)))
    return model, batches


def _check_deploy(deploy, fake, batches, tmp_path):
    """ONNX Runtime's optimised deploy graph: one LayerNormalization per norm of the model and no SkipLayerNorm;
    the deploy model computes what the fake-quant model does."""
    ops = optimized_ops(deploy, tmp_path)
    assert "SkipLayerNormalization" not in ops
    assert ops.count("LayerNormalization") == 2 * LAYERS + 1
    feeds = {n: t.numpy() for n, t in zip(NAMES, batches[0], strict=True)}
    out, ref = (_session(onnx.load(str(p))).run(None, feeds)[0] for p in (deploy, fake))
    np.testing.assert_allclose(out, ref, atol=0.05 * np.abs(ref).max())


@pytest.mark.parametrize("opset", [17, 14], ids=["layernorm-op", "layernorm-decomposed"])
def test_bert_static_shapes_onnx_frontend(opset, bert_setup, tmp_path):
    model, batches = bert_setup
    path = tmp_path / "bert.onnx"
    torch.onnx.export(model, batches[0], str(path), dynamo=False, opset_version=opset, input_names=NAMES,
                      output_names=["logits"])  # no dynamic_axes: static shapes, as the seed's export
    assert "SkipLayerNormalization" in optimized_ops(path, tmp_path)  # the FP32 model gets the fusion
    feeds = [{n: t.numpy() for n, t in zip(NAMES, b, strict=True)} for b in batches]
    fake, deploy = run_flow(path, tmp_path, feeds)
    _check_deploy(deploy, fake, batches, tmp_path)


def test_bert_pytorch_frontend(bert_setup, tmp_path):
    """AMCT's call sequence without dynamic_axes (the seed's): static shapes but the batch axis."""
    model, batches = bert_setup
    config, modified, record = tmp_path / "config.json", tmp_path / "modified.onnx", tmp_path / "record.txt"
    amct_pt.create_quant_config(config_file=str(config), model=model, input_data=batches[0], batch_num=len(batches))
    cal = amct_pt.quantize_model(config_file=str(config), modified_onnx_model=str(modified), record_file=str(record),
                                 model=model, input_data=batches[0])
    with torch.no_grad():
        for b in batches:
            cal(*b)
    amct_pt.save_model(str(modified), str(record), str(tmp_path / "q"))
    _check_deploy(tmp_path / "q_deploy_model.onnx", tmp_path / "q_fake_quant_model.onnx", batches, tmp_path)
