"""Deploy-model speed rewrites that must not change a single output: a Conv's kernel taps that read only padding
are dropped in the deploy model (ONNX Runtime's integer QLinearConv computes them, its float kernels do not)."""

import itertools

import numpy as np
import onnx
import pytest
from conftest import optimized_ops, ort_run, run_flow
from onnx import helper
from onnx_builders import make_model, vi

from omct.graph.export import DeployBuilder, live_taps, trim_padding_taps


def _conv(w, spatial, strides, pads, dilations, groups=1, name="conv"):
    node = helper.make_node("Conv", ["x", "w"], ["y"], name=name, strides=list(strides), pads=list(pads),
                            dilations=list(dilations), group=groups, kernel_shape=list(w.shape[2:]))
    return make_model([node], [vi("x", [2, w.shape[1] * groups, *spatial])], [vi("y", None)], {"w": w}), node


def test_trimmed_convolution_equals_the_full_one_in_onnx_runtime(rng):
    """Random sizes, kernels, strides, pads and dilations: ONNX Runtime's float Conv is the reference."""
    trimmed = 0
    for _ in range(60):
        k = tuple(int(v) for v in rng.integers(1, 6, 2))
        spatial = tuple(int(v) for v in rng.integers(1, 6, 2))
        strides, dilations = tuple(int(v) for v in rng.integers(1, 4, 2)), tuple(int(v) for v in rng.integers(1, 3, 2))
        pads = tuple(int(v) for v in rng.integers(0, 4, 4))
        if any(spatial[a] + pads[a] + pads[a + 2] < dilations[a] * (k[a] - 1) + 1 for a in range(2)):
            continue  # no output at all
        w = rng.normal(size=(3, 2, *k)).astype(np.float32)
        model, node = _conv(w, spatial, strides, pads, dilations)
        x = rng.normal(size=(2, 2, *spatial)).astype(np.float32)
        ref = ort_run(model.SerializeToString(), {"x": x})[0]
        node = model.graph.node[0]
        w2 = trim_padding_taps(node, w, (k, strides, pads, dilations), spatial)
        model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w2, "w"))
        got = ort_run(model.SerializeToString(), {"x": x})[0]
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
        trimmed += w2.size < w.size
    assert trimmed >= 10  # the draw exercises trimming, not only the unchanged case


def test_live_taps_of_a_small_feature_map():
    assert live_taps(1, 3, 1, 1, 1, 1) == (1, 1)  # 3x3 on 1x1, pads 1: the centre only
    assert live_taps(2, 3, 2, 1, 1, 1) == (1, 2)  # ResNet's strided 3x3 on 2x2: the first tap reads padding only
    assert live_taps(2, 3, 1, 2, 2, 2) == (1, 1)  # dilation 2 on 2x2, pads 2
    assert live_taps(7, 3, 1, 1, 1, 1) == (0, 2)  # a usual feature map keeps every tap


def test_live_taps_match_walking_every_output_position():
    """The taps found by arithmetic are those that read the input at some output position, walked one by one."""
    import itertools

    for size, kernel, stride, pb, pe, dilation in itertools.product(range(1, 8), range(1, 6), range(1, 4), range(4),
                                                                      range(4), range(1, 4)):
        out = (size + pb + pe - dilation * (kernel - 1) - 1) // stride + 1
        live = [t for t in range(kernel) if any(0 <= p * stride - pb + t * dilation < size for p in range(out))]
        want = (live[0], live[-1]) if live else (0, kernel - 1)
        assert live_taps(size, kernel, stride, pb, pe, dilation) == want, (size, kernel, stride, pb, pe, dilation)


@pytest.mark.parametrize("groups", [1, 4])
def test_deploy_drops_padding_only_taps_without_changing_outputs(tmp_path, rng, monkeypatch, groups):
    """A ResNet/MobileNet-style tail at a 1x1 / 2x2 feature map (32x32 inputs): the 3x3 convs become 1x1 / 2x2 in the
    deploy model, still integer kernels, outputs identical to the untrimmed deploy model's."""
    c = 8
    w1 = (rng.normal(size=(c, c // groups, 3, 3)) * 0.3).astype(np.float32)
    w2 = (rng.normal(size=(c, c // groups, 3, 3)) * 0.3).astype(np.float32)
    b = (rng.normal(size=c) * 0.1).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1", "b"], ["c1"], name="strided", strides=[2, 2], pads=[1, 1, 1, 1],
                              group=groups),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w2", "b"], ["c2"], name="tail", pads=[1, 1, 1, 1], group=groups),
             helper.make_node("Relu", ["c2"], ["y"], name="relu2")]
    model = make_model(nodes, [vi("x", ["N", c, 2, 2])], [vi("y", None)], {"w1": w1, "w2": w2, "b": b})
    src = tmp_path / "tail.onnx"
    onnx.save(model, src)
    batches = [rng.normal(size=(16, c, 2, 2)).astype(np.float32) for _ in range(2)]
    _, deploy = run_flow(src, tmp_path, batches, feed_name="x")  # integer kernels (conftest.assert_integer_kernels)
    monkeypatch.setattr(DeployBuilder, "trims_padding_taps", False)
    _, untrimmed = run_flow(src, tmp_path, batches, feed_name="x", prefix="full")
    pads = {n.name: [list(a.ints) for a in n.attribute if a.name == "pads"]
            for n in onnx.load(deploy).graph.node if n.op_type == "Conv"}
    assert pads == {"strided": [[0, 0, 0, 0]], "tail": [[0, 0, 0, 0]]}
    shapes = {t.name: list(t.dims) for t in onnx.load(deploy).graph.initializer if t.name.endswith(".weight_quantized")}
    assert shapes == {"strided.weight_quantized": [c, c // groups, 2, 2], "tail.weight_quantized": [c, c // groups, 1, 1]}
    ops = optimized_ops(deploy, tmp_path)
    assert ops.count("QLinearConv") == 2 and not {"Conv", "FusedConv"} & set(ops)
    x = rng.normal(size=(5, c, 2, 2)).astype(np.float32)
    np.testing.assert_array_equal(ort_run(deploy, {"x": x})[0], ort_run(untrimmed, {"x": x})[0])


def test_symbolic_spatial_dims_keep_the_kernel(tmp_path, rng):
    """Without static height and width nothing is trimmed (the model must run at any size)."""
    w = (rng.normal(size=(4, 4, 3, 3)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    src = tmp_path / "dyn.onnx"
    onnx.save(make_model(nodes, [vi("x", ["N", 4, "H", "W"])], [vi("y", None)], {"w": w}), src)
    _, deploy = run_flow(src, tmp_path, [rng.normal(size=(8, 4, 1, 1)).astype(np.float32)], feed_name="x")
    conv = next(n for n in onnx.load(deploy).graph.node if n.op_type == "Conv")
    assert [list(a.ints) for a in conv.attribute if a.name == "pads"] == [[1, 1, 1, 1]]
    for size in itertools.product((1, 5), repeat=2):
        assert ort_run(deploy, {"x": rng.normal(size=(1, 4, *size)).astype(np.float32)})[0].shape == (1, 4, *size)
