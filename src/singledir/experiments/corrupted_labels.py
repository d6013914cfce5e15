"""Corrupted labels: memorizing networks rely more on single directions.

Networks are trained on a training set whose labels are partly shuffled (0 to 100%) until
they fit it, then their hidden units are ablated cumulatively and training accuracy is
recorded, as in Figure 1a of Morcos et al. (ICLR 2018). The more labels are corrupted, the
more the network must memorize, and the faster its curve is expected to fall.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats

from singledir.curve import ablation_curve
from singledir.curve_result import AblationCurve
from singledir.data import corrupt_labels
from singledir.datasets import DATASETS, load_split
from singledir.experiments._files import save_figure, write_csv, write_json
from singledir.models import mlp
from singledir.provenance import derive_seed, environment_info, utc_now
from singledir.training import EpochRecord, TrainConfig, train

logger = logging.getLogger(__name__)


@dataclass
class CorruptedLabelsConfig:
    """Settings of the corrupted-labels experiment; the defaults are the main job."""

    fractions: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # of training labels
    hidden: tuple[int, ...] = (512, 512)  # widths of the MLP's hidden layers
    orderings: int = 10  # random ablation orderings per network
    points: int = 51  # evenly spaced numbers of ablated units, both ends included
    seed: int = 0  # base seed: split, corruption, initialization, data order, orderings
    dataset: str = "mnist-subset"
    test_size: int = 1000  # examples held out of the 5,000 for test accuracy
    train_size: int | None = None  # subsample the training split; None keeps all of it
    max_epochs: int = 100  # cap when the target training accuracy is not reached
    target_train_accuracy: float = 0.99  # stop training once reached
    batch_size: int = 128  # training batch size
    lr: float = 1e-3  # Adam learning rate

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        self._validate_fractions()
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(
                "Expected hidden to be one or more positive layer widths, but got "
                f"{tuple(self.hidden)}. Pass widths such as (512, 512)."
            )
        if self.dataset not in DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}. Choose one of: {', '.join(DATASETS)}."
            )
        if self.orderings < 1:
            raise ValueError(
                f"Expected orderings to be at least 1, but got {self.orderings}. Pass a "
                "positive number of orderings, such as 10."
            )
        if self.points < 2:
            raise ValueError(
                f"Expected points to be at least 2, but got {self.points}. Pass at least "
                "2, so that the curve covers both no units and all units ablated."
            )
        self._validate_training()

    def _validate_fractions(self) -> None:
        if not self.fractions:
            raise ValueError(
                "Expected at least one corruption fraction, but got none. Pass "
                "fractions such as (0.0, 0.5, 1.0)."
            )
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(
                f"Expected distinct corruption fractions, but got {list(self.fractions)}. "
                "Pass each fraction once."
            )
        for fraction in self.fractions:
            # The comparison is False for NaN, so NaN is rejected too.
            if not 0.0 <= fraction <= 1.0:
                raise ValueError(
                    f"Expected every corruption fraction to be in the [0, 1] range, but "
                    f"got {fraction}. Pass fractions from 0 (no labels shuffled) to 1 "
                    "(all shuffled)."
                )

    def _validate_training(self) -> None:
        if self.test_size < 1:
            raise ValueError(
                f"Expected test_size to be at least 1, but got {self.test_size}. Pass "
                "the number of examples to hold out, such as 1000."
            )
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(
                "Expected train_size to be None or at least 1, but got "
                f"{self.train_size}. Pass None to train on the whole training split."
            )
        if self.max_epochs < 1:
            raise ValueError(
                f"Expected max_epochs to be at least 1, but got {self.max_epochs}. Pass "
                "a positive number of epochs, such as 100."
            )
        if not 0.0 < self.target_train_accuracy <= 1.0:
            raise ValueError(
                "Expected the target training accuracy to be in the (0, 1] range, but got "
                f"{self.target_train_accuracy}. Pass an accuracy such as 0.99."
            )
        if self.batch_size < 1:
            raise ValueError(
                f"Expected batch_size to be at least 1, but got {self.batch_size}. Pass a "
                "positive training batch size, such as 128."
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(
                f"Expected lr to be a positive finite number, but got {self.lr}. Pass a "
                "learning rate such as 0.001."
            )


@dataclass
class TrialResult:
    """One trained network: its corruption fraction, accuracies and curve."""

    corruption: float
    seeds: dict[str, int]
    history: list[EpochRecord]
    test_accuracy: float
    curve: AblationCurve

    @property
    def train_accuracy(self) -> float:
        return self.history[-1].train_accuracy


@dataclass
class CorruptedLabelsResult:
    config: CorruptedLabelsConfig
    trials: list[TrialResult] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        rows = [
            {
                "corruption": trial.corruption,
                "train_accuracy": trial.train_accuracy,
                "test_accuracy": trial.test_accuracy,
                "auc": trial.curve.auc,
                "auc_std": trial.curve.auc_std,
                "relative_auc": trial.curve.relative_auc,
                "epochs": len(trial.history),
            }
            for trial in self.trials
        ]
        return pd.DataFrame(rows)

    def curves(self) -> pd.DataFrame:
        frames = []
        for trial in self.trials:
            frame = trial.curve.to_frame()
            frame.insert(0, "corruption", trial.corruption)
            frames.append(frame)
        return pd.concat(frames, ignore_index=True)

    def spearman(self) -> tuple[float, float]:
        """Spearman correlation of corruption fraction with AUC, and its p-value.

        With at most ``EXACT_SPEARMAN_MAX`` fractions the two-sided p-value is exact,
        from every pairing of the AUCs with the fractions. The t approximation that
        scipy uses otherwise gives p = 0 for a perfect correlation of a few points.
        """
        summary = self.summary()
        if len(summary) < 3:
            return float("nan"), float("nan")
        return spearman_with_p(
            summary["corruption"].to_numpy(), summary["auc"].to_numpy()
        )


# Largest number of points whose Spearman p-value is computed exactly: 7! = 5,040
# pairings, a fraction of a second.
EXACT_SPEARMAN_MAX = 7


def spearman_with_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return Spearman's rho of ``x`` and ``y`` and its two-sided p-value."""
    result = stats.spearmanr(x, y)
    if len(x) > EXACT_SPEARMAN_MAX:
        return float(result.statistic), float(result.pvalue)

    def statistic(permuted: np.ndarray) -> float:
        return stats.spearmanr(permuted, y).statistic

    exact = stats.permutation_test(
        (x,),
        statistic,
        permutation_type="pairings",
        n_resamples=np.inf,
        alternative="two-sided",
    )
    return float(result.statistic), float(exact.pvalue)


