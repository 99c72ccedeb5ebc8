"""Integer chains: deploy latency and logit SQNR of omct's deploy model vs FP32 and vs ONNX Runtime's own
``quantize_static`` (QDQ, per-channel, MinMax, uint8 activations as omct's, same calibration batches), on the
real-model replicas of tests/real_models.py: latency at full width (random weights, BatchNorm statistics set on
the digits at 64x64), accuracy and logit SQNR on the tests' small replicas trained on the 32x32 digits.

``before`` is omct with chain ops off (only Conv/Gemm/MatMul/AveragePool quantized, no Pad folding), ``after``
the current plan. Latency: batch 8, 1 and 2 intra-op threads, median of interleaved passes (the machine is
shared: quote the ratios). Run by hand:

    OMP_NUM_THREADS=1 python benchmarks/bench_chains.py          # writes benchmarks/results/chains.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ptq import batch_reader, interleaved_latencies_ms  # noqa: E402 - shared with every benchmark

WORK = ROOT / "benchmarks" / "work" / "chains"
RESULTS = ROOT / "benchmarks" / "results"
MODELS = ["efficientnet_lite", "resnet18", "mobilenet_v2"]
BATCH, CALIB, SIZE = 8, 4, 64
TRAINING = {"efficientnet_lite": (3, 5e-3), "resnet18": (2, 2e-3), "mobilenet_v2": (3, 5e-3)}  # epochs, lr


def build(name: str, full: bool):
    """``full``: the replica at torchvision / timm width with random weights and BatchNorm statistics calibrated
    on the digits upsampled to SIZE x SIZE (latency); else the tests' small replica trained on the 32x32 digits
    for TRAINING epochs (accuracy, SQNR). Exported with a dynamic batch; returns (path, train, test, labels)."""
    import real_models
    import torch
    import torch.nn.functional as F
    from test_pytorch_real_models import _digits32

    d = _digits32()
    size = SIZE if full else 32
    train, test = [F.interpolate(torch.tensor(a), size=(size, size), mode="bilinear") for a in (d.x_train, d.x_test)]
    torch.manual_seed(0)
    model = {"efficientnet_lite": lambda: real_models.efficientnet_lite(**({"width_mult": 1.0, "head": 1280} if full else {})),
             "resnet18": lambda: real_models.resnet18(**({"width": 64} if full else {})),
             "mobilenet_v2": lambda: real_models.mobilenet_v2(**({"width_mult": 1.0} if full else {}))}[name]()
    model.train()
    if full:
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the batches below
        with torch.no_grad():
            for i in range(8):
                model(train[i * 32:(i + 1) * 32])
    else:
        epochs, lr = TRAINING[name]
        y = torch.tensor(d.y_train)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in torch.randperm(len(y)).split(64):
                opt.zero_grad()
                F.cross_entropy(model(train[idx]), y[idx]).backward()
                opt.step()
    path = WORK / f"{name}{'_full' if full else ''}.onnx"
    torch.onnx.export(model.eval(), (train[:2],), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    return path, train.numpy(), test.numpy(), d.y_test


def omct_deploy(src: Path, batches, chains: bool) -> Path:
    import omct.onnx.api as api
    from omct.formats.config import load_config
    from omct.graph import ops
    from omct.onnx import create_quant_config

    saved = dict(ops.HANDLERS), api.fold_pads
    if not chains:
        for op in [k for k, h in ops.HANDLERS.items() if isinstance(h, ops.ChainHandler)]:
            del ops.HANDLERS[op]
        api.fold_pads = lambda model, report: None
    try:
        cfg = WORK / "config.json"
        create_quant_config(str(cfg), str(src), batch_num=len(batches))
        q = api.quantize(str(src), load_config(cfg), [{"input": b} for b in batches])
        out = WORK / f"{src.stem}_{'after' if chains else 'before'}"
        q.save(out)
    finally:
        ops.HANDLERS.clear()
        ops.HANDLERS.update(saved[0])
        api.fold_pads = saved[1]
    return Path(str(out) + "_deploy_model.onnx")


def ort_deploy(src: Path, batches) -> Path:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    dst = WORK / f"{src.stem}_ort_qdq.onnx"
    quantize_static(str(src), str(dst), batch_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax)
    return dst


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = threads, 1, 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies_ms(paths: list[Path], x: np.ndarray, threads: int, passes: int = 7, runs: int = 30) -> list[float]:
    """Median latency per model over interleaved passes (each pass warms its session up first)."""
    return interleaved_latencies_ms([session(p, threads) for p in paths], {"input": x}, passes, runs, warmup=5)


def integer_ops(path: Path) -> str:
    """What ONNX Runtime's optimised graph still runs in float around the quantized ops (a split chain)."""
    import onnx
    import onnxruntime as ort

    so_path = WORK / "optimized.onnx"
    so = ort.SessionOptions()
    so.log_severity_level, so.optimized_model_filepath = 3, str(so_path)
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(so_path)).graph.node]
    return f"{ops.count('DequantizeLinear')} DQ / {ops.count('QuantizeLinear')} Q"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2], help="intra-op thread counts to time")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        for full in (True, False):
            src, train, test, labels = build(name, full)
            batches = [train[i * 32:(i + 1) * 32] for i in range(CALIB)]
            models = {"FP32": src, "omct before": omct_deploy(src, batches, False),
                      "omct after": omct_deploy(src, batches, True), "ORT quantize_static": ort_deploy(src, batches)}
            if full:
                lat = {t: dict(zip(models, latencies_ms(list(models.values()), test[:BATCH], t), strict=True))
                       for t in args.threads}
                graph = {m: integer_ops(p) if m != "FP32" else "-" for m, p in models.items()}
                continue
            ref = session(src, 2).run(None, {"input": test})[0].astype(np.float64)
            for method, path in models.items():
                got = session(path, 2).run(None, {"input": test})[0].astype(np.float64)
                sqnr = float("inf") if method == "FP32" else 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum())
                timing = [(lat[t][method], lat[t]["FP32"] / lat[t][method], lat[t]["ORT quantize_static"] / lat[t][method])
                          for t in args.threads]
                rows.append((name, method, timing, float((got.argmax(1) == labels).mean()), sqnr, graph[method]))
                print(rows[-1], flush=True)
    lines = ["# Integer chains: omct deploy vs FP32 and ORT quantize_static", "",
             f"Latency and the optimised graph: the replicas of tests/real_models.py at full width (torchvision / timm), random "
             f"weights, BatchNorm calibrated, {SIZE}x{SIZE} inputs, batch {BATCH}, median "
             "of 7 interleaved passes of 30 runs. Accuracy and logit SQNR (vs FP32, 500 test images): the tests' small "
             "replicas trained on the 32x32 digits. Calibration: the same "
             f"{CALIB} batches of 32 for every method.",
             "`before`: chain ops off (only Conv/Gemm/MatMul/AveragePool quantized, no Pad folding). "
             "Q/DQ left: QuantizeLinear / DequantizeLinear nodes in ONNX Runtime's optimised graph (1 Q and 1 DQ are the "
             "model's input and output). On a shared host more threads can run slower: compare ratios within a column.",
             "",
             "| model | method | " + " | ".join(f"ms, {t} thr | vs FP32 | vs ORT QDQ" for t in args.threads)
             + " | accuracy | logit SQNR dB | Q/DQ left in ORT graph |",
             "|---|---|" + "---:|---:|---:|" * len(args.threads) + "---:|---:|---|"]
    for r in rows:
        timing = " | ".join(f"{ms:.2f} | {fp:.2f}x | {ort:.2f}x" for ms, fp, ort in r[2])
        lines.append(f"| {r[0]} | {r[1]} | {timing} | {r[3]:.3f} | {r[4]:.1f} | {r[5]} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chains.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
