"""AdaRound (``wts_algo: ada_quantize``): the learned rounding beats round-to-nearest on a layer's output
(checked with torch's conv as the independent reference, on all the inputs, not only the sampled rows), the
bounded input sample is what it says, the decisions survive the record file, and both frontends export them
(fake-quant weights == deploy weights == the learned codes)."""

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import ort_run
from google.protobuf import text_format
from onnx import numpy_helper
from torch import nn

import omct.onnx as amct
from omct.algorithms.adaround import learn_layer, learn_layer_from_gram
from omct.core.adaround import (
    AdaRoundOptions,
    InputGram,
    InputSamples,
    Window,
    _patches,
    apply_flips,
    flip_descent,
    flip_search,
    output_error_terms,
    recorded_rounding,
    rounding_flips,
)
from omct.core.bias_correction import correction
from omct.core.weights import arq
from omct.formats.config import load_config
from omct.formats.proto import ScaleOffsetRecord
from omct.formats.record import LayerRecord, read_record, record_text, write_record
from omct.graph.export import layer_weight_codes, weight_params
from omct.graph.ops import LayerSpec


def _conv_layer(rng, cin=8, cout=16, groups=1):
    w = (rng.normal(size=(cout, cin // groups, 3, 3)) * 0.2).astype(np.float32)
    # correlated, non-centred inputs: where the rounding errors of a row add up instead of averaging out
    base = rng.normal(size=(64, cin, 1, 1)) * 0.5 + 1.0
    x = (base + 0.3 * rng.normal(size=(64, cin, 12, 12))).astype(np.float32)
    return w, x


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("options", [AdaRoundOptions(num_iteration=300), AdaRoundOptions(solver="flips")],
                         ids=["adam", "flips"])
def test_adaround_beats_round_to_nearest_on_layer_output(groups, options):
    rng = np.random.default_rng(0)
    w, x = _conv_layer(rng, groups=groups)
    window = Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    samples = InputSamples(window, seed=1, max_rows=1024)
    for batch in np.split(x, 4):
        samples.update(batch)
    params = arq(w, 8, 0)
    spec = LayerSpec("conv", "Conv", "x", "w", 0, groups=groups)
    codes = learn_layer(w, params, spec, samples.rows, options)
    nearest = params.quantize(w)
    assert np.all(np.abs(codes - w / params.scale[:, None, None, None]) < 1)  # floor or ceil, never further
    assert 0 < np.mean(codes != nearest) < 0.5

    def out_mse(q):  # independent reference: torch's convolution on every input, not only the sampled rows
        wq = torch.tensor(params.dequantize(q))
        ref = F.conv2d(torch.tensor(x), torch.tensor(w), padding=1, groups=groups)
        return float(((F.conv2d(torch.tensor(x), wq, padding=1, groups=groups) - ref) ** 2).mean())

    assert out_mse(codes) < 0.8 * out_mse(nearest), (out_mse(codes), out_mse(nearest))


def _row_losses(codes, w, s, x, xq):
    """Each output row's ||Wq xq - W x||^2 on the rows themselves (no Gram matrix), float64."""
    wq = (codes * s).astype(np.float64)
    return ((np.einsum("god,gnd->gon", wq, xq) - np.einsum("god,gnd->gon", w.astype(np.float64), x)) ** 2).sum(-1)


def test_flip_search_ends_where_no_single_flip_helps():
    """The flip descent (``solver: flips``, and adam's ``polish``) ends in a local minimum of the layer's output
    error on its rows, checked by trying every single flip on the rows directly; it is never worse than where
    it started, and each code stays floor or ceil of w / s."""
    rng = np.random.default_rng(5)
    g, out, d, n = 2, 5, 12, 40
    w = rng.normal(size=(g, out, d)).astype(np.float32)
    s = (np.abs(w).max(-1, keepdims=True) / 7).astype(np.float32)  # 4-bit-like: rounding matters
    x = (rng.normal(size=(g, n, d)) + 0.5).astype(np.float32)
    xq = (np.round(x * 4) / 4).astype(np.float32)  # a quantized input
    gram, lin = output_error_terms(w, x, xq)
    nearest = np.clip(np.round(w / s), -8, 7)
    codes = flip_search(nearest, w, s, gram, lin, -8, 7)
    lo, hi = np.clip(np.floor(w / s), -8, 7), np.clip(np.floor(w / s) + 1, -8, 7)
    assert np.all((codes == lo) | (codes == hi)) and (codes != nearest).any()
    base = _row_losses(codes, w, s, x, xq)
    assert np.all(base <= _row_losses(nearest, w, s, x, xq) + 1e-6)
    for idx in np.ndindex(g, out, d):
        other = codes.copy()
        other[idx] = hi[idx] if codes[idx] == lo[idx] else lo[idx]
        assert _row_losses(other, w, s, x, xq)[idx[:2]] >= base[idx[:2]] * (1 - 1e-5), idx


def _reference_descent(values, alternatives, w, gram, lin, max_steps):
    """Best-improvement descent written out the plain way, in float64: per row, try every single flip on the
    full quadratic ``delta A delta' - 2 B . delta``, take the one that lowers it most, until none does."""
    q = values.astype(np.float64).copy()
    alt = alternatives.astype(np.float64).copy()
    g, out, d = w.shape
    for gi, o in np.ndindex(g, out):
        a, b = gram[gi].astype(np.float64), (np.zeros(d) if lin is None else lin[gi, o].astype(np.float64))

        def loss(v, target=w[gi, o], a=a, b=b):
            delta = v - target
            return delta @ a @ delta - 2 * b @ delta

        for _ in range(max_steps):
            here, best, at = loss(q[gi, o]), 0.0, None
            for j in range(d):
                if alt[gi, o, j] == q[gi, o, j]:
                    continue
                trial = q[gi, o].copy()
                trial[j] = alt[gi, o, j]
                change = loss(trial) - here
                if change < best:
                    best, at = change, j
            if at is None:
                break
            q[gi, o, at], alt[gi, o, at] = alt[gi, o, at], q[gi, o, at]
    return q


@pytest.mark.parametrize("groups,lin,steps", [(1, False, None), (1, True, None), (3, True, None), (2, True, 3)])
def test_flip_descent_takes_the_reference_descents_flips(groups, lin, steps):
    """``flip_descent`` (incremental, vectorised over rows, rows leaving the working set as they stop) takes the
    same flips as the plain best-improvement descent that recomputes every row's loss for every candidate flip
    (float64 inputs: no ties decided by rounding), with ``B`` or without, one Gram matrix or one per group, a
    step limit, some weights with no other value, and Fortran-ordered inputs; in float32 it ends no higher."""
    rng = np.random.default_rng(11 + groups)
    out, d, n = 6, 24, 60
    w = rng.normal(size=(groups, out, d))
    x = rng.normal(size=(groups, n, 4)) @ rng.normal(size=(groups, 4, d)) + 0.5 * rng.normal(size=(groups, n, d)) + 1.0
    gram = np.matmul(x.transpose(0, 2, 1), x) / n
    b = 0.2 * rng.normal(size=(groups, out, d)) if lin else None
    s = np.abs(w).max(-1, keepdims=True) / 5  # a coarse grid: many flips pay
    near = np.round(w / s) * s
    alt = np.where(np.round(w / s) > w / s, np.floor(w / s), np.ceil(w / s)) * s
    alt[0, 0, :2] = near[0, 0, :2]  # no other value
    ref = _reference_descent(near, alt, w, gram, b, d if steps is None else steps)
    assert (ref != near).sum() > groups * out  # the problem makes the descent work
    got = flip_descent(np.asfortranarray(near), np.asfortranarray(alt), w, gram, b, steps)
    np.testing.assert_array_equal(got, ref)

    f32 = [None if a is None else a.astype(np.float32) for a in (near, alt, w, gram, b)]
    got32 = flip_descent(*f32, steps).astype(np.float64)

    def losses(v):
        delta = v - w
        quad = np.einsum("god,gde,goe->go", delta, gram, delta)
        return quad - 2 * (0 if b is None else (b * delta).sum(-1))

    assert np.all(losses(got32) <= losses(ref) + 1e-5 * np.abs(losses(ref)).max())


@pytest.mark.parametrize("solver", ["adam", "flips"])
def test_rounding_fitted_for_bias_correction_beats_fitting_the_raw_output(solver):
    """With bias correction after it, the rounding fits the inputs minus their channel means (``center``): bias
    correction removes ``(Wq - W) E[x]`` anyway. On non-centred inputs, the corrected output (torch's conv
    plus the correction, on every input) is closer to float than when the rounding fitted the raw output."""
    rng = np.random.default_rng(0)
    w, x = _conv_layer(rng, cin=16, cout=16)
    window = Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    samples = InputSamples(window, seed=1, max_rows=1024)
    samples.update(x)
    params, spec = arq(w, 8, 0), LayerSpec("conv", "Conv", "x", "w", 0)
    mean = x.mean((0, 2, 3))
    ref = F.conv2d(torch.tensor(x), torch.tensor(w), padding=1)

    def corrected_mse(codes):
        wq = params.dequantize(codes)
        shift = correction(w, wq, mean, 0, 1).astype(np.float32)
        got = F.conv2d(torch.tensor(x), torch.tensor(wq), torch.tensor(shift), padding=1)
        return float(((got - ref) ** 2).mean())

    o = AdaRoundOptions(num_iteration=200, solver=solver)
    centred = corrected_mse(learn_layer(w, params, spec, samples.rows, o, channel_mean=mean))
    raw = corrected_mse(learn_layer(w, params, spec, samples.rows, o))
    assert centred < 0.9 * raw, (centred, raw, corrected_mse(params.quantize(w)))


def test_input_samples_are_patches_and_bounded():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3, 4, 9, 7)).astype(np.float32)
    window = Window((3, 2), (2, 1), (1, 0, 1, 1), (1, 2))
    all_rows = F.unfold(torch.tensor(np.pad(x, ((0, 0), (0, 0), (1, 1), (0, 1)))), (3, 2), dilation=(1, 2),
                        stride=(2, 1)).permute(0, 2, 1).reshape(-1, 24).numpy()
    s = InputSamples(window, seed=3, max_bytes=50 * 24 * 4)
    s.update(x)
    assert s.rows.shape == (50, 24) and s.seen == len(all_rows)
    # every kept row is one of the layer's real patches (torch's unfold), no row twice
    match = (np.abs(s.rows[:, None] - all_rows[None]).max(axis=2) == 0)
    assert np.all(match.sum(axis=1) >= 1) and len(np.unique(match.argmax(axis=1))) == 50
    for _ in range(5):  # more batches: the bound holds
        s.update(x)
    assert s.rows.shape == (50, 24) and s.seen == 6 * len(all_rows)
    again = InputSamples(window, seed=3, max_bytes=50 * 24 * 4)
    for _ in range(6):
        again.update(x)
    np.testing.assert_array_equal(again.rows, s.rows)  # seeded: the same data gives the same sample
    # distributed calibration: another process's sample merges in, still bounded and made of real patches
    other = InputSamples(window, seed=3, max_bytes=50 * 24 * 4)
    other.update(x[:1] + 100)  # rows no patch of x has
    s.merge(other)
    assert s.rows.shape == (50, 24) and s.seen == 6 * len(all_rows) + len(all_rows) // 3
    from_other = (s.rows > 50).any(axis=1)
    assert 0 < from_other.sum() < 25  # about 1/19 of the union's rows came from the other process
    match = (np.abs(s.rows[~from_other, None] - all_rows[None]).max(axis=2) == 0)
    assert np.all(match.any(axis=1))


def test_rounding_decisions_survive_the_record_file(tmp_path):
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 3, 3, 3)).astype(np.float32)
    params = arq(w, 8, 0)
    v = w / params.scale[:, None, None, None]
    other = np.clip(np.where(np.round(v) > v, np.floor(v), np.ceil(v)), -128, 127)  # the neighbour not chosen
    codes = np.where(rng.random(w.shape) < 0.2, other, params.quantize(w)).astype(np.int64)
    gaps = rounding_flips(w, params, codes)
    np.testing.assert_array_equal(apply_flips(w, params, gaps), codes)
    # recorded_rounding: the same flips, and the codes the record gives back (what bias correction reads), also
    # where the descent moved a weight sitting exactly on a level (no other neighbour: the record keeps nearest)
    moved = codes.copy()
    w_on_level = w.copy()
    w_on_level.flat[5] = params.scale[0] * 3
    moved.flat[5] = 4
    got_gaps, got_codes = recorded_rounding(w_on_level, params, moved)
    assert got_gaps == rounding_flips(w_on_level, params, moved)
    np.testing.assert_array_equal(got_codes, apply_flips(w_on_level, params, got_gaps))
    assert got_codes.flat[5] == 3
    rec = LayerRecord(0.1, 0, [float(v) for v in params.scale], [0] * 6, ada_flip=gaps)
    text = record_text({"conv": rec})
    parsed = text_format.Parse(text, ScaleOffsetRecord())  # protobuf itself reads the list syntax
    assert list(parsed.record[0].value.ada_flip) == gaps
    path = tmp_path / "record.txt"
    write_record(path, {"conv": rec})
    path.write_text(path.read_text() + "\n")  # not the cached text: parsed from the file
    np.testing.assert_array_equal(apply_flips(w, params, read_record(path)["conv"].ada_flip), codes)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)
        self.conv3 = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = F.relu6(self.conv1(x))
        x = F.relu6(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.fc(x.mean((2, 3)))


def _net_and_data():
    torch.manual_seed(0)
    net = _Net().eval()
    x = np.random.default_rng(3).normal(size=(64, 3, 10, 10)).astype(np.float32) * 0.5 + 0.2
    return net, x


_CFG = """batch_num: 2
learned_rounding: false
common_config { ada_quantize { num_iteration: 200 } }
override_layer_configs { layer_name: "%s" calibration_config { arq_quantize { channel_wise: true } } }
"""


def _check_exported(fake, deploy, record, float_weights, ada_layers, plain_layer):
    """Deploy INT8 weights are the record's codes; fake-quant weights are those codes dequantized."""
    rec = read_record(record)
    assert all(rec[name].ada_flip for name in ada_layers) and not rec[plain_layer].ada_flip
    fq = {t.name: numpy_helper.to_array(t) for t in onnx.load(fake).graph.initializer}
    dp = {t.name: numpy_helper.to_array(t) for t in onnx.load(deploy).graph.initializer}
    for name, (w, axis) in float_weights.items():
        wp = weight_params(rec[name], 8, axis)
        codes = layer_weight_codes(w, rec[name], wp)
        assert (codes != wp.quantize(w)).any() == (name in ada_layers)
        np.testing.assert_array_equal(dp[f"{name}.weight_quantized"], codes.astype(np.int8))
        np.testing.assert_array_equal(fq[f"{name}.weight_fake_quant"], wp.dequantize(codes))


def test_onnx_flow_cfg_overrides_and_fake_quant_matches_deploy(tmp_path):
    net, x = _net_and_data()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.tensor(x[:1]),), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    g = onnx.load(path).graph
    convs = [n.name for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    transposed = {n.name: any(a.name == "transB" and a.i for a in n.attribute) for n in g.node}
    weights = {n.name: (numpy_helper.to_array(next(t for t in g.initializer if t.name == n.input[1])),
                        0 if n.op_type == "Conv" or transposed[n.name] else 1) for n in g.node if n.name in convs}
    cfg = tmp_path / "ada.cfg"
    cfg.write_text(_CFG % convs[2])
    files = [str(tmp_path / f) for f in ("c.json", "mod.onnx", "rec.txt")]
    amct.create_quant_config(files[0], str(path), config_defination=str(cfg))
    amct.quantize_model(files[0], str(path), files[1], files[2])
    sess = amct.CalibrationSession(files[1])
    for b in np.split(x, 2):
        sess.run(None, {"input": b})
    amct.save_model(files[1], files[2], str(tmp_path / "q"))
    fake, deploy = tmp_path / "q_fake_quant_model.onnx", tmp_path / "q_deploy_model.onnx"
    _check_exported(fake, deploy, files[2], weights, [convs[0], convs[1], convs[3]], convs[2])
    a, b = ort_run(fake, {"input": x})[0], ort_run(deploy, {"input": x})[0]
    assert np.abs(a - b).max() < 0.02 * np.abs(a).max()


def test_pytorch_flow_learns_and_exports_rounding(tmp_path):
    import omct.pytorch as pt

    net, x = _net_and_data()
    cfg = tmp_path / "ada.cfg"
    # fc: AdaRound and dmq_balancer together (the rounding is learned on the balanced weight and input)
    cfg.write_text(_CFG % "conv3" + 'override_layer_configs { layer_name: "fc" calibration_config '
                   '{ ada_quantize { num_iteration: 200 } dmq_balancer { migration_strength: 0.3 } } }\n')
    files = [str(tmp_path / f) for f in ("c.json", "mod.onnx", "rec.txt")]
    example = torch.tensor(x[:1])
    pt.create_quant_config(files[0], net, example, config_defination=str(cfg))
    cal = pt.quantize_model(files[0], files[1], files[2], net, example, input_names=["input"], output_names=["out"],
                            dynamic_axes={"input": {0: "n"}})
    with torch.no_grad():
        for b in np.split(x, 2):
            cal(torch.tensor(b))
    pt.save_model(files[1], files[2], str(tmp_path / "q"))
    rec = read_record(files[2])
    assert rec["fc"].ada_flip and len(rec["fc"].dmq_factor) == 24  # the Linear learns its rounding, balanced
    fake, deploy = (ort_run(tmp_path / f"q_{k}_model.onnx", {"input": x})[0] for k in ("fake_quant", "deploy"))
    with torch.no_grad():
        want = net(torch.tensor(x)).numpy()
    assert np.abs(fake - deploy).max() < 0.02 * np.abs(want).max()
    assert np.abs(fake - want).max() < 0.1 * np.abs(want).max()
    weights = {name: (getattr(net, name).weight.detach().numpy(), 0) for name in ("conv1", "conv2", "conv3")}
    _check_exported(tmp_path / "q_fake_quant_model.onnx", tmp_path / "q_deploy_model.onnx", files[2], weights,
                    ["conv1", "conv2"], "conv3")


def test_dmq_balancer_moves_outlier_channels_into_the_weights(tmp_path):
    """SmoothQuant-style balancing (AMCT's dmq_balancer, .cfg common_config): the record holds the factors, the
    exported fake-quant model computes what an independent numpy simulation of ``(X / s) (s W)`` gives, the
    deploy model agrees, and the error against float drops where a few input channels carry outliers."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    path = tmp_path / "mlp.onnx"
    torch.onnx.export(net, (torch.zeros(1, 32),), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    rng = np.random.default_rng(4)
    x = (rng.normal(size=(256, 32)) * np.where(np.arange(32) < 2, 60.0, 1.0)).astype(np.float32)  # 2 outlier channels
    with torch.no_grad():
        want = net(torch.tensor(x)).numpy()
    errors = {}
    dmq = 'override_layer_configs { layer_name: "/0/Gemm" calibration_config { dmq_balancer { } } }\n'  # alpha 0.5
    for name, body in (("plain", ""), ("dmq", dmq)):
        cfg = tmp_path / f"{name}.cfg"
        cfg.write_text("batch_num: 1\nbias_correction: false\nlearned_rounding: false\n" + body)  # nearest: simulated
        files = [str(tmp_path / f"{name}{f}") for f in (".json", "_mod.onnx", "_rec.txt")]
        amct.create_quant_config(files[0], str(path), config_defination=str(cfg))
        amct.quantize_model(files[0], str(path), files[1], files[2])
        amct.CalibrationSession(files[1]).run(None, {"input": x})
        amct.save_model(files[1], files[2], str(tmp_path / name))
        fake = ort_run(tmp_path / f"{name}_fake_quant_model.onnx", {"input": x})[0]
        deploy = ort_run(tmp_path / f"{name}_deploy_model.onnx", {"input": x})[0]
        assert np.abs(fake - deploy).max() < 0.02 * np.abs(fake).max()
        errors[name] = float(((fake - want) ** 2).mean())
        rec = read_record(files[2])
        first = next(iter(rec))
        assert bool(rec[first].dmq_factor) == (name == "dmq") and not rec[list(rec)[1]].dmq_factor
        assert load_config(files[0]).layers[first].dmq_balancer_param == (0.5 if name == "dmq" else None)
    s = np.asarray(rec[first].dmq_factor)
    assert s[:2].min() > 5 * np.median(s)  # the outlier channels are divided down most
    # independent simulation of the first layer: (X / s) quantized as the record says, (W * s) per output row
    r = rec[first]
    w = net[0].weight.detach().numpy() * s[None, :]
    sw = np.abs(w).max(axis=1, keepdims=True) / 127
    xq = (np.clip(np.round(x / s / r.scale_d) + r.offset_d, -128, 127) - r.offset_d) * r.scale_d
    b = np.round(net[0].bias.detach().numpy() / (sw[:, 0] * r.scale_d)) * sw[:, 0] * r.scale_d
    h = xq @ (np.round(w / sw) * sw).T + b
    np.testing.assert_allclose(np.asarray(r.scale_w), sw[:, 0], rtol=1e-6)
    sess_out = ort_run(tmp_path / "dmq_fake_quant_model.onnx", {"input": x})[0]
    # second layer: quantize ReLU(h) as the record says and run it in float: the fake-quant output follows
    r2 = rec[list(rec)[1]]
    hq = np.maximum(h, 0)
    hq = (np.clip(np.round(hq / r2.scale_d) + r2.offset_d, -128, 127) - r2.offset_d) * r2.scale_d
    w2 = net[2].weight.detach().numpy()
    sw2 = np.asarray(r2.scale_w)[:, None]
    out = hq @ (np.round(w2 / sw2) * sw2).T + np.round(net[2].bias.detach().numpy() / (sw2[:, 0] * r2.scale_d)) * \
        sw2[:, 0] * r2.scale_d
    np.testing.assert_allclose(sess_out, out, rtol=1e-3, atol=1e-3 * np.abs(out).max())
    assert errors["dmq"] < 0.5 * errors["plain"], errors


def test_learned_rounding_is_the_default_and_can_be_turned_off(tmp_path):
    """``learned_rounding`` (config.json global, on by default): ARQ layers get flip-descent rounding from the
    same calibration pass, exported as ``ada_flip`` (fake-quant weights == deploy weights == the codes);
    ``learned_rounding: false`` in the .cfg gives round-to-nearest everywhere."""
    import json

    net, x = _net_and_data()
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.tensor(x[:1]),), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    g = onnx.load(path).graph
    layers = {n.name: n for n in g.node if n.op_type in ("Conv", "Gemm", "MatMul")}
    weights = {name: (numpy_helper.to_array(next(t for t in g.initializer if t.name == n.input[1])),
                      0 if n.op_type == "Conv" or any(a.name == "transB" and a.i for a in n.attribute) else 1)
               for name, n in layers.items()}
    for tag, cfg_text in (("on", "batch_num: 2\n"), ("off", "batch_num: 2\nlearned_rounding: false\n")):
        cfg = tmp_path / f"{tag}.cfg"
        cfg.write_text(cfg_text)
        files = [str(tmp_path / f"{tag}{f}") for f in (".json", "_mod.onnx", "_rec.txt")]
        amct.create_quant_config(files[0], str(path), config_defination=str(cfg))
        assert json.loads(open(files[0]).read())["learned_rounding"] is (tag == "on")
        amct.quantize_model(files[0], str(path), files[1], files[2])
        sess = amct.CalibrationSession(files[1])
        for b in np.split(x, 2):
            sess.run(None, {"input": b})
        amct.save_model(files[1], files[2], str(tmp_path / tag))
        rec = read_record(files[2])
        fq = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"{tag}_fake_quant_model.onnx").graph.initializer}
        dp = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / f"{tag}_deploy_model.onnx").graph.initializer}
        for name, (w, axis) in weights.items():
            wp = weight_params(rec[name], 8, axis)
            codes = layer_weight_codes(w, rec[name], wp)
            assert bool(rec[name].ada_flip) == (codes != wp.quantize(w)).any() == (tag == "on"), (tag, name)
            np.testing.assert_array_equal(dp[f"{name}.weight_quantized"], codes.astype(np.int8))
            np.testing.assert_array_equal(fq[f"{name}.weight_fake_quant"], wp.dequantize(codes))


def test_learned_rounding_skips_layers_whose_descent_would_be_costly():
    """The default keeps round-to-nearest (and collects no input sample) where out * d * d > 2^27 or d > 2048,
    judged from the weight's shape before calibration; ``ada_quantize`` layers have no such limit."""
    from omct.algorithms.adaround import _cheap

    def spec(shape, op="Conv", axis=0):
        return LayerSpec("x", op, "i", "w", axis, weight_shape=shape)

    assert _cheap(spec((64, 64, 3, 3))) and _cheap(spec((960, 1, 3, 3))) and _cheap(spec((128, 1024), "MatMul", 1))
    assert not _cheap(spec((128, 128, 3, 3))) and not _cheap(spec((768, 768), "MatMul", 1))
    assert not _cheap(spec((4, 4096), "Gemm", 0))  # d over 2048 however few outputs


def _unfold(x, window):
    """Every im2col row of a conv input (torch's unfold: the independent reference), in (in, kh, kw) order."""
    (kh, kw), st, (pt, pl, pb, pr), dil = window.kernel, window.strides, window.pads, window.dilations
    xp = torch.tensor(np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr))))
    cols = F.unfold(xp, (kh, kw), dilation=dil, stride=st)
    return cols.permute(0, 2, 1).reshape(-1, cols.shape[1]).numpy().astype(np.float64)


