"""The ensemble, over-training, dropout and batch norm experiments on tiny networks.

Every statistic an experiment writes is recomputed here from its own CSV files with
scipy or numpy, so a wrong column, a swapped argument or a stale value fails.
"""

import dataclasses
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from scipy.integrate import trapezoid

from singledir.experiments import (
    BatchNormConfig,
    CorruptedLabelsConfig,
    DropoutConfig,
    EnsembleConfig,
    OverTrainingConfig,
    run_batchnorm,
    run_corrupted_labels,
    run_dropout,
    run_ensemble,
    run_over_training,
)

# Small MLPs on 300 of scikit-learn's 8x8 digits: each network trains in well under a
# second.
TINY = {
    "dataset": "digits",
    "train_size": 300,
    "hidden": (16, 16),
    "lr": 0.01,
    "orderings": 2,
    "points": 5,
    "device": "cpu",
}


def _read(out):
    summary = pd.read_csv(out / "summary.csv")
    curves = pd.read_csv(out / "curves.csv")
    run = json.loads((out / "run.json").read_text())
    assert (out / "figure.png").stat().st_size > 0
    assert run["finished"] is True
    return summary, curves, run


def _curve_auc(curves: pd.DataFrame, score: str = "accuracy") -> float:
    """Mean over orderings of the trapezoid of score over fraction, from the CSV."""
    aucs = [
        trapezoid(group[score], group["fraction"])
        for _, group in curves.groupby("ordering")
    ]
    return float(np.mean(aucs))


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ensemble")
    config = EnsembleConfig(networks=5, compared=2, epochs=3, **TINY)
    return run_ensemble(config, out), out


def test_ensemble_statistics_match_scipy(ensemble_run):
    _result, out = ensemble_run
    summary, curves, run = _read(out)
    assert summary["network"].tolist() == [0, 1, 2, 3, 4]
    assert np.allclose(
        summary["generalization_error"],
        summary["train_accuracy"] - summary["test_accuracy"],
    )
    spearman = stats.spearmanr(summary["auc"], summary["generalization_error"])
    pearson = stats.pearsonr(summary["auc"], summary["generalization_error"])
    assert run["auc_generalization_error_spearman"] == pytest.approx(spearman.statistic)
    assert run["auc_generalization_error_pearson"] == pytest.approx(pearson.statistic)
    assert run["auc_generalization_error_pearson_p"] == pytest.approx(pearson.pvalue)
    # 5 networks: the p-value is exact, over all 120 pairings.
    assert run["auc_generalization_error_spearman_p"] * 120 == pytest.approx(
        round(run["auc_generalization_error_spearman_p"] * 120)
    )

    ranked = summary.sort_values(["generalization_error", "network"])["network"]
    assert run["best_networks"] == ranked.tolist()[:2]
    assert run["worst_networks"] == ranked.tolist()[-2:]
    for network, auc in zip(summary["network"], summary["auc"]):
        assert _curve_auc(curves[curves.network == network]) == pytest.approx(auc)


def test_ensemble_networks_differ_only_in_seeds(ensemble_run):
    result, _ = ensemble_run
    seeds = [network.seeds for network in result.networks]
    assert set(seeds[0]) == {"init", "data_order", "orderings"}
    for kind in ("init", "data_order", "orderings"):
        assert len({s[kind] for s in seeds}) == 5
    assert len({round(n.curve.auc, 12) for n in result.networks}) > 1


def test_ensemble_subset_reproduces_the_same_networks(ensemble_run, tmp_path):
    result, _ = ensemble_run
    config = dataclasses.replace(result.config, networks=3, compared=1)
    again = run_ensemble(config, tmp_path)
    for first, second in zip(result.networks, again.networks):
        assert second.seeds == first.seeds
        np.testing.assert_array_equal(second.curve.scores, first.curve.scores)
        assert second.history == first.history


