"""NUQ and automatic NUQ on a Caffe classifier trained here: AMCT's .cfg (``nuq_config``, ``override_layer_types``
naming Caffe's ``Pooling``) as written, and seed 002's ``auto_nuq`` example as written, its evaluator reading the
prototxt and caffemodel it is given with OpenCV's Caffe importer."""

from __future__ import annotations

import json
from pathlib import Path

import caffe_models
import numpy as np
import pytest
from caffe_models import opencv_accuracy
from conftest import assert_integer_kernels, ort_run

import omct.caffe as amct
from omct.caffe.auto_nuq import AutoNuqEvaluatorBase
from omct.caffe.netio import blob_array, read_caffemodel
from omct.core import nuq
from omct.errors import CalibrationError
from omct.formats.record import read_record

cv2 = pytest.importorskip("cv2")
pytestmark = pytest.mark.slow
caffe_resnet = caffe_models.caffe_resnet  # the session fixture: the trained Caffe classifier

# AMCT's Caffe NUQ sample configuration, as its users write it (the mapping file is the Ascend compiler's; absent
# here, so NUQ applies to every layer that can take it)
AMCT_CFG = """activation_offset : true
batch_num : 2
nuq_config {
    mapping_file : "./nuq_conf/resnet_quantized.json"
    nuq_quantize : { num_steps : %d num_of_iteration : 1 }
}
override_layer_types : {
    layer_type : "Pooling"
    calibration_config : { ifmr_quantize : { search_range_start : 0.8 search_range_end : 1.2 search_step : 0.02 } }
}
"""


def _codes_on_levels(weights_file, records) -> dict[str, int]:
    """Per weighted layer of a written caffemodel: the most distinct INT8 codes one output channel uses; asserts
    they are that channel's NUQ levels in the record when it has them (one table per weight scale)."""
    used = {}
    for layer in read_caffemodel(weights_file).layer:
        if layer.type not in ("Convolution", "InnerProduct"):
            continue
        w = blob_array(layer.blobs[0])
        rec = records[layer.name]
        codes = w / np.asarray(rec.scale_w, np.float64).reshape(-1, *([1] * (w.ndim - 1)))
        assert np.abs(codes - np.round(codes)).max() < 1e-3, layer.name
        codes = np.round(codes).astype(int).reshape(len(w), -1)
        if rec.nuq_levels:
            table = nuq.level_table(rec.nuq_levels, len(rec.scale_w))
            for c in range(len(w)):
                assert set(codes[c]) <= set(table[c if len(table) > 1 else 0]), (layer.name, c)
        used[layer.name] = max(len(np.unique(row)) for row in codes)
    return used


def test_static_nuq_with_amct_cfg(tmp_path, caffe_resnet, digits):
    proto, weights, fp32 = caffe_resnet
    cfg = tmp_path / "nuq.cfg"
    cfg.write_text(AMCT_CFG % 16)
    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(str(config), str(proto), str(weights), config_defination=str(cfg))
    layers = json.loads(config.read_text())
    assert layers["res2a_branch2a"]["weight_quant_params"]["wts_algo"] == "nuq_quantize"
    graph = amct.init(str(config), str(proto), str(weights), str(record))
    session = amct.quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    for i in range(2):
        session.run(None, {"data": digits.x_train[i * 64:(i + 1) * 64]})
    amct.save_model(graph, "Both", str(tmp_path / "nuq"))
    used = _codes_on_levels(tmp_path / "nuq_fake_quant_weights.caffemodel", read_record(record))
    assert len(used) == 7 and max(used.values()) <= 16, used
    deploy = tmp_path / "nuq_deploy_model.onnx"
    assert float((ort_run(deploy, {"data": digits.x_test})[0].argmax(1) == digits.y_test).mean()) >= fp32 - 0.01
    assert_integer_kernels(deploy, tmp_path)
    pair = tmp_path / "nuq_fake_quant_model.prototxt", tmp_path / "nuq_fake_quant_weights.caffemodel"
    assert opencv_accuracy(*pair, digits.x_test, digits.y_test) >= fp32 - 0.01


