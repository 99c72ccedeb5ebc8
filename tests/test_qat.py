"""Quantization-aware training (AMCT's retrain) for PyTorch: the .cfg, the learned quantizers against numpy
references, the exported models against the trained module, checkpoints, and clear errors."""

import copy
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import zoo
from conftest import assert_integer_kernels, ort_run
from onnx import numpy_helper
from torch import nn

import omct.pytorch as amct
from omct.errors import CalibrationError, ConfigError, ModelError, QuantizationError
from omct.formats.record import read_record
from omct.pytorch.retrain.quantizers import ActivationULQ, WeightQuantizer, fake_quant

# The public Ascend sample's retrain .cfg for ResNet-101, as AMCT users have it.
RESNET101_SAMPLE_CFG = """\
batch_num: 2
override_layer_types : {
    layer_type : "Conv2d"
    retrain_weight_quant_config : {
        arq_retrain : {
           channel_wise : true
        }
    }
}
override_layer_types : {
    layer_type : "Linear"
    retrain_weight_quant_config : {
        arq_retrain : {
           channel_wise : false
        }
    }
}
"""


@pytest.fixture(scope="module")
def cnn():
    """A small BN CNN trained briefly on the digits (float model, data)."""
    data = zoo.load_digits(16)
    torch.manual_seed(0)
    model = zoo.small_cnn(8)
    zoo.train(model, data, epochs=4)
    return model, data


def fine_tune(qat, data, steps=30, lr=0.01, seed=0):
    """The user's training loop: plain SGD over every parameter of the retrain model."""
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.tensor(data.x_train), torch.tensor(data.y_train)
    opt = torch.optim.SGD(qat.parameters(), lr=lr, momentum=0.9)
    qat.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(qat(x[idx]), y[idx]).backward()
        opt.step()
    return qat.eval()


def retrain(model, tmp_path, data, cfg_text=None, steps=30, **tune):
    cfg = None
    if cfg_text is not None:
        cfg = tmp_path / "retrain.cfg"
        cfg.write_text(cfg_text)
    example = torch.tensor(data.x_test[:2])
    amct.create_quant_retrain_config(str(tmp_path / "retrain.json"), model, example, config_defination=cfg)
    qat = amct.create_quant_retrain_model(str(tmp_path / "retrain.json"), model, str(tmp_path / "record.txt"), example)
    return fine_tune(qat, data, steps, **tune), example


def save(qat, tmp_path, example, prefix="qat"):
    amct.save_quant_retrain_model(str(tmp_path / "retrain.json"), qat, str(tmp_path / "record.txt"), str(tmp_path / prefix),
                                  example, input_names=["input"])
    return tmp_path / f"{prefix}_fake_quant_model.onnx", tmp_path / f"{prefix}_deploy_model.onnx"


# ---------------------------------------------------------------------------------------------- numerics
def test_fake_quant_forward_and_straight_through_gradients_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 2, 5000).astype(np.float32)
    scale, offset = np.float32(0.03), -20.0
    xt = torch.tensor(x, requires_grad=True)
    s = torch.tensor(scale, requires_grad=True)
    o = torch.tensor(offset, requires_grad=True)
    y = fake_quant(xt, s, o, -128, 127)
    q = np.clip(np.round(x / scale) + offset, -128, 127)
    np.testing.assert_array_equal(y.detach().numpy(), ((q - offset) * scale).astype(np.float32))
    y.sum().backward()
    inside = (np.round(x / scale) + offset >= -128) & (np.round(x / scale) + offset <= 127)
    np.testing.assert_array_equal(xt.grad.numpy(), inside.astype(np.float32))  # STE inside, 0 outside
    # LSQ's step-size gradient: round(x/s) - x/s inside, the clamped level's distance from the offset outside
    ds = np.where(inside, np.round(x / scale) - x / scale, q - offset).sum()
    assert float(s.grad) == pytest.approx(ds, rel=1e-4)
    assert float(o.grad) == pytest.approx(-scale * (~inside).sum(), rel=1e-4)  # the offset's: -s outside


