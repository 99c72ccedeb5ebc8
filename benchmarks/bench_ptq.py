"""Post-training quantization, side by side: omct (IFMR, HFMG) vs ONNX Runtime quantize_static (QDQ,
per-channel; MinMax, Entropy, Percentile) vs NNCF nncf.quantize, on models trained here on digits.

Each method runs in its own child process so its peak RSS is its own. Run by hand, not in CI:

    python benchmarks/bench_ptq.py                 # all models, all methods, writes benchmarks/results/ptq.md
    python benchmarks/bench_ptq.py --models resnet --methods omct-ifmr ort-minmax
    python benchmarks/bench_ptq.py --methods omct-ifmr omct-ifmr-exact ort-minmax   # -exact: every value binned
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the model zoo lives with the tests

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
SIZE = 32  # input images are upsampled to SIZE x SIZE so that latency measures compute, not overhead
MODELS = {"resnet": {"width": 32, "blocks": 3}, "mobilenet": {"width": 16},
          "transformer": {"d_model": 64, "layers": 2, "heads": 4, "patch": 8, "size": SIZE}}
EPOCHS = {"resnet": 25, "mobilenet": 15, "transformer": 25}
METHODS = ["omct-ifmr", "omct-hfmg", "ort-minmax", "ort-entropy", "ort-percentile", "nncf"]
CALIB_BATCH = 32


def data():
    """The digits at SIZE x SIZE, cached as .npz so that measured child processes never import torch."""
    from zoo import Digits

    cache = WORK / f"digits{SIZE}.npz"
    if not cache.exists():
        import zoo

        WORK.mkdir(parents=True, exist_ok=True)
        d = zoo.load_digits(SIZE)
        np.savez(cache, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    z = np.load(cache)
    return Digits(z["x_train"], z["y_train"], z["x_test"], z["y_test"])


def model_path(name: str) -> Path:
    return WORK / f"{name}_fp32.onnx"


def state_path(name: str) -> Path:
    return WORK / f"{name}_fp32.pt"


def ensure_model(name: str) -> None:
    """Train the model once: its ONNX export and its PyTorch state_dict are cached in benchmarks/work."""
    if model_path(name).exists() and state_path(name).exists():
        return
    import torch
    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    d = data()
    m = zoo.build(name, d, model_path(name), epochs=EPOCHS[name], **MODELS[name])
    torch.save(m.state_dict(), state_path(name))
    print(f"trained {name}: torch accuracy {zoo.accuracy_torch(m, d.x_test, d.y_test):.4f}", file=sys.stderr)


def torch_model(name: str):
    """The trained PyTorch model (eval mode)."""
    import torch
    import zoo

    ensure_model(name)
    m = zoo.ARCHITECTURES[name](**MODELS[name])
    m.load_state_dict(torch.load(state_path(name)))
    return m.eval()


def calib_batches(batch_num: int):
    d = data()
    x = d.x_train
    return [x[(i * CALIB_BATCH) % len(x):][:CALIB_BATCH] for i in range(batch_num)]


def omct_method(method: str) -> str:
    """The omct algorithm of an omct method name. ``omct-ifmr-exact`` is omct-ifmr with every activation value
    binned (the sketch before sampling), to measure before and after in the same interleaved run."""
    algo = method[5:]
    if algo.endswith("-exact"):
        import omct.core.sketch

        omct.core.sketch.DEFAULT_SAMPLE_SIZE = 0
        algo = algo[: -len("-exact")]
    return algo


def prepare_omct(method: str, name: str, out: Path, batch_num: int) -> None:
    """create_quant_config + quantize_model: the modified model at ``out_mod.onnx``."""
    import omct.onnx as amct
    from omct.ui import set_quiet

    set_quiet()
    src = str(model_path(name))
    cfg = out.with_suffix(".cfg")
    cfg.write_text(f"batch_num: {batch_num}\ncommon_config {{ {omct_method(method)}_quantize {{ }} }}\n")
    amct.create_quant_config(str(out) + ".json", src, config_defination=str(cfg))
    amct.quantize_model(str(out) + ".json", src, str(out) + "_mod.onnx", str(out) + "_record.txt")


def batch_reader(batches):
    """ONNX Runtime's calibration reader over ``batches`` (arrays fed to the input named "input")."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {"input": b}

    return Reader()


def quantize(method: str, name: str, out: Path, batch_num: int) -> Path:
    src = str(model_path(name))
    batches = calib_batches(batch_num)
    if method.startswith("omct"):
        import omct.onnx as amct

        prepare_omct(method, name, out, batch_num)
        sess = amct.CalibrationSession(str(out) + "_mod.onnx")
        for b in batches:
            sess.run(None, {"input": b})
        amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))
        return Path(str(out) + "_deploy_model.onnx")
    if method.startswith("ort"):
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        algo = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
                "ort-percentile": CalibrationMethod.Percentile}[method]
        dst = Path(str(out) + "_deploy_model.onnx")
        quantize_static(src, str(dst), batch_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=algo)
        return dst
    if method == "nncf":
        import nncf
        import onnx

        model = onnx.load(src)
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if name == "transformer" else {}
        q = nncf.quantize(model, nncf.Dataset(batches, lambda b: {"input": b}), subset_size=len(batches) * CALIB_BATCH,
                          **kwargs)
        dst = Path(str(out) + "_deploy_model.onnx")
        onnx.save(q, str(dst))
        return dst
    raise ValueError(method)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def accuracy(path: Path) -> float:
    d = data()
    s = session(path)
    return float((s.run(None, {"input": d.x_test})[0].argmax(1) == d.y_test).mean())


