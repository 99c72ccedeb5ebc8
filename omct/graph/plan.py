"""The quantization plan: which layers are quantized and which activation tensors ("sites") are observed.

A site is one tensor observed with one calibration configuration. The input of a quantized layer is a
site; so is the output of a Conv, MatMul or AveragePool, because ONNX Runtime fuses
DequantizeLinear -> Conv -> QuantizeLinear into QLinearConv only when the output is quantized too, unless
that output feeds a layer kept in float. Sites with the same tensor and configuration are shared, so each
tensor is observed once. Chain ops (Add, MaxPool, Pad, ...) are planned only between tensors already
quantized, and a shared-scale chain op's output site is ``same_as`` its input's (not observed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from omct.formats.config import ActivationQuantParams, QuantConfig
from omct.graph.ops import LayerSpec


@dataclass
class Site:
    tensor: str
    act: dict  # ActivationQuantParams as a dict (algorithm and options)
    asymmetric: bool
    inputs_of: list[str] = field(default_factory=list)  # layers that read this tensor as their input
    output_of: list[str] = field(default_factory=list)  # layers whose output is quantized here
    upper: float | None = None  # the tensor's values never exceed this (a ReLU6-style Clip's max)
    same_as: int | None = None  # quantized exactly as that site (a shared-scale chain op's output): not calibrated

    @property
    def owner(self) -> str:
        """The layer named in error messages about this site."""
        return (self.inputs_of or self.output_of)[0]

    def params(self) -> ActivationQuantParams:
        return ActivationQuantParams(**self.act)


@dataclass
class Plan:
    layers: dict[str, LayerSpec]  # enabled layers only, in graph order
    sites: list[Site]
    input_site: dict[str, int]
    output_site: dict[str, int]

    def to_json(self) -> str:
        return json.dumps({"layers": [s.to_dict() for s in self.layers.values()],
                           "sites": [s.__dict__ for s in self.sites],
                           "input_site": self.input_site, "output_site": self.output_site})

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        layers = {d["name"]: LayerSpec(**d) for d in data["layers"]}
        return cls(layers, [Site(**s) for s in data["sites"]], data["input_site"], data["output_site"])


def build_plan(layers: list[LayerSpec], config: QuantConfig) -> Plan:
    enabled = {spec.name: spec for spec in layers if spec.name in config.layers and config.layers[spec.name].quant_enable}
    sites: list[Site] = []
    keys: dict[tuple, int] = {}

    def site_for(tensor: str, layer: str) -> int:
        act = config.layers[layer].activation_quant_params.model_dump(exclude_none=True)
        act.pop("asymmetric", None)
        asym = config.is_asymmetric(layer)
        key = (tensor, json.dumps(act, sort_keys=True), asym)
        if key not in keys:
            keys[key] = len(sites)
            sites.append(Site(tensor, act, asym))
        return keys[key]

    # A layer kept in float keeps a float input: an output site that feeds it is dropped (the producer then
    # runs without an integer kernel, which is the price of the fallback the user asked for).
    # A chain op kept in float only stays float: the quantized tensors it reads are there for their producers.
    float_inputs = {spec.input for spec in layers if spec.name not in enabled and spec.chain is None}
    input_site, output_site = {}, {}
    quantized: dict[str, int] = {}  # tensor -> output site: what a chain op may read without a new quantization
    for name, spec in list(enabled.items()):
        if spec.weight_only:  # a table lookup: its indices are read, nothing is observed
            continue
        if spec.chain is not None:
            # A chain op is integer only between integer tensors: every input already quantized (by a layer or
            # a chain op before it in graph order), else it stays float and costs nothing.
            if not spec.inputs or any(x not in quantized for x in spec.inputs) or spec.output_site in float_inputs:
                del enabled[name]
                continue
            for x in dict.fromkeys(spec.inputs):
                sites[quantized[x]].inputs_of.append(name)
            i = input_site[name] = quantized[spec.input]
            o = site_for(spec.output_site, name)
            if spec.chain == "shared" and not sites[o].output_of and not sites[o].inputs_of:
                sites[o].same_as = sites[i].same_as if sites[i].same_as is not None else i
            sites[o].output_of.append(name)
            if spec.output_max is not None:
                sites[o].upper = spec.output_max
            output_site[name] = quantized[spec.output_site] = o
            continue
        i = site_for(spec.input, name)
        sites[i].inputs_of.append(name)
        input_site[name] = i
        if spec.output_site and spec.output_site not in float_inputs:
            o = site_for(spec.output_site, name)
            sites[o].output_of.append(name)
            if spec.output_max is not None:
                sites[o].upper = spec.output_max
            output_site[name] = quantized[spec.output_site] = o
    _drop_dead_ends(enabled, sites, input_site, output_site)
    return Plan(enabled, sites, input_site, output_site)


def _drop_dead_ends(enabled: dict[str, LayerSpec], sites: list[Site], input_site: dict, output_site: dict) -> None:
    """Un-plan chain ops whose output no quantized op reads (a residual Add into the graph output, a Concat into
    float code): quantizing it would only add error. Last first, so a chain that ends in float unwinds."""
    for name in reversed([n for n, spec in enabled.items() if spec.chain is not None]):
        o = output_site[name]
        if sites[o].inputs_of:
            continue
        del enabled[name], output_site[name], input_site[name]
        sites[o].output_of.remove(name)
        for site in sites:
            if name in site.inputs_of:
                site.inputs_of.remove(name)
    keep = [i for i, site in enumerate(sites) if site.inputs_of or site.output_of]
    if len(keep) == len(sites):
        return
    new = {old: k for k, old in enumerate(keep)}
    sites[:] = [sites[i] for i in keep]
    for site in sites:
        if site.same_as is not None:
            site.same_as = new[site.same_as]
    for table in (input_site, output_site):
        for name in table:
            table[name] = new[table[name]]


def without_layers(plan: Plan, names: set[str]) -> Plan:
    """``plan`` with the layers ``names`` kept in float, and with every layer that reads or writes a site only
    they quantized (so every remaining site is one the calibration observed for a remaining layer). Sites keep
    their order; what is left is a subset of ``plan``'s layers and sites."""
    names = set(names)
    while True:  # a layer reading the output site of a dropped layer is dropped too (that site was not observed)
        gone = {i for i, s in enumerate(plan.sites) if any(n in names for n in s.output_of)}
        more = {n for i in gone for n in plan.sites[i].inputs_of} - names
        if not more:
            break
        names |= more
    sites = [Site(s.tensor, s.act, s.asymmetric, [n for n in s.inputs_of if n not in names],
                  [n for n in s.output_of if n not in names], s.upper, s.same_as) for s in plan.sites]
    keep = [i for i, s in enumerate(sites) if s.inputs_of or s.output_of]
    new = {old: k for k, old in enumerate(keep)}
    sites = [sites[i] for i in keep]
    for site in sites:
        if site.same_as is not None:
            site.same_as = new.get(site.same_as)
    layers = {n: spec for n, spec in plan.layers.items() if n not in names}
    return Plan(layers, sites, {n: new[i] for n, i in plan.input_site.items() if n in layers},
                {n: new[i] for n, i in plan.output_site.items() if n in layers})


def with_float_layers(config: QuantConfig, float_layers: set[str]) -> QuantConfig:
    """A copy of ``config`` with ``float_layers`` disabled (an automatic search's trial)."""
    data = config.to_dict()
    for name in float_layers:
        data[name]["quant_enable"] = False
    return QuantConfig.from_dict(data, "auto calibration")
