"""Steps every experiment shares: its common options, loading the data, building,
training and measuring one network, and the tables and statistics of the output folder.

Each experiment expands its options into a list of networks that differ in a few labelled
settings (a corruption fraction, a dropout rate, an ensemble index). Every network gets
its own seeds, derived from the base seed, the experiment and those settings, so a run
of a subset of the networks reproduces the same ones.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import Tensor, nn

from singledir.curve import ablation_curve, resolve_points
from singledir.curve_result import AblationCurve
from singledir.datasets import DATASETS, IN_MEMORY_DATASETS, Split, load_split
from singledir.experiments._files import save_figure, write_csv, write_json
from singledir.layers import find_layers
from singledir.metrics import resolve_metric
from singledir.models import build_model, default_layers, default_metric
from singledir.provenance import derive_seed, environment_info, utc_now
from singledir.training import EpochRecord, TrainConfig, train

logger = logging.getLogger(__name__)

# Examples per forward pass when a curve is measured.
CHUNK_SIZE = 1000

# Called after every training epoch with the network's name and the epoch's record.
EpochCallback = Callable[[str, EpochRecord], None]


@dataclass
class NetworkConfig:
    """Options every experiment takes: the network, its data, training and measurement.

    Experiments subclass it and may change the defaults.
    """

    model: str = "mlp"  # mlp, cnn11, resnet50 or another torchvision classifier name
    dataset: str = "mnist-subset"  # a name in singledir.datasets.DATASETS
    data_root: str | None = None  # folder holding mnist or cifar10 files
    test_size: int | None = None  # held-out examples; None: the dataset's own default
    train_size: int | None = None  # subsample the training split; None keeps all of it
    hidden: tuple[int, ...] = (512, 512)  # MLP hidden widths, before `width`
    width: float = 1.0  # multiplier of MLP widths and cnn11 channel counts
    epochs: int = 100  # training epochs, or the cap when a target accuracy is set
    target_train_accuracy: float | None = 0.99  # stop once reached; None: all epochs
    batch_size: int = 128  # training batch size
    lr: float = 1e-3  # Adam learning rate
    orderings: int = 10  # random ablation orderings per curve
    points: int = 51  # evenly spaced numbers of ablated units, both ends included
    metric: str | None = None  # None: accuracy, top5 for torchvision models
    measure_size: int | None = None  # training examples each curve is scored on
    device: str = "auto"  # where to train and measure; auto: cuda when present
    seed: int = 0  # base seed of the split, initializations, data orders, orderings

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any data is loaded."""
        if self.dataset not in DATASETS:
            raise ValueError(
                f"Unknown dataset {self.dataset!r}. Choose one of: {', '.join(DATASETS)}."
            )
        if self.dataset not in IN_MEMORY_DATASETS:
            raise ValueError(
                f"The experiments train on data held in memory, and {self.dataset} is "
                "read image by image from disk. Choose one of: "
                f"{', '.join(IN_MEMORY_DATASETS)}, or measure a trained {self.dataset} "
                "model with 'singledir curve'."
            )
        # Both raise ValueError on an unknown model or metric name.
        default_metric(self.model)
        if self.metric is not None:
            resolve_metric(self.metric)
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(
                "Expected hidden to be one or more positive layer widths, but got "
                f"{tuple(self.hidden)}. Pass widths such as (512, 512)."
            )
        if not (self.width > 0 and math.isfinite(self.width)):
            raise ValueError(
                f"Expected width to be a positive number, but got {self.width}. Pass a "
                "multiplier such as 0.5."
            )
        _check_at_least(
            "orderings",
            self.orderings,
            1,
            "Pass a positive number of orderings, such as 10.",
        )
        _check_at_least(
            "points",
            self.points,
            2,
            "Pass at least 2, so that the curve covers both no units and all units "
            "ablated.",
        )
        _check_optional_positive(
            "test_size",
            self.test_size,
            "Pass the number of examples to hold out, or None for the dataset's default.",
        )
        _check_optional_positive(
            "train_size",
            self.train_size,
            "Pass None to train on the whole training split.",
        )
        if self.seed < 0:
            raise ValueError(
                f"Expected seed to be a non-negative integer, but got {self.seed}. Pass "
                "a seed such as 0."
            )
        _check_optional_positive(
            "measure_size",
            self.measure_size,
            "Pass None to score the curves on the whole training split.",
        )
        self._validate_training()
        try:
            device = torch.device(self.resolved_device())
        except RuntimeError:
            raise ValueError(
                f"Unknown device {self.device!r}. Pass auto, cpu, cuda or cuda:N."
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"Expected a CUDA device for device {self.device!r}, but PyTorch finds "
                "none. Pass auto or cpu."
            )

    def _validate_training(self) -> None:
        _check_at_least(
            "epochs", self.epochs, 1, "Pass a positive number of epochs, such as 100."
        )
        _check_at_least(
            "batch_size",
            self.batch_size,
            1,
            "Pass a positive training batch size, such as 128.",
        )
        target = self.target_train_accuracy
        if target is not None and not 0.0 < target <= 1.0:
            raise ValueError(
                "Expected the target training accuracy to be in the (0, 1] range, but got "
                f"{target}. Pass an accuracy such as 0.99, or None to train every epoch."
            )
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(
                f"Expected lr to be a positive finite number, but got {self.lr}. Pass a "
                "learning rate such as 0.001."
            )

    def resolved_device(self) -> str:
        """Return the device name, with "auto" replaced by "cuda" or "cpu"."""
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def _check_at_least(name: str, value: int, least: int, fix: str) -> None:
    if value < least:
        raise ValueError(
            f"Expected {name} to be at least {least}, but got {value}. {fix}"
        )


