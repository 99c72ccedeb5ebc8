"""The user's files are never lost: no output may resolve to an input (symlinks, '..', hard links), a broken
model fails in one line naming the node, tensor or file, and save_model writes its pair all-or-nothing."""

import os

import numpy as np
import onnx
import pytest
from conftest import run_flow
from onnx import TensorProto
from onnx_builders import conv_model

import omct.onnx as amct
from omct import fileio
from omct.auto import AutoCalibrationEvaluatorBase
from omct.cli import main as cli
from omct.errors import ModelError, OutputPathError


def _x(rng, n=4):
    return rng.normal(size=(n, 8, 6, 6)).astype(np.float32)


@pytest.fixture
def model(tmp_path, rng):
    path = tmp_path / "model.onnx"
    onnx.save(conv_model(rng), path)
    return path


def refused(call, *args, match, keep=(), **kwargs):
    """``call`` raises a one-line OutputPathError matching ``match`` and every file in ``keep`` keeps its bytes."""
    before = {p: p.read_bytes() for p in keep}
    with pytest.raises(OutputPathError, match=match) as e:
        call(*args, **kwargs)
    assert "\n" not in str(e.value)
    assert {p: p.read_bytes() for p in keep} == before
    return e.value


# --- the shared check -------------------------------------------------------------------------------------


def test_same_file_sees_through_symlinks_dotdot_and_hard_links(tmp_path, monkeypatch):
    a = tmp_path / "a.onnx"
    a.write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    os.symlink(a, tmp_path / "link.onnx")
    os.link(a, tmp_path / "hard.onnx")
    assert fileio.same_file(a, tmp_path / "link.onnx")
    assert fileio.same_file(a, tmp_path / "sub" / ".." / "a.onnx")
    assert fileio.same_file(a, tmp_path / "hard.onnx")
    assert not fileio.same_file(a, tmp_path / "b.onnx")
    assert fileio.same_file(tmp_path / "new" / "x.json", tmp_path / "new" / ".." / "new" / "x.json")  # neither exists
    assert not fileio.same_file(tmp_path / "X.json", tmp_path / "x.json")
    monkeypatch.setattr(fileio, "_case_insensitive", lambda folder: True)  # macOS / Windows
    assert fileio.same_file(tmp_path / "X.json", tmp_path / "x.json")


def test_check_outputs_names_both_paths_and_arguments(tmp_path):
    a = tmp_path / "a.onnx"
    a.write_bytes(b"x")
    with pytest.raises(OutputPathError, match=rf"^config_file '{tmp_path}/sub/../a.onnx' is the input model_file "
                                              rf"'{a}'; choose another path$"):
        fileio.check_outputs({"model_file": a}, {"config_file": tmp_path / "sub" / ".." / "a.onnx"})
    with pytest.raises(OutputPathError, match=r"record_file '.*r.txt' is also modified_onnx_file '.*r.txt'"):
        fileio.check_outputs({"model_file": a}, {"modified_onnx_file": tmp_path / "r.txt", "record_file": tmp_path / "r.txt"})
    fileio.check_outputs({"model_file": a, "config_defination": None}, {"config_file": tmp_path / "c.json"})


# --- ONNX API ---------------------------------------------------------------------------------------------


def test_create_quant_config_never_overwrites_the_model(model, tmp_path, rng):
    refused(amct.create_quant_config, str(model), str(model), match=r"config_file '.*model.onnx' is the input model_file",
            keep=[model])
    os.symlink(model, tmp_path / "link.json")
    refused(amct.create_quant_config, str(tmp_path / "link.json"), str(model), match="is the input model_file", keep=[model])
    os.link(model, tmp_path / "hard.json")
    refused(amct.create_quant_config, str(tmp_path / "hard.json"), str(model), match="is the input model_file", keep=[model])
    unnamed = tmp_path / "unnamed.onnx"
    m = conv_model(rng)
    m.graph.node[0].name = ""  # renamed, so updated_model is written
    onnx.save(m, unnamed)
    refused(amct.create_quant_config, str(tmp_path / "c.json"), str(unnamed),
            updated_model=str(tmp_path / "x" / ".." / unnamed.name),
            match=r"updated_model '.*unnamed.onnx' is the input model_file", keep=[unnamed])
    cfg = tmp_path / "my.cfg"
    cfg.write_text("batch_num: 2\n")
    refused(amct.create_quant_config, str(cfg), str(model), config_defination=str(cfg),
            match="config_file '.*my.cfg' is the input config_defination", keep=[cfg])
    refused(amct.create_quant_config, str(tmp_path / "c.json"), str(unnamed), updated_model=str(tmp_path / "c.json"),
            match="updated_model '.*c.json' is also config_file")
    assert not (tmp_path / "c.json").exists()


