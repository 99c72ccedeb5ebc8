"""Where min-max PTQ loses: omct's default (learned rounding) and its round-to-nearest form (-nearest) vs omct +
AdaRound (``ada_quantize``; -flips: its flip-descent solver) vs ONNX Runtime's
quantize_static (QDQ, per-channel; MinMax, Percentile, Entropy), with cross-layer equalization (-cle) and
dmq_balancer (-dmq), on torchvision-layout MobileNetV2 and
ResNet-18 replicas (tests/real_models.py) trained here.

Data: scikit-learn's digits, upsampled to 32 x 32 and repeated to 3 channels (no image data set or pretrained
weights could be downloaded here). Every method agrees with FP32 on every plain test digit, so the judged
inputs are made ambiguous: 20000 blends ``a * x_i + (1 - a) * x_j`` of two test digits (a in [0.3, 0.7]),
of which the 1000 with the smallest FP32 margin (top-1 minus top-2 logit) are kept. Judged by logit SQNR
against FP32 on those low-margin inputs and top-1 agreement with FP32 on them, each with a 95% bootstrap
interval, and paired against omct's default on the same images (bootstrap interval of the difference,
McNemar's exact test for agreement). Wall time
per method: calibration + export, one process, on a shared host (compare ratios). Run by hand:

    python benchmarks/bench_adaround.py            # writes benchmarks/results/adaround.md
    python benchmarks/bench_adaround.py --models mobilenet_v2 --methods omct omct-ada
    NNCF_PYTHON=/path/to/venv/bin/python python benchmarks/bench_adaround.py --methods omct nncf nncf-mixed

Peer tools run in their own Pythons, each method in a child process, and join the default method list when their
Python is named: NNCF_PYTHON (nncf, nncf-mixed, nncf-bc, nncf-nobc), AIMET_PYTHON (aimet-onnx: aimet,
aimet-ada-matched, aimet-ada-1000; aimet-ada for its default 10000 iterations) and QUARK_PYTHON (amd-quark: quark).
A venv that sees omct's venv through a .pth file and gets ``pip install -c constraints.txt aimet-onnx amd-quark``
keeps torch 2.13.0+cpu (no CUDA wheels).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_ptq  # noqa: E402  (ONNX Runtime's calibration reader, session helper)

HERE = Path(__file__).resolve().parent
WORK = HERE / "work" / "adaround"
RESULTS = HERE / "results"
MODELS = {"mobilenet_v2": {"width_mult": 0.5, "last_channel": 256}, "resnet18": {"width": 16}}
EPOCHS = {"mobilenet_v2": 12, "resnet18": 8}
METHODS = ["omct", "omct-nearest", "omct-cle", "omct-dmq", "omct-ada", "omct-ada-200", "omct-ada-flips",
           "omct-cle-ada-200", "ort-minmax", "ort-percentile", "ort-entropy"]
#: Peer tools' methods, run by default when their Python is named (NNCF_PYTHON, AIMET_PYTHON, QUARK_PYTHON).
PEER_METHODS = {"nncf": ["nncf", "nncf-mixed", "nncf-bc", "nncf-nobc"],
                "aimet": ["aimet", "aimet-ada-matched", "aimet-ada-1000"], "quark": ["quark"]}
BATCH_NUM, CALIB_BATCH, LOW_MARGIN, BLENDS, BOOT = 8, 32, 1000, 20000, 2000


def data():
    d = bench_ptq.data()  # digits at 32 x 32 (cached)
    rgb = lambda x: np.repeat(x, 3, axis=1).astype(np.float32)  # noqa: E731
    return rgb(d.x_train), d.y_train, rgb(d.x_test), d.y_test


def ensure_model(name: str, kwargs: dict | None = None, epochs: int | None = None, tag: str = "") -> Path:
    """Train replica ``name`` (``kwargs``: its size, default MODELS[name]) once and cache its ONNX file."""
    path = WORK / f"{name}{tag}.onnx"
    if path.exists():
        return path
    import real_models
    import torch
    import zoo

    WORK.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = data()
    torch.manual_seed(0)
    model = getattr(real_models, name)(num_classes=10, **(MODELS[name] if kwargs is None else kwargs))
    zoo.train(model, zoo.Digits(xtr, ytr, xte, yte), epochs=EPOCHS[name] if epochs is None else epochs)
    print(f"trained {name}: accuracy {zoo.accuracy_torch(model, xte, yte):.4f}", file=sys.stderr)
    zoo.export_onnx(model, xte[:2], path)
    return path


#: Pythons with the peer tools (their own venvs: installing them into omct's would change pinned versions).
PEER_PYTHON = {"nncf": os.environ.get("NNCF_PYTHON", sys.executable),
               "aimet": os.environ.get("AIMET_PYTHON", sys.executable),
               "quark": os.environ.get("QUARK_PYTHON", sys.executable)}
#: AdaRound iterations per layer for ``aimet-ada-matched``: AIMET's wall time (with starting Python and importing
#: aimet_onnx and torch, about 7 s) then about matches omct-ada's 46 s (measured here, one thread).
AIMET_MATCHED_ITERATIONS = {"mobilenet_v2": 20, "resnet18": 300}


def nncf_child(method: str, src: str, dst: str) -> None:
    """nncf.quantize with its defaults (``nncf``), the MIXED preset (``nncf-mixed``), full BiasCorrection instead of
    FastBiasCorrection (``nncf-bc``, NNCF's documented accuracy option) or no bias correction (``nncf-nobc``)."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters

    xtr = data()[0]
    batches = [xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(BATCH_NUM)]
    kwargs = {"nncf-mixed": {"preset": nncf.QuantizationPreset.MIXED},
              "nncf-bc": {"fast_bias_correction": False},
              "nncf-nobc": {"advanced_parameters": AdvancedQuantizationParameters(disable_bias_correction=True)}}
    q = nncf.quantize(onnx.load(src), nncf.Dataset(batches, lambda b: {"input": b}),
                      subset_size=BATCH_NUM * CALIB_BATCH, **kwargs.get(method, {}))
    onnx.save(q, dst)


def aimet_child(method: str, src: str, dst: str) -> None:
    """AIMET-ONNX: QuantizationSimModel at its defaults (int8, min-max, the per-channel default config), then
    ``apply_adaround`` (``aimet-ada``: its default 10000 iterations per layer; ``aimet-ada-N``: N;
    ``aimet-ada-matched``: AIMET_MATCHED_ITERATIONS), ``compute_encodings`` on the same batches, exported as QDQ
    (``to_onnx_qdq``). ``aimet``: no AdaRound."""
    import onnx
    from aimet_onnx import QuantizationSimModel, apply_adaround

    xtr = data()[0]
    inputs = [{"input": xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH]} for i in range(BATCH_NUM)]
    sim = QuantizationSimModel(onnx.load(src), param_type="int8", activation_type="int8",
                               session_options_kwargs={"intra_op_num_threads": 1, "inter_op_num_threads": 1})
    if method == "aimet-ada":
        apply_adaround(sim, inputs)
    elif method.startswith("aimet-ada-"):
        tail = method.rsplit("-", 1)[1]
        iters = AIMET_MATCHED_ITERATIONS[Path(src).stem] if tail == "matched" else int(tail)
        apply_adaround(sim, inputs, num_iterations=iters)
    sim.compute_encodings(inputs)
    onnx.save(sim.to_onnx_qdq(), dst)


