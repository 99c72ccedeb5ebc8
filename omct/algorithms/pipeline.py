"""The algorithms of post-training quantization, in the order they fill the records."""

from __future__ import annotations

from omct.algorithms.activations import ActivationRanges
from omct.algorithms.adaround import AdaRound
from omct.algorithms.balance import DMQBalancer
from omct.algorithms.base import Algorithm
from omct.algorithms.bias_correction import BiasCorrection
from omct.algorithms.nuq_assignment import NuqAssignment
from omct.algorithms.weights import WeightQuantization

#: Later algorithms read what earlier ones wrote (the balancer replaces a balanced layer's input range and sets the
#: factors the weight quantization applies; AdaRound rounds with its scales; bias correction corrects the weights
#: as rounded; NUQ's output-aware assignment needs the levels the weight quantization chose).
PIPELINE: tuple[Algorithm, ...] = (ActivationRanges(), DMQBalancer(), WeightQuantization(), NuqAssignment(), AdaRound(),
                                      BiasCorrection())
