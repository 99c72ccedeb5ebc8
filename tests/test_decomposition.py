"""Tensor decomposition of convolutions: the numpy core against torch's conv2d and closed-form references, the
PyTorch and ONNX APIs on a model trained here (fine-tune round trip, ONNX export, PTQ), and bad input."""

import copy
import json

import numpy as np
import onnx
import pytest
import torch
import zoo
from conftest import assert_integer_kernels, ort_run
from torch import nn

import omct.onnx as onnx_amct
import omct.pytorch as amct
from omct.core import decomposition as dec
from omct.decompose import plan
from omct.errors import ConfigError, OutputPathError


def torch_conv(x, w, stride, pads, bias=None):
    t, left, b, r = pads
    xp = torch.nn.functional.pad(torch.tensor(x, dtype=torch.float64), (left, r, t, b))
    return torch.nn.functional.conv2d(xp, torch.tensor(w, dtype=torch.float64),
                                      None if bias is None else torch.tensor(bias, dtype=torch.float64), stride).numpy()


def run_chain(x, form, weights, bias, g):
    y = x.astype(np.float64)
    specs = plan.child_specs(form, (weights[0].shape[0],) if form == "svd" else (weights[0].shape[0], weights[1].shape[0]),
                             g, bias is not None)
    for s, w in zip(specs, weights, strict=True):
        y = torch_conv(y, w, s["stride"], s["pads"], bias if s["bias"] else None)
    return y


@pytest.mark.parametrize("stride,pads", [((1, 1), (1, 1, 1, 1)), ((2, 2), (1, 0, 1, 1)), ((2, 1), (0, 0, 0, 0))])
def test_full_rank_factors_compute_the_original_conv(stride, pads, rng):
    w = rng.standard_normal((24, 16, 3, 3))
    bias = rng.standard_normal(24)
    x = rng.standard_normal((2, 16, 9, 11))
    g = dec.ConvGeometry(24, 16, 3, stride, pads, (9, 11))
    ref = torch_conv(x, w, stride, pads, bias)
    two = dec.svd_factors(w, 16 * 3)
    three = dec.tucker2_factors(w, 16, 24)
    np.testing.assert_allclose(dec.compose("svd", two), w, atol=1e-10)
    np.testing.assert_allclose(dec.compose("tucker2", three), w, atol=1e-10)
    np.testing.assert_allclose(run_chain(x, "svd", two, bias, g), ref, atol=1e-9)
    np.testing.assert_allclose(run_chain(x, "tucker2", three, bias, g), ref, atol=1e-9)
    np.testing.assert_allclose(dec.conv2d(x, w, bias, stride, pads), ref, atol=1e-9)  # the core's own conv
    # MAC counts against a count of the chain's convs
    for form, ws in (("svd", two), ("tucker2", three)):
        ranks = (ws[0].shape[0],) if form == "svd" else (ws[0].shape[0], ws[1].shape[0])
        macs, h = 0, x
        for s, wt in zip(plan.child_specs(form, ranks, g, False), ws, strict=True):
            h = torch_conv(h, wt, s["stride"], s["pads"])
            macs += h.shape[2] * h.shape[3] * wt[0].size * wt.shape[0]
        assert g.form_macs(form, ranks) == macs
    assert g.macs() == ref.shape[2] * ref.shape[3] * w[0].size * 24


def test_truncation_errors_are_exact_and_hooi_improves_hosvd(rng):
    w = rng.standard_normal((32, 16, 3, 3))
    g = dec.ConvGeometry(32, 16, 3, (1, 1), (1, 1, 1, 1), (8, 8))
    cands = dec.candidates(w, None, g, multiple=8)
    assert {c.form for c in cands} == {"svd", "tucker2"} and all(c.macs < g.macs() for c in cands)
    for c in cands:
        err = np.linalg.norm(dec.compose(c.form, [x.astype(np.float64) for x in c.weights]) - w) / np.linalg.norm(w)
        assert err == pytest.approx(c.error, rel=1e-4)
        # Eckart-Young: no rank-r matrix is closer than the truncated SVD
        if c.form == "svd":
            s = np.linalg.svd(dec.svd_matrix(w), compute_uv=False)
            assert c.error == pytest.approx(np.sqrt((s[c.ranks[0]:] ** 2).sum() / (s ** 2).sum()), rel=1e-6)
        else:
            assert dec.refine(c, w, None).error <= c.error + 1e-9


