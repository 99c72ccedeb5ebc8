"""Quantization-aware training, side by side, at INT8 weights and at INT4 weights (INT8 activations):
FP32, omct PTQ (IFMR activations; ARQ and MSE-clip weights), omct QAT (AMCT's retrain sequence, ULQ activations,
``omct-qat-arq`` / ``omct-qat-ulq``: ``arq_retrain`` / ``ulq_retrain`` weights; ``omct-qat``: ulq at INT4, arq at
INT8; ablations in VARIANTS), NNCF's QAT (``nncf.quantize``, at 4 bits its weight quantizers' ``num_bits`` set to
4, then the same training, ``nncf.strip``, exported to ONNX; ``nncf-qat-folded``: BatchNorm folded first) and
torchao's QAT (nn.Linear only) after the same short fine-tune (same batches, optimizer and learning rate).
Deploy models run in ONNX Runtime; accuracy on the 500 held-out digits, and which matrix ops ONNX Runtime runs on
integer kernels. The step time is the median training step (batch 64, one thread) after the initialisation
batches, against FP32 training of the same model.

Each run is its own child process (peak RSS is its own). Run by hand, not in CI:

    python benchmarks/bench_qat.py                          # writes benchmarks/results/qat.md
    python benchmarks/bench_qat.py --models resnet --bits 4 --steps 40

NNCF and torchao are optional (``pip install nncf torchao``; import path extended with ``--nncf-path``); without
them their rows say so.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bench_ptq as ptq  # noqa: E402 - shares models, data and measurements with the PTQ benchmarks

METHODS = ["fp32-train", "omct-ptq-arq", "omct-ptq-mse", "omct-qat-arq", "omct-qat-ulq", "nncf-qat", "nncf-qat-folded",
           "torchao-qat"]
#: ablations of omct's ulq_retrain, appended to a method name (``omct-qat-ulq+maxinit+slr10``): ``maxinit`` starts the
#: learned weight scales at max|w| / qmax instead of the MSE clip, ``nogs`` drops LSQ's gradient scaling of the
#: scales, ``slrK`` trains the quantization parameters (weight scales, activation clips) at K times the learning rate
VARIANTS = ("maxinit", "nogs", "slr")
BATCH = 64
LR = 2e-4
EXPORT = {"input_names": ["input"], "output_names": ["logits"],
          "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}


def batches(steps: int, seed: int = 0):
    """The fine-tune batches every method sees, in the same order."""
    import torch

    d = ptq.data()
    rng = np.random.default_rng(seed)
    x, y = torch.tensor(d.x_train), torch.tensor(d.y_train)
    return [(x[idx], y[idx]) for idx in (rng.choice(len(x), BATCH, replace=False) for _ in range(steps))]


def train(model, data, skip: int = 2, quant_lr_factor: float = 1.0) -> float:
    """Adam over every parameter, the same for every method; returns the median step time in ms (after ``skip``).
    ``quant_lr_factor``: the retrain model's quantization parameters (``.scale``, ``clip_max``/``clip_min``) at that
    multiple of the learning rate (an ablation; 1 everywhere else)."""
    import torch
    from torch import nn

    quant = [p for n, p in model.named_parameters() if n.endswith((".log_scale", ".clip_max", ".clip_min"))]
    ids = {id(p) for p in quant}
    groups = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if quant and quant_lr_factor != 1.0:
        groups.append({"params": quant, "lr": LR * quant_lr_factor})
    else:
        groups[0]["params"] = list(model.parameters())
    opt = torch.optim.Adam(groups, lr=LR)
    model.train()
    times = []
    for x, y in data:
        t = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t)
    model.eval()
    return float(np.median(times[skip:]) * 1000)


def first_layer(model) -> str:
    """The first quantized layer (module order): the image-facing convolution."""
    from torch import nn

    return next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear))


def run(method: str, name: str, bits: int, steps: int, out: Path, channel_wise: bool = True,
        first_int8: bool = False) -> dict:
    import torch

    torch.manual_seed(0)
    model = ptq.torch_model(name)
    data = batches(steps)
    example = data[0][0][:2]
    deploy = Path(str(out) + "_deploy_model.onnx")
    result: dict = {}
    if method == "fp32-train":
        result["step_ms"] = train(model, data)
        return result
    if method.startswith("omct-ptq"):
        import omct.pytorch as amct

        algo = "arq_quantize" if method.endswith("arq") else "mse_clip_quantize"
        cfg = out.with_suffix(".cfg")
        weights = f"calibration_config {{ {algo} {{ quant_bits: {bits} channel_wise: {str(channel_wise).lower()} }} }}"
        first = weights.replace(f"quant_bits: {bits}", "quant_bits: 8")
        cfg.write_text("batch_num: 8\ncommon_config { ifmr_quantize { } }\n"
                       + "".join(f'override_layer_types {{ layer_type: "{t}" {weights} }}\n' for t in ("Conv2d", "Linear"))
                       + (f'override_layer_configs {{ layer_name: "{first_layer(model)}" {first} }}\n' if first_int8 else ""))
        amct.create_quant_config(str(out) + ".json", model, example, config_defination=str(cfg))
        cal = amct.quantize_model(str(out) + ".json", str(out) + "_mod.onnx", str(out) + "_record.txt", model, example,
                                  **EXPORT)
        with torch.no_grad():
            for b in ptq.calib_batches(8):
                cal(torch.tensor(b))
        amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))
    elif method.startswith("omct-qat"):
        import omct.pytorch as amct

        base, *variants = method.split("+")
        factor = apply_variants(variants)
        wts = {"omct-qat-arq": "arq_retrain", "omct-qat-ulq": "ulq_retrain"}.get(
            base, "ulq_retrain" if bits == 4 else "arq_retrain")  # omct-qat: ulq at INT4, arq at INT8
        dst = "INT4" if bits == 4 else "INT8"
        cfg = out.with_suffix(".cfg")
        def weights(dst_type: str) -> str:
            return f"retrain_weight_quant_config {{ {wts} {{ channel_wise: {str(channel_wise).lower()} dst_type: {dst_type} }} }}"

        cfg.write_text(f"batch_num: 2\n{weights(dst)}\n"
                       + (f'override_layer_configs {{ layer_name: "{first_layer(model)}" {weights("INT8")} }}\n'
                          if first_int8 else ""))
        amct.create_quant_retrain_config(str(out) + ".json", model, example, config_defination=str(cfg))
        qat = amct.create_quant_retrain_model(str(out) + ".json", model, str(out) + "_record.txt", example)
        result["step_ms"] = train(qat, data, quant_lr_factor=factor)
        amct.save_quant_retrain_model(str(out) + ".json", qat, str(out) + "_record.txt", str(out), example, **EXPORT)
    elif method in ("nncf-qat", "nncf-qat-folded"):
        if method.endswith("folded"):
            fold_batchnorm(model)
        return nncf_qat(model, bits, channel_wise, first_int8, data, example, deploy)
    elif method == "torchao-qat":
        return torchao_qat(model, name, bits, channel_wise, data)
    else:
        raise ValueError(method)
    result["deploy"] = str(deploy)
    return result


def apply_variants(variants: list[str]) -> float:
    """Patch omct's ulq_retrain for the ablations in VARIANTS (this child process only); returns the learning-rate
    factor of the quantization parameters."""
    from omct.pytorch.retrain import quantizers

    factor = 1.0
    for v in variants:
        if v == "maxinit":
            quantizers.WeightQuantizer._initial_scale = lambda self, w: self._arq_scale(w)
        elif v == "nogs":
            init = quantizers.WeightQuantizer.__init__

            def no_scaling(self, *a, init=init, **k):
                init(self, *a, **k)
                self.grad_factor = 1.0
            quantizers.WeightQuantizer.__init__ = no_scaling
        elif v.startswith("slr"):
            factor = float(v[3:])
        else:
            raise ValueError(f"unknown variant {v!r} (known: {VARIANTS})")
    return factor


def fold_batchnorm(model) -> int:
    """Fold every BatchNorm2d into the Conv2d registered just before it in the same parent (the layout of the
    benchmark CNNs): NNCF then quantizes the folded weights, as omct and an integer deploy model do. NNCF
    otherwise keeps BatchNorm after the convolution, its per-tensor weight scale becomes per-channel once BN is
    folded, and ONNX Runtime runs its deploy model with float convolutions and float BatchNorm."""
    from torch import nn
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = 0
    for parent in list(model.modules()):
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:], strict=False):
            if type(a) is nn.Conv2d and type(b) is nn.BatchNorm2d:
                setattr(parent, name_a, fuse_conv_bn_eval(a.eval(), b.eval()))
                setattr(parent, name_b, nn.Identity())
                folded += 1
    return folded


def nncf_weight_quantizers(model) -> list:
    """NNCF 3.4's weight quantizers of a quantized model: the pre-hooks on input port 1 (the weight) of its ops."""
    from nncf.torch.quantization.layers import BaseQuantizer

    return [m for n, m in model.named_modules()
            if isinstance(m, BaseQuantizer) and ".pre_hooks." in n and n.rsplit("__", 1)[-1].startswith("1")]


