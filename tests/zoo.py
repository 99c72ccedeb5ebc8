"""Small real models trained on scikit-learn's digits (no downloads): a plain CNN, a ResNet-style CNN
with BatchNorm, a MobileNet-style CNN with depthwise convolutions and a transformer encoder.

Used by the tests, the benchmarks and ``examples/build_example.py`` (kept out of the installed package:
it needs torch and scikit-learn, which omct itself does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Digits:
    x_train: np.ndarray  # (N, 1, size, size) float32, values in [0, 1]
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def load_digits(size: int = 16, seed: int = 0) -> Digits:
    """scikit-learn's 8x8 digits, upsampled to ``size`` x ``size`` (bilinear), split 1297 / 500."""
    import torch
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.numpy()
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order]
    return Digits(x[:-500], y[:-500], x[-500:], y[-500:])


def _torch():
    import torch
    from torch import nn

    return torch, nn


def small_cnn(width: int = 16):
    torch, nn = _torch()
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


def resnet(width: int = 32, blocks: int = 3):
    torch, nn = _torch()

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            return torch.relu(y + (x if self.short is None else self.short(x)))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
            layers, c = [], width
            for i in range(blocks):
                cout = width * (2 ** min(i, 2))
                layers.append(Block(c, cout, 1 if i == 0 else 2))
                c = cout
            self.layers = nn.Sequential(*layers)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(c, 10)

        def forward(self, x):
            return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))

    return ResNet()


def mobilenet(width: int = 32):
    torch, nn = _torch()

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, expand):
            super().__init__()
            hidden = cin * expand
            self.use_res = stride == 1 and cin == cout
            self.body = nn.Sequential(
                nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
                nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )

        def forward(self, x):
            y = self.body(x)
            return x + y if self.use_res else y

    return nn.Sequential(
        nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        InvertedResidual(width, width, 1, 1),
        InvertedResidual(width, width * 2, 2, 4),
        InvertedResidual(width * 2, width * 2, 1, 4),
        InvertedResidual(width * 2, width * 4, 2, 4),
        InvertedResidual(width * 4, width * 4, 1, 4),
        nn.Conv2d(width * 4, width * 8, 1, bias=False), nn.BatchNorm2d(width * 8), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width * 8, 10),
    )


def transformer(d_model: int = 64, layers: int = 2, heads: int = 4, patch: int = 4, size: int = 16):
    """A ViT-style encoder: ``patch`` x ``patch`` patches as tokens, nn.TransformerEncoder, mean pooling."""
    torch, nn = _torch()

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = patch
            tokens = (size // patch) ** 2
            self.embed = nn.Linear(patch * patch, d_model)
            self.pos = nn.Parameter(torch.randn(1, tokens, d_model) * 0.02)
            layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.head = nn.Linear(d_model, 10)

        def forward(self, x):
            b = x.shape[0]
            p = self.patch
            x = x.reshape(b, 1, size // p, p, size // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, p * p)
            x = self.embed(x) + self.pos
            return self.head(self.encoder(x).mean(dim=1))

    return Encoder()


ARCHITECTURES = {"small_cnn": small_cnn, "resnet": resnet, "mobilenet": mobilenet, "transformer": transformer}


def train(model, data: Digits, epochs: int = 20, lr: float = 3e-3, seed: int = 0, batch_size: int = 64):
    """Plain Adam training on the digits; returns the model in eval mode."""
    torch, nn = _torch()
    torch.manual_seed(seed)
    x = torch.tensor(data.x_train)
    y = torch.tensor(data.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    return model.eval()


def accuracy_torch(model, x: np.ndarray, y: np.ndarray) -> float:
    torch, _ = _torch()
    with torch.no_grad():
        return float((model(torch.tensor(x)).argmax(1).numpy() == y).mean())


def export_onnx(model, example: np.ndarray, path, opset: int = 17) -> None:
    """Export with a dynamic batch dimension (TorchScript exporter, dependable without onnxscript)."""
    torch, _ = _torch()
    torch.onnx.export(model.eval(), (torch.tensor(example),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=opset, dynamo=False)


def build(name: str, data: Digits, path, epochs: int = 20, seed: int = 0, **kwargs):
    """Train architecture ``name`` on ``data`` and export it to ``path``; returns the torch model."""
    import torch

    torch.manual_seed(seed)
    model = ARCHITECTURES[name](**kwargs)
    train(model, data, epochs=epochs, seed=seed)
    export_onnx(model, data.x_test[:2], path)
    return model
