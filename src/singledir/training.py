"""A plain supervised training loop for the experiments' classifiers."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from singledir._model_state import preserved_mode

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Settings of ``train``.

    Attributes:
        epochs: Maximum number of passes over the training set.
        batch_size: Examples per optimizer step.
        lr: Learning rate.
        optimizer: "adam" or "sgd".
        momentum: Momentum for "sgd".
        weight_decay: L2 penalty coefficient.
        target_train_accuracy: Stop after the first epoch whose training accuracy, in
            eval mode over the whole training set, reaches this. None never stops early.
        seed: Seed of the generator that shuffles the training set.
    """

    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    target_train_accuracy: float | None = 0.99
    seed: int = 0


@dataclass
class EpochRecord:
    """Losses and accuracies after one epoch, all in eval mode over whole sets."""

    epoch: int
    train_loss: float
    train_accuracy: float
    test_loss: float | None
    test_accuracy: float | None


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
    raise ValueError(f"Unknown optimizer {config.optimizer!r}. Pass 'adam' or 'sgd'.")


@torch.no_grad()
def evaluate_loss_accuracy(
    model: nn.Module, inputs: Tensor, targets: Tensor, batch_size: int = 1024
) -> tuple[float, float]:
    """Return mean cross-entropy and accuracy over all examples, in eval mode."""
    loss_sum = 0.0
    correct = 0
    with preserved_mode(model, evaluate=True):
        for start in range(0, inputs.shape[0], batch_size):
            logits = model(inputs[start : start + batch_size])
            batch_targets = targets[start : start + batch_size]
            loss_sum += float(F.cross_entropy(logits, batch_targets, reduction="sum"))
            correct += int((logits.argmax(dim=1) == batch_targets).sum())
    return loss_sum / inputs.shape[0], correct / inputs.shape[0]


def train(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor] | None = None,
    config: TrainConfig | None = None,
    on_epoch: Callable[[EpochRecord], None] | None = None,
) -> list[EpochRecord]:
    """Train ``model`` with cross-entropy on in-memory tensors, in place.

    After every epoch, loss and accuracy are measured in eval mode on the whole training
    set and, if given, the test set. They are logged, passed to ``on_epoch`` and
    returned. Training stops at ``config.epochs`` or once the training accuracy reaches
    ``config.target_train_accuracy``. The model is left in eval mode.

    Raises:
        FloatingPointError: If the training loss becomes NaN or infinite.
    """
    config = config or TrainConfig()
    logger.info("Training with %s", asdict(config))
    # Dropout masks come from the global random state. It is seeded from config.seed
    # for the run and restored afterwards, so the seed fixes the whole run and the
    # caller's random state is as before.
    devices = sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.seed)
        history = _train_epochs(model, train_data, test_data, config, on_epoch)
    target = config.target_train_accuracy
    if target is not None and history[-1].train_accuracy < target:
        logger.warning(
            "Training accuracy %.4f is below the target %.4f after %d epochs.",
            history[-1].train_accuracy,
            target,
            config.epochs,
        )
    model.eval()
    return history


def _train_epochs(
    model: nn.Module,
    train_data: tuple[Tensor, Tensor],
    test_data: tuple[Tensor, Tensor] | None,
    config: TrainConfig,
    on_epoch: Callable[[EpochRecord], None] | None,
) -> list[EpochRecord]:
    inputs, targets = train_data
    generator = torch.Generator().manual_seed(config.seed)
    optimizer = _make_optimizer(model, config)
    history: list[EpochRecord] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        order = torch.randperm(inputs.shape[0], generator=generator)
        for start in range(0, inputs.shape[0], config.batch_size):
            batch = order[start : start + config.batch_size]
            loss = F.cross_entropy(model(inputs[batch]), targets[batch])
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"The training loss became {loss.item()} in epoch {epoch}. Lower the "
                    "learning rate or check the inputs for NaN values."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        train_loss, train_accuracy = evaluate_loss_accuracy(model, inputs, targets)
        test_loss = test_accuracy = None
        if test_data is not None:
            test_loss, test_accuracy = evaluate_loss_accuracy(model, *test_data)
        record = EpochRecord(
            epoch, train_loss, train_accuracy, test_loss, test_accuracy
        )
        history.append(record)
        logger.info(
            "epoch %d: train loss %.4f, train accuracy %.4f, test loss %s, test accuracy %s",
            epoch,
            train_loss,
            train_accuracy,
            "n/a" if test_loss is None else f"{test_loss:.4f}",
            "n/a" if test_accuracy is None else f"{test_accuracy:.4f}",
        )
        if on_epoch is not None:
            on_epoch(record)
        target = config.target_train_accuracy
        if target is not None and train_accuracy >= target:
            break
    return history
