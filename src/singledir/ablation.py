"""Clamping units to fixed values in activation space.

Ablating a unit replaces its activation with a fixed value for every input: zero, as in
Morcos et al. (ICLR 2018), or a per-unit value such as the unit's mean activation over a
reference set (see ``unit_means``). Weights are never changed. The hooks return a new
tensor and never write into the layer's output, so an in-place activation such as
``nn.ReLU(inplace=True)`` or a later in-place operation cannot corrupt the result.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from singledir._model_state import preserved_mode, registered_hooks
from singledir._outputs import OutputKey, replace_output, select_output
from singledir.layers import validate_layer_names

#: Indices of the units to ablate, per layer name.
UnitSpec = Mapping[str, Sequence[int] | Tensor | np.ndarray]
#: A value for every ablated unit, or one tensor of shape (num_units,) per layer.
AblationValue = float | Mapping[str, Tensor | Sequence[float] | np.ndarray]


def _to_numpy(values: Any) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _as_index_tensor(layer: str, indices: Any) -> Tensor:
    array = _to_numpy(indices).reshape(-1)
    if array.size and not np.issubdtype(array.dtype, np.integer):
        raise TypeError(
            f"Expected integer unit indices for layer '{layer}', but got dtype "
            f"{array.dtype}. Pass indices such as [0, 5]; turn a boolean mask into "
            "indices with mask.nonzero()."
        )
    tensor = torch.as_tensor(array.astype(np.int64))
    if tensor.numel() and int(tensor.min()) < 0:
        raise ValueError(
            f"Unit indices for layer '{layer}' must be non-negative, but got "
            f"{int(tensor.min())}. Pass indices from 0 to the number of units minus 1."
        )
    return torch.unique(tensor)


def _as_value_vector(layer: str, values: Any) -> Tensor:
    vector = torch.as_tensor(_to_numpy(values).astype(np.float64)).reshape(-1)
    if not torch.isfinite(vector).all():
        raise ValueError(
            f"Ablation values for layer '{layer}' contain NaN or infinity. Pass finite "
            "values."
        )
    return vector


class UnitClamp:
    """Forward hooks that clamp a changeable set of units of several layers.

    This is the mechanism behind ``ablate`` and every curve engine. Curves reuse one
    instance and change its units between evaluations, so the hooks are registered once
    per curve instead of once per point. Call ``attach`` inside ``registered_hooks`` so
    the hooks are removed.

    ``set_groups`` takes several unit sets at once for a batch made of that many
    replicas of the same examples, stacked along dimension 0. Replica r is then clamped
    with set r, which lets one forward pass score several points of a curve.
    """

    def __init__(
        self,
        layers: Sequence[str],
        value: AblationValue = 0.0,
        *,
        unit_dim: int = 1,
        output_keys: Mapping[str, OutputKey] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.unit_dim = unit_dim
        self.output_keys = dict(output_keys or {})
        empty = torch.empty(0, dtype=torch.long)
        self._groups: list[dict[str, Tensor]] = [{name: empty for name in self.layers}]
        self._masks: dict[str, Tensor | None] = {name: None for name in self.layers}
        self._scalar: float | None = None
        self._vectors: dict[str, Tensor] = {}
        # Layers whose clamp a cached engine applies in the next layer's weights.
        self.folded: set[str] = set()
        self._cache: dict[Any, tuple[list[dict[str, Tensor]], dict]] = {}
        if isinstance(value, Mapping):
            missing = [name for name in self.layers if name not in value]
            if missing:
                raise ValueError(
                    f"Per-unit ablation values are missing for layers {missing}. Pass a "
                    "value tensor for every ablated layer, as unit_means returns."
                )
            self._vectors = {
                name: _as_value_vector(name, value[name]) for name in self.layers
            }
        else:
            if isinstance(value, Tensor) and value.numel() == 1:
                value = float(value.item())
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"Expected value to be a float or a mapping from layer name to "
                    f"per-unit values, but got {type(value).__name__}."
                )
            if not math.isfinite(value):
                raise ValueError(f"Expected a finite ablation value, but got {value}.")
            self._scalar = float(value)

    @property
    def scalar(self) -> float | None:
        """The float that every ablated unit is clamped to, or None for per-unit values."""
        return self._scalar

    @property
    def num_groups(self) -> int:
        return len(self._groups)

    def set_units(self, units: UnitSpec) -> None:
        """Replace the ablated units: ``units`` maps layer names to unit indices."""
        self.set_groups([units])

    def set_groups(self, groups: Sequence[UnitSpec], cache_key: Any = None) -> None:
        """Clamp replica r of every batch with ``groups[r]``, a map of layer to indices.

        Engines set the same groups once per chunk of examples. With a ``cache_key``, the
        parsed groups and their masks are kept under that key and reused, until
        ``clear_cache``.
        """
        if cache_key is not None and self.restore_groups(cache_key):
            return
        self._set_groups(groups)
        if cache_key is not None:
            # The mask dict is shared, so masks built later are cached too.
            self._cache[cache_key] = (self._groups, self._masks)

    def restore_groups(self, cache_key: Any) -> bool:
        """Reuse the groups cached under ``cache_key``; return whether there were any."""
        if cache_key not in self._cache:
            return False
        self._groups, self._masks = self._cache[cache_key]
        return True

    def clear_cache(self) -> None:
        self._cache = {}

    def _set_groups(self, groups: Sequence[UnitSpec]) -> None:
        if not groups:
            raise ValueError("Expected at least one group of units, but got none.")
        parsed = []
        for units in groups:
            unknown = [name for name in units if name not in self._masks]
            if unknown:
                raise ValueError(
                    f"Layers {unknown} are not among the hooked layers {self.layers}."
                )
            parsed.append(
                {
                    name: _as_index_tensor(name, units.get(name, []))
                    for name in self.layers
                }
            )
        self._groups = parsed
        self._masks = {name: None for name in self.layers}

    def attach(self, model: nn.Module, handles: list) -> None:
        """Register one forward hook per layer on ``model``, appending the handles."""
        modules = dict(model.named_modules())
        for name in self.layers:
            handles.append(modules[name].register_forward_hook(self._make_hook(name)))

    def is_active(self, name: str) -> bool:
        """Whether any group ablates a unit of layer ``name``."""
        return any(group[name].numel() for group in self._groups)

    def group_mask(self, name: str, num_units: int, device: torch.device) -> Tensor:
        """Return the (groups, num_units) boolean mask of ablated units of ``name``."""
        mask = self._masks[name]
        if mask is None or mask.shape[1] != num_units or mask.device != device:
            mask = torch.zeros(len(self._groups), num_units, dtype=torch.bool)
            for row, group in enumerate(self._groups):
                indices = group[name]
                if indices.numel() and int(indices.max()) >= num_units:
                    raise IndexError(
                        f"Unit index {int(indices.max())} is out of range for layer "
                        f"'{name}', which has {num_units} units. Pass indices from 0 to "
                        f"{num_units - 1}."
                    )
                mask[row, indices] = True
            mask = mask.to(device)
            self._masks[name] = mask
        return mask

    def fill_values(self, name: str, num_units: int, like: Tensor) -> Tensor:
        """Return the ablation value of every unit of ``name``, shape (num_units,)."""
        if self._scalar is not None:
            return torch.full(
                (num_units,), self._scalar, dtype=like.dtype, device=like.device
            )
        vector = self._vectors[name]
        if vector.shape[0] != num_units:
            raise ValueError(
                f"Layer '{name}' has {num_units} units, but {vector.shape[0]} ablation "
                "values were given for it. Pass one value per unit."
            )
        return vector.to(like.device, like.dtype)

    def clamp(self, name: str, units: Tensor) -> Tensor:
        """Return a new tensor: ``units`` with each replica's ablated units clamped."""
        groups = len(self._groups)
        if units.dim() < 2 or not -units.dim() <= self.unit_dim < units.dim():
            raise ValueError(
                f"Layer '{name}' outputs a tensor of shape {tuple(units.shape)}, which has "
                f"no unit dimension {self.unit_dim} after the batch dimension. Pass "
                "unit_dim, the dimension along which the units lie."
            )
        dim = self.unit_dim % units.dim()
        if dim == 0:
            raise ValueError(
                f"unit_dim={self.unit_dim} is the batch dimension of layer '{name}'. Pass "
                "the dimension along which the units lie, such as 1."
            )
        if units.shape[0] % groups:
            raise ValueError(
                f"A batch of {units.shape[0]} rows cannot hold {groups} equal replicas."
            )
        num_units = units.shape[dim]
        grouped = units.reshape(groups, units.shape[0] // groups, *units.shape[1:])
        shape = [1] * grouped.dim()
        shape[0] = groups
        shape[dim + 1] = num_units
        mask = self.group_mask(name, num_units, units.device).view(shape)
        fill_shape = [1] * grouped.dim()
        fill_shape[dim + 1] = num_units
        fill = self.fill_values(name, num_units, units).view(fill_shape)
        # torch.where allocates a new tensor, so the layer's own output, which an
        # in-place activation shares with its input, is never written.
        return torch.where(mask, fill, grouped).reshape(units.shape)

    def _make_hook(self, name: str):
        key = self.output_keys.get(name)

        def hook(module: nn.Module, inputs: Any, output: Any) -> Any:
            if name in self.folded or not self.is_active(name):
                return None
            units = select_output(output, key, name)
            return replace_output(output, key, self.clamp(name, units))

        return hook


@contextmanager
def ablate(
    model: nn.Module,
    units: UnitSpec,
    value: AblationValue = 0.0,
    *,
    unit_dim: int = 1,
    output_keys: Mapping[str, OutputKey] | None = None,
) -> Iterator[nn.Module]:
    """Clamp the given units of ``model`` to ``value`` inside a ``with`` block.

    Every forward pass inside the block runs with the units clamped, in whatever mode the
    model is in. On exit, normal or by exception, exactly the hooks this added are
    removed and every submodule's train/eval mode is what it was on entry.

    Args:
        model: Any ``nn.Module``.
        units: Layer name to unit indices along ``unit_dim``. Indices must be in
            ``[0, num_units)``; an out-of-range index raises IndexError at the first
            forward pass, when the layer's size is known.
        value: A float for every ablated unit (default 0.0), or a mapping from layer
            name to a tensor of shape (num_units,), as ``unit_means`` returns. Only the
            entries of the ablated units are used.
        unit_dim: Dimension of the layer output along which units lie.
        output_keys: For layers that return a tuple, list or dict, the index or key of
            the element that contains the units.

    Yields:
        The model itself.

    Raises:
        ValueError: If a layer name is unknown, an index is negative or a value is not
            finite.

    Example:
        >>> with ablate(model, {"relu1": [0, 5]}):
        ...     logits = model(inputs)
    """
    if not isinstance(units, Mapping):
        raise TypeError(
            f"Expected units to be a mapping from layer name to unit indices, but got "
            f"{type(units).__name__}. Pass for example {{'relu1': [0, 5]}}."
        )
    validate_layer_names(model, list(units))
    clamp = UnitClamp(list(units), value, unit_dim=unit_dim, output_keys=output_keys)
    clamp.set_units(units)
    with preserved_mode(model), registered_hooks() as handles:
        clamp.attach(model, handles)
        yield model
