"""The simplified configuration (.cfg): AMCT's ``AMCTConfig`` message in protobuf text format.

This module only reads: it turns the .cfg into plain settings keyed like config.json (``SimplifiedConfig``);
``omct.formats.config`` applies and validates them. The algorithm messages come from the registries, so
the .cfg name of an algorithm and of each of its options is the one its ``Options`` declare.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf import text_format

from omct.errors import ConfigError
from omct.formats.algorithms import ACT, SHARED_FIELDS, WTS, Kind
from omct.formats.proto import amct_config_class
from omct.ui import logger

GLOBAL_FIELDS = ("batch_num", "activation_offset", "do_fusion", "skip_fusion_layers", "bias_correction",
                 "cross_layer_equalization")
GLOBAL_FIELDS += ("learned_rounding",)


@dataclass
class Override:
    """What one ``CalibrationConfig`` sets, as config.json keys: ``act`` holds ``act_algo`` and the options
    the .cfg gave (a tuple option holds None for each element it left out); ``wts`` likewise."""

    act: dict[str, Any] | None = None
    wts: dict[str, Any] | None = None
    dmq: float | None = None  # dmq_balancer's migration_strength (config.json: dmq_balancer_param)


@dataclass
class SimplifiedConfig:
    source: str  # the .cfg path, for error messages
    globals: dict[str, Any]
    skip_layers: list[str] = field(default_factory=list)
    skip_layer_types: list[str] = field(default_factory=list)
    common: Override | None = None
    by_type: list[tuple[str, Override]] = field(default_factory=list)
    by_name: list[tuple[str, Override]] = field(default_factory=list)
    # AMCT's nuq_config: NUQ for every layer that can take it (below layer-type and layer-name overrides),
    # restricted to the layers the mapping file marks when it names any
    nuq: Override | None = None
    nuq_layers: set[str] | None = None

    def overrides_for(self, name: str, layer_type: str) -> list[Override]:
        """The overrides that apply to a layer, lowest priority first: common, layer type, layer name."""
        out = [self.common] if self.common is not None else []
        out += [o for t, o in self.by_type if t == layer_type]
        return out + [o for n, o in self.by_name if n == name]


def _f32(v: float) -> float:
    """Undo float32 storage noise (0.999999 is stored as 0.99999898672...)."""
    return float(f"{v:.7g}")


def _settings(sub, kind: Kind, algo: str) -> dict[str, Any]:
    """config.json keys for one algorithm message: ``kind.key`` and whatever fields the .cfg set."""
    opts = kind.algorithms()[algo]
    out: dict[str, Any] = {kind.key: algo}
    for cfg_name, _ in opts.cfg.shared:
        if sub.HasField(cfg_name):
            out[SHARED_FIELDS[cfg_name][0]] = getattr(sub, cfg_name)
    for spec in opts.specs():
        values = [getattr(sub, n) if sub.HasField(n) else None for n, _ in spec.cfg]
        values = [_f32(v) if isinstance(v, float) else v for v in values]
        if any(v is not None for v in values):
            out[spec.name] = tuple(values) if spec.is_tuple else values[0]
    return out


def _override(calib) -> Override:
    found = {}
    for kind in (ACT, WTS):
        which = calib.WhichOneof(kind.oneof)
        if which:
            algo = next(name for name, opts in kind.algorithms().items() if opts.cfg.field == which)
            found[kind.key] = _settings(getattr(calib, which), kind, algo)
    dmq = _f32(calib.dmq_balancer.migration_strength) if calib.HasField("dmq_balancer") else None
    return Override(found.get(ACT.key), found.get(WTS.key), dmq)


def _open_blocks(text: str, line: int, col: int) -> list[tuple[int, str]]:
    """The blocks still open at ``line``:``col`` (1-based), outermost first: (line, 'name {') of each '{'."""
    stack: list[tuple[int, str]] = []
    for number, row in enumerate(text.splitlines()[:line], 1):
        if number == line:
            row = row[:max(col - 1, 0)]
        quote = None
        for i, ch in enumerate(row):
            if quote:
                quote = None if ch == quote else quote
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch == "{":
                words = row[:i].replace(":", " ").split()
                stack.append((number, f"{words[-1] if words else ''} {{".strip()))
            elif ch == "}" and stack:
                stack.pop()
    return stack


def _explain(error: text_format.ParseError, text: str, top_class: type | None = None) -> str:
    """protobuf's message, made useful: a misspelt field gets "did you mean", and a field that belongs further
    out (the sign of a missing '}') or an unexpected end names the block left open and its line."""
    import difflib
    import re

    message = str(error)
    line, col = (error.GetLine(), error.GetColumn()) if hasattr(error, "GetLine") else (None, None)
    if line is None:
        found = re.match(r"(\d+):(\d+)", message)
        line, col = (int(found[1]), int(found[2])) if found else (0, 0)
    top = (top_class or amct_config_class()).DESCRIPTOR
    unknown = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', message)
    open_blocks = _open_blocks(text, line, col) if line else []
    if unknown:
        where, name = unknown[1], unknown[2]
        try:
            fields = [f.name for f in top.file.pool.FindMessageTypeByName(where).fields]
        except KeyError:
            fields = []
        short = where.rsplit(".", 1)[-1]
        if where != top.full_name and name in top.fields_by_name and open_blocks:
            opened_at, block = open_blocks[0]
            return (f"line {line}: '{name}' is a top-level field, but '{block}' opened at line {opened_at} is not closed: "
                    f"a '}}' is missing before line {line}")
        close = difflib.get_close_matches(name, fields, n=2, cutoff=0.6)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else f"its fields are {', '.join(fields)}"
        if short == "NuqConfig" and name in ("num_steps", "num_of_iteration"):
            hint += " (AMCT nests them: nuq_config { nuq_quantize { num_steps: 32 num_of_iteration: 1 } })"
        return f"line {line}: {short} has no field '{name}'; {hint}"
    at_end = _open_blocks(text, len(text.splitlines()) + 1, 0)  # what the whole file leaves open
    if 'Expected "}"' in message and at_end:
        opened_at, block = at_end[-1]
        return f"line {opened_at}: '{block}' is never closed: a '}}' is missing (the file ends at line {line})"
    return message


def read_cfg(path: str | Path) -> SimplifiedConfig:
    """Parse a simplified .cfg; ConfigError names the file and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"simplified config '{path}' does not exist")
    text = path.read_text()
    try:
        msg = text_format.Parse(text, amct_config_class()())
    except text_format.ParseError as e:
        raise ConfigError(f"{path}: {_explain(e, text)}") from None
    nuq, nuq_layers = _nuq_config(msg, path)
    if msg.batch_num < 1:
        raise ConfigError(f"{path}: batch_num must be >= 1, got {msg.batch_num}")
    glob = {name: getattr(msg, name) for name in GLOBAL_FIELDS}
    glob["skip_fusion_layers"] = list(msg.skip_fusion_layers)
    return SimplifiedConfig(
        source=str(path), globals=glob, skip_layers=list(msg.skip_layers), skip_layer_types=list(msg.skip_layer_types),
        common=_override(msg.common_config) if msg.HasField("common_config") else None,
        by_type=[(o.layer_type, _override(o.calibration_config)) for o in msg.override_layer_types],
        by_name=[(o.layer_name, _override(o.calibration_config)) for o in msg.override_layer_configs],
        nuq=nuq, nuq_layers=nuq_layers)


