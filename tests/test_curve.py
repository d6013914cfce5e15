import gc
import math
import re
import weakref

import matplotlib

matplotlib.use("Agg")

import itertools

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
from scipy.integrate import trapezoid
from sklearn.metrics import accuracy_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from singledir import AblationCurve, ablation_curve, normalized_auc, unit_means
from singledir.curve import draw_orders, resolve_points

# Accuracy of two_unit_net for each set of ablated hidden units, computed by hand.
HAND_ACCURACY = {(): 0.75, (0,): 0.25, (1,): 0.5, (0, 1): 0.25}


def test_curve_by_hand():
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=10, seed=3)
    assert curve.num_ablated.tolist() == [0, 1, 2]
    assert curve.fraction.tolist() == [0.0, 0.5, 1.0]
    assert curve.scores.shape == (10, 3)
    for order, scores in zip(curve.orders, curve.scores):
        expected = [
            HAND_ACCURACY[()],
            HAND_ACCURACY[(int(order[0]),)],
            HAND_ACCURACY[(0, 1)],
        ]
        assert scores.tolist() == expected
    first_unit = curve.orders[:, 0]
    assert set(first_unit.tolist()) == {0, 1}
    # Trapezoids over fractions 0, 0.5, 1: unit 0 first gives 0.375, unit 1 first 0.5.
    expected_auc = np.where(first_unit == 0, 0.375, 0.5)
    np.testing.assert_allclose(curve.auc_per_ordering, expected_auc, rtol=0, atol=1e-15)
    assert math.isclose(curve.auc, expected_auc.mean(), abs_tol=1e-15)
    assert math.isclose(curve.relative_auc, expected_auc.mean() / 0.75, abs_tol=1e-15)
    assert curve.unablated_score == 0.75


def test_curve_mean_value_by_hand():
    # With h1 clamped to its mean 1.25, logits (1.25, h2, 0.5) still get 3/4 right,
    # and so do (h1, 1.5, 0.5) with h2 clamped to its mean 1.5. With both clamped every
    # example is predicted as class 1, which is right for 1/4.
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=4, value="mean")
    for scores in curve.scores:
        assert scores.tolist() == [0.75, 0.75, 0.25]
    assert curve.value == "mean"


def naive_mlp_scores(model, inputs, targets, curve):
    """Score every point with a hand-written forward pass that zeroes units."""
    sizes = curve.layer_sizes
    scores = np.zeros_like(curve.scores)
    with torch.no_grad():
        for row, order in enumerate(curve.orders):
            for column, k in enumerate(curve.num_ablated):
                ablated = order[:k]
                first = ablated[ablated < sizes[0]]
                second = ablated[ablated >= sizes[0]] - sizes[0]
                hidden = torch.relu(model.fc1(inputs))
                hidden[:, first] = 0.0
                hidden = torch.relu(model.fc2(hidden))
                hidden[:, second] = 0.0
                predictions = model.out(hidden).argmax(dim=1)
                scores[row, column] = accuracy_score(
                    targets.numpy(), predictions.numpy()
                )
    return scores


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_curve_matches_naive_loop_mlp(seed):
    model = random_mlp(seed=seed)
    inputs = torch.randn(57, 6, dtype=torch.float64)
    targets = torch.randint(0, 4, (57,))
    curve = ablation_curve(
        model, (inputs, targets), orderings=3, seed=seed, chunk_size=10
    )
    assert curve.total_units == 20
    assert curve.layers == ["relu1", "relu2"]
    np.testing.assert_array_equal(
        curve.scores, naive_mlp_scores(model, inputs, targets, curve)
    )


def test_curve_matches_naive_loop_conv():
    model = SmallConvNet().double().eval()
    inputs = torch.randn(23, 2, 5, 5, dtype=torch.float64)
    targets = torch.randint(0, 3, (23,))
    curve = ablation_curve(
        model, (inputs, targets), orderings=2, points=4, chunk_size=6
    )
    scores = np.zeros_like(curve.scores)
    with torch.no_grad():
        for row, order in enumerate(curve.orders):
            for column, k in enumerate(curve.num_ablated):
                ablated = order[:k]
                x = torch.relu(model.conv1(inputs))
                x[:, ablated[ablated < 5]] = 0.0
                x = torch.relu(model.conv2(x))
                x[:, ablated[ablated >= 5] - 5] = 0.0
                logits = model.head(model.pool(x).flatten(1))
                scores[row, column] = (
                    (logits.argmax(1) == targets).double().mean().item()
                )
    np.testing.assert_array_equal(curve.scores, scores)


