"""Per-layer quantization error analysis (``omct analyze``) and the sensitivities automatic quantization ranks by."""

from omct.analysis.compare import AnalysisReport, LayerError, analyze
from omct.analysis.metrics import MSE, SENSITIVITIES, CosineSimilarity, ErrorStats, Sensitivity

__all__ = ["MSE", "SENSITIVITIES", "AnalysisReport", "CosineSimilarity", "ErrorStats", "LayerError", "Sensitivity",
           "analyze"]
