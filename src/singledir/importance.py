"""Single-unit importance: the score drop when one unit is ablated alone.

This is the per-unit counterpart of a cumulative ablation curve, computed by the same
engines. A unit whose ablation alone costs much accuracy is one the network relies on;
Morcos et al. (ICLR 2018) found that such importance is only weakly related to how
selective a unit is for one class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from singledir._model_state import preserved_mode, preserved_rng, registered_hooks
from singledir._outputs import OutputKey
from singledir.ablation import AblationValue
from singledir.curve import prepare_measurement
from singledir.data import DataSource
from singledir.engines import ENGINES, build_engine
from singledir.layers import unit_name
from singledir.metrics import MetricSpec


def unit_importance(
    model: nn.Module,
    data: DataSource,
    layers: Sequence[str] | None = None,
    value: AblationValue | str = 0.0,
    metric: MetricSpec = "accuracy",
    *,
    engine: str = "auto",
    chunk_size: int = 1024,
    unit_dim: int = 1,
    output_keys: Mapping[str, OutputKey] | None = None,
    logits_fn: Callable[[Any], Tensor] | None = None,
) -> pd.DataFrame:
    """Score ``model`` on ``data`` with each unit of ``layers`` ablated on its own.

    Arguments are as for ``ablation_curve``. The model's hooks, train/eval mode and
    weights are as before when this returns or raises.

    Returns:
        One row per unit, in forward order: ``layer``, ``unit`` (index in the layer),
        ``name`` (such as ``"relu1[17]"``), ``score`` with that unit ablated,
        ``baseline`` (the unablated score) and ``drop`` (baseline minus score).

    Example:
        >>> table = unit_importance(model, (train_x, train_y))
        >>> table.nlargest(10, "drop")
    """
    if engine not in ENGINES:
        raise ValueError(
            f"Unknown engine {engine!r}. Choose one of: {', '.join(ENGINES)}."
        )
    with preserved_rng():
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
        total = measurement.total_units
        sets = [np.empty(0, dtype=np.int64)] + [
            np.array([unit]) for unit in range(total)
        ]
        with (
            preserved_mode(model, evaluate=True),
            registered_hooks() as handles,
            torch.no_grad(),
        ):
            measurement.clamp.attach(model, handles)
            chosen = build_engine(engine, measurement, example, example_size)
            scores = chosen.score_sets(sets)

    layer_names = [
        info.name for info in measurement.layers for _ in range(info.num_units)
    ]
    unit_indices = [
        index for info in measurement.layers for index in range(info.num_units)
    ]
    frame = pd.DataFrame(
        {
            "layer": layer_names,
            "unit": unit_indices,
            "name": [
                unit_name(layer, index)
                for layer, index in zip(layer_names, unit_indices)
            ],
            "score": scores[1:],
        }
    )
    frame["baseline"] = scores[0]
    frame["drop"] = scores[0] - frame["score"]
    frame.attrs["metric"] = measurement.metric.name
    frame.attrs["engine"] = chosen.name
    return frame