def test_evbmf_finds_the_rank_of_a_noisy_low_rank_matrix(rng):
    for rank, shape in ((7, (100, 200)), (12, (150, 90))):
        m = rng.standard_normal((shape[0], rank)) @ rng.standard_normal((rank, shape[1])) * 0.3
        m += 0.05 * rng.standard_normal(shape)
        assert dec.evbmf_rank(m) == rank
    assert dec.evbmf_rank(rng.standard_normal((60, 80))) == 0  # pure noise
    assert dec.round_rank(17, 16, 96) == 32 and dec.round_rank(0, 8, 96) == 8 and dec.round_rank(95, 16, 90) == 90


def test_data_aware_fit_beats_weight_fit_on_held_out_inputs(rng):
    """Inputs living in a few channel directions: the output-error fit spends the rank where the data is."""
    cin, cout = 32, 32
    w = rng.standard_normal((cout, cin, 3, 3))
    basis = rng.standard_normal((cin, 6))
    def inputs(n):
        low = np.einsum("cr,nrhw->nchw", basis, rng.standard_normal((n, 6, 10, 10)))
        return low + 0.01 * rng.standard_normal((n, cin, 10, 10))
    g = dec.ConvGeometry(cout, cin, 3, (1, 1), (1, 1, 1, 1), (10, 10))
    data = dec.LayerData(inputs(64), w, None, g)
    test = inputs(8)
    ref = torch_conv(test, w, (1, 1), (1, 1, 1, 1))
    for c in dec.candidates(w, None, g, multiple=8):
        if c.ranks[0] != 16:
            continue
        plain, fitted = dec.refine(c, w, None), dec.refine(c, w, None, data)
        errs = [np.linalg.norm(run_chain(test, c.form, d.weights, d.bias, g) - ref) / np.linalg.norm(ref)
                for d in (plain, fitted)]
        assert fitted.data_aware and errs[1] < 0.75 * errs[0], (c.form, errs)
        assert fitted.error == pytest.approx(errs[1], rel=0.5)  # the in-sample error it reports is what it does


def test_rank_rules(rng):
    w = rng.standard_normal((64, 64, 3, 3))
    g = dec.ConvGeometry(64, 64, 3, (1, 1), (1, 1, 1, 1), (8, 8))
    cands = dec.candidates(w, None, g, 16)
    ordered, _ = dec.rank_order(cands, g, w, 16, rank_budget=0.4)
    assert ordered and all(c.macs <= 0.4 * g.macs() for c in ordered)
    assert ordered[0].error == min(c.error for c in cands if c.macs <= 0.4 * g.macs())
    ordered, _ = dec.rank_order(cands, g, w, 16, max_error=0.8)
    assert all(c.error <= 0.8 for c in ordered) and ordered[0].macs == min(c.macs for c in cands if c.error <= 0.8)
    assert dec.rank_order(cands, g, w, 16, max_error=1e-6)[0] == []
    # AMCT's default: the EVBMF rank of the two-conv form (here a rank-20 weight plus noise: 32 after rounding)
    # sets the error; nothing with more error is chosen, and the first choice is the cheapest within it
    low = np.einsum("ihr,row->oihw", rng.standard_normal((64, 3, 20)), rng.standard_normal((20, 64, 3)))
    low += 0.05 * rng.standard_normal(low.shape)
    cands = dec.candidates(low, None, g, 16)
    ordered, rule = dec.rank_order(cands, g, low, 16)
    ref = next(c for c in cands if c.form == "svd" and c.ranks == (32,))
    assert rule.startswith("EVBMF rank 32") and all(c.error <= ref.error + 1e-12 for c in ordered)
    assert ordered[0].macs == min(c.macs for c in ordered) <= ref.macs
    for bad in (0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="rank_budget must be in \\(0, 1\\]"):
            plan.DecomposeOptions(rank_budget=bad)


def test_a_slower_form_is_never_chosen(rng, monkeypatch):
    w = rng.standard_normal((64, 64, 3, 3))
    g = dec.ConvGeometry(64, 64, 3, (1, 1), (1, 1, 1, 1), (8, 8))
    slower = {"svd"}
    monkeypatch.setattr(plan, "measure_latency", lambda g, form, ranks, o: (1.0, 2.0 if form in slower else 0.5))
    d = plan.decide("c", w, None, g, plan.DecomposeOptions(rank_budget=0.5))
    assert d.chosen.form == "tucker2" and any(t.startswith("svd") for t in d.tried)
    slower.add("tucker2")
    d = plan.decide("c", w, None, g, plan.DecomposeOptions(rank_budget=0.5))
    assert d.chosen is None and d.reason.startswith("slower in ONNX Runtime")


