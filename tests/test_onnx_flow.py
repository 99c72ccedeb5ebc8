"""The ONNX call sequence end to end on real trained models and on one hand-built model per op kind."""

import hashlib

import numpy as np
import onnx
import pytest
from conftest import batches_of, optimized_ops, ort_accuracy, ort_run, run_flow
from onnx import numpy_helper
from onnx_builders import avgpool_model, conv_model, conv_transpose_model, linear_model

from omct.formats.record import read_record

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "QGemm", "MatMulIntegerToFloat", "QLinearAveragePool"}


@pytest.mark.parametrize("name", ["small_cnn", "resnet", "mobilenet", "transformer"])
def test_trained_models_keep_accuracy(name, trained, digits, tmp_path):
    _, path = trained(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    fake, deploy = run_flow(path, tmp_path, batches_of(digits.x_train, 4))
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, "the input model must not be modified"
    fp32 = ort_accuracy(path, digits.x_test, digits.y_test)
    assert fp32 > 0.9
    for q in (fake, deploy):
        assert ort_accuracy(q, digits.x_test, digits.y_test) >= fp32 - 0.01
    # deploy (integer kernels) and fake-quant (float simulation) agree closely
    ref = ort_run(path, {"input": digits.x_test})[0]
    f = ort_run(fake, {"input": digits.x_test})[0]
    d = ort_run(deploy, {"input": digits.x_test})[0]
    spread = np.abs(ref).max()
    assert np.abs(f - d).max() < 0.05 * spread
    assert (f.argmax(1) == d.argmax(1)).mean() > 0.99
    ops = optimized_ops(deploy, tmp_path)
    assert INTEGER_KERNELS & set(ops), ops


def test_deploy_model_has_int8_weights_int32_bias_and_dynamic_batch(trained, digits, tmp_path):
    _, path = trained("small_cnn")
    fake, deploy = run_flow(path, tmp_path, batches_of(digits.x_train, 2))
    m = onnx.load(deploy)
    dtypes = {t.name: numpy_helper.to_array(t).dtype for t in m.graph.initializer}
    assert any(n.endswith("weight_quantized") and d == np.int8 for n, d in dtypes.items())
    assert any(n.endswith("bias_quantized") and d == np.int32 for n, d in dtypes.items())
    assert not any(d == np.float32 and t.dims and np.prod(t.dims) > 64
                   for t, d in zip(m.graph.initializer, dtypes.values(), strict=False)), "no large float weights remain"
    ops = optimized_ops(deploy, tmp_path)
    assert "QLinearConv" in ops and ("QGemm" in ops or "MatMulIntegerToFloat" in ops)
    for batch in (1, 7):
        for q in (fake, deploy):
            assert ort_run(q, {"input": digits.x_test[:batch]})[0].shape == (batch, 10)
    # fake-quant weights are exactly the record's scale_w times integers in [-127, 127], per output channel,
    # with each channel's largest magnitude at 127 (ARQ): checked on the convolution with the most weights
    fm = onnx.load(fake)
    convs = {n.name for n in fm.graph.node if n.op_type == "Conv"}
    weights = {t.name.removesuffix(".weight_fake_quant"): numpy_helper.to_array(t) for t in fm.graph.initializer
               if t.name.endswith(".weight_fake_quant") and t.name.removesuffix(".weight_fake_quant") in convs}
    layer = max(weights, key=lambda name: weights[name].size)
    w = weights[layer].astype(np.float64)
    assert w.size >= 2000, (layer, w.shape)
    scale_w = np.asarray(read_record(tmp_path / "q_record.txt")[layer].scale_w)
    assert scale_w.shape == (w.shape[0],)
    k = w.reshape(w.shape[0], -1) / scale_w[:, None]
    assert np.abs(k - np.round(k)).max() < 1e-3
    assert np.abs(np.round(k)).max(axis=1).tolist() == [127] * w.shape[0]


def _check_op(model, tmp_path, x, expect_quantized, integer_kernel=None, rel_tol=0.06, float_weight_ops=()):
    src = tmp_path / "model.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(1)
    batches = [x * (1 + 0.1 * rng.normal()) for _ in range(3)]
    fake, deploy = run_flow(src, tmp_path, batches, feed_name="x", float_weight_ops=float_weight_ops)
    ref = ort_run(src, {"x": x})[0]
    f = ort_run(fake, {"x": x})[0]
    d = ort_run(deploy, {"x": x})[0]
    scale = np.abs(ref).max()
    assert np.abs(f - ref).max() < rel_tol * scale
    assert np.abs(d - f).max() < rel_tol * scale
    ops = [n.op_type for n in onnx.load(fake).graph.node]
    assert ("Round" in ops) == expect_quantized
    if integer_kernel:
        ops = set(optimized_ops(deploy, tmp_path))
        assert ops & ({integer_kernel} if isinstance(integer_kernel, str) else set(integer_kernel)), ops


@pytest.mark.parametrize("dims,groups,dilation", [(1, 1, 1), (2, 1, 1), (3, 1, 1), (2, 2, 1), (2, 8, 1), (2, 1, 2)])
def test_conv_variants(dims, groups, dilation, tmp_path, rng):
    model = conv_model(rng, dims=dims, groups=groups, dilation=dilation)
    x = rng.normal(size=(2, 8) + (6,) * dims).astype(np.float32)
    # ONNX Runtime's CPU provider has QLinearConv for 2D only: 1D/3D convs take dequantized weights
    _check_op(model, tmp_path, x, True, "QLinearConv" if dims == 2 else None,
              float_weight_ops=() if dims == 2 else ("Conv",))


def test_relu6_clip_is_absorbed_by_the_output_quantization(tmp_path, rng):
    """Conv -> Clip(0, 6): the output is quantized after the Clip with its range capped at 6, so ONNX Runtime
    drops the Clip and runs QLinearConv (a Clip left in float splits the integer chain)."""
    x = (rng.normal(size=(2, 8, 6, 6)) * 4).astype(np.float32)  # conv outputs well above 6
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(rng, relu6=True), src)
    cfg = tmp_path / "wide.cfg"  # a search that only tries ranges above the data's maximum
    cfg.write_text("batch_num: 1\ncommon_config { ifmr_quantize { search_range_start: 1.2 search_range_end: 1.3 } }\n")
    fake, deploy = run_flow(src, tmp_path, [x], feed_name="x", config_defination=str(cfg))
    np.testing.assert_allclose(ort_run(deploy, {"x": x})[0], ort_run(fake, {"x": x})[0], atol=0.1)
    ops = optimized_ops(deploy, tmp_path)
    assert "QLinearConv" in ops and "Clip" not in ops
    rec = read_record(tmp_path / "q_record.txt")["conv"]
    assert rec.scale_o * (127 - rec.offset_o) <= 6.0 + 1e-6


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm(trans_b, tmp_path, rng):
    x = rng.normal(size=(4, 12)).astype(np.float32)
    _check_op(linear_model(rng, "Gemm", trans_b=trans_b), tmp_path, x, True, "QGemm")


