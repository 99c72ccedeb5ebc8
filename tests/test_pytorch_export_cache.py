"""quantize_model reuses create_quant_config's export only when it is provably the export a new trace would give
(issue 17 leftover): each change between the two calls forces a new export, and the modified model written
with a reused export is byte-identical to the one written after a fresh export."""

from __future__ import annotations

import gc

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import omct.pytorch as amct
from omct.pytorch import trace
from omct.pytorch.export_cache import CACHE, fingerprint

EXPORT = {"input_names": ["input"], "output_names": ["logits"],
          "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(8, 4)
        self.scale = 1.0

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        return self.head(y.mean((2, 3)) * self.scale)


def _net() -> Net:
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture
def exports(monkeypatch):
    """Counts torch.onnx.export calls made by the tracer."""
    count = []
    real = trace._export

    def spy(*args, **kwargs):
        count.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(trace, "_export", spy)
    CACHE.clear()
    yield count
    CACHE.clear()


def _flow(tmp_path, model, x, change=None, x2=None, tag="a") -> bytes:
    """create_quant_config, ``change(model)``, quantize_model: the modified model's bytes."""
    amct.create_quant_config(str(tmp_path / f"{tag}.json"), model, x)
    if change is not None:
        change(model)
    amct.quantize_model(str(tmp_path / f"{tag}.json"), str(tmp_path / "mod.onnx"), str(tmp_path / "rec.txt"), model,
                        x if x2 is None else x2, **EXPORT)
    return (tmp_path / "mod.onnx").read_bytes()


def _fresh(tmp_path, model, x) -> bytes:
    """The modified model written by quantize_model after a fresh export (same paths)."""
    CACHE.clear()
    amct.quantize_model(str(tmp_path / "a.json"), str(tmp_path / "mod.onnx"), str(tmp_path / "rec.txt"), model, x,
                        **EXPORT)
    return (tmp_path / "mod.onnx").read_bytes()


def test_reused_export_is_the_fresh_export(tmp_path, exports):
    """AMCT's sequence (config without names, quantize_model with names and dynamic axes) exports once, and the
    modified model is byte for byte the one written after a fresh export; the slot is empty afterwards."""
    model, x = _net(), torch.randn(2, 3, 8, 8)
    reused = _flow(tmp_path, model, x)
    assert len(exports) == 1
    assert CACHE._entry is None
    assert reused == _fresh(tmp_path, model, x)
    assert len(exports) == 2
    graph = onnx.load_from_string(reused).graph
    assert [i.name for i in graph.input] == ["input"] and graph.output[0].name == "logits"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def _inplace(m):
    with torch.no_grad():
        m.conv.weight.mul_(2.0)


def _through_data(m):
    m.head.weight.data[0, 0] += 1.0  # .data: the version counter does not move


def _buffer(m):
    m.bn.running_var.data.mul_(3.0)


def _hook(m):
    m.head.register_forward_pre_hook(lambda _m, args: (args[0] * 2.0,))


def _attribute(m):
    m.scale = 0.5


def _submodule(m):
    m.relu = nn.ReLU6()


def _training(m):
    m.train()


@pytest.mark.parametrize("change", [_inplace, _through_data, _buffer, _hook, _attribute, _submodule, _training])
def test_any_change_between_the_calls_exports_again(tmp_path, exports, change):
    """Weights edited in place (with or without a version bump), a buffer, a hook, a plain attribute, a replaced
    submodule, the training flag: quantize_model exports again and writes what a fresh export gives."""
    model, x = _net(), torch.randn(2, 3, 8, 8)
    before = fingerprint(model, (x,))
    got = _flow(tmp_path, model, x, change)
    assert fingerprint(model, (x,))[0] != before[0]
    assert len(exports) == 2
    assert got == _fresh(tmp_path, model, x)


def test_other_input_values_export_again(tmp_path, exports):
    model, x = _net(), torch.randn(2, 3, 8, 8)
    _flow(tmp_path, model, x, x2=x + 1.0)
    assert len(exports) == 2
    _flow(tmp_path, model, x, x2=x.clone(), tag="b")  # equal values, another tensor: reused
    assert len(exports) == 3


def test_slot_is_dropped_with_the_model_and_after_quantize_model(tmp_path, exports):
    model, x = _net(), torch.randn(2, 3, 8, 8)
    amct.create_quant_config(str(tmp_path / "a.json"), model, x)
    assert CACHE.holds(model)
    del model
    gc.collect()
    assert CACHE._entry is None
    model = _net()
    amct.create_quant_config(str(tmp_path / "a.json"), model, x)
    raw = CACHE._entry[3]
    assert raw.data
    amct.quantize_model(str(tmp_path / "a.json"), str(tmp_path / "mod.onnx"), str(tmp_path / "rec.txt"), model, x,
                        **EXPORT)
    assert CACHE._entry is None and raw.data == b""  # used once: its bytes are let go, not kept by a caller
    amct.quantize_model(str(tmp_path / "a.json"), str(tmp_path / "mod2.onnx"), str(tmp_path / "rec2.txt"), model, x,
                        **EXPORT)
    assert len(exports) == 3  # config, quantize_model (reused), quantize_model again (fresh)


def test_reused_export_calibrates_like_the_model(tmp_path, exports):
    """End to end with the reused export: the calibration model computes what the float model computes."""
    model, x = _net(), torch.randn(4, 3, 8, 8)
    amct.create_quant_config(str(tmp_path / "a.json"), model, x)
    cal = amct.quantize_model(str(tmp_path / "a.json"), str(tmp_path / "mod.onnx"), str(tmp_path / "rec.txt"), model,
                              x, **EXPORT)
    assert len(exports) == 1
    with torch.no_grad():
        np.testing.assert_allclose(cal(x).numpy(), model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_work_copy_shares_weights_only(tmp_path):
    """The eval-mode work copy (a module-tree copy, not deepcopy) shares the parameters and nothing the
    quantization changes: folding, hooks and buffers on the copy leave the user's model as it was."""
    from omct.pytorch.api import _eval_copy
    from omct.pytorch.fold import fold_conv_bn

    model, x = _net(), torch.randn(2, 3, 8, 8)
    model.shared = model.head  # one submodule at two places stays one module in the copy
    with torch.no_grad():
        expected = model(x).clone()
    work = _eval_copy(model, share_weights=True)
    assert work.conv.weight is model.conv.weight and work.bn.running_var is not model.bn.running_var
    assert work.shared is work.head and work.head is not model.head
    work.head.register_forward_hook(lambda _m, _i, out: out * 0)
    assert fold_conv_bn(work, {"conv": "bn"}) == ["conv"]
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), expected.numpy())
    assert isinstance(model.bn, nn.BatchNorm2d) and not model.head._forward_hooks


