"""Over-training: as a network over-fits, its reliance on single directions grows.

One network is trained on unmodified labels for long past the point where its training
and test losses diverge. At regular epochs its cumulative ablation curve is measured on
the training set, next to both losses, as in Figure 3 of Morcos et al. (ICLR 2018). There
the AUC fell as the test loss rose (Spearman correlation -0.728 on an MNIST MLP), and
its peak came near the lowest test loss, which makes it an early-stopping signal that
needs no held-out data. The correlation here is over the measured epochs of one network,
which are not independent samples, so its p-value is only a rough guide.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from singledir.curve_result import AblationCurve
from singledir.experiments._common import (
    EpochCallback,
    NetworkConfig,
    OutputFolder,
    build_network,
    correlations,
    curves_frame,
    fit,
    load_data,
    measure,
    network_seeds,
    pyplot,
)
from singledir.training import EpochRecord

logger = logging.getLogger(__name__)

# Tells this experiment's seeds from those of the other experiments.
_EXPERIMENT_KEY = 3

#: Spearman correlation of AUC with test loss over training that the paper reports.
PAPER_SPEARMAN = -0.728


@dataclass
class OverTrainingConfig(NetworkConfig):
    """Settings of the over-training experiment; the defaults finish in minutes on a CPU."""

    epochs: int = 60  # all of them are trained
    target_train_accuracy: float | None = None
    every: int = 2  # measure the curve after every this many epochs

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        if self.target_train_accuracy is not None:
            raise ValueError(
                "Expected target_train_accuracy to be None, but got "
                f"{self.target_train_accuracy}. Over-training trains every epoch; set "
                "epochs instead."
            )
        if not 1 <= self.every <= self.epochs:
            raise ValueError(
                f"Expected every to be from 1 to epochs ({self.epochs}), but got "
                f"{self.every}."
            )
        super().validate()

    @classmethod
    def paper(cls) -> OverTrainingConfig:
        """Return the paper's setting: a 2,048-2,048 MLP on all 60,000 MNIST training digits."""
        return cls(dataset="mnist", hidden=(2048, 2048), epochs=640, every=10)


@dataclass
class Measurement:
    """The curve measured after one epoch, with that epoch's losses and accuracies."""

    record: EpochRecord
    curve: AblationCurve


@dataclass
class OverTrainingResult:
    config: OverTrainingConfig
    seeds: dict[str, int] = field(default_factory=dict)
    history: list[EpochRecord] = field(default_factory=list)
    measurements: list[Measurement] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        """Return one row per measured epoch: losses, accuracies and the curve's AUC."""
        return pd.DataFrame(
            [
                {
                    **asdict(m.record),
                    "generalization_error": m.record.train_accuracy
                    - m.record.test_accuracy,
                    "auc": m.curve.auc,
                    "auc_std": m.curve.auc_std,
                    "relative_auc": m.curve.relative_auc,
                }
                for m in self.measurements
            ]
        )

    def curves(self) -> pd.DataFrame:
        return curves_frame(
            [m.curve for m in self.measurements],
            [{"epoch": m.record.epoch} for m in self.measurements],
        )

    def statistics(self) -> dict[str, Any]:
        """Return the correlations of AUC with test loss, and the epochs of their extremes."""
        summary = self.summary()
        if summary.empty:
            return {}
        details: dict[str, Any] = correlations(
            summary["auc"].to_numpy(), summary["test_loss"].to_numpy(), "auc_test_loss"
        )
        details["paper_auc_test_loss_spearman"] = PAPER_SPEARMAN
        details["auc_peak_epoch"] = int(summary["epoch"][summary["auc"].idxmax()])
        losses = np.array([record.test_loss for record in self.history])
        details["lowest_test_loss_epoch"] = int(
            self.history[int(losses.argmin())].epoch
        )
        measured = summary["test_loss"].idxmin()
        details["lowest_test_loss_measured_epoch"] = int(summary["epoch"][measured])
        return details