@functools.cache
def _fp32_logits(name: str) -> np.ndarray:
    return session(model_path(name)).run(None, {"input": data().x_test})[0]


def logit_sqnr_db(name: str, path: Path) -> float:
    """Signal-to-quantization-noise ratio of a quantized model's logits against the FP32 model's on the test
    set: a finer measure than accuracy, where one image is 0.2 points."""
    d = data()
    ref = _fp32_logits(name)
    got = session(path).run(None, {"input": d.x_test})[0]
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()))


def interleaved_latencies_ms(sessions: list, feeds: dict, passes: int, runs: int, warmup: int = 10) -> list[float]:
    """Median latency of each session, measured in interleaved passes so that machine noise hits every model
    alike. Each pass warms the session up first: ORT's idle worker threads spin for a while after a run, so
    strict round-robin between sessions would measure their contention, not the models."""
    medians: list[list[float]] = [[] for _ in sessions]
    for _ in range(passes):
        for s, med in zip(sessions, medians, strict=True):
            for _ in range(warmup):
                s.run(None, feeds)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - t)
            med.append(float(np.median(times)))
    return [float(np.median(m) * 1000) for m in medians]


def latencies_ms(paths: list[Path], batch: int = 16, passes: int = 5, runs: int = 40) -> list[float]:
    """Median latency of each model at ``batch`` test images (interleaved passes)."""
    return interleaved_latencies_ms([session(p) for p in paths], {"input": data().x_test[:batch]}, passes, runs)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's, as Linux keeps it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_vs_forward(method: str, name: str, batch_num: int, rounds: int = 7) -> dict:
    """Seconds of the calibration part (a CalibrationSession's runs over the calibration batches, the last
    one writing the record) and of the bare FP32 forward passes over the same batches (an ONNX Runtime
    session on the original model, default options), each the median of ``rounds`` interleaved rounds.
    Sessions are built outside the timings; each round calibrates with a fresh CalibrationSession."""
    import omct.onnx as amct

    out = WORK / f"{name}_{method}_calib_b{batch_num}"
    prepare_omct(method, name, out, batch_num)
    batches = calib_batches(batch_num)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(str(model_path(name)), so, providers=["CPUExecutionProvider"])
    for b in batches[:2]:  # warm-up: first-run allocations
        fp32.run(None, {"input": b})
    fwd, cal = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for b in batches:
            fp32.run(None, {"input": b})
        fwd.append(time.perf_counter() - t)
        sess = amct.CalibrationSession(str(out) + "_mod.onnx")
        t = time.perf_counter()
        for b in batches:
            sess.run(None, {"input": b})
        cal.append(time.perf_counter() - t)
        del sess
    return {"forward_s": float(np.median(fwd)), "calib_s": float(np.median(cal))}


def child(method: str, name: str, batch_num: int) -> None:
    """Quantize once in this process and print a JSON line of measurements (``calib:`` methods: the
    calibration part against the bare forward passes instead)."""
    if method.startswith("calib:"):
        print(json.dumps({"method": method[6:], "model": name, **calibration_vs_forward(method[6:], name, batch_num)}))
        return
    out = WORK / f"{name}_{method}_b{batch_num}"
    base_rss = peak_rss_mb()
    t = time.perf_counter()
    deploy = quantize(method, name, out, batch_num)
    wall = time.perf_counter() - t
    peak = peak_rss_mb()
    print(json.dumps({"method": method, "model": name, "batch_num": batch_num, "wall_s": wall,
                      "peak_rss_mb": peak, "start_rss_mb": base_rss, "deploy": str(deploy)}))


@functools.cache
def compile_bytecode() -> None:
    """Write omct's bytecode once, as a regular pip install does. Without it an editable install under
    PYTHONDONTWRITEBYTECODE recompiles every omct module in every child and charges that to omct's wall
    time, while the peers' bytecode was written when pip installed them."""
    import compileall

    compileall.compile_dir(str(HERE.parent / "omct"), quiet=1)


