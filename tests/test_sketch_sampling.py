"""The sampled sketch against an independent numpy brute force.

The guarantee: the clip IFMR picks from the sketch has a quantization MSE, on all the data, within 1% of the
exact IFMR optimum's (every value kept, every candidate of AMCT's grid fake-quantized on all the data).
HFMG: within 1% of the MSE of HFMG's own choice from an exact (every value binned) sketch.
"""

import functools
import math

import numpy as np
import pytest

import omct.core.sketch as sketch_module
from omct.core.calibrators import HFMG, IFMR, Percentile
from omct.core.params import candidate_params
from omct.core.sketch import ActivationSketch

DISTRIBUTIONS = {
    "gaussian": lambda r, n: r.normal(size=n),
    "laplace": lambda r, n: r.laplace(scale=0.5, size=n) + 0.3,
    # half-normal with a spike of exact zeros, as after a ReLU
    "relu": lambda r, n: np.where(r.random(n) < 0.4, 0.0, np.abs(r.normal(size=n)) * 2.5),
    "student_t2": lambda r, n: r.standard_t(2, size=n),
    # 99.9% normal, 0.1% outliers at 100x
    "outliers": lambda r, n: np.where(r.random(n) < 1e-3, r.normal(size=n) * 100, r.normal(size=n)),
}
# (values, batches): one large batch, several medium ones, many large ones; every batch is sampled
SIZES = [(300_000, 1), (1_000_000, 4), (4_000_000, 8)]


@functools.cache
def data(dist: str, n: int) -> np.ndarray:
    return DISTRIBUTIONS[dist](np.random.default_rng(n % 1000 + len(dist)), n).astype(np.float32)


def brute_force_sq_errors(x: np.ndarray, scales, offsets, bits: int = 8) -> np.ndarray:
    """Sum of squared errors of fake-quantizing every value of ``x`` (float64), one per (scale, offset)."""
    x = x.astype(np.float64)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = []
    buf = np.empty(min(x.size, 1 << 18))
    for s, o in zip(np.ravel(scales), np.ravel(offsets), strict=True):
        total = 0.0
        for start in range(0, x.size, buf.size):
            chunk = x[start : start + buf.size]
            b = buf[: chunk.size]
            np.divide(chunk, s, out=b)
            np.rint(b, out=b)
            np.add(b, o, out=b)
            np.clip(b, qmin, qmax, out=b)
            np.subtract(b, o, out=b)
            np.multiply(b, s, out=b)
            np.subtract(b, chunk, out=b)
            total += float(np.dot(b, b))
        out.append(total)
    return np.array(out)


def sorted_sq_errors(x_sorted: np.ndarray, scales, offsets, bits: int = 8) -> np.ndarray:
    """The same sums as ``brute_force_sq_errors``, from sorted values and their prefix sums: level k takes the
    values between its rounding boundaries (a value on a boundary errs by half a step either way), so
    ``sum (x - q_k)^2 = S2 - 2 q_k S1 + n q_k^2`` per level, exactly. Fast enough for every candidate of
    every test set; checked against the brute force in ``test_sorted_reference_equals_brute_force``."""
    prefix = [np.concatenate([[0.0], np.cumsum(x_sorted**k)]) for k in (1, 2)]
    levels = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=np.float64)
    out = []
    for s, o in zip(np.ravel(scales), np.ravel(offsets), strict=True):
        q = (levels - o) * s
        cuts = np.searchsorted(x_sorted, (levels[:-1] - o + 0.5) * s)
        at = np.concatenate([[0], cuts, [x_sorted.size]])
        n = np.diff(at).astype(np.float64)
        s1, s2 = (np.diff(p[at]) for p in prefix)
        out.append(float((s2 - 2 * q * s1 + n * q * q).sum()))
    return np.array(out)


@functools.cache
def sorted_data(dist: str, n: int) -> np.ndarray:
    return np.sort(data(dist, n).astype(np.float64))


def ifmr_grid(x_sorted: np.ndarray, asym: bool) -> tuple[np.ndarray, np.ndarray]:
    """AMCT's IFMR candidates: init * arange(0.7, 1.3, 0.01), init the exact 0.999999 percentiles."""
    n = x_sorted.size
    hi, lo = x_sorted[math.ceil(0.999999 * n) - 1], x_sorted[n - math.ceil(0.999999 * n)]
    ratios = np.arange(0.7, 1.3, 0.01)
    los, his = np.minimum(lo * ratios, 0.0), np.maximum(hi * ratios, 0.0)
    if asym:
        scales = ((his - los) / 255).astype(np.float32).astype(np.float64)
        offsets = np.clip(np.round(-128 - los / scales), -128, 127)
    else:
        scales = (np.maximum(-los, his) / 127).astype(np.float32).astype(np.float64)
        offsets = np.zeros_like(scales)
    return scales, offsets


