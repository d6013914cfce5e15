"""Sweeps: the results store, resuming, retries, executors and a killed driver."""

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from singledir.cli import main
from singledir.experiments import EnsembleConfig, run_ensemble
from singledir.experiments import ensemble as ensemble_module
from singledir.sweep import LocalExecutor, ResultStore, StoreError
from singledir.sweep.store import STORE_NAME, open_for_reading

TINY = {
    "dataset": "digits",
    "train_size": 300,
    "hidden": (16, 16),
    "lr": 0.01,
    "epochs": 2,
    "orderings": 2,
    "points": 5,
    "device": "cpu",
}
TINY_ARGS = [
    "--dataset", "digits",
    "--train-size", "300",
    "--hidden", "16,16",
    "--lr", "0.01",
    "--epochs", "2",
    "--orderings", "2",
    "--points", "5",
    "--compared", "1",
    "--device", "cpu",
    "--no-progress",
]  # fmt: skip


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _count_trials(monkeypatch):
    """Count the networks trained in this process."""
    calls = []
    original = ensemble_module._train_network

    def counted(config, index, split, on_epoch):
        calls.append(index)
        return original(config, index, split, on_epoch)

    monkeypatch.setattr(ensemble_module, "_train_network", counted)
    return calls


def test_resume_skips_finished_trials(tmp_path, monkeypatch):
    config = EnsembleConfig(networks=4, compared=1, **TINY)
    calls = _count_trials(monkeypatch)
    first = run_ensemble(config, tmp_path)
    summary = (tmp_path / "summary.csv").read_text()
    assert calls == [0, 1, 2, 3]

    again = run_ensemble(config, tmp_path)
    assert calls == [0, 1, 2, 3]
    assert (tmp_path / "summary.csv").read_text() == summary
    assert [n.curve.auc for n in again.networks] == [
        n.curve.auc for n in first.networks
    ]

    more = EnsembleConfig(networks=5, compared=1, **TINY)
    with pytest.raises(StoreError) as error:
        run_ensemble(more, tmp_path)
    assert str(error.value) == (
        f"The sweep in {str(tmp_path)!r} was run with other options (networks: 4 "
        "before, 5 now). Pass the same options to resume it, --force to run the new "
        "config in this folder, or another --out folder."
    )
    assert calls == [0, 1, 2, 3]
    # With force, the four unchanged networks keep their results.
    run_ensemble(more, tmp_path, force=True)
    assert calls == [0, 1, 2, 3, 4]
    assert pd.read_csv(tmp_path / "summary.csv")["network"].tolist() == [0, 1, 2, 3, 4]


def test_failing_trial_is_retried_then_recorded(tmp_path, monkeypatch, capsys):
    attempts = []
    original = ensemble_module._train_network

    def flaky(config, index, split, on_epoch):
        if index == 1:
            attempts.append(index)
            raise FloatingPointError("The training loss became nan in epoch 1.")
        return original(config, index, split, on_epoch)

    monkeypatch.setattr(ensemble_module, "_train_network", flaky)
    status = main(["ensemble", *TINY_ARGS, "--networks", "4", "--retries", "2",
                   "--out", str(tmp_path)])  # fmt: skip
    assert status == 0
    assert attempts == [1, 1, 1]
    printed = capsys.readouterr().out
    assert (
        "Never succeeded, after 3 attempts: network 1: FloatingPointError: The "
        "training loss became nan in epoch 1." in printed
    )
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert summary["network"].tolist() == [0, 2, 3]
    run = json.loads((tmp_path / "run.json").read_text())
    assert [item["trial"] for item in run["failed_trials"]] == ["network 1"]
    assert run["failed_trials"][0]["attempts"] == 3

    store = open_for_reading(tmp_path)
    rows = {row.key: row for row in store.trials()}
    store.close()
    assert rows["network 1"].status == "failed"
    assert rows["network 1"].error.endswith(
        "FloatingPointError: The training loss became nan in epoch 1."
    )
    assert {rows[f"network {i}"].status for i in (0, 2, 3)} == {"done"}


def test_failed_trial_reruns_on_resume(tmp_path, monkeypatch):
    config = EnsembleConfig(networks=3, compared=1, **TINY)
    original = ensemble_module._train_network

    def broken(config, index, split, on_epoch):
        if index == 2:
            raise RuntimeError("out of memory")
        return original(config, index, split, on_epoch)

    monkeypatch.setattr(ensemble_module, "_train_network", broken)
    run_ensemble(config, tmp_path)
    monkeypatch.setattr(ensemble_module, "_train_network", original)
    calls = _count_trials(monkeypatch)
    result = run_ensemble(config, tmp_path)
    assert calls == [2]
    assert [n.labels["network"] for n in result.networks] == [0, 1, 2]
    assert json.loads((tmp_path / "run.json").read_text())["failed_trials"] == []


