"""The PyTorch frontend end to end: seed 001's call sequence on models trained here, layer mapping, folding,
a PyTorch simulation of the quantization as the independent reference, and clear errors."""

import copy
import logging

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_integer_kernels, optimized_ops, ort_run
from torch import nn

import omct.pytorch as amct
from omct.errors import CalibrationError, ConfigError, ModelError, RecordError
from omct.formats.record import read_record

INTEGER_KERNELS = {"QLinearConv", "QGemm", "MatMulIntegerToFloat", "QLinearMatMul"}


def seed_flow(model, input_data, batches, tmp_path, float_weight_ops=(), **export):
    """Seed 001's example, with ``import omct.pytorch as amct``, keyword for keyword; then the deploy model's
    integer kernels are checked (``float_weight_ops``: op types with none in ONNX Runtime's CPU provider)."""
    config_file = str(tmp_path / "tmp" / "config.json")
    record_file = str(tmp_path / "tmp" / "record.txt")
    modified_onnx_model = str(tmp_path / "tmp" / "modified_model.onnx")
    amct.create_quant_config(config_file=config_file, model=model, input_data=input_data, skip_layers=[],
                             batch_num=len(batches))
    calibration_model = amct.quantize_model(config_file=config_file, modified_onnx_model=modified_onnx_model,
                                            record_file=record_file, model=model, input_data=input_data, **export)
    with torch.no_grad():
        outputs = [calibration_model(b) for b in batches]
    quant_model_path = str(tmp_path / "results" / "user_model")
    amct.save_model(modified_onnx_file=modified_onnx_model, record_file=record_file, save_path=quant_model_path)
    assert_integer_kernels(tmp_path / "results" / "user_model_deploy_model.onnx", tmp_path, float_weight_ops)
    return calibration_model, outputs, tmp_path / "results" / "user_model_fake_quant_model.onnx", \
        tmp_path / "results" / "user_model_deploy_model.onnx"


def accuracy(path, x, y):
    return float((ort_run(path, {"input": x})[0].argmax(1) == y).mean())


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer"])
def test_seed_call_sequence_keeps_accuracy(name, trained, digits, tmp_path):
    model, _ = trained(name)
    before = copy.deepcopy(model.state_dict())
    x = torch.tensor(digits.x_test[:2])
    batches = [torch.tensor(digits.x_train[i * 32:(i + 1) * 32]) for i in range(4)]
    export = {"input_names": ["input"], "output_names": ["logits"], "dynamic_axes": {"input": {0: "n"}, "logits": {0: "n"}}}
    cal, outs, fake, deploy = seed_flow(model, x, batches, tmp_path, **export)
    # calibration only observes: the calibration model computes what the model computes (BN folded: float rounding)
    with torch.no_grad():
        for b, o in zip(batches, outs, strict=True):
            torch.testing.assert_close(o, model(b), rtol=1e-4, atol=1e-4)
    assert cal.complete and cal.batches_seen == 4
    # the user's model is untouched (BN not folded into it)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        fp32 = float((model(torch.tensor(digits.x_test)).argmax(1).numpy() == digits.y_test).mean())
    acc_fake = accuracy(fake, digits.x_test, digits.y_test)
    acc_deploy = accuracy(deploy, digits.x_test, digits.y_test)
    assert acc_deploy >= fp32 - 0.01, (fp32, acc_fake, acc_deploy)
    assert acc_fake >= fp32 - 0.01, (fp32, acc_fake, acc_deploy)
    assert INTEGER_KERNELS & set(optimized_ops(deploy, tmp_path))


def test_transformer_attention_is_reported_not_quantized(trained, digits):
    model, _ = trained("transformer")
    report = amct.inspect_model(model, torch.tensor(digits.x_test[:2]))
    names = {s.name for s in report.layers}
    assert {"embed", "encoder.layers.0.linear1", "encoder.layers.0.linear2", "head"} <= names
    reasons = {r.name: r.reason for r in report.refused}
    assert "never called" in reasons["encoder.layers.0.self_attn.out_proj"]


