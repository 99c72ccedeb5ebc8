"""Graph normalisation (Constant weights, BN folding, naming, opset, external data) and AMCT's file formats."""

import json
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from conftest import optimized_ops, ort_run, run_flow
from onnx import helper
from onnx_builders import conv_model, linear_model, make_model, vi

import omct.onnx as amct
from omct.core.calibrators import CALIBRATORS, Calibrator, make_calibrator
from omct.core.options import AlgorithmOptions, CfgPlacement, option
from omct.core.params import params_from_range
from omct.errors import ConfigError, ModelError
from omct.formats.record import LayerRecord, read_record, write_record
from omct.graph import model_io


def _x(rng, n=4):
    return rng.normal(size=(n, 8, 6, 6)).astype(np.float32)


def test_constant_node_weights_are_quantized(tmp_path, rng):
    model = conv_model(rng)
    w = next(t for t in model.graph.initializer if t.name == "w")
    const = helper.make_node("Constant", [], ["w"], value=w, name="")
    keep = [t for t in model.graph.initializer if t.name != "w"]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.node.insert(0, const)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rep = amct.inspect_model(str(path))
    assert [s.name for s in rep.layers] == ["conv"] and rep.normalize.constants_moved == 1
    x = _x(rng)
    fake, deploy = run_flow(path, tmp_path, [x], feed_name="x")
    assert np.abs(ort_run(deploy, {"x": x})[0] - ort_run(path, {"x": x})[0]).max() < 0.1


def test_bias_behind_an_identity_of_a_constant_is_quantized(tmp_path, rng):
    """torch.onnx.export stores equal-valued parameters once and feeds the others through Identity nodes."""
    model = linear_model(rng, "Gemm")
    model.graph.node.insert(0, helper.make_node("Identity", ["b"], ["b_copy"], name="dedup"))
    model.graph.node[1].input[2] = "b_copy"
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    rep = amct.inspect_model(str(path))
    assert [s.name for s in rep.layers] == ["fc"] and not rep.refused and rep.normalize.constants_moved == 1
    x = rng.normal(size=(4, 12)).astype(np.float32)
    fake, _ = run_flow(path, tmp_path, [x], feed_name="x")
    assert np.abs(ort_run(fake, {"x": x})[0] - ort_run(path, {"x": x})[0]).max() < 0.1


def test_batchnorm_folding_matches_and_can_be_skipped(tmp_path, rng):
    w = (rng.normal(size=(8, 8, 3, 3)) * 0.3).astype(np.float32)
    bn = {"g": rng.uniform(0.5, 2, 8), "beta": rng.normal(size=8), "mean": rng.normal(size=8), "var": rng.uniform(0.5, 2, 8)}
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c", "g", "beta", "mean", "var"], ["y"], name="bn")]
    inits = {"w": w, **{k: v.astype(np.float32) for k, v in bn.items()}}
    path = tmp_path / "bn.onnx"
    onnx.save(make_model(nodes, [vi("x", ["N", 8, 6, 6])], [vi("y", None)], inits), path)
    x = _x(rng)
    ref = ort_run(path, {"x": x})[0]
    fake, _ = run_flow(path, tmp_path, [x], feed_name="x")
    ops = [n.op_type for n in onnx.load(fake).graph.node]
    assert "BatchNormalization" not in ops
    assert np.abs(ort_run(fake, {"x": x})[0] - ref).max() < 0.05 * np.abs(ref).max()
    fake2, _ = run_flow(path, tmp_path, [x], feed_name="x", prefix="nofuse")
    cfg = json.loads((tmp_path / "nofuse.json").read_text())
    assert cfg["do_fusion"] is True
    cfg["do_fusion"] = False
    (tmp_path / "nofuse.json").write_text(json.dumps(cfg))
    amct.quantize_model(str(tmp_path / "nofuse.json"), str(path), str(tmp_path / "m2.onnx"), str(tmp_path / "r2.txt"))
    assert "BatchNormalization" in [n.op_type for n in onnx.load(tmp_path / "m2.onnx").graph.node]


