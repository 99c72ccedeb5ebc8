"""Non-uniform quantization of weights, side by side on the benchmark models (trained here on digits):

uniform INT8, NUQ-32, NUQ-16, uniform INT5 and INT4 weights (the same bits per weight as NUQ-32 / NUQ-16, for
reference; activations INT8 everywhere), and automatic NUQ at a 1-point accuracy budget. Reports accuracy, top-1
agreement and logit SQNR against FP32, deploy file size vs FP32 and latency vs FP32 (ONNX Runtime, interleaved).

Top-1 on 500 test digits moves by 0.2 points per image, and every method agrees with FP32 on almost all of them;
so each NUQ row is also compared with uniform weights of the same bits (NUQ-16 with INT4, NUQ-32 with INT5) on
bench_adaround's judged inputs: the 1000 lowest-FP32-margin blends of two test digits (its
``low_margin_inputs``), top-1 agreement with FP32 and logit SQNR on them, with 95% bootstrap intervals of the
paired differences and McNemar's exact test (its ``Paired``), and the same for top-1 on the plain test digits.

Two sets of models: the small benchmark models of bench_ptq (width 32 ResNet, width 16 MobileNet, a 2-layer
transformer; 0.07-0.3 M parameters, where per-layer overhead in the deploy file weighs), and real-size
torchvision-layout replicas (tests/real_models.py: ResNet-18 at width 64, 11.2 M parameters; MobileNetV2 width
1.0, 2.2 M), trained briefly here on the same digits as 3-channel images (bench_adaround's data) and cached in
benchmarks/work/adaround/. Run by hand:

    python benchmarks/bench_nuq.py                      # writes benchmarks/results/nuq.md
    python benchmarks/bench_nuq.py --models resnet resnet18 --no-auto
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adaround  # noqa: E402 - the real-size replicas, trained on 3-channel digits
from bench_ptq import (  # noqa: E402 - the shared benchmark helpers
    MODELS,
    WORK,
    calib_batches,
    data,
    ensure_model,
    interleaved_latencies_ms,
    markdown_table,
    model_path,
    session,
    write_results,
)

BATCH_NUM = 8
#: the uniform rows each NUQ row is compared with (the same bits per weight)
SAME_BITS = [("nuq16", "int4"), ("nuq32", "int5"), ("nuq16", "int4-flips"), ("nuq32", "int5-flips"),
             ("nuq16-rule", "int4"), ("nuq32-rule", "int5"), ("nuq16-pc", "int4"), ("nuq16-old", "int4"), ("nuq32-old", "int5")]
#: real-size replicas: name -> (tests/real_models.py constructor, its arguments, training epochs)
REAL = {"resnet18": ("resnet18", {"width": 64}, 3, "_w64"),
        "mobilenet_v2": ("mobilenet_v2", {"width_mult": 1.0}, 4, "_w100")}


@dataclass
class Bench:
    """A benchmark model: its FP32 file, calibration batches and labelled test images."""
    name: str
    src: Path
    calib: list
    x: np.ndarray
    y: np.ndarray

    @functools.cached_property
    def ref(self) -> np.ndarray:
        return session(self.src).run(None, {"input": self.x})[0].astype(np.float64)

    def logits(self, path: Path) -> np.ndarray:
        return session(path).run(None, {"input": self.x})[0].astype(np.float64)

    @functools.cached_property
    def low_margin(self) -> np.ndarray:
        """bench_adaround's judged inputs for this model: its lowest-margin blends of two test digits (cached
        next to the model, keyed by the model file's time stamp)."""
        cache = WORK / f"{self.name}_low_margin_{self.src.stat().st_mtime_ns}.npy"
        if not cache.exists():
            np.save(cache, bench_adaround.low_margin_inputs(self.src, self.x))
        return np.load(cache)