# ------------------------------------------------------------------ mapping
class SamePadConv(nn.Conv2d):
    """A Conv2d subclass as real models write them: 'same' padding done in forward with F.pad."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


class Tangled(nn.Module):
    """Nested containers, functional ops between modules, two inputs, tuple-and-dict outputs, a module reused,
    weights shared, a reflect-padded conv and a Linear on token tensors."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(SamePadConv(3, 8, 3), nn.ReLU())
        self.branches = nn.ModuleList([nn.Conv2d(8, 8, 1), nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))])
        self.heads = nn.ModuleDict({"cls": nn.Linear(16, 5), "aux": nn.Linear(16, 5)})
        self.heads["aux"].weight = self.heads["cls"].weight  # shared weight
        self.again = nn.Conv2d(8, 8, 1)  # called twice
        self.reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")
        self.tokens = nn.Linear(4, 6)
        self.pool = nn.AvgPool2d(2)

    def forward(self, image, extra):
        y = self.stem(image)
        y = torch.cat([F.relu(self.branches[0](y)), self.branches[1](y)], dim=1)[:, :8] + extra
        y = self.again(self.again(y))
        y = self.pool(self.reflect(y))
        flat = y.mean(dim=(2, 3))
        vec = torch.cat([flat, flat], dim=1)
        tok = self.tokens(y.flatten(2)[:, :, :4])
        return self.heads["cls"](vec), {"aux": self.heads["aux"](vec), "tok": tok}


def test_layer_mapping_and_refusal_reasons():
    torch.manual_seed(0)
    model = Tangled().eval()
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8))
    report = amct.inspect_model(model, inputs)
    assert [s.name for s in report.layers] == ["stem.0", "branches.0", "branches.1.0", "pool", "tokens"]
    assert report.types["stem.0"] == "Conv2d"
    reasons = {r.name: r.reason for r in report.refused}
    assert set(reasons) == {"again", "reflect", "heads.cls", "heads.aux"}
    assert "runs 2 times" in reasons["again"]
    assert "padding_mode 'reflect'" in reasons["reflect"]
    assert "shares its weight with 'heads.aux'" in reasons["heads.cls"]


def fake_quant(x, scale, offset):
    return (torch.clamp(torch.round(x / scale) + offset, -128, 127) - offset) * scale


def simulate(model, record, relu_after=(), transposed=()):
    """PyTorch simulation of the record's quantization (independent of the ONNX export): inputs, weights,
    INT32-grid bias and output sites fake-quantized with the record's factors. ``transposed``: Linear modules
    the ONNX graph runs as MatMul on the (in, out) weight, the layout the record's ``ada_flip`` indexes."""
    sim = copy.deepcopy(model)
    modules = dict(sim.named_modules())
    for name, rec in record.items():
        if name not in modules:  # a chain op between layers (a Flatten: the input's scale, nothing to simulate)
            assert rec.scale_w == [] and rec.scale_o in (None, rec.scale_d), name
            continue
        m = modules[name]
        if getattr(m, "weight", None) is not None:
            axis = 1 if isinstance(m, nn.ConvTranspose2d) else 0
            shape = [1] * m.weight.dim()
            shape[axis] = -1
            s_w = torch.tensor(rec.scale_w, dtype=torch.float64).reshape(shape)
            w = m.weight.data.double()
            q = torch.round(w / s_w)
            if rec.ada_flip:  # learned rounding: at these flat indices (gap-coded) the other neighbour of w / s
                t = name in transposed
                v, flat = (w / s_w).T if t else w / s_w, torch.tensor(np.cumsum(rec.ada_flip))
                q = (q.T if t else q).reshape(-1).clone()
                q[flat] = torch.where(q[flat] > v.reshape(-1)[flat], torch.floor(v.reshape(-1)[flat]),
                                      torch.ceil(v.reshape(-1)[flat]))
                q = q.reshape(v.shape).T if t else q.reshape(v.shape)
            m.weight.data = (torch.clamp(q, -128, 127) * s_w).float()
            if m.bias is not None:
                s_b = s_w.reshape(-1) * rec.scale_d
                bias = m.bias.data.double().float().double()
                if rec.bias_correction:  # the record's bias correction, added before the INT32 rounding
                    bias = (bias + torch.tensor(rec.bias_correction, dtype=torch.float64)).float().double()
                m.bias.data = (torch.round(bias / s_b) * s_b).float()
        m.register_forward_pre_hook(lambda _m, a, r=rec: (fake_quant(a[0], r.scale_d, r.offset_d),) + tuple(a[1:]))
        if rec.scale_o is not None:
            relu = name in relu_after
            m.register_forward_hook(lambda _m, _a, out, r=rec, relu=relu:
                                    fake_quant(torch.relu(out) if relu else out, r.scale_o, r.offset_o))
    return sim


