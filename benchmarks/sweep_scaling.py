"""Time a sweep of 8 small MLP trials run one after another against Ray with 2 workers,
and the results store's overhead per trial.

A local process pool with as many workers runs too, for comparison.

The trials are the `ensemble` experiment's networks on scikit-learn's digits: a 64-256-256-10
MLP, 100 epochs, 10 orderings at 51 points. Each mode runs the same sweep into a fresh
output folder in this one invocation, so the ratio compares like with like. The
sequential run trains in this process with torch using one thread, as each Ray task does
(one CPU per task).

Store overhead is timed apart from training: the store records 8 trials with results of
the same size as the sweep's (open, register, mark running, mark done), and the time per
trial is printed.

Usage: python benchmarks/sweep_scaling.py [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from singledir.experiments import EnsembleConfig, run_ensemble
from singledir.provenance import cpu_model
from singledir.sweep import LocalExecutor, RayExecutor, ResultStore
from singledir.sweep.store import open_for_reading

CONFIG = EnsembleConfig(
    networks=8,
    compared=2,
    dataset="digits",
    hidden=(256, 256),
    epochs=100,
    lr=1e-3,
    orderings=10,
    points=51,
    device="cpu",
)


def time_sequential(out: Path) -> float:
    torch.set_num_threads(1)
    started = time.perf_counter()
    run_ensemble(CONFIG, out)
    return time.perf_counter() - started


def _warm_up() -> None:
    """Import what a trial needs, so the timed run does not pay for it."""
    import singledir.experiments.ensemble
    import singledir.sweep.driver  # noqa: F401


def time_ray(out: Path, workers: int) -> float:
    import ray

    ray.init(num_cpus=workers, include_dashboard=False, configure_logging=False)
    try:
        executor = RayExecutor(cpus=1)
        # Start the workers and import the library before timing, as the workers of a
        # running cluster would have done.
        warm = ray.remote(num_cpus=1)(_warm_up)
        ray.get([warm.remote() for _ in range(workers)])
        started = time.perf_counter()
        run_ensemble(CONFIG, out, executor=executor)
        return time.perf_counter() - started
    finally:
        ray.shutdown()


def time_pool(out: Path, workers: int) -> float:
    started = time.perf_counter()
    run_ensemble(CONFIG, out, executor=LocalExecutor(workers))
    return time.perf_counter() - started


def store_overhead(result_source: Path, folder: Path) -> float:
    """Return the seconds per trial the store takes to record the source's 8 trials."""
    source = open_for_reading(result_source)
    rows = source.trials()
    source.close()
    started = time.perf_counter()
    store = ResultStore.open(folder, "ensemble", {"benchmark": True})
    store.register([(row.key, row.config) for row in rows])
    for row in rows:
        store.mark_running(row.key)
        store.mark_done(row.key, row.result, row.seconds or 0.0)
    store.close()
    return (time.perf_counter() - started) / len(rows)


def _trial_seconds(folder: Path) -> list[float]:
    store = open_for_reading(folder)
    seconds = [row.seconds or 0.0 for row in store.trials()]
    store.close()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="sweep_scaling_"))
    try:
        sequential = time_sequential(scratch / "sequential")
        parallel = time_ray(scratch / "ray", args.workers)
        pool = time_pool(scratch / "pool", args.workers)
        same = (scratch / "sequential" / "curves.csv").read_text() == (
            scratch / "ray" / "curves.csv"
        ).read_text()
        overhead = store_overhead(scratch / "sequential", scratch / "store")
        trial_seconds = {
            mode: _trial_seconds(scratch / mode)
            for mode in ("sequential", "ray", "pool")
        }
    finally:
        shutil.rmtree(scratch)

    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs")
    print(f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"sequential, 8 trials:             {sequential:7.1f} s")
    print(f"ray, {args.workers} workers, 8 trials:       {parallel:7.1f} s")
    print(f"speed-up (target at least 1.6x):   {sequential / parallel:7.2f}x")
    print(
        f"local pool, {args.workers} workers (no Ray):  {pool:7.1f} s, "
        f"{sequential / pool:.2f}x"
    )
    print(f"same curves from both:             {same}")
    for mode, seconds in trial_seconds.items():
        print(
            f"{mode}: trials took {min(seconds):.2f} to {max(seconds):.2f} s, "
            f"{sum(seconds):.1f} s in all"
        )
    print(f"store overhead per trial (target under 50 ms): {overhead * 1000:.1f} ms")


if __name__ == "__main__":
    main()
