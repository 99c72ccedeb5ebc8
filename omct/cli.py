"""The ``omct`` command: the public API from a shell.

    omct demo                                   # the bundled example end to end
    omct inspect MODEL.onnx                     # quantizable layers, refusals with reasons
    omct quantize MODEL.onnx --calib DATA --out PREFIX [--config F.cfg|F.json] [--batch-num N] [--skip L ...] [--algo A]
    omct analyze FLOAT.onnx QUANT.onnx --data DATA   # per-layer error table and HTML report
    omct bench MODEL.onnx [QUANT.onnx]          # latency (median, p90) and size side by side
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from omct._version import __version__
from omct.core.calibrators import CALIBRATORS
from omct.core.nuq import ALLOWED_STEPS
from omct.errors import OmctError
from omct.fileio import atomic_write_text, check_outputs
from omct.ui import logger

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def _load_images(files: list[Path], shape: list, args) -> np.ndarray:
    """Images -> one float32 array in the model's layout, with the preprocessing the options give."""
    try:
        from PIL import Image
    except ImportError:
        raise OmctError("reading images needs Pillow: pip install 'omct[report]' (or pip install pillow)") from None
    layout = args.layout
    dims = [d if isinstance(d, int) and d > 0 else None for d in shape]
    channels_dim = 1 if layout == "nchw" else 3
    channels = dims[channels_dim] if len(dims) == 4 else None
    if args.image_size:
        h, w = (args.image_size * 2)[:2]
    elif len(dims) == 4 and all(dims[i] for i in ((2, 3) if layout == "nchw" else (1, 2))):
        h, w = (dims[2], dims[3]) if layout == "nchw" else (dims[1], dims[2])
    else:
        raise OmctError("the model's input size is not fixed: give --image-size H W")
    gray = args.grayscale or channels == 1
    mean = np.array(args.mean, np.float32).reshape(-1, 1, 1)
    std = np.array(args.std, np.float32).reshape(-1, 1, 1)
    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("L" if gray else "RGB").resize((w, h), Image.BILINEAR)
                a = np.asarray(im, np.float32)
        except OSError as e:
            raise OmctError(f"cannot read image '{f}': {e}") from None
        a = (a[None] if gray else a.transpose(2, 0, 1)) * args.scale
        a = (a - mean) / std
        out.append(a if layout == "nchw" else a.transpose(1, 2, 0))
    return np.stack(out).astype(np.float32)


def _batch_size(args, inputs: list) -> int:
    """--batch-size, else the batch the model fixes, else 32; a --batch-size the model cannot take is refused."""
    from omct.feeds import fixed_batch

    fixed = fixed_batch(inputs)
    if args.batch_size is None:
        return fixed or 32
    if args.batch_size < 1:
        raise OmctError(f"--batch-size must be >= 1, got {args.batch_size}")
    if fixed is not None and args.batch_size != fixed:
        raise OmctError(f"the model's batch dimension is fixed at {fixed}; --batch-size {args.batch_size} cannot run: "
                        f"leave --batch-size out (it defaults to {fixed}) or export the model with a dynamic batch axis")
    return args.batch_size


def _load_batches(path: str, inputs: list, args, option: str) -> list[dict[str, np.ndarray]]:
    """Feeds from an .npz/.npy file, a folder of them (arrays keyed by input name, or one array), or a folder
    of images (one-input models; preprocessing from the image options), checked against the model's inputs
    (``inputs``: ONNX Runtime's ``get_inputs()``) before anything runs."""
    from omct.feeds import FeedCheck, fixed_batch

    input_names = [i.name for i in inputs]
    batch_size = _batch_size(args, inputs)
    p = Path(path)
    if not p.exists():
        raise OmctError(f"{option} '{p}' does not exist")
    images = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) if p.is_dir() else []
    if images:
        if len(inputs) != 1:
            raise OmctError(f"a folder of images feeds one input, but the model has inputs {input_names}")
        full = {input_names[0]: _load_images(images, list(inputs[0].shape), args)}
    else:
        full = _load_arrays(p, input_names)
    total = len(next(iter(full.values())))
    if fixed_batch(inputs) and total % batch_size:
        logger.info("the model's batch is fixed at %d: the last %d of %d samples in %s are not used", batch_size,
                    total % batch_size, total, p)
        total -= total % batch_size
    check = FeedCheck(inputs, f"{option} '{p}'")
    return [check.check({n: a[i:i + batch_size] for n, a in full.items()}) for i in range(0, total, batch_size)]


