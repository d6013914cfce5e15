"""The engine interface: score many sets of ablated units over one dataset.

A *unit set* is a 1-D array of pooled unit indices (see ``split_pooled``). Every engine
returns, for each set, the metric over the whole dataset with exactly those units
clamped, as total score over total examples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from singledir._model_state import model_device
from singledir.ablation import UnitClamp
from singledir.evaluation import check_logits, to_device
from singledir.layers import LayerInfo
from singledir.metrics import Metric


def split_pooled(
    pooled: np.ndarray, layers: Sequence[LayerInfo]
) -> dict[str, np.ndarray]:
    """Map pooled unit indices back to per-layer unit indices.

    Pooled index i of layer j is ``sum(num_units of layers[:j]) + i``.
    """
    pooled = np.asarray(pooled, dtype=np.int64)
    offsets = np.cumsum([0] + [layer.num_units for layer in layers])
    units = {}
    for position, layer in enumerate(layers):
        start, stop = offsets[position], offsets[position + 1]
        chosen = pooled[(pooled >= start) & (pooled < stop)]
        units[layer.name] = np.sort(chosen - start)
    return units


@dataclass
class Measurement:
    """Everything an engine needs to score unit sets on one model and dataset."""

    model: nn.Module
    batches: Callable[[], Iterable[tuple[Any, Tensor]]]
    layers: list[LayerInfo]
    clamp: UnitClamp
    metric: Metric
    logits_fn: Callable[[Any], Tensor] | None
    unit_dim: int
    output_keys: dict

    @property
    def total_units(self) -> int:
        return sum(layer.num_units for layer in self.layers)


class Engine:
    """Scores unit sets; subclasses differ only in how much work they repeat.

    Subclasses implement ``iter_logits``. The loop over chunks of examples is shared:
    each chunk is read once per ``score_sets`` call, so memory is bounded by the chunk.
    """

    name = "engine"

    def __init__(self, measurement: Measurement) -> None:
        self.measurement = measurement

    def iter_logits(
        self, inputs: Any, batch: int, sets: Sequence[np.ndarray]
    ) -> Iterator[tuple[int, Tensor]]:
        """Yield ``(first, logits)`` for consecutive groups of ``sets`` on one chunk.

        ``logits`` stacks the chunk's logits for sets ``first``, ``first + 1``, ... along
        dimension 0, ``batch`` rows per set.
        """
        raise NotImplementedError

    def score_sets(
        self, sets: Sequence[np.ndarray], context: str | Sequence[str] = ""
    ) -> np.ndarray:
        """Return the score of each unit set over the whole dataset, shape (len(sets),).

        ``context`` ends error messages about a set: one string for every set, or one
        per set, such as the ordering the set belongs to.
        """
        m = self.measurement
        device = model_device(m.model)
        totals = np.zeros(len(sets), dtype=np.float64)
        counts = np.zeros(len(sets), dtype=np.int64)
        for inputs, targets in m.batches():
            batch = int(targets.shape[0])
            for first, logits in self.iter_logits(
                to_device(inputs, device), batch, sets
            ):
                groups = logits.shape[0] // batch
                grouped = logits.reshape(groups, batch, *logits.shape[1:])
                has_nan = torch.isnan(grouped.reshape(groups, -1)).any(dim=1)
                if bool(has_nan.any()):
                    offset = int(has_nan.nonzero()[0, 0])
                    position = first + offset
                    ablated = len(sets[position])
                    label = context if isinstance(context, str) else context[position]
                    check_logits(
                        grouped[offset],
                        f"with {ablated} of {m.total_units} units ablated{label}",
                    )
                sums = m.metric.group_sums(grouped, targets.to(logits.device))
                totals[first : first + groups] += sums.numpy()
                counts[first : first + groups] += batch
        return totals / counts
