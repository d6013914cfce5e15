import dataclasses
import re

import pytest

from singledir.experiments import CorruptedLabelsConfig

# One invalid setting per case, with every other setting at its default.
REJECTED = [
    (
        {"fractions": ()},
        (
            "Expected at least one corruption fraction, but got none. Pass fractions such "
            "as (0.0, 0.5, 1.0)."
        ),
    ),
    (
        {"fractions": (0.0, 0.5, 0.5)},
        (
            "Expected distinct corruption fractions, but got [0.0, 0.5, 0.5]. Pass each "
            "fraction once."
        ),
    ),
    (
        {"fractions": (0.0, 1.5)},
        (
            "Expected every corruption fraction to be in the [0, 1] range, but got 1.5. "
            "Pass fractions from 0 (no labels shuffled) to 1 (all shuffled)."
        ),
    ),
    (
        {"fractions": (-0.2,)},
        (
            "Expected every corruption fraction to be in the [0, 1] range, but got -0.2. "
            "Pass fractions from 0 (no labels shuffled) to 1 (all shuffled)."
        ),
    ),
    (
        {"fractions": (float("nan"),)},
        (
            "Expected every corruption fraction to be in the [0, 1] range, but got nan. "
            "Pass fractions from 0 (no labels shuffled) to 1 (all shuffled)."
        ),
    ),
    (
        {"hidden": ()},
        (
            "Expected hidden to be one or more positive layer widths, but got (). Pass "
            "widths such as (512, 512)."
        ),
    ),
    (
        {"hidden": (512, 0)},
        (
            "Expected hidden to be one or more positive layer widths, but got (512, 0). "
            "Pass widths such as (512, 512)."
        ),
    ),
    (
        {"dataset": "cifar"},
        "Unknown dataset 'cifar'. Choose one of: mnist-subset, digits.",
    ),
    (
        {"orderings": 0},
        (
            "Expected orderings to be at least 1, but got 0. Pass a positive number of "
            "orderings, such as 10."
        ),
    ),
    (
        {"points": 1},
        (
            "Expected points to be at least 2, but got 1. Pass at least 2, so that the "
            "curve covers both no units and all units ablated."
        ),
    ),
    (
        {"test_size": 0},
        (
            "Expected test_size to be at least 1, but got 0. Pass the number of examples "
            "to hold out, such as 1000."
        ),
    ),
    (
        {"train_size": 0},
        (
            "Expected train_size to be None or at least 1, but got 0. Pass None to train "
            "on the whole training split."
        ),
    ),
    (
        {"max_epochs": 0},
        (
            "Expected max_epochs to be at least 1, but got 0. Pass a positive number of "
            "epochs, such as 100."
        ),
    ),
    (
        {"target_train_accuracy": 0.0},
        (
            "Expected the target training accuracy to be in the (0, 1] range, but got 0.0. "
            "Pass an accuracy such as 0.99."
        ),
    ),
    (
        {"target_train_accuracy": 1.5},
        (
            "Expected the target training accuracy to be in the (0, 1] range, but got 1.5. "
            "Pass an accuracy such as 0.99."
        ),
    ),
    (
        {"batch_size": 0},
        (
            "Expected batch_size to be at least 1, but got 0. Pass a positive training "
            "batch size, such as 128."
        ),
    ),
    (
        {"lr": 0.0},
        (
            "Expected lr to be a positive finite number, but got 0.0. Pass a learning rate "
            "such as 0.001."
        ),
    ),
    (
        {"lr": float("inf")},
        (
            "Expected lr to be a positive finite number, but got inf. Pass a learning rate "
            "such as 0.001."
        ),
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
        max_epochs=1,
        target_train_accuracy=1.0,
        batch_size=1,
        lr=1e-9,
    ).validate()


def test_config_cases_cover_every_field():
    fields = {name for changes, _ in REJECTED for name in changes}
    unchecked = {"seed"}
    assert fields | unchecked == {
        field.name for field in dataclasses.fields(CorruptedLabelsConfig)
    }
