"""Where a quantized model's logit error comes from: an error budget per activation site and per layer's weights.

Starts from omct's fake-quant model of a bench_adaround.py replica and, on the benchmark's 1000 low-margin images,
measures the logit error power (relative to FP32's logit power, so 10 log10(1/x) is a logit SQNR) of variants:
everything quantized; weights only (every activation site bypassed); activations only (the float weights and
biases of the FP32 model back); and each activation site / each layer's weights alone. Single-source errors add
up to roughly the total (they are nearly independent), so the table is a budget. Run by hand:

    python benchmarks/error_budget.py mobilenet_v2 [METHOD]   # after bench_adaround.py made the models
    python benchmarks/error_budget.py mobilenet_v2 omct --range-sweep 0.9 1.0   # all activation ranges scaled
    python benchmarks/error_budget.py mobilenet_v2 omct --what-if [SITE ...]   # float pre-Add Convs, per channel, ...
    python benchmarks/error_budget.py mobilenet_v2 omct --mean-part   # what a full bias correction could remove
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adaround as ba  # noqa: E402
from stream_equalization import add_groups  # noqa: E402


def sites(model: onnx.ModelProto) -> dict[str, tuple[str, list[onnx.NodeProto]]]:
    """Activation site output tensor -> (its float input, the six fake-quant nodes)."""
    by_out = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "Mul" and n.name.endswith(".dequantized_Mul"):
            chain, t = [n], n.input[0]
            for _ in range(5):
                p = by_out[t]
                chain.append(p)
                t = p.input[0]
            out[n.output[0]] = (t, chain)
    return out


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def site_kind(fp32: onnx.ModelProto, site: str) -> str:
    """What an activation site quantizes: the model input, a ReLU/ReLU6 output (after a depthwise or another
    convolution), a convolution's linear output, an Add, or the classifier's input."""
    prod = {o: n for n in fp32.graph.node for o in n.output}
    n = prod.get(site)
    if n is None:
        return "activation: model input"
    if n.op_type in ("Clip", "Relu"):
        conv = prod.get(n.input[0])
        dw = conv is not None and conv.op_type == "Conv" and _group(conv) > 1
        return f"activation: {n.op_type} output after {'depthwise ' if dw else ''}{conv.op_type if conv else '?'}"
    if n.op_type == "Conv":
        return "activation: Conv linear output (no activation)"
    if n.op_type in ("GlobalAveragePool", "Flatten"):
        return "activation: classifier input (pool/flatten)"
    return f"activation: {n.op_type} output"


def layer_kind(fp32: onnx.ModelProto, layer: str) -> str:
    n = next(m for m in fp32.graph.node if m.name == layer)
    return f"weights: {'depthwise ' if n.op_type == 'Conv' and _group(n) > 1 else ''}{n.op_type}"


def variant(model: onnx.ModelProto, fp32: onnx.ModelProto, bypass: set[str], float_layers: set[str]) -> bytes:
    """``model`` with the activation sites in ``bypass`` removed and the layers in ``float_layers`` given their
    FP32 weight and bias."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    s = sites(m)
    drop = {id(x) for t in bypass for x in s[t][1]}
    keep = [n for n in m.graph.node if id(n) not in drop]
    keep += [helper.make_node("Identity", [s[t][0]], [t]) for t in bypass]
    del m.graph.node[:]
    m.graph.node.extend(keep)
    finit = {t.name: t for t in fp32.graph.initializer}
    fnodes = {n.name: n for n in fp32.graph.node}
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.name in float_layers:
            f = fnodes[n.name]
            for k in (1, 2):
                if k < len(n.input) and k < len(f.input):
                    inits[n.input[k]].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(finit[f.input[k]]),
                                                                       n.input[k]))
    from omct.graph.export import toposort
    toposort(m.graph)
    return m.SerializeToString()


def range_sweep(name: str, method: str, ratios: list[float]) -> None:
    """Every activation range but the model input's scaled by each ratio (offsets kept): logit SQNR on the
    low-margin blends, on the plain test digits and on the calibration digits."""
    src = ba.ensure_model(name)
    xtr, _, xte, _ = ba.data()
    feeds = {"low-margin blends": ba.low_margin_inputs(src, xte), "test digits": xte, "calibration digits": xtr[:256]}
    refs = {k: ba.logits(src, v) for k, v in feeds.items()}
    fq = onnx.load(str(ba.WORK / f"{name}_{method}_fake_quant_model.onnx"))
    scales = {n for t, (_, chain) in sites(fq).items() if not t.startswith("input.")
              for n in (chain[0].input[1], chain[5].input[1])}
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    for r in ratios:
        m = onnx.ModelProto()
        m.CopyFrom(fq)
        for t in m.graph.initializer:
            if t.name in scales:
                t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * r).astype(np.float32), t.name))
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        res = []
        for k, v in feeds.items():
            got = sess.run(None, {"input": v})[0].astype(np.float64)
            res.append(f"{k} {10 * np.log10((refs[k] ** 2).sum() / ((got - refs[k]) ** 2).sum()):.2f} dB")
        print(f"ranges x {r}: " + ", ".join(res), flush=True)


