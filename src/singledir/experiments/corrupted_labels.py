"""Corrupted labels: memorizing networks rely more on single directions.

Networks are trained on a training set whose labels are partly shuffled (0 to 100%) until
they fit it, then their hidden units are ablated cumulatively and training accuracy is
recorded, as in Figure 1a of Morcos et al. (ICLR 2018). The more labels are corrupted, the
more the network must memorize, and the faster its curve is expected to fall.
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
    EXACT_SPEARMAN_MAX,
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
    spearman_with_p,
    summary_frame,
    write_networks,
)

logger = logging.getLogger(__name__)

__all__ = [
    "EXACT_SPEARMAN_MAX",
    "CorruptedLabelsConfig",
    "CorruptedLabelsResult",
    "run_corrupted_labels",
    "spearman_with_p",
]


@dataclass
class CorruptedLabelsConfig(NetworkConfig):
    """Settings of the corrupted-labels experiment; the defaults are the main job."""

    fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # of training labels

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        check_fractions(
            "fractions",
            self.fractions,
            upper_open=False,
            hint="Pass fractions from 0 (no labels shuffled) to 1 (all shuffled).",
        )
        super().validate()

    @classmethod
    def paper(cls) -> CorruptedLabelsConfig:
        """Return the paper's MNIST setting: a 512-512 MLP on all 60,000 training digits."""
        return cls(dataset="mnist", epochs=640, target_train_accuracy=1.0)


@dataclass
class CorruptedLabelsResult:
    config: CorruptedLabelsConfig
    trials: list[NetworkResult] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        return summary_frame(self.trials)

    def curves(self) -> pd.DataFrame:
        return curves_frame(
            [trial.curve for trial in self.trials],
            [trial.labels for trial in self.trials],
        )

    def spearman(self) -> tuple[float, float]:
        """Spearman correlation of corruption fraction with AUC, and its p-value.

        With at most ``EXACT_SPEARMAN_MAX`` fractions the p-value is exact.
        """
        summary = self.summary()
        if len(summary) < 3:
            return float("nan"), float("nan")
        return spearman_with_p(
            summary["corruption"].to_numpy(), summary["auc"].to_numpy()
        )


def _train_trial(
    config: CorruptedLabelsConfig,
    fraction: float,
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    # Seeds follow the fraction's value, not its position, so a run of a subset of
    # fractions reproduces the same networks.
    seeds = network_seeds(config.seed, 0, [round(fraction * 1_000_000)])
    labels, _ = corrupt_labels(split.train_targets, fraction, seed=seeds["corruption"])
    model = build_network(config, split, seeds["init"])
    name = f"corruption {fraction:g}"
    history = fit(config, name, model, split, labels, seeds["data_order"], on_epoch)
    curve = measure(config, model, split.train_inputs, labels, seeds["orderings"])
    return NetworkResult({"corruption": fraction}, seeds, history, curve)


def plot_curves(result: CorruptedLabelsResult) -> Any:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(result.trials), 1)))
    for trial, color in zip(result.trials, colors):
        trial.curve.plot(ax, label=f"{trial.labels['corruption']:g}", color=color)
    ax.set_ylabel(f"Training {result.trials[0].curve.metric}")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Cumulative ablation, {result.config.model} on {result.config.dataset}"
    )
    ax.legend(title="Labels corrupted")
    return figure


NAME = "corrupted-labels"
CONFIG_TYPE = CorruptedLabelsConfig

# Options that choose which networks run without changing any of them.
SWEEP_ONLY_FIELDS = ("fractions",)


def trial_params(config: CorruptedLabelsConfig) -> list[dict[str, Any]]:
    """Return the settings of each network of the sweep, in order."""
    return [{"corruption": fraction} for fraction in config.fractions]


def trial_key(params: dict[str, Any]) -> str:
    return network_name(params)


def run_trial(
    config: CorruptedLabelsConfig,
    params: dict[str, Any],
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    return _train_trial(config, params["corruption"], split, on_epoch)


def make_result(
    config: CorruptedLabelsConfig, networks: list[NetworkResult]
) -> CorruptedLabelsResult:
    return CorruptedLabelsResult(config, list(networks))


def _spearman_details(result: CorruptedLabelsResult) -> dict[str, float]:
    rho, p_value = result.spearman()
    return {"spearman_corruption_auc": rho, "spearman_p_value": p_value}


def write_result(
    result: CorruptedLabelsResult,
    out: OutputFolder,
    finished: bool,
    failed: list[dict[str, Any]],
) -> None:
    """Write the output files; the figure only once the sweep is over."""
    write_networks(
        out,
        result,
        result.trials,
        _spearman_details(result),
        plot_curves,
        finished,
        failed,
    )


def run_corrupted_labels(
    config: CorruptedLabelsConfig,
    out: str | Path,
    on_epoch: EpochCallback | None = None,
    *,
    executor: Any = None,
    retries: int = 0,
    force: bool = False,
    on_trial: Any = None,
) -> CorruptedLabelsResult:
    """Train one network per corruption fraction, measure its curve and write ``out``.

    ``out`` receives summary.csv, curves.csv, run.json and figure.png. The results store
    in ``out`` records each network as it finishes, so running again resumes. The CSV
    and JSON files are rewritten at most every 30 s, and at the end.

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
