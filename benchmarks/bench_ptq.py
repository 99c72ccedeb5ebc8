"""Post-training quantization, side by side: omct (IFMR, HFMG) vs ONNX Runtime quantize_static (QDQ,
per-channel; MinMax, Entropy, Percentile) vs NNCF nncf.quantize, on models trained here on digits.

Each method runs in its own child process so its peak RSS is its own. Run by hand, not in CI:

    python benchmarks/bench_ptq.py                 # all models, all methods, writes benchmarks/results/ptq.md
    python benchmarks/bench_ptq.py --models resnet --methods omct-ifmr ort-minmax
    python benchmarks/bench_ptq.py --methods omct-ifmr omct-ifmr-exact ort-minmax   # -exact: every value binned
    python benchmarks/bench_ptq.py --models resnet18 mobilenet_v2 efficientnet_lite bert \
        --methods omct-ifmr ort-minmax ort-minmax-u8 --append      # the replicas of shipped architectures (REAL_MODELS)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the model zoo lives with the tests

HERE = Path(__file__).resolve().parent
WORK = HERE / "work"
RESULTS = HERE / "results"
SIZE = 32  # input images are upsampled to SIZE x SIZE so that latency measures compute, not overhead
MODELS = {"resnet": {"width": 32, "blocks": 3}, "mobilenet": {"width": 16},
          "transformer": {"d_model": 64, "layers": 2, "heads": 4, "patch": 8, "size": SIZE}}
EPOCHS = {"resnet": 25, "mobilenet": 15, "transformer": 25}
#: Replicas of shipped architectures (tests/real_models.py: torchvision ResNet-18 and MobileNetV2 with in-place
#: activations, EfficientNet-Lite with TF "same" padding as explicit Pad, Hugging Face BERT), trained briefly here:
#: the CNNs on the digits at SIZE x SIZE x 3 (mean/std normalised), BERT on the digits as 32-token sequences
#: (tests/test_pytorch_real_models.py) with Google BERT-mini's sizes, exported with static shapes (batch STATIC_BATCH).
REAL_MODELS = {"resnet18": {"width": 16}, "mobilenet_v2": {"width_mult": 0.5, "last_channel": 256},
               "efficientnet_lite": {"width_mult": 0.5, "head": 320},
               "bert": {"vocab_size": 8000, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "intermediate_size": 512, "max_position_embeddings": 64, "num_labels": 10}}
REAL_EPOCHS = {"resnet18": 3, "mobilenet_v2": 4, "efficientnet_lite": 4, "bert": 3}
#: The same CNN replicas at torchvision / timm width (what users deploy), trained for fewer epochs on 2 cores; the
#: narrow ones above stay: their many tiny layers are dominated by per-op overhead (docs/BENCHMARKS.md).
FULL_WIDTH = {"resnet18_full": ({"width": 64}, 4), "mobilenet_v2_full": ({"width_mult": 1.0, "last_channel": 1280}, 6),
              "efficientnet_lite_full": ({"width_mult": 1.0, "head": 1280}, 6)}
REAL_MODELS.update({name: kwargs for name, (kwargs, _) in FULL_WIDTH.items()})
REAL_EPOCHS.update({name: epochs for name, (_, epochs) in FULL_WIDTH.items()})
BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
STATIC_BATCH = 16  # the batch of the statically shaped BERT export: calibration, latency and test chunks
METHODS = ["omct-ifmr", "omct-hfmg", "ort-minmax", "ort-entropy", "ort-percentile", "nncf"]
CALIB_BATCH = 32


def data():
    """The digits at SIZE x SIZE, cached as .npz so that measured child processes never import torch."""
    from zoo import Digits

    cache = WORK / f"digits{SIZE}.npz"
    if not cache.exists():
        import zoo

        WORK.mkdir(parents=True, exist_ok=True)
        d = zoo.load_digits(SIZE)
        np.savez(cache, x_train=d.x_train, y_train=d.y_train, x_test=d.x_test, y_test=d.y_test)
    z = np.load(cache)
    return Digits(z["x_train"], z["y_train"], z["x_test"], z["y_test"])


def model_path(name: str) -> Path:
    return WORK / f"{name}_fp32.onnx"


def state_path(name: str) -> Path:
    return WORK / f"{name}_fp32.pt"


def real_model(name: str):
    """A REAL_MODELS replica, untrained."""
    import real_models

    return (real_models.bert_mini(**REAL_MODELS[name]) if name == "bert"
            else getattr(real_models, name.removesuffix("_full"))(**REAL_MODELS[name]))


def token_data():
    """The digits as BERT token sequences (tests/test_pytorch_real_models.py), cached as .npz like data()."""
    cache = WORK / "digits_tokens.npz"
    if not cache.exists():
        from test_pytorch_real_models import _tokens

        d, rng = data(), np.random.default_rng(0)
        train, test = _tokens(d.x_train, rng), _tokens(d.x_test, rng)
        np.savez(cache, **{f"train_{n}": a for n, a in zip(BERT_INPUTS, train, strict=True)},
                 **{f"test_{n}": a for n, a in zip(BERT_INPUTS, test, strict=True)})
    z = np.load(cache)
    return {n: z[f"train_{n}"] for n in BERT_INPUTS}, {n: z[f"test_{n}"] for n in BERT_INPUTS}


def split_feeds(name: str) -> tuple[dict, np.ndarray, dict, np.ndarray]:
    """(training feeds, training labels, test feeds, test labels) of model ``name``: each feed maps the ONNX
    input name to all the examples."""
    d = data()
    if name == "bert":
        train, test = token_data()
        return train, d.y_train, test, d.y_test
    if name in REAL_MODELS:
        rgb = lambda x: ((np.repeat(x, 3, axis=1) - 0.2) / 0.3).astype(np.float32)  # noqa: E731 - as the tests'
        return {"input": rgb(d.x_train)}, d.y_train, {"input": rgb(d.x_test)}, d.y_test
    return {"input": d.x_train}, d.y_train, {"input": d.x_test}, d.y_test


def batch_size(name: str) -> int:
    """The calibration batch: the static export's batch for BERT."""
    return STATIC_BATCH if name == "bert" else CALIB_BATCH


