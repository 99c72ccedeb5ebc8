"""Tensor decomposition, then fine-tuning, then quantization, with ``import omct.pytorch as amct``.

    python examples/pytorch_decompose.py    # trains a small CNN on scikit-learn's digits, decomposes, quantizes

Replace ``build_model``, ``train`` and the data with your own.
"""

import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

import omct.pytorch as amct


def build_model() -> nn.Module:
    """Your model's structure (no weights)."""
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    )


def train(model, epochs, lr):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for i in range(0, len(train_x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[i:i + 64]), train_y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def accuracy(model) -> float:
    with torch.no_grad():
        return float((model(test_x).argmax(1) == test_y).float().mean())


digits = load_digits()
images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
train_x, train_y, test_x, test_y = images[:1297], labels[:1297], images[1297:], labels[1297:]
torch.manual_seed(0)
model = train(build_model(), 10, 3e-3)
original = accuracy(model)

# 1. decompose: each qualifying Conv2d becomes an nn.Sequential of 2 or 3 convs; factors fitted to real inputs
model, changes = amct.auto_decomposition(model, decompose_info_path='./tmp/decompose_info.json',
                                         input_data=train_x[:256], rank_budget=0.5, rank_multiple=8)
print("decomposed:", changes)
decomposed = accuracy(model)

# 2. fine-tune briefly and save the weights
model = train(model, 1, 5e-4)
torch.save(model.state_dict(), './tmp/finetuned.pth')

# 3. later, elsewhere: rebuild the decomposed structure from the json, then load the fine-tuned weights
fresh = build_model()
amct.decompose_network(fresh, './tmp/decompose_info.json')
fresh.load_state_dict(torch.load('./tmp/finetuned.pth', weights_only=True))
fresh.eval()
finetuned = accuracy(fresh)

# 4. quantize the decomposed model as any other
amct.create_quant_config(config_file='./tmp/config.json', model=fresh, input_data=train_x[:32], batch_num=4)
calibration_model = amct.quantize_model(config_file='./tmp/config.json', modified_onnx_model='./tmp/modified_model.onnx',
                                        record_file='./tmp/record.txt', model=fresh, input_data=train_x[:32],
                                        input_names=['input'], output_names=['output'])
with torch.no_grad():
    for i in range(4):
        calibration_model(train_x[i * 32:(i + 1) * 32])
amct.save_model(modified_onnx_file='./tmp/modified_model.onnx', record_file='./tmp/record.txt',
                save_path='./results/decomposed')

session = ort.InferenceSession('./results/decomposed_deploy_model.onnx', providers=["CPUExecutionProvider"])
int8 = float((session.run(None, {"input": test_x.numpy()})[0].argmax(1) == test_y.numpy()).mean())
print(f"accuracy  original {original:.4f}  decomposed {decomposed:.4f}  fine-tuned {finetuned:.4f}  INT8 (ORT) {int8:.4f}")
