"""The ONNX call sequence end to end on real trained models and on one hand-built model per op kind."""

import hashlib

import numpy as np
import onnx
import pytest
from conftest import batches_of, optimized_ops, ort_accuracy, ort_run, run_flow
from onnx import numpy_helper
from onnx_builders import avgpool_model, chain_model, conv_model, conv_transpose_model, linear_model

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


def test_deploy_bias_scale_is_the_records_product_bit_for_bit(trained, digits, tmp_path):
    """The deploy model stores a bias scale as Mul(weight scale, input scale), folded by ONNX Runtime, only where
    that float32 product is exactly the record's scale_w * scale_d (as export computes it, in float64); biases
    have no zero point initializer (0 of INT32 by default). Every convolution still fuses into QLinearConv."""
    from conftest import assert_integer_kernels

    _, path = trained("small_cnn")
    _, deploy = run_flow(path, tmp_path, batches_of(digits.x_train, 2))
    m = onnx.load(deploy)
    inits = {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}
    producer = {o: n for n in m.graph.node for o in n.output}
    records = read_record(tmp_path / "q_record.txt")
    checked, folded = 0, 0
    for node in m.graph.node:
        if node.name not in records or node.op_type not in ("Conv", "Gemm") or len(node.input) < 3:
            continue
        layer, rec, dq = node.name, records[node.name], producer[node.input[2]]
        assert dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dtype == np.int32, dq
        assert len(dq.input) == 2, dq
        scale = dq.input[1]
        if scale in producer:  # Mul of two initializers: what ONNX Runtime's constant folding computes
            mul = producer[scale]
            assert mul.op_type == "Mul" and all(i in inits for i in mul.input)
            got, folded = inits[mul.input[0]] * inits[mul.input[1]], folded + 1
        else:
            got = inits[scale]
        want = (np.asarray(rec.scale_w, np.float64) * rec.scale_d).astype(np.float32)
        assert got.dtype == np.float32 and np.array_equal(np.broadcast_to(want, got.shape), got), layer
        checked += 1
    assert checked >= 3 and folded >= 1
    ops = optimized_ops(deploy, tmp_path)
    assert ops.count("QLinearConv") == sum(n.op_type == "Conv" for n in onnx.load(path).graph.node)
    assert_integer_kernels(deploy, tmp_path)


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
    # round to nearest in both (learned_rounding, on by default, fits the output's mean too)
    on_cfg = tmp_path / "on.cfg"
    on_cfg.write_text("batch_num: 1\nlearned_rounding: false\n")
    run_flow(src, tmp_path, [x], feed_name="x", prefix="on", config_defination=str(on_cfg))
    assert len(read_record(tmp_path / "on_record.txt")["conv"].bias_correction) == 8
    cfg = tmp_path / "off.cfg"
    cfg.write_text("batch_num: 1\nbias_correction: false\nlearned_rounding: false\n")
    run_flow(src, tmp_path, [x], feed_name="x", prefix="off", config_defination=str(cfg))
    assert read_record(tmp_path / "off_record.txt")["conv"].bias_correction == []
    on = ort_run(tmp_path / "on_fake_quant_model.onnx", {"x": x})[0]
    off = ort_run(tmp_path / "off_fake_quant_model.onnx", {"x": x})[0]
    ref = ort_run(src, {"x": x})[0]
    # the corrected model's per-channel mean error is smaller
    err = lambda y: float(np.abs((y - ref).mean(axis=(0, 2, 3))).mean())  # noqa: E731
    assert err(on) < err(off)