def test_over_training_measurement_epochs(tmp_path):
    config = OverTrainingConfig(epochs=7, every=3, **TINY)
    result = run_over_training(config, tmp_path)
    summary, curves, run = _read(tmp_path)
    assert summary["epoch"].tolist() == [3, 6, 7]
    assert sorted(curves["epoch"].unique()) == [3, 6, 7]
    assert len(run["epochs"]) == 7

    test_losses = [record["test_loss"] for record in run["epochs"]]
    assert run["lowest_test_loss_epoch"] == int(np.argmin(test_losses)) + 1
    assert run["auc_peak_epoch"] == int(summary["epoch"][summary["auc"].idxmax()])
    rho = stats.spearmanr(summary["auc"], summary["test_loss"]).statistic
    assert run["auc_test_loss_spearman"] == pytest.approx(rho)
    assert run["paper_auc_test_loss_spearman"] == -0.728
    # The losses in the summary are those of the epoch each curve was measured at.
    for row in summary.itertuples():
        assert row.test_loss == pytest.approx(test_losses[row.epoch - 1])
        assert _curve_auc(curves[curves.epoch == row.epoch]) == pytest.approx(row.auc)
    # Every measurement uses the same orderings, so curves differ only by training.
    orders = {tuple(m.curve.orders.ravel()) for m in result.measurements}
    assert len(orders) == 1


def test_dropout_drop_at_fraction(tmp_path):
    # 2 x 10 hidden units. Dropout 0.1 is 2 units, which is not one of the 5 evenly
    # spaced points 0, 5, 10, 15 and 20, so it is added. Dropout 0.25 is 5 units.
    config = DropoutConfig(
        dropouts=(0.1, 0.25), corruptions=(0.0, 1.0), epochs=3, **TINY
    )
    config = dataclasses.replace(config, hidden=(10, 10))
    result = run_dropout(config, tmp_path)
    summary, curves, run = _read(tmp_path)
    assert list(zip(summary["dropout"], summary["corruption"])) == [
        (0.1, 0.0),
        (0.25, 0.0),
        (0.1, 1.0),
        (0.25, 1.0),
    ]
    assert summary["units_at_dropout"].tolist() == [2, 5, 2, 5]
    for row in summary.itertuples():
        curve = curves[
            (curves.dropout == row.dropout) & (curves.corruption == row.corruption)
        ]
        # Every curve has the points of both dropout fractions, one shared grid.
        assert sorted(curve["num_ablated"].unique()) == [0, 2, 5, 10, 15, 20]
        mean = curve.groupby("num_ablated")["accuracy"].mean()
        assert row.accuracy_at_dropout == pytest.approx(mean[row.units_at_dropout])
        assert row.drop_at_dropout == pytest.approx(
            mean[0] - mean[row.units_at_dropout]
        )
        name = f"dropout {row.dropout:g}, corruption {row.corruption:g}"
        assert run["drop_at_dropout_fraction"][name] == pytest.approx(
            row.drop_at_dropout
        )
        assert run["auc"][name] == pytest.approx(row.auc)
    # The dropout layers are in the networks and off while the curves are measured.
    network = result.networks[0]
    assert network.curve.layers == ["relu1", "relu2"]


def test_batchnorm_groups_share_seeds_and_report_their_spread(tmp_path):
    config = BatchNormConfig(networks=2, epochs=2, width=0.0625, **TINY)
    result = run_batchnorm(config, tmp_path)
    summary, _curves, run = _read(tmp_path)
    assert list(zip(summary["batch_norm"], summary["network"])) == [
        (True, 0),
        (False, 0),
        (True, 1),
        (False, 1),
    ]
    by_label = {
        (n.labels["batch_norm"], n.labels["network"]): n for n in result.networks
    }
    for index in range(2):
        assert by_label[(True, index)].seeds == by_label[(False, index)].seeds
    # cnn11 at width 1/16 has 32 channels in each of its last three conv layers.
    assert by_label[(True, 0)].curve.layers == ["relu9", "relu10", "relu11"]
    assert by_label[(True, 0)].curve.total_units == 96
    for name, batch_norm in (("with_batch_norm", True), ("without_batch_norm", False)):
        aucs = summary.loc[summary["batch_norm"] == batch_norm, "auc"].to_numpy()
        group = run["groups"][name]
        assert group["auc"] == pytest.approx(aucs.tolist())
        assert group["auc_mean"] == pytest.approx(aucs.mean())
        assert group["auc_std"] == pytest.approx(np.std(aucs, ddof=1))
        assert (group["auc_min"], group["auc_max"]) == pytest.approx(
            (aucs.min(), aucs.max())
        )


