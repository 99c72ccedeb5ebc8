"""NUQ's output-aware assignment (core.gptq through nuq.assign_output_aware, stored as ada_flip) and shared level
tables (nuq.share_tables, stored once per distinct row in the deploy file)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_integer_kernels, optimized_ops, ort_run
from onnx import numpy_helper

from omct.core import gptq, nuq
from omct.core.weights import arq


def _correlated(rng, rows=24, cols=48, samples=400):
    w = rng.laplace(size=(rows, cols)) * rng.uniform(0.3, 1, (rows, 1))
    # strongly correlated inputs, as neighbouring pixels of conv patches are: a few factors and a little noise
    x = rng.normal(size=(samples, 8)) @ rng.normal(size=(8, cols)) + 0.2 * rng.normal(size=(samples, cols))
    return w.astype(np.float32), x


@pytest.mark.parametrize("out_axis", [0, 1])
def test_output_aware_assignment_round_trips_through_flips(rng, out_axis):
    """The flips ``assign_output_aware`` returns, applied by ``to_levels``, give GPTQ's codes (computed here
    directly with core.gptq), in the weight's own layout (channels first or last), and a smaller output error
    than the nearest level."""
    w, x = _correlated(rng)
    h = x.T @ x / len(x)
    weight = w if out_axis == 0 else np.ascontiguousarray(w.T)  # MatMul layout: (in, out)
    scale, levels = nuq.fit(weight, arq(weight, 8, out_axis).scale, out_axis, 1 - out_axis, 16, 1, np.diag(h))
    flips = nuq.assign_output_aware(weight, scale, out_axis, levels, h)
    codes = nuq.to_levels(weight, scale, out_axis, levels, flips)
    rows = np.moveaxis(codes, out_axis, 0)
    s = np.asarray(scale, np.float64)[:, None]
    direct = gptq.assign(w / s, levels.astype(np.float64), h, bracket=True)
    np.testing.assert_array_equal(rows, np.take_along_axis(levels, direct, 1))
    near = np.moveaxis(nuq.to_levels(weight, scale, out_axis, levels), out_axis, 0)
    assert 0 < len(flips) < w.size
    err = gptq.output_error(w, rows * s, h).sum()
    assert err < 0.5 * gptq.output_error(w, near * s, h).sum()


def test_grouped_assignment_is_per_group(rng):
    """A grouped convolution: each group's output channels are fitted with that group's own ``H``."""
    w = rng.laplace(size=(8, 3, 3, 3)).astype(np.float32)  # 4 groups of 2 output channels, 3 inputs each
    x = rng.normal(size=(300, 4, 3)) @ rng.normal(size=(3, 27)) + 0.1 * rng.normal(size=(300, 4, 27))
    h = np.einsum("ngi,ngj->gij", x, x) / 300
    scale, levels = nuq.fit(w, arq(w, 8, 0).scale, 0, 1, 16, 1, None, num_tables=0)
    codes = nuq.to_levels(w, scale, 0, levels, nuq.assign_output_aware(w, scale, 0, levels, h)).reshape(8, -1)
    s = np.asarray(scale, np.float64)[:, None]
    for g in range(4):
        rows = slice(2 * g, 2 * g + 2)
        direct = gptq.assign(w.reshape(8, -1)[rows] / s[rows], levels[rows].astype(np.float64), h[g], bracket=True)
        np.testing.assert_array_equal(codes[rows], np.take_along_axis(levels[rows], direct, 1))
    near = nuq.output_error(w, scale, 0, levels, h)
    assert nuq.output_error(w, scale, 0, levels, h, nuq.assign_output_aware(w, scale, 0, levels, h)) < near


def test_flip_descent_on_uneven_levels_ends_where_no_single_flip_helps(rng):
    """``flip_descent`` in weight units on a non-uniform grid (each weight between two uneven levels, some with
    no other level): it ends where no single flip lowers a row's output error (every flip tried here with
    numpy on the rows themselves), each final value is one of the two given, and no row got worse."""
    from omct.core.adaround import flip_descent

    g, out, d, n = 2, 4, 10, 60
    w = rng.normal(size=(g, out, d)).astype(np.float32)
    x = (rng.normal(size=(g, n, 3)) @ rng.normal(size=(g, 3, d)) + 0.3 * rng.normal(size=(g, n, d))).astype(np.float32)
    grid = np.array([-2.1, -0.9, -0.35, 0.0, 0.2, 0.75, 1.6])  # uneven levels
    idx = np.clip(np.searchsorted(grid, w) - 1, 0, len(grid) - 2)
    lo, hi = grid[idx], grid[idx + 1]
    near = np.where(np.abs(w - lo) <= np.abs(w - hi), lo, hi)
    alt = np.where(near == lo, hi, lo)
    alt[0, 0, :3] = near[0, 0, :3]  # no other level
    near, alt = near.astype(np.float32), alt.astype(np.float32)
    gram = np.matmul(x.transpose(0, 2, 1), x) / np.float32(n)
    final = flip_descent(near, alt, w, gram)

    def losses(q):  # each row's ||Q x - W x||^2 / n on the rows, float64
        err = np.einsum("god,gnd->gon", q.astype(np.float64) - w, x.astype(np.float64))
        return (err ** 2).sum(-1) / n

    assert np.all((final == near) | (final == alt)) and (final != near).any()
    assert np.array_equal(final[0, 0, :3], near[0, 0, :3])
    base = losses(final)
    assert np.all(base <= losses(near) + 1e-6)
    for i in np.ndindex(g, out, d):
        other = final.copy()
        other[i] = alt[i] if final[i] == near[i] else near[i]
        assert losses(other)[i[:2]] >= base[i[:2]] * (1 - 1e-5), i


@pytest.mark.parametrize("groups", [1, 4])
def test_polish_lowers_the_output_error_of_gptq_and_nearest(rng, groups):
    """``polish_flips`` starting from GPTQ's flips or from the nearest levels never raises the layer's output
    error on the ``H`` it polishes on (and here lowers it), and stays within each weight's bracket."""
    if groups == 1:
        w, x = _correlated(rng)
        h = x.T @ x / len(x)
    else:
        w = rng.laplace(size=(8, 27)).astype(np.float32)
        x = rng.normal(size=(300, 4, 3)) @ rng.normal(size=(3, 27)) + 0.1 * rng.normal(size=(300, 4, 27))
        h = np.einsum("ngi,ngj->gij", x, x) / 300
    scale, levels = nuq.fit(w, arq(w, 8, 0).scale, 0, 1, 16, 1, None)
    for start in ([], nuq.assign_output_aware(w, scale, 0, levels, h)):
        before = nuq.output_error(w, scale, 0, levels, h, start)
        polished = nuq.polish_flips(w, scale, 0, levels, h, start)
        assert nuq.output_error(w, scale, 0, levels, h, polished) < before
        near, other = nuq.bracket_levels(w, scale, 0, levels)
        codes = nuq.to_levels(w, scale, 0, levels, polished)
        assert np.all((codes == near) | (codes == other))


