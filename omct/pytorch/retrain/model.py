"""The retrain model: the user's module (BatchNorm folded) with learned fake quantization where the deploy model
quantizes, and the record that describes it.

Where it quantizes comes from the shared plan (``graph.plan``) of the traced graph, exactly as for PTQ: each
layer's input site, and the output site (after the ReLU / ReLU6 that follows) that lets ONNX Runtime fuse an
integer kernel. Input sites are fake-quantized by a forward pre-hook on the layer, output sites by a forward
hook on the producing layer (fake quantization with a range that starts at 0 commutes with the ReLU after it);
a tensor that is both (one layer's output, the next one's input) is quantized once. Weights are a
``torch.nn.utils.parametrize`` parametrization, so ``module.weight`` is the fake-quantized weight and the
float weight trains underneath it.

The first ``batch_num`` forward passes initialise the activation ranges with IFMR (reduced across ranks under
torch.distributed) and run with float activations; the clip parameters still take part in the graph (times
zero), so DistributedDataParallel sees every parameter used in every step.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from omct.algorithms.statistics import Statistics, StatPoint
from omct.core.bias_correction import ChannelMeans, correction
from omct.core.calibrators import make_calibrator
from omct.errors import CalibrationError, QuantizationError
from omct.formats.record import LayerRecord
from omct.formats.retrain import RetrainConfig
from omct.graph.plan import Plan
from omct.pytorch import distributed
from omct.pytorch.retrain.quantizers import ActivationULQ, BiasQuantizer, WeightQuantizer

#: layer types quantization-aware training quantizes (AMCT's list plus Conv1d / Conv3d)
RETRAIN_TYPES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose2d", "Linear")


def torch_weight_axis(module: nn.Module) -> int:
    """The output-channel axis of a module's weight (ConvTranspose keeps (in, out / groups, k...))."""
    return 1 if isinstance(module, nn.ConvTranspose2d) else 0


