"""Embedding tables (issue 17, item 4): a Gather on a constant 2-D FLOAT table is quantized weight-only, one
symmetric INT8 scale per row. The deploy model gathers INT8 rows and scales them after the lookup (never a
DequantizeLinear of the whole table), so a BERT-class deploy file is about a quarter of its FP32 size."""

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import real_models
import torch
import torch.nn.functional as F
from conftest import assert_integer_kernels, ort_run, run_flow
from onnx import TensorProto, helper
from onnx_builders import make_model, vi
from test_pytorch_real_models import _tokens

import omct.onnx as amct
import omct.pytorch as tamct
from omct.formats.record import read_record
from omct.graph import metadata
from omct.graph.ops import find_layers

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
VOCAB, HIDDEN = 8000, 256  # the word table is ~65% of the parameters, as in Google's BERT-mini (30522 x 256)


def _gather_model(table, ids_input=True, axis=0, ids_const=None):
    nodes = [helper.make_node("Gather", ["table", "ids" if ids_const is None else "cids"], ["e"], name="emb", axis=axis),
             helper.make_node("Relu", ["e"], ["y"], name="act")]
    inits = {"table": table} if table is not None else {}
    if ids_const is not None:
        inits["cids"] = ids_const
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])] if ids_input else []
    if table is None:
        inputs.append(vi("table", [3000, 4]))
    return make_model(nodes, inputs, [vi("y", None)], inits)


@pytest.mark.parametrize("case, reason", [
    ("runtime", "its table 'table' is computed at run time"),
    ("axis1", "axis 1 is not supported"),
    ("small", "its table has 1000 values .*too small"),
    ("int", "its table 'table' is INT32; only FLOAT tables"),
    ("rank3", "its table has rank 3"),
    ("const_ids", "its indices 'cids' are constants"),
])
def test_gather_refusals_say_why(case, reason, rng):
    table = rng.normal(size=(3000, 4)).astype(np.float32)
    model = {"runtime": lambda: _gather_model(None),
             "axis1": lambda: _gather_model(table, axis=1),
             "small": lambda: _gather_model(table[:250]),
             "int": lambda: _gather_model(table.astype(np.int32)),
             "rank3": lambda: _gather_model(table.reshape(3000, 2, 2)),
             "const_ids": lambda: _gather_model(table, ids_const=np.array([1, 2], np.int64))}[case]()
    layers, refused = find_layers(model)
    assert not layers and len(refused) == 1 and refused[0].name == "emb"
    import re
    assert re.search(reason, refused[0].reason), refused[0].reason


def test_gather_on_an_activation_or_a_shape_is_no_candidate(rng):
    x = vi("x", ["N", 5, 4])
    nodes = [helper.make_node("Gather", ["x", "zero"], ["first"], name="cls", axis=1),  # hidden_states[:, 0]
             helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "zero"], ["n"], name="batch", axis=0)]
    model = make_model(nodes, [x], [vi("first", None), helper.make_tensor_value_info("n", TensorProto.INT64, None)],
                       {"zero": np.array(0, np.int64)})
    assert find_layers(model) == ([], [])


def test_tied_embedding_and_output_projection_stay_correct(tmp_path, rng):
    """A table shared by the lookup and the output projection (tied embeddings): each layer quantizes its own
    copy (per row for the Gather, per output channel for the Gemm) and both exported models stay correct."""
    table = rng.normal(size=(600, 16)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["ids", "table"][::-1], ["e"], name="emb"),
             helper.make_node("ReduceMean", ["e"], ["pooled"], name="pool", axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "table", "b"], ["y"], name="proj", transB=1)]
    model = make_model(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 7])], [vi("y", None)],
                       {"table": table, "b": np.zeros(600, np.float32)})
    path = tmp_path / "tied.onnx"
    onnx.save(model, path)
    batches = [{"ids": rng.integers(0, 600, (8, 7))} for _ in range(2)]
    fake, deploy = run_flow(path, tmp_path, batches)
    rec = read_record(tmp_path / "q_record.txt")
    assert len(rec["emb"].scale_w) == 600 and len(rec["proj"].scale_w) == 600
    assert rec["emb"].scale_d == 1.0 and rec["emb"].offset_d == 0  # weight-only: no input is quantized
    inits = {t.name: t for t in onnx.load(deploy).graph.initializer}
    assert "table" not in inits and sum(t.data_type == TensorProto.INT8 and list(t.dims) == [600, 16]
                                        for t in inits.values()) == 2
    feeds = {"ids": rng.integers(0, 600, (4, 7))}
    want = ort_run(path, feeds)[0]
    for p in (fake, deploy):
        got = ort_run(p, feeds)[0]
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max(), p
    np.testing.assert_allclose(ort_run(fake, feeds)[0], ort_run(deploy, feeds)[0], rtol=1e-3, atol=2e-3)