def what_ifs(name: str, method: str, keep_float: list[str]) -> None:
    """Two structural what-ifs on the quantized model, same images: the Conv outputs that only an Add reads kept
    in float (no integer QLinearConv output / QLinearAdd input there), and every 4-D activation site per channel
    (each channel's scale shrunk by its calibration max |x| over the tensor's: the most any channel equalization
    could do for activation noise)."""
    src = ba.ensure_model(name)
    xtr, _, xte, _ = ba.data()
    x = ba.low_margin_inputs(src, xte)
    ref = ba.logits(src, x)
    fp32 = onnx.load(str(src))
    fq = onnx.load(str(ba.WORK / f"{name}_{method}_fake_quant_model.onnx"))
    s = sites(fq)
    prod = {o: n for n in fp32.graph.node for o in n.output}
    readers: dict[str, set[str]] = {}
    for n in fp32.graph.node:
        for i in n.input:
            readers.setdefault(i, set()).add(n.op_type)
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3

    def report(label: str, model: bytes) -> None:
        got = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        got = got.astype(np.float64)
        print(f"{name} {method} {label}: {10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum()):.2f} dB, "
              f"agreement {(got.argmax(1) == ref.argmax(1)).mean():.3f}", flush=True)

    report("as quantized", variant(fq, fp32, set(), set()))
    if keep_float:  # named sites left unquantized: what mixed precision (16-bit there) could give at most
        chosen = {t for t in s if any(t.endswith(k) for k in keep_float)}
        report(f"{len(chosen)} named sites float", variant(fq, fp32, chosen, set()))
    pre_add = {t for t in s if t in prod and prod[t].op_type == "Conv" and readers.get(t) == {"Add"}}
    report(f"{len(pre_add)} Conv outputs read only by an Add kept float", variant(fq, fp32, pre_add, set()))
    # every Add's inputs and output on one grid (the widest of them), so the integer Add itself rounds nothing
    m = onnx.ModelProto()
    m.CopyFrom(fq)
    inits = {t.name: t for t in m.graph.initializer}
    groups = add_groups(fp32.graph.node, lambda n: all(t in s for t in (*n.input, n.output[0])))

    def grid(t: str) -> tuple[float, float]:
        chain = s[t][1]
        return (float(numpy_helper.to_array(inits[chain[0].input[1]])),
                float(numpy_helper.to_array(inits[chain[1].input[1]])))

    for members in groups.values():
        widest = max(members, key=lambda t: grid(t)[0])
        scale, offset = grid(widest)
        for t in members:
            chain = s[t][1]
            for k, v in ((chain[0].input[1], scale), (chain[5].input[1], scale), (chain[1].input[1], offset),
                         (chain[3].input[1], offset)):
                inits[k].CopyFrom(numpy_helper.from_array(np.asarray(v, np.float32).reshape(inits[k].dims), k))
    n_sites = sum(map(len, groups.values()))
    report(f"Adds' inputs and outputs on one grid ({len(groups)} groups of {n_sites} sites)", m.SerializeToString())
    bases = {t: (i[:-6] if i.endswith(".float") else i) for t, (i, _) in s.items()}
    probe = onnx.load(str(src))
    names = sorted({b for b in bases.values() if b in prod})
    for b in names:
        probe.graph.output.append(helper.make_tensor_value_info(b, onnx.TensorProto.FLOAT, None))
    vals = dict(zip(names, ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
                    .run(names, {"input": xtr[:256]}), strict=True))
    m = onnx.ModelProto()
    m.CopyFrom(fq)
    inits = {t.name: t for t in m.graph.initializer}
    count = 0
    for t, (_, chain) in s.items():
        v = vals.get(bases[t])
        if v is None or v.ndim != 4:
            continue
        r = np.abs(v).max(axis=(0, 2, 3))
        f = np.maximum(r / r.max(), 1e-3).reshape(1, -1, 1, 1)
        for k in {chain[0].input[1], chain[5].input[1]}:
            inits[k].CopyFrom(numpy_helper.from_array((numpy_helper.to_array(inits[k]) * f).astype(np.float32), k))
        count += 1
    report(f"{count} activation sites per channel", m.SerializeToString())