def test_quantize_model_never_overwrites_model_or_config(model, tmp_path):
    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(model))
    keep = [model, cfg]
    refused(amct.quantize_model, str(cfg), str(model), str(model), str(tmp_path / "r.txt"),
            match="modified_onnx_file '.*model.onnx' is the input model_file", keep=keep)
    refused(amct.quantize_model, str(cfg), str(model), str(tmp_path / "m.onnx"), str(model),
            match="record_file '.*model.onnx' is the input model_file", keep=keep)
    refused(amct.quantize_model, str(cfg), str(model), str(tmp_path / "m.onnx"), str(cfg),
            match="record_file '.*c.json' is the input config_file", keep=keep)
    refused(amct.quantize_model, str(cfg), str(model), str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx"),
            match="record_file '.*m.onnx' is also modified_onnx_file", keep=keep)
    # the modified model's external-data file (written when it is large) must not be the model either
    data_named = tmp_path / "w.onnx.data"
    data_named.write_bytes(model.read_bytes())
    refused(amct.quantize_model, str(cfg), str(data_named), str(tmp_path / "w.onnx"), str(tmp_path / "r.txt"),
            match=r"modified_onnx_file's external data file '.*w.onnx.data' is the input model_file", keep=[data_named])
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "r.txt").exists()


def test_quantize_model_never_overwrites_the_models_external_data(tmp_path, rng):
    path = tmp_path / "big.onnx"
    onnx.save_model(conv_model(rng), path, save_as_external_data=True, all_tensors_to_one_file=True,
                    location="weights.bin", size_threshold=0)
    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(path))
    refused(amct.quantize_model, str(cfg), str(path), str(tmp_path / "m.onnx"), str(tmp_path / "weights.bin"),
            match=r"record_file '.*weights.bin' is the input model_file's external data file '.*weights.bin'",
            keep=[tmp_path / "weights.bin"])