def test_unnamed_and_duplicate_nodes_get_stable_names(tmp_path, rng):
    model = conv_model(rng)
    model.graph.node[0].name = ""
    model.graph.node[1].name = ""
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    updated = tmp_path / "updated.onnx"
    amct.create_quant_config(str(tmp_path / "c.json"), str(path), updated_model=str(updated))
    assert [n.name for n in onnx.load(updated).graph.node] == ["Conv_0", "Relu_1"]
    assert "Conv_0" in json.loads((tmp_path / "c.json").read_text())
    model.graph.node[0].name = "dup"
    model.graph.node[1].name = "dup"
    onnx.save(model, path)
    rep = amct.inspect_model(str(path))
    assert rep.normalize.renamed == {"dup": "dup_1"}


def test_opset_11_model_is_upgraded_and_runs(tmp_path, rng):
    model = conv_model(rng, opset=11)
    path = tmp_path / "m11.onnx"
    onnx.save(model, path)
    x = _x(rng)
    fake, deploy = run_flow(path, tmp_path, [x], feed_name="x")
    for p in (fake, deploy):
        assert onnx.load(p).opset_import[0].version >= 13
        assert ort_run(p, {"x": x})[0].shape == (4, 8, 6, 6)
    assert "QLinearConv" in optimized_ops(deploy, tmp_path)


def test_refused_candidates_have_reasons(tmp_path, rng):
    model = linear_model(rng, "Gemm", trans_a=0, alpha=0.5)
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    rep = amct.inspect_model(str(path))  # alpha folded into the constant B: quantized, nothing refused
    assert [s.name for s in rep.layers] == ["fc"] and not rep.refused and rep.normalize.gemms_rewritten == ["fc"]
    x = rng.normal(size=(4, 12)).astype(np.float32)
    fake, _ = run_flow(path, tmp_path, [x], feed_name="x")
    assert np.abs(ort_run(fake, {"x": x})[0] - ort_run(path, {"x": x})[0]).max() < 0.05
    # what cannot be folded (alpha with a computed B) is refused with its reason
    gemm = helper.make_node("Gemm", ["a", "b"], ["y"], name="fc", alpha=0.5)
    onnx.save(make_model([gemm], [vi("a", [2, 3]), vi("b", [3, 2])], [vi("y", None)], {}), path)
    assert [str(r) for r in amct.inspect_model(str(path)).refused] == ["fc: alpha 0.5 is not supported (only 1)"]
    # activation x activation MatMul is a refused candidate, not an error
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="attn")]
    onnx.save(make_model(nodes, [vi("a", [2, 3]), vi("b", [3, 2])], [vi("y", None)], {}), path)
    rep = amct.inspect_model(str(path))
    assert "not a constant" in rep.refused[0].reason
    with pytest.raises(ModelError, match=r"g\.onnx' has no quantizable layer \(attn: .*not a constant"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(path))


