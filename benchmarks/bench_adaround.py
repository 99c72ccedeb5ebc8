"""Where min-max PTQ loses: omct's default vs omct + AdaRound (``ada_quantize``) vs ONNX Runtime's
quantize_static (QDQ, per-channel; MinMax, Percentile, Entropy), with cross-layer equalization (-cle) and
dmq_balancer (-dmq), on torchvision-layout MobileNetV2 and
ResNet-18 replicas (tests/real_models.py) trained here.

Data: scikit-learn's digits, upsampled to 32 x 32 and repeated to 3 channels (no image data set or pretrained
weights could be downloaded here). Every method agrees with FP32 on every plain test digit, so the judged
inputs are made ambiguous: 2000 blends ``a * x_i + (1 - a) * x_j`` of two test digits (a in [0.3, 0.7]),
of which the 200 with the smallest FP32 margin (top-1 minus top-2 logit) are kept. Judged by logit SQNR
against FP32 on those low-margin inputs and top-1 agreement with FP32 on them. Wall time
per method: calibration + export, one process, on a shared host (compare ratios). Run by hand:

    python benchmarks/bench_adaround.py            # writes benchmarks/results/adaround.md
    python benchmarks/bench_adaround.py --models mobilenet_v2 --methods omct omct-ada
    NNCF_PYTHON=/path/to/venv/bin/python python benchmarks/bench_adaround.py --methods omct nncf nncf-mixed
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ptq  # noqa: E402  (ONNX Runtime's calibration reader, session helper)

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "adaround"
RESULTS = HERE / "results"
MODELS = {"mobilenet_v2": {"width_mult": 0.5, "last_channel": 256}, "resnet18": {"width": 16}}
EPOCHS = {"mobilenet_v2": 12, "resnet18": 8}
METHODS = ["omct", "omct-cle", "omct-dmq", "omct-ada", "omct-ada-200", "omct-ada-fi-200", "omct-cle-ada",
           "omct-cle-ada-200", "ort-minmax", "ort-percentile", "ort-entropy"]
BATCH_NUM, CALIB_BATCH, LOW_MARGIN = 8, 32, 200


def data():
    d = bench_ptq.data()  # digits at 32 x 32 (cached)
    rgb = lambda x: np.repeat(x, 3, axis=1).astype(np.float32)  # noqa: E731
    return rgb(d.x_train), d.y_train, rgb(d.x_test), d.y_test


def ensure_model(name: str, kwargs: dict | None = None, epochs: int | None = None, tag: str = "") -> Path:
    """Train replica ``name`` (``kwargs``: its size, default MODELS[name]) once and cache its ONNX file."""
    path = WORK / f"{name}{tag}.onnx"
    if path.exists():
        return path
    import real_models
    import torch
    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = data()
    torch.manual_seed(0)
    model = getattr(real_models, name)(num_classes=10, **(MODELS[name] if kwargs is None else kwargs))
    zoo.train(model, zoo.Digits(xtr, ytr, xte, yte), epochs=EPOCHS[name] if epochs is None else epochs)
    print(f"trained {name}: accuracy {zoo.accuracy_torch(model, xte, yte):.4f}", file=sys.stderr)
    zoo.export_onnx(model, xte[:2], path)
    return path


#: A Python with nncf installed (its own venv: installing it into omct's would change pinned versions).
NNCF_PYTHON = os.environ.get("NNCF_PYTHON", sys.executable)


def nncf_child(method: str, src: str, dst: str) -> None:
    """Run in NNCF's venv: nncf.quantize with its defaults (``nncf``) or the MIXED preset (``nncf-mixed``)."""
    import nncf
    import onnx

    xtr = data()[0]
    batches = [xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(BATCH_NUM)]
    kwargs = {"preset": nncf.QuantizationPreset.MIXED} if method == "nncf-mixed" else {}
    q = nncf.quantize(onnx.load(src), nncf.Dataset(batches, lambda b: {"input": b}),
                      subset_size=BATCH_NUM * CALIB_BATCH, **kwargs)
    onnx.save(q, dst)


