"""Engines that reuse work across the points of a curve.

``PrefixEngine`` runs the network once per chunk of examples up to the first ablated
layer, keeps those activations, and evaluates only the rest of the network for each
unit set, several sets per forward pass: the cached activations are repeated once per
set along the batch dimension and each copy is clamped with its own set.

``IncrementalEngine`` goes further where the first ablated layer feeds a single Linear
or Conv layer. That layer's pre-activation is linear in its input, so clamping one more
unit u changes it by the contribution of ``value[u] - activation[u]`` alone. The engine
updates the pre-activation with those contributions instead of recomputing it, and runs
the layers after it only for the requested sets.

Both give the same result as the naive engine up to floating-point rounding, because
they compute the same sums in a different order and on different batch shapes. ``auto``
checks this on the first chunk before it uses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from singledir._outputs import call_model, extract_logits, replace_output, select_output
from singledir.engines._graph import SplitError, first_ablated_node, split_after, trace
from singledir.engines.base import Engine, Measurement, split_pooled

# Upper bound, in bytes, on the cached activations repeated for one forward pass. The
# suffix allocates a few times this for its intermediate activations.
DEFAULT_PASS_BYTES = 64 * 2**20
# More sets per pass than this gains little, because matrix products are already large.
MAX_SETS_PER_PASS = 64


def _tensor_bytes(value: Any) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    if isinstance(value, Mapping):
        return sum(_tensor_bytes(item) for item in value.values())
    return 0


def _repeat(value: Any, copies: int, batch: int) -> Any:
    """Repeat every batch-indexed tensor in ``value`` ``copies`` times along dim 0.

    A single copy is cloned, so in-place operations in the suffix cannot change the
    cache that later sets reuse.
    """
    if isinstance(value, Tensor):
        if value.dim() == 0 or value.shape[0] != batch:
            return value
        if copies == 1:
            return value.clone()
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        items = [_repeat(item, copies, batch) for item in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_repeat(item, copies, batch) for item in value]
    if isinstance(value, dict):
        return {key: _repeat(item, copies, batch) for key, item in value.items()}
    return value


class PrefixEngine(Engine):
    """Cache the network up to the first ablated layer; run only the rest per set."""

    name = "prefix"

    def __init__(
        self, measurement: Measurement, *, pass_bytes: int = DEFAULT_PASS_BYTES
    ) -> None:
        super().__init__(measurement)
        names = [layer.name for layer in measurement.layers]
        self.traced = trace(measurement.model, names)
        self.first_layer = first_ablated_node(self.traced, names)
        self.first_name = str(self.first_layer.target)
        self.pass_bytes = pass_bytes
        self.split = self._make_split()

    def _make_split(self):
        return split_after(self.traced, self.first_layer)

    def _run_prefix(self, inputs: Any) -> list[Any]:
        # No set is active while the prefix runs, so the first layer's hook is a no-op.
        self.measurement.clamp.set_units({})
        with torch.no_grad():
            return list(call_model(self.split.prefix, inputs))

    def _sets_per_pass(self, carried: list[Any], total_sets: int) -> int:
        per_copy = max(_tensor_bytes(carried), 1)
        return int(
            max(1, min(total_sets, MAX_SETS_PER_PASS, self.pass_bytes // per_copy))
        )

    def _cut_value(
        self, state: Any, carried: list[Any], batch: int, group: Sequence[np.ndarray]
    ) -> Any:
        m = self.measurement
        key = m.output_keys.get(self.first_name)
        repeated = _repeat(carried[-1], len(group), batch)
        units = select_output(repeated, key, self.first_name)
        return replace_output(repeated, key, m.clamp.clamp(self.first_name, units))

    def _chunk_state(self, outputs: list[Any]) -> tuple[Any, list[Any]]:
        """Split the prefix outputs into engine state and the carried values."""
        return None, outputs

    def iter_logits(
        self, inputs: Any, batch: int, sets: Sequence[np.ndarray]
    ) -> Iterator[tuple[int, Tensor]]:
        m = self.measurement
        state, carried = self._chunk_state(self._run_prefix(inputs))
        per_pass = self._sets_per_pass(carried, len(sets))
        for first in range(0, len(sets), per_pass):
            group = sets[first : first + per_pass]
            m.clamp.set_groups([split_pooled(pooled, m.layers) for pooled in group])
            arguments = [_repeat(value, len(group), batch) for value in carried[:-1]]
            arguments.append(self._cut_value(state, carried, batch, group))
            output = self.split.suffix(*arguments)
            yield first, extract_logits(output, m.logits_fn)
        m.clamp.set_units({})


class IncrementalEngine(PrefixEngine):
    """Update the first ablated layer's consumer incrementally; see the module docs."""

    name = "incremental"

    def _make_split(self):
        m = self.measurement
        users = list(self.first_layer.users)
        if m.output_keys.get(self.first_name) is not None:
            raise SplitError(
                f"Layer '{self.first_name}' returns a container, not a tensor."
            )
        if len(users) != 1 or users[0].op != "call_module":
            raise SplitError(
                f"Layer '{self.first_name}' does not feed exactly one module, so its "
                "consumer cannot be updated incrementally."
            )
        consumer_node = users[0]
        if consumer_node.args != (self.first_layer,) or consumer_node.kwargs:
            raise SplitError(
                f"Layer '{self.first_name}' is not the only input of its consumer."
            )
        consumer = self.traced.get_submodule(str(consumer_node.target))
        ablated = {layer.name for layer in m.layers}
        if str(consumer_node.target) in ablated:
            raise SplitError(
                "The consumer of the first ablated layer is ablated itself."
            )
        self.consumer = consumer
        first_info = next(layer for layer in m.layers if layer.name == self.first_name)
        dims = len(first_info.shape)
        unit_dim = m.unit_dim % dims
        if isinstance(consumer, nn.Linear):
            if unit_dim != dims - 1:
                raise SplitError(
                    "A Linear consumer needs the units in the last dimension."
                )
        elif isinstance(consumer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if (
                consumer.groups != 1
                or consumer.padding_mode != "zeros"
                or unit_dim != 1
            ):
                raise SplitError(
                    "The Conv consumer has groups, a padding mode or a unit dim it cannot update."
                )
        else:
            raise SplitError(
                f"The consumer is a {type(consumer).__name__}, not a Linear or Conv."
            )
        self.first_index = [layer.name for layer in m.layers].index(self.first_name)
        self.first_units = first_info.num_units
        return split_after(self.traced, consumer_node, extra=[self.first_layer])

    def _chunk_state(self, outputs: list[Any]) -> tuple[Any, list[Any]]:
        activation = outputs[-1]
        carried = outputs[:-1]
        pre_activation = carried[-1]
        state = {
            "activation": activation,
            "start": pre_activation,
            "current": pre_activation,
            "applied": np.zeros(self.first_units, dtype=bool),
            "fill": self.measurement.clamp.fill_values(
                self.first_name, self.first_units, activation
            ),
        }
        return state, carried

    def _contribution(self, state: dict, units: np.ndarray) -> Tensor:
        """Change of the consumer's output when ``units`` go from activation to value."""
        index = torch.as_tensor(
            units, dtype=torch.long, device=state["activation"].device
        )
        consumer = self.consumer
        if isinstance(consumer, nn.Linear):
            delta = state["fill"][index] - state["activation"].index_select(-1, index)
            return delta @ consumer.weight.index_select(1, index).T
        activation = state["activation"]
        shape = [1, index.numel()] + [1] * (activation.dim() - 2)
        delta = state["fill"][index].view(shape) - activation.index_select(1, index)
        weight = consumer.weight.index_select(1, index)
        convolve = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[activation.dim() - 2]
        return convolve(
            delta, weight, None, consumer.stride, consumer.padding, consumer.dilation, 1
        )

    def _pre_activation(self, state: dict, pooled: np.ndarray) -> Tensor:
        target = np.zeros(self.first_units, dtype=bool)
        target[split_pooled(pooled, self.measurement.layers)[self.first_name]] = True
        applied = state["applied"]
        if np.all(target >= applied):
            added = np.flatnonzero(target & ~applied)
            if added.size:
                state["current"] = state["current"] + self._contribution(state, added)
        else:
            units = np.flatnonzero(target)
            state["current"] = state["start"]
            if units.size:
                state["current"] = state["start"] + self._contribution(state, units)
        state["applied"] = target
        return state["current"]

    def _cut_value(
        self, state: Any, carried: list[Any], batch: int, group: Sequence[np.ndarray]
    ) -> Any:
        with torch.no_grad():
            return torch.cat(
                [self._pre_activation(state, pooled) for pooled in group], dim=0
            )
