"""The sweep driver: expand an experiment's config into trials, run the ones that are not
done on an executor, record every outcome in the results store, and build the output
files from the store.

A trial is one network: the sweep's config plus the settings that tell it from the other
networks (a corruption fraction, an ensemble index). Running the same command again with
the same ``--out`` skips finished trials, reruns failed ones and those left running by a
process that died, and runs the missing ones.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from singledir.experiments._common import (
    EpochCallback,
    NetworkConfig,
    NetworkResult,
    OutputFolder,
    check_metric,
    load_data,
)
from singledir.sweep.executors import LocalExecutor, Outcome, RayExecutor, Task
from singledir.sweep.store import ResultStore, StoreError

logger = logging.getLogger(__name__)

# Seconds between rewrites of the output files while a sweep runs.
WRITE_INTERVAL = 30.0

# Called after every finished trial with the number finished, the total, the trial's key
# and its status ("done" or "failed").
TrialCallback = Callable[[int, int, str, str], None]


def config_from_dict(config_type: type, values: dict[str, Any]) -> NetworkConfig:
    """Rebuild a config dataclass from its JSON form, where tuples became lists."""
    return config_type(
        **{
            key: tuple(value) if isinstance(value, list) else value
            for key, value in values.items()
        }
    )


@functools.lru_cache(maxsize=2)
def _cached_split(module_name: str, config_json: str) -> Any:
    module = importlib.import_module(module_name)
    return load_data(config_from_dict(module.CONFIG_TYPE, json.loads(config_json)))


def execute_trial(
    module_name: str, config: dict[str, Any], params: dict[str, Any], threads: int
) -> dict[str, Any]:
    """Train and measure one network in a worker process and return its result.

    The data is loaded once per worker process and kept for the next trial.
    """
    import torch

    torch.set_num_threads(threads)
    module = importlib.import_module(module_name)
    sweep_config = config_from_dict(module.CONFIG_TYPE, config)
    split = _cached_split(module_name, json.dumps(config, sort_keys=True))
    return module.run_trial(sweep_config, params, split, None).to_dict()


def run_sweep(
    module_name: str,
    config: NetworkConfig,
    out: str | Path,
    *,
    executor: LocalExecutor | RayExecutor | None = None,
    retries: int = 0,
    force: bool = False,
    on_epoch: EpochCallback | None = None,
    on_trial: TrialCallback | None = None,
) -> Any:
    """Run every trial of an experiment that the store in ``out`` lacks, and write the
    output files from the store.

    Args:
        module_name: The experiment's module, which defines ``CONFIG_TYPE``, ``NAME``,
            ``trial_params``, ``trial_key``, ``run_trial``, ``make_result`` and
            ``write_result``, and may define ``check_sweep(config, split)``, which
            raises before any trial runs.
        config: The experiment's config.
        out: Output folder, which contains the store and the output files.
        executor: Where the trials run. Default: in this process.
        retries: Reruns of a failed trial before it counts as failed.
        force: Run a changed config in a folder that contains another one. Trials whose
            config is unchanged keep their results.
        on_epoch: Called after every training epoch, only when the trials run in this
            process.
        on_trial: Called after every finished trial.

    Returns:
        The experiment's result, built from every trial that succeeded.

    Raises:
        StoreError: If ``out`` holds a foreign or damaged store, or a changed config
            without ``force``.
    """
    config.validate()
    if retries < 0:
        raise ValueError(
            f"Expected retries to be at least 0, but got {retries}. Pass 0 to run each "
            "trial once."
        )
    module = importlib.import_module(module_name)
    executor = executor or LocalExecutor(1)
    folder = OutputFolder(out, module.NAME, config)
    # Loaded first, so a missing dataset fails before the store is created.
    split = load_data(config)
    check_metric(config, split)
    check = getattr(module, "check_sweep", None)
    if check is not None:
        check(config, split)
    # Through JSON, so tuples compare equal to the lists the store gives back.
    config_values = json.loads(json.dumps(dataclasses.asdict(config)))
    lock = _lock_sweep(Path(out))
    try:
        store = ResultStore.open(out, module.NAME, config_values, force=force)
        try:
            return _run(
                module,
                module_name,
                config,
                config_values,
                split,
                store,
                folder,
                executor,
                retries,
                on_epoch,
                on_trial,
            )
        finally:
            store.close()
    finally:
        lock.close()


def _lock_sweep(folder: Path) -> Any:
    """Take an exclusive lock on the sweep's folder, held until the file is closed."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / "results.lock", "w")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StoreError(
            f"Another singledir process is running the sweep in {str(folder)!r}. Wait "
            "for it to finish, or pass another --out folder."
        ) from None
    return handle