def test_curve_same_for_every_data_form():
    model = random_mlp(seed=4)
    inputs = torch.randn(40, 6, dtype=torch.float64)
    targets = torch.randint(0, 4, (40,))
    from_tensors = ablation_curve(model, (inputs, targets), orderings=2, chunk_size=40)
    dataset = TensorDataset(inputs, targets)
    from_dataset = ablation_curve(model, dataset, orderings=2, chunk_size=3)
    from_loader = ablation_curve(model, DataLoader(dataset, batch_size=1), orderings=2)
    np.testing.assert_array_equal(from_tensors.scores, from_dataset.scores)
    np.testing.assert_array_equal(from_tensors.scores, from_loader.scores)


def test_curve_deterministic_for_seed():
    model = random_mlp(seed=5)
    data = (torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 4, (30,)))
    first = ablation_curve(model, data, orderings=3, seed=11)
    torch.manual_seed(999)
    second = ablation_curve(model, data, orderings=3, seed=11)
    other = ablation_curve(model, data, orderings=3, seed=12)
    np.testing.assert_array_equal(first.orders, second.orders)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert not np.array_equal(first.orders, other.orders)


def test_orders_from_dedicated_cpu_generator():
    state = torch.get_rng_state()
    orders = draw_orders(9, 3, seed=21)
    assert torch.equal(torch.get_rng_state(), state)
    generator = torch.Generator().manual_seed(21)
    expected = np.stack(
        [torch.randperm(9, generator=generator).numpy() for _ in range(3)]
    )
    np.testing.assert_array_equal(orders, expected)


def test_curve_leaves_global_rng_alone():
    model = two_unit_net()
    state = torch.get_rng_state()
    ablation_curve(model, two_unit_data(), orderings=3)
    assert torch.equal(torch.get_rng_state(), state)


def test_curve_points_options():
    assert resolve_points(None, 4).tolist() == [0, 1, 2, 3, 4]
    assert resolve_points(3, 10).tolist() == [0, 5, 10]
    assert resolve_points(51, 1024)[[0, 1, -1]].tolist() == [0, 20, 1024]
    assert resolve_points([4, 0, 4, 2], 4).tolist() == [0, 2, 4]
    curve = ablation_curve(
        random_mlp(),
        (torch.randn(5, 6).double(), torch.zeros(5).long()),
        orderings=1,
        points=[0, 7, 20],
    )
    assert curve.num_ablated.tolist() == [0, 7, 20]


