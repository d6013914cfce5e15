"""Executors run the trials of a sweep: in this process, in a pool of worker processes,
or as tasks on a Ray cluster.

Every executor takes a list of trials and yields each one's outcome as it finishes, in
the order they finish. A trial that raises, or whose worker dies, yields an error text
instead of a result. The executors never touch the results store: the driver does.
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")


@dataclass
class Task:
    """One trial to run: its key and the arguments of the trial function."""

    key: str
    args: tuple[Any, ...]


@dataclass
class Outcome:
    """The result of one trial, or the error that stopped it."""

    key: str
    result: dict[str, Any] | None
    error: str | None
    seconds: float


def _timed_call(function: Callable[..., dict[str, Any]], args: tuple[Any, ...]) -> Any:
    started = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - started


def _error_text(error: BaseException) -> str:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    return "".join(lines).strip()


class LocalExecutor:
    """Runs trials in this process, or in ``workers`` spawned worker processes."""

    def __init__(self, workers: int = 1):
        if workers < 1:
            raise ValueError(
                f"Expected workers to be at least 1, but got {workers}. Pass 1 to run "
                "the trials in this process."
            )
        self.workers = workers

    def run(
        self,
        function: Callable[..., dict[str, Any]],
        tasks: Sequence[Task],
        on_start: Callable[[str], None],
    ) -> Iterator[Outcome]:
        if self.workers == 1:
            for task in tasks:
                on_start(task.key)
                started = time.perf_counter()
                try:
                    result = function(*task.args)
                # A trial may raise anything; it is recorded and retried.
                except Exception as error:  # noqa: BLE001
                    yield Outcome(
                        task.key,
                        None,
                        _error_text(error),
                        time.perf_counter() - started,
                    )
                else:
                    yield Outcome(task.key, result, None, time.perf_counter() - started)
            return
        yield from self._run_pool(function, tasks, on_start)

    def _run_pool(
        self,
        function: Callable[..., dict[str, Any]],
        tasks: Sequence[Task],
        on_start: Callable[[str], None],
    ) -> Iterator[Outcome]:
        broken = []
        for task in tasks:
            on_start(task.key)
        for outcome, died in _pool_outcomes(function, tasks, self.workers):
            if died:
                broken.append(outcome.key)
            else:
                yield outcome
        # A worker that dies fails every trial still in its pool, and nothing shows
        # which trial killed it. Each of those trials runs again alone, so only the
        # one that kills its worker comes back failed.
        by_key = {task.key: task for task in tasks}
        for key in broken:
            for outcome, _ in _pool_outcomes(function, [by_key[key]], 1):
                yield outcome


def _limit_worker_lifetime() -> None:
    """Make the kernel stop this worker when its parent dies (Linux only).

    Without it, a driver killed with SIGKILL leaves idle workers behind.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        # NOTE: on other systems the workers outlive a killed driver.
        pass


def _pool_outcomes(
    function: Callable[..., dict[str, Any]], tasks: Sequence[Task], workers: int
) -> Iterator[tuple[Outcome, bool]]:
    """Yield each task's outcome, and whether its pool broke, from a fresh pool."""
    # Spawned workers start clean; forked ones would inherit torch's thread pools.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_limit_worker_lifetime
    ) as pool:
        futures = {
            pool.submit(_timed_call, function, task.args): task.key for task in tasks
        }
        for future in concurrent.futures.as_completed(futures):
            key = futures[future]
            try:
                result, seconds = future.result()
            except concurrent.futures.process.BrokenProcessPool as error:
                text = f"The worker process died: {error}"
                yield Outcome(key, None, text, 0.0), True
            # A trial may raise anything; it is recorded and retried.
            except Exception as error:  # noqa: BLE001
                yield Outcome(key, None, _error_text(error), 0.0), False
            else:
                yield Outcome(key, result, None, seconds), False


class RayExecutor:
    """Runs each trial as a Ray task that requests ``cpus`` CPUs and ``gpus`` GPUs.

    ``address`` joins an existing cluster ("auto" finds the local one); None starts a
    local cluster in this process.
    """

    def __init__(self, address: str | None = None, cpus: float = 1, gpus: float = 0):
        try:
            import ray
        except ImportError:
            raise ImportError(
                "The Ray executor needs Ray, which is not installed. Install it with "
                'pip install "singledir[ray]".'
            ) from None
        self._ray = ray
        # NOTE: an already initialized Ray keeps its own cluster whatever the address.
        if not ray.is_initialized():
            _check_reachable(address)
            ray.init(
                address=address,
                include_dashboard=False,
                logging_level=logging.WARNING,
                configure_logging=False,
            )
        self.cpus = cpus
        self.gpus = gpus
        available = ray.cluster_resources()
        for name, amount in (("CPU", cpus), ("GPU", gpus)):
            if amount > available.get(name, 0):
                raise ValueError(
                    f"Each trial requests {amount:g} {name}s, but the Ray cluster has "
                    f"{available.get(name, 0):g}, so no trial could start. Pass a "
                    f"smaller --{name.lower()}s-per-trial."
                )

    def run(
        self,
        function: Callable[..., dict[str, Any]],
        tasks: Sequence[Task],
        on_start: Callable[[str], None],
    ) -> Iterator[Outcome]:
        ray = self._ray
        remote = ray.remote(num_cpus=self.cpus, num_gpus=self.gpus, max_retries=0)(
            _timed_call
        )
        pending = {}
        for task in tasks:
            on_start(task.key)
            pending[remote.remote(function, task.args)] = task.key
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            reference = ready[0]
            key = pending.pop(reference)
            try:
                result, seconds = ray.get(reference)
            except Exception as error:  # noqa: BLE001
                yield Outcome(key, None, _error_text(error), 0.0)
            else:
                yield Outcome(key, result, None, seconds)


def _check_reachable(address: str | None) -> None:
    """Raise ValueError if nothing accepts connections at a HOST:PORT cluster address.

    ray.init retries such an address for minutes before it gives up.
    """
    if address is None or address == "auto":
        return
    host, separator, port = address.removeprefix("ray://").rpartition(":")
    if not separator or not port.isdigit():
        return
    import socket

    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as error:
        raise ValueError(
            f"No Ray cluster accepts connections at {address!r} ({error}). Check the "
            "address, start the cluster with 'ray start --head', or leave --address "
            "out to start a local one."
        ) from None


def make_executor(
    name: str,
    *,
    workers: int = 1,
    address: str | None = None,
    cpus: float = 1,
    gpus: float = 0,
) -> LocalExecutor | RayExecutor:
    """Build the executor called ``name``: "local" or "ray"."""
    if name == "local":
        return LocalExecutor(workers)
    if name == "ray":
        return RayExecutor(address, cpus, gpus)
    raise ValueError(f"Unknown executor {name!r}. Pass one of: {', '.join(EXECUTORS)}.")