def mean_part(name: str, method: str) -> None:
    """What a full bias correction could remove: at every Conv's output, the share of the quantized model's error
    power that is a per-channel constant (the error's mean over images and positions), on the calibration digits
    and on the low-margin blends."""
    import onnxruntime as ort
    src = ba.ensure_model(name)
    xtr, _, xte, _ = ba.data()
    fp32 = onnx.load(str(src))
    fq = onnx.load(str(ba.WORK / f"{name}_{method}_fake_quant_model.onnx"))
    in_fq = {o for n in fq.graph.node for o in n.output}
    pairs = [(n.output[0], n.output[0] if n.output[0] in in_fq else n.output[0] + ".float")
             for n in fp32.graph.node if n.op_type == "Conv"]
    pairs = [(f, q) for f, q in pairs if q in in_fq]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sessions = []
    for model, names in ((fp32, [f for f, _ in pairs]), (fq, [q for _, q in pairs])):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in names:
            m.graph.output.append(helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
        sessions.append((ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]), names))
    for label, data in (("calibration digits", xtr[:256]), ("low-margin blends", ba.low_margin_inputs(src, xte))):
        (sf, nf), (sq, nq) = sessions
        shares = []
        for a, b in zip(sf.run(nf, {"input": data}), sq.run(nq, {"input": data}), strict=True):
            e = (b - a).astype(np.float64)
            m = e.mean(axis=(0, 2, 3))
            shares.append((m ** 2).sum() * e.size / e.shape[1] / (e ** 2).sum())
        worst = int(np.argmax(shares))
        print(f"{name} {method} {label}: per-channel mean error / error power at {len(shares)} Conv outputs: median "
              f"{np.median(shares):.3f}, max {shares[worst]:.3f} ({pairs[worst][0]})", flush=True)


def main() -> None:
    name = sys.argv[1]
    method = sys.argv[2] if len(sys.argv) > 2 else "omct"
    if len(sys.argv) > 3 and sys.argv[3] == "--mean-part":
        mean_part(name, method)
        return
    if len(sys.argv) > 3 and sys.argv[3] == "--what-if":
        what_ifs(name, method, sys.argv[4:])
        return
    if len(sys.argv) > 3 and sys.argv[3] == "--range-sweep":
        range_sweep(name, method, [float(r) for r in sys.argv[4:]] or [0.85, 0.9, 0.95, 1.0, 1.05])
        return
    src = ba.ensure_model(name)
    _, _, xte, _ = ba.data()
    x = ba.low_margin_inputs(src, xte)
    ref = ba.logits(src, x)
    power = (ref ** 2).sum()
    fp32 = onnx.load(str(src))
    fq = onnx.load(str(ba.WORK / f"{name}_{method}_fake_quant_model.onnx"))
    all_sites = list(sites(fq))
    layers = [n.name for n in fq.graph.node if n.op_type in ("Conv", "Gemm")]

    def err(bypass, float_layers) -> float:
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(variant(fq, fp32, set(bypass), set(float_layers)), so,
                                    providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": x})[0].astype(np.float64)
        return float(((got - ref) ** 2).sum() / power)

    db = lambda e: 10 * np.log10(1 / e) if e > 0 else float("inf")  # noqa: E731
    total = err([], [])
    w_only = err(all_sites, [])
    a_only = err([], layers)
    print(f"{name} {method}: all {db(total):.2f} dB  weights only {db(w_only):.2f} dB  activations only {db(a_only):.2f} dB")
    rows = []
    for t in all_sites:
        rows.append(("act", t, err([u for u in all_sites if u != t], layers)))
    for n in layers:
        rows.append(("wts", n, err(all_sites, [m for m in layers if m != n])))
    s = sum(r[2] for r in rows)
    print(f"sum of single sources {db(s):.2f} dB (error power {s:.4g} vs all {total:.4g})")
    kinds: dict[str, float] = {}
    for kind, t, e in rows:
        k = site_kind(fp32, t) if kind == "act" else layer_kind(fp32, t)
        kinds[k] = kinds.get(k, 0.0) + e
    print("by kind (share of the sum of single sources):")
    for k, e in sorted(kinds.items(), key=lambda r: -r[1]):
        print(f"  {k:48s} {e / s * 100:5.1f}%")
    for kind, t, e in sorted(rows, key=lambda r: -r[2]):
        print(f"{kind} {e / s * 100:5.1f}%  {db(e):6.2f} dB  {t}")


if __name__ == "__main__":
    main()