def _check_optional_positive(name: str, value: int | None, fix: str) -> None:
    if value is not None and value < 1:
        raise ValueError(
            f"Expected {name} to be None or at least 1, but got {value}. {fix}"
        )


def check_fractions(
    name: str, values: Sequence[float], upper_open: bool, hint: str
) -> None:
    """Raise ValueError unless ``values`` are distinct numbers in [0, 1], or in [0, 1)
    when ``upper_open``. ``hint`` ends the message of an out-of-range value."""
    if not values:
        raise ValueError(f"Expected at least one value in {name}, but got none. {hint}")
    if len(set(values)) != len(values):
        raise ValueError(
            f"Expected distinct values in {name}, but got {list(values)}. Pass each "
            "value once."
        )
    interval = "[0, 1)" if upper_open else "[0, 1]"
    for value in values:
        # Both comparisons are False for NaN, so NaN is rejected too.
        inside = 0.0 <= value < 1.0 if upper_open else 0.0 <= value <= 1.0
        if not inside:
            raise ValueError(
                f"Expected every value in {name} to be in the {interval} range, but got "
                f"{value}. {hint}"
            )


def load_data(config: NetworkConfig) -> Split:
    """Load the config's dataset, subsample its training split, and move it to the device."""
    split = load_split(
        config.dataset,
        test_size=config.test_size,
        seed=config.seed,
        data_root=config.data_root,
    )
    if config.train_size is not None:
        split = split.subsample_train(config.train_size, config.seed)
    device = config.resolved_device()
    if device != "cpu":
        for name in ("train_inputs", "train_targets", "test_inputs", "test_targets"):
            setattr(split, name, getattr(split, name).to(device))
    return split


def check_metric(config: NetworkConfig, split: Split) -> None:
    """Raise ValueError if a topK metric needs more classes than the data has."""
    metric = config.metric or ""
    if metric.startswith("top") and metric[3:].isdigit():
        k = int(metric[3:])
        if k > split.num_classes:
            raise ValueError(
                f"top{k} counts every example as correct when the model has only "
                f"{split.num_classes} outputs, so the curve would be flat. Pass a K "
                f"below {split.num_classes}, or 'accuracy'."
            )


def network_seeds(base: int, experiment: int, key: Sequence[int]) -> dict[str, int]:
    """Derive the seeds of one network from the base seed, the experiment and its key."""
    kinds = {"corruption": 1, "init": 2, "data_order": 3, "orderings": 4}
    return {
        kind: derive_seed(base, number, *key, experiment)
        if experiment
        else derive_seed(base, number, *key)
        for kind, number in kinds.items()
    }


def build_network(
    config: NetworkConfig,
    split: Split,
    init_seed: int,
    *,
    dropout: float = 0.0,
    batch_norm: bool | None = None,
) -> nn.Module:
    """Build the config's model with weights drawn from ``init_seed``, on its device."""
    # fork_rng keeps the caller's global random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = build_model(
            config.model,
            split.input_shape,
            split.num_classes,
            width=config.width,
            hidden=config.hidden,
            dropout=dropout,
            batch_norm=batch_norm,
        )
    return model.to(config.resolved_device())


