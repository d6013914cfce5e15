"""Discovery of the layers whose output units can be ablated.

A *unit* is one slice of a layer's output along the unit dimension: one feature of an
MLP layer, or one whole feature map of a conv layer. By default the ablatable layers are
the outputs of ``torch.nn`` activation modules, so that ablation happens after the
nonlinearity. Any named module can be chosen instead.

Warning:
    A module instance that runs more than once per forward pass (one ``nn.ReLU`` shared
    by several layers) cannot be ablated as one layer, because a hook on it would clamp
    every call. ``find_layers`` reports the number of calls so callers can reject it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from singledir._model_state import preserved_mode, preserved_rng, registered_hooks
from singledir._outputs import OutputKey, call_model, select_output

logger = logging.getLogger(__name__)

#: Elementwise activation modules whose outputs are ablatable by default. Softmax-like
#: modules are left out because they mix units, and so is MultiheadAttention.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardshrink,
    nn.Softshrink,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.GLU,
)

_MAX_LISTED_NAMES = 40


@dataclass(frozen=True)
class LayerInfo:
    """An ablatable layer as seen in one forward pass of an example input.

    Attributes:
        name: Qualified module name, as in ``model.named_modules()``.
        module_type: Class name of the module.
        shape: Shape of the unit tensor for the example input, batch dimension included.
        num_units: Size of the unit dimension.
        calls: How many times the module ran in the forward pass.
    """

    name: str
    module_type: str
    shape: tuple[int, ...]
    num_units: int
    calls: int


def unit_name(layer: str, index: int) -> str:
    """Return the canonical name of one unit, such as ``"relu1[17]"``."""
    return f"{layer}[{index}]"


def validate_layer_names(model: nn.Module, names: Sequence[str]) -> None:
    """Raise ValueError naming the existing layers if any of ``names`` is not a module."""
    if isinstance(names, str):
        raise TypeError(
            f"Expected layers to be a sequence of layer names, but got the string "
            f"{names!r}. Pass a list, for example layers=[{names!r}]."
        )
    modules = dict(model.named_modules())
    for name in names:
        if name == "" or name not in modules:
            raise ValueError(
                f"Unknown layer name {name!r}. The model has these layers: "
                f"{_format_names(list(modules)[1:])}. Pass names from "
                "model.named_modules()."
            )


def _format_names(names: list[str]) -> str:
    if len(names) <= _MAX_LISTED_NAMES:
        return ", ".join(names)
    shown = ", ".join(names[:_MAX_LISTED_NAMES])
    return f"{shown}, and {len(names) - _MAX_LISTED_NAMES} more"


def _output_tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [item for item in output if isinstance(item, torch.Tensor)]
    if isinstance(output, Mapping):
        return [item for item in output.values() if isinstance(item, torch.Tensor)]
    return []


def find_layers(
    model: nn.Module,
    example_input: Any,
    *,
    layers: Sequence[str] | None = None,
    unit_dim: int = 1,
    output_keys: Mapping[str, OutputKey] | None = None,
) -> list[LayerInfo]:
    """Find the ablatable layers by running one forward pass, in forward order.

    The forward pass runs in eval mode without gradients, and the model's hooks and
    train/eval mode are as before when this returns or raises.

    Args:
        model: Any ``nn.Module``.
        example_input: One batch of inputs: a tensor, a tuple of positional arguments or
            a dict of keyword arguments. Only its shapes matter.
        layers: Module names to report. Default: every activation module listed in
            ``ACTIVATION_TYPES``, except one whose output is the model's output.
        unit_dim: Dimension of the layer output along which units lie. Default 1, the
            features of an MLP or the channels of a conv net; use 2 for
            (batch, sequence, features).
        output_keys: For layers that return a tuple, list or dict, the index or key of
            the element that contains the units.

    Returns:
        One ``LayerInfo`` per layer that ran, ordered by its first call.

    Raises:
        ValueError: If a name in ``layers`` is not a module of ``model``, or a layer's
            output has no dimension ``unit_dim``.
        TypeError: If a layer returns a non-tensor and ``output_keys`` does not say
            which element contains the units.

    Example:
        >>> model = singledir.models.mlp(784)
        >>> [layer.name for layer in find_layers(model, torch.zeros(1, 784))]
        ['relu1', 'relu2']
    """
    output_keys = dict(output_keys or {})
    if layers is None:
        names = [
            name
            for name, module in model.named_modules()
            if isinstance(module, ACTIVATION_TYPES)
        ]
    else:
        validate_layer_names(model, layers)
        names = list(dict.fromkeys(layers))
    validate_layer_names(model, list(output_keys))

    modules = dict(model.named_modules())
    seen: dict[str, dict[str, Any]] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            record = seen.get(name)
            if record is not None:
                record["calls"] += 1
                return
            units = select_output(output, output_keys.get(name), name)
            seen[name] = {"shape": tuple(units.shape), "calls": 1, "tensor": units}

        return hook

    with (
        preserved_mode(model, evaluate=True),
        preserved_rng(),
        registered_hooks() as handles,
    ):
        for name in names:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            model_output = call_model(model, example_input)
    outputs = _output_tensors(model_output)

    found = []
    for name, record in seen.items():
        if layers is None and any(record["tensor"] is tensor for tensor in outputs):
            # An activation whose output is the model's output (a final sigmoid, say)
            # clamps logits, not hidden units, so it is left out by default.
            logger.info(
                "Leaving out layer '%s': its output is the model's output.", name
            )
            continue
        shape = record["shape"]
        if (
            len(shape) < 2
            or not -len(shape) <= unit_dim < len(shape)
            or unit_dim % len(shape) == 0
        ):
            raise ValueError(
                f"Layer '{name}' outputs a tensor of shape {shape}, which has no unit "
                f"dimension {unit_dim} after the batch dimension. Pass unit_dim, the "
                "dimension along which the units lie."
            )
        found.append(
            LayerInfo(
                name=name,
                module_type=type(modules[name]).__name__,
                shape=shape,
                num_units=shape[unit_dim],
                calls=record["calls"],
            )
        )
    missing = [name for name in names if name not in seen]
    if layers is not None and missing:
        logger.warning("Layers %s did not run in the forward pass.", missing)
    return found
