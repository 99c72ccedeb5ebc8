"""The calibration model: the user's (folded, eval-mode) module with hooks that feed the shared calibration.

Forward passes return exactly what the module returns; hooks only read tensors. The input of each
quantized layer is read by a forward pre-hook; the output site (quantized after the layer so that the
runtime fuses an integer kernel) by a forward hook, with the Relu or ReLU6-style Clip that follows the
layer in the exported graph applied, because that is the tensor the deploy model quantizes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from omct.graph.modified import ModifiedModel
from omct.pytorch import distributed
from omct.quantize import Calibration, CalibrationStatus, initializer_reader, ort_session


def _to_numpy(t: torch.Tensor):
    return t.detach().to(torch.float32).cpu().numpy()


class CalibrationModel(CalibrationStatus, nn.Module):
    """Run ``batch_num`` batches through it (``model(x)``, under ``torch.no_grad()``); then the record is written.

    ``batch_num``, ``batches_seen`` and ``complete`` say how far calibration got. The wrapped module is
    ``.model``; after calibration the object keeps working as the plain module.
    """

    def __init__(self, model: nn.Module, mod: ModifiedModel, record_file: str):
        super().__init__()
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
        # Tensors no module computes (a residual Add's output, a GlobalAveragePool's) are read from the modified
        # model, which exposes them as outputs, run by ONNX Runtime on the same batch.
        self._onnx_tensors = [t for t in self.calibration.tensors() if t not in hooked]
        self._mod = mod
        self._session = ort_session(mod.model.SerializeToString()) if self._onnx_tensors else None

    def _observe(self, tensor: str, value: Any) -> None:
        if self._active and tensor not in self._seen and isinstance(value, torch.Tensor):
            self._seen.add(tensor)
            self.calibration.update(tensor, _to_numpy(value))

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
            return self.model(*args, **kwargs)
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
                feed = {i.name: _to_numpy(t) if t.is_floating_point() else t.detach().cpu().numpy()  # token ids stay int
                        for i, t in zip(self._session.get_inputs(), tensors, strict=False)}
                fetch = self._mod.fetch_names(self._onnx_tensors)
                values = dict(zip(fetch, self._session.run(fetch, feed), strict=True))
                for name, value in self._mod.observed(self._onnx_tensors, values).items():
                    self.calibration.update(name, value)
            return result

        out = self.calibration.run_batch(observe)
        if self.calibration.done and distributed.active():
            distributed.barrier()  # the record file is written (rank 0) before any rank goes on to save_model
        return out
