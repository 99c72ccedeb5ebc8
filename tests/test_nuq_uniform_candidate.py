"""NUQ's storage choice under the flip descent (algorithms.nuq_assignment): each layer is assigned on its own level
tables and on the uniform grid of the same bits (a valid level table) with the same descent on the same output
error, and each output channel keeps the better; so NUQ-N is not worse than uniform log2(N)-bit weights with the
descent by construction. Checked against a numpy brute force on a small tensor and end to end on a trained layer."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
from conftest import ort_run
from onnx import numpy_helper

from omct.algorithms.nuq_assignment import uniform_grid
from omct.core import nuq
from omct.core.adaround import InputGram, flip_gaps
from omct.core.weights import arq


def _loss(q, w, a, b):
    """The reference: each row's expected output error, in float64 from the quadratic's definition."""
    d = (q - w).astype(np.float64)
    err = np.einsum("goi,gij,goj->go", d, a.astype(np.float64), d)
    if b is not None:
        err = err - 2 * (b * d).sum(-1) - (b.astype(np.float64) * w).sum(-1)
    return err.reshape(-1)


def _option(w, scale, table, a, b):
    """(scale, table, codes, errors) of the 2-D weight ``w`` (out, d) on ``table`` after the descent."""
    near, alt = nuq.bracket_levels(w, scale, 0, table)
    s = np.asarray(scale, np.float32)[None, :, None]
    start, other = near[None].astype(np.float32), alt[None].astype(np.float32)
    q, err = nuq.descend(s * start, s * other, w[None], a, b)
    codes = np.where(q != s * start, other, start)[0].astype(np.int64)
    return np.asarray(scale, np.float32), table, codes, err


@pytest.mark.parametrize("noise", [False, True])
def test_descent_on_both_grids_keeps_the_better_per_channel_against_brute_force(rng, noise):
    """On a 6 x 10 weight (NUQ-16 on one shared table) with correlated inputs (the moments from ``InputGram``,
    with the input-rounding terms or without): the descent's result on each grid is a local minimum of the reference
    error (no single bracket flip lowers it), its reported errors are the reference's, no lower than the brute-force
    optimum over all 2^10 bracket choices per row; the per-channel mixture's error is the minimum of the two per
    channel, and its codes, stored as the record stores them (levels and gap-coded flips), come back through
    ``to_levels``; each grid wins on some channel."""
    out, d = 6, 10
    w = (rng.uniform(-1, 1, size=(out, d)) * rng.uniform(0.5, 1, (out, 1))).astype(np.float32)
    x = rng.normal(size=(300, 3)) @ rng.normal(size=(3, d)) + 0.3 * rng.normal(size=(300, d))
    gram = InputGram(None, 0, rows_per_batch=512)
    gram.update(x.astype(np.float32))
    a, b = gram.terms(w[None], None, 0.2 if noise else None)
    steps = 16
    scale8 = arq(w, 8, 0).scale
    own = _option(w, *nuq.fit(w, scale8, 0, 1, steps, 1, np.diag(a[0]), num_tables=1), a, b)  # one table
    uscale = nuq._half(np.asarray(arq(w, 4, 0).scale, np.float32).reshape(-1))
    uni = _option(w, uscale, np.broadcast_to(uniform_grid(steps), (out, steps)).copy(), a, b)
    for scale, table, codes, err in (own, uni):
        near, alt = nuq.bracket_levels(w, scale, 0, table)
        s = scale[:, None]
        ref = _loss((codes * s)[None], w[None], a, b)
        np.testing.assert_allclose(err, ref, rtol=1e-4, atol=1e-6)
        for j in range(d):  # a local minimum: no single flip lowers any row's error
            flipped = codes.copy()
            flipped[:, j] = np.where(codes[:, j] == near[:, j], alt[:, j], near[:, j])
            assert np.all(_loss((flipped * s)[None], w[None], a, b) >= ref - 1e-6 * np.abs(ref).max())
        every = np.array(list(itertools.product((0, 1), repeat=d)), bool)  # all 2^10 bracket choices of a row
        for r in range(out):  # brute force
            q = np.where(every, alt[r], near[r]) * s[r]
            best = _loss(q[None], np.broadcast_to(w[r], q.shape)[None], a,
                         None if b is None else np.broadcast_to(b[:, r], q.shape)[None]).min()
            assert best <= ref[r] + 1e-9
    mixed = nuq.better_rows(own, uni, 0)
    np.testing.assert_array_equal(mixed[3], np.minimum(own[3], uni[3]))
    assert (uni[3] < own[3]).any() and (own[3] < uni[3]).any(), (own[3], uni[3])  # each grid wins somewhere
    scale, table, codes, err = mixed
    flips = flip_gaps(nuq.to_levels(w, scale, 0, table), nuq._other_level(w, scale, 0, table), codes)
    np.testing.assert_array_equal(nuq.to_levels(w, scale, 0, table.ravel().tolist(), flips), codes)
    np.testing.assert_allclose(_loss((codes * scale[:, None])[None], w[None], a, b), err, rtol=1e-4, atol=1e-6)


def _flow(tmp_path, model, cfg_text, x, prefix, flip_bits=None):
    import json

    import omct.onnx as amct

    cfg = tmp_path / f"{prefix}.cfg"
    cfg.write_text(f"batch_num: 1\n{cfg_text}\n")
    config = tmp_path / f"{prefix}.json"
    amct.create_quant_config(str(config), str(model), config_defination=str(cfg))
    if flip_bits:  # uniform weights with the flip descent on every layer (bench_nuq's int4-flips / int5-flips)
        data = json.loads(config.read_text())
        for layer in data.values():
            if isinstance(layer, dict) and "weight_quant_params" in layer:
                layer["weight_quant_params"].update(num_bits=flip_bits, wts_algo="ada_quantize", solver="flips")
        config.write_text(json.dumps(data))
    amct.quantize_model(str(config), str(model), str(tmp_path / f"{prefix}_mod.onnx"),
                        str(tmp_path / f"{prefix}_rec.txt"))
    amct.CalibrationSession(str(tmp_path / f"{prefix}_mod.onnx")).run(None, {"input": x})
    return amct.save_model(str(tmp_path / f"{prefix}_mod.onnx"), str(tmp_path / f"{prefix}_rec.txt"),
                           str(tmp_path / prefix))


def test_nuq_beats_uniform_with_the_flip_descent_on_a_trained_model(tmp_path, trained, digits):
    """On the trained zoo ResNet, on held-out images: the logits of NUQ-16 / NUQ-32 are closer to FP32's than those
    of uniform INT4 / INT5 weights with the flip descent on every layer (the strongest uniform rounding omct has),
    and the NUQ-16 deploy file is the smaller."""
    _, path = trained("resnet")
    calib, test = digits.x_train[:64], digits.x_test[:128]
    ref = ort_run(path, {"input": test})[0]
    err, size = {}, {}
    for name, cfg, bits in (("nuq16", "nuq_config { nuq_quantize { num_steps: 16 } }", None),
                            ("nuq32", "nuq_config { nuq_quantize { num_steps: 32 } }", None),
                            ("int4", "", 4), ("int5", "", 5)):
        fake, deploy = _flow(tmp_path, path, cfg, calib, name, bits)
        err[name] = float(((ort_run(fake, {"input": test})[0] - ref) ** 2).sum() / (ref ** 2).sum())
        size[name] = sum(numpy_helper.to_array(t).nbytes for t in onnx.load(deploy).graph.initializer)
    assert err["nuq16"] < err["int4"] and err["nuq32"] < err["int5"], err
    assert size["nuq16"] < size["int4"], size