def plot_over_training(result: OverTrainingResult) -> Any:
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    summary = result.summary()
    statistics = result.statistics()
    epochs = [record.epoch for record in result.history]
    figure, (auc_ax, loss_ax, scatter_ax) = plt.subplots(1, 3, figsize=(15, 4.2))

    auc_ax.plot(summary["epoch"], summary["auc"], marker="o", color="black")
    auc_ax.set_ylabel("Normalized AUC")
    loss_ax.plot(epochs, [r.train_loss for r in result.history], label="train loss")
    loss_ax.plot(epochs, [r.test_loss for r in result.history], label="test loss")
    loss_ax.set_yscale("log")
    loss_ax.set_ylabel("Cross-entropy loss")
    loss_ax.legend()
    for ax in (auc_ax, loss_ax):
        ax.set_xlabel("Epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.axvline(statistics["auc_peak_epoch"], color="black", ls=":", lw=1)
        ax.axvline(
            statistics["lowest_test_loss_epoch"], color="tab:orange", ls="--", lw=1
        )
    auc_ax.set_title("AUC (dotted: its peak; dashed: lowest test loss)")
    loss_ax.set_title("Losses")

    points = scatter_ax.scatter(
        summary["test_loss"], summary["auc"], c=summary["epoch"], cmap="viridis"
    )
    colorbar = figure.colorbar(points, ax=scatter_ax, label="Epoch")
    colorbar.locator = MaxNLocator(integer=True)
    colorbar.update_ticks()
    scatter_ax.set_xlabel("Test loss")
    scatter_ax.set_ylabel("Normalized AUC")
    scatter_ax.set_title(
        f"Spearman {statistics['auc_test_loss_spearman']:.3f} (paper: {PAPER_SPEARMAN})"
    )
    figure.suptitle(f"Over-training {result.config.model} on {result.config.dataset}")
    figure.tight_layout()
    return figure


def _write(result: OverTrainingResult, out: OutputFolder, finished: bool) -> None:
    details = {
        "seeds": result.seeds,
        "epochs": [asdict(record) for record in result.history],
        **result.statistics(),
    }
    figure = (lambda: plot_over_training(result)) if finished else None
    out.write(result.summary(), result.curves(), details, figure)


def run_over_training(
    config: OverTrainingConfig, out: str | Path, on_epoch: EpochCallback | None = None
) -> OverTrainingResult:
    """Train one network for ``config.epochs`` epochs, measure its curve after every
    ``config.every`` epochs, and write ``out``.

    ``out`` receives summary.csv (one row per measured epoch), curves.csv, run.json
    (with the correlations of AUC with test loss, the epoch of the AUC's peak and the
    epoch of the lowest test loss) and figure.png. The files are rewritten after every
    measurement, so a crash keeps the measured epochs.
    """
    config.validate()
    folder = OutputFolder(out, "over-training", config)
    split = load_data(config)
    seeds = network_seeds(config.seed, _EXPERIMENT_KEY, [0])
    del seeds["corruption"]
    result = OverTrainingResult(config, seeds)
    model = build_network(config, split, seeds["init"])
    labels = split.train_targets

    def after_epoch(name: str, record: EpochRecord) -> None:
        result.history.append(record)
        if on_epoch is not None:
            on_epoch(name, record)
        if record.epoch % config.every and record.epoch != config.epochs:
            return
        curve = measure(config, model, split.train_inputs, labels, seeds["orderings"])
        result.measurements.append(Measurement(record, curve))
        logger.info(
            "Epoch %d: test loss %.4f, AUC %.4f",
            record.epoch,
            record.test_loss,
            curve.auc,
        )
        _write(result, folder, finished=False)

    fit(config, "network", model, split, labels, seeds["data_order"], after_epoch)
    _write(result, folder, finished=True)
    return result