def test_curve_points_rejected():
    message = (
        "Expected every point to be a number of ablated units from 0 to 20, but got 21."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_points([0, 21], 20)
    message = "Expected points to be an integer of at least 2, but got 1."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        resolve_points(1, 20)


def test_auc_is_trapezoid_over_fraction():
    curve = ablation_curve(
        random_mlp(seed=6),
        (torch.randn(50, 6).double(), torch.randint(0, 4, (50,))),
        orderings=4,
        points=7,
    )
    for row, auc in zip(curve.scores, curve.auc_per_ordering):
        assert math.isclose(auc, trapezoid(row, curve.num_ablated / 20), rel_tol=1e-12)
    assert math.isclose(curve.auc, float(np.mean(curve.auc_per_ordering)))
    assert math.isclose(curve.auc_std, float(np.std(curve.auc_per_ordering)))
    np.testing.assert_allclose(curve.mean, curve.scores.mean(axis=0))
    np.testing.assert_allclose(curve.std, curve.scores.std(axis=0))


def test_auc_needs_both_ends():
    message = (
        "The normalized AUC needs scores at 0 units ablated and at all units ablated, but "
        "the curve covers fractions [0.] to [0.5]. Include 0 and the total number of units "
        "in points."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        normalized_auc(np.array([0.0, 0.5]), np.array([1.0, 0.5]))


def test_curve_frame_json_and_plot(tmp_path):
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=3)
    frame = curve.to_frame()
    assert list(frame.columns) == ["ordering", "num_ablated", "fraction", "accuracy"]
    assert len(frame) == 9
    assert frame["accuracy"].tolist() == curve.scores.reshape(-1).tolist()
    path = tmp_path / "curve.json"
    curve.save(path)
    loaded = AblationCurve.load(path)
    np.testing.assert_array_equal(loaded.scores, curve.scores)
    np.testing.assert_array_equal(loaded.orders, curve.orders)
    assert loaded.auc == curve.auc
    assert loaded.seed == curve.seed
    ax = curve.plot(label="net")
    assert ax.get_lines()[0].get_ydata().tolist() == curve.mean.tolist()
    assert ax.get_xlabel() == "Number of units ablated"


def test_curve_chunk_size_keeps_accuracy():
    model = random_mlp(seed=7)
    data = (torch.randn(37, 6, dtype=torch.float64), torch.randint(0, 4, (37,)))
    curves = [
        ablation_curve(model, data, orderings=2, chunk_size=size) for size in (1, 5, 37)
    ]
    for curve in curves[1:]:
        np.testing.assert_array_equal(curve.scores, curves[0].scores)


def test_curve_top_k_monotone():
    model = random_mlp(widths=(6, 9, 8), classes=6, seed=8)
    data = (torch.randn(45, 6, dtype=torch.float64), torch.randint(0, 6, (45,)))
    scores = [
        ablation_curve(model, data, orderings=2, metric=f"top{k}", chunk_size=4).scores
        for k in (1, 2, 3, 6)
    ]
    for lower, higher in itertools.pairwise(scores):
        assert np.all(lower <= higher)
    assert np.all(scores[-1] == 1.0)


def test_curve_callable_metric():
    model = random_mlp(seed=9)
    data = (torch.randn(20, 6, dtype=torch.float64), torch.randint(0, 4, (20,)))

    def per_example(logits, targets):
        return (logits.argmax(1) == targets).double()

    def batch_mean(logits, targets):
        return (logits.argmax(1) == targets).double().mean()

    reference = ablation_curve(model, data, orderings=2, chunk_size=3)
    for metric in (per_example, batch_mean):
        curve = ablation_curve(model, data, orderings=2, metric=metric, chunk_size=3)
        np.testing.assert_allclose(curve.scores, reference.scores, rtol=0, atol=1e-15)
    assert curve.metric == "batch_mean"


def test_curve_leaves_model_as_before():
    model = SmallConvNet(batch_norm=True)
    model.train()
    model.conv2.eval()
    data = (torch.randn(12, 2, 4, 4), torch.randint(0, 3, (12,)))
    before = snapshot(model)
    first = ablation_curve(model, data, orderings=2, points=3)
    assert_unchanged(model, before)
    second = ablation_curve(model, data, orderings=2, points=3)
    np.testing.assert_array_equal(first.scores, second.scores)


def test_curve_repeated_calls_keep_hook_count():
    model = random_mlp()
    user_handle = model.relu2.register_forward_hook(lambda m, i, o: None)
    baseline = hook_count(model)
    data = (torch.randn(10, 6, dtype=torch.float64), torch.randint(0, 4, (10,)))
    results = [
        ablation_curve(model, data, orderings=2, seed=1).scores for _ in range(3)
    ]
    assert hook_count(model) == baseline
    for scores in results[1:]:
        np.testing.assert_array_equal(scores, results[0])
    user_handle.remove()


def test_curve_dropout_model_in_train_mode_is_deterministic():
    model = nn.Sequential(
        nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3)
    ).double()
    model.train()
    data = (torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,)))
    first = ablation_curve(model, data, orderings=2)
    second = ablation_curve(model, data, orderings=2)
    np.testing.assert_array_equal(first.scores, second.scores)
    assert model.training


def test_curve_dict_output_with_logits_fn():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_unit_net()

        def forward(self, x):
            return {"logits": self.net(x), "aux": x}

    curve = ablation_curve(
        DictModel(), two_unit_data(), orderings=2, logits_fn=lambda out: out["logits"]
    )
    assert curve.layers == ["net.relu"]
    assert curve.scores[:, 0].tolist() == [0.75, 0.75]


