"""Non-uniform quantization of weights: level selection against independent references, AMCT's .cfg, the
record, and both exported models (packed deploy file, integer kernels, fake-quant agreement)."""

import itertools
import json
import logging

import numpy as np
import onnx
import pytest
from conftest import assert_integer_kernels, optimized_ops, ort_run
from onnx import numpy_helper

from omct.core import nuq
from omct.core.weights import arq
from omct.errors import ConfigError, RecordError

AMCT_CFG = """activation_offset : true
batch_num : 1
nuq_config {
    mapping_file : "./src/nuq_conf/resnet-101_quantized.json"
    nuq_quantize : { num_steps : %d num_of_iteration : 1 }
}
"""


def _cost(values, weights, levels):
    levels = np.sort(np.asarray(levels, np.float64))
    return float((weights * np.min((values[:, None] - levels[None, :]) ** 2, axis=1)).sum())


def test_levels_are_the_brute_force_optimum_on_small_supports(rng):
    for _ in range(60):
        n = int(rng.integers(4, 11))
        values = np.sort(rng.choice(np.arange(-8, 9), n, replace=False))
        weights = rng.random(n) * (rng.random(n) > 0.2)
        k = int(rng.integers(1, 5))
        levels = nuq.select_levels(values, weights, k)
        assert len(levels) <= k and np.all(np.diff(levels) > 0)
        best = min(_cost(values, weights, c) for c in itertools.combinations(range(-8, 9), k))
        assert _cost(values, weights, levels) == pytest.approx(best, abs=1e-9)


def test_allocation_against_brute_force(rng):
    """nuq.allocate: within the budget; its greedy prefix is optimal for its own cost (no choice of options costing
    at most as much has a smaller total error, checked over every choice); filling only lowers the error."""
    for _ in range(200):
        layers = int(rng.integers(1, 5))
        costs = [list(rng.integers(1, 30, int(rng.integers(1, 5))).astype(float)) for _ in range(layers)]
        errors = [list(rng.random(len(c))) for c in costs]
        budget = float(rng.integers(1, 100))
        every = [(sum(costs[n][i] for n, i in enumerate(ch)), sum(errors[n][i] for n, i in enumerate(ch)))
                 for ch in itertools.product(*[range(len(c)) for c in costs])]
        cheapest = min(c for c, _ in every)
        for fill in (False, True):
            picked = nuq.allocate(costs, errors, budget, fill=fill)
            cost = sum(costs[n][i] for n, i in enumerate(picked))
            err = sum(errors[n][i] for n, i in enumerate(picked))
            assert cost <= max(budget, cheapest) + 1e-9
            if not fill:
                prefix_err = err
                assert err <= min(e for c, e in every if c <= cost + 1e-9) + 1e-9
            else:
                assert err <= prefix_err + 1e-12
        assert nuq.allocate(costs, errors, budget) == nuq.allocate(costs, errors, budget)  # deterministic


