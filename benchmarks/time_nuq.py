"""Wall time of one NUQ quantization (bench_nuq's), with the GPTQ inverse as before ("old": np.linalg.inv of the
Cholesky factor) or now ("new": by triangular blocks), and the deploy model's logit SQNR (the same codes either way).

    python benchmarks/time_nuq.py resnet18 nuq32 old; python benchmarks/time_nuq.py resnet18 nuq32 new
"""
import sys, time
sys.path.insert(0, "benchmarks")
import numpy as np
import bench_nuq
from omct.core import gptq
if sys.argv[3] == "old":
    gptq.upper_triangular_inverse = lambda u, leaf=256: np.linalg.inv(u)
b = bench_nuq.bench_model(sys.argv[1])
t = time.perf_counter()
dst = bench_nuq.quantize(b, sys.argv[2])
print("wall", sys.argv[1:], round(time.perf_counter() - t, 1), "SQNR", round(float(10*np.log10((b.ref**2).sum()/((b.logits(dst)-b.ref)**2).sum())), 2), flush=True)
