"""The TensorFlow frontend end to end on Keras models trained here on real data (digits, NHWC): AMCT's call
sequence, deploy accuracy against TensorFlow's own FP32 accuracy, integer kernels in ONNX Runtime's optimised
graph, the user's layer names everywhere, SavedModel and frozen-graph inputs, the search, analysis and bad input.

One trained model per architecture per module (TensorFlow is slow to import and train on one core)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")

import zoo_tf  # noqa: E402
from conftest import assert_integer_kernels, optimized_ops, ort_run  # noqa: E402

import omct.tensorflow as amct  # noqa: E402
from omct.errors import DataError, ModelError, RecordError  # noqa: E402

pytestmark = pytest.mark.slow  # trains Keras models
EPOCHS = {"cnn": 4, "mlp": 5, "deconv": 5}


@pytest.fixture(scope="module")
def data():
    return zoo_tf.digits_nhwc()


@pytest.fixture(scope="module")
def models(data):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = zoo_tf.train(name, data, epochs=EPOCHS[name])
        return cache[name]

    return get


def run_keras_flow(model, data, folder: Path, batches: int = 4, **config):
    """AMCT's TensorFlow call sequence; returns (config dict, deploy path, fake-quant path)."""
    x_train = data[0]
    cfg, rec = folder / "config.json", folder / "record.txt"
    amct.create_quant_config(str(cfg), model, batch_num=batches, **config)
    calibration_model = amct.quantize_model(model, str(cfg), str(rec))
    for i in range(batches):
        out = calibration_model(x_train[i * 64:(i + 1) * 64])
        assert isinstance(out, np.ndarray) and out.shape == (64, 10)
    amct.save_model(model, str(rec), str(folder / "q"))
    return json.loads(cfg.read_text()), folder / "q_deploy_model.onnx", folder / "q_fake_quant_model.onnx"


def names(model, kind: str) -> list[str]:
    """The model's top-level layers of class ``kind`` (Keras numbers auto-names per session: conv2d_3, dense_1)."""
    return [layer.name for layer in model.layers if type(layer).__name__ == kind]


def onnx_accuracy(path, x, y) -> float:
    return float((ort_run(path, {"image:0": x})[0].argmax(1) == y).mean())


def test_cnn_depthwise_batchnorm_nested(models, data, tmp_path):
    model, fp32 = models("cnn")
    assert fp32 > 0.9
    config, deploy, fake = run_keras_flow(model, data, tmp_path)
    # the user's names: Keras layer names, the nested sub-model's layer by its path; both Conv2D layers apart
    convs = names(model, "Conv2D")
    assert len(convs) == 2
    for name in convs + names(model, "DepthwiseConv2D") + names(model, "AveragePooling2D") + names(model, "Dense") + [
            "block/conv"]:
        assert name in config, (name, sorted(config))
    assert not set(names(model, "BatchNormalization")) & set(config) and "block/bn" not in config
    record = (tmp_path / "record.txt").read_text()
    assert 'key: "block/conv"' in record and f'key: "{names(model, "DepthwiseConv2D")[0]}"' in record
    x_test, y_test = data[2], data[3]
    deploy_acc, fake_acc = onnx_accuracy(deploy, x_test, y_test), onnx_accuracy(fake, x_test, y_test)
    assert deploy_acc >= fp32 - 0.01 and fake_acc >= fp32 - 0.01, (fp32, deploy_acc, fake_acc)
    assert_integer_kernels(deploy, tmp_path)
    ops = optimized_ops(deploy, tmp_path)
    # every convolution (depthwise and the BatchNorm-folded ones included) and the pooling run on integers; the
    # BatchNorm Mul/Add chains are folded away
    assert ops.count("QLinearConv") == 4 and "QLinearAveragePool" in ops and "Mul" not in ops, ops
    assert "Conv" not in ops, ops
    # Keras' Flatten is a Flatten, not a Reshape to a shape computed at run time from a dequantized copy of the
    # integer tensor (Shape, Gather, Cast, Slice, Concat on every call): one DequantizeLinear, for the logits
    assert "Shape" not in ops and ops.count("DequantizeLinear") == 1 and "Flatten" in ops, ops


