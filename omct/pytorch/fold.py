"""Conv + BatchNorm folding on the module, before export: the conv takes the BN's affine map, the BN
becomes ``nn.Identity``. Done in PyTorch (not on the ONNX graph) so that calibration, which runs the
module, sees the same folded model that is exported."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


@torch.no_grad()
def fold_conv_bn(model: nn.Module, pairs: dict[str, str]) -> list[str]:
    """Fold each BatchNorm of ``pairs`` (conv name -> BN name) into its conv; returns the folded conv names."""
    folded = []
    for conv_name, bn_name in pairs.items():
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if bn.running_mean is None or bn.running_var is None:
            continue  # a BN without running statistics normalises with batch statistics: nothing to fold
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.affine:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.affine else 0.0)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        # New parameters, never in place: the copy being folded may share its tensors with the user's model.
        weight = conv.weight * scale.reshape(-1, *([1] * (conv.weight.dim() - 1))).to(conv.weight.dtype)
        new_bias = (bias * scale + shift).to(conv.weight.dtype)
        conv.weight = nn.Parameter(weight, requires_grad=conv.weight.requires_grad)
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
        _set_module(model, bn_name, nn.Identity())
        folded.append(conv_name)
    return folded


@torch.no_grad()
def equalize_modules(model: nn.Module, scales: dict[tuple[str, str], np.ndarray]) -> list[tuple[str, str]]:
    """Apply cross-layer equalization scales found on the traced graph (``omct.graph.equalize``) to the
    modules of the same names: conv A's output channel ``i`` divided by ``s_i``, conv B's input channel ``i``
    (a depthwise B: its output channels) multiplied. Pairs whose nodes are not both Conv2d modules are left
    alone; the model is traced again afterwards, so calibration and export see the same weights."""
    modules = dict(model.named_modules())
    done = []
    for (a_name, b_name), s in scales.items():
        a, b = modules.get(a_name), modules.get(b_name)
        if not isinstance(a, nn.Conv2d) or not isinstance(b, nn.Conv2d) or a.weight.shape[0] != len(s):
            continue
        t = torch.as_tensor(s, dtype=a.weight.dtype)
        # new parameters, never in place (the copy may share its tensors with the user's model)
        a.weight = nn.Parameter(a.weight / t.reshape(-1, 1, 1, 1), requires_grad=a.weight.requires_grad)
        if a.bias is not None:
            a.bias = nn.Parameter(a.bias / t, requires_grad=a.bias.requires_grad)
        per_out = t.repeat_interleave(b.weight.shape[0] // len(s))  # a depthwise B: its output channels
        factor = t.reshape(1, -1, 1, 1) if b.groups == 1 else per_out.reshape(-1, 1, 1, 1)
        b.weight = nn.Parameter(b.weight * factor, requires_grad=b.weight.requires_grad)
        done.append((a_name, b_name))
    return done