def calib_feeds(name: str, batch_num: int) -> list[dict]:
    """``batch_num`` calibration feeds of model ``name`` from the training set."""
    train, bs = split_feeds(name)[0], batch_size(name)
    n = len(next(iter(train.values())))
    return [{k: v[(i * bs) % n:][:bs] for k, v in train.items()} for i in range(batch_num)]


def ensure_real_model(name: str) -> None:
    """Train a REAL_MODELS replica briefly (zoo.train for the CNNs; the same Adam loop over BERT's three inputs)
    and cache its ONNX export and state_dict in benchmarks/work."""
    import torch
    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    train, ytr, test, yte = split_feeds(name)
    torch.manual_seed(0)
    model = real_model(name)
    if name != "bert":
        zoo.train(model, zoo.Digits(train["input"], ytr, test["input"], yte), epochs=REAL_EPOCHS[name])
        zoo.export_onnx(model, test["input"][:2], model_path(name))
        acc = zoo.accuracy_torch(model, test["input"], yte)
    else:
        xs, y = [torch.tensor(train[n]) for n in BERT_INPUTS], torch.tensor(ytr)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        model.train()
        for _ in range(REAL_EPOCHS[name]):
            for idx in torch.randperm(len(y)).split(64):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(model(*[t[idx] for t in xs]), y[idx]).backward()
                opt.step()
        model.eval()
        example = tuple(t[:STATIC_BATCH] for t in xs)
        torch.onnx.export(model, example, str(model_path(name)), input_names=BERT_INPUTS, output_names=["logits"],
                          opset_version=17, dynamo=False)  # no dynamic_axes: static shapes, as the seed's export
        with torch.no_grad():
            acc = float((model(*[torch.tensor(test[n]) for n in BERT_INPUTS]).argmax(1).numpy() == yte).mean())
    torch.save(model.state_dict(), state_path(name))
    print(f"trained {name}: torch accuracy {acc:.4f}", file=sys.stderr)