def test_ulq_clip_gradients_against_finite_differences():
    """The clip parameters' gradients are those of the forward (with the STE): checked against a finite
    difference of the loss with rounding replaced by the identity inside the range."""
    rng = np.random.default_rng(1)
    x = torch.tensor(rng.normal(0.5, 1.0, 4000).astype(np.float32))
    q = ActivationULQ("probe")
    q.set_range(-1.0, 2.0, fixed_min=False)
    target = torch.tensor(rng.normal(0.5, 1.0, 4000).astype(np.float32))
    ((q(x) - target) ** 2).mean().backward()

    def loss(lo, hi):  # the STE's view: clamp to the range, no rounding (float64)
        xs = x.double().clamp(lo, hi)
        return float(((xs - target.double()) ** 2).mean())

    # Outside the range the output is the clip value, whose derivative is 1 (plus the rounding term inside,
    # small and zero-mean): compare the dominant part with a finite difference.
    eps = 1e-3
    assert float(q.clip_max.grad) == pytest.approx((loss(-1, 2 + eps) - loss(-1, 2 - eps)) / (2 * eps), abs=0.01)
    assert float(q.clip_min.grad) == pytest.approx((loss(-1 + eps, 2) - loss(-1 - eps, 2)) / (2 * eps), abs=0.01)


def test_weight_quantizers_arq_and_ulq_int4():
    w = torch.tensor(np.random.default_rng(2).normal(0, 0.1, (6, 3, 3, 3)).astype(np.float32))
    arq = WeightQuantizer("conv", w, 4, 0, learned=False)
    expect = np.abs(w.numpy()).reshape(6, -1).max(1) / 7
    np.testing.assert_allclose(arq.record_scales(w), expect, rtol=1e-6)
    codes = np.round(w.numpy() / expect.reshape(-1, 1, 1, 1))
    np.testing.assert_allclose(arq(w).detach().numpy(), codes * expect.reshape(-1, 1, 1, 1), rtol=1e-6)
    ulq = WeightQuantizer("conv", w, 4, 0, learned=True).train()
    (ulq(w) ** 2).sum().backward()
    assert ulq.log_scale.grad is not None and ulq.log_scale.grad.shape == (6,)
    assert np.unique(np.round(ulq(w).detach().numpy() / ulq.scale.detach().numpy().reshape(-1, 1, 1, 1))).size <= 16



@pytest.mark.parametrize("axis", [0, None])
def test_ulq_scale_starts_at_the_mse_optimal_clip(axis):
    """ulq_retrain's learned INT4 scale starts at the clip with the least squared weight error, not at max|w|:
    checked against a numpy brute force over 3000 clips per channel (a finer grid than omct's candidates)."""
    rng = np.random.default_rng(3)
    w = rng.standard_t(3, (5, 4, 3, 3)).astype(np.float32) * np.array([0.1, 0.5, 1, 2, 4], np.float32)[:, None, None, None]
    rows = w.reshape(5, -1).astype(np.float64) if axis == 0 else w.reshape(1, -1).astype(np.float64)

    def err(clip):  # squared error of every row at every clip in ``clip`` (rows x candidates)
        s = clip[..., None] / 7
        return ((np.clip(np.round(rows[:, None, :] / s), -8, 7) * s - rows[:, None, :]) ** 2).sum(-1)

    max_abs = np.abs(rows).max(1)
    grid = max_abs[:, None] * np.linspace(0.2, 1.0, 3000)[None, :]
    best = err(grid).min(1)
    got = WeightQuantizer("conv", torch.tensor(w), 4, axis, learned=True).scale.detach().numpy().reshape(-1) * 7
    got_err = err(got[:, None].astype(np.float64))[:, 0]
    assert np.all(got_err <= best * 1.02), (got_err, best)  # within omct's candidate resolution of the optimum
    assert np.all(got_err < err(max_abs[:, None])[:, 0])  # and better than the max-abs start


def test_ulq_weight_scale_gradient_is_lsq_scaled():
    """The learned scale's gradient: LSQ's per-element term (round(w/s) - w/s inside, the clamped level outside)
    summed per channel, times 1 / sqrt(elements per channel * qmax) (numpy reference); the parameter is log(s),
    so its gradient is s times that."""
    rng = np.random.default_rng(4)
    w = rng.normal(0, 0.2, (3, 2, 3, 3)).astype(np.float32)
    g = rng.normal(0, 1, w.shape).astype(np.float32)
    ulq = WeightQuantizer("conv", torch.tensor(w), 4, 0, learned=True).train()
    (ulq(torch.tensor(w)) * torch.tensor(g)).sum().backward()
    s = ulq.scale.detach().numpy().astype(np.float64).reshape(-1, 1, 1, 1)
    r = np.round(w / s)
    term = np.where((r >= -8) & (r <= 7), r - w / s, np.clip(r, -8, 7))
    expect = (g * term).reshape(3, -1).sum(1) / np.sqrt(18 * 7) * s.reshape(-1)
    np.testing.assert_allclose(ulq.log_scale.grad.numpy(), expect, rtol=1e-4, atol=1e-7)


