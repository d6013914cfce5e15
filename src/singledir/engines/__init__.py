"""Curve engines: ways of scoring many sets of ablated units, all with one result.

``naive`` runs the whole model once per set and is the reference. ``prefix`` caches the
network up to the first ablated layer. ``incremental`` also updates the next layer's
pre-activation one unit at a time. ``auto`` uses the fastest engine that applies to the
model and agrees with ``naive`` on the first chunk of data.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from singledir.engines._graph import SplitError
from singledir.engines.base import Engine, Measurement, split_pooled
from singledir.engines.cached import IncrementalEngine, PrefixEngine
from singledir.engines.naive import NaiveEngine
from singledir.evaluation import map_tensors

logger = logging.getLogger(__name__)

ENGINES = ("auto", "naive", "prefix", "incremental")
_PROBE_EXAMPLES = 64
_CLASSES: dict[str, type[Engine]] = {
    "naive": NaiveEngine,
    "prefix": PrefixEngine,
    "incremental": IncrementalEngine,
}

__all__ = ["ENGINES", "Engine", "Measurement", "build_engine", "split_pooled"]


def _probe_sets(total: int) -> list[np.ndarray]:
    """Return nested unit sets that exercise every code path of the cached engines."""
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(total, generator=generator).numpy()
    sizes = sorted({0, 1, total // 3, total // 2, total - 1, total})
    nested = [order[:size] for size in sizes]
    # A smaller set after a larger one makes the incremental engine restart.
    return [*nested, order[: max(total // 4, 1)]]


def _max_difference(
    engine: Engine, reference: Engine, inputs: Any, batch: int
) -> float:
    # A few dozen examples exercise every code path, at a small fraction of the cost.
    batch = min(batch, _PROBE_EXAMPLES)
    inputs = map_tensors(inputs, lambda tensor: tensor[:batch])
    sets = _probe_sets(engine.measurement.total_units)
    with torch.no_grad():
        ours = torch.cat(
            [logits for _, logits in engine.iter_logits(inputs, batch, sets)]
        )
        theirs = torch.cat(
            [logits for _, logits in reference.iter_logits(inputs, batch, sets)]
        )
    if ours.shape != theirs.shape:
        return float("inf")
    # A NaN that both engines produce is the model's own, and scoring reports it with
    # the set that caused it. A NaN in one engine only is a disagreement.
    ours_nan, theirs_nan = torch.isnan(ours), torch.isnan(theirs)
    if bool((ours_nan != theirs_nan).any()):
        return float("inf")
    ours = ours.masked_fill(ours_nan, 0.0)
    theirs = theirs.masked_fill(theirs_nan, 0.0)
    finite = torch.isfinite(theirs)
    if bool((ours[~finite] != theirs[~finite]).any()):
        return float("inf")
    ours, theirs = ours[finite], theirs[finite]
    if theirs.numel() == 0:
        return 0.0
    scale = max(float(theirs.abs().max()), 1.0)
    return float((ours - theirs).abs().max()) / scale


def _tolerance(inputs: Any) -> float:
    dtype = inputs.dtype if isinstance(inputs, torch.Tensor) else torch.float32
    return 1e-9 if dtype == torch.float64 else 1e-4


def build_engine(
    name: str, measurement: Measurement, inputs: Any, batch: int
) -> Engine:
    """Build engine ``name`` for ``measurement``, checked against naive on ``inputs``.

    Raises:
        ValueError: If ``name`` is unknown, or a cached engine was requested by name but
            does not apply to the model or disagrees with the naive engine.
    """
    if name not in ENGINES:
        raise ValueError(
            f"Unknown engine {name!r}. Choose one of: {', '.join(ENGINES)}."
        )
    naive = NaiveEngine(measurement)
    if name == "naive":
        return naive
    candidates = ["incremental", "prefix"] if name == "auto" else [name]
    tolerance = _tolerance(inputs)
    for candidate in candidates:
        try:
            engine = _CLASSES[candidate](measurement)
            difference = _max_difference(engine, naive, inputs, batch)
        except SplitError as error:
            if name != "auto":
                raise ValueError(
                    f"engine={name!r} does not apply to this model: {error} Use "
                    "engine='auto' or engine='naive'."
                ) from error
            logger.info("Engine %r does not apply: %s", candidate, error)
            continue
        except Exception as error:
            if name != "auto":
                raise
            logger.info("Engine %r failed on the first chunk: %r", candidate, error)
            continue
        finally:
            measurement.clamp.set_units({})
        if difference <= tolerance:
            logger.info(
                "Using engine %r (relative difference from naive %.2g).",
                candidate,
                difference,
            )
            return engine
        message = (
            f"engine={candidate!r} gives logits that differ from the naive engine by "
            f"{difference:.3g} relative to the largest logit, above the tolerance "
            f"{tolerance:g}. The model may mix examples across the batch or fix the batch "
            "size when traced."
        )
        if name != "auto":
            raise ValueError(message + " Use engine='naive'.")
        logger.info(message)
    logger.info("Using engine 'naive'.")
    return naive
