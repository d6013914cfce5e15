"""Per-unit mean activations, for ablating units to their mean instead of zero.

The mean is taken over every example of the data given, and for feature maps over every
spatial position too, with sums and counts accumulated in float64. Only the running sums
are kept, so memory does not grow with the dataset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from singledir._model_state import (
    model_device,
    preserved_mode,
    preserved_rng,
    registered_hooks,
)
from singledir._outputs import OutputKey, call_model, select_output
from singledir.data import (
    DataSource,
    check_chunk_size,
    iter_batches,
    warn_about_loader,
)
from singledir.evaluation import to_device
from singledir.layers import find_layers, validate_layer_names


def _reduce_to_units(units: Tensor, unit_dim: int) -> tuple[Tensor, int]:
    dim = unit_dim % units.dim()
    moved = units.detach().movedim(dim, 0).reshape(units.shape[dim], -1)
    return moved.to(torch.float64).sum(dim=1), moved.shape[1]


def unit_means(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None = None,
    *,
    unit_dim: int = 1,
    output_keys: Mapping[str, OutputKey] | None = None,
    chunk_size: int = 1024,
) -> dict[str, Tensor]:
    """Compute each unit's mean activation over all of ``data``.

    The model runs in eval mode without gradients. Its hooks and train/eval mode are as
    before when this returns or raises.

    Args:
        model: Any ``nn.Module``.
        data: A DataLoader, a Dataset of (input, target) pairs, or an (inputs, targets)
            pair of tensors. Targets are not used.
        layers: Layer names. Default: every activation module of the model.
        unit_dim: Dimension of the layer output along which units lie.
        output_keys: For layers that return a tuple, list or dict, the index or key of
            the element that contains the units.
        chunk_size: Examples per forward pass when ``data`` is not a DataLoader.

    Returns:
        Layer name to a float64 tensor of shape (num_units,) on the CPU, ready to pass
        as ``value`` to ``ablate`` or ``ablation_curve``.

    Example:
        >>> means = unit_means(model, (inputs, targets), ["relu1"])
        >>> with ablate(model, {"relu1": [3]}, value=means):
        ...     logits = model(inputs)
    """
    output_keys = dict(output_keys or {})
    with preserved_rng():
        return _unit_means(model, data, layers, unit_dim, output_keys, chunk_size)


def _unit_means(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None,
    unit_dim: int,
    output_keys: dict[str, OutputKey],
    chunk_size: int,
) -> dict[str, Tensor]:
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    calls: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            units = select_output(output, output_keys.get(name), name)
            total, count = _reduce_to_units(units, unit_dim)
            sums[name] = sums[name] + total.cpu() if name in sums else total.cpu()
            counts[name] = counts.get(name, 0) + count
            calls[name] = calls.get(name, 0) + 1

        return hook

    check_chunk_size(chunk_size)
    warn_about_loader(data)
    batches = iter_batches(data, chunk_size)
    first = next(batches)
    if layers is None:
        layers = [
            info.name
            for info in find_layers(
                model,
                to_device(first[0], model_device(model)),
                unit_dim=unit_dim,
                output_keys=output_keys,
            )
        ]
    else:
        validate_layer_names(model, layers)
    modules = dict(model.named_modules())
    device = model_device(model)
    passes = 1
    with preserved_mode(model, evaluate=True), registered_hooks() as handles:
        for name in layers:
            handles.append(modules[name].register_forward_hook(make_hook(name)))
        with torch.no_grad():
            call_model(model, to_device(first[0], device))
            for inputs, _ in batches:
                call_model(model, to_device(inputs, device))
                passes += 1
    for name, count in calls.items():
        if count != passes:
            raise ValueError(
                f"Layer '{name}' runs {count // passes} times in one forward pass, so its "
                "calls would be averaged together. Give each use its own module instance."
            )
    missing = [name for name in layers if name not in sums]
    if missing:
        raise ValueError(
            f"Layers {missing} did not run in the forward pass, so they have no mean. "
            "Pass layers that the model uses."
        )
    return {name: sums[name] / counts[name] for name in layers}
