"""Models of the experiments of Morcos et al. (ICLR 2018), and the layers they ablate.

``mlp`` and ``cnn11`` build the MNIST and CIFAR-10 networks of the paper, and
``torchvision_classifier`` builds any torchvision classification model, such as the
ResNet-50 of its ImageNet experiments, with random weights. ``build_model`` picks one by
name for the experiments, ``load_weights`` loads a saved ``state_dict`` into it, and
``default_layers`` and ``default_metric`` give the layers and score the method uses for
it. Nothing here downloads weights: torchvision models are always built with
``weights=None``.
"""

from __future__ import annotations

import logging
import math
import pickle
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from singledir._model_state import preserved_mode, preserved_rng, registered_hooks
from singledir._outputs import call_model
from singledir.layers import ACTIVATION_TYPES

logger = logging.getLogger(__name__)

#: Model names that ``build_model`` offers by name. Any other torchvision
#: classification model name works too.
MODELS = ("mlp", "cnn11", "resnet50")


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
    image_size: int | tuple[int, int] = 32,
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
        image_size: Size of the input images in pixels: one int for square images, or
            a (height, width) pair. Default 32.

    Example:
        >>> model = cnn11(in_channels=1, width=0.25, image_size=(20, 28))
        >>> model(torch.zeros(2, 1, 20, 28)).shape
        torch.Size([2, 10])
    """
    if width <= 0:
        raise ValueError(f"Expected width to be a positive float, but got {width!r}.")
    height, width_pixels = _image_sides(image_size)
    layers: list[tuple[str, nn.Module]] = []
    channels_in = in_channels
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
        # Output size of a 3x3 convolution with padding 1, for each side.
        height = (height + 2 - 3) // stride + 1
        width_pixels = (width_pixels + 2 - 3) // stride + 1
    layers.append(("flatten", nn.Flatten()))
    layers.append(("fc", nn.Linear(channels_in * height * width_pixels, 256)))
    layers.append(("fc_relu", nn.ReLU()))
    layers.append(("out", nn.Linear(256, classes)))
    return nn.Sequential(OrderedDict(layers))


#: Layers ablated in conv nets by default: the last three conv layers' feature maps.
CNN11_LAYERS = ("relu9", "relu10", "relu11")


def _image_sides(image_size: int | Sequence[int]) -> tuple[int, int]:
    """Return (height, width) of ``image_size``, an int or a pair of positive ints."""
    sides = (image_size, image_size) if isinstance(image_size, int) else image_size
    if (
        isinstance(image_size, bool)
        or not isinstance(sides, Sequence)
        or len(sides) != 2
        or any(isinstance(side, bool) or not isinstance(side, int) for side in sides)
        or min(sides) < 1
    ):
        raise ValueError(
            "Expected image_size to be a positive integer or a (height, width) pair of "
            f"positive integers, but got {image_size!r}."
        )
    return sides[0], sides[1]


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    classes: int,
    *,
    width: float = 1.0,
    hidden: Sequence[int] = (512, 512),
    dropout: float = 0.0,
    batch_norm: bool | None = None,
) -> nn.Module:
    """Build a model by name for inputs of one shape, with random weights.

    Args:
        name: ``"mlp"``, ``"cnn11"`` or the name of any torchvision classification
            model, such as ``"resnet50"``, ``"resnet18"`` or ``"vgg11"``.
        input_shape: Shape of one input without the batch dimension: (features,) or
            (channels, height, width). The mlp flattens any shape; the other models
            need (channels, height, width).
        classes: Number of outputs.
        width: Multiplier of the hidden widths of the mlp and of the channel counts of
            cnn11, rounded, at least 1. Default 1.0. Other models take only 1.0.
        hidden: Widths of the mlp's hidden layers before ``width`` scales them.
            Default (512, 512).
        dropout: Dropout probability after each hidden layer of the mlp, in [0, 1).
            Default 0. Other models take only 0.
        batch_norm: Whether to use batch norm. Default None: off for the mlp, and on
            for cnn11 and torchvision models, which then are as torchvision defines
            them (vgg11 has no batch norm, vgg11_bn has).

    Returns:
        The model, in train mode.

    Raises:
        ValueError: If ``name`` is unknown, ``input_shape`` does not suit the model, or
            ``width`` or ``dropout`` is set for a model that does not take it.
        ImportError: If ``name`` is not mlp or cnn11 and torchvision is not installed.

    Example:
        >>> model = build_model("cnn11", (1, 28, 28), 10, width=0.25)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    _check_input_shape(input_shape)
    if name == "mlp":
        if width <= 0:
            raise ValueError(
                f"Expected width to be a positive float, but got {width!r}."
            )
        return mlp(
            math.prod(input_shape),
            hidden=_scale_widths(hidden, width),
            classes=classes,
            dropout=dropout,
            batch_norm=bool(batch_norm),
        )

    _check_model_name(name)
    if dropout != 0:
        raise ValueError(
            f"Dropout applies to the mlp model only, but got dropout={dropout!r} for "
            f"model {name!r}. Use the mlp model (--model mlp) for dropout."
        )
    _check_image_shape(name, input_shape)
    use_batch_norm = True if batch_norm is None else batch_norm
    if name == "cnn11":
        return cnn11(
            in_channels=input_shape[0],
            classes=classes,
            width=width,
            batch_norm=use_batch_norm,
            image_size=(input_shape[1], input_shape[2]),
        )
    if width != 1:
        raise ValueError(
            f"The width multiplier (--width) applies to the mlp and cnn11 models only, "
            f"but got width={width!r} for model {name!r}. Pass width 1 (--width 1) "
            "for this model."
        )
    return torchvision_classifier(
        name, classes=classes, in_channels=input_shape[0], batch_norm=use_batch_norm
    )


