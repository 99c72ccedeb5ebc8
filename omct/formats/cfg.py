"""The simplified configuration (.cfg): AMCT's ``AMCTConfig`` message in protobuf text format."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import text_format

from omct.errors import ConfigError
from omct.formats.proto import AMCTConfig

# .cfg algorithm message -> config.json act_algo
_ACT_ALGO = {"ifmr_quantize": "ifmr", "hfmg_quantize": "hfmg", "minmax_quantize": "minmax",
             "percentile_quantize": "percentile", "mse_quantize": "mse", "kl_quantize": "kl"}
_WTS_ALGO = {"arq_quantize": "arq_quantize", "mse_clip_quantize": "mse_clip"}


def _f32(v: float) -> float:
    """Undo float32 storage noise (0.999999 is stored as 0.99999898672...)."""
    return float(f"{v:.7g}")


def read_cfg(path: str | Path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"simplified config '{path}' does not exist")
    try:
        msg = text_format.Parse(path.read_text(), AMCTConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: {e}") from None
    if msg.HasField("nuq_config"):
        raise ConfigError(f"{path}: nuq_config (non-uniform quantization) is not supported yet by this "
                          "release; remove it to run uniform quantization")
    if msg.batch_num < 1:
        raise ConfigError(f"{path}: batch_num must be >= 1, got {msg.batch_num}")
    return msg


def global_settings(msg):
    from omct.formats.config import GlobalConfig

    return GlobalConfig(batch_num=msg.batch_num, activation_offset=msg.activation_offset,
                        do_fusion=msg.do_fusion, skip_fusion_layers=list(msg.skip_fusion_layers),
                        bias_correction=msg.bias_correction)


def check_override_names(msg, layer_names: set[str]) -> None:
    from omct.formats.config import check_layer_names

    check_layer_names([o.layer_name for o in msg.override_layer_configs], layer_names, "override_layer_configs")


def _apply(calib, act: dict, wts: dict | None) -> None:
    algo = calib.WhichOneof("acts_quant_algo")
    if algo:
        sub = getattr(calib, algo)
        if act.get("act_algo") != _ACT_ALGO[algo]:
            act.clear()
        act["act_algo"] = _ACT_ALGO[algo]
        for field, value in sub.ListFields():
            name = field.name
            if name in ("search_range_start", "search_range_end"):
                start = _f32(sub.search_range_start)
                end = _f32(sub.search_range_end)
                act["search_range"] = (start, end)
            elif name == "dst_type":
                continue
            else:
                act[name] = _f32(value) if isinstance(value, float) else value
    walgo = calib.WhichOneof("wts_quant_algo")
    if walgo and wts is not None:
        sub = getattr(calib, walgo)
        wts["wts_algo"] = _WTS_ALGO[walgo]
        if sub.HasField("channel_wise"):
            wts["channel_wise"] = sub.channel_wise
        if sub.HasField("quant_bits"):
            wts["num_bits"] = sub.quant_bits


def apply_overrides(msg, layer, act: dict, wts: dict | None) -> None:
    """Merge common_config, then the layer-type override, then the layer-name override into act/wts."""
    if msg.HasField("common_config"):
        _apply(msg.common_config, act, wts)
    for o in msg.override_layer_types:
        if o.layer_type == layer.layer_type:
            _apply(o.calibration_config, act, wts)
    for o in msg.override_layer_configs:
        if o.layer_name == layer.name:
            _apply(o.calibration_config, act, wts)
