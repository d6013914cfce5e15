"""Context managers that leave a user's model exactly as they found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def preserved_mode(model: nn.Module, *, evaluate: bool = False) -> Iterator[None]:
    """Restore the train/eval flag of every submodule on exit, optionally entering eval.

    Flags are saved per submodule, not only on the root, because ``model.train()`` on the
    root would otherwise flip a submodule that the user had frozen in eval mode.
    """
    flags = [(module, module.training) for module in model.modules()]
    try:
        if evaluate:
            model.eval()
        yield
    finally:
        for module, training in flags:
            module.training = training


@contextmanager
def registered_hooks() -> Iterator[list[RemovableHandle]]:
    """Collect hook handles in a list and remove exactly those on exit.

    Only the handles appended to the list are removed, so the user's own hooks survive
    even when a hook of ours raised midway through a forward pass.
    """
    handles: list[RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the global CPU random state on exit.

    Iterating a DataLoader draws its base seed from the global generator, so without
    this a measurement would shift the random numbers of the caller's later code.
    """
    with torch.random.fork_rng(devices=[]):
        yield


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer, or the CPU."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")