def test_stored_table_bytes_counts_distinct_rows(rng):
    """Each distinct row once plus a byte per channel when that is smaller, else every row; packed indices first."""
    rows = rng.integers(-128, 128, (5, 16))
    shared = rows[rng.integers(0, 5, 200)]  # 200 channels on at most 5 tables
    distinct = len(np.unique(shared, axis=0))
    assert nuq.stored_table_bytes(200 * 64, shared) == 4 * 200 * 64 // 8 + 16 * distinct + 200
    own = rng.integers(-128, 128, (3, 16))  # 3 channels: sharing would not be smaller
    assert nuq.stored_table_bytes(3 * 50, own) == 4 * -(-150 // 8) + 3 * 16


def _lloyd_max(values, weights, k, seed):
    """Independent reference: weighted Lloyd-Max (k-means) with integer centres from a random start."""
    r = np.random.default_rng(seed)
    centres = np.sort(r.choice(values, k, replace=False)).astype(np.float64)
    for _ in range(100):
        assign = np.argmin((values[:, None] - centres[None, :]) ** 2, axis=1)
        new = np.array([np.round((weights[assign == j] * values[assign == j]).sum() / weights[assign == j].sum())
                        if weights[assign == j].sum() > 0 else centres[j] for j in range(k)])
        if np.array_equal(new, centres):
            break
        centres = new
    return centres


@pytest.mark.parametrize("k", [16, 32])
def test_levels_beat_lloyd_max_on_int8_weight_histograms(rng, k):
    w = rng.standard_t(4, size=20000)
    codes = np.clip(np.round(w / np.abs(w).max() * 127), -128, 127)
    values, counts = np.unique(codes, return_counts=True)
    weights = counts * rng.uniform(0.5, 1.5, counts.size)
    ours = _cost(values, weights, nuq.select_levels(values, weights, k))
    lloyd = min(_cost(values, weights, _lloyd_max(values, weights, k, s)) for s in range(5))
    assert ours <= lloyd + 1e-9
    assert ours < 0.2 * _cost(values, weights, np.linspace(-127, 127, k).round())  # far better than uniform levels


def test_fit_keeps_each_channels_weighted_norm(rng):
    """Least-squares levels shrink a channel; fit's final scales give it back its importance-weighted norm."""
    w = rng.laplace(size=(8, 16, 3, 3)).astype(np.float32)
    importance = rng.uniform(0.1, 5.0, 16)
    scale, levels = nuq.fit(w, arq(w, 8, 0).scale, 0, 1, 16, 1, importance)
    q = nuq.to_levels(w, scale, 0, levels).astype(np.float64) * np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    imp = importance.reshape(1, -1, 1, 1)
    float_norm, quant_norm = (imp * w.astype(np.float64) ** 2).sum((1, 2, 3)), (imp * q**2).sum((1, 2, 3))
    np.testing.assert_allclose(quant_norm, float_norm, rtol=0.01)
    # least squares alone would leave it shorter: the plain refit of the same levels
    codes = q / np.asarray(scale, np.float64).reshape(-1, 1, 1, 1)
    ls = (imp * w * codes).sum((1, 2, 3)) / (imp * codes**2).sum((1, 2, 3))
    assert np.all((imp * (ls.reshape(-1, 1, 1, 1) * codes) ** 2).sum((1, 2, 3)) < float_norm)


def test_fit_is_deterministic_weighted_and_refined(rng):
    w = rng.normal(size=(16, 32, 3, 3)).astype(np.float32) * rng.uniform(0.2, 1, (16, 1, 1, 1)).astype(np.float32)
    importance = np.r_[np.full(16, 10.0), np.full(16, 0.01)]
    scale = arq(w, 8, 0).scale
    s1, l1 = nuq.fit(w, scale, 0, 1, 16, 2, importance)
    s2, l2 = nuq.fit(w, scale, 0, 1, 16, 2, importance)
    assert np.array_equal(s1, s2) and np.array_equal(l1, l2)
    assert l1.shape == (16, 16) and l1.min() >= -128 and l1.max() <= 127 and np.all(np.diff(l1, axis=1) >= 0)
    # levels chosen for the channels that matter beat levels chosen as if all channels mattered equally
    _, plain = nuq.fit(w, scale, 0, 1, 16, 0, None)
    _, weighted = nuq.fit(w, scale, 0, 1, 16, 0, importance)
    assert nuq.weighted_error(w, scale, 0, 1, weighted, importance) < nuq.weighted_error(w, scale, 0, 1, plain, importance)
    # refinement never makes it worse, and every weight lands on a level
    s0, l0 = nuq.fit(w, scale, 0, 1, 16, 0, importance)
    assert nuq.weighted_error(w, s1, 0, 1, l1, importance) <= nuq.weighted_error(w, s0, 0, 1, l0, importance)
    codes = nuq.to_levels(w, s1, 0, l1)
    assert all(set(np.unique(codes[c])) <= set(l1[c].tolist()) for c in range(16))
    # one table per channel (what fit does) beats the best single table shared by the layer's channels
    _, own = nuq.fit(w, scale, 0, 1, 16, 0)
    codes = np.clip(np.round(w.reshape(16, -1) / scale[:, None]), -128, 127)
    values, inverse = np.unique(codes, return_inverse=True)
    elem = np.broadcast_to(scale[:, None].astype(np.float64) ** 2, codes.shape).reshape(-1)
    shared = nuq.select_levels(values, np.bincount(inverse.reshape(-1), weights=elem), 16)
    assert nuq.weighted_error(w, scale, 0, 1, own) < 0.8 * nuq.weighted_error(w, scale, 0, 1, np.tile(shared, (16, 1)))
    # per tensor: one scale, one table
    s_t, l_t = nuq.fit(w, arq(w, 8, None).scale, None, 1, 32)
    assert s_t.shape == () and l_t.shape == (1, 32)
    with pytest.raises(ValueError, match="num_steps must be one of 16, 32, 64, 128"):
        nuq.fit(w, scale, 0, 1, 20)


@pytest.mark.parametrize("steps", nuq.ALLOWED_STEPS)
def test_packed_indices_round_trip(rng, steps):
    idx = rng.integers(0, steps, size=1001)
    bits = nuq.index_bits(steps)
    planes = nuq.pack_indices(idx, bits)
    assert planes.shape == (bits, 126) and np.array_equal(nuq.unpack_indices(planes, idx.size), idx)


# ---- config, record -------------------------------------------------------------------------------------


def _conv_stack(tmp_path, depthwise=False, width=64, blocks=3):
    import torch
    from torch import nn
    from zoo import export_onnx

    torch.manual_seed(0)
    layers = [nn.Conv2d(3, width, 3, padding=1), nn.ReLU()]
    for _ in range(blocks):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU()]
    if depthwise:  # dilated: NUQ cannot take it (grouped convolutions it takes, an omct extension)
        layers += [nn.Conv2d(width, width, 3, padding=2, dilation=2, groups=width), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10)]
    model = nn.Sequential(*layers).eval()
    path = tmp_path / "convs.onnx"
    export_onnx(model, np.zeros((1, 3, 12, 12), np.float32), path)
    return path


