"""Cumulative ablation curves (Morcos et al., "On the importance of single directions
for generalization", ICLR 2018).

The units of the chosen layers are pooled, put in a random order, and ablated one after
another. The model is scored on the data after each step. Networks that memorize their
training set lose accuracy faster than networks that generalize, so the normalized area
under this curve predicts generalization without a held-out set. Scores are measured on
whatever data is passed; the method uses the training set.

What it cannot show: the curve measures reliance on the units of the chosen layers in
the basis they are computed in. Directions that are not aligned with single units are
not ablated, and the curve says nothing about layers that were left out.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from singledir._model_state import (
    model_device,
    preserved_mode,
    preserved_rng,
    registered_hooks,
)
from singledir._outputs import OutputKey
from singledir.ablation import AblationValue, UnitClamp
from singledir.curve_result import AblationCurve
from singledir.data import (
    DataSource,
    check_chunk_size,
    iter_batches,
    warn_about_loader,
)
from singledir.engines import ENGINES, Engine, Measurement, build_engine
from singledir.evaluation import input_dtype_error, to_device
from singledir.layers import LayerInfo, find_layers, validate_layer_names
from singledir.means import unit_means
from singledir.metrics import MetricSpec, resolve_metric

logger = logging.getLogger(__name__)

# Number of full passes over the data above which ablation_curve warns that it is slow.
_MANY_PASSES = 5000


def resolve_points(points: int | Sequence[int] | None, total: int) -> np.ndarray:
    """Return the sorted, distinct numbers of ablated units to evaluate.

    ``None`` gives every k from 0 to ``total``. An integer n gives n evenly spaced k,
    rounded to integers, that include both ends. A sequence gives those k.
    """
    if points is None:
        return np.arange(total + 1, dtype=np.int64)
    if isinstance(points, (int, np.integer)) and not isinstance(points, bool):
        if points < 2:
            raise ValueError(
                f"Expected points to be an integer of at least 2, but got {points}."
            )
        if points > total + 1:
            logger.warning(
                "points=%d is more than the %d distinct numbers of ablated units (0 to %d), "
                "so every number is evaluated.",
                points,
                total + 1,
                total,
            )
            return np.arange(total + 1, dtype=np.int64)
        return np.unique(np.round(np.linspace(0, total, int(points))).astype(np.int64))
    array = np.asarray(points)
    if array.ndim != 1 or array.size == 0 or not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"Expected points to be None, an integer, or a sequence of integers, but got "
            f"{points!r}."
        )
    if array.min() < 0 or array.max() > total:
        raise ValueError(
            f"Expected every point to be a number of ablated units from 0 to {total}, but "
            f"got {int(array.min()) if array.min() < 0 else int(array.max())}."
        )
    return np.unique(array.astype(np.int64))


def draw_orders(total: int, orderings: int, seed: int) -> np.ndarray:
    """Draw ``orderings`` random permutations of ``total`` pooled units.

    They come from a dedicated CPU ``torch.Generator`` seeded with ``seed``, so they do
    not depend on or change the global random state, and match across machines.
    """
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    rows = [torch.randperm(total, generator=generator) for _ in range(orderings)]
    return torch.stack(rows).numpy() if rows else np.empty((0, total), dtype=np.int64)


def _check_orderings(orderings: int) -> None:
    if (
        isinstance(orderings, bool)
        or not isinstance(orderings, (int, np.integer))
        or orderings < 1
    ):
        raise ValueError(
            f"Expected orderings to be a positive integer, but got {orderings!r}."
        )


def _resolve_layers(
    model: nn.Module,
    example_input: Any,
    layers: Sequence[str] | None,
    unit_dim: int,
    output_keys: Mapping[str, OutputKey] | None,
) -> list[LayerInfo]:
    if layers is not None and len(layers) == 0:
        raise ValueError(
            f"Expected at least one layer name, but got layers={layers!r}. Pass the "
            "names of the layers to ablate, or layers=None to ablate every activation "
            "module."
        )
    if layers is not None:
        validate_layer_names(model, layers)
    found = find_layers(
        model, example_input, layers=layers, unit_dim=unit_dim, output_keys=output_keys
    )
    if layers is not None:
        ran = {info.name for info in found}
        missing = [name for name in layers if name not in ran]
        if missing:
            raise ValueError(
                f"Layers {missing} did not run in the forward pass, so they cannot be "
                "ablated. Pass layers that the model uses."
            )
    if not found:
        raise ValueError(
            "The model has no activation modules to ablate. Pass layers, the names of "
            "the modules whose outputs hold the units."
        )
    for info in found:
        if info.calls != 1:
            raise ValueError(
                f"Layer '{info.name}' runs {info.calls} times in one forward pass, so "
                "ablating it would clamp every call at once. Give each use its own "
                "module instance."
            )
    return found


def prepare_measurement(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None,
    value: AblationValue | str,
    metric: MetricSpec,
    *,
    unit_dim: int,
    output_keys: Mapping[str, OutputKey] | None,
    logits_fn: Callable[[Any], Tensor] | None,
    chunk_size: int,
) -> tuple[Measurement, tuple[Any, int]]:
    """Validate the arguments shared by curves and unit importance.

    Returns the measurement and the first chunk of inputs, on the model's device, with
    its number of examples.
    """
    scorer = resolve_metric(metric)
    check_chunk_size(chunk_size)
    warn_about_loader(data)

    def batches():
        return iter_batches(data, chunk_size)

    probe = batches()
    first_inputs, first_targets = next(probe)
    # Closing the generator releases a DataLoader's iterator and its workers.
    probe.close()
    example = to_device(first_inputs, model_device(model))
    dtype_error = input_dtype_error(model, example)
    try:
        infos = _resolve_layers(model, example, layers, unit_dim, output_keys)
    except RuntimeError as error:
        # Only a failed forward pass is blamed on the dtypes, because a model may cast
        # its inputs itself.
        if dtype_error is None:
            raise
        raise dtype_error from error
    names = [info.name for info in infos]
    if isinstance(value, str):
        if value != "mean":
            raise ValueError(
                f"Expected value to be a float, per-unit values or 'mean', but got {value!r}."
            )
        value = unit_means(
            model,
            data,
            names,
            unit_dim=unit_dim,
            output_keys=output_keys,
            chunk_size=chunk_size,
        )
    clamp = UnitClamp(names, value, unit_dim=unit_dim, output_keys=output_keys)
    measurement = Measurement(
        model=model,
        batches=batches,
        layers=infos,
        clamp=clamp,
        metric=scorer,
        logits_fn=logits_fn,
        unit_dim=unit_dim,
        output_keys=dict(output_keys or {}),
    )
    return measurement, (example, int(first_targets.shape[0]))


def _warn_if_slow(engine: Engine, orderings: int, ks: np.ndarray, total: int) -> None:
    passes = orderings * int(np.count_nonzero((ks > 0) & (ks < total))) + 2
    if engine.name == "naive" and passes > _MANY_PASSES and ks.size > 51:
        logger.warning(
            "This curve needs %d full passes over the data (%d orderings x %d points) "
            "with the naive engine. Pass points=51 for a curve that is about %d times "
            "cheaper.",
            passes,
            orderings,
            ks.size,
            max(ks.size // 51, 1),
        )


def ablation_curve(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None = None,
    orderings: int = 10,
    seed: int = 0,
    value: AblationValue | str = 0.0,
    metric: MetricSpec = "accuracy",
    points: int | Sequence[int] | None = None,
    *,
    engine: str = "auto",
    chunk_size: int = 1024,
    unit_dim: int = 1,
    output_keys: Mapping[str, OutputKey] | None = None,
    logits_fn: Callable[[Any], Tensor] | None = None,
    orderings_per_pass: int | None = None,
    progress: bool = False,
) -> AblationCurve:
    """Compute a cumulative ablation curve of ``model`` on ``data``.

    The units of all chosen layers are pooled, and for each of ``orderings`` random
    permutations the first k units are ablated for every k in ``points``. Every point is
    scored over the whole of ``data`` in eval mode without gradients, as total score
    over total examples. The model's hooks, train/eval mode and weights are as before
    when this returns or raises. The curve runs on the model's device.

    Args:
        model: Any ``nn.Module`` that maps a batch of inputs to logits (or to an output
            from which ``logits_fn`` extracts them).
        data: A DataLoader, a Dataset of (input, target) pairs, or an (inputs, targets)
            pair of tensors. The method measures on the training set.
        layers: Names of the layers whose units are ablated. Default: every activation
            module (see ``find_layers``).
        orderings: Number of random orderings. Default 10.
        seed: Seed of the CPU generator that draws the orderings. Default 0.
        value: Ablation value: a float (default 0.0), a mapping from layer name to
            per-unit values of shape (num_units,), or "mean" for each unit's mean
            activation over ``data`` (see ``unit_means``).
        metric: "accuracy", "topK" (such as "top5"), or a callable on (logits, targets)
            returning per-example scores of shape (batch,) or a scalar batch mean.
        points: Numbers of ablated units to evaluate. None: every k from 0 to the
            total. An integer n: n evenly spaced k including both ends. A sequence:
            those k.
        engine: "naive" (a full forward pass per point), "prefix" (cache the network
            up to the first ablated layer), "incremental" (also update the next Linear
            or Conv layer one unit at a time), or "auto" (default): the fastest that
            applies and matches "naive" on the first chunk.
        chunk_size: Examples per forward pass when ``data`` is not a DataLoader; a
            DataLoader's own batches are the chunks. Peak memory grows with it.
        unit_dim: Dimension of the layer outputs along which units lie. Default 1.
        output_keys: For layers that return a tuple, list or dict, the index or key of
            the element that contains the units.
        logits_fn: Function from the model's output to the logits, for models that do
            not return a tensor.
        orderings_per_pass: Orderings the cached engines score in one pass over the
            data, which runs their cached prefix once per chunk. Default None: as many
            as keep a pass to about 1,024 unit sets (all 10 orderings at 51 points, one
            at every k of a 1,024-unit curve). A failure loses the orderings of the
            pass in progress. The naive engine always scores one ordering at a time.
        progress: Show a tqdm progress bar over passes over the data.

    Returns:
        An ``AblationCurve``. Its ``auc`` is the trapezoidal integral of the score over
        the fraction of units ablated, from 0 to 1, averaged over orderings.

    Raises:
        ValueError: For an unknown layer, an empty ``layers`` list, an empty dataset,
            targets that do not match the inputs, NaN logits, points outside
            [0, total units], or a ``chunk_size`` that is not a positive integer.
        TypeError: If the model output is not a tensor and no ``logits_fn`` is given,
            or if the first forward pass fails and the floating-point inputs differ
            in dtype from the model's parameters.

    If scoring fails partway, the exception carries the orderings completed so far as
    ``error.partial_curve`` (an ``AblationCurve``, or None if none completed). The naive
    engine completes orderings one at a time, the cached engines a pass at a time (see
    ``orderings_per_pass``).

    Example:
        >>> curve = ablation_curve(model, (train_x, train_y), points=51)
        >>> curve.auc, curve.relative_auc
    """
    _check_orderings(orderings)
    if engine not in ENGINES:
        raise ValueError(
            f"Unknown engine {engine!r}. Choose one of: {', '.join(ENGINES)}."
        )
    with preserved_rng():
        return _ablation_curve(
            model,
            data,
            layers,
            orderings,
            seed,
            value,
            metric,
            points,
            engine=engine,
            chunk_size=chunk_size,
            unit_dim=unit_dim,
            output_keys=output_keys,
            logits_fn=logits_fn,
            orderings_per_pass=orderings_per_pass,
            progress=progress,
        )


# Unit sets per pass over the data when orderings_per_pass is None. Larger blocks run
# the cached prefix less often, but their per-pass caches grow with the block.
_SETS_PER_BLOCK = 1024


def _check_orderings_per_pass(orderings_per_pass: int | None) -> None:
    if orderings_per_pass is not None and (
        isinstance(orderings_per_pass, bool)
        or not isinstance(orderings_per_pass, numbers.Integral)
        or orderings_per_pass < 1
    ):
        raise ValueError(
            "Expected orderings_per_pass to be a positive integer or None, but got "
            f"{orderings_per_pass!r}. Pass None to let singledir choose."
        )


def _orderings_per_block(
    engine: str, orderings_per_pass: int | None, orderings: int, points: int
) -> int:
    """Return how many orderings one call to the engine scores."""
    # The naive engine gains nothing from scoring orderings together, so it scores
    # one at a time and a failure keeps every finished ordering.
    if engine == "naive":
        return 1
    if orderings_per_pass is not None:
        return min(int(orderings_per_pass), orderings)
    return max(1, min(orderings, _SETS_PER_BLOCK // max(points, 1)))


def _ablation_curve(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None,
    orderings: int,
    seed: int,
    value: AblationValue | str,
    metric: MetricSpec,
    points: int | Sequence[int] | None,
    *,
    engine: str,
    chunk_size: int,
    unit_dim: int,
    output_keys: Mapping[str, OutputKey] | None,
    logits_fn: Callable[[Any], Tensor] | None,
    orderings_per_pass: int | None,
    progress: bool,
) -> AblationCurve:
    _check_orderings_per_pass(orderings_per_pass)
    measurement, (example, example_size) = prepare_measurement(
        model,
        data,
        layers,
        value,
        metric,
        unit_dim=unit_dim,
        output_keys=output_keys,
        logits_fn=logits_fn,
        chunk_size=chunk_size,
    )
    infos = measurement.layers
    total = measurement.total_units
    ks = resolve_points(points, total)
    orders = draw_orders(total, orderings, seed)
    # The clamp has already turned NumPy scalars and 0-d tensors into a float.
    value_label: float | str = "per-unit"
    if isinstance(value, str):
        value_label = value
    elif measurement.clamp.scalar is not None:
        value_label = measurement.clamp.scalar
    used_engine = engine

    def make_curve(scores: list[np.ndarray]) -> AblationCurve:
        return AblationCurve(
            num_ablated=ks,
            scores=np.asarray(scores, dtype=np.float64).reshape(len(scores), ks.size),
            total_units=total,
            layers=[info.name for info in infos],
            layer_sizes=[info.num_units for info in infos],
            orders=orders[: len(scores)],
            metric=measurement.metric.name,
            seed=int(seed),
            value=value_label,
            config={
                "unit_dim": unit_dim,
                "chunk_size": chunk_size,
                "engine": used_engine,
            },
        )

    completed: list[np.ndarray] = []
    # k = 0 and k = total ablate the same units in every ordering, so they are scored once.
    shared: dict[int, float] = {}
    try:
        with (
            preserved_mode(model, evaluate=True),
            registered_hooks() as handles,
            torch.no_grad(),
        ):
            measurement.clamp.attach(model, handles)
            chosen = build_engine(engine, measurement, example, example_size)
            used_engine = chosen.name
            _warn_if_slow(chosen, orderings, ks, total)
            block = _orderings_per_block(
                chosen.name, orderings_per_pass, orderings, len(ks)
            )
            for start in _progress(range(0, orderings, block), progress):
                rows = range(start, min(start + block, orderings))
                needed = [int(k) for k in ks if int(k) not in shared]
                sets = [orders[row, :k] for row in rows for k in needed]
                context = [f" (ordering {row})" for row in rows for _ in needed]
                scores = chosen.score_sets(sets, context=context).reshape(len(rows), -1)
                for row_scores in scores:
                    by_k = dict(zip(needed, row_scores.tolist()))
                    for k in (0, total):
                        if k in by_k:
                            shared.setdefault(k, by_k[k])
                    completed.append(
                        np.array([shared.get(int(k), by_k.get(int(k))) for k in ks])
                    )
                logger.debug("Orderings %d of %d done.", rows.stop, orderings)
    except BaseException as error:
        error.partial_curve = make_curve(completed) if completed else None
        if completed:
            logger.warning(
                "Ablation curve failed after %d of %d orderings. The completed orderings "
                "are attached to the exception as partial_curve.",
                len(completed),
                orderings,
            )
        raise
    return make_curve(completed)


def _progress(iterable: Any, enabled: bool) -> Any:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="orderings", unit="ordering")