def ensure_model(name: str) -> None:
    """Train the model once: its ONNX export and its PyTorch state_dict are cached in benchmarks/work."""
    if model_path(name).exists() and state_path(name).exists():
        return
    if name in REAL_MODELS:
        ensure_real_model(name)
        return
    import torch
    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    d = data()
    m = zoo.build(name, d, model_path(name), epochs=EPOCHS[name], **MODELS[name])
    torch.save(m.state_dict(), state_path(name))
    print(f"trained {name}: torch accuracy {zoo.accuracy_torch(m, d.x_test, d.y_test):.4f}", file=sys.stderr)


def torch_model(name: str):
    """The trained PyTorch model (eval mode)."""
    import torch
    import zoo

    ensure_model(name)
    m = real_model(name) if name in REAL_MODELS else zoo.ARCHITECTURES[name](**MODELS[name])
    m.load_state_dict(torch.load(state_path(name)))
    return m.eval()


def calib_batches(batch_num: int):
    d = data()
    x = d.x_train
    return [x[(i * CALIB_BATCH) % len(x):][:CALIB_BATCH] for i in range(batch_num)]


def omct_method(method: str) -> str:
    """The omct algorithm of an omct method name. ``omct-ifmr-exact`` is omct-ifmr with every activation value
    binned (the sketch before sampling), to measure before and after in the same interleaved run; ``-untrimmed``: the
    deploy model without dropping padding-only Conv taps; ``-addln``: residual Adds before LayerNorms kept as Add
    (before issue 17 item 2); ``-nearest``: weights rounded to nearest (no learned rounding)."""
    algo = method[5:]
    if algo.endswith("-nearest"):  # weights rounded to nearest (learned_rounding off: the default before issue 18)
        algo = algo[: -len("-nearest")]
    if algo.endswith("-addln"):  # the deploy model keeps residual Add -> LayerNorm (SkipLayerNorm; before issue 17 item 2)
        from omct.graph.export import DeployBuilder

        DeployBuilder.writes_residual_sums = False
        algo = algo[: -len("-addln")]
    if algo.endswith("-untrimmed"):  # the deploy model keeps Conv taps that read only padding (before issue 17's fix)
        from omct.graph.export import DeployBuilder

        DeployBuilder.trims_padding_taps = False
        algo = algo[: -len("-untrimmed")]
    if algo.endswith("-exact"):
        import omct.core.sketch

        omct.core.sketch.DEFAULT_SAMPLE_SIZE = 0
        algo = algo[: -len("-exact")]
    return algo


def prepare_omct(method: str, name: str, out: Path, batch_num: int) -> None:
    """create_quant_config + quantize_model: the modified model at ``out_mod.onnx``."""
    import omct.onnx as amct
    from omct.ui import set_quiet

    set_quiet()
    src = str(model_path(name))
    cfg = out.with_suffix(".cfg")
    nearest = "learned_rounding: false\n" if method.endswith("-nearest") else ""
    cfg.write_text(f"batch_num: {batch_num}\n{nearest}common_config {{ {omct_method(method)}_quantize {{ }} }}\n")
    amct.create_quant_config(str(out) + ".json", src, config_defination=str(cfg))
    amct.quantize_model(str(out) + ".json", src, str(out) + "_mod.onnx", str(out) + "_record.txt")


