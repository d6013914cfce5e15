"""Ensemble: among networks that differ only in their random seeds, those that
generalize worse rely more on single directions.

Networks of one topology are trained on the same unmodified labels; they differ only in
their initialization and the order of their training data. Each one's generalization
error (training accuracy minus test accuracy) is set against the area under its
cumulative ablation curve, as in Figure 2 of Morcos et al. (ICLR 2018), where the
correlation across 200 CIFAR-10 networks was negative. With few networks, or networks
whose generalization errors barely differ, the correlation is noisy: read it with its
p-value.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from singledir.experiments._common import (
    EpochCallback,
    NetworkConfig,
    NetworkResult,
    OutputFolder,
    build_network,
    correlations,
    curves_frame,
    fit,
    measure,
    network_name,
    network_seeds,
    pyplot,
    summary_frame,
    write_networks,
)

logger = logging.getLogger(__name__)

# Tells this experiment's seeds from those of the other experiments.
_EXPERIMENT_KEY = 2


@dataclass
class EnsembleConfig(NetworkConfig):
    """Settings of the ensemble experiment; the defaults finish in minutes on a CPU."""

    networks: int = 20  # networks trained, differing only in their seeds
    compared: int = 5  # networks in each of the best and the worst group of the figure
    epochs: int = 20  # every network trains for all of them
    target_train_accuracy: float | None = None

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        if self.networks < 3:
            raise ValueError(
                f"Expected networks to be at least 3, but got {self.networks}. A "
                "correlation needs 3 or more networks; the paper trained 200."
            )
        if not 1 <= self.compared <= self.networks // 2:
            raise ValueError(
                f"Expected compared to be from 1 to {self.networks // 2} (half of "
                f"{self.networks} networks), but got {self.compared}."
            )
        super().validate()

    @classmethod
    def paper(cls) -> EnsembleConfig:
        """Return the paper's setting: 200 cnn11 networks on CIFAR-10."""
        return cls(model="cnn11", dataset="cifar10", networks=200, epochs=100)