def _run(
    module: Any,
    module_name: str,
    config: NetworkConfig,
    config_values: dict[str, Any],
    split: Any,
    store: ResultStore,
    folder: OutputFolder,
    executor: LocalExecutor | RayExecutor,
    retries: int,
    on_epoch: EpochCallback | None,
    on_trial: TrialCallback | None,
) -> Any:
    trials = module.trial_params(config)
    keys = [module.trial_key(p) for p in trials]
    params = dict(zip(keys, trials))
    if len(params) != len(trials):
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        raise ValueError(
            f"Several networks of this sweep have the same name: {', '.join(repeated)}. "
            "Pass settings that differ in their first 6 significant digits."
        )
    # Options that only choose which networks run, such as their number, are left out
    # of each trial's config, so changing them keeps the results of the others.
    shared = {
        name: value
        for name, value in config_values.items()
        if name not in getattr(module, "SWEEP_ONLY_FIELDS", ())
    }
    store.register([(key, {"sweep": shared, "trial": p}) for key, p in params.items()])
    stale = store.reset_running()
    if stale:
        logger.warning(
            "Rerunning %d trials left running by a process that stopped: %s",
            len(stale),
            ", ".join(stale),
        )
    results = {
        row.key: NetworkResult.from_dict(row.result)
        for row in store.trials()
        if row.status == "done"
    }
    total = len(params)
    logger.info("%d of %d trials already done", len(results), total)

    if isinstance(executor, LocalExecutor) and executor.workers == 1:

        def function(key: str) -> dict[str, Any]:
            return module.run_trial(config, params[key], split, on_epoch).to_dict()

        def task(key: str) -> Task:
            return Task(key, (key,))
    else:
        function = execute_trial
        threads = _threads_per_trial(executor)

        def task(key: str) -> Task:
            return Task(key, (module_name, config_values, params[key], threads))

    def write(finished: bool) -> None:
        networks = [results[key] for key in params if key in results]
        failed = [
            {"trial": row.key, "attempts": row.attempts, "error": row.error}
            for row in store.trials()
            if row.status == "failed" and row.key in params
        ]
        module.write_result(
            module.make_result(config, networks), folder, finished, failed
        )

    todo = [key for key in params if key not in results]
    last_write = [time.monotonic()]
    for attempt in range(retries + 1):
        if not todo:
            break
        if attempt:
            logger.warning("Retrying %d failed trials: %s", len(todo), ", ".join(todo))
        failed_now = []
        for outcome in executor.run(
            function, [task(key) for key in todo], store.mark_running
        ):
            _record(store, outcome, results, failed_now)
            if on_trial is not None:
                status = "failed" if outcome.error is not None else "done"
                on_trial(len(results), total, outcome.key, status)
            # The store already contains the outcome and the files are a view of it, so
            # they are rewritten at most every WRITE_INTERVAL seconds.
            if time.monotonic() - last_write[0] >= WRITE_INTERVAL:
                write(finished=False)
                last_write[0] = time.monotonic()
        todo = [key for key in params if key in failed_now]
    if todo:
        logger.warning(
            "%d trials failed after %d attempt(s): %s",
            len(todo),
            retries + 1,
            ", ".join(todo),
        )
    write(finished=True)
    return module.make_result(
        config, [results[key] for key in params if key in results]
    )


def _record(
    store: ResultStore,
    outcome: Outcome,
    results: dict[str, NetworkResult],
    failed: list[str],
) -> None:
    if outcome.error is not None:
        logger.warning(
            "Trial %s failed: %s", outcome.key, outcome.error.splitlines()[-1]
        )
        store.mark_failed(outcome.key, outcome.error, outcome.seconds)
        failed.append(outcome.key)
        return
    store.mark_done(outcome.key, outcome.result, outcome.seconds)
    results[outcome.key] = NetworkResult.from_dict(outcome.result)
    logger.info("Trial %s done in %.1f s", outcome.key, outcome.seconds)


def _threads_per_trial(executor: LocalExecutor | RayExecutor) -> int:
    """Return torch threads per trial, so that the trials together fill the CPUs."""
    if isinstance(executor, RayExecutor):
        return max(1, int(executor.cpus))
    return max(1, (os.cpu_count() or 1) // executor.workers)
