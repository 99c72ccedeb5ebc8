"""Embedding tables (weight-only INT8, one scale per row): file size and latency of a BERT-mini whose word table
dominates the parameters (vocab 8000, hidden 256, as in Google's BERT-mini), trained a little on the digits as
token sequences (tests/test_pytorch_real_models.py).

Models: FP32; deploy with the embedding tables kept float (``skip_layer_types: "Gather"``: the graph omct wrote
before tables were quantized); deploy with the tables quantized (INT8 rows gathered, then scaled); and, for
comparison, the same tables behind a DequantizeLinear of the whole table in front of the Gather. Run by hand:

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_embeddings.py   # writes benchmarks/results/embeddings.md
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_ptq import interleaved_latencies_ms  # noqa: E402 - one interleaved timer for every benchmark

NAMES = ["input_ids", "attention_mask", "token_type_ids"]


def build(folder: Path):
    import real_models
    import torch
    import torch.nn.functional as F
    import zoo
    from test_pytorch_real_models import _tokens

    torch.set_num_threads(1)
    d = zoo.load_digits(16)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    model = real_models.bert_mini(vocab_size=8000, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=512, max_position_embeddings=64, num_labels=10)
    train = [torch.tensor(a) for a in _tokens(d.x_train, rng)]
    test = [a for a in _tokens(d.x_test, rng)]
    y = torch.tensor(d.y_train)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(*[t[idx] for t in train]), y[idx]).backward()
            opt.step()
    model.eval()
    path = folder / "bert.onnx"
    axes = {n: {0: "batch", 1: "sequence"} for n in NAMES} | {"logits": {0: "batch"}}
    torch.onnx.export(model, tuple(t[:16] for t in train), str(path), dynamo=False, opset_version=17, input_names=NAMES,
                      output_names=["logits"], dynamic_axes=axes)
    calib = [{n: t[16 * i:16 * (i + 1)].numpy() for n, t in zip(NAMES, train, strict=True)} for i in range(8)]
    return path, calib, dict(zip(NAMES, test, strict=True)), d.y_test


def quantize(path: Path, calib, folder: Path, prefix: str, cfg: str | None = None) -> Path:
    import omct.onnx as amct

    c, m, r = folder / f"{prefix}.json", folder / f"{prefix}_mod.onnx", folder / f"{prefix}_rec.txt"
    if cfg is not None:
        (folder / f"{prefix}.cfg").write_text(cfg)
    amct.create_quant_config(str(c), str(path), batch_num=len(calib),
                             config_defination=str(folder / f"{prefix}.cfg") if cfg else None)
    amct.quantize_model(str(c), str(path), str(m), str(r))
    sess = amct.CalibrationSession(str(m))
    for b in calib:
        sess.run(None, b)
    amct.save_model(str(m), str(r), str(folder / prefix))
    return folder / f"{prefix}_deploy_model.onnx"


def whole_table_dequantize(builder, node, codes, params, base):
    """The alternative measured against: DequantizeLinear of the whole INT8 table, then the float Gather."""
    node.input[0] = builder.weight(codes, params, base)


def session(path: Path, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def latencies_ms(paths, feeds, threads: int, passes: int = 5, runs: int = 40) -> list[float]:
    """Median latency of each model, in interleaved passes so that machine noise hits every model alike."""
    return interleaved_latencies_ms([session(p, threads) for p in paths], feeds, passes, runs)


def optimised_table_readers(path: Path, folder: Path) -> str:
    """Which ops read the word table in ONNX Runtime's optimised graph, and its element type there."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.optimized_model_filepath = str(folder / f"{path.stem}_optimised.onnx")
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = onnx.load(so.optimized_model_filepath).graph
    tables = [t for t in g.initializer if list(t.dims) == [8000, 256]]
    out = []
    for t in tables:
        readers = [n.op_type for n in g.node if t.name in n.input]
        out.append(f"{onnx.TensorProto.DataType.Name(t.data_type)} table -> {'+'.join(readers)}")
    return "; ".join(out)


def main() -> None:
    import omct.graph.export as export

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path, calib, test, labels = build(folder)
        before = quantize(path, calib, folder, "tables_float", 'skip_layer_types: "Gather"\n')
        after = quantize(path, calib, folder, "tables_int8")
        original = export.DeployBuilder.lookup
        export.DeployBuilder.lookup = whole_table_dequantize
        try:
            dq = quantize(path, calib, folder, "tables_dq")
        finally:
            export.DeployBuilder.lookup = original
        models = [("FP32", path), ("deploy, tables float (before)", before), ("deploy, INT8 rows gathered (after)", after),
                  ("deploy, DequantizeLinear of the whole table", dq)]
        ref = session(path, 1).run(None, test)[0]
        rows = []
        for label, p in models:
            got = session(p, 1).run(None, test)[0]
            cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
            rows.append([label, p.stat().st_size, float((got.argmax(1) == labels).mean()), cos,
                         optimised_table_readers(p, folder)])
        lat = {}
        for batch, threads in ((1, 1), (16, 1), (16, 2)):
            feeds = {k: v[:batch] for k, v in test.items()}
            lat[(batch, threads)] = latencies_ms([p for _, p in models], feeds, threads)
    fp32 = rows[0][1]
    lines = ["Embedding tables: BERT-mini (vocab 8000, hidden 256, 2 layers, intermediate 512; the word table is 2.05M "
             "of 3.1M parameters), digits as 32-token sequences, 8 calibration batches of 16, accuracy on "
             f"{len(labels)} held-out sequences. ORT latency: median of 5 interleaved passes of 40 runs, sequence 32 "
             "(the 2-thread column is noisy on a shared 2-core host).\n",
             "| model | size KB | vs FP32 | accuracy | cosine vs FP32 | word table in ORT's optimised graph | "
             + " | ".join(f"ms b{b} t{t} (vs FP32)" for b, t in lat) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(lat)]
    for i, (label, size, acc, cos, readers) in enumerate(rows):
        cells = [f"{lat[k][i]:.2f} ({lat[k][i] / lat[k][0]:.2f}x)" for k in lat]
        lines.append(f"| {label} | {size / 1024:.0f} | {size / fp32:.3f}x | {acc:.3f} | {cos:.6f} | {readers} | "
                     + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    (ROOT / "benchmarks" / "results" / "embeddings.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
