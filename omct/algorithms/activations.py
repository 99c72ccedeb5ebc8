"""Activation ranges: one calibrator (IFMR, HFMG, ...) per observed site, fed in the calibration pass."""

from __future__ import annotations

import json

from omct.algorithms.base import Algorithm, RecordContext
from omct.algorithms.statistics import StatPoint
from omct.core.calibrators import make_calibrator
from omct.errors import CalibrationError
from omct.formats.record import LayerRecord


def _point(plan, index: int, batch_num: int | None = None) -> StatPoint:
    site = plan.sites[index]
    # keyed by what makes a site (tensor, options, asymmetric), not by its index: a plan without some layers
    # (an If branch calibration never took) reads the same statistics; ``batch_num`` sizes the sketch's tails
    return StatPoint(site.tensor, ("activation", json.dumps(site.act, sort_keys=True), site.asymmetric),
                     lambda: make_calibrator(site.act["act_algo"], site.act.get("num_bits", 8), site.asymmetric,
                                             batch_num=batch_num, **site.params().calibrator_options()))


def unobserved_sites(plan, stats) -> list[int]:
    """The observed sites no calibration batch gave a value (a tensor inside an If branch never taken)."""
    return [i for i, s in enumerate(plan.sites) if s.same_as is None and stats[_point(plan, i)].sketch.count == 0]


class ActivationRanges(Algorithm):
    name = "activation_ranges"

    def points(self, plan, config):
        # a site quantized as another (a shared-scale chain op's output) is not observed
        return [_point(plan, i, config.batch_num) for i, s in enumerate(plan.sites) if s.same_as is None]

    def apply(self, ctx: RecordContext) -> None:
        sites = ctx.plan.sites
        calibrators = {i: ctx.stats[_point(ctx.plan, i)] for i, s in enumerate(sites) if s.same_as is None}
        for i, calib in calibrators.items():
            if calib.sketch.count == 0:
                raise CalibrationError(f"layer '{sites[i].owner}' never ran during calibration (tensor '{sites[i].tensor}'); "
                                       "make sure the calibration data reaches it, or add it to skip_layers")
        params = {i: c.compute(upper=sites[i].upper) for i, c in calibrators.items()}
        ctx.site_params = [params[i if s.same_as is None else s.same_as] for i, s in enumerate(sites)]
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