def test_corrupted_labels_trains_a_conv_net(tmp_path):
    config = CorruptedLabelsConfig(
        fractions=(0.0, 1.0), model="cnn11", width=0.0625, epochs=1, **TINY
    )
    result = run_corrupted_labels(config, tmp_path)
    assert [trial.curve.layers for trial in result.trials] == [
        ["relu9", "relu10", "relu11"]
    ] * 2
    _summary, _curves, run = _read(tmp_path)
    assert run["config"]["model"] == "cnn11"


def test_resnet_top5_last_blocks(tmp_path):
    config = EnsembleConfig(
        networks=3, compared=1, model="resnet18", epochs=1, **{**TINY, "train_size": 40}
    )
    result = run_ensemble(config, tmp_path)
    curve = result.networks[0].curve
    assert curve.metric == "top5"
    assert curve.layers == ["layer3.1", "layer4.0", "layer4.1"]
    curves = pd.read_csv(tmp_path / "curves.csv")
    assert "top5" in curves.columns


def test_measure_size_shared_subset(tmp_path):
    config = EnsembleConfig(networks=3, compared=1, epochs=1, measure_size=50, **TINY)
    result = run_ensemble(config, tmp_path)
    for network in result.networks:
        assert network.curve.scores.shape == (2, 5)
        # Accuracies over 50 examples are multiples of 1/50.
        assert np.allclose(
            network.curve.scores * 50, np.round(network.curve.scores * 50)
        )


REJECTED = [
    (
        EnsembleConfig,
        {"networks": 2},
        (
            "Expected networks to be at least 3, but got 2. A correlation needs 3 or more "
            "networks; the paper trained 200."
        ),
    ),
    (
        EnsembleConfig,
        {"networks": 6, "compared": 4},
        "Expected compared to be from 1 to 3 (half of 6 networks), but got 4.",
    ),
    (
        OverTrainingConfig,
        {"target_train_accuracy": 0.99},
        (
            "Expected target_train_accuracy to be None, but got 0.99. Over-training trains "
            "every epoch; set epochs instead."
        ),
    ),
    (
        OverTrainingConfig,
        {"epochs": 5, "every": 6},
        "Expected every to be from 1 to epochs (5), but got 6.",
    ),
    (
        DropoutConfig,
        {"dropouts": (0.1, 1.0)},
        (
            "Expected every value in dropouts to be in the [0, 1) range, but got 1.0. Pass "
            "dropout probabilities such as 0.1,0.2,0.3."
        ),
    ),
    (
        DropoutConfig,
        {"corruptions": ()},
        (
            "Expected at least one value in corruptions, but got none. Pass fractions from "
            "0 (no labels shuffled) to 1 (all shuffled)."
        ),
    ),
    (
        BatchNormConfig,
        {"networks": 0},
        (
            "Expected networks to be at least 1, but got 0. Pass the number of networks in "
            "each group, such as 4."
        ),
    ),
    (
        EnsembleConfig,
        {"dataset": "imagenet"},
        (
            "The experiments train on data held in memory, and imagenet is read image by "
            "image from disk. Choose one of: mnist-subset, digits, mnist1d, mnist, "
            "cifar10, or measure a trained imagenet model with 'singledir curve'."
        ),
    ),
    (
        BatchNormConfig,
        {"width": 0.0},
        (
            "Expected width to be a positive number, but got 0.0. Pass a multiplier such as "
            "0.5."
        ),
    ),
    (
        DropoutConfig,
        {"measure_size": 0},
        (
            "Expected measure_size to be None or at least 1, but got 0. Pass None to score "
            "the curves on the whole training split."
        ),
    ),
    (
        EnsembleConfig,
        {"device": "gpu"},
        "Unknown device 'gpu'. Pass auto, cpu, cuda or cuda:N.",
    ),
]


@pytest.mark.parametrize(("config_type", "changes", "message"), REJECTED)
def test_configs_reject_invalid_settings(config_type, changes, message):
    config = config_type(**changes)
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        config.validate()


@pytest.mark.parametrize(
    "config_type",
    [
        CorruptedLabelsConfig,
        EnsembleConfig,
        OverTrainingConfig,
        DropoutConfig,
        BatchNormConfig,
    ],
)
def test_defaults_and_paper_presets_are_valid(config_type):
    config_type().validate()
    config_type.paper().validate()