def _load_arrays(p: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    files = sorted(f for f in p.iterdir() if f.suffix in (".npz", ".npy")) if p.is_dir() else [p]
    if not files:
        raise OmctError(f"folder '{p}' has no .npz, .npy or image files")
    arrays: dict[str, list[np.ndarray]] = {n: [] for n in input_names}
    for f in files:
        try:
            data = np.load(f)
        except (OSError, ValueError) as e:
            raise OmctError(f"cannot read data file '{f}': {e}") from None
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
            if key != n:
                logger.warning("'%s' holds one array, '%s', and the model's input is '%s': used it by position", f, key, n)
            arrays[n].append(data[key])
    return {n: np.concatenate(v) for n, v in arrays.items()}


def _model_path(model: str, what: str = "model") -> str:
    """The same one line for every command: a missing file or a folder given for a model."""
    p = Path(model)
    if not p.exists():
        raise OmctError(f"{what} file '{p}' does not exist")
    if p.is_dir():
        raise OmctError(f"{what} path '{p}' is a folder; give the .onnx file")
    return model


def _model_inputs(model: str, what: str = "model") -> list:
    """ONNX Runtime's view of the model's inputs (name, shape, type)."""
    import onnxruntime as ort

    _model_path(model, what)
    try:
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise OmctError(f"cannot load {what} '{model}' in ONNX Runtime: {str(e).splitlines()[0]}") from None
    return sess.get_inputs()


def _latency(path: Path, feeds: dict[str, np.ndarray], runs: int = 50, threads: int = 2) -> tuple[float, float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    try:
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise OmctError(f"cannot load '{path}' in ONNX Runtime: {str(e).splitlines()[0]}") from None
    for _ in range(5):
        sess.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, feeds)
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times)), float(np.percentile(times, 90))


def cmd_quantize(args) -> int:
    from omct.graph.model_io import input_files, output_files

    _model_path(args.model)
    if args.skip is not None and not args.skip:
        logger.warning("--skip was given no layer names; nothing is skipped (list them: --skip NAME [NAME ...])")
    out = _out_prefix(args.out, args.model)
    work = Path(str(out) + "_work")
    own_config = bool(args.config and args.config.endswith(".json"))
    config = Path(args.config) if own_config else work / "config.json"
    written = ["record.txt"] + ["config.json"] * (not own_config or bool(args.algo) or bool(args.nuq_steps))
    check_outputs({**input_files("model", args.model), "--calib": args.calib, "--config": args.config},
                  {**{f"--out's {n}": work / n for n in written}, **output_files("--out's modified.onnx", work / "modified.onnx"),
                   **output_files("--out's fake-quant model", f"{out}_fake_quant_model.onnx"),
                   **output_files("--out's deploy model", f"{out}_deploy_model.onnx")})
    inputs = _model_inputs(args.model)
    batches = _load_batches(args.calib, inputs, args, "--calib")
    batch_num = args.batch_num or len(batches)
    if batch_num > len(batches):
        raise OmctError(f"--batch-num {batch_num} needs {batch_num} batches of {_batch_size(args, inputs)}, but "
                        f"'{args.calib}' holds only {len(batches)}")
    created = not work.exists()
    try:
        work.mkdir(parents=True, exist_ok=True)
        _quantize_into(args, work, config, own_config, batches, batch_num, out)
    except BaseException:
        if created and not args.keep_work:  # a failed run leaves no half-made work folder behind
            shutil.rmtree(work, ignore_errors=True)
        elif work.exists():
            logger.warning("kept %s (the config, record and calibration model of the failed run)", work)
        raise
    print(f"{out}_fake_quant_model.onnx\n{out}_deploy_model.onnx")
    return 0


def _out_prefix(out: str, model: str) -> Path:
    """--out as people mean it: a folder (an existing one, or a path ending in '/') gets files named after the
    model; a name ending in .onnx is the prefix without it."""
    if out.endswith(("/", os.sep)) or Path(out).is_dir():
        return Path(out) / Path(model).stem
    return Path(out[:-len(".onnx")]) if out.endswith(".onnx") else Path(out)


