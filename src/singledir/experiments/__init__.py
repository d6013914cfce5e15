"""Experiments of Morcos et al. (ICLR 2018), each writing a folder of results."""

from singledir.experiments.corrupted_labels import (
    CorruptedLabelsConfig,
    run_corrupted_labels,
)

__all__ = ["CorruptedLabelsConfig", "run_corrupted_labels"]
