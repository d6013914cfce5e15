"""Every engine must score exactly like the naive engine, in float64."""

import logging
import re

import numpy as np
import pytest
import torch
from conftest import SmallConvNet, assert_unchanged, random_mlp, snapshot
from torch import nn

from singledir import ablation_curve, unit_importance


class Residual(nn.Module):
    """The first ablated layer feeds two consumers, so only the prefix engine applies."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 10)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(10, 10)
        self.relu2 = nn.ReLU(inplace=True)
        self.out = nn.Linear(10, 4)

    def forward(self, x):
        hidden = self.relu1(self.fc1(x))
        hidden = hidden + self.relu2(self.fc2(hidden))
        return self.out(hidden)


class InplaceAfter(nn.Module):
    """In-place operations after the cut must not change the cached activations."""

    def __init__(self):
        super().__init__()
        self.skip = nn.Linear(6, 4)
        self.fc1 = nn.Linear(6, 9)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(9, 9)
        self.relu2 = nn.ReLU(inplace=True)
        self.out = nn.Linear(9, 4)

    def forward(self, x):
        skip = self.skip(x)
        hidden = self.relu1(self.fc1(x))
        hidden = self.relu2(self.fc2(hidden))
        hidden.mul_(2.0)
        # skip is computed before the cut and changed in place after it.
        skip.mul_(3.0)
        return self.out(hidden) + skip


class DictOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = random_mlp(seed=3)

    def forward(self, x):
        return {"logits": self.net(x), "features": x}


class Sequence(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).mean(dim=1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = random_mlp(seed=4)

    def forward(self, x):
        if float(x.sum()) > 1e9:
            return self.net(x) * 0
        return self.net(x)


class MixesBatch(nn.Module):
    """Normalizes over the batch after the first ablated layer, unlike a real net."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)
        self.relu2 = nn.ReLU()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        hidden = self.relu1(self.fc1(x))
        hidden = self.relu2(self.fc2(hidden))
        return self.out(hidden - hidden.mean(dim=0, keepdim=True))


def conv_net_with_batch_norm():
    model = SmallConvNet(batch_norm=True).double()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-0.5, 0.5)
        model.bn1.running_var.uniform_(0.5, 2.0)
    return model


def image_data(count=29, classes=3):
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(count, 2, 5, 5, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, classes, (count,), generator=generator)


def vector_data(count=41, classes=4, width=6):
    generator = torch.Generator().manual_seed(2)
    inputs = torch.randn(count, width, generator=generator, dtype=torch.float64)
    return inputs, torch.randint(0, classes, (count,), generator=generator)