@pytest.fixture
def omct_log():
    from omct.ui import logger

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler, level = Keep(logging.INFO), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_amct_nuq_cfg_works_unchanged(tmp_path, omct_log):
    import omct.onnx as amct

    model = _conv_stack(tmp_path, depthwise=True)
    cfg = tmp_path / "nuq.cfg"
    cfg.write_text(AMCT_CFG % 32)
    amct.create_quant_config(str(tmp_path / "c.json"), str(model), config_defination=str(cfg))
    config = json.loads((tmp_path / "c.json").read_text())
    algos = {k: v["weight_quant_params"]["wts_algo"] for k, v in config.items()
             if isinstance(v, dict) and "weight_quant_params" in v}
    depthwise = [k for k, v in algos.items() if v != "nuq_quantize"]
    assert len(depthwise) == 1 and sum(v == "nuq_quantize" for v in algos.values()) == 5, algos
    nuq_layer = next(v for k, v in config.items() if isinstance(v, dict) and k not in depthwise and "weight_quant_params" in v)
    assert nuq_layer["weight_quant_params"]["num_steps"] == 32 and nuq_layer["weight_quant_params"]["num_of_iteration"] == 1
    log = "\n".join(omct_log)
    assert "mapping_file './src/nuq_conf/resnet-101_quantized.json' ignored" in log
    assert f"layer '{depthwise[0]}' keeps uniform weights: NUQ cannot take it (dilations [2, 2]" in log


