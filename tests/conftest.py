"""Shared fixtures: small networks with hand-set or seeded weights."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(1234)


def two_unit_net() -> nn.Sequential:
    """A net whose curve is computed by hand in the tests.

    hidden = relu(x), logits = (h1, h2, 0.5). On the four examples of ``two_unit_data``
    the accuracy is 3/4 unablated, 1/4 with h1 ablated, 2/4 with h2 ablated and 1/4 with
    both ablated.
    """
    model = nn.Sequential(
        OrderedDict(
            [
                ("fc", nn.Linear(2, 2, bias=False)),
                ("relu", nn.ReLU()),
                ("out", nn.Linear(2, 3)),
            ]
        )
    ).double()
    with torch.no_grad():
        model.fc.weight.copy_(torch.eye(2))
        model.out.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        model.out.bias.copy_(torch.tensor([0.0, 0.0, 0.5]))
    return model


def two_unit_data() -> tuple[torch.Tensor, torch.Tensor]:
    inputs = torch.tensor(
        [[2.0, 0.0], [0.0, 2.0], [2.0, 1.0], [1.0, 3.0]], dtype=torch.float64
    )
    targets = torch.tensor([0, 1, 0, 2])
    return inputs, targets


def random_mlp(widths=(6, 13, 7), classes=4, seed=0) -> nn.Sequential:
    generator = torch.Generator().manual_seed(seed)
    layers = []
    for index in range(1, len(widths)):
        layers.append((f"fc{index}", nn.Linear(widths[index - 1], widths[index])))
        layers.append((f"relu{index}", nn.ReLU()))
    layers.append(("out", nn.Linear(widths[-1], classes)))
    model = nn.Sequential(OrderedDict(layers)).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(
                torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
            )
    return model


class SmallConvNet(nn.Module):
    def __init__(self, inplace: bool = False, batch_norm: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 5, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(5) if batch_norm else nn.Identity()
        self.relu1 = nn.ReLU(inplace=inplace)
        self.conv2 = nn.Conv2d(5, 4, 3, padding=1)
        self.relu2 = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.conv2(x))
        return self.head(self.pool(x).flatten(1))


def hook_count(model: nn.Module) -> int:
    return sum(
        len(module._forward_hooks) + len(module._forward_pre_hooks)
        for module in model.modules()
    )


def snapshot(model: nn.Module) -> dict:
    return {
        "state": {key: value.clone() for key, value in model.state_dict().items()},
        "modes": [module.training for module in model.modules()],
        "hooks": hook_count(model),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["hooks"] == before["hooks"]
    assert after["modes"] == before["modes"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        torch.testing.assert_close(
            value, after["state"][key], rtol=0, atol=0, equal_nan=True
        )