def test_shared_tables(rng):
    w = (rng.laplace(size=(64, 32, 3, 3)) * rng.uniform(0.2, 1, (64, 1, 1, 1))).astype(np.float32)
    w[:16] = np.round(w[:16] * 2) / 2  # some channels with a very different code histogram
    imp = rng.uniform(0.5, 2, 32)
    scale = arq(w, 8, 0).scale
    errors = {}
    for k in (0, 1, 4, 16):
        s, levels = nuq.fit(w, scale, 0, 1, 16, 0, imp, num_tables=k)  # no refit: the tables see ARQ scales
        distinct = np.unique(levels, axis=0)
        assert len(distinct) <= (k or 64)
        errors[k] = nuq.weighted_error(w, s, 0, 1, levels, imp)
        if k:  # every shared table is the exact optimum for the pooled, weighted codes of the channels on it
            codes = np.clip(np.round(w.reshape(64, -1) / scale[:, None]), -128, 127).astype(np.int64)
            weights = np.broadcast_to(np.repeat(imp + 1e-3 * imp.mean(), 9), codes.shape)
            for row in distinct:
                on = np.all(levels == row, axis=1)
                values, inverse = np.unique(codes[on], return_inverse=True)
                best = nuq.select_levels(values, np.bincount(inverse.reshape(-1), weights[on].reshape(-1)), 16)
                np.testing.assert_array_equal(np.unique(row), best)
    assert errors[0] < errors[16] < errors[4] < errors[1]
    # the stored size: 16 tables of 16 levels and one byte per channel instead of 64 rows
    assert nuq.stored_bytes(w.shape, 0, 16, 16) == w.size // 2 + 16 * 16 + 64
    assert nuq.stored_bytes(w.shape, 0, 16) == w.size // 2 + 64 * 16
    assert nuq.worthwhile((64, 3, 3, 3), 0, 16, 8) and not nuq.worthwhile((64, 3, 3, 3), 0, 16)


