"""The calibration model: the user's (folded, eval-mode) module with hooks that feed the shared calibration.

Forward passes return exactly what the module returns; hooks only read tensors. The input of each
quantized layer is read by a forward pre-hook; the output site (quantized after the layer so that the
runtime fuses an integer kernel) by a forward hook, with the Relu or ReLU6-style Clip that follows the
layer in the exported graph applied, because that is the tensor the deploy model quantizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from omct.graph.modified import ModifiedModel, partial_model
from omct.pytorch import distributed
from omct.quantize import Calibration, CalibrationStatus, initializer_reader, ort_session


def _to_numpy(t: torch.Tensor):
    t = t.detach().to(torch.float32)
    if not t.is_contiguous():  # a channels-last activation (see ``channels_last``): the statistics read NCHW
        t = t.contiguous()
    return t.cpu().numpy()


def _channels_last(t: torch.Tensor) -> bool:
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def channels_last(model: nn.Module, args: tuple) -> bool:
    """Give the Conv2d modules of omct's calibration copy channels-last weights when it has depthwise (grouped)
    convolutions and runs on a CPU with oneDNN; returns whether it did.

    Why: the calibration passes run the module in eager mode, and oneDNN's NCHW grouped convolutions are slow:
    EfficientNet-Lite's passes ran 3-5x faster with channels-last weights (20x slower than ONNX Runtime's
    before), MobileNetV2's 1.3x; a ResNet-18 (dense convolutions only) ran alike, so its copy is left as it is.
    Values agree up to float rounding (the accumulation order). The weights become new Parameters of the copy:
    the user's module, which may share the old ones, is unchanged. A ``forward()`` that needs NCHW memory
    (``x.view(n, -1)`` of a feature map) raises on ``args``: then the copy is put back as it was."""
    if not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled:
        return False
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and isinstance(m._parameters.get("weight"), nn.Parameter)
             and not parametrize.is_parametrized(m) and m.weight.device.type == "cpu" and m.weight.dim() == 4
             and m.weight.is_floating_point()]
    if not any(m.groups > 1 for m in convs):
        return False
    old = [m.weight for m in convs]
    with torch.no_grad():
        for m in convs:
            # .to, not .contiguous: a 1x1 or depthwise weight counts as both layouts and would stay NCHW
            m.weight = nn.Parameter(m.weight.detach().to(memory_format=torch.channels_last),
                                    requires_grad=m.weight.requires_grad)
        try:
            model(*args)
        except Exception:  # noqa: BLE001 - any failure: this forward needs the NCHW layout
            for m, w in zip(convs, old, strict=True):
                m.weight = w
            return False
    return True


def _nchw(out: Any) -> Any:
    """``out`` with each channels-last 4-D tensor made NCHW-contiguous (what the user's module returns)."""
    if isinstance(out, torch.Tensor):
        return out.contiguous() if _channels_last(out) else out
    if type(out) in (tuple, list):
        return type(out)(_nchw(o) for o in out)
    if type(out) is dict:
        return {k: _nchw(v) for k, v in out.items()}
    return out


class CalibrationModel(CalibrationStatus, nn.Module):
    """Run ``batch_num`` batches through it (``model(x)``, under ``torch.no_grad()``); then the record is written.

    ``batch_num``, ``batches_seen`` and ``complete`` say how far calibration got. The wrapped module is
    ``.model``; after calibration the object keeps working as the plain module: its hooks, ONNX Runtime sessions
    and the modified model are dropped then, and with ``release_statistics`` (AMCT's ``quantize_model``, whose
    caller needs only the record file) the statistics too.
    """

    def __init__(self, model: nn.Module, mod: ModifiedModel, record_file: str, release_statistics: bool = False,
                 example: tuple | None = None):
        super().__init__()
        # ``example``: positional inputs (input_data) to probe the channels-last copy with (``channels_last``)
        self._nchw_out = example is not None and channels_last(model, example)
        self._release_statistics = release_statistics
        self.model = model
        self.record_file = record_file
        # Under torch.distributed every rank calibrates on its share of the data: the statistics are merged
        # across ranks before the factors are computed, and only rank 0 writes the record file.
        self.calibration = Calibration(mod.plan, mod.config, initializer_reader(mod.model),
                                       record_file if distributed.rank() == 0 else None)
        if distributed.active():
            self.calibration.before_finish = distributed.reduce_statistics
        self._seen: set[str] = set()
        self._active = False
        producers = {o: n for n in mod.model.graph.node for o in n.output}
        self._handles = []
        hooked: set[str] = set()
        for name, spec in mod.plan.layers.items():
            if spec.weight_only or spec.chain is not None:  # a table lookup, or a chain op (no module of its own)
                continue
            module = model.get_submodule(name)
            hooked.add(spec.input)
            self._handles.append(module.register_forward_pre_hook(self._input_hook(spec.input)))
            if name in mod.plan.output_site:
                # The site is the layer's own output, or a Relu / Clip(0, max) right after it.
                clamp = (0.0, spec.output_max) if producers[spec.output_site].op_type in ("Relu", "Clip") else None
                self._handles.append(module.register_forward_hook(self._output_hook(spec.output_site, clamp)))
                hooked.add(spec.output_site)
        # Tensors no module computes (a residual Add's output, a GlobalAveragePool's) are computed by ONNX Runtime
        # on the same batch: by the part of the modified model between them and the tensors the hooks see (a few
        # Add, Relu, GlobalAveragePool nodes), fed with those hooked values; by the whole modified model (which
        # exposes them as outputs) when that part cannot be cut out or a hooked value is missing in a batch.
        self._onnx_tensors = [t for t in self.calibration.tensors() if t not in hooked]
        self._mod = mod
        self._model = mod.model
        self._inputs = [i.name for i in mod.model.graph.input
                        if i.name not in {t.name for t in mod.model.graph.initializer}]
        self._session = self._full = None
        self._kept: dict[str, Any] = {}
        self._keep: set[str] = set()
        if self._onnx_tensors:
            part = partial_model(mod.model, self._onnx_tensors, hooked)
            if part is None:
                self._session = self._full = ort_session(mod.model.SerializeToString())
            else:
                self._session = ort_session(part.SerializeToString())
                self._keep = {i.name for i in part.graph.input} & hooked

    def _observe(self, tensor: str, value: Any) -> None:
        if self._active and tensor not in self._seen and isinstance(value, torch.Tensor):
            self._seen.add(tensor)
            array = _to_numpy(value)
            if tensor in self._keep:  # a copy: the module's output may be changed in place later in forward()
                self._kept[tensor] = np.array(array, copy=True)
            self.calibration.update(tensor, array)

    def _observe_onnx(self, tensors: list[torch.Tensor]) -> None:
        """Feed the tensors no hook sees, computed by ONNX Runtime from this batch's inputs and hooked values."""
        inputs = {n: _to_numpy(t) if t.is_floating_point() else t.detach().cpu().numpy()  # token ids stay int
                  for n, t in zip(self._inputs, tensors, strict=False)}
        session = self._session
        if session is not self._full and not self._keep <= self._kept.keys():  # a hook did not fire this batch
            if self._full is None:
                self._full = ort_session(self._model.SerializeToString())
            session = self._full
        feed = {i.name: self._kept[i.name] if i.name in self._kept and session is not self._full else inputs[i.name]
                for i in session.get_inputs()}
        fetch = self._mod.fetch_names(self._onnx_tensors)  # a tensor inside a control-flow body: where it is carried
        values = dict(zip(fetch, session.run(fetch, feed), strict=True))
        for name, value in self._mod.observed(self._onnx_tensors, values).items():
            self.calibration.update(name, value)

    def _input_hook(self, tensor: str):
        def hook(_module, args):
            if args:
                self._observe(tensor, args[0])
        return hook

    def _output_hook(self, tensor: str, clamp: tuple[float, float | None] | None):
        def hook(_module, _args, out):
            if self._active and isinstance(out, torch.Tensor) and tensor not in self._seen:
                self._observe(tensor, out if clamp is None else out.detach().clamp(clamp[0], clamp[1]))
        return hook

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.calibration.done:
            return self._result(self.model(*args, **kwargs))
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        self.calibration.keep_inputs(sum(t.numel() * t.element_size() for t in tensors),
                                     lambda: [t.detach().cpu().numpy().copy() for t in tensors])

        def observe():
            self._seen.clear()
            self._active = True
            try:
                result = self.model(*args, **kwargs)
            finally:
                self._active = False
            if self._session is not None:
                self._observe_onnx(tensors)
            return result

        try:
            out = self.calibration.run_batch(observe)
        finally:
            self._kept.clear()
        if self.calibration.done:
            self._release()
            if distributed.active():
                distributed.barrier()  # the record file is written (rank 0) before any rank goes on to save_model
        return self._result(out)

    def _result(self, out: Any) -> Any:
        return _nchw(out) if self._nchw_out else out

    def _release(self) -> None:
        """After the last batch nothing here is read again: the hooks go, and what they fed (ONNX Runtime
        sessions, the modified model with a copy of every weight) is freed before ``save_model`` needs memory."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._session = self._full = self._mod = self._model = None
        if self._release_statistics:
            self.calibration.release()