class QuantRetrainModel(nn.Module):
    """What ``create_quant_retrain_model`` returns: train it like the model (any optimizer, device, DDP).

    ``.model`` is the wrapped module; ``batches_seen`` counts forward passes; ``initialized`` says whether the
    activation ranges are set.
    """

    def __init__(self, model: nn.Module, plan: Plan, config: RetrainConfig, record_file: str, producers: dict):
        super().__init__()
        self.model = model
        self.record_file = record_file
        self.batch_num = config.batch_num
        self._plan = plan
        self.register_buffer("batches", torch.tensor(0, dtype=torch.long))
        self.act_quantizers = nn.ModuleDict()
        self._site_key: dict[int, str] = {}
        self._clamp: dict[int, tuple[float, float | None] | None] = {}
        self._hook_ids: list[tuple[str, str, int]] = []
        self._observing = False
        self._stats: Statistics | None = None
        for index, site in enumerate(plan.sites):
            layers = site.output_of + site.inputs_of
            data = config.layers[site.owner].retrain_data_config
            relu = bool(site.output_of) and producers.get(site.tensor) in ("Relu", "Clip")
            q = ActivationULQ(", ".join(dict.fromkeys(layers)), fixed_min=True if relu else data.fixed_min,
                              upper=site.upper)
            if data.clip_max is not None:
                q.set_range(data.clip_min, data.clip_max, True if relu else bool(data.fixed_min))
            key = f"site{index}"
            self.act_quantizers[key] = q
            self._site_key[index] = key
            self._clamp[index] = (0.0, site.upper) if relu else None
        for name, spec in plan.layers.items():
            module = model.get_submodule(name)
            if name in plan.input_site and not plan.sites[plan.input_site[name]].output_of:
                h = module.register_forward_pre_hook(self._input_hook(plan.input_site[name]))
                self._hook_ids.append((name, "pre", h.id))
            if name in plan.output_site:
                h = module.register_forward_hook(self._output_hook(plan.output_site[name]))
                self._hook_ids.append((name, "post", h.id))
            if spec.weight is not None:
                w = config.layers[name].retrain_weight_config
                axis = torch_weight_axis(module) if w.channel_wise else None
                quantizer = WeightQuantizer(name, module.weight, 4 if w.dst_type == "INT4" else 8, axis,
                                            learned=w.algo == "ulq_retrain")
                parametrize.register_parametrization(module, "weight", quantizer)
                if spec.bias is not None and getattr(module, "bias", None) is not None and name in plan.input_site:
                    inputs = self.act_quantizers[self._site_key[plan.input_site[name]]]
                    parametrize.register_parametrization(module, "bias", BiasQuantizer(
                        quantizer, inputs, lambda m=module: m.parametrizations.weight.original))
        self.register_buffer("initialized", torch.tensor(self._all_initialized()))

    # ------------------------------------------------------------------ state
    def _all_initialized(self) -> bool:
        return all(bool(q.initialized) for q in self.act_quantizers.values())

    @property
    def plan(self) -> Plan:
        return self._plan

    @property
    def batches_seen(self) -> int:
        return int(self.batches)

    def weight_quantizers(self) -> dict[str, WeightQuantizer]:
        out = {}
        for name, spec in self._plan.layers.items():
            if spec.weight is not None:
                out[name] = self.model.get_submodule(name).parametrizations.weight[0]
        return out

    # ------------------------------------------------------------------ hooks
    def _site_forward(self, index: int, x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        q: ActivationULQ = self.act_quantizers[self._site_key[index]]
        if self._observing:
            if self._stats is not None:
                clamp = self._clamp[index]
                seen = x.detach() if clamp is None else x.detach().clamp(clamp[0], clamp[1])
                try:
                    self._stats.update(self._site_key[index], seen.to(torch.float32).cpu().numpy())
                except ValueError as e:
                    raise CalibrationError(f"retrain initialisation batch {self.batches_seen + 1}: layer '{q.name}': "
                                           f"{e}; check the training data") from None
            return x + 0.0 * (q.clip_max + q.clip_min)  # used (with gradient 0): DDP expects every parameter
        return q(x)

    def _input_hook(self, index: int):
        def hook(_module, args):
            if args:
                return (self._site_forward(index, args[0]), *args[1:])
            return None
        return hook

    def _output_hook(self, index: int):
        def hook(_module, _args, out):
            return self._site_forward(index, out)
        return hook

    # ------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if bool(self.initialized):
            if self.training:
                self.batches += 1
            return self.model(*args, **kwargs)
        if not self.training:
            raise QuantizationError(
                f"the retrain model has seen {self.batches_seen} of batch_num={self.batch_num} initialisation batches; "
                "run them in training mode (model.train()) before evaluating it")
        if self._stats is None:
            self._stats = Statistics(self._points())
        self._observing = True
        try:
            out = self.model(*args, **kwargs)
        finally:
            self._observing = False
        self.batches += 1
        if self.batches_seen >= self.batch_num:
            self._initialize()
        return out

    def _points(self) -> list[StatPoint]:
        ranges = [StatPoint(key, ("ifmr",), lambda: make_calibrator("ifmr", 8, True))
                  for i, key in self._site_key.items() if not bool(self.act_quantizers[key].initialized)]
        return ranges + [self._mean_point(name) for name in self._corrected_layers()]

    def _corrected_layers(self) -> list[str]:
        """The layers whose bias absorbs their quantized weights' mean shift at initialisation."""
        return [name for name, spec in self._plan.layers.items()
                if spec.weight is not None and spec.bias is not None and spec.weight_in_axis is not None
                and name in self._plan.input_site and "bias" in getattr(self.model.get_submodule(name),
                                                                         "parametrizations", {})]

    def _mean_point(self, name: str) -> StatPoint:
        axis = self._plan.layers[name].input_channel_axis
        return StatPoint(self._site_key[self._plan.input_site[name]], ("channel_means", axis),
                         lambda: ChannelMeans(axis))

    @torch.no_grad()
    def _correct_biases(self, stats: Statistics) -> None:
        """PTQ's bias correction (on by default there, and in NNCF's QAT initialisation), applied to the trained
        bias: each layer's bias absorbs the mean output shift ``dW . E[x]`` of its fake-quantized weights, with
        E[x] from the initialisation batches. Without it QAT starts far below PTQ where the weight quantization
        error is large (INT4 per tensor) and a short fine-tune at a small learning rate never closes the gap."""
        weights = self.weight_quantizers()
        for name in self._corrected_layers():
            mean = stats[self._mean_point(name)].mean
            module = self.model.get_submodule(name)
            w = module.parametrizations.weight.original
            quantized = weights[name](w)
            out_axis = torch_weight_axis(module)
            shift = correction(w.detach().cpu().numpy(), quantized.cpu().numpy(), mean, out_axis, 1 - out_axis,
                               self._plan.layers[name].groups) if mean is not None else None
            bias = module.parametrizations.bias.original
            if shift is not None and shift.shape == tuple(bias.shape) and np.all(np.isfinite(shift)):
                # .data: this runs inside the last initialisation forward, whose graph already holds the bias
                bias.data.add_(torch.as_tensor(shift, dtype=bias.dtype, device=bias.device))

    def _initialize(self) -> None:
        """IFMR ranges from the statistics of every rank (merged in rank order: the same on every rank)."""
        stats = self._stats
        distributed.reduce_statistics(stats)
        for key, q in self.act_quantizers.items():
            if bool(q.initialized):
                continue
            calib = stats[StatPoint(key, ("ifmr",), None)]
            if calib.sketch.count == 0:
                raise CalibrationError(f"layer '{q.name}' never ran during the {self.batch_num} initialisation batch(es); "
                                       "make sure the data reaches it, or add it to skip_layers")
            fixed = bool(q.fixed_min) if q.fixed_min is not None else calib.sketch.min >= 0
            p = calib.compute(upper=q.upper)
            lo, hi = float((p.qmin - p.offset) * p.scale), float((p.qmax - p.offset) * p.scale)
            q.set_range(lo, hi, fixed)
        self._correct_biases(stats)
        self._stats = None
        self.initialized.fill_(True)

    # ------------------------------------------------------------------ record
    def records(self) -> dict[str, LayerRecord]:
        """The learned factors in AMCT's record: scale_d/offset_d (input), scale_w, scale_o/offset_o (output)."""
        if not bool(self.initialized):
            raise QuantizationError(
                f"the retrain model was never trained: it has seen {self.batches_seen} of batch_num={self.batch_num} "
                "initialisation batches; train it before save_quant_retrain_model")
        weights = self.weight_quantizers()
        out = {}
        for name in self._plan.layers:
            scale_d, offset_d = self._site(self._plan.input_site[name]).record_params()
            rec = LayerRecord(scale_d, offset_d)
            if name in weights:
                module = self.model.get_submodule(name)
                rec.scale_w = weights[name].record_scales(module.parametrizations.weight.original)
                rec.offset_w = [0] * len(rec.scale_w)
            if name in self._plan.output_site:
                rec.scale_o, rec.offset_o = self._site(self._plan.output_site[name]).record_params()
            values = [rec.scale_d, *rec.scale_w] + ([rec.scale_o] if rec.scale_o is not None else [])
            if not np.all(np.isfinite(values)) or min(values) <= 0:
                raise QuantizationError(f"layer '{name}': a learned scale is not a positive finite number; "
                                        "no record written")
            out[name] = rec
        return out

    def _site(self, index: int) -> ActivationULQ:
        return self.act_quantizers[self._site_key[index]]

    def float_model(self) -> nn.Module:
        """A copy of the wrapped module with the trained float weights and none of the retrain hooks."""
        import copy

        work = copy.deepcopy(self.model)
        for name, kind, hook_id in self._hook_ids:
            module = work.get_submodule(name)
            (module._forward_pre_hooks if kind == "pre" else module._forward_hooks).pop(hook_id, None)
        for name in self.weight_quantizers():
            _unparametrize(work.get_submodule(name))
        return work.eval()


def _unparametrize(module: nn.Module) -> None:
    """Turn a (copied) parametrized module back into its plain class with its float tensors.

    Not ``parametrize.remove_parametrizations``: it deletes the property from the generated class, which a
    deep copy shares with the original, and the retrain model itself would lose its ``weight``."""
    originals = {t: p.original for t, p in module.parametrizations.items()}
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    for tensor, value in originals.items():
        module.register_parameter(tensor, nn.Parameter(value.detach().clone()))