def test_mapping_file_restricts_nuq(tmp_path):
    import omct.onnx as amct

    model = _conv_stack(tmp_path)
    names = [n.name for n in onnx.load(model).graph.node if n.op_type == "Conv"]
    def op(name, flag):
        return {"name": name, "type": "Conv2D", "attr": [{"key": "fe_weight_compress", "value": {"b": flag}}]}

    fusion = {"graph": [{"op": [op(names[1], True), op(names[2], False)]}]}
    (tmp_path / "fusion.json").write_text(json.dumps(fusion))
    cfg = tmp_path / "nuq.cfg"
    cfg.write_text(AMCT_CFG.replace("./src/nuq_conf/resnet-101_quantized.json", "fusion.json") % 16)
    amct.create_quant_config(str(tmp_path / "c.json"), str(model), config_defination=str(cfg))
    config = json.loads((tmp_path / "c.json").read_text())
    got = [k for k, v in config.items()
           if isinstance(v, dict) and v.get("weight_quant_params", {}).get("wts_algo") == "nuq_quantize"]
    assert got == [names[1]]


@pytest.mark.parametrize("text, message", [
    (AMCT_CFG % 20, "num_steps: Input should be 16, 32, 64 or 128 (got 20)"),
    (AMCT_CFG % 8, "num_steps: Input should be 16, 32, 64 or 128 (got 8)"),
    ("nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 11 } }",
     "num_of_iteration: Input should be less than or equal to 10"),
    ('override_layer_configs { layer_name: "DW" calibration_config { nuq_quantize { num_steps: 16 } } }',
     "asks nuq_quantize for layer 'DW', which NUQ cannot take: dilations [2, 2]; NUQ takes dilation 1 only"),
    ("common_config { nuq_quantize { num_steps: 16 quant_bits: 4 } }", "nuq_quantize keeps levels of the INT8 grid"),
])
def test_bad_nuq_settings_fail_in_one_line(tmp_path, text, message):
    import omct.onnx as amct

    model = _conv_stack(tmp_path, depthwise=True)
    dw = _depthwise(model)
    cfg = tmp_path / "bad.cfg"
    cfg.write_text(text.replace('"DW"', f'"{dw}"'))
    with pytest.raises(ConfigError) as e:
        amct.create_quant_config(str(tmp_path / "c.json"), str(model), config_defination=str(cfg))
    assert message.replace("'DW'", f"'{dw}'") in str(e.value) and "\n" not in str(e.value)