def test_input_files_of_a_big_model_list_its_external_data_not_itself(tmp_path, rng):
    """A model file from ``PEEK_LAZY_BYTES`` on is read without its embedded weights' bytes: its external data file
    is still listed (an output must not overwrite it), and the lazy reader's references into the model file
    itself are not."""
    from onnx import external_data_helper, numpy_helper

    from omct.graph import model_io

    model = conv_model(rng)
    model.graph.initializer.append(numpy_helper.from_array(rng.normal(size=(model_io.PEEK_LAZY_BYTES // 4 + 1,))
                                                           .astype(np.float32), "big_embedded"))
    ext = numpy_helper.from_array(np.arange(64, dtype=np.float32), "small_external")
    (tmp_path / "side.bin").write_bytes(ext.raw_data)
    external_data_helper.set_external_data(ext, "side.bin", 0, len(ext.raw_data))
    ext.ClearField("raw_data")
    ext.data_location = TensorProto.EXTERNAL
    model.graph.initializer.append(ext)
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    assert path.stat().st_size >= model_io.PEEK_LAZY_BYTES
    files = model_io.input_files("model_file", path)
    assert sorted(os.path.realpath(f) for f in files.values()) == sorted(
        os.path.realpath(f) for f in (path, tmp_path / "side.bin"))


def test_save_model_never_overwrites_model_record_or_modified(tmp_path, rng):
    # the original model sits where save_path's fake-quant model would go
    original = tmp_path / "q_fake_quant_model.onnx"
    onnx.save(conv_model(rng), original)
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(original))
    amct.quantize_model(str(cfg), str(original), str(mod), str(rec))
    amct.CalibrationSession(str(mod)).run(None, {"x": _x(rng)})
    keep = [original, mod, rec]
    refused(amct.save_model, str(mod), str(rec), str(tmp_path / "q"),
            match=r"save_path's fake-quant model '.*q_fake_quant_model.onnx' is the input original model_file", keep=keep)
    assert not (tmp_path / "q_deploy_model.onnx").exists()
    # the record (or the modified model) where an output would go
    for name in ("s_deploy_model.onnx", "s_fake_quant_model.onnx"):
        (tmp_path / name).write_bytes(rec.read_bytes())
        refused(amct.save_model, str(mod), str(tmp_path / name), str(tmp_path / "s"),
                match=rf"save_path's .* model '.*{name}' is the input record_file", keep=[tmp_path / name])
        (tmp_path / name).unlink()
    os.link(mod, tmp_path / "t_deploy_model.onnx")
    refused(amct.save_model, str(mod), str(rec), str(tmp_path / "t"),
            match=r"save_path's deploy model '.*t_deploy_model.onnx' is the input modified_onnx_file", keep=keep)
    assert not (tmp_path / "t_fake_quant_model.onnx").exists()


class _Untouched(AutoCalibrationEvaluatorBase):
    """An evaluator the refused calls must never reach."""

    def calibration(self, model):
        raise AssertionError("calibration ran")

    def evaluate(self, model):
        raise AssertionError("evaluate ran")


def test_auto_calibration_never_overwrites_its_inputs(model, tmp_path):
    save_dir = tmp_path / "auto"
    (save_dir / "work").mkdir(parents=True)
    cfg = save_dir / "final_config.json"  # last run's result, reused as this run's config
    amct.create_quant_config(str(cfg), str(model))
    refused(amct.accuracy_based_auto_calibration, str(model), _Untouched(), str(cfg), str(tmp_path / "r.txt"), str(save_dir),
            match=r"save_dir's final_config.json '.*final_config.json' is the input config_file", keep=[cfg, model])
    inner = save_dir / "work" / "modified.onnx"
    inner.write_bytes(model.read_bytes())
    refused(amct.accuracy_based_auto_calibration, str(inner), _Untouched(), str(tmp_path / "c.json"), str(tmp_path / "r.txt"),
            str(save_dir), match=r"save_dir's work/modified.onnx '.*' is the input model_file", keep=[inner])
    refused(amct.accuracy_based_auto_calibration, str(model), _Untouched(), str(tmp_path / "c.json"), str(model), str(save_dir),
            match=r"record_file '.*model.onnx' is the input model_file", keep=[model])


# --- PyTorch API ------------------------------------------------------------------------------------------


def test_pytorch_entries_never_overwrite_their_inputs(tmp_path):
    import torch
    from torch import nn

    import omct.pytorch as tamct

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    cfg = tmp_path / "c.cfg"
    cfg.write_text("batch_num: 1\n")
    refused(tamct.create_quant_config, str(cfg), net, x, config_defination=str(cfg),
            match="config_file '.*c.cfg' is the input config_defination", keep=[cfg])
    config = tmp_path / "c.json"
    tamct.create_quant_config(str(config), net, x)
    refused(tamct.quantize_model, str(config), str(config), str(tmp_path / "r.txt"), net, x,
            match="modified_onnx_model '.*c.json' is the input config_file", keep=[config])
    refused(tamct.quantize_model, str(config), str(tmp_path / "m.onnx"), str(config), net, x,
            match="record_file '.*c.json' is the input config_file", keep=[config])
    final = tmp_path / "final_config.json"
    final.write_bytes(config.read_bytes())
    refused(tamct.accuracy_based_auto_calibration, net, _Untouched(), str(final), str(tmp_path / "r.txt"), str(tmp_path), x,
            match="save_dir's final_config.json '.*' is the input config_file", keep=[final])
    mod = tmp_path / "m.onnx"
    tamct.quantize_model(str(config), str(mod), str(tmp_path / "r.txt"), net, x)(x)
    (tmp_path / "p_fake_quant_model.onnx").write_bytes(b"results of last week")
    os.replace(tmp_path / "r.txt", tmp_path / "p_deploy_model.onnx")
    refused(tamct.save_model, str(mod), str(tmp_path / "p_deploy_model.onnx"), str(tmp_path / "p"),
            match="save_path's deploy model '.*p_deploy_model.onnx' is the input record_file",
            keep=[tmp_path / "p_fake_quant_model.onnx", tmp_path / "p_deploy_model.onnx"])


# --- command line -----------------------------------------------------------------------------------------


def test_cli_quantize_and_analyze_never_overwrite_their_inputs(tmp_path, rng, capsys):
    model = tmp_path / "q_fake_quant_model.onnx"
    onnx.save(conv_model(rng), model)
    data = tmp_path / "calib.npz"
    np.savez(data, x=_x(rng, 8))
    before = model.read_bytes()
    assert cli(["quantize", str(model), "--calib", str(data), "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--out's fake-quant model" in err and "is the input model" in err, err
    assert model.read_bytes() == before and not (tmp_path / "q_work").exists()
    assert cli(["analyze", str(model), str(model), "--data", str(data), "--report", str(data)]) == 1
    assert "--report" in capsys.readouterr().err and data.exists()
    assert cli(["analyze", str(model), str(model), "--data", str(data), "--json", str(model)]) == 1
    assert "--json" in capsys.readouterr().err and model.read_bytes() == before


# --- broken models: one line, not a raw onnx exception ----------------------------------------------------


def _one_line(call, match):
    with pytest.raises(ModelError, match=match) as e:
        call()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_dangling_tensor_names_node_and_tensor(tmp_path, rng):
    m = conv_model(rng)
    m.graph.node[1].input[0] = "ghost"  # Relu 'act' reads a tensor nothing produces
    path = tmp_path / "broken.onnx"
    onnx.save(m, path)
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)),
              r"broken.onnx': node 'act' \(Relu\) reads tensor 'ghost', which no node")
    m = conv_model(rng)
    m.graph.output[0].name = "nowhere"
    onnx.save(m, path)
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)), r"graph output 'nowhere' is produced by no")
    assert not (tmp_path / "c.json").exists()