def test_external_data_models_load_and_save(tmp_path, rng, monkeypatch):
    src = tmp_path / "ext.onnx"
    onnx.save(conv_model(rng), src, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").exists()
    # Pretend every model holds more tensor bytes than the limit, so the >2 GB path (external data) is
    # taken for the outputs too: save_model looks tensor_bytes up in its module on every call.
    monkeypatch.setattr(model_io, "tensor_bytes", lambda model: model_io.EXTERNAL_DATA_THRESHOLD + 1)
    x = _x(rng)
    fake, deploy = run_flow(src, tmp_path, [x], feed_name="x")
    assert (tmp_path / "q_deploy_model.onnx.data").exists()
    assert np.isfinite(ort_run(deploy, {"x": x})[0]).all()


def test_simplified_cfg_priority_layer_over_type_over_common(tmp_path, rng):
    model = linear_model(rng, "Gemm")
    conv = conv_model(rng)
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    cfg = tmp_path / "q.cfg"
    cfg.write_text("""
batch_num: 3
activation_offset: false
common_config { arq_quantize { channel_wise: false quant_bits: 6 } ifmr_quantize { search_range_start: 0.8 } }
override_layer_types { layer_type: "Gemm" calibration_config { hfmg_quantize { num_of_bins: 1024 } } }
override_layer_configs { layer_name: "fc" calibration_config { ifmr_quantize { max_percentile: 0.99 asymmetric: true } } }
""")
    amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg), batch_num=9)
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["batch_num"] == 3 and c["activation_offset"] is False
    act, wts = c["fc"]["activation_quant_params"], c["fc"]["weight_quant_params"]
    assert act["act_algo"] == "ifmr" and act["max_percentile"] == 0.99 and act["asymmetric"] is True
    assert act["search_range"] == [0.7, 1.3]  # the name override switched the algorithm back: defaults again
    assert wts == {"num_bits": 6, "wts_algo": "arq_quantize", "channel_wise": False}
    onnx.save(conv, path)
    cfg.write_text('skip_layer_types: "Conv"\nnuq_config { num_steps: 16 }\n')
    with pytest.raises(ConfigError, match="NuqConfig has no field 'num_steps'.*AMCT nests them: nuq_config \\{ nuq_quantize"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg))
    cfg.write_text('skip_layer_types: "Conv"\n')
    amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg))
    assert json.loads((tmp_path / "c.json").read_text())["conv"]["quant_enable"] is False
    cfg.write_text("common_config { bogus_quantize { } }\n")
    with pytest.raises(ConfigError, match="q.cfg"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg))


def test_record_round_trip_and_amct_text(tmp_path):
    path = tmp_path / "r.txt"
    write_record(path, {"conv": LayerRecord(0.5, -128, [0.1, 0.2], [0, 0], 0.25, 3), "fc": LayerRecord(1.5, 0, [0.3], [0])})
    text = path.read_text()
    assert 'key: "conv"' in text and "scale_d: 0.5" in text and "offset_d: -128" in text
    got = read_record(path)
    assert got["conv"].scale_w == pytest.approx([0.1, 0.2]) and got["conv"].offset_o == 3
    assert got["fc"].scale_o is None
    path.write_text(text.replace("scale_d: 0.5", "scale_d: 0.75"))  # edited by hand after it was written
    assert read_record(path)["conv"].scale_d == 0.75
    # an AMCT-written record (no omct fields) reads too
    path.write_text('record {\n  key: "conv1"\n  value {\n    scale_d: 0.01\n    offset_d: -3\n    scale_w: 0.02\n'
                    '    offset_w: 0\n  }\n}\n')
    assert read_record(path)["conv1"].offset_d == -3


