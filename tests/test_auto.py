"""Accuracy-based automatic quantization: the search finds the minimum set of float layers (checked by brute
force), within its evaluation budget, and the evaluator contract is enforced with clear messages."""

import itertools
import json
import math

import onnxruntime as ort
import pytest
import torch
from conftest import run_flow
from test_cli import imbalanced

import omct.onnx
import omct.pytorch
from omct.auto import AutoCalibrationEvaluatorBase
from omct.errors import CalibrationError, OmctError, QuantizationError


class DigitsEvaluator(AutoCalibrationEvaluatorBase):
    """Accuracy on the 500 held-out digits; at most 0.6 points (3 images) lost."""

    max_loss = 0.006

    def __init__(self, digits, batches=4):
        self.digits, self.batches, self.evaluations = digits, batches, 0

    def calibration(self, model):
        for i in range(self.batches):
            model.run(None, {"input": self.digits.x_train[i * 32:(i + 1) * 32]})

    def evaluate(self, model):
        self.evaluations += 1
        s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        return float((s.run(None, {"input": self.digits.x_test})[0].argmax(1) == self.digits.y_test).mean())


@pytest.fixture(scope="module")
def hard(trained, tmp_path_factory):
    folder = tmp_path_factory.mktemp("auto")
    _, path = trained("small_cnn")
    model = folder / "hard.onnx"
    return model, imbalanced(path, model)


def setup(model, tmp_path, batch_num=4):
    config = tmp_path / "config.json"
    omct.onnx.create_quant_config(config, model, batch_num=batch_num)
    return config


def enabled(config_dict):
    return [k for k, v in config_dict.items() if isinstance(v, dict) and v.get("quant_enable")]


@pytest.mark.parametrize("strategy", ["BinarySearch", "Greedy"])
def test_search_finds_the_minimum_float_layers(hard, digits, tmp_path, strategy):
    model, hard_layer = hard
    evaluator = DigitsEvaluator(digits)
    config = setup(model, tmp_path)
    n = len(enabled(json.loads(config.read_text())))
    result = omct.onnx.accuracy_based_auto_calibration(model, evaluator, config, tmp_path / "record.txt",
                                                       tmp_path / "out", strategy=strategy)
    assert result.float_layers == [hard_layer]
    if strategy == "BinarySearch":
        assert evaluator.evaluations <= math.ceil(math.log2(n)) + 3
    out = tmp_path / "out"
    ranking = json.loads((out / "ranking_information.json").read_text())["most_sensitive_first"]
    assert ranking[0]["layer"] == hard_layer
    final = json.loads((out / "final_config.json").read_text())
    assert final[hard_layer]["quant_enable"] is False and len(enabled(final)) == n - 1
    record = json.loads((out / "search_record.json").read_text())
    assert record["evaluations"][0]["float_layers"] == [] and not record["evaluations"][0]["ok"]
    deploy = evaluator.evaluate(str(out / "hard_deploy_model.onnx"))
    assert evaluator.metric_eval(result.original_metric, deploy)[0]


def test_brute_force_confirms_the_minimum(hard, digits, tmp_path):
    """Every set of fewer float layers than the search keeps fails; the one-layer answer is unique."""
    model, hard_layer = hard
    evaluator = DigitsEvaluator(digits)
    original = evaluator.evaluate(str(model))
    batches = [digits.x_train[i * 32:(i + 1) * 32] for i in range(4)]
    names = [s.name for s in omct.onnx.inspect_model(model).layers]
    passing = {}
    for size in (0, 1):
        for skip in itertools.combinations(names, size):
            # a conv whose reader stays in float keeps a float output, so ONNX Runtime runs it as a float conv
            fake, _ = run_flow(model, tmp_path, batches, prefix=f"b{len(passing)}", skip_layers=list(skip),
                               float_weight_ops=("Conv", "FusedConv") if skip else ())
            passing[skip] = evaluator.metric_eval(original, evaluator.evaluate(str(fake)))[0]
    assert not passing[()]
    assert [s for s, ok in passing.items() if ok] == [(hard_layer,)]


def test_evaluator_contract_errors(hard, digits, tmp_path):
    model, _ = hard

    class Words(DigitsEvaluator):
        def evaluate(self, model):
            return "high"

    with pytest.raises(OmctError, match="evaluate\\(\\) must return one number"):
        omct.onnx.accuracy_based_auto_calibration(model, Words(digits), setup(model, tmp_path), tmp_path / "r.txt",
                                                  tmp_path / "o1")
    with pytest.raises(CalibrationError, match="ran 2 of batch_num=4"):
        omct.onnx.accuracy_based_auto_calibration(model, DigitsEvaluator(digits, batches=2), setup(model, tmp_path),
                                                  tmp_path / "r.txt", tmp_path / "o2")

    class Never(DigitsEvaluator):
        def metric_eval(self, original, new):
            return False, 1.0

    with pytest.raises(OmctError, match="float model must pass its own test"):
        omct.onnx.accuracy_based_auto_calibration(model, Never(digits), setup(model, tmp_path), tmp_path / "r.txt",
                                                  tmp_path / "o3")

    class OnlyTheOriginal(DigitsEvaluator):
        """A metric no quantized model can meet, not even with every layer in float."""

        def evaluate(self, path):
            return super().evaluate(path) - (0.0 if path == str(model) else 0.5)

    with pytest.raises(QuantizationError, match="no model written"):
        omct.onnx.accuracy_based_auto_calibration(model, OnlyTheOriginal(digits), setup(model, tmp_path),
                                                  tmp_path / "r.txt", tmp_path / "o4")
    assert not list((tmp_path / "o4").glob("hard_*"))


@pytest.mark.slow
def test_pytorch_frontend_finds_the_hard_layer(digits, tmp_path):
    """The same search on an nn.Module: a CNN whose first conv has one channel 1000x the others."""
    import zoo

    torch.manual_seed(0)
    model = zoo.train(zoo.small_cnn(16), digits, epochs=6)
    with torch.no_grad():
        bn1, conv2 = model[1], model[3]
        bn1.weight[0] *= 1000.0
        bn1.bias[0] *= 1000.0
        conv2.weight[:, 0] /= 1000.0

    class Evaluator(AutoCalibrationEvaluatorBase):
        max_loss = 0.006

        def calibration(self, m):
            with torch.no_grad():
                for i in range(4):
                    m(torch.tensor(digits.x_train[i * 32:(i + 1) * 32]))

        def evaluate(self, m):
            with torch.no_grad():
                return float((m(torch.tensor(digits.x_test)).argmax(1).numpy() == digits.y_test).mean())

    x = torch.tensor(digits.x_test[:2])
    config = tmp_path / "config.json"
    omct.pytorch.create_quant_config(config, model, x, batch_num=4)
    result = omct.pytorch.accuracy_based_auto_calibration(
        model, Evaluator(), config, tmp_path / "record.txt", tmp_path / "out", x, input_names=["input"],
        dynamic_axes={"input": {0: "n"}})
    assert result.float_layers == ["3"]
    assert (tmp_path / "out" / "model_deploy_model.onnx").is_file()