def _convs(tmp_path):
    import torch
    from torch import nn
    from zoo import export_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 96, 3, padding=1), nn.ReLU(), nn.Conv2d(96, 96, 1), nn.ReLU(),
                          nn.Conv2d(96, 96, 3, padding=1, groups=96), nn.ReLU(),  # depthwise: an omct extension
                          nn.Conv2d(96, 96, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(96, 10)).eval()
    path = tmp_path / "convs.onnx"
    export_onnx(model, np.zeros((1, 3, 10, 10), np.float32), path)
    return path


def _flow(tmp_path, model, cfg_text, x, prefix):
    import omct.onnx as amct

    cfg = tmp_path / f"{prefix}.cfg"
    cfg.write_text(f"batch_num: 1\n{cfg_text}\n")
    amct.create_quant_config(str(tmp_path / f"{prefix}.json"), str(model), config_defination=str(cfg))
    amct.quantize_model(str(tmp_path / f"{prefix}.json"), str(model), str(tmp_path / f"{prefix}_mod.onnx"),
                        str(tmp_path / f"{prefix}_rec.txt"))
    amct.CalibrationSession(str(tmp_path / f"{prefix}_mod.onnx")).run(None, {"input": x})
    return amct.save_model(str(tmp_path / f"{prefix}_mod.onnx"), str(tmp_path / f"{prefix}_rec.txt"),
                           str(tmp_path / prefix))


def test_deploy_with_shared_tables_and_flips_runs_integer_kernels(tmp_path, rng):
    """Shared tables are stored once ([tables, steps] INT8 and a uint8 table number per channel), expanded by
    Cast + Gather that ONNX Runtime folds: the integer kernels remain and read exactly the fake-quant codes,
    flips (output-aware assignment) included."""
    from omct.formats.record import read_record

    model = _convs(tmp_path)
    x = rng.normal(size=(32, 3, 10, 10)).astype(np.float32)
    fake, deploy = _flow(tmp_path, model, "nuq_config { nuq_quantize { num_steps: 16 output_aware: true "
                                          "num_tables: 8 allocate: false } }", x, "q")  # the fixed rule
    rec = read_record(tmp_path / "q_rec.txt")
    nuq_layers = [n for n, r in rec.items() if r.nuq_levels]
    assert len(nuq_layers) == 5 and any(rec[n].ada_flip for n in nuq_layers)  # the stem too: shared tables pay
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(deploy).graph.initializer}
    tables = [v for n, v in inits.items() if n.endswith(".weight_levels")]
    # the 96 -> 96 3x3 conv keeps a table per channel (its tables are 3.7% of its indices: below nuq.SHARE_ABOVE)
    # (a shared layer may store fewer: channels may move to the uniform grid, one more distinct row, where the
    # bytes allow, and tables no channel keeps are not stored)
    shapes = sorted(v.shape for v in tables)
    assert len(shapes) == 5 and 8 < shapes[-1][0] <= 96 and all(k <= 8 and s == 16 for k, s in shapes[:4]), shapes
    assert sum(n.endswith(".weight_table") for n in inits) >= 4  # a table number per channel where tables are shared
    ops = optimized_ops(deploy, tmp_path)
    assert ops.count("QLinearConv") == 4 and "Gather" not in ops and "GatherElements" not in ops
    assert_integer_kernels(deploy, tmp_path)
    out_fake, out_deploy = ort_run(fake, {"input": x})[0], ort_run(deploy, {"input": x})[0]
    np.testing.assert_allclose(out_deploy, out_fake, atol=0.01 * np.abs(out_fake).max())
    opt = onnx.load(tmp_path / "optimized.onnx")
    folded = {t.name: numpy_helper.to_array(t) for t in opt.graph.initializer}
    int8 = [folded[n.input[3]] for n in opt.graph.node if n.op_type == "QLinearConv"]
    fq = {t.name: numpy_helper.to_array(t) for t in onnx.load(fake).graph.initializer}
    for node in onnx.load(fake).graph.node:
        if node.op_type == "Conv":
            codes = fq[node.input[1]] / np.asarray(rec[node.name].scale_w, np.float32)[:, None, None, None]
            assert any(w.shape == codes.shape and np.array_equal(w, np.round(codes)) for w in int8), node.name


