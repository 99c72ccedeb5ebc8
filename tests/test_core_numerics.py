"""Quantization formulas, weight quantizers and calibrators, against plain reference implementations."""

import math

import numpy as np
import pytest

from omct.core.calibrators import CALIBRATORS, HFMG, IFMR, make_calibrator
from omct.core.params import candidate_params, params_from_range
from omct.core.sketch import ActivationSketch
from omct.core.weights import arq, mse_clip, quantize_bias


def ref_fake_quant(x, s, o, bits=8):
    q = np.clip(np.round(x / s) + o, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return (q - o) * s


def test_asymmetric_params_follow_amct_formulas():
    p = params_from_range(-1.0, 3.0, 8, asymmetric=True)
    assert float(p.scale) == pytest.approx(4.0 / 255, rel=1e-6)
    assert int(p.offset) == round(-128 + 1.0 / (4.0 / 255))
    # Non-negative data: offset -128, zero exactly representable.
    p = params_from_range(0.5, 2.0, 8, asymmetric=True)
    assert int(p.offset) == -128 and p.fake_quant(np.array([0.0]))[0] == 0.0
    x = np.linspace(-1, 3, 1001, dtype=np.float32)
    p = params_from_range(-1.0, 3.0)
    np.testing.assert_allclose(p.fake_quant(x), ref_fake_quant(x, float(p.scale), int(p.offset)), atol=1e-7)


def test_symmetric_params_and_degenerate_ranges():
    p = params_from_range(-2.0, 1.0, 8, asymmetric=False)
    assert float(p.scale) == pytest.approx(2.0 / 127) and int(p.offset) == 0
    for lo, hi in ((0.0, 0.0), (3.0, 3.0), (-1e-12, 1e-12)):
        p = params_from_range(lo, hi)
        assert np.isfinite(p.scale) and float(p.scale) > 0
        assert np.isfinite(p.fake_quant(np.array([lo, hi], np.float32))).all()


def ref_ifmr(x, asym=True, pmax=0.999999, pmin=0.999999, start=0.7, end=1.3, step=0.01):
    """All-data IFMR as AMCT describes it: percentile start, ratio grid, least squared error wins."""
    x = np.sort(x.astype(np.float64).ravel())
    n = x.size
    hi, lo = x[math.ceil(pmax * n) - 1], x[n - math.ceil(pmin * n)]
    best = None
    for r in np.arange(start, end, step):
        lo_c, hi_c = min(lo * r, 0.0), max(hi * r, 0.0)
        if asym:
            s = np.float32((hi_c - lo_c) / 255)
            o = np.clip(np.round(-128 - lo_c / s), -128, 127)
        else:
            s, o = np.float32(max(-lo_c, hi_c) / 127), 0
        err = ((ref_fake_quant(x, float(s), o) - x) ** 2).sum()
        if best is None or err < best[0]:
            best = (err, float(s))
    return best[1]


DISTRIBUTIONS = {
    "gaussian": lambda r, n: r.normal(size=n),
    "laplace": lambda r, n: r.laplace(scale=0.5, size=n) + 0.3,
    "relu": lambda r, n: np.maximum(r.normal(size=n), 0) * 2.5,
    "outliers": lambda r, n: np.where(r.random(n) < 2e-4, r.normal(size=n) * 60, r.normal(size=n)),
}


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
@pytest.mark.parametrize("asym", [True, False])
def test_streaming_ifmr_matches_exact_ifmr(dist, asym):
    rng = np.random.default_rng(7)
    x = DISTRIBUTIONS[dist](rng, 600_000).astype(np.float32)
    calib = IFMR(asymmetric=asym)
    for batch in np.array_split(x, 23):
        calib.update(batch)
    got, want = float(calib.compute().scale), ref_ifmr(x, asym)
    assert abs(got - want) / want < 0.01, (got, want)


def test_sketch_memory_does_not_grow_with_batches():
    rng = np.random.default_rng(0)
    sk = ActivationSketch()
    sizes = []
    for i in range(200):
        sk.update(rng.normal(size=4096) * (1 + i / 50))  # the range keeps growing
        sizes.append(sk.nbytes())
    assert max(sizes) <= ActivationSketch().max_bins * 3 * 8 + 2 * ActivationSketch().tail_size * 8
    assert sk.count == 200 * 4096


@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_sketch_quant_error_matches_brute_force(dist):
    """The closed-form error read off the histogram equals fake-quantizing every value (within 1%)."""
    x = DISTRIBUTIONS[dist](np.random.default_rng(5), 200_000).astype(np.float32)
    sk = ActivationSketch()
    for batch in np.array_split(x, 7):
        sk.update(batch)
    ratios = np.array([0.05, 0.3, 0.7, 1.0])
    scales, offsets = candidate_params(x.min() * ratios, x.max() * ratios, 8, True)
    got = sk.quant_error(scales, offsets, 8)
    for g, s, o in zip(got, np.ravel(scales), np.ravel(offsets), strict=True):
        want = ((ref_fake_quant(x, float(s), o) - x.astype(np.float64)) ** 2).sum()
        assert abs(g - want) / want < 0.01, (g, want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sketch_bins_and_tails_are_exact(dtype):
    """Counts equal numpy's histogram over the sketch's own edges and the tails equal the sorted extremes,
    with batches larger than one binning chunk, signed data away from zero, a range that keeps growing
    (bins merge) and batches whose extremes cannot enter the full tails. On the exact path (no sampling;
    the sampled one is tested in test_sketch_sampling.py)."""
    rng = np.random.default_rng(3)
    batches = [rng.normal(5.0, 1.0 + i, size=150_000 + 999 * i).astype(dtype) for i in range(5)]
    batches += [rng.normal(5.0, 0.1, size=70_000).astype(dtype)]  # nothing new for either tail
    sk = ActivationSketch(sample_size=0)
    for b in batches:
        sk.update(b.reshape(-1, 7) if b.size % 7 == 0 else b)
    data = np.concatenate(batches).astype(np.float64)
    want, _ = np.histogram(data, bins=sk.edges())
    np.testing.assert_array_equal(sk.counts, want)
    ordered = np.sort(data)
    np.testing.assert_array_equal(np.sort(sk.top), ordered[-sk.tail_size:])
    np.testing.assert_array_equal(np.sort(sk.bottom), ordered[: sk.tail_size])
    assert (sk.count, sk.min, sk.max) == (data.size, ordered[0], ordered[-1])


def test_sketch_merge_equals_single_stream():
    rng = np.random.default_rng(1)
    a_data, b_data = rng.normal(size=50_000), rng.laplace(size=50_000) * 4
    one = ActivationSketch()
    one.update(a_data)
    one.update(b_data)
    a, b = ActivationSketch(), ActivationSketch()
    a.update(a_data)
    b.update(b_data)
    a.merge(b)
    assert a.count == one.count and a.min == one.min and a.max == one.max
    s = np.array([0.01, 0.05, 0.1])
    np.testing.assert_allclose(a.quant_error(s, np.zeros(3), 8), one.quant_error(s, np.zeros(3), 8), rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_every_calibrator_handles_constant_and_zero_tensors(name):
    # a constant tensor takes compute()'s exact-range shortcut; one other value (a ReLU's zeros and one
    # activation, a spike on a constant) reaches the algorithm's own choose_range
    for values in ([0.0] * 64, [2.5] * 64, [-1.0] * 64, [0.0] * 63 + [2.5], [-1.0] * 63 + [3.0]):
        c = make_calibrator(name)
        c.update(np.array(values, np.float32).reshape(4, 16))
        p = c.compute()
        assert np.isfinite(p.scale) and float(p.scale) > 0
        most = values[0]  # the bulk of the values is represented within a step
        assert abs(float(p.fake_quant(np.array([most], np.float32))[0]) - most) <= float(p.scale)


def _brute_error(x, lo, hi, asym, bits=8):
    """Squared fake-quant error of every value (float64) for the clip range [lo, hi]."""
    p = params_from_range(lo, hi, bits, asym)
    return float(((ref_fake_quant(x, float(p.scale), int(p.offset), bits) - x) ** 2).sum())


def _best_range(x, los, his, asym):
    errors = [_brute_error(x, lo, hi, asym) for lo, hi in zip(los, his, strict=True)]
    return los[int(np.argmin(errors))], his[int(np.argmin(errors))], min(errors)


def _sym(los, his, asym):
    m = np.maximum(np.abs(los), np.abs(his))
    return (los, his) if asym else (-m, m)


def ref_range_minmax(x, asym, c):
    return x.min(), x.max(), None


def ref_range_percentile(x, asym, c):
    s, n = np.sort(x), x.size
    drop = n - math.ceil(c.options.percentile / 100.0 * n)
    if asym:
        return s[drop], s[n - 1 - drop], None
    m = max(abs(s[drop // 2]), abs(s[n - 1 - drop // 2]))
    return -m, m, None


def ref_range_ifmr(x, asym, c):
    s, n, o = np.sort(x), x.size, c.options
    hi, lo = s[math.ceil(o.max_percentile * n) - 1], s[n - math.ceil(o.min_percentile * n)]
    ratios = np.arange(o.search_range[0], o.search_range[1] - 1e-9, o.search_step)
    return _best_range(x, *_sym(lo * ratios, hi * ratios, asym), asym)


def ref_range_mse(x, asym, c):
    ratios = np.linspace(1.0 / c.options.num_candidates, 1.0, c.options.num_candidates)
    return _best_range(x, *_sym(x.min() * ratios, x.max() * ratios, asym), asym)


def ref_range_hfmg(x, asym, c):
    bins = c.options.num_of_bins
    top = max(-x.min(), x.max())
    counts, edges = np.histogram(x, bins=bins, range=(x.min(), x.max()) if asym else (-top, top))
    left, right, cands = 0, bins, [(0, bins)]
    while right - left > max(2, bins // 64):
        if not asym:
            left, right = left + 1, right - 1
        elif counts[left] <= counts[right - 1]:
            left += 1
        else:
            right -= 1
        cands.append((left, right))
    cands = cands[:: max(1, len(cands) // HFMG.max_candidates)]
    return _best_range(x, np.array([edges[a] for a, _ in cands]), np.array([edges[b] for _, b in cands]), asym)


def kl_divergences(x, num_bins, bits=8):
    """TensorRT's entropy calibration on numpy's histogram of |x|: threshold -> KL divergence."""
    hist, edges = np.histogram(np.abs(x), bins=num_bins, range=(0, np.abs(x).max()))
    levels, out = 2 ** (bits - 1), {}
    for i in range(levels, num_bins + 1, max(1, (num_bins - levels) // 256)):
        p = hist[:i].astype(np.float64)
        p[-1] += hist[i:].sum()
        q = np.zeros(i)
        for g in np.array_split(np.arange(i), levels):
            q[g] = np.where(hist[g] > 0, hist[g].sum() / max(np.count_nonzero(hist[g]), 1), 0)
        p, q = p / p.sum(), q / q.sum()
        keep = p > 0
        out[edges[i]] = float(np.sum(p[keep] * np.log(p[keep] / np.maximum(q[keep], 1e-12))))
    return out


REFERENCE_RANGES = {"minmax": ref_range_minmax, "percentile": ref_range_percentile, "ifmr": ref_range_ifmr,
                    "mse": ref_range_mse, "hfmg": ref_range_hfmg, "kl": None}
OPTIONS = {"percentile": {"percentile": 99.9}}  # 60 values clipped per side (the default clips none of 60 000)


@pytest.mark.parametrize("asym", [True, False])
@pytest.mark.parametrize("name", sorted(CALIBRATORS))
def test_choose_range_matches_a_numpy_reference(name, asym):
    """Each calibrator's choose_range on the sketch against the same rule computed on all values with numpy:
    exact for the order statistics, the same squared error (within 1%) for the searches, and for KL a
    threshold on numpy's own grid whose divergence is within 10% of the least."""
    rng = np.random.default_rng(11)
    n = 60_000
    x = np.where(rng.random(n) < 1e-3, rng.normal(size=n) * 12, rng.laplace(size=n) + 0.4).astype(np.float32)
    c = make_calibrator(name, asymmetric=asym, **OPTIONS.get(name, {}))
    for batch in np.array_split(x, 5):
        c.update(batch)
    lo, hi = c.choose_range()
    x64 = x.astype(np.float64)
    if name == "kl":
        kls = kl_divergences(x64, c.options.num_bins)
        grid = np.array(list(kls))
        nearest = grid[np.argmin(np.abs(grid - hi))]
        assert abs(nearest - hi) < 0.5 * (grid[1] - grid[0]) and lo == pytest.approx(max(x.min(), -hi))
        assert kls[nearest] <= 1.1 * min(kls.values()), (hi, nearest, kls[nearest], min(kls.values()))
        assert hi < 0.9 * np.abs(x).max()  # an outlier-heavy tensor: the search did clip
        return
    ref_lo, ref_hi, ref_err = REFERENCE_RANGES[name](x64, asym, c)
    if ref_err is None:  # order statistics: the sketch's tails hold them exactly
        assert (lo, hi) == (pytest.approx(ref_lo, abs=0), pytest.approx(ref_hi, abs=0))
    else:
        # the error surface is flat near its minimum: the sketch may pick a neighbouring candidate
        assert _brute_error(x64, lo, hi, asym) <= 1.01 * ref_err, ((lo, hi), (ref_lo, ref_hi))


def test_every_calibrator_has_a_reference():
    assert set(REFERENCE_RANGES) == set(CALIBRATORS)


def test_sketch_rejects_nan_and_inf():
    c = make_calibrator("ifmr")
    with pytest.raises(ValueError, match="NaN or Inf"):
        c.update(np.array([1.0, np.nan, np.inf]))


@pytest.mark.parametrize("name", ["hfmg", "mse", "kl", "percentile", "ifmr"])
def test_searching_calibrators_really_search(name):
    """On outlier-heavy data each search clips below min-max (ORT's Entropy once silently equalled MinMax)."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(size=400_000), rng.normal(size=40) * 40]).astype(np.float32)
    ref = make_calibrator("minmax")
    c = make_calibrator(name)
    ref.update(x)
    c.update(x)
    assert float(c.compute().scale) < 0.9 * float(ref.compute().scale)
    # and the chosen range gives a lower error than min-max on the bulk of the data
    bulk = x[:400_000]
    err = lambda p: float(((p.fake_quant(bulk) - bulk) ** 2).mean())  # noqa: E731
    assert err(c.compute()) < err(ref.compute())


def test_arq_weights_per_channel_and_per_tensor():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32) * np.arange(1, 9).reshape(8, 1, 1, 1)
    p = arq(w, 8, axis=0)
    np.testing.assert_allclose(p.scale, np.abs(w).reshape(8, -1).max(1) / 127, rtol=1e-6)
    q = p.quantize(w)
    assert q.min() >= -127 and q.max() == 127
    p4 = arq(w, 4, axis=None)
    assert float(p4.scale) == pytest.approx(np.abs(w).max() / 7, rel=1e-6)
    assert set(np.unique(p4.quantize(w))) <= set(range(-8, 8))


def test_mse_clip_is_never_worse_than_arq():
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, size=(16, 64)).astype(np.float32)
    for bits in (4, 6, 8):
        e_arq = ((arq(w, bits, 0).fake_quant(w) - w) ** 2).sum()
        e_mse = ((mse_clip(w, bits, 0).fake_quant(w) - w) ** 2).sum()
        assert e_mse <= e_arq + 1e-9
    assert ((mse_clip(w, 4, 0).fake_quant(w) - w) ** 2).sum() < 0.9 * ((arq(w, 4, 0).fake_quant(w) - w) ** 2).sum()


def test_bias_quantization_and_overflow():
    q = quantize_bias(np.array([0.5, -0.25]), np.array([0.01, 0.02]), 0.1)
    np.testing.assert_array_equal(q, [500, -125])
    with pytest.raises(OverflowError, match="INT32"):
        quantize_bias(np.array([1e6]), np.array([1e-6]), 1e-4)


@pytest.mark.parametrize("groups", [1, 4])
def test_bias_correction_cancels_the_mean_shift_of_quantized_weights(groups):
    """Against torch's conv: with the correction added, the quantized conv's per-channel output mean equals the
    float conv's; without it, it does not."""
    torch = pytest.importorskip("torch")
    from omct.core.bias_correction import ChannelMeans, correction

    rng = np.random.default_rng(0)
    # values constant over space (per sample and channel), so every receptive field sees the channel mean
    x = np.broadcast_to(rng.normal(size=(64, 8, 1, 1)) + rng.normal(size=(1, 8, 1, 1)) * 3, (64, 8, 10, 10))
    x = np.ascontiguousarray(x, np.float32)
    w = rng.normal(size=(16, 8 // groups, 3, 3)).astype(np.float32)
    wq = arq(w, 4, 0).fake_quant(w)  # 4 bits: a visible shift
    means = ChannelMeans(1)
    for part in np.array_split(x, 3):
        means.update(part)
    np.testing.assert_allclose(means.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6, atol=1e-6)
    shift = correction(w, wq, means.mean, out_axis=0, in_axis=1, groups=groups)

    def out_mean(weight, bias):
        y = torch.nn.functional.conv2d(torch.tensor(x), torch.tensor(weight), torch.tensor(bias), groups=groups)
        return y.double().mean(dim=(0, 2, 3)).numpy()

    zero = np.zeros(16, np.float32)
    ref, plain, fixed = out_mean(w, zero), out_mean(wq, zero), out_mean(wq, shift.astype(np.float32))
    assert np.abs(plain - ref).max() > 1e-2
    np.testing.assert_allclose(fixed, ref, atol=1e-4)


def test_bias_correction_for_linear_layers():
    from omct.core.bias_correction import ChannelMeans, correction

    rng = np.random.default_rng(1)
    x = (rng.normal(size=(64, 5, 12)) + 2).astype(np.float32)  # tokens: features on the last axis
    w = rng.normal(size=(7, 12)).astype(np.float32)  # Gemm transB: (out, in)
    wq = arq(w, 4, 0).fake_quant(w)
    means = ChannelMeans(-1)
    means.update(x)
    shift = correction(w, wq, means.mean, out_axis=0, in_axis=1)
    np.testing.assert_allclose((x @ wq.T + shift).mean(axis=(0, 1)), (x @ w.T).mean(axis=(0, 1)), atol=1e-4)
    shift_t = correction(w.T.copy(), wq.T.copy(), means.mean, out_axis=1, in_axis=0)  # (in, out) layout
    np.testing.assert_allclose(shift_t, shift, atol=1e-9)
