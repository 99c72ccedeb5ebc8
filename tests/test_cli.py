"""The ``omct`` command driven through a subprocess, end to end on real models."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import omct.analysis as analysis


def omct(*args, cwd=None):
    env = dict(os.environ, COLUMNS="200")  # rich tables at a width that keeps names whole
    return subprocess.run([sys.executable, "-m", "omct", *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=600, env=env)


def imbalanced(path, out):
    """The trained small CNN with one deliberately hard layer: channel 0 of the first conv is scaled up 1000x
    and the second conv reads it scaled down 1000x. The float function is unchanged (ReLU is positively
    homogeneous), but the second conv's input now spans 1000x the range of its other channels, so per-tensor
    activation quantization wipes those out. Returns the hard layer's name."""
    model = onnx.load(path)
    inits = {t.name: t for t in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    first, second = convs[0], convs[1]
    w1, b1 = (numpy_helper.to_array(inits[n]).copy() for n in first.input[1:3])
    w1[0] *= 1000.0
    b1[0] *= 1000.0
    w2 = numpy_helper.to_array(inits[second.input[1]]).copy()
    w2[:, 0] /= 1000.0
    for name, value in ((first.input[1], w1), (first.input[2], b1), (second.input[1], w2)):
        inits[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    onnx.save(model, out)
    return second.name


@pytest.fixture(scope="module")
def hard_model(trained, digits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    _, path = trained("small_cnn")
    model = folder / "hard.onnx"
    hard = imbalanced(path, model)
    np.savez(folder / "calib.npz", input=digits.x_train[:128])
    return folder, model, hard


def test_quantize_and_analyze_flag_the_hard_layer_first(hard_model, digits):
    folder, model, hard = hard_model
    res = omct("quantize", model, "--calib", folder / "calib.npz", "--out", folder / "q", "--batch-num", 4, "--quiet")
    assert res.returncode == 0, res.stderr
    # the float function survived the edit, the quantized one suffers
    import onnxruntime as ort

    x = digits.x_test
    ref = ort.InferenceSession(str(model)).run(None, {"input": x})[0]
    html_path, json_path = folder / "report.html", folder / "report.json"
    res = omct("analyze", model, folder / "q_fake_quant_model.onnx", "--data", folder / "calib.npz", "--report",
               html_path, "--json", json_path)
    assert res.returncode == 0, res.stderr
    numbers = json.loads(json_path.read_text())
    assert numbers["flagged"][0] == hard, numbers
    assert numbers["suggested_skip_layers"] == [hard]
    page = html_path.read_text()
    assert page.count('class="bad"') >= 1 and f"<tr class=\"bad\"><td>{hard}</td>" in page
    assert "data:image/png;base64," in page  # the plots are embedded
    assert f"suggested skip_layers: ['{hard}']" in res.stdout.replace("\n", " ")
    # and skipping it, as suggested, repairs the quantized model
    res = omct("quantize", model, "--calib", folder / "calib.npz", "--out", folder / "fixed", "--batch-num", 4,
               "--skip", hard, "--quiet")
    assert res.returncode == 0, res.stderr
    err = {p: float(np.abs(ort.InferenceSession(str(folder / f"{p}_fake_quant_model.onnx")).run(None, {"input": x})[0]
                           - ref).mean()) for p in ("q", "fixed")}
    assert err["fixed"] < 0.5 * err["q"], err


def test_analysis_api_ranks_the_hard_layer_most_sensitive(hard_model):
    folder, model, hard = hard_model
    data = np.load(folder / "calib.npz")["input"]
    report = analysis.analyze(model, folder / "q_deploy_model.onnx", [{"input": data[i:i + 32]} for i in range(0, 128, 32)])
    assert report.ranking()[0][0] == hard
    assert report.ranking(analysis.MSE())[0][0] == hard
    by_name = {e.layer: e for e in report.layers}
    assert by_name[hard].isolated.cosine < 0.99 < min(e.isolated.cosine for e in report.layers if e.layer != hard)


def test_quantize_from_a_folder_of_images(trained, digits, tmp_path):
    from PIL import Image

    _, path = trained("small_cnn")
    images = tmp_path / "images"
    images.mkdir()
    for i in range(40):
        Image.fromarray((digits.x_train[i, 0] * 255).astype(np.uint8)).save(images / f"{i:03d}.png")
    res = omct("quantize", path, "--calib", images, "--out", tmp_path / "q", "--batch-size", 8, "--quiet")
    assert res.returncode == 0, res.stderr
    import onnxruntime as ort

    acc = float((ort.InferenceSession(str(tmp_path / "q_deploy_model.onnx")).run(None, {"input": digits.x_test})[0]
                 .argmax(1) == digits.y_test).mean())
    assert acc > 0.9


def test_errors_are_one_line_with_nonzero_exit(hard_model, tmp_path):
    folder, model, _ = hard_model
    res = omct("analyze", model, model, "--data", folder / "calib.npz")
    assert res.returncode == 1
    assert res.stderr.strip().count("\n") == 0 and "no omct layer list" in res.stderr
    res = omct("quantize", tmp_path / "missing.onnx", "--calib", folder / "calib.npz", "--out", tmp_path / "q")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    res = omct("--help")
    assert res.returncode == 0 and "analyze" in res.stdout


def test_inspect_bench_and_demo(hard_model, tmp_path):
    folder, model, hard = hard_model
    res = omct("inspect", model)
    assert res.returncode == 0 and hard in res.stdout and "quantizable" in res.stdout and "opset" in res.stdout
    res = omct("demo", "--out", tmp_path / "demo")
    assert res.returncode == 0, res.stderr
    assert "deploy INT8" in res.stdout and (tmp_path / "demo" / "digits_deploy_model.onnx").is_file()
    res = omct("bench", model, tmp_path / "demo" / "digits_deploy_model.onnx", "--runs", 5)
    assert res.returncode == 0 and "median ms" in res.stdout and "digits_deploy_model.onnx" in res.stdout


def test_algo_applies_to_every_layer_and_over_a_config_json(tmp_path, rng):
    """--algo goes straight into config.json (no generated .cfg), also on top of the user's own config.json."""
    from onnx_builders import conv_model

    import omct.onnx as amct

    onnx.save(conv_model(rng), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(8, 8, 6, 6)).astype(np.float32))
    common = ("quantize", tmp_path / "m.onnx", "--calib", tmp_path / "calib.npz", "--batch-size", 4, "--quiet")
    res = omct(*common, "--out", tmp_path / "a", "--algo", "kl")
    assert res.returncode == 0, res.stderr
    act = json.loads((tmp_path / "a_work" / "config.json").read_text())["conv"]["activation_quant_params"]
    assert act == {"num_bits": 8, "act_algo": "kl", "num_bins": 2048}
    mine = tmp_path / "mine.json"
    amct.create_quant_config(str(mine), str(tmp_path / "m.onnx"), batch_num=2, activation_offset=False)
    before = mine.read_text()
    res = omct(*common, "--out", tmp_path / "b", "--config", mine, "--algo", "mse")
    assert res.returncode == 0, res.stderr
    used = json.loads((tmp_path / "b_work" / "config.json").read_text())
    assert used["conv"]["activation_quant_params"] == {"num_bits": 8, "act_algo": "mse", "num_candidates": 200}
    assert used["batch_num"] == 2 and used["activation_offset"] is False and mine.read_text() == before
    res = omct(*common, "--out", tmp_path / "c", "--algo", "nope")
    assert res.returncode != 0 and "invalid choice: 'nope'" in res.stderr
