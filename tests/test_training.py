import pytest
import torch

from singledir import TrainConfig, models, train


def test_mlp_layer_names():
    model = models.mlp(10, hidden=(4, 3), dropout=0.1, batch_norm=True)
    names = [name for name, _ in model.named_children()]
    assert names == [
        "flatten",
        "fc1",
        "bn1",
        "relu1",
        "dropout1",
        "fc2",
        "bn2",
        "relu2",
        "dropout2",
        "out",
    ]
    assert model(torch.zeros(2, 2, 5)).shape == (2, 10)


def test_mlp_rejects_bad_dropout():
    with pytest.raises(
        ValueError,
        match=r"^Expected dropout to be a float in the \[0, 1\) range, but got 1\.0\.$",
    ):
        models.mlp(10, dropout=1.0)


def test_train_stops_at_target_accuracy():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 5, generator=generator)
    targets = (inputs[:, 0] > 0).long()
    torch.manual_seed(0)
    model = models.mlp(5, hidden=(16,), classes=2)
    history = train(
        model,
        (inputs, targets),
        (inputs, targets),
        TrainConfig(epochs=200, lr=0.01, target_train_accuracy=0.95),
    )
    assert history[-1].train_accuracy >= 0.95
    assert all(record.train_accuracy < 0.95 for record in history[:-1])
    assert len(history) < 200
    assert not model.training


def test_train_nan_loss():
    inputs = torch.full((8, 3), float("nan"))
    model = models.mlp(3, hidden=(4,), classes=2)
    message = (
        "The training loss became nan in epoch 1. Lower the learning rate or check the "
        "inputs for NaN values."
    )
    with pytest.raises(FloatingPointError, match=f"^{message}$"):
        train(
            model,
            (inputs, torch.zeros(8, dtype=torch.long)),
            config=TrainConfig(epochs=2),
        )


def test_train_same_seed_same_weights():
    inputs = torch.randn(64, 4)
    targets = torch.randint(0, 3, (64,))
    weights = []
    for _ in range(2):
        torch.manual_seed(5)
        model = models.mlp(4, hidden=(8,), classes=3)
        train(
            model,
            (inputs, targets),
            config=TrainConfig(epochs=3, seed=7, target_train_accuracy=None),
        )
        weights.append(model.fc1.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
