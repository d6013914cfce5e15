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
from singledir.engines._folding import fold_consumers
from singledir.engines._graph import SplitError, first_ablated_node, split_after, trace
from singledir.engines.base import Engine, Measurement, split_pooled

# Upper bound, in bytes, on the cached activations repeated for one forward pass. The
# suffix allocates a few times this for its intermediate activations.
DEFAULT_PASS_BYTES = 16 * 2**20
# More sets per pass than this gains little, because matrix products are already large.
MAX_SETS_PER_PASS = 128


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
        # Per-layer units of each set, by position in the sets being scored.
        self._splits: dict[int, dict[str, np.ndarray]] = {}
        self.split = self._make_split()
        self.folded = self._fold(cut_layer=self._cut_layer())

    def _cut_layer(self) -> str | None:
        """Name of the ablated layer whose output the cut carries, if any."""
        return self.first_name

    def _fold(self, cut_layer: str | None) -> set[str]:
        m = self.measurement
        names = {layer.name for layer in m.layers}
        placeholders = [
            n for n in self.split.suffix.graph.nodes if n.op == "placeholder"
        ]
        nodes = {
            str(n.target): n
            for n in self.split.suffix.graph.nodes
            if n.op == "call_module" and n.target in names
        }
        if cut_layer is not None:
            nodes[cut_layer] = placeholders[-1]
        shapes = {layer.name: layer.shape for layer in m.layers}
        return fold_consumers(self.split.suffix, nodes, m.clamp, m.unit_dim, shapes)

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

    def _passes(
        self, carried: list[Any], sets: Sequence[np.ndarray]
    ) -> list[tuple[int, int]]:
        """Split ``sets`` into passes: (first, stop) ranges scored in one forward pass."""
        per_pass = self._sets_per_pass(carried, len(sets))
        return [
            (first, min(first + per_pass, len(sets)))
            for first in range(0, len(sets), per_pass)
        ]

    def _cut_value(
        self,
        state: Any,
        carried: list[Any],
        batch: int,
        group: Sequence[np.ndarray],
        first: int,
    ) -> Any:
        m = self.measurement
        key = m.output_keys.get(self.first_name)
        repeated = _repeat(carried[-1], len(group), batch)
        if self.first_name in self.folded:
            return repeated
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
        try:
            m.clamp.folded = self.folded
            for first, stop in self._passes(carried, sets):
                group = sets[first:stop]
                # Every chunk scores the same passes, so only the first splits the sets.
                if not m.clamp.restore_groups((first, stop)):
                    m.clamp.set_groups(
                        [
                            self._split(first + row, pooled)
                            for row, pooled in enumerate(group)
                        ],
                        cache_key=(first, stop),
                    )
                arguments = [
                    _repeat(value, len(group), batch) if batched else value
                    for value, batched in zip(carried[:-1], self.split.batched)
                ]
                arguments.append(self._cut_value(state, carried, batch, group, first))
                output = self.split.suffix(*arguments)
                yield first, extract_logits(output, m.logits_fn)
        finally:
            m.clamp.folded = set()
            m.clamp.set_units({})

    def _split(self, position: int, pooled: np.ndarray) -> dict[str, np.ndarray]:
        """Return ``split_pooled`` of the set at ``position``, computed once per call."""
        split = self._splits.get(position)
        if split is None:
            split = split_pooled(pooled, self.measurement.layers)
            self._splits[position] = split
        return split

    def score_sets(
        self, sets: Sequence[np.ndarray], context: str | Sequence[str] = ""
    ) -> np.ndarray:
        # Pass plans and split sets are cached per call, because every chunk repeats
        # the same passes.
        self._plans: dict[Any, Any] = {}
        self._splits = {}
        self.measurement.clamp.clear_cache()
        try:
            return super().score_sets(sets, context)
        finally:
            self._plans = {}
            self._splits = {}
            self.measurement.clamp.clear_cache()


