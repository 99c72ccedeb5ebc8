"""``decompose_info.json``: what ``auto_decomposition`` did, enough for ``decompose_network`` to rebuild the
same structure in a fresh model (no weights), and checked against that model layer by layer."""

from __future__ import annotations

import json
import os

from omct.errors import ConfigError
from omct.fileio import atomic_write_text

VERSION = 1
FIELDS = ("form", "ranks", "in_channels", "out_channels", "kernel_size", "stride", "pads", "bias", "children")


def layer_entry(decision, children: list[str], bias: bool) -> dict:
    g, c = decision.geometry, decision.chosen
    return {"form": c.form, "ranks": list(c.ranks), "in_channels": g.cin, "out_channels": g.cout,
            "kernel_size": g.k, "stride": list(g.stride), "pads": list(g.pads), "bias": bias,
            "children": children, "macs_ratio": round(c.macs / g.macs(), 4), "error": round(c.error, 6),
            "error_of": "output" if c.data_aware else "weight"}


def write_info(path: str | os.PathLike, layers: dict[str, dict], kept: dict[str, str], options: dict) -> None:
    doc = {"version": VERSION, "tool": "omct", "options": options, "layers": layers, "kept": kept}
    atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def read_info(path: str | os.PathLike) -> dict[str, dict]:
    """The decomposed layers of a decompose_info.json, checked for shape (not yet against a model)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"decompose_info file '{path}' not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"decompose_info file '{path}' is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("layers"), dict):
        raise ConfigError(f"decompose_info file '{path}' has no 'layers' object: not written by auto_decomposition")
    if doc.get("version") != VERSION:
        raise ConfigError(f"decompose_info file '{path}': version {doc.get('version')!r} is not supported (expected {VERSION})")
    for name, e in doc["layers"].items():
        if not isinstance(e, dict):
            raise ConfigError(f"decompose_info file '{path}': layer '{name}' is not an object")
        missing = [k for k in FIELDS if k not in e]
        if missing:
            raise ConfigError(f"decompose_info file '{path}': layer '{name}' lacks {missing}")
        ok = (e["form"] == "svd" and _ints(e["ranks"], 1)) or (e["form"] == "tucker2" and _ints(e["ranks"], 2))
        ok = ok and _ints(e["stride"], 2) and isinstance(e["pads"], list) and _ints(e["pads"], 4, minimum=0)
        ok = ok and all(isinstance(e[k], int) and not isinstance(e[k], bool) and e[k] > 0
                        for k in ("in_channels", "out_channels", "kernel_size"))
        ok = ok and isinstance(e["bias"], bool) and isinstance(e["children"], list) \
            and len(e["children"]) == (2 if e["form"] == "svd" else 3) and all(isinstance(c, str) for c in e["children"])
        if not ok:
            raise ConfigError(f"decompose_info file '{path}': layer '{name}' has an invalid entry "
                              f"(form {e.get('form')!r}, ranks {e.get('ranks')!r})")
    return doc["layers"]


def _ints(v, n: int, minimum: int = 1) -> bool:
    return isinstance(v, list) and len(v) == n and all(isinstance(x, int) and not isinstance(x, bool) and x >= minimum
                                                       for x in v)