class Video(nn.Module):
    """Conv3d classifier on short clips."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv3d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv3d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(y.mean(dim=(2, 3, 4)))


class Decoder(nn.Module):
    """Autoencoder whose decoder upsamples with ConvTranspose2d."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
        self.dec = nn.Sequential(nn.ConvTranspose2d(8, 8, 2, stride=2), nn.ReLU(), nn.ConvTranspose2d(8, 1, 2, stride=2))

    def forward(self, x):
        return self.dec(self.enc(x))


def clips(x):
    """Digits as 4-frame clips drifting one pixel per frame."""
    return np.stack([np.roll(x, k, axis=-1) for k in range(4)], axis=2)


def train(model, x, target, loss, epochs, lr=3e-3):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, tt = torch.tensor(x), torch.tensor(target)
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(64):
            opt.zero_grad()
            loss(model(xt[idx]), tt[idx]).backward()
            opt.step()
    return model.eval()


@pytest.mark.slow
def test_conv3d_classifier_and_simulation(digits, tmp_path):
    torch.manual_seed(0)
    x_train, x_test = clips(digits.x_train), clips(digits.x_test)
    model = train(Video(), x_train, digits.y_train, F.cross_entropy, epochs=8)
    batches = [torch.tensor(x_train[i * 32:(i + 1) * 32]) for i in range(3)]
    export = {"input_names": ["input"], "dynamic_axes": {"input": {0: "n"}}}
    cal, _, fake, deploy = seed_flow(model, batches[0][:2], batches, tmp_path, float_weight_ops=("Conv",), **export)
    with torch.no_grad():
        fp32 = float((model(torch.tensor(x_test)).argmax(1).numpy() == digits.y_test).mean())
    assert accuracy(deploy, x_test, digits.y_test) >= fp32 - 0.01
    record = read_record(tmp_path / "tmp" / "record.txt")
    assert set(record) == {"conv1", "conv2", "fc"}
    with torch.no_grad():
        want = simulate(cal.model, record, relu_after={"conv1", "conv2"})(torch.tensor(x_test[:64])).numpy()
    got = ort_run(fake, {"input": x_test[:64]})[0]
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()


@pytest.mark.slow
def test_conv_transpose_decoder_and_simulation(digits, tmp_path):
    model = train(Decoder(), digits.x_train, digits.x_train, F.mse_loss, epochs=15)
    batches = [torch.tensor(digits.x_train[i * 32:(i + 1) * 32]) for i in range(3)]
    export = {"input_names": ["input"], "output_names": ["image"], "dynamic_axes": {"input": {0: "n"}, "image": {0: "n"}}}
    cal, _, fake, deploy = seed_flow(model, batches[0][:2], batches, tmp_path, float_weight_ops=("ConvTranspose",), **export)
    record = read_record(tmp_path / "tmp" / "record.txt")
    assert set(record) == {"enc.0", "enc.2", "dec.0", "dec.2"}
    x = digits.x_test[:64]
    with torch.no_grad():
        fp32 = model(torch.tensor(x)).numpy()
        want = simulate(cal.model, record, relu_after={"enc.0", "enc.2"})(torch.tensor(x)).numpy()
    got = ort_run(fake, {"input": x})[0]
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    # reconstruction error of the deploy model stays close to the float model's
    err_fp32 = float(((fp32 - x) ** 2).mean())
    err_deploy = float(((ort_run(deploy, {"input": x})[0] - x) ** 2).mean())
    assert err_deploy < 1.1 * err_fp32, (err_fp32, err_deploy)
    # dynamic batch survives in both saved models
    for path in (fake, deploy):
        for n in (1, 5):
            assert ort_run(path, {"input": digits.x_test[:n]})[0].shape == (n, 1, 16, 16)


