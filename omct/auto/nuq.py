"""Automatic non-uniform quantization (AMCT's ``auto_nuq``), the flow every frontend shares.

The user's ``AutoNuqEvaluatorBase`` (AMCT's: ``eval_model(model_file, weights_file, batch_num)`` and
``is_satisfied(original_metric, new_metric)``) scores models; the frontend supplies a ``NuqTarget`` (what
``eval_model`` gets for the float model, the calibration model and each trial, and how a calibration starts).
Everything else is here:

1. evaluate the float model; ``is_satisfied(original, original)`` must hold;
2. one calibration: ``eval_model(calibration model, weights_file, batch_num)`` runs ``batch_num`` batches
   through a model that calibrates (every candidate layer's statistics, NUQ importance included);
3. all candidates at NUQ-16 (the smallest file): done if satisfied;
4. all uniform INT8: if even that does not satisfy, say so and write nothing;
5. rank the candidates by isolated sensitivity at NUQ-16 (the shared analysis, on the calibration inputs);
   binary-search the fewest most sensitive layers kept uniform (the rest NUQ-16);
6. among those, binary-search the fewest that must stay uniform when the others take NUQ-32.

Trials are built from the one calibration (records recomputed from its statistics, nothing recalibrated).
``eval_model`` is called at most ``2 * ceil(log2 N) + 4`` times for N candidate layers (calibration included).
The smallest satisfying trial wins. Writes ``record_file``, ``save_dir/final_config.json``,
``save_dir/nuq_search_record.json`` and the models; on failure nothing but the work folder's removal happens.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from omct.analysis import analyze
from omct.analysis.metrics import CosineSimilarity
from omct.core import nuq
from omct.errors import CalibrationError, OmctError
from omct.fileio import atomic_write_text, check_outputs
from omct.formats.config import QuantConfig, WeightQuantParams, load_config, save_config
from omct.formats.record import write_record
from omct.frontend import PreparedModel
from omct.graph.model_io import output_files, save_model
from omct.quantize import QuantizedModel
from omct.ui import logger

#: num_steps of a layer in a trial; None: uniform INT8
Steps = int | None


class AutoNuqEvaluatorBase(ABC):
    """AMCT's evaluator of automatic NUQ: subclass it and implement both methods.

    ``eval_model(model_file, weights_file, batch_num)`` returns one number, higher is better. What it gets:

    * ONNX frontend: ``model_file`` is an ONNX file path (the float model, then fake-quant trials) and
      ``weights_file`` None. Once, for calibration, it gets the calibration model: run ``batch_num`` batches
      through ``onnxruntime.InferenceSession(model_file)`` (omct hands back a ``CalibrationSession`` for that
      file: an evaluation loop over your validation data calibrates on its first ``batch_num`` batches, or test
      ``isinstance(session, omct.onnx.CalibrationSession)`` to feed calibration data instead; the metric
      returned then is not used).
    * PyTorch frontend: ``model_file`` is an nn.Module (your model, the calibration module, then fake-quant
      trials behind ``OnnxModule``) and ``weights_file`` None.

    ``is_satisfied(original_metric, new_metric)``: True when ``new_metric`` is good enough; it must accept
    the original metric itself.
    """

    @abstractmethod
    def eval_model(self, model_file: Any, weights_file: str | None, batch_num: int) -> float:
        """The metric of the model (one number, higher is better)."""

    @abstractmethod
    def is_satisfied(self, original_metric: float, new_metric: float) -> bool:
        """Whether ``new_metric`` meets your accuracy requirement."""


@dataclass
class NuqTarget:
    """A frontend's part in automatic NUQ."""

    original: Any  # what eval_model gets as model_file for the float model
    start: Callable[[Callable[[PreparedModel], QuantConfig], Path, Path], tuple[PreparedModel, Any]]
    # (config_for, modified-model path, record path) -> (prepared graph, calibration object: .calibration, .complete);
    # the modified model is planned with config_for(prepared graph)
    calibrate: Callable[[Any, Callable[[Any], float]], None]
    # (calibration object, run) : calls run(model_file) once, which is eval_model(model_file, weights_file, batch_num)
    as_evaluated: Callable[[Path], Any]  # a fake-quant ONNX file -> what eval_model gets as model_file
    feeds: Callable[[PreparedModel, list], list[dict]]  # kept calibration inputs -> feeds of the prepared graph
    prefix: str  # file name prefix of the final models in save_dir
    weights_file: str | None = None  # passed to every eval_model call (Caffe)
    inputs: dict = field(default_factory=dict)  # argument name -> input file, which no output may overwrite
    save: Callable[[QuantizedModel, Path], Any] | None = None  # writes the final models (default: QuantizedModel.save)


