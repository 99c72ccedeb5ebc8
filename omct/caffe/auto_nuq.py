"""``omct.caffe.auto_nuq``: AMCT's automatic non-uniform quantization for Caffe models (seed 002).

    from omct.caffe.auto_nuq import AutoNuqEvaluatorBase
    amct.auto_nuq(model_file, weights_file, evaluator, config_file, scale_offset_record_file, save_dir)

The search itself is the shared one (``omct.auto.nuq``); this module hands the evaluator Caffe files:
``eval_model(model_file, weights_file, batch_num)`` always gets a prototxt and a caffemodel that Caffe, OpenCV's
``cv2.dnn.readNetFromCaffe`` or ``omct.caffe.Net`` load. The caffemodel is one work file in
``save_dir/nuq_work`` that omct rewrites before each call: first with the float weights (the float model and
the calibration model), then with each trial's weights on their NUQ or INT8 values. For the calibration call,
opening the pair with OpenCV or ``omct.caffe.Net`` runs omct's calibration session; the metric of that call is
not used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import onnx

from omct.auto.nuq import AutoNuqEvaluatorBase as _SharedBase
from omct.auto.nuq import NuqSearchResult, NuqTarget, auto_nuq_outputs, run_auto_nuq
from omct.caffe.api import CaffeGraph, CalibrationSession, save_outputs, save_quantized
from omct.caffe.api import prepare as _prepare
from omct.caffe.netio import load_net, write_prototxt
from omct.caffe.runner import calibrating
from omct.caffe.writer import write_quantized_caffe
from omct.errors import CalibrationError
from omct.fileio import check_outputs
from omct.formats.config import load_config
from omct.formats.record import write_pending_record
from omct.graph.modified import make_modified
from omct.graph.plan import build_plan
from omct.quantize import QuantizedModel, observed_tensors

__all__ = ["AutoNuqEvaluatorBase", "auto_nuq"]


class AutoNuqEvaluatorBase(_SharedBase):
    """AMCT's Caffe evaluator base: implement ``eval_model(model_file, weights_file, batch_num)`` (a prototxt and a
    caffemodel; return one number, higher is better) and ``is_satisfied(original_metric, new_metric)``.

    AMCT's samples call ``super().__init__(self)``; that is accepted."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__()


def auto_nuq(model_file: str | os.PathLike, weights_file: str | os.PathLike, evaluator: _SharedBase,
             config_file: str | os.PathLike, scale_offset_record_file: str | os.PathLike, save_dir: str | os.PathLike,
             ranking_memory_mb: float = 256) -> NuqSearchResult:
    """The smallest per-layer NUQ steps (Convolution with group 1 and dilation 1, InnerProduct with axis 1 and no
    transpose) whose fake-quant model ``evaluator.is_satisfied``. ``eval_model`` is called at most
    ``2 * ceil(log2 N) + 4`` times for N such layers, calibration included. Writes the record file and, in
    ``save_dir``: ``final_config.json``, ``nuq_search_record.json``, ``{model}_fake_quant_model.onnx``,
    ``{model}_deploy_model.onnx`` and the Caffe pair ``{model}_fake_quant_model.prototxt`` /
    ``{model}_fake_quant_weights.caffemodel``."""
    save_dir = Path(save_dir)
    prefix = Path(model_file).stem
    inputs = {"model_file": model_file, "weights_file": weights_file}
    caffe_outputs = {k: v for k, v in save_outputs(str(save_dir / prefix), "Both").items() if "caffemodel" in k
                     or "prototxt" in k}
    check_outputs({**inputs, "config_file": config_file},
                  {**auto_nuq_outputs(save_dir, prefix, scale_offset_record_file), **caffe_outputs})
    config = load_config(config_file)
    net = load_net(model_file, weights_file)
    work = save_dir / "nuq_work"  # the shared search removes it when it ends
    work.mkdir(parents=True, exist_ok=True)
    trial_weights = work / "trial_weights.caffemodel"
    shutil.copyfile(weights_file, trial_weights)  # float weights until the first trial
    calibration_model = work / "calibration_model.prototxt"
    state: dict[str, Any] = {}

    def start(config_for, modified_file: Path, calibration_record: Path):
        prep = _prepare(net, weights_file, config, f"'{model_file}'")
        calib_config = config_for(prep.prepared)
        plan = build_plan(prep.prepared.layers, calib_config)
        modified = make_modified(prep.prepared.model, plan, calib_config, observed_tensors(plan, calib_config))
        write_pending_record(calibration_record, 0, calib_config.batch_num, list(plan.layers))
        write_prototxt(net, calibration_model)
        state["graph"] = CaffeGraph(str(model_file), str(weights_file), str(config_file), str(scale_offset_record_file),
                                    net, config, prep, modified)
        return prep.prepared, CalibrationSession(modified, calibration_record)

    def calibrate(session: CalibrationSession, run) -> None:
        with calibrating(calibration_model, session):
            run(str(calibration_model))
        if not session.complete:
            raise CalibrationError(
                f"eval_model() on the calibration pair ran {session.batches_seen} of batch_num={session.batch_num} "
                "batches through omct: open the model_file it is given with cv2.dnn.readNetFromCaffe or "
                "omct.caffe.Net (a Caffe process cannot feed omct's calibration) and run batch_num batches")

    def as_evaluated(fake_quant_onnx: Path) -> str:
        prep = state["graph"].prep
        trial_model = work / "trial_fake_quant_model.prototxt"
        write_quantized_caffe(net, prep.conversion, prep.folded, onnx.load(str(fake_quant_onnx)), trial_model,
                              trial_weights)
        return str(trial_model)

    def save(quantized: QuantizedModel, path: Path) -> None:
        save_quantized(state["graph"], quantized, "Both", path)

    target = NuqTarget(original=str(model_file), start=start, calibrate=calibrate, as_evaluated=as_evaluated,
                       feeds=lambda _prepared, kept: kept, prefix=prefix, weights_file=str(trial_weights),
                       inputs=inputs, save=save)
    return run_auto_nuq(target, evaluator, config_file, scale_offset_record_file, save_dir, ranking_memory_mb)
