import fractions
import re

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from singledir import corrupt_labels
from singledir.data import iter_batches
from singledir.datasets import load_split, stratified_split


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5, 0.73, 1.0])
def test_corrupt_labels_keeps_counts(fraction):
    labels = torch.randint(0, 10, (1001,))
    corrupted, mask = corrupt_labels(labels, fraction, seed=3)
    assert corrupted.dtype == labels.dtype
    assert mask.dtype == torch.bool
    assert int(mask.sum()) == int(np.floor(fraction * 1001 + 0.5))
    assert torch.equal(
        torch.bincount(corrupted, minlength=10), torch.bincount(labels, minlength=10)
    )
    assert torch.equal(corrupted[~mask], labels[~mask])
    assert torch.equal(
        torch.bincount(corrupted[mask], minlength=10),
        torch.bincount(labels[mask], minlength=10),
    )


def test_corrupt_labels_breaks_the_pattern():
    labels = np.repeat(np.arange(10), 100)
    corrupted, mask = corrupt_labels(labels, 1.0, seed=0)
    assert isinstance(corrupted, np.ndarray)
    assert mask.all()
    # A random permutation keeps about 1 in 10 labels; far fewer than all of them.
    assert 0.05 < np.mean(corrupted == labels) < 0.15


def test_corrupt_labels_rounds_half_up():
    _, mask = corrupt_labels(np.arange(5), 0.5, seed=0)
    assert mask.sum() == 3


def test_corrupt_labels_deterministic():
    labels = torch.randint(0, 5, (200,))
    first = corrupt_labels(labels, 0.4, seed=9)
    second = corrupt_labels(labels, 0.4, seed=9)
    other = corrupt_labels(labels, 0.4, seed=10)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize(
    "fraction",
    [
        -0.1,
        1.5,
        np.float32(1.5),
        torch.tensor(-0.5),
        float("nan"),
        np.float64("nan"),
        True,
        np.bool_(True),
        torch.tensor(True),
        "0.5",
        [0.5],
        np.array([0.5]),
        torch.tensor([0.5]),
        None,
    ],
)
def test_corrupt_labels_fraction_rejected(fraction):
    message = (
        f"Expected fraction to be a number in the [0, 1] range, but got {fraction!r}. "
        "Pass the fraction of examples to corrupt, such as 0.5."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        corrupt_labels(torch.zeros(10, dtype=torch.long), fraction, seed=0)


@pytest.mark.parametrize(
    "fraction",
    [
        0.5,
        np.float32(0.5),
        np.float64(0.5),
        np.array(0.5),
        torch.tensor(0.5),
        torch.tensor(0.5, dtype=torch.float64),
        fractions.Fraction(1, 2),
    ],
)
def test_corrupt_labels_accepts_real_scalars(fraction):
    labels = torch.arange(10)
    corrupted, mask = corrupt_labels(labels, fraction, seed=4)
    expected, expected_mask = corrupt_labels(labels, 0.5, seed=4)
    assert torch.equal(mask, expected_mask)
    assert torch.equal(corrupted, expected)


@pytest.mark.parametrize("fraction", [0, 1, np.int64(1), torch.tensor(0)])
def test_corrupt_labels_accepts_integer_ends(fraction):
    _, mask = corrupt_labels(np.arange(6), fraction, seed=0)
    assert mask.sum() == 6 * int(fraction)


def test_corrupt_labels_rejects_2d():
    message = "Expected labels of shape (n,), but got shape (2, 3). Pass one class label per example."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        corrupt_labels(np.zeros((2, 3)), 0.5, seed=0)


def test_iter_batches_covers_every_example():
    inputs = torch.arange(10).float().unsqueeze(1)
    targets = torch.arange(10)
    batches = list(iter_batches((inputs, targets), batch_size=4))
    assert [len(t) for _, t in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([t for _, t in batches]), targets)
    from_dataset = list(iter_batches(TensorDataset(inputs, targets), batch_size=3))
    assert torch.equal(torch.cat([t for _, t in from_dataset]), targets)


def test_iter_batches_rejects_bad_batches():
    class Triples(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, index):
            return torch.zeros(2), 0, "extra"

    message = (
        "Expected each batch to be an (inputs, targets) pair, but got a list of 3 "
        "elements. Make the dataset return (input, target)."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        list(iter_batches(Triples()))


def test_iter_batches_mismatched_loader_batch():
    class Mismatched(Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return torch.zeros(3, 2), torch.zeros(2, dtype=torch.long)

    loader = DataLoader(Mismatched(), batch_size=None)
    message = (
        "Targets do not match the inputs: a batch has 3 inputs but 2 targets. Pass one "
        "target per input."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        list(iter_batches(loader))


def test_iter_batches_rejects_other_types():
    message = (
        "Expected data to be a DataLoader, a Dataset or an (inputs, targets) pair of "
        "tensors, but got str."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        list(iter_batches("train.csv"))


def test_stratified_split_keeps_class_balance():
    targets = np.repeat(np.arange(10), 50)
    train, test = stratified_split(targets, test_size=100, seed=0)
    assert len(train) == 400
    assert len(test) == 100
    assert np.intersect1d(train, test).size == 0
    assert np.bincount(targets[test]).tolist() == [10] * 10


def test_bundled_mnist_split():
    split = load_split("mnist-subset", test_size=1000, seed=0)
    assert split.train_inputs.shape == (4000, 1, 28, 28)
    assert split.test_inputs.shape == (1000, 1, 28, 28)
    assert torch.bincount(split.train_targets).tolist() == [400] * 10
    assert float(split.train_inputs.max()) == 1.0
    assert float(split.train_inputs.min()) == 0.0
    again = load_split("mnist-subset", test_size=1000, seed=0)
    assert torch.equal(split.test_inputs, again.test_inputs)


def test_unknown_dataset():
    message = (
        "Unknown dataset 'cifar'. Choose one of: mnist-subset, digits, mnist1d, mnist, "
        "cifar10, imagenet."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_split("cifar")


def test_corrupt_labels_rounding_float_error():
    # 0.29 * 50 is 14.499999999999998 in floating point.
    _, mask = corrupt_labels(np.arange(50), 0.29, seed=0)
    assert mask.sum() == 15


def test_iter_batches_loader_without_batch_size():
    loader = DataLoader(
        TensorDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long)),
        batch_size=None,
    )
    message = (
        "Expected batches of targets with a batch dimension, but got a single target. "
        "Give the DataLoader a batch_size, not batch_size=None."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        list(iter_batches(loader))