def quark_child(method: str, src: str, dst: str) -> None:
    """AMD Quark (ONNX): ModelQuantizer with its A8W8 default config on the same calibration batches."""
    from quark.onnx import A8W8_QCONFIG, ModelQuantizer

    xtr = data()[0]
    batches = [xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(BATCH_NUM)]
    ModelQuantizer(A8W8_QCONFIG).quantize_model(src, dst, bench_ptq.batch_reader(batches))


#: What the peers' rows mean (written under the table when a peer ran).
PEER_NOTES = """
Peer methods. `nncf`: `nncf.quantize` at its defaults; `nncf-mixed`: the MIXED preset; `nncf-bc`:
`fast_bias_correction=False` (NNCF's full BiasCorrection, documented as the more accurate one; on ResNet-18 NNCF
3.4 raises while extracting a residual block's subgraph); `nncf-nobc`:
`AdvancedQuantizationParameters(disable_bias_correction=True)`, NNCF's best setting here. NNCF's default loses
4-16 dB to its own no-bias-correction run because FastBiasCorrection computes each bias shift on a constant map
(the input's per-channel mean broadcast over the map) against the layer's real mean output: at 32 x 32 inputs
(zero padding, strided 1 x 1 convolutions, 8 x 8 to 2 x 2 maps) those differ in FP32 already, by up to 0.4
(MobileNetV2's depthwise convolutions) and 0.55 (ResNet-18's strided downsample) of the output's standard
deviation, and the difference lands in the bias (`python benchmarks/check_nncf_fbc.py resnet18`). The harness
feeds NNCF what it feeds every method (the same 8 x 32 NCHW float batches, input "input", its QDQ model
evaluated on the same inputs); batches of 1 instead of 32 change NNCF's default by 0.1 dB on ResNet-18.
`aimet`: AIMET-ONNX QuantizationSimModel at its defaults (int8 weights and activations, min-max, its default
per-channel config), `compute_encodings` on the same batches, `to_onnx_qdq`; `aimet-ada-N`: `apply_adaround`
with N iterations per layer before `compute_encodings`; `aimet-ada-matched`: 20 (MobileNetV2) / 300 (ResNet-18)
iterations, set to bring AIMET's wall to omct-ada's (46 s in an earlier run); on MobileNetV2 even 20
iterations take twice omct-ada's wall here, AIMET's fixed cost being about 0.9 s for each of its 53 layers.
AIMET's default 10000 iterations were not run: its first MobileNetV2 layer alone took
68 s (about an hour for the model on this host). `quark`: AMD Quark's `A8W8_QCONFIG` (per-tensor symmetric INT8
weights and activations, percentile calibration) through `ModelQuantizer.quantize_model`.
"""


