"""PyTorch post-training quantization, side by side: omct.pytorch (IFMR, HFMG) vs NNCF's PyTorch PTQ
(``nncf.quantize`` on the nn.Module, ``nncf.strip``, exported with torch.onnx.export), on the models of
bench_ptq.py (same training, same calibration batches). Both deploy models run in ONNX Runtime.

Each quantization runs in its own child process (peak RSS is its own). Run by hand, not in CI:

    python benchmarks/bench_pytorch.py                 # writes benchmarks/results/pytorch.md
    python benchmarks/bench_pytorch.py --models resnet --methods omct-ifmr nncf
    python benchmarks/bench_pytorch.py --models resnet18 mobilenet_v2 efficientnet_lite bert \
        --methods omct-ifmr ort-minmax ort-minmax-u8 --append  # real-model replicas; ort-*: quantize_static of the export
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
#: ORT quantize_static's (MinMax) deploy model of the FP32 ONNX export, the reference for deploy latency and PTQ wall time
ORT = "ort-minmax"


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


def inputs(name: str, batch_num: int):
    """The trained nn.Module and its calibration batches as tensors: what a user has before quantizing."""
    import torch

    model = ptq.torch_model(name)
    return model, [tuple(torch.tensor(v) for v in b.values()) for b in ptq.calib_feeds(name, batch_num)]


def quantize(method: str, name: str, out: Path, batch_num: int, model=None, batches=None) -> Path:
    """Quantize the nn.Module of ``name`` with ``method``. ORT methods start from the module too: they export
    it with torch.onnx.export (the call a PyTorch user makes first), then run quantize_static on the export."""
    import torch

    if model is None:
        model, batches = inputs(name, batch_num)
    if name == "bert":  # static shapes, no dynamic_axes: the seed's call sequence
        example = batches[0]
        export = {"input_names": ptq.BERT_INPUTS, "output_names": ["logits"]}
    else:
        example = batches[0][0][:2]
        export = {"input_names": ["input"], "output_names": ["logits"],
                  "dynamic_axes": {"input": {0: "batch"}, "logits": {0: "batch"}}}
    if method.endswith("-static"):  # quantize_model with every shape static (dynamic_axes={}; issue 17 item 2)
        export = {**export, "dynamic_axes": {}}
        method = method[: -len("-static")]
    deploy = Path(str(out) + "_deploy_model.onnx")
    if method.startswith("ort"):
        fp32 = Path(str(out) + "_fp32.onnx")
        torch.onnx.export(model, example, str(fp32), dynamo=False, opset_version=17, **export)
        feeds = [dict(zip(export["input_names"], (t.numpy() for t in b), strict=True)) for b in batches]
        return ptq.quantize(method, name, out, batch_num, feeds, src=fp32)
    if method.startswith("omct"):
        import omct.pytorch as amct
        from omct.ui import set_quiet

        set_quiet()
        cfg = out.with_suffix(".cfg")
        nearest = "learned_rounding: false\n" if method.endswith("-nearest") else ""  # as bench_ptq.prepare_omct
        cfg.write_text(f"batch_num: {batch_num}\n{nearest}common_config {{ {ptq.omct_method(method)}_quantize {{ }} }}\n")
        amct.create_quant_config(str(out) + ".json", model, example, config_defination=str(cfg))
        cal = amct.quantize_model(str(out) + ".json", str(out) + "_mod.onnx", str(out) + "_record.txt", model, example,
                                  **export)
        with torch.no_grad():
            for b in batches:
                cal(*b)
        amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))
        return deploy
    if method == "nncf":
        import nncf

        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if name in ("transformer", "bert") else {}
        q = nncf.quantize(nncf_root(model), nncf.Dataset(batches), subset_size=len(batches) * ptq.batch_size(name), **kwargs)
        q = nncf.strip(q, example_input=example)
        args = example if isinstance(example, tuple) else (example,)
        torch.onnx.export(q, args, str(deploy), dynamo=False, opset_version=17, **export)
        return deploy
    raise ValueError(method)


def child(method: str, name: str, batch_num: int) -> None:
    import torch  # noqa: F401 - imported before the clock starts, for every method alike

    out = ptq.WORK / f"pt_{name}_{method}_b{batch_num}"
    t = time.perf_counter()
    if method.startswith("omct"):
        import onnxruntime  # noqa: F401 - imported by omct with its first session; ORT's import has it too

        import omct.pytorch  # noqa: F401
    else:
        ptq.import_method(method)
    import_s = time.perf_counter() - t
    model, batches = inputs(name, batch_num)  # the user's model and data, before the clock starts
    t, cpu = time.perf_counter(), time.process_time()
    deploy = quantize(method, name, out, batch_num, model, batches)
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu  # every thread of the process (as bench_ptq.child): steadier on a shared host
    print(json.dumps({"method": method, "model": name, "wall_s": wall, "cpu_s": cpu, "import_s": import_s,
                      "peak_rss_mb": ptq.peak_rss_mb(), "deploy": str(deploy)}))


def run_child(method: str, name: str, batch_num: int) -> dict:
    return ptq.child_process(__file__, method, name, batch_num)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(ptq.MODELS), choices=[*ptq.MODELS, *ptq.REAL_MODELS])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--batch-num", type=int, default=8)
    ptq.append_flag(ap)
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
        lats = ptq.latencies_ms([fp32] + [Path(r["deploy"]) for r in results.values()],
                                ptq.timed_batch(name, args.latency_batch), passes=args.passes, name=name)
        by_method = dict(zip(results, lats[1:], strict=True))
        size = fp32.stat().st_size
        rows.append({"model": name, "method": "fp32 (ONNX)", "acc": ptq.accuracy(fp32, name), "lat_ms": lats[0],
                     "lat_ratio": 1.0, "size_kb": size / 1024, "size_ratio": 1.0})
        for (method, r), lat in zip(results.items(), lats[1:], strict=True):
            deploy = Path(r["deploy"])
            rows.append({"model": name, "method": method, "acc": ptq.accuracy(deploy, name),
                         "sqnr": ptq.logit_sqnr_db(name, deploy), "lat_ms": lat, "vs_ort": ptq.ort_ratio(lat, by_method),
                         "lat_ratio": lat / lats[0], "wall_s": r["wall_s"], "import_s": r["import_s"],
                         "peak_rss_mb": r["peak_rss_mb"],
                         "size_kb": deploy.stat().st_size / 1024, "size_ratio": deploy.stat().st_size / size})
            if ORT in results:
                rows[-1]["wall_ratio"] = r["wall_s"] / results[ORT]["wall_s"]
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines = [f"PyTorch PTQ benchmark: {args.batch_num} calibration batches of {ptq.CALIB_BATCH}, digits at "
             f"{ptq.SIZE}x{ptq.SIZE}, "
             "deploy models exported to ONNX and run in ONNX Runtime (accuracy on 500 held-out images; latency at batch "
             f"{args.latency_batch} (bert: 16), 2 threads, median of {args.passes} interleaved passes); wall time (median of "
             f"{args.repeat}, each in a fresh process) covers the whole flow from the trained nn.Module and the "
             "calibration tensors to the deploy model, after the imports (`import torch` and the method's, timed apart in "
             "import s); ort-minmax: torch.onnx.export of the module, then ONNX Runtime quantize_static (QDQ, per-channel, "
             "MinMax; -u8: uint8 activations) of that export (both in its wall time), the reference for vs ORT QDQ "
             "(latency over the faster ORT "
             "model, same interleaved passes) and vs MinMax "
             "(PTQ wall time); bert: exported with static shapes (batch 16, no dynamic_axes).\n",
             ]
    lines += ptq.markdown_table(
        ["model", "method", "accuracy", "logit SQNR dB", "latency ms", "vs FP32", "vs ORT QDQ", "PTQ wall s", "vs MinMax",
         "import s", "peak RSS MB", "size KB", "size vs FP32"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['lat_ms']:.2f}",
                         f"{r['lat_ratio']:.2f}x", r.get("vs_ort", "-"), f"{r.get('wall_s', 0):.2f}",
                         f"{r['wall_ratio']:.2f}x" if "wall_ratio" in r else "-",
                         f"{r['import_s']:.2f}" if "import_s" in r else "-", f"{r.get('peak_rss_mb', 0):.0f}",
                         f"{r['size_kb']:.0f}", f"{r['size_ratio']:.3f}x"])
    ptq.write_results("pytorch", lines, args.append)


if __name__ == "__main__":
    main()
