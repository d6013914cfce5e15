import dataclasses
import re

import pytest

from singledir.experiments import CorruptedLabelsConfig

# One invalid setting per case, with every other setting at its default.
REJECTED = [
    (
        {"fractions": ()},
        "Expected at least one value in fractions, but got none. Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
    ),
    (
        {"fractions": (0.0, 0.5, 0.5)},
        "Expected distinct values in fractions, but got [0.0, 0.5, 0.5]. Pass each value once.",
    ),
    (
        {"fractions": (0.0, 1.5)},
        "Expected every value in fractions to be in the [0, 1] range, but got 1.5. Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
    ),
    (
        {"fractions": (-0.2,)},
        "Expected every value in fractions to be in the [0, 1] range, but got -0.2. Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
    ),
    (
        {"fractions": (float("nan"),)},
        "Expected every value in fractions to be in the [0, 1] range, but got nan. Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
    ),
    (
        {"hidden": ()},
        "Expected hidden to be one or more positive layer widths, but got (). Pass widths such as (512, 512).",
    ),
    (
        {"hidden": (512, 0)},
        "Expected hidden to be one or more positive layer widths, but got (512, 0). Pass widths such as (512, 512).",
    ),
    (
        {"dataset": "cifar"},
        "Unknown dataset 'cifar'. Choose one of: mnist-subset, digits, mnist1d, mnist, cifar10, imagenet.",
    ),
    (
        {"orderings": 0},
        "Expected orderings to be at least 1, but got 0. Pass a positive number of orderings, such as 10.",
    ),
    (
        {"points": 1},
        "Expected points to be at least 2, but got 1. Pass at least 2, so that the curve covers both no units and all units ablated.",
    ),
    (
        {"test_size": 0},
        "Expected test_size to be None or at least 1, but got 0. Pass the number of examples to hold out, or None for the dataset's default.",
    ),
    (
        {"train_size": 0},
        "Expected train_size to be None or at least 1, but got 0. Pass None to train on the whole training split.",
    ),
    (
        {"epochs": 0},
        "Expected epochs to be at least 1, but got 0. Pass a positive number of epochs, such as 100.",
    ),
    (
        {"target_train_accuracy": 0.0},
        "Expected the target training accuracy to be in the (0, 1] range, but got 0.0. Pass an accuracy such as 0.99, or None to train every epoch.",
    ),
    (
        {"target_train_accuracy": 1.5},
        "Expected the target training accuracy to be in the (0, 1] range, but got 1.5. Pass an accuracy such as 0.99, or None to train every epoch.",
    ),
    (
        {"batch_size": 0},
        "Expected batch_size to be at least 1, but got 0. Pass a positive training batch size, such as 128.",
    ),
    (
        {"lr": 0.0},
        "Expected lr to be a positive finite number, but got 0.0. Pass a learning rate such as 0.001.",
    ),
    (
        {"lr": float("inf")},
        "Expected lr to be a positive finite number, but got inf. Pass a learning rate such as 0.001.",
    ),
    (
        {"width": 0.0},
        "Expected width to be a positive number, but got 0.0. Pass a multiplier such as 0.5.",
    ),
    (
        {"model": "vgg99"},
        "Unknown model 'vgg99'. Pass one of mlp, cnn11, resnet50, or the name of any torchvision classification model, such as resnet18 or vgg11.",
    ),
    (
        {"metric": "top0"},
        "Unknown metric 'top0'. Pass 'accuracy', 'topK' for a positive integer K (such as 'top5'), or a callable that takes (logits, targets).",
    ),
    (
        {"measure_size": 0},
        "Expected measure_size to be None or at least 1, but got 0. Pass None to score the curves on the whole training split.",
    ),
    (
        {"device": "gpu"},
        "Unknown device 'gpu'. Pass auto, cpu, cuda or cuda:N.",
    ),
]


@pytest.mark.parametrize(("changes", "message"), REJECTED)
def test_config_validate_rejects(changes, message):
    config = CorruptedLabelsConfig(**changes)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config.validate()


def test_config_validate_accepts_defaults_and_edges():
    CorruptedLabelsConfig().validate()
    CorruptedLabelsConfig(
        fractions=(1.0, 0.0),
        hidden=(1,),
        orderings=1,
        points=2,
        test_size=1,
        train_size=1,
        epochs=1,
        target_train_accuracy=1.0,
        batch_size=1,
        lr=1e-9,
    ).validate()


def test_config_cases_cover_every_field():
    fields = {name for changes, _ in REJECTED for name in changes}
    unchecked = {"seed", "data_root"}
    assert fields | unchecked == {
        field.name for field in dataclasses.fields(CorruptedLabelsConfig)
    }