def test_config_json_asking_nuq_for_a_layer_it_cannot_take(tmp_path):
    import omct.onnx as amct

    model = _conv_stack(tmp_path, depthwise=True)
    amct.create_quant_config(str(tmp_path / "c.json"), str(model))
    config = json.loads((tmp_path / "c.json").read_text())
    dw = _depthwise(model)
    config[dw]["weight_quant_params"].update(wts_algo="nuq_quantize", num_steps=16)
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=f"layer '{dw}' \\(Conv\\) asks wts_algo nuq_quantize, which it cannot take: "
                                          "dilations \\[2, 2\\]"):
        amct.quantize_model(str(tmp_path / "c.json"), str(model), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"))
    config[dw]["weight_quant_params"].update(num_steps=48)
    (tmp_path / "c.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_steps: Input should be 16, 32, 64 or 128"):
        amct.quantize_model(str(tmp_path / "c.json"), str(model), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"))


def test_record_keeps_the_levels(tmp_path):
    from google.protobuf import text_format

    from omct.formats import record
    from omct.formats.proto import ScaleOffsetRecord

    recs = {"conv": record.LayerRecord(0.1, -3, [0.5, 0.25], [0, 0], 0.2, -128, [0.01, 0.02], [-100, -7, 0, 9, 9, 120])}
    path = tmp_path / "r.txt"
    record.write_record(path, recs)
    msg = text_format.Parse(path.read_text(), ScaleOffsetRecord())
    assert list(msg.record[0].value.nuq_levels) == [-100, -7, 0, 9, 9, 120]
    record._last_written = None  # parse the file, not the cache
    assert record.read_record(path)["conv"].nuq_levels == [-100, -7, 0, 9, 9, 120]
    for old, new in (("nuq_levels: 0", "nuq_levels: 300"), ("nuq_levels: 0", "nuq_levels: -8"),
                     ("nuq_levels: 120", "nuq_levels: 120\n    nuq_levels: 121")):
        path.write_text(record.record_text(recs).replace(old, new))
        with pytest.raises(RecordError, match="layer 'conv' has nuq_levels that are not one sorted table"):
            record.read_record(path)


# ---- export ----------------------------------------------------------------------------------------------


def _depthwise(model):
    return next(n.name for n in onnx.load(model).graph.node
                if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))


def _quantize(tmp_path, model, steps, x, prefix="q"):
    import omct.onnx as amct

    cfg = tmp_path / f"{prefix}.cfg"
    cfg.write_text(AMCT_CFG % steps)
    amct.create_quant_config(str(tmp_path / f"{prefix}.json"), str(model), config_defination=str(cfg))
    amct.quantize_model(str(tmp_path / f"{prefix}.json"), str(model), str(tmp_path / f"{prefix}_mod.onnx"),
                        str(tmp_path / f"{prefix}_rec.txt"))
    amct.CalibrationSession(str(tmp_path / f"{prefix}_mod.onnx")).run(None, {"input": x})
    return amct.save_model(str(tmp_path / f"{prefix}_mod.onnx"), str(tmp_path / f"{prefix}_rec.txt"), str(tmp_path / prefix))


def test_deploy_stores_packed_indices_and_runs_integer_kernels(tmp_path, rng):
    from omct.formats.record import read_record

    model = _conv_stack(tmp_path, width=128, blocks=3)
    x = rng.normal(size=(8, 3, 12, 12)).astype(np.float32)
    fake, deploy = _quantize(tmp_path, model, 16, x)
    out_fake, out_deploy = ort_run(fake, {"input": x})[0], ort_run(deploy, {"input": x})[0]
    # integer kernels round once per layer where the simulation rounds in float: a flip here and there
    np.testing.assert_allclose(out_deploy, out_fake, atol=0.01 * np.abs(out_fake).max())
    size = deploy.stat().st_size / model.stat().st_size
    assert size <= 0.15, size
    # stored: no INT8 or float weight tensor, only bit planes; folded at load: integer kernels remain
    inits = onnx.load(deploy).graph.initializer
    stored = [t.name for t in inits if len(t.dims) >= 2 and t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.FLOAT)
              and not t.name.endswith(".weight_levels")]
    records = read_record(tmp_path / "q_rec.txt")
    # INT8 only for layers the allocation kept uniform (the record has no levels), stored under the layer's name
    kept = [n for n, r in records.items() if not r.nuq_levels]
    assert all(any(t.startswith(n) for n in kept) for t in stored), (stored, kept)
    assert len(kept) < len(records)
    ops = optimized_ops(deploy, tmp_path)
    assert ops.count("QLinearConv") == 4 and "QGemm" in ops and "BitShift" not in ops and "Gather" not in ops
    assert_integer_kernels(deploy, tmp_path)
    # what ONNX Runtime folded from the packed indices is exactly the fake-quant model's integer weight
    opt = onnx.load(tmp_path / "optimized.onnx")
    folded = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    int8_weights = [folded[n.input[3]] for n in opt.graph.node if n.op_type == "QLinearConv"]
    # the fake-quant weights lie on each layer's levels, scaled per channel
    fq = onnx.load(fake)
    weights = {t.name: numpy_helper.to_array(t) for t in fq.graph.initializer}
    for node in fq.graph.node:
        if node.op_type == "Conv" and records[node.name].nuq_levels:
            rec = records[node.name]
            codes = weights[node.input[1]] / np.asarray(rec.scale_w, np.float32)[:, None, None, None]
            table = np.array(rec.nuq_levels).reshape(codes.shape[0], 1, 1, 1, 16)  # one row of 16 per channel
            assert np.abs(codes[..., None] - table).min(-1).max() < 1e-3
            assert any(w.shape == codes.shape and np.array_equal(w, np.round(codes)) for w in int8_weights), node.name


