"""PTQ time and memory (issue 17, items 7 and 9): the shortcuts that make quantization cheaper compute exactly
what the longer way did. BatchNorm folded into the traced graph instead of a second export; the PyTorch copy
sharing the user's weights; the tensors no hook sees computed by the part of the model that needs them; tensor
sizes read without copying their bytes; quantize / dequantize without weight-sized int64 / float64 temporaries."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import omct.pytorch as amct
import omct.pytorch.calibration as calibration_module
from omct.core.params import QuantParams
from omct.formats.record import read_record
from omct.graph.modified import partial_model
from omct.graph.tensor_data import in_memory_bytes, raw_data_bytes
from omct.pytorch.api import _eval_copy
from omct.pytorch.fold import fold_conv_bn
from omct.pytorch.trace import fold_traced, trace_model
from tests.conftest import ort_run
from tests.real_models import mobilenet_v2, resnet18


def _with_bn_statistics(model: torch.nn.Module) -> torch.nn.Module:
    """Random running statistics and affine parameters, so that folding changes every weight."""
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_()
    return model.eval()


@pytest.mark.parametrize("build", [lambda: resnet18(width=8), lambda: mobilenet_v2(width_mult=0.25, last_channel=64)])
def test_folding_into_the_traced_graph_equals_a_new_export(build):
    torch.manual_seed(0)
    model = _with_bn_statistics(build())
    x = torch.randn(2, 3, 32, 32)
    work = _eval_copy(model)
    traced = trace_model(work, x)
    pairs = traced.batchnorm_after
    folded = fold_conv_bn(work, pairs)
    assert folded and len(folded) == len(pairs)
    new = fold_traced(traced, work, {c: pairs[c] for c in folded})
    old = trace_model(work, x)  # the folded module exported again: what quantize_model did before
    assert [(s.name, s.op_type, s.chain) for s in new.layers] == [(s.name, s.op_type, s.chain) for s in old.layers]
    assert [(r.name, r.reason) for r in new.refused] == [(r.name, r.reason) for r in old.refused]
    assert not [n for n in new.model.graph.node if n.op_type == "BatchNormalization"]
    inits = [{t.name: numpy_helper.to_array(t) for t in m.graph.initializer} for m in (new.model, old.model)]
    for a, b in zip(new.layers, old.layers, strict=True):
        if a.weight is not None:
            np.testing.assert_array_equal(inits[0][a.weight], inits[1][b.weight])
            np.testing.assert_array_equal(inits[0][a.bias], inits[1][b.bias])
    feeds = {new.model.graph.input[0].name: x.numpy()}
    np.testing.assert_array_equal(ort_run(new.model.SerializeToString(), feeds)[0],
                                  ort_run(old.model.SerializeToString(), feeds)[0])


def test_ptq_copy_shares_the_weights_and_leaves_the_user_model_alone(tmp_path):
    torch.manual_seed(0)
    model = _with_bn_statistics(resnet18(width=8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    cfg_def = tmp_path / "q.cfg"
    cfg_def.write_text("batch_num: 1\ncross_layer_equalization: true\n")  # folding and equalization both rewrite
    amct.create_quant_config(tmp_path / "c.json", model, x, config_defination=str(cfg_def))
    cal = amct.quantize_model(tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt", model, x)
    with torch.no_grad():
        cal(x)
    assert cal.complete
    assert cal.model.fc.weight is model.fc.weight  # one copy of an untouched weight, not two
    assert cal.model.conv1.weight is not model.conv1.weight  # folded: a new tensor
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert isinstance(model.bn1, torch.nn.BatchNorm2d)


def test_tensors_no_hook_sees_come_from_the_part_of_the_model_that_needs_them(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = _with_bn_statistics(resnet18(width=8))
    batches = [torch.randn(8, 3, 32, 32) for _ in range(2)]

    def calibrate(tag: str):
        amct.create_quant_config(tmp_path / f"{tag}.json", model, batches[0], batch_num=2)
        cal = amct.quantize_model(tmp_path / f"{tag}.json", tmp_path / f"{tag}.onnx", tmp_path / f"{tag}.txt", model,
                                  batches[0])
        sessions = cal._session, cal._full  # (the calibration module drops them after the last batch)
        with torch.no_grad():
            for b in batches:
                torch.testing.assert_close(cal(b), model(b))
        return cal, read_record(tmp_path / f"{tag}.txt"), sessions

    part, records, (session, whole) = calibrate("part")
    assert part._onnx_tensors  # the last residual Add + Relu and the GlobalAveragePool: no module computes them
    full_nodes = len(onnx.load(tmp_path / "part.onnx").graph.node)
    assert whole is None and len(session.get_inputs()) <= 3  # fed with hooked values
    monkeypatch.setattr(calibration_module, "partial_model", lambda *a: None)
    full, expected, (session, whole) = calibrate("full")  # the whole modified model, as before
    assert whole is session
    assert records.keys() == expected.keys()
    for name, rec in records.items():
        ref = expected[name]
        assert rec.offset_d == ref.offset_d and rec.offset_o == ref.offset_o, name
        np.testing.assert_allclose(rec.scale_d, ref.scale_d, rtol=1e-5, err_msg=name)
        if ref.scale_o is not None:
            np.testing.assert_allclose(rec.scale_o, ref.scale_o, rtol=1e-5, err_msg=name)
    part_model = partial_model(onnx.load(tmp_path / "part.onnx"), part._onnx_tensors, part._keep)
    assert len(part_model.graph.node) <= 4 < full_nodes
    assert {n.op_type for n in part_model.graph.node} <= {"Add", "Relu", "GlobalAveragePool"}


def test_partial_model_computes_the_outputs_from_the_given_tensors():
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Mul", ["a", "two"], ["b"]),
         helper.make_node("Add", ["b", "x"], ["c"]), helper.make_node("Neg", ["c"], ["d"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("d", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    part = partial_model(model, ["d"], {"b"})
    assert [n.op_type for n in part.graph.node] == ["Add", "Neg"]  # Relu and Mul are not run again
    assert sorted(i.name for i in part.graph.input) == ["b", "x"]
    b = np.maximum(x, 0) * 2
    np.testing.assert_array_equal(ort_run(part.SerializeToString(), {"b": b, "x": x})[0], -(b + x))
    # a node with a subgraph on the way: not cut (its outer-scope reads are not traced)
    branch = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "then", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    g.node.append(helper.make_node("If", ["cond"], ["e"], then_branch=branch, else_branch=branch))
    assert partial_model(model, ["e"], {"b"}) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int64, np.bool_])
def test_raw_data_bytes_is_the_length_of_the_raw_data(dtype):
    t = numpy_helper.from_array(np.zeros((3, 5, 2), dtype), "t")
    assert raw_data_bytes(t) == len(t.raw_data) == in_memory_bytes(t) == 30 * np.dtype(dtype).itemsize
    packed = helper.make_tensor("p", TensorProto.INT4, [5], bytes(3), raw=True)  # two values a byte
    assert raw_data_bytes(packed) == len(packed.raw_data) == 3
    typed = helper.make_tensor("f", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    assert raw_data_bytes(typed) == 0 and in_memory_bytes(typed) == 16


@pytest.mark.parametrize("num_bits", [4, 8, 16])
@pytest.mark.parametrize("axis", [None, 0, 1])
def test_quantize_and_dequantize_in_float32_give_the_int64_codes(num_bits, axis):
    """The in-place float32 formulas against AMCT's, computed in int64 / float64, on values far outside the
    range too (clipped) and scales from tiny to huge."""
    rng = np.random.default_rng(num_bits)
    x = (rng.standard_normal((16, 9, 3)) * rng.choice([1.0, 1e3, 1e8], (16, 9, 3))).astype(np.float32)
    n = 1 if axis is None else x.shape[axis]
    scale = (rng.uniform(1e-3, 1, n) * rng.choice([1.0, 1e-6, 1e20], n)).astype(np.float32)  # x / s < 2**63
    offset = rng.integers(-(2 ** (num_bits - 1)), 2 ** (num_bits - 1), n).astype(np.int32)
    p = QuantParams(scale if axis is not None else scale[0], offset if axis is not None else offset[0], num_bits, axis)
    s = p._broadcast(np.asarray(p.scale, np.float32), x.ndim)
    o = p._broadcast(np.asarray(p.offset, np.int64), x.ndim)
    expected = np.clip(np.round(x / s).astype(np.int64) + o, p.qmin, p.qmax)
    codes = p.quantize(x)
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(p.dequantize(codes), ((expected - o) * s.astype(np.float64)).astype(np.float32))
    # beyond int64 (where the int64 formula's cast is undefined) the codes are clipped like any other
    huge = QuantParams(np.float32(1e-30), np.int32(0), num_bits, None)
    np.testing.assert_array_equal(huge.quantize(np.array([-1e10, 1e10], np.float32)), [p.qmin, p.qmax])
