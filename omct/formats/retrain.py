"""The quantization-aware training (retrain) configuration: AMCT's retrain config.json and its simplified
``.cfg`` (``AMCTRetrainConfig``).

config.json layout (AMCT's): ``version``, ``batch_num`` (batches whose statistics initialise the activation
clip ranges), then one object per layer: ``retrain_enable``, ``retrain_data_config`` (``algo: ulq_quantize``,
``dst_type``, optional ``fixed_min``, ``clip_max``/``clip_min``) and ``retrain_weight_config`` (``algo:
arq_retrain | ulq_retrain``, ``channel_wise``, ``dst_type``). ``to_quant_config`` turns it into the PTQ
``QuantConfig`` that the shared plan and export read, so a retrained model leaves through the same record and
the same fake-quant / deploy builders as a calibrated one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from google.protobuf import text_format
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from omct.errors import ConfigError
from omct.fileio import atomic_write_text
from omct.formats.cfg import _explain
from omct.formats.config import (
    ActivationQuantParams,
    GlobalConfig,
    LayerConfig,
    LayerInfo,
    QuantConfig,
    WeightQuantParams,
    _check_types,
    _first_error,
    _warn_unused_types,
    check_layer_names,
    layer_entries,
)
from omct.formats.proto import AMCTRetrainConfig

BITS = {"INT4": 4, "INT8": 8}
GLOBAL_KEYS = ("version", "batch_num")


class RetrainDataConfig(BaseModel):
    """ULQ: a learned clip range [clip_min, clip_max] per activation, 8-bit (the deploy model's activations)."""

    model_config = ConfigDict(extra="forbid")

    algo: Literal["ulq_quantize"] = "ulq_quantize"
    dst_type: Literal["INT8"] = "INT8"
    fixed_min: bool | None = Field(None, description="None: pinned at 0 when the initialising data is non-negative")
    clip_max: float | None = None
    clip_min: float | None = None

    @model_validator(mode="after")
    def clip_pair(self) -> RetrainDataConfig:
        if (self.clip_max is None) != (self.clip_min is None):
            raise ValueError("clip_max and clip_min go together (both or neither)")
        if self.clip_max is not None and not self.clip_min < self.clip_max:
            raise ValueError(f"clip_min ({self.clip_min}) must be below clip_max ({self.clip_max})")
        return self


class RetrainWeightConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    algo: Literal["arq_retrain", "ulq_retrain"] = "arq_retrain"
    channel_wise: bool = True
    dst_type: Literal["INT8", "INT4"] = "INT8"


class RetrainLayerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    retrain_enable: bool = True
    retrain_data_config: RetrainDataConfig = Field(default_factory=RetrainDataConfig)
    retrain_weight_config: RetrainWeightConfig = Field(default_factory=RetrainWeightConfig)


@dataclass
class RetrainConfig:
    batch_num: int
    layers: dict[str, RetrainLayerConfig]

    def enabled_layers(self) -> list[str]:
        return [n for n, c in self.layers.items() if c.retrain_enable]

    def to_dict(self) -> dict:
        out: dict = {"version": 1, "batch_num": self.batch_num}
        for name, cfg in self.layers.items():
            out[name] = cfg.model_dump(exclude_none=True)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "retrain config") -> RetrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
        try:
            glob = GlobalConfig(batch_num=data.get("batch_num", 1))
        except ValidationError as e:
            raise ConfigError(f"{source}: {_first_error(e)}") from None
        return cls(glob.batch_num, layer_entries(data, source, RetrainLayerConfig, GLOBAL_KEYS))

    def to_quant_config(self) -> QuantConfig:
        """The PTQ view the shared plan and export read: asymmetric 8-bit activations, symmetric weights of
        ``dst_type``'s width, no bias correction (training already corrects the bias)."""
        layers = {}
        for name, cfg in self.layers.items():
            w = cfg.retrain_weight_config
            layers[name] = LayerConfig(quant_enable=cfg.retrain_enable,
                                       activation_quant_params=ActivationQuantParams(asymmetric=True),
                                       weight_quant_params=WeightQuantParams(num_bits=BITS[w.dst_type],
                                                                             channel_wise=w.channel_wise))
        return QuantConfig(GlobalConfig(batch_num=self.batch_num, do_fusion=True, bias_correction=False), layers)


def load_retrain_config(path: str | Path) -> RetrainConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"retrain config file '{path}' does not exist; create it with create_quant_retrain_config")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return RetrainConfig.from_dict(data, str(path))


def save_retrain_config(config: RetrainConfig, path: str | Path) -> None:
    atomic_write_text(path, json.dumps(config.to_dict(), indent=4) + "\n")


