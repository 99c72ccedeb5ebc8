"""AMCT seed 002's automatic non-uniform quantization of a Caffe model, with ``import omct.caffe as amct`` and no
Caffe installed.

    python examples/caffe_auto_nuq.py                                   # builds a small Caffe ResNet on the digits
    python examples/caffe_auto_nuq.py --model_file m.prototxt --weights_file m.caffemodel --dataset data.npz

``--dataset`` is an .npz with ``x`` (N, C, H, W float32, preprocessed as the model expects) and ``y`` (labels).
``do_benchmark_test`` opens each prototxt/caffemodel pair with ``omct.caffe.Net`` (pycaffe's
``net.forward(**{"data": x})``); ``caffe.Net`` or ``cv2.dnn.readNetFromCaffe`` read the same files.
"""

import argparse
import os

import numpy as np

import omct.caffe as amct
from omct.caffe.auto_nuq import AutoNuqEvaluatorBase

MODEL_INPUT_BLOB_NAME = "data"
MODEL_OUTPUT_BLOB_NAME = "prob"
PATH = os.path.realpath("./")
TMP = os.path.join(PATH, "tmp")
RESULT = os.path.join(PATH, "results")
BATCH_SIZE = 250
CFG = """activation_offset : true
batch_num : 2
nuq_config {
    mapping_file : "./nuq_conf/resnet_quantized.json"
    nuq_quantize : { num_steps : 32 num_of_iteration : 1 }
}
override_layer_types : {
    layer_type : "Pooling"
    calibration_config : { ifmr_quantize : { search_range_start : 0.8 search_range_end : 1.2 search_step : 0.02 } }
}
"""


def parse_args():
    parser = argparse.ArgumentParser(description="Caffe auto_nuq demo")
    parser.add_argument("--model_file", default=None, help="the Caffe deploy prototxt")
    parser.add_argument("--weights_file", default=None, help="the Caffe caffemodel")
    parser.add_argument("--dataset", default=None, help="an .npz with x and y (default: scikit-learn's digits)")
    parser.add_argument("--cfg_define", default=None, help="the simplified .cfg (default: a nuq_config like AMCT's)")
    parser.add_argument("--iterations", type=int, default=2, help="evaluation batches")
    return parser.parse_args()


def load_dataset(args):
    if args.dataset:
        data = np.load(args.dataset)
        return data["x"].astype(np.float32), data["y"]
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.kron(d.images / 16.0, np.ones((2, 2))).astype(np.float32)[:, None]  # 16x16, as the demo model takes
    order = np.random.default_rng(0).permutation(len(x))
    return x[order], d.target[order]