def test_parametrized_model_is_not_tree_copied():
    """A module with its own pickling (torch.nn.utils.parametrize) is not tree-copied."""
    from torch.nn.utils import parametrize

    from omct.pytorch.api import _plain_tree

    class Double(nn.Module):
        def forward(self, w):
            return w * 2.0

    model = _net()
    parametrize.register_parametrization(model.head, "weight", Double())
    assert not _plain_tree(model) and _plain_tree(_net())


def _replica(kind: str):
    import real_models

    torch.manual_seed(0)
    if kind == "bert":  # static shapes, names from forward(): AMCT's sequence without dynamic_axes
        model = real_models.bert_mini(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=16, num_labels=3)
        ids = torch.randint(0, 300, (2, 16))
        args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
        return model.eval(), args, {"input_names": ["input_ids", "attention_mask", "token_type_ids"],
                                    "output_names": ["logits"]}
    return real_models.efficientnet_lite(width_mult=0.25, head=64).eval(), (torch.randn(2, 3, 32, 32),), EXPORT


@pytest.mark.parametrize("kind", ["efficientnet_lite", "bert"])
def test_reused_trace_of_replicas_is_the_fresh_trace(kind, exports):
    """On the benchmark's replicas (explicit Pad, a static-shape BERT): the traced graph derived from the config
    export (inputs and outputs renamed, the symbolic dimensions the exporter names after them renamed, the
    outputs' dynamic axes applied) is byte for byte the graph a fresh export gives."""
    model, args, export = _replica(kind)
    raw = []
    trace.trace_model(model, args, on_export=raw.append)
    reused = trace.trace_model(model, args, reuse=raw[0], **export)
    assert len(exports) == 1
    fresh = trace.trace_model(model, args, **export)
    assert len(exports) == 2
    assert reused.model.SerializeToString() == fresh.model.SerializeToString()
    assert [s.name for s in reused.layers] == [s.name for s in fresh.layers]
