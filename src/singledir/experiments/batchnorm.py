"""Batch norm: networks trained with batch normalization rely less on single directions.

Networks of one topology are trained with and without batch norm, several of each, and
their cumulative ablation curves are compared, as in Figure 4b of Morcos et al. (ICLR
2018), where the conv nets with batch norm kept their accuracy longer under ablation.
The networks of the two groups are built in pairs that share their seeds and initial
weights, so each pair differs only in the batch norm layers and the conv biases that
batch norm makes redundant.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from singledir.experiments._common import (
    EpochCallback,
    NetworkConfig,
    NetworkResult,
    OutputFolder,
    build_network,
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
_EXPERIMENT_KEY = 5

_BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


@dataclass
class BatchNormConfig(NetworkConfig):
    """Settings of the batch norm experiment; the defaults finish in minutes on a CPU."""

    model: str = "cnn11"
    width: float = 0.125  # of cnn11's channels: 8 to 64 instead of 64 to 512
    networks: int = 4  # networks with batch norm, and as many without
    epochs: int = 30  # cap when the target accuracy is not reached

    def validate(self) -> None:
        """Raise ValueError on the first invalid setting, before any training."""
        if self.networks < 1:
            raise ValueError(
                f"Expected networks to be at least 1, but got {self.networks}. Pass the "
                "number of networks in each group, such as 4."
            )
        super().validate()

    @classmethod
    def paper(cls) -> BatchNormConfig:
        """Return the paper's setting: 4 cnn11 networks of full width with and 4 without batch
        norm on CIFAR-10, 10 orderings each."""
        return cls(dataset="cifar10", width=1.0, epochs=100, target_train_accuracy=1.0)


@dataclass
class BatchNormResult:
    config: BatchNormConfig
    networks: list[NetworkResult] = field(default_factory=list)

    def summary(self) -> pd.DataFrame:
        return summary_frame(self.networks)

    def curves(self) -> pd.DataFrame:
        return curves_frame(
            [network.curve for network in self.networks],
            [network.labels for network in self.networks],
        )

    def statistics(self) -> dict[str, Any]:
        """Return the AUC of each group: mean, standard deviation, range and every value."""
        summary = self.summary()
        if summary.empty:
            return {}
        groups = {}
        for batch_norm, name in (
            (True, "with_batch_norm"),
            (False, "without_batch_norm"),
        ):
            aucs = summary.loc[summary["batch_norm"] == batch_norm, "auc"].to_numpy()
            if aucs.size == 0:
                continue
            groups[name] = {
                "auc_mean": float(aucs.mean()),
                # ddof=1: the spread of the group as a sample of networks.
                "auc_std": float(aucs.std(ddof=1)) if aucs.size > 1 else float("nan"),
                "auc_min": float(aucs.min()),
                "auc_max": float(aucs.max()),
                "auc": aucs.tolist(),
            }
        return {"groups": groups}


def _build_pair_member(
    config: BatchNormConfig, split: Any, init_seed: int, batch_norm: bool
) -> nn.Module:
    """Build one network of a pair. Both members start from the same weights.

    The network without batch norm is built, then given every parameter of its twin
    with batch norm that has the same name and shape. Only the conv biases, which batch
    norm makes redundant, keep their own initialization.
    """
    with_norm = build_network(config, split, init_seed, batch_norm=True)
    if batch_norm:
        return with_norm
    without_norm = build_network(config, split, init_seed, batch_norm=False)
    shared = {
        name: tensor
        for name, tensor in with_norm.state_dict().items()
        if name in without_norm.state_dict()
        and without_norm.state_dict()[name].shape == tensor.shape
    }
    without_norm.load_state_dict(shared, strict=False)
    return without_norm


def _train_network(
    config: BatchNormConfig,
    batch_norm: bool,
    index: int,
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    # Both groups use the same seeds, and the same initial weights, for network i.
    seeds = network_seeds(config.seed, _EXPERIMENT_KEY, [index])
    del seeds["corruption"]
    model = _build_pair_member(config, split, seeds["init"], batch_norm)
    labels = split.train_targets
    name = network_name({"batch_norm": batch_norm, "network": index})
    history = fit(config, name, model, split, labels, seeds["data_order"], on_epoch)
    curve = measure(config, model, split.train_inputs, labels, seeds["orderings"])
    return NetworkResult(
        {"batch_norm": batch_norm, "network": index}, seeds, history, curve
    )


def plot_batchnorm(result: BatchNormResult) -> Any:
    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.5))
    statistics = result.statistics()["groups"]
    for batch_norm, color, key in (
        (True, "tab:blue", "with_batch_norm"),
        (False, "tab:red", "without_batch_norm"),
    ):
        curves = [
            n.curve for n in result.networks if n.labels["batch_norm"] == batch_norm
        ]
        if not curves:
            continue
        for position, curve in enumerate(curves):
            label = None
            if position == 0:
                group = statistics[key]
                spread = group["auc_std"]
                spread_text = "" if math.isnan(spread) else f" ± {spread:.3f}"
                label = (
                    f"{'with' if batch_norm else 'without'} batch norm "
                    f"(AUC {group['auc_mean']:.3f}{spread_text})"
                )
            ax.plot(curve.fraction, curve.mean, color=color, alpha=0.8, label=label)
            ax.fill_between(
                curve.fraction,
                curve.mean - curve.std,
                curve.mean + curve.std,
                color=color,
                alpha=0.1,
            )
    ax.set_xlabel("Fraction of feature maps ablated")
    ax.set_ylabel(f"Training {result.networks[0].curve.metric}")
    ax.set_ylim(0, 1.02)
    ax.legend()
    ax.set_title(f"Batch norm, {result.config.model} on {result.config.dataset}")
    return figure


def check_sweep(config: BatchNormConfig, split: Any) -> None:
    """Raise ValueError if the model has no batch norm to take away."""
    model = build_network(config, split, 0, batch_norm=True)
    if not any(isinstance(m, _BATCH_NORM_TYPES) for m in model.modules()):
        raise ValueError(
            f"Model {config.model!r} has no batch norm layers, so both groups would be "
            "the same network. Pick a model with batch norm, such as cnn11, resnet50 "
            "or vgg11_bn."
        )


NAME = "batchnorm"
CONFIG_TYPE = BatchNormConfig

# Options that choose which networks run without changing any of them.
SWEEP_ONLY_FIELDS = ("networks",)


def trial_params(config: BatchNormConfig) -> list[dict[str, Any]]:
    """Return the settings of each network of the sweep, in order."""
    return [
        {"batch_norm": batch_norm, "network": index}
        for index in range(config.networks)
        for batch_norm in (True, False)
    ]


def trial_key(params: dict[str, Any]) -> str:
    return network_name(params)


def run_trial(
    config: BatchNormConfig,
    params: dict[str, Any],
    split: Any,
    on_epoch: EpochCallback | None,
) -> NetworkResult:
    return _train_network(
        config, params["batch_norm"], params["network"], split, on_epoch
    )


def make_result(
    config: BatchNormConfig, networks: list[NetworkResult]
) -> BatchNormResult:
    return BatchNormResult(config, list(networks))


def write_result(
    result: BatchNormResult,
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
        plot_batchnorm,
        finished,
        failed,
    )


def run_batchnorm(
    config: BatchNormConfig,
    out: str | Path,
    on_epoch: EpochCallback | None = None,
    *,
    executor: Any = None,
    retries: int = 0,
    force: bool = False,
    on_trial: Any = None,
) -> BatchNormResult:
    """Train ``config.networks`` networks with and as many without batch norm, measure
    each one's curve, and write ``out``.

    ``out`` receives summary.csv (one row per network), curves.csv, run.json (with each
    group's AUC mean, standard deviation and range) and figure.png. The results store in
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