def nncf_qat(model, bits: int, channel_wise: bool, first_int8: bool, data, example, deploy: Path) -> dict:
    """NNCF's QAT: ``nncf.quantize`` (8-bit: its PyTorch backend's hardware config allows no other width), then at
    4 bits every weight quantizer's ``num_bits`` set to 4 (the range it initialised, max |w|, is kept: NNCF's min-max
    weight initialisation at 4 bits), the same training, ``nncf.strip``, ONNX export. 4-bit quantizers have no
    ONNX export (only 256-level QDQ), so after training each 4-bit weight is replaced by its 4-bit fake-quantized
    value and its quantizer set to 8 bits with a step 1/16 of the 4-bit step: the INT8 codes are the 4-bit
    codes times 16, the deploy model computes exactly the 4-bit weights."""
    import nncf
    import torch
    from bench_pytorch import nncf_root
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, QuantizationParameters

    calib = [torch.tensor(b) for b in ptq.calib_batches(8)]
    advanced = AdvancedQuantizationParameters(weights_quantization_params=QuantizationParameters(per_channel=channel_wise))
    kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if hasattr(model, "encoder") else {}
    q = nncf.quantize(nncf_root(model), nncf.Dataset(calib), subset_size=8 * ptq.CALIB_BATCH,
                      advanced_parameters=advanced, **kwargs)
    quantizers = nncf_weight_quantizers(q)
    low = quantizers[1:] if first_int8 else quantizers  # module order: the first is the first layer's weight
    if bits != 8:
        for fq in low:
            fq.num_bits = bits
    step_ms = train(q, data)
    q.eval()
    torch_acc = None
    if bits != 8:
        torch_acc = torch_accuracy(q)
        owners = _quantized_parameters(q, low, example)
        with torch.no_grad():
            for fq, weight in owners:
                assert fq.level_high == 2 ** (bits - 1) - 1 and not fq.is_half_range, (fq.level_high, fq.is_half_range)
                weight.copy_(fq(weight))
                fq.num_bits = 8
                ratio = fq.level_high / (2 ** (bits - 1) - 1) / 2 ** (8 - bits)  # step_8 = step_4 / 16
                if fq.is_using_log_scale_storage:
                    fq._scale_param_storage.add_(math.log(ratio))
                else:
                    fq._scale_param_storage.mul_(ratio)
    q = nncf.strip(q, example_input=example)
    torch.onnx.export(q, (example,), str(deploy), dynamo=False, opset_version=17, **EXPORT)
    return {"step_ms": step_ms, "deploy": str(deploy), "note": "" if bits == 8 else
            f"{len(low)} of {len(quantizers)} weight quantizers at {bits} bits; PyTorch before export {torch_acc:.4f}"}


