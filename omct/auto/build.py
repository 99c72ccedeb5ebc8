"""Fake-quant and deploy models for "these layers in float", from one calibration: the record already holds
every layer's factors, so a trial only re-plans and re-exports (no new calibration)."""

from __future__ import annotations

from pathlib import Path

import onnx

from omct.auto.search import with_float_layers
from omct.formats.config import QuantConfig, save_config
from omct.graph.layers import LayerSpec
from omct.graph.model_io import save_model
from omct.graph.modified import save_quantized
from omct.graph.workflow import write_modified_model
from omct.ui import logger


class TrialBuilder:
    def __init__(self, config: QuantConfig, base: onnx.ModelProto, layers: list[LayerSpec], modified_file: Path,
                 record_file: Path, work: Path):
        self.config, self.base, self.layers = config, base, layers
        self.modified_file, self.record_file, self.work = Path(modified_file), Path(record_file), Path(work)

    def build(self, float_layers: set[str], prefix: Path) -> Path:
        """Write ``{prefix}_fake_quant_model.onnx`` and ``_deploy_model.onnx``; returns the fake-quant path."""
        if not float_layers:
            save_quantized(self.modified_file, self.record_file, prefix)
        elif set(self.config.enabled_layers()) <= float_layers:  # every layer in float: the float model itself
            for kind in ("fake_quant", "deploy"):
                save_model(self.base, f"{prefix}_{kind}_model.onnx")
        else:
            trial = with_float_layers(self.config, float_layers)
            trial_file = self.work / "trial_config.json"
            save_config(trial, trial_file)
            mod_file = self.work / "trial_modified.onnx"
            write_modified_model(trial, trial_file, self.base, self.layers, mod_file, self.work / "trial_pending_record.txt")
            save_quantized(mod_file, self.record_file, prefix)
        return Path(f"{prefix}_fake_quant_model.onnx")


class InputKeeper:
    """Calibration inputs kept for the sensitivity ranking, up to a memory budget (later batches are dropped)."""

    def __init__(self, limit_bytes: int):
        self.kept: list = []
        self._room = limit_bytes

    def offer(self, nbytes: int, copy) -> None:
        """Keep ``copy()`` if ``nbytes`` still fit; ``copy`` is only called then."""
        if nbytes <= self._room:
            self.kept.append(copy())
            self._room -= nbytes

    def report(self, batch_num: int, limit_mb: float) -> None:
        if len(self.kept) < batch_num:
            logger.info("ranking on the first %d calibration batch(es) (ranking_memory_mb=%g)", len(self.kept), limit_mb)
