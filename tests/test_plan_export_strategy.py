"""Units with no model training: the plan's sites, the export builders' numerics, the search strategies and
the streaming error statistics, each against an independent computation."""

import math

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx_builders import conv_model

import omct.onnx as amct
from omct.analysis.metrics import ErrorStats
from omct.auto.strategy import BinarySearch, Greedy
from omct.core.params import QuantParams
from omct.formats.config import build_config
from omct.graph.export import DeployBuilder, FakeQuantBuilder
from omct.graph.plan import build_plan


def test_plan_shares_a_tensor_observed_twice_and_drops_outputs_that_feed_float_layers(rng):
    model = conv_model(rng)
    prepared = amct.prepare(model)
    config = build_config(prepared.layer_infos())
    plan = build_plan(prepared.layers, config)
    assert list(plan.layers) == ["conv"] and plan.sites[plan.input_site["conv"]].tensor == "x"
    assert plan.sites[plan.output_site["conv"]].tensor == "y"  # after the Relu
    off = build_plan(prepared.layers, build_config(prepared.layer_infos(), skip_layers=["conv"]))
    assert not off.layers and not off.sites


def _qdq_model(builder_cls, params, **kwargs):
    graph = onnx.helper.make_graph([], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [5])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [5])])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    model.ir_version = 8
    b = builder_cls(model, **kwargs)
    out = b.activation_qdq("x", params, "x")
    b.new_nodes[-1].output[0] = "y"
    b.names.discard(out)
    return b.finish()


# QuantizeLinear stores 8-bit codes: 4-bit activations are simulated in the fake-quant model only
@pytest.mark.parametrize("builder,kwargs,bits", [(FakeQuantBuilder, {}, 8), (FakeQuantBuilder, {}, 4), (DeployBuilder, {}, 8),
                                                 (DeployBuilder, {"unsigned_activations": False}, 8)])
def test_activation_quantization_matches_the_formula(builder, kwargs, bits):
    params = QuantParams(np.array(0.1, np.float32), np.array(-3, np.int32), bits)
    x = np.array([-100.0, -0.26, 0.0, 0.33, 100.0], np.float32)
    got = ort_run(_qdq_model(builder, params, **kwargs).SerializeToString(), {"x": x})[0]
    q = np.clip(np.round(x / 0.1) - 3, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # AMCT: clamp(round(x/s) + o)
    np.testing.assert_allclose(got, (q + 3) * np.float32(0.1), rtol=1e-6)


def _oracle(hard_count: int):
    """ok when at least the ``hard_count`` most sensitive layers are in float."""
    return lambda config: sum(config[f"l{i}"] for i in range(hard_count)) == hard_count


@pytest.mark.parametrize("n,hard", [(1, 1), (7, 0), (7, 3), (16, 16), (33, 5)])
def test_strategies_find_the_fewest_float_layers(n, hard):
    ranking = [(f"l{i}", float(n - i)) for i in range(n)]
    for strategy, bound in ((BinarySearch(), math.ceil(math.log2(n)) + 1 if n > 1 else 1), (Greedy(), n + 1)):
        strategy.initialize(ranking)
        ok = _oracle(hard)
        step = strategy.update_quant_config((hard == 0, 0.0))
        evaluations = 1
        while not step["stop_flag"]:
            step = strategy.update_quant_config((ok(step["roll_back_config"]), 0.0))
            evaluations += 1
        final = step["roll_back_config"]
        assert sum(final.values()) == hard and ok(final), type(strategy).__name__
        assert evaluations <= bound, (type(strategy).__name__, evaluations)


def test_error_stats_stream_equals_numpy_on_all_the_data(rng):
    ref = rng.normal(size=(5, 300))
    test = ref + rng.normal(size=ref.shape) * 0.1
    stats = ErrorStats()
    for r, t in zip(ref, test, strict=True):
        stats.update(r, t)
    r, t = ref.ravel(), test.ravel()
    assert stats.cosine == pytest.approx(r @ t / np.linalg.norm(r) / np.linalg.norm(t), rel=1e-12)
    assert stats.sqnr_db == pytest.approx(10 * np.log10((r @ r) / ((t - r) @ (t - r))), rel=1e-12)
    assert stats.mse == pytest.approx(np.mean((t - r) ** 2), rel=1e-12)
    assert stats.max_abs == pytest.approx(np.abs(t - r).max())


def test_analyze_reports_each_layers_input_scale_and_how_much_was_clipped(tmp_path, rng):
    """Against numpy: the fraction of the float input outside the recorded quantization range."""
    from conftest import run_flow

    from omct.analysis import analyze
    from omct.formats.record import read_record

    src = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), src)
    calib = [rng.normal(size=(4, 8, 6, 6)).astype(np.float32) for _ in range(2)]
    fake, _ = run_flow(src, tmp_path, calib, feed_name="x")
    test = [rng.standard_t(2, size=(4, 8, 6, 6)).astype(np.float32) * 2]  # heavier tails than the calibration data
    layer = analyze(src, fake, [{"x": x} for x in test]).layers[0]
    rec = read_record(tmp_path / "q_record.txt")["conv"]
    lo, hi = (-128 - rec.offset_d) * rec.scale_d, (127 - rec.offset_d) * rec.scale_d
    want = float(np.mean((test[0] < lo) | (test[0] > hi)))
    assert layer.input_scale == pytest.approx(rec.scale_d) and want > 0
    assert layer.clipped_fraction == pytest.approx(want)
    assert layer.row()["input_clipped_fraction"] == pytest.approx(want)