def torch_accuracy(model) -> float:
    """Accuracy of a PyTorch model on the held-out digits, in chunks of 100 (peak RSS stays the training's)."""
    import torch

    d = ptq.data()
    with torch.no_grad():
        pred = torch.cat([model(torch.tensor(x)).argmax(1) for x in np.array_split(d.x_test, 5)]).numpy()
    return float((pred == d.y_test).mean())


def _quantized_parameters(model, quantizers: list, example) -> list:
    """(quantizer, the parameter it quantizes) for each of ``quantizers``: one forward pass records the tensor each
    receives, matched to the model's parameters by storage."""
    import torch

    seen: dict = {}
    hooks = [fq.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0])) for fq in quantizers]
    with torch.no_grad():
        model(example)
    for h in hooks:
        h.remove()
    params = {(p.data_ptr(), tuple(p.shape)): p for p in model.parameters()}
    out = []
    for fq in quantizers:
        t = seen[id(fq)]
        out.append((fq, params[(t.data_ptr(), tuple(t.shape))]))
    return out


def torchao_qat(model, name: str, bits: int, channel_wise: bool, data) -> dict:
    """torchao's QAT (``quantize_`` with ``IntXQuantizationAwareTrainingConfig``): it fake-quantizes nn.Linear only
    (nn.Conv2d raises), weights symmetric int4/int8, activations int8 asymmetric per token, dynamic. Accuracy of
    the fake-quantized PyTorch model (torchao has no ONNX/ORT path for these)."""
    import torch
    from torchao.quantization import quantize_
    from torchao.quantization.granularity import PerAxis, PerTensor
    from torchao.quantization.qat import IntxFakeQuantizeConfig, IntXQuantizationAwareTrainingConfig

    weight = IntxFakeQuantizeConfig(torch.int4 if bits == 4 else torch.int8, PerAxis(0) if channel_wise else PerTensor(),
                                    is_symmetric=True)
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    quantize_(model, IntXQuantizationAwareTrainingConfig(act, weight))
    linear = sum(type(m).__name__ == "FakeQuantizedLinear" for m in model.modules())
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    step_ms = train(model, data)
    return {"step_ms": step_ms, "torch_acc": torch_accuracy(model),
            "note": f"PyTorch fake-quant; {linear} Linear quantized" + (f", {convs} Conv2d left float" if convs else "")}


