"""AMCT's Caffe call sequence on a Caffe classifier trained here (BatchNorm + Scale, Eltwise residuals, ceil-mode
pooling): deploy accuracy within 1 point of FP32 with integer kernels, and a Caffe pair that OpenCV loads whose
weights lie on their quantization grid."""

from __future__ import annotations

import json

import caffe_models
import numpy as np
import pytest
from caffe_models import opencv_accuracy
from conftest import assert_integer_kernels, ort_run

import omct.caffe as amct
from omct.caffe.netio import blob_array, read_caffemodel, read_prototxt
from omct.errors import ConfigError, ModelError, OmctError, OutputPathError
from omct.formats.record import read_record

cv2 = pytest.importorskip("cv2")
pytestmark = pytest.mark.slow
caffe_resnet = caffe_models.caffe_resnet  # the session fixture: the trained Caffe classifier


def _opencv_accuracy(proto, weights, digits) -> float:
    return opencv_accuracy(proto, weights, digits.x_test, digits.y_test)


def _calibrate(tmp_path, proto, weights, digits, batches=4, cfg=None, **kwargs):
    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=batches, config_defination=cfg, **kwargs)
    graph = amct.init(str(config), str(proto), str(weights), str(record))
    session = amct.quantize_model(graph, str(tmp_path / "modified.prototxt"), str(tmp_path / "modified.caffemodel"))
    outs = [session.run(None, {"data": digits.x_train[i * 64:(i + 1) * 64]})[0] for i in range(batches)]
    return graph, session, outs, config, record


def test_uniform_ptq_deploy_within_one_point_and_caffe_pair(tmp_path, caffe_resnet, digits):
    proto, weights, fp32 = caffe_resnet
    graph, session, outs, config, record = _calibrate(tmp_path, proto, weights, digits)
    assert session.complete
    # the session computes what Caffe computes (OpenCV as the reference), fed by the input blob's name
    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    net.setInput(digits.x_train[:64])
    np.testing.assert_allclose(outs[0], net.forward(), atol=1e-5)
    modified = cv2.dnn.readNetFromCaffe(str(tmp_path / "modified.prototxt"), str(tmp_path / "modified.caffemodel"))
    modified.setInput(digits.x_train[:64])
    np.testing.assert_allclose(modified.forward(), outs[0], atol=1e-5)  # the float network omct calibrated
    layers = json.loads(config.read_text())
    assert {"conv1", "res2a_branch2a", "res3a_branch1", "fc10", "pool5"} <= set(layers)  # Caffe layer names
    amct.save_model(graph, "Both", str(tmp_path / "resnet"))

    deploy = tmp_path / "resnet_deploy_model.onnx"
    fake = tmp_path / "resnet_fake_quant_model.onnx"
    acc = {p.name: float((ort_run(p, {"data": digits.x_test})[0].argmax(1) == digits.y_test).mean())
           for p in (deploy, fake)}
    assert fp32 > 0.95
    assert min(acc.values()) >= fp32 - 0.01, (fp32, acc)
    assert_integer_kernels(deploy, tmp_path)

    # the Caffe pair: BatchNorm + Scale folded, weights on the grid of the record's scales, loadable by OpenCV
    pair = tmp_path / "resnet_fake_quant_model.prototxt", tmp_path / "resnet_fake_quant_weights.caffemodel"
    assert {layer.type for layer in read_prototxt(pair[0]).layer}.isdisjoint({"BatchNorm", "Scale"})
    records = read_record(record)
    checked = 0
    for layer in read_caffemodel(pair[1]).layer:
        if layer.type in ("Convolution", "InnerProduct"):
            w = blob_array(layer.blobs[0])
            scale = np.asarray(records[layer.name].scale_w, np.float64).reshape(-1, *([1] * (w.ndim - 1)))
            codes = w / scale
            assert np.abs(codes - np.round(codes)).max() < 1e-3 and np.abs(codes).max() <= 127.5, layer.name
            checked += 1
    assert checked == 7  # six convolutions and the classifier
    assert _opencv_accuracy(*pair, digits) >= fp32 - 0.01


def test_cfg_names_caffe_types(tmp_path, caffe_resnet, digits):
    """A .cfg overrides and skips by Caffe type, as AMCT's Caffe samples write them; ONNX types are refused."""
    proto, weights, _ = caffe_resnet
    cfg = tmp_path / "quant.cfg"
    cfg.write_text('batch_num: 2\nskip_layer_types: "InnerProduct"\n'
                   'override_layer_types { layer_type: "Pooling" calibration_config { '
                   'ifmr_quantize { search_range_start: 0.8 search_range_end: 1.2 search_step: 0.02 } } }\n')
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(proto), str(weights), config_defination=str(cfg))
    layers = json.loads(config.read_text())
    assert layers["fc10"]["quant_enable"] is False
    assert layers["pool5"]["activation_quant_params"]["search_range"] == pytest.approx([0.8, 1.2])
    assert layers["conv1"]["activation_quant_params"]["search_range"] != layers["pool5"]["activation_quant_params"][
        "search_range"]
    cfg.write_text('skip_layer_types: "Gemm"\n')
    with pytest.raises(ConfigError, match="Gemm"):
        amct.create_quant_config(str(config), str(proto), str(weights), config_defination=str(cfg))


