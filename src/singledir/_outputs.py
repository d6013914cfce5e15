"""Helpers that find the unit tensor inside a layer's or a model's output.

Some modules return tuples, lists or dicts. A layer's units then live in one element of
that container, which the caller names with an ``output_key``. Every error here names
the layer and the actual type, because a bare ``AttributeError`` from deep inside a hook
is the most common way hook-based tools confuse their users.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

OutputKey = int | str


def select_output(output: Any, key: OutputKey | None, layer: str) -> Tensor:
    """Return the tensor that contains the units of ``layer`` from its raw output."""
    if key is None:
        if isinstance(output, Tensor):
            return output
        raise TypeError(
            f"Layer '{layer}' returned a {type(output).__name__}, not a tensor, so its "
            f"units cannot be found. Pass output_keys={{'{layer}': KEY}}, where KEY is "
            "the index or dict key of the element that contains the units."
        )
    if isinstance(output, Tensor):
        raise TypeError(
            f"output_keys['{layer}'] is {key!r}, but the layer returned a tensor, not a "
            f"container. Remove '{layer}' from output_keys."
        )
    if (
        isinstance(output, tuple)
        and hasattr(output, "_fields")
        and isinstance(key, str)
    ):
        output = output._asdict()
    try:
        selected = output[key]
    except (KeyError, IndexError, TypeError) as error:
        raise TypeError(
            f"output_keys['{layer}'] is {key!r}, but the layer returned a "
            f"{type(output).__name__} that has no element {key!r}. Pass the index or "
            "dict key of the element that contains the units."
        ) from error
    if not isinstance(selected, Tensor):
        raise TypeError(
            f"Element {key!r} of the output of layer '{layer}' is a "
            f"{type(selected).__name__}, not a tensor. Pass the index or dict key of "
            "the element that contains the units in output_keys."
        )
    return selected


def replace_output(output: Any, key: OutputKey | None, new: Tensor) -> Any:
    """Return ``output`` with the unit tensor swapped for ``new``, as a new container."""
    if key is None:
        return new
    if (
        isinstance(output, tuple)
        and hasattr(output, "_fields")
        and isinstance(key, str)
    ):
        return output._replace(**{key: new})
    if isinstance(output, tuple):
        items = list(output)
        items[key] = new
        # Named tuples are rebuilt through their own constructor.
        return type(output)(*items) if hasattr(output, "_fields") else tuple(items)
    if isinstance(output, list):
        items = list(output)
        items[key] = new
        return items
    if isinstance(output, Mapping):
        updated = dict(output)
        updated[key] = new
        return type(output)(updated) if type(output) is not dict else updated
    raise TypeError(f"Cannot replace element {key!r} of a {type(output).__name__}.")


def extract_logits(output: Any, logits_fn: Callable[[Any], Tensor] | None) -> Tensor:
    """Return the logits from a model's output, raising a clear error if there are none."""
    if logits_fn is not None:
        logits = logits_fn(output)
        if not isinstance(logits, Tensor):
            raise TypeError(
                f"logits_fn returned a {type(logits).__name__}, not a tensor. It must "
                "return the logits as a tensor of shape (batch, classes)."
            )
        return logits
    if isinstance(output, Tensor):
        return output
    raise TypeError(
        f"The model returned a {type(output).__name__}, not a tensor, so the logits "
        "cannot be found. Pass logits_fn, a function that takes the model output and "
        "returns the logits, for example logits_fn=lambda output: output['logits'] or "
        "logits_fn=lambda output: output[0]."
    )


def call_model(model: torch.nn.Module, inputs: Any) -> Any:
    """Run ``model`` on a batch of inputs: a tensor, a tuple of arguments or a dict."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(inputs)