def test_tangled_model_runs_end_to_end_and_matches_simulation(tmp_path):
    torch.manual_seed(0)
    model = Tangled().eval()
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 8, 8, 8))
    batches = [(torch.randn(4, 3, 8, 8), torch.randn(4, 8, 8, 8)) for _ in range(2)]
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(cfg, model, inputs, batch_num=2)
    cal = amct.quantize_model(cfg, mod, rec, model, inputs, input_names=["image", "extra"])
    with torch.no_grad():
        for b in batches:
            out = cal(*b)
            ref = model(*b)
            torch.testing.assert_close(out[0], ref[0])
            torch.testing.assert_close(out[1]["tok"], ref[1]["tok"])
    amct.save_model(mod, rec, tmp_path / "q")
    record = read_record(rec)
    feeds = {"image": inputs[0].numpy(), "extra": inputs[1].numpy()}
    got = ort_run(tmp_path / "q_fake_quant_model.onnx", feeds)
    with torch.no_grad():
        want = simulate(cal.model, record, relu_after={"branches.0", "stem.0"}, transposed={"tokens"})(*inputs)
    for g, w in zip(got, [want[0], want[1]["aux"], want[1]["tok"]], strict=True):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-4 * float(w.abs().max()) + 1e-6)


# ------------------------------------------------------------------ folding
def test_do_fusion_folds_and_can_be_turned_off(trained, digits, tmp_path):
    model, _ = trained("resnet")
    x = torch.tensor(digits.x_test[:2])
    for fusion, expect_bn in ((True, 0), (False, 9)):
        cfg_def = tmp_path / f"f{fusion}.cfg"
        cfg_def.write_text(f"batch_num: 1\ndo_fusion: {str(fusion).lower()}\n")
        cfg, mod = tmp_path / f"c{fusion}.json", tmp_path / f"m{fusion}.onnx"
        amct.create_quant_config(cfg, model, x, config_defination=str(cfg_def))
        cal = amct.quantize_model(cfg, mod, tmp_path / f"r{fusion}.txt", model, x)
        ops = [n.op_type for n in onnx.load(mod).graph.node]
        assert ops.count("BatchNormalization") == expect_bn
        with torch.no_grad():
            torch.testing.assert_close(cal(x), model(x), rtol=1e-4, atol=1e-4)
    # skip_fusion_layers keeps one BN
    cfg_def = tmp_path / "skip.cfg"
    cfg_def.write_text('batch_num: 1\nskip_fusion_layers: "stem.0"\n')
    amct.create_quant_config(tmp_path / "s.json", model, x, config_defination=str(cfg_def))
    amct.quantize_model(tmp_path / "s.json", tmp_path / "s.onnx", tmp_path / "s.txt", model, x)
    assert [n.op_type for n in onnx.load(tmp_path / "s.onnx").graph.node].count("BatchNormalization") == 1


# ------------------------------------------------------------------ bad input
def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 14 * 14, 3)).eval()


def test_training_mode_is_said_and_the_model_left_alone(tmp_path):
    model = small().train()
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("omct").addHandler(handler)
    try:
        amct.create_quant_config(tmp_path / "c.json", model, torch.randn(1, 1, 16, 16))
    finally:
        logging.getLogger("omct").removeHandler(handler)
    assert any("training mode" in m and "eval-mode copy" in m for m in said), said
    assert model.training


def test_input_data_that_does_not_run(tmp_path):
    with pytest.raises(ModelError, match="input_data does not run through the model: RuntimeError"):
        amct.create_quant_config(tmp_path / "c.json", small(), torch.randn(1, 3, 16, 16))
    with pytest.raises(ModelError, match="input_data must be a tensor or a tuple"):
        amct.create_quant_config(tmp_path / "c.json", small(), np.zeros((1, 1, 16, 16), np.float32))
    assert not (tmp_path / "c.json").exists()


def test_model_without_quantizable_layer(tmp_path):
    with pytest.raises(ModelError, match="no quantizable layer"):
        amct.create_quant_config(tmp_path / "c.json", nn.Sequential(nn.ReLU()).eval(), torch.randn(2, 3))


def test_unknown_skip_layer_names_close_ones(tmp_path):
    with pytest.raises(ConfigError, match="'3'"):
        amct.create_quant_config(tmp_path / "c.json", small(), torch.randn(1, 1, 16, 16), skip_layers=["4"])


