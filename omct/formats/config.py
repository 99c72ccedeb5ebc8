"""config.json: AMCT's per-layer quantization configuration, validated with pydantic.

Layout (AMCT's): top-level ``version``, ``batch_num``, ``activation_offset``, ``do_fusion``,
``skip_fusion_layers``, then one object per layer name with ``quant_enable``,
``activation_quant_params`` and (layers with weights) ``weight_quant_params``.
"""

from __future__ import annotations

import difflib
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic_core import PydanticCustomError

from omct.core.options import AlgorithmOptions, OptionSpec
from omct.errors import ConfigError
from omct.fileio import atomic_write_text
from omct.formats.algorithms import ACT, WTS, Kind
from omct.formats.cfg import Override, SimplifiedConfig
from omct.ui import logger

GLOBAL_KEYS = ("version", "batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "bias_correction",
               "cross_layer_equalization")
GLOBAL_KEYS += ("learned_rounding",)


def _annotation(spec: OptionSpec) -> Any:
    """The pydantic type of one declared option: its type or choices, its limits and its extra rule."""
    ann = Literal[spec.choices] if spec.choices is not None else spec.type
    limits = {k: getattr(spec, k) for k in ("gt", "ge", "lt", "le") if getattr(spec, k) is not None}
    extra = [AfterValidator(functools.partial(_run_check, spec.check))] if spec.check is not None else []
    return Annotated[(ann, Field(spec.default, **limits), *extra)]


def _run_check(check, value):
    check(value)
    return value


@functools.cache
def _options_model(opts: type[AlgorithmOptions]) -> type[BaseModel]:
    """A pydantic model of an algorithm's ``Options`` declaration (built once per algorithm)."""
    fields = {spec.name: _annotation(spec) for spec in opts.specs()}
    return create_model(f"{opts.__qualname__}Model", __config__=ConfigDict(extra="forbid"), **fields)


def _is_default(opts: type[AlgorithmOptions], key: str, value: Any) -> bool:
    spec = next(s for s in opts.specs() if s.name == key)
    if spec.is_tuple:
        return isinstance(value, (list, tuple)) and tuple(value) == spec.default
    return type(value) is type(spec.default) and value == spec.default


def _check_algo(kind: Kind, value: str) -> str:
    names = kind.algorithms()
    if value not in names:
        quoted = [repr(n) for n in names]
        choices = " or ".join(filter(None, [", ".join(quoted[:-1]), quoted[-1]]))
        raise PydanticCustomError("algorithm", "Input should be {choices}", {"choices": choices})
    return value


def _validated_options(kind: Kind, algo: str, given: dict[str, Any]) -> dict[str, Any]:
    """The options of ``algo`` from the flat ``given`` keys, checked and completed with their defaults.

    A key of another algorithm is an error naming that algorithm, except at its default value: omct 0.1
    wrote every algorithm's defaults into each layer, and those files keep working.
    """
    algorithms = kind.algorithms()
    opts = algorithms[algo]
    own_names = [s.name for s in opts.specs()]
    own = {}
    for key, value in given.items():
        if key in own_names:
            own[key] = value
            continue
        owners = kind.owners(key)
        if owners and all(_is_default(algorithms[o], key, value) for o in owners):
            continue
        ctx = {"option": key, "value": value, "key": kind.key, "algo": algo,
               "owners": " or ".join(repr(o) for o in owners), "own": ", ".join(own_names) or "none"}
        if owners:
            raise PydanticCustomError("foreign_option", "an option of {key} {owners}, not of {key} '{algo}' "
                                      "(its options: {own})", ctx)
        raise PydanticCustomError("unknown_option", "unknown key; {key} '{algo}' takes {own}", ctx)
    try:
        return _options_model(opts)(**own).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        raise PydanticCustomError("option", "{msg}", {"option": ".".join(str(p) for p in err["loc"]),
                                                      "value": err.get("input"), "msg": err["msg"]}) from None


class ActivationQuantParams(BaseModel):
    """AMCT's flat ``activation_quant_params``: shared settings, then the options of ``act_algo`` (declared by
    its calibrator's ``Options``) as extra keys."""

    model_config = ConfigDict(extra="allow")

    num_bits: Literal[8] = 8
    act_algo: str = "ifmr"
    asymmetric: bool | None = Field(None, description="None: use the global activation_offset")

    @field_validator("act_algo")
    @classmethod
    def registered_algorithm(cls, v: str) -> str:
        return _check_algo(ACT, v)

    @model_validator(mode="after")
    def algorithm_options(self) -> ActivationQuantParams:
        extra = self.__pydantic_extra__
        options = _validated_options(ACT, self.act_algo, dict(extra))
        extra.clear()
        extra.update(options)
        return self

    def calibrator_options(self) -> dict[str, Any]:
        """Keyword arguments of the calibrator named by ``act_algo``."""
        return dict(self.__pydantic_extra__)


