"""Per-layer output error of NUQ vs uniform weights on a benchmark model's real layers.

For every Conv (group 1) / Gemm of an ONNX model, the layer's input rows (conv patches) are sampled on the
calibration batches as omct's calibration does (``core.adaround.InputSamples``), split into a fitting half
(``H = X^T X / n``) and a held-out half, and each weight method is scored by the relative output error
``||(W - Q) X||^2 / ||W X||^2`` on the held-out half (dB below the output: higher is better):

    int5 / int4        uniform ARQ weights, round to nearest
    nuqN               NUQ-N as omct's default (diagonal importance, nearest level)
    nuqN-gptq          NUQ-N levels, weights assigned GPTQ's way with H (core.gptq.assign), within the bracket

    python benchmarks/nuq_layer_error.py resnet18 --layers 6
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_nuq  # noqa: E402


def layer_inputs(path: Path, calib: list, max_layers: int | None):
    """(name, weight [out, in*kh*kw], rows) for the model's group-1 Conv and Gemm layers."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from omct.core.adaround import InputSamples, Window, layer_seed

    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group", 1) == 1 and node.input[1] in inits:
            w = inits[node.input[1]]
            pads = tuple(attrs.get("pads", [0, 0, 0, 0]))
            win = Window(tuple(w.shape[2:]), tuple(attrs.get("strides", [1, 1])), pads, tuple(attrs.get("dilations", [1, 1])))
            layers.append((node.name, node.input[0], w.reshape(w.shape[0], -1), win))
        elif node.op_type == "Gemm" and node.input[1] in inits and attrs.get("transB", 0) == 1:
            layers.append((node.name, node.input[0], inits[node.input[1]], None))
    layers = layers[:max_layers] if max_layers else layers
    model.graph.output.extend([onnx.ValueInfoProto(name=t) for _, t, _, _ in layers])
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    samples = [InputSamples(win, layer_seed(name)) for name, _, _, win in layers]
    for x in calib:
        outs = sess.run([t for _, t, _, _ in layers], {"input": x})
        for s, o in zip(samples, outs, strict=True):
            s.update(o)
    return [(name, w.astype(np.float64), s.rows.astype(np.float64)) for (name, _, w, _), s in zip(layers, samples, strict=True)]


def methods(w: np.ndarray, fit_rows: np.ndarray, tables: tuple[int, ...] = (0,)) -> dict[str, np.ndarray]:
    from omct.core import gptq, nuq
    from omct.core.weights import arq

    h = fit_rows.T @ fit_rows / len(fit_rows)
    out = {}
    for bits in (5, 4):
        p = arq(w, bits, 0)
        out[f"int{bits}"] = p.dequantize(p.quantize(w))
    imp = (fit_rows ** 2).mean(0)  # the diagonal of H: the per-input importance
    p8 = arq(w, 8, 0)
    for steps, k in ((a, b) for a in (32, 16) for b in tables):
        # importance per column: nuq.fit takes it per input axis; columns here are the axis (in_axis = 1)
        scale, table = nuq.fit(w, p8.scale, 0, 1, steps, 1, imp, num_tables=k)
        s = np.asarray(scale, np.float64).reshape(-1, 1)
        tag = f"nuq{steps}" + (f"t{k}" if k else "")
        out[tag] = nuq.to_levels(w, scale, 0, table) * s
        grid = table.astype(np.float64) * s
        for bracket in (True, False)[:1 if k else 2]:
            idx = gptq.assign(w, grid, h, bracket=bracket)
            out[f"{tag}-gptq{'' if bracket else '-free'}"] = np.take_along_axis(grid, idx, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=[*bench_nuq.MODELS, *bench_nuq.REAL])
    ap.add_argument("--layers", type=int, default=None, help="only the first N layers")
    ap.add_argument("--tables", type=int, nargs="*", default=[0], help="shared tables per layer (0: one per channel)")
    args = ap.parse_args()
    b = bench_nuq.bench_model(args.model)
    table = {}
    for name, w, rows in layer_inputs(b.src, b.calib, args.layers):
        fit_rows, test_rows = rows[0::2], rows[1::2]
        ref = test_rows @ w.T
        res = {}
        for method, q in methods(w, fit_rows, tuple(args.tables)).items():
            err = test_rows @ (w - q).T
            res[method] = 10 * np.log10((ref ** 2).sum() / (err ** 2).sum())
        table[name] = res
        print(f"{name[-24:]:24s} {w.shape[0]:4d}x{w.shape[1]:<5d} "
              + " ".join(f"{m}={v:5.1f}" for m, v in res.items()), flush=True)
    means = {m: np.mean([r[m] for r in table.values()]) for m in next(iter(table.values()))}
    print("mean                               " + " ".join(f"{m}={v:5.1f}" for m, v in means.items()))


if __name__ == "__main__":
    main()
