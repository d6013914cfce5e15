"""Experiments of Morcos et al. (ICLR 2018), each writing a folder of results.

Every experiment takes a config dataclass whose defaults finish in minutes on a CPU with
the bundled MNIST digits, and whose ``paper()`` class method gives the paper's settings.
"""

from singledir.experiments.batchnorm import BatchNormConfig, run_batchnorm
from singledir.experiments.corrupted_labels import (
    CorruptedLabelsConfig,
    run_corrupted_labels,
)
from singledir.experiments.dropout import DropoutConfig, run_dropout
from singledir.experiments.ensemble import EnsembleConfig, run_ensemble
from singledir.experiments.over_training import OverTrainingConfig, run_over_training

__all__ = [
    "BatchNormConfig",
    "CorruptedLabelsConfig",
    "DropoutConfig",
    "EnsembleConfig",
    "OverTrainingConfig",
    "run_batchnorm",
    "run_corrupted_labels",
    "run_dropout",
    "run_ensemble",
    "run_over_training",
]