@functools.cache
def exact_ifmr_optimum(dist: str, n: int, asym: bool) -> float:
    """Least sum of squared errors over AMCT's IFMR grid, every value kept."""
    x = sorted_data(dist, n)
    return float(sorted_sq_errors(x, *ifmr_grid(x, asym)).min())


def test_sorted_reference_equals_brute_force():
    for dist in ("relu", "outliers"):
        x = sorted_data(dist, 300_000)
        for asym in (True, False):
            scales, offsets = ifmr_grid(x, asym)
            scales, offsets = scales[::7], offsets[::7]
            np.testing.assert_allclose(sorted_sq_errors(x, scales, offsets), brute_force_sq_errors(x, scales, offsets),
                                       rtol=1e-7)


def calibrated_sq_error(cls, dist: str, n: int, batches: int, asym: bool, sample_size: int | None = None,
                        sized_tail: bool = False) -> float:
    """``sized_tail``: the calibrator told the number of batches, as calibration makes it (tails of
    ``sketch.tail_for``: 512 values here, not 4096)."""
    x = data(dist, n)
    calib = cls(asymmetric=asym, batch_num=batches) if sized_tail and sample_size is None else \
        cls(asymmetric=asym, sketch=ActivationSketch(sample_size=sample_size))
    if sized_tail:
        assert calib.sketch._tail_need is not None
    for batch in np.array_split(x, batches):
        calib.update(batch)
    if sample_size != 0:
        assert calib.sketch.sampled
    p = calib.compute()
    return float(brute_force_sq_errors(x, p.scale, p.offset)[0])  # fake-quantize every value