def batch_reader(batches):
    """ONNX Runtime's calibration reader over ``batches`` (feeds, or arrays fed to the input named "input")."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            b = next(self.it, None)
            return b if b is None or isinstance(b, dict) else {"input": b}

    return Reader()


def import_method(method: str) -> None:
    """Import what ``method`` needs (the child times this apart from the quantization itself)."""
    if method.startswith("omct"):
        import onnxruntime  # noqa: F401 - omct imports it when its first session is made; ORT's import has it too

        import omct.onnx  # noqa: F401
    elif method.startswith("ort"):
        import onnxruntime.quantization  # noqa: F401
    elif method == "nncf":
        import nncf  # noqa: F401


def quantize(method: str, name: str, out: Path, batch_num: int, batches: list[dict] | None = None,
             src: Path | None = None) -> Path:
    """Quantize model ``name`` (its FP32 ONNX file, or ``src``) with ``method`` on ``batches`` (default: the
    first ``batch_num`` calibration feeds); returns the deploy model's path."""
    src = str(src or model_path(name))
    batches = calib_feeds(name, batch_num) if batches is None else batches
    if method.startswith("omct"):
        import omct.onnx as amct

        prepare_omct(method, name, out, batch_num)
        sess = amct.CalibrationSession(str(out) + "_mod.onnx")
        for b in batches:
            sess.run(None, b)
        amct.save_model(str(out) + "_mod.onnx", str(out) + "_record.txt", str(out))
        return Path(str(out) + "_deploy_model.onnx")
    if method.startswith("ort"):
        from onnxruntime.quantization import (
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )

        # -u8: uint8 activations (as omct's deploy models), the fastest QDQ kernels of ORT's CPU provider
        algo = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
                "ort-percentile": CalibrationMethod.Percentile}[method.removesuffix("-u8")]
        dst = Path(str(out) + "_deploy_model.onnx")
        quantize_static(src, str(dst), batch_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8 if method.endswith("-u8") else QuantType.QInt8,
                        weight_type=QuantType.QInt8, calibrate_method=algo)
        return dst
    if method == "nncf":
        import nncf
        import onnx

        model = onnx.load(src)
        kwargs = {"model_type": nncf.ModelType.TRANSFORMER} if name in ("transformer", "bert") else {}
        q = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches) * batch_size(name),
                          **kwargs)
        dst = Path(str(out) + "_deploy_model.onnx")
        onnx.save(q, str(dst))
        return dst
    raise ValueError(method)