def test_calibration_session_returns_what_the_original_returns(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "mod.onnx", tmp_path / "r.txt"
    amct.create_quant_config(str(cfg), str(path), batch_num=2)
    amct.quantize_model(str(cfg), str(path), str(mod), str(rec))
    sess = amct.CalibrationSession(str(mod))
    x = _x(rng)
    assert [o.name for o in sess.get_outputs()] == ["y"]
    assert [i.name for i in sess.get_inputs()] == ["x"]  # delegated to the InferenceSession

    def user_inference(session, data):  # a user's function written for InferenceSession
        return session.run(["y"], {"x": data})[0]

    np.testing.assert_array_equal(user_inference(sess, x), ort_run(path, {"x": x})[0])
    out = sess.run(None, {"x": x})
    assert len(out) == 1 and sess.complete
    assert sess.run(None, {"x": x})[0].shape == (4, 8, 6, 6)  # extra runs are fine
    assert "scale_d" in rec.read_text()


class FractionOfRange(Calibrator):
    """A calibrator only this file knows: clips at a fraction of the observed range."""

    name = "fraction"

    @dataclass(frozen=True)
    class Options(AlgorithmOptions):
        cfg = CfgPlacement("fraction_quantize", 1999, "FractionQuantize", shared=(("asymmetric", 1),))
        fraction: float = option(0.5, cfg=2, gt=0.0, le=1.0)

    def choose_range(self):
        return self.sketch.min * self.options.fraction, self.sketch.max * self.options.fraction


def _calibrate(config_json, model_path, tmp_path, x, prefix):
    """quantize_model + one calibration batch from an existing config.json; returns the conv layer's record."""
    mod, rec = tmp_path / f"{prefix}_mod.onnx", tmp_path / f"{prefix}_record.txt"
    amct.quantize_model(str(config_json), str(model_path), str(mod), str(rec))
    amct.CalibrationSession(str(mod)).run(None, {"x": x})
    return read_record(rec)["conv"]


def test_a_calibrator_registered_in_one_place_is_selectable_from_cfg_and_json(tmp_path, rng, monkeypatch):
    """One class and one registry entry: the .cfg message, config.json's act_algo and its option follow."""
    monkeypatch.setitem(CALIBRATORS, FractionOfRange.name, FractionOfRange)
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    x = _x(rng)
    cfg = tmp_path / "f.cfg"
    cfg.write_text("batch_num: 1\ncommon_config { fraction_quantize { fraction: 0.25 } }\n")
    amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg))
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["conv"]["activation_quant_params"] == {"num_bits": 8, "act_algo": "fraction", "fraction": 0.25}
    for fraction in (0.25, 0.75):
        data["conv"]["activation_quant_params"]["fraction"] = fraction
        (tmp_path / "c.json").write_text(json.dumps(data))
        rec = _calibrate(tmp_path / "c.json", path, tmp_path, x, f"f{fraction}")
        want = params_from_range(float(x.min()) * fraction, float(x.max()) * fraction)
        assert rec.scale_d == pytest.approx(float(want.scale), rel=1e-6) and rec.offset_d == int(want.offset)
    cfg.write_text("common_config { fraction_quantize { fraction: 1.5 } }\n")
    with pytest.raises(ConfigError, match=r"f\.cfg: layer 'conv': activation_quant_params\.fraction: .*less than or equal to 1"):
        amct.create_quant_config(str(tmp_path / "c.json"), str(path), config_defination=str(cfg))


@pytest.mark.parametrize("algo,option,values", [("mse", "num_candidates", (3, 200)), ("kl", "num_bins", (256, 4096))])
def test_mse_and_kl_options_are_settable_from_cfg_and_json(algo, option, values, tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    x = _x(rng, 8)
    x[0, 0, 0, :3] = [25.0, -30.0, 40.0]  # outliers: the searches clip them, each in its own way
    scales = []
    for value in values:
        cfg = tmp_path / f"{value}.cfg"
        cfg.write_text(f"batch_num: 1\ncommon_config {{ {algo}_quantize {{ {option}: {value} }} }}\n")
        amct.create_quant_config(str(tmp_path / f"{value}.json"), str(path), config_defination=str(cfg))
        act = json.loads((tmp_path / f"{value}.json").read_text())["conv"]["activation_quant_params"]
        assert act == {"num_bits": 8, "act_algo": algo, option: value}
        rec = _calibrate(tmp_path / f"{value}.json", path, tmp_path, x, f"cfg{value}")
        ref = make_calibrator(algo, **{option: value})
        ref.update(x)
        assert rec.scale_d == pytest.approx(float(ref.compute().scale), rel=1e-6)
        scales.append(rec.scale_d)
    assert scales[0] != pytest.approx(scales[1], rel=1e-3), "the option must change the calibrated range"
    data = json.loads((tmp_path / f"{values[1]}.json").read_text())  # config.json: the other value, by hand
    data["conv"]["activation_quant_params"][option] = values[0]
    (tmp_path / "edited.json").write_text(json.dumps(data))
    assert _calibrate(tmp_path / "edited.json", path, tmp_path, x, "edited").scale_d == pytest.approx(scales[0], rel=1e-6)


def test_an_option_of_another_algorithm_is_a_clear_error(tmp_path, rng):
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    cfg = tmp_path / "c.json"
    amct.create_quant_config(str(cfg), str(path))
    data = json.loads(cfg.read_text())
    act = data["conv"]["activation_quant_params"]
    assert act["act_algo"] == "ifmr" and "num_of_bins" not in act  # only the chosen algorithm's options
    act["num_of_bins"] = 1024
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"c\.json: layer 'conv': activation_quant_params\.num_of_bins: an option of "
                                          r"act_algo 'hfmg', not of act_algo 'ifmr' \(its options: max_percentile"):
        amct.quantize_model(str(cfg), str(path), str(tmp_path / "m_mod.onnx"), str(tmp_path / "r.txt"))
    del act["num_of_bins"]
    act["num_bin"] = 4096
    cfg.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"layer 'conv': activation_quant_params\.num_bin: unknown key; act_algo 'ifmr'"):
        amct.quantize_model(str(cfg), str(path), str(tmp_path / "m_mod.onnx"), str(tmp_path / "r.txt"))
    simplified = tmp_path / "q.cfg"  # in a .cfg each algorithm's message only has its own fields
    simplified.write_text("common_config { ifmr_quantize { num_of_bins: 1024 } }\n")
    with pytest.raises(ConfigError, match=r"q\.cfg: .*FMRQuantize.*num_of_bins"):
        amct.create_quant_config(str(cfg), str(path), config_defination=str(simplified))