def test_curve_dict_output_without_logits_fn():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_unit_net()

        def forward(self, x):
            return {"logits": self.net(x)}

    model = DictModel()
    before = snapshot(model)
    message = (
        "The model returned a dict, not a tensor, so the logits cannot be found. Pass "
        "logits_fn, a function that takes the model output and returns the logits, for "
        "example logits_fn=lambda output: output['logits'] or logits_fn=lambda output: "
        "output[0]."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        ablation_curve(model, two_unit_data(), orderings=1)
    assert_unchanged(model, before)


def test_curve_tuple_layer_with_output_key():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(6, 5)

        def forward(self, x):
            hidden = torch.relu(self.fc(x))
            return hidden, hidden.sum(dim=1)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = Block()
            self.out = nn.Linear(5, 3)

        def forward(self, x):
            hidden, _ = self.block(x)
            return self.out(hidden)

    model = Model().double()
    data = (torch.randn(14, 6, dtype=torch.float64), torch.randint(0, 3, (14,)))
    curve = ablation_curve(
        model, data, layers=["block"], output_keys={"block": 0}, orderings=2
    )
    with torch.no_grad():
        for order, scores in zip(curve.orders, curve.scores):
            for k, score in zip(curve.num_ablated, scores):
                hidden = torch.relu(model.block.fc(data[0]))
                hidden[:, order[:k]] = 0.0
                expected = (
                    (model.out(hidden).argmax(1) == data[1]).double().mean().item()
                )
                assert score == expected


def test_curve_nan_logits():
    model = two_unit_net()
    with torch.no_grad():
        model.out.bias[2] = float("nan")
    before = snapshot(model)
    message = (
        "The model produced NaN logits for 4 of 4 examples in a batch with 0 of 2 units "
        "ablated (ordering 0). Check the model's weights and inputs for NaN or infinite "
        "values."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$") as caught:
        ablation_curve(model, two_unit_data(), orderings=2)
    assert caught.value.partial_curve is None
    assert_unchanged(model, before)


def test_curve_failure_keeps_completed_orderings():
    class FailsLater(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_unit_net()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 5:
                raise RuntimeError("device lost")
            return self.net(x)

    # One probe pass, then 3 points for ordering 0 and 1 for each later ordering,
    # because 0 and all units ablated are scored once. The 6th call is in ordering 2.
    model = FailsLater()
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="^device lost$") as caught:
        ablation_curve(model, two_unit_data(), orderings=5, engine="naive")
    partial = caught.value.partial_curve
    assert partial.num_orderings == 2
    assert partial.scores[:, 0].tolist() == [0.75, 0.75]
    assert_unchanged(model, before)


def test_curve_empty_dataset():
    model = random_mlp()
    before = snapshot(model)
    empty = (torch.zeros(0, 6, dtype=torch.float64), torch.zeros(0, dtype=torch.long))
    with pytest.raises(
        ValueError,
        match=r"^The dataset is empty\. Pass data with at least one example\.$",
    ):
        ablation_curve(model, empty)
    with pytest.raises(
        ValueError,
        match=r"^The dataset is empty\. Pass data with at least one example\.$",
    ):
        ablation_curve(model, TensorDataset(*empty))
    assert_unchanged(model, before)


def test_curve_targets_do_not_match_inputs():
    model = random_mlp()
    before = snapshot(model)
    message = "Targets do not match the inputs: 5 inputs but 4 targets. Pass one target per input."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(
            model,
            (torch.randn(5, 6, dtype=torch.float64), torch.zeros(4, dtype=torch.long)),
        )
    assert_unchanged(model, before)


def test_curve_target_out_of_range():
    message = "Target 7 is out of range for a model with 3 outputs. Pass class indices from 0 to 2."
    inputs, _ = two_unit_data()
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(
            two_unit_net(), (inputs, torch.tensor([0, 1, 7, 2])), orderings=1
        )


def test_curve_unknown_layer():
    model = random_mlp()
    before = snapshot(model)
    message = (
        "Unknown layer name 'relu3'. The model has these layers: fc1, relu1, fc2, relu2, "
        "out. Pass names from model.named_modules()."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(
            model, (torch.randn(3, 6).double(), torch.zeros(3).long()), layers=["relu3"]
        )
    assert_unchanged(model, before)


def test_curve_reused_module_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(3, 3)
            self.fc2 = nn.Linear(3, 2)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc2(self.act(self.fc1(self.act(x))))

    message = (
        "Layer 'act' runs 2 times in one forward pass, so ablating it would clamp every "
        "call at once. Give each use its own module instance."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(Shared(), (torch.randn(4, 3), torch.zeros(4).long()))


def test_curve_unknown_metric():
    message = (
        "Unknown metric 'top0'. Pass 'accuracy', 'topK' for a positive integer K (such as "
        "'top5'), or a callable that takes (logits, targets)."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(two_unit_net(), two_unit_data(), metric="top0")


def test_curve_dataset_leaves_global_rng():
    model = random_mlp()
    inputs = torch.randn(12, 6, dtype=torch.float64)
    targets = torch.randint(0, 4, (12,))
    dataset = TensorDataset(inputs, targets)
    for data in (dataset, DataLoader(dataset, batch_size=5, shuffle=True)):
        state = torch.get_rng_state()
        ablation_curve(model, data, orderings=2, points=3)
        assert torch.equal(torch.get_rng_state(), state)


def test_curve_keyboard_interrupt_keeps_partial():
    class Interrupted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_unit_net()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls > 5:
                raise KeyboardInterrupt
            return self.net(x)

    model = Interrupted()
    before = snapshot(model)
    with pytest.raises(KeyboardInterrupt) as caught:
        ablation_curve(model, two_unit_data(), orderings=5, engine="naive")
    assert caught.value.partial_curve.num_orderings == 2
    assert_unchanged(model, before)


def test_curve_more_points_than_units():
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=1, points=51)
    assert curve.num_ablated.tolist() == [0, 1, 2]


def test_relative_auc_nan_when_unablated_zero():
    inputs, _ = two_unit_data()
    wrong = torch.tensor([1, 0, 1, 0])
    curve = ablation_curve(two_unit_net(), (inputs, wrong), orderings=1)
    assert curve.unablated_score == 0.0
    assert math.isnan(curve.relative_auc)


def test_curve_skips_output_activation():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.Sigmoid())
    curve = ablation_curve(
        model, (torch.randn(6, 4), torch.zeros(6).long()), orderings=1
    )
    assert curve.layers == ["1"]


def test_top_k_ties_never_below_top1():
    # With every hidden unit ablated and no output bias, all logits tie at zero.
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 10, bias=False))
    data = (torch.randn(20, 4), torch.randint(0, 10, (20,)))
    top1 = ablation_curve(model, data, orderings=1, points=2).scores[0, -1]
    for k in (2, 5):
        topk = ablation_curve(model, data, orderings=1, points=2, metric=f"top{k}")
        assert topk.scores[0, -1] >= top1


@pytest.mark.parametrize(
    ("targets", "fix"),
    [
        (torch.tensor([[0], [1], [0], [2]]), "Pass targets.squeeze(1)."),
        (
            nn.functional.one_hot(torch.tensor([0, 1, 0, 2]), 3),
            "For one-hot targets, pass targets.argmax(1).",
        ),
    ],
)
@pytest.mark.parametrize("engine", ["naive", "auto"])
def test_curve_rejects_2d_targets(targets, fix, engine):
    model = two_unit_net()
    before = snapshot(model)
    inputs, _ = two_unit_data()
    message = (
        "Expected targets of shape (batch,), one class index per example, but got a "
        f"batch of shape {tuple(targets.shape)}. {fix}"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(model, (inputs, targets), orderings=1, engine=engine)
    assert_unchanged(model, before)


@pytest.mark.parametrize(
    "value", [np.float32(0.5), np.float64(0.5), torch.tensor(0.5), 0.5]
)
def test_curve_records_scalar_value(value, tmp_path):
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=2, value=value)
    assert curve.value == 0.5
    assert type(curve.value) is float
    assert curve.to_dict()["value"] == 0.5
    path = tmp_path / "curve.json"
    curve.save(path)
    loaded = AblationCurve.load(path)
    assert loaded.value == 0.5
    assert loaded.config == curve.config


def test_curve_records_per_unit_value():
    values = {"relu": torch.tensor([0.5, 1.0])}
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=2, value=values)
    assert curve.value == "per-unit"


