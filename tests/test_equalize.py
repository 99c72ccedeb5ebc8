"""Cross-layer equalization: the rewritten graph computes the same function (ONNX Runtime, before vs after),
each pair's channel ranges end up equal, ReLU6 pairs are left alone, and both frontends apply it when the
config says so (the PyTorch modules get the same scales, so calibration sees what is exported)."""

import numpy as np
import onnx
import torch
from conftest import ort_run
from onnx import numpy_helper
from torch import nn

import omct.onnx as amct
from omct.formats.config import load_config
from omct.graph.equalize import equalization_pairs, equalize


class _Chain(nn.Module):
    def __init__(self, relu6_last: bool = False):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.c = nn.Conv2d(8, 6, 1)
        self.d = nn.Conv2d(6, 4, 1)
        self.last = nn.ReLU6() if relu6_last else nn.ReLU()
        with torch.no_grad():  # channels with very different ranges, as after BatchNorm folding
            self.a.weight.mul_(torch.logspace(-1.5, 1.5, 8).reshape(-1, 1, 1, 1))
            self.c.weight.mul_(torch.logspace(1, -1, 6).reshape(-1, 1, 1, 1))

    def forward(self, x):
        return self.d(self.last(self.c(torch.relu(self.b(torch.relu(self.a(x)))))))


def _export(model, path):
    x = torch.zeros(1, 3, 8, 8)
    torch.onnx.export(model.eval(), (x,), str(path), input_names=["input"], output_names=["out"],
                      dynamic_axes={"input": {0: "n"}}, opset_version=17, dynamo=False)
    return onnx.load(path)


def _weights(model):
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [inits[n.input[1]] for n in model.graph.node if n.op_type == "Conv"]


def test_equalization_keeps_the_function_and_equalizes_ranges(tmp_path):
    torch.manual_seed(0)
    model = _export(_Chain(), tmp_path / "m.onnx")
    assert [(a.name, b.name) for a, b in equalization_pairs(model)] == [("/a/Conv", "/b/Conv"), ("/b/Conv", "/c/Conv"),
                                                                          ("/c/Conv", "/d/Conv")]
    x = np.random.default_rng(0).normal(size=(4, 3, 8, 8)).astype(np.float32)
    before = ort_run(model.SerializeToString(), {"input": x})[0]
    scales = equalize(model)
    after = ort_run(model.SerializeToString(), {"input": x})[0]
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
    wa, wb, wc, wd = _weights(model)
    # after equalization, A's output channel ranges equal B's (depthwise: per channel) ones, and so on down the chain
    np.testing.assert_allclose(np.abs(wa).max(axis=(1, 2, 3)), np.abs(wb).max(axis=(1, 2, 3)), rtol=0.02)
    np.testing.assert_allclose(np.abs(wc).max(axis=(1, 2, 3)), np.abs(wd).max(axis=(0, 2, 3)), rtol=0.02)
    assert np.ptp(np.log(scales[("/a/Conv", "/b/Conv")])) > 1  # the spread of A's ranges was really moved


def test_relu6_pairs_are_not_equalized(tmp_path):
    model = _export(_Chain(relu6_last=True), tmp_path / "m.onnx")
    assert ("/c/Conv", "/d/Conv") not in [(a.name, b.name) for a, b in equalization_pairs(model)]


def test_both_frontends_apply_it_from_the_cfg(tmp_path):
    import omct.pytorch as pt

    torch.manual_seed(0)
    net = _Chain().eval()
    path = tmp_path / "m.onnx"
    _export(net, path)
    x = np.random.default_rng(1).normal(size=(32, 3, 8, 8)).astype(np.float32)
    cfg = tmp_path / "cle.cfg"
    cfg.write_text("batch_num: 1\ncross_layer_equalization: true\n")
    with torch.no_grad():
        want = net(torch.tensor(x)).numpy()
    fakes = []
    files = [str(tmp_path / f) for f in ("o.json", "o_mod.onnx", "o_rec.txt")]
    amct.create_quant_config(files[0], str(path), config_defination=str(cfg))
    assert load_config(files[0]).globals.cross_layer_equalization
    amct.quantize_model(files[0], str(path), files[1], files[2])
    amct.CalibrationSession(files[1]).run(None, {"input": x})
    amct.save_model(files[1], files[2], str(tmp_path / "o"))
    fakes.append(tmp_path / "o_fake_quant_model.onnx")
    files = [str(tmp_path / f) for f in ("p.json", "p_mod.onnx", "p_rec.txt")]
    pt.create_quant_config(files[0], net, torch.tensor(x[:1]), config_defination=str(cfg))
    cal = pt.quantize_model(files[0], files[1], files[2], net, torch.tensor(x[:1]), input_names=["input"],
                            output_names=["out"], dynamic_axes={"input": {0: "n"}})
    with torch.no_grad():
        np.testing.assert_allclose(cal(torch.tensor(x)).numpy(), want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    pt.save_model(files[1], files[2], str(tmp_path / "p"))
    fakes.append(tmp_path / "p_fake_quant_model.onnx")
    first = None
    for fake in fakes:
        w = _weights(onnx.load(fake))[0]
        # equalized: A's rows no longer span 1000x in range
        ranges = np.abs(w).max(axis=(1, 2, 3))
        assert ranges.max() / ranges.min() < 30, ranges
        got = ort_run(fake, {"input": x})[0]
        assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
        first = w if first is None else first
    np.testing.assert_allclose(_weights(onnx.load(fakes[1]))[0], first, rtol=1e-5, atol=1e-6)  # same scales
