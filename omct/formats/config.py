"""config.json: AMCT's per-layer quantization configuration, validated with pydantic.

Layout (AMCT's): top-level ``version``, ``batch_num``, ``activation_offset``, ``do_fusion``,
``skip_fusion_layers``, then one object per layer name with ``quant_enable``,
``activation_quant_params`` and (layers with weights) ``weight_quant_params``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from omct.errors import ConfigError

ACT_ALGOS = ("ifmr", "hfmg", "minmax", "percentile", "mse", "kl")
WTS_ALGOS = ("arq_quantize", "mse_clip")
GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "bias_correction")


class ActivationQuantParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_bits: Literal[8] = 8
    act_algo: Literal["ifmr", "hfmg", "minmax", "percentile", "mse", "kl"] = "ifmr"
    asymmetric: bool | None = Field(None, description="None: use the global activation_offset")
    max_percentile: float = Field(0.999999, gt=0.5, le=1.0)
    min_percentile: float = Field(0.999999, gt=0.5, le=1.0)
    search_range: tuple[float, float] = (0.7, 1.3)
    search_step: float = Field(0.01, gt=0.0, le=1.0)
    num_of_bins: Literal[1024, 2048, 4096, 8192] = 4096
    percentile: float = Field(99.999, gt=50.0, le=100.0)

    @field_validator("search_range")
    @classmethod
    def _ordered(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 < v[0] < v[1]:
            raise ValueError(f"must be [start, end] with 0 < start < end, got {list(v)}")
        return v

    def calibrator_options(self) -> dict:
        """Keyword arguments of the calibrator named by ``act_algo``."""
        if self.act_algo == "ifmr":
            return {"max_percentile": self.max_percentile, "min_percentile": self.min_percentile,
                    "search_range": self.search_range, "search_step": self.search_step}
        if self.act_algo == "hfmg":
            return {"num_of_bins": self.num_of_bins}
        if self.act_algo == "percentile":
            return {"percentile": self.percentile}
        return {}


class WeightQuantParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    num_bits: int = Field(8, ge=4, le=8)
    wts_algo: Literal["arq_quantize", "mse_clip"] = "arq_quantize"
    channel_wise: bool = True


class LayerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant_enable: bool = True
    activation_quant_params: ActivationQuantParams = ActivationQuantParams()
    weight_quant_params: WeightQuantParams | None = None


class GlobalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    batch_num: int = Field(1, ge=1)
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: list[str] = []
    bias_correction: bool = True  # omct: shift each bias by the mean error its quantized weights add


@dataclass
class QuantConfig:
    """The whole config: global settings plus one ``LayerConfig`` per quantizable layer (in graph order)."""

    globals: GlobalConfig
    layers: dict[str, LayerConfig]

    @property
    def batch_num(self) -> int:
        return self.globals.batch_num

    def enabled_layers(self) -> list[str]:
        return [name for name, cfg in self.layers.items() if cfg.quant_enable]

    def is_asymmetric(self, layer: str) -> bool:
        asym = self.layers[layer].activation_quant_params.asymmetric
        return self.globals.activation_offset if asym is None else asym

    def to_dict(self) -> dict:
        out = self.globals.model_dump()
        for name, cfg in self.layers.items():
            out[name] = cfg.model_dump(exclude_none=True)
        return out

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> QuantConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: the top level must be a JSON object, got {type(data).__name__}")
        glob = {k: v for k, v in data.items() if k in GLOBAL_KEYS}
        try:
            globals_ = GlobalConfig(**glob)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_first_error(e)}") from None
        layers = {}
        for name, value in data.items():
            if name in GLOBAL_KEYS:
                continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: unknown key '{name}' (a layer's entry must be an object; "
                                  f"global keys are {', '.join(GLOBAL_KEYS)})")
            try:
                layers[name] = LayerConfig(**value)
            except ValidationError as e:
                raise ConfigError(f"{source}: layer '{name}': {_first_error(e)}") from None
        return cls(globals_, layers)


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"])
    got = err.get("input")
    return f"{loc}: {err['msg']} (got {json.dumps(got) if _jsonable(got) else got!r})"


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except TypeError:
        return False


def load_config(path: str | Path) -> QuantConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; create it with create_quant_config")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    return QuantConfig.from_dict(data, str(path))


def save_config(config: QuantConfig, path: str | Path) -> None:
    from omct.fileio import atomic_write_text

    atomic_write_text(path, json.dumps(config.to_dict(), indent=4) + "\n")


@dataclass(frozen=True)
class LayerInfo:
    """What the config builder needs to know about one quantizable layer."""

    name: str
    layer_type: str  # the frontend's type name, as used in skip_layer_types / override_layer_types
    has_weight: bool
    quantizable: bool = True  # False: a candidate refused by the frontend (reported, kept out of config)


def build_config(layers: list[LayerInfo], *, batch_num: int = 1, activation_offset: bool = True,
                 skip_layers: list[str] | None = None, simplified=None, all_names: set[str] | None = None) -> QuantConfig:
    """Defaults < simplified .cfg common_config < layer-type overrides < layer-name overrides."""
    from omct.formats import cfg as cfgmod

    if not isinstance(batch_num, int) or isinstance(batch_num, bool) or batch_num < 1:
        raise ConfigError(f"batch_num must be an integer >= 1, got {batch_num!r}")
    skip_types: list[str] = []
    glob = GlobalConfig(batch_num=batch_num, activation_offset=activation_offset)
    if simplified is not None:
        glob = cfgmod.global_settings(simplified)
        skip_layers = list(simplified.skip_layers)
        skip_types = list(simplified.skip_layer_types)
    skip_layers = list(skip_layers or [])
    quantizable = [li for li in layers if li.quantizable]
    check_layer_names(skip_layers, {li.name for li in layers} | (all_names or set()), "skip_layers")
    if simplified is not None:
        cfgmod.check_override_names(simplified, {li.name for li in quantizable})
    out: dict[str, LayerConfig] = {}
    for li in quantizable:
        act, wts = {}, ({} if li.has_weight else None)
        if simplified is not None:
            cfgmod.apply_overrides(simplified, li, act, wts)
        enabled = li.name not in skip_layers and li.layer_type not in skip_types
        out[li.name] = LayerConfig(
            quant_enable=enabled,
            activation_quant_params=ActivationQuantParams(**act),
            weight_quant_params=WeightQuantParams(**wts) if wts is not None else None,
        )
    return QuantConfig(glob, out)


def check_layer_names(names: list[str], known: set[str], what: str) -> None:
    """Raise ConfigError for a name that is not a layer of the model, listing close names."""
    import difflib

    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.5)
            if close:
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
            elif len(known) <= 12:
                hint = f"; its layers are {', '.join(repr(k) for k in sorted(known))}"
            else:
                hint = "; list the layers with `omct inspect MODEL.onnx` (or omct.pytorch.inspect_model)"
            raise ConfigError(f"{what} names '{name}', which is not a layer of the model{hint}")
