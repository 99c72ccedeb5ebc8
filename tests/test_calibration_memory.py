"""Memory of calibration's per-tensor state and of the records' computation (issue 17 item 7), asserted on the
bytes numpy allocates (the arrays' nbytes, tracemalloc's peak), never on the process's RSS. The values must
stay those of the whole-array computations they replace."""

from __future__ import annotations

import platform
import threading
import tracemalloc

import numpy as np
import onnx
import onnxruntime as ort
from onnx_builders import conv_model

import omct.onnx as amct
from omct.core import bias_correction
from omct.core import parallel as parallel_module
from omct.core import sketch as sketch_module
from omct.core.bias_correction import correction
from omct.core.calibrators import candidate_params
from omct.core.parallel import _malloc_trim, return_free_memory
from omct.core.sketch import ActivationSketch


def _peak(fn):
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = fn()
        return out, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_sketch_bytes_follow_its_documented_layout():
    """Counts: at most ``max_bins`` float64; each tail: at most ``2 * tail_size`` float64, whatever the number of
    batches; the sampled batch's cached draw: one byte per drawn value for strides up to 256."""
    rng = np.random.default_rng(0)
    size = 8 * 32 * 56 * 56  # a small CNN's activation: stride 12 at the default sample size
    sk = ActivationSketch(tail_fraction=1e-6, batches=8)
    for i in range(8):
        sk.update(np.maximum(rng.normal(size=size) * (1 + i), 0).astype(np.float32))
    assert sk.sampled
    assert sk.counts.dtype == np.uint32 and sk.counts.nbytes <= sk.max_bins * 4
    assert sk.tail_size == sketch_module.tail_for(1e-6, 8, size)
    assert sk._top.nbytes <= 2 * sk.tail_size * 8 and sk._bottom.nbytes <= 2 * sk.tail_size * 8
    assert sk.nbytes() <= sk.max_bins * 4 + 4 * sk.tail_size * 8
    stride = size // sketch_module.DEFAULT_SAMPLE_SIZE
    offsets = sketch_module._sample_offsets(size, stride)
    assert offsets.nbytes == size // stride  # one byte per drawn value (was four: int32 positions)
    assert sketch_module._sample_offsets(10**7, 70_000).itemsize == 4  # wider runs: the offsets still fit


def test_sample_positions_by_chunk_are_the_seeded_draw():
    """The positions a chunked scan reads equal one uniform draw per run from the seeded generator."""
    for size, stride in [(200_003, 3), (1 << 20, 16), (1_000_000, 300), (131_073, 2)]:
        runs = size // stride
        want = np.arange(0, runs * stride, stride) + np.random.default_rng([size, stride]).integers(0, stride, runs)
        np.testing.assert_array_equal(sketch_module._sample_index(size, stride), want)
        parts = [sketch_module._sample_positions(size, stride, a, min(a + sketch_module.CHUNK, size))
                 for a in range(0, size, sketch_module.CHUNK)]
        np.testing.assert_array_equal(np.concatenate(parts), want)


def test_quant_error_in_blocks_equals_each_candidate_alone_and_stays_small():
    rng = np.random.default_rng(3)
    sk = ActivationSketch()
    for _ in range(3):
        sk.update(rng.standard_t(4, size=300_000).astype(np.float32))
    ratios = np.linspace(0.3, 1.3, 2000)
    scales, offsets = candidate_params(sk.min * ratios, sk.max * ratios, 8, True)
    got, peak = _peak(lambda: sk.quant_error(scales, offsets, 8))
    alone = np.array([sk.quant_error(np.ravel(scales)[i : i + 1], np.ravel(offsets)[i : i + 1], 8)[0]
                      for i in range(0, ratios.size, 97)])
    np.testing.assert_array_equal(got[::97], alone)
    # one (candidates x levels) float64 array of all 2000 candidates is 4 MB; a block's dozen of them stay below 2
    assert peak < 2 * 2**20, peak


def test_bias_correction_sums_in_blocks_equal_the_whole_float64_difference():
    rng = np.random.default_rng(1)
    weight = rng.normal(size=(256, 128, 3, 3)).astype(np.float32)  # 1.2 MB
    quantized = (np.round(weight * 20) / 20).astype(np.float32)
    mean = rng.normal(size=128)
    got, peak = _peak(lambda: correction(weight, quantized, mean, 0, 1))
    per = (quantized.astype(np.float64) - weight.astype(np.float64)).reshape(256, 128, -1).sum(-1)
    np.testing.assert_array_equal(got, -(per * mean[None, :]).sum(1))
    # one block's float64 difference and a few (out, in) float64 arrays; the whole difference alone was 2.4 MB
    assert peak <= bias_correction.TAP_SUM_CHUNK * 8 + 4 * per.nbytes < weight.size * 8, peak
    # a weight whose output axis is not first (ConvTranspose: (in, out / groups, k, k)) takes the moved view
    t_weight, t_quant = weight.transpose(1, 0, 2, 3).copy(), quantized.transpose(1, 0, 2, 3).copy()
    np.testing.assert_array_equal(correction(t_weight, t_quant, mean, 1, 0), got)