@dataclass
class NuqSearchResult:
    steps: dict[str, Steps]  # candidate layer -> num_steps (None: uniform INT8)
    metric: float
    original_metric: float
    weight_bytes: int  # the candidates' weights as stored (packed indices and tables, or INT8)
    float_weight_bytes: int
    evaluations: int  # eval_model calls, calibration included
    bound: int
    trials: list[dict] = field(default_factory=list)


def evaluation_bound(n: int) -> int:
    """The most eval_model calls automatic NUQ makes for ``n`` candidate layers (calibration included)."""
    return 2 * math.ceil(math.log2(max(n, 1))) + 4


def _metric(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise OmctError(f"eval_model() must return one number (higher is better), but for {what} it returned "
                        f"{type(value).__name__} {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise OmctError(f"eval_model() returned {number} for {what}; it must be a finite number")
    return number


def _check_evaluator(evaluator: Any) -> None:
    missing = [m for m in ("eval_model", "is_satisfied") if not callable(getattr(evaluator, m, None))]
    if missing:
        raise OmctError(f"evaluator lacks {', '.join(missing)}(); subclass omct.auto.AutoNuqEvaluatorBase")


def candidates(prepared: PreparedModel, config: QuantConfig) -> list[str]:
    """Enabled layers with weights that NUQ can take, in graph order."""
    out = []
    for spec in prepared.layers:
        layer = config.layers.get(spec.name)
        if layer is not None and layer.quant_enable and spec.weight is not None and not spec.nuq_refusal:
            out.append(spec.name)
    return out


def with_steps(config: QuantConfig, steps: dict[str, Steps], num_of_iteration: int = 1) -> QuantConfig:
    """``config`` with each layer of ``steps`` at NUQ ``num_steps`` (or uniform ARQ INT8 for None)."""
    layers = dict(config.layers)
    for name, k in steps.items():
        old = layers[name].weight_quant_params
        channel_wise = old.channel_wise if old is not None else True
        wts = (WeightQuantParams(num_bits=8, wts_algo="arq_quantize", channel_wise=channel_wise) if k is None else
               WeightQuantParams(num_bits=8, wts_algo="nuq_quantize", channel_wise=channel_wise, num_steps=k,
                                 num_of_iteration=num_of_iteration))
        layers[name] = layers[name].model_copy(update={"weight_quant_params": wts})
    return QuantConfig(config.globals, layers)


def weight_bytes(shapes: dict[str, tuple[tuple[int, ...], int | None]], steps: dict[str, Steps]) -> int:
    """Bytes the candidates' weights take in the deploy file: packed indices + level tables, or one byte each.
    ``shapes``: layer -> (weight shape, output-channel axis)."""
    tables = nuq.DEFAULT_TABLES  # the trials' configs (with_steps) keep the default
    return sum(nuq.stored_bytes(*shapes[n], k, tables) if k and nuq.worthwhile(*shapes[n], k, tables)
               else int(np.prod(shapes[n][0]))
               for n, k in steps.items())


def auto_nuq_outputs(save_dir: Path, prefix: str, record_file: str | os.PathLike) -> dict[str, Path | str | os.PathLike]:
    outs: dict[str, Path | str | os.PathLike] = {"record_file": record_file}
    outs.update({f"save_dir's {n}": save_dir / n for n in ("final_config.json", "nuq_search_record.json")})
    for m in ["nuq_work/modified.onnx", "nuq_work/trial_fake_quant_model.onnx"] + [
            f"{prefix}_{kind}_model.onnx" for kind in ("fake_quant", "deploy")]:
        outs.update(output_files(f"save_dir's {m}", save_dir / m))
    return outs


def run_auto_nuq(target: NuqTarget, evaluator: AutoNuqEvaluatorBase, config_file: str | os.PathLike,
                 record_file: str | os.PathLike, save_dir: str | os.PathLike, ranking_memory_mb: float = 256,
                 num_of_iteration: int | None = None) -> NuqSearchResult:
    """Search per-layer NUQ steps for the smallest weights that ``evaluator.is_satisfied`` accepts."""
    _check_evaluator(evaluator)
    save_dir = Path(save_dir)
    check_outputs({**target.inputs, "config_file": config_file}, auto_nuq_outputs(save_dir, target.prefix, record_file))
    config = load_config(config_file)
    work = save_dir / "nuq_work"
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _search(target, evaluator, config, record_file, save_dir, work, ranking_memory_mb, num_of_iteration)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _search(target: NuqTarget, evaluator: AutoNuqEvaluatorBase, config: QuantConfig, record_file, save_dir: Path,
            work: Path, ranking_memory_mb: float, num_of_iteration: int | None) -> NuqSearchResult:
    calls = 0

    def eval_model(model_file: Any, what: str) -> float:
        nonlocal calls
        calls += 1
        return _metric(evaluator.eval_model(model_file, target.weights_file, config.batch_num), what)

    original = eval_model(target.original, "the float model")
    if not evaluator.is_satisfied(original, original):
        raise OmctError(f"is_satisfied({original}, {original}) returned False: it must accept the original metric "
                        "itself (e.g. return (original_metric - new_metric) * 100 < 1)")
    logger.info("auto_nuq: float model metric %.6g", original)

    # one calibration, collecting every candidate's NUQ statistics
    names: list[str] = []
    iterations = 1 if num_of_iteration is None else num_of_iteration

    def calibration_config(prepared: PreparedModel) -> QuantConfig:
        nonlocal iterations
        names.extend(candidates(prepared, config))
        if not names:
            raise OmctError("auto_nuq: no enabled layer can take NUQ (Conv with a 4-D weight, group 1, dilation 1; "
                            "Gemm; MatMul with a 2-D weight); see `omct inspect`")
        first = config.layers[names[0]].weight_quant_params
        if num_of_iteration is None and first is not None and first.wts_algo == "nuq_quantize":
            iterations = first.__pydantic_extra__["num_of_iteration"]
        return with_steps(config, dict.fromkeys(names, 16), iterations)

    prepared, calibrating = target.start(calibration_config, work / "modified.onnx", work / "calibration_record.txt")
    kept = calibrating.calibration.keep_inputs_up_to(int(ranking_memory_mb * 2**20))
    calibrating.calibration.keep_statistics = True  # each trial's records come from them (``records_for``)

    def run(model_file: Any) -> float:
        return eval_model(model_file, "the calibration model")

    target.calibrate(calibrating, run)
    if not calibrating.complete:
        raise CalibrationError(f"eval_model() on the calibration model ran {calibrating.batches_seen} of "
                               f"batch_num={calibrating.batch_num} batches; it must run batch_num batches through "
                               "the model it is given")
    calibration = calibrating.calibration
    inits = {t.name: t for t in prepared.model.graph.initializer}
    spec_of = {s.name: s for s in prepared.layers}
    sizes = {n: (tuple(inits[spec_of[n].weight].dims), spec_of[n].weight_axis) for n in names}
    float_bytes = 4 * sum(int(np.prod(shape)) for shape, _ in sizes.values())
    n = len(names)
    bound = evaluation_bound(n)
    logger.info("auto_nuq: %d candidate layer(s); at most %d eval_model calls", n, bound)

    trials: list[dict] = []
    memo: dict[tuple, tuple[bool, float]] = {}
    best: dict[str, Any] = {}

    def build(steps: dict[str, Steps]) -> QuantizedModel:
        cfg = with_steps(config, steps, iterations)
        return QuantizedModel(prepared.model, prepared.layers, cfg, calibration.records_for(cfg), calibration.plan)

    def trial(steps: dict[str, Steps], label: str) -> bool:
        key = tuple(steps[k] for k in names)
        if key in memo:
            return memo[key][0]
        path = work / "trial_fake_quant_model.onnx"
        save_model(build(steps).fake_quant_model(), path)
        start = time.perf_counter()
        metric = eval_model(target.as_evaluated(path), f"trial '{label}'")
        ok = bool(evaluator.is_satisfied(original, metric))
        size = weight_bytes(sizes, steps)
        memo[key] = (ok, metric)
        counts = {str(k or "uniform"): sum(1 for v in steps.values() if v == k) for k in (16, 32, None)}
        trials.append({"trial": label, "metric": metric, "satisfied": ok, "weight_bytes": size,
                       "size_vs_float": size / float_bytes, "steps": {k: v or "uniform" for k, v in steps.items()},
                       "eval_seconds": round(time.perf_counter() - start, 3)})
        if ok and (not best or size < best["size"]):
            best.update(size=size, steps=dict(steps), metric=metric)
        logger.info("auto_nuq: %s: metric %.6g (%s), weights %.3fx of float (%s); best so far %s", label, metric,
                    "satisfied" if ok else "not satisfied", size / float_bytes,
                    ", ".join(f"{v} {k}" for k, v in counts.items() if v),
                    f"{best['size'] / float_bytes:.3f}x" if best else "none")
        return ok

    all16 = dict.fromkeys(names, 16)
    if not trial(all16, "all NUQ-16"):
        if not trial(dict.fromkeys(names, None), "all uniform INT8"):
            raise OmctError(f"auto_nuq: even uniform INT8 weights on every layer do not satisfy is_satisfied (metric "
                            f"{memo[tuple([None] * n)][1]:.6g} vs float {original:.6g}); nothing written. Keep sensitive "
                            "layers in float (skip_layers) or use accuracy_based_auto_calibration")
        feeds = target.feeds(prepared, kept.kept)
        report = analyze(prepared.model, build(all16).fake_quant_model(), feeds, batch_count=len(feeds))
        order = [layer for layer, _ in report.ranking(CosineSimilarity()) if layer in sizes]
        order += [layer for layer in names if layer not in order]

        def top(k: int, inner: Steps, j: int = 0, middle: Steps = None) -> dict[str, Steps]:
            """The j most sensitive uniform, the next up to k at ``middle``, the k.. rest at ``inner``."""
            return {name: (None if r < j else middle if r < k else inner) for r, name in enumerate(order)}

        lo, hi = 0, n  # top-lo uniform fails (all NUQ-16), top-hi uniform satisfies (all uniform)
        while hi - lo > 1 and calls < bound:
            mid = (lo + hi) // 2
            if trial(top(mid, 16, mid), f"{mid} most sensitive uniform, rest NUQ-16"):
                hi = mid
            else:
                lo = mid
        k = hi
        lo, hi = -1, k  # among the top k: the fewest uniform with the others at NUQ-32
        while hi - lo > 1 and calls < bound:
            mid = (lo + hi) // 2
            if trial(top(k, 16, mid, 32), f"{mid} most sensitive uniform, next {k - mid} NUQ-32, rest NUQ-16"):
                hi = mid
            else:
                lo = mid
    final = build(best["steps"])
    save_config(final.config, save_dir / "final_config.json")
    write_record(record_file, final.records)
    (target.save or (lambda q, p: q.save(p)))(final, save_dir / target.prefix)
    result = NuqSearchResult({k: best["steps"][k] for k in names}, best["metric"], original, best["size"], float_bytes,
                             calls, bound, trials)
    atomic_write_text(save_dir / "nuq_search_record.json", json.dumps({
        "original_metric": original, "final_metric": result.metric, "eval_model_calls": calls, "bound": bound,
        "candidates": names, "weight_bytes": result.weight_bytes, "float_weight_bytes": float_bytes,
        "final_steps": {k: v or "uniform" for k, v in result.steps.items()}, "trials": trials}, indent=2) + "\n")
    logger.info("auto_nuq: chose weights %.3fx of float (metric %.6g vs float %.6g) after %d eval_model calls; wrote %s",
                result.weight_bytes / float_bytes, result.metric, original, calls, save_dir / "nuq_search_record.json")
    return result