@pytest.mark.parametrize("window", [Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)), Window((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
                                    Window((3, 2), (2, 1), (1, 0, 2, 1), (1, 2)), Window((1, 1), (1, 1), (0, 0, 0, 0), (1, 1)),
                                    Window((5, 5), (1, 1), (2, 2, 2, 2), (2, 2))], ids=str)
def test_patches_are_torch_unfold_rows(window):
    """The rows learned rounding gathers at the picked positions are exactly torch's im2col rows there (taps
    in the padding zero), whatever the stride, dilation and (asymmetric) padding."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 5, 11, 9)).astype(np.float32)
    every = _unfold(x, window).astype(np.float32)
    picks = np.sort(rng.choice(len(every), size=min(37, len(every)), replace=False))
    got = _patches(x, window, picks)
    np.testing.assert_array_equal(got, every[picks])
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_array_equal(_patches(x, window, np.arange(len(every))), every)


@pytest.mark.parametrize("groups", [1, 4])
def test_input_gram_is_x_transpose_x_of_the_rows(groups):
    """``InputGram`` (the default's learned rounding): with room for every row, its accumulated Gram matrix is
    numpy's X' X of torch's im2col rows over all batches (per group, the block that group's outputs read), its
    sums and nonzero counts too; both gathering paths (few and many positions) agree; with fewer rows per batch
    it holds that many rows of each batch and stays close to the full matrix; merging adds."""
    rng = np.random.default_rng(7)
    window = Window((3, 2), (2, 1), (1, 0, 1, 1), (1, 2))
    batches = [np.maximum(rng.normal(size=(3, 8, 9, 7)), 0).astype(np.float32) for _ in range(3)]
    rows = np.concatenate([_unfold(b, window) for b in batches])  # (N, 8 * 6)
    d = rows.shape[1] // groups
    full = InputGram(window, seed=1, groups=groups, rows_per_batch=10**6)
    for b in batches:
        full.update(b)
    assert full.n == len(rows) and full.gram.shape == (groups, d, d)
    for g in range(groups):
        x = rows[:, g * d:(g + 1) * d]
        np.testing.assert_allclose(full.gram[g], x.T @ x, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(full.sums[g], x.sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_array_equal(full.nonzero[g], (x != 0).sum(0))
    # a large batch: a draw of 40 of its rows
    big = np.maximum(rng.normal(size=(4, 8, 30, 30)), 0).astype(np.float32)
    part = InputGram(window, seed=2, groups=groups, rows_per_batch=40)
    part.update(big)
    every = _unfold(big, window)
    assert part.n == 40
    # the 40 rows taken are rows of the layer (each one of torch's rows: their sums and Gram come from them)
    member = InputGram(window, seed=2, groups=groups, rows_per_batch=10**6)
    member.update(big)
    assert np.all(part.nonzero <= member.nonzero) and np.all(np.diagonal(part.gram, axis1=1, axis2=2) <= np.diagonal(
        member.gram, axis1=1, axis2=2) + 1e-3)
    np.testing.assert_allclose(member.gram[0], every[:, :d].T @ every[:, :d], rtol=1e-5, atol=1e-3)
    many = InputGram(window, seed=2, groups=groups, rows_per_batch=2000)
    many.update(big)
    ref = member.gram / member.n
    assert np.linalg.norm(many.gram / many.n - ref) < 0.1 * np.linalg.norm(ref)
    again = InputGram(window, seed=2, groups=groups, rows_per_batch=40)
    again.update(big)
    np.testing.assert_array_equal(again.gram, part.gram)  # seeded: the same data gives the same moments
    part.merge(full)
    np.testing.assert_allclose(part.gram, again.gram + full.gram)
    assert part.n == 40 + len(rows)
    dense = InputGram(None, seed=3)
    seq = rng.normal(size=(2, 5, 6)).astype(np.float32)
    dense.update(seq)
    flat = seq.reshape(-1, 6).astype(np.float64)
    np.testing.assert_allclose(dense.gram[0], flat.T @ flat, rtol=1e-5, atol=1e-5)


def _gram_reference(stat: InputGram, batches, rows_of) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The float64 Gram blocks, column sums and nonzero counts of the rows ``stat`` draws from ``batches``
    (its own ``picks``; ``rows_of(batch)``: every row of the batch, from an independent im2col)."""
    g = stat.groups
    grams, sums, nonzero, n = 0.0, 0.0, 0, 0
    for b in batches:
        every = rows_of(b)
        take = len(every) if len(every) <= 2 * stat.rows_per_batch else stat.rows_per_batch
        picks = stat.picks(np.asarray(b, np.float32), len(every), take)
        x = (every if picks is None else every[picks]).reshape(take, g, -1).transpose(1, 0, 2)
        grams = grams + np.matmul(x.transpose(0, 2, 1), x)
        sums, nonzero, n = sums + x.sum(1), nonzero + (x != 0).sum(1), n + take
    return grams, sums, nonzero, n


