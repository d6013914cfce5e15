import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, top_k_accuracy_score

from singledir.evaluation import score_batches
from singledir.metrics import resolve_metric, topk_correct


def batched(logits, targets, size):
    return [
        (logits[i : i + size], targets[i : i + size])
        for i in range(0, len(targets), size)
    ]


class Identity(torch.nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_matches_sklearn(k):
    generator = torch.Generator().manual_seed(k)
    logits = torch.randn(103, 7, generator=generator, dtype=torch.float64)
    targets = torch.randint(0, 7, (103,), generator=generator)
    expected = top_k_accuracy_score(
        targets.numpy(), logits.numpy(), k=k, labels=np.arange(7)
    )
    metric = resolve_metric("accuracy" if k == 1 else f"top{k}")
    score = score_batches(Identity(), batched(logits, targets, 10), metric)
    assert score == pytest.approx(expected, abs=1e-12)


def test_topk_with_classes_missing_from_batches():
    # Every batch contains examples of one class only, which broke macro-averaged helpers.
    logits = torch.randn(60, 10, dtype=torch.float64)
    targets = torch.repeat_interleave(torch.arange(6), 10)
    scores = [
        score_batches(
            Identity(), batched(logits, targets, 10), resolve_metric(f"top{k}")
        )
        for k in range(1, 11)
    ]
    assert scores == sorted(scores)
    assert scores[-1] == 1.0
    assert scores[0] == pytest.approx(
        accuracy_score(targets, logits.argmax(1)), abs=1e-12
    )


def test_topk_larger_than_classes_counts_all():
    logits = torch.randn(4, 3)
    assert topk_correct(logits, torch.tensor([0, 1, 2, 0]), k=5).all()


def test_accuracy_is_total_over_total():
    # Batches of 3 and 1: the mean of batch means would be (1/3 + 1) / 2 = 2/3.
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    targets = torch.tensor([0, 1, 1, 1])
    score = score_batches(
        Identity(), batched(logits, targets, 3), resolve_metric("accuracy")
    )
    assert score == 0.5


def test_callable_metric_bad_shape():
    def bad(logits, targets):
        return logits

    metric = resolve_metric(bad)
    with pytest.raises(
        ValueError, match=r"^Metric 'bad' returned a tensor of shape \(4, 2\)"
    ):
        metric.batch_sum(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))


def test_float_targets_rejected():
    message = (
        "Expected integer class indices as targets, but got dtype torch.float32. Convert "
        "them with targets.long()."
    )
    with pytest.raises(
        ValueError, match=f"^{message.replace('(', '[(]').replace(')', '[)]')}$"
    ):
        topk_correct(torch.zeros(2, 3), torch.zeros(2), k=1)


def test_topk_ties_follow_argmax():
    logits = torch.zeros(6, 10)
    targets = torch.tensor([0, 1, 2, 3, 9, 0])
    assert topk_correct(logits, targets, 1).tolist() == [
        True,
        False,
        False,
        False,
        False,
        True,
    ]
    assert topk_correct(logits, targets, 3).tolist() == [
        True,
        True,
        True,
        False,
        False,
        True,
    ]
    assert torch.equal(topk_correct(logits, targets, 1), logits.argmax(1) == targets)
