"""PyTorch post-training quantization, side by side: omct.pytorch (IFMR, HFMG) vs NNCF's PyTorch PTQ
(``nncf.quantize`` on the nn.Module, ``nncf.strip``, exported with torch.onnx.export), on the models of
bench_ptq.py (same training, same calibration batches). Both deploy models run in ONNX Runtime.

Each quantization runs in its own child process (peak RSS is its own). Run by hand, not in CI:

    python benchmarks/bench_pytorch.py                 # writes benchmarks/results/pytorch.md
    python benchmarks/bench_pytorch.py --models resnet --methods omct-ifmr nncf
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ptq as ptq  # noqa: E402 - shares models, data and measurements with the ONNX benchmark

METHODS = ["omct-ifmr", "omct-hfmg", "nncf"]


def nncf_root(model):
    """NNCF 3.4's PyTorch backend breaks on a root nn.Sequential (it registers a hook-storage module that
    Sequential then calls), so the Sequential MobileNet is wrapped in a plain module for NNCF only."""
    from torch import nn

    if not isinstance(model, nn.Sequential):
        return model

    class Root(nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

    return Root(model).eval()


def quantize(method: str, name: str, out: Path, batch_num: int) -> Path:
    import torch

    model = ptq.torch_model(name)
    batches = [torch.tensor(b) for b in ptq.calib_batches(batch_num)]
    example = batches[0][:2]
    export = {"input_names": ["input"], "output_names": ["logits"],
              "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    deploy = Path(str(out) + "_deploy_model.onnx")
    if method.startswith("omct"):
        import omct.pytorch as amct
        from omct.ui import set_quiet

        set_quiet()
        cfg = out.with_suffix(".cfg")
        cfg.write_text(f"batch_num: {batch_num}\ncommon_config {{ {method[5:]}_quantize {{ }} }}\n")
        amct.create_quant_config(str(out) + ".json", model, example, config_defination=str(cfg))
        cal = amct.quantize_model(str(out) + ".json", str(out) + "_mod.onnx", str(out) + "_record.txt", model, example,
                                  **export)
        with torch.no_grad():
            for b in batches:
                cal(b)
        amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))
        return deploy
    if method == "nncf":
        import nncf

        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if name == "transformer" else {}
        q = nncf.quantize(nncf_root(model), nncf.Dataset(batches), subset_size=len(batches) * ptq.CALIB_BATCH, **kwargs)
        q = nncf.strip(q, example_input=example)
        torch.onnx.export(q, (example,), str(deploy), dynamo=False, opset_version=17, **export)
        return deploy
    raise ValueError(method)


def child(method: str, name: str, batch_num: int) -> None:
    import torch  # noqa: F401 - imported before the clock starts, for both methods alike

    out = ptq.WORK / f"pt_{name}_{method}_b{batch_num}"
    t = time.perf_counter()
    deploy = quantize(method, name, out, batch_num)
    wall = time.perf_counter() - t
    print(json.dumps({"method": method, "model": name, "wall_s": wall, "peak_rss_mb": ptq.peak_rss_mb(),
                      "deploy": str(deploy)}))


def run_child(method: str, name: str, batch_num: int) -> dict:
    return ptq.child_process(__file__, method, name, batch_num)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(ptq.MODELS))
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--batch-num", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3, help="quantize this many times; the median wall time is reported")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows = []
    for name in args.models:
        ptq.ensure_model(name)
        run_child(args.methods[0], name, args.batch_num)  # warm-up: NNCF compiles its torch extension once
        results = ptq.repeated_runs(run_child, name, args, rows)
        fp32 = ptq.model_path(name)
        lats = ptq.latencies_ms([fp32] + [Path(r["deploy"]) for r in results.values()])
        rows.append({"model": name, "method": "fp32 (ONNX)", "acc": ptq.accuracy(fp32), "lat_ms": lats[0], "lat_ratio": 1.0})
        for (method, r), lat in zip(results.items(), lats[1:], strict=True):
            rows.append({"model": name, "method": method, "acc": ptq.accuracy(Path(r["deploy"])),
                         "sqnr": ptq.logit_sqnr_db(name, Path(r["deploy"])), "lat_ms": lat,
                         "lat_ratio": lat / lats[0], "wall_s": r["wall_s"], "peak_rss_mb": r["peak_rss_mb"]})
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"PyTorch PTQ benchmark: {args.batch_num} calibration batches of {ptq.CALIB_BATCH}, digits at "
             f"{ptq.SIZE}x{ptq.SIZE}, "
             "deploy models exported to ONNX and run in ONNX Runtime (accuracy on 500 held-out images; latency at batch "
             f"16, 2 threads, median of interleaved passes); wall time (median of {args.repeat}) covers the whole flow "
             "including export, after `import torch`.\n",
             ]
    lines += ptq.markdown_table(
        ["model", "method", "accuracy", "logit SQNR dB", "latency ms", "vs FP32", "PTQ wall s", "peak RSS MB"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['lat_ms']:.2f}",
                         f"{r['lat_ratio']:.2f}x", f"{r.get('wall_s', 0):.2f}", f"{r.get('peak_rss_mb', 0):.0f}"])
    ptq.write_results("pytorch", lines)


if __name__ == "__main__":
    main()