def test_ulq_weight_scale_stays_positive_under_adam():
    """An INT8 scale of about 1e-3 and Adam at lr 2e-4 with a gradient that keeps pushing it down: learned
    directly it crossed zero within a few steps; as log(s) it only shrinks by a fraction per step."""
    w = torch.tensor(np.random.default_rng(5).normal(0, 0.05, (4, 16)).astype(np.float32))
    ulq = WeightQuantizer("fc", w, 8, 0, learned=True).train()
    start = ulq.scale.detach().clone()
    assert float(start.max()) < 2e-3
    opt = torch.optim.Adam(ulq.parameters(), lr=2e-4)
    for _ in range(50):
        opt.zero_grad()
        ulq.current_scale(w).sum().backward()  # d/ds > 0 every step: Adam lowers the scale at its full rate
        opt.step()
    end = ulq.scale.detach()
    assert torch.all(end > 0) and torch.all(end < start)
    np.testing.assert_allclose(end.numpy(), start.numpy() * np.exp(-50 * 2e-4), rtol=1e-3)

# ---------------------------------------------------------------------------------------------- end to end
def test_initialisation_corrects_each_bias_for_its_quantized_weights_mean_shift(cnn, tmp_path):
    """PTQ's bias correction at the end of the initialisation batches: bias += -(Wq - W) . E[x], with E[x] the
    per-channel mean of the layer's input over those batches (numpy reference from the captured inputs)."""
    model, data = cnn
    cfg = tmp_path / "w4t.cfg"
    cfg.write_text("batch_num: 2\nretrain_weight_quant_config { ulq_retrain { channel_wise: false dst_type: INT4 } }\n")
    example = torch.tensor(data.x_test[:2])
    amct.create_quant_retrain_config(str(tmp_path / "r.json"), model, example, config_defination=str(cfg))
    qat = amct.create_quant_retrain_model(str(tmp_path / "r.json"), model, str(tmp_path / "rec.txt"), example).train()
    names = ["0", "3", "6", "10"]
    modules = {n: qat.model.get_submodule(n) for n in names}
    before = {n: m.parametrizations.bias.original.detach().clone() for n, m in modules.items()}
    seen: dict[str, list] = {n: [] for n in names}
    for n, m in modules.items():  # registered after the retrain hooks: sees what the layer computes with
        m.register_forward_pre_hook(lambda _m, args, n=n: seen[n].append(args[0].detach().numpy().copy()))
    x = torch.tensor(data.x_train[:128])
    with torch.no_grad():
        qat(x[:64])
        assert all(torch.equal(modules[n].parametrizations.bias.original, before[n]) for n in names)
        qat(x[64:])
    assert qat.initialized
    for n, m in modules.items():
        inputs = np.concatenate(seen[n])
        mean = inputs.mean(axis=(0, 2, 3)) if inputs.ndim == 4 else inputs.mean(axis=0)
        w = m.parametrizations.weight.original.detach().numpy().astype(np.float64)
        dw = m.weight.detach().numpy().astype(np.float64) - w  # the fake-quantized weight's error
        per = dw.reshape(dw.shape[0], dw.shape[1], -1).sum(-1)
        expect = -(per @ mean)
        got = (m.parametrizations.bias.original.detach() - before[n]).numpy()
        assert np.abs(expect).max() > 1e-3, n  # INT4 per tensor: a real shift to correct
        np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-5 * np.abs(expect).max(), err_msg=n)
    # the last layer (no padding): its mean output over the initialisation data is that of the float weights
    fc, inputs = modules["10"], torch.tensor(np.concatenate(seen["10"]))
    with torch.no_grad():
        quantized = (inputs @ fc.weight.T + fc.parametrizations.bias.original).mean(0)
        float_ = (inputs @ fc.parametrizations.weight.original.T + before["10"]).mean(0)
        uncorrected = (inputs @ fc.weight.T + before["10"]).mean(0)
    assert (quantized - float_).abs().max() < 1e-4 * float_.abs().max() < (uncorrected - float_).abs().max()