def test_calibration_stopped_early_and_nan(tmp_path):
    model = small()
    x = torch.randn(2, 1, 16, 16)
    amct.create_quant_config(tmp_path / "c.json", model, x, batch_num=3)
    cal = amct.quantize_model(tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt", model, x)
    with torch.no_grad():
        cal(x)
    with pytest.raises(RecordError, match="ran 1 of batch_num=3"):
        amct.save_model(tmp_path / "m.onnx", tmp_path / "r.txt", tmp_path / "q")
    assert not list(tmp_path.glob("q_*"))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with torch.no_grad(), pytest.raises(CalibrationError, match="'0'.*skip_layers"):
        cal(bad)


def test_conv1d_model_matches_simulation(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv1d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 20, 4)).eval()
    batches = [torch.randn(16, 3, 20) for _ in range(2)]
    cal, _, fake, deploy = seed_flow(model, batches[0][:2], batches, tmp_path, float_weight_ops=("Conv",),  # 1D
                                     input_names=["input"], dynamic_axes={"input": {0: "n"}})
    record = read_record(tmp_path / "tmp" / "record.txt")
    assert set(record) == {"0", "2", "5", "/4/Flatten"}  # the Flatten between them: an integer chain op
    x = torch.randn(8, 3, 20)
    with torch.no_grad():
        want = simulate(cal.model, record, relu_after={"0", "2"})(x).numpy()
    got = ort_run(fake, {"input": x.numpy()})[0]
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    np.testing.assert_allclose(ort_run(deploy, {"input": x.numpy()})[0], got, atol=0.05 * np.abs(got).max())


def test_calibration_model_lets_go_after_the_last_batch(tmp_path):
    """After the last batch AMCT's calibration module is the plain module again: its hooks are removed, and the
    ONNX Runtime session, the modified model and the statistics (only the record file is read after this) are
    freed before save_model needs the memory; the outputs and the saved models are unchanged by that."""
    import real_models

    torch.manual_seed(0)
    model = real_models.resnet18(width=8).eval()  # residual Adds: their outputs come from an ONNX Runtime session
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    config, modified, record = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(config, model, batches[0][:1], batch_num=2)
    cal = amct.quantize_model(config, modified, record, model, batches[0][:1])
    assert cal._session is not None and cal._handles
    with torch.no_grad():
        outs = [cal(b) for b in batches]
    assert cal.complete and read_record(record)
    assert not cal._handles and cal._session is None and cal._mod is None and cal.calibration.stats is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in cal.model.modules())
    with torch.no_grad():
        for b, o in zip(batches, outs, strict=True):
            torch.testing.assert_close(cal(b), o)
            torch.testing.assert_close(o, model(b), rtol=1e-4, atol=1e-4)
    amct.save_model(modified, record, tmp_path / "q")
    x = batches[1].numpy()
    with torch.no_grad():
        want = model(batches[1]).numpy()
    name = onnx.load(tmp_path / "q_fake_quant_model.onnx").graph.input[0].name
    got = ort_run(tmp_path / "q_fake_quant_model.onnx", {name: x})[0]
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


class _Pairs(nn.Module):
    """Conv + BatchNorm in the ways that fold and the ways that must not."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)  # folds
        self.b, self.bn_b = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # conv output read twice
        self.c, self.bn_c = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # BN reads 2 * conv output
        self.d, self.bn_d = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)  # BN runs twice
        self.e, self.bn_e = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4, affine=False)  # folds
        for bn in (self.bn_a, self.bn_b, self.bn_c, self.bn_d, self.bn_e):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        x = torch.relu(self.bn_a(self.a(x)))
        y = self.b(x)
        x = self.bn_b(y) + y
        x = self.bn_c(2 * self.c(x))
        x = self.bn_d(self.bn_d(self.d(x)))
        return self.bn_e(self.e(x))


def test_batchnorms_fold_only_into_the_conv_whose_output_they_alone_read(tmp_path):
    """Conv + BN pairs are found from the export (the BN module read the conv's very output, the one node
    reading it is the module's BatchNormalization); every other arrangement keeps its BN."""
    torch.manual_seed(0)
    model = _Pairs().eval()
    x = torch.randn(2, 3, 8, 8)
    assert amct.inspect_model(model, x).foldable == {"a": "bn_a", "e": "bn_e"}
    amct.create_quant_config(tmp_path / "c.json", model, x, batch_num=1)
    cal = amct.quantize_model(tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt", model, x)
    assert [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node].count("BatchNormalization") == 4  # b, c, d twice
    with torch.no_grad():
        torch.testing.assert_close(cal(x), model(x), rtol=1e-4, atol=1e-4)