def test_mlp_dense_batchnorm(models, data, tmp_path):
    model, fp32 = models("mlp")
    config, deploy, _ = run_keras_flow(model, data, tmp_path)
    dense = names(model, "Dense")
    assert len(dense) == 3 and set(dense) <= set(config), sorted(config)
    acc = onnx_accuracy(deploy, data[2], data[3])
    assert acc >= fp32 - 0.01, (fp32, acc)
    assert_integer_kernels(deploy, tmp_path)
    ops = optimized_ops(deploy, tmp_path)
    assert "Mul" not in ops and ops.count("QGemm") + ops.count("QLinearMatMul") + ops.count("MatMulInteger") >= 3, ops


def test_conv_transpose(models, data, tmp_path):
    model, fp32 = models("deconv")
    config, deploy, _ = run_keras_flow(model, data, tmp_path)
    deconv = names(model, "Conv2DTranspose")[0]
    assert config[deconv]["quant_enable"], sorted(config)
    acc = onnx_accuracy(deploy, data[2], data[3])
    assert acc >= fp32 - 0.01, (fp32, acc)
    # ONNX Runtime's CPU provider has no integer ConvTranspose kernel: it may take its weight dequantized
    assert_integer_kernels(deploy, tmp_path, allowed=("ConvTranspose",))
    # `omct analyze` on the command line: the calibration graph beside the record is the float model
    from omct.cli import main

    np.savez(tmp_path / "data.npz", **{"image:0": data[2][:64]})
    assert main(["analyze", str(tmp_path / "record_modified.onnx"), str(tmp_path / "q_fake_quant_model.onnx"), "--data",
                 str(tmp_path / "data.npz"), "--json", str(tmp_path / "a.json")]) == 0
    analysed = json.loads((tmp_path / "a.json").read_text())
    assert deconv in json.dumps(analysed), analysed


def test_skip_layers_and_cfg_take_keras_and_tf_op_names(models, data, tmp_path):
    model, _ = models("cnn")
    report = amct.inspect_model(model)
    op_of = {row[0]: row[2] for row in report.rows()}
    assert op_of["block/conv"].endswith("/convolution") and "block" in op_of["block/conv"]
    # skip_layers: a Keras name and a TF op name (AMCT's form)
    dense, (conv, conv_1), dw = names(model, "Dense")[0], names(model, "Conv2D"), names(model, "DepthwiseConv2D")[0]
    amct.create_quant_config(str(tmp_path / "a.json"), model, skip_layers=[dense, op_of["block/conv"]])
    config = json.loads((tmp_path / "a.json").read_text())
    assert not config[dense]["quant_enable"] and not config["block/conv"]["quant_enable"]
    assert config[conv]["quant_enable"]
    # .cfg override by TF op name, as in AMCT's TensorFlow samples
    cfg = tmp_path / "simple.cfg"
    cfg.write_text(textwrap.dedent(f"""
        batch_num: 2
        override_layer_configs {{
            layer_name: "{op_of[dw]}"
            calibration_config {{ arq_quantize {{ channel_wise: false }} ifmr_quantize {{ search_step: 0.02 }} }}
        }}
        skip_layers: "{conv_1}"
        """))
    amct.create_quant_config(str(tmp_path / "b.json"), model, config_defination=str(cfg))
    config = json.loads((tmp_path / "b.json").read_text())
    assert config["batch_num"] == 2 and not config[conv_1]["quant_enable"]
    assert config[dw]["weight_quant_params"]["channel_wise"] is False
    assert config[conv]["weight_quant_params"]["channel_wise"] is True
    # layer types by TF op type, as AMCT's TensorFlow samples write them, for a Keras model's classes
    cfg.write_text('skip_layer_types: "DepthwiseConv2dNative"\nskip_layer_types: "AvgPool"\n'
                   'override_layer_types { layer_type: "MatMul" calibration_config { arq_quantize { channel_wise: false } } }\n')
    amct.create_quant_config(str(tmp_path / "t.json"), model, config_defination=str(cfg))
    config = json.loads((tmp_path / "t.json").read_text())
    assert not config[dw]["quant_enable"] and not config[names(model, "AveragePooling2D")[0]]["quant_enable"]
    assert config[conv]["quant_enable"] and config[dense]["weight_quant_params"]["channel_wise"] is False
    assert config[conv]["weight_quant_params"]["channel_wise"] is True


