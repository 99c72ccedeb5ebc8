"""The keys omct stores in ONNX ``metadata_props``, in one place.

The modified (calibration) model carries its plan, config, added outputs and record file path, so that
``save_model`` and ``CalibrationSession`` need nothing else; saved models carry their layer list and
BatchNorm folding, so that ``omct analyze`` can line them up with the float model.
"""

from __future__ import annotations

import onnx

PLAN = "omct.plan"
CONFIG = "omct.config"
ADDED_OUTPUTS = "omct.calibration_outputs"
CARRIED = "omct.carried"  # tensors inside control-flow bodies carried out to outputs, and the nodes changed for it
RECORD_FILE = "omct.record_file"
MODEL_FILE = "omct.model_file"  # the model a modified model was made from: save_model must not overwrite it
LAYERS = "omct.layers"
FUSION = "omct.fusion"
PREFIX = "omct."


def read(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props}


def strip(model: onnx.ModelProto) -> None:
    """Remove every omct key (a model handed back to the user carries only its own metadata)."""
    keep = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