def test_retrain_exports_what_was_trained_on_integer_kernels(cnn, tmp_path):
    model, data = cnn
    before = copy.deepcopy(model.state_dict())
    qat, example = retrain(model, tmp_path, data)
    for k, v in model.state_dict().items():  # the user's model is untouched
        assert torch.equal(v, before[k]), k
    assert qat.initialized and qat.batches_seen == 30
    fake, deploy = save(qat, tmp_path, example)
    with torch.no_grad():
        ref = qat(torch.tensor(data.x_test)).numpy()
    fq = ort_run(fake, {"input": data.x_test})[0]
    dep = ort_run(deploy, {"input": data.x_test})[0]
    span = np.abs(ref).max()
    # the same arithmetic in another runtime: only float summation order differs (a rare rounding flip)
    assert np.abs(fq - ref).max() < 0.01 * span
    assert np.abs(dep - ref).max() < 0.01 * span
    assert (fq.argmax(1) == ref.argmax(1)).mean() >= 0.99
    assert_integer_kernels(deploy, tmp_path)
    # the record holds the learned factors (BN folded: no BatchNormalization left)
    records = read_record(tmp_path / "record.txt")
    learned = qat.records()
    assert set(records) == set(learned) == {"0", "3", "6", "10"}
    for name, rec in learned.items():
        assert records[name].scale_d == pytest.approx(rec.scale_d, rel=1e-7)
        assert records[name].scale_w == pytest.approx(rec.scale_w, rel=1e-7)
    assert records["3"].offset_d == -128  # after a ReLU: fixed_min
    assert not [n for n in onnx.load(fake).graph.node if n.op_type == "BatchNormalization"]
    acc = float((dep.argmax(1) == data.y_test).mean())
    assert acc >= zoo.accuracy_torch(model, data.x_test, data.y_test) - 0.05


def test_amct_resnet101_sample_cfg_and_int4_ulq_weights(cnn, tmp_path):
    model, data = cnn
    cfg = RESNET101_SAMPLE_CFG + """override_layer_configs {
    layer_name: "6"
    retrain_weight_quant_config { ulq_retrain { channel_wise: true dst_type: INT4 } }
    retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 6.0 clip_min: 0.0 } fixed_min: true } }
}
"""
    qat, example = retrain(model, tmp_path, data, cfg, steps=12)
    config = __import__("json").loads((tmp_path / "retrain.json").read_text())
    assert config["batch_num"] == 2
    assert config["10"]["retrain_weight_config"] == {"algo": "arq_retrain", "channel_wise": False, "dst_type": "INT8"}
    assert config["6"]["retrain_weight_config"]["dst_type"] == "INT4"
    assert config["6"]["retrain_data_config"]["clip_max"] == 6.0
    fake, deploy = save(qat, tmp_path, example)
    rec = read_record(tmp_path / "record.txt")
    assert len(rec["10"].scale_w) == 1 and len(rec["6"].scale_w) == 32
    learned = qat.model.get_submodule("6").parametrizations.weight[0].scale.detach().numpy()
    np.testing.assert_allclose(rec["6"].scale_w, learned, rtol=1e-6)
    graph = onnx.load(deploy).graph
    codes = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(".weight_quantized")}
    int4 = codes["6.weight_quantized"]
    assert int4.min() >= -8 and int4.max() <= 7 and np.unique(int4).size <= 16
    with torch.no_grad():
        ref = qat(torch.tensor(data.x_test)).numpy()
    assert np.abs(ort_run(fake, {"input": data.x_test})[0] - ref).max() < 0.01 * np.abs(ref).max()
    assert_integer_kernels(deploy, tmp_path)


