"""Non-uniform quantization of weights, side by side on the benchmark models (trained here on digits):

uniform INT8, NUQ-32, NUQ-16, uniform INT5 and INT4 weights (the same bits per weight as NUQ-32 / NUQ-16, for
reference; activations INT8 everywhere), and automatic NUQ at a 1-point accuracy budget. Reports accuracy, logit
SQNR against FP32, deploy file size vs FP32 and latency vs FP32 (ONNX Runtime, interleaved). Run by hand:

    python benchmarks/bench_nuq.py                      # writes benchmarks/results/nuq.md
    python benchmarks/bench_nuq.py --models resnet --no-auto
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ptq import (  # noqa: E402 - the shared benchmark helpers
    MODELS,
    WORK,
    accuracy,
    calib_batches,
    data,
    ensure_model,
    latencies_ms,
    logit_sqnr_db,
    markdown_table,
    model_path,
    write_results,
)

BATCH_NUM = 8
#: method -> the .cfg that makes it
CONFIGS = {
    "int8": "",
    "nuq32": "nuq_config { nuq_quantize { num_steps: 32 num_of_iteration: 1 } }",
    "nuq16": "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 } }",
    "int5": "common_config { arq_quantize { quant_bits: 5 } }",
    "int4": "common_config { arq_quantize { quant_bits: 4 } }",
}


def quantize(name: str, method: str) -> Path:
    import omct.onnx as amct

    out = WORK / f"{name}_nuq_{method}"
    cfg = Path(str(out) + ".cfg")
    cfg.write_text(f"batch_num: {BATCH_NUM}\n{CONFIGS[method]}\n")
    amct.create_quant_config(str(out) + ".json", str(model_path(name)), config_defination=str(cfg))
    amct.quantize_model(str(out) + ".json", str(model_path(name)), str(out) + "_mod.onnx", str(out) + "_record.txt")
    sess = amct.CalibrationSession(str(out) + "_mod.onnx")
    for b in calib_batches(BATCH_NUM):
        sess.run(None, {"input": b})
    return amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))[1]


def auto(name: str) -> tuple[Path, dict]:
    """Automatic NUQ with top-1 on the held-out images as the metric and a 1-point budget."""
    import onnxruntime as ort

    import omct.onnx as amct
    from omct.auto import AutoNuqEvaluatorBase

    d = data()
    calib = calib_batches(BATCH_NUM)

    class Top1(AutoNuqEvaluatorBase):
        def eval_model(self, model_file, weights_file, batch_num):
            s = ort.InferenceSession(model_file)
            if isinstance(s, amct.CalibrationSession):  # the calibration call: batch_num calibration batches
                for b in calib[:batch_num]:
                    s.run(None, {"input": b})
                return 0.0
            return float((s.run(None, {"input": d.x_test})[0].argmax(1) == d.y_test).mean())

        def is_satisfied(self, original_metric, new_metric):
            return (original_metric - new_metric) * 100 < 1

    out = WORK / f"{name}_nuq_auto"
    cfg = Path(str(out) + ".cfg")
    cfg.write_text(f"batch_num: {BATCH_NUM}\n{CONFIGS['nuq16']}\n")
    amct.create_quant_config(str(out) + ".json", str(model_path(name)), config_defination=str(cfg))
    t = time.perf_counter()
    result = amct.auto_nuq(str(model_path(name)), Top1(), str(out) + ".json", str(out) + "_record.txt", str(out))
    info = {"evaluations": result.evaluations, "bound": result.bound, "wall_s": time.perf_counter() - t,
            "steps": {str(k or "uniform"): sum(1 for v in result.steps.values() if v == k) for k in (16, 32, None)}}
    return out / f"{model_path(name).stem}_deploy_model.onnx", info


def optimized_graph(path: Path):
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path.with_suffix(".optimized.onnx"))
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return onnx.load(so.optimized_model_filepath).graph


def integer_kernels_intact(path: Path) -> bool:
    """No weight DequantizeLinear left in front of a float op in ONNX Runtime's optimised graph."""
    graph = optimized_graph(path)
    weights = {t.name for t in graph.initializer if len(t.dims) >= 2}
    dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in weights}
    return not any(i in dq for n in graph.node for i in n.input)


def kernels(path: Path) -> dict[str, int]:
    """Op type -> count in ONNX Runtime's optimised graph: equal to INT8's means the same kernels run."""
    counts: dict[str, int] = {}
    for n in optimized_graph(path).node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts


def main() -> None:
    from omct.ui import set_quiet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--no-auto", dest="auto", action="store_false")
    args = ap.parse_args()
    set_quiet()
    rows = []
    for name in args.models:
        ensure_model(name)
        fp32 = model_path(name)
        paths, extra = {}, {}
        for method in CONFIGS:
            t = time.perf_counter()
            paths[method] = quantize(name, method)
            extra[method] = {"wall_s": time.perf_counter() - t}
        if args.auto:
            paths["auto-nuq 1pt"], extra["auto-nuq 1pt"] = auto(name)
        lats = latencies_ms([fp32, *paths.values()])
        rows.append({"model": name, "method": "fp32", "acc": accuracy(fp32), "lat_ratio": 1.0, "lat_ms": lats[0],
                     "size_ratio": 1.0, "size_kb": fp32.stat().st_size / 1024})
        for (method, path), lat in zip(paths.items(), lats[1:], strict=True):
            rows.append({"model": name, "method": method, "acc": accuracy(path), "sqnr": logit_sqnr_db(name, path),
                         "lat_ms": lat, "lat_ratio": lat / lats[0], "size_kb": path.stat().st_size / 1024,
                         "size_ratio": path.stat().st_size / fp32.stat().st_size,
                         "kernels": integer_kernels_intact(path), "same_ops": kernels(path) == kernels(paths["int8"]),
                         **extra[method]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"NUQ benchmark: {BATCH_NUM} calibration batches of 32, digits upsampled to 32x32, accuracy on 500 "
             "held-out images, logit SQNR against FP32 on the same images, deploy file size vs the FP32 file, ONNX "
             "Runtime latency at batch 16 with 2 threads (median of 5 interleaved passes of 40 runs; shared host, "
             "quote the ratios). int5/int4: uniform 5/4-bit weights (stored as INT8 in the deploy file). Activations "
             "INT8 everywhere. auto-nuq 1pt: automatic NUQ, top-1 loss < 1 point. Optimised graph = INT8's: the "
             "op types and counts ONNX Runtime runs are those of the uniform INT8 deploy model (the same kernels).\n"]
    lines += markdown_table(
        ["model", "method", "accuracy", "logit SQNR dB", "size KB", "size vs FP32", "latency ms", "vs FP32",
         "integer kernels", "optimised graph = INT8's", "notes"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['size_kb']:.0f}",
                         f"{r['size_ratio']:.3f}x", f"{r['lat_ms']:.2f}", f"{r['lat_ratio']:.2f}x",
                         "-" if "kernels" not in r else ("yes" if r["kernels"] else "NO"),
                         "-" if "same_ops" not in r else ("yes" if r["same_ops"] else "no"),
                         (f"{r['evaluations']} eval_model calls (bound {r['bound']}); layers: "
                          + ", ".join(f"{v} {k}" for k, v in r["steps"].items() if v)) if "evaluations" in r else ""])
    write_results("nuq", lines)


if __name__ == "__main__":
    main()
