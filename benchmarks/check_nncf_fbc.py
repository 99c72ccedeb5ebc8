"""Why NNCF's default (FastBiasCorrection) loses on the bench_adaround models: a check in FP32 alone.

FastBiasCorrection sets each layer's bias to ``b + E[fp32 output] - mean(quantized layer(blob))``, where ``blob``
is the input's per-channel mean over the calibration data broadcast over the whole feature map (nncf 3.4,
``fast_bias_correction/algorithm.py``). The shift is right only if the layer's mean output equals its output on
that constant map, i.e. if the input's mean is the same at every position. On 32 x 32 inputs with zero padding,
strided 1 x 1 convolutions and 8 x 8 ... 2 x 2 maps it is not, and the difference goes into the bias as if it
were quantization error. This script prints, per Conv, ``|E[conv(x)] - conv(blob)|`` per channel over the
output's standard deviation (with FP32 weights: no quantization involved, so a perfect correction would give 0).

    python benchmarks/check_nncf_fbc.py resnet18        # after bench_adaround.py has built the model
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_adaround  # noqa: E402


def main(name: str) -> None:
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import helper, numpy_helper

    model = onnx.load(bench_adaround.WORK / f"{name}.onnx")
    init = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    for t in dict.fromkeys(t for n in convs for t in (n.input[0], n.output[0]) if t != "input"):
        model.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so)
    x = bench_adaround.data()[0][:bench_adaround.BATCH_NUM * bench_adaround.CALIB_BATCH]
    acts = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x}), strict=True))
    acts["input"] = x
    for n in convs:
        attr = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        xin, out = acts[n.input[0]], acts[n.output[0]]
        blob = np.broadcast_to(xin.mean(axis=(0, 2, 3), keepdims=True), (1, *xin.shape[1:])).copy()
        bias = torch.from_numpy(init[n.input[2]].copy()) if len(n.input) > 2 else None
        pads = attr.get("pads", [0, 0, 0, 0])
        on_blob = torch.nn.functional.conv2d(torch.from_numpy(blob), torch.from_numpy(init[n.input[1]].copy()), bias,
                                             stride=attr.get("strides", [1, 1]), padding=(pads[0], pads[1]),
                                             groups=attr.get("group", 1)).numpy()
        err = np.abs(out.mean(axis=(0, 2, 3)) - on_blob.mean(axis=(0, 2, 3))).mean() / out.std()
        print(f"{n.name:50s} input map {xin.shape[2]:2d}x{xin.shape[3]:<2d} bias error / output std {err:.3f}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "resnet18")