@dataclass
class EnsembleResult:
    config: EnsembleConfig
    networks: list[NetworkResult] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        return summary_frame(self.networks)

    def curves(self) -> pd.DataFrame:
        return curves_frame(
            [network.curve for network in self.networks],
            [network.labels for network in self.networks],
        )

    def statistics(self) -> dict[str, Any]:
        """Return the correlations of AUC with generalization error, and the compared groups."""
        summary = self.summary()
        if summary.empty:
            return {}
        details: dict[str, Any] = correlations(
            summary["auc"].to_numpy(),
            summary["generalization_error"].to_numpy(),
            "auc_generalization_error",
        )
        best, worst = self.groups()
        details["best_networks"] = best
        details["worst_networks"] = worst
        return details

    def groups(self) -> tuple[list[int], list[int]]:
        """Return the indices of the networks with the lowest and the highest generalization error."""
        count = min(self.config.compared, len(self.networks) // 2)
        if count == 0:
            return [], []
        ranked = sorted(
            self.networks, key=lambda n: (n.generalization_error, n.labels["network"])
        )
        best = [n.labels["network"] for n in ranked[:count]]
        worst = [n.labels["network"] for n in ranked[-count:]]
        return best, worst


def _train_network(
    config: EnsembleConfig, index: int, split: Any, on_epoch: EpochCallback | None
) -> NetworkResult:
    seeds = network_seeds(config.seed, _EXPERIMENT_KEY, [index])
    del seeds["corruption"]
    model = build_network(config, split, seeds["init"])
    labels = split.train_targets
    name = f"network {index}"
    history = fit(config, name, model, split, labels, seeds["data_order"], on_epoch)
    curve = measure(config, model, split.train_inputs, labels, seeds["orderings"])
    return NetworkResult({"network": index}, seeds, history, curve)


def plot_ensemble(result: EnsembleResult) -> Any:
    plt = pyplot()
    figure, (curves_ax, scatter_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    by_index = {network.labels["network"]: network for network in result.networks}
    best, worst = result.groups()
    for group, color, title in (
        (best, "tab:blue", "best"),
        (worst, "tab:red", "worst"),
    ):
        for position, index in enumerate(group):
            curve = by_index[index].curve
            label = (
                f"{len(group)} {title} by generalization error"
                if position == 0
                else None
            )
            curves_ax.plot(
                curve.fraction, curve.mean, color=color, alpha=0.8, label=label
            )
    curves_ax.set_xlabel("Fraction of units ablated")
    curves_ax.set_ylabel(f"Training {result.networks[0].curve.metric}")
    curves_ax.set_ylim(0, 1.02)
    curves_ax.legend()
    curves_ax.set_title("Cumulative ablation")

    summary = result.summary()
    scatter_ax.scatter(summary["generalization_error"], summary["auc"], color="black")
    statistics = result.statistics()
    scatter_ax.set_xlabel("Generalization error (train - test accuracy)")
    scatter_ax.set_ylabel("Normalized AUC")
    scatter_ax.set_title(
        f"{len(summary)} networks, Spearman "
        f"{statistics['auc_generalization_error_spearman']:.3f} "
        f"(p = {statistics['auc_generalization_error_spearman_p']:.2g})"
    )
    figure.suptitle(f"Ensemble of {result.config.model} on {result.config.dataset}")
    figure.tight_layout()
    return figure


NAME = "ensemble"
CONFIG_TYPE = EnsembleConfig

# Options that choose which networks run without changing any of them.
SWEEP_ONLY_FIELDS = ("networks", "compared")


def trial_params(config: EnsembleConfig) -> list[dict[str, Any]]:
    """Return the settings of each network of the sweep, in order."""
    return [{"network": index} for index in range(config.networks)]


def trial_key(params: dict[str, Any]) -> str:
    return network_name(params)


def run_trial(
    config: EnsembleConfig,
    params: dict[str, Any],
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    return _train_network(config, params["network"], split, on_epoch)


def make_result(
    config: EnsembleConfig, networks: list[NetworkResult]
) -> EnsembleResult:
    return EnsembleResult(config, list(networks))


def write_result(
    result: EnsembleResult,
    out: OutputFolder,
    finished: bool,
    failed: list[dict[str, Any]],
) -> None:
    """Write the output files; the figure only once the sweep is over."""
    write_networks(
        out,
        result,
        result.networks,
        result.statistics(),
        plot_ensemble,
        finished,
        failed,
    )


def run_ensemble(
    config: EnsembleConfig,
    out: str | Path,
    on_epoch: EpochCallback | None = None,
    *,
    executor: Any = None,
    retries: int = 0,
    force: bool = False,
    on_trial: Any = None,
) -> EnsembleResult:
    """Train ``config.networks`` networks that differ only in their seeds, measure each
    one's curve, and write ``out``.

    ``out`` receives summary.csv (one row per network, with its generalization error and
    AUC), curves.csv, run.json (with the Spearman and Pearson correlations of AUC with
    generalization error and their p-values) and figure.png. The results store in
    ``out`` records each network as it finishes, so running again resumes. The CSV and
    JSON files are rewritten at most every 30 s, and at the end.

    Args:
        config: The experiment's settings.
        out: Output folder. It also contains the results store, results.sqlite, so
            running again with the same folder resumes the sweep.
        on_epoch: Called after every epoch with the network's name and the epoch's
            record, when the trials run in this process.
        executor: Where the trials run (see ``singledir.sweep``). Default: in this
            process, one after another.
        retries: Reruns of a failed trial before it is recorded as failed.
        force: Run a changed config in a folder that holds another one.
        on_trial: Called after every finished trial with the number done, the total,
            the trial's name and its status.
    """
    from singledir.sweep.driver import run_sweep

    return run_sweep(
        __name__,
        config,
        out,
        executor=executor,
        retries=retries,
        force=force,
        on_epoch=on_epoch,
        on_trial=on_trial,
    )
