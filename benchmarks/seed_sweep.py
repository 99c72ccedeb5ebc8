"""omct methods of bench_adaround.py over several learned-rounding sample seeds, optionally on rewritten copies of
a benchmark model (the same function, e.g. stream_equalization.py's): mean logit SQNR and agreement on the
benchmark's 1000 low-margin images (against the benchmark model's own FP32 logits) and logit SQNR on the 500 plain
test digits. The seed of each layer's input sample (``layer_seed``) is salted; salt 0 is the default's.

    python benchmarks/seed_sweep.py mobilenet_v2 0,a,b omct,omct-cle [MODEL.onnx ...]   # default: the model itself
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adaround as ba  # noqa: E402


def main() -> None:
    import omct.algorithms.adaround as oa
    from omct.core.adaround import layer_seed

    name, salts, methods = sys.argv[1], sys.argv[2].split(","), sys.argv[3].split(",")
    src = ba.ensure_model(name)
    _, _, xte, _ = ba.data()
    x = ba.low_margin_inputs(src, xte)
    ref, ref_test = ba.logits(src, x), ba.logits(src, xte)
    db = lambda r, g: 10 * np.log10((r ** 2).sum() / ((g - r) ** 2).sum())  # noqa: E731
    for f in [Path(p) for p in sys.argv[4:]] or [src]:
        for method in methods:
            sqnr, agree, test = [], [], []
            for salt in salts:
                suffix = "" if salt == "0" else salt
                oa.layer_seed = lambda n, s=suffix: layer_seed(n + s)
                dst = ba.quantize(method, f, ba.WORK / f"seeds_{f.stem}_{method}")
                got = ba.logits(dst, x)
                sqnr.append(db(ref, got))
                agree.append(float((got.argmax(1) == ref.argmax(1)).mean()))
                test.append(db(ref_test, ba.logits(dst, xte)))
            print(f"{f.stem:28s} {method:16s} SQNR {np.mean(sqnr):.2f} ({' '.join(f'{v:.2f}' for v in sqnr)})  "
                  f"agreement {np.mean(agree):.3f} ({' '.join(f'{v:.3f}' for v in agree)})  "
                  f"test-digit SQNR {np.mean(test):.2f}", flush=True)
    oa.layer_seed = layer_seed


if __name__ == "__main__":
    main()
