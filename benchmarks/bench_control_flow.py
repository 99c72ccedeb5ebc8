"""Layers inside control flow (issue 17, item 10): a VAD whose ``if sr == 16000`` picks one of two Conv1d stacks, a
Silero VAD v5 replica (``tests/real_models.silero_vad``: STFT conv, encoder, LSTM cell on a ``state`` input),
both made with torch.jit.script + the TorchScript exporter as Silero's ONNX file is, and a scripted RNN (a Loop
over time steps with two Linear layers in its body). Each is quantized once with calibration batches that reach
every branch, and by ONNX Runtime's ``quantize_static`` on the same batches; reported: integer kernels in ONNX
Runtime's optimised bodies, output SQNR against FP32 and latency against FP32 (interleaved), per sample rate.
``--before PATH``: first run the same with the omct checkout at PATH (what it said about these models). By hand:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_control_flow.py [--before /work/main]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ptq import interleaved_latencies_ms  # noqa: E402 - one interleaved timer for every benchmark


def build(folder: Path) -> tuple[Path, Path, Path]:
    import real_models
    import torch

    def stack(channels: int, stride: int) -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = [torch.nn.Conv1d(1, channels, 9, stride=stride, padding=4), torch.nn.ReLU()]
        for _ in range(4):
            layers += [torch.nn.Conv1d(channels, channels, 3, padding=1), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers, torch.nn.Conv1d(channels, 1, 1))  # logits (Silero adds a Sigmoid)

    class Vad(torch.nn.Module):  # no __init__ of its own: TorchScript compiles forward only
        def forward(self, x, sr):
            if sr == 16000:
                return self.net16(x)
            return self.net8(x)

    class Rnn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inp, self.rec, self.out = torch.nn.Linear(64, 256), torch.nn.Linear(256, 256), torch.nn.Linear(256, 10)

        def forward(self, x):
            h = torch.zeros(x.size(0), 256)
            for t in range(x.size(1)):
                h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            return self.out(h)

    torch.manual_seed(0)
    vad = Vad()
    vad.net16, vad.net8 = stack(128, 4), stack(128, 2)
    silero = real_models.silero_vad(width=128)  # Silero VAD v5's structure (tests/real_models.py)
    rnn = Rnn()
    vad_path, rnn_path, silero_path = folder / "vad.onnx", folder / "rnn.onnx", folder / "silero.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(vad), (torch.randn(2, 1, 512), torch.tensor(16000)), str(vad_path),
                          dynamo=False, input_names=["x", "sr"], output_names=["prob"], opset_version=17,
                          dynamic_axes={"x": {0: "n", 2: "samples"}})
        torch.onnx.export(torch.jit.script(rnn), (torch.randn(2, 5, 64),), str(rnn_path), dynamo=False,
                          input_names=["x"], output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "n", 1: "t"}})
        torch.onnx.export(torch.jit.script(silero), (torch.randn(2, 512), torch.zeros(2, 2, 128), 16000), str(silero_path),
                          dynamo=False, input_names=["input", "state", "sr"], output_names=["output", "stateN"],
                          opset_version=17, dynamic_axes={"input": {0: "n", 1: "samples"}, "state": {1: "n"}})
    return vad_path, rnn_path, silero_path


def feeds(rng, name: str, sr: int = 16000, n: int = 32) -> dict:
    if name == "silero":
        return {"input": rng.normal(size=(n, 512 if sr == 16000 else 256)).astype(np.float32),
                "state": (rng.normal(size=(2, n, 128)) * 0.5).astype(np.float32), "sr": np.array(sr, np.int64)}
    if name == "vad":
        return {"x": rng.normal(size=(n, 1, 512 if sr == 16000 else 256)).astype(np.float32),
                "sr": np.array(sr, np.int64)}
    return {"x": rng.normal(size=(n, 24, 64)).astype(np.float32)}


def quantize(src: Path, folder: Path, batches: list[dict]) -> tuple[str, Path | None]:
    import omct.onnx as amct

    cfg, mod, rec = folder / "c.json", folder / "mod.onnx", folder / "rec.txt"
    try:
        amct.create_quant_config(str(cfg), str(src), batch_num=len(batches))
    except Exception as e:  # noqa: BLE001 - the before run reports what omct said
        return f"refused: {str(e)[:160]}", None
    amct.quantize_model(str(cfg), str(src), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    for b in batches:
        sess.run(None, b)
    amct.save_model(str(mod), str(rec), str(folder / "q"))
    return "quantized", folder / "q_deploy_model.onnx"


def ort_quantize(src: Path, folder: Path, batches: list[dict]) -> Path:
    """ONNX Runtime's own ``quantize_static`` (QDQ, uint8 activations, per-channel int8 weights, MinMax)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            return next(self.batches, None)

    out = folder / "ort_qdq.onnx"
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    return out


