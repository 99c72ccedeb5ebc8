"""Bad input: each case gives one clear error naming what is wrong, and leaves no half-written file."""

import os

import numpy as np
import onnx
import pytest
from conftest import run_flow
from onnx_builders import conv_model, linear_model

import omct.onnx as amct
from omct.errors import CalibrationError, ConfigError, ModelError, OmctError, RecordError


@pytest.fixture
def conv_file(tmp_path, rng):
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(rng), path)
    return path


def _x(rng, n=4):
    return rng.normal(size=(n, 8, 6, 6)).astype(np.float32)


def test_missing_corrupt_and_non_onnx_model(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(tmp_path / "nope.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xff\xff\xff")
    with pytest.raises(ModelError, match="bad.onnx"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(bad))
    txt = tmp_path / "notes.onnx"
    txt.write_text("this is not a model")
    with pytest.raises(ModelError, match="notes.onnx"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(txt))
    assert not (tmp_path / "c.json").exists()


def test_unknown_skip_layer_lists_close_names(conv_file, tmp_path):
    with pytest.raises(ConfigError, match=r"skip_layers names 'conv1'.*did you mean 'conv'"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(conv_file), skip_layers=["conv1"])


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2"])
def test_batch_num_must_be_positive_integer(conv_file, tmp_path, bad):
    with pytest.raises(ConfigError, match="batch_num"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(conv_file), batch_num=bad)


def test_save_model_before_batch_num_names_counts_and_layers(conv_file, tmp_path, rng):
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(conv_file), batch_num=3)
    amct.quantize_model(str(cfg), str(conv_file), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    sess.run(None, {"x": _x(rng)})
    with pytest.raises(RecordError, match=r"ran 1 of batch_num=3 batches \(layers conv\).*2 more"):
        amct.save_model(str(mod), str(rec), str(tmp_path / "out" / "q"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_nan_in_calibration_names_the_layer(conv_file, tmp_path, rng):
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(conv_file), batch_num=1)
    amct.quantize_model(str(cfg), str(conv_file), str(mod), str(rec))
    x = _x(rng)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"'x' \(conv\).*NaN or Inf.*skip_layers"):
        amct.CalibrationSession(str(mod)).run(None, {"x": x})


def test_all_zero_activations_give_valid_model(conv_file, tmp_path):
    zeros = np.zeros((4, 8, 6, 6), np.float32)
    fake, deploy = run_flow(conv_file, tmp_path, [zeros, zeros], feed_name="x")
    from conftest import ort_run

    for p in (fake, deploy):
        out = ort_run(p, {"x": zeros})[0]
        assert np.isfinite(out).all()


def test_record_from_another_model_is_refused(tmp_path, rng):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(conv_model(rng, cout=8), a)
    onnx.save(conv_model(rng, cout=16), b)
    run_flow(a, tmp_path, [_x(rng)], feed_name="x", prefix="qa")
    cfg, mod, rec = tmp_path / "cb.json", tmp_path / "mb.onnx", tmp_path / "rb.txt"
    amct.create_quant_config(str(cfg), str(b))
    amct.quantize_model(str(cfg), str(b), str(mod), str(rec))
    with pytest.raises(RecordError, match=r"'conv' has 8 weight scales but its weight has 16"):
        amct.save_model(str(mod), str(tmp_path / "qa_record.txt"), str(tmp_path / "qb"))
    g = tmp_path / "g.onnx"
    onnx.save(linear_model(rng), g)
    amct.create_quant_config(str(cfg), str(g))
    amct.quantize_model(str(cfg), str(g), str(mod), str(rec))
    with pytest.raises(RecordError, match="no factors for 1 layer"):
        amct.save_model(str(mod), str(tmp_path / "qa_record.txt"), str(tmp_path / "qg"))


def test_save_path_folder_is_created_and_unwritable_folder_fails(conv_file, tmp_path, rng):
    fake, deploy = run_flow(conv_file, tmp_path, [_x(rng)], feed_name="x")
    import shutil

    nested = tmp_path / "new" / "deeper"
    amct.save_model(str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt"), str(nested / "model"))
    assert (nested / "model_deploy_model.onnx").exists()
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(OmctError, match="cannot create folder"):
        amct.save_model(str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt"), str(blocker / "sub" / "m"))
    if os.geteuid() == 0:
        pytest.skip("running as root: permission bits do not stop writes; the check above still ran")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OmctError, match="cannot write"):
            amct.save_model(str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt"), str(locked / "m"))
    finally:
        locked.chmod(0o700)
        shutil.rmtree(locked)


def test_unwritable_target_leaves_nothing_half_written(conv_file, tmp_path, rng, monkeypatch):
    run_flow(conv_file, tmp_path, [_x(rng)], feed_name="x")
    out = tmp_path / "out"
    out.mkdir()
    import omct.graph.model_io as mio

    real = mio.onnx.save_model

    def failing(*args, **kwargs):
        real(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mio.onnx, "save_model", failing)
    with pytest.raises(ModelError, match="No space left"):
        amct.save_model(str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt"), str(out / "m"))
    assert list(out.iterdir()) == []


def test_config_errors_name_key_and_layer(conv_file, tmp_path):
    import json

    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(conv_file))
    data = json.loads(cfg.read_text())
    data["conv"]["activation_quant_params"]["act_algo"] = "magic"
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"layer 'conv': activation_quant_params.act_algo"):
        amct.quantize_model(str(cfg), str(conv_file), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"))
    data["conv"]["activation_quant_params"]["act_algo"] = "ifmr"
    data["conv"]["weight_quant_params"]["num_bits"] = 9
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"layer 'conv': weight_quant_params.num_bits"):
        amct.quantize_model(str(cfg), str(conv_file), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"))
    cfg.write_text(json.dumps({"batch_num": 0}))
    with pytest.raises(ConfigError, match="batch_num"):
        amct.quantize_model(str(cfg), str(conv_file), str(tmp_path / "m.onnx"), str(tmp_path / "r.txt"))
    assert not (tmp_path / "m.onnx").exists()


def test_bias_overflow_is_an_error_not_a_wrap(tmp_path, rng):
    model = conv_model(rng)
    for t in model.graph.initializer:
        if t.name == "b":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full(8, 3e9, np.float32), "b"))
        if t.name == "w":
            t.CopyFrom(onnx.numpy_helper.from_array(np.full((8, 8, 3, 3), 1e-4, np.float32), "w"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(OmctError, match=r"layer 'conv': INT32 bias overflow.*skip_layers"):
        run_flow(path, tmp_path, [np.full((2, 8, 6, 6), 1e-3, np.float32)], feed_name="x")