def test_latency_models_measure_what_they_replace():
    """The models timed for the latency check compute the same as a single conv at full rank? No: they only
    need the right shapes; check the replacement's output shape matches the original's in ONNX Runtime."""
    from omct.decompose.latency import conv_chain_model

    g = dec.ConvGeometry(32, 16, 3, (2, 2), (1, 1, 1, 1), (9, 9))
    x = {"x": np.zeros((2, 16, 9, 9), np.float32)}
    shapes = [ort_run(conv_chain_model(g, f, r, 2).SerializeToString(), x)[0].shape
              for f, r in ((None, ()), ("svd", (8,)), ("tucker2", (8, 16)))]
    assert shapes == [(2, 32, *g.out_hw)] * 3


# ------------------------------------------------------------------ PyTorch and ONNX on a trained model


@pytest.fixture(scope="module")
def resnet(trained, digits):
    model, path = trained("resnet")
    return model, path, digits


def _finetune(model, digits, epochs=1, lr=1e-3):
    torch.manual_seed(0)
    x, y = torch.tensor(digits.x_train), torch.tensor(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def test_pytorch_decompose_finetune_round_trip_and_ptq(resnet, tmp_path):
    model, _, digits = resnet
    base = zoo.accuracy_torch(model, digits.x_test, digits.y_test)
    dmodel = copy.deepcopy(model)
    x = torch.tensor(digits.x_train[:128])
    info = tmp_path / "decompose_info.json"
    dmodel, changes = amct.auto_decomposition(dmodel, info, input_data=x, rank_budget=0.5, rank_multiple=8,
                                              check_latency=False)
    assert changes and all(v == [f"{k}.{i}" for i in range(len(v))] for k, v in changes.items())
    for name in changes:
        seq = dmodel.get_submodule(name)
        assert isinstance(seq, nn.Sequential) and all(isinstance(m, nn.Conv2d) for m in seq)
        orig = model.get_submodule(name)
        assert sum(p.numel() for p in seq.parameters()) < sum(p.numel() for p in orig.parameters())
    doc = json.loads(info.read_text())
    assert set(doc["layers"]) == set(changes) and all(e["error_of"] == "output" for e in doc["layers"].values())
    assert doc["kept"]  # the stem (1 input channel) and the 1x1 shortcuts are reported with their reasons
    assert zoo.accuracy_torch(dmodel, digits.x_test, digits.y_test) >= base - 0.05  # data-aware, before fine-tuning
    tuned = _finetune(dmodel, digits)
    acc = zoo.accuracy_torch(tuned, digits.x_test, digits.y_test)
    assert acc >= base - 0.02, (base, acc)
    torch.save(tuned.state_dict(), tmp_path / "tuned.pth")
    fresh = zoo.resnet(width=16, blocks=3)
    fresh, again = amct.decompose_network(fresh, info)
    assert again == changes
    fresh.load_state_dict(torch.load(tmp_path / "tuned.pth", weights_only=True))  # strict: same keys and shapes
    fresh.eval()
    with torch.no_grad():
        xt = torch.tensor(digits.x_test)
        assert torch.equal(fresh(xt), tuned(xt))
    # the decomposed model goes through omct's PTQ unchanged: every decomposed conv is a quantized layer
    cfg, mod, rec = tmp_path / "q.json", tmp_path / "q_mod.onnx", tmp_path / "q_rec.txt"
    amct.create_quant_config(str(cfg), fresh, x[:32], batch_num=2)
    layers = set(json.loads(cfg.read_text()))
    assert all(c in layers for children in changes.values() for c in children)
    cal = amct.quantize_model(str(cfg), str(mod), str(rec), fresh, x[:32])
    with torch.no_grad():
        for b in (x[:64], x[64:]):
            cal(b)
    amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
    deploy = tmp_path / "q_deploy_model.onnx"
    assert_integer_kernels(deploy, tmp_path)
    feed = onnx.load(str(deploy)).graph.input[0].name
    q_acc = float((ort_run(deploy, {feed: digits.x_test})[0].argmax(1) == digits.y_test).mean())
    assert q_acc >= acc - 0.02, (acc, q_acc)


def test_pytorch_bad_input(resnet, tmp_path, caplog):
    model, _, digits = resnet
    # nothing decomposable: said so, model and its state unchanged
    plain = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, (3, 1)))
    before = copy.deepcopy(plain.state_dict())
    with caplog.at_level("WARNING", logger="omct"):
        out, changes = amct.auto_decomposition(plain, tmp_path / "none.json")
    assert out is plain and changes == {} and "nothing decomposable" in caplog.text and "groups=8" in caplog.text
    assert all(torch.equal(before[k], v) for k, v in out.state_dict().items())
    assert json.loads((tmp_path / "none.json").read_text())["layers"] == {}
    # an info file from another model
    info = tmp_path / "info.json"
    amct.auto_decomposition(copy.deepcopy(model), info, rank_budget=0.5, rank_multiple=8, check_latency=False)
    other = zoo.small_cnn()
    with pytest.raises(ConfigError, match="info.json': layer '.*' is not in the Sequential model"):
        amct.decompose_network(other, info)
    wider = zoo.resnet(width=32, blocks=3)
    with pytest.raises(ConfigError, match="layer '.*' has in_channels 32, the file says 16"):
        amct.decompose_network(wider, info)
    untouched = copy.deepcopy(wider.state_dict())
    assert all(torch.equal(untouched[k], v) for k, v in wider.state_dict().items())
    # corrupt or foreign files
    bad = tmp_path / "bad.json"
    for text, message in (("{not json", "is not valid JSON"), ("[]", "has no 'layers' object"),
                          ('{"version": 1, "layers": {"c": {"form": "cp"}}}', "layer 'c' lacks"),
                          ('{"version": 1, "layers": {"c": {"form": "cp", "ranks": [4], "in_channels": 1, '
                           '"out_channels": 1, "kernel_size": 3, "stride": [1, 1], "pads": [1, 1, 1, 1], "bias": false, '
                           '"children": ["c.0", "c.1"]}}}', "layer 'c' has an invalid entry"),
                          ('{"version": 9, "layers": {}}', "version 9 is not supported")):
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message) as e:
            amct.decompose_network(zoo.resnet(width=16, blocks=3), bad)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="not found"):
        amct.decompose_network(model, tmp_path / "missing.json")
    for budget in (0, 1.01):
        with pytest.raises(ConfigError, match="rank_budget"):
            amct.auto_decomposition(copy.deepcopy(model), rank_budget=budget)