def test_paper_presets_follow_the_paper():
    ensemble = EnsembleConfig.paper()
    assert (ensemble.model, ensemble.dataset, ensemble.networks) == (
        "cnn11",
        "cifar10",
        200,
    )
    assert (ensemble.width, ensemble.orderings) == (1.0, 10)
    assert OverTrainingConfig.paper().hidden == (2048, 2048)
    dropout = DropoutConfig.paper()
    assert (dropout.hidden, dropout.dropouts, dropout.corruptions) == (
        (2048, 2048),
        (0.1, 0.2, 0.3),
        (0.0, 1.0),
    )
    batchnorm = BatchNormConfig.paper()
    assert (
        batchnorm.model,
        batchnorm.dataset,
        batchnorm.width,
        batchnorm.networks,
    ) == (
        "cnn11",
        "cifar10",
        1.0,
        4,
    )
    assert CorruptedLabelsConfig.paper().dataset == "mnist"


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="this machine has a CUDA device"
)
def test_cuda_device_without_cuda_is_rejected():
    with pytest.raises(
        ValueError,
        match=re.escape(
            "Expected a CUDA device for device 'cuda', but PyTorch finds none. Pass "
            "auto or cpu."
        ),
    ):
        EnsembleConfig(device="cuda").validate()


def test_dropout_networks_follow_their_seeds(tmp_path):
    config = DropoutConfig(dropouts=(0.1, 0.3), corruptions=(0.0,), epochs=2, **TINY)
    torch.manual_seed(1)
    both = run_dropout(config, tmp_path / "both")
    torch.manual_seed(2)
    alone = run_dropout(
        dataclasses.replace(config, dropouts=(0.3,)), tmp_path / "alone"
    )
    # Training draws its dropout masks from the network's own seed, not from the
    # global random state.
    assert alone.networks[0].history == both.networks[1].history
    np.testing.assert_array_equal(
        alone.networks[0].curve.scores[:, [0, -1]],
        both.networks[1].curve.scores[:, [0, -1]],
    )


def test_training_leaves_global_random_state(tmp_path):
    config = DropoutConfig(dropouts=(0.3,), corruptions=(0.0,), epochs=1, **TINY)
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    run_dropout(config, tmp_path)
    assert torch.equal(before, torch.random.get_rng_state())


def test_batchnorm_pairs_start_from_the_same_weights():
    from singledir.datasets import load_split
    from singledir.experiments.batchnorm import _build_pair_member

    config = BatchNormConfig(width=0.0625, dataset="digits", device="cpu")
    split = load_split("digits")
    with_norm = _build_pair_member(config, split, 7, batch_norm=True)
    without = _build_pair_member(config, split, 7, batch_norm=False)
    plain = dict(without.named_parameters())
    for name, parameter in with_norm.named_parameters():
        if name.startswith(("conv", "fc.", "out.")):
            assert torch.equal(parameter, plain[name]), name
    assert not any("bn" in name for name in plain)


def test_batchnorm_rejects_a_model_without_batch_norm(tmp_path):
    config = BatchNormConfig(model="vgg11", width=1.0, networks=1, epochs=1, **TINY)
    with pytest.raises(ValueError) as error:
        run_batchnorm(config, tmp_path)
    assert str(error.value) == (
        "Model 'vgg11' has no batch norm layers, so both groups would be the same "
        "network. Pick a model with batch norm, such as cnn11, resnet50 or vgg11_bn."
    )


def test_correlation_of_a_constant_is_nan():
    from singledir.experiments._common import correlations

    result = correlations(np.ones(5), np.arange(5.0), "a")
    assert all(np.isnan(value) for value in result.values())


def test_topk_above_the_class_count_is_rejected(tmp_path):
    config = EnsembleConfig(networks=3, compared=1, epochs=1, metric="top11", **TINY)
    with pytest.raises(ValueError) as error:
        run_ensemble(config, tmp_path)
    assert str(error.value) == (
        "top11 counts every example as correct when the model has only 10 outputs, "
        "so the curve would be flat. Pass a K below 10, or 'accuracy'."
    )