class Judged:
    """Every method's top-1 on the plain test digits and its logits on the low-margin blends, paired
    (bench_adaround.Paired: the same bootstrap resamples for every method, McNemar's exact test)."""

    def __init__(self, b: Bench):
        self.blends = bench_adaround.Paired(bench_adaround.logits(b.src, b.low_margin))
        self.top1 = bench_adaround.Paired(np.eye(int(b.y.max()) + 1)[b.y])  # "agreement" with the labels = top-1
        self.b = b

    def add(self, method: str, path: Path) -> None:
        self.blends.add(method, bench_adaround.logits(path, self.b.low_margin))
        self.top1.add(method, self.b.logits(path))

    def versus(self, m: str, base: str) -> dict:
        """``m`` minus ``base``: top-1 and low-margin agreement (difference, 95% CI, McNemar p), low-margin SQNR
        (difference, 95% CI), and each one's own value with its interval."""
        return {"top1": self.top1.agree_diff(m, base), "agree": self.blends.agree_diff(m, base),
                "sqnr": self.blends.sqnr_diff(m, base), "own_agree": (float(self.blends.agree[m].mean()),
                                                                       *self.blends.agree_ci(m)),
                "base_agree": (float(self.blends.agree[base].mean()), *self.blends.agree_ci(base)),
                "own_sqnr": (self.blends.sqnr(m), *self.blends.sqnr_ci(m)),
                "base_sqnr": (self.blends.sqnr(base), *self.blends.sqnr_ci(base))}


def bench_model(name: str) -> Bench:
    if name in REAL:
        ctor, kwargs, epochs, tag = REAL[name]
        src = bench_adaround.ensure_model(ctor, kwargs, epochs, tag)
        xtr, _, xte, yte = bench_adaround.data()
        return Bench(name, src, [xtr[i * 32:(i + 1) * 32] for i in range(BATCH_NUM)], xte, yte)
    ensure_model(name)
    d = data()
    return Bench(name, model_path(name), calib_batches(BATCH_NUM), d.x_test, d.y_test)

#: method -> the .cfg that makes it
CONFIGS = {
    "int8": "",
    "nuq32": "nuq_config { nuq_quantize { num_steps: 32 num_of_iteration: 1 } }",
    "nuq16": "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 } }",
    # the previous defaults: nearest levels, one table per output channel (before / after comparisons)
    "nuq32-old": "nuq_config { nuq_quantize { num_steps: 32 num_of_iteration: 1 output_aware: false num_tables: 0 } }",
    "nuq16-old": "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 output_aware: false num_tables: 0 } }",
    # output-aware, one table per output channel (what shared tables cost)
    "nuq16-pc": "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 num_tables: 0 } }",
    # the fixed rule for tables (nuq.effective_tables) instead of the allocation (before / after comparisons)
    "nuq32-rule": "nuq_config { nuq_quantize { num_steps: 32 num_of_iteration: 1 allocate: false } }",
    "nuq16-rule": "nuq_config { nuq_quantize { num_steps: 16 num_of_iteration: 1 allocate: false } }",
    "int5": "common_config { arq_quantize { quant_bits: 5 } }",
    "int4": "common_config { arq_quantize { quant_bits: 4 } }",
    # uniform with the flip descent on every layer (the default's learned rounding skips costly layers:
    # adaround.FLIP_COST_LIMIT, FLIP_MAX_D); ada_quantize has no quant_bits in a .cfg: set in config.json (FLIP_BITS)
    "int5-flips": "",
    "int4-flips": "",
}
#: the -flips methods' bits
FLIP_BITS = {"int5-flips": 5, "int4-flips": 4}


def quantize(b: Bench, method: str) -> Path:
    import omct.onnx as amct

    out = WORK / f"{b.name}_nuq_{method}"
    cfg = Path(str(out) + ".cfg")
    cfg.write_text(f"batch_num: {BATCH_NUM}\n{CONFIGS[method]}\n")
    amct.create_quant_config(str(out) + ".json", str(b.src), config_defination=str(cfg))
    if method in FLIP_BITS:
        config = json.loads(Path(str(out) + ".json").read_text())
        for layer in config.values():
            if isinstance(layer, dict) and "weight_quant_params" in layer:
                layer["weight_quant_params"].update(num_bits=FLIP_BITS[method], wts_algo="ada_quantize",
                                                    solver="flips")
        Path(str(out) + ".json").write_text(json.dumps(config, indent=1))
    amct.quantize_model(str(out) + ".json", str(b.src), str(out) + "_mod.onnx", str(out) + "_record.txt")
    sess = amct.CalibrationSession(str(out) + "_mod.onnx")
    for x in b.calib:
        sess.run(None, {"input": x})
    return amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))[1]


