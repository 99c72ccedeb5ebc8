"""Wall time of one NUQ quantization (bench_nuq's) with the omct on PYTHONPATH, and the deploy model's logit SQNR:
run it once per tree for a before / after pair (one after the other, on the same host load).

    PYTHONPATH=/path/to/before python benchmarks/time_nuq.py resnet18 nuq32
    PYTHONPATH=/path/to/after python benchmarks/time_nuq.py resnet18 nuq32
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nuq  # noqa: E402

import omct  # noqa: E402


def main() -> None:
    name, method = sys.argv[1:3]
    b = bench_nuq.bench_model(name)
    t = time.perf_counter()
    dst = bench_nuq.quantize(b, method)
    wall = time.perf_counter() - t
    sqnr = 10 * np.log10((b.ref ** 2).sum() / ((b.logits(dst) - b.ref) ** 2).sum())
    print(f"{name} {method} ({Path(omct.__file__).parent.parent}): wall {wall:.1f} s, logit SQNR {sqnr:.2f} dB, "
          f"deploy {dst.stat().st_size / 1024:.0f} KB", flush=True)


if __name__ == "__main__":
    main()