def test_per_tensor_table_when_channel_wise_is_off(tmp_path, rng):
    table = rng.normal(size=(600, 16)).astype(np.float32)
    path = tmp_path / "lookup.onnx"
    onnx.save(_gather_model(table), path)
    cfg = tmp_path / "q.cfg"
    cfg.write_text("common_config { arq_quantize { channel_wise: false } }\n")
    batches = [{"ids": rng.integers(0, 600, (8, 5))}]
    fake, deploy = run_flow(path, tmp_path, batches, config_defination=str(cfg))
    assert len(read_record(tmp_path / "q_record.txt")["emb"].scale_w) == 1
    scale = np.abs(table).max() / 127
    want = np.maximum(np.rint(table / scale) * scale, 0)[batches[0]["ids"]]
    for p in (fake, deploy):
        np.testing.assert_allclose(ort_run(p, batches[0])[0], want, rtol=1e-5, atol=1e-6)


def test_lookup_alone_calibrates_nothing_and_analyze_lines_it_up(tmp_path, rng):
    """Only a weight-only layer enabled: calibration observes no tensor, yet the record and both models are
    written; ``omct analyze`` compares the lookup's float output in the fake-quant and the deploy model (where the
    layer's name is on the Mul that scales the gathered INT8 rows)."""
    from omct.analysis.compare import analyze

    table = rng.normal(size=(600, 16)).astype(np.float32)
    model = _gather_model(table)
    path = tmp_path / "lookup.onnx"
    onnx.save(model, path)
    batches = [{"ids": rng.integers(0, 600, (8, 5))} for _ in range(2)]
    fake, deploy = run_flow(path, tmp_path, batches)
    mod = onnx.load(tmp_path / "q_mod.onnx")
    assert [o.name for o in mod.graph.output] == ["y"]  # nothing observed
    by_name = {n.name: n.op_type for n in onnx.load(deploy).graph.node}
    assert by_name["emb"] == "Mul" and by_name["emb.int8_rows"] == "Gather"
    scales = np.abs(table).max(axis=1, keepdims=True) / 127  # one symmetric scale per row
    want = np.maximum(np.rint(table / scales) * scales, 0)[batches[0]["ids"]]
    for p in (fake, deploy):
        np.testing.assert_allclose(ort_run(p, batches[0])[0], want, rtol=1e-5, atol=1e-6)
    for p in (fake, deploy):
        [layer] = analyze(path, p, batches).layers
        assert layer.layer == "emb" and layer.tensor == "e" and 0.999 < layer.cosine < 1.0
        assert 0.999 < layer.isolated.cosine < 1.0


