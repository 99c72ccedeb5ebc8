"""The Caffe reader and converter against an independent Caffe implementation: OpenCV's dnn module reads the
same files omct writes, and its outputs must equal those of omct's ONNX graph in ONNX Runtime (max abs
difference <= 1e-4 on values of order 1, relative for larger ones). Also V1 files and the one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from caffe_models import NetBuilder, write_v1
from conftest import ort_run
from onnx import TensorProto, helper

from omct.caffe import convert, load_net
from omct.errors import ModelError

cv2 = pytest.importorskip("cv2")

TOL = 1e-4


def _opencv(proto, weights, x, names):
    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    net.setInput(x)
    outs = net.forward(names)
    return [np.asarray(o) for o in outs]


def _omct(proto, weights, x, also=()):
    """Outputs of omct's ONNX graph in ONNX Runtime, by blob name (``also``: intermediate blobs to read too)."""
    conversion = convert(load_net(proto, weights), str(weights))
    model = conversion.model
    names = list(conversion.outputs) + [n for n in also if n not in conversion.outputs]
    for n in names[len(conversion.outputs):]:
        model.graph.output.append(helper.make_tensor_value_info(n, TensorProto.FLOAT, None))
    return dict(zip(names, ort_run(model.SerializeToString(), {"data": x}), strict=True)), conversion


def _check(b: NetBuilder, tmp_path, x, names, tol=TOL):
    proto, weights = b.save(tmp_path, "net")
    ours, _ = _omct(proto, weights, x, names)
    theirs = _opencv(proto, weights, x, names)
    for name, ref in zip(names, theirs, strict=True):
        got = ours[name]
        assert got.size == ref.size, f"{name}: omct {got.shape} vs OpenCV {ref.shape}"
        got = got.reshape(ref.shape)
        scale = max(1.0, float(np.abs(ref).max()))
        assert np.abs(got - ref).max() <= tol * scale, f"{name}: max diff {np.abs(got - ref).max():.3g}"
    return ours


def _w(rng, *shape, scale=0.3):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


CIN, H, W = 4, 9, 11  # odd sizes: Caffe's ceil rounding and ONNX's floor differ on them


def _case_conv(b, rng):
    b.add("conv_g", "Convolution", "data", blobs=[_w(rng, 6, 2, 3, 3), _w(rng, 6)],
          convolution_param={"num_output": 6, "kernel_size": [3], "group": 2, "pad_h": 2, "pad_w": 1, "stride": [2]})
    b.add("conv_d", "Convolution", "data", blobs=[_w(rng, 5, 4, 3, 2)],
          convolution_param={"num_output": 5, "kernel_h": 3, "kernel_w": 2, "dilation": [2], "pad": [1],
                             "bias_term": False})
    return ["conv_g", "conv_d"]


def _case_deconv(b, rng):
    b.add("deconv", "Deconvolution", "data", blobs=[_w(rng, 4, 3, 4, 4), _w(rng, 6)],
          convolution_param={"num_output": 6, "kernel_size": [4], "stride": [2], "pad": [1], "group": 2})
    return ["deconv"]


def _case_innerproduct(b, rng):
    b.add("ip", "InnerProduct", "data", blobs=[_w(rng, 7, CIN * H * W, scale=0.05), _w(rng, 7)],
          inner_product_param={"num_output": 7})
    b.add("ip_nobias", "InnerProduct", "ip", blobs=[_w(rng, 3, 7)], inner_product_param={"num_output": 3,
                                                                                         "bias_term": False})
    return ["ip", "ip_nobias"]


def _case_pooling(b, rng):
    b.add("max_ceil", "Pooling", "data", pooling_param={"pool": 0, "kernel_size": 3, "stride": 2})
    b.add("max_pad", "Pooling", "data", pooling_param={"pool": 0, "kernel_size": 3, "stride": 2, "pad": 1})
    b.add("ave_ceil", "Pooling", "data", pooling_param={"pool": 1, "kernel_size": 3, "stride": 2})
    b.add("ave_pad", "Pooling", "data", pooling_param={"pool": 1, "kernel_size": 2, "stride": 2, "pad": 1})
    b.add("ave_pad_ceil", "Pooling", "data", pooling_param={"pool": 1, "kernel_h": 3, "kernel_w": 2, "stride_h": 2,
                                                            "stride_w": 3, "pad_h": 1, "pad_w": 1})
    b.add("global_ave", "Pooling", "data", pooling_param={"pool": 1, "global_pooling": True})
    b.add("global_max", "Pooling", "data", pooling_param={"pool": 0, "global_pooling": True})
    return ["max_ceil", "max_pad", "ave_ceil", "ave_pad", "ave_pad_ceil", "global_ave", "global_max"]