def _data_settings(msg, where: str) -> dict:
    which = msg.WhichOneof("data_retrain_algo")
    if which is None:
        return {}
    sub = msg.ulq_quantize
    dst = sub.DESCRIPTOR.fields_by_name["dst_type"].enum_type.values_by_number[sub.dst_type].name
    if dst != "INT8":
        raise ConfigError(f"{where}: ulq_quantize dst_type {dst} is not supported: the deploy model's activations "
                          "are 8-bit (dst_type INT8); INT4 is for weights (retrain_weight_quant_config)")
    out: dict = {"algo": "ulq_quantize", "dst_type": dst}
    if sub.HasField("fixed_min"):
        out["fixed_min"] = sub.fixed_min
    if sub.HasField("clip_max_min"):
        out["clip_max"] = float(f"{sub.clip_max_min.clip_max:.7g}")
        out["clip_min"] = float(f"{sub.clip_max_min.clip_min:.7g}")
    return out


def _weight_settings(msg) -> dict:
    which = msg.WhichOneof("weights_retrain_algo")
    if which is None:
        return {}
    sub = getattr(msg, which)
    out = {"algo": which, "dst_type": sub.DESCRIPTOR.fields_by_name["dst_type"].enum_type.values_by_number[sub.dst_type].name}
    if sub.HasField("channel_wise"):
        out["channel_wise"] = sub.channel_wise
    return out


@dataclass
class _Override:
    data: dict
    weights: dict


def read_retrain_cfg(path: str | Path) -> tuple[int, list[str], list[str], _Override, list[tuple[str, _Override]],
                                                  list[tuple[str, _Override]]]:
    """Parse AMCT's retrain .cfg: (batch_num, skip_layers, skip_layer_types, global, by type, by name)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"retrain .cfg '{path}' does not exist")
    text = path.read_text()
    try:
        msg = text_format.Parse(text, AMCTRetrainConfig())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: {_explain(e, text, AMCTRetrainConfig)}") from None
    pruning = msg.HasField("prune_config") or any(o.HasField("prune_config") for o in
                                                     list(msg.override_layer_configs) + list(msg.override_layer_types))
    if pruning:
        raise ConfigError(f"{path}: prune_config (pruning) is not supported by omct's retrain; remove it to run "
                          "quantization-aware training")
    if msg.batch_num < 1:
        raise ConfigError(f"{path}: batch_num must be >= 1, got {msg.batch_num}")

    def override(o, where: str) -> _Override:
        return _Override(_data_settings(o.retrain_data_quant_config, where), _weight_settings(o.retrain_weight_quant_config))

    common = override(msg, str(path))
    by_type = [(o.layer_type, override(o, f"{path}: override_layer_types '{o.layer_type}'")) for o in msg.override_layer_types]
    by_name = [(o.layer_name, override(o, f"{path}: override_layer_configs '{o.layer_name}'"))
               for o in msg.override_layer_configs]
    skip = list(msg.skip_layers) + list(msg.quant_skip_layers)
    skip_types = list(msg.skip_layer_types) + list(msg.quant_skip_types)
    return msg.batch_num, skip, skip_types, common, by_type, by_name


def build_retrain_config(layers: list[LayerInfo], *, config_defination: str | Path | None = None,
                         all_names: set[str] | None = None, type_names: set[str] | None = None) -> RetrainConfig:
    """Defaults < the .cfg's global settings < layer-type overrides < layer-name overrides."""
    quantizable = [li for li in layers if li.quantizable]
    if config_defination is None:
        return RetrainConfig(1, {li.name: RetrainLayerConfig() for li in quantizable})
    source = str(config_defination)
    batch_num, skip, skip_types, common, by_type, by_name = read_retrain_cfg(config_defination)
    names = {li.name for li in quantizable}
    check_layer_names(skip, {li.name for li in layers} | (all_names or set()), f"{source}: skip_layers", suggest=names)
    check_layer_names([n for n, _ in by_name], names, f"{source}: override_layer_configs")
    for what, types in (("skip_layer_types", skip_types), ("override_layer_types", [t for t, _ in by_type])):
        _check_types(types, type_names, f"{source}: {what}")
        _warn_unused_types(types, quantizable, f"{source}: {what}")
    out = {}
    for li in quantizable:
        data, weights = dict(common.data), dict(common.weights)
        for o in [o for t, o in by_type if t == li.layer_type] + [o for n, o in by_name if n == li.name]:
            data.update(o.data)
            if o.weights.get("algo") not in (None, weights.get("algo")):
                weights.clear()  # another weight algorithm starts from its defaults
            weights.update(o.weights)
        try:
            out[li.name] = RetrainLayerConfig(retrain_enable=li.name not in skip and li.layer_type not in skip_types,
                                              retrain_data_config=data, retrain_weight_config=weights)
        except ValidationError as e:
            raise ConfigError(f"{source}: layer '{li.name}': {_first_error(e)}") from None
    return RetrainConfig(batch_num, out)