class IncrementalEngine(PrefixEngine):
    """Update the first ablated layer's consumer incrementally; see the module docs."""

    name = "incremental"

    def _cut_layer(self) -> str | None:
        return None

    def _fold(self, cut_layer: str | None) -> set[str]:
        folded = super()._fold(cut_layer)
        self.expander = self._find_expander(folded)
        return folded

    def _passes(
        self, carried: list[Any], sets: Sequence[np.ndarray]
    ) -> list[tuple[int, int]]:
        if self.expander is None:
            return super()._passes(carried, sets)
        # Sets that share first-layer units share one replica, so a pass is sized by
        # its distinct replicas, and dense points fit many sets in one pass.
        replicas = self._sets_per_pass(carried, len(sets))
        key = ("passes", len(sets), replicas)
        plans = getattr(self, "_plans", {})
        if key in plans:
            return plans[key]
        passes, first, distinct, previous = [], 0, 0, None
        for row, pooled in enumerate(sets):
            units = self._split(row, pooled)[self.first_name]
            new = previous is None or not np.array_equal(units, previous)
            full = row - first >= MAX_SETS_PER_PASS or (new and distinct == replicas)
            if row > first and full:
                passes.append((first, row))
                first, distinct, new = row, 0, True
            distinct += int(new)
            previous = units
        passes.append((first, len(sets)))
        plans[key] = passes
        return passes

    def _find_expander(self, folded: set[str]) -> Any:
        """Return the folded consumer that can fan one input out to many groups.

        Sets with the same units of the first layer give the same consumer output, so
        the suffix runs once per distinct first-layer set up to the next ablated
        layer's consumer, which then applies each set's own clamp. That holds only if
        the next ablated layer comes before any other use of carried values.
        """
        if len(self.split.carried) != 1:
            return None
        names = {layer.name for layer in self.measurement.layers}
        for node in self.split.suffix.graph.nodes:
            if node.op == "call_module" and node.target in names:
                if node.target not in folded:
                    return None
                module_name = f"singledir_masked_{str(node.target).replace('.', '_')}"
                return self.split.suffix.get_submodule(module_name)
        return None

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
        if isinstance(self.consumer, nn.Linear):
            # Units as rows, so each update gathers contiguous rows, not strided columns.
            state["units_first"] = activation.reshape(
                -1, self.first_units
            ).T.contiguous()
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

    def _plan(
        self,
        group: Sequence[np.ndarray],
        first: int,
        applied: np.ndarray,
        device: torch.device,
    ) -> Any:
        """Return the update steps of one pass, the same for every chunk.

        ``applied`` marks the first-layer units already in the consumer's output when
        the pass starts. Each step is (index of the set in the group, start from the
        unablated output?, units of the first layer to add as an index tensor).
        ``sources`` maps every set in the group to the step that computes its consumer
        output. The plan also returns the units applied when the pass ends.
        """
        key = (first, len(group))
        plans = getattr(self, "_plans", {})
        if key in plans:
            return plans[key]
        steps, sources, previous = [], [], None
        for row, pooled in enumerate(group):
            target = np.zeros(self.first_units, dtype=bool)
            target[self._split(first + row, pooled)[self.first_name]] = True
            if (
                self.expander is not None
                and previous is not None
                and np.array_equal(target, previous)
            ):
                sources.append(len(steps) - 1)
                continue
            restart = not np.all(target >= applied)
            units = np.flatnonzero(target if restart else target & ~applied)
            index = torch.as_tensor(units, dtype=torch.long, device=device)
            # The consumer's weight columns of these units, reused by every chunk.
            columns = None
            if isinstance(self.consumer, nn.Linear) and units.size:
                columns = self.consumer.weight.index_select(1, index).T.contiguous()
            steps.append((row, restart, index, columns))
            sources.append(len(steps) - 1)
            applied, previous = target, target
        plan = (steps, sources, applied)
        plans[key] = plan
        return plan

    def _write_pre_activation(
        self,
        state: dict,
        restart: bool,
        index: Tensor,
        columns: Tensor | None,
        out: Tensor,
    ) -> None:
        """Write the consumer's output after adding units ``index`` into ``out``."""
        base = state["start"] if restart else state["current"]
        if index.numel() == 0:
            out.copy_(base)
        elif isinstance(self.consumer, nn.Linear):
            gathered = state["units_first"].index_select(0, index)
            delta = state["fill"][index].unsqueeze(1) - gathered
            # One fused product-and-add: out = base + delta.T @ weight[:, index].T.
            torch.addmm(
                base.reshape(-1, base.shape[-1]),
                delta.T,
                columns,
                out=out.view(-1, out.shape[-1]),
            )
        else:
            torch.add(base, self._contribution(state, index.cpu().numpy()), out=out)
        state["current"] = out

    def _cut_value(
        self,
        state: Any,
        carried: list[Any],
        batch: int,
        group: Sequence[np.ndarray],
        first: int,
    ) -> Any:
        start = state["start"]
        steps, sources, applied = self._plan(
            group, first, state["applied"], start.device
        )
        if self.expander is not None:
            self.expander.sources = sources
        buffer = torch.empty(
            (len(steps), *start.shape), dtype=start.dtype, device=start.device
        )
        with torch.no_grad():
            for slot, (_, restart, index, columns) in enumerate(steps):
                self._write_pre_activation(state, restart, index, columns, buffer[slot])
        state["applied"] = applied
        # The suffix may change the buffer in place, so the next group starts from a copy.
        state["current"] = buffer[-1].clone()
        return buffer.reshape(len(steps) * start.shape[0], *start.shape[1:])

    def iter_logits(
        self, inputs: Any, batch: int, sets: Sequence[np.ndarray]
    ) -> Iterator[tuple[int, Tensor]]:
        try:
            yield from super().iter_logits(inputs, batch, sets)
        finally:
            if self.expander is not None:
                self.expander.sources = None
