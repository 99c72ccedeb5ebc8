"""The Caffe pair of a quantized model: the user's network with each quantized layer's weights and bias replaced
by their quantized values (uniform INT8 grid or NUQ levels, as the fake-quant ONNX model holds them), so that
a Caffe user can check weight quantization in Caffe or OpenCV. BatchNorm + Scale folded into a convolution
for quantization are folded in the Caffe pair too (their layers removed, the convolution given a bias).

Activation quantization cannot be written with stock Caffe layers; the ONNX fake-quant model simulates it.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from google.protobuf import text_format

from omct.caffe.convert import Conversion
from omct.caffe.netio import blob_bytes, caffemodel_bytes, without
from omct.fileio import atomic_write_bytes, atomic_write_text
from omct.graph.tensor_data import tensor_array

ACTIVATION_NOTE = ("the Caffe pair carries quantized weights only: activation quantization cannot be expressed in "
                   "stock Caffe layers (the ONNX fake-quant model simulates both)")

#: Caffe types whose blobs the quantized model replaces, and the ONNX op that computes them
WEIGHTED = {"Convolution": "Conv", "Deconvolution": "ConvTranspose", "InnerProduct": "Gemm"}


def quantized_layers(net, conversion: Conversion, folded: list[tuple[str, str]], fake_model: onnx.ModelProto):
    """The layers of ``net`` as (layer without blobs, serialized blobs), with the weights of ``fake_model``
    (layers matched by name) and the folded BatchNorms removed."""
    inits = {t.name: t for t in fake_model.graph.initializer}
    nodes = {n.name: n for n in fake_model.graph.node}
    drop: set[str] = set()
    renamed_top: dict[str, str] = {}
    for conv, bn in folded:
        layers = conversion.merged.get(bn, [bn])
        drop.update(layers)
        renamed_top[conv] = conversion.params[layers[-1]].top[0]
    out = []
    for layer in net.layer:
        if layer.name in drop:
            continue
        new = without(layer, {"blobs"})
        blobs = [b.SerializeToString() for b in layer.blobs]
        node = nodes.get(layer.name)
        if layer.type in WEIGHTED and node is not None and node.op_type == WEIGHTED[layer.type]:
            w = inits.get(node.input[1])
            b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if w is not None:
                blobs = [blob_bytes(tensor_array(w))] + ([blob_bytes(tensor_array(b))] if b else [])
                param = new.inner_product_param if layer.type == "InnerProduct" else new.convolution_param
                param.bias_term = b is not None
        if layer.name in renamed_top:
            new.top[0] = renamed_top[layer.name]
        out.append((new, blobs))
    return out


def write_quantized_caffe(net, conversion: Conversion, folded: list[tuple[str, str]], fake_model: onnx.ModelProto,
                          model_path: str | os.PathLike, weights_path: str | os.PathLike) -> list[Path]:
    """Write the Caffe pair (prototxt + caffemodel) of the quantized model; returns the two paths."""
    head = without(net, {"layer", "layers"})
    layers = quantized_layers(net, conversion, folded, fake_model)
    atomic_write_bytes(weights_path, caffemodel_bytes(head, layers))
    head.layer.extend(layer for layer, _ in layers)
    atomic_write_text(model_path, text_format.MessageToString(head))
    return [Path(model_path), Path(weights_path)]
