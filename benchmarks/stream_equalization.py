"""Experiment (issue 18 follow-up): equalize the channels of a model's *linear streams* with data-aware scales and
write the rewritten model (the same function) for seed_sweep.py to quantize.

A stream is a set of tensors joined by Adds (MobileNetV2's residual chain of one stage, or one projection
convolution's output) whose producers are one-group Convs and whose readers are Adds and one-group Convs only:
dividing channel ``i`` of every producer's weight and bias by ``s_i`` and multiplying channel ``i`` of every
reader Conv's weight by ``s_i`` computes the same function. Modes: ``act`` ``s = (R / max R) ** alpha`` (``R``:
the channel's max |x| over the stream's tensors on 256 calibration digits, so small channels get a larger share of
the per-tensor activation range), ``sq`` SmoothQuant's ``R ** alpha / r_B ** (1 - alpha)`` (``r_B``: the readers'
max |w| of the channel), ``cle`` the data-free ``sqrt(r_A / r_B)`` of cross-layer equalization.

    python benchmarks/stream_equalization.py mobilenet_v2 0.5 sq   # writes benchmarks/work/adaround/mobilenet_v2_eqsq0.5.onnx
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_adaround as ba  # noqa: E402
import bench_ptq  # noqa: E402


def _group(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "group"), 1)


def add_groups(nodes, joins=lambda node: True) -> dict[str, set[str]]:
    """The tensors that Add nodes (those ``joins`` accepts) join, inputs and output, in connected groups
    (union-find), keyed by a representative."""
    parent: dict[str, str] = {}

    def find(t: str) -> str:
        parent.setdefault(t, t)
        while parent[t] != t:
            t = parent[t]
        return t

    for n in nodes:
        if n.op_type == "Add" and joins(n):
            for i in n.input:
                parent[find(i)] = find(n.output[0])
    groups: dict[str, set[str]] = {}
    for t in list(parent):
        groups.setdefault(find(t), set()).add(t)
    return groups


def streams(graph: onnx.GraphProto) -> list[tuple[set[str], list, list]]:
    """(tensors, producer Convs, reader Convs) of every stream that can be scaled exactly."""
    prod = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    comps = add_groups(graph.node)
    joined = set().union(*comps.values())
    for n in graph.node:
        if n.op_type == "Conv" and n.output[0] not in joined:
            comps[n.output[0]] = {n.output[0]}
    outputs = {o.name for o in graph.output}
    out = []
    for ts in comps.values():
        producers, consumers, ok = [], [], not (ts & outputs)
        for t in ts:
            p = prod.get(t)
            if p is None or p.op_type not in ("Conv", "Add") or (p.op_type == "Conv" and _group(p) != 1):
                ok = False
                break
            if p.op_type == "Conv":
                producers.append(p)
            for c in readers.get(t, []):
                if c.op_type == "Conv" and c.input[0] == t and _group(c) == 1:
                    consumers.append(c)
                elif c.op_type != "Add":
                    ok = False
        if ok and producers and consumers:
            out.append((ts, producers, consumers))
    return out


def main() -> None:
    name, alpha, mode = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    src = ba.ensure_model(name)
    xtr = ba.data()[0]
    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    found = streams(model.graph)
    probe = onnx.load(str(src))
    tensors = sorted({t for ts, _, _ in found for t in ts})
    for t in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    path = ba.WORK / f"{name}_probe.onnx"
    onnx.save(probe, str(path))
    vals = dict(zip(tensors, bench_ptq.session(path, threads=1).run(tensors, {"input": xtr[:256]}), strict=True))
    arrays: dict[str, np.ndarray] = {}

    def arr(key: str) -> np.ndarray:
        if key not in arrays:
            arrays[key] = numpy_helper.to_array(inits[key]).astype(np.float64)
        return arrays[key]

    for ts, producers, consumers in found:
        r_act = np.max([np.abs(vals[t]).max(axis=(0, 2, 3)) for t in ts], axis=0)
        r_b = np.max([np.abs(arr(c.input[1])).max(axis=(0, 2, 3)) for c in consumers], axis=0)
        if mode == "act":
            s = (r_act / r_act.max()) ** alpha
        elif mode == "cle":
            s = np.sqrt(np.max([np.abs(arr(p.input[1])).max(axis=(1, 2, 3)) for p in producers], axis=0) / r_b)
        else:
            s = r_act ** alpha / r_b ** (1 - alpha)
            s = s / np.exp(np.log(s).mean())
        for p in producers:
            arr(p.input[1])[...] /= s.reshape(-1, 1, 1, 1)
            if len(p.input) > 2 and p.input[2]:
                arr(p.input[2])[...] /= s
        for c in consumers:
            arr(c.input[1])[...] *= s.reshape(1, -1, 1, 1)
        print(f"stream of {len(ts)} tensor(s): {len(producers)} producer(s), {len(consumers)} reader(s), "
              f"s in [{s.min():.2f}, {s.max():.2f}]")
    for key, v in arrays.items():
        inits[key].CopyFrom(numpy_helper.from_array(v.astype(np.float32), key))
    dst = ba.WORK / f"{name}_eq{mode}{alpha:g}.onnx"
    onnx.save(model, str(dst))
    xte = ba.data()[2][:500]
    print(f"wrote {dst}: {len(found)} streams; max |logit change| in FP32 "
          f"{np.abs(ba.logits(src, xte) - ba.logits(dst, xte)).max():.2e}")


if __name__ == "__main__":
    main()
