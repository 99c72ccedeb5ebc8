"""Big models stored with ONNX external data: the weights stay in their files (loaded lazily, memory-mapped
when read), outputs keep external data and are written all-or-nothing, and the results are exactly those of
the in-memory path. The models here are small (a few MB, saved with a size threshold) except the 50 MB one that
shows a lazy load allocates nothing near its size."""

import hashlib
import tracemalloc

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import make_model, vi

import omct.graph.model_io as mio
import omct.graph.tensor_data as td
import omct.onnx as amct
from omct.errors import ModelError, OutputPathError
from omct.formats.config import load_config


def _net(rng) -> onnx.ModelProto:
    """Conv + BatchNorm (folded: new tensors made from mapped ones), Gemm with alpha (rescaled), MatMul + Add."""
    inits = {"w": (rng.normal(size=(16, 8, 3, 3)) * 0.3).astype(np.float32), "b": rng.normal(size=16).astype(np.float32),
             "gamma": rng.uniform(0.5, 1.5, 16).astype(np.float32), "beta": rng.normal(size=16).astype(np.float32),
             "mean": rng.normal(size=16).astype(np.float32), "var": rng.uniform(0.5, 2, 16).astype(np.float32),
             "shape": np.array([0, -1], np.int64),
             "fc": (rng.normal(size=(1024, 1024)) * 0.03).astype(np.float32), "fc_b": rng.normal(size=1024).astype(np.float32),
             "mm": (rng.normal(size=(1024, 64)) * 0.05).astype(np.float32), "mm_b": rng.normal(size=64).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"], name="relu"),
             helper.make_node("Reshape", ["r", "shape"], ["flat"], name="flat"),
             helper.make_node("Gemm", ["flat", "fc", "fc_b"], ["g"], name="gemm", transB=1, alpha=0.5),
             helper.make_node("Relu", ["g"], ["h"], name="relu2"),
             helper.make_node("MatMul", ["h", "mm"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "mm_b"], ["y"], name="add")]
    return make_model(nodes, [vi("x", ["N", 8, 8, 8])], [vi("y", None)], inits)


def _save_external(model: onnx.ModelProto, path, location="weights.data") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # onnx.save_model turns the tensors it writes out into references
    onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _run(model_or_path, feeds):
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.fixture
def external(tmp_path):
    rng = np.random.default_rng(0)
    model = _net(rng)
    path = tmp_path / "src" / "net.onnx"
    _save_external(model, path)
    batches = [{"x": rng.normal(size=(4, 8, 8, 8)).astype(np.float32)} for _ in range(2)]
    return model, path, batches


def test_external_data_flow_matches_the_in_memory_path(tmp_path, external):
    model, path, batches = external
    data = path.parent / "weights.data"
    before = _digest(data)
    out = tmp_path / "out"
    cfg, mod, rec = out / "config.json", out / "modified.onnx", out / "record.txt"
    out.mkdir()
    amct.create_quant_config(str(cfg), str(path), batch_num=len(batches))
    amct.quantize_model(str(cfg), str(path), str(mod), str(rec))
    session = amct.CalibrationSession(str(mod))
    for feeds in batches:
        session.run(None, feeds)
    fake, deploy = amct.save_model(str(mod), str(rec), str(out / "file"))
    # the same config on the model held whole in memory (no external data anywhere): the reference
    memory = amct.quantize(model, load_config(cfg), batches)
    # and the in-memory API on the path (weights mapped from their file)
    lazy_fake, lazy_deploy = amct.quantize(str(path), load_config(cfg), batches).save(str(out / "lazy"))
    assert _digest(data) == before  # the input's data file is read, never written
    for saved, lazy, reference in ((fake, lazy_fake, memory.fake_quant_model()),
                                   (deploy, lazy_deploy, memory.deploy_model())):
        for p in (saved, lazy):
            assert p.with_name(p.name + ".data").is_file()  # external data stays external (the 1 MiB INT8 fc too)
            loaded = onnx.load(str(p))  # onnx's own reader: the files are plain ONNX external data
            assert all(e.key != td.FOLDER_KEY for t in loaded.graph.initializer for e in t.external_data)
            got, want = _tensors(loaded), _tensors(reference)
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
            for a, b in zip(_run(p, batches[0]), _run(reference, batches[0]), strict=True):
                np.testing.assert_array_equal(a, b)


