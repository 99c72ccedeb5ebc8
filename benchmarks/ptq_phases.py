"""Where one ONNX-frontend PTQ run spends its time, phase by phase (AMCT's call sequence as bench_ptq.quantize runs
it): each phase's wall time in a warm process, the minimum over ``--runs`` runs, plus the folders removed and the
BLAS limiter's calls. Run by hand, one checkout per call (``PYTHONPATH`` chooses it), side by side:

    PYTHONPATH=/work/main python benchmarks/ptq_phases.py omct-ifmr resnet18
    PYTHONPATH=. python benchmarks/ptq_phases.py omct-ifmr resnet18
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_ptq as ptq  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("method", help="an omct method of bench_ptq (omct-ifmr, omct-ifmr-nearest, ...)")
    ap.add_argument("model", help="a bench_ptq model (resnet18, mobilenet_v2, efficientnet_lite, bert, ...)")
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    ptq.ensure_model(args.model)
    ptq.import_method(args.method)
    import omct.onnx as amct
    import omct.onnx.api as api
    import omct.quantize as q
    import omct.workflow as wf
    from omct.algorithms.pipeline import PIPELINE
    from omct.graph import model_io
    from omct.ui import set_quiet

    set_quiet()
    acc: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(owner, attr: str, label: str) -> None:
        real = getattr(owner, attr)

        @functools.wraps(real)
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                acc[label] += time.perf_counter() - t
                calls[label] += 1

        setattr(owner, attr, wrapper)

    for owner, attr, label in [(amct, "create_quant_config", "1 create_quant_config"),
                               (amct, "quantize_model", "2 quantize_model"),
                               (api.CalibrationSession, "__init__", "3 CalibrationSession()"),
                               (q.CalibratingSession, "run", "4 runs, all"), (q, "run_views", "4a ONNX Runtime"),
                               (q.Calibration, "observe", "4b statistics"), (q, "update_pending_record", "4c pending record"),
                               (q.Calibration, "finish", "5 records"), (q, "write_record", "5z record file"),
                               (amct, "save_model", "6 save_model"), (wf, "read_modified", "6a read_modified"),
                               (wf, "check_save_outputs", "6b check_save_outputs"),
                               (q.QuantizedModel, "fake_quant_model", "6c build fake-quant"),
                               (q.QuantizedModel, "deploy_model", "6d build deploy"),
                               (model_io, "_commit", "6e rename into place"), (os, "rmdir", "os.rmdir")]:
        timed(owner, attr, label)
    for algorithm in PIPELINE:
        timed(algorithm, "apply", f"5 {algorithm.name}")
    limiter = q.one_blas_thread

    @contextlib.contextmanager
    def limited():
        t = time.perf_counter()
        with limiter():
            acc["4d BLAS limiter"] += time.perf_counter() - t
            calls["4d BLAS limiter"] += 1
            yield

    q.one_blas_thread = limited
    batches = ptq.calib_feeds(args.model, 8)
    out = ptq.WORK / f"{args.model}_{args.method}_phases"
    ptq.quantize(args.method, args.model, out, 8, batches)  # warm-up
    best: dict[str, float] = {}
    for _ in range(args.runs):
        acc.clear()
        calls.clear()
        t = time.perf_counter()
        ptq.quantize(args.method, args.model, out, 8, batches)
        acc["0 total"] = time.perf_counter() - t
        best = {k: min(best.get(k, float("inf")), v) for k, v in acc.items()}
    print(f"{args.method} {args.model} (omct from {Path(amct.__file__).parents[1]}), ms, min of {args.runs} warm runs")
    for key in sorted(best):
        print(f"{key:32s} {best[key] * 1000:8.1f}   x{calls.get(key, 1)}")


if __name__ == "__main__":
    main()
