"""Scoring a model over a whole dataset, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from singledir._model_state import model_device
from singledir._outputs import call_model, extract_logits
from singledir.metrics import Metric


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.to(device)
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(to_device(item, device) for item in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(to_device(item, device) for item in inputs)
    if isinstance(inputs, dict):
        return {key: to_device(item, device) for key, item in inputs.items()}
    return inputs


def check_logits(logits: Tensor, context: str) -> None:
    """Raise ValueError if any logit is NaN, naming where it happened."""
    if logits.dim() == 0:
        raise ValueError(
            f"Expected logits of shape (batch, classes), but the model returned a scalar "
            f"{context}. Pass logits_fn to reshape the model output."
        )
    nan_rows = torch.isnan(logits).reshape(logits.shape[0], -1).any(dim=1)
    if bool(nan_rows.any()):
        raise ValueError(
            f"The model produced NaN logits for {int(nan_rows.sum())} of "
            f"{logits.shape[0]} examples in a batch {context}. Check the model's weights "
            "and inputs for NaN or infinite values."
        )


def score_batches(
    model: nn.Module,
    batches: Iterable[tuple[Any, Tensor]],
    metric: Metric,
    *,
    logits_fn: Callable[[Any], Tensor] | None = None,
    context: str = "",
) -> float:
    """Return the metric over all batches as total score over total examples.

    The caller chooses the mode and the gradient setting; this only runs the model.
    """
    device = model_device(model)
    total = 0.0
    count = 0
    for inputs, targets in batches:
        logits = extract_logits(call_model(model, to_device(inputs, device)), logits_fn)
        check_logits(logits, context)
        batch_total, batch_count = metric.batch_sum(logits, targets.to(logits.device))
        total += batch_total
        count += batch_count
    return total / count