def test_nuq_32_is_closer_to_float_than_nuq_16(tmp_path, rng):
    model = _conv_stack(tmp_path, width=32, blocks=2)
    x = rng.normal(size=(8, 3, 12, 12)).astype(np.float32)
    ref = ort_run(model, {"input": x})[0]
    errors = {}
    for steps in (16, 32, 128):
        fake, _ = _quantize(tmp_path, model, steps, x, prefix=f"q{steps}")
        errors[steps] = float(np.mean((ort_run(fake, {"input": x})[0] - ref) ** 2))
    assert errors[128] < errors[32] < errors[16], errors


# ---- automatic NUQ ---------------------------------------------------------------------------------------


class SqnrEvaluator:
    """Logit SQNR (dB) against the float model, an evaluator whose verdicts this test can predict."""

    def __init__(self, x, ref, threshold, bad=None):
        self.x, self.ref, self.threshold, self.bad, self.calls = x, ref, threshold, bad, []

    def eval_model(self, model_file, weights_file, batch_num):
        import onnxruntime as ort

        self.calls.append(model_file)
        out = ort.InferenceSession(model_file).run(None, {"input": self.x})[0]
        if self.bad is not None and len(self.calls) > 2:
            return self.bad
        err = float(np.mean((out - self.ref) ** 2) / np.mean(self.ref ** 2))
        return -10 * np.log10(max(err, 1e-20))

    def is_satisfied(self, original_metric, new_metric):
        return new_metric >= self.threshold


def _auto_setup(tmp_path, rng):
    from omct.auto import AutoNuqEvaluatorBase

    model = _conv_stack(tmp_path, width=32, blocks=3)
    x = rng.normal(size=(16, 3, 12, 12)).astype(np.float32)
    ref = ort_run(model, {"input": x})[0]
    (tmp_path / "n.cfg").write_text("nuq_config { nuq_quantize { num_steps: 16 } }\n")
    import omct.onnx as amct

    amct.create_quant_config(str(tmp_path / "c.json"), str(model), config_defination=str(tmp_path / "n.cfg"))
    AutoNuqEvaluatorBase.register(SqnrEvaluator)
    return model, x, ref


def test_auto_nuq_finds_the_smallest_satisfying_file_within_the_bound(tmp_path, rng):
    import omct.onnx as amct

    model, x, ref = _auto_setup(tmp_path, rng)
    # between all-NUQ-16 (about 62.5 dB here) and all-uniform INT8 (about 69 dB): the search has to mix
    evaluator = SqnrEvaluator(x, ref, 64.0)
    result = amct.auto_nuq(str(model), evaluator, str(tmp_path / "c.json"), str(tmp_path / "rec.txt"), str(tmp_path / "out"))
    assert len(evaluator.calls) == result.evaluations <= result.bound == 2 * 3 + 4
    record = json.loads((tmp_path / "out" / "nuq_search_record.json").read_text())
    satisfied = [t for t in record["trials"] if t["satisfied"]]
    assert not record["trials"][0]["satisfied"] and record["trials"][1]["trial"] == "all uniform INT8"
    assert result.weight_bytes == min(t["weight_bytes"] for t in satisfied) < record["trials"][1]["weight_bytes"]
    assert result.metric >= 64.0 and len(set(result.steps.values())) > 1  # a mix: NUQ-16 everywhere fails
    # the written models are the chosen configuration: its fake-quant model scores what the search measured
    fake = tmp_path / "out" / "convs_fake_quant_model.onnx"
    assert SqnrEvaluator(x, ref, 0).eval_model(str(fake), None, 1) == pytest.approx(result.metric, abs=1e-3)
    final = json.loads((tmp_path / "out" / "final_config.json").read_text())
    assert sum(v["weight_quant_params"]["wts_algo"] == "nuq_quantize" for v in final.values()
               if isinstance(v, dict) and "weight_quant_params" in v) == sum(k is not None for k in result.steps.values())
    assert (tmp_path / "rec.txt").exists() and not (tmp_path / "out" / "nuq_work").exists()