@pytest.mark.parametrize("name", ["ordering", "num_ablated", "fraction"])
def test_frame_metric_name_collision(name):
    def metric(logits, targets):
        return (logits.argmax(1) == targets).double()

    metric.__name__ = name
    curve = ablation_curve(two_unit_net(), two_unit_data(), orderings=3, metric=metric)
    assert curve.metric == name
    frame = curve.to_frame()
    assert list(frame.columns) == ["ordering", "num_ablated", "fraction", "score"]
    assert frame["score"].tolist() == curve.scores.reshape(-1).tolist()
    assert frame["ordering"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert frame["num_ablated"].tolist() == [0, 1, 2] * 3
    assert frame["fraction"].tolist() == [0.0, 0.5, 1.0] * 3


def test_curve_empty_layers_rejected():
    model = two_unit_net()
    before = snapshot(model)
    message = (
        "Expected at least one layer name, but got layers=[]. Pass the names of the "
        "layers to ablate, or layers=None to ablate every activation module."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(model, two_unit_data(), layers=[])
    assert_unchanged(model, before)


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_curve_chunk_size_rejected(chunk_size):
    message = (
        f"Expected chunk_size to be a positive integer, but got {chunk_size!r}. Pass "
        "the number of examples per forward pass, such as chunk_size=1024."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(two_unit_net(), two_unit_data(), chunk_size=chunk_size)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        unit_means(two_unit_net(), two_unit_data(), ["relu"], chunk_size=chunk_size)


def test_curve_input_dtype_mismatch():
    model = two_unit_net()
    before = snapshot(model)
    inputs, targets = two_unit_data()
    message = (
        "Expected floating-point inputs of dtype torch.float64, the dtype of the model's "
        "parameters, but got torch.float32. Convert the inputs with inputs.double() or "
        "the model with model.float()."
    )
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$") as caught:
        ablation_curve(model, (inputs.float(), targets), orderings=1)
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert_unchanged(model, before)


def test_curve_input_dtype_cast_by_model_accepted():
    # A model that casts its own inputs works, so a dtype difference alone is no error.
    class Casting(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = two_unit_net()

        def forward(self, x):
            return self.net(x.double())

    inputs, targets = two_unit_data()
    curve = ablation_curve(Casting(), (inputs.float(), targets), orderings=2)
    assert curve.scores[:, 0].tolist() == [0.75, 0.75]


def test_curve_naive_memory_bounded_by_chunk():
    # Weak references to every hidden activation of every forward pass.
    activations = []

    class Recording(nn.Module):
        """An MLP that records, for each forward pass, its batch size and how many
        activations of earlier passes are still alive."""

        def __init__(self):
            super().__init__()
            self.net = random_mlp(seed=10)
            self.batch_sizes = []
            self.alive_at_start = []

        def forward(self, x):
            self.batch_sizes.append(x.shape[0])
            self.alive_at_start.append(sum(ref() is not None for ref in activations))
            return self.net(x)

    model = Recording()

    def keep_reference(module, inputs, output):
        activations.append(weakref.ref(output))

    handles = [
        model.net.relu1.register_forward_hook(keep_reference),
        # The clamped output of relu2 is the input of the output layer.
        model.net.out.register_forward_pre_hook(
            lambda module, inputs: activations.append(weakref.ref(inputs[0]))
        ),
    ]
    data = (torch.randn(40, 6, dtype=torch.float64), torch.randint(0, 4, (40,)))
    curve = ablation_curve(
        model, data, orderings=2, points=3, chunk_size=8, engine="naive"
    )
    for handle in handles:
        handle.remove()
    gc.collect()
    assert curve.config["engine"] == "naive"
    assert max(model.batch_sizes) == 8
    # One probe pass on the first chunk, then 4 distinct unit sets (k = 0 and k = 20
    # are scored once) over 5 chunks.
    assert len(model.batch_sizes) == 1 + 4 * 5
    assert model.alive_at_start == [0] * len(model.batch_sizes)
    assert len(activations) == 2 * len(model.batch_sizes)
    assert all(ref() is None for ref in activations)