def _external(tmp_path, rng, folder="sub"):
    """A conv model in ``tmp_path/folder`` with its tensors in ``m.data`` beside it."""
    (tmp_path / folder).mkdir(exist_ok=True)
    path = tmp_path / folder / "m.onnx"
    onnx.save_model(conv_model(rng), path, save_as_external_data=True, all_tensors_to_one_file=True, location="m.data",
                    size_threshold=0)
    return path


def _set_location(path, location):
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
    onnx.save(m, path)


def test_external_data_that_loads_still_loads(tmp_path, rng):
    path = _external(tmp_path, rng)
    amct.create_quant_config(str(tmp_path / "c.json"), str(path))
    assert (tmp_path / "c.json").exists()


def test_missing_external_data_names_file_and_tensor(tmp_path, rng):
    path = _external(tmp_path, rng)
    (tmp_path / "sub" / "m.data").unlink()
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)),
              r"tensor 'w' keeps its data in '.*sub/m.data', which is missing")


def test_truncated_external_data_is_one_line(tmp_path, rng):
    path = _external(tmp_path, rng)
    data = tmp_path / "sub" / "m.data"
    data.write_bytes(data.read_bytes()[:100])
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)),
              r"tensor 'w' needs bytes 0..\d+ of .*has 100")


def test_external_data_outside_the_model_folder_is_refused(tmp_path, rng):
    path = _external(tmp_path, rng)
    os.replace(tmp_path / "sub" / "m.data", tmp_path / "secret.bin")
    _set_location(path, "../secret.bin")
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)),
              r"tensor 'w' reads its data from '../secret.bin', outside the model's folder .*refused")
    _set_location(path, str(tmp_path / "secret.bin"))  # absolute
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)), r"outside the model's folder")
    os.symlink(tmp_path / "secret.bin", tmp_path / "sub" / "link.bin")  # a link inside pointing outside
    _set_location(path, "link.bin")
    _one_line(lambda: amct.create_quant_config(str(tmp_path / "c.json"), str(path)), r"'link.bin', outside the model's folder")


# --- save_model is all-or-nothing -------------------------------------------------------------------------


@pytest.fixture
def calibrated(model, tmp_path, rng):
    run_flow(model, tmp_path, [_x(rng)], feed_name="x")
    return str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt")


def _fail_on_call(monkeypatch, module, name, n, error=OSError(28, "No space left on device")):
    """Make ``module.name`` raise ``error`` on its ``n``-th call (counting from 1)."""
    real, calls = getattr(module, name), []

    def wrapper(*args, **kwargs):
        calls.append(args)
        if len(calls) == n:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


