"""Peak RSS by phase of one quantization (issue 17 item 7): where the memory goes, as a sampler thread reads
VmRSS every 0.5 ms and files it under the API call running at the time (import, create_quant_config,
quantize_model, each calibration batch, the records' computation at the last batch, save_model). ONNX frontend,
bench_ptq's models and methods; ORT's methods report only the import and the rest. Run by hand:

    python benchmarks/rss_phases.py omct-ifmr resnet18
    python benchmarks/rss_phases.py ort-minmax resnet18
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ptq  # noqa: E402 - the benchmark models, data and quantization calls


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    method, name = sys.argv[1], sys.argv[2]
    phase, peaks, done = ["start"], {}, threading.Event()

    def sample() -> None:
        while not done.is_set():
            r, p = rss_mb(), phase[0]
            peaks[p] = max(peaks.get(p, 0.0), r)
            time.sleep(0.0005)

    threading.Thread(target=sample, daemon=True).start()
    phase[0] = "import"
    bench_ptq.import_method(method)
    batches = bench_ptq.calib_feeds(name, 8)
    phase[0] = "quantize"
    if method.startswith("omct"):
        import omct.onnx as amct
        import omct.quantize

        def labelled(fn, label):
            def call(*a, **k):
                phase[0] = label
                try:
                    return fn(*a, **k)
                finally:
                    phase[0] = label + " (after)"
            return call

        for fn in ("create_quant_config", "quantize_model", "save_model"):
            setattr(amct, fn, labelled(getattr(amct, fn), fn))
        run, count = amct.CalibrationSession.run, [0]

        def batch(self, *a, **k):
            count[0] += 1
            phase[0] = f"calibration batch {count[0]}"
            return run(self, *a, **k)

        amct.CalibrationSession.run = batch
        omct.quantize.Calibration.finish = labelled(omct.quantize.Calibration.finish, "records (last batch)")
    bench_ptq.quantize(method, name, bench_ptq.WORK / f"{name}_{method}_rss_phases", 8, batches)
    time.sleep(0.01)
    done.set()
    for p, v in peaks.items():
        print(f"{p:28s} {v:7.1f} MB")


if __name__ == "__main__":
    main()