def peer_versions() -> list[str]:
    """The peer tools' versions, read from their own Pythons."""
    dists = {"nncf": "nncf", "aimet": "aimet-onnx", "quark": "amd-quark"}
    out = []
    for tool, py in PEER_PYTHON.items():
        if f"{tool.upper()}_PYTHON" in os.environ:
            code = f"import importlib.metadata as m; print(m.version('{dists[tool]}'))"
            ver = subprocess.run([py, "-c", code], capture_output=True, text=True).stdout.strip() or "?"
            out.append(f"{dists[tool]} {ver}")
    return out


PEER_CHILDREN = {"nncf": nncf_child, "aimet": aimet_child, "quark": quark_child}


def quantize(method: str, src: Path, out: Path) -> Path:
    xtr = data()[0]
    peer = method.split("-")[0]
    if peer in PEER_CHILDREN:  # wall time includes starting that Python and importing the tool
        dst = Path(f"{out}_deploy_model.onnx")
        dst.unlink(missing_ok=True)
        log = Path(f"{out}.log")
        with log.open("w") as f:
            subprocess.run([PEER_PYTHON[peer], __file__, "--peer-child", method, str(src), str(dst)], check=True,
                           stdout=f, stderr=subprocess.STDOUT, cwd=WORK)  # Quark writes a CSV into its cwd
        return dst
    batches = [xtr[i * CALIB_BATCH:(i + 1) * CALIB_BATCH] for i in range(BATCH_NUM)]
    if method.startswith("omct"):
        import omct.onnx as amct
        from omct.ui import set_quiet

        set_quiet()
        cfg = out.with_suffix(".cfg")
        # omct[-nearest][-cle][-dmq][-ada[-fi][-flips][-nopolish][-nocenter][-ITERATIONS]]; nearest: learned_rounding
        # off (round to nearest, the default before it); fi: AdaRound on float inputs, flips: the flip-descent solver,
        # nopolish / nocenter: those options off
        parts = method.split("-")
        body = f"batch_num: {BATCH_NUM}\n" + ("cross_layer_equalization: true\n" if "cle" in parts else "") + \
            ("learned_rounding: false\n" if "nearest" in parts else "")
        common = "dmq_balancer { } " if "dmq" in parts else ""
        # -hfmg / -mse / -percentile / -minmax / -kl: that activation calibrator on every layer instead of IFMR
        common += "".join(f"{a}_quantize {{ }} " for a in ("hfmg", "mse", "percentile", "minmax", "kl") if a in parts)
        if "ada" in parts:
            iters = parts[-1] if parts[-1].isdigit() else None
            common += "ada_quantize { " + (f"num_iteration: {iters} " if iters else "") + \
                ("quantized_input: false " if "fi" in parts else "") + \
                ('solver: "flips" ' if "flips" in parts else "") + ("polish: false " if "nopolish" in parts else "") + \
                ("center: false " if "nocenter" in parts else "") + "} "
        body += f"common_config {{ {common}}}\n" if common else ""
        cfg.write_text(body)
        amct.create_quant_config(f"{out}.json", str(src), config_defination=str(cfg))
        amct.quantize_model(f"{out}.json", str(src), f"{out}_mod.onnx", f"{out}_record.txt")
        sess = amct.CalibrationSession(f"{out}_mod.onnx")
        for b in batches:
            sess.run(None, {"input": b})
        amct.save_model(f"{out}_mod.onnx", f"{out}_record.txt", str(out))
        return Path(f"{out}_deploy_model.onnx")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    algo = {"ort-minmax": CalibrationMethod.MinMax, "ort-entropy": CalibrationMethod.Entropy,
            "ort-percentile": CalibrationMethod.Percentile}[method]
    dst = Path(f"{out}_deploy_model.onnx")
    quantize_static(str(src), str(dst), bench_ptq.batch_reader(batches), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=algo)
    return dst


