"""TensorFlow post-training INT8, side by side, on Keras models trained here on the digits (32x32, NHWC):

* omct: ``omct.tensorflow`` (AMCT's call sequence, IFMR, BatchNorm folded), deploy model in ONNX Runtime;
* TFLite: the TFLite converter's full-integer quantization (``representative_dataset``, ``TFLITE_BUILTINS_INT8``;
  float input and output, every op inside int8), run in TFLite's interpreter;
* ORT: tf2onnx conversion then ONNX Runtime's ``quantize_static`` (QDQ, per-channel weights, MinMax), in ONNX Runtime.

Same 8 calibration batches of 32 for all; accuracy and logit SQNR (against TensorFlow's FP32 logits) on 500
held-out images, and top-1 agreement with TensorFlow's FP32 there; on inputs where a one-image difference means
something: top-1 agreement with FP32 and logit SQNR on the 200 lowest-margin of 2000 blends of two test digits (as
bench_adaround.py builds them); latency at batch 16 on one thread (median of interleaved passes); file size; PTQ
wall time (after the imports, the model in memory). Run by hand, not in CI:

    python benchmarks/bench_tf.py                  # writes benchmarks/results/tf.md
    python benchmarks/bench_tf.py --models cnn
    python benchmarks/bench_tf.py --before         # adds omct without its Flatten rewrite (the tf3 change)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ptq import interleaved_latencies_ms  # noqa: E402 - one interleaved timer for every benchmark

EPOCHS = {"cnn": 5, "resnet": 6, "mobilenet": 8}
CACHE = Path(tempfile.gettempdir()) / "omct_bench_tf"
BATCH, CALIB_BATCHES, THREADS = 32, 8, 1


def trained(name: str, data):
    """The trained Keras model (cached on disk: training the MobileNet takes a minute on one core)."""
    import keras
    import zoo_tf

    path = CACHE / f"{name}.keras"
    if path.is_file():
        return keras.models.load_model(path)
    model, _ = zoo_tf.train(name, data, epochs=EPOCHS[name])
    CACHE.mkdir(exist_ok=True)
    model.save(path)
    return model


def ort_session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class Onnx:
    def __init__(self, path: Path):
        self.session = ort_session(path)
        self.name = self.session.get_inputs()[0].name

    def __call__(self, x):
        return self.session.run(None, {self.name: x})[0]


class TFLite:
    def __init__(self, content: bytes):
        import tensorflow as tf

        self.interpreter = tf.lite.Interpreter(model_content=content, num_threads=THREADS)
        self.index = self.interpreter.get_input_details()[0]["index"]
        self.out = self.interpreter.get_output_details()[0]["index"]
        self.batch = None

    def __call__(self, x):
        if self.batch != len(x):
            self.interpreter.resize_tensor_input(self.index, list(x.shape))
            self.interpreter.allocate_tensors()
            self.batch = len(x)
        self.interpreter.set_tensor(self.index, x)
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.out).copy()

    def run(self, _outputs, feeds):  # the interleaved timer's interface
        return [self(next(iter(feeds.values())))]


def omct_ptq(model, calib, folder: Path) -> Path:
    import omct.tensorflow as amct
    from omct.ui import set_quiet

    set_quiet()
    amct.create_quant_config(str(folder / "config.json"), model, batch_num=len(calib))
    calibration_model = amct.quantize_model(model, str(folder / "config.json"), str(folder / "record.txt"))
    for x in calib:
        calibration_model(x)
    amct.save_model(model, str(folder / "record.txt"), str(folder / "omct"))
    return folder / "omct_deploy_model.onnx"


def omct_before(model, calib, folder: Path) -> Path:
    """omct as before the tf3 branch: Keras' Flatten left as tf2onnx writes it (a Reshape to a run-time shape)."""
    from omct.tensorflow import convert

    saved = convert.reshapes_to_flatten
    convert.reshapes_to_flatten = lambda _model: []
    convert._LAST.clear()  # noqa: SLF001 - convert again, without the rewrite
    try:
        (folder / "before").mkdir(exist_ok=True)
        return omct_ptq(model, calib, folder / "before")
    finally:
        convert.reshapes_to_flatten = saved
        convert._LAST.clear()  # noqa: SLF001


def low_margin(model, x_test: np.ndarray, n: int = 2000, keep: int = 200) -> tuple[np.ndarray, np.ndarray]:
    """The ``keep`` blends ``a * x_i + (1 - a) * x_j`` (a in [0.3, 0.7]) of ``n`` with the smallest FP32 margin (top-1
    minus top-2 logit) and their FP32 logits: inputs where a small error flips the answer."""
    rng = np.random.default_rng(0)
    i, j, a = rng.integers(0, len(x_test), n), rng.integers(0, len(x_test), n), rng.uniform(0.3, 0.7, n)
    a = a[:, None, None, None]
    blends = (a * x_test[i] + (1 - a) * x_test[j]).astype(np.float32)
    logits = np.asarray(model(blends))
    top2 = np.sort(logits, axis=1)[:, -2:]
    pick = np.argsort(top2[:, 1] - top2[:, 0])[:keep]
    return blends[pick], logits[pick]