def _scale_widths(hidden: Sequence[int] | int, width: float) -> list[Any]:
    """Scale each hidden width by ``width``. ``mlp`` rejects invalid entries."""
    widths = (hidden,) if isinstance(hidden, int) else tuple(hidden)
    return [
        max(1, round(units * width))
        if isinstance(units, int) and not isinstance(units, bool)
        else units
        for units in widths
    ]


def _check_positive_int(name: str, number: Any) -> None:
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise ValueError(
            f"Expected {name} to be a positive integer, but got {number!r}."
        )


def _check_input_shape(input_shape: tuple[int, ...]) -> None:
    if (
        not isinstance(input_shape, Sequence)
        or len(input_shape) == 0
        or any(
            isinstance(size, bool) or not isinstance(size, int) or size < 1
            for size in input_shape
        )
    ):
        raise ValueError(
            "Expected input_shape to be a non-empty tuple of positive integers, such "
            f"as (1, 28, 28), but got {input_shape!r}."
        )


def _check_image_shape(name: str, input_shape: tuple[int, ...]) -> None:
    if len(input_shape) != 3:
        raise ValueError(
            f"Model {name!r} takes images of shape (channels, height, width), but the "
            f"input shape is {tuple(input_shape)!r}. Use --model mlp for inputs that "
            "are not images."
        )


def _check_model_name(name: str) -> None:
    """Raise ValueError unless ``name`` is mlp, cnn11 or a torchvision classifier."""
    if name not in ("mlp", "cnn11"):
        _import_torchvision_for(name)


def _import_torchvision_for(name: str) -> Any:
    """Import torchvision, raising unless ``name`` is one of its classifiers."""
    try:
        import torchvision
    except ImportError as error:
        raise ImportError(
            f"Model {name!r} needs torchvision, which is not installed. Install it "
            'with: pip install "singledir[vision]"'
        ) from error
    if name not in torchvision.models.list_models(module=torchvision.models):
        raise ValueError(
            f"Unknown model {name!r}. Pass one of {', '.join(MODELS)}, or the name of "
            "any torchvision classification model, such as resnet18 or vgg11."
        )
    return torchvision