def logits(path: Path, x: np.ndarray) -> np.ndarray:
    return bench_ptq.session(path, threads=1).run(None, {"input": x})[0].astype(np.float64)


def low_margin_inputs(src: Path, xte: np.ndarray) -> np.ndarray:
    """The LOW_MARGIN blends (of BLENDS, seeded) with the smallest FP32 margin (top-1 minus top-2 logit)."""
    rng = np.random.default_rng(0)
    i, j, a = rng.integers(0, len(xte), BLENDS), rng.integers(0, len(xte), BLENDS), rng.uniform(0.3, 0.7, BLENDS)
    a = a[:, None, None, None].astype(np.float32)
    blends = (a * xte[i] + (1 - a) * xte[j]).astype(np.float32)
    fp32 = np.concatenate([logits(src, blends[k:k + 2000]) for k in range(0, BLENDS, 2000)])
    top2 = np.sort(fp32, axis=1)[:, -2:]
    return blends[np.argsort(top2[:, 1] - top2[:, 0])[:LOW_MARGIN]]


class Paired:
    """Per-image error power and agreement of every method on the same inputs, with seeded bootstrap
    confidence intervals (the same resamples for every method, so differences are paired) and McNemar's exact
    test of agreement against a reference method."""

    def __init__(self, ref: np.ndarray, boot: int = BOOT):
        self.ref = ref
        self.power = (ref ** 2).sum(1)
        self.idx = np.random.default_rng(1).integers(0, len(ref), (boot, len(ref)))
        self.err: dict[str, np.ndarray] = {}
        self.agree: dict[str, np.ndarray] = {}

    def add(self, method: str, got: np.ndarray) -> None:
        self.err[method] = ((got - self.ref) ** 2).sum(1)
        self.agree[method] = (got.argmax(1) == self.ref.argmax(1)).astype(np.float64)

    def sqnr(self, m: str) -> float:
        return float(10 * np.log10(self.power.sum() / self.err[m].sum()))

    def _sqnr_boot(self, m: str) -> np.ndarray:
        return 10 * np.log10(self.power[self.idx].sum(1) / self.err[m][self.idx].sum(1))

    @staticmethod
    def _ci(v: np.ndarray) -> tuple[float, float]:
        lo, hi = np.percentile(v, [2.5, 97.5])
        return float(lo), float(hi)

    def sqnr_ci(self, m: str) -> tuple[float, float]:
        return self._ci(self._sqnr_boot(m))

    def agree_ci(self, m: str) -> tuple[float, float]:
        return self._ci(self.agree[m][self.idx].mean(1))

    def sqnr_diff(self, m: str, base: str) -> tuple[float, float, float]:
        return self.sqnr(m) - self.sqnr(base), *self._ci(self._sqnr_boot(m) - self._sqnr_boot(base))

    def agree_diff(self, m: str, base: str) -> tuple[float, float, float, float]:
        """Agreement of ``m`` minus ``base``, its paired 95% bootstrap CI and McNemar's exact two-sided p."""
        from scipy.stats import binomtest

        d = self.agree[m] - self.agree[base]
        wins, losses = int((d > 0).sum()), int((d < 0).sum())
        p = binomtest(wins, wins + losses, 0.5).pvalue if wins + losses else 1.0
        return float(d.mean()), *self._ci(d[self.idx].mean(1)), float(p)