def test_saved_model_directory(models, data, tmp_path):
    model, fp32 = models("mlp")
    saved = tmp_path / "saved"
    model.export(str(saved), verbose=False)
    cfg, rec = tmp_path / "c.json", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(saved), batch_num=2)
    layer_names = list(json.loads(cfg.read_text()))
    assert any(n.endswith("/MatMul") for n in layer_names), layer_names  # TF op names for a graph
    calibration_model = amct.quantize_model(str(saved), str(cfg), str(rec))
    for i in range(2):
        calibration_model(data[0][i * 64:(i + 1) * 64])
    amct.save_model(str(saved), str(rec), str(tmp_path / "sm"))
    deploy = tmp_path / "sm_deploy_model.onnx"
    import onnxruntime as ort

    name = ort.InferenceSession(str(deploy), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    acc = float((ort_run(deploy, {name: data[2]})[0].argmax(1) == data[3]).mean())
    assert acc >= fp32 - 0.01, (fp32, acc)
    # a .keras file is a Keras model: Keras layer names
    model.save(tmp_path / "m.keras")
    amct.create_quant_config(str(tmp_path / "k.json"), str(tmp_path / "m.keras"))
    assert set(names(model, "Dense")) <= set(json.loads((tmp_path / "k.json").read_text()))


def frozen_pb(model, folder: Path) -> tuple[Path, str, str]:
    """The model as a frozen GraphDef .pb (what AMCT's TensorFlow edition takes), its input and output names."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    fn = tf.function(lambda x: model(x, training=False)).get_concrete_function(tf.TensorSpec((None, 16, 16, 1),
                                                                                              tf.float32, name="input"))
    frozen = convert_variables_to_constants_v2(fn)
    path = folder / "frozen.pb"
    path.write_bytes(frozen.graph.as_graph_def().SerializeToString())
    return path, frozen.inputs[0].name, frozen.outputs[0].name


def test_frozen_pb_with_amct_graph_save_form(models, data, tmp_path):
    model, fp32 = models("mlp")
    pb, inp, out = frozen_pb(model, tmp_path)
    cfg, rec = tmp_path / "c.json", tmp_path / "r.txt"
    names = {"input_names": [inp], "output_names": [out]}
    amct.create_quant_config(str(cfg), str(pb), batch_num=2, **names)
    layers = [n for n in json.loads(cfg.read_text()) if n.endswith("/MatMul")]
    assert len(layers) == 3, layers  # named by the TF MatMul ops, as AMCT's graph edition names them
    calibration_model = amct.quantize_model(str(pb), str(cfg), str(rec), **names)
    for i in range(2):
        calibration_model(data[0][i * 64:(i + 1) * 64])
    with pytest.raises(ModelError, match="not the outputs"):
        amct.save_model(str(pb), ["somewhere:0"], str(rec), str(tmp_path / "pb"))
    amct.save_model(str(pb), [out], str(rec), str(tmp_path / "pb"))  # AMCT: save_model(pb_model, outputs, ...)
    acc = float((ort_run(tmp_path / "pb_deploy_model.onnx", {inp: data[2]})[0].argmax(1) == data[3]).mean())
    assert acc >= fp32 - 0.01, (fp32, acc)
    with pytest.raises(ModelError, match="no input 'nope'"):
        amct.create_quant_config(str(tmp_path / "d.json"), str(pb), input_names=["nope"], output_names=[out])
    with pytest.raises(ModelError, match="input_names= and output_names="):
        amct.create_quant_config(str(tmp_path / "d.json"), str(pb))


def test_calibration_data_checked(models, data, tmp_path):
    model, _ = models("deconv")
    amct.create_quant_config(str(tmp_path / "c.json"), model, batch_num=1)
    calibration_model = amct.quantize_model(model, str(tmp_path / "c.json"), str(tmp_path / "r.txt"))
    nchw = data[0][:8].transpose(0, 3, 1, 2)
    with pytest.raises(DataError, match=r"input 'image' expects shape \[\?, 16, 16, 1\].*got \[8, 1, 16, 16\].*NCHW"):
        calibration_model(nchw)
    with pytest.raises(DataError, match=r"input 'image' expects shape .*got \[8, 16, 16\]"):
        calibration_model(data[0][:8, :, :, 0])
    with pytest.raises(RecordError, match="not been|missing|calibration"):
        amct.save_model(model, str(tmp_path / "r.txt"), str(tmp_path / "early"))
    import tensorflow as tf

    out = calibration_model(tf.constant(data[0][:32]))  # tf tensors are taken too
    np.testing.assert_allclose(out, np.asarray(model(data[0][:32])), atol=1e-4)
    assert calibration_model.complete


def test_names_are_exact_in_nested_models_and_shared_layers_stay_float():
    """Two sub-models with a layer called "conv" each, one of them nested twice deep, auto-numbered Dense layers and
    a layer called twice: every converted weight is the kernel of the Keras layer it is named after."""
    import keras
    from onnx import numpy_helper

    keras.utils.set_random_seed(1)

    def sub(name, cin):
        inner = keras.Sequential([keras.Input((8, 8, cin)), keras.layers.Conv2D(cin, 3, padding="same", name="conv")],
                                 name=f"{name}_inner")
        return keras.Sequential([keras.Input((8, 8, cin)), inner, keras.layers.Conv2D(cin, 1, name="conv")], name=name)

    inp = keras.Input((8, 8, 1), name="x")  # one channel: tf2onnx's NHWC -> NCHW is a Reshape named after the stem
    stem = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="stem")
    shared = keras.layers.Conv2D(4, 1, name="twice")
    y = shared(shared(sub("b", 4)(sub("a", 4)(stem(inp)))))
    y = keras.layers.Dense(6)(keras.layers.Flatten()(y))
    model = keras.Model(inp, keras.layers.Dense(3)(y))
    p = amct.prepare(model)
    kernels = {"stem": stem, "a/conv": model.get_layer("a").get_layer("conv"), "b/conv": model.get_layer("b").get_layer("conv"),
               "a/a_inner/conv": model.get_layer("a").get_layer("a_inner").get_layer("conv"),
               "b/b_inner/conv": model.get_layer("b").get_layer("b_inner").get_layer("conv")}
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    inits = {t.name: numpy_helper.to_array(t) for t in p.prepared.model.graph.initializer}
    nodes = {n.name: n for n in p.prepared.model.graph.node}
    for name, layer in kernels.items():
        kernel = np.asarray(layer.kernel)
        np.testing.assert_array_equal(inits[nodes[name].input[1]], kernel.transpose(3, 2, 0, 1), err_msg=name)
    for layer in dense:
        np.testing.assert_array_equal(inits[nodes[layer.name].input[1]], np.asarray(layer.kernel), err_msg=layer.name)
    assert {s.name for s in p.prepared.layers} >= set(kernels) | {d.name for d in dense}
    assert "twice" in {r.name for r in p.prepared.refused} and "twice" not in {s.name for s in p.prepared.layers}
    # the conversion is reused for the same model (create_quant_config, then quantize_model) unless a weight changed
    stem.kernel.assign(np.asarray(stem.kernel) * 2)
    again = amct.prepare(model).prepared.model
    weight = {t.name: numpy_helper.to_array(t) for t in again.graph.initializer}[
        {n.name: n for n in again.graph.node}["stem"].input[1]]
    np.testing.assert_array_equal(weight, np.asarray(stem.kernel).transpose(3, 2, 0, 1))


def test_residual_add_and_global_pooling_stay_integer(tmp_path, rng):
    """tf2onnx writes GlobalAveragePooling2D as GlobalAveragePool + Squeeze; omct makes the Squeeze a Flatten, so the
    residual Add, the pooling and the Dense after them run on integers (no float island before the classifier)."""
    import keras

    keras.utils.set_random_seed(2)
    inp = keras.Input((8, 8, 8), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    y = keras.layers.Conv2D(8, 3, padding="same")(x)
    x = keras.layers.ReLU()(keras.layers.Add()([x, y]))
    model = keras.Model(inp, keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(x)))
    batches = [rng.random((16, 8, 8, 8), dtype=np.float32) for _ in range(2)]
    amct.create_quant_config(str(tmp_path / "c.json"), model, batch_num=2)
    calibration_model = amct.quantize_model(model, str(tmp_path / "c.json"), str(tmp_path / "r.txt"))
    for b in batches:
        calibration_model(b)
    amct.save_model(model, str(tmp_path / "r.txt"), str(tmp_path / "q"))
    ops = optimized_ops(tmp_path / "q_deploy_model.onnx", tmp_path)
    assert "QLinearAdd" in ops and "QLinearGlobalAveragePool" in ops and "QGemm" in ops, ops
    assert not {"Add", "GlobalAveragePool", "Squeeze", "Conv", "MatMul", "Gemm"} & set(ops), ops
    got = ort_run(tmp_path / "q_fake_quant_model.onnx", {"image:0": batches[0]})[0]
    ref = np.asarray(model(batches[0]))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_separable_conv_two_weighted_parts(tmp_path, rng):
    """A SeparableConv2D (NASNet, Xception in keras.applications) has two weighted ops: the depthwise one takes the
    layer's name, the pointwise one "<layer>/Conv"; both are quantized and save_model accepts them as the model's
    (it said the record belonged to another model)."""
    import keras
    from onnx import numpy_helper

    keras.utils.set_random_seed(4)
    inp = keras.Input((8, 8, 3), name="image")
    sep = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")
    model = keras.Model(inp, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(sep(inp))))
    batches = [rng.random((64, 8, 8, 3), dtype=np.float32) for _ in range(2)]
    config, _, fake = run_keras_flow(model, (np.concatenate(batches),), tmp_path, batches=2)
    assert config["sep"]["quant_enable"] and config["sep/Conv"]["quant_enable"], sorted(config)
    graph = amct.prepare(model).prepared.model.graph
    inits, nodes = {t.name: numpy_helper.to_array(t) for t in graph.initializer}, {n.name: n for n in graph.node}
    depthwise, pointwise = (np.asarray(w) for w in sep.weights[:2])
    assert sorted(inits[nodes["sep"].input[1]].ravel()) == sorted(depthwise.ravel())
    assert sorted(inits[nodes["sep/Conv"].input[1]].ravel()) == sorted(pointwise.ravel())
    got = ort_run(fake, {"image:0": batches[0]})[0]
    ref = np.asarray(model(batches[0]))
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


def test_analyze_in_another_process_finds_the_saved_models_tensors(tmp_path, rng):
    """tf2onnx numbers the nodes it adds, and picks which of two equal constants survives, in the order of Python sets,
    so a model converted under another hash seed had other tensor names: `amct.analyze` (which converts the model
    again) in a new process failed on a MobileNet ("Graph output ...Mean_Squeeze__362:0 does not exist"). omct renames
    them in graph order: the names are the same in every process."""
    import keras

    keras.utils.set_random_seed(3)
    model = zoo_tf.mobilenet(16, 8)  # ReLU6 clips and BatchNorms: shared constants, many added nodes
    model.save(tmp_path / "m.keras")
    batches = [rng.random((8, 16, 16, 1), dtype=np.float32) for _ in range(2)]
    amct.create_quant_config(str(tmp_path / "c.json"), model, batch_num=2)
    calibration_model = amct.quantize_model(model, str(tmp_path / "c.json"), str(tmp_path / "r.txt"))
    for b in batches:
        calibration_model(b)
    amct.save_model(model, str(tmp_path / "r.txt"), str(tmp_path / "q"))
    np.save(tmp_path / "x.npy", batches[0])
    mine = sorted(t for n in amct.prepare(model).prepared.model.graph.node for t in [n.name, *n.input, *n.output])
    code = ("import json, numpy as np, omct.tensorflow as amct\n"
            "from omct.ui import set_quiet; set_quiet()\n"
            "graph = amct.prepare('m.keras').prepared.model.graph\n"
            "names = sorted(t for n in graph.node for t in [n.name, *n.input, *n.output])\n"
            "report = amct.analyze('m.keras', 'q_fake_quant_model.onnx', [np.load('x.npy')])\n"
            "print(json.dumps({'names': names, 'layers': [e.layer for e in report.layers]}))\n")
    env = {**os.environ, "PYTHONHASHSEED": "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"}
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    other = json.loads(res.stdout.strip().splitlines()[-1])
    assert other["names"] == mine
    enabled = {k for k, v in json.loads((tmp_path / "c.json").read_text()).items() if isinstance(v, dict) and v["quant_enable"]}
    missing = enabled - set(other["layers"])  # the input Reshape (one channel) is no layer with an output to compare
    assert set(other["layers"]) <= enabled and len(missing) <= 1 and all(n.endswith("/Reshape") for n in missing), missing


def test_bad_models(tmp_path):
    import keras
    import tensorflow as tf

    inp = keras.Input((4,), name="x")
    odd = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Lambda(lambda t: tf.math.lgamma(t + 2.0), name="lg")(inp)))
    with pytest.raises(ModelError, match=r"TensorFlow op '.*lg.*' \(Lgamma\) has no ONNX conversion"):
        amct.create_quant_config(str(tmp_path / "c.json"), odd)

    class Sub(keras.Model):
        def __init__(self):
            super().__init__(name="sub")
            self.fc = keras.layers.Dense(3, name="fc")

        def call(self, x):
            return self.fc(x)

    sub = Sub()
    sub(np.zeros((2, 4), np.float32))
    with pytest.raises(ModelError, match="no known inputs .* wrap it"):
        amct.inspect_model(sub)
    x = keras.Input((4,))
    assert [row[0] for row in amct.inspect_model(keras.Model(x, sub(x))).rows()] == ["sub/fc"]

    class Plain(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)], autograph=False)
        def f(self, x):
            return x * 2.0

    module = Plain()
    tf.saved_model.save(module, str(tmp_path / "nosig"), signatures={})
    with pytest.raises(ModelError, match="no 'serving_default' signature"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(tmp_path / "nosig"))
    with pytest.raises(ModelError, match="does not exist"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(tmp_path / "missing.pb"))


def test_missing_tensorflow_is_one_line(tmp_path):
    code = ("import sys; sys.modules['tensorflow'] = None\n"
            "import omct.tensorflow as amct\n"
            "try:\n    amct.create_quant_config('c.json', 'model.pb')\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    line = res.stdout.strip()
    assert line.startswith("ERR omct.tensorflow needs TensorFlow") and "pip install 'omct[tensorflow]'" in line, res
    assert "\n" not in line
    res = subprocess.run([sys.executable, "-c", "import omct, omct.onnx, sys; print('tensorflow' in sys.modules)"],
                         capture_output=True, text=True, timeout=120)
    assert res.stdout.strip() == "False", res  # importing omct does not import TensorFlow


class DigitsEvaluator(amct.AutoCalibrationEvaluatorBase):
    def __init__(self, data, tolerance: float = 0.005):
        self.data = data
        self.tolerance = tolerance

    def calibration(self, model):
        for i in range(2):
            model(self.data[0][i * 64:(i + 1) * 64])

    def evaluate(self, model):  # one function for the Keras model and every fake-quant trial
        return float((np.asarray(model(self.data[2])).argmax(1) == self.data[3]).mean())

    def metric_eval(self, original, new):
        return original - new <= self.tolerance, original - new


class ExactEvaluator(DigitsEvaluator):
    """A metric only float models meet: the largest logit difference to TensorFlow's FP32 logits."""

    def __init__(self, data, reference):
        super().__init__(data)
        self.reference = reference

    def evaluate(self, model):
        return float(np.abs(np.asarray(model(self.data[2])) - self.reference).max())

    def metric_eval(self, original, new):
        return new <= original + 1e-3, new - original


def test_accuracy_based_auto_calibration_and_analyze(models, data, tmp_path):
    model, fp32 = models("deconv")
    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), model, batch_num=2)
    result = amct.accuracy_based_auto_calibration(model, DigitsEvaluator(data), str(cfg), str(tmp_path / "r.txt"),
                                                  str(tmp_path / "auto"))
    deploy = tmp_path / "auto" / "model_deploy_model.onnx"
    acc = onnx_accuracy(deploy, data[2], data[3])
    assert acc >= fp32 - 0.005 and result.original_metric == pytest.approx(fp32), (fp32, acc, result)
    # a metric no quantized model meets: the ranking (computed on the kept NHWC calibration batches) is written and
    # every layer goes back to float
    strict = amct.accuracy_based_auto_calibration(model, ExactEvaluator(data, np.asarray(model(data[2]))), str(cfg),
                                                  str(tmp_path / "r2.txt"), str(tmp_path / "strict"))
    ranking = json.loads((tmp_path / "strict" / "ranking_information.json").read_text())
    assert names(model, "Conv2DTranspose")[0] in json.dumps(ranking)
    assert set(strict.float_layers) >= {n for n, c in json.loads(cfg.read_text()).items()
                                        if isinstance(c, dict) and c.get("quant_enable") and n in json.dumps(ranking)}
    report = amct.analyze(model, tmp_path / "auto" / "model_fake_quant_model.onnx", [data[2][:100]])
    layers = {e.layer for e in report.layers}
    assert layers and layers <= set(json.loads(cfg.read_text())), layers
    assert all(0.9 < e.cosine <= 1.0 + 1e-6 for e in report.layers), [(e.layer, e.cosine) for e in report.layers]


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "tensorflow_ptq.py"


def test_readme_shows_the_tensorflow_example_verbatim():
    code = EXAMPLE.read_text()
    block = code[code.index("# 1. generate"):code.index("# 5. test both")].rstrip()
    assert block in (EXAMPLE.parents[1] / "README.md").read_text()


def test_tensorflow_example_runs_as_written(tmp_path):
    res = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    fp32, fake, deploy = map(float, re.search(r"FP32 \(TensorFlow\) ([\d.]+).*fake-quant \(ORT\) ([\d.]+).*deploy INT8 "
                                              r"\(ORT\) ([\d.]+)", res.stdout).groups())
    assert fp32 > 0.85 and deploy >= fp32 - 0.01 and fake >= fp32 - 0.01, res.stdout
    assert (tmp_path / "results" / "user_model_deploy_model.onnx").is_file()