def test_outputs_with_external_data_are_all_or_nothing(tmp_path, external, monkeypatch):
    _, path, batches = external
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(path), batch_num=1)
    amct.quantize_model(str(cfg), str(path), str(mod), str(rec))
    amct.CalibrationSession(str(mod)).run(None, batches[0])
    fake, deploy = amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
    outputs = [fake, deploy, fake.with_name(fake.name + ".data"), deploy.with_name(deploy.name + ".data")]
    digests = [_digest(p) for p in outputs]
    listing = sorted(p.name for p in tmp_path.iterdir())

    place = td.ExternalWriter.place

    def disk_full_in_deploy(self, src, dst):  # the fake-quant model is staged, the deploy model's data fails
        if self.name.endswith("_deploy_model.onnx.data"):
            raise OSError(28, "No space left on device")
        place(self, src, dst)

    monkeypatch.setattr(td.ExternalWriter, "place", disk_full_in_deploy)
    with pytest.raises(ModelError, match="No space left on device"):
        amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
    assert [_digest(p) for p in outputs] == digests  # the previous pair is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # and no staging folder is left behind


def test_no_output_data_file_is_an_input(tmp_path, external):
    _, path, batches = external
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(path), batch_num=1)
    amct.quantize_model(str(cfg), str(path), str(mod), str(rec))
    amct.CalibrationSession(str(mod)).run(None, batches[0])
    # save_path whose deploy model's data file would be the original model's data file
    other = path.parent / "other.onnx"
    _save_external(onnx.load(str(path)), other, location="q_deploy_model.onnx.data")
    amct.quantize_model(str(cfg), str(other), str(mod), str(rec))
    amct.CalibrationSession(str(mod)).run(None, batches[0])
    kept = _digest(path.parent / "q_deploy_model.onnx.data")
    with pytest.raises(OutputPathError, match="original model_file's external data file"):
        amct.save_model(str(mod), str(rec), str(path.parent / "q"))
    assert _digest(path.parent / "q_deploy_model.onnx.data") == kept


def test_lazy_load_maps_the_weights_instead_of_reading_them(tmp_path):
    rng = np.random.default_rng(1)
    n = 3620  # one 50 MB weight
    w = rng.standard_normal((n, n), np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [vi("x", ["N", n])], [vi("y", None)],
                       {"w": w})
    path = tmp_path / "big.onnx"
    _save_external(model, path)
    del model
    expected = float(w.astype(np.float64).sum())
    del w

    tracemalloc.start()
    try:
        lazy = mio.load_model(path, lazy=True)
        array = td.tensor_array(lazy.graph.initializer[0])
        assert float(array.sum(dtype=np.float64)) == pytest.approx(expected, rel=1e-9)
        amct.create_quant_config(str(tmp_path / "c.json"), str(path))  # the whole step on the lazy model
        lazy_peak = tracemalloc.get_traced_memory()[1]
        del array
        tracemalloc.reset_peak()
        mio.load_model(path)  # an eager load, to show the measurement sees a read of the weight
        eager_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert eager_peak > 50e6
    assert lazy_peak < 5e6, f"a lazy load and create_quant_config allocated {lazy_peak / 1e6:.1f} MB"


