"""Per-algorithm options, declared once beside the algorithm that reads them.

Why: config.json's ``act_algo`` / ``wts_algo`` choices and option checks, the .cfg protobuf messages and the
command line's ``--algo`` choices are all derived from these declarations, so an algorithm is one class
plus one registry entry. Plain dataclasses: the formats package builds its own validators from them.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

_META = "omct_option"


@dataclass(frozen=True)
class CfgPlacement:
    """Where an algorithm sits in a simplified .cfg: its field of ``CalibrationConfig`` (name and number),
    the name of its message type, and the field numbers of the shared settings that message carries
    (``asymmetric`` for activations; ``channel_wise`` and ``quant_bits`` for weights)."""

    field: str
    number: int
    message: str
    shared: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class OptionSpec:
    """One option: config.json key (and calibrator keyword), type, default, limits and its .cfg field(s)."""

    name: str
    type: Any  # resolved annotation: bool, int, float, str or tuple[float, ...]
    default: Any
    cfg: tuple[tuple[str, int], ...]  # .cfg field name and number; one per element for a tuple option
    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    choices: tuple | None = None
    check: Callable[[Any], None] | None = None  # extra rule; raises ValueError with the reason
    help: str = ""

    @property
    def is_tuple(self) -> bool:
        return typing.get_origin(self.type) is tuple

    def element_type(self) -> type:
        return typing.get_args(self.type)[0] if self.is_tuple else self.type

    def validate(self, value: Any) -> Any:
        """``value`` checked against the limits (a list becomes a tuple); ValueError says why not."""
        if self.is_tuple:
            value = tuple(value)
            if len(value) != len(self.cfg):
                raise ValueError(f"must have {len(self.cfg)} values, got {list(value)}")
        elif self.choices is not None and value not in self.choices:
            raise ValueError(f"must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        else:
            for bound, ok, word in ((self.gt, lambda v, b: v > b, ">"), (self.ge, lambda v, b: v >= b, ">="),
                                    (self.lt, lambda v, b: v < b, "<"), (self.le, lambda v, b: v <= b, "<=")):
                if bound is not None and not ok(value, bound):
                    raise ValueError(f"must be {word} {bound}, got {value!r}")
        if self.check is not None:
            self.check(value)
        return value


def option(default: Any, *, cfg: int | tuple[tuple[str, int], ...], gt: float | None = None, ge: float | None = None,
           lt: float | None = None, le: float | None = None, choices: tuple | None = None,
           check: Callable[[Any], None] | None = None, help: str = "") -> Any:
    """A field of an options dataclass. ``cfg`` is the field number in the algorithm's .cfg message (the field
    takes the option's name), or ``((name, number), ...)``, one per element, for a tuple option."""
    meta = {"cfg": cfg, "gt": gt, "ge": ge, "lt": lt, "le": le, "choices": choices, "check": check, "help": help}
    return dataclasses.field(default=default, metadata={_META: meta})


@dataclass(frozen=True)
class AlgorithmOptions:
    """Base of an algorithm's options dataclass: fields made with ``option()``, ``cfg`` its .cfg placement."""

    cfg: ClassVar[CfgPlacement]

    def __post_init__(self) -> None:
        for spec in self.specs():
            try:
                value = spec.validate(getattr(self, spec.name))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{type(self).__qualname__}: option '{spec.name}' {e}") from None
            object.__setattr__(self, spec.name, value)

    @classmethod
    def specs(cls) -> tuple[OptionSpec, ...]:
        return _specs(cls)

    def as_dict(self) -> dict[str, Any]:
        return {spec.name: getattr(self, spec.name) for spec in self.specs()}


@functools.cache
def _specs(cls: type[AlgorithmOptions]) -> tuple[OptionSpec, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = dict(f.metadata.get(_META) or {})
        if not meta:
            raise TypeError(f"{cls.__qualname__}.{f.name}: declare options with omct.core.options.option()")
        cfg = meta.pop("cfg")
        cfg = ((f.name, cfg),) if isinstance(cfg, int) else tuple(cfg)
        spec = OptionSpec(f.name, hints[f.name], f.default, cfg, **meta)
        if spec.is_tuple != (len(cfg) > 1) or (spec.is_tuple and len(typing.get_args(spec.type)) != len(cfg)):
            raise TypeError(f"{cls.__qualname__}.{f.name}: a tuple option needs one .cfg field per element")
        out.append(spec)
    return tuple(out)

