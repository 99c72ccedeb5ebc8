"""AMCT's tensor decomposition for PyTorch: ``auto_decomposition`` replaces qualifying ``nn.Conv2d`` layers by
an ``nn.Sequential`` of two (``K x 1``, ``1 x K``) or three (1x1, ``K x K``, 1x1) convolutions, writes
``decompose_info.json``; ``decompose_network`` rebuilds that structure in a fresh model so that the state_dict
saved after fine-tuning loads into it.

    model, changes = amct.auto_decomposition(model, "decompose_info.json", input_data=x)
    # changes == {"layer1.0.conv1": ["layer1.0.conv1.0", "layer1.0.conv1.1"], ...}
    amct.decompose_network(fresh_model, "decompose_info.json")
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from omct.core.decomposition import FORMS, ConvGeometry
from omct.decompose.info import layer_entry, read_info, write_info
from omct.decompose.plan import DecomposeOptions, LayerDecision, child_specs, decide, geometry, refusal
from omct.errors import ConfigError, ModelError
from omct.pytorch.trace import as_args
from omct.ui import logger

#: images per layer kept for the data-aware fit
MAX_IMAGES = 256


def _pads(conv: nn.Conv2d) -> tuple[int, int, int, int] | None:
    p = conv.padding
    if isinstance(p, str):
        if p == "valid":
            return (0, 0, 0, 0)
        if p == "same" and all(k % 2 for k in conv.kernel_size):
            return (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2) * 2
        return None
    return (p[0], p[1], p[0], p[1])


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def _build(specs: list[dict], like: torch.Tensor) -> nn.Sequential:
    convs = []
    for s in specs:
        t, left, b, r = s["pads"]
        if (t, left) != (b, r):
            raise ModelError(f"asymmetric pads {s['pads']} cannot be expressed by nn.Conv2d")
        convs.append(nn.Conv2d(s["cin"], s["cout"], s["kernel"], s["stride"], (t, left), bias=s["bias"],
                               device=like.device, dtype=like.dtype))
    return nn.Sequential(*convs)


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Conv2d], dict[str, str]]:
    convs, kept = {}, {}
    for name, m in model.named_modules():
        if not isinstance(m, nn.Conv2d) or not name:
            continue
        pads = _pads(m)
        why = refusal(m.groups, m.dilation, m.kernel_size, m.stride, m.padding_mode)
        if why is None and pads is None:
            why = f"padding '{m.padding}'"
        if why:
            kept[name] = why
        else:
            convs[name] = m
    return convs, kept


def _capture(model: nn.Module, convs: dict[str, nn.Module], input_data, outputs: bool = False):
    """Each module's input (and output) on ``input_data`` (at most MAX_IMAGES images), how often it ran, and
    the order in which the modules first ran."""
    seen: dict[str, list] = {n: [] for n in convs}
    outs: dict[str, np.ndarray] = {}
    order: list[str] = []
    handles = []
    for name, m in convs.items():
        def pre(_m, args, name=name):
            if not seen[name]:
                order.append(name)
            seen[name].append(args[0].detach().float().cpu().numpy()[:MAX_IMAGES])

        def post(_m, _args, out, name=name):
            outs.setdefault(name, out.detach().double().cpu().numpy()[:MAX_IMAGES])
        handles.append(m.register_forward_pre_hook(pre))
        if outputs:
            handles.append(m.register_forward_hook(post))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*as_args(input_data))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {n: v[0] for n, v in seen.items() if v}, outs, {n: len(v) for n, v in seen.items()}, order


def auto_decomposition(model: nn.Module, decompose_info_path: str | os.PathLike | None = None, input_data=None,
                       rank_budget: float | None = None, max_error: float | None = None, rank_multiple: int = 16,
                       forms: tuple[str, ...] = FORMS, check_latency: bool = True, data_aware: bool = True,
                       latency_batch: int = 1) -> tuple[nn.Module, dict[str, list[str]]]:
    """Decompose the qualifying convolutions of ``model`` in place; returns ``(model, changes)``.

    ``input_data`` (a tensor or tuple, one batch, optional) gives each layer's real input size (for MACs and the
    latency check) and, with ``data_aware``, the inputs the factors are fitted to. Ranks: AMCT's EVBMF estimate,
    or ``rank_budget`` (fraction of each layer's MACs kept, in (0, 1]) or ``max_error`` (relative weight error
    allowed). A layer is kept when no candidate is cheaper, within the error, and faster in ONNX Runtime.
    ``decompose_info_path`` receives what was done (for ``decompose_network``). Fine-tune afterwards.
    """
    options = DecomposeOptions(rank_budget=rank_budget, max_error=max_error, rank_multiple=rank_multiple,
                               forms=tuple(forms), check_latency=check_latency, latency_batch=latency_batch)
    convs, kept = _candidates(model)
    inputs, targets, order = {}, {}, list(convs)
    if input_data is not None and convs:
        inputs, targets, calls, order = _capture(model, convs, input_data, outputs=data_aware)
        for name in list(convs):
            if calls.get(name, 0) != 1:
                kept[name] = "not run by the model" if not calls.get(name) else f"run {calls[name]} times per forward"
                del convs[name]
    changes, entries = {}, {}
    for name in [n for n in order if n in convs]:
        conv = convs[name]
        x = inputs.get(name)
        g = geometry(conv.out_channels, conv.in_channels, conv.kernel_size[0], conv.stride, _pads(conv),
                     None if x is None else x.shape[2:])
        weight = conv.weight.detach().double().cpu().numpy()
        bias = None if conv.bias is None else conv.bias.detach().double().cpu().numpy()
        if data_aware and x is not None and changes:  # the inputs the layer gets once those before it are decomposed
            x = _capture(model, {name: conv}, input_data)[0][name]
        d = decide(name, weight, bias, g, options, x if data_aware else None, targets.get(name))
        logger.info(d.summary())
        if d.chosen is None:
            kept[name] = d.reason
            continue
        new = _replace(model, name, d, conv.weight)
        changes[name] = [f"{name}.{i}" for i in range(len(new))]
        entries[name] = layer_entry(d, changes[name], new[-1].bias is not None)
    if not changes:
        logger.warning("auto_decomposition: nothing decomposable in the model (" +
                       ("; ".join(f"{n}: {r}" for n, r in kept.items()) or "no nn.Conv2d") + "); model unchanged")
    if decompose_info_path is not None:
        write_info(decompose_info_path, entries, kept, {"rank_budget": rank_budget, "max_error": max_error,
                                                        "rank_multiple": rank_multiple, "forms": list(forms)})
    return model, changes


def _replace(model: nn.Module, name: str, d: LayerDecision, like: torch.Tensor) -> nn.Sequential:
    c = d.chosen
    specs = child_specs(c.form, c.ranks, d.geometry, bias=c.bias is not None)
    new = _build(specs, like)
    with torch.no_grad():
        for conv, w in zip(new, c.weights, strict=True):
            conv.weight.copy_(torch.from_numpy(w))
        if c.bias is not None:
            new[-1].bias.copy_(torch.from_numpy(c.bias))
    new.train(model.training)
    parent, attr = _parent(model, name)
    setattr(parent, attr, new)
    return new


def decompose_network(model: nn.Module, decompose_info_path: str | os.PathLike) -> tuple[nn.Module, dict[str, list[str]]]:
    """Rebuild in ``model`` (in place) the structure ``auto_decomposition`` recorded, without its weights, so that
    a state_dict saved from the decomposed (fine-tuned) model loads exactly; returns ``(model, changes)``."""
    layers = read_info(decompose_info_path)
    where = f"decompose_info file '{decompose_info_path}'"
    plans = []
    for name, e in layers.items():
        try:
            conv = model.get_submodule(name) if name else None
        except AttributeError:
            conv = None
        if conv is None:
            raise ConfigError(f"{where}: layer '{name}' is not in the {type(model).__name__} model (written for another model?)")
        if not isinstance(conv, nn.Conv2d):
            raise ConfigError(f"{where}: layer '{name}' is a {type(conv).__name__}, not a Conv2d (written for another model?)")
        have = {"in_channels": conv.in_channels, "out_channels": conv.out_channels, "kernel_size": conv.kernel_size[0],
                "stride": list(conv.stride), "pads": list(_pads(conv) or ())}
        for key, value in have.items():
            if e[key] != value:
                raise ConfigError(f"{where}: layer '{name}' has {key} {value}, the file says {e[key]} "
                                  "(written for another model?)")
        g = ConvGeometry(e["out_channels"], e["in_channels"], e["kernel_size"], tuple(e["stride"]), tuple(e["pads"]))
        specs = child_specs(e["form"], tuple(e["ranks"]), g, e["bias"])
        if [f"{name}.{i}" for i in range(len(specs))] != e["children"]:
            raise ConfigError(f"{where}: layer '{name}' lists children {e['children']}, expected '{name}.0'...")
        plans.append((name, specs, conv.weight))
    changes = {}
    for name, specs, like in plans:  # all checked first: a bad file leaves the model as it was
        new = _build(specs, like)
        new.train(model.training)
        parent, attr = _parent(model, name)
        setattr(parent, attr, new)
        changes[name] = [f"{name}.{i}" for i in range(len(specs))]
    return model, changes
