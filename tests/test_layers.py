import re

import pytest
import torch
from conftest import SmallConvNet, assert_unchanged, random_mlp, snapshot
from torch import nn

from singledir import find_layers, models, unit_name


def test_find_layers_mlp_in_forward_order():
    model = models.mlp(20, hidden=(8, 5))
    found = find_layers(model, torch.zeros(3, 20))
    assert [layer.name for layer in found] == ["relu1", "relu2"]
    assert [layer.shape for layer in found] == [(3, 8), (3, 5)]
    assert [layer.num_units for layer in found] == [8, 5]
    assert all(layer.calls == 1 for layer in found)
    assert found[0].module_type == "ReLU"


def test_find_layers_conv_units_are_channels():
    model = SmallConvNet()
    found = find_layers(model, torch.zeros(2, 2, 6, 6))
    assert [(layer.name, layer.num_units) for layer in found] == [
        ("relu1", 5),
        ("relu2", 4),
    ]
    assert found[0].shape == (2, 5, 6, 6)


def test_find_layers_any_named_module():
    model = SmallConvNet()
    found = find_layers(model, torch.zeros(1, 2, 4, 4), layers=["conv2", "pool"])
    assert [layer.name for layer in found] == ["conv2", "pool"]
    assert found[1].shape == (1, 4, 1, 1)


def test_find_layers_unit_dim_for_sequences():
    model = nn.Sequential(nn.Linear(4, 6), nn.GELU(), nn.Linear(6, 2))
    found = find_layers(model, torch.zeros(2, 9, 4), unit_dim=2)
    assert found[0].name == "1"
    assert found[0].num_units == 6


def test_find_layers_counts_reused_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc2(self.act(self.fc1(x))))

    found = find_layers(Shared(), torch.zeros(1, 3))
    assert found[0].calls == 2


def test_find_layers_unknown_name_lists_layers():
    model = random_mlp()
    before = snapshot(model)
    message = (
        "Unknown layer name 'relu9'. The model has these layers: fc1, relu1, fc2, relu2, "
        "out. Pass names from model.named_modules()."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        find_layers(model, torch.zeros(1, 6, dtype=torch.float64), layers=["relu9"])
    assert_unchanged(model, before)


def test_find_layers_string_instead_of_list():
    model = random_mlp()
    with pytest.raises(
        TypeError, match="^Expected layers to be a sequence of layer names"
    ):
        find_layers(model, torch.zeros(1, 6, dtype=torch.float64), layers="relu1")


def test_find_layers_tuple_output_needs_key():
    class TupleLayer(nn.Module):
        def forward(self, x):
            return torch.relu(x), x.sum()

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 4)
            self.block = TupleLayer()

        def forward(self, x):
            return self.block(self.fc(x))[0]

    model = Model()
    message = (
        "Layer 'block' returned a tuple, not a tensor, so its units cannot be found. "
        "Pass output_keys={'block': KEY}, where KEY is the index or dict key of the "
        "element that contains the units."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        find_layers(model, torch.zeros(2, 3), layers=["block"])
    assert hook_free(model)
    found = find_layers(
        model, torch.zeros(2, 3), layers=["block"], output_keys={"block": 0}
    )
    assert found[0].num_units == 4


def hook_free(model):
    return all(not module._forward_hooks for module in model.modules())


def test_unit_name_is_canonical():
    assert unit_name("relu1", 17) == "relu1[17]"