@pytest.fixture
def one_thread():
    """Train in this process with one torch thread, as each Ray task with one CPU does.

    Matrix products sum in another order with another number of threads, so results
    are identical across executors only at equal thread counts.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_worker_pool_gives_the_same_results(tmp_path, one_thread):
    config = EnsembleConfig(networks=3, compared=1, **TINY)
    # Each of 2 workers gets half of the CPUs as torch threads.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // 2))
    run_ensemble(config, tmp_path / "here")
    run_ensemble(config, tmp_path / "pool", executor=LocalExecutor(2))
    for name in ("summary.csv", "curves.csv"):
        assert (tmp_path / "here" / name).read_text() == (
            tmp_path / "pool" / name
        ).read_text()


@pytest.mark.slow
def test_ray_gives_the_same_results(tmp_path, one_thread):
    pytest.importorskip("ray")
    from singledir.sweep import RayExecutor

    config = EnsembleConfig(networks=3, compared=1, **TINY)
    run_ensemble(config, tmp_path / "local")
    try:
        run_ensemble(config, tmp_path / "ray", executor=RayExecutor(cpus=1))
    finally:
        import ray

        ray.shutdown()
    for name in ("summary.csv", "curves.csv"):
        assert (tmp_path / "local" / name).read_text() == (
            tmp_path / "ray" / name
        ).read_text()


def test_ray_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    from singledir.sweep import RayExecutor

    with pytest.raises(ImportError) as error:
        RayExecutor()
    assert str(error.value) == (
        "The Ray executor needs Ray, which is not installed. Install it with pip "
        'install "singledir[ray]".'
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            b"not a database at all",
            (
                "is not a SQLite database, so it is not a singledir results store. Move "
                "it away or pass another --out folder."
            ),
        ),
        (
            None,
            (
                "is a SQLite database of another program, not a singledir results store. "
                "Move it away or pass another --out folder."
            ),
        ),
    ],
)
def test_foreign_store_is_rejected_untouched(tmp_path, content, message):
    path = tmp_path / STORE_NAME
    if content is None:
        connection = sqlite3.connect(path)
        connection.execute("CREATE TABLE trials (key TEXT)")
        connection.execute("INSERT INTO trials VALUES ('theirs')")
        connection.commit()
        connection.close()
    else:
        path.write_bytes(content)
    before = _digest(path)
    config = EnsembleConfig(networks=3, compared=1, **TINY)
    with pytest.raises(StoreError) as error:
        run_ensemble(config, tmp_path)
    assert str(error.value) == f"{str(path)!r} {message}"
    assert _digest(path) == before
    assert not (tmp_path / "summary.csv").exists()


def test_store_of_another_experiment_is_rejected(tmp_path):
    store = ResultStore.open(tmp_path, "dropout", {"seed": 0})
    store.close()
    with pytest.raises(StoreError) as error:
        run_ensemble(EnsembleConfig(networks=3, compared=1, **TINY), tmp_path)
    assert str(error.value) == (
        f"{str(tmp_path / STORE_NAME)!r} contains a dropout sweep, not ensemble. Pass "
        "another --out folder."
    )


def test_status_prints_progress(tmp_path, capsys):
    run_ensemble(EnsembleConfig(networks=3, compared=1, **TINY), tmp_path)
    capsys.readouterr()
    assert main(["status", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"ensemble sweep in {tmp_path}: 3 networks"
    assert lines[1] == "0 pending, 0 running, 3 done, 0 failed"


def test_status_without_store(tmp_path, capsys):
    assert main(["status", "--out", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"singledir status: error: No results store in {str(tmp_path)!r}: expected "
        f"{str(tmp_path / STORE_NAME)!r}. Pass the --out folder of a sweep.\n"
    )


def _done_count(path):
    if not path.exists():
        return 0
    try:
        connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=1)
        try:
            return connection.execute(
                "SELECT COUNT(*) FROM trials WHERE status = 'done'"
            ).fetchone()[0]
        finally:
            connection.close()
    except sqlite3.Error:
        return 0


def test_driver_killed_midway_resumes_exactly_once(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable, "-m", "singledir.cli", "ensemble", *TINY_ARGS,
        "--networks", "6", "--epochs", "6", "--out", str(out),
    ]  # fmt: skip
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while _done_count(out / STORE_NAME) < 2:
            assert process.poll() is None, "the sweep finished before it was killed"
            assert time.monotonic() < deadline, "no trial finished in 120 s"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    killed_at = _done_count(out / STORE_NAME)
    assert 2 <= killed_at < 6

    finished = subprocess.run(
        command, env=environment, capture_output=True, text=True, check=False
    )
    assert finished.returncode == 0, finished.stderr
    connection = sqlite3.connect(out / STORE_NAME)
    rows = connection.execute(
        "SELECT key, status FROM trials ORDER BY position"
    ).fetchall()
    connection.close()
    assert rows == [(f"network {index}", "done") for index in range(6)]
    summary = pd.read_csv(out / "summary.csv")
    assert summary["network"].tolist() == list(range(6))
    curves = pd.read_csv(out / "curves.csv")
    assert curves.groupby("network").size().tolist() == [2 * 5] * 6
    assert json.loads((out / "run.json").read_text())["finished"] is True


def _crash_on_second(value: int) -> dict:
    """Return ``value``, or end the worker process abruptly when it is 2."""
    if value == 2:
        os._exit(3)
    return {"value": value}


def test_worker_death_fails_only_its_trial():
    from singledir.sweep.executors import Task

    started = []
    outcomes = list(
        LocalExecutor(2).run(
            _crash_on_second,
            [Task(f"trial {value}", (value,)) for value in (1, 2, 3, 4)],
            started.append,
        )
    )
    assert started == ["trial 1", "trial 2", "trial 3", "trial 4"]
    assert sorted(outcome.key for outcome in outcomes) == [
        "trial 1",
        "trial 2",
        "trial 3",
        "trial 4",
    ]
    by_key = {outcome.key: outcome for outcome in outcomes}
    assert by_key["trial 2"].result is None
    assert by_key["trial 2"].error.startswith("The worker process died: ")
    for value in (1, 3, 4):
        assert by_key[f"trial {value}"].result == {"value": value}


def test_empty_store_file_is_replaced(tmp_path):
    (tmp_path / STORE_NAME).write_bytes(b"")
    run_ensemble(EnsembleConfig(networks=3, compared=1, **TINY), tmp_path)
    store = open_for_reading(tmp_path)
    assert store.counts()["done"] == 3
    store.close()


def test_nan_loss_in_every_network_is_reported(tmp_path, capsys):
    argv = ["ensemble", *TINY_ARGS, "--networks", "3", "--lr", "1e30", "--retries", "0"]
    assert main([*argv, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert "No network finished." in printed
    failures = [line for line in printed if line.startswith("Never succeeded")]
    assert len(failures) == 3
    assert failures[0].startswith(
        "Never succeeded, after 1 attempt: network 0: FloatingPointError: The training "
        "loss became"
    )


def test_second_driver_on_one_folder_is_rejected(tmp_path):
    from singledir.sweep.driver import _lock_sweep

    lock = _lock_sweep(tmp_path)
    try:
        with pytest.raises(StoreError) as error:
            run_ensemble(EnsembleConfig(networks=3, compared=1, **TINY), tmp_path)
    finally:
        lock.close()
    assert str(error.value) == (
        f"Another singledir process is running the sweep in {str(tmp_path)!r}. Wait "
        "for it to finish, or pass another --out folder."
    )


def test_damaged_store_is_reported_untouched(tmp_path):
    config = EnsembleConfig(networks=3, compared=1, **TINY)
    run_ensemble(config, tmp_path)
    path = tmp_path / STORE_NAME
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:8192] = b"\xff" * 4096
    path.write_bytes(bytes(data))
    before = _digest(path)
    with pytest.raises(StoreError) as error:
        run_ensemble(config, tmp_path)
    assert str(error.value).startswith(f"{str(path)!r} is damaged and cannot be read (")
    assert str(error.value).endswith("). Move it away or pass another --out folder.")
    assert _digest(path) == before


def test_narrowed_sweep_keeps_the_other_networks(tmp_path, monkeypatch):
    calls = _count_trials(monkeypatch)
    run_ensemble(EnsembleConfig(networks=4, compared=1, **TINY), tmp_path)
    run_ensemble(EnsembleConfig(networks=3, compared=1, **TINY), tmp_path, force=True)
    assert pd.read_csv(tmp_path / "summary.csv")["network"].tolist() == [0, 1, 2]
    run_ensemble(EnsembleConfig(networks=4, compared=1, **TINY), tmp_path, force=True)
    assert calls == [0, 1, 2, 3]


def test_networks_with_one_name_are_rejected(tmp_path):
    from singledir.experiments import CorruptedLabelsConfig, run_corrupted_labels

    config = CorruptedLabelsConfig(fractions=(0.1, 0.1000001, 0.5), **TINY)
    with pytest.raises(ValueError) as error:
        run_corrupted_labels(config, tmp_path)
    assert str(error.value) == (
        "Several networks of this sweep have the same name: corruption 0.1. Pass "
        "settings that differ in their first 6 significant digits."
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--address", "auto"], "--address applies to --executor ray. Leave it out."),
        (
            ["--gpus-per-trial", "1"],
            (
                "--cpus-per-trial and --gpus-per-trial apply to --executor ray. Leave them "
                "out, or pass --executor ray."
            ),
        ),
        (
            ["--executor", "ray", "--workers", "2"],
            (
                "--workers applies to --executor local; Ray runs as many trials at once as "
                "its CPUs allow. Leave it out."
            ),
        ),
    ],
)
def test_executor_options_that_do_not_apply(tmp_path, capsys, options, message):
    argv = ["ensemble", *TINY_ARGS, "--networks", "3", *options, "--out", str(tmp_path)]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"singledir ensemble: error: {message}\n"


def test_ray_address_where_nothing_listens(tmp_path):
    pytest.importorskip("ray")
    import socket

    from singledir.sweep import RayExecutor

    # A port that was free a moment ago: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError) as error:
        RayExecutor(address=f"127.0.0.1:{port}")
    assert str(error.value).startswith(
        f"No Ray cluster accepts connections at '127.0.0.1:{port}' ("
    )
    assert str(error.value).endswith(
        "). Check the address, start the cluster with 'ray start --head', or leave "
        "--address out to start a local one."
    )
