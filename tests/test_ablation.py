import gc
import re
import weakref

import numpy as np
import pytest
import torch
from conftest import (
    SmallConvNet,
    assert_unchanged,
    hook_count,
    random_mlp,
    snapshot,
    two_unit_data,
    two_unit_net,
)
from torch import nn

from singledir import ablate, unit_means


def test_ablate_zero_by_hand():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    with ablate(model, {"relu": [0]}):
        logits = model(inputs)
    expected = torch.tensor(
        [[0.0, 0.0, 0.5], [0.0, 2.0, 0.5], [0.0, 1.0, 0.5], [0.0, 3.0, 0.5]],
        dtype=torch.float64,
    )
    assert torch.equal(logits, expected)


def test_ablate_float_value_by_hand():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    with ablate(model, {"relu": [1]}, value=-1.5):
        logits = model(inputs)
    assert torch.equal(logits[:, 1], torch.full((4,), -1.5, dtype=torch.float64))
    assert torch.equal(
        logits[:, 0], torch.tensor([2.0, 0.0, 2.0, 1.0], dtype=torch.float64)
    )


def test_ablate_per_unit_values_by_hand():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    with ablate(model, {"relu": [0, 1]}, value={"relu": [7.0, 9.0]}):
        logits = model(inputs)
    assert torch.equal(
        logits[:, :2], torch.tensor([[7.0, 9.0]] * 4, dtype=torch.float64)
    )


def test_ablate_leaves_model_as_before():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    reference = model(inputs)
    before = snapshot(model)
    with ablate(model, {"relu": [0, 1]}):
        assert hook_count(model) == before["hooks"] + 1
    assert_unchanged(model, before)
    assert torch.equal(model(inputs), reference)


def test_ablate_exception_keeps_user_hooks():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    seen = []
    user_handle = model.relu.register_forward_hook(lambda m, i, o: seen.append(o.sum()))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="^boom$"), ablate(model, {"relu": [0]}):
        model(inputs)
        raise RuntimeError("boom")
    assert_unchanged(model, before)
    assert user_handle.id in model.relu._forward_hooks
    model(inputs)
    assert len(seen) == 2
    user_handle.remove()


def test_ablate_index_out_of_range():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    before = snapshot(model)
    message = (
        "Unit index 5 is out of range for layer 'relu', which has 2 units. Pass indices "
        "from 0 to 1."
    )
    with (
        pytest.raises(IndexError, match=f"^{re.escape(message)}$"),
        ablate(model, {"relu": [0, 5]}),
    ):
        model(inputs)
    assert_unchanged(model, before)


def test_ablate_negative_index():
    model = two_unit_net()
    message = (
        "Unit indices for layer 'relu' must be non-negative, but got -1. Pass indices "
        "from 0 to the number of units minus 1."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablate(model, {"relu": [-1]}).__enter__()


def test_ablate_unknown_layer():
    model = two_unit_net()
    before = snapshot(model)
    message = (
        "Unknown layer name 'relu2'. The model has these layers: fc, relu, out. Pass "
        "names from model.named_modules()."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablate(model, {"relu2": [0]}).__enter__()
    assert_unchanged(model, before)


def test_ablate_restores_submodule_modes():
    model = SmallConvNet(batch_norm=True)
    model.train()
    model.bn1.eval()
    with ablate(model, {"relu1": [0]}):
        model.train()
        model(torch.randn(2, 2, 4, 4))
    assert model.training
    assert not model.bn1.training


def test_ablate_inplace_relu_matches_out_of_place():
    plain = SmallConvNet(inplace=False).double().eval()
    inplace = SmallConvNet(inplace=True).double().eval()
    inplace.load_state_dict(plain.state_dict())
    inputs = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    units = {"relu1": [0, 3], "relu2": [1]}
    with ablate(plain, units, value=0.25):
        expected = plain(inputs)
    with ablate(inplace, units, value=0.25):
        actual = inplace(inputs)
    assert torch.equal(actual, expected)


def test_ablate_equals_zeroing_next_weights():
    """Zero ablation of a ReLU unit equals zeroing its column in the next Linear."""
    model = random_mlp()
    inputs = torch.randn(10, 6, dtype=torch.float64)
    with ablate(model, {"relu1": [2, 4, 11]}):
        hooked = model(inputs)
    edited = random_mlp()
    with torch.no_grad():
        edited.fc2.weight[:, [2, 4, 11]] = 0.0
    assert torch.allclose(hooked, edited(inputs), rtol=0, atol=1e-12)


def test_unit_means_by_hand():
    model = two_unit_net()
    means = unit_means(model, two_unit_data(), ["relu"], chunk_size=3)
    assert means["relu"].dtype == torch.float64
    assert torch.equal(means["relu"], torch.tensor([1.25, 1.5], dtype=torch.float64))


def test_unit_means_conv_over_every_batch():
    model = SmallConvNet().double()
    inputs = torch.randn(31, 2, 5, 4, dtype=torch.float64)
    targets = torch.zeros(31, dtype=torch.long)
    means = unit_means(model, (inputs, targets), ["relu1", "relu2"], chunk_size=7)
    with torch.no_grad():
        first = torch.relu(model.conv1(inputs))
        second = torch.relu(model.conv2(first))
    for name, activation in (("relu1", first), ("relu2", second)):
        expected = activation.numpy().mean(axis=(0, 2, 3))
        np.testing.assert_allclose(means[name].numpy(), expected, rtol=1e-12)


def test_unit_means_inplace_not_corrupted_later():
    class AddAfter(nn.Module):
        def forward(self, x):
            return x.add_(100.0)

    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), AddAfter()).double()
    inputs = torch.randn(9, 3, dtype=torch.float64)
    means = unit_means(
        model, (inputs, torch.zeros(9, dtype=torch.long)), ["1"], chunk_size=4
    )
    with torch.no_grad():
        expected = torch.relu(model[0](inputs)).mean(dim=0)
    assert torch.allclose(means["1"], expected, rtol=0, atol=1e-12)