@pytest.mark.parametrize("groups", [1, 4])
def test_input_gram_drawn_rows_match_a_float64_reference(groups):
    """Every path of ``InputGram.update`` (conv rows drawn from a large map, every row of a small one, drawn and
    every dense row; grouped too) accumulates the float64 X' X, sums and nonzero counts of the rows it draws
    (torch's im2col rows at its picks), with the layers' updates interleaved in one thread and spread over
    threads: the reused per-thread scratch buffers never leak one layer's rows into another's."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(11)
    window = Window((3, 3), (2, 1), (1, 1, 1, 1), (1, 1))
    relu = lambda *shape: np.maximum(rng.normal(size=shape), 0).astype(np.float32)  # noqa: E731
    cases = [  # (accumulator, batches, independent rows of a batch)
        (InputGram(window, seed=3, groups=groups, rows_per_batch=50), [relu(2, 8, 20, 13) for _ in range(3)],
         lambda b: _unfold(b, window)),  # 260 rows a batch: 50 drawn
        (InputGram(window, seed=4, groups=groups, rows_per_batch=50), [relu(1, 8, 9, 7) for _ in range(3)],
         lambda b: _unfold(b, window)),  # 35 rows: every one
        (InputGram(None, seed=5, groups=groups, rows_per_batch=30), [relu(4, 25, 16) for _ in range(3)],
         lambda b: b.reshape(-1, b.shape[-1]).astype(np.float64)),  # 100 dense rows: 30 drawn
        (InputGram(None, seed=6, groups=groups, rows_per_batch=30), [relu(2, 20, 16)[:, ::2] for _ in range(3)],
         lambda b: b.reshape(-1, b.shape[-1]).astype(np.float64)),  # 20 non-contiguous dense rows: every one
        (InputGram(None, seed=7, groups=groups, rows_per_batch=30), [relu(2, 20, 16) for _ in range(3)],
         lambda b: b.reshape(-1, b.shape[-1]).astype(np.float64)),  # 40 dense rows, the batch itself: every one
    ]
    kept = [[b.copy() for b in batches] for _, batches, _ in cases]

    def check(stats):
        for stat, (_, batches, rows_of) in zip(stats, cases, strict=True):
            grams, sums, nonzero, n = _gram_reference(stat, batches, rows_of)
            assert stat.n == n and stat.gram.dtype == np.float32
            np.testing.assert_allclose(stat.gram, grams, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(stat.sums, sums, rtol=1e-6, atol=1e-5)
            np.testing.assert_array_equal(stat.nonzero, nonzero)

    for batch in range(3):  # interleaved in one thread, as a single-threaded calibration feeds them
        for stat, batches, _ in cases:
            stat.update(batches[batch])
    check([c[0] for c in cases])
    for (_, batches, _), before in zip(cases, kept, strict=True):  # the batches are read, never written
        for b, k in zip(batches, before, strict=True):
            np.testing.assert_array_equal(b, k)
    fresh = [InputGram(s.window, s.seed, s.groups, s.rows_per_batch) for s, _, _ in cases]
    with ThreadPoolExecutor(4) as pool:  # each layer on its own thread, all at once
        list(pool.map(lambda i: [fresh[i].update(b) for b in cases[i][1]], range(len(cases))))
    check(fresh)
    for a, b in zip(fresh, cases, strict=True):
        np.testing.assert_array_equal(a.gram, b[0].gram)  # the same rows, the same products: bit for bit
    import omct.core.parallel as core_parallel

    assert core_parallel._SCRATCH  # the buffers the updates reused ...
    fresh[0].terms(np.ones((groups, 2, fresh[0].gram.shape[1]), np.float32))
    assert not core_parallel._SCRATCH  # ... are dropped once the moments are read: not in later peak memory


def test_patches_write_into_a_given_buffer():
    """``_patches`` with ``out``: the same rows (both gathering paths), in that buffer."""
    rng = np.random.default_rng(12)
    window = Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    x = rng.normal(size=(2, 4, 6, 5)).astype(np.float32)
    every = _unfold(x, window).astype(np.float32)
    for picks in (np.arange(len(every)), np.array([0, 7, 8, 31, 59])):
        out = np.full((len(picks), every.shape[1]), np.nan, np.float32)
        assert _patches(x, window, picks, out=out) is out
        np.testing.assert_array_equal(out, every[picks])


def test_gram_terms_are_the_sampled_rows_terms():
    """``InputGram.terms`` without input quantization equals ``output_error_terms`` on the same rows (centred
    and divided as given), exactly; with a quantization step it is the expectation of the quantized rows' terms:
    close to them on fine steps (the rows' own X' X plus the rounding noise on the nonzero values)."""
    rng = np.random.default_rng(8)
    x = np.maximum(rng.normal(size=(4000, 12)) + 0.3, 0).astype(np.float32)
    w = rng.normal(size=(1, 5, 12)).astype(np.float32)
    stat = InputGram(None, seed=0, rows_per_batch=10**6)
    stat.update(x)
    center, div = x.mean(0) * 0.9, rng.uniform(0.5, 2, 12).astype(np.float32)
    a, b = stat.terms(w, center, None, div)
    xc = (x / div - center)[None]
    ra, rb = output_error_terms(w, xc, xc)
    assert b is None and rb is None
    np.testing.assert_allclose(a, ra, rtol=1e-4, atol=1e-5)
    # quantized: B is small against the sampling noise of its rows' estimate, so many rows and a coarse step
    x = np.maximum(rng.normal(size=(200_000, 12)) + 0.3, 0).astype(np.float32)
    stat = InputGram(None, seed=0, rows_per_batch=10**6)
    stat.update(x)
    step = 0.25
    a, b = stat.terms(w, None, step)
    xq = (np.round(x / step) * step)[None]
    ra, rb = output_error_terms(w, x[None], xq)
    assert np.abs(a - ra).max() < 0.01 * np.abs(ra).max()
    assert np.abs(b - rb).max() < 0.3 * np.abs(rb).max(), (b, rb)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("centred", [False, True])
def test_learned_rounding_from_the_gram_beats_round_to_nearest(groups, centred):
    """The default's learned rounding fitted on ``InputGram`` (a bounded draw of each batch's rows, input quantized
    per tensor as the deployed layer reads it): the layer's output error on every input (torch's conv of the
    quantized input against the float conv; with bias correction after it when ``centred``) is lower than
    round-to-nearest's."""
    rng = np.random.default_rng(0)
    w, x = _conv_layer(rng, groups=groups)
    window = Window((3, 3), (1, 1), (1, 1, 1, 1), (1, 1))
    stat = InputGram(window, seed=1, groups=groups, rows_per_batch=256)
    for batch in np.split(x, 4):
        stat.update(batch)
    assert stat.n == 4 * 256
    params = arq(w, 8, 0)
    spec = LayerSpec("conv", "Conv", "x", "w", 0, groups=groups)
    step = float(x.max() - min(0.0, x.min())) / 255
    lo = np.round(min(0.0, x.min()) / step)
    xq = ((np.clip(np.round(x / step), lo, lo + 255)) * step).astype(np.float32)
    mean = x.mean((0, 2, 3)) if centred else None
    codes = learn_layer_from_gram(w, params, spec, stat, step, mean)
    nearest = params.quantize(w)
    v = np.floor(w / params.scale[:, None, None, None])
    assert np.all((codes == v) | (codes == v + 1)) and (codes != nearest).any()  # floor or ceil, never further
    ref = F.conv2d(torch.tensor(x), torch.tensor(w), padding=1, groups=groups)

    def out_mse(q, wq=None):
        wq = params.dequantize(q) if wq is None else wq
        shift = correction(w, wq, mean, 0, 1, groups).astype(np.float32) if centred else None
        got = F.conv2d(torch.tensor(xq), torch.tensor(wq), None if shift is None else torch.tensor(shift), padding=1,
                       groups=groups)
        return float(((got - ref) ** 2).mean())

    # of the error that weight rounding adds to the input quantization's (float weights on the quantized input),
    # the learned rounding removes at least a fifth
    floor = out_mse(None, w)
    assert out_mse(codes) - floor < 0.8 * (out_mse(nearest) - floor), (out_mse(codes), out_mse(nearest), floor)