def auto(b: Bench) -> tuple[Path, dict]:
    """Automatic NUQ with top-1 on the held-out images as the metric and a 1-point budget."""
    import onnxruntime as ort

    import omct.onnx as amct
    from omct.auto import AutoNuqEvaluatorBase

    calib, name = b.calib, b.name

    class Top1(AutoNuqEvaluatorBase):
        def eval_model(self, model_file, weights_file, batch_num):
            s = ort.InferenceSession(model_file)
            if isinstance(s, amct.CalibrationSession):  # the calibration call: batch_num calibration batches
                for x in calib[:batch_num]:
                    s.run(None, {"input": x})
                return 0.0
            return float((s.run(None, {"input": b.x})[0].argmax(1) == b.y).mean())

        def is_satisfied(self, original_metric, new_metric):
            return (original_metric - new_metric) * 100 < 1

    out = WORK / f"{name}_nuq_auto"
    cfg = Path(str(out) + ".cfg")
    cfg.write_text(f"batch_num: {BATCH_NUM}\n{CONFIGS['nuq16']}\n")
    amct.create_quant_config(str(out) + ".json", str(b.src), config_defination=str(cfg))
    t = time.perf_counter()
    result = amct.auto_nuq(str(b.src), Top1(), str(out) + ".json", str(out) + "_record.txt", str(out))
    info = {"evaluations": result.evaluations, "bound": result.bound, "wall_s": time.perf_counter() - t,
            "steps": {str(k or "uniform"): sum(1 for v in result.steps.values() if v == k) for k in (16, 32, None)}}
    return out / f"{b.src.stem}_deploy_model.onnx", info


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
    import onnx

    from omct.ui import set_quiet

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=[*MODELS, *REAL])
    ap.add_argument("--methods", nargs="*", default=["int8", "nuq32", "nuq16", "int5", "int4"], choices=list(CONFIGS))
    ap.add_argument("--append", action="store_true", help="append the table to the results as a dated section")
    ap.add_argument("--cached", nargs="*", default=[], metavar="METHOD",
                    help="reuse these methods' deploy files from an earlier run of the same code instead of quantizing")
    ap.add_argument("--no-auto", dest="auto", action="store_false", help="no automatic NUQ (never run on REAL)")
    args = ap.parse_args()
    set_quiet()
    rows, comparisons = [], []
    for name in args.models:
        b = bench_model(name)
        fp32 = b.src
        paths, extra = {}, {}
        for method in args.methods:
            cached = Path(f"{WORK / f'{b.name}_nuq_{method}'}_deploy_model.onnx")
            if method in args.cached and cached.exists():  # an earlier run's file (no wall time)
                paths[method], extra[method] = cached, {}
                continue
            t = time.perf_counter()
            paths[method] = quantize(b, method)
            extra[method] = {"wall_s": time.perf_counter() - t}
        if args.auto and name not in REAL:  # the search's many exports of an 11 M model: minutes, not the point
            paths["auto-nuq 1pt"], extra["auto-nuq 1pt"] = auto(b)
        # the real-size models run ~10x longer per batch: fewer timed runs
        passes, runs = (3, 10) if name in REAL else (5, 40)
        lats = interleaved_latencies_ms([session(p) for p in [fp32, *paths.values()]], {"input": b.x[:16]}, passes, runs)
        top1 = b.ref.argmax(1)
        judged = Judged(b)
        for method, path in paths.items():
            judged.add(method, path)
        for m, base in SAME_BITS:
            if m in paths and base in paths:
                comparisons.append({"model": name, "method": m, "base": base, **judged.versus(m, base)})
                print(json.dumps(comparisons[-1]), file=sys.stderr)
        rows.append({"model": name, "method": "fp32", "acc": float((top1 == b.y).mean()), "lat_ratio": 1.0,
                     "lat_ms": lats[0], "size_ratio": 1.0, "size_kb": fp32.stat().st_size / 1024,
                     "params_m": sum(int(np.prod(t.dims)) for t in onnx.load(fp32).graph.initializer) / 1e6})
        for (method, path), lat in zip(paths.items(), lats[1:], strict=True):
            got = b.logits(path)
            rows.append({"model": name, "method": method, "acc": float((got.argmax(1) == b.y).mean()),
                         "agree": float((got.argmax(1) == top1).mean()),
                         "sqnr": float(10 * np.log10((b.ref ** 2).sum() / ((got - b.ref) ** 2).sum())),
                         "norm": float(np.linalg.norm(got) / np.linalg.norm(b.ref)),
                         "lat_ms": lat, "lat_ratio": lat / lats[0], "size_kb": path.stat().st_size / 1024,
                         "size_ratio": path.stat().st_size / fp32.stat().st_size,
                         "kernels": integer_kernels_intact(path), "same_ops": (kernels(path) == kernels(paths["int8"])
                                                                               if "int8" in paths else None),
                         **extra[method]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"NUQ benchmark (`python benchmarks/bench_nuq.py`): {BATCH_NUM} calibration batches of 32, digits "
             "upsampled to 32x32 (3 channels for resnet18 / mobilenet_v2), accuracy on 500 held-out images, top-1 "
             "agreement with FP32 and logit SQNR against FP32 on the same images, logit norm: the quantized logits' L2 "
             "norm over FP32's (below 1: shrunk), deploy file size vs the FP32 file, "
             "ONNX Runtime latency at batch 16 with 2 threads (median of 5 interleaved passes of 40 runs, 3 of 10 for "
             "resnet18 / mobilenet_v2; shared host, quote the ratios). int5/int4: uniform 5/4-bit weights (stored as "
             "INT8 in the deploy file). Activations INT8 everywhere. auto-nuq 1pt: automatic NUQ, top-1 loss < 1 "
             "point (not run on the real-size models). Optimised graph = INT8's: the op types and counts ONNX Runtime "
             "runs are those of the uniform INT8 deploy model (the same kernels).\n"]
    lines += markdown_table(
        ["model", "method", "accuracy", "agreement", "logit SQNR dB", "logit norm", "size KB", "size vs FP32", "latency ms",
         "vs FP32", "integer kernels", "optimised graph = INT8's", "notes"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['agree']:.3f}" if "agree" in r else "-",
                         f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['norm']:.3f}" if "norm" in r else "-",
                         f"{r['size_kb']:.0f}",
                         f"{r['size_ratio']:.3f}x", f"{r['lat_ms']:.2f}", f"{r['lat_ratio']:.2f}x",
                         "-" if "kernels" not in r else ("yes" if r["kernels"] else "NO"),
                         "-" if r.get("same_ops") is None else ("yes" if r["same_ops"] else "no"),
                         (f"{r['evaluations']} eval_model calls (bound {r['bound']}); layers: "
                          + ", ".join(f"{v} {k}" for k, v in r["steps"].items() if v)) if "evaluations" in r
                         else f"{r['params_m']:.2f} M parameters" if "params_m" in r else ""])
    if comparisons:
        lines += ["", f"NUQ vs uniform weights of the same bits, paired on the same inputs: top-1 on the {len(b.y)} "
                  f"plain test digits and, on the {bench_adaround.LOW_MARGIN} lowest-FP32-margin of "
                  f"{bench_adaround.BLENDS} blends of two test digits (bench_adaround's), top-1 agreement with FP32 "
                  "and logit SQNR; [a, b]: 95% bootstrap interval (2000 resamples), d: NUQ minus uniform with the "
                  "paired interval, p: McNemar's exact test (two-sided).\n"]
        lines += markdown_table(
            ["model", "NUQ", "vs", "d top-1 (p)", "low-margin agreement NUQ", "uniform", "d agreement (p)",
             "low-margin SQNR dB NUQ", "uniform", "d SQNR dB"], comparisons,
            lambda c: [c["base"], _diff(c["top1"]), _ci(c["own_agree"]), _ci(c["base_agree"]), _diff(c["agree"]),
                       _ci(c["own_sqnr"], 1), _ci(c["base_sqnr"], 1), _diff(c["sqnr"], 1)])
    write_results("nuq", lines, args.append)


def _ci(v: tuple, digits: int = 3) -> str:
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def _diff(v: tuple, digits: int = 3) -> str:
    """A paired difference with its interval, and McNemar's p when there is one."""
    text = f"{v[0]:+.{digits}f} [{v[1]:+.{digits}f}, {v[2]:+.{digits}f}]"
    return text + (f" ({v[3]:.2g})" if len(v) > 3 else "")


if __name__ == "__main__":
    main()
