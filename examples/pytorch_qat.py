"""AMCT's retrain (quantization-aware training) sequence with ``import omct.pytorch as amct``: INT4 weights.

    python examples/pytorch_qat.py        # trains a small CNN on scikit-learn's digits, then retrains it at INT4

Replace ``build_model`` and ``train`` with your own model and training loop.
"""

from pathlib import Path

import onnxruntime as ort
import torch
from sklearn.datasets import load_digits
from torch import nn

import omct.pytorch as amct


def train(model, epochs, lr):
    """Your training loop: any optimizer over model.parameters(), any device, DistributedDataParallel."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(train_x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(train_x[idx]), train_y[idx]).backward()
            opt.step()
    return model.eval()


def build_model() -> nn.Module:
    """Your model. Here: a small CNN trained for a few seconds on scikit-learn's 8x8 digits."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    return train(model, epochs=15, lr=3e-3)


def user_do_inference_onnx(model_file, x, y) -> float:
    session = ort.InferenceSession(model_file, providers=["CPUExecutionProvider"])
    return float((session.run(None, {"input": x.numpy()})[0].argmax(1) == y.numpy()).mean())


digits = load_digits()
images = torch.tensor(digits.images[:, None] / 16.0, dtype=torch.float32)
labels = torch.tensor(digits.target)
train_x, train_y, test_x, test_y = images[:1297], labels[:1297], images[1297:], labels[1297:]

ori_model = build_model()
ori_model_input_data = test_x[:1]
Path('./tmp').mkdir(exist_ok=True)
Path('./tmp/retrain.cfg').write_text("""\
batch_num: 2
override_layer_types { layer_type: "Conv2d"
    retrain_weight_quant_config { ulq_retrain { channel_wise: true dst_type: INT4 } } }
override_layer_types { layer_type: "Linear"
    retrain_weight_quant_config { arq_retrain { channel_wise: false } } }
""")

# 1. generate the retrain configuration (here from AMCT's simplified retrain .cfg: INT4 convolution weights)
config_file = './tmp/retrain_config.json'
amct.create_quant_retrain_config(config_file=config_file, model=ori_model, input_data=ori_model_input_data,
                                 config_defination='./tmp/retrain.cfg')

# 2. the retrain model: BatchNorm folded, learned fake quantization on weights and activations
record_file = './tmp/record.txt'
quant_retrain_model = amct.create_quant_retrain_model(config_file=config_file, model=ori_model,
                                                      record_file=record_file, input_data=ori_model_input_data)

# 3. train it with your own loop (the first batch_num batches initialise the activation ranges); checkpoint it
quant_retrain_model = train(quant_retrain_model, epochs=2, lr=5e-4)
torch.save({'state_dict': quant_retrain_model.state_dict()}, './tmp/checkpoint.pth')

# 4. (in a later run) rebuild the retrain model from the checkpoint (torch.load with weights_only=True)
quant_retrain_model = amct.restore_quant_retrain_model(config_file=config_file, model=ori_model,
                                                       record_file=record_file, input_data=ori_model_input_data,
                                                       pth_file='./tmp/checkpoint.pth', state_dict_name='state_dict')

# 5. save the record, the fake-quant and the deploy models
quant_model_path = './results/user_model'
amct.save_quant_retrain_model(config_file=config_file, model=quant_retrain_model, record_file=record_file,
                              save_path=quant_model_path, input_data=ori_model_input_data,
                              input_names=['input'], output_names=['output'],
                              dynamic_axes={'input': {0: 'batch'}, 'output': {0: 'batch'}})

# 6. test both in ONNX Runtime
with torch.no_grad():
    fp32 = float((ori_model(test_x).argmax(1) == test_y).float().mean())
fake = user_do_inference_onnx('./results/user_model_fake_quant_model.onnx', test_x, test_y)
deploy = user_do_inference_onnx('./results/user_model_deploy_model.onnx', test_x, test_y)
print(f"accuracy  FP32 (PyTorch) {fp32:.4f}  QAT fake-quant (ORT) {fake:.4f}  QAT deploy INT4/INT8 (ORT) {deploy:.4f}")
