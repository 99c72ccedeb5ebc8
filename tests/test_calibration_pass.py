"""The calibration pass's shortcuts (issue 17, item 9) compute what the longer way did: outputs read from ONNX
Runtime without a copy, tails sized for the rank the calibrator reads, channel means summed in another order,
the pending record's count written in place, reused binning buffers. References: ONNX Runtime's plain ``run``,
numpy, a sketch with the fixed 4096-value tail."""

import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import run_flow
from onnx_builders import conv_model

import omct.core.sketch as sketch_module
import omct.onnx as amct
from omct.core.bias_correction import ChannelMeans
from omct.core.calibrators import IFMR
from omct.core.sketch import ActivationSketch
from omct.formats.record import pending_status, read_record, update_pending_record, write_pending_record
from omct.quantize import run_views


def test_run_views_equal_run_and_outlive_later_runs(rng):
    """The zero-copy outputs equal ``run``'s, stay valid after the OrtValues are dropped and later runs reuse
    ONNX Runtime's buffers; a CalibrationSession still hands the user arrays of their own."""
    model = conv_model(rng)
    del model.graph.output[:]
    model.graph.output.extend([onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None) for t in ("c", "y")])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = [{"x": rng.normal(size=(2, 8, 6, 6)).astype(np.float32)} for _ in range(3)]
    views = run_views(session, ["c", "y"], feeds[0])
    for f in feeds[1:]:
        run_views(session, ["c", "y"], f)
        session.run(["c", "y"], f)
    for got, want in zip(views, session.run(["c", "y"], feeds[0]), strict=True):
        np.testing.assert_array_equal(got, want)


def test_calibration_session_outputs_are_the_users_own(rng, tmp_path):
    model = conv_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    amct.create_quant_config(str(tmp_path / "q.json"), str(path), batch_num=2)
    amct.quantize_model(str(tmp_path / "q.json"), str(path), str(tmp_path / "q_mod.onnx"), str(tmp_path / "q_record.txt"))
    sess = amct.CalibrationSession(str(tmp_path / "q_mod.onnx"))
    x = rng.normal(size=(2, 8, 6, 6)).astype(np.float32)
    out = sess.run(None, {"x": x})[0]
    assert out.flags.owndata and out.flags.writeable
    np.testing.assert_array_equal(out, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])
    # the pending record says how far it got, its count updated in place
    assert "ran 1 of batch_num=2" in pending_status(tmp_path / "q_record.txt")


def test_records_with_sized_tails_equal_the_fixed_tail_records(rng, tmp_path, monkeypatch):
    """Tensors too small to sample: the record is the same with tails of 512 (sized) as with 4096 (the fixed
    tail before): the bins give the error, the tails only the percentile rank."""
    model = conv_model(rng, relu6=True)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    batches = [rng.standard_t(3, size=(16, 8, 6, 6)).astype(np.float32) for _ in range(4)]
    run_flow(path, tmp_path, batches, feed_name="x", prefix="sized")
    monkeypatch.setattr(sketch_module, "tail_for", lambda *a, **k: sketch_module.DEFAULT_TAIL_SIZE)
    run_flow(path, tmp_path, batches, feed_name="x", prefix="fixed")
    sized, fixed = read_record(tmp_path / "sized_record.txt"), read_record(tmp_path / "fixed_record.txt")
    assert sized == fixed


def test_sized_tail_keeps_the_ifmr_range_of_the_fixed_tail():
    """Small batches (2560 values, never sampled): the tail of 512 gives the same range as 4096."""
    rng = np.random.default_rng(3)
    batches = [rng.laplace(size=2560).astype(np.float32) for _ in range(8)]
    sized, fixed = IFMR(batch_num=8), IFMR()
    for b in batches:
        sized.update(b)
        fixed.update(b)
    assert sized.sketch.tail_size == 512 and fixed.sketch.tail_size == 4096
    assert sized.choose_range() == fixed.choose_range()


@pytest.mark.parametrize("shape, axis", [((32, 16, 2, 2), 1), ((32, 16, 1, 1), 1), ((4, 16, 8, 8), 1),
                                         ((6, 5, 12), -1), ((7, 12), -1), ((3, 4, 5, 31), 1)])