def torchvision_classifier(
    name: str, classes: int = 1000, in_channels: int = 3, batch_norm: bool = True
) -> nn.Module:
    """Build a torchvision classification model with random weights.

    Args:
        name: A name from ``torchvision.models.list_models(module=torchvision.models)``,
            such as ``"resnet50"``.
        classes: Number of outputs. Default 1000, as for ImageNet.
        in_channels: Channels of the input images. Default 3. Any other count replaces
            the model's first ``Conv2d`` with one of the same kernel size, stride,
            padding, dilation and bias that takes ``in_channels`` inputs. The new layer
            has PyTorch's default initialization, not the model's own scheme.
        batch_norm: Default True builds the model as torchvision defines it. False
            builds it without batch norm: the builder gets a ``norm_layer`` that
            returns ``nn.Identity``. That works for the builders that take
            ``norm_layer``, such as the ResNet family and mobilenet_v2.
            Convolutions that torchvision builds without bias, because batch norm
            follows them, stay without bias. A model that has no batch norm
            (vgg11, convnext_tiny) is built unchanged.

    Returns:
        The model, in train mode.

    Raises:
        ValueError: If ``name`` is not a torchvision classification model,
            ``classes`` or ``in_channels`` is not a positive integer, the first
            convolution cannot take ``in_channels``, or ``batch_norm`` is False and
            the model cannot be built without batch norm.
        ImportError: If torchvision is not installed.

    Example:
        >>> model = torchvision_classifier("resnet18", classes=10, in_channels=1)
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if name in ("mlp", "cnn11"):
        raise ValueError(
            f"Model {name!r} is not a torchvision model. Build it with "
            f"build_model({name!r}, ...) or {name}(...)."
        )
    torchvision = _import_torchvision_for(name)
    _check_positive_int("classes", classes)
    _check_positive_int("in_channels", in_channels)

    model = torchvision.models.get_model(name, weights=None, num_classes=classes)
    if not batch_norm:
        if _has_batch_norm(model):
            model = _build_without_batch_norm(torchvision, name, classes)
        else:
            logger.info("Model '%s' has no batch norm to leave out.", name)
    if in_channels != 3:
        _replace_first_conv(model, name, in_channels)
    return model


def resnet50(
    classes: int = 1000, in_channels: int = 3, batch_norm: bool = True
) -> nn.Module:
    """Build the ResNet-50 of the ImageNet experiments, with random weights.

    Same as ``torchvision_classifier("resnet50", ...)``; see there for the arguments.
    """
    return torchvision_classifier(
        "resnet50", classes=classes, in_channels=in_channels, batch_norm=batch_norm
    )


def _has_batch_norm(model: nn.Module) -> bool:
    # _BatchNorm is the base class of BatchNorm1d/2d/3d, their lazy forms and
    # SyncBatchNorm.
    return any(
        isinstance(module, nn.modules.batchnorm._BatchNorm)
        for module in model.modules()
    )


def _build_without_batch_norm(torchvision: Any, name: str, classes: int) -> nn.Module:
    fix = (
        "Pass batch_norm=True, or choose a model whose builder takes one, such as "
        "resnet50 or mobilenet_v2."
    )
    try:
        model = torchvision.models.get_model(
            name, weights=None, num_classes=classes, norm_layer=nn.Identity
        )
    except TypeError as error:
        # Builders that lack the argument, or that set it themselves, raise a
        # TypeError that names it. Any other TypeError is a real failure.
        if "norm_layer" not in str(error):
            raise
        raise ValueError(
            f"Model {name!r} cannot be built without batch norm, because its "
            f"torchvision builder does not take a norm_layer argument. {fix}"
        ) from error
    if _has_batch_norm(model):
        raise ValueError(
            f"Model {name!r} cannot be built without batch norm, because its "
            "torchvision builder still adds batch norm layers when norm_layer "
            f"returns nn.Identity. {fix}"
        )
    return model


def _replace_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    # torchvision classifiers register their input convolution before any other, so
    # the first Conv2d in named_modules() order is the one that receives the images.
    found = next(
        (
            (conv_name, module)
            for conv_name, module in model.named_modules()
            if isinstance(module, nn.Conv2d)
        ),
        None,
    )
    if found is None or found[1].in_channels != 3 or found[1].groups != 1:
        raise ValueError(
            f"Model {name!r} has no first Conv2d with 3 input channels and groups=1 "
            f"to replace, so in_channels={in_channels!r} cannot be applied. Pass "
            "in_channels=3."
        )
    conv_name, conv = found
    replacement = nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    )
    parent_name, _, child_name = conv_name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, replacement)
    logger.info(
        "Replaced the first convolution '%s' of model '%s' with one that takes %d "
        "input channels.",
        conv_name,
        name,
        in_channels,
    )


_SAVE_HINT = "Save the weights with torch.save(model.state_dict(), PATH)."
_SAVE_NOT_MODEL_HINT = (
    "Save the weights with torch.save(model.state_dict(), PATH), not the model."
)
_MAX_LISTED_KEYS = 5


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a ``state_dict`` file into ``model``, with errors that name the mismatch.

    Args:
        model: The model to load into. Its weights change only when every key and
            shape matches.
        path: File written by ``torch.save(model.state_dict(), PATH)``, or a dict
            that contains the ``state_dict`` under the key ``"state_dict"``. It is read
            with ``weights_only=True``, so it cannot run code, and onto the CPU.

    Raises:
        FileNotFoundError: If ``path`` is not a file.
        ValueError: If the file cannot be read as tensors, or its keys or shapes do
            not match the model's.
        TypeError: If the file does not contain a ``state_dict``.

    Example:
        >>> model = build_model("mlp", (1, 28, 28), 10)
        >>> load_weights(model, "weights.pt")
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Weights file {str(path)!r} does not exist or is not a file. {_SAVE_HINT}"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises many types on a file that is not a tensor archive.
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        ValueError,
    ) as error:
        message = str(error).strip()
        first_line = message.splitlines()[0] if message else type(error).__name__
        raise ValueError(
            f"Weights file {str(path)!r} could not be read as tensors ({first_line}). "
            f"{_SAVE_NOT_MODEL_HINT}"
        ) from error

    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(
            f"Weights file {str(path)!r} contains a {type(state).__name__}, not a "
            f"state_dict. {_SAVE_HINT}"
        )
    for key, value in state.items():
        if not isinstance(value, Tensor):
            raise TypeError(
                f"Weights file {str(path)!r} contains a dict whose entry {key!r} is a "
                f"{type(value).__name__}, not a tensor, so it is not a state_dict. "
                f"{_SAVE_HINT}"
            )

    mismatch = _state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(
            f"Weights file {str(path)!r} does not match the model built with these "
            "options (a different --model, --width or --classes?). "
            + " ".join(mismatch)
        )
    model.load_state_dict(state)


def _state_dict_mismatch(
    expected: dict[str, Tensor], found: dict[str, Tensor]
) -> list[str]:
    """Describe missing keys, unexpected keys and shape mismatches in sentences."""
    missing = [key for key in expected if key not in found]
    unexpected = [key for key in found if key not in expected]
    shapes = [
        f"{key} is {tuple(found[key].shape)} in the file but "
        f"{tuple(expected[key].shape)} in the model"
        for key in expected
        if key in found and found[key].shape != expected[key].shape
    ]
    sentences = []
    if missing:
        sentences.append(f"Missing keys: {_format_keys(missing)}.")
    if unexpected:
        sentences.append(f"Unexpected keys: {_format_keys(unexpected)}.")
    if shapes:
        sentences.append(f"Shape mismatches: {_format_keys(shapes)}.")
    return sentences


def _format_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    if len(keys) <= _MAX_LISTED_KEYS:
        return shown
    return f"{shown} and {len(keys) - _MAX_LISTED_KEYS} more"


#: Number of last conv layers or blocks whose feature maps the method ablates.
_LAST_LAYERS = 3
_ADAPTIVE_POOLING = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_MAX_LISTED_CANDIDATES = 10
_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


@dataclass
class _ModuleCall:
    """Record of one module's calls in a forward pass."""

    order: int  # position among the modules by the end of their first call
    calls: int
    shape: tuple[int, ...] | None  # output shape, None for a non-tensor output