def _optimized_graph(path, tmp_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized_chain.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


# op kind -> what ONNX Runtime runs it as once its inputs and output are quantized (None: the op is gone)
CHAIN_KERNELS = {"Add": "QLinearAdd", "Concat": "QLinearConcat", "GlobalAveragePool": "QLinearGlobalAveragePool",
                 "MaxPool": ("MaxPool", "NhwcMaxPool"), "Resize": "Resize", "Pad": None}


@pytest.mark.parametrize("kind", list(CHAIN_KERNELS))
def test_chain_op_stays_integer_between_quantized_layers(kind, tmp_path, rng):
    """Conv -> op -> Conv/Gemm: the op's tensors are quantized once, so ONNX Runtime runs the whole chain on
    integers: no DequantizeLinear inside the graph (only the model's input Q and, after a QLinearConv, its output
    DQ remain), and the op is its QLinear kernel, an integer op, or (Pad) folded into the conv."""
    model = chain_model(rng, kind)
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    _check_op(model, tmp_path, x, True, rel_tol=0.05)
    deploy = tmp_path / "q_deploy_model.onnx"
    graph = _optimized_graph(deploy, tmp_path)
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") <= 1, ops
    expected = CHAIN_KERNELS[kind]
    if expected is None:
        assert kind not in ops and kind not in [n.op_type for n in onnx.load(deploy).graph.node], ops
    else:
        assert set(ops) & ({expected} if isinstance(expected, str) else set(expected)), ops
        # a data-movement op runs on the uint8 tensor: its input comes from an integer kernel, not a DQ
        producer = {o: n.op_type for n in graph.node for o in n.output}
        node = next(n for n in graph.node if n.op_type in ({expected} if isinstance(expected, str) else set(expected)))
        assert producer.get(node.input[0]) != "DequantizeLinear", ops
    records = read_record(tmp_path / "q_record.txt")
    chain = {"Pad": None, "Add": "add", "Concat": "concat", "GlobalAveragePool": "gap", "MaxPool": "pool",
             "Resize": "resize"}[kind]
    if chain:  # the chain op has its own record entry: input and output factors, equal where scales are shared
        rec = records[chain]
        assert rec.scale_o is not None and not rec.scale_w
        if kind in ("MaxPool", "Resize"):
            assert (rec.scale_o, rec.offset_o) == (rec.scale_d, rec.offset_d)


def test_chain_op_can_be_skipped_and_sits_between_quantized_tensors_only(tmp_path, rng):
    """A chain op in skip_layers gets no record and no quantization of its own, and its producers keep their
    integer kernels (unlike a skipped weighted layer, it does not take their output quantization away: ONNX Runtime
    may still fuse it when its consumer quantizes its output); a chain op is quantized only between quantized
    tensors: not when an input is not quantized by a layer (the graph input), nor when no quantized op reads its
    output."""
    src = tmp_path / "m.onnx"
    onnx.save(chain_model(rng, "Add"), src)
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    _, deploy = run_flow(src, tmp_path, [x], feed_name="x", skip_layers=["add"])
    assert optimized_ops(deploy, tmp_path).count("QLinearConv") == 3
    assert "add" not in read_record(tmp_path / "q_record.txt")
    add = next(n for n in onnx.load(deploy).graph.node if n.op_type == "Add")
    assert add.output[0] == "t"  # no output quantization of its own: conv2's input quantization reads it

    from omct.formats.config import LayerInfo, build_config
    from omct.graph.ops import find_layers
    from omct.graph.plan import build_plan

    model = chain_model(rng, "Add")
    add = next(n for n in model.graph.node if n.op_type == "Add")
    add.input[1] = "x"  # conv1 output + the graph input (which only conv1 quantizes, as its input)
    model.graph.node[-2].input[0] = "t"
    del model.graph.node[2:4]  # conv_b and its Relu
    layers, _ = find_layers(model)
    assert "add" in {s.name for s in layers}
    plan = build_plan(layers, build_config([LayerInfo(s.name, s.op_type, s.weight is not None) for s in layers]))
    assert "add" not in plan.layers and {"conv1", "conv2"} <= set(plan.layers)

    # an Add whose output no quantized op reads (here: the graph output) stays float: its quantization would only
    # add error; the convs keep their output sites, and no site is left without a reader or writer
    model = chain_model(rng, "Add")
    del model.graph.node[-2:]  # conv2 and its Relu: the Add's output is the model's output
    model.graph.output[0].name = "t"
    layers, _ = find_layers(model)
    plan = build_plan(layers, build_config([LayerInfo(s.name, s.op_type, s.weight is not None) for s in layers]))
    assert set(plan.layers) == {"conv1", "conv_b"} and "add" in {s.name for s in layers}
    assert all(site.inputs_of or site.output_of for site in plan.sites)
    assert sorted(plan.sites[i].tensor for i in plan.output_site.values()) == ["a", "b"]


def test_zero_pad_is_folded_into_the_conv_even_when_computed(tmp_path, rng):
    """torch.onnx.export computes F.pad's pads with a Concat/Slice/Transpose/Reshape/Cast chain of constants: the
    Pad is still folded into the stride-2 conv (exactly: same float outputs), and its pads computation removed."""
    import torch

    from omct.onnx.api import prepare

    class Same(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, 2)

        def forward(self, x):
            return self.conv(torch.nn.functional.pad(torch.relu(x), (0, 1, 0, 1)))

    src = tmp_path / "same.onnx"
    x = rng.normal(size=(2, 4, 8, 8)).astype(np.float32)
    torch.onnx.export(Same().eval(), (torch.tensor(x),), str(src), input_names=["x"], output_names=["y"], opset_version=17,
                      dynamo=False)
    assert "Pad" in [n.op_type for n in onnx.load(src).graph.node]
    prepared = prepare(str(src))
    assert [n.op_type for n in prepared.model.graph.node] == ["Relu", "Conv"]
    np.testing.assert_array_equal(ort_run(prepared.model.SerializeToString(), {"x": x})[0], ort_run(src, {"x": x})[0])


@pytest.fixture(scope="module")
def efficientnet_lite():
    """The EfficientNet-Lite replica trained for three epochs on the 32x32 digits (RGB-like, normalised): ~30 s."""
    import real_models
    import torch
    import zoo

    d = zoo.load_digits(32)
    x, test = (torch.tensor((a.repeat(3, axis=1) - 0.2) / 0.3) for a in (d.x_train, d.x_test))
    y = torch.tensor(d.y_train)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = real_models.efficientnet_lite().train()
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    torch.set_num_threads(threads)
    return model.eval(), x, test, d.y_test


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_efficientnet_lite_runs_as_one_integer_chain(dynamic, efficientnet_lite, tmp_path):
    """EfficientNet-Lite as TF ports build it (explicit asymmetric Pad before stride-2 depthwise convs, ReLU6,
    residual Adds), exported with a static and a dynamic batch: every Pad folded, every residual Add a QLinearAdd,
    no DequantizeLinear inside the optimised graph, and the deploy model agrees with fake-quant and fake-quant
    with float (accuracy within a point)."""
    import real_models
    import torch

    model, x, test, labels = efficientnet_lite
    src = tmp_path / "effnet.onnx"
    axes = {"dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}} if dynamic else {}
    batch = 100
    torch.onnx.export(model, (x[:batch],), str(src), input_names=["input"], output_names=["logits"], opset_version=17,
                      dynamo=False, **axes)
    assert "Pad" in {n.op_type for n in onnx.load(src).graph.node}
    fake, deploy = run_flow(src, tmp_path, [x[i * batch:(i + 1) * batch].numpy() for i in range(3)])
    outs = [np.concatenate([ort_run(p, {"input": test[i:i + batch].numpy()})[0] for i in range(0, 500, batch)])
            for p in (src, fake, deploy)]
    acc = [float((o.argmax(1) == labels).mean()) for o in outs]
    assert acc[0] > 0.7 and min(acc[1:]) >= acc[0] - 0.01, acc
    ref, f, d = outs
    assert np.abs(d - f).max() < 0.05 * np.abs(ref).max() and (d.argmax(1) == f.argmax(1)).mean() > 0.99
    ops = optimized_ops(deploy, tmp_path)
    residual = sum(isinstance(m, real_models.MBConv) and m.has_residual for m in model.modules())
    assert ops.count("QLinearAdd") == residual and "Pad" not in ops and "QLinearGlobalAveragePool" in ops, ops
    assert ops.count("DequantizeLinear") == 0 and ops.count("QuantizeLinear") == 1, ops
