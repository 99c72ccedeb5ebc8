"""Peak memory and wall time of the PyTorch frontend on a big BERT-class model (issue 17, item 7), against
ONNX Runtime's quantize_static (MinMax, QDQ, per channel) of the model's ONNX export.

The model (generated from a seed, never stored): tests/real_models.py's BertForSequenceClassification with a
BERT-base vocabulary (30522) and ``--hidden`` / ``--layers`` (default 384 / 4: 80 MB of float32 weights),
exported with static shapes as the seed's call sequence does. Each method runs in its own child process
started by a parent that stays small (Linux carries a parent's RSS high-water mark into its children); each
child builds the model first, then the clock and the measurement start:

* ``omct``: create_quant_config, quantize_model, ``batches`` calibration forward passes, save_model;
* ``ort_minmax``: torch.onnx.export of the model to a file (the step a PyTorch user needs before ORT), then
  quantize_static on it;
* ``model``: only the imports and the model (the floor both share).

Peak RSS is the child's VmHWM, sampled after each step (it only grows, so the step where it jumps is the
one that needs the memory). Run by hand:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_bigmodel_pytorch.py            # ~80 MB model
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_bigmodel_pytorch.py --hidden 768 --layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # real_models lives with the tests

MB = 2**20
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def hwm() -> int:
    """This process's peak RSS in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def make_model(hidden: int, layers: int, vocab: int):
    import real_models
    import torch

    torch.manual_seed(0)
    return real_models.bert_mini(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                                 num_attention_heads=max(1, hidden // 64), intermediate_size=4 * hidden,
                                 max_position_embeddings=128, num_labels=2).eval()


def batches(vocab: int, count: int, rows: int, seq: int):
    import torch

    rng = np.random.default_rng(1)
    out = []
    for _ in range(count):
        ids = rng.integers(1, vocab, (rows, seq))
        mask = np.ones((rows, seq), np.int64)
        mask[:, seq * 3 // 4:] = rng.integers(0, 2, (rows, seq - seq * 3 // 4))
        out.append(tuple(torch.tensor(a) for a in (ids, mask, np.zeros((rows, seq), np.int64))))
    return out


def step(name: str, work: Path, args) -> None:
    """One method in this (child) process; prints its JSON line last."""
    import torch

    if name == "omct":
        import omct.pytorch as amct
        from omct.ui import set_quiet

        set_quiet()
    else:
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    model = make_model(args.hidden, args.layers, args.vocab)
    data = batches(args.vocab, args.batches, args.rows, args.seq)
    marks = [("model", 0.0, hwm())]
    start = time.perf_counter()

    def mark(what: str) -> None:
        marks.append((what, time.perf_counter() - start, hwm()))

    export = {"input_names": INPUTS, "output_names": ["logits"]}  # static shapes: no dynamic_axes
    if name == "omct":
        cfg, mod, rec = (str(work / n) for n in ("config.json", "modified.onnx", "record.txt"))
        amct.create_quant_config(cfg, model, data[0], batch_num=args.batches)
        mark("create_quant_config")
        cal = amct.quantize_model(cfg, mod, rec, model, data[0], **export)
        mark("quantize_model")
        with torch.no_grad():
            for b in data:
                cal(*b)
        mark("calibration")
        del cal
        amct.save_model(mod, rec, str(work / "omct"))
        mark("save_model")
    elif name == "ort_minmax":
        fp32 = work / "fp32.onnx"
        torch.onnx.export(model, data[0], str(fp32), dynamo=False, opset_version=17, **export)
        mark("torch.onnx.export")

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter({n: t.numpy() for n, t in zip(INPUTS, b, strict=True)} for b in data)

            def get_next(self):
                return next(self.it, None)

        quantize_static(str(fp32), str(work / "ort_deploy.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        mark("quantize_static")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"method": name, "wall_s": time.perf_counter() - start, "peak_rss": hwm(), "weights": weights,
                      "marks": marks}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=30522)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--methods", nargs="*", default=["model", "omct", "ort_minmax"])
    ap.add_argument("--work", type=Path, default=Path("/tmp/omct-bigbert"))
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        step(args.step, args.work, args)
        return
    import omct

    print(f"omct from {Path(omct.__file__).parent}", flush=True)
    try:
        for name in args.methods:
            shutil.rmtree(args.work, ignore_errors=True)
            args.work.mkdir(parents=True)
            cmd = [sys.executable, __file__, "--step", name, "--work", str(args.work)]
            for k in ("hidden", "layers", "vocab", "batches", "rows", "seq"):
                cmd += [f"--{k}", str(getattr(args, k))]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed ({out.returncode})\n{out.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            steps = ", ".join(f"{w} {t:.1f} s -> {m / MB:.0f} MB" for w, t, m in r["marks"])
            print(f"{name:12s} peak RSS {r['peak_rss'] / MB:6.0f} MB  wall {r['wall_s']:6.1f} s  weights "
                  f"{r['weights'] / MB:.0f} MB  [{steps}]", flush=True)
    finally:
        shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("OMCT_NUM_THREADS", "1")
    main()