def build_demo_caffe_model(x, y, folder):
    """A small Caffe ResNet (Conv + BatchNorm + Scale, Eltwise residual, ceil-mode pooling) trained in torch on
    the first 1297 digits and written with omct's Caffe writer. Replace with your own Caffe files."""
    import torch
    from torch import nn

    from omct.caffe.netio import set_blob
    from omct.caffe.schema import message_class

    torch.manual_seed(0)
    conv = [nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.Conv2d(16, 16, 3, padding=1, bias=False)]
    bns = [nn.BatchNorm2d(16) for _ in conv]
    fc = nn.Linear(16 * 4 * 4, 10)
    pool, avg = nn.MaxPool2d(3, 2, ceil_mode=True), nn.AvgPool2d(3, 2, ceil_mode=True)

    def forward(t):
        t = pool(torch.relu(bns[0](conv[0](t))))
        t = torch.relu(t + bns[2](conv[2](torch.relu(bns[1](conv[1](t))))))
        return fc(torch.flatten(avg(t), 1))

    params = [p for m in conv + bns + [fc] for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    xt, yt = torch.tensor(x[:1297]), torch.tensor(y[:1297])
    for _ in range(8):
        for i in range(0, len(xt), 64):
            opt.zero_grad()
            nn.functional.cross_entropy(forward(xt[i:i + 64]), yt[i:i + 64]).backward()
            opt.step()
    for m in bns:
        m.eval()

    net = message_class("NetParameter")(name="demo_resnet")

    def add(name, kind, bottom, top=None, blobs=()):
        layer = net.layer.add(name=name, type=kind, top=[top or name])
        layer.bottom.extend([bottom] if isinstance(bottom, str) else bottom)
        for b in blobs:
            set_blob(layer.blobs.add(), b.detach().numpy() if hasattr(b, "detach") else np.asarray(b, np.float32))
        return layer

    add("data", "Input", []).input_param.shape.add().dim.extend([1, 1, 16, 16])
    for name, bottom, k, relu in (("conv1", "data", 0, True), ("res2a_branch2a", "pool1", 1, True),
                                  ("res2a_branch2b", "res2a_branch2a", 2, False)):
        p = add(name, "Convolution", bottom, blobs=[conv[k].weight]).convolution_param
        p.num_output, p.bias_term, p.kernel_size[:], p.pad[:] = 16, False, [3], [1]
        add(f"{name}/bn", "BatchNorm", name, name, [bns[k].running_mean, bns[k].running_var, [1.0]])
        add(f"{name}/scale", "Scale", name, name, [bns[k].weight, bns[k].bias]).scale_param.bias_term = True
        if relu:
            add(f"{name}/relu", "ReLU", name, name)
        if name == "conv1":
            p = add("pool1", "Pooling", "conv1").pooling_param
            p.pool, p.kernel_size, p.stride = 0, 3, 2
    add("res2a", "Eltwise", ["pool1", "res2a_branch2b"])
    add("res2a_relu", "ReLU", "res2a", "res2a")
    p = add("pool5", "Pooling", "res2a").pooling_param
    p.pool, p.kernel_size, p.stride = 1, 3, 2
    add("fc10", "InnerProduct", "pool5", blobs=[fc.weight, fc.bias]).inner_product_param.num_output = 10
    add("prob", "Softmax", "fc10")
    model_file, weights_file = os.path.join(folder, "resnet.prototxt"), os.path.join(folder, "resnet.caffemodel")
    amct.write_prototxt(net, model_file)
    amct.write_caffemodel(net, weights_file)
    return model_file, weights_file


def img_postprocess(probs, labels):
    return float((probs.argmax(1) == labels).mean())


def do_benchmark_test(args, model_file, weights_file, iterations=1000):
    """Top-1 of ``iterations`` batches of the held-out data (the last 500 samples)."""
    net = amct.Net(model_file, weights_file, "test")
    x, y = args.x[-500:], args.y[-500:]
    top1_total = 0.0
    for index in range(iterations):
        data, labels = x[index * BATCH_SIZE:(index + 1) * BATCH_SIZE], y[index * BATCH_SIZE:(index + 1) * BATCH_SIZE]
        blobs_out = net.forward(**{MODEL_INPUT_BLOB_NAME: data})
        top1_total += img_postprocess(blobs_out[MODEL_OUTPUT_BLOB_NAME], labels)
    return top1_total / iterations


QUANT_ARGS = parse_args()


class AutoNuqEvaluator(AutoNuqEvaluatorBase):
    # Auto Nuq Evaluator
    def __init__(self, evaluate_batch_num):
        super().__init__(self)
        self.evaluate_batch_num = evaluate_batch_num

    def eval_model(self, model_file, weights_file, batch_num):
        return do_benchmark_test(QUANT_ARGS, model_file, weights_file, batch_num)

    def is_satisfied(self, original_metric, new_metric):
        # the loss of top1 acc need to be less than 1%
        if (original_metric - new_metric) * 100 < 1:
            return True
        return False


def main(args):
    os.makedirs(TMP, exist_ok=True)
    args.x, args.y = load_dataset(args)
    if args.model_file is None:
        args.model_file, args.weights_file = build_demo_caffe_model(args.x, args.y, TMP)
    if args.cfg_define is None:
        args.cfg_define = os.path.join(TMP, "resnet_nuq.cfg")
        with open(args.cfg_define, "w") as f:
            f.write(CFG)

    # seed 002, as written
    config_json_file = os.path.join(TMP, 'config.json')
    skip_layers = []
    batch_num = 2
    activation_offset = True
    # do weights calibration with non uniform quantize configure
    amct.create_quant_config(
        config_json_file, args.model_file, args.weights_file, skip_layers, batch_num, activation_offset, args.cfg_define)
    scale_offset_record_file = os.path.join(TMP, 'scale_offset_record.txt')
    result_path = os.path.join(RESULT, 'ResNet50')
    evaluator = AutoNuqEvaluator(args.iterations)
    result = amct.auto_nuq(
        args.model_file, args.weights_file, evaluator, config_json_file, scale_offset_record_file, result_path)

    prefix = os.path.splitext(os.path.basename(args.model_file))[0]
    fake_quant_model = os.path.join(result_path, f"{prefix}_fake_quant_model.prototxt")
    fake_quant_weights = os.path.join(result_path, f"{prefix}_fake_quant_weights.caffemodel")
    quant_top1 = do_benchmark_test(args, fake_quant_model, fake_quant_weights, args.iterations)
    print(f"top1 before quantize {result.original_metric:.4f}, after auto_nuq {result.metric:.4f} (fake-quant ONNX), "
          f"{quant_top1:.4f} (weights-only Caffe pair); weights {result.weight_bytes} bytes, "
          f"{result.weight_bytes / result.float_weight_bytes:.3f}x of float; {result.evaluations} eval_model calls")
    print("steps per layer:", {k: v or "uniform INT8" for k, v in result.steps.items()})


if __name__ == "__main__":
    main(QUANT_ARGS)
