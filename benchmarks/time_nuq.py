"""Wall time of one NUQ quantization (bench_nuq's), with the GPTQ inverse as before ("old": np.linalg.inv of the
Cholesky factor) or now ("new": by triangular blocks), and the deploy model's logit SQNR (the same codes either way).

    python benchmarks/time_nuq.py resnet18 nuq32 old; python benchmarks/time_nuq.py resnet18 nuq32 new
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nuq  # noqa: E402

from omct.core import gptq  # noqa: E402


def main() -> None:
    name, method, variant = sys.argv[1:4]
    if variant == "old":
        gptq.upper_triangular_inverse = lambda u, leaf=256: np.linalg.inv(u)
    b = bench_nuq.bench_model(name)
    t = time.perf_counter()
    dst = bench_nuq.quantize(b, method)
    wall = time.perf_counter() - t
    sqnr = 10 * np.log10((b.ref ** 2).sum() / ((b.logits(dst) - b.ref) ** 2).sum())
    print(f"{name} {method} {variant}: wall {wall:.1f} s, logit SQNR {sqnr:.2f} dB", flush=True)


if __name__ == "__main__":
    main()