def fit(
    config: NetworkConfig,
    name: str,
    model: nn.Module,
    split: Split,
    labels: Tensor,
    data_order_seed: int,
    on_epoch: EpochCallback | None = None,
) -> list[EpochRecord]:
    """Train ``model`` on the training inputs with ``labels``; test on the true labels."""
    train_config = TrainConfig(
        epochs=config.epochs,
        batch_size=config.batch_size,
        lr=config.lr,
        target_train_accuracy=config.target_train_accuracy,
        seed=data_order_seed,
    )
    callback = None if on_epoch is None else (lambda record: on_epoch(name, record))
    history = train(
        model,
        (split.train_inputs, labels),
        (split.test_inputs, split.test_targets),
        train_config,
        on_epoch=callback,
    )
    logger.info("%s: trained for %d epochs", name, len(history))
    return history


def measure(
    config: NetworkConfig,
    model: nn.Module,
    inputs: Tensor,
    labels: Tensor,
    seed: int,
    fractions: Sequence[float] = (),
) -> AblationCurve:
    """Measure the cumulative ablation curve of ``model`` on its training data.

    The model's default layers are ablated (every hidden layer of an MLP, the last three
    conv layers of cnn11, the last three residual blocks of a ResNet), scored with the
    config's metric at ``config.points`` evenly spaced numbers of ablated units, plus
    the number nearest to each of ``fractions`` of all units. With ``measure_size``
    set, the curve is scored on that many training examples, the same ones for every
    network of the run.
    """
    if config.measure_size is not None and config.measure_size < len(labels):
        keep = np.random.default_rng(config.seed).permutation(len(labels))
        keep = torch.as_tensor(np.sort(keep[: config.measure_size]))
        inputs, labels = inputs[keep.to(inputs.device)], labels[keep.to(labels.device)]
    layers = default_layers(model, inputs[:2])
    total = sum(
        info.num_units for info in find_layers(model, inputs[:2], layers=layers)
    )
    points = set(resolve_points(config.points, total).tolist())
    points.update(units_at_fraction(fraction, total) for fraction in fractions)
    return ablation_curve(
        model,
        (inputs, labels),
        layers=layers,
        orderings=config.orderings,
        seed=seed,
        metric=config.metric or default_metric(config.model),
        points=sorted(points),
        chunk_size=CHUNK_SIZE,
    )


def network_name(labels: dict[str, Any]) -> str:
    """Return a network's name from its labels, such as "dropout 0.1, corruption 1"."""
    parts = []
    for key, value in labels.items():
        if isinstance(value, bool):
            text = "on" if value else "off"
        elif isinstance(value, float):
            text = f"{value:g}"
        else:
            text = str(value)
        parts.append(f"{key.replace('_', ' ')} {text}")
    return ", ".join(parts)


def units_at_fraction(fraction: float, total: int) -> int:
    """Return the number of units nearest to ``fraction`` of ``total``, halves up."""
    return math.floor(fraction * total + 0.5)


