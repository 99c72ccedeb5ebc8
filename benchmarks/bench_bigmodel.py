"""Peak memory and wall time of the ONNX flow on a big model stored with external data (issue 17, item 7).

The model (generated, never stored in the repository): ``layers`` MatMul + Relu of ``dim x dim`` float32 weights,
written with numpy straight into the external-data file (building it needs one layer's memory). Each step runs
in its own child process started by a parent that stays small (Linux carries the parent's RSS high-water mark into a child),
which reports its peak RSS (``ru_maxrss``) and wall time:

* ``create_quant_config``, ``quantize_model``, ``calibration`` (a CalibrationSession over ``batches`` batches of
  ``rows``), ``save_model``: AMCT's file-based call sequence;
* ``quantize+save``: the in-memory ``omct.onnx.quantize`` then ``result.save``;
* ``ort_minmax`` (optional): ONNX Runtime's ``quantize_static`` (MinMax, QDQ, per-channel) on the same model.

Run the omct under test through PYTHONPATH (e.g. /work/main for "before"), by hand:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_bigmodel.py --dim 2896 --work /tmp/big  # ~300 MB
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_bigmodel.py --dim 8192 --work /tmp/big  # 2.25 GiB

The work folder is deleted at the end (``--keep`` keeps it).
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

GIB = 2**30


def build(folder: Path, dim: int, layers: int, seed: int = 0, inline: bool = False) -> Path:
    """Write ``model.onnx`` and ``model.onnx.data`` into ``folder``, one weight at a time (``inline``: then
    rewrite it as one file without external data)."""
    import onnx
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    data = folder / "model.onnx.data"
    nbytes = dim * dim * 4
    inits, nodes, x = [], [], "x"
    with open(data, "wb") as f:
        f.truncate(nbytes * layers)
    for i in range(layers):
        w = np.memmap(data, np.float32, "r+", offset=i * nbytes, shape=(dim, dim))
        for r in range(0, dim, 1024):  # a few MB at a time
            w[r:r + 1024] = rng.standard_normal((min(1024, dim - r), dim), np.float32) * np.float32(1.5 / np.sqrt(dim))
        w.flush()
        del w
        t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[dim, dim], data_location=TensorProto.EXTERNAL)
        for k, v in (("location", data.name), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            t.external_data.add(key=k, value=v)
        inits.append(t)
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"mm{i}"], name=f"matmul{i}"),
                  helper.make_node("Relu", [f"mm{i}"], [f"h{i}"], name=f"relu{i}")]
        x = f"h{i}"
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dim])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    if inline:  # the same model in one file (protobuf's 2 GiB limit): this needs the model's size in memory
        model = onnx.load(str(folder / "model.onnx"))
        data.unlink()
        onnx.save(model, str(folder / "model.onnx"))
    return folder / "model.onnx"


def batches(dim: int, count: int, rows: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((rows, dim), np.float32)} for _ in range(count)]


def step(name: str, folder: Path, dim: int, count: int, rows: int) -> None:
    """One step in this (child) process; prints its JSON line last."""
    import resource

    start = time.perf_counter()
    model, cfg, mod, rec = (str(folder / n) for n in ("model.onnx", "config.json", "modified.onnx", "record.txt"))
    if name == "ort_minmax":
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(batches(dim, count, rows))

            def get_next(self):
                return next(self.it, None)

        quantize_static(model, str(folder / "ort_deploy.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        use_external_data_format=True)
    else:
        import omct.onnx as amct
        from omct.ui import set_quiet

        set_quiet()
        if name == "create_quant_config":
            amct.create_quant_config(cfg, model, batch_num=count)
        elif name == "quantize_model":
            amct.quantize_model(cfg, model, mod, rec)
        elif name == "calibration":
            session = amct.CalibrationSession(mod)
            for feeds in batches(dim, count, rows):
                session.run(None, feeds)
        elif name == "save_model":
            amct.save_model(mod, rec, str(folder / "file"))
        elif name == "quantize+save":
            from omct.formats.config import load_config

            amct.quantize(model, load_config(cfg), batches(dim, count, rows)).save(str(folder / "memory"))
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps({"step": name, "wall_s": round(wall, 2), "peak_rss": peak}))


def outputs(folder: Path, prefix: str) -> int:
    return sum(p.stat().st_size for p in folder.glob(prefix + "*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=2896)
    ap.add_argument("--layers", type=int, default=9)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--work", type=Path, default=Path("/tmp/omct-bigmodel"))
    ap.add_argument("--ort", action="store_true", help="also run ONNX Runtime's quantize_static (MinMax)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--inline", action="store_true", help="store the model in one file, without external data")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        step(args.step, args.work, args.dim, args.batches, args.rows)
        return
    if args.build:
        build(args.work, args.dim, args.layers, inline=args.inline)
        return
    import omct

    steps = ["create_quant_config", "quantize_model", "calibration", "save_model", "quantize+save"]
    steps += ["ort_minmax"] if args.ort else []
    try:
        t = time.perf_counter()
        # built in a child: Linux carries a process's RSS high-water mark into the children it starts (fork, then
        # exec), so this process stays small and each step's ru_maxrss is its own
        subprocess.run([sys.executable, __file__, "--build", "--work", str(args.work), "--dim", str(args.dim),
                        "--layers", str(args.layers)] + (["--inline"] if args.inline else []), check=True)
        stored = "one file" if args.inline else "external data"
        size = sum(p.stat().st_size for p in args.work.glob("model.onnx*"))
        print(f"omct from {Path(omct.__file__).parent}; model {size / GIB:.3f} GiB ({args.layers} x {args.dim}^2 "
              f"MatMul+Relu, {stored}) built in {time.perf_counter() - t:.1f} s; {args.batches} batches of {args.rows}",
              flush=True)
        rows = []
        for name in steps:
            out = subprocess.run([sys.executable, __file__, "--step", name, "--work", str(args.work), "--dim",
                                  str(args.dim), "--batches", str(args.batches), "--rows", str(args.rows)],
                                 capture_output=True, text=True)
            if out.returncode:
                print(f"{name}: failed ({out.returncode})\n{out.stderr[-3000:]}", flush=True)
                rows.append({"step": name, "failed": True})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["peak_over_model"] = r["peak_rss"] / size
            rows.append(r)
            print(f"{name:20s} peak RSS {r['peak_rss'] / GIB:6.2f} GiB ({r['peak_over_model']:.2f}x model)  "
                  f"wall {r['wall_s']:7.1f} s", flush=True)
        print(f"outputs: modified model {outputs(args.work, 'modified') / GIB:.3f} GiB, file-flow fake-quant+deploy "
              f"{outputs(args.work, 'file_') / GIB:.3f} GiB, in-memory fake-quant+deploy "
              f"{outputs(args.work, 'memory_') / GIB:.3f} GiB; bound 2x model + 300 MB = "
              f"{(2 * size + 300e6) / GIB:.2f} GiB")
    finally:
        if not args.keep:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