def test_seed_002_auto_nuq_as_written(tmp_path, caffe_resnet, digits, monkeypatch):
    proto, weights, fp32 = caffe_resnet
    monkeypatch.chdir(tmp_path)
    calls = []
    BATCH_SIZE = 250  # noqa: N806 - the sample's constant

    def do_benchmark_test(args, model_file, weights_file, iterations):
        """Top-1 of ``iterations`` batches, as AMCT's sample computes it, with OpenCV as the Caffe."""
        assert Path(model_file).suffix == ".prototxt" and Path(weights_file).suffix == ".caffemodel"
        calls.append((model_file, weights_file))
        net = cv2.dnn.readNetFromCaffe(model_file, weights_file)
        top1 = 0.0
        for index in range(iterations):
            data = digits.x_test[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]
            labels = digits.y_test[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]
            net.setInput(data)
            top1 += float((net.forward().argmax(1) == labels).mean())
        return top1 / iterations

    QUANT_ARGS = None  # noqa: N806

    # seed 002, as written
    class AutoNuqEvaluator(AutoNuqEvaluatorBase):
        # Auto Nuq Evaluator
        def __init__(self, evaluate_batch_num):
            super().__init__(self)
            self.evaluate_batch_num = evaluate_batch_num

        def eval_model(self, model_file, weights_file, batch_num):
            return do_benchmark_test(QUANT_ARGS, model_file, weights_file, batch_num)

        def is_satisfied(self, original_metric, new_metric):
            # the loss of top1 acc need to be less than 1%
            if (original_metric - new_metric) * 100 < 1:
                return True
            return False

    TMP, RESULT = tmp_path / "tmp", tmp_path / "results"  # noqa: N806
    TMP.mkdir()
    cfg_define = tmp_path / "resnet_nuq.cfg"
    cfg_define.write_text(AMCT_CFG % 32)
    config_json_file = str(TMP / "config.json")
    skip_layers = []
    batch_num = 2
    activation_offset = True
    # do weights calibration with non uniform quantize configure
    amct.create_quant_config(
        config_json_file, str(proto), str(weights), skip_layers, batch_num, activation_offset, str(cfg_define))
    scale_offset_record_file = str(TMP / "scale_offset_record.txt")
    result_path = str(RESULT / "ResNet50")
    evaluator = AutoNuqEvaluator(5)
    result = amct.auto_nuq(
        str(proto), str(weights), evaluator, config_json_file, scale_offset_record_file, result_path)

    assert evaluator.is_satisfied(result.original_metric, result.metric)  # the budget is met
    assert result.original_metric == pytest.approx(fp32)
    assert result.weight_bytes < 0.5 * result.float_weight_bytes  # compressed size reported (INT8 alone: 0.25)
    assert len(calls) == result.evaluations <= result.bound
    record = json.loads((RESULT / "ResNet50" / "nuq_search_record.json").read_text())
    assert record["weight_bytes"] == result.weight_bytes and record["final_metric"] == result.metric
    out = RESULT / "ResNet50"
    pair = out / "resnet_fake_quant_model.prototxt", out / "resnet_fake_quant_weights.caffemodel"
    assert opencv_accuracy(*pair, digits.x_test, digits.y_test) >= fp32 - 0.01
    used = _codes_on_levels(pair[1], read_record(scale_offset_record_file))
    nuq_layers = [n for n, k in result.steps.items() if k]
    assert nuq_layers and all(used[n] <= result.steps[n] for n in nuq_layers), (used, result.steps)
    assert (out / "resnet_deploy_model.onnx").is_file() and not (out / "nuq_work").exists()


