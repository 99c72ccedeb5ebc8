"""The PyTorch frontend on models built the way people build them (tests/real_models.py: torchvision's ResNet-18
and MobileNetV2 with their in-place ReLU/ReLU6 and ``out += identity``, a Hugging Face-style BERT), lightly
trained on the digits: AMCT's call sequence with and without dynamic axes, the user's model untouched,
the saved models agreeing with PyTorch, and inputs named after ``forward()``'s arguments."""

import copy
import shutil

import numpy as np
import onnx
import pytest
import real_models
import torch
import torch.nn.functional as F
import zoo
from conftest import assert_integer_kernels, assert_no_float_kernels, ort_run
from torch import nn

import omct.onnx
import omct.pytorch as amct
from omct.formats.record import read_record

BATCH = 16  # input_data's batch: the static exports only take this batch size
CALIBRATION_BATCHES = 3
SEQ = 32  # BERT tokens: an 8x8 digit's top half as one segment, bottom half as the other, 4 pixels a token


def _digits32():
    d = zoo.load_digits(32)
    norm = [(x.repeat(3, axis=1) - 0.2) / 0.3 for x in (d.x_train, d.x_test)]  # RGB-like, mean/std normalised
    return zoo.Digits(norm[0].astype(np.float32), d.y_train, norm[1].astype(np.float32), d.y_test)