def test_inspect_lists_the_lookup_and_auto_calibration_can_return_it_to_float(tmp_path, rng):
    import subprocess
    import sys

    from omct.auto.evaluator import AutoCalibrationEvaluatorBase

    path = tmp_path / "lookup.onnx"
    onnx.save(_gather_model(rng.normal(size=(600, 16)).astype(np.float32)), path)
    res = subprocess.run([sys.executable, "-m", "omct", "inspect", str(path)], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0 and "emb" in res.stdout and "quantizable (weight-only)" in res.stdout, res.stdout
    batches = [{"ids": rng.integers(0, 600, (8, 5))} for _ in range(2)]
    ref = ort_run(path, batches[0])[0]

    class Exact(AutoCalibrationEvaluatorBase):  # only the float table passes: the search must return it to float
        def calibration(self, model):
            for b in batches:
                model.run(None, b)

        def evaluate(self, model):
            return 1.0 if np.array_equal(ort_run(model, batches[0])[0], ref) else 0.5

    amct.create_quant_config(str(tmp_path / "c.json"), str(path), batch_num=2)
    result = amct.accuracy_based_auto_calibration(str(path), Exact(), str(tmp_path / "c.json"), str(tmp_path / "r.txt"),
                                                  str(tmp_path / "out"))
    assert result.float_layers == ["emb"] and [name for name, _ in result.ranking] == ["emb"]


# ------------------------------------------------------------------ BERT: size, accuracy, ORT's optimised graph
@pytest.fixture(scope="module")
def bert(digits, tmp_path_factory):
    """A BERT-mini with a realistic vocabulary (the word table dominates the file), trained a little, and its
    ONNX export (dynamic batch and sequence)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = real_models.bert_mini(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64, num_labels=10)
    train = [torch.tensor(a) for a in _tokens(digits.x_train, rng)]
    test = [torch.tensor(a) for a in _tokens(digits.x_test, rng)]
    y = torch.tensor(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for idx in torch.randperm(len(y)).split(64):
        opt.zero_grad()
        F.cross_entropy(model(*[t[idx] for t in train]), y[idx]).backward()
        opt.step()
    model.eval()
    path = tmp_path_factory.mktemp("bert") / "bert.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in NAMES} | {"logits": {0: "batch"}}
    torch.onnx.export(model, tuple(t[:16] for t in train), str(path), dynamo=False, opset_version=17, input_names=NAMES,
                      output_names=["logits"], dynamic_axes=axes)
    yield model, train, test, path
    torch.set_num_threads(threads)


def _feeds(tensors, start, size=16):
    return {n: t[start:start + size].numpy() for n, t in zip(NAMES, tensors, strict=True)}


def _cosine(a, b):
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _optimised(path, tmp_path) -> onnx.GraphProto:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimised_lookup.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


def _check_deploy(float_path, fake, deploy, test, tmp_path, word_layer):
    ratio = os.path.getsize(deploy) / os.path.getsize(float_path)
    assert ratio <= 0.27, f"deploy is {ratio:.3f}x of FP32"
    assert_integer_kernels(deploy, tmp_path)
    # ONNX Runtime's optimised graph gathers INT8 rows: no float copy of the table, no DequantizeLinear of it
    graph = _optimised(deploy, tmp_path)
    tables = [t for t in graph.initializer if list(t.dims) == [VOCAB, HIDDEN]]
    assert [t.data_type for t in tables] == [TensorProto.INT8], [(t.name, t.data_type) for t in tables]
    readers = [n for n in graph.node if tables[0].name in n.input]
    assert [n.op_type for n in readers] == ["Gather"], [n.op_type for n in readers]
    fake_tables = [t for t in onnx.load(fake).graph.initializer if list(t.dims) == [VOCAB, HIDDEN]]
    assert len(fake_tables) == 1 and fake_tables[0].data_type == TensorProto.FLOAT  # the table on its quantized values
    codes = onnx.numpy_helper.to_array(fake_tables[0])
    scales = np.abs(codes).max(axis=1, keepdims=True) / 127
    assert np.allclose(codes, np.rint(codes / np.where(scales > 0, scales, 1)) * scales, atol=1e-6)
    assert word_layer in {e["name"] for e in json.loads(metadata.read(onnx.load(deploy))[metadata.LAYERS])}
    for start in (0, 16):
        feeds = _feeds(test, start)
        want, got_fake, got = (ort_run(p, feeds)[0] for p in (float_path, fake, deploy))
        assert _cosine(got, want) > 0.999 and (got.argmax(1) == want.argmax(1)).mean() >= 0.9, _cosine(got, want)
        assert _cosine(got, got_fake) > 0.999
    short = {k: v[:3, :16] for k, v in _feeds(test, 0).items()}  # another batch and sequence length
    assert _cosine(ort_run(deploy, short)[0], ort_run(float_path, short)[0]) > 0.999
    return ratio


def test_bert_embeddings_onnx_frontend(bert, tmp_path):
    _, train, test, path = bert
    report = amct.inspect_model(path)
    gathers = {s.name: s for s in report.layers if s.op_type == "Gather"}
    assert set(gathers) == {"/bert/embeddings/word_embeddings/Gather", "/bert/embeddings/position_embeddings/Gather"}
    assert all(s.weight_only and s.weight_axis == 0 for s in gathers.values())
    assert [r.name for r in report.refused if r.op_type == "Gather"] == ["/bert/embeddings/token_type_embeddings/Gather"]
    fake, deploy = run_flow(path, tmp_path, [_feeds(train, 16 * i) for i in range(3)])
    config = json.loads((tmp_path / "q.json").read_text())
    word = "/bert/embeddings/word_embeddings/Gather"
    assert config[word]["quant_enable"] and config[word]["weight_quant_params"]["channel_wise"]
    assert len(read_record(tmp_path / "q_record.txt")[word].scale_w) == VOCAB  # one scale per row
    _check_deploy(path, fake, deploy, test, tmp_path, word)


def test_bert_embeddings_pytorch_frontend(bert, tmp_path):
    model, train, test, path = bert
    x = tuple(t[:16] for t in train)
    config, modified, record = tmp_path / "config.json", tmp_path / "modified.onnx", tmp_path / "record.txt"
    tamct.create_quant_config(str(config), model, x, batch_num=3)
    assert json.loads(config.read_text())["bert.embeddings.word_embeddings"]["weight_quant_params"]["channel_wise"]
    axes = {n: {0: "batch", 1: "sequence"} for n in NAMES} | {"logits": {0: "batch"}}
    cal = tamct.quantize_model(str(config), str(modified), str(record), model, x, output_names=["logits"],
                               dynamic_axes=axes)
    with torch.no_grad():
        for i in range(3):
            cal(*(t[16 * i:16 * (i + 1)] for t in train))
    tamct.save_model(str(modified), str(record), str(tmp_path / "q"))
    rec = read_record(record)
    assert len(rec["bert.embeddings.word_embeddings"].scale_w) == VOCAB
    # the word and position tables (the export, with its dynamic batch, computes the position ids); the token-type
    # table is too small
    assert {k for k in rec if "embeddings" in k} == {"bert.embeddings.word_embeddings", "bert.embeddings.position_embeddings"}
    report = tamct.inspect_model(model, x)
    assert {r.name: r.reason.split(":")[0] for r in report.refused} == {
        "bert.embeddings.token_type_embeddings": "its table has 512 values (< 1024)"}
    _check_deploy(path, tmp_path / "q_fake_quant_model.onnx", tmp_path / "q_deploy_model.onnx", test, tmp_path,
                  "bert.embeddings.word_embeddings")


def test_skip_layer_types_gather_keeps_tables_float(bert, tmp_path):
    _, train, _, path = bert
    cfg = tmp_path / "q.cfg"
    cfg.write_text('skip_layer_types: "Gather"\n')
    fake, deploy = run_flow(path, tmp_path, [_feeds(train, 0)], config_defination=str(cfg))
    config = json.loads((tmp_path / "q.json").read_text())
    gathers = [k for k in config if k.endswith("embeddings/Gather")]
    assert len(gathers) == 2 and not any(config[k]["quant_enable"] for k in gathers)
    tables = [t for t in onnx.load(deploy).graph.initializer if list(t.dims) == [VOCAB, HIDDEN]]
    assert [t.data_type for t in tables] == [TensorProto.FLOAT]
    assert os.path.getsize(deploy) / os.path.getsize(path) > 0.5