def _case_activations(b, rng):
    b.add("relu", "ReLU", "data")
    b.add("leaky", "ReLU", "data", relu_param={"negative_slope": 0.1})
    b.add("prelu", "PReLU", "data", blobs=[_w(rng, CIN)])
    b.add("prelu_shared", "PReLU", "data", blobs=[[0.25]], prelu_param={"channel_shared": True})
    b.add("sigmoid", "Sigmoid", "data")
    b.add("tanh", "TanH", "data")
    return ["relu", "leaky", "prelu", "prelu_shared", "sigmoid", "tanh"]


def _case_batchnorm(b, rng):
    # BatchNorm + Scale after a Concat (nothing to fold into), and a Scale with bias on its own
    b.add("cat", "Concat", ["data", "data"])
    b.add("bn", "BatchNorm", "cat", "cat", blobs=[_w(rng, 2 * CIN) * 3, np.abs(_w(rng, 2 * CIN)) * 6 + 0.5, [3.0]])
    b.add("bn_scale", "Scale", "cat", "cat", blobs=[_w(rng, 2 * CIN) + 1, _w(rng, 2 * CIN)],
          scale_param={"bias_term": True})
    b.add("bn_out", "ReLU", "cat")
    b.add("scale", "Scale", "data", blobs=[_w(rng, CIN) + 1, _w(rng, CIN)], scale_param={"bias_term": True})
    b.add("bn_alone", "BatchNorm", "data", blobs=[_w(rng, CIN), np.abs(_w(rng, CIN)) + 0.5, [1.0]],
          batch_norm_param={"eps": 1e-3})
    return ["bn_out", "scale", "bn_alone"]


def _case_eltwise(b, rng):
    b.add("a", "Convolution", "data", blobs=[_w(rng, CIN, CIN, 1, 1), _w(rng, CIN)],
          convolution_param={"num_output": CIN, "kernel_size": [1]})
    b.add("sum_coeff", "Eltwise", ["data", "a", "data"], eltwise_param={"operation": 1, "coeff": [0.5, -1.5, 2.0]})
    b.add("prod", "Eltwise", ["data", "a"], eltwise_param={"operation": 0})
    b.add("emax", "Eltwise", ["data", "a"], eltwise_param={"operation": 2})
    return ["sum_coeff", "prod", "emax"]


def _case_shapes(b, rng):
    b.add("cat1", "Concat", ["data", "data"], concat_param={"axis": 3})
    b.add("flat", "Flatten", "data")
    b.add("flat2", "Flatten", "data", flatten_param={"axis": 2})
    b.add("resh", "Reshape", "data", reshape_param={"shape": {"dim": [0, -1, H]}})
    b.add("drop", "Dropout", "data", "drop_out", dropout_param={"dropout_ratio": 0.3})
    b.add("after_drop", "TanH", "drop_out")
    b.add("soft", "Softmax", "data")
    b.add("soft2", "Softmax", "data", softmax_param={"axis": 3})
    return ["cat1", "flat", "flat2", "resh", "after_drop", "soft", "soft2"]


def _case_lrn(b, rng):
    b.add("lrn", "LRN", "data", lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75})
    b.add("lrn_within", "LRN", "data", lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75, "norm_region": 1})
    return ["lrn", "lrn_within"]


def _case_ssd(b, rng):
    b.add("perm", "Permute", "data", permute_param={"order": [0, 2, 3, 1]})
    b.add("norm", "Normalize", "data", blobs=[np.abs(_w(rng, CIN)) * 20], norm_param={"across_spatial": False,
                                                                                      "channel_shared": False})
    b.add("norm_all", "Normalize", "data", blobs=[[10.0]], norm_param={"across_spatial": True})
    b.add("conv_f", "Convolution", "data", blobs=[_w(rng, 2, CIN, 3, 3)],
          convolution_param={"num_output": 2, "kernel_size": [3], "stride": [2], "bias_term": False})
    b.add("prior", "PriorBox", ["conv_f", "data"], prior_box_param={
        "min_size": [4.0], "max_size": [8.0], "aspect_ratio": [2.0, 3.0], "flip": True, "clip": True,
        "variance": [0.1, 0.1, 0.2, 0.2]})
    # OpenCV clips every prior to [0, 1] whatever `clip` says and ignores img_size/img_h/img_w (it takes the
    # image blob's size): compared with clip on and the image size from the blob; SSD's Caffe honours both
    b.add("prior2", "PriorBox", ["conv_f", "data"], prior_box_param={
        "min_size": [3.0], "aspect_ratio": [2.0], "flip": False, "clip": True, "step_h": 5.0, "step_w": 4.0, "offset": 0.3,
        "variance": [0.1]})
    return ["perm", "norm", "norm_all", "prior", "prior2"]