def test_uint32_bins_widen_before_they_could_overflow_and_read_the_same():
    """The bins count in uint32 until the stream reaches 2**32 values, then in float64; merging a float64 sketch
    widens too. Every reading is the one float64 bins give."""
    rng = np.random.default_rng(2)
    batches = [rng.normal(size=300_000).astype(np.float32) for _ in range(3)]
    small, wide = ActivationSketch(), ActivationSketch()
    for b in batches:
        small.update(b)
        wide.update(b)
        wide.counts = wide.counts.astype(np.float64)  # the float64 bins of before
    assert small.counts.dtype == np.uint32
    scales, offsets = candidate_params(np.array([-3.0, -2.0]), np.array([3.0, 2.0]), 8, True)
    np.testing.assert_array_equal(small.quant_error(scales, offsets, 8), wide.quant_error(scales, offsets, 8))
    assert small.largest(5000) == wide.largest(5000) and small.smallest(5000) == wide.smallest(5000)
    np.testing.assert_array_equal(small.cumulative(np.linspace(-4, 4, 33)), wide.cumulative(np.linspace(-4, 4, 33)))
    near = small.copy()
    near.count = 2**32 - 10  # as if the stream had nearly 2**32 values
    near.update(batches[0])
    assert near.counts.dtype == np.float64
    same = small.copy()
    same.update(batches[0])
    assert same.counts.dtype == np.uint32
    np.testing.assert_array_equal(near.counts, same.counts)
    merged = small.copy()
    merged.merge(wide)
    assert merged.counts.dtype == np.float64
    np.testing.assert_array_equal(merged.counts, 2 * small.counts.astype(np.float64))


def test_calibration_session_frees_its_statistics_with_the_records(rng, tmp_path):
    """AMCT's sequence needs only the record file once the last batch ran: the session drops the statistics and
    the modified model before the user's save_model, and still runs the model; a caller that recomputes records
    later (auto_nuq's ``keep_statistics``) keeps them."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    amct.create_quant_config(str(tmp_path / "q.json"), str(path), batch_num=2)
    x = [rng.normal(size=(2, 8, 6, 6)).astype(np.float32) for _ in range(3)]
    records = []
    for keep in (False, True):
        mod, rec = str(tmp_path / f"q{keep}_mod.onnx"), tmp_path / f"q{keep}_record.txt"
        amct.quantize_model(str(tmp_path / "q.json"), str(path), mod, str(rec))
        sess = amct.CalibrationSession(mod)
        sess.calibration.keep_statistics = keep
        for b in x[:2]:
            sess.run(None, {"x": b})
        assert sess.complete and (sess.calibration.stats is not None) is keep and sess._modified is None
        assert not parallel_module._SCRATCH  # every thread's binning buffers went before the records
        if keep:
            assert sess.calibration.records_for(sess.calibration.config).keys() == sess.calibration.records.keys()
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x[2]})[0]
        np.testing.assert_array_equal(sess.run(None, {"x": x[2]})[0], want)
        records.append(rec.read_text())
        amct.save_model(mod, str(rec), str(tmp_path / f"out{keep}"))
    assert records[0] == records[1]


def test_scratch_released_and_rebuilt_on_demand_and_heap_trim_found():
    """``release_scratch`` drops every thread's binning buffers, and binning afterwards counts what numpy counts;
    on glibc the heap trim is found (elsewhere it is a no-op)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=300_000).astype(np.float32)
    got = []
    thread = threading.Thread(target=lambda: got.append(sketch_module._bin_and_cut(x, -6, -400, 800, None, None)[0]))
    thread.start()
    thread.join()
    sketch_module._bin_and_cut(x, -6, -400, 800, None, None)
    assert len(parallel_module._SCRATCH) >= 2
    parallel_module.release_scratch()
    assert not parallel_module._SCRATCH
    want = np.bincount((np.floor(x.astype(np.float64) * 64) + 400).astype(np.int64), minlength=800)
    np.testing.assert_array_equal(got[0], want)
    np.testing.assert_array_equal(sketch_module._bin_and_cut(x, -6, -400, 800, None, None)[0], want)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _malloc_trim() is not None
    return_free_memory()