def _nuq_config(msg, path: Path) -> tuple[Override | None, set[str] | None]:
    """AMCT's ``nuq_config``: the NUQ settings as a weight override, and the layers its mapping file marks."""
    if not msg.HasField("nuq_config"):
        return None, None
    nuq = msg.nuq_config
    wts = _settings(nuq.nuq_quantize, WTS, "nuq_quantize") if nuq.HasField("nuq_quantize") else {"wts_algo": "nuq_quantize"}
    layers = None
    if nuq.mapping_file:
        layers = read_mapping_file(nuq.mapping_file, path.parent)
    return Override(wts=wts), layers


def read_mapping_file(name: str, cfg_dir: Path) -> set[str] | None:
    """The layers an Ascend fusion JSON marks with ``fe_weight_compress``, or None (with a log line saying it is
    ignored) when the file is missing, unreadable or marks none. A relative path is tried from the working
    directory, then from the .cfg's folder.

    omct needs no compiler: the file only restricts NUQ to the layers the Ascend compiler would compress. Any
    JSON object with a ``name`` (or ``original_op_names``) that carries a truthy ``fe_weight_compress``, directly
    or as an ``attr`` entry ``{"key": "fe_weight_compress", "value": ...}``, marks that layer."""
    path = Path(name)
    if not path.is_absolute() and not path.is_file():
        path = cfg_dir / name
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        logger.info("nuq_config: mapping_file '%s' ignored (%s); NUQ applies to every layer that can take it", name,
                    type(e).__name__ if not isinstance(e, OSError) else (e.strerror or "unreadable"))
        return None
    marked: set[str] = set()

    def truthy(value) -> bool:
        if isinstance(value, dict):
            return any(truthy(v) for v in value.values())
        if isinstance(value, list):
            return any(truthy(v) for v in value)
        return bool(value) and str(value).lower() not in ("false", "0")

    def walk(node) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
            return
        if not isinstance(node, dict):
            return
        flag = node.get("fe_weight_compress")
        for a in node.get("attr", []) if isinstance(node.get("attr"), list) else []:
            if isinstance(a, dict) and a.get("key") == "fe_weight_compress":
                flag = a.get("value")
        if flag is not None and truthy(flag):
            if isinstance(node.get("name"), str):
                marked.add(node["name"])
            names = node.get("original_op_names")
            if isinstance(names, list):
                marked.update(n for n in names if isinstance(n, str))
        for value in node.values():
            walk(value)

    walk(data)
    if not marked:
        logger.info("nuq_config: mapping_file '%s' marks no layer with fe_weight_compress; ignored, NUQ applies to "
                    "every layer that can take it", name)
        return None
    logger.info("nuq_config: mapping_file '%s' marks %d layer(s) for weight compression", name, len(marked))
    return marked