def test_onnx_decomposition_rewrites_conv_nodes(resnet, tmp_path):
    _, path, digits = resnet
    out, info = tmp_path / "dec.onnx", tmp_path / "info.json"
    feeds = {"input": digits.x_train[:128]}
    changes = onnx_amct.auto_decomposition(str(path), str(out), str(info), calibration_data=feeds, rank_budget=0.5,
                                           rank_multiple=8, check_latency=False)
    assert changes
    nodes = {n.name: n for n in onnx.load(str(out)).graph.node}
    for name, children in changes.items():
        assert name not in nodes and all(nodes[c].op_type == "Conv" for c in children)
    assert set(json.loads(info.read_text())["layers"]) == set(changes)
    base, got = ort_run(path, {"input": digits.x_test}), ort_run(out, {"input": digits.x_test})
    agree = float((base[0].argmax(1) == got[0].argmax(1)).mean())
    assert agree > 0.9, agree  # data-aware factors, no fine-tuning
    # the ONNX path and the PyTorch path make the same structure for the same rules
    with pytest.raises(OutputPathError):
        onnx_amct.auto_decomposition(str(path), str(path))
    with pytest.raises(ConfigError, match="rank_budget"):
        onnx_amct.auto_decomposition(str(path), str(tmp_path / "x.onnx"), rank_budget=2.0)
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_nothing_decomposable_is_written_unchanged(tmp_path, caplog):
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((8, 4, 1, 1), np.float32), "w")
    dw = numpy_helper.from_array(np.ones((8, 1, 3, 3), np.float32), "dw")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="pointwise"),
         helper.make_node("Conv", ["y", "dw"], ["z"], name="depthwise", group=8, pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, None)], [w, dw])
    src, out = tmp_path / "m.onnx", tmp_path / "d.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    with caplog.at_level("WARNING", logger="omct"):
        changes = onnx_amct.auto_decomposition(str(src), str(out), str(tmp_path / "i.json"))
    assert changes == {} and "nothing decomposable" in caplog.text
    assert "kernel 1x1" in caplog.text and "groups=8" in caplog.text
    x = {"x": np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)}
    np.testing.assert_array_equal(ort_run(src, x)[0], ort_run(out, x)[0])
    assert json.loads((tmp_path / "i.json").read_text())["kept"] == {"pointwise": "kernel 1x1 (needs 3x3 or larger)",
                                                                    "depthwise": "groups=8 (only groups 1)"}
