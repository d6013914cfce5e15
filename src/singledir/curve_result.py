"""The result of a cumulative ablation curve, with its summary statistics.

Normalized AUC is the area under the score curve with the x axis being the *fraction*
of units ablated, from 0 (none) to 1 (all), integrated with the trapezoidal rule over
the evaluated points. A network whose score stays at 1 until every unit is gone has an
AUC near 1, and a curve that drops to chance at once has an AUC near the chance score.
``relative_auc`` divides it by the unablated score, so networks of different accuracy
compare on one scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

_FORMAT_VERSION = 1

# np.trapz was renamed np.trapezoid in NumPy 2.0.
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


def normalized_auc(fraction: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Integrate ``scores`` (..., K) over ``fraction`` (K,) with the trapezoidal rule.

    Raises:
        ValueError: If ``fraction`` does not start at 0 and end at 1.
    """
    fraction = np.asarray(fraction, dtype=np.float64)
    if fraction.size < 2 or fraction[0] != 0.0 or fraction[-1] != 1.0:
        raise ValueError(
            "The normalized AUC needs scores at 0 units ablated and at all units "
            f"ablated, but the curve covers fractions {fraction[:1]} to {fraction[-1:]}. "
            "Include 0 and the total number of units in points."
        )
    return _trapezoid(np.asarray(scores, dtype=np.float64), fraction, axis=-1)


@dataclass
class AblationCurve:
    """Scores of a model as more and more units are ablated, over several orderings.

    Attributes:
        num_ablated: Number of units ablated at each point, shape (K,), increasing.
        scores: Score at each point for each ordering, shape (orderings, K).
        total_units: Number of units pooled from all layers.
        layers: Ablated layer names, in forward order.
        layer_sizes: Number of units of each layer.
        orders: The random orderings, shape (orderings, total_units): pooled unit
            indices, where pooled index i of layer j is ``sum(layer_sizes[:j]) + i``.
        metric: Name of the score.
        seed: Seed of the CPU generator that drew the orderings.
        value: The ablation value: a float, "mean" for each unit's mean activation,
            or "per-unit" for other per-unit values.
        config: Other settings the curve was computed with.
    """

    num_ablated: np.ndarray
    scores: np.ndarray
    total_units: int
    layers: list[str]
    layer_sizes: list[int]
    orders: np.ndarray
    metric: str = "accuracy"
    seed: int = 0
    value: float | str = 0.0
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> np.ndarray:
        """Fraction of units ablated at each point, shape (K,)."""
        return self.num_ablated / self.total_units

    @property
    def num_orderings(self) -> int:
        return int(self.scores.shape[0])

    @property
    def mean(self) -> np.ndarray:
        """Mean score over orderings, shape (K,)."""
        return self.scores.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        """Standard deviation over orderings (ddof=0), shape (K,)."""
        return self.scores.std(axis=0)

    @property
    def auc_per_ordering(self) -> np.ndarray:
        """Normalized AUC of each ordering, shape (orderings,)."""
        return normalized_auc(self.fraction, self.scores)

    @property
    def auc(self) -> float:
        """Normalized AUC averaged over orderings."""
        return float(self.auc_per_ordering.mean())

    @property
    def auc_std(self) -> float:
        """Standard deviation of the normalized AUC over orderings (ddof=0)."""
        return float(self.auc_per_ordering.std())

    @property
    def unablated_score(self) -> float:
        """Score with no unit ablated."""
        if self.num_ablated[0] != 0:
            raise ValueError("The curve has no point at 0 units ablated.")
        return float(self.scores[:, 0].mean())

    @property
    def relative_auc(self) -> float:
        """Normalized AUC divided by the unablated score; NaN if that score is 0."""
        unablated = self.unablated_score
        return self.auc / unablated if unablated != 0 else float("nan")

    def to_frame(self) -> pd.DataFrame:
        """Return the curve in long format: ordering, num_ablated, fraction, score.

        The score column is named after the metric, such as "accuracy" or "top5". A
        metric named "ordering", "num_ablated" or "fraction" would replace one of the
        other columns, so its score column is named "score" instead.
        """
        orderings, points = self.scores.shape
        columns = {
            "ordering": np.repeat(np.arange(orderings), points),
            "num_ablated": np.tile(self.num_ablated, orderings),
            "fraction": np.tile(self.fraction, orderings),
        }
        score_column = "score" if self.metric in columns else self.metric
        columns[score_column] = self.scores.reshape(-1)
        return pd.DataFrame(columns)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": _FORMAT_VERSION,
            "num_ablated": self.num_ablated.tolist(),
            "scores": self.scores.tolist(),
            "total_units": self.total_units,
            "layers": list(self.layers),
            "layer_sizes": list(self.layer_sizes),
            "orders": self.orders.tolist(),
            "metric": self.metric,
            "seed": self.seed,
            "value": self.value,
            "config": self.config,
        }

    @classmethod
    def from_dict(cls, payload: dict[str, Any]) -> AblationCurve:
        version = payload.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"Unsupported curve format version {version!r}; this singledir reads "
                f"version {_FORMAT_VERSION}."
            )
        return cls(
            num_ablated=np.asarray(payload["num_ablated"], dtype=np.int64),
            scores=np.asarray(payload["scores"], dtype=np.float64),
            total_units=int(payload["total_units"]),
            layers=list(payload["layers"]),
            layer_sizes=[int(size) for size in payload["layer_sizes"]],
            orders=np.asarray(payload["orders"], dtype=np.int64),
            metric=payload["metric"],
            seed=int(payload["seed"]),
            value=payload["value"],
            config=dict(payload.get("config", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write the curve to a JSON file."""
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> AblationCurve:
        """Read a curve written by ``save``."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(
        self, ax: Any = None, *, label: str | None = None, color: Any = None
    ) -> Any:
        """Plot the mean score against units ablated, with a band of one std.

        Returns:
            The matplotlib Axes drawn on.
        """
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots()
        mean, std = self.mean, self.std
        (line,) = ax.plot(self.num_ablated, mean, label=label, color=color)
        ax.fill_between(
            self.num_ablated, mean - std, mean + std, color=line.get_color(), alpha=0.2
        )
        ax.set_xlabel("Number of units ablated")
        ax.set_ylabel(self.metric.capitalize())
        return ax
