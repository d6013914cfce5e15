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


#: Output channels and strides of the 11 conv layers of the CIFAR-10 network of
#: Morcos et al. (ICLR 2018). Every kernel is 3x3 with padding 1.
CNN11_CHANNELS = (64, 64, 128, 128, 128, 256, 256, 256, 512, 512, 512)
CNN11_STRIDES = (1, 1, 2, 1, 1, 2, 1, 1, 2, 1, 1)


def cnn11(
    in_channels: int = 3,
    classes: int = 10,
    width: float = 1.0,
    batch_norm: bool = True,
    image_size: int = 32,
) -> nn.Sequential:
    """Build the 11-layer conv net of the CIFAR-10 experiments, with named modules.

    Conv layer i (from 1) is ``conv{i}``, then ``bn{i}`` if ``batch_norm``, then
    ``relu{i}``. Then come ``flatten``, a 256-unit ``fc`` with ``fc_relu``, and the
    ``out`` layer. The ablatable layers of the method are the feature maps of the last
    three conv layers: ``relu9``, ``relu10`` and ``relu11`` (see ``CNN11_LAYERS``).

    Args:
        in_channels: Channels of the input images (3 for CIFAR-10, 1 for MNIST).
        classes: Number of outputs.
        width: Multiplier of every conv layer's channel count (rounded, at least 1), so
            that narrow versions train on a CPU. Default 1.0, the published widths.
        batch_norm: Put BatchNorm2d after each conv and before its ReLU. Default True.
        image_size: Height and width of the input images in pixels. Default 32.
    """
    if width <= 0:
        raise ValueError(f"Expected width to be a positive float, but got {width!r}.")
    layers: list[tuple[str, nn.Module]] = []
    channels_in = in_channels
    size = image_size
    for index, (channels, stride) in enumerate(
        zip(CNN11_CHANNELS, CNN11_STRIDES), start=1
    ):
        channels_out = max(1, round(channels * width))
        conv = nn.Conv2d(
            channels_in, channels_out, 3, stride=stride, padding=1, bias=not batch_norm
        )
        layers.append((f"conv{index}", conv))
        if batch_norm:
            layers.append((f"bn{index}", nn.BatchNorm2d(channels_out)))
        layers.append((f"relu{index}", nn.ReLU()))
        channels_in = channels_out
        size = (size + 2 - 3) // stride + 1
    layers.append(("flatten", nn.Flatten()))
    layers.append(("fc", nn.Linear(channels_in * size * size, 256)))
    layers.append(("fc_relu", nn.ReLU()))
    layers.append(("out", nn.Linear(256, classes)))
    return nn.Sequential(OrderedDict(layers))


#: Layers ablated in conv nets by default: the last three conv layers' feature maps.
CNN11_LAYERS = ("relu9", "relu10", "relu11")
