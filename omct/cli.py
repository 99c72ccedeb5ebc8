"""The ``omct`` command: the public API from a shell.

    omct demo                                   # the bundled example end to end
    omct inspect MODEL.onnx                     # quantizable layers, refusals with reasons
    omct quantize MODEL.onnx --calib DATA --out PREFIX [--config F.cfg|F.json] [--batch-num N] [--skip L ...]
    omct bench MODEL.onnx [QUANT.onnx]          # latency (median, p90) and size side by side
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from omct.errors import OmctError


def _load_batches(path: str, input_names: list[str], batch_size: int) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an .npz/.npy file or a folder of them (arrays keyed by input name, or one array)."""
    p = Path(path)
    if not p.exists():
        raise OmctError(f"calibration data '{p}' does not exist")
    files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy")) if p.is_dir() else [p]
    if not files:
        raise OmctError(f"calibration folder '{p}' has no .npz or .npy files")
    arrays: dict[str, list[np.ndarray]] = {n: [] for n in input_names}
    for f in files:
        try:
            data = np.load(f)
        except (OSError, ValueError) as e:
            raise OmctError(f"cannot read calibration file '{f}': {e}") from None
        if isinstance(data, np.ndarray):
            if len(input_names) != 1:
                raise OmctError(f"'{f}' holds one array but the model has inputs {input_names}; use an .npz keyed by input name")
            arrays[input_names[0]].append(data)
            continue
        keys = list(data.keys())
        for n in input_names:
            key = n if n in keys else (keys[0] if len(keys) == 1 and len(input_names) == 1 else None)
            if key is None:
                raise OmctError(f"'{f}' has arrays {keys} but no array named '{n}' (the model's input)")
            arrays[n].append(data[key])
    full = {n: np.concatenate(v) for n, v in arrays.items()}
    total = len(next(iter(full.values())))
    return [{n: a[i:i + batch_size] for n, a in full.items()} for i in range(0, total, batch_size)]


def _latency(path: Path, feeds: dict[str, np.ndarray], runs: int = 50, threads: int = 2) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


def cmd_quantize(args) -> int:
    import onnxruntime as ort

    import omct.onnx as amct

    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    del sess
    batches = _load_batches(args.calib, names, args.batch_size)
    batch_num = args.batch_num or len(batches)
    if batch_num > len(batches):
        raise OmctError(f"--batch-num {batch_num} needs {batch_num} batches of {args.batch_size}, but '{args.calib}' "
                        f"holds only {len(batches)}")
    out = Path(args.out)
    work = Path(str(out) + "_work")
    work.mkdir(parents=True, exist_ok=True)
    config = work / "config.json"
    if args.config and args.config.endswith(".json"):
        config = Path(args.config)
    else:
        cfg_text = None
        if args.algo and not args.config:
            cfg_text = f"batch_num: {batch_num}\ncommon_config {{ {args.algo}_quantize {{ }} }}\n" + "".join(
                f'skip_layers: "{s}"\n' for s in args.skip or [])
            (work / "algo.cfg").write_text(cfg_text)
        amct.create_quant_config(str(config), args.model, skip_layers=args.skip, batch_num=batch_num,
                                 config_defination=args.config or (str(work / "algo.cfg") if cfg_text else None))
    modified, record = work / "modified.onnx", work / "record.txt"
    amct.quantize_model(str(config), args.model, str(modified), str(record))
    calib = amct.CalibrationSession(str(modified))
    for feeds in batches[:calib.batch_num]:
        calib.run(None, feeds)
    amct.save_model(str(modified), str(record), str(out))
    print(f"{out}_fake_quant_model.onnx\n{out}_deploy_model.onnx")
    return 0


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    import omct.onnx as amct

    rep = amct.inspect_model(args.model)
    console = Console()
    console.print(f"{args.model}: opset {rep.opset}, {rep.parameters:,} parameters, "
                  f"{len(rep.layers)} quantizable layers, {len(rep.refused)} left in float")
    table = Table("layer", "type", "weight", "status")
    for s in rep.layers:
        table.add_row(s.name, s.op_type, s.weight or "-", "quantizable")
    for r in rep.refused:
        table.add_row(r.name, r.op_type, "-", f"float: {r.reason}")
    console.print(table)
    return 0