@pytest.mark.parametrize("tokens", [False, True])
def test_matmul_with_constant_weight(tokens, tmp_path, rng):
    x = rng.normal(size=(4, 5, 12) if tokens else (4, 12)).astype(np.float32)
    # The bias Add belongs to the layer (INT32 bias), so ONNX Runtime's MatMul + Add -> Gemm rewrite gives QGemm;
    # 2D: output quantized after the Add; tokens: no output Q needed
    _check_op(linear_model(rng, "MatMul", tokens=tokens), tmp_path, x, True,
              ("MatMulIntegerToFloat", "QGemm") if tokens else ("QGemm", "QLinearMatMul"))


def test_conv_transpose(tmp_path, rng):
    x = rng.normal(size=(2, 8, 5, 5)).astype(np.float32)
    _check_op(conv_transpose_model(rng), tmp_path, x, True, float_weight_ops=("ConvTranspose",))  # no integer kernel


def test_average_pool(tmp_path, rng):
    x = rng.normal(size=(2, 4, 6, 6)).astype(np.float32)
    _check_op(avgpool_model(), tmp_path, x, True, "QLinearAveragePool")


def test_bias_correction_is_recorded_and_can_be_turned_off(tmp_path, rng):
    src = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), src)
    x = (rng.normal(size=(4, 8, 6, 6)) + 1).astype(np.float32)
    run_flow(src, tmp_path, [x], feed_name="x", prefix="on")
    assert len(read_record(tmp_path / "on_record.txt")["conv"].bias_correction) == 8
    cfg = tmp_path / "off.cfg"
    cfg.write_text("batch_num: 1\nbias_correction: false\n")
    run_flow(src, tmp_path, [x], feed_name="x", prefix="off", config_defination=str(cfg))
    assert read_record(tmp_path / "off_record.txt")["conv"].bias_correction == []
    on = ort_run(tmp_path / "on_fake_quant_model.onnx", {"x": x})[0]
    off = ort_run(tmp_path / "off_fake_quant_model.onnx", {"x": x})[0]
    ref = ort_run(src, {"x": x})[0]
    # the corrected model's per-channel mean error is smaller
    err = lambda y: float(np.abs((y - ref).mean(axis=(0, 2, 3))).mean())  # noqa: E731
    assert err(on) < err(off)