def _quantize_into(args, work: Path, config: Path, own_config: bool, batches: list, batch_num: int, out: Path) -> None:
    import omct.onnx as amct

    if not own_config:
        amct.create_quant_config(str(config), args.model, skip_layers=args.skip, batch_num=batch_num,
                                 config_defination=args.config)
    if args.algo:  # every layer's act_algo replaced, written to this run's own config.json
        from omct.formats.config import load_config, save_config, with_act_algo

        overridden = with_act_algo(load_config(config), args.algo)
        config = work / "config.json"
        save_config(overridden, config)
    if args.nuq_steps:  # every layer NUQ can take at --nuq-steps, written to this run's own config.json
        config = _with_nuq_steps(args.model, config, work / "config.json", args.nuq_steps)
    modified, record = work / "modified.onnx", work / "record.txt"
    amct.quantize_model(str(config), args.model, str(modified), str(record))
    calib = amct.CalibrationSession(str(modified))
    if calib.batch_num > len(batches):
        size = len(next(iter(batches[0].values()))) if batches else 0
        raise OmctError(f"{args.config or 'the config'} sets batch_num {calib.batch_num}, but '{args.calib}' holds only "
                        f"{len(batches)} batch(es) of {size}: lower batch_num, or give more data")
    for feeds in batches[:calib.batch_num]:
        calib.run(None, feeds)
    amct.save_model(str(modified), str(record), str(out))
    if args.nuq_steps:
        ratio = Path(f"{out}_deploy_model.onnx").stat().st_size / max(Path(args.model).stat().st_size, 1)
        logger.info("deploy model with NUQ-%d weights: %.3fx of the FP32 file", args.nuq_steps, ratio)


def _with_nuq_steps(model: str, config: Path, out: Path, steps: int) -> Path:
    """``config`` with every enabled layer that NUQ can take at ``steps`` levels; the others' reasons logged."""
    import omct.onnx as amct
    from omct.auto.nuq import candidates, with_steps
    from omct.formats.config import load_config, save_config

    loaded = load_config(config)
    prepared = amct.prepare(model, loaded)
    names = candidates(prepared, loaded)
    for spec in prepared.layers:
        if spec.weight is not None and spec.nuq_refusal and spec.name in loaded.layers:
            logger.info("layer '%s' keeps uniform weights: NUQ cannot take it (%s)", spec.name, spec.nuq_refusal)
    if not names:
        raise OmctError(f"--nuq-steps {steps}: no enabled layer of '{model}' can take NUQ (Conv with a 4-D weight, "
                        "group 1, dilation 1; Gemm; MatMul with a 2-D weight); see `omct inspect`")
    save_config(with_steps(loaded, dict.fromkeys(names, steps)), out)
    logger.info("--nuq-steps %d: %d of %d weighted layers take NUQ", steps, len(names),
                sum(1 for s in prepared.layers if s.weight is not None and s.name in loaded.layers))
    return out


def _table(headers: list[str], rows: list[list[str]], title: str | None = None, styles: list | None = None) -> None:
    """On a terminal a rich table whose cells wrap but are never cut; piped or redirected, tab-separated lines
    (header first) that scripts and spreadsheets read: the layer names are what --skip needs, whole."""
    if sys.stdout.isatty():
        from rich.console import Console
        from rich.table import Column, Table

        table = Table(*(Column(h, overflow="fold") for h in headers), title=title)
        for row, style in zip(rows, styles or [None] * len(rows), strict=True):
            table.add_row(*row, style=style)
        Console().print(table)
        return
    if title:
        print(title)
    for row in [headers, *rows]:
        print("\t".join(str(c).replace("\t", " ") for c in row))


def skip_option(layers: list[str]) -> str:
    """``--skip a b ...`` quoted for a POSIX shell, ready to paste after ``omct quantize``."""
    import shlex

    return "--skip " + " ".join(shlex.quote(n) for n in layers)


def cmd_analyze(args) -> int:
    from omct.analysis import analyze
    from omct.analysis.report import write_html
    from omct.graph.model_io import input_files

    _model_path(args.float_model, "float_model")
    _model_path(args.quant_model, "quant_model")
    quant = Path(args.quant_model)
    html_path = Path(args.report) if args.report else quant.with_name(quant.stem + "_analysis.html")
    check_outputs({**input_files("float_model", args.float_model), **input_files("quant_model", args.quant_model),
                   "--data": args.data}, {"--report": html_path, "--json": args.json})
    batches = _load_batches(args.data, _model_inputs(args.float_model, "float_model"), args, "--data")
    if args.batches:
        batches = batches[:args.batches]
    report = analyze(args.float_model, args.quant_model, batches, threshold=args.threshold, batch_count=len(batches))
    flagged = {e.layer for e in report.flagged()}
    rows = [[e.layer, e.op_type, f"{e.cosine:.5f}", f"{e.accumulated.sqnr_db:.1f}", f"{e.accumulated.max_abs:.4g}",
             f"{e.isolated.cosine:.5f}", "-" if e.clipped_fraction is None else f"{100 * e.clipped_fraction:.3f}%"]
            for e in report.layers]
    _table(["layer", "op", "cosine", "SQNR dB", "max abs err", "isolated cosine", "input clipped"], rows,
           title=f"float vs quantized, {report.batches} batch(es); red: cosine < {args.threshold}",
           styles=["red" if e.layer in flagged else None for e in report.layers])
    if flagged:
        print(f"flagged, worst own error first: {', '.join(e.layer for e in report.flagged())}")
        skip = report.suggested_skip_layers()
        if skip:
            print(f"suggested skip_layers: {skip}")
            print(f"to keep them in float, add to omct quantize: {skip_option(skip)}")
        else:
            print(f"suggested skip_layers: none bad on its own (every flagged layer's isolated cosine is at least "
                  f"{args.threshold}: they inherit error from upstream layers)")
    else:
        print(f"no layer below cosine {args.threshold}")
    write_html(report, html_path, title=f"omct analysis: {Path(args.quant_model).name}")
    print(f"report: {html_path}")
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_dict(), indent=2))
    return 0