def test_external_writer_round_trips_dtypes_and_aligns(tmp_path):
    arrays = {"f32": np.arange(3000, dtype=np.float32).reshape(30, 100), "i8": np.arange(-100, 100, dtype=np.int8),
              "f16": np.linspace(0, 1, 77).astype(np.float16), "i64": np.arange(5, dtype=np.int64),
              "u8": np.arange(10, dtype=np.uint8), "flag": np.array([True, False, True])}

    def build(sink):
        inits = [sink.add(a, name) for name, a in arrays.items()]
        inits.append(numpy_helper.from_array(np.arange(200, dtype=np.int32), "inline"))  # in memory, written by place
        nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in inits]
        outs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, None) for t in inits]
        return helper.make_model(helper.make_graph(nodes, "g", [], outs, inits))

    (path,) = [p for p in mio.save_models([(build, tmp_path / "t.onnx")]) if p.suffix == ".onnx"]
    header = onnx.load(str(path), load_external_data=False)
    for t in header.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        assert t.data_location == TensorProto.EXTERNAL and td.FOLDER_KEY not in info
        if int(info["length"]) >= td.ALIGN:
            assert int(info["offset"]) % td.ALIGN == 0
    lazy = mio.load_model(path, lazy=True)
    got = {t.name: td.tensor_array(t) for t in lazy.graph.initializer}
    for name, a in arrays.items():
        assert got[name].dtype == a.dtype
        np.testing.assert_array_equal(got[name], a)
    np.testing.assert_array_equal(got["inline"], np.arange(200, dtype=np.int32))
    assert not got["f32"].flags.writeable  # mapped read-only: the input file can never be changed through it


def test_older_onnx_runtime_gets_a_file(tmp_path, external, monkeypatch):
    """ONNX Runtime before 1.21 ignores the external-data folder of a model given as bytes: it gets a file."""
    _, path, batches = external
    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(path), batch_num=1)
    mapped = amct.quantize(str(path), load_config(cfg), batches[:1])
    written = []
    save = mio.save_model
    monkeypatch.setattr(mio, "ort_reads_external_folder", lambda: False)
    monkeypatch.setattr(mio, "save_model", lambda m, p, *a: written.append(p) or save(m, p, *a))
    copied = amct.quantize(str(path), load_config(cfg), batches[:1])
    assert written and copied.records == mapped.records


def test_one_file_model_is_loaded_lazily_and_written_in_one_file(tmp_path, external, monkeypatch):
    """A big model in one .onnx file: its weights are read from inside the file like external data (here the
    size limit is lowered to this small model), and the outputs stay one file each, equal to the in-memory path."""
    model, _, batches = external
    path = tmp_path / "one.onnx"
    onnx.save_model(model, str(path))
    monkeypatch.setattr(mio, "EMBEDDED_LAZY_BYTES", 0)
    lazy = mio.load_model(path, lazy=True)
    fc = next(t for t in lazy.graph.initializer if t.name == "fc")
    assert td.is_lazy(fc)
    np.testing.assert_array_equal(td.tensor_array(fc), numpy_helper.to_array(next(t for t in model.graph.initializer
                                                                                  if t.name == "fc")))
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "m.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(path), batch_num=len(batches))
    amct.quantize_model(str(cfg), str(path), str(mod), str(rec))
    session = amct.CalibrationSession(str(mod))
    for feeds in batches:
        session.run(None, feeds)
    fake, deploy = amct.save_model(str(mod), str(rec), str(tmp_path / "q"))
    memory = amct.quantize(model, load_config(cfg), batches)
    lazy_fake, lazy_deploy = amct.quantize(str(path), load_config(cfg), batches).save(str(tmp_path / "lazy"))
    assert not list(tmp_path.glob("*.data"))  # every output is one file, like its input
    for saved, lazy_saved, reference in ((fake, lazy_fake, memory.fake_quant_model()),
                                         (deploy, lazy_deploy, memory.deploy_model())):
        want = _tensors(reference)
        for p in (saved, lazy_saved):
            got = _tensors(onnx.load(str(p)))
            assert got.keys() == want.keys()
            for name in want:
                np.testing.assert_array_equal(got[name], want[name], err_msg=name)