def quantize(method: str, src: Path, out: Path) -> Path:
    xtr = data()[0]
    if method.startswith("nncf"):  # wall time includes starting that Python and importing nncf
        dst = Path(f"{out}_deploy_model.onnx")
        subprocess.run([NNCF_PYTHON, __file__, "--nncf-child", method, str(src), str(dst)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return dst
    batches = [xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(BATCH_NUM)]
    if method.startswith("omct"):
        import omct.onnx as amct
        from omct.ui import set_quiet

        set_quiet()
        cfg = out.with_suffix(".cfg")
        parts = method.split("-")  # omct[-cle][-dmq][-ada[-fi][-ITERATIONS]]; fi: AdaRound on float inputs
        body = f"batch_num: {BATCH_NUM}\n" + ("cross_layer_equalization: true\n" if "cle" in parts else "")
        common = "dmq_balancer { } " if "dmq" in parts else ""
        if "ada" in parts:
            iters = parts[-1] if parts[-1].isdigit() else None
            common += "ada_quantize { " + (f"num_iteration: {iters} " if iters else "") + \
                ("quantized_input: false " if "fi" in parts else "") + "} "
        body += f"common_config {{ {common}}}\n" if common else ""
        cfg.write_text(body)
        amct.create_quant_config(f"{out}.json", str(src), config_defination=str(cfg))
        amct.quantize_model(f"{out}.json", str(src), f"{out}_mod.onnx", f"{out}_record.txt")
        sess = amct.CalibrationSession(f"{out}_mod.onnx")
        for b in batches:
            sess.run(None, {"input": b})
        amct.save_model(f"{out}_mod.onnx", f"{out}_record.txt", str(out))
        return Path(f"{out}_deploy_model.onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    algo = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
            "ort-percentile": CalibrationMethod.Percentile}[method]
    dst = Path(f"{out}_deploy_model.onnx")
    quantize_static(str(src), str(dst), bench_ptq.batch_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=algo)
    return dst


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    return bench_ptq.session(path, threads=1).run(None, {"input": x})[0].astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--out", default=str(RESULTS / "adaround.md"))
    ap.add_argument("--nncf-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.nncf_child:
        nncf_child(*args.nncf_child)
        return
    _, _, xte, yte = data()
    rows = []
    for name in args.models:
        src = ensure_model(name)
        rng = np.random.default_rng(0)
        i, j, a = rng.integers(0, len(xte), 2000), rng.integers(0, len(xte), 2000), rng.uniform(0.3, 0.7, 2000)
        blends = (a[:, None, None, None] * xte[i] + (1 - a[:, None, None, None]) * xte[j]).astype(np.float32)
        fp32 = logits(src, blends)
        top2 = np.sort(fp32, axis=1)[:, -2:]
        x = blends[np.argsort(top2[:, 1] - top2[:, 0])[:LOW_MARGIN]]
        ref = logits(src, x)
        fp32_acc = float((logits(src, xte).argmax(1) == yte).mean())
        for method in args.methods:
            t = time.perf_counter()
            dst = quantize(method, src, WORK / f"{name}_{method}")
            wall = time.perf_counter() - t
            got = logits(dst, x)
            sqnr = 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            acc = float((logits(dst, xte).argmax(1) == yte).mean())
            rows.append((name, method, sqnr, agree, acc, fp32_acc, wall))
            print(f"{name:13s} {method:15s} SQNR {sqnr:6.2f} dB  low-margin agreement {agree:.2f}  "
                  f"accuracy {acc:.3f} (fp32 {fp32_acc:.3f})  {wall:6.1f} s", flush=True)
    lines = ["# AdaRound benchmark (`benchmarks/bench_adaround.py`)", "",
             "Digits at 32 x 32 x 3 (scikit-learn; no harder image data or pretrained weights were obtainable here),",
             f"calibration {BATCH_NUM} x {CALIB_BATCH} images; logit SQNR and top-1 agreement vs FP32 on the {LOW_MARGIN}",
             "lowest-margin of 2000 blends of two test digits; accuracy on the 500 plain test digits;",
             "wall = calibration + export on a shared 2-core host (one thread; compare ratios).", "",
             "| model | method | logit SQNR, low-margin (dB) | low-margin agreement | accuracy (FP32) | wall (s) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {m} | {k} | {s:.2f} | {a:.2f} | {acc:.3f} ({f:.3f}) | {w:.1f} |" for m, k, s, a, acc, f, w in rows]
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
