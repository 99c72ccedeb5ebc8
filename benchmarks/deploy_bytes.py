"""Where the bytes of an ONNX (deploy) model go: initializer data by kind, initializer headers, nodes, names,
metadata. Used to find the fixed per-layer overhead of omct's deploy files (docs/NUQ.md, "The deploy file").

    python benchmarks/deploy_bytes.py model.onnx [more.onnx ...]
"""

from __future__ import annotations

import sys
from collections import Counter

import onnx


def kind(t: onnx.TensorProto) -> str:
    """What an initializer holds, from its type and shape (names are not relied on)."""
    T = onnx.TensorProto
    n = 1
    for d in t.dims:
        n *= d
    if t.data_type == T.UINT8 and len(t.dims) == 3:
        return "NUQ packed indices"
    if t.data_type == T.INT8 and len(t.dims) >= 2:
        return "INT8 weights / level tables" if n > 1 else "zero points"
    if t.data_type == T.FLOAT and len(t.dims) >= 2:
        return "float weights"
    if t.data_type == T.INT32 and n > 1:
        return "INT32 biases"
    if t.data_type == T.FLOAT:
        return "float vectors (scales, float biases)"
    if t.data_type in (T.INT8, T.UINT8) and len(t.dims) <= 1:
        return "zero points"
    return "other constants (shapes, unpacking)"


def breakdown(path: str) -> Counter:
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    c: Counter = Counter()
    for t in g.initializer:
        data = t.ByteSize() - len(t.name) - 2  # the tensor's data and header, without its name
        c["initializer: " + kind(t)] += data
        c["names: initializers"] += len(t.name) + 2
    for n in g.node:
        names = len(n.name) + sum(len(x) for x in [*n.input, *n.output])
        c["names: node and edge names"] += names
        c["nodes without their names"] += n.ByteSize() - names
    c["metadata"] = sum(p.ByteSize() for p in m.metadata_props)
    c["graph inputs/outputs, value_info"] = sum(v.ByteSize() for v in [*g.input, *g.output, *g.value_info])
    c["rest (model header, opsets)"] = m.ByteSize() - sum(c.values())
    return c


def main() -> None:
    for path in sys.argv[1:]:
        c = breakdown(path)
        total = sum(c.values())
        print(f"{path}: {total} bytes")
        for k, v in c.most_common():
            if v:
                print(f"  {v:>10}  {v / total:6.1%}  {k}")


if __name__ == "__main__":
    main()
