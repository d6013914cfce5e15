"""Scores for ablation curves, accumulated exactly over batches.

Every metric returns the sum of per-example scores and the number of examples for a
batch, so the score of a dataset is total over total (micro averaging). It does not
depend on the batch size, and top-k accuracy can never fall below top-1 accuracy.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MetricFn = Callable[[Tensor, Tensor], Tensor | float]
MetricSpec = str | MetricFn

_TOPK = re.compile(r"top(\d+)")


@dataclass(frozen=True)
class Metric:
    """A named metric: ``batch_sum(logits, targets)`` returns (score sum, count).

    ``group_sums(logits, targets)`` scores several groups of logits for the same
    targets at once: logits of shape (groups, batch, classes) give a tensor of score
    sums of shape (groups,). Metrics without a vectorized form score group by group.
    """

    name: str
    batch_sum: Callable[[Tensor, Tensor], tuple[float, int]]
    vectorized_group_sums: Callable[[Tensor, Tensor], Tensor] | None = None

    def group_sums(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.vectorized_group_sums is not None:
            return self.vectorized_group_sums(logits, targets)
        return torch.tensor(
            [self.batch_sum(group, targets)[0] for group in logits], dtype=torch.float64
        )


def _check_classification(logits: Tensor, targets: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(
            f"Expected logits of shape (batch, classes), but got shape "
            f"{tuple(logits.shape)}. Pass logits_fn to reshape the model output."
        )
    if targets.dim() != 1:
        raise ValueError(
            "Expected targets of shape (batch,), one class index per example, but got a "
            f"batch of shape {tuple(targets.shape)}. {_targets_fix(targets)}"
        )
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"Targets do not match the logits: logits of shape {tuple(logits.shape)} but "
            f"targets of shape {tuple(targets.shape)}. Pass one class index per example."
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"Expected integer class indices as targets, but got dtype {targets.dtype}. "
            "Convert them with targets.long()."
        )
    if targets.numel() and (
        int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]
    ):
        bad = (
            int(targets.max())
            if int(targets.max()) >= logits.shape[1]
            else int(targets.min())
        )
        raise ValueError(
            f"Target {bad} is out of range for a model with {logits.shape[1]} outputs. "
            f"Pass class indices from 0 to {logits.shape[1] - 1}."
        )


def _targets_fix(targets: Tensor) -> str:
    if targets.dim() == 2 and targets.shape[1] == 1:
        return "Pass targets.squeeze(1)."
    if targets.dim() == 2:
        return "For one-hot targets, pass targets.argmax(1)."
    return "Pass one class index per example."


def topk_correct(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Return a boolean tensor of shape (batch,): whether the target is among the top k.

    Classes are ranked by logit, and tied logits by class index, which is how
    ``argmax`` breaks ties. So top-1 equals argmax accuracy and top-k never falls as k
    grows. ``k`` larger than the number of classes counts every example as correct.
    """
    _check_classification(logits, targets)
    return _topk_correct(logits, targets.to(logits.device).long(), k)


def _topk_correct(logits: Tensor, targets: Tensor, k: int) -> Tensor:
    """Compute ``topk_correct`` on checked logits and int64 targets on their device."""
    if k == 1:
        # argmax returns the first of tied maxima, the same tie rule as below.
        return logits.argmax(dim=1) == targets
    target_logits = logits.gather(1, targets.unsqueeze(1))
    classes = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    higher = (logits > target_logits).sum(dim=1)
    tied_before = ((logits == target_logits) & (classes < targets.unsqueeze(1))).sum(
        dim=1
    )
    return higher + tied_before < k


def _check_k(logits: Tensor, k: int) -> None:
    if logits.dim() == 2 and k > logits.shape[1]:
        raise ValueError(
            f"top{k} counts every example as correct when the model has only "
            f"{logits.shape[1]} outputs, so the curve would be flat. Pass a K below "
            f"{logits.shape[1]}, or 'accuracy'."
        )


def _topk_metric(k: int) -> Metric:
    def batch_sum(logits: Tensor, targets: Tensor) -> tuple[float, int]:
        _check_k(logits, k)
        correct = topk_correct(logits, targets, k)
        return float(correct.sum().item()), int(correct.numel())

    def group_sums(logits: Tensor, targets: Tensor) -> Tensor:
        groups, batch = logits.shape[0], logits.shape[1]
        # Checked on one group, before repeating, because repeating targets of the
        # wrong shape fails with a torch error that does not name the targets.
        _check_classification(logits[0], targets)
        _check_k(logits[0], k)
        flat = logits.reshape(groups * batch, *logits.shape[2:])
        repeated = targets.to(logits.device).long().repeat(groups)
        correct = _topk_correct(flat, repeated, k)
        return correct.view(groups, batch).sum(dim=1).cpu().double()

    return Metric("accuracy" if k == 1 else f"top{k}", batch_sum, group_sums)


def _callable_metric(fn: MetricFn) -> Metric:
    name = getattr(fn, "__name__", type(fn).__name__)

    def batch_sum(logits: Tensor, targets: Tensor) -> tuple[float, int]:
        value = fn(logits, targets)
        count = int(logits.shape[0])
        tensor = torch.as_tensor(value, dtype=torch.float64)
        if tensor.dim() == 0:
            # A scalar is taken as the mean over the batch.
            return float(tensor.item()) * count, count
        if tensor.dim() == 1 and tensor.shape[0] == count:
            return float(tensor.sum().item()), count
        raise ValueError(
            f"Metric {name!r} returned a tensor of shape {tuple(tensor.shape)} for a "
            f"batch of {count} examples. Return one score per example, of shape "
            f"({count},), or a scalar batch mean."
        )

    return Metric(name, batch_sum)


def resolve_metric(metric: MetricSpec) -> Metric:
    """Turn ``"accuracy"``, ``"topK"`` or a callable on (logits, targets) into a Metric.

    A callable may return a tensor of per-example scores, of shape (batch,), or a scalar
    that is the batch mean. Either way the dataset score is the mean over all examples.
    """
    if callable(metric):
        return _callable_metric(metric)
    if isinstance(metric, str):
        if metric == "accuracy":
            return _topk_metric(1)
        match = _TOPK.fullmatch(metric)
        if match and int(match.group(1)) >= 1:
            return _topk_metric(int(match.group(1)))
    raise ValueError(
        f"Unknown metric {metric!r}. Pass 'accuracy', 'topK' for a positive integer K "
        "(such as 'top5'), or a callable that takes (logits, targets)."
    )