def child_process(script: str | Path, method: str, name: str, *args) -> dict:
    """Run ``script --child method name args...`` quietly in a fresh process and return the JSON line it
    prints last, or the method, model and the last line of its error output when it fails."""
    compile_bytecode()
    cmd = [sys.executable, str(script), "--child", method, name, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMCT_QUIET="1"))
    if res.returncode != 0:
        return {"method": method, "model": name, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_child(method: str, name: str, batch_num: int) -> dict:
    return {"batch_num": batch_num, **child_process(__file__, method, name, batch_num)}


def markdown_table(headers: list[str], rows: list[dict], cells) -> list[str]:
    """A markdown table; ``cells(row)`` gives a row's cells, a row with an "error" says it failed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        row = [r["model"], r["method"], f"failed: {r['error'][:90]}"] + [""] * (len(headers) - 3) if "error" in r \
            else [r["model"], r["method"], *cells(r)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_results(name: str, lines: list[str]) -> None:
    """Write ``benchmarks/results/{name}.md`` and print it."""
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
    print(text)


def repeated_runs(run, name: str, args, rows: list) -> dict:
    """Each method ``args.repeat`` times in child processes, in interleaved rounds so that a slow spell of
    the machine hits every method alike: median wall time, highest peak RSS; a failure becomes an error row."""
    results = {}
    rounds = [{method: run(method, name, args.batch_num) for method in args.methods} for _ in range(args.repeat)]
    for method in args.methods:
        runs = [r[method] for r in rounds]
        failed = [r for r in runs if "error" in r]
        if failed:
            rows.append({"model": name, "method": method, "error": failed[0]["error"]})
        else:
            results[method] = {**runs[0], "wall_s": float(np.median([r["wall_s"] for r in runs])),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--batch-num", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=5, help="quantize this many times; the median wall time is reported")
    ap.add_argument("--memory", action="store_true", help="also measure omct's peak RSS at batch_num 32 vs 256")
    ap.add_argument("--no-calib-ratio", dest="calib_ratio", action="store_false",
                    help="skip timing omct's calibration part against the bare FP32 forward passes")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows, lines = [], []
    for name in args.models:
        ensure_model(name)
        fp32 = model_path(name)
        results = repeated_runs(run_child, name, args, rows)
        calib = {m: child_process(__file__, f"calib:{m}", name, args.batch_num) for m in results if m.startswith("omct")} \
            if args.calib_ratio else {}
        paths = [fp32] + [Path(r["deploy"]) for r in results.values()]
        lats = latencies_ms(paths)
        rows.append({"model": name, "method": "fp32", "acc": accuracy(fp32), "lat_ms": lats[0], "lat_ratio": 1.0,
                     "size_kb": fp32.stat().st_size / 1024})
        for (method, r), lat in zip(results.items(), lats[1:], strict=True):
            deploy = Path(r["deploy"])
            rows.append({"model": name, "method": method, "acc": accuracy(deploy), "sqnr": logit_sqnr_db(name, deploy),
                         "lat_ms": lat,
                         "lat_ratio": lat / lats[0], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"],
                         "size_kb": deploy.stat().st_size / 1024})
            if "ort-minmax" in results:
                rows[-1]["wall_ratio"] = r["wall_s"] / results["ort-minmax"]["wall_s"]
            c = calib.get(method, {})
            if "calib_s" in c:
                rows[-1].update(calib_s=c["calib_s"], forward_s=c["forward_s"], calib_ratio=c["calib_s"] / c["forward_s"])
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines.append(f"PTQ benchmark: {args.batch_num} calibration batches of {CALIB_BATCH}, digits upsampled to {SIZE}x{SIZE}, "
                 "accuracy on 500 held-out images, ORT latency at batch 16 with 2 threads (median of 5 interleaved "
                 f"passes of 40 runs each), PTQ wall time the median of {args.repeat} interleaved rounds; vs MinMax: "
                 "PTQ wall time over ORT MinMax's; calib/fwd: omct's calibration part (its CalibrationSession's "
                 f"runs over the {args.batch_num} batches) over bare FP32 ONNX Runtime runs over the same batches "
                 "(medians of 7 interleaved rounds in one process).\n")
    lines += markdown_table(
        ["model", "method", "accuracy", "logit SQNR dB", "latency ms", "vs FP32", "PTQ wall s", "vs MinMax", "calib/fwd",
         "peak RSS MB", "size KB"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['lat_ms']:.2f}",
                         f"{r['lat_ratio']:.2f}x", f"{r.get('wall_s', 0):.2f}",
                         f"{r['wall_ratio']:.2f}x" if "wall_ratio" in r else "-",
                         f"{r['calib_ratio']:.2f}x ({r['calib_s']:.3f}/{r['forward_s']:.3f} s)" if "calib_ratio" in r else "-",
                         f"{r.get('peak_rss_mb', 0):.0f}", f"{r['size_kb']:.0f}"])
    if args.memory:
        lines.append("\nomct peak RSS vs batch_num (IFMR, resnet):\n")
        lines.append("| batch_num | peak RSS MB | wall s |")
        lines.append("|---|---|---|")
        for bn in (32, 256):
            r = run_child("omct-ifmr", args.models[0], bn)
            lines.append(f"| {bn} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |")
    write_results("ptq", lines)


if __name__ == "__main__":
    main()