def kernels(deploy: Path) -> str:
    """ONNX Runtime's optimised deploy graph: how many matrix ops run integer kernels (QLinearConv, QGemm, ...) and
    how many run in float (weights dequantized at run time or folded back to float; attention's activation
    MatMuls included), and the BatchNormalization left in float."""
    import collections

    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(deploy.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(deploy), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    integer = sum(ops[op] for op in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger", "ConvInteger",
                                     "DynamicQuantizeMatMul", "MatMulIntegerToFloat"))
    floats = sum(ops[op] for op in ("Conv", "FusedConv", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "NchwcConv"))
    text = f"ORT: {integer} integer / {floats} float matrix ops"
    return text + (f", {ops['BatchNormalization']} float BatchNorm" if ops.get("BatchNormalization") else "")


def child(method: str, name: str, bits: str, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    out = ptq.WORK / f"qat_{name}_{method}_w{bits}"
    t = time.perf_counter()
    r = run(method, name, int(bits.rstrip("tf")), steps, out, channel_wise="t" not in bits, first_int8="f" in bits)
    print(json.dumps({"method": method, "model": name, "bits": bits, "wall_s": time.perf_counter() - t,
                      "peak_rss_mb": ptq.peak_rss_mb(), **r}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet", "mobilenet"])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--bits", nargs="*", type=int, default=[8, 4])
    ap.add_argument("--steps", type=int, default=60, help="fine-tune steps of batch 64 (every trained method alike)")
    ap.add_argument("--per-tensor", action="store_true", help="one weight scale per tensor (channel_wise false)")
    ap.add_argument("--first-int8", action="store_true",
                    help="the first layer's weights stay 8-bit (common practice at 4 bits; PTQ and QAT alike)")
    ap.add_argument("--append", metavar="TITLE", help="append the table under TITLE to results/qat.md")
    ap.add_argument("--nncf-path", default=os.environ.get("NNCF_PATH"), help="a site-packages folder holding nncf")
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    os.environ.setdefault("NNCF_EXTENSION_LOAD_TIMEOUT", "0")  # its CPU kernels compile for minutes on a busy host
    if args.nncf_path:
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), args.nncf_path]))
    rows = []
    for name in args.models:
        ptq.ensure_model(name)
        fp32_acc = ptq.accuracy(ptq.model_path(name))
        fp32 = ptq.child_process(__file__, "fp32-train", name, 8, args.steps) if "fp32-train" in args.methods else {}
        rows.append({"model": name, "method": "fp32", "bits": "-", "acc": fp32_acc, "step_ms": fp32.get("step_ms"),
                     "peak_rss_mb": fp32.get("peak_rss_mb")})
        for bits in args.bits:
            for method in [m for m in args.methods if m != "fp32-train"]:
                tag = f"{bits}{'t' if args.per_tensor else ''}{'f' if args.first_int8 else ''}"
                r = ptq.child_process(__file__, method, name, tag, args.steps)
                row = {**r, "model": name, "method": method,
                       "bits": f"W{bits}A8" + (" per tensor" if args.per_tensor else "")
                       + (", first layer W8" if args.first_int8 else "")}
                if "error" not in r:
                    row["acc"] = ptq.accuracy(Path(r["deploy"])) if "deploy" in r else r["torch_acc"]
                    if "deploy" in r:
                        row["note"] = "; ".join(filter(None, [kernels(Path(r["deploy"])), r.get("note")]))
                    if fp32.get("step_ms") and r.get("step_ms"):
                        row["step_ratio"] = r["step_ms"] / fp32["step_ms"]
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    lines = [f"QAT benchmark: models of bench_ptq.py (digits at {ptq.SIZE}x{ptq.SIZE}), {args.steps} fine-tune steps of "
             f"batch {BATCH} (Adam, lr {LR}) for every trained method, same batches; PTQ on 8 batches of "
             f"{ptq.CALIB_BATCH}. Accuracy of the deploy model in ONNX Runtime on 500 held-out images (FP32: the FP32 "
             "ONNX model). Step time: median training step, one thread, vs FP32 training of the same model. Shared host "
             "(2 cores, other jobs running): step times are noisy, compare ratios.\n"]
    cells = lambda r: [r["bits"], f"{r['acc']:.4f}", f"{r['step_ms']:.1f}" if r.get("step_ms") else "-",  # noqa: E731
                       f"{r['step_ratio']:.2f}x" if r.get("step_ratio") else "-",
                       f"{r['peak_rss_mb']:.0f}" if r.get("peak_rss_mb") else "-", r.get("note", "")]
    table_rows = [{**r, "method": r["method"]} for r in rows]
    lines += ptq.markdown_table(["model", "method", "weights", "accuracy", "step ms", "step vs FP32", "peak RSS MB", "note"],
                                table_rows, cells)
    if args.append:
        previous = (ptq.RESULTS / "qat.md").read_text().rstrip("\n")
        lines = [previous, "", f"## {args.append}", "", *lines]
    ptq.write_results("qat", lines)


if __name__ == "__main__":
    main()