def _weight_bytes(deploy) -> int:
    """Bytes of the stored weights: packed indices, level tables, table numbers, INT8 weights."""
    ends = (".weight_packed", ".weight_levels", ".weight_table", ".weight_quantized")
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(deploy).graph.initializer if t.name.endswith(ends))


def test_allocation_stays_within_the_fixed_rules_bytes_and_keeps_the_error_close(tmp_path, rng):
    """With ``allocate`` (default) the layers' stored weights take no more bytes than the fixed rule's, and the
    model's output is about as close to FP32 on the calibration inputs (the allocation's errors are measured on
    them); the deploy model still reads exactly the fake-quant codes through the integer kernels."""
    from omct.formats.record import read_record

    model = _convs(tmp_path)
    x = rng.normal(size=(32, 3, 10, 10)).astype(np.float32)
    ref = ort_run(model, {"input": x})[0]
    cfg = "nuq_config { nuq_quantize { num_steps: 16 num_tables: 8 allocate: %s } }"
    fixed_fake, fixed = _flow(tmp_path, model, cfg % "false", x, "fixed")
    fake, deploy = _flow(tmp_path, model, cfg % "true", x, "alloc")
    # the fixed rule's bytes (nuq.packed_bytes: its tables, before channels move to the uniform grid, which can
    # only make the allocate: false file smaller)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(model).graph.initializer}
    weights = [inits[n.input[1]] for n in onnx.load(model).graph.node if n.op_type in ("Conv", "Gemm")]
    assert len(weights) == 5
    budget = sum(nuq.packed_bytes(w.size, 16, w.shape[0], 8) for w in weights)
    assert _weight_bytes(deploy) <= budget and _weight_bytes(fixed) <= budget
    rec, fixed_rec = read_record(tmp_path / "alloc_rec.txt"), read_record(tmp_path / "fixed_rec.txt")
    assert any(rec[n].nuq_levels != fixed_rec[n].nuq_levels for n in rec)  # it chose differently
    err = {k: float(((ort_run(f, {"input": x})[0] - ref) ** 2).sum()) for k, f in (("fixed", fixed_fake), ("alloc", fake))}
    # the allocation decides on the summed relative layer error; without it each layer already keeps, per channel,
    # the better of its tables and the uniform grid, and on this 5-layer toy the two are within 15% of output error
    assert err["alloc"] <= 1.15 * err["fixed"], err
    assert_integer_kernels(deploy, tmp_path)
    out_fake, out_deploy = ort_run(fake, {"input": x})[0], ort_run(deploy, {"input": x})[0]
    np.testing.assert_allclose(out_deploy, out_fake, atol=0.01 * np.abs(out_fake).max())


