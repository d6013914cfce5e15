"""Models used in the experiments of Morcos et al. (ICLR 2018)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from torch import nn


def mlp(
    input_dim: int,
    hidden: Sequence[int] = (512, 512),
    classes: int = 10,
    dropout: float = 0.0,
    batch_norm: bool = False,
) -> nn.Sequential:
    """Build a multilayer perceptron with ReLU hidden layers and named modules.

    Layer i (from 1) is ``fc{i}``, then ``bn{i}`` if ``batch_norm``, then ``relu{i}``,
    then ``dropout{i}`` if ``dropout > 0``; the output layer is ``out``. Inputs are
    flattened first, so images of any shape work. The ablatable layers are the
    ``relu{i}`` modules, whose outputs are the hidden units.

    Args:
        input_dim: Number of input features after flattening (784 for MNIST).
        hidden: Width of each hidden layer. Default (512, 512).
        classes: Number of outputs. Default 10.
        dropout: Dropout probability after each hidden ReLU, in [0, 1). Default 0.
        batch_norm: Put BatchNorm1d between each hidden Linear and its ReLU.

    Example:
        >>> model = mlp(784, hidden=(512, 512))
        >>> [name for name, _ in model.named_children()]
        ['flatten', 'fc1', 'relu1', 'fc2', 'relu2', 'out']
    """
    for name, number in (("input_dim", input_dim), ("classes", classes)):
        if isinstance(number, bool) or not isinstance(number, int) or number < 1:
            raise ValueError(
                f"Expected {name} to be a positive integer, but got {number!r}."
            )
    hidden = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    if not hidden or any(
        isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in hidden
    ):
        raise ValueError(
            f"Expected hidden to be a non-empty sequence of positive integers, but got {hidden!r}."
        )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(
            f"Expected dropout to be a float in the [0, 1) range, but got {dropout!r}."
        )

    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width_in = input_dim
    for index, width in enumerate(hidden, start=1):
        layers.append((f"fc{index}", nn.Linear(width_in, width)))
        if batch_norm:
            layers.append((f"bn{index}", nn.BatchNorm1d(width)))
        layers.append((f"relu{index}", nn.ReLU()))
        if dropout > 0:
            layers.append((f"dropout{index}", nn.Dropout(dropout)))
        width_in = width
    layers.append(("out", nn.Linear(width_in, classes)))
    return nn.Sequential(OrderedDict(layers))
