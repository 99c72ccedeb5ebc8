"""AMCT's call sequence through the PyTorch frontend whatever ``dynamic_axes`` ``quantize_model`` gets.

``create_quant_config`` takes no ``dynamic_axes`` (AMCT's API), so its export has a dynamic batch axis; a fully
static export in ``quantize_model`` (``dynamic_axes={}``) makes BERT's position ids constants, and the
position-embedding lookup a constant the runtime folds. The config then lists a layer the second graph cannot
quantize: it stays in float with a warning, the rest runs on integer kernels; a misspelled name still fails."""

import json

import numpy as np
import onnx
import pytest
import real_models
import torch
from conftest import assert_integer_kernels, assert_no_float_kernels, ort_run

import omct.pytorch as amct
from omct.errors import ConfigError
from omct.formats.record import read_record
from omct.graph.modified import read_modified

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
POSITION = "bert.embeddings.position_embeddings"
SEQ = 16


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    model = real_models.bert_mini(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, initializer_range=0.2).eval()
    rng = np.random.default_rng(0)

    def batch(n):
        ids = torch.tensor(rng.integers(3, 100, (n, SEQ)))
        lengths = torch.tensor(rng.integers(SEQ // 2, SEQ + 1, n))
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        types = (torch.arange(SEQ) >= SEQ // 2).long().expand(n, SEQ) * mask
        return ids * mask, mask, types

    return model, [batch(8) for _ in range(3)]


def _cosine(a, b) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


AXES = {"default": None, "static": {}, "dict": {n: {0: "batch"} for n in NAMES}}


@pytest.mark.parametrize("axes", list(AXES))
def test_amct_sequence_gives_integer_kernels_whatever_the_axes(axes, bert, tmp_path, caplog):
    model, batches = bert
    config, modified, record = tmp_path / "config.json", tmp_path / "modified.onnx", tmp_path / "record.txt"
    amct.create_quant_config(config, model, batches[0], batch_num=2)
    written = config.read_text()
    assert POSITION in json.loads(written)  # create_quant_config's export (dynamic batch) can quantize it
    export = {} if AXES[axes] is None else {"dynamic_axes": AXES[axes]}
    with caplog.at_level("WARNING", logger="omct"):
        cal = amct.quantize_model(config, modified, record, model, batches[0], **export)
    warned = [r.getMessage() for r in caplog.records if "stays in float" in r.getMessage()]
    if axes == "static":  # every shape static: the position ids are constants, the lookup a folded constant
        assert len(warned) == 1 and f"'{POSITION}'" in warned[0] and "constants" in warned[0], warned
    else:
        assert not warned, warned
    for b in batches[1:]:
        cal(*b)
    assert cal.complete
    amct.save_model(modified, record, tmp_path / "q")
    fake, deploy = tmp_path / "q_fake_quant_model.onnx", tmp_path / "q_deploy_model.onnx"
    assert_integer_kernels(deploy, tmp_path)
    assert_no_float_kernels(deploy, tmp_path)

    # the round trip: the user's config is not rewritten; the modified model's plan, the record and the saved
    # models agree on which layers are quantized (the folded table in float, every Linear quantized)
    assert config.read_text() == written
    planned = set(read_modified(modified).plan.layers)
    assert set(read_record(record)) == planned
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linears <= planned
    assert (POSITION in planned) == (axes != "static")
    deploy_inits = {t.name for t in onnx.load(deploy).graph.initializer}
    assert any(POSITION in n for n in deploy_inits)  # float table or its quantized version: present either way

    x = batches[2]
    feeds = {n: t.numpy() for n, t in zip(NAMES, x, strict=True)}
    with torch.no_grad():
        want = model(*x).numpy()
    got_fake, got_deploy = ort_run(fake, feeds)[0], ort_run(deploy, feeds)[0]
    assert _cosine(got_fake, want) > 0.98, _cosine(got_fake, want)
    assert _cosine(got_deploy, got_fake) > 0.995, _cosine(got_deploy, got_fake)


@pytest.mark.parametrize("wrong", ["bert.embeddings.position_embedding", "classifer"])
def test_misspelled_config_layer_is_still_an_error(wrong, bert, tmp_path):
    """Only a layer the model has, and this export cannot quantize, is forgiven: a typo names the layer."""
    model, batches = bert
    config = tmp_path / "config.json"
    amct.create_quant_config(config, model, batches[0])
    right = POSITION if wrong.startswith("bert") else "classifier"
    data = json.loads(config.read_text())
    data = {wrong if k == right else k: v for k, v in data.items()}
    config.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"layer '{wrong}' is not a quantizable layer"):
        amct.quantize_model(config, tmp_path / "m.onnx", tmp_path / "r.txt", model, batches[0], dynamic_axes={})


def test_automatic_search_counts_only_the_layers_it_quantizes(bert, tmp_path, caplog):
    """The search's "N of M layers" counts the layers the quantized model has: not the position table the static
    export keeps float, nor the config's chain ops (Add, ...) that stay float between float tensors. An evaluator
    that accepts only the float model ends with every quantized layer in float, and says so."""
    from omct.auto import AutoCalibrationEvaluatorBase

    model, batches = bert
    with torch.no_grad():
        want = model(*batches[2])

    class OnlyFloat(AutoCalibrationEvaluatorBase):
        def calibration(self, m):
            with torch.no_grad():
                for b in batches[:2]:
                    m(*b)

        def evaluate(self, m):  # 1 for the float model's outputs (the nn.Module, then OnnxModule trials), else 0
            with torch.no_grad():
                return float(np.abs((m(*batches[2]) - want).numpy()).max() < 1e-4)

    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(config, model, batches[0], batch_num=2)
    with caplog.at_level("INFO", logger="omct"):
        result = amct.accuracy_based_auto_calibration(model, OnlyFloat(), config, record, tmp_path / "out", batches[0],
                                                      dynamic_axes={})
    quantized = set(read_record(record))  # what calibration quantized: the modified model's plan
    assert POSITION not in quantized and len(quantized) < len(json.loads(config.read_text())) - 8  # the globals
    m = len(quantized)
    messages = [r.getMessage() for r in caplog.records]
    first = next(s for s in messages if s.startswith("evaluation 1:"))
    assert f"0 of {m} layers in float" in first, first
    assert set(result.float_layers) == quantized
    assert any(f"every layer ({m} of {m}) in float" in s for s in messages), messages
    done = next(s for s in messages if s.startswith("done after"))
    assert f"{m} of {m} layers in float" in done, done
    assert json.loads((tmp_path / "out" / "search_record.json").read_text())["all_float"] is True
