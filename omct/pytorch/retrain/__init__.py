"""Quantization-aware training (AMCT's retrain) for PyTorch: learned fake quantization, its record and export."""

from omct.pytorch.retrain.api import (
    create_quant_retrain_config,
    create_quant_retrain_model,
    restore_quant_retrain_model,
    save_quant_retrain_model,
)
from omct.pytorch.retrain.model import QuantRetrainModel

__all__ = ["QuantRetrainModel", "create_quant_retrain_config", "create_quant_retrain_model",
           "restore_quant_retrain_model", "save_quant_retrain_model"]
