"""Dropout: networks trained with dropout become robust to ablation only up to the
dropout fraction, and only when they generalize.

MLPs are trained with dropout after each hidden layer at several rates, on unmodified and
on fully corrupted labels, and their cumulative ablation curves are compared, as in
Figure 4a of Morcos et al. (ICLR 2018). On unmodified labels the curves stayed nearly flat
until the fraction of units ablated reached the dropout rate. A network that memorizes
random labels with dropout fell soon after that point. Each curve is measured exactly at the
number of units equal to each dropout fraction, so the accuracy drop there needs no
interpolation.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from singledir.data import corrupt_labels
from singledir.experiments._common import (
    EpochCallback,
    NetworkConfig,
    NetworkResult,
    OutputFolder,
    build_network,
    check_fractions,
    curves_frame,
    fit,
    measure,
    network_name,
    network_seeds,
    pyplot,
    summary_frame,
    units_at_fraction,
    write_networks,
)

logger = logging.getLogger(__name__)

# Tells this experiment's seeds from those of the other experiments.
_EXPERIMENT_KEY = 4


@dataclass
class DropoutConfig(NetworkConfig):
    """Settings of the dropout experiment; the defaults finish in minutes on a CPU."""

    dropouts: tuple[float, ...] = (0.1, 0.2, 0.3)  # dropout probabilities, in [0, 1)
    corruptions: tuple[float, ...] = (0.0, 1.0)  # fractions of labels shuffled
    epochs: int = 200  # cap; memorizing random labels under dropout takes long

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        check_fractions(
            "dropouts",
            self.dropouts,
            upper_open=True,
            hint="Pass dropout probabilities such as 0.1,0.2,0.3.",
        )
        check_fractions(
            "corruptions",
            self.corruptions,
            upper_open=False,
            hint="Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
        )
        super().validate()

    @classmethod
    def paper(cls) -> DropoutConfig:
        """Return the paper's setting: 2,048-2,048 MLPs on all 60,000 MNIST training digits."""
        return cls(
            dataset="mnist", hidden=(2048, 2048), epochs=640, target_train_accuracy=1.0
        )


@dataclass
class DropoutResult:
    config: DropoutConfig
    networks: list[NetworkResult] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Return one row per network, with its accuracy drop at the dropout fraction."""
        summary = summary_frame(self.networks)
        if summary.empty:
            return summary
        at_fraction = [self.at_dropout_fraction(network) for network in self.networks]
        summary["units_at_dropout"] = [units for units, _, _ in at_fraction]
        summary["accuracy_at_dropout"] = [score for _, score, _ in at_fraction]
        summary["drop_at_dropout"] = [drop for _, _, drop in at_fraction]
        return summary

    @staticmethod
    def at_dropout_fraction(network: NetworkResult) -> tuple[int, float, float]:
        """Return the number of units equal to the dropout fraction, the mean score with that
        many ablated, and its drop from the unablated score.
        """
        curve = network.curve
        units = units_at_fraction(network.labels["dropout"], curve.total_units)
        index = int(np.flatnonzero(curve.num_ablated == units)[0])
        score = float(curve.mean[index])
        return units, score, curve.unablated_score - score

    def curves(self) -> pd.DataFrame:
        return curves_frame(
            [network.curve for network in self.networks],
            [network.labels for network in self.networks],
        )

    def statistics(self) -> dict[str, Any]:
        summary = self.summary()
        if summary.empty:
            return {}
        names = [network.name for network in self.networks]
        return {
            "auc": dict(zip(names, summary["auc"])),
            "drop_at_dropout_fraction": dict(zip(names, summary["drop_at_dropout"])),
        }


def _train_network(
    config: DropoutConfig,
    dropout: float,
    corruption: float,
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    key = [round(dropout * 1_000_000), round(corruption * 1_000_000)]
    seeds = network_seeds(config.seed, _EXPERIMENT_KEY, key)
    labels, _ = corrupt_labels(
        split.train_targets, corruption, seed=seeds["corruption"]
    )
    model = build_network(config, split, seeds["init"], dropout=dropout)
    name = network_name({"dropout": dropout, "corruption": corruption})
    history = fit(config, name, model, split, labels, seeds["data_order"], on_epoch)
    # Every curve gets the points of every dropout fraction, so that the AUCs of one
    # run integrate over the same grid.
    curve = measure(
        config, model, split.train_inputs, labels, seeds["orderings"], config.dropouts
    )
    return NetworkResult(
        {"dropout": dropout, "corruption": corruption}, seeds, history, curve
    )


def _labels_title(corruption: float) -> str:
    if corruption == 0:
        return "Unmodified labels"
    if corruption == 1:
        return "All labels shuffled"
    return f"{corruption:.0%} of labels shuffled"


def plot_dropout(result: DropoutResult) -> Any:
    plt = pyplot()
    corruptions = sorted({network.labels["corruption"] for network in result.networks})
    figure, axes = plt.subplots(
        1, len(corruptions), figsize=(5.5 * len(corruptions), 4.5), squeeze=False
    )
    colors = dict(
        zip(
            result.config.dropouts,
            plt.get_cmap("viridis")(
                np.linspace(0.0, 0.85, len(result.config.dropouts))
            ),
        )
    )
    for ax, corruption in zip(axes[0], corruptions):
        for network in result.networks:
            if network.labels["corruption"] != corruption:
                continue
            dropout = network.labels["dropout"]
            color = colors[dropout]
            network.curve.plot(ax, label=f"dropout {dropout:g}", color=color)
            units = units_at_fraction(dropout, network.curve.total_units)
            ax.axvline(units, color=color, ls="--", lw=1)
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"Training {result.networks[0].curve.metric}")
        ax.set_title(_labels_title(corruption))
        ax.legend()
    figure.suptitle(
        f"Dropout, {result.config.model} on {result.config.dataset} "
        "(dashed: units equal to the dropout fraction)"
    )
    figure.tight_layout()
    return figure


NAME = "dropout"
CONFIG_TYPE = DropoutConfig

# Options that choose which networks run without changing any of them.
SWEEP_ONLY_FIELDS = ("corruptions",)


def trial_params(config: DropoutConfig) -> list[dict[str, Any]]:
    """Return the settings of each network of the sweep, in order."""
    return [
        {"dropout": dropout, "corruption": corruption}
        for corruption in config.corruptions
        for dropout in config.dropouts
    ]


def trial_key(params: dict[str, Any]) -> str:
    return network_name(params)


def run_trial(
    config: DropoutConfig,
    params: dict[str, Any],
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    return _train_network(
        config, params["dropout"], params["corruption"], split, on_epoch
    )


def make_result(config: DropoutConfig, networks: list[NetworkResult]) -> DropoutResult:
    return DropoutResult(config, list(networks))


def write_result(
    result: DropoutResult,
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
        plot_dropout,
        finished,
        failed,
    )


def run_dropout(
    config: DropoutConfig,
    out: str | Path,
    on_epoch: EpochCallback | None = None,
    *,
    executor: Any = None,
    retries: int = 0,
    force: bool = False,
    on_trial: Any = None,
) -> DropoutResult:
    """Train one MLP per dropout rate and label corruption, measure its curve and write
    ``out``.

    ``out`` receives summary.csv (with each network's accuracy drop at its dropout
    fraction), curves.csv, run.json (with the AUC and that drop of each network) and
    figure.png. The results store in ``out`` records each network as it finishes, so
    running again resumes. The CSV and JSON files are rewritten at most every 30 s, and
    at the end.

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
