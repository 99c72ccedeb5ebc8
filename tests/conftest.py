import os

import numpy as np
import pytest

os.environ.setdefault("OMCT_QUIET", "1")


def pytest_collection_modifyitems(items):
    """Every test on the trained zoo models (the ``trained`` fixture, directly or through another fixture)
    trains them: marked ``slow``. Tests that train their own model carry the marker themselves."""
    for item in items:
        if "trained" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def digits():
    import zoo

    return zoo.load_digits(16)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, digits):
    """Trained zoo models exported to ONNX, built once per session: name -> (torch model, onnx path)."""
    import zoo

    cache = {}
    folder = tmp_path_factory.mktemp("zoo")
    settings = {"small_cnn": ({"width": 16}, 15), "resnet": ({"width": 16, "blocks": 3}, 12),
                "mobilenet": ({"width": 16}, 15), "transformer": ({"d_model": 64, "layers": 2}, 25)}

    def get(name):
        if name not in cache:
            kwargs, epochs = settings[name]
            path = folder / f"{name}.onnx"
            model = zoo.build(name, digits, path, epochs=epochs, **kwargs)
            cache[name] = (model, path)
        return cache[name]

    return get


def ort_run(path, feeds):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    source = path if isinstance(path, bytes) else str(path)  # a file, or a serialised model
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def ort_accuracy(path, x, y):
    return float((ort_run(path, {"input": x})[0].argmax(1) == y).mean())


def optimized_ops(path, tmp_path):
    """Op types in ONNX Runtime's optimised graph of ``path`` (default optimisation level)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node]


def weights_dequantized_at_run_time(path, tmp_path) -> dict[str, int]:
    """In ONNX Runtime's optimised graph of ``path``: the float ops fed by a DequantizeLinear of a weight
    initializer (rank >= 2), op type -> count. Such a weight is dequantized on every run: the integer kernel the
    deploy model exists for did not fuse. Bias vectors (rank 1) are not counted."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized_check.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    found: dict[str, int] = {}
    _count_dequantized_weights(onnx.load(so.optimized_model_filepath).graph, set(), found)
    return found


def _count_dequantized_weights(graph, outer_weights: set, found: dict, outer_dq: frozenset = frozenset()) -> None:
    """``weights_dequantized_at_run_time`` for one graph and the bodies of its If/Loop/Scan nodes (a weight, or
    its DequantizeLinear, may live in an outer scope)."""
    weights = outer_weights | {t.name for t in graph.initializer if len(t.dims) >= 2}
    dq_out = outer_dq | {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    for n in graph.node:
        for i in n.input:
            if i in dq_out:
                found[n.op_type] = found.get(n.op_type, 0) + 1
        for a in n.attribute:
            for body in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                _count_dequantized_weights(body, weights, found, frozenset(dq_out))


def assert_integer_kernels(path, tmp_path, allowed=()) -> None:
    """No weight is dequantized at run time into a float op (except op types in ``allowed``: those with no
    integer kernel in ONNX Runtime's CPU provider)."""
    found = {op: n for op, n in weights_dequantized_at_run_time(path, tmp_path).items() if op not in allowed}
    assert not found, f"{path}: weights dequantized at run time into float {found}"


FLOAT_KERNELS = ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "FusedMatMul")


def float_kernels(path, tmp_path) -> dict[str, int]:
    """In ONNX Runtime's optimised graph of ``path``: the float convolutions and matrix products on a constant
    weight (an initializer of rank >= 2, or a DequantizeLinear of one), op type -> count. In a deploy model whose
    layers are all quantized there should be none: a float ``FusedConv`` where a QLinearConv was intended means
    the runtime fused an activation (or a Pad) into the float op before its QDQ fusion could run."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(tmp_path / "optimized_float_kernels.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath).graph
    weights = {t.name for t in graph.initializer if len(t.dims) >= 2}
    weights |= {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    found: dict[str, int] = {}
    for n in graph.node:
        if n.op_type in FLOAT_KERNELS and len(n.input) > 1 and n.input[1] in weights:
            found[n.op_type] = found.get(n.op_type, 0) + 1
    return found


def assert_no_float_kernels(path, tmp_path) -> None:
    """Every convolution and matrix product on a constant weight runs as an integer kernel (``float_kernels``)."""
    found = float_kernels(path, tmp_path)
    assert not found, f"{path}: float kernels on constant weights left in ONNX Runtime's graph {found}"


def run_flow(model_path, tmp_path, batches, feed_name="input", prefix="q", float_weight_ops=(), **config_kwargs):
    """The ONNX call sequence end to end; returns (fake_quant_path, deploy_path). Checks that the deploy model
    runs on integer kernels (``float_weight_ops``: op types allowed to take dequantized weights)."""
    import omct.onnx as amct

    cfg, mod, rec = tmp_path / f"{prefix}.json", tmp_path / f"{prefix}_mod.onnx", tmp_path / f"{prefix}_record.txt"
    config_kwargs.setdefault("batch_num", len(batches))
    amct.create_quant_config(str(cfg), str(model_path), **config_kwargs)
    amct.quantize_model(str(cfg), str(model_path), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    for b in batches:
        sess.run(None, b if isinstance(b, dict) else {feed_name: b})
    amct.save_model(str(mod), str(rec), str(tmp_path / prefix))
    deploy = tmp_path / f"{prefix}_deploy_model.onnx"
    assert_integer_kernels(deploy, tmp_path, float_weight_ops)
    return tmp_path / f"{prefix}_fake_quant_model.onnx", deploy


def batches_of(x, n, size=32):
    return [x[i * size:(i + 1) * size] for i in range(n)]


@pytest.fixture
def rng():
    return np.random.default_rng(0)