CASES = {f.__name__[6:]: f for f in (_case_conv, _case_deconv, _case_innerproduct, _case_pooling, _case_activations,
                                      _case_batchnorm, _case_eltwise, _case_shapes, _case_lrn, _case_ssd)}


@pytest.mark.parametrize("case", list(CASES))
def test_layer_outputs_equal_opencv(case, tmp_path, rng):
    b = NetBuilder(case, (2, CIN, H, W))
    names = CASES[case](b, rng)
    x = rng.standard_normal((2, CIN, H, W)).astype(np.float32)
    _check(b, tmp_path, x, names)


def test_innerproduct_axis_and_transpose_against_numpy(tmp_path, rng):
    """OpenCV ignores InnerProduct's transpose; numpy is the reference here."""
    b = NetBuilder("ip", (2, CIN, H, W))
    wt, w2 = _w(rng, H * W, 5), _w(rng, 3, W)
    b.add("ip_t", "InnerProduct", "data", blobs=[wt, _w(rng, 5)], inner_product_param={
        "num_output": 5, "transpose": True, "axis": 2, "bias_term": False})
    b.add("ip_axis3", "InnerProduct", "data", blobs=[w2], inner_product_param={
        "num_output": 3, "axis": 3, "bias_term": False})
    proto, weights = b.save(tmp_path, "ip")
    x = rng.standard_normal((2, CIN, H, W)).astype(np.float32)
    ours, conversion = _omct(proto, weights, x)
    np.testing.assert_allclose(ours["ip_t"], x.reshape(2, CIN, H * W) @ wt, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["ip_axis3"], x @ w2.T, rtol=1e-4, atol=1e-4)
    assert "axis 2, transpose true" in conversion.constraints["ip_t"]


def test_lrn_k_against_numpy(tmp_path, rng):
    """OpenCV's Caffe importer ignores LRN's ``k`` (it reads ``bias``); numpy is the reference for k != 1."""
    b = NetBuilder("lrn", (2, CIN, H, W))
    b.add("lrn", "LRN", "data", lrn_param={"local_size": 3, "alpha": 0.5, "beta": 0.75, "k": 2.0})
    x = rng.standard_normal((2, CIN, H, W)).astype(np.float32)
    ours, _ = _omct(*b.save(tmp_path, "lrn"), x)
    sq = np.pad(x ** 2, ((0, 0), (1, 1), (0, 0), (0, 0)))
    np.testing.assert_allclose(ours["lrn"], x / (2.0 + 0.5 / 3 * (sq[:, :-2] + sq[:, 1:-1] + sq[:, 2:])) ** 0.75,
                               atol=1e-6)


def _plain_cnn(rng, width=8):
    """A V1-expressible network (no BatchNorm): conv, ReLU, LRN, pooling, concat, dropout, inner product."""
    b = NetBuilder("v1net", (2, 1, 16, 16))
    b.add("conv1", "Convolution", "data", blobs=[_w(rng, width, 1, 5, 5), _w(rng, width)],
          convolution_param={"num_output": width, "kernel_size": [5], "pad": [2]})
    b.add("relu1", "ReLU", "conv1", "conv1")
    b.add("norm1", "LRN", "conv1", lrn_param={"local_size": 5, "alpha": 1e-3, "beta": 0.75})
    b.add("pool1", "Pooling", "norm1", pooling_param={"pool": 0, "kernel_size": 3, "stride": 2})
    b.add("conv2", "Convolution", "pool1", blobs=[_w(rng, width, width, 3, 3, scale=0.1), _w(rng, width)],
          convolution_param={"num_output": width, "kernel_size": [3], "pad": [1]})
    b.add("cat", "Concat", ["pool1", "conv2"])
    b.add("pool2", "Pooling", "cat", pooling_param={"pool": 1, "kernel_size": 3, "stride": 2})
    b.add("fc1", "InnerProduct", "pool2", blobs=[_w(rng, 10, 2 * width * 16, scale=0.05), _w(rng, 10)],
          inner_product_param={"num_output": 10})
    b.add("drop", "Dropout", "fc1", "fc1")
    b.add("prob", "Softmax", "fc1")
    return b