@pytest.mark.parametrize("tail", ["sized", "4096"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("asym", [True, False], ids=["asym", "sym"])
def test_sampled_ifmr_mse_within_1pct_of_exact_ifmr_optimum(dist, size, asym, tail):
    got = calibrated_sq_error(IFMR, dist, *size, asym, sized_tail=tail == "sized")
    best = exact_ifmr_optimum(dist, size[0], asym)
    assert got <= 1.01 * best, (got / best)


@pytest.mark.parametrize("size", SIZES[:2], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("asym", [True, False], ids=["asym", "sym"])
def test_sampled_hfmg_mse_within_1pct_of_exact_sketch_hfmg(dist, size, asym):
    got = calibrated_sq_error(HFMG, dist, *size, asym)
    exact = calibrated_sq_error(HFMG, dist, *size, asym, sample_size=0)
    assert got <= 1.01 * exact, (got / exact)
    # and HFMG stays near the IFMR optimum (it searches other candidates, so no tighter bound is promised)
    assert got <= 1.25 * exact_ifmr_optimum(dist, size[0], asym), got / exact_ifmr_optimum(dist, size[0], asym)


def test_sampling_rule_and_exact_totals():
    """Batches under twice the sample size are binned exactly; larger ones bin a sample whose weighted counts
    add up to the exact count; tails, count, min and max stay exact on every value."""
    rng = np.random.default_rng(11)
    small = ActivationSketch(sample_size=1 << 16)
    small.update(rng.normal(size=(1 << 17) - 1))
    assert not small.sampled
    batches = [rng.normal(2.0, 1.0 + i, size=300_001 + 7919 * i).astype(np.float32) for i in range(4)]
    batches.append(rng.normal(2.0, 0.1, size=200_000).astype(np.float32))  # nothing new for either tail
    sk = ActivationSketch(sample_size=1 << 16)
    for b in batches:
        sk.update(b)
    assert sk.sampled
    data = np.concatenate(batches).astype(np.float64)
    ordered = np.sort(data)
    assert sk.counts.sum() == data.size == sk.count
    np.testing.assert_array_equal(np.sort(sk.top), ordered[-sk.tail_size :])
    np.testing.assert_array_equal(np.sort(sk.bottom), ordered[: sk.tail_size])
    assert (sk.min, sk.max) == (ordered[0], ordered[-1])
    # the sampled histogram still follows the data: cumulative counts within 4 standard deviations
    points = np.quantile(data, [0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99])
    want = np.searchsorted(ordered, points)
    stride = 300_000 // (1 << 16)
    assert np.all(np.abs(sk.cumulative(points) - want) < 4 * np.sqrt(want * stride) + 1), (sk.cumulative(points), want)
    # and the tails are read exactly: beyond the innermost kept value, counts are the true ones
    beyond = np.array([ordered[-100], ordered[-1000], ordered[99], ordered[999]])
    np.testing.assert_allclose(sk.cumulative(beyond), np.searchsorted(ordered, beyond), atol=1e-6)


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_sampled_quant_error_matches_brute_force(dist):
    """The error read off a sampled sketch is within 2% of fake-quantizing every value, for clips in the tails
    (exact there) and in the bulk (sampled). 2%, not 1%: at the min-max clip of Student-t data, a step wider
    than the bulk, the error is the sum of squares of the bulk, which a sample estimates to about 1.4%."""
    x = data(dist, 1_000_000)
    sk = ActivationSketch()
    for batch in np.array_split(x, 4):
        sk.update(batch)
    assert sk.sampled
    ratios = np.array([0.05, 0.3, 0.7, 1.0])
    scales, offsets = candidate_params(x.min() * ratios, x.max() * ratios, 8, True)
    got = sk.quant_error(scales, offsets, 8)
    want = brute_force_sq_errors(x, scales, offsets)
    np.testing.assert_allclose(got, want, rtol=0.02)


def test_sampled_sketch_is_deterministic():
    """Same input, same sketch and same parameters: the draw depends only on the batch size."""
    x = data("laplace", 1_000_000)
    records = []
    for _ in range(2):
        calib = IFMR()
        for batch in np.array_split(x, 3):
            calib.update(batch)
        p = calib.compute()
        records.append((calib.sketch.counts.copy(), float(p.scale), int(p.offset)))
    np.testing.assert_array_equal(records[0][0], records[1][0])
    assert records[0][1:] == records[1][1:]


def test_sampled_merge_equals_single_stream():
    """Merging is exact with sampling too: each batch's draw depends only on its size, so two sketches fed
    halves of a stream merge into the sketch of the whole stream at their common bin width (same counts,
    tails, min, max)."""
    rng = np.random.default_rng(2)
    a_batches = [rng.normal(size=200_000) for _ in range(2)]
    b_batches = [rng.laplace(size=300_000) * 4 for _ in range(2)]
    one, a, b = ActivationSketch(), ActivationSketch(), ActivationSketch()
    for batch in a_batches + b_batches:
        one.update(batch)
    for batch in a_batches:
        a.update(batch)
    for batch in b_batches:
        b.update(batch)
    a.merge(b)
    assert a.sampled and one.sampled
    while one.exponent < a.exponent:  # b's first batch started wider bins than the single stream's
        one._coarsen()
    assert (a.count, a.min, a.max, a.exponent) == (one.count, one.min, one.max, one.exponent)
    def nonzero_bins(sk):  # count and lower edge of each non-empty bin
        keep = np.nonzero(sk.counts)[0]
        return sk.counts[keep], (sk.first_index + keep) * sk.width

    for got, want in zip(nonzero_bins(a), nonzero_bins(one), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.sort(a.top), np.sort(one.top))
    np.testing.assert_array_equal(np.sort(a.bottom), np.sort(one.bottom))


def test_default_sample_size_is_read_at_construction(monkeypatch):
    monkeypatch.setattr(sketch_module, "DEFAULT_SAMPLE_SIZE", 0)
    sk = ActivationSketch()
    sk.update(np.random.default_rng(0).normal(size=1 << 19))
    assert sk.sample_size == 0 and not sk.sampled
    with pytest.raises(ValueError, match="sample_size"):
        ActivationSketch(sample_size=-1)


def test_hfmg_bins_every_value_by_default_and_ifmr_samples():
    """HFMG trims bin by bin, and sampled tail bins moved its choice on the benchmark ResNet (logit SQNR 41.4 ->
    40.5 dB): its default sketch is exact. IFMR, whose tails stay exact, samples."""
    assert HFMG().sketch.sample_size == 0
    assert IFMR().sketch.sample_size == sketch_module.DEFAULT_SAMPLE_SIZE > 0


def test_sized_tail_is_exact_and_merges_to_the_shallower_depth():
    """A calibrator told batch_num keeps a tail sized for the ranks it reads (IFMR 0.999999 of 8 batches of
    5000 values: 512, the floor), exact against numpy's sorted values; the percentile it reads equals numpy's;
    a merge with a deeper tail stays exact to the shallower depth."""
    rng = np.random.default_rng(5)
    batches = [rng.standard_t(3, size=5000).astype(np.float32) for _ in range(8)]
    calib = IFMR(batch_num=8)
    for b in batches:
        calib.update(b)
    sk = calib.sketch
    assert sk.tail_size == sketch_module.tail_for(1e-6, 8, 5000) == sketch_module.MIN_TAIL_SIZE
    ordered = np.sort(np.concatenate(batches).astype(np.float64))
    np.testing.assert_array_equal(np.sort(sk.top), ordered[-sk.tail_size:])
    np.testing.assert_array_equal(np.sort(sk.bottom), ordered[: sk.tail_size])
    n = ordered.size
    assert calib.initial_range() == (ordered[n - math.ceil(0.999999 * n)], ordered[math.ceil(0.999999 * n) - 1])
    # a deep rank (Percentile 99.9 of 40000 values: rank 40) fits its sized tail: exact
    pct = Percentile(batch_num=8, percentile=99.9)
    for b in batches:
        pct.update(b)
    assert pct.sketch.tail_size == sketch_module.MIN_TAIL_SIZE
    drop = n - math.ceil(99.9 / 100.0 * n)
    assert pct.choose_range() == (ordered[drop], ordered[n - 1 - drop])
    deep = ActivationSketch()  # tail 4096
    extra = [rng.normal(size=7000).astype(np.float32) for _ in range(2)]
    for b in extra:
        deep.update(b)
    sk.merge(deep)
    assert sk.tail_size == sketch_module.MIN_TAIL_SIZE
    ordered = np.sort(np.concatenate(batches + extra).astype(np.float64))
    np.testing.assert_array_equal(np.sort(sk.top), ordered[-sk.tail_size:])
    np.testing.assert_array_equal(np.sort(sk.bottom), ordered[: sk.tail_size])
    assert sketch_module.tail_for(1e-6, 8, 10**9) == sketch_module.DEFAULT_TAIL_SIZE  # capped
    with pytest.raises(ValueError, match="tail_fraction"):
        ActivationSketch(tail_fraction=1.0, batches=2)


def _separate_passes(x, stride, above, below):
    """The independent reference of ``sketch._scan``: each statistic its own pass over the whole batch."""
    return float(x.min()), float(x.max()), x[sketch_module._sample_index(x.size, stride)], x[x > above], x[x < below]


@pytest.mark.parametrize("size", [16_384, 131_072, 200_003, 393_216])
def test_one_pass_scan_equals_separate_passes(size):
    rng = np.random.default_rng(size)
    x = (rng.standard_t(4, size=size) * 2).astype(np.float32)
    for stride in (2, 7, size // 8192):
        got, want = sketch_module._scan(x, stride, 3.0, -5.0), _separate_passes(x, stride, 3.0, -5.0)
        assert got[:2] == want[:2]
        for g, w in zip(got[2:], want[2:], strict=True):
            np.testing.assert_array_equal(g, w)
            assert g.dtype == w.dtype


@pytest.mark.parametrize("dist", ["relu", "outliers", "gaussian"])
def test_sketch_with_the_one_pass_scan_equals_the_sketch_without(dist, monkeypatch):
    """Records equal with and without the one-pass path: every field of the sketch, fed batches of mixed
    sizes (the scan starts once the tails are full)."""
    rng = np.random.default_rng(11)
    batches = [DISTRIBUTIONS[dist](rng, n).astype(np.float32) for n in (300_000, 40_000, 200_003, 131_072) * 2]
    fast = IFMR(batch_num=8)
    for b in batches:
        fast.update(b)
    monkeypatch.setattr(sketch_module, "_scan", _separate_passes)
    slow = IFMR(batch_num=8)
    for b in batches:
        slow.update(b)
    assert fast.sketch.__dict__.keys() == slow.sketch.__dict__.keys()
    for key, value in fast.sketch.__dict__.items():
        np.testing.assert_array_equal(value, slow.sketch.__dict__[key], err_msg=key)
    assert fast.compute() == slow.compute()


def test_tails_of_spikes_are_exact():
    """ReLU6-like batches (spikes of exact zeros and sixes at both ends, and a batch where the spike is below
    the tail's depth): the tails kept are numpy's k most extreme values, whichever way they were found."""
    rng = np.random.default_rng(4)
    batches = [np.clip(rng.normal(2, 3, size=n), 0, 6).astype(np.float32) for n in (50_000, 3_000, 70_000)]
    batches.insert(1, np.clip(rng.normal(2, 3, size=600), 0.5, 5).astype(np.float32))  # few at either spike
    # fewer exact zeros than the tail holds, in a bin with more values than that: not a spike
    near = np.concatenate([np.zeros(300), rng.uniform(1e-7, 1e-6, 400), rng.uniform(0, 10, 20_000)])
    for stream in (batches, [near.astype(np.float32), *batches]):
        sk = ActivationSketch(tail_fraction=1e-6, batches=len(stream))
        for i, b in enumerate(stream):
            sk.update(b)
            seen = np.sort(np.concatenate(stream[: i + 1]))
            k = min(sk.tail_size, seen.size)
            np.testing.assert_array_equal(np.sort(sk.top), seen[-k:])
            np.testing.assert_array_equal(np.sort(sk.bottom), seen[:k])
