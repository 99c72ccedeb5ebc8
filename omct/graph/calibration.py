"""Statistics collection shared by every frontend: site tensors in, record file out.

The frontend (ONNX Runtime session or PyTorch hooks) hands each batch's site tensors to ``Collector``;
after ``batch_num`` batches the collector computes activation parameters, quantizes the weights and
writes the record file atomically.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TypeVar

import numpy as np

from omct.core.bias_correction import ChannelMeans, correction
from omct.core.calibrators import Calibrator, make_calibrator
from omct.core.parallel import run_all
from omct.core.weights import WEIGHT_QUANTIZERS
from omct.errors import CalibrationError
from omct.formats.config import QuantConfig
from omct.formats.record import LayerRecord, write_pending_record, write_record
from omct.graph.plan import Plan
from omct.ui import Progress, logger

T = TypeVar("T")


class Collector:
    def __init__(self, plan: Plan, config: QuantConfig, record_file: str,
                 weight_of: Callable[[str], np.ndarray]):
        self.plan, self.config, self.record_file = plan, config, record_file
        self.weight_of = weight_of
        self.calibrators: list[Calibrator] = [
            make_calibrator(s.act["act_algo"], s.act.get("num_bits", 8), s.asymmetric, **s.params().calibrator_options())
            for s in plan.sites
        ]
        self.batches = 0
        self.done = False
        self._progress: Progress | None = None
        # Per-channel input means for bias correction: (site, channel axis) -> accumulator.
        self._means: dict[tuple[int, int], ChannelMeans] = {}
        if config.globals.bias_correction:
            for name, spec in plan.layers.items():
                if spec.weight is not None and spec.bias is not None:
                    key = (plan.input_site[name], _input_channel_axis(spec.op_type))
                    self._means.setdefault(key, ChannelMeans(key[1]))
        self._means_of_site: dict[int, list[ChannelMeans]] = {}
        for (site, _), acc in self._means.items():
            self._means_of_site.setdefault(site, []).append(acc)

    @property
    def batch_num(self) -> int:
        return self.config.batch_num

    def observe(self, tensors: Mapping[str, np.ndarray]) -> None:
        """Feed every site of the current batch at once (tensor name -> values), the sites spread over
        the worker threads."""
        values = [tensors[site.tensor] for site in self.plan.sites]
        run_all([functools.partial(self.update_site, i, v) for i, v in enumerate(values)],
                costs=[np.size(v) for v in values])

    def run_batch(self, observe: Callable[[], T]) -> T:
        """One calibration batch as a frontend runs it: ``observe()`` runs the model, feeds the sites and
        returns the model's outputs. Shows progress, and keeps the record file saying how far it got."""
        if self._progress is None:
            self._progress = Progress("calibrating", self.batch_num)
        try:
            out = observe()
            finished = self.end_batch()
        except Exception:
            self._progress.close()
            raise
        self._progress.advance()
        if finished:
            self._progress.close()
            logger.info("calibration complete after %d batch(es): wrote %s", self.batches, self.record_file)
        else:
            write_pending_record(self.record_file, self.batches, self.batch_num, list(self.plan.layers))
        return out

    def update_site(self, index: int, values: np.ndarray) -> None:
        """Feed one site's values of the current batch (frontends that see tensors one at a time)."""
        site = self.plan.sites[index]
        try:
            self.calibrators[index].update(values)
            for acc in self._means_of_site.get(index, ()):
                acc.update(values)
        except ValueError as e:
            layers = ", ".join(site.inputs_of + [f"output of {n}" for n in site.output_of])
            raise CalibrationError(
                f"calibration batch {self.batches + 1}: tensor '{site.tensor}' ({layers}): {e}; check the input "
                f"data, or add '{site.owner}' to skip_layers to keep it in float") from None

    def end_batch(self) -> bool:
        """Close the current batch. Returns True when it completed the record."""
        if self.done:
            return False
        self.batches += 1
        if self.batches >= self.batch_num:
            self.finish()
            return True
        return False

    def finish(self) -> None:
        for site, calib in zip(self.plan.sites, self.calibrators, strict=True):
            if calib.sketch.count == 0:
                raise CalibrationError(f"layer '{site.owner}' never ran during the {self.batches} calibration batch(es) "
                                       f"(tensor '{site.tensor}'); make sure the calibration data reaches it, or add it "
                                       "to skip_layers")
        records = {}
        site_params = [c.compute(upper=s.upper) for c, s in zip(self.calibrators, self.plan.sites, strict=True)]
        for name, spec in self.plan.layers.items():
            p = site_params[self.plan.input_site[name]]
            rec = LayerRecord(float(p.scale), int(p.offset))
            wcfg = self.config.layers[name].weight_quant_params
            if spec.weight is not None:
                wcfg_bits = wcfg.num_bits if wcfg else 8
                algo = WEIGHT_QUANTIZERS[wcfg.wts_algo if wcfg else "arq_quantize"]
                axis = spec.weight_axis if (wcfg is None or wcfg.channel_wise) else None
                weight = self.weight_of(spec.weight)
                wp = algo(weight, wcfg_bits, axis)
                rec.scale_w = [float(s) for s in np.ravel(wp.scale)]
                rec.offset_w = [0] * len(rec.scale_w)
                acc = self._means.get((self.plan.input_site[name], _input_channel_axis(spec.op_type)))
                if acc is not None and acc.mean is not None:
                    shift = correction(spec.op_type, weight, wp.fake_quant(weight), acc.mean, spec.weight_axis)
                    if shift is not None and np.all(np.isfinite(shift)):
                        rec.bias_correction = [float(v) for v in shift]
            if name in self.plan.output_site:
                o = site_params[self.plan.output_site[name]]
                rec.scale_o, rec.offset_o = float(o.scale), int(o.offset)
            records[name] = rec
        write_record(self.record_file, records)
        self.done = True

    def memory_bytes(self) -> int:
        return sum(c.sketch.nbytes() for c in self.calibrators)


def _input_channel_axis(op_type: str) -> int:
    """Axis of a layer's input that its weights contract with: channels for convolutions, features otherwise."""
    return 1 if op_type in ("Conv", "ConvTranspose") else -1


class CalibrationStatus:
    """How far calibration got; mixed into each frontend's calibration object."""

    _collector: Collector

    @property
    def batch_num(self) -> int:
        return self._collector.batch_num

    @property
    def batches_seen(self) -> int:
        return self._collector.batches

    @property
    def complete(self) -> bool:
        return self._collector.done

