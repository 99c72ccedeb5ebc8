"""ONNX's own node test cases (the onnx package's generators) for the op types omct quantizes: the weights made
constant, the case's input as calibration data. Every case is either refused with a reason or quantized, with
saved models that load in ONNX Runtime and a deploy output close to the case's expected output."""

import warnings

import numpy as np
import onnx
import pytest
from conftest import ort_run, weights_dequantized_at_run_time
from onnx import numpy_helper

import omct.onnx as amct
from omct.errors import ModelError

OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "AveragePool"}
#: refused on purpose, each with the reason omct gives
REFUSED = {
    "test_averagepool_2d_dilations": "QLinearAveragePool has none",
    "test_averagepool_3d_dilations_small": "QLinearAveragePool has none",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_True": "QLinearAveragePool has none",
    "test_averagepool_3d_dilations_large_count_include_pad_is_0_ceil_mode_is_False": "QLinearAveragePool has none",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_True": "QLinearAveragePool has none",
    "test_averagepool_3d_dilations_large_count_include_pad_is_1_ceil_mode_is_False": "QLinearAveragePool has none",
    "test_matmul_4d": "rank 4", "test_matmul_bcast": "rank 4", "test_matmul_4d_1d": "rank 1", "test_matmul_1d_1d": "rank 1",
    "test_matmul_1d_3d": "input has rank 1",
}


def _cases():
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = collect_testcases(None)
    return [c for c in cases if len(c.model.graph.node) == 1 and c.model.graph.node[0].op_type in OPS
            and c.data_sets[0][0][0].dtype == np.float32]


CASES = {c.name: c for c in _cases()}


def _constant_weights(case):
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    inputs, outputs = case.data_sets[0]
    graph = model.graph
    first = graph.input[0]
    for vi, array in zip(list(graph.input)[1:], inputs[1:], strict=True):
        graph.initializer.append(numpy_helper.from_array(np.asarray(array), vi.name))
    del graph.input[:]
    graph.input.append(first)
    return model, inputs[0], outputs[0]


def test_the_cases_are_there():
    assert len(CASES) >= 50 and set(REFUSED) <= set(CASES)


@pytest.mark.parametrize("name", sorted(CASES))
def test_node_case(name, tmp_path):
    model, x, want = _constant_weights(CASES[name])
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    feed = {model.graph.input[0].name: x}
    if name in REFUSED:
        with pytest.raises(ModelError, match=REFUSED[name]):
            amct.create_quant_config(str(tmp_path / "c.json"), str(path), batch_num=1)
        return
    amct.create_quant_config(str(tmp_path / "c.json"), str(path), batch_num=1)
    amct.quantize_model(str(tmp_path / "c.json"), str(path), str(tmp_path / "mod.onnx"), str(tmp_path / "r.txt"))
    amct.CalibrationSession(str(tmp_path / "mod.onnx")).run(None, feed)
    amct.save_model(str(tmp_path / "mod.onnx"), str(tmp_path / "r.txt"), str(tmp_path / "q"))
    deploy = ort_run(tmp_path / "q_deploy_model.onnx", feed)[0]  # loads and runs
    fake = ort_run(tmp_path / "q_fake_quant_model.onnx", feed)[0]
    sqnr = 10 * np.log10((want.astype(np.float64) ** 2).sum() / max(((deploy - want) ** 2).sum(), 1e-30))
    assert sqnr > 25, sqnr
    np.testing.assert_allclose(deploy, fake, atol=1e-3 * max(np.abs(want).max(), 1e-6))
    # ONNX Runtime's CPU provider has no integer ConvTranspose, and QLinearConv for 2D only: those weights are
    # dequantized at run time; every other op must run on an integer kernel
    node = model.graph.node[0]
    weight_rank = len(model.graph.initializer[0].dims) if model.graph.initializer else 0
    allowed = {"ConvTranspose"} | ({"Conv"} if node.op_type == "Conv" and weight_rank != 4 else set())
    leftover = set(weights_dequantized_at_run_time(tmp_path / "q_deploy_model.onnx", tmp_path)) - allowed
    assert not leftover, leftover