def test_save_model_types_and_mistakes(tmp_path, caffe_resnet, digits):
    proto, weights, _ = caffe_resnet
    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=2, skip_layers=["conv1"])
    graph = amct.init(str(config), str(proto), str(weights), str(record))
    with pytest.raises(ModelError, match="call quantize_model"):
        amct.save_model(graph, "Both", str(tmp_path / "early"))
    session = amct.quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    session.run(None, {"data": digits.x_train[:32]})
    with pytest.raises(OmctError, match="record file"):  # one batch of two: the record is still pending
        amct.save_model(graph, "Both", str(tmp_path / "early"))
    session.run(None, {"data": digits.x_train[32:64]})
    with pytest.raises(ConfigError, match="save_type 'Nope'"):
        amct.save_model(graph, "Nope", str(tmp_path / "q"))
    amct.save_model(graph, "Deploy", str(tmp_path / "d"))
    assert sorted(p.name for p in tmp_path.glob("d_*")) == ["d_deploy_model.onnx"]
    assert "conv1" not in read_record(record)
    with pytest.raises(OutputPathError):
        amct.quantize_model(graph, str(proto), str(tmp_path / "x.caffemodel"))


def test_deconvolution_pooling_and_refused_innerproduct(tmp_path, rng):
    """Deconvolution and AVE Pooling (with Caffe's padded ceil rounding) are quantized and written back; an
    InnerProduct with transpose stays float with AMCT's reason; the Caffe pair still loads in OpenCV."""
    from caffe_models import NetBuilder

    b = NetBuilder("mixed", (1, 3, 12, 12))
    b.add("conv", "Convolution", "data", blobs=[rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
                                                np.zeros(8, np.float32)],
          convolution_param={"num_output": 8, "kernel_size": [3], "pad": [1]})
    b.add("relu", "ReLU", "conv", "conv")
    b.add("up", "Deconvolution", "conv", blobs=[rng.standard_normal((8, 4, 2, 2)).astype(np.float32) * 0.3],
          convolution_param={"num_output": 4, "kernel_size": [2], "stride": [2], "bias_term": False})
    b.add("pool", "Pooling", "up", pooling_param={"pool": 1, "kernel_size": 3, "stride": 2, "pad": 1})
    b.add("ip_t", "InnerProduct", "pool", blobs=[rng.standard_normal((4 * 13 * 13, 5)).astype(np.float32) * 0.05],
          inner_product_param={"num_output": 5, "transpose": True, "bias_term": False})
    proto, weights = b.save(tmp_path, "mixed")
    config, record = tmp_path / "c.json", tmp_path / "r.txt"
    amct.create_quant_config(str(config), str(proto), str(weights), batch_num=1)
    layers = json.loads(config.read_text())
    assert {"conv", "up", "pool"} <= set(layers) and "ip_t" not in layers
    graph = amct.init(str(config), str(proto), str(weights), str(record))
    assert any(r.name == "ip_t" and "no transpose" in r.reason for r in graph.prep.prepared.refused)
    session = amct.quantize_model(graph, str(tmp_path / "m.prototxt"), str(tmp_path / "m.caffemodel"))
    session.run(None, {"data": rng.standard_normal((32, 3, 12, 12)).astype(np.float32)})
    amct.save_model(graph, "Fakequant", str(tmp_path / "q"))
    written = {layer.name: layer for layer in read_caffemodel(tmp_path / "q_fake_quant_weights.caffemodel").layer}
    scale = np.asarray(read_record(record)["up"].scale_w, np.float64)
    codes = blob_array(written["up"].blobs[0]) / scale.reshape(1, -1, 1, 1)  # Deconvolution: output channels on axis 1
    assert np.abs(codes - np.round(codes)).max() < 1e-3
    np.testing.assert_array_equal(blob_array(written["ip_t"].blobs[0]), blob_array(b.net.layer[-1].blobs[0]))
    net = cv2.dnn.readNetFromCaffe(str(tmp_path / "q_fake_quant_model.prototxt"),
                                   str(tmp_path / "q_fake_quant_weights.caffemodel"))
    net.setInput(np.ones((1, 3, 12, 12), np.float32))
    assert net.forward().shape == (1, 5)