def body_ops(path: Path, folder: Path) -> dict[str, int]:
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(folder / "opt.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    count: dict[str, int] = {}

    def walk(graph, inside: bool) -> None:
        for n in graph.node:
            if inside:
                count[n.op_type] = count.get(n.op_type, 0) + 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g, True)

    walk(onnx.load(so.optimized_model_filepath).graph, False)
    return count


def session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(out_lines: list[str], ort_too: bool) -> None:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        vad, rnn, silero = build(folder)
        cases = [("vad", vad, [feeds(rng, "vad", sr) for sr in (16000, 8000) * 4], (16000, 8000)),
                 ("silero", silero, [feeds(rng, "silero", sr) for sr in (16000, 8000) * 4], (16000, 8000)),
                 ("rnn", rnn, [feeds(rng, "rnn") for _ in range(8)], (None,))]
        for name, src, batches, rates in cases:
            work = folder / name
            work.mkdir()
            try:
                status, deploy = quantize(src, work, batches)
                if deploy is not None:
                    session(deploy)
            except Exception as e:  # noqa: BLE001 - the before run reports what went wrong
                status, deploy = f"failed: {str(e).splitlines()[0][:160]}", None
            if deploy is None:
                out_lines.append(f"| {name} | omct: {status} | | | | |")
                print(out_lines[-1], flush=True)
                continue
            models = [("omct", deploy)]
            if ort_too:
                models.append(("ORT quantize_static", ort_quantize(src, work, batches)))
            for sr in rates:
                test = feeds(rng, name, sr or 16000, n=64)
                sessions = [session(src)] + [session(path) for _, path in models]
                ref = sessions[0].run(None, test)[0]
                times = interleaved_latencies_ms(sessions, test, passes=5, runs=20)
                for (who, path), sess, t in zip(models, sessions[1:], times[1:], strict=True):
                    ops = body_ops(path, work)
                    kernels = ", ".join(f"{k} {v}" for k, v in sorted(ops.items())
                                        if k.startswith(("QLinear", "QGemm", "MatMulInt")) or k in ("Conv", "FusedConv",
                                                                                                    "Gemm", "MatMul"))
                    out = sess.run(None, test)[0]
                    sqnr = 10 * np.log10(np.var(ref) / max(float(np.mean((out - ref) ** 2)), 1e-30))  # vs the signal's variation
                    label = f"{name} (sr {sr})" if sr else name
                    out_lines.append(f"| {label} | {who}: {status if who == 'omct' else 'ran'} | {kernels} | {sqnr:.1f} | "
                                     f"{times[0]:.2f} / {t:.2f} | {times[0] / t:.2f}x |")
                    print(out_lines[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="an omct checkout to run first (its result is printed as 'before')")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    head = ["| model | quantizer | ops in the optimised bodies | SQNR dB | FP32 / quantized ms (batch 64) | speed-up |",
            "|---|---|---|---|---|---|"]
    if args.before and not args.child:
        env = {**os.environ, "PYTHONPATH": args.before}
        before = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True,
                                cwd=args.before, check=False)
        print(f"before ({args.before}):")
        print("\n".join(head) + "\n" + before.stdout.strip() + ("\n" + before.stderr[-500:] if before.returncode else ""))
        print("after:")
    if not args.child:
        print("\n".join(head), flush=True)
    run([], not args.child)


if __name__ == "__main__":
    main()