@pytest.mark.parametrize("bad, message", [("0.9", "must return one number"), (float("nan"), "returned nan"),
                                          (None, "even uniform INT8 weights on every layer do not satisfy")])
def test_auto_nuq_bad_evaluators_fail_and_write_nothing(tmp_path, rng, bad, message):
    import omct.onnx as amct
    from omct.errors import OmctError

    model, x, ref = _auto_setup(tmp_path, rng)
    evaluator = SqnrEvaluator(x, ref, 150.0 if bad is None else 0.0, bad)
    with pytest.raises(OmctError, match=message):
        amct.auto_nuq(str(model), evaluator, str(tmp_path / "c.json"), str(tmp_path / "rec.txt"), str(tmp_path / "out"))
    assert not (tmp_path / "rec.txt").exists() and sorted(p.name for p in (tmp_path / "out").iterdir()) == []


def test_auto_nuq_refuses_an_evaluator_that_rejects_the_original(tmp_path, rng):
    import omct.onnx as amct
    from omct.errors import OmctError

    model, x, ref = _auto_setup(tmp_path, rng)
    evaluator = SqnrEvaluator(x, ref, 1e9)
    with pytest.raises(OmctError, match=r"is_satisfied\(200.0, 200.0\) returned False"):
        amct.auto_nuq(str(model), evaluator, str(tmp_path / "c.json"), str(tmp_path / "rec.txt"), str(tmp_path / "out"))
    assert len(evaluator.calls) == 1


def test_pytorch_auto_nuq(tmp_path):
    import torch
    from torch import nn

    import omct.pytorch as amct

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 64, 10)).eval()
    x = torch.randn(16, 3, 8, 8)
    with torch.no_grad():
        ref = model(x)

    class Evaluator(amct.AutoNuqEvaluatorBase):
        calls = 0

        def eval_model(self, model_file, weights_file, batch_num):
            Evaluator.calls += 1
            with torch.no_grad():
                out = model_file(x)
            return float(torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0))

        def is_satisfied(self, original_metric, new_metric):
            return original_metric - new_metric < 1e-3

    (tmp_path / "n.cfg").write_text("nuq_config { nuq_quantize { num_steps: 32 } }\n")
    amct.create_quant_config(str(tmp_path / "c.json"), model, x[:1], config_defination=str(tmp_path / "n.cfg"))
    result = amct.auto_nuq(model, Evaluator(), str(tmp_path / "c.json"), str(tmp_path / "rec.txt"), str(tmp_path / "out"), x[:1])
    assert set(result.steps) == {"0", "2", "4", "7"}  # the depthwise conv too (an omct extension)
    assert Evaluator.calls == result.evaluations <= 2 * 2 + 4 and result.metric > 0.999 - 1e-9
    assert (tmp_path / "out" / "model_deploy_model.onnx").exists()


# ---- command line ----------------------------------------------------------------------------------------