@pytest.mark.parametrize("previous", [False, True])
def test_failed_second_write_leaves_no_output_and_the_previous_pair(calibrated, tmp_path, monkeypatch, previous):
    import omct.graph.model_io as mio

    out = tmp_path / "out"
    out.mkdir()
    pair = [out / "m_fake_quant_model.onnx", out / "m_deploy_model.onnx"]
    if previous:
        for p in pair:
            p.write_bytes(b"the previous result: " + p.name.encode())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_call(monkeypatch, mio.onnx, "save_model", 2)  # the deploy model fails after the fake-quant one was written
    with pytest.raises(ModelError, match="No space left"):
        amct.save_model(*calibrated, str(out / "m"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.mark.parametrize("previous", [False, True])
def test_failed_rename_restores_the_previous_pair(calibrated, tmp_path, monkeypatch, previous):
    import omct.graph.model_io as mio

    out = tmp_path / "out"
    out.mkdir()
    deploy = out / "m_deploy_model.onnx"
    if previous:
        for name in ("m_fake_quant_model.onnx", "m_deploy_model.onnx"):
            (out / name).write_bytes(b"the previous result: " + name.encode())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, failed = mio.os.replace, []

    def replace(src, dst):  # the new deploy model cannot be renamed into place (after the fake-quant one was)
        if os.fspath(dst) == os.fspath(deploy) and not failed:
            failed.append(src)
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(ModelError, match="Input/output error"):
        amct.save_model(*calibrated, str(out / "m"))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_save_models_with_external_data_is_all_or_nothing(tmp_path, rng, monkeypatch):
    import omct.graph.model_io as mio

    pair = [(conv_model(rng), tmp_path / "a.onnx"), (conv_model(rng), tmp_path / "b.onnx")]
    written = mio.save_models(pair, external_threshold=0)
    assert sorted(p.name for p in written) == ["a.onnx", "a.onnx.data", "b.onnx", "b.onnx.data"]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert mio.load_model(tmp_path / "b.onnx").graph.initializer[0].raw_data
    _fail_on_call(monkeypatch, mio.onnx, "save_model", 2)
    with pytest.raises(ModelError, match=r"cannot write '.*b.onnx': No space left"):
        mio.save_models([(conv_model(rng), tmp_path / "a.onnx"), (conv_model(rng), tmp_path / "b.onnx")], external_threshold=0)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_previous_file_that_cannot_be_put_back_is_kept_and_named(calibrated, tmp_path, monkeypatch):
    import omct.graph.model_io as mio

    out = tmp_path / "out"
    out.mkdir()
    fake, deploy = out / "m_fake_quant_model.onnx", out / "m_deploy_model.onnx"
    for p in (fake, deploy):
        p.write_bytes(b"the previous result")
    real = mio.os.replace

    def replace(src, dst):  # the new deploy model cannot be renamed into place, and the old fake cannot go back
        if os.fspath(dst) == os.fspath(deploy) and ".previous." not in os.fspath(src) or \
                (os.fspath(dst) == os.fspath(fake) and ".previous." in os.fspath(src)):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(ModelError, match=r"Input/output error; the previous '.*m_fake_quant_model.onnx' is kept as '(.*)'") as e:
        amct.save_model(*calibrated, str(out / "m"))
    kept = str(e.value).rsplit("'", 2)[-2]
    assert open(kept, "rb").read() == b"the previous result" and deploy.read_bytes() == b"the previous result"


def test_a_folder_where_an_output_goes_is_left_alone(calibrated, tmp_path):
    folder = tmp_path / "m_deploy_model.onnx"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ModelError, match="is a folder"):
        amct.save_model(*calibrated, str(tmp_path / "m"))
    assert (folder / "notes.txt").read_text() == "mine" and not (tmp_path / "m_fake_quant_model.onnx").exists()


@pytest.mark.parametrize("previous", [False, True])
def test_a_model_written_alone_replaces_atomically_and_leaves_nothing_beside_it(tmp_path, rng, monkeypatch, previous):
    """A model that needs no data file is staged as a hidden file beside its target (no temporary folder): it gets
    the mode a plain open gives, nothing else stays in the folder, and a failed write or rename leaves the folder
    exactly as it was."""
    import omct.graph.model_io as mio

    target = tmp_path / "m.onnx"
    if previous:
        target.write_bytes(b"the previous model")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    _fail_on_call(monkeypatch, mio.onnx, "save_model", 1)  # the write itself fails
    with pytest.raises(ModelError, match="No space left"):
        mio.save_model(conv_model(rng), target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    real = mio.os.replace

    def replace(src, dst):  # the new model cannot be renamed into place (the previous one can be put back)
        if os.fspath(dst) == os.fspath(target) and ".previous." not in os.fspath(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(mio.os, "replace", replace)
    with pytest.raises(ModelError, match="Input/output error"):
        mio.save_model(conv_model(rng), target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    monkeypatch.undo()

    model = conv_model(rng)
    assert mio.save_model(model, target) == [target]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]
    assert target.read_bytes() == model.SerializeToString()
    plain = tmp_path / "plain"
    plain.write_bytes(b"")  # the mode a plain open gives here (0666 less the umask)
    assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_atomic_writes_get_the_mode_a_plain_open_gives_and_leave_no_temporary(model, tmp_path):
    """The config, record and both saved models are written through a temporary file beside the target: each ends
    with the permissions ``open`` would give it (not mkstemp's 0600), and nothing else is left in the folder."""
    import stat

    from omct.graph.model_io import save_models

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    want = stat.S_IMODE(plain.stat().st_mode)
    fileio.atomic_write_text(tmp_path / "a.txt", "hello")
    save_models([(onnx.load(model), tmp_path / "m1.onnx"), (onnx.load(model), tmp_path / "m2.onnx")])
    for name in ("a.txt", "m1.onnx", "m2.onnx"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == want, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "m1.onnx", "m2.onnx", "model.onnx", "plain.txt"]
    assert (tmp_path / "a.txt").read_text() == "hello"
