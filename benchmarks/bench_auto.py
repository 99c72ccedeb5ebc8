"""Accuracy-based automatic quantization, side by side: omct.onnx.accuracy_based_auto_calibration vs NNCF's
quantize_with_accuracy_control, same ONNX model, same data, same metric and allowed drop.

The models are the benchmark ResNet and transformer with one deliberately hard layer: channel 0 of a conv
(or hidden unit 0 of a feed-forward MatMul) that feeds only another conv (MatMul) through a ReLU is scaled
up 1000x and read back scaled down 1000x. The float function is unchanged; per-tensor activation
quantization of the second layer's input is ruined, so plain INT8 misses the target and both tools must
find the layer. Run by hand:

    python benchmarks/bench_auto.py          # writes benchmarks/results/auto.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ptq as ptq  # noqa: E402

MAX_DROP = 0.005
METHODS = ["omct-binary", "omct-greedy", "nncf"]


def hard_model(name: str) -> tuple[Path, str]:
    import onnx
    from onnx import numpy_helper

    ptq.ensure_model(name)
    out = ptq.WORK / f"{name}_hard.onnx"
    model = onnx.load(ptq.model_path(name))
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    inits = {t.name: t for t in model.graph.initializer}

    def only(tensor, op):
        users = consumers.get(tensor, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def scale(updates):
        for n, v in updates:
            inits[n].CopyFrom(numpy_helper.from_array(v.astype(np.float32), n))
        onnx.save(model, out)

    for a in model.graph.node:
        if a.op_type == "Conv" and len(a.input) > 2:  # Conv -> Relu -> Conv (not grouped)
            relu = only(a.output[0], "Relu")
            b = relu and only(relu.output[0], "Conv")
            if b and b.input[1] in inits:
                w1, b1 = (numpy_helper.to_array(inits[n]).copy() for n in a.input[1:3])
                w2 = numpy_helper.to_array(inits[b.input[1]]).copy()
                if w2.shape[1] == w1.shape[0]:
                    w1[0] *= 1000.0
                    b1[0] *= 1000.0
                    w2[:, 0] /= 1000.0
                    scale([(a.input[1], w1), (a.input[2], b1), (b.input[1], w2)])
                    return out, b.name
        if a.op_type == "MatMul" and a.input[1] in inits:  # MatMul -> Add(bias) -> Relu -> MatMul (a feed-forward block)
            add = only(a.output[0], "Add")
            relu = add and only(add.output[0], "Relu")
            b = relu and only(relu.output[0], "MatMul")
            bias = add and next((i for i in add.input if i in inits), None)
            if b and bias and b.input[1] in inits:
                w1, b1 = numpy_helper.to_array(inits[a.input[1]]).copy(), numpy_helper.to_array(inits[bias]).copy()
                w2 = numpy_helper.to_array(inits[b.input[1]]).copy()
                w1[:, 0] *= 1000.0
                b1[0] *= 1000.0
                w2[0, :] /= 1000.0
                scale([(a.input[1], w1), (bias, b1), (b.input[1], w2)])
                return out, b.name
    raise RuntimeError(f"no Conv -> Relu -> Conv or MatMul -> Relu -> MatMul pair in {name}")


def accuracy_of(session) -> float:
    d = ptq.data()
    return float((session.run(None, {"input": d.x_test})[0].argmax(1) == d.y_test).mean())


def run(method: str, name: str) -> dict:
    import onnxruntime as ort

    model, hard = hard_model(name)
    batches = ptq.calib_batches(8)
    calls = {"n": 0}

    def sess(m):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.intra_op_num_threads = 2
        return ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])

    out = ptq.WORK / f"auto_{name}_{method}"
    t = time.perf_counter()
    if method.startswith("omct"):
        import omct.onnx as amct
        from omct.auto import AutoCalibrationEvaluatorBase
        from omct.ui import set_quiet

        set_quiet()

        class Evaluator(AutoCalibrationEvaluatorBase):
            max_loss = MAX_DROP

            def calibration(self, m):
                for b in batches:
                    m.run(None, {"input": b})

            def evaluate(self, path):
                calls["n"] += 1
                return accuracy_of(sess(path))

        amct.create_quant_config(str(out) + ".json", str(model), batch_num=len(batches))
        res = amct.accuracy_based_auto_calibration(str(model), Evaluator(), str(out) + ".json", str(out) + "_record.txt",
                                                   out, strategy="BinarySearch" if method == "omct-binary" else "Greedy")
        deploy = out / f"{model.stem}_deploy_model.onnx"
        chosen = res.float_layers
    else:
        import nncf
        import onnx

        def validate(m, data):
            calls["n"] += 1
            return accuracy_of(sess(m.SerializeToString()))

        q = nncf.quantize_with_accuracy_control(
            onnx.load(model), calibration_dataset=nncf.Dataset(batches, lambda b: {"input": b}),
            validation_dataset=nncf.Dataset([0]), validation_fn=validate, max_drop=MAX_DROP,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=len(batches) * ptq.CALIB_BATCH)
        deploy = Path(str(out) + "_deploy_model.onnx")
        onnx.save(q, deploy)
        chosen = None
    wall = time.perf_counter() - t
    import onnx

    float_layers, total = float_weight_layers(onnx.load(deploy))
    return {"model": name, "method": method, "hard_layer": hard, "evaluations": calls["n"], "wall_s": wall,
            "float_layers": float_layers, "quantizable": total, "accuracy": accuracy_of(sess(str(deploy))),
            "fp32": accuracy_of(sess(str(model))), "deploy": str(deploy), "omct_float_layers": chosen}


def float_weight_layers(model) -> tuple[int, int]:
    """(layers whose weight is not dequantized from integers, layers with weights) among Conv/Gemm/MatMul."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name for t in model.graph.initializer}
    total = floats = 0
    for n in model.graph.node:
        if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1:
            w = n.input[1]
            p = producers.get(w)
            if w in inits or (p is not None and p.op_type == "DequantizeLinear"):
                total += 1
                floats += w in inits
    return floats, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet", "transformer"])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run(*args.child)))
        return
    rows = []
    for name in args.models:
        for method in args.methods:
            rows.append(ptq.child_process(__file__, method, name))
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"Automatic quantization: allowed accuracy drop {MAX_DROP} (absolute) on 500 held-out digits, 8 calibration "
             "batches of 32; evaluations = calls of the user's validation function (the float model's included); "
             "float layers = weighted layers (Conv/Gemm/MatMul) left in float.\n",
             ]
    lines += ptq.markdown_table(
        ["model", "method", "evaluations", "wall s", "float layers", "FP32 acc", "final acc", "hard layer"],
        rows, lambda r: [str(r["evaluations"]), f"{r['wall_s']:.1f}", f"{r['float_layers']} of {r['quantizable']}",
                         f"{r['fp32']:.4f}", f"{r['accuracy']:.4f}", r["hard_layer"]])
    ptq.write_results("auto", lines)


if __name__ == "__main__":
    main()
