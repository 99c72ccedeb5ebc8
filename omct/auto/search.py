"""Accuracy-based automatic quantization, the part both frontends share.

The frontend supplies three callables (evaluate a model, build the fake-quant/deploy models for a set of
float layers, rank layers by sensitivity); this module runs the search, keeps the user informed, and writes
``ranking_information.json``, ``final_config.json`` and ``search_record.json`` into ``save_dir``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omct.analysis.metrics import SENSITIVITIES, Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase, checked_metric, checked_verdict
from omct.auto.strategy import STRATEGIES, SearchStrategy
from omct.errors import OmctError, QuantizationError
from omct.fileio import atomic_write_text
from omct.formats.config import QuantConfig, save_config
from omct.graph.plan import with_float_layers
from omct.ui import logger


def resolve_strategy(strategy: str | SearchStrategy) -> SearchStrategy:
    if isinstance(strategy, SearchStrategy):
        return strategy
    if strategy not in STRATEGIES:
        raise OmctError(f"strategy '{strategy}' is unknown; use one of {sorted(STRATEGIES)} or a SearchStrategy instance")
    return STRATEGIES[strategy]()


def resolve_sensitivity(sensitivity: str | Sensitivity) -> Sensitivity:
    if isinstance(sensitivity, Sensitivity):
        return sensitivity
    if sensitivity not in SENSITIVITIES:
        raise OmctError(f"sensitivity '{sensitivity}' is unknown; use one of {sorted(SENSITIVITIES)} or a Sensitivity "
                        "instance")
    return SENSITIVITIES[sensitivity]()


def check_evaluator(evaluator: Any) -> None:
    missing = [m for m in ("calibration", "evaluate", "metric_eval") if not callable(getattr(evaluator, m, None))]
    if missing:
        raise OmctError(f"model_evaluator lacks {', '.join(missing)}(); subclass omct.auto.AutoCalibrationEvaluatorBase")


@dataclass
class SearchResult:
    float_layers: list[str]
    metric: float
    original_metric: float
    evaluations: list[dict] = field(default_factory=list)
    ranking: list[tuple[str, float]] = field(default_factory=list)


def search(evaluator: AutoCalibrationEvaluatorBase, original_metric: float, config: QuantConfig, save_dir: Path,
           evaluate_float_layers: Callable[[set[str]], float], rank: Callable[[Sensitivity], list[tuple[str, float]]],
           strategy: str | SearchStrategy, sensitivity: str | Sensitivity,
           quantized: list[str] | None = None) -> SearchResult:
    """Evaluate the fully quantized model, then let the strategy roll layers back to float until the metric
    is met. ``evaluate_float_layers(layers)`` builds the models with those layers in float and evaluates.
    ``quantized``: the layers the fully quantized model really quantizes (its plan), which the "N of M layers"
    messages and ``all_float`` count; a config may enable more (a chain op between float tensors, a layer that
    a frontend's export keeps float). Default: the config's enabled layers."""
    strat, sens = resolve_strategy(strategy), resolve_sensitivity(sensitivity)
    layers = config.enabled_layers() if quantized is None else list(quantized)
    counted = set(layers)
    evaluations: list[dict] = []
    cache: dict[frozenset, tuple[float, bool, float]] = {}

    def run(float_layers: set[str]) -> tuple[bool, float]:
        key = frozenset(float_layers)
        if key not in cache:
            t = time.perf_counter()
            metric = checked_metric(evaluate_float_layers(float_layers),
                                    f"the fake-quant model with {len(float_layers)} layer(s) in float")
            ok, loss = checked_verdict(evaluator.metric_eval(original_metric, metric))
            cache[key] = (metric, ok, loss)
            evaluations.append({"float_layers": sorted(float_layers), "metric": metric, "ok": ok, "loss": loss,
                                "seconds": round(time.perf_counter() - t, 3)})
            passing = [e for e in evaluations if e["ok"]]
            best = min(passing, key=lambda e: len(e["float_layers"])) if passing else None
            logger.info("evaluation %d: %d of %d layers in float -> metric %.6g (%s, loss %.4g); best so far: %s",
                        len(evaluations), len(float_layers & counted), len(layers), metric, "ok" if ok else "not ok",
                        loss, f"{len(set(best['float_layers']) & counted)} in float, metric {best['metric']:.6g}"
                        if best else "none ok yet")
        metric, ok, loss = cache[key]
        return ok, loss

    verdict = run(set())
    ranking: list[tuple[str, float]] = []
    if verdict[0]:
        final: set[str] = set()
    else:
        ranking = rank(sens)
        atomic_write_text(save_dir / "ranking_information.json",
                          json.dumps({"sensitivity": sens.name, "most_sensitive_first": [
                              {"layer": n, "score": s} for n, s in ranking]}, indent=2))
        logger.info("most sensitive layers (%s): %s", sens.name, ", ".join(n for n, _ in ranking[:5]))
        strat.initialize(ranking)
        step = strat.update_quant_config(verdict)
        while not step["stop_flag"]:
            verdict = run({n for n, back in step["roll_back_config"].items() if back})
            step = strat.update_quant_config(verdict)
        final = {n for n, back in step["roll_back_config"].items() if back}
        if not run(final)[0]:  # only evaluates when the strategy stopped on an untried configuration
            got = cache[frozenset(final)][0]
            raise QuantizationError(
                f"even with {len(final & counted)} of {len(layers)} layers in float the metric is not met ({got:.6g} vs original "
                f"{original_metric:.6g}); no model written. Check metric_eval, or the calibration data")
    metric = cache[frozenset(final)][0]
    save_config(with_float_layers(config, final), save_dir / "final_config.json")
    atomic_write_text(save_dir / "search_record.json", json.dumps({
        "original_metric": original_metric, "strategy": type(strat).__name__, "sensitivity": sens.name,
        "evaluations": evaluations, "final_float_layers": sorted(final), "final_metric": metric,
        "all_float": bool(layers) and final >= set(layers)}, indent=2))
    logger.info("done after %d evaluation(s) of quantized models: %d of %d layers in float, metric %.6g (original %.6g)",
                len(evaluations), len(final & counted), len(layers), metric, original_metric)
    if layers and final >= set(layers):
        logger.warning("WARNING: the search ended with every layer (%d of %d) in float: no quantized layer keeps the "
                       "metric within its target, so the saved '_deploy_model.onnx' is the float model, not a quantized "
                       "one. Check metric_eval (max_loss), the calibration data, or run omct analyze on a fully "
                       "quantized model", len(final & counted), len(layers))
    return SearchResult(sorted(final), metric, original_metric, evaluations, ranking)


def measure_original(evaluator: AutoCalibrationEvaluatorBase, model: Any) -> float:
    """The float model's metric, checked against the evaluator's own rule."""
    metric = checked_metric(evaluator.evaluate(model), "the float model")
    ok, loss = checked_verdict(evaluator.metric_eval(metric, metric))
    if not ok:
        raise OmctError(f"metric_eval(original, original) says not ok (loss {loss:g}): the float model must pass its "
                        "own test; check metric_eval")
    logger.info("float model: metric %.6g", metric)
    return metric