def test_auto_nuq_trials_reach_the_evaluator_as_caffe_pairs(tmp_path, caffe_resnet, digits):
    """A search that needs mixed trials: each eval_model call reads a caffemodel holding exactly that trial's
    weights (NUQ layers on at most num_steps values per output channel, uniform layers on more)."""
    proto, weights, _ = caffe_resnet
    x = digits.x_test[:200]
    reference = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    reference.setInput(x)
    float_out = reference.forward()
    seen: list[dict[str, int]] = []

    class Closeness(AutoNuqEvaluatorBase):
        """Closeness of the probabilities to the float model's; satisfied when closer than halfway between all
        NUQ-16 and all uniform INT8 (so the search has to mix them)."""

        metrics: list[float] = []

        def eval_model(self, model_file, weights_file, batch_num):
            net = cv2.dnn.readNetFromCaffe(model_file, weights_file)
            outs = []
            for part in np.array_split(x, batch_num):
                net.setInput(part)
                outs.append(net.forward())
            distinct = {}
            for layer in read_caffemodel(weights_file).layer:
                if layer.type == "Convolution" and len(layer.blobs[0].data) // layer.convolution_param.num_output > 64:
                    w = blob_array(layer.blobs[0]).reshape(layer.convolution_param.num_output, -1)
                    distinct[layer.name] = max(len(np.unique(row)) for row in w)
            seen.append(distinct)
            return -float(np.abs(np.concatenate(outs) - float_out).mean())

        def is_satisfied(self, original_metric, new_metric):
            if new_metric == original_metric:
                return True
            self.metrics.append(new_metric)
            if len(self.metrics) <= 2:
                return len(self.metrics) == 2  # all NUQ-16 fails, all INT8 passes
            return new_metric >= (self.metrics[0] + self.metrics[1]) / 2

    config = tmp_path / "config.json"
    (tmp_path / "n.cfg").write_text(AMCT_CFG % 16)
    amct.create_quant_config(str(config), str(proto), str(weights), config_defination=str(tmp_path / "n.cfg"))
    result = amct.auto_nuq(str(proto), str(weights), Closeness(), str(config), str(tmp_path / "record.txt"),
                           str(tmp_path / "out"))
    trials = json.loads((tmp_path / "out" / "nuq_search_record.json").read_text())["trials"]
    assert len(trials) >= 3 and result.evaluations == len(seen) <= result.bound
    assert len(set(result.steps.values())) > 1  # a mix of NUQ-16 with NUQ-32 or uniform layers
    assert {"uniform"} <= {v for t in trials for v in t["steps"].values()}
    for trial, distinct in zip(trials, seen[2:], strict=True):  # calls 0 and 1: float model, calibration
        for name, count in distinct.items():
            steps = trial["steps"][name]
            # a NUQ layer is on at most its steps levels, or stored as INT8 by NUQ's allocation (many distinct values)
            assert (count <= steps or count > 32) if steps != "uniform" else count > 32, (trial["trial"], name, count)


def test_auto_nuq_says_how_to_calibrate_when_the_evaluator_does_not(tmp_path, caffe_resnet):
    """An evaluator that never runs the calibration pair through OpenCV or omct.caffe.Net (a real Caffe would
    not feed omct) gets one line saying how, and nothing is written."""
    proto, weights, _ = caffe_resnet

    class NoCalibration(AutoNuqEvaluatorBase):
        def eval_model(self, model_file, weights_file, batch_num):
            return 1.0

        def is_satisfied(self, original_metric, new_metric):
            return original_metric - new_metric < 0.01

    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=2)
    with pytest.raises(CalibrationError, match=r"ran 0 of batch_num=2 batches.*cv2.dnn.readNetFromCaffe or omct.caffe.Net"):
        amct.auto_nuq(str(proto), str(weights), NoCalibration(), str(config), str(tmp_path / "r.txt"),
                      str(tmp_path / "out"))
    assert not (tmp_path / "r.txt").exists() and not (tmp_path / "out" / "nuq_work").exists()
