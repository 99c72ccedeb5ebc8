"""The PyTorch calibration model's speed-ups keep its results: the calibration copy of a CNN with depthwise
convolutions runs channels-last (``calibration.channels_last``): the user's module is unchanged, the calibration
model still returns what the module returns (NCHW), the factors are those of the NCHW passes up to float rounding,
and a forward() that needs NCHW memory falls back; the statistics see a hooked value as the hook read it, not as
forward() changes it in place later."""

import numpy as np
import pytest
import torch
from torch import nn

import omct.pytorch as amct
import omct.pytorch.calibration as calibration
from omct.formats.record import read_record

LAYERS = {"stem.0", "dw.0", "pw", "fc"}


class DepthwiseNet(nn.Module):
    """MobileNet-style: conv, BN, ReLU6 (in place), depthwise conv, BN, ReLU, 1x1 conv; returns the feature map
    and the logits. ``flat_view``: the head reads the feature map with ``.view(n, -1)`` (needs NCHW memory)."""

    def __init__(self, flat_view: bool = False):
        super().__init__()
        self.flat_view = flat_view
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                nn.ReLU(inplace=True))
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16 * 4 * 4 if flat_view else 16, 5)

    def forward(self, x):
        f = self.pw(self.dw(self.stem(x)))
        head = f.view(f.size(0), -1) if self.flat_view else f.mean((2, 3))
        return f, self.fc(head)


def _model(flat_view=False):
    torch.manual_seed(0)
    model = DepthwiseNet(flat_view)
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _calibrate(model, batches, tmp_path, tag):
    config, record, modified = (str(tmp_path / f"{tag}{s}") for s in (".json", "_record.txt", "_mod.onnx"))
    amct.create_quant_config(config, model, batches[0][:2], batch_num=len(batches))
    cal = amct.quantize_model(config, modified, record, model, batches[0][:2])
    with torch.no_grad():
        outs = [cal(b) for b in batches]
    amct.save_model(modified, record, str(tmp_path / tag))
    return cal, outs, read_record(record)


@pytest.fixture
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(8, 3, 8, 8, generator=g) for _ in range(3)]


def test_depthwise_copy_runs_channels_last_and_matches_nchw(batches, tmp_path, monkeypatch):
    model = _model()
    weights = {n: (p, p.stride(), p.detach().clone()) for n, p in model.named_parameters()}
    cal, outs, record = _calibrate(model, batches, tmp_path, "cl")
    # the copy's convolutions are channels-last, the user's are as they were
    dw = cal.model.get_submodule("dw.0").weight
    assert dw.stride() == dw.detach().to(memory_format=torch.channels_last).stride() != weights["dw.0.weight"][1]
    for n, p in model.named_parameters():
        assert p is weights[n][0] and p.stride() == weights[n][1] and torch.equal(p, weights[n][2]), n
    # what the module returns: values up to float rounding (BN folded, accumulation order), NCHW memory
    with torch.no_grad():
        for b, (f, logits) in zip(batches, outs, strict=True):
            ref_f, ref_logits = model(b)
            assert f.is_contiguous()
            torch.testing.assert_close(f, ref_f, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits, ref_logits, rtol=1e-4, atol=1e-4)
        assert cal(batches[0])[0].is_contiguous()  # after calibration too
    # the NCHW passes (channels_last turned off) give the same factors up to float rounding
    monkeypatch.setattr(calibration, "channels_last", lambda _model, _args: False)
    cal_nchw, _, ref = _calibrate(_model(), batches, tmp_path, "nchw")
    assert cal_nchw.model.get_submodule("dw.0").weight.is_contiguous()
    assert record.keys() == ref.keys() and LAYERS <= record.keys()
    for name, r in record.items():
        np.testing.assert_allclose(r.scale_d, ref[name].scale_d, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(r.scale_w, ref[name].scale_w, rtol=1e-6, err_msg=name)
        assert r.offset_d == ref[name].offset_d, name


def test_forward_that_needs_nchw_memory_falls_back(batches, tmp_path):
    model = _model(flat_view=True)
    with torch.no_grad(), pytest.raises(RuntimeError, match="view"):  # the reason for the fallback
        model.to(memory_format=torch.channels_last)(batches[0].contiguous(memory_format=torch.channels_last))
    model = _model(flat_view=True)
    cal, outs, record = _calibrate(model, batches, tmp_path, "view")
    assert LAYERS <= record.keys() and cal.complete
    for m in cal.model.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.is_contiguous() and m.weight.stride() == torch.empty(m.weight.shape).stride()
    with torch.no_grad():
        for b, (_, logits) in zip(batches, outs, strict=True):
            torch.testing.assert_close(logits, model(b)[1], rtol=1e-4, atol=1e-4)


class InPlaceAfterConv(nn.Module):
    """A conv whose output ``forward()`` changes in place after the hook has read it (``out += 1``), or not."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        out = self.conv(x)
        if self.in_place:
            out += 1.0
        else:
            out = out + 1.0
        return self.fc(out.mean((2, 3)))


def test_hooked_values_are_read_before_forward_changes_them_in_place(batches, tmp_path):
    # a hook's value is fed as read (a copy, if the statistics were ever fed after the pass)
    records = []
    for in_place in (True, False):
        torch.manual_seed(0)
        _, _, record = _calibrate(InPlaceAfterConv(in_place).eval(), batches, tmp_path, f"inplace{in_place}")
        records.append(record)
    assert records[0].keys() == records[1].keys() and {"conv", "fc"} <= records[0].keys()
    assert records[0] == records[1]
