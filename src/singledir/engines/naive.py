"""The reference engine: hooks and a full forward pass for every unit set."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from singledir._outputs import call_model, extract_logits
from singledir.engines.base import Engine, split_pooled


class NaiveEngine(Engine):
    """One full forward pass per unit set and chunk, with the units clamped by hooks."""

    name = "naive"

    def iter_logits(
        self, inputs: Any, batch: int, sets: Sequence[np.ndarray]
    ) -> Iterator[tuple[int, Tensor]]:
        m = self.measurement
        for position, pooled in enumerate(sets):
            m.clamp.set_units(split_pooled(pooled, m.layers))
            yield position, extract_logits(call_model(m.model, inputs), m.logits_fn)
