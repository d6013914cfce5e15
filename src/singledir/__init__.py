"""singledir: how much a trained network relies on single directions.

A single direction is the activation of one unit of an MLP or one feature map of a conv
net. ``ablation_curve`` clamps more and more of them to a fixed value and records the
score, following Morcos et al., "On the importance of single directions for
generalization" (ICLR 2018).
"""

from singledir import models
from singledir.ablation import ablate
from singledir.curve import ablation_curve
from singledir.curve_result import AblationCurve, normalized_auc
from singledir.data import corrupt_labels
from singledir.importance import unit_importance
from singledir.layers import ACTIVATION_TYPES, LayerInfo, find_layers, unit_name
from singledir.means import unit_means
from singledir.training import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "ACTIVATION_TYPES",
    "AblationCurve",
    "LayerInfo",
    "TrainConfig",
    "ablate",
    "ablation_curve",
    "corrupt_labels",
    "find_layers",
    "models",
    "normalized_auc",
    "train",
    "unit_importance",
    "unit_means",
    "unit_name",
]
