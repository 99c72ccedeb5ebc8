"""Accuracy-based automatic quantization: layers fall back to float until the user's metric is met.

    from omct.auto import AutoCalibrationEvaluatorBase
    omct.onnx.accuracy_based_auto_calibration(model_file, evaluator, config_file, record_file, save_dir)
    omct.pytorch.accuracy_based_auto_calibration(model, evaluator, config_file, record_file, save_dir, input_data)

Automatic NUQ (the smallest weights that still meet the user's requirement):

    from omct.auto import AutoNuqEvaluatorBase
    omct.onnx.auto_nuq(model_file, evaluator, config_file, record_file, save_dir)
    omct.pytorch.auto_nuq(model, evaluator, config_file, record_file, save_dir, input_data)
"""

from omct.analysis.metrics import MSE, CosineSimilarity, Sensitivity
from omct.auto.evaluator import AutoCalibrationEvaluatorBase
from omct.auto.nuq import AutoNuqEvaluatorBase, NuqSearchResult, NuqTarget, run_auto_nuq
from omct.auto.search import SearchResult
from omct.auto.strategy import BinarySearch, Greedy, SearchStrategy

__all__ = ["MSE", "AutoCalibrationEvaluatorBase", "AutoNuqEvaluatorBase", "BinarySearch", "CosineSimilarity", "Greedy",
           "NuqSearchResult", "NuqTarget", "SearchResult", "SearchStrategy", "Sensitivity", "run_auto_nuq"]