def _train_trial(
    config: CorruptedLabelsConfig,
    fraction: float,
    split: Any,
    on_epoch: Callable[[EpochRecord], None] | None,
) -> TrialResult:
    # Seeds follow the fraction's value, not its position, so a run of a subset of
    # fractions reproduces the same networks.
    key = round(fraction * 1_000_000)
    seeds = {
        "corruption": derive_seed(config.seed, 1, key),
        "init": derive_seed(config.seed, 2, key),
        "data_order": derive_seed(config.seed, 3, key),
        "orderings": derive_seed(config.seed, 4, key),
    }
    labels, _ = corrupt_labels(split.train_targets, fraction, seed=seeds["corruption"])
    # fork_rng keeps the caller's global random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seeds["init"])
        model = mlp(split.input_dim, hidden=config.hidden, classes=split.num_classes)
    train_config = TrainConfig(
        epochs=config.max_epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        target_train_accuracy=config.target_train_accuracy,
        seed=seeds["data_order"],
    )
    history = train(
        model,
        (split.train_inputs, labels),
        (split.test_inputs, split.test_targets),
        train_config,
        on_epoch=on_epoch,
    )
    if history[-1].train_accuracy < config.target_train_accuracy:
        logger.warning(
            "Corruption %g: training accuracy %.4f is below the target %.4f after %d "
            "epochs.",
            fraction,
            history[-1].train_accuracy,
            config.target_train_accuracy,
            config.max_epochs,
        )
    curve = ablation_curve(
        model,
        (split.train_inputs, labels),
        orderings=config.orderings,
        seed=seeds["orderings"],
        points=config.points,
        chunk_size=1000,
    )
    return TrialResult(fraction, seeds, history, history[-1].test_accuracy, curve)


def plot_curves(result: CorruptedLabelsResult) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots(figsize=(6, 4.5))
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.9, max(len(result.trials), 1)))
    for trial, color in zip(result.trials, colors):
        trial.curve.plot(ax, label=f"{trial.corruption:g}", color=color)
    ax.set_ylabel("Training accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"Cumulative ablation, MLP {result.config.hidden} on {result.config.dataset}"
    )
    ax.legend(title="Labels corrupted")
    return figure


def _write_outputs(
    result: CorruptedLabelsResult,
    out: Path,
    started: float,
    started_utc: str,
    finished: bool,
) -> None:
    summary = result.summary()
    write_csv(out / "summary.csv", summary)
    curves = result.curves()
    write_csv(out / "curves.csv", curves)
    rho, p_value = result.spearman()
    write_json(
        out / "run.json",
        {
            "experiment": "corrupted-labels",
            "finished": finished,
            "config": asdict(result.config),
            "seeds": {f"{trial.corruption}": trial.seeds for trial in result.trials},
            "spearman_corruption_auc": rho,
            "spearman_p_value": p_value,
            "epochs": {
                f"{trial.corruption}": [asdict(r) for r in trial.history]
                for trial in result.trials
            },
            "environment": environment_info(),
            "started_utc": started_utc,
            "seconds": time.perf_counter() - started,
        },
    )
    if finished:
        save_figure(plot_curves(result), out / "figure.png")


def run_corrupted_labels(
    config: CorruptedLabelsConfig,
    out: str | Path,
    on_epoch: Callable[[float, EpochRecord], None] | None = None,
) -> CorruptedLabelsResult:
    """Train one MLP per corruption fraction, measure its curve and write ``out``.

    ``out`` receives summary.csv, curves.csv, run.json and figure.png. The CSV and JSON
    files are rewritten after every network, so a crash keeps the finished ones.
    """
    config.validate()
    started = time.perf_counter()
    started_utc = utc_now()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(config.dataset, test_size=config.test_size, seed=config.seed)
    if config.train_size is not None:
        available = len(split.train_targets)
        if config.train_size > available:
            raise ValueError(
                f"Expected train_size of at most {available}, the size of the training "
                f"split, but got {config.train_size}."
            )
        keep = np.sort(
            np.random.default_rng(config.seed).permutation(len(split.train_targets))[
                : config.train_size
            ]
        )
        split.train_inputs, split.train_targets = (
            split.train_inputs[keep],
            split.train_targets[keep],
        )
    result = CorruptedLabelsResult(config)
    for fraction in config.fractions:
        logger.info("Corruption %g: training", fraction)
        callback = (
            None
            if on_epoch is None
            else (lambda record, f=fraction: on_epoch(f, record))
        )
        trial = _train_trial(config, fraction, split, callback)
        result.trials.append(trial)
        logger.info("Corruption %g: AUC %.4f", fraction, trial.curve.auc)
        _write_outputs(result, out, started, started_utc, finished=False)
    _write_outputs(result, out, started, started_utc, finished=True)
    return result
