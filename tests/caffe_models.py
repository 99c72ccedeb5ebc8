"""Caffe files the tests write themselves, with omct's own Caffe writer (no Caffe, no downloads).

``NetBuilder`` assembles a ``NetParameter`` layer by layer (blobs as numpy arrays); ``train_resnet`` trains a
small residual classifier on the digits in torch (BatchNorm + Scale, Eltwise residuals, ceil-mode pooling) and
writes it as a Caffe pair; ``write_v1`` writes the same network in the old V1 ``layers`` format.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omct.caffe.netio import set_blob, write_caffemodel, write_prototxt
from omct.caffe.schema import message_class


class NetBuilder:
    def __init__(self, name: str = "net", input_shape=(1, 1, 16, 16), input_name: str = "data"):
        self.net = message_class("NetParameter")(name=name)
        layer = self.net.layer.add(name=input_name, type="Input")
        layer.top.append(input_name)
        layer.input_param.shape.add().dim.extend(input_shape)

    def add(self, name: str, type_: str, bottom, top=None, blobs=(), **params):
        """One layer; ``params`` are ``field=dict`` (e.g. ``convolution_param={"num_output": 8}``)."""
        layer = self.net.layer.add(name=name, type=type_)
        layer.bottom.extend([bottom] if isinstance(bottom, str) else bottom)
        layer.top.extend([top or name] if not isinstance(top, list) else top)
        for field, values in params.items():
            _fill(getattr(layer, field), values)
        for b in blobs:
            set_blob(layer.blobs.add(), np.asarray(b, np.float32))
        return layer

    def save(self, folder: Path, stem: str) -> tuple[Path, Path]:
        proto, weights = Path(folder) / f"{stem}.prototxt", Path(folder) / f"{stem}.caffemodel"
        write_prototxt(self.net, proto)
        write_caffemodel(self.net, weights)
        return proto, weights


def _fill(msg, values: dict) -> None:
    for key, value in values.items():
        field = getattr(msg, key)
        if isinstance(value, dict):
            _fill(field, value)
        elif isinstance(value, (list, tuple)):
            field.extend(value)
        else:
            setattr(msg, key, value)


def conv_bn(b: NetBuilder, name: str, bottom: str, conv, bn, relu: bool = True) -> str:
    """Convolution (no bias) + BatchNorm + Scale (+ ReLU), in place as Caffe's ResNets write them, from torch
    modules."""
    w = conv.weight.detach().numpy()
    b.add(name, "Convolution", bottom, blobs=[w], convolution_param={
        "num_output": w.shape[0], "kernel_size": [w.shape[2]], "stride": [conv.stride[0]], "pad": [conv.padding[0]],
        "bias_term": False, "group": conv.groups})
    b.add(f"{name}/bn", "BatchNorm", name, name, blobs=[bn.running_mean.numpy() * 2.0, bn.running_var.numpy() * 2.0,
                                                        [2.0]], batch_norm_param={"eps": bn.eps})
    b.add(f"{name}/scale", "Scale", name, name, blobs=[bn.weight.detach().numpy(), bn.bias.detach().numpy()],
          scale_param={"bias_term": True})
    if relu:
        b.add(f"{name}/relu", "ReLU", name, name)
    return name


def resnet_torch(width: int = 16):
    """Conv-BN-ReLU stem, a ceil-mode max pool, two residual blocks (the second with a projection), a ceil-mode
    average pool, and a classifier: what Caffe's classic ResNets are made of."""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.stem, self.stem_bn = nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
            self.pool = nn.MaxPool2d(3, 2, ceil_mode=True)  # 16 -> 8 (floor would give 7)
            self.a1, self.a1_bn = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
            self.a2, self.a2_bn = nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w)
            self.b1, self.b1_bn = nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w)
            self.b2, self.b2_bn = nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False), nn.BatchNorm2d(2 * w)
            self.proj, self.proj_bn = nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w)
            self.avg = nn.AvgPool2d(3, 2, ceil_mode=True)  # 4 -> 2
            self.fc = nn.Linear(2 * w * 4, 10)

        def forward(self, x):
            r = torch.relu
            x = self.pool(r(self.stem_bn(self.stem(x))))
            x = r(x + self.a2_bn(self.a2(r(self.a1_bn(self.a1(x))))))
            x = r(self.proj_bn(self.proj(x)) + self.b2_bn(self.b2(r(self.b1_bn(self.b1(x))))))
            return self.fc(torch.flatten(self.avg(x), 1))

    return Net()