def test_unit_means_keeps_no_activation():
    model = SmallConvNet()
    alive = []
    handle = model.relu1.register_forward_hook(
        lambda m, i, o: alive.append(weakref.ref(o))
    )
    data = (torch.randn(40, 2, 6, 6), torch.zeros(40, dtype=torch.long))
    unit_means(model, data, ["relu1"], chunk_size=8)
    handle.remove()
    gc.collect()
    assert len(alive) == 5
    assert all(reference() is None for reference in alive)


def test_unit_means_mean_ablation_by_hand():
    model = two_unit_net()
    inputs, _ = two_unit_data()
    means = unit_means(model, two_unit_data(), ["relu"])
    with ablate(model, {"relu": [0]}, value=means):
        logits = model(inputs)
    assert torch.equal(logits[:, 0], torch.full((4,), 1.25, dtype=torch.float64))


def test_unit_means_leaves_train_mode():
    model = SmallConvNet(batch_norm=True)
    model.train()
    before = snapshot(model)
    unit_means(
        model, (torch.randn(6, 2, 4, 4), torch.zeros(6, dtype=torch.long)), ["relu1"]
    )
    assert_unchanged(model, before)


def test_ablate_rejects_boolean_mask():
    model = nn.Sequential(nn.Identity())
    message = (
        "Expected integer unit indices for layer '0', but got dtype bool. Pass indices "
        "such as [0, 5]; turn a boolean mask into indices with mask.nonzero()."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        ablate(model, {"0": torch.tensor([False, True])}).__enter__()
    with pytest.raises(TypeError, match="^Expected integer unit indices"):
        ablate(model, {"0": [1.9]}).__enter__()
    assert hook_count(model) == 0


def test_ablate_never_writes_layer_output():
    # nn.Identity returns its input, so a hook that edited its output in place would
    # change the caller's tensor.
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 2))
    inputs = torch.ones(2, 3)
    with ablate(model, {"0": [1]}):
        model(inputs)
    assert torch.equal(inputs, torch.ones(2, 3))


def test_ablate_mask_follows_layer_size():
    model = nn.Sequential(nn.Identity())
    with ablate(model, {"0": [1]}):
        small = model(torch.ones(1, 2))
        large = model(torch.ones(1, 5))
    assert small.tolist() == [[1.0, 0.0]]
    assert large.tolist() == [[1.0, 0.0, 1.0, 1.0, 1.0]]


def test_ablate_rejects_batch_unit_dim():
    model = nn.Sequential(nn.Identity())
    before = snapshot(model)
    message = (
        "unit_dim=0 is the batch dimension of layer '0'. Pass the dimension along which "
        "the units lie, such as 1."
    )
    with (
        pytest.raises(ValueError, match=f"^{re.escape(message)}$"),
        ablate(model, {"0": [0]}, unit_dim=0),
    ):
        model(torch.ones(2, 3))
    assert_unchanged(model, before)


def test_ablate_rejects_missing_unit_dim():
    model = nn.Sequential(nn.Identity())
    message = (
        "Layer '0' outputs a tensor of shape (2, 3), which has no unit dimension 2 after "
        "the batch dimension. Pass unit_dim, the dimension along which the units lie."
    )
    with (
        pytest.raises(ValueError, match=f"^{re.escape(message)}$"),
        ablate(model, {"0": [0]}, unit_dim=2),
    ):
        model(torch.ones(2, 3))


def test_unit_means_rejects_reused_module():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(self.act(x)))

    message = (
        "Layer 'act' runs 2 times in one forward pass, so its calls would be averaged "
        "together. Give each use its own module instance."
    )
    data = (torch.randn(6, 3), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        unit_means(Shared(), data, ["act"], chunk_size=4)


def test_unit_means_leaves_global_rng():
    from torch.utils.data import TensorDataset

    model = SmallConvNet()
    dataset = TensorDataset(torch.randn(6, 2, 4, 4), torch.zeros(6, dtype=torch.long))
    state = torch.get_rng_state()
    unit_means(model, dataset, ["relu1"])
    assert torch.equal(torch.get_rng_state(), state)