def cmd_bench(args) -> int:
    import onnxruntime as ort
    from rich.console import Console
    from rich.table import Table

    sess = ort.InferenceSession(args.models[0], providers=["CPUExecutionProvider"])
    feeds = {}
    for i in sess.get_inputs():
        shape = [d if isinstance(d, int) and d > 0 else args.batch_size for d in i.shape]
        feeds[i.name] = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    table = Table("model", "median ms", "p90 ms", "size KB", "vs first")
    first = None
    for m in args.models:
        med, p90 = _latency(Path(m), feeds, args.runs)
        first = first or med
        table.add_row(m, f"{med:.2f}", f"{p90:.2f}", f"{Path(m).stat().st_size / 1024:.0f}", f"{med / first:.2f}x")
    Console().print(table)
    return 0


def cmd_demo(args) -> int:
    import onnxruntime as ort

    import omct.onnx as amct
    from omct.examples import DIGITS_DATA, DIGITS_MODEL

    data = np.load(DIGITS_DATA)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="omct-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    model = str(DIGITS_MODEL)
    batch_num = 4
    t0 = time.perf_counter()
    amct.create_quant_config(str(out / "config.json"), model, batch_num=batch_num)
    amct.quantize_model(str(out / "config.json"), model, str(out / "modified.onnx"), str(out / "record.txt"))
    session = amct.CalibrationSession(str(out / "modified.onnx"))
    for i in range(batch_num):
        session.run(None, {"input": data["calibration"][i * 32:(i + 1) * 32]})
    amct.save_model(str(out / "modified.onnx"), str(out / "record.txt"), str(out / "digits"))
    ptq_s = time.perf_counter() - t0
    paths = {"FP32": Path(model), "fake-quant": out / "digits_fake_quant_model.onnx",
             "deploy INT8": out / "digits_deploy_model.onnx"}
    x, y = data["test_x"], data["test_y"]
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "accuracy", "size KB", "latency ms (batch 64, 2 threads)")
    for name, p in paths.items():
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        acc = float((s.run(None, {"input": x})[0].argmax(1) == y).mean())
        med, _ = _latency(p, {"input": x[:64]})
        table.add_row(name, f"{acc:.4f}", f"{p.stat().st_size / 1024:.0f}", f"{med:.2f}")
    console = Console()
    console.print(f"omct demo: digits CNN, {batch_num} calibration batches of 32, {len(y)} test images; "
                  f"quantized in {ptq_s:.1f} s; files in {out}")
    console.print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omct", description="Open model compression toolkit (AMCT-style quantization "
                                "for ONNX Runtime).", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: omct quantize model.onnx --calib calib.npz --out results/model")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or informational messages")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
    p.add_argument("--quiet", action="store_true", help="no progress bars or informational messages")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", parents=[common],
                       help="post-training quantization: config, calibration, fake-quant and deploy models")
    q.add_argument("model", help="FP32 ONNX model")
    q.add_argument("--calib", required=True, help=".npz/.npy file or folder of them; .npz arrays named by model input")
    q.add_argument("--out", required=True, help="output prefix: writes PREFIX_fake_quant_model.onnx and "
                   "PREFIX_deploy_model.onnx (and PREFIX_work/ with config, record, calibration model)")
    q.add_argument("--config", help="a simplified .cfg (AMCT text format) or a config.json")
    q.add_argument("--batch-num", type=int, help="calibration batches to run (default: all the data)")
    q.add_argument("--batch-size", type=int, default=32, help="samples per calibration batch (default 32)")
    q.add_argument("--skip", nargs="*", help="layer names to keep in float")
    q.add_argument("--algo", choices=["ifmr", "hfmg", "minmax", "percentile", "mse", "kl"],
                   help="activation calibration algorithm (default ifmr)")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", parents=[common], help="list quantizable layers and the ones left in float, with reasons")
    i.add_argument("model")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", parents=[common], help="ONNX Runtime latency (median, p90) and file size of models, side by side")
    b.add_argument("models", nargs="+")
    b.add_argument("--batch-size", type=int, default=1, help="value for dynamic dimensions (default 1)")
    b.add_argument("--runs", type=int, default=50)
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", parents=[common], help="quantize the bundled digits CNN and print FP32 vs fake-quant vs deploy")
    d.add_argument("--out", help="folder for the files (default: a temporary folder)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from omct.ui import set_quiet

    if args.quiet:
        set_quiet()
    try:
        return args.func(args)
    except OmctError as e:
        if args.debug:
            raise
        print(f"omct: error: {e}", file=sys.stderr)
        return 1
