"""PTQ wall time and peak RSS only (no accuracy, no latency), omct against ONNX Runtime's quantize_static
(MinMax), through both frontends, for one or more omct checkouts side by side: the before/after of a change in
one run. Each quantization is a fresh child process of bench_ptq.py / bench_pytorch.py (the same measurement:
imports and data loading outside the clock, timed apart; ORT on the PyTorch side includes torch.onnx.export),
in interleaved rounds; ratios are taken against the ORT runs of the same rounds. Run by hand:

    python benchmarks/bench_ptq_wall.py --omct before=/work/main after=. --append
    python benchmarks/bench_ptq_wall.py --models resnet18 --frontends onnx --omct after=.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_ptq as ptq  # noqa: E402

SCRIPTS = {"onnx": HERE / "bench_ptq.py", "pytorch": HERE / "bench_pytorch.py"}


def run(frontend: str, method: str, name: str, batch_num: int, pythonpath: str, calib: bool = False) -> dict:
    """One child of the frontend's benchmark with omct from ``pythonpath``."""
    env = dict(os.environ, OMCT_QUIET="1", PYTHONPATH=str(Path(pythonpath).resolve()))
    cmd = [sys.executable, str(SCRIPTS[frontend]), "--child", ("calib:" if calib else "") + method, name, str(batch_num)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return {"error": (res.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=["resnet18", "mobilenet_v2", "efficientnet_lite", "bert"])
    ap.add_argument("--frontends", nargs="*", default=["onnx", "pytorch"], choices=list(SCRIPTS))
    ap.add_argument("--omct", nargs="+", default=["after=."], help="label=PYTHONPATH of each omct checkout")
    ap.add_argument("--method", default="omct-ifmr")
    ap.add_argument("--batch-num", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-calib-ratio", dest="calib_ratio", action="store_false")
    ap.add_argument("--calib-only", action="store_true", help="only the calib/fwd column (no PTQ wall runs)")
    ap.add_argument("--append", action="store_true", help="append the table to results/ptq.md as a dated section")
    args = ap.parse_args()
    versions = dict(v.split("=", 1) for v in args.omct)
    for name in args.models:
        ptq.ensure_model(name)
    ptq.compile_bytecode()
    lines = [f"PTQ wall time and peak RSS: {args.method} vs ONNX Runtime quantize_static (MinMax, QDQ, per channel), "
             f"{args.batch_num} calibration batches; each run a fresh process, median of {args.repeat} interleaved "
             "rounds (vs MinMax: over the ORT median of the same rounds), timed after the imports (import s, apart) "
             "and the data; PyTorch frontend: from the trained nn.Module, ORT's time including torch.onnx.export; "
             "peak RSS: the highest VmHWM of the rounds; calib/fwd (ONNX frontend): the CalibrationSession's runs "
             "over the batches against bare FP32 ONNX Runtime runs (medians of 7 interleaved rounds in one child, one child "
             "per checkout in every round, the median of the rounds' ratios; in brackets, where measured: the passes "
             "alone, without the records' computation at the last batch); PTQ CPU s: the process's CPU time over the same "
             "span (all its threads), median of the rounds, less sensitive to a shared host than the wall. omct: "
             + ", ".join(f"{k} = `{v}`" for k, v in versions.items()) + ".\n",
             "| frontend | model | omct | PTQ wall s | vs MinMax | import s | peak RSS MB | vs MinMax RSS | calib/fwd "
             "| PTQ CPU s | CPU vs MinMax |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for frontend in args.frontends:
        for name in args.models:
            rounds = []
            calib = frontend == "onnx" and args.calib_ratio
            for _ in range(args.repeat):
                skip = {"wall_s": float("nan"), "peak_rss_mb": float("nan")}
                r = {"ort": skip if args.calib_only else run(frontend, "ort-minmax", name, args.batch_num, ".")}
                for label, path in versions.items():  # calib/fwd too in every round, interleaved between checkouts
                    r[label] = skip if args.calib_only else run(frontend, args.method, name, args.batch_num, path)
                    if calib:
                        r["calib:" + label] = run(frontend, args.method, name, args.batch_num, path, calib=True)
                rounds.append(r)
            ort = [r["ort"] for r in rounds if "error" not in r["ort"]]
            ort_wall = float(np.median([r["wall_s"] for r in ort])) if ort else float("nan")
            ort_rss = max((r["peak_rss_mb"] for r in ort), default=float("nan"))
            ort_cpu = float(np.median([r.get("cpu_s", float("nan")) for r in ort])) if ort else float("nan")
            rows = [(label, [r[label] for r in rounds]) for label in versions] + [("ORT MinMax", ort)]
            for label, runs in rows:
                bad = [r for r in runs if "error" in r]
                if bad or not runs:
                    lines.append(f"| {frontend} | {name} | {label} | failed: {bad[0]['error'][:80] if bad else '-'} "
                                 "| | | | | | | |")
                    continue
                wall = float(np.median([r["wall_s"] for r in runs]))
                imp = float(np.median([r.get("import_s", 0.0) for r in runs]))
                rss = max(r["peak_rss_mb"] for r in runs)
                ratio = "-"
                if calib and label in versions:
                    cs = [r["calib:" + label] for r in rounds if "calib_s" in r["calib:" + label]]
                    ratio = f"{np.median([c['calib_s'] / c['forward_s'] for c in cs]):.2f}x" if cs else "failed"
                    if cs and all("passes_s" in c for c in cs):  # the passes alone (without the records' computation)
                        ratio += f" ({np.median([c['passes_s'] / c['forward_s'] for c in cs]):.2f}x)"
                if args.calib_only and label not in versions:
                    continue
                cells = "- | - | - | - | -" if args.calib_only else \
                    f"{wall:.2f} | {wall / ort_wall:.2f}x | {imp:.2f} | {rss:.0f} | {rss / ort_rss:.2f}x"
                cpu = float(np.median([r.get("cpu_s", float("nan")) for r in runs]))
                cpu_cells = "- | -" if args.calib_only or np.isnan(cpu) else f"{cpu:.2f} | {cpu / ort_cpu:.2f}x"
                lines.append(f"| {frontend} | {name} | {label} | {cells} | {ratio} | {cpu_cells} |")
            print("\n".join(lines[-len(rows):]), flush=True)
    if args.append:  # a dated section of results/ptq.md (never a fresh file: the other tables stay)
        ptq.write_results("ptq", lines, append=True)
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