def default_layers(model: nn.Module, example_input: Any = None) -> list[str]:
    """Return the names of the layers that the method ablates in ``model`` by default.

    The names come from ``model.named_modules()``, so ``find_layers`` and
    ``ablation_curve`` accept them. The rules, first match wins:

    1. cnn11 (children ``conv1`` to ``conv11`` and ``relu9`` to ``relu11``): the
       feature maps of the last three conv layers, ``CNN11_LAYERS``.
    2. mlp (children ``fc1``, ``relu1``, ..., ``fc{n}``, ``relu{n}``): every hidden
       layer, ``relu1`` to ``relu{n}``.
    3. A torchvision ResNet (resnet*, resnext*, wide_resnet*): the last three
       residual blocks of ``layer1`` to ``layer4``, such as ``layer4.0``,
       ``layer4.1`` and ``layer4.2`` for resnet50. A block's output is a whole
       feature map after its final ReLU.
    4. Any other model needs ``example_input``, which runs through the model once in
       eval mode. A *feature map* here is a 4-D output of a module that ran exactly
       once, whose last two sizes equal the height and width of some ``Conv2d``
       output of the same pass. That test leaves out channels-last tensors, such as
       those inside ConvNeXt and Swin blocks, whose units do not lie along
       dimension 1. The rule returns the last three activation modules
       (``singledir.ACTIVATION_TYPES``) in call order that output a feature map,
       such as the last three ReLUs of VGG's ``features``.
       Activations that run after an adaptive pooling layer of the same parent
       module are left out, because they are the channel gates of
       squeeze-and-excitation blocks, not feature maps.
    5. If fewer than three such activations ran, as in models that apply their
       nonlinearity as a function (googlenet, inception_v3), the rule takes modules
       that have submodules and output a feature map. It returns the last three of
       them at the shallowest depth in ``named_modules()`` that has at least three,
       such as ``inception4e``, ``inception5a`` and ``inception5b`` for googlenet.

    NOTE: rules 4 and 5 are heuristics. Check what they return for a new
    architecture. In squeezenet the last convolution is the classifier, so rule 4
    returns its class score maps (``classifier.2``) as one of the three layers.

    The forward pass of rules 4 and 5 runs without gradients, and the model's hooks,
    train/eval mode and global random state are as before when this returns or raises.

    Args:
        model: The model.
        example_input: One batch of inputs, as for ``find_layers``. Only rules 4 and
            5 use it. Default None.

    Returns:
        Layer names in forward order.

    Raises:
        ValueError: If no rule applies, or rules 4 and 5 need ``example_input`` and it
            is None. The message lists candidate layers.

    Example:
        >>> default_layers(torchvision_classifier("resnet18"))
        ['layer3.1', 'layer4.0', 'layer4.1']
    """
    children = dict(model.named_children())
    if all(f"conv{index}" in children for index in range(1, 12)) and all(
        name in children for name in CNN11_LAYERS
    ):
        return list(CNN11_LAYERS)
    mlp_layers = _mlp_layers(children)
    if mlp_layers:
        return mlp_layers
    if _is_torchvision_resnet(model):
        # Each block's own `relu` module runs two or three times inside the block, so
        # a hook on it would clamp every call. The block's output is the feature map
        # after its last ReLU.
        blocks = [
            f"{stage}.{index}"
            for stage in _RESNET_STAGES
            for index in range(len(model.get_submodule(stage)))
        ]
        return blocks[-_LAST_LAYERS:]
    if example_input is None:
        raise ValueError(
            f"default_layers needs example_input to choose the layers of a "
            f"{type(model).__name__}, because it is not an mlp, cnn11 or torchvision "
            "ResNet. Pass one batch of inputs, such as torch.zeros(1, 3, 224, 224)."
        )
    return _feature_map_layers(model, _record_calls(model, example_input))


