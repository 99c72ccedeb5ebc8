"""What a new user trips over in the first hour (issue 11): each mistake ends in one line naming the culprit and
what to do, through the ``omct`` command in a subprocess or through the public API."""

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx_builders import conv_model

import omct.onnx as amct
from omct.errors import DataError
from omct.graph.ops import HANDLERS


def omct(*args, cwd=None, columns=None):
    env = dict(os.environ, OMCT_QUIET="0")  # the notices are what is tested
    env.pop("COLUMNS", None)
    if columns:
        env["COLUMNS"] = str(columns)
    return subprocess.run([sys.executable, "-m", "omct", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def one_line(res, *needles):
    """Exit code 1, no traceback, a single error line (after any one-line warnings) containing every needle."""
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1, (res.returncode, res.stdout, res.stderr)
    assert "Traceback" not in res.stderr and all(line.startswith("omct: ") for line in lines), res.stderr
    errors = [line for line in lines if line.startswith("omct: error: ")]
    assert len(errors) == 1 and errors[0] == lines[-1], res.stderr
    err = errors[0]
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.fixture
def conv(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    return path


def _fixed_batch(model_path, out, batch=1):
    model = onnx.load(model_path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.ClearField("dim_param")
    dim.dim_value = batch
    onnx.save(model, out)
    return out


def test_fixed_batch_dimension_sets_the_default_batch_size(conv, tmp_path, rng):
    fixed = _fixed_batch(conv, tmp_path / "fixed.onnx")
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(6, 8, 6, 6)).astype(np.float32))
    res = omct("quantize", fixed, "--calib", tmp_path / "c.npz", "--out", tmp_path / "q", "--batch-num", 3)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "q_deploy_model.onnx").is_file()
    res = omct("quantize", fixed, "--calib", tmp_path / "c.npz", "--out", tmp_path / "q2", "--batch-size", 4)
    one_line(res, "fixed at 1", "--batch-size 4")
    res = omct("analyze", fixed, tmp_path / "q_fake_quant_model.onnx", "--data", tmp_path / "c.npz", "--quiet")
    assert res.returncode == 0, res.stderr


def test_wrong_arrays_are_named_before_onnx_runtime_runs(conv, tmp_path, rng):
    x = rng.normal(size=(8, 8, 6, 6))
    np.savez(tmp_path / "f64.npz", x=x)
    res = omct("quantize", conv, "--calib", tmp_path / "f64.npz", "--out", tmp_path / "q", "--batch-size", 4)
    assert res.returncode == 0, res.stderr
    assert "float64; cast to float32" in res.stderr
    cases = {"u8": (x * 10).astype(np.uint8), "rank": x[:, 0].astype(np.float32), "size": x[:, :4].astype(np.float32)}
    expect = {"u8": "got uint8 [4, 8, 6, 6]", "rank": "expects 4 dimensions", "size": "dimension 1 is 4, not 8"}
    for name, arr in cases.items():
        np.savez(tmp_path / f"{name}.npz", x=arr)
        res = omct("quantize", conv, "--calib", tmp_path / f"{name}.npz", "--out", tmp_path / name, "--batch-size", 4)
        one_line(res, "input 'x'", "float32 [N, 8, 6, 6]", expect[name])
        assert not (tmp_path / f"{name}_work").exists()


def test_calibration_session_names_the_input_of_a_wrong_feed(conv, tmp_path, rng):
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "mod.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(conv), batch_num=1)
    amct.quantize_model(str(cfg), str(conv), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    x = rng.normal(size=(2, 8, 6, 6)).astype(np.float32)
    with pytest.raises(DataError, match=r"input 'x' expects float32 \[N, 8, 6, 6\], got float32 \[2, 8, 5, 6\]"):
        sess.run(None, {"x": x[:, :, :5]})
    with pytest.raises(DataError, match=r"'input' is not an input of the model; its inputs are \['x'\]"):
        sess.run(None, {"input": x})
    with pytest.raises(DataError, match=r"input 'x' expects float32.*got int32"):
        sess.run(None, {"x": x.astype(np.int32)})
    out = sess.run(None, {"x": x.astype(np.float64)})  # cast, with a notice
    assert out[0].dtype == np.float32 and sess.complete


def test_model_paths_and_unexpected_errors_are_one_line(conv, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(tmp_path / "c.npz", x=np.zeros((4, 8, 6, 6), np.float32))
    one_line(omct("bench", tmp_path / "nothere.onnx"), "nothere.onnx' does not exist")
    one_line(omct("bench", folder), "is a folder; give the .onnx file")
    one_line(omct("quantize", folder, "--calib", tmp_path / "c.npz", "--out", tmp_path / "q"),
             "is a folder; give the .onnx file")
    one_line(omct("analyze", folder, conv, "--data", tmp_path / "c.npz"), "is a folder; give the .onnx file")
    res = omct("inspect", folder, "--debug")
    assert res.returncode == 1 and "Traceback" in res.stderr


LONG = "/encoder/layers.0/feed_forward/a_rather_long_module_name_that_a_terminal_table_would_cut/Conv"


@pytest.fixture
def long_named(tmp_path, rng):
    """The conv model with a layer name longer than a terminal, quantized through the CLI."""
    model = conv_model(rng)
    model.graph.node[0].name = LONG
    path = tmp_path / "long.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(8, 8, 6, 6)).astype(np.float32))
    res = omct("quantize", path, "--calib", tmp_path / "c.npz", "--out", tmp_path / "q", "--batch-size", 4, "--quiet")
    assert res.returncode == 0, res.stderr
    return path


def test_layer_names_are_never_cut_when_piped(long_named, tmp_path):
    import json

    res = omct("inspect", long_named, columns=40)
    assert res.returncode == 0, res.stderr
    rows = [line.split("\t") for line in res.stdout.splitlines() if "\t" in line]
    assert rows[0] == ["layer", "type", "weight", "status", "integer kernel in ONNX Runtime", "NUQ"]
    assert [LONG, "Conv", "w", "quantizable", "QLinearConv (2D)", "yes"] in rows
    res = omct("inspect", long_named, "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["layers"] == [{"name": LONG, "type": "Conv", "weight": "w", "nuq": True}] and data["opset"] == 17
    res = omct("analyze", long_named, tmp_path / "q_fake_quant_model.onnx", "--data", tmp_path / "c.npz",
               "--batch-size", 4, "--threshold", "0.99999999", columns=40)
    assert res.returncode == 0, res.stderr
    assert any(line.startswith(LONG + "\tConv\t") for line in res.stdout.splitlines()), res.stdout
    assert f"add to omct quantize: --skip {LONG}\n" in res.stdout
    page = (tmp_path / "q_fake_quant_model_analysis.html").read_text()
    assert '<div id="summary">' in page and "model output <code>y</code>: cosine" in page


def test_print_inspect_model_reads_as_a_table(long_named):
    text = str(amct.inspect_model(long_named))
    assert text.splitlines()[0].startswith("opset 17,") and "LayerSpec(" not in text
    assert any(line.startswith(LONG) and "quantizable" in line for line in text.splitlines())


def test_analysis_suggests_only_layers_bad_on_their_own():
    """A flagged layer whose isolated error is fine inherits its error: nothing is suggested (was: the top one)."""
    from omct.analysis.compare import AnalysisReport, LayerError
    from omct.analysis.metrics import ErrorStats
    from omct.analysis.report import render_html

    x = np.linspace(-1, 1, 1000)

    def stats(noise):
        s = ErrorStats()
        s.update(x, x + noise * np.cos(37 * x))
        return s

    inherited = LayerError("down", "Conv", "t", accumulated=stats(0.3), isolated=stats(1e-4))
    assert inherited.cosine < 0.99 and inherited.isolated.cosine > 0.9999
    report = AnalysisReport([inherited], threshold=0.9999, batches=1)
    assert [e.layer for e in report.flagged()] == ["down"]
    assert report.suggested_skip_layers() == [] and report.to_dict()["suggested_skip_layers"] == []
    assert "none bad on its own" in render_html(report)
    own = LayerError("bad", "Conv", "u", accumulated=stats(0.3), isolated=stats(0.3))
    assert AnalysisReport([inherited, own], threshold=0.9999, batches=1).suggested_skip_layers() == ["bad"]


def test_print_pytorch_inspect_model_reads_as_a_table():
    torch = pytest.importorskip("torch")
    import omct.pytorch as pt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 2)).eval()
    text = str(pt.inspect_model(model, torch.zeros(1, 3, 8, 8)))
    lines = text.splitlines()
    assert lines[0] == "2 quantizable modules, 0 left in float" and "LayerSpec(" not in text
    assert any(line.split()[:3] == ["0", "Conv2d", "quantizable"] and "folds 1" in line for line in lines), text
    assert any(line.split() == ["4", "Linear", "quantizable"] for line in lines), text


@pytest.fixture
def omct_log():
    """The messages omct's logger emits during a test (it does not propagate to pytest's caplog)."""
    import logging

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


def test_suspicious_but_valid_input_is_warned_about(conv, tmp_path, rng):
    np.savez(tmp_path / "c.npz", images=rng.normal(size=(8, 8, 6, 6)).astype(np.float32))
    common = ("quantize", conv, "--calib", tmp_path / "c.npz", "--batch-size", 4)
    res = omct(*common, "--out", tmp_path / "a", "--skip", "act")  # the Relu node: exists, but is not quantizable
    assert res.returncode == 0, res.stderr
    assert "skip_layers names 'act', which is not a quantizable layer: skipping it has no effect" in res.stderr
    assert "c.npz' holds one array, 'images', and the model's input is 'x': used it by position" in res.stderr
    res = omct(*common, "--out", tmp_path / "b", "--skip")
    assert res.returncode == 0 and "--skip was given no layer names" in res.stderr
    # "did you mean" offers quantizable layers only, not the Relu node 'act'
    err = one_line(omct(*common, "--out", tmp_path / "c", "--skip", "acts"), "skip_layers names 'acts'")
    assert "'act'" not in err and "'conv'" in err
    cfg = tmp_path / "my.cfg"
    cfg.write_text('batch_num: 2\nskip_layer_types: "MatMul"\n'
                   'override_layer_types { layer_type: "Gemm" calibration_config { hfmg_quantize { num_of_bins: 4096 } } }\n')
    res = omct(*common, "--out", tmp_path / "d", "--config", cfg)
    assert res.returncode == 0, res.stderr
    assert "skip_layer_types names type 'MatMul', which no quantizable layer of the model has (its types: Conv)" in res.stderr
    assert "override_layer_types names type 'Gemm'" in res.stderr


def test_threshold_and_extra_calibration_runs_are_warned_about(conv, tmp_path, rng, omct_log):
    from omct.analysis import analyze

    cfg, mod, rec = tmp_path / "c.json", tmp_path / "mod.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(conv), batch_num=1)
    amct.quantize_model(str(cfg), str(conv), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    x = rng.normal(size=(2, 8, 6, 6)).astype(np.float32)
    sess.run(None, {"x": x})
    assert not any("not used for calibration" in m for m in omct_log)
    assert any("calibration saw only 2 sample(s) in 1 batch(es)" in m for m in omct_log), omct_log
    sess.run(None, {"x": x})
    sess.run(None, {"x": x})
    assert sum("not used for calibration" in m for m in omct_log) == 1
    amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
    analyze(conv, tmp_path / "q_fake_quant_model.onnx", [{"x": x}], threshold=1.5)
    assert any("threshold 1.5 is outside (0, 1)" in m for m in omct_log)


def test_automatic_search_ending_all_float_says_so(conv, tmp_path, rng, omct_log):
    import json

    from omct.auto import AutoCalibrationEvaluatorBase

    batches = [{"x": rng.normal(size=(4, 8, 6, 6)).astype(np.float32)} for _ in range(2)]

    class OnlyFloat(AutoCalibrationEvaluatorBase):
        """Passes only a model without quantization (no Round node of the fake-quant simulation)."""

        def calibration(self, model):
            for feeds in batches:
                model.run(None, feeds)

        def evaluate(self, model):
            return 0.0 if any(n.op_type == "Round" for n in onnx.load(model).graph.node) else 1.0

    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(conv), batch_num=2)
    result = amct.accuracy_based_auto_calibration(str(conv), OnlyFloat(), str(cfg), str(tmp_path / "r.txt"),
                                                  str(tmp_path / "auto"))
    assert result.float_layers == ["conv"]
    assert any("every layer (1 of 1) in float" in m and "not a quantized one" in m for m in omct_log), omct_log
    assert json.loads((tmp_path / "auto" / "search_record.json").read_text())["all_float"] is True


def test_out_as_a_folder_or_an_onnx_name_and_the_work_folder(conv, tmp_path, rng):
    x = rng.normal(size=(8, 8, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    common = ("quantize", conv, "--calib", tmp_path / "c.npz", "--batch-size", 4, "--quiet")
    res = omct(*common, "--out", str(tmp_path / "results") + "/")
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "results" / "m_deploy_model.onnx").is_file() and (tmp_path / "results" / "m_work").is_dir()
    res = omct(*common, "--out", tmp_path / "results")  # an existing folder, no slash
    assert res.returncode == 0 and res.stdout.split() == [str(tmp_path / "results" / f"m_{k}_model.onnx")
                                                          for k in ("fake_quant", "deploy")]
    res = omct(*common, "--out", tmp_path / "named.onnx")
    assert res.returncode == 0 and (tmp_path / "named_fake_quant_model.onnx").is_file()
    assert not (tmp_path / "named.onnx_fake_quant_model.onnx").exists()
    # a run that fails after the work folder was made leaves none behind, unless --keep-work
    x[0, 0, 0, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    bad = ("quantize", conv, "--calib", tmp_path / "nan.npz", "--batch-size", 4)
    one_line(omct(*bad, "--out", tmp_path / "failed"), "NaN or Inf")
    assert not (tmp_path / "failed_work").exists()
    res = omct(*bad, "--out", tmp_path / "kept", "--keep-work")
    assert res.returncode == 1 and (tmp_path / "kept_work" / "modified.onnx").is_file()
    assert "kept " in res.stderr


def test_small_things_version_help_bench_and_cli_wording(conv, tmp_path, rng):
    import argparse

    from omct import __version__
    from omct.cli import build_parser

    res = omct("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"omct {__version__}"
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, sub in subparsers.choices.items() for a in sub._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []
    res = omct("bench", conv, "--runs", 2, "--batch-size", 3, "--threads", 1, columns=200)
    assert res.returncode == 0, res.stderr
    assert "batch 3, 1 thread(s), 2 runs" in res.stdout
    res = omct("bench", conv, "--runs", 0)  # was an IndexError from numpy's median of nothing
    assert res.returncode == 2 and "argument --runs: must be at least 1, got 0" in res.stderr
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(4, 8, 6, 6)).astype(np.float32))
    res = omct("quantize", conv.name, "--calib", "c.npz", "--out", "q", cwd=tmp_path)
    assert res.returncode == 0 and "CalibrationSession" not in res.stderr and "wrote " in res.stderr
    # paths printed as given: relative (the record file's path was printed absolute)
    assert "wrote q_work/record.txt" in res.stderr and str(tmp_path) not in res.stderr + res.stdout


def test_pyproject_license_is_an_spdx_string():
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "Apache-2.0"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_every_output_honours_the_umask(conv, tmp_path, rng, umask):
    """config.json, record.txt, the HTML report and the models get 0666 less the umask (mkstemp alone gave 0600)."""
    from omct.analysis import analyze
    from omct.analysis.report import write_html

    old = os.umask(umask)
    try:
        cfg, mod, rec = tmp_path / "c.json", tmp_path / "mod.onnx", tmp_path / "r.txt"
        amct.create_quant_config(str(cfg), str(conv), batch_num=1)
        amct.quantize_model(str(cfg), str(conv), str(mod), str(rec))
        x = rng.normal(size=(2, 8, 6, 6)).astype(np.float32)
        amct.CalibrationSession(str(mod)).run(None, {"x": x})
        amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
        write_html(analyze(conv, tmp_path / "q_fake_quant_model.onnx", [{"x": x}]), tmp_path / "r.html")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (cfg, rec, tmp_path / "r.html", tmp_path / "q_deploy_model.onnx")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_pytorch_saved_models_take_any_batch_without_dynamic_axes(tmp_path):
    """The batch dimension is dynamic by default (it was input_data's batch, and an evaluation at another batch
    size crashed in ONNX Runtime); an explicit dynamic_axes still wins, and a fixed batch fails in one line."""
    torch = pytest.importorskip("torch")
    import onnxruntime as ort

    import omct.pytorch as pt
    from omct.pytorch.auto import OnnxModule

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.fc = torch.nn.Linear(4 * 6 * 6, 2)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).view(x.size(0), -1))  # the batch read from the input's shape

    torch.manual_seed(0)
    model, one = Net().eval(), torch.randn(1, 3, 8, 8)
    for name, axes in (("dyn", None), ("fixed", {})):
        cfg, mod, rec = tmp_path / f"{name}.json", tmp_path / f"{name}_mod.onnx", tmp_path / f"{name}_r.txt"
        pt.create_quant_config(str(cfg), model, one, batch_num=1)
        calib = pt.quantize_model(str(cfg), str(mod), str(rec), model, one, dynamic_axes=axes)
        calib(torch.randn(4, 3, 8, 8))
        pt.save_model(str(mod), str(rec), str(tmp_path / name))
    x = torch.randn(7, 3, 8, 8)
    out = ort.InferenceSession(str(tmp_path / "dyn_deploy_model.onnx")).run(None, {"x": x.numpy()})[0]
    assert out.shape == (7, 2)
    assert OnnxModule(tmp_path / "dyn_fake_quant_model.onnx")(x).shape == (7, 2)
    with pytest.raises(DataError, match=r"input 'x' expects float32 \[1, 3, 8, 8\], got float32 \[7, 3, 8, 8\]"):
        OnnxModule(tmp_path / "fixed_fake_quant_model.onnx")(x)


def test_cfg_mistakes_say_where_and_what(conv, tmp_path):
    """A misspelt field gets "did you mean"; a missing '}' is reported at the block left open, not as a confusing
    error on the next field; a layer type the frontend never quantizes (PyTorch's Linear on ONNX) lists the types."""
    from omct.errors import ConfigError

    cases = {
        "batch_nun: 4\n": r"line 1: AMCTConfig has no field 'batch_nun'; did you mean 'batch_num'\?",
        "batch_num: 4\ncommon_config { arq_quantize { chanel_wise: true } }\n":
            r"line 2: ARQuantize has no field 'chanel_wise'; did you mean 'channel_wise'\?",
        "batch_num: 4\ncommon_config { arq_quantize { channel_wise: true }\n"
        'override_layer_types { layer_type: "Conv" calibration_config { hfmg_quantize { num_of_bins: 4096 } } }\n':
            r"line 3: 'override_layer_types' is a top-level field, but 'common_config \{' opened at line 2 is not closed",
        "batch_num: 4\ncommon_config { arq_quantize { channel_wise: true }\n":
            r"line 2: 'common_config \{' is never closed: a '\}' is missing",
        'skip_layer_types: "Linear"\n':
            r"skip_layer_types names type 'Linear', which this model's frontend does not quantize; its types are "
            + ", ".join(sorted(HANDLERS)),
    }
    for i, (text, pattern) in enumerate(cases.items()):
        cfg = tmp_path / f"{i}.cfg"
        cfg.write_text(text)
        with pytest.raises(ConfigError, match=rf"{i}\.cfg: {pattern}"):
            amct.create_quant_config(str(tmp_path / "c.json"), str(conv), config_defination=str(cfg))
    assert not (tmp_path / "c.json").exists()


def test_a_scripted_first_hour_ends_without_a_traceback(tmp_path):
    """The README's commands on the bundled example, then the usual mistakes one after the other, as a new user
    makes them: every command ends with exit 0 or with one line naming the culprit; no traceback anywhere."""
    from omct.examples import DIGITS_DATA, DIGITS_MODEL

    data = np.load(DIGITS_DATA)
    calib = tmp_path / "calib.npz"
    np.savez(calib, input=data["calibration"][:64])
    wrong_dtype, wrong_name = tmp_path / "u8.npz", tmp_path / "renamed.npz"
    np.savez(wrong_dtype, input=(data["calibration"][:64] * 255).astype(np.uint8))
    np.savez(wrong_name, images=data["calibration"][:64])
    good = ["quantize", DIGITS_MODEL, "--calib", calib, "--batch-size", 32]
    session = [
        (["inspect", DIGITS_MODEL], 0, ()),
        ([*good, "--out", tmp_path / "results" / "digits"], 0, ()),
        (["analyze", DIGITS_MODEL, tmp_path / "results" / "digits_fake_quant_model.onnx", "--data", calib], 0, ()),
        (["bench", DIGITS_MODEL, tmp_path / "results" / "digits_deploy_model.onnx", "--runs", 3], 0, ()),
        (["inspect", tmp_path / "nothere.onnx"], 1, ("nothere.onnx",)),
        (["bench", tmp_path], 1, ("folder",)),
        (["quantize", tmp_path, "--calib", calib, "--out", tmp_path / "x"], 1, ("folder",)),
        (["quantize", DIGITS_MODEL, "--calib", wrong_dtype, "--out", tmp_path / "y"], 1, ("uint8", "'input'")),
        ([*good, "--out", tmp_path / "z", "--skip", "no_such_layer"], 1, ("no_such_layer",)),
        ([*good, "--out", tmp_path / "w", "--config", tmp_path / "missing.cfg"], 1, ("missing.cfg",)),
        (["quantize", DIGITS_MODEL, "--calib", wrong_name, "--out", tmp_path / "v"], 0, ()),  # used by position
        (["analyze", DIGITS_MODEL, DIGITS_MODEL, "--data", calib], 1, ("omct",)),  # not a model omct wrote
    ]
    for args, code, needles in session:
        res = omct(*args)
        assert "Traceback" not in res.stderr + res.stdout, (args, res.stderr)
        if code == 0:
            assert res.returncode == 0, (args, res.stderr)
        else:
            one_line(res, *needles)