def session(path: Path, threads: int = 2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def test_logits(path: Path, name: str) -> np.ndarray:
    """The model's logits on the test set; a statically shaped model (BERT) runs it in chunks of its batch,
    the last chunk overlapping the one before."""
    s, feeds = session(path), split_feeds(name)[2]
    if name != "bert":
        return s.run(None, feeds)[0]
    n = len(next(iter(feeds.values())))
    starts = [min(i, n - STATIC_BATCH) for i in range(0, n, STATIC_BATCH)]
    out = np.zeros((n, s.get_outputs()[0].shape[-1]), np.float32)
    for i in starts:
        out[i:i + STATIC_BATCH] = s.run(None, {k: v[i:i + STATIC_BATCH] for k, v in feeds.items()})[0]
    return out


def accuracy(path: Path, name: str = "resnet") -> float:
    """Top-1 accuracy on the test set (the digits' images for the default models)."""
    return float((test_logits(path, name).argmax(1) == split_feeds(name)[3]).mean())


@functools.cache
def _fp32_logits(name: str) -> np.ndarray:
    return test_logits(model_path(name), name)


def logit_sqnr_db(name: str, path: Path) -> float:
    """Signal-to-quantization-noise ratio of a quantized model's logits against the FP32 model's on the test
    set: a finer measure than accuracy, where one image is 0.2 points."""
    ref = _fp32_logits(name)
    got = test_logits(path, name)
    return float(10 * np.log10((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()))


def interleaved_latencies_ms(sessions: list, feeds: dict, passes: int, runs: int, warmup: int = 10) -> list[float]:
    """Median latency of each session, measured in interleaved passes so that machine noise hits every model
    alike. Each pass warms the session up first: ORT's idle worker threads spin for a while after a run, so
    strict round-robin between sessions would measure their contention, not the models."""
    medians: list[list[float]] = [[] for _ in sessions]
    for _ in range(passes):
        for s, med in zip(sessions, medians, strict=True):
            for _ in range(warmup):
                s.run(None, feeds)
            times = []
            for _ in range(runs):
                t = time.perf_counter()
                s.run(None, feeds)
                times.append(time.perf_counter() - t)
            med.append(float(np.median(times)))
    return [float(np.median(m) * 1000) for m in medians]


def latencies_ms(paths: list[Path], batch: int = 16, passes: int = 5, runs: int = 40, name: str = "resnet") -> list[float]:
    """Median latency of each model at ``batch`` test examples of model ``name`` (interleaved passes)."""
    feeds = {k: v[:batch] for k, v in split_feeds(name)[2].items()}
    return interleaved_latencies_ms([session(p) for p in paths], feeds, passes, runs)


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM; ru_maxrss would include the parent's, as Linux keeps it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def calibration_vs_forward(method: str, name: str, batch_num: int, rounds: int = 7) -> dict:
    """Seconds of the calibration part (a CalibrationSession's runs over the calibration batches, the last
    one writing the record) and of the bare FP32 forward passes over the same batches (an ONNX Runtime
    session on the original model, default options), each the median of ``rounds`` interleaved rounds.
    Sessions are built outside the timings; each round calibrates with a fresh CalibrationSession."""
    import omct.onnx as amct

    out = WORK / f"{name}_{method}_calib_b{batch_num}"
    prepare_omct(method, name, out, batch_num)
    batches = calib_feeds(name, batch_num)
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    fp32 = ort.InferenceSession(str(model_path(name)), so, providers=["CPUExecutionProvider"])
    for b in batches[:2]:  # warm-up: first-run allocations
        fp32.run(None, b)
    # the records' part apart (the algorithms at the last batch: ranges, weights, learned rounding, the file)
    import omct.quantize

    finish, records = omct.quantize.Calibration.finish, []

    def timed_finish(self):
        t = time.perf_counter()
        try:
            return finish(self)
        finally:
            records.append(time.perf_counter() - t)

    omct.quantize.Calibration.finish = timed_finish
    fwd, cal = [], []
    for _ in range(rounds):
        t = time.perf_counter()
        for b in batches:
            fp32.run(None, b)
        fwd.append(time.perf_counter() - t)
        sess = amct.CalibrationSession(str(out) + "_mod.onnx")
        t = time.perf_counter()
        for b in batches:
            sess.run(None, b)
        cal.append(time.perf_counter() - t)
        del sess
    return {"forward_s": float(np.median(fwd)), "calib_s": float(np.median(cal)), "records_s": float(np.median(records)),
            "passes_s": float(np.median(np.subtract(cal, records)))}


def child(method: str, name: str, batch_num: int) -> None:
    """Quantize once in this process and print a JSON line of measurements (``calib:`` methods: the
    calibration part against the bare forward passes instead)."""
    if method.startswith("calib:"):
        print(json.dumps({"method": method[6:], "model": name, **calibration_vs_forward(method[6:], name, batch_num)}))
        return
    out = WORK / f"{name}_{method}_b{batch_num}"
    base_rss = peak_rss_mb()
    t = time.perf_counter()
    import_method(method)
    import_s = time.perf_counter() - t
    batches = calib_feeds(name, batch_num)  # the user's data, loaded before the clock starts for every method
    t, cpu = time.perf_counter(), time.process_time()
    deploy = quantize(method, name, out, batch_num, batches)
    wall = time.perf_counter() - t
    cpu = time.process_time() - cpu  # every thread of the process: less sensitive to a shared host than the wall
    peak = peak_rss_mb()
    print(json.dumps({"method": method, "model": name, "batch_num": batch_num, "wall_s": wall, "cpu_s": cpu, "import_s": import_s,
                      "peak_rss_mb": peak, "start_rss_mb": base_rss, "deploy": str(deploy)}))


@functools.cache
def compile_bytecode() -> None:
    """Write omct's bytecode once, as a regular pip install does. Without it an editable install under
    PYTHONDONTWRITEBYTECODE recompiles every omct module in every child and charges that to omct's wall
    time, while the peers' bytecode was written when pip installed them."""
    import compileall

    compileall.compile_dir(str(HERE.parent / "omct"), quiet=1)


def child_process(script: str | Path, method: str, name: str, *args) -> dict:
    """Run ``script --child method name args...`` quietly in a fresh process and return the JSON line it
    prints last, or the method, model and the last line of its error output when it fails."""
    compile_bytecode()
    cmd = [sys.executable, str(script), "--child", method, name, *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMCT_QUIET="1"))
    if res.returncode != 0:
        return {"method": method, "model": name, "error": res.stderr.strip().splitlines()[-1]}
    return json.loads(res.stdout.strip().splitlines()[-1])


def run_child(method: str, name: str, batch_num: int) -> dict:
    return {"batch_num": batch_num, **child_process(__file__, method, name, batch_num)}


def markdown_table(headers: list[str], rows: list[dict], cells) -> list[str]:
    """A markdown table; ``cells(row)`` gives a row's cells, a row with an "error" says it failed."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for r in rows:
        row = [r["model"], r["method"], f"failed: {r['error'][:90]}"] + [""] * (len(headers) - 3) if "error" in r \
            else [r["model"], r["method"], *cells(r)]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def write_results(name: str, lines: list[str], append: bool = False) -> None:
    """Write ``benchmarks/results/{name}.md`` and print it; ``append``: add it as a dated section that quotes
    the command line instead."""
    text = "\n".join(lines) + "\n"
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    if append and path.exists():
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        command = " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]])
        text = (f"{path.read_text().rstrip()}\n\n## {when}: `{command}`"
                f"\n\nMeasured on a shared host (other jobs running): quote the ratios, not the milliseconds.\n\n{text}")
    path.write_text(text)
    print(text)


def append_flag(ap: argparse.ArgumentParser) -> None:
    """The options both PTQ benchmarks share: --append and --latency-batch."""
    ap.add_argument("--append", action="store_true",
                    help="append the table to the results file as a dated section (with the command line)")
    ap.add_argument("--latency-batch", type=int, default=16,
                    help="test examples per timed run (bert: always its static batch, 16)")
    ap.add_argument("--passes", type=int, default=5,
                    help="interleaved latency passes (40 runs each; more on a busy shared host)")


def timed_batch(name: str, batch: int) -> int:
    return STATIC_BATCH if name == "bert" else batch


ORT_REFERENCES = ("ort-minmax", "ort-minmax-u8")


def ort_ratio(lat_ms: float, lats: dict) -> str:
    """A deploy model's latency over the faster of ORT quantize_static's MinMax deploy models (int8 or uint8
    activations) measured in the same interleaved passes."""
    ref = [lats[m] for m in ORT_REFERENCES if m in lats]
    return f"{lat_ms / min(ref):.2f}x" if ref else "-"


def repeated_runs(run, name: str, args, rows: list) -> dict:
    """Each method ``args.repeat`` times in child processes, in interleaved rounds so that a slow spell of
    the machine hits every method alike: median wall time, highest peak RSS; a failure becomes an error row."""
    results = {}
    rounds = [{method: run(method, name, args.batch_num) for method in args.methods} for _ in range(args.repeat)]
    for method in args.methods:
        runs = [r[method] for r in rounds]
        failed = [r for r in runs if "error" in r]
        if failed:
            rows.append({"model": name, "method": method, "error": failed[0]["error"]})
        else:
            results[method] = {**runs[0], "wall_s": float(np.median([r["wall_s"] for r in runs])),
                               "import_s": float(np.median([r.get("import_s", 0.0) for r in runs])),
                               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=[*MODELS, *REAL_MODELS])
    ap.add_argument("--methods", nargs="*", default=METHODS)
    ap.add_argument("--batch-num", type=int, default=8)
    append_flag(ap)
    ap.add_argument("--repeat", type=int, default=5, help="quantize this many times; the median wall time is reported")
    ap.add_argument("--memory", action="store_true", help="also measure omct's peak RSS at batch_num 32 vs 256")
    ap.add_argument("--no-calib-ratio", dest="calib_ratio", action="store_false",
                    help="skip timing omct's calibration part against the bare FP32 forward passes")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    rows, lines = [], []
    for name in args.models:
        ensure_model(name)
        fp32 = model_path(name)
        results = repeated_runs(run_child, name, args, rows)
        calib = {m: child_process(__file__, f"calib:{m}", name, args.batch_num) for m in results if m.startswith("omct")} \
            if args.calib_ratio else {}
        paths = [fp32] + [Path(r["deploy"]) for r in results.values()]
        lats = latencies_ms(paths, timed_batch(name, args.latency_batch), passes=args.passes, name=name)
        by_method = dict(zip(results, lats[1:], strict=True))
        rows.append({"model": name, "method": "fp32", "acc": accuracy(fp32, name), "lat_ms": lats[0], "lat_ratio": 1.0,
                     "size_kb": fp32.stat().st_size / 1024, "size_ratio": 1.0})
        for (method, r), lat in zip(results.items(), lats[1:], strict=True):
            deploy = Path(r["deploy"])
            rows.append({"model": name, "method": method, "acc": accuracy(deploy, name), "sqnr": logit_sqnr_db(name, deploy),
                         "lat_ms": lat, "vs_ort": ort_ratio(lat, by_method),
                         "lat_ratio": lat / lats[0], "wall_s": r["wall_s"], "import_s": r["import_s"],
                         "peak_rss_mb": r["peak_rss_mb"],
                         "size_kb": deploy.stat().st_size / 1024, "size_ratio": deploy.stat().st_size / fp32.stat().st_size})
            if "ort-minmax" in results:
                rows[-1]["wall_ratio"] = r["wall_s"] / results["ort-minmax"]["wall_s"]
            c = calib.get(method, {})
            if "calib_s" in c:
                rows[-1].update(calib_s=c["calib_s"], forward_s=c["forward_s"], calib_ratio=c["calib_s"] / c["forward_s"])
            print(json.dumps(rows[-1]), file=sys.stderr)
    lines.append(f"PTQ benchmark: {args.batch_num} calibration batches of {CALIB_BATCH} (bert: {STATIC_BATCH}), digits "
                 f"upsampled to {SIZE}x{SIZE} (real-model CNNs: x3 channels; bert: as 32-token sequences, static shapes), "
                 f"accuracy on 500 held-out images, ORT latency at batch {args.latency_batch} (bert: 16) with 2 threads "
                 f"(median of {args.passes} interleaved "
                 f"passes of 40 runs each; vs ORT QDQ: over the faster of ORT quantize_static MinMax's deploy models, int8 "
                 "(ort-minmax) or uint8 (-u8) activations, in the same passes), "
                 f"speed-up over FP32 = 1 / (vs FP32), PTQ wall time the median of {args.repeat} interleaved rounds, "
                 "each in a fresh process, timed after the method's imports (import s: timed apart) and after the "
                 "calibration data is loaded; vs MinMax: "
                 "PTQ wall time over ORT MinMax's; calib/fwd: omct's calibration part (its CalibrationSession's "
                 f"runs over the {args.batch_num} batches) over bare FP32 ONNX Runtime runs over the same batches "
                 "(medians of 7 interleaved rounds in one process).\n")
    lines += markdown_table(
        ["model", "method", "accuracy", "logit SQNR dB", "latency ms", "vs FP32", "vs ORT QDQ", "PTQ wall s", "vs MinMax",
         "import s", "calib/fwd", "peak RSS MB", "size KB", "size vs FP32"],
        rows, lambda r: [f"{r['acc']:.4f}", f"{r['sqnr']:.1f}" if "sqnr" in r else "-", f"{r['lat_ms']:.2f}",
                         f"{r['lat_ratio']:.2f}x", r.get("vs_ort", "-"), f"{r.get('wall_s', 0):.2f}",
                         f"{r['wall_ratio']:.2f}x" if "wall_ratio" in r else "-",
                         f"{r['import_s']:.2f}" if "import_s" in r else "-",
                         f"{r['calib_ratio']:.2f}x ({r['calib_s']:.3f}/{r['forward_s']:.3f} s)" if "calib_ratio" in r else "-",
                         f"{r.get('peak_rss_mb', 0):.0f}", f"{r['size_kb']:.0f}", f"{r['size_ratio']:.3f}x"])
    if args.memory:
        lines.append("\nomct peak RSS vs batch_num (IFMR, resnet):\n")
        lines.append("| batch_num | peak RSS MB | wall s |")
        lines.append("|---|---|---|")
        for bn in (32, 256):
            r = run_child("omct-ifmr", args.models[0], bn)
            lines.append(f"| {bn} | {r['peak_rss_mb']:.0f} | {r['wall_s']:.1f} |")
    write_results("ptq", lines, args.append)


if __name__ == "__main__":
    main()