def _mlp_layers(children: dict[str, nn.Module]) -> list[str]:
    """Return ``relu1`` to ``relu{n}`` if ``children`` has the names ``mlp`` gives."""
    count = sum(
        1
        for name in children
        if name.startswith("relu") and name[len("relu") :].isdigit()
    )
    names = [f"relu{index}" for index in range(1, count + 1)]
    if count and all(
        name in children and f"fc{index}" in children
        for index, name in enumerate(names, start=1)
    ):
        return names
    return []


def _is_torchvision_resnet(model: nn.Module) -> bool:
    # A model can only be a torchvision ResNet if torchvision is already imported, so
    # this check never imports it.
    resnet_module = sys.modules.get("torchvision.models.resnet")
    return resnet_module is not None and isinstance(model, resnet_module.ResNet)


def _record_calls(model: nn.Module, example_input: Any) -> dict[str, _ModuleCall]:
    """Run one forward pass and record every submodule's calls, in call order."""
    records: dict[str, _ModuleCall] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            record = records.get(name)
            if record is not None:
                record.calls += 1
                return
            shape = tuple(output.shape) if isinstance(output, Tensor) else None
            records[name] = _ModuleCall(order=len(records), calls=1, shape=shape)

        return hook

    with (
        preserved_mode(model, evaluate=True),
        preserved_rng(),
        registered_hooks() as handles,
    ):
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_hook(make_hook(name)))
        with torch.no_grad():
            call_model(model, example_input)
    return records