def test_inspect_names_nuq_on_depthwise_an_extension(tmp_path):
    import omct.onnx as amct

    model = _convs(tmp_path)
    dw = next(n.name for n in onnx.load(model).graph.node
              if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    rows = {r[0]: r for r in amct.inspect_model(str(model)).rows()}
    assert rows[dw][-1] == "yes (omct extension: group 96)"


def test_output_aware_nuq_beats_uniform_on_a_trained_model_layer(tmp_path, trained, digits):
    """On a trained ResNet's convolution, on held-out images: the output error of NUQ-16 / NUQ-32 weights with
    the output-aware assignment is below uniform INT4 / INT5 weights' (with learned rounding, the default) and
    below NUQ with nearest levels; NUQ-32 with nearest levels is below INT5 rounded to nearest."""
    _, path = trained("resnet")
    m = onnx.load(path)
    conv = [n for n in m.graph.node if n.op_type == "Conv"][3]
    m.graph.output.extend([onnx.ValueInfoProto(name=conv.input[0]), onnx.ValueInfoProto(name=conv.output[0])])
    probe = tmp_path / "probe.onnx"
    onnx.save(m, probe)
    calib, test = digits.x_train[:64], digits.x_test[:64]
    inp, ref = ort_run(probe, {"input": test})[1:]
    methods = {"int5": "common_config { arq_quantize { quant_bits: 5 } }",  # the default: learned rounding
               "int4": "common_config { arq_quantize { quant_bits: 4 } }",
               "int5-nearest": "learned_rounding: false\ncommon_config { arq_quantize { quant_bits: 5 } }"}
    for steps in (32, 16):
        for oa in ("true", "false"):
            methods[f"nuq{steps}-{oa}"] = (f"nuq_config {{ nuq_quantize {{ num_steps: {steps} output_aware: {oa} }} }}")
    err = {}
    for name, cfg in methods.items():
        fake, _ = _flow(tmp_path, path, cfg, calib, name)
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(fake).graph.initializer}
        w = next(v for k, v in weights.items() if k.startswith(conv.name) and k.endswith("weight_fake_quant"))
        # the layer's own bias as deployed (bias correction removes the mean error the rounding leaves to it)
        bias = next(v for k, v in weights.items() if k.startswith(conv.name) and k.endswith("bias_fake_quant"))
        single = onnx.helper.make_model(onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w", "b"], ["y"], **{a.name: onnx.helper.get_attribute_value(a)
                                                                     for a in conv.attribute})],
            "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, None)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
            [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")]), opset_imports=m.opset_import)
        onnx.save(single, tmp_path / f"{name}_layer.onnx")
        out = ort_run(tmp_path / f"{name}_layer.onnx", {"x": inp})[0]
        err[name] = float(((out - ref) ** 2).sum() / (ref ** 2).sum())
    assert err["nuq32-true"] < min(err["nuq32-false"], err["int5"]), err
    assert err["nuq32-false"] < err["int5-nearest"], err  # the levels alone beat uniform rounded to nearest
    assert err["nuq16-true"] < err["nuq16-false"] and err["nuq16-true"] < err["int4"], err


def test_tables_are_shared_only_where_per_channel_tables_weigh():
    """Depthwise and narrow layers share tables; a wide conv keeps one per channel (its tables are a few percent of
    its packed indices), and sharing is never chosen where it would store more."""
    from omct.core import nuq

    assert nuq.effective_tables(96 * 9, 16, 96, 16) == 16            # depthwise 3x3: tables 3.6x the indices
    assert nuq.effective_tables(64 * 64 * 9, 16, 64, 16) == 0        # 64 -> 64 3x3: tables 2.8% of the indices
    assert nuq.effective_tables(64 * 64 * 9, 16, 64, 0) == 0         # num_tables 0: one per channel, always
    assert nuq.effective_tables(10 * 8, 16, 10, 16) == 0             # as many tables as channels: nothing saved
    count, channels = 96 * 9, 96
    assert nuq.packed_bytes(count, 16, channels, 16) == 4 * -(-count // 8) + 16 * 16 + channels
    assert nuq.packed_bytes(64 * 64 * 9, 16, 64, 16) == 4 * -(-64 * 64 * 9 // 8) + 16 * 64
