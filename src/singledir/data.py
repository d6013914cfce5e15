"""Data adapters and label corruption.

Measurements accept three forms of data: a ``DataLoader``, a map-style ``Dataset`` that
yields ``(input, target)`` pairs, or an ``(inputs, targets)`` pair of tensors. All three
are read in order, batch by batch, and every example counts once.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

logger = logging.getLogger(__name__)

DataSource = DataLoader | Dataset | tuple[Tensor, Tensor]


def _check_tensor_pair(inputs: Any, targets: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            "Expected data as an (inputs, targets) pair of tensors, but got "
            f"({type(inputs).__name__}, {type(targets).__name__}). Convert both with "
            "torch.as_tensor."
        )
    if inputs.dim() == 0 or targets.dim() == 0:
        raise ValueError(
            "Expected inputs and targets with a batch dimension, but got a scalar. "
            "Pass tensors whose first dimension indexes the examples."
        )
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"Targets do not match the inputs: {inputs.shape[0]} inputs but "
            f"{targets.shape[0]} targets. Pass one target per input."
        )
    return inputs, targets


def check_chunk_size(chunk_size: int) -> None:
    """Raise ValueError unless ``chunk_size`` is a positive integer."""
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, (int, np.integer))
        or chunk_size < 1
    ):
        raise ValueError(
            f"Expected chunk_size to be a positive integer, but got {chunk_size!r}. "
            "Pass the number of examples per forward pass, such as chunk_size=1024."
        )


def iter_batches(
    data: DataSource, batch_size: int = 256
) -> Iterator[tuple[Any, Tensor]]:
    """Yield ``(inputs, targets)`` batches from any supported data source, in order.

    Raises:
        ValueError: If the data is empty or targets do not match the inputs.
        TypeError: If a batch is not an ``(inputs, targets)`` pair.
    """
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, int)
        or batch_size < 1
    ):
        raise ValueError(
            f"Expected batch_size to be a positive integer, but got {batch_size!r}."
        )
    count = 0
    for inputs, targets in _raw_batches(data, batch_size):
        if targets.dim() == 0:
            raise ValueError(
                "Expected batches of targets with a batch dimension, but got a single "
                "target. Give the DataLoader a batch_size, not batch_size=None."
            )
        if isinstance(inputs, Tensor) and inputs.shape[0] != targets.shape[0]:
            raise ValueError(
                f"Targets do not match the inputs: a batch has {inputs.shape[0]} inputs "
                f"but {targets.shape[0]} targets. Pass one target per input."
            )
        count += targets.shape[0]
        yield inputs, targets
    if count == 0:
        raise ValueError("The dataset is empty. Pass data with at least one example.")


def warn_about_loader(data: DataSource) -> None:
    """Log a warning, once per measurement, if a DataLoader drops examples."""
    if isinstance(data, DataLoader) and data.drop_last:
        logger.warning(
            "The DataLoader has drop_last=True, so the examples of its last partial "
            "batch are left out of every score."
        )


def _raw_batches(data: DataSource, batch_size: int) -> Iterator[tuple[Any, Tensor]]:
    if (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and not isinstance(data, Dataset)
    ):
        inputs, targets = _check_tensor_pair(*data)
        for start in range(0, inputs.shape[0], batch_size):
            yield (
                inputs[start : start + batch_size],
                targets[start : start + batch_size],
            )
        return
    if isinstance(data, DataLoader):
        loader = data
    elif isinstance(data, Dataset):
        loader = DataLoader(
            data, batch_size=batch_size, shuffle=False, generator=torch.Generator()
        )
    else:
        raise TypeError(
            "Expected data to be a DataLoader, a Dataset or an (inputs, targets) pair of "
            f"tensors, but got {type(data).__name__}."
        )
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise TypeError(
                "Expected each batch to be an (inputs, targets) pair, but got "
                f"{_describe(batch)}. Make the dataset return (input, target)."
            )
        inputs, targets = batch
        yield inputs, torch.as_tensor(targets)


def _describe(batch: Any) -> str:
    if isinstance(batch, (tuple, list)):
        return f"a {type(batch).__name__} of {len(batch)} elements"
    return f"a {type(batch).__name__}"


def _real_scalar(value: Any) -> float | None:
    """Convert a real scalar to a float, or return None for anything else.

    Python and NumPy real numbers count, and so do 0-d arrays and tensors, but
    booleans do not.
    """
    if isinstance(value, (Tensor, np.ndarray)):
        if value.ndim != 0:
            return None
        # item() turns a boolean array or tensor into a bool, rejected below.
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _round_half_up(value: float) -> int:
    # The small margin absorbs float error such as 0.29 * 50 = 14.4999...
    return int(np.floor(value + 0.5 + 1e-9))


def corrupt_labels(
    labels: Tensor | np.ndarray, fraction: float, seed: int = 0
) -> tuple[Tensor | np.ndarray, Tensor | np.ndarray]:
    """Shuffle the labels of a random subset of examples among themselves.

    ``round(fraction * n)`` examples, rounded half up, are drawn without replacement and
    their labels are permuted among them, so the count of each label is unchanged while
    the link between input and label is broken. About one in ``num_classes`` of the
    drawn examples keeps its own label by chance.

    Args:
        labels: Class labels of shape (n,), a tensor or a NumPy array.
        fraction: Fraction of examples to corrupt, in [0, 1]: a Python or NumPy real
            number, or a 0-d array or tensor.
        seed: Seed of the dedicated NumPy generator that draws the subset and the
            permutation.

    Returns:
        The new labels, of the same type, dtype and device as ``labels``, and a boolean
        mask of shape (n,) that marks the drawn examples.

    Raises:
        ValueError: If ``fraction`` is not a real number in [0, 1] (booleans and NaN
            included) or ``labels`` is not 1-D.

    Example:
        >>> noisy, mask = corrupt_labels(torch.tensor([0, 1, 2, 3]), 0.5, seed=0)
    """
    number = _real_scalar(fraction)
    # The comparison is False for NaN, so NaN is rejected too.
    if number is None or not 0.0 <= number <= 1.0:
        raise ValueError(
            f"Expected fraction to be a number in the [0, 1] range, but got "
            f"{fraction!r}. Pass the fraction of examples to corrupt, such as 0.5."
        )
    array = (
        labels.detach().cpu().numpy()
        if isinstance(labels, Tensor)
        else np.asarray(labels)
    )
    if array.ndim != 1:
        raise ValueError(
            f"Expected labels of shape (n,), but got shape {tuple(array.shape)}. Pass one "
            "class label per example."
        )
    rng = np.random.default_rng(seed)
    count = _round_half_up(number * array.shape[0])
    chosen = np.sort(rng.choice(array.shape[0], size=count, replace=False))
    corrupted = array.copy()
    corrupted[chosen] = array[chosen[rng.permutation(count)]]
    mask = np.zeros(array.shape[0], dtype=bool)
    mask[chosen] = True
    if isinstance(labels, Tensor):
        new = torch.as_tensor(corrupted, dtype=labels.dtype, device=labels.device)
        return new, torch.as_tensor(mask, device=labels.device)
    return corrupted, mask
