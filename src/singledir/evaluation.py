"""Scoring a model over a whole dataset, batch by batch."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from singledir._model_state import model_device
from singledir._outputs import call_model, extract_logits
from singledir.metrics import Metric


def map_tensors(inputs: Any, function: Callable[[Tensor], Any]) -> Any:
    """Apply ``function`` to every tensor in nested tuples, lists and dicts of inputs."""
    if isinstance(inputs, Tensor):
        return function(inputs)
    if isinstance(inputs, tuple) and hasattr(inputs, "_fields"):
        return type(inputs)(*(map_tensors(item, function) for item in inputs))
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(map_tensors(item, function) for item in inputs)
    if isinstance(inputs, dict):
        return {key: map_tensors(item, function) for key, item in inputs.items()}
    return inputs


def to_device(inputs: Any, device: torch.device) -> Any:
    return map_tensors(inputs, lambda tensor: tensor.to(device))


# Tensor methods that convert to each floating-point dtype, for error messages.
_DTYPE_METHODS = {
    torch.float64: "double",
    torch.float32: "float",
    torch.float16: "half",
    torch.bfloat16: "bfloat16",
}


def _floating_dtypes(inputs: Any) -> set[torch.dtype]:
    if isinstance(inputs, Tensor):
        return {inputs.dtype} if inputs.is_floating_point() else set()
    if isinstance(inputs, dict):
        inputs = list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return set().union(*(_floating_dtypes(item) for item in inputs))
    return set()


def _conversion(name: str, dtype: torch.dtype) -> str:
    method = _DTYPE_METHODS.get(dtype)
    return f"{name}.{method}()" if method else f"{name}.to({dtype})"


def input_dtype_error(model: nn.Module, inputs: Any) -> TypeError | None:
    """Build the error for floating-point inputs whose dtype differs from the model's.

    Returns None if the dtypes match, or if the inputs or the parameters have no single
    floating-point dtype. The caller decides whether to raise the error, because a
    model may cast its own inputs.
    """
    parameter_dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    input_dtypes = _floating_dtypes(inputs)
    if len(parameter_dtypes) != 1 or len(input_dtypes) != 1:
        return None
    (expected,), (given,) = parameter_dtypes, input_dtypes
    if expected == given:
        return None
    return TypeError(
        f"Expected floating-point inputs of dtype {expected}, the dtype of the model's "
        f"parameters, but got {given}. Convert the inputs with "
        f"{_conversion('inputs', expected)} or the model with "
        f"{_conversion('model', given)}."
    )


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