CASES = {
    "mlp": (lambda: random_mlp(seed=0), vector_data, {}, "incremental"),
    "conv": (lambda: SmallConvNet().double(), image_data, {}, "incremental"),
    "conv-batch-norm": (conv_net_with_batch_norm, image_data, {}, "incremental"),
    "residual": (lambda: Residual().double(), vector_data, {}, "prefix"),
    "inplace-after-cut": (
        lambda: InplaceAfter().double(),
        vector_data,
        {},
        "incremental",
    ),
    "dict-output": (
        lambda: DictOutput(),
        vector_data,
        {"logits_fn": lambda output: output["logits"]},
        "incremental",
    ),
    "sequence": (
        lambda: Sequence().double(),
        lambda: (
            torch.randn(23, 7, 6, dtype=torch.float64),
            torch.randint(0, 5, (23,)),
        ),
        {"unit_dim": 2},
        "incremental",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("chunk_size", [1, 7, 1000])
def test_engines_match_naive(case, chunk_size):
    build, make_data, options, best = CASES[case]
    model = build()
    data = make_data()
    before = snapshot(model)
    engines = (
        ["naive", "prefix", "incremental"]
        if best == "incremental"
        else ["naive", "prefix"]
    )
    curves = {
        engine: ablation_curve(
            model,
            data,
            orderings=2,
            seed=5,
            engine=engine,
            chunk_size=chunk_size,
            **options,
        )
        for engine in engines
    }
    for engine in engines[1:]:
        np.testing.assert_array_equal(curves[engine].scores, curves["naive"].scores)
        assert curves[engine].config["engine"] == engine
    auto = ablation_curve(
        model, data, orderings=2, seed=5, chunk_size=chunk_size, **options
    )
    assert auto.config["engine"] == best
    np.testing.assert_array_equal(auto.scores, curves["naive"].scores)
    assert_unchanged(model, before)


@pytest.mark.parametrize("points", [None, 2, 5, [0, 3, 4, 11, 12]])
def test_engines_match_naive_point_sets(points):
    model = random_mlp(widths=(6, 7, 5), seed=6)
    data = vector_data()
    reference = ablation_curve(model, data, orderings=3, points=points, engine="naive")
    for engine in ("prefix", "incremental"):
        curve = ablation_curve(model, data, orderings=3, points=points, engine=engine)
        np.testing.assert_array_equal(curve.num_ablated, reference.num_ablated)
        np.testing.assert_array_equal(curve.scores, reference.scores)


def test_engines_match_naive_mean_value_and_metric():
    model = SmallConvNet().double()
    data = image_data()

    def margin(logits, targets):
        return logits.gather(1, targets.unsqueeze(1)).squeeze(1) - logits.mean(dim=1)

    for options in (
        {"value": "mean"},
        {"value": 0.3, "metric": margin},
        {"metric": "top2"},
    ):
        reference = ablation_curve(model, data, orderings=2, engine="naive", **options)
        for engine in ("prefix", "incremental"):
            curve = ablation_curve(model, data, orderings=2, engine=engine, **options)
            np.testing.assert_allclose(
                curve.scores, reference.scores, rtol=0, atol=1e-12
            )


def test_engines_match_naive_tuple_layer():
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
            hidden, total = self.block(x)
            return self.out(hidden) + total.unsqueeze(1)

    model = Model().double()
    data = vector_data(classes=3)
    options = {"layers": ["block"], "output_keys": {"block": 0}, "orderings": 2}
    reference = ablation_curve(model, data, engine="naive", **options)
    prefix = ablation_curve(model, data, engine="prefix", **options)
    np.testing.assert_array_equal(prefix.scores, reference.scores)
    assert ablation_curve(model, data, **options).config["engine"] == "prefix"


def test_auto_falls_back_for_untraceable_model():
    model = Untraceable()
    curve = ablation_curve(model, vector_data(), orderings=1, points=3)
    assert curve.config["engine"] == "naive"


def test_explicit_engine_that_does_not_apply():
    with pytest.raises(
        ValueError,
        match=r"^engine='prefix' does not apply to this model: torch\.fx cannot trace",
    ):
        ablation_curve(Untraceable(), vector_data(), orderings=1, engine="prefix")
    message = (
        "engine='incremental' does not apply to this model: Layer 'relu1' does not feed "
        "exactly one module, so its consumer cannot be updated incrementally. Use "
        "engine='auto' or engine='naive'."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(
            Residual().double(), vector_data(), orderings=1, engine="incremental"
        )


def test_auto_rejects_engine_that_disagrees(caplog):
    model = MixesBatch().double()
    data = vector_data(classes=3)
    with caplog.at_level(logging.INFO, logger="singledir.engines"):
        curve = ablation_curve(model, data, orderings=1, points=3, chunk_size=1000)
    assert curve.config["engine"] == "naive"
    assert "differ from the naive engine" in caplog.text
    with pytest.raises(ValueError, match=r"^engine='prefix' gives logits that differ"):
        ablation_curve(
            model, data, orderings=1, points=3, engine="prefix", chunk_size=1000
        )


def test_unknown_engine():
    message = "Unknown engine 'fast'. Choose one of: auto, naive, prefix, incremental."
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(random_mlp(), vector_data(), engine="fast")


def test_cached_engines_leave_rng_and_hooks():
    model = random_mlp(seed=7)
    handle = model.relu2.register_forward_hook(lambda module, inputs, output: None)
    before = snapshot(model)
    state = torch.get_rng_state()
    for engine in ("prefix", "incremental"):
        ablation_curve(model, vector_data(), orderings=2, engine=engine)
    assert torch.equal(torch.get_rng_state(), state)
    assert_unchanged(model, before)
    handle.remove()


@pytest.mark.parametrize("case", ["mlp", "conv", "residual", "sequence"])
def test_unit_importance_matches_naive(case):
    build, make_data, options, best = CASES[case]
    model = build()
    data = make_data()
    reference = unit_importance(model, data, engine="naive", chunk_size=8, **options)
    fast = unit_importance(model, data, chunk_size=8, **options)
    assert fast.attrs["engine"] == best
    np.testing.assert_array_equal(
        fast["score"].to_numpy(), reference["score"].to_numpy()
    )


def test_unit_importance_by_hand():
    from conftest import two_unit_data, two_unit_net

    table = unit_importance(two_unit_net(), two_unit_data())
    assert table["name"].tolist() == ["relu[0]", "relu[1]"]
    assert table["score"].tolist() == [0.25, 0.5]
    assert table["baseline"].tolist() == [0.75, 0.75]
    assert table["drop"].tolist() == [0.5, 0.25]


def test_unit_importance_against_single_ablations():
    from singledir import ablate

    model = SmallConvNet().double().eval()
    inputs, targets = image_data()
    table = unit_importance(model, (inputs, targets), chunk_size=10)
    for row in table.itertuples():
        with torch.no_grad(), ablate(model, {row.layer: [row.unit]}):
            expected = (model(inputs).argmax(1) == targets).double().mean().item()
        assert row.score == expected


def test_engines_one_set_per_pass(monkeypatch):
    # With one set per pass the cache is cloned, not repeated, so in-place operations
    # after the cut would corrupt it without the clone.
    from singledir.engines.cached import PrefixEngine

    monkeypatch.setattr(PrefixEngine, "_sets_per_pass", lambda self, carried, total: 1)
    model = InplaceAfter().double()
    data = vector_data()
    reference = ablation_curve(model, data, orderings=2, engine="naive")
    for engine in ("prefix", "incremental"):
        curve = ablation_curve(model, data, orderings=2, engine=engine)
        np.testing.assert_array_equal(curve.scores, reference.scores)


class ParameterAfterCut(nn.Module):
    """Carries a (7, 3) tensor, computed from a parameter, across the cut."""

    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(7, 3))
        self.fc1 = nn.Linear(5, 8)
        self.relu1 = nn.ReLU()
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        scaled = self.table * 1.0
        hidden = self.relu1(self.fc1(x))
        return self.out(hidden) + scaled.sum(dim=0)


def test_engines_keep_carried_parameter_unrepeated():
    # The last chunk has 7 examples, as many as the carried tensor has rows, so a
    # cached engine that guessed batch tensors by their size would repeat it.
    torch.manual_seed(0)
    model = ParameterAfterCut().double()
    with torch.no_grad():
        model.table[:, 0] = 0.05
    generator = torch.Generator().manual_seed(5)
    data = (
        torch.randn(71, 5, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (71,), generator=generator),
    )
    options = {"orderings": 2, "points": 5, "chunk_size": 64}
    reference = ablation_curve(model, data, engine="naive", **options)
    for engine in ("prefix", "incremental"):
        curve = ablation_curve(model, data, engine=engine, **options)
        np.testing.assert_array_equal(curve.scores, reference.scores)


@pytest.mark.parametrize("engine", ["prefix", "incremental"])
def test_cached_engine_reports_nan_logits(engine):
    model = random_mlp(seed=0)
    with torch.no_grad():
        model.out.bias[1] = float("nan")
    inputs, targets = vector_data(count=10)
    message = (
        "The model produced NaN logits for 10 of 10 examples in a batch with 0 of "
        "20 units ablated (ordering 0). "
        "Check the model's weights and inputs for NaN or infinite values."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(model, (inputs, targets), orderings=1, points=3, engine=engine)


@pytest.mark.parametrize("orderings_per_pass", [None, 1, 2, 5])
def test_orderings_per_pass_same_curve(orderings_per_pass):
    model = random_mlp(seed=8)
    data = vector_data()
    reference = ablation_curve(model, data, orderings=5, engine="naive")
    for engine in ("prefix", "incremental"):
        curve = ablation_curve(
            model,
            data,
            orderings=5,
            engine=engine,
            orderings_per_pass=orderings_per_pass,
        )
        np.testing.assert_array_equal(curve.scores, reference.scores)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_orderings_per_pass_rejected(bad):
    message = (
        "Expected orderings_per_pass to be a positive integer or None, but got "
        f"{bad!r}. Pass None to let singledir choose."
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ablation_curve(random_mlp(), vector_data(), orderings_per_pass=bad)


@pytest.mark.parametrize("engine", ["naive", "prefix", "incremental"])
def test_engine_memory_bounded_by_chunk(engine):
    # The largest batch any layer receives depends on the chunk size, not the data size.
    model = random_mlp(seed=9)
    seen = {"fc1": 0, "relu2": 0}

    def record(name):
        def hook(module, inputs, output):
            seen[name] = max(seen[name], output.shape[0])

        return hook

    handles = [
        model.fc1.register_forward_hook(record("fc1")),
        model.relu2.register_forward_hook(record("relu2")),
    ]
    largest = []
    try:
        for repeat in (1, 4):
            inputs, targets = vector_data(count=64)
            data = (inputs.repeat(repeat, 1), targets.repeat(repeat))
            seen.update(fc1=0, relu2=0)
            ablation_curve(model, data, orderings=2, engine=engine, chunk_size=16)
            largest.append(dict(seen))
    finally:
        for handle in handles:
            handle.remove()
    assert largest[0]["fc1"] <= 16
    assert largest[1]["fc1"] <= 16
    assert largest[1]["relu2"] == largest[0]["relu2"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("engine", ["naive", "prefix", "incremental"])
def test_engines_on_cuda_match_cpu(engine):
    model = random_mlp(seed=10)
    data = vector_data()
    reference = ablation_curve(model, data, orderings=2, engine="naive")
    gpu_model = random_mlp(seed=10).cuda()
    curve = ablation_curve(gpu_model, data, orderings=2, engine=engine)
    np.testing.assert_array_equal(curve.scores, reference.scores)
    assert next(gpu_model.parameters()).device.type == "cuda"