@dataclass
class NetworkResult:
    """One trained and measured network of an experiment.

    Attributes:
        labels: The settings that tell this network from the others of the run, such
            as {"corruption": 0.2}; they become the first columns of the tables.
        seeds: Seeds of its label corruption, initialization, data order and orderings.
        history: Losses and accuracies after every training epoch.
        curve: Its cumulative ablation curve on the training data.
    """

    labels: dict[str, Any]
    seeds: dict[str, int]
    history: list[EpochRecord]
    curve: AblationCurve

    @property
    def name(self) -> str:
        return network_name(self.labels)

    @property
    def train_accuracy(self) -> float:
        return self.history[-1].train_accuracy

    @property
    def test_accuracy(self) -> float:
        return self.history[-1].test_accuracy

    @property
    def generalization_error(self) -> float:
        """Training accuracy minus test accuracy, as Morcos et al. (ICLR 2018) define it."""
        return self.train_accuracy - self.test_accuracy

    def to_dict(self) -> dict[str, Any]:
        """Return the network as plain JSON types; ``from_dict`` reads it back."""
        return {
            "labels": self.labels,
            "seeds": self.seeds,
            "history": [asdict(record) for record in self.history],
            "curve": self.curve.to_dict(),
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> NetworkResult:
        return cls(
            labels=dict(payload["labels"]),
            seeds={key: int(value) for key, value in payload["seeds"].items()},
            history=[EpochRecord(**record) for record in payload["history"]],
            curve=AblationCurve.from_dict(payload["curve"]),
        )

    def summary_row(self) -> dict[str, Any]:
        last = self.history[-1]
        return {
            **self.labels,
            "train_accuracy": last.train_accuracy,
            "test_accuracy": last.test_accuracy,
            "generalization_error": self.generalization_error,
            "train_loss": last.train_loss,
            "test_loss": last.test_loss,
            "auc": self.curve.auc,
            "auc_std": self.curve.auc_std,
            "relative_auc": self.curve.relative_auc,
            "epochs": len(self.history),
        }


def summary_frame(results: Sequence[NetworkResult]) -> pd.DataFrame:
    """Return one row per network: its labels, accuracies, losses, AUC and epochs."""
    return pd.DataFrame([result.summary_row() for result in results])


def curves_frame(
    curves: Sequence[AblationCurve], labels: Sequence[dict[str, Any]]
) -> pd.DataFrame:
    """Return every curve in long format, with its labels as the first columns."""
    frames = []
    for curve, label in zip(curves, labels):
        frame = curve.to_frame()
        for position, (key, value) in enumerate(label.items()):
            frame.insert(position, key, value)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# Largest number of points whose Spearman p-value is computed exactly: 7! = 5,040
# pairings, a fraction of a second.
EXACT_SPEARMAN_MAX = 7


def spearman_with_p(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Return Spearman's rho of ``x`` and ``y`` and its two-sided p-value.

    With at most ``EXACT_SPEARMAN_MAX`` points the p-value is exact, from every pairing
    of ``y`` with ``x``. The t approximation that scipy uses otherwise gives p = 0 for a
    perfect correlation of a few points.
    """
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
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


def correlations(x: np.ndarray, y: np.ndarray, prefix: str) -> dict[str, float]:
    """Return the Spearman and Pearson correlations of ``x`` with ``y`` and their p-values.

    The keys are ``{prefix}_spearman``, ``{prefix}_spearman_p``, ``{prefix}_pearson`` and
    ``{prefix}_pearson_p``. Fewer than 3 points, or a constant input, give NaN.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    rho, rho_p = spearman_with_p(x, y)
    pearson = pearson_p = float("nan")
    if len(x) >= 3 and np.ptp(x) > 0 and np.ptp(y) > 0:
        result = stats.pearsonr(x, y)
        pearson, pearson_p = float(result.statistic), float(result.pvalue)
    return {
        f"{prefix}_spearman": rho,
        f"{prefix}_spearman_p": rho_p,
        f"{prefix}_pearson": pearson,
        f"{prefix}_pearson_p": pearson_p,
    }


class OutputFolder:
    """The output folder of one run: its CSV and JSON files, rewritten while the run
    goes on, and its figure, drawn once the run finishes.
    """

    def __init__(self, out: str | Path, experiment: str, config: NetworkConfig):
        self.path = Path(out)
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(
                f"Expected --out to be a folder, but {str(self.path)!r} is a file. Pass "
                "the path of a new or existing folder."
            )
        self.experiment = experiment
        self.config = config
        self.started = time.perf_counter()
        self.started_utc = utc_now()

    def write(
        self,
        summary: pd.DataFrame,
        curves: pd.DataFrame,
        details: dict[str, Any],
        figure: Callable[[], Any] | None = None,
    ) -> None:
        """Write summary.csv, curves.csv and run.json, and figure.png when given."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_csv(self.path / "summary.csv", summary)
        write_csv(self.path / "curves.csv", curves)
        write_json(
            self.path / "run.json",
            {
                "experiment": self.experiment,
                "finished": figure is not None,
                "config": asdict(self.config),
                "device": self.config.resolved_device(),
                **details,
                "environment": environment_info(),
                "started_utc": self.started_utc,
                "seconds": time.perf_counter() - self.started,
            },
        )
        if figure is not None:
            save_figure(figure(), self.path / "figure.png")


def network_details(results: Sequence[NetworkResult]) -> dict[str, Any]:
    """Return the seeds and per-epoch records of every network, keyed by its name."""
    return {
        "seeds": {result.name: result.seeds for result in results},
        "epochs": {
            result.name: [asdict(record) for record in result.history]
            for result in results
        },
    }


def write_networks(
    out: OutputFolder,
    result: Any,
    networks: Sequence[NetworkResult],
    statistics: dict[str, Any],
    plot: Callable[[Any], Any],
    finished: bool,
    failed: list[dict[str, Any]],
) -> None:
    """Write a sweep's output files, with the figure only once the sweep is over."""
    details = {**network_details(networks), **statistics, "failed_trials": failed}
    figure = (lambda: plot(result)) if finished and networks else None
    out.write(result.summary(), result.curves(), details, figure)


def pyplot() -> Any:
    """Return matplotlib.pyplot with the file-only Agg backend selected."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