class WeightQuantParams(BaseModel):
    """AMCT's ``weight_quant_params``: shared settings, then the options of ``wts_algo`` (if it declares any)."""

    model_config = ConfigDict(extra="allow")

    num_bits: int = Field(8, ge=4, le=8)
    wts_algo: str = "arq_quantize"
    channel_wise: bool = True

    @field_validator("wts_algo")
    @classmethod
    def registered_algorithm(cls, v: str) -> str:
        return _check_algo(WTS, v)

    @model_validator(mode="after")
    def algorithm_options(self) -> WeightQuantParams:
        extra = self.__pydantic_extra__
        options = _validated_options(WTS, self.wts_algo, dict(extra))
        extra.clear()
        extra.update(options)
        if self.wts_algo == "nuq_quantize" and self.num_bits != 8:
            raise PydanticCustomError("nuq_bits", "nuq_quantize keeps levels of the INT8 grid: num_bits must be 8, "
                                      "got {bits}", {"bits": self.num_bits, "option": "num_bits", "value": self.num_bits})
        return self


class LayerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant_enable: bool = True
    activation_quant_params: ActivationQuantParams = Field(default_factory=ActivationQuantParams)
    weight_quant_params: WeightQuantParams | None = None
    # AMCT's dmq_balancer: move activation outliers into the weights with this migration strength (alpha)
    dmq_balancer_param: float | None = Field(None, ge=0.2, le=0.8)


class GlobalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = 1
    batch_num: int = Field(1, ge=1)
    activation_offset: bool = True
    do_fusion: bool = True
    skip_fusion_layers: list[str] = []
    bias_correction: bool = True  # omct: shift each bias by the mean error its quantized weights add
    cross_layer_equalization: bool = False  # omct: equalize Conv -> (Relu) -> Conv weight ranges before calibration
    learned_rounding: bool = True  # omct: ARQ layers pick floor/ceil per weight to fit their output (flip descent)


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
        return cls(globals_, layer_entries(data, source, LayerConfig))


def layer_entries(data: dict, source: str, model: type[BaseModel], global_keys: tuple[str, ...] = GLOBAL_KEYS) -> dict:
    """The per-layer entries of a config.json (every key that is not one of ``global_keys``), validated as
    ``model``; one line naming the layer at fault. Shared by the PTQ and the retrain config."""
    layers = {}
    for name, value in data.items():
        if name in global_keys:
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: unknown key '{name}' (a layer's entry must be an object; "
                              f"global keys are {', '.join(global_keys)})")
        try:
            layers[name] = model(**value)
        except ValidationError as e:
            raise ConfigError(f"{source}: layer '{name}': {_first_error(e)}") from None
    return layers


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    got = err.get("input")
    ctx = err.get("ctx") or {}
    if "option" in ctx:  # an algorithm option, checked by the model validator: name it, show its value
        loc.append(ctx["option"])
        got = ctx.get("value")
    shown = json.dumps(got) if _jsonable(got) else repr(got)
    return f"{'.'.join(loc)}: {err['msg']} (got {shown})"


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
    atomic_write_text(path, json.dumps(config.to_dict(), indent=4) + "\n")


@dataclass(frozen=True)
class LayerInfo:
    """What the config builder needs to know about one quantizable layer."""

    name: str
    layer_type: str  # the frontend's type name, as used in skip_layer_types / override_layer_types
    has_weight: bool
    quantizable: bool = True  # False: a candidate refused by the frontend (reported, kept out of config)
    nuq_refusal: str | None = None  # why NUQ cannot take this layer (None: it can)