def test_v1_layers_file_reads_like_the_current_format(tmp_path, rng):
    b = _plain_cnn(rng)
    x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)
    ours = _check(b, tmp_path, x, ["prob", "fc1"])
    proto, weights = write_v1(b, tmp_path, "v1")
    assert "layers {" in proto.read_text() and "CONVOLUTION" in proto.read_text()
    v1, _ = _omct(proto, weights, x)
    np.testing.assert_allclose(v1["prob"], ours["prob"], atol=1e-6)
    np.testing.assert_allclose(_opencv(proto, weights, x, ["prob"])[0], v1["prob"], atol=TOL)


def test_net_level_input_shape_and_batch_free(tmp_path, rng):
    """``input`` + ``input_shape`` declares the input as well as an Input layer; any batch size runs."""
    b = _plain_cnn(rng)
    x = rng.standard_normal((5, 1, 16, 16)).astype(np.float32)
    ours, _ = _omct(*b.save(tmp_path, "layer"), x)
    del b.net.layer[0]
    b.net.input.append("data")
    b.net.input_shape.add().dim.extend([1, 1, 16, 16])
    proto, weights = b.save(tmp_path, "net_input")
    assert "input_shape" in proto.read_text()
    theirs, _ = _omct(proto, weights, x)
    np.testing.assert_allclose(theirs["prob"], ours["prob"], atol=1e-6)
    np.testing.assert_allclose(_opencv(proto, weights, x, ["prob"])[0], ours["prob"], atol=TOL)


# -- errors: one line naming the file, layer, blob ---------------------------------------------------------------

def _small(tmp_path, rng):
    b = NetBuilder("small", (1, 1, 8, 8))
    b.add("conv1", "Convolution", "data", blobs=[_w(rng, 4, 1, 3, 3), _w(rng, 4)],
          convolution_param={"num_output": 4, "kernel_size": [3]})
    b.add("fc", "InnerProduct", "conv1", blobs=[_w(rng, 3, 4 * 36), _w(rng, 3)], inner_product_param={"num_output": 3})
    return b, *b.save(tmp_path, "small")


def test_truncated_caffemodel(tmp_path, rng):
    _, proto, weights = _small(tmp_path, rng)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 37])
    with pytest.raises(ModelError, match=r"weights_file '.*small.caffemodel'.*(truncated|no weights|blob)"):
        convert(load_net(proto, weights), str(weights))


def test_prototxt_syntax_error_names_its_line(tmp_path, rng):
    _, proto, weights = _small(tmp_path, rng)
    lines = proto.read_text().splitlines()
    lines[6] = lines[6] + " {"  # an unclosed brace / stray token on line 7
    proto.write_text("\n".join(lines))
    with pytest.raises(ModelError, match=r"model_file '.*small.prototxt': line \d+"):
        load_net(proto, weights)
    proto.write_text('name: "x"\nlayer {\n  name: "a"\n  type: "ReLU"\n  bottom: "data" top: \n}\n')
    with pytest.raises(ModelError, match=r"line 6"):
        load_net(proto, weights)
    proto.write_text('layer {\n  name: "c"\n  type: "Convolution"\n  convolution_param { num_ouput: 3 }\n}\n')
    with pytest.raises(ModelError, match=r"line 4: .*\"num_ouput\"; did you mean 'num_output'\?"):
        load_net(proto, weights)


def test_blob_shape_mismatch_names_blob_and_shapes(tmp_path, rng):
    b, proto, weights = _small(tmp_path, rng)
    b.net.layer[1].convolution_param.num_output = 5  # the prototxt now wants 5 output channels
    proto.write_text(proto.read_text().replace("num_output: 4", "num_output: 5"))
    with pytest.raises(ModelError, match=r"layer 'conv1' \(Convolution\) blob 0 \(weights\) has shape \(4, 1, 3, 3\) "
                                         r"but the prototxt needs \(5, 1, 3, 3\)"):
        convert(load_net(proto, weights), str(weights))


def test_unknown_layer_type_and_missing_weights(tmp_path, rng):
    _, proto, weights = _small(tmp_path, rng)
    text = proto.read_text()
    proto.write_text(text + 'layer { name: "odd" type: "Crop" bottom: "fc" top: "odd" }\n')
    with pytest.raises(ModelError, match=r"layer 'odd' has type 'Crop', which omct cannot convert"):
        convert(load_net(proto, weights), str(weights))
    proto.write_text(text.replace('name: "fc"', 'name: "fc_renamed"'))
    with pytest.raises(ModelError, match=r"layer 'fc_renamed' \(InnerProduct\) has no weights in weights_file"):
        convert(load_net(proto, weights), str(weights))
    with pytest.raises(ModelError, match=r"weights_file '.*small.prototxt' is not a Caffe weights file"):
        load_net(proto, proto)
