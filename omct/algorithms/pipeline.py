"""The algorithms of post-training quantization, in the order they fill the records."""

from __future__ import annotations

from omct.algorithms.activations import ActivationRanges
from omct.algorithms.adaround import AdaRound
from omct.algorithms.base import Algorithm
from omct.algorithms.bias_correction import BiasCorrection
from omct.algorithms.weights import WeightQuantization

#: Later algorithms read what earlier ones wrote (AdaRound rounds with the weight quantization's scales; bias
#: correction corrects the weights as rounded).
PIPELINE: tuple[Algorithm, ...] = (ActivationRanges(), WeightQuantization(), AdaRound(), BiasCorrection())
