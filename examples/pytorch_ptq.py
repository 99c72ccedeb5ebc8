"""AMCT seed 001's PyTorch example with ``import omct.pytorch as amct``, on a model of your own.

    python examples/pytorch_ptq.py        # trains a small CNN on scikit-learn's digits, then quantizes it

Replace ``build_model``, ``calibration_data`` and ``user_do_inference_*`` with your own.
"""

import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

import omct.pytorch as amct


def build_model() -> nn.Module:
    """Your model. Here: a small CNN trained for a few seconds on scikit-learn's 8x8 digits."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(15):
        for i in range(0, len(train_x), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[i:i + 64]), train_y[i:i + 64]).backward()
            opt.step()
    return model.eval()


def user_do_inference_torch(model, data, iterations):
    with torch.no_grad():
        for x in data[:iterations]:
            model(x)


def user_do_inference_onnx(model_file, x, y) -> float:
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).mean())


digits = load_digits()
images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
train_x, train_y, test_x, test_y = images[:1297], labels[:1297], images[1297:], labels[1297:]

ori_model = build_model()
ori_model_input_data = test_x[:1]
calibration_data = [train_x[i * 32:(i + 1) * 32] for i in range(8)]

# 1. generate the quantization configuration file
config_file = './tmp/config.json'
skip_layers = []
batch_num = 8
amct.create_quant_config(config_file=config_file, model=ori_model, input_data=ori_model_input_data,
                         skip_layers=skip_layers, batch_num=batch_num)

# 2. insert the calibration hooks and write the modified ONNX model
record_file = './tmp/record.txt'
modified_onnx_model = './tmp/modified_model.onnx'
calibration_model = amct.quantize_model(config_file=config_file, modified_onnx_model=modified_onnx_model,
                                        record_file=record_file, model=ori_model, input_data=ori_model_input_data,
                                        input_names=['input'], output_names=['output'],
                                        dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})

# 3. calibrate: batch_num forward passes in PyTorch
user_do_inference_torch(calibration_model, calibration_data, batch_num)

# 4. save the fake-quant and deploy models
quant_model_path = './results/user_model'
amct.save_model(modified_onnx_file=modified_onnx_model, record_file=record_file, save_path=quant_model_path)

# 5. test both in ONNX Runtime
with torch.no_grad():
    fp32 = float((ori_model(test_x).argmax(1) == test_y).float().mean())
fake = user_do_inference_onnx('./results/user_model_fake_quant_model.onnx', test_x, test_y)
deploy = user_do_inference_onnx('./results/user_model_deploy_model.onnx', test_x, test_y)
print(f"accuracy  FP32 (PyTorch) {fp32:.4f}  fake-quant (ORT) {fake:.4f}  deploy INT8 (ORT) {deploy:.4f}")