def tflite_ptq(model, calib) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]

    def representative():
        for x in calib:
            for i in range(len(x)):  # the converter calibrates on single samples
                yield [x[i:i + 1]]

    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    return converter.convert()


def float_onnx(model, folder: Path) -> Path:
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name="image"),)
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=17)
    path = folder / "fp32.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def ort_ptq(model, calib, folder: Path) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    src = float_onnx(model, folder / "ort")
    name = ort_session(src).get_inputs()[0].name

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(calib)

        def get_next(self):
            b = next(self.it, None)
            return None if b is None else {name: b}

    out = folder / "ort" / "ort_qdq.onnx"
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def sqnr_db(ref: np.ndarray, got: np.ndarray) -> float:
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(EPOCHS))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tf.md"))
    parser.add_argument("--before", action="store_true", help="also omct without the tf3 Flatten rewrite")
    args = parser.parse_args()
    import zoo_tf

    data = zoo_tf.digits_nhwc(32)
    x_train, _, x_test, y_test = data
    calib = [x_train[i * BATCH:(i + 1) * BATCH] for i in range(CALIB_BATCHES)]
    feeds16 = {"x": x_test[:16]}
    rows = []
    for name in args.models:
        model = trained(name, data)
        ref = np.asarray(model(x_test))
        fp32 = float((ref.argmax(1) == y_test).mean())
        x_low, ref_low = low_margin(model, x_test)
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            (folder / "ort").mkdir()
            runners, results = {}, {}
            fp_path = float_onnx(model, folder)
            runners["fp32 (tf2onnx, ORT)"] = (Onnx(fp_path), os.path.getsize(fp_path), 0.0)
            t = time.perf_counter()
            path = omct_ptq(model, calib, folder)
            runners["omct"] = (Onnx(path), os.path.getsize(path), time.perf_counter() - t)
            if args.before:
                t = time.perf_counter()
                path = omct_before(model, calib, folder)
                runners["omct before (Flatten as run-time Reshape)"] = (Onnx(path), os.path.getsize(path),
                                                                        time.perf_counter() - t)
            t = time.perf_counter()
            content = tflite_ptq(model, calib)
            runners["TFLite full-int8"] = (TFLite(content), len(content), time.perf_counter() - t)
            t = time.perf_counter()
            path = ort_ptq(model, calib, folder)
            runners["tf2onnx + ORT quantize_static"] = (Onnx(path), os.path.getsize(path), time.perf_counter() - t)
            sessions = []
            for method, (runner, size, wall) in runners.items():
                logits = np.concatenate([runner(x_test[i:i + 100]) for i in range(0, len(x_test), 100)])
                low = runner(x_low)
                results[method] = [float((logits.argmax(1) == y_test).mean()), sqnr_db(ref, logits),
                                   int((logits.argmax(1) == ref.argmax(1)).sum()),
                                   float((low.argmax(1) == ref_low.argmax(1)).mean()), sqnr_db(ref_low, low), size, wall]

                class Timed:  # the timer feeds {name: x}; each runner takes x
                    def __init__(self, r):
                        self.r = r

                    def run(self, _o, f):
                        return [self.r(f["x"])]
                sessions.append(Timed(runner))
            lat = interleaved_latencies_ms(sessions, feeds16, passes=5, runs=30)
        base = lat[0]
        rows.append(f"| {name} | TensorFlow FP32 | {fp32:.4f} | - | - | - | - | - | - | - | - |")
        for (method, (acc, sq, same, agree, sq_low, size, wall)), ms in zip(results.items(), lat, strict=True):
            fp = method.startswith("fp32")
            sq_text = "-" if fp else f"{sq:.1f}"
            low_text = "- | -" if fp else f"{agree:.3f} | {sq_low:.1f}"
            rows.append(f"| {name} | {method} | {acc:.4f} | {sq_text} | {same}/{len(ref)} | {low_text} | {ms:.3f} | "
                        f"{ms / base:.2f}x | {size / 1024:.0f} | {wall:.2f} |")
        print("\n".join(rows[-len(results) - 1:]), flush=True)
    text = ("TensorFlow PTQ benchmark (`python benchmarks/bench_tf.py`): Keras models trained on the digits at 32x32 (NHWC), "
            f"{CALIB_BATCHES} calibration batches of {BATCH} for every method; accuracy and logit SQNR (against "
            "TensorFlow's FP32 logits) on 500 held-out images, and how many of them get FP32's top-1; top-1 agreement "
            "with FP32 and logit SQNR on the 200 lowest-margin of 2000 blends of two test digits (low-margin inputs, "
            "where a one-image difference in accuracy can be told from noise); latency at batch 16 on 1 thread, "
            "median of interleaved "
            "passes (ONNX Runtime for FP32, omct and ORT; TFLite's interpreter for TFLite); size of the deployed file; "
            "PTQ wall time after the imports, the trained model in memory. The host was shared with other jobs: "
            "compare ratios within a model, not absolute times.\n\n"
            "| model | method | accuracy | logit SQNR dB | top-1 = FP32 | low-margin agreement | low-margin SQNR dB | "
            "latency ms | vs FP32 ONNX | size KiB | PTQ wall s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    Path(args.out).write_text(text)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
