"""Integer chains through the PyTorch frontend: the residual Add, MaxPool, GlobalAveragePool and zero Pads
between quantized layers run on integers in ONNX Runtime's optimised deploy graph, as through the ONNX frontend."""

from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

import omct.pytorch as amct
from tests.conftest import assert_no_float_kernels, optimized_ops, ort_run
from tests.real_models import BasicBlock, ConvBnAct, MBConv, conv1x1


class TinyResNet(nn.Module):
    """torchvision's ResNet layout: in-place ReLUs, MaxPool after the stem, residual Adds, a GAP head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 16, 2, nn.Sequential(conv1x1(8, 16, 2), nn.BatchNorm2d(16)))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer2(self.layer1(x))), 1))


class TinyEfficientNet(nn.Module):
    """EfficientNet-Lite as TF ports build it: explicit zero Pads before the strided convs, a residual MBConv."""

    def __init__(self):
        super().__init__()
        self.conv_stem = ConvBnAct(3, 16, 3, 2)
        self.blocks = nn.Sequential(MBConv(16, 16, 3, 1, 1), MBConv(16, 24, 3, 2, 4), MBConv(24, 24, 5, 1, 4))
        self.conv_head = ConvBnAct(24, 64)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.global_pool(self.conv_head(self.blocks(self.conv_stem(x)))), 1))


def _randomise_batchnorms(model: nn.Module, rng: np.random.Generator) -> None:
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.from_numpy(rng.normal(0, 0.1, m.num_features).astype(np.float32)))
            m.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, m.num_features).astype(np.float32)))


@pytest.mark.parametrize("build", [TinyResNet, TinyEfficientNet], ids=["resnet_block", "efficientnet_block"])
def test_pytorch_deploy_graph_keeps_chains_integer(build, tmp_path):
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = build().eval()
    _randomise_batchnorms(model, rng)
    batches = [torch.from_numpy(rng.uniform(-1, 1, (8, 3, 32, 32)).astype(np.float32)) for _ in range(4)]
    config, modified, record = tmp_path / "config.json", tmp_path / "modified.onnx", tmp_path / "record.txt"
    amct.create_quant_config(str(config), model, batches[0], batch_num=len(batches))
    cal = amct.quantize_model(str(config), str(modified), str(record), model, batches[0],
                              input_names=["input"], output_names=["logits"])
    with torch.no_grad():
        for b in batches:
            torch.testing.assert_close(cal(b), model(b), rtol=1e-4, atol=1e-4)  # calibration only observes
    assert cal.complete
    amct.save_model(str(modified), str(record), str(tmp_path / "q"))
    deploy = tmp_path / "q_deploy_model.onnx"

    ops = Counter(optimized_ops(deploy, tmp_path))
    # One QuantizeLinear for the float input, nothing dequantized: every Add, MaxPool, GAP and Pad is integer
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 0, dict(ops)
    assert ops["QLinearAdd"] >= 1 and ops["QLinearGlobalAveragePool"] == 1 and ops["Pad"] == 0, dict(ops)
    assert_no_float_kernels(deploy, tmp_path)  # every conv a QLinearConv (no float FusedConv with ReLU6/HardSwish)

    x = torch.from_numpy(rng.uniform(-1, 1, (16, 3, 32, 32)).astype(np.float32))
    with torch.no_grad():
        want = model(x).numpy()
    got = ort_run(deploy, {"input": x.numpy()})[0]
    cosine = float((got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want))
    assert cosine > 0.99, cosine