def test_channel_means_equal_numpy(shape, axis):
    rng = np.random.default_rng(sum(shape))
    x = (rng.normal(size=shape) * 3 + 1).astype(np.float32)
    means = ChannelMeans(axis)
    for part in np.array_split(x, 2):
        means.update(part)
    moved = np.moveaxis(x.astype(np.float64), axis, 0).reshape(x.shape[axis], -1)
    np.testing.assert_allclose(means.mean, moved.mean(axis=1), rtol=1e-6, atol=1e-6)


def test_pending_record_count_is_updated_in_place_and_anything_else_rewritten(tmp_path):
    path = tmp_path / "r.txt"
    layers = ["conv1", "conv2"]
    write_pending_record(path, 0, 12, layers)
    inode = path.stat().st_ino
    for seen in (1, 7, 11):
        update_pending_record(path, seen, 12, layers)
        write_pending_record(tmp_path / "ref.txt", seen, 12, layers)
        assert path.read_text() == (tmp_path / "ref.txt").read_text()
        assert path.stat().st_ino == inode  # in place: no new file
    assert "ran 11 of batch_num=12" in pending_status(path)
    # another calibration's record (other layers) or a finished record: written afresh
    update_pending_record(path, 2, 12, ["other"])
    assert "layers other" in pending_status(path)
    path.write_text('record {\n  key: "conv1"\n}\n')
    update_pending_record(path, 3, 12, layers)
    assert "ran 3 of batch_num=12" in pending_status(path)
    update_pending_record(tmp_path / "new.txt", 1, 12, layers)  # no file yet
    assert "ran 1 of batch_num=12" in pending_status(tmp_path / "new.txt")


def test_reused_binning_buffers_across_threads_equal_numpy():
    """Each thread bins in its own reused buffers: sketches fed concurrently count what numpy counts."""
    rng = np.random.default_rng(4)
    data = [[rng.normal(i, 1 + i, size=200_003 + 11 * i).astype(np.float32) for _ in range(3)] for i in range(4)]
    sketches = [ActivationSketch(sample_size=0) for _ in data]

    def feed(i):
        for b in data[i]:
            sketches[i].update(b)

    threads = [threading.Thread(target=feed, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sk, batches in zip(sketches, data, strict=True):
        x = np.concatenate(batches).astype(np.float64)
        want = np.bincount((np.floor(x / sk.width) - sk.first_index).astype(np.int64), minlength=sk.counts.size)
        np.testing.assert_array_equal(sk.counts, want)


def test_calibration_session_plans_no_memory_pattern_and_keeps_the_users_options(rng, tmp_path):
    """Issue 17 item 7: omct's own session options turn ONNX Runtime's memory pattern off (with every observed
    tensor a graph output, its planned block raised a small CNN's peak RSS by 3-11 MB); options the user passes
    are used as they are, and the records are the same either way."""
    model = conv_model(rng)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    amct.create_quant_config(str(tmp_path / "q.json"), str(path), batch_num=2)
    batches = [rng.normal(size=(4, 8, 6, 6)).astype(np.float32) for _ in range(2)]
    records = []
    for options in (None, ort.SessionOptions()):
        mod, rec = str(tmp_path / "q_mod.onnx"), tmp_path / "q_record.txt"
        amct.quantize_model(str(tmp_path / "q.json"), str(path), mod, str(rec))
        sess = amct.CalibrationSession(mod, options)
        assert sess.get_session_options().enable_mem_pattern is (options is not None)
        for x in batches:
            sess.run(None, {"x": x})
        records.append(read_record(rec))
    assert records[0] == records[1]


def test_written_record_cache_holds_arrays_and_is_not_changed_by_later_edits(tmp_path, rng):
    """Issue 17 item 7: the record save_model reads back is kept in arrays (not Python lists, not its text), a
    copy: later changes to the records written do not reach it, and it reads as a fresh parse does."""
    import omct.formats.record as record_module
    from omct.formats.record import LayerRecord, write_record

    rec = LayerRecord(0.1, 3, rng.random(5).astype(np.float32), [0] * 5, None, None, list(rng.normal(size=5)),
                      ada_flip=[1, 7, 40000])
    path = tmp_path / "r.txt"
    write_record(path, {"conv": rec})
    digest, layers = record_module._last_written
    assert isinstance(digest, bytes) and all(isinstance(v, np.ndarray) for v in (layers["conv"].scale_w, layers["conv"].ada_flip))
    rec.scale_w[0] = 99.0
    rec.ada_flip.append(5)
    cached = read_record(path)
    record_module._last_written = None
    assert read_record(path) == cached and cached["conv"].scale_w[0] != 99.0