def test_a_config_json_with_every_algorithms_defaults_still_loads(tmp_path, rng):
    """omct 0.1 wrote every algorithm's default options into each layer: those files keep working."""
    path = tmp_path / "m.onnx"
    onnx.save(conv_model(rng), path)
    old = {"version": 1, "batch_num": 1, "activation_offset": True, "do_fusion": True, "skip_fusion_layers": [],
           "bias_correction": True,
           "conv": {"quant_enable": True,
                    "activation_quant_params": {"num_bits": 8, "act_algo": "hfmg", "max_percentile": 0.999999,
                                                "min_percentile": 0.999999, "search_range": [0.7, 1.3], "search_step": 0.01,
                                                "num_of_bins": 2048, "percentile": 99.999},
                    "weight_quant_params": {"num_bits": 8, "wts_algo": "arq_quantize", "channel_wise": True}}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    x = _x(rng)
    rec = _calibrate(tmp_path / "old.json", path, tmp_path, x, "old")
    ref = make_calibrator("hfmg", num_of_bins=2048)
    ref.update(x)
    assert rec.scale_d == pytest.approx(float(ref.compute().scale), rel=1e-6)


def test_record_text_parses_to_the_message_protobuf_would_print(tmp_path, rng):
    """The record is written without protobuf's (slow) text printer: protobuf must read it back to the very message
    it would have printed, float32 values and odd layer names included; the cached read equals a fresh parse."""
    from google.protobuf import text_format

    import omct.formats.record as record_module
    from omct.formats.proto import ScaleOffsetRecord
    from omct.formats.record import record_text

    records = {
        "conv": LayerRecord(0.1, -128, list(rng.random(7) * 1e-3), [0] * 7, 0.25, 3, list(rng.normal(size=7) * 1e-6)),
        'we"ird\\name\n/é': LayerRecord(3e-12, 127, [1e20, 5e-39], [0, 0], None, None, []),
        "fc": LayerRecord(1.5, 0, [0.3], [0], 7.0, -1, [-2.5e6]),
    }
    want = ScaleOffsetRecord()
    for key, rec in records.items():  # what protobuf's own printer was given before
        v = want.record.add(key=key).value
        v.scale_d, v.offset_d = rec.scale_d, rec.offset_d
        v.scale_w.extend(rec.scale_w)
        v.offset_w.extend(rec.offset_w)
        if rec.scale_o is not None:
            v.scale_o, v.offset_o = rec.scale_o, rec.offset_o
        v.bias_correction.extend(rec.bias_correction)
    assert text_format.Parse(record_text(records), ScaleOffsetRecord()) == want
    path = tmp_path / "r.txt"
    write_record(path, records)
    cached = read_record(path)
    record_module._last_written = None
    assert read_record(path) == cached