def build_config(layers: list[LayerInfo], *, batch_num: int = 1, activation_offset: bool = True,
                 skip_layers: list[str] | None = None, simplified: SimplifiedConfig | None = None,
                 all_names: set[str] | None = None, type_names: set[str] | None = None) -> QuantConfig:
    """Defaults < simplified .cfg common_config < layer-type overrides < layer-name overrides.

    ``type_names``: every type the frontend quantizes; a .cfg type outside it is an error (an ONNX model's
    types are op types, Gemm/MatMul, not PyTorch's Linear), one inside it that no layer has a warning."""
    if not isinstance(batch_num, int) or isinstance(batch_num, bool) or batch_num < 1:
        raise ConfigError(f"batch_num must be an integer >= 1, got {batch_num!r}")
    skip_types: list[str] = []
    source = simplified.source if simplified is not None else "config"
    glob = GlobalConfig(batch_num=batch_num, activation_offset=activation_offset)
    if simplified is not None:
        try:
            glob = GlobalConfig(**simplified.globals)
        except ValidationError as e:
            raise ConfigError(f"{source}: {_first_error(e)}") from None
        skip_layers = list(simplified.skip_layers)
        skip_types = list(simplified.skip_layer_types)
    skip_layers = list(skip_layers or [])
    quantizable = [li for li in layers if li.quantizable]
    quant_names = {li.name for li in quantizable}
    what = f"{source}: skip_layers" if simplified is not None else "skip_layers"
    check_layer_names(skip_layers, {li.name for li in layers} | (all_names or set()), what, suggest=quant_names)
    _warn_not_quantizable(skip_layers, quantizable, layers, what)
    if simplified is not None:
        _check_types(skip_types, type_names, f"{source}: skip_layer_types")
        _check_types([t for t, _ in simplified.by_type], type_names, f"{source}: override_layer_types")
        _warn_unused_types(skip_types, quantizable, f"{source}: skip_layer_types")
        _warn_unused_types([t for t, _ in simplified.by_type], quantizable, f"{source}: override_layer_types")
    if simplified is not None:
        check_layer_names([name for name, _ in simplified.by_name], {li.name for li in quantizable}, "override_layer_configs")
    if simplified is not None and simplified.nuq_layers is not None:
        _warn_unmatched_mapping(simplified.nuq_layers, quantizable)
    out: dict[str, LayerConfig] = {}
    for li in quantizable:
        act, wts, dmq = {}, ({} if li.has_weight else None), None
        overrides = simplified.overrides_for(li.name, li.layer_type) if simplified is not None else []
        for i, override in enumerate(overrides + [None]):
            if i == (simplified is not None and simplified.common is not None):  # nuq_config: just above common_config
                _apply_nuq_config(simplified, li, wts)
            if override is not None:
                _apply(override, act, wts)
                dmq = override.dmq if override.dmq is not None else dmq
        if wts is not None and wts.get("wts_algo") == "nuq_quantize" and li.nuq_refusal:
            named = any(o.wts and o.wts.get("wts_algo") == "nuq_quantize" for n, o in simplified.by_name if n == li.name)
            if named:
                raise ConfigError(f"{source}: override_layer_configs asks nuq_quantize for layer '{li.name}', which NUQ "
                                  f"cannot take: {li.nuq_refusal}")
            logger.info("layer '%s' keeps uniform weights: NUQ cannot take it (%s)", li.name, li.nuq_refusal)
            wts = {k: v for k, v in wts.items() if k not in ("wts_algo", *_nuq_option_names())}
        try:
            out[li.name] = LayerConfig(quant_enable=li.name not in skip_layers and li.layer_type not in skip_types,
                                       activation_quant_params=act, weight_quant_params=wts,
                                       dmq_balancer_param=dmq if li.has_weight else None)
        except ValidationError as e:
            raise ConfigError(f"{source}: layer '{li.name}': {_first_error(e)}") from None
    return QuantConfig(glob, out)


def _apply(override: Override, act: dict, wts: dict | None) -> None:
    """Merge one .cfg override into a layer's settings. Another activation algorithm starts from its defaults;
    a tuple option's elements the .cfg left out keep their current values."""
    if override.act is not None:
        algo = override.act["act_algo"]
        if act.get("act_algo") != algo:
            act.clear()
        defaults = {spec.name: spec.default for spec in ACT.algorithms()[algo].specs()}
        for key, value in override.act.items():
            if isinstance(value, tuple) and None in value:
                value = tuple(c if v is None else v for v, c in zip(value, act.get(key, defaults[key]), strict=True))
            act[key] = value
    if override.wts is not None and wts is not None:
        if wts.get("wts_algo", "arq_quantize") != override.wts.get("wts_algo", wts.get("wts_algo", "arq_quantize")):
            for key in [k for k in wts if WTS.owners(k)]:  # another algorithm starts from its own defaults
                del wts[key]
        wts.update(override.wts)