class _Mixed(nn.Module):
    """Conv1d, a grouped ConvTranspose2d, a Conv2d subclass, a Conv3d and a Linear on 3-D tokens."""

    class SameConv(nn.Conv2d):
        pass

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(2, 4, 2, stride=2, groups=2)
        self.c2 = self.SameConv(4, 4, 3, padding=1)
        self.c3 = nn.Conv3d(1, 2, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        b = x.shape[0]
        h = torch.relu(self.c1(x))  # (b, 8, 16)
        h = torch.relu(self.c2(self.up(h.reshape(b, 2, 8, 8))))  # (b, 4, 16, 16)
        v = self.c3(h.reshape(b, 1, 4, 16, 16))
        return self.fc(v.reshape(b, 2 * 4 * 32, 8)).mean(1)


def test_every_layer_type_trains_and_exports_as_trained(tmp_path):
    torch.manual_seed(0)
    model = _Mixed().eval()
    xs = torch.randn(96, 4, 16)
    ys = model(xs).argmax(1)
    example = xs[:2]
    amct.create_quant_retrain_config(str(tmp_path / "retrain.json"), model, example)
    qat = amct.create_quant_retrain_model(str(tmp_path / "retrain.json"), model, str(tmp_path / "record.txt"), example)
    assert set(qat.plan.layers) == {"c1", "up", "c2", "c3", "fc"}
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    for i in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(qat(xs[i * 24:(i + 1) * 24]), ys[i * 24:(i + 1) * 24]).backward()
        opt.step()
    qat.eval()
    fake, deploy = save(qat, tmp_path, example)
    with torch.no_grad():
        ref = qat(xs).numpy()
    got = ort_run(fake, {"input": xs.numpy()})[0]
    assert np.abs(got - ref).max() < 0.01 * np.abs(ref).max()
    assert np.abs(ort_run(deploy, {"input": xs.numpy()})[0] - ref).max() < 0.02 * np.abs(ref).max()


def test_refused_modules_stay_out_of_the_retrain_config(tmp_path):
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(1, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.AvgPool2d(2)

        def forward(self, x):
            return self.pool(self.b(self.b(self.a(x))))

    import logging

    from omct.ui import logger

    seen = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: seen.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), Twice().eval(), torch.randn(1, 1, 8, 8))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    config = __import__("json").loads((tmp_path / "c.json").read_text())
    assert set(config) == {"version", "batch_num", "a"}  # b runs twice; AvgPool2d is no retrain type
    assert any(m.startswith("left in float: b: runs 2 times") for m in seen), seen


# ---------------------------------------------------------------------------------------------- .cfg
def _cfg_error(tmp_path, text, model=None):
    path = tmp_path / "bad.cfg"
    path.write_text(text)
    model = model or zoo.small_cnn(4).eval()
    with pytest.raises(ConfigError) as e:
        amct.create_quant_retrain_config(str(tmp_path / "c.json"), model, torch.randn(1, 1, 16, 16),
                                         config_defination=str(path))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_retrain_cfg_errors_are_one_line(tmp_path):
    msg = _cfg_error(tmp_path, "batch_num: 1\nretrain_weight_quant_config { arq_retrain { chanel_wise: true } }\n")
    assert "has no field 'chanel_wise'" in msg and "channel_wise" in msg and "line 2" in msg
    msg = _cfg_error(tmp_path, "batch_num: 1\nactivation_offset: true\n")
    assert "AMCTRetrainConfig has no field 'activation_offset'" in msg
    msg = _cfg_error(tmp_path, "retrain_data_quant_config { ulq_quantize { dst_type: INT4 } }\n")
    assert "INT4" in msg and "8-bit" in msg
    msg = _cfg_error(tmp_path, 'override_layer_types { layer_type: "Conv2D" }\n')
    assert "'Conv2D'" in msg and "Conv2d" in msg
    msg = _cfg_error(tmp_path, "prune_config { filter_pruner { balanced_l2_norm_filter_prune { prune_ratio: 0.5 } } }\n")
    assert "prune_config" in msg
    msg = _cfg_error(tmp_path, "retrain_data_quant_config { ulq_quantize { clip_max_min { clip_max: 0 clip_min: 1 } } }\n")
    assert "clip_min" in msg


# ---------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {Path(os.environ['OMCT_QAT_PWNED'])}",))


