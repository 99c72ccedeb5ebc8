"""Issue 17 item 3: is a network's first convolution (3 input channels, where ONNX Runtime's QLinearConv can be
slower than its float kernel) faster kept float? Deploy latency of omct's all-integer model vs the same model with
the stem in float (``skip_layers``), FP32 and ORT quantize_static (uint8 activations) in interleaved passes.

    python benchmarks/bench_stem.py mobilenet_v2 narrow 32    # bench_ptq.py's trained narrow replica, 32x32
    python benchmarks/bench_stem.py resnet18 full 64          # bench_chains.py's full-width replica, 64x64

Prints accuracy / logit SQNR per model and latency ratios at batch 16 with 1 and 2 threads (results in
benchmarks/results/stem.md). Run by hand.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import bench_chains as bc  # noqa: E402 - shares the replicas and sessions with the chains benchmark
from bench_ptq import interleaved_latencies_ms  # noqa: E402


def deploy(src: Path, batches, tag: str, skip=()) -> Path:
    import omct.onnx.api as api
    from omct.formats.config import load_config
    from omct.onnx import create_quant_config

    cfg = bc.WORK / f"{tag}.json"
    create_quant_config(str(cfg), str(src), batch_num=len(batches), skip_layers=list(skip))
    out = bc.WORK / tag
    api.quantize(str(src), load_config(cfg), [{"input": b} for b in batches]).save(out)
    return Path(str(out) + "_deploy_model.onnx")


def main() -> None:
    import onnx

    name, full = sys.argv[1], sys.argv[2] == "full"
    bc.SIZE = int(sys.argv[3]) if len(sys.argv) > 3 else bc.SIZE
    bc.WORK.mkdir(parents=True, exist_ok=True)
    if full:
        src, train, test, labels = bc.build(name, full)
    else:  # bench_ptq.py's trained REAL_MODELS replica
        import bench_ptq as b

        b.ensure_model(name)
        tr, _, te, labels = b.split_feeds(name)
        src, train, test = b.model_path(name), tr["input"], te["input"]
    batches = [train[i * 32:(i + 1) * 32] for i in range(bc.CALIB)]
    stem = next(n.name for n in onnx.load(src).graph.node if n.op_type == "Conv")
    tag = f"stem_{name}_{sys.argv[2]}_{bc.SIZE}"
    models = {"FP32": src, "omct": deploy(src, batches, f"{tag}_int"),
              "omct stem float": deploy(src, batches, f"{tag}_float", [stem]), "ORT u8": bc.ort_deploy(src, batches)}
    ref = bc.session(src, 1).run(None, {"input": test})[0].astype(np.float64)
    for m, p in models.items():
        got = bc.session(p, 1).run(None, {"input": test})[0].astype(np.float64)
        sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - got) ** 2).sum()) if m != "FP32" else float("inf")
        print(f"{m}: accuracy {(got.argmax(1) == labels).mean():.3f}, logit SQNR {sqnr:.1f} dB")
    for threads in (1, 2):
        lat = interleaved_latencies_ms([bc.session(p, threads) for p in models.values()], {"input": test[:16]}, 7, 30,
                                       warmup=5)
        print(f"{name} {sys.argv[2]} {bc.SIZE}px batch 16, {threads} thread(s): " + ", ".join(
            f"{m} {v:.3f} ms ({v / lat[0]:.2f}x FP32, {v / lat[3]:.2f}x ORT)" for m, v in zip(models, lat, strict=True))
            + f"; stem float / all-integer {lat[2] / lat[1]:.2f}x", flush=True)


if __name__ == "__main__":
    main()