def evaluate(name: str, method: str, src: Path, x: np.ndarray, xte: np.ndarray, yte: np.ndarray):
    """Quantize with ``method`` and return (logits on ``x``, accuracy on the test digits, wall), cached as .npz."""
    cache = WORK / f"{name}_{method}_eval.npz"
    t = time.perf_counter()
    dst = quantize(method, src, WORK / f"{name}_{method}")
    wall = time.perf_counter() - t
    got = logits(dst, x)
    acc = float((logits(dst, xte).argmax(1) == yte).mean())
    np.savez(cache, got=got, acc=acc, wall=wall)
    return got, acc, wall


def peer_of(method: str) -> bool:
    return method.split("-")[0] not in ("omct",)


def main() -> None:
    global LOW_MARGIN, BLENDS
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    peers = [m for tool, ms in PEER_METHODS.items() if f"{tool.upper()}_PYTHON" in os.environ for m in ms]
    ap.add_argument("--methods", nargs="+", default=METHODS + peers)
    ap.add_argument("--cached", nargs="*", default=[], metavar="METHOD",
                    help="take these methods' logits and wall from an earlier run's .npz instead of rerunning them")
    ap.add_argument("--out", default=str(RESULTS / "adaround.md"))
    ap.add_argument("--wall-ratio", type=int, metavar="N",
                    help="only time the methods: N alternating runs each, minimum wall and its ratio to the first")
    ap.add_argument("--low-margin", type=int, default=LOW_MARGIN, metavar="N",
                    help=f"judge on the N lowest-margin blends of 20 * N (default {LOW_MARGIN}); a larger N narrows "
                         "the agreement intervals")
    ap.add_argument("--peer-child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    LOW_MARGIN, BLENDS = args.low_margin, 20 * args.low_margin
    if args.peer_child:
        PEER_CHILDREN[args.peer_child[0].split("-")[0]](*args.peer_child)
        return
    if args.wall_ratio:
        for name in args.models:
            src = ensure_model(name)
            quantize(args.methods[0], src, WORK / f"wall_{name}")  # imports and caches warm
            walls = {m: [] for m in args.methods}
            for _ in range(args.wall_ratio):
                for m in args.methods:
                    t = time.perf_counter()
                    quantize(m, src, WORK / f"wall_{name}_{m}")
                    walls[m].append(time.perf_counter() - t)
            base = min(walls[args.methods[0]])
            print(name, "  ".join(f"{m} {min(v):.2f} s ({min(v) / base:.2f}x)" for m, v in walls.items()), flush=True)
        return
    _, _, xte, yte = data()
    lines = ["# AdaRound benchmark (`benchmarks/bench_adaround.py`)", "",
             "Digits at 32 x 32 x 3 (scikit-learn; no harder image data or pretrained weights were obtainable here),",
             f"calibration {BATCH_NUM} x {CALIB_BATCH} images; logit SQNR and top-1 agreement vs FP32 on the {LOW_MARGIN}",
             f"lowest-margin of {BLENDS} blends of two test digits; accuracy on the 500 plain test digits;",
             "wall = calibration + export on a shared 2-core host (one thread; compare ratios); a peer tool's wall",
             "includes starting its Python and importing it (AIMET: torch too). [a, b]: 95% bootstrap interval",
             f"({BOOT} resamples of the {LOW_MARGIN} images, the same for every method); d vs omct: the method minus omct's",
             "default on the same images (paired bootstrap interval); p: McNemar's exact test of the agreement difference.",
             "", "    " + " ".join([f"{k}={os.environ[k]}" for k in ("NNCF_PYTHON", "AIMET_PYTHON", "QUARK_PYTHON")
                                    if k in os.environ] + ["python"] + sys.argv), ""]
    if any(peer_of(m) and m.split("-")[0] in PEER_METHODS for m in args.methods):
        lines += [f"Peers: {', '.join(peer_versions())}.", ""]
    lines += ["| model | method | logit SQNR (dB) | d SQNR vs omct | agreement | d agreement vs omct (p) | "
              "accuracy (FP32) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    failed, verdicts = [], []
    for name in args.models:
        src = ensure_model(name)
        x = low_margin_inputs(src, xte)
        ref = logits(src, x)
        fp32_acc = float((logits(src, xte).argmax(1) == yte).mean())
        pair, info = Paired(ref), {}
        for method in args.methods:
            cache = WORK / f"{name}_{method}_eval.npz"
            if method in args.cached and cache.exists():
                z = np.load(cache)
                got, acc, wall = z["got"], float(z["acc"]), float(z["wall"])
            else:
                try:
                    got, acc, wall = evaluate(name, method, src, x, xte, yte)
                except subprocess.CalledProcessError:  # a peer tool that fails on this model: say so in the table
                    failed.append((name, method))
                    print(f"{name:13s} {method:15s} failed: see {WORK / f'{name}_{method}.log'}", flush=True)
                    continue
            pair.add(method, got)
            info[method] = (acc, wall)
            print(f"{name:13s} {method:18s} SQNR {pair.sqnr(method):6.2f} dB  agreement "
                  f"{pair.agree[method].mean():.3f}  accuracy {acc:.3f}  {wall:6.1f} s", flush=True)
        base = "omct" if "omct" in pair.err else next(iter(pair.err))
        for m, (acc, wall) in info.items():
            lo, hi = pair.sqnr_ci(m)
            alo, ahi = pair.agree_ci(m)
            ds, dslo, dshi = pair.sqnr_diff(m, base)
            da, dalo, dahi, p = pair.agree_diff(m, base)
            lines.append(f"| {name} | {m} | {pair.sqnr(m):.2f} [{lo:.2f}, {hi:.2f}] | "
                         + ("" if m == base else f"{ds:+.2f} [{dslo:+.2f}, {dshi:+.2f}]") + " | "
                         f"{pair.agree[m].mean():.3f} [{alo:.3f}, {ahi:.3f}] | "
                         + ("" if m == base else f"{da:+.3f} [{dalo:+.3f}, {dahi:+.3f}] ({p:.2g})") + " | "
                         f"{acc:.3f} ({fp32_acc:.3f}) | {wall:.1f} |")
        peer_rows = [m for m in info if peer_of(m)]
        if peer_rows and base == "omct":
            best_s = max(peer_rows, key=pair.sqnr)
            best_a = max(peer_rows, key=lambda m: pair.agree[m].mean())
            ds, dslo, dshi = pair.sqnr_diff(base, best_s)
            da, dalo, dahi, p = pair.agree_diff(base, best_a)
            verdicts.append(f"* {name}: omct's default minus the best peer by SQNR ({best_s}): {ds:+.2f} dB "
                            f"[{dslo:+.2f}, {dshi:+.2f}]; minus the best peer by agreement ({best_a}): {da:+.3f} "
                            f"[{dalo:+.3f}, {dahi:+.3f}], McNemar p = {p:.2g}.")
    lines += [f"| {m} | {k} | failed (the tool raised; log in benchmarks/work/adaround/) | | | | | |" for m, k in failed]
    lines += [""] + verdicts if verdicts else []
    lines += PEER_NOTES.rstrip().split("\n") if any(peer_of(m) for m in args.methods) else []
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