def test_checkpoints_restore_and_refuse_pickles_and_other_models(cnn, tmp_path, monkeypatch):
    model, data = cnn
    qat, example = retrain(model, tmp_path, data, steps=6)
    torch.save({"state_dict": qat.state_dict(), "epoch": 3}, tmp_path / "ckpt.pth")
    args = (str(tmp_path / "retrain.json"), model, str(tmp_path / "record.txt"), example)
    restored = amct.restore_quant_retrain_model(*args, str(tmp_path / "ckpt.pth"), state_dict_name="state_dict").eval()
    x = torch.tensor(data.x_test[:50])
    with torch.no_grad():
        torch.testing.assert_close(restored(x), qat(x), rtol=0, atol=0)
    assert restored.initialized
    # saved from a DistributedDataParallel wrapper: keys start with "module."
    torch.save({f"module.{k}": v for k, v in qat.state_dict().items()}, tmp_path / "ddp.pth")
    amct.restore_quant_retrain_model(*args, str(tmp_path / "ddp.pth"))

    flag = tmp_path / "pwned"
    monkeypatch.setenv("OMCT_QAT_PWNED", str(flag))
    torch.save({"state_dict": qat.state_dict(), "extra": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelError, match="weights_only") as e:
        amct.restore_quant_retrain_model(*args, str(tmp_path / "evil.pth"), state_dict_name="state_dict")
    assert not flag.exists() and "\n" not in str(e.value)

    state = qat.state_dict()
    missing = {k: v for k, v in state.items() if "act_quantizers.site1" not in k}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ModelError, match=r"lacks 4 key\(s\).*act_quantizers\.site1\.clip_max"):
        amct.restore_quant_retrain_model(*args, str(tmp_path / "missing.pth"))
    torch.save({**state, "head.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ModelError, match="unexpected 1 key.*head.weight"):
        amct.restore_quant_retrain_model(*args, str(tmp_path / "extra.pth"))
    other = zoo.small_cnn(4).eval()
    other_args = (str(tmp_path / "other.json"), other, str(tmp_path / "r2.txt"), example)
    amct.create_quant_retrain_config(other_args[0], other, example)
    with pytest.raises(ModelError, match="wrong shapes"):
        amct.restore_quant_retrain_model(*other_args, str(tmp_path / "ckpt.pth"), state_dict_name="state_dict")
    with pytest.raises(ModelError, match="no 'model'.*'state_dict', 'epoch'"):
        amct.restore_quant_retrain_model(*args, str(tmp_path / "ckpt.pth"), state_dict_name="model")


# ---------------------------------------------------------------------------------------------- bad input
def test_bad_input_is_one_line(cnn, tmp_path):
    model, data = cnn
    example = torch.tensor(data.x_test[:2])
    config = str(tmp_path / "retrain.json")
    amct.create_quant_retrain_config(config, model, example)
    qat = amct.create_quant_retrain_model(config, model, str(tmp_path / "record.txt"), example)
    # evaluating (or saving) before the initialisation batches ran
    with pytest.raises(QuantizationError, match="0 of batch_num=1 initialisation batches"):
        qat.eval()(example)
    with pytest.raises(QuantizationError, match="never trained"):
        save(qat, tmp_path, example)
    with pytest.raises(ModelError, match="plain Sequential"):
        amct.save_quant_retrain_model(config, model, str(tmp_path / "record.txt"), str(tmp_path / "m"), example)
    fine_tune(qat, data, steps=2)
    # a clip range that collapsed, or became NaN: the layer is named, nothing is written
    site = qat.act_quantizers["site2"]
    with torch.no_grad():
        site.clip_max.fill_(0.0)
    with pytest.raises(QuantizationError, match=r"layer '3, 6'.*collapsed"):
        qat(example)
    with torch.no_grad():
        site.clip_max.fill_(float("nan"))
    with pytest.raises(QuantizationError, match="layer '3, 6'"):
        save(qat, tmp_path, example)
    assert not (tmp_path / "record.txt").exists() and not (tmp_path / "qat_deploy_model.onnx").exists()
    # NaN in the initialisation data names the layer
    fresh = amct.create_quant_retrain_model(config, model, str(tmp_path / "record.txt"), example)
    with pytest.raises(CalibrationError, match="layer '0'"):
        fresh(torch.full((2, 1, 16, 16), float("nan")))
    # a config from another model
    other = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 3)).eval()
    with pytest.raises(ConfigError, match="layer '3' is not a layer of this model"):
        amct.create_quant_retrain_model(config, other, str(tmp_path / "r.txt"), example)
    # the record may not overwrite the config
    with pytest.raises(Exception, match="record_file"):
        amct.create_quant_retrain_model(config, model, config, example)
