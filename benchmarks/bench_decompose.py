"""Tensor decomposition, side by side: omct's auto_decomposition (per-layer form and rank, data-aware fit,
ONNX Runtime latency check) vs a plain truncated SVD (two-conv form only, weight SVD, same per-layer MAC
budget, no data, no latency check), on a torchvision-layout ResNet-18 (64-512 channels) trained here on the
benchmark digits (bench_ptq.data(), 32x32, as 3 channels). For each: parameters, conv MACs, ORT FP32 latency,
accuracy before and after a fine-tune of one epoch, then omct PTQ (INT8 deploy model): accuracy and latency.

Run by hand, not in CI:

    python benchmarks/bench_decompose.py                  # writes benchmarks/results/decompose.md
    python benchmarks/bench_decompose.py --budget 0.4 --epochs 6
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_ptq as ptq  # noqa: E402 - data, ORT sessions and latency measurement shared with the PTQ benchmark

WORK = ptq.WORK / "decompose"
FINETUNE_LR = 1e-4


def data3():
    d = ptq.data()
    return [np.repeat(a, 3, axis=1) if a.ndim == 4 else a for a in (d.x_train, d.y_train, d.x_test, d.y_test)]


def train(model, x, y, epochs: int, lr: float, seed: int = 0, batch: int = 64, freeze_bn: bool = False):
    """Adam with a cosine schedule; ``freeze_bn`` (the fine-tune): BatchNorm keeps its running statistics, which
    a few steps on small batches would otherwise overwrite."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    xt, yt = torch.tensor(x), torch.tensor(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = max(epochs, 1) * -(-len(xt) // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
    for _ in range(epochs):
        for idx in torch.randperm(len(xt)).split(batch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.tensor(x)).argmax(1).numpy() == y).mean())


def base_model(epochs: int):
    import real_models
    import torch

    WORK.mkdir(parents=True, exist_ok=True)
    state = WORK / f"resnet18_w64_e{epochs}.pt"
    model = real_models.resnet18(num_classes=10, width=64)
    if state.exists():
        model.load_state_dict(torch.load(state, weights_only=True))
        return model.eval()
    x, y, _, _ = data3()
    t = time.time()
    train(model, x, y, epochs, 2e-3)
    torch.save(model.state_dict(), state)
    print(f"trained resnet18 in {time.time() - t:.0f} s", file=sys.stderr)
    return model.eval()


def export(model, path: Path) -> Path:
    import torch

    torch.onnx.export(model.eval(), (torch.zeros(1, 3, ptq.SIZE, ptq.SIZE),), str(path), input_names=["input"],
                      output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                      opset_version=17, dynamo=False)
    return path


def conv_macs(path: Path) -> int:
    """Multiply-accumulates of the Conv nodes for one image (ONNX shape inference)."""
    import onnx

    m = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.value_info}
    shapes.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in m.graph.output})
    inits = {t.name: list(t.dims) for t in m.graph.initializer}
    total = 0
    for n in m.graph.node:
        if n.op_type == "Conv":
            out = shapes[n.output[0]]
            w = inits[n.input[1]]
            total += int(np.prod(out[1:])) * int(np.prod(w[1:]))
    return total


def quantize(model, out: Path, x) -> Path:
    import torch

    import omct.pytorch as amct

    batches = [torch.tensor(x[i * 32:(i + 1) * 32]) for i in range(8)]
    cfg = out.with_suffix(".json")
    amct.create_quant_config(str(cfg), model, batches[0], batch_num=len(batches))
    cal = amct.quantize_model(str(cfg), str(out) + "_mod.onnx", str(out) + "_rec.txt", model, batches[0],
                              input_names=["input"], output_names=["logits"])
    with torch.no_grad():
        for b in batches:
            cal(b)
    amct.save_model(str(out) + "_mod.onnx", str(out) + "_rec.txt", str(out))
    return Path(str(out) + "_deploy_model.onnx")


