"""Activation ranges: one calibrator (IFMR, HFMG, ...) per observed site, fed in the calibration pass."""

from __future__ import annotations

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.calibrators import make_calibrator
from omct.errors import CalibrationError
from omct.formats.record import LayerRecord


def _point(plan, index: int) -> StatPoint:
    site = plan.sites[index]
    return StatPoint(site.tensor, ("activation", index),
                     lambda: make_calibrator(site.act["act_algo"], site.act.get("num_bits", 8), site.asymmetric,
                                             **site.params().calibrator_options()))


class ActivationRanges(Algorithm):
    name = "activation_ranges"

    def points(self, plan, config):
        return [_point(plan, i) for i in range(len(plan.sites))]

    def apply(self, ctx: RecordContext) -> None:
        calibrators = [ctx.stats[_point(ctx.plan, i)] for i in range(len(ctx.plan.sites))]
        for site, calib in zip(ctx.plan.sites, calibrators, strict=True):
            if calib.sketch.count == 0:
                raise CalibrationError(f"layer '{site.owner}' never ran during calibration (tensor '{site.tensor}'); make "
                                       "sure the calibration data reaches it, or add it to skip_layers")
        ctx.site_params = [c.compute(upper=s.upper) for c, s in zip(calibrators, ctx.plan.sites, strict=True)]
        for name, spec in ctx.plan.layers.items():
            if spec.weight_only:  # no input is quantized: scale_d 1, offset_d 0 (the format requires them; unused)
                ctx.records.setdefault(name, LayerRecord(1.0, 0))
                continue
            p = ctx.site_params[ctx.plan.input_site[name]]
            rec = ctx.records.setdefault(name, LayerRecord(float(p.scale), int(p.offset)))
            rec.scale_d, rec.offset_d = float(p.scale), int(p.offset)
            if name in ctx.plan.output_site:
                o = ctx.site_params[ctx.plan.output_site[name]]
                rec.scale_o, rec.offset_o = float(o.scale), int(o.offset)