def _feature_map_layers(model: nn.Module, records: dict[str, _ModuleCall]) -> list[str]:
    """Apply rules 4 and 5 of ``default_layers`` to a recorded forward pass."""
    modules = dict(model.named_modules())
    conv_sizes = {
        record.shape[2:]
        for name, record in records.items()
        if isinstance(modules[name], nn.Conv2d) and record.shape is not None
    }
    feature_maps = [
        name
        for name, record in records.items()
        if record.calls == 1
        and record.shape is not None
        and len(record.shape) == 4
        and record.shape[2:] in conv_sizes
    ]

    activations = [
        name
        for name in feature_maps
        if isinstance(modules[name], ACTIVATION_TYPES)
        and not _runs_after_adaptive_pooling(name, records, modules)
    ]
    if len(activations) >= _LAST_LAYERS:
        return activations[-_LAST_LAYERS:]

    blocks = [name for name in feature_maps if next(modules[name].children(), None)]
    for depth in sorted({name.count(".") for name in blocks}):
        level = [name for name in blocks if name.count(".") == depth]
        if len(level) >= _LAST_LAYERS:
            return level[-_LAST_LAYERS:]

    candidates = [name for name, record in records.items() if record.calls == 1]
    raise ValueError(
        f"Found no default layers to ablate in this {type(model).__name__}: fewer than "
        f"{_LAST_LAYERS} activation modules or blocks output a (batch, channels, "
        "height, width) feature map once per forward pass. Pass the layers to ablate "
        "explicitly (--layers, or layers=[...] in Python), and unit_dim if their "
        "units do not lie along dimension 1. The last modules that ran "
        f"once are: {', '.join(candidates[-_MAX_LISTED_CANDIDATES:]) or 'none'}."
    )


def _runs_after_adaptive_pooling(
    name: str, records: dict[str, _ModuleCall], modules: dict[str, nn.Module]
) -> bool:
    parent = name.rpartition(".")[0]
    return any(
        other.rpartition(".")[0] == parent
        and isinstance(modules[other], _ADAPTIVE_POOLING)
        and record.order < records[name].order
        for other, record in records.items()
    )


def default_metric(model_name: str) -> str:
    """Return the score the method uses for a model name: ``"accuracy"`` or ``"top5"``.

    The MNIST and CIFAR-10 networks (mlp, cnn11) are scored by accuracy, and torchvision
    models by top-5 accuracy, as Morcos et al. (ICLR 2018) score their ImageNet
    ResNet-50.

    Raises:
        ValueError: If ``model_name`` is not a model that ``build_model`` builds.
        ImportError: If the name is not mlp or cnn11 and torchvision is not installed.
    """
    _check_model_name(model_name)
    return "accuracy" if model_name in ("mlp", "cnn11") else "top5"