def resnet_caffe(model, input_shape=(1, 1, 16, 16)) -> NetBuilder:
    """The torch model of ``resnet_torch`` as a Caffe network (layer names as in Caffe's ResNets)."""
    m = model
    b = NetBuilder("digits_resnet", input_shape)
    conv_bn(b, "conv1", "data", m.stem, m.stem_bn)
    b.add("pool1", "Pooling", "conv1", pooling_param={"pool": 0, "kernel_size": 3, "stride": 2})
    conv_bn(b, "res2a_branch2a", "pool1", m.a1, m.a1_bn)
    conv_bn(b, "res2a_branch2b", "res2a_branch2a", m.a2, m.a2_bn, relu=False)
    b.add("res2a", "Eltwise", ["pool1", "res2a_branch2b"])
    b.add("res2a_relu", "ReLU", "res2a", "res2a")
    conv_bn(b, "res3a_branch1", "res2a", m.proj, m.proj_bn, relu=False)
    conv_bn(b, "res3a_branch2a", "res2a", m.b1, m.b1_bn)
    conv_bn(b, "res3a_branch2b", "res3a_branch2a", m.b2, m.b2_bn, relu=False)
    b.add("res3a", "Eltwise", ["res3a_branch1", "res3a_branch2b"], eltwise_param={"operation": 1})
    b.add("res3a_relu", "ReLU", "res3a", "res3a")
    b.add("pool5", "Pooling", "res3a", pooling_param={"pool": 1, "kernel_size": 3, "stride": 2})
    b.add("fc10", "InnerProduct", "pool5", blobs=[m.fc.weight.detach().numpy(), m.fc.bias.detach().numpy()],
          inner_product_param={"num_output": 10})
    b.add("prob", "Softmax", "fc10")
    return b


def train_resnet(digits, epochs: int = 8, width: int = 16, seed: int = 0):
    """``resnet_torch`` trained on the digits (eval mode)."""
    import torch

    torch.manual_seed(seed)
    model = resnet_torch(width)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = torch.tensor(digits.x_train), torch.tensor(digits.y_train)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def write_v1(b: NetBuilder, folder: Path, stem: str) -> tuple[Path, Path]:
    """The network of ``b`` in the old V1 format (``layers`` with enum types, ``input``/``input_dim``), for the
    layer types V1 has."""
    from omct.caffe.schema import _ENUMS

    v1_numbers = dict(_ENUMS["V1LayerParameter.LayerType"])
    names = {"Convolution": "CONVOLUTION", "Pooling": "POOLING", "InnerProduct": "INNER_PRODUCT", "ReLU": "RELU",
             "Softmax": "SOFTMAX", "Eltwise": "ELTWISE", "Concat": "CONCAT", "Dropout": "DROPOUT", "LRN": "LRN",
             "Flatten": "FLATTEN", "Sigmoid": "SIGMOID", "TanH": "TANH"}
    net = message_class("NetParameter")(name=b.net.name)
    for layer in b.net.layer:
        if layer.type == "Input":
            net.input.append(layer.top[0])
            net.input_dim.extend(layer.input_param.shape[0].dim)
            continue
        old = net.layers.add(name=layer.name, type=v1_numbers[names[layer.type]])
        old.bottom.extend(layer.bottom)
        old.top.extend(layer.top)
        for blob in layer.blobs:  # legacy 4-D blobs, as old files store them
            new = old.blobs.add()
            dims = list(blob.shape.dim)
            new.num, new.channels, new.height, new.width = ([1] * (4 - len(dims)) + dims)[-4:]
            new.data.extend(blob.data)
        for field, value in layer.ListFields():
            if field.name.endswith("_param"):
                getattr(old, field.name).CopyFrom(value)
    proto, weights = Path(folder) / f"{stem}.prototxt", Path(folder) / f"{stem}.caffemodel"
    write_prototxt(net, proto)
    write_caffemodel(net, weights)
    return proto, weights


@pytest.fixture(scope="session")
def caffe_resnet(tmp_path_factory, digits):
    """The trained residual classifier as a Caffe pair: (prototxt, caffemodel, FP32 accuracy in OpenCV)."""
    folder = tmp_path_factory.mktemp("caffe_resnet")
    proto, weights = resnet_caffe(train_resnet(digits, epochs=6)).save(folder, "resnet")
    return proto, weights, opencv_accuracy(proto, weights, digits.x_test, digits.y_test)


def opencv_accuracy(proto, weights, x, y) -> float:
    """Top-1 accuracy of a Caffe pair in OpenCV's dnn (an independent Caffe implementation)."""
    import cv2

    net = cv2.dnn.readNetFromCaffe(str(proto), str(weights))
    net.setInput(x)
    return float((net.forward().argmax(1) == y).mean())
