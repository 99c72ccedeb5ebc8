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
from onnx import numpy_helper

from omct.caffe.convert import Conversion
from omct.caffe.netio import set_blob, write_caffemodel, write_prototxt

ACTIVATION_NOTE = ("the Caffe pair carries quantized weights only: activation quantization cannot be expressed in "
                   "stock Caffe layers (the ONNX fake-quant model simulates both)")

#: Caffe types whose blobs the quantized model replaces, and the ONNX op that computes them
WEIGHTED = {"Convolution": "Conv", "Deconvolution": "ConvTranspose", "InnerProduct": "Gemm"}


def quantized_net(net, conversion: Conversion, folded: list[tuple[str, str]], fake_model: onnx.ModelProto):
    """A copy of ``net`` with the weights of ``fake_model`` (layers matched by name) and folded BatchNorms removed."""
    out = type(net)()
    out.CopyFrom(net)
    inits = {t.name: t for t in fake_model.graph.initializer}
    nodes = {n.name: n for n in fake_model.graph.node}
    drop: set[str] = set()
    renamed_top: dict[str, str] = {}
    for conv, bn in folded:
        layers = conversion.merged.get(bn, [bn])
        drop.update(layers)
        last = conversion.params[layers[-1]]
        renamed_top[conv] = last.top[0]
    kept = []
    for layer in out.layer:
        if layer.name in drop:
            continue
        node = nodes.get(layer.name)
        if layer.type in WEIGHTED and node is not None and node.op_type == WEIGHTED[layer.type]:
            w = inits.get(node.input[1])
            b = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if w is not None:
                del layer.blobs[:]
                set_blob(layer.blobs.add(), numpy_helper.to_array(w))
                param = layer.inner_product_param if layer.type == "InnerProduct" else layer.convolution_param
                param.bias_term = b is not None
                if b is not None:
                    set_blob(layer.blobs.add(), numpy_helper.to_array(b))
        if layer.name in renamed_top:
            layer.top[0] = renamed_top[layer.name]
        kept.append(layer)
    del out.layer[:]
    out.layer.extend(kept)
    return out


def write_quantized_caffe(net, conversion: Conversion, folded: list[tuple[str, str]], fake_model: onnx.ModelProto,
                          model_path: str | os.PathLike, weights_path: str | os.PathLike) -> list[Path]:
    """Write the Caffe pair (prototxt + caffemodel) of the quantized model; returns the two paths."""
    quantized = quantized_net(net, conversion, folded, fake_model)
    write_caffemodel(quantized, weights_path)
    write_prototxt(quantized, model_path)
    return [Path(model_path), Path(weights_path)]