def test_cli_quantize_nuq_steps_and_inspect(tmp_path, rng):
    import os
    import subprocess
    import sys

    model = _conv_stack(tmp_path, depthwise=True, width=32, blocks=1)
    np.savez(tmp_path / "c.npz", input=rng.normal(size=(16, 3, 12, 12)).astype(np.float32))
    env = dict(os.environ, OMCT_QUIET="0")
    run = lambda *a: subprocess.run([sys.executable, "-m", "omct", *map(str, a)], capture_output=True, text=True,  # noqa: E731
                                    timeout=300, env=env)
    res = run("quantize", model, "--calib", tmp_path / "c.npz", "--batch-size", 8, "--out", tmp_path / "q", "--nuq-steps", 16)
    assert res.returncode == 0, res.stderr
    dw = _depthwise(model)
    assert f"layer '{dw}' keeps uniform weights: NUQ cannot take it (dilations [2, 2]; NUQ takes dilation 1 only)" in res.stderr
    assert "--nuq-steps 16: 3 of 4 weighted layers take NUQ" in res.stderr and "NUQ-16 weights:" in res.stderr
    config = json.loads((tmp_path / "q_work" / "config.json").read_text())
    assert config[dw]["weight_quant_params"]["wts_algo"] == "arq_quantize"
    assert sum(v.get("weight_quant_params", {}).get("num_steps") == 16 for v in config.values() if isinstance(v, dict)) == 3
    assert_integer_kernels(tmp_path / "q_deploy_model.onnx", tmp_path)
    res = run("quantize", model, "--calib", tmp_path / "c.npz", "--out", tmp_path / "r", "--nuq-steps", 20)
    assert res.returncode == 2 and "invalid choice: 20" in res.stderr
    res = run("inspect", model)
    assert res.returncode == 0 and "(3 can take NUQ)" in res.stdout
    rows = [line.split("\t") for line in res.stdout.splitlines() if "\t" in line]
    assert [dw, "Conv"] == rows[[r[0] for r in rows].index(dw)][:2]
    assert rows[[r[0] for r in rows].index(dw)][-1] == "no: dilations [2, 2]; NUQ takes dilation 1 only"


def test_matmul_weight_with_channels_last_and_small_layers_kept_uniform(tmp_path, rng, omct_log):
    """A 2-D MatMul weight (in, out) has its channels last; a layer with too few weights per channel for its
    tables to pay keeps uniform INT8 weights."""
    from onnx import TensorProto, helper

    from omct.formats.record import read_record

    w1 = rng.normal(size=(64, 48)).astype(np.float32)
    w2 = rng.normal(size=(48, 10)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")], "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = tmp_path / "mm.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    x = rng.normal(size=(64, 64)).astype(np.float32)
    for steps in (16, 32):
        fake, deploy = _quantize(tmp_path, model, steps, x, prefix=f"mm{steps}")
        np.testing.assert_allclose(ort_run(deploy, {"input": x})[0], ort_run(fake, {"input": x})[0],
                                   atol=0.01 * np.abs(ort_run(fake, {"input": x})[0]).max())
        assert_integer_kernels(deploy, tmp_path)
        records = read_record(tmp_path / f"mm{steps}_rec.txt")
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(fake).graph.initializer}
        # 64 and 48 weights per channel: NUQ-16 pays for both (> 32); NUQ-32 for mm1, whose 48 channels share 16
        # tables, not for mm2, whose 10 channels (fewer than 16) have one table each and would need > 85; at NUQ-16
        # the allocation may still give mm2 INT8 with the bytes mm1 saves (on the uniform grid, one table row)
        assert records["mm1"].nuq_levels and (steps == 16 or records["mm2"].nuq_levels == [])
        assert nuq.worthwhile(w2.T.shape, 0, 16, 16) and not nuq.worthwhile(w2.T.shape, 0, 32, 16)
        if steps == 16:
            rec = records["mm1"]
            codes = weights[next(n.input[1] for n in onnx.load(fake).graph.node if n.name == "mm1")] / np.asarray(rec.scale_w)
            table = np.array(rec.nuq_levels).reshape(48, steps).T  # rows per output channel, here the last axis
            assert np.abs(codes[:, None, :] - table[None]).min(1).max() < 1e-3
    assert "layer 'mm2' keeps uniform INT8 weights: with 48 weights per output channel, NUQ-32 level tables" in \
        "\n".join(omct_log)