def _tokens(images: np.ndarray, rng: np.random.Generator):
    """8x8 digits as token sequences: pairs of pixel intensities (0..16 each) as a word id, [CLS] first; some
    sequences are cut short and padded (attention_mask 0, token id 0), as a tokenizer's batch would be."""
    px = np.rint(torch.nn.functional.interpolate(torch.tensor(images), size=(8, 8), mode="area").numpy() * 16)
    px = px.reshape(len(images), 32, 2).astype(np.int64)
    ids = np.concatenate([np.full((len(images), 1), 2), 3 + px[..., 0] * 17 + px[..., 1]], axis=1)[:, :SEQ]
    lengths = np.where(rng.random(len(images)) < 0.3, rng.integers(SEQ // 2, SEQ, len(images)), SEQ)
    mask = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int64)
    types = np.broadcast_to((np.arange(SEQ) >= SEQ // 2).astype(np.int64), ids.shape).copy()
    return ids * mask, mask, types * mask


TRAINING = {"resnet18": (2, 2e-3), "mobilenet_v2": (1, 1e-2), "bert": (2, 2e-3)}  # epochs, learning rate


def build(name: str, digits: zoo.Digits):
    """(model, training inputs, test inputs), the model trained a little on the digits (a few seconds)."""
    epochs, lr = TRAINING[name]
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    if name == "bert":
        model = real_models.bert_mini(vocab_size=3 + 17 * 17, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, max_position_embeddings=64, num_labels=10)
        train = [torch.tensor(a) for a in _tokens(digits.x_train, rng)]
        test = [torch.tensor(a) for a in _tokens(digits.x_test, rng)]
    else:
        d = _digits32()
        model = real_models.resnet18(width=16) if name == "resnet18" else real_models.mobilenet_v2(width_mult=0.25)
        train, test = [torch.tensor(d.x_train)], [torch.tensor(d.x_test)]
    y = torch.tensor(digits.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(*[t[idx] for t in train]), y[idx]).backward()
            opt.step()
    return model.eval(), train, test


@pytest.fixture(scope="module")
def setups(digits):
    """name -> build(name), each built once."""
    made = {}
    threads = torch.get_num_threads()
    # Small models: one thread is faster, and two spin against each other on a busy shared host (OpenMP barriers).
    torch.set_num_threads(1)
    yield lambda name: made[name] if name in made else made.setdefault(name, build(name, digits))
    torch.set_num_threads(threads)


FORWARD_NAMES = {"resnet18": ["x"], "mobilenet_v2": ["x"], "bert": ["input_ids", "attention_mask", "token_type_ids"]}


def _inplace_flags(model: nn.Module) -> dict[str, bool]:
    return {n: m.inplace for n, m in model.named_modules() if hasattr(m, "inplace")}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _batch(tensors, start, size=BATCH):
    return tuple(t[start:start + size] for t in tensors)


# static: no dynamic_axes (the default keeps a dynamic batch axis, as create_quant_config's export does);
# all_static: dynamic_axes={}, every shape static (BERT's position lookup then reads constant indices: float)
@pytest.mark.parametrize("dynamic", [False, True, "all"], ids=["static", "dynamic", "all_static"])
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "bert"])
def test_amct_call_sequence_on_real_models(name, dynamic, setups, tmp_path):
    model, train, test = setups(name)
    names = FORWARD_NAMES[name]
    assert sum(_inplace_flags(model).values()) > 0 or name == "bert"
    before, flags, types = copy.deepcopy(model.state_dict()), _inplace_flags(model), [type(m) for m in model.modules()]
    input_data = _batch(train, 0)
    export = {"output_names": ["logits"]}
    if dynamic is True:
        axes = {n: {0: "batch", 1: "sequence"} if name == "bert" else {0: "batch"} for n in names}
        export["dynamic_axes"] = {**axes, "logits": {0: "batch"}}
    elif dynamic == "all":
        export["dynamic_axes"] = {}
    config, modified, record = tmp_path / "config.json", tmp_path / "modified.onnx", tmp_path / "record.txt"
    # AMCT's sequence, no input_names: the inputs take forward()'s argument names
    amct.create_quant_config(config_file=str(config), model=model, input_data=input_data, skip_layers=[],
                             batch_num=CALIBRATION_BATCHES)
    cal = amct.quantize_model(config_file=str(config), modified_onnx_model=str(modified), record_file=str(record),
                              model=model, input_data=input_data, **export)
    batches = [_batch(train, BATCH * (i + 1)) for i in range(CALIBRATION_BATCHES)]
    with torch.no_grad():
        for b in batches:  # calibration only observes (BN folded: float rounding)
            torch.testing.assert_close(cal(*b), model(*b), rtol=1e-4, atol=1e-4)
    assert cal.complete
    amct.save_model(str(modified), str(record), str(tmp_path / "q"))
    fake, deploy = tmp_path / "q_fake_quant_model.onnx", tmp_path / "q_deploy_model.onnx"
    assert_integer_kernels(deploy, tmp_path)  # static shapes too: no weight dequantized at run time
    assert_no_float_kernels(deploy, tmp_path)  # and no float conv / matmul on a constant weight at all

    # the user's model is unchanged: weights, BatchNorms (not folded into it), in-place flags, eval mode
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert _inplace_flags(model) == flags and [type(m) for m in model.modules()] == types and not model.training
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    for path in (modified, fake, deploy):
        assert [i.name for i in onnx.load(path).graph.input] == names, path
    assert "BatchNormalization" not in {n.op_type for n in onnx.load(modified).graph.node}  # every BN folded
    layers = read_record(record)
    # every Conv and Linear, and BERT's word- and position-embedding tables (weight-only; the export computes the
    # position ids from the sequence length, unless every shape is static; the token-type table is too small)
    tables = [k for k in layers if "embeddings" in k]
    want_tables = {"bert.embeddings.word_embeddings"} | ({"bert.embeddings.position_embeddings"} if dynamic != "all"
                                                         else set())
    assert set(tables) == (want_tables if name == "bert" else set())
    modules = dict(model.named_modules())  # the rest: chain ops between them (Add, MaxPool, ...), by ONNX node name
    want_layers = sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules()) + len(tables)
    assert len([k for k in layers if k in modules]) == want_layers

    # the saved models agree with PyTorch on held-out inputs
    for start in (0, BATCH):
        x = _batch(test, start)
        feeds = {n: t.numpy() for n, t in zip(names, x, strict=True)}
        with torch.no_grad():
            want = model(*x).numpy()
        got_fake = ort_run(fake, feeds)[0]
        got_deploy = ort_run(deploy, feeds)[0]
        assert _cosine(got_fake, want) > 0.99, _cosine(got_fake, want)
        assert _cosine(got_deploy, got_fake) > 0.999, _cosine(got_deploy, got_fake)
        assert (got_deploy.argmax(1) == want.argmax(1)).mean() >= 0.9
    if dynamic is True:  # another batch size (and sequence length) runs in both saved models
        x = tuple(t[:3, :SEQ // 2] if name == "bert" else t[:3] for t in test)
        feeds = {n: t.numpy() for n, t in zip(names, x, strict=True)}
        with torch.no_grad():
            want = model(*x).numpy()
        for path in (fake, deploy):
            got = ort_run(path, feeds)[0]
            assert got.shape == want.shape and _cosine(got, want) > 0.98, path

    # the hooks read what the deploy model quantizes: calibrating the modified ONNX model itself in ONNX Runtime
    # on the same batches gives the same factors (an output read after an in-place ReLU or `out += identity`
    # ran would not)
    shutil.copy(record, tmp_path / "torch_record.txt")
    session = omct.onnx.CalibrationSession(str(modified))
    for b in batches:
        session.run(None, {n: t.numpy() for n, t in zip(names, b, strict=True)})
    onnx_layers = read_record(record)
    for layer, rec in layers.items():
        ref = onnx_layers[layer]
        assert rec.scale_d == pytest.approx(ref.scale_d, rel=2e-3), layer
        assert (rec.scale_o is None) == (ref.scale_o is None), layer
        if rec.scale_o is not None:
            assert rec.scale_o == pytest.approx(ref.scale_o, rel=2e-3), layer
            assert abs(rec.offset_o - ref.offset_o) <= 1, layer


# ------------------------------------------------------------------ input names
class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, image, offset=None):
        y = torch.relu(self.conv(image))
        if offset is not None:
            y = y + offset
        return self.fc(y.mean(dim=(2, 3)))


class StarArgs(TwoInputs):
    def forward(self, *inputs):
        return super().forward(*inputs)


def _input_names(model, input_data, tmp_path, **export):
    amct.create_quant_config(tmp_path / "c.json", model, input_data)
    amct.quantize_model(tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt", model, input_data, **export)
    return [i.name for i in onnx.load(tmp_path / "m.onnx").graph.input]


def test_input_names_default_to_forward_arguments(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    image, offset = torch.randn(2, 3, 8, 8), torch.randn(2, 4, 8, 8)
    assert _input_names(model, (image, offset), tmp_path) == ["image", "offset"]
    assert _input_names(model, image, tmp_path) == ["image"]  # only as many as input_data provides
    assert _input_names(model, (image, offset), tmp_path, input_names=["a", "b"]) == ["a", "b"]  # explicit wins
    assert len(_input_names(StarArgs().eval(), (image, offset), tmp_path)) == 2  # *inputs: the exporter's names


def test_auto_calibration_inputs_take_forward_names(tmp_path):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x = torch.randn(4, 3, 8, 8)

    class Evaluator(amct.AutoCalibrationEvaluatorBase):
        def calibration(self, m):
            with torch.no_grad():
                m(x)

        def evaluate(self, m):
            with torch.no_grad():
                m(x)  # the trial models run; every trial scores the same, so all layers stay quantized
            return 1.0

    amct.create_quant_config(tmp_path / "c.json", model, x)
    amct.accuracy_based_auto_calibration(model, Evaluator(), tmp_path / "c.json", tmp_path / "r.txt", tmp_path / "out", x)
    for kind in ("fake_quant", "deploy"):
        assert [i.name for i in onnx.load(tmp_path / "out" / f"model_{kind}_model.onnx").graph.input] == ["image"]


def test_freshly_initialised_bert_quantizes_every_linear():
    """Hugging Face's init zeroes every bias; the exporter stores equal tensors once and reads the others through
    Identity nodes, which left the pooler's bias 'computed at run time' and the pooler in float."""
    torch.manual_seed(0)
    model = real_models.bert_mini().eval()
    ids = torch.randint(3, 1000, (2, 16))
    report = amct.inspect_model(model, (ids, torch.ones_like(ids), torch.zeros_like(ids)))
    assert {r.name for r in report.refused} == {"bert.embeddings.token_type_embeddings"}  # 2 x 64 values: too small
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert {s.name for s in report.layers} == linears | {"bert.embeddings.word_embeddings",
                                                         "bert.embeddings.position_embeddings"}