def ort_accuracy(path: Path, x, y) -> float:
    return float((ptq.session(path).run(None, {"input": x})[0].argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=6, help="training epochs of the original model")
    ap.add_argument("--budget", type=float, default=0.4, help="rank_budget: fraction of each layer's MACs kept")
    ap.add_argument("--finetune-epochs", type=float, default=1.0)
    args = ap.parse_args()
    import torch

    import omct.pytorch as amct
    from omct.ui import set_quiet

    torch.set_num_threads(1)
    x, y, xt, yt = data3()
    base = base_model(args.epochs)
    calib = torch.tensor(x[:256])
    rows = []
    variants = {"original": None,
                "omct": dict(rank_budget=args.budget, latency_batch=16),
                "truncated SVD": dict(rank_budget=args.budget, forms=("svd",), data_aware=False, check_latency=False)}
    models = {}
    for name, kwargs in variants.items():
        m = copy.deepcopy(base)
        t = time.time()
        changes = {}
        if kwargs is not None:
            set_quiet(False)
            m, changes = amct.auto_decomposition(m, WORK / f"{name.replace(' ', '_')}_info.json", input_data=calib, **kwargs)
            set_quiet()
        secs = time.time() - t
        acc0 = accuracy(m, xt, yt)
        if kwargs is not None and args.finetune_epochs > 0:
            n = int(len(x) * args.finetune_epochs)
            train(m, x[:n], y[:n], 1, FINETUNE_LR, seed=1, freeze_bn=True)
        models[name] = m
        rows.append({"name": name, "layers": len(changes), "secs": secs, "acc0": acc0, "acc1": accuracy(m, xt, yt),
                     "params": sum(p.numel() for p in m.parameters())})
        print(rows[-1], file=sys.stderr)
    paths, deploys = [], []
    for r in rows:
        tag = r["name"].replace(" ", "_")
        p = export(models[r["name"]], WORK / f"{tag}_fp32.onnx")
        paths.append(p)
        r["macs"] = conv_macs(p)
        d = quantize(models[r["name"]], WORK / f"{tag}_int8", x)
        deploys.append(d)
        r["acc_int8"] = ort_accuracy(d, xt, yt)
        r["acc_fp32_ort"] = ort_accuracy(p, xt, yt)
    lats = ptq.interleaved_latencies_ms([ptq.session(p) for p in paths + deploys], {"input": xt[:16]}, 5, 40)
    for i, r in enumerate(rows):
        r["lat"], r["lat_int8"] = lats[i], lats[len(rows) + i]
    o = rows[0]
    lines = [f"Decomposition benchmark: torchvision-layout ResNet-18 (width 64: 64-512 channels) trained {args.epochs} "
             f"epochs on digits {ptq.SIZE}x{ptq.SIZE} (3 channels), accuracy on 500 held-out images; rank_budget "
             f"{args.budget} per layer for both methods; fine-tune: {args.finetune_epochs:g} epoch, Adam lr {FINETUNE_LR} "
             "(cosine), BatchNorm statistics frozen; "
             "INT8: omct PTQ (8 batches of 32, IFMR) of the fine-tuned model. ORT latency at batch 16, 2 threads, "
             "median of 5 interleaved passes; the host was shared with other jobs, so compare ratios.\n",
             "| model | layers decomposed | params | conv MMACs | conv MACs vs orig | FP32 ms | FP32 speed-up | "
             "acc before FT | acc after FT | INT8 acc | INT8 ms | INT8 speed-up vs orig INT8 | decompose s |",
             "|" + "---|" * 13]
    for r in rows:
        lines.append(f"| {r['name']} | {r['layers']} | {r['params'] / 1e6:.2f} M | {r['macs'] / 1e6:.1f} | "
                     f"{r['macs'] / o['macs']:.2f}x | {r['lat']:.2f} | {o['lat'] / r['lat']:.2f}x | {r['acc0']:.3f} | "
                     f"{r['acc1']:.3f} | {r['acc_int8']:.3f} | {r['lat_int8']:.2f} | {o['lat_int8'] / r['lat_int8']:.2f}x | "
                     f"{r['secs']:.1f} |")
    lines.append("\n`acc before FT` of the original is its accuracy; `acc after FT` of the original is the same model "
                 "(not fine-tuned). AIMET's spatial SVD was not run: aimet-torch 2.42 requires torch 2.14.1 and the CUDA wheels "
                 "(pip's resolver), which would replace the pinned torch 2.13.0.")
    ptq.write_results("decompose", lines)


if __name__ == "__main__":
    main()
