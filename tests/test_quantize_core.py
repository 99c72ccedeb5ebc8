"""The in-memory core (omct.quantize) against the AMCT file-based call sequence, and its pieces: statistics
requested as points and collected once, and trials that re-plan without recalibrating."""

import numpy as np
import onnx
import pytest
from conftest import ort_run, run_flow
from onnx_builders import conv_model, linear_model

import omct.onnx as amct
from omct.algorithms.statistics import Statistics, StatPoint
from omct.errors import CalibrationError
from omct.formats.config import build_config
from omct.formats.record import read_record


def _config(model, **kwargs):
    return build_config(amct.prepare(model).layer_infos(), **kwargs)


@pytest.mark.parametrize("builder", [lambda rng: conv_model(rng, relu6=True), lambda rng: linear_model(rng, "Gemm")])
def test_in_memory_quantize_equals_the_file_flow(builder, tmp_path, rng):
    model = builder(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    shape = [d.dim_value or 4 for d in model.graph.input[0].type.tensor_type.shape.dim]
    batches = [rng.normal(size=shape).astype(np.float32) * 2 for _ in range(3)]
    fake_file, deploy_file = run_flow(path, tmp_path, batches, feed_name="x")

    result = amct.quantize(model, _config(model, batch_num=3), [{"x": b} for b in batches])
    records = read_record(tmp_path / "q_record.txt")
    assert set(result.records) == set(records)
    for name, rec in records.items():
        assert result.records[name] == rec
    x = rng.normal(size=shape).astype(np.float32)
    for in_memory, saved in ((result.fake_quant_model(), fake_file), (result.deploy_model(), deploy_file)):
        np.testing.assert_array_equal(ort_run(in_memory.SerializeToString(), {"x": x})[0], ort_run(saved, {"x": x})[0])


def test_with_float_layers_equals_a_skip_layers_run(tmp_path, rng):
    model = conv_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    batches = [rng.normal(size=(2, 8, 6, 6)).astype(np.float32) for _ in range(2)]
    result = amct.quantize(model, _config(model, batch_num=2), [{"x": b} for b in batches])
    trial = result.with_float_layers(["conv"])
    assert trial.all_float and not result.all_float
    x = batches[0]
    np.testing.assert_array_equal(ort_run(trial.fake_quant_model().SerializeToString(), {"x": x})[0], ort_run(path, {"x": x})[0])
    # the trial shares the calibration: its records are the full run's
    assert trial.records is result.records


def test_too_few_batches_for_the_in_memory_core_is_one_clear_error(rng):
    model = conv_model(rng)
    with pytest.raises(CalibrationError, match=r"gave 1 of batch_num=3 batches"):
        amct.quantize(model, _config(model, batch_num=3), [{"x": rng.normal(size=(1, 8, 6, 6)).astype(np.float32)}])


class _Sum:
    def __init__(self):
        self.total, self.calls = 0.0, 0

    def update(self, values):
        if not np.all(np.isfinite(values)):
            raise ValueError("NaN")
        self.total += float(np.sum(values))
        self.calls += 1


def test_statistics_share_equal_points_and_feed_each_once():
    made = []

    def make():
        made.append(_Sum())
        return made[-1]

    a, b, c = StatPoint("t", ("sum",), make), StatPoint("t", ("sum",), make), StatPoint("u", ("sum",), make)
    stats = Statistics([a, b, c])
    assert len(made) == 2 and stats[a] is stats[b] and stats.tensors() == ["t", "u"]
    stats.observe({"t": np.ones(3), "u": np.full(2, 2.0), "ignored": np.ones(9)}, lambda t, e: RuntimeError(t))
    assert (stats[a].total, stats[a].calls, stats[c].total) == (3.0, 1, 4.0)
    with pytest.raises(RuntimeError, match="^u$"):
        stats.observe({"t": np.ones(3), "u": np.array([np.nan])}, lambda t, e: RuntimeError(t))


def test_models_too_large_to_serialise_are_calibrated_from_a_file(monkeypatch, rng):
    """Past protobuf's 2 GiB the modified model cannot be handed to ONNX Runtime as bytes: it goes through a file."""
    import omct.graph.model_io as mio

    model = conv_model(rng)
    batches = [{"x": rng.normal(size=(2, 8, 6, 6)).astype(np.float32)}]
    small = amct.quantize(model, _config(model), batches)
    written = []
    save = mio.save_model
    monkeypatch.setattr(mio, "EXTERNAL_DATA_THRESHOLD", 100)  # this model's weights "exceed" protobuf's limit
    monkeypatch.setattr(mio, "save_model", lambda m, path, *a: written.append(path) or save(m, path, *a))
    large = amct.quantize(model, _config(model), batches)
    assert written and large.records == small.records