def _nuq_option_names() -> tuple[str, ...]:
    return tuple(spec.name for spec in WTS.algorithms()["nuq_quantize"].specs())


def _apply_nuq_config(simplified: SimplifiedConfig | None, li: LayerInfo, wts: dict | None) -> None:
    """AMCT's nuq_config, just above common_config: NUQ for each layer that can take it (and that the mapping
    file marks, when it marks any). Layers it cannot take keep uniform weights, with the reason in the log."""
    if simplified is None or simplified.nuq is None or wts is None:
        return
    if simplified.nuq_layers is not None and li.name not in simplified.nuq_layers:
        logger.info("layer '%s' keeps uniform weights: nuq_config's mapping_file does not mark it", li.name)
        return
    if li.nuq_refusal:
        logger.info("layer '%s' keeps uniform weights: NUQ cannot take it (%s)", li.name, li.nuq_refusal)
        return
    _apply(simplified.nuq, {}, wts)


def _warn_unmatched_mapping(marked: set[str], quantizable: list[LayerInfo]) -> None:
    names = {li.name for li in quantizable}
    if not marked & names:
        logger.warning("nuq_config: the mapping_file marks %d layer(s), none of them a layer of this model (e.g. '%s'): "
                       "no layer gets NUQ", len(marked), sorted(marked)[0])


def with_act_algo(config: QuantConfig, act_algo: str) -> QuantConfig:
    """``config`` with every layer calibrated by ``act_algo`` at its default options (``asymmetric`` kept)."""
    layers = {}
    for name, layer in config.layers.items():
        act = {"act_algo": act_algo, "asymmetric": layer.activation_quant_params.asymmetric}
        try:
            layers[name] = layer.model_copy(update={"activation_quant_params": ActivationQuantParams(**act)})
        except ValidationError as e:
            raise ConfigError(f"layer '{name}': activation_quant_params.{_first_error(e)}") from None
    return QuantConfig(config.globals, layers)


def _warn_not_quantizable(names: list[str], quantizable: list[LayerInfo], layers: list[LayerInfo], what: str) -> None:
    """A skip name that is a node (or a refused candidate) of the model but no quantizable layer does nothing:
    say so, with the quantizable layers it may have meant."""
    quant_names = sorted(li.name for li in quantizable)
    refused = {li.name for li in layers if not li.quantizable}
    for name in names:
        if name in quant_names:
            continue
        why = "a candidate already left in float" if name in refused else "not a quantizable layer"
        close = difflib.get_close_matches(name, quant_names, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else (
            "; list the quantizable layers with `omct inspect MODEL.onnx` (or omct.pytorch.inspect_model)")
        logger.warning("%s names '%s', which is %s: skipping it has no effect%s", what, name, why, hint)


def _check_types(types: list[str], known: set[str] | None, what: str) -> None:
    """A type the frontend never quantizes can match no layer of any model: an error listing the valid ones."""
    for t in types:
        if known and t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=2, cutoff=0.5)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ConfigError(f"{what} names type '{t}', which this model's frontend does not quantize; {hint}"
                              f"its types are {', '.join(sorted(known))}")


def _warn_unused_types(types: list[str], quantizable: list[LayerInfo], what: str) -> None:
    """A layer type no quantizable layer has (ONNX types are op types: Conv, Gemm; PyTorch's module types:
    Conv2d, Linear) matches nothing: say so, with the types the model has."""
    have = sorted({li.layer_type for li in quantizable})
    for t in types:
        if t not in have:
            logger.warning("%s names type '%s', which no quantizable layer of the model has (its types: %s); it "
                           "matches nothing", what, t, ", ".join(have) or "none")


def check_layer_names(names: list[str], known: set[str], what: str, suggest: set[str] | None = None) -> None:
    """Raise ConfigError for a name that is not a layer of the model, listing close names (from ``suggest``
    when given: the quantizable layers, not every node)."""
    for name in names:
        if name not in known:
            pool = sorted(known if suggest is None else suggest)
            close = difflib.get_close_matches(name, pool, n=3, cutoff=0.5)
            if close:
                hint = f"; did you mean {', '.join(repr(c) for c in close)}?"
            elif len(pool) <= 12:
                hint = f"; its {'quantizable ' if suggest is not None else ''}layers are {', '.join(repr(k) for k in pool)}"
            else:
                hint = "; list the layers with `omct inspect MODEL.onnx` (or omct.pytorch.inspect_model)"
            raise ConfigError(f"{what} names '{name}', which is not a layer of the model{hint}")
