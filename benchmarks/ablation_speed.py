"""Time the curve engines side by side and print one table.

Every timed run happens in its own subprocess, so that its peak resident memory is its
own. Ratios compare runs of this one invocation on this one machine. Where the naive
engine would take too long, it runs on a subset of the points or orderings and its time
is scaled by the number of forward passes. The table marks such rows "scaled".

Usage: python benchmarks/ablation_speed.py [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import singledir
from singledir.datasets import load_split
from singledir.models import CNN11_LAYERS, cnn11
from singledir.provenance import cpu_model

SEED = 0


def mnist_all() -> tuple[torch.Tensor, torch.Tensor]:
    split = load_split("mnist-subset", test_size=1000, seed=SEED).flattened()
    inputs = torch.cat([split.train_inputs, split.test_inputs])
    targets = torch.cat([split.train_targets, split.test_targets])
    return inputs, targets


def trained_mlp(path: Path) -> None:
    """Train the 784-512-512-10 MLP for 3 epochs and save its weights to ``path``."""
    split = load_split("mnist-subset", test_size=1000, seed=SEED).flattened()
    torch.manual_seed(SEED)
    model = singledir.models.mlp(784)
    config = singledir.TrainConfig(epochs=3, target_train_accuracy=None, seed=SEED)
    singledir.train(model, (split.train_inputs, split.train_targets), config=config)
    torch.save(model.state_dict(), path)


def load_mlp(path: str) -> torch.nn.Module:
    model = singledir.models.mlp(784)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def conv_setup() -> tuple[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = cnn11().eval()
    inputs = torch.randn(500, 3, 32, 32, generator=generator)
    targets = torch.randint(0, 10, (500,), generator=generator)
    return model, (inputs, targets)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak_rss() -> None:
    """Reset the kernel's peak resident memory of this process (Linux 4.0 and newer)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss_bytes() -> int:
    """Return the peak resident memory since the last ``reset_peak_rss``."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM line.")


def child(spec: dict) -> dict:
    """Run one timed measurement described by ``spec`` and return its numbers."""
    if spec["model"] == "mlp":
        model = load_mlp(spec["weights"])
        inputs, targets = mnist_all()
        inputs = inputs.repeat(spec.get("repeat", 1), 1)
        targets = targets.repeat(spec.get("repeat", 1))
        layers = None
    else:
        model, (inputs, targets) = conv_setup()
        layers = list(CNN11_LAYERS)
    data = (inputs, targets)
    # Peak memory is measured over the timed call alone, not over loading the data.
    before = rss_bytes()
    reset_peak_rss()
    started = time.perf_counter()
    if spec["task"] == "curve":
        curve = singledir.ablation_curve(
            model,
            data,
            layers=layers,
            orderings=spec["orderings"],
            seed=SEED,
            points=spec["points"],
            engine=spec["engine"],
        )
        result = {
            "scores": curve.scores.tolist(),
            "num_ablated": curve.num_ablated.tolist(),
            "engine_used": curve.config["engine"],
        }
    elif spec["task"] == "importance":
        table = singledir.unit_importance(model, data, engine=spec["engine"])
        result = {"drops": table["drop"].tolist(), "engine_used": table.attrs["engine"]}
    else:
        result = {"drops": captum_drops(model, data), "engine_used": "captum"}
    seconds = time.perf_counter() - started
    peak = peak_rss_bytes()
    return {**result, "seconds": seconds, "peak_bytes": peak, "before_bytes": before}


def captum_drops(
    model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]
) -> list:
    """Per-unit accuracy drops from Captum's LayerFeatureAblation, 16 units per pass."""
    from captum.attr import LayerFeatureAblation

    inputs, targets = data

    def correct(batch: torch.Tensor) -> torch.Tensor:
        # Captum stacks perturbed copies of the inputs, so the targets are tiled.
        tiled = targets.repeat(batch.shape[0] // targets.shape[0])
        return (model(batch).argmax(dim=1) == tiled).float()

    drops = []
    with torch.no_grad():
        for layer in (model.relu1, model.relu2):
            ablation = LayerFeatureAblation(correct, layer)
            attribution = ablation.attribute(
                inputs, layer_baselines=0.0, perturbations_per_eval=16
            )
            drops.append(attribution.double().mean(dim=0))
    return torch.cat(drops).tolist()


def run(spec: dict) -> dict:
    output = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(output.stdout.strip().splitlines()[-1])


def max_difference(
    scores: list, reference: list, columns: list[int] | None = None
) -> float:
    ours = np.asarray(scores)
    theirs = np.asarray(reference)
    if columns is not None:
        ours = ours[: theirs.shape[0], columns]
    return float(np.abs(ours - theirs).max())


def curve_rows(
    name: str, base: dict, subsets: dict[str, tuple[dict, float]]
) -> list[dict]:
    """Time naive, prefix and incremental on ``base``.

    ``subsets`` maps an engine to (settings that override ``base``, factor its time is
    scaled by), for engines run on fewer points or orderings than ``base`` requests.
    """
    rows = []
    naive_spec, naive_scale = subsets.get("naive", ({}, 1.0))
    naive = run({**base, **naive_spec, "engine": "naive"})
    naive_seconds = naive["seconds"] * naive_scale
    for engine in ("naive", "prefix", "incremental"):
        spec, scale = subsets.get(engine, ({}, 1.0))
        result = naive if engine == "naive" else run({**base, **spec, "engine": engine})
        columns = [result["num_ablated"].index(k) for k in naive["num_ablated"]]
        rows.append(
            {
                "config": name,
                "engine": engine + (" scaled" if scale != 1 else ""),
                "seconds": result["seconds"] * scale,
                "ratio": naive_seconds / (result["seconds"] * scale),
                "max_accuracy_difference": max_difference(
                    result["scores"], naive["scores"], columns
                ),
                "peak_mib": result["peak_bytes"] / 2**20,
            }
        )
    return rows


def passes(orderings: int, points: int) -> int:
    """Forward passes of a curve: k = 0 and k = all are scored once for all orderings."""
    return orderings * (points - 2) + 2


def main(quick: bool) -> list[dict]:
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as folder:
        weights = str(Path(folder) / "mlp.pt")
        trained_mlp(Path(weights))
        mlp = {"task": "curve", "model": "mlp", "weights": weights}
        orderings = 2 if quick else 10

        # 1. Every k from 0 to 1,024; naive on 21 of those points in one ordering.
        subset = [int(k) for k in np.linspace(0, 1024, 21).round()]
        # The prefix engine runs one ordering, scaled by the number of orderings.
        rows += curve_rows(
            "1: MLP, 1,025 points",
            {**mlp, "orderings": orderings, "points": None},
            {
                "naive": (
                    {"orderings": 1, "points": subset},
                    passes(orderings, 1025) / passes(1, 21),
                ),
                "prefix": ({"orderings": 1}, orderings),
            },
        )

        # 2. 51 evenly spaced points, naive in full.
        rows += curve_rows(
            "2: MLP, 51 points", {**mlp, "orderings": orderings, "points": 51}, {}
        )

        # 3. The 11-layer conv net; naive on the first ordering only.
        conv_orderings = 1 if quick else 3
        rows += curve_rows(
            "3: cnn11, 21 points",
            {
                "task": "curve",
                "model": "cnn11",
                "orderings": conv_orderings,
                "points": 21,
            },
            {"naive": ({"orderings": 1}, passes(conv_orderings, 21) / passes(1, 21))},
        )

        # 4. Configuration 2 on the data repeated four times: memory of the curve itself.
        memory = []
        for repeat in (1, 4):
            result = run(
                {
                    **mlp,
                    "orderings": orderings,
                    "points": 51,
                    "engine": "auto",
                    "repeat": repeat,
                }
            )
            memory.append(result)
            rows.append(
                {
                    "config": f"4: MLP, 51 points, data x{repeat}",
                    "engine": f"auto ({result['engine_used']})",
                    "seconds": result["seconds"],
                    "ratio": float("nan"),
                    "max_accuracy_difference": float("nan"),
                    "peak_mib": result["peak_bytes"] / 2**20,
                    "curve_mib": (result["peak_bytes"] - result["before_bytes"])
                    / 2**20,
                    "peak_growth": result["peak_bytes"] / memory[0]["peak_bytes"] - 1,
                }
            )

        # 5. Single-unit importance against Captum's LayerFeatureAblation.
        captum = run({"task": "captum", "model": "mlp", "weights": weights})
        ours = run(
            {"task": "importance", "model": "mlp", "weights": weights, "engine": "auto"}
        )
        for label, result in (
            ("captum", captum),
            (f"auto ({ours['engine_used']})", ours),
        ):
            rows.append(
                {
                    "config": "5: unit importance, MLP",
                    "engine": label,
                    "seconds": result["seconds"],
                    "ratio": captum["seconds"] / result["seconds"],
                    "max_accuracy_difference": max_difference(
                        result["drops"], captum["drops"]
                    ),
                    "peak_mib": result["peak_bytes"] / 2**20,
                }
            )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"# {cpu_model()}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}, Python {platform.python_version()}"
    )
    header = f"{'configuration':<28} {'engine':<20} {'seconds':>9} {'ratio':>8} {'max acc diff':>13} {'peak MiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['config']:<28} {row['engine']:<20} {row['seconds']:>9.2f} "
            f"{row['ratio']:>8.2f} {row['max_accuracy_difference']:>13.2g} "
            f"{row['peak_mib']:>9.0f}"
            + (
                f"  (curve {row['curve_mib']:.0f} MiB, peak {row['peak_growth']:+.1%}"
                " against data x1)"
                if "curve_mib" in row
                else ""
            )
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="fewer orderings, for a smoke test"
    )
    parser.add_argument(
        "--json", type=Path, default=None, help="also write the rows to this file"
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child is not None:
        print(json.dumps(child(json.loads(arguments.child))))
        sys.exit(0)
    table = main(arguments.quick)
    print_table(table)
    if arguments.json is not None:
        arguments.json.write_text(json.dumps(table, indent=2))
