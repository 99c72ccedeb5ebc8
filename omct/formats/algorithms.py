"""The algorithm registries as the file formats see them: name -> options declaration, by kind.

Why a module: config.json, the .cfg messages and the command line all derive from the same two registries
in ``omct.core``; this is the one place that reads them (live, so an algorithm registered at run time is
seen) and checks that their .cfg placements do not collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from omct.core.calibrators import CALIBRATORS
from omct.core.options import AlgorithmOptions
from omct.core.weights import WEIGHT_QUANTIZERS

#: Shared settings an algorithm's .cfg message may carry: .cfg field name -> (config.json key, protobuf type).
SHARED_FIELDS = {"asymmetric": ("asymmetric", "bool"), "channel_wise": ("channel_wise", "bool"),
                 "quant_bits": ("num_bits", "uint32")}


@dataclass(frozen=True)
class Kind:
    """Activation or weight algorithms: the config.json key naming one, and the .cfg oneof holding it."""

    key: str  # act_algo / wts_algo
    oneof: str  # acts_quant_algo / wts_quant_algo

    def algorithms(self) -> dict[str, type[AlgorithmOptions]]:
        if self.key == "act_algo":
            return {name: cls.Options for name, cls in CALIBRATORS.items()}
        return {name: q.Options for name, q in WEIGHT_QUANTIZERS.items()}

    def owners(self, option: str) -> list[str]:
        """Algorithms that declare ``option``."""
        return [name for name, opts in self.algorithms().items() if any(s.name == option for s in opts.specs())]


ACT = Kind("act_algo", "acts_quant_algo")
WTS = Kind("wts_algo", "wts_quant_algo")


def registry_key() -> tuple:
    """Changes whenever either registry does: the cache key of everything derived from them."""
    return tuple(CALIBRATORS.items()) + tuple((name, q.Options) for name, q in WEIGHT_QUANTIZERS.items())


def check_placements() -> None:
    """Raise ValueError when two algorithms claim the same .cfg field, number or message name."""
    seen: dict[object, str] = {}
    for kind in (ACT, WTS):
        for name, opts in kind.algorithms().items():
            cfg = getattr(opts, "cfg", None)
            if cfg is None:
                raise ValueError(f"{kind.key} '{name}': its Options declare no cfg placement (CfgPlacement)")
            for what in (("field", cfg.field), ("number", cfg.number), ("message", cfg.message)):
                if what in seen:
                    raise ValueError(f"{kind.key} '{name}': .cfg {what[0]} {what[1]!r} is already used by '{seen[what]}'")
                seen[what] = name
            numbers = [n for _, n in cfg.shared] + [n for s in opts.specs() for _, n in s.cfg]
            if len(set(numbers)) != len(numbers):
                raise ValueError(f"{kind.key} '{name}': two fields of .cfg message {cfg.message} share a number")
            unknown = [f for f, _ in cfg.shared if f not in SHARED_FIELDS]
            if unknown:
                raise ValueError(f"{kind.key} '{name}': unknown shared .cfg field '{unknown[0]}'")