def cmd_inspect(args) -> int:
    import omct.onnx as amct

    rep = amct.inspect_model(args.model)
    if args.json:
        print(json.dumps({"model": args.model, **rep.to_dict()}, indent=2))
        return 0
    print(f"{args.model}: {rep.summary()}")
    _table(list(rep.HEADERS), rep.rows())
    return 0


def cmd_bench(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from omct.feeds import ORT_DTYPES, fixed_batch

    for m in args.models:
        _model_path(m)
    inputs = _model_inputs(args.models[0])
    batch = fixed_batch(inputs) or args.batch_size
    rng = np.random.default_rng(0)
    feeds = {}
    for i in inputs:
        shape = [d if isinstance(d, int) and d > 0 else args.batch_size for d in i.shape]
        dtype = ORT_DTYPES.get(i.type, np.float32)
        values = rng.standard_normal(shape) if np.issubdtype(dtype, np.floating) else np.zeros(shape)
        feeds[i.name] = values.astype(dtype)
    table = Table("model", "median ms", "p90 ms", "size KB", "vs first",
                  caption=f"ONNX Runtime CPU, batch {batch}, {args.threads} thread(s), {args.runs} runs")
    first = None
    for m in args.models:
        med, p90 = _latency(Path(m), feeds, args.runs, args.threads)
        first = first or med
        table.add_row(Path(m).name, f"{med:.2f}", f"{p90:.2f}", f"{Path(m).stat().st_size / 1024:.0f}", f"{med / first:.2f}x")
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

    table = Table("model", "accuracy", "size KB", "latency ms", "vs FP32",
                  caption="latency: ONNX Runtime, batch 64, 2 threads, median")
    fp32_ms = None
    for name, p in paths.items():
        s = ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
        acc = float((s.run(None, {"input": x})[0].argmax(1) == y).mean())
        med, _ = _latency(p, {"input": x[:64]})
        fp32_ms = fp32_ms or med
        table.add_row(name, f"{acc:.4f}", f"{p.stat().st_size / 1024:.0f}", f"{med:.2f}", f"{med / fp32_ms:.2f}x")
    console = Console()
    print(f"omct demo: digits CNN, {batch_num} calibration batches of 32, {len(y)} test images; "
          f"quantized in {ptq_s:.1f} s")  # plain print: a rich console would wrap it mid-sentence at 80 columns
    print(f"files in {out}")
    console.print(table)
    return 0


def positive_int(text: str) -> int:
    """argparse type for counts (--runs, --threads, --batch-size, --batch-num, --batches): 0 or less is refused."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="omct", description="Open model compression toolkit (AMCT-style quantization "
                                "for ONNX Runtime).", formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Example: omct quantize model.onnx --calib calib.npz --out results/model")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars or informational messages")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show a traceback on errors")
    p.add_argument("--version", action="version", version=f"omct {__version__}")
    p.add_argument("--quiet", action="store_true", help="no progress bars or informational messages")
    p.add_argument("--debug", action="store_true", help="show a traceback on errors")
    sub = p.add_subparsers(dest="command", required=True)

    data_opts = argparse.ArgumentParser(add_help=False)
    g = data_opts.add_argument_group("data", "DATA is an .npz (arrays named by model input) or .npy file, a folder of "
                                     "them, or a folder of images; images are resized and normalised as these say")
    g.add_argument("--batch-size", type=positive_int, help="samples per batch (default: the model's fixed batch size, else 32)")
    g.add_argument("--image-size", type=int, nargs="+", metavar="N", help="H [W] (default: the model's input size)")
    g.add_argument("--layout", choices=["nchw", "nhwc"], default="nchw", help="input layout (default nchw)")
    g.add_argument("--scale", type=float, default=1 / 255, help="pixel multiplier before mean/std (default 1/255)")
    g.add_argument("--mean", type=float, nargs="+", default=[0.0], help="per-channel mean to subtract (default 0)")
    g.add_argument("--std", type=float, nargs="+", default=[1.0], help="per-channel std to divide by (default 1)")
    g.add_argument("--grayscale", action="store_true", help="read images as one channel (default: when the model "
                   "input has 1 channel)")

    q = sub.add_parser("quantize", parents=[common, data_opts],
                       help="post-training quantization: config, calibration, fake-quant and deploy models")
    q.add_argument("model", help="FP32 ONNX model")
    q.add_argument("--calib", required=True, help=".npz/.npy file, a folder of them, or a folder of images")
    q.add_argument("--out", required=True, help="output prefix: writes PREFIX_fake_quant_model.onnx and "
                   "PREFIX_deploy_model.onnx, and PREFIX_work/ with this run's config.json, record.txt and calibration "
                   "model (removed if the run fails). A folder (results/) gets results/MODEL_...; a trailing .onnx is "
                   "dropped")
    q.add_argument("--keep-work", action="store_true", help="keep PREFIX_work/ when the run fails (to look into it)")
    q.add_argument("--config", help="a simplified .cfg (AMCT text format) or a config.json")
    q.add_argument("--batch-num", type=positive_int, help="calibration batches to run (default: all the data)")
    q.add_argument("--skip", nargs="*", help="layer names to keep in float")
    q.add_argument("--algo", choices=list(CALIBRATORS), help="activation calibration algorithm for every layer, "
                   "at its default options (default: the config's, else ifmr)")
    q.add_argument("--nuq-steps", type=int, choices=ALLOWED_STEPS, help="non-uniform quantization of the weights: "
                   "every layer that can take it keeps this many INT8 levels (indices of log2(N) bits in the deploy "
                   "file); `omct inspect` shows which layers can")
    q.set_defaults(func=cmd_quantize)

    a = sub.add_parser("analyze", parents=[common, data_opts],
                       help="per-layer error between a float model and its quantized model, with an HTML report",
                       description="Runs both models on DATA and compares every quantized layer: accumulated error (the "
                       "layer's result in the quantized model) and isolated error (the layer alone quantized). Layers "
                       "with cosine below --threshold are flagged and a skip_layers list is suggested.")
    a.add_argument("float_model", help="the FP32 ONNX model that was quantized")
    a.add_argument("quant_model", help="PREFIX_fake_quant_model.onnx (or _deploy_model.onnx) written by omct")
    a.add_argument("--data", required=True, help=".npz/.npy file, a folder of them, or a folder of images")
    a.add_argument("--threshold", type=float, default=0.99, help="flag layers with cosine below this (default 0.99)")
    a.add_argument("--batches", type=positive_int, help="use at most this many batches")
    a.add_argument("--report", help="HTML report path (default: next to QUANT, *_analysis.html)")
    a.add_argument("--json", help="also write the numbers as JSON here")
    a.set_defaults(func=cmd_analyze)

    i = sub.add_parser("inspect", parents=[common], help="list quantizable layers and the ones left in float, with reasons")
    i.add_argument("model", help="the ONNX model to inspect")
    i.add_argument("--json", action="store_true", help="print the layers as JSON (for scripts)")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", parents=[common], help="ONNX Runtime latency (median, p90) and file size of models, side by side")
    b.add_argument("models", nargs="+", help="ONNX models to time on the same random inputs (the first sets them)")
    b.add_argument("--batch-size", type=positive_int, default=1, help="value for dynamic dimensions (default 1; a fixed "
                   "batch dimension keeps its size)")
    b.add_argument("--runs", type=positive_int, default=50, help="timed runs per model, after 5 warm-up runs (default 50)")
    b.add_argument("--threads", type=positive_int, default=2, help="ONNX Runtime intra-op threads (default 2)")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", parents=[common], help="quantize the bundled digits CNN and print FP32 vs fake-quant vs deploy")
    d.add_argument("--out", help="folder for the files (default: a temporary folder)")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import logging

    from omct.ui import hints, set_quiet

    hints.setLevel(logging.WARNING)  # the API's "now call X" lines: the command runs those steps itself
    if args.quiet:
        set_quiet()
    try:
        return args.func(args)
    except OmctError as e:
        if args.debug:
            raise
        print(f"omct: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("omct: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every error is one line; --debug shows where it came from
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(f"omct: error: {type(e).__name__}: {first} (unexpected; rerun with --debug for the traceback and "
              "report it)", file=sys.stderr)
        return 1
