import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import textwrap

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.integrate import trapezoid

from singledir import ablation_curve
from singledir.cli import main

SMALL_RUN = [
    "corrupted-labels",
    "--fractions",
    "0,0.5,1",
    "--hidden",
    "16,16",
    "--train-size",
    "300",
    "--test-size",
    "200",
    "--max-epochs",
    "4",
    "--lr",
    "0.01",
    "--orderings",
    "2",
    "--points",
    "5",
    "--no-progress",
]


def test_corrupted_labels_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SMALL_RUN, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Spearman correlation of corruption with AUC" in printed
    assert f"Wrote {out}" in printed

    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == [
        "corruption",
        "train_accuracy",
        "test_accuracy",
        "generalization_error",
        "train_loss",
        "test_loss",
        "auc",
        "auc_std",
        "relative_auc",
        "epochs",
    ]
    assert summary["corruption"].tolist() == [0.0, 0.5, 1.0]
    assert summary["auc"].between(0, 1).all()

    curves = pd.read_csv(out / "curves.csv")
    assert list(curves.columns) == [
        "corruption",
        "ordering",
        "num_ablated",
        "fraction",
        "accuracy",
    ]
    assert len(curves) == 3 * 2 * 5
    assert curves["num_ablated"].max() == 32
    first = curves[(curves.corruption == 0.0)].pivot(
        index="ordering", columns="fraction", values="accuracy"
    )
    auc = trapezoid(first.to_numpy(), first.columns.to_numpy(), axis=1).mean()
    assert auc == pytest.approx(summary.loc[0, "auc"], abs=1e-12)

    run = json.loads((out / "run.json").read_text())
    assert run["config"]["hidden"] == [16, 16]
    assert run["finished"] is True
    assert set(run["seeds"]["corruption 0.5"]) == {
        "corruption",
        "init",
        "data_order",
        "orderings",
    }
    environment = run["environment"]
    assert environment["packages"]["torch"] == importlib.metadata.version("torch")
    assert environment["packages"]["torch"] == torch.__version__.split("+")[0]
    assert environment["packages"]["numpy"] == np.__version__
    assert environment["python"] == platform.python_version()
    assert_hardware_fields(environment)
    started = datetime.datetime.fromisoformat(run["started_utc"])
    assert started.utcoffset() == datetime.timedelta(0)
    assert started <= datetime.datetime.fromisoformat(environment["time_utc"])
    assert run["seconds"] > 0
    assert (out / "figure.png").stat().st_size > 10_000


def test_corrupted_labels_same_seed_same_numbers(tmp_path):
    for name in ("a", "b"):
        assert (
            main([*SMALL_RUN, "--fractions", "0,1", "--out", str(tmp_path / name)]) == 0
        )
    for name in ("summary.csv", "curves.csv"):
        assert (tmp_path / "a" / name).read_text() == (
            tmp_path / "b" / name
        ).read_text()


def test_unknown_option(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["corrupted-labels", "--out", "x", "--orderingz", "3"])
    assert caught.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == (
        "singledir corrupted-labels: error: unrecognized arguments: --orderingz 3. Run "
        "'singledir corrupted-labels --help' to list the options."
    )


def test_abbreviated_option_rejected(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["corrupted-labels", "--out", "x", "--fraction", "0,1"])
    assert caught.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == (
        "singledir corrupted-labels: error: unrecognized arguments: --fraction 0,1. Run "
        "'singledir corrupted-labels --help' to list the options."
    )


def test_fraction_outside_range_option(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["corrupted-labels", "--out", "x", "--fractions", "0,1.5"])
    assert caught.value.code == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert last_line == (
        "singledir corrupted-labels: error: argument --fractions: expected every fraction "
        "to be in the [0, 1] range, but got 1.5. Run 'singledir corrupted-labels --help' "
        "to list the options."
    )


MODEL_FILE = textwrap.dedent(
    """
    from collections import OrderedDict
    from torch import nn

    def build():
        return nn.Sequential(OrderedDict([
            ("fc", nn.Linear(5, 9)), ("act", nn.Tanh()), ("out", nn.Linear(9, 3)),
        ]))
    """
)


def load_build_function(path):
    spec = importlib.util.spec_from_file_location("test_user_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build


def test_curve_command_matches_library(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    model = load_build_function(model_file)()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    inputs = torch.randn(40, 5)
    targets = torch.randint(0, 3, (40,))
    torch.save((inputs, targets), tmp_path / "data.pt")
    out = tmp_path / "curve"
    status = main(
        [
            "curve",
            "--model-file", str(model_file),
            "--model-fn", "build",
            "--weights", str(tmp_path / "weights.pt"),
            "--data", str(tmp_path / "data.pt"),
            "--layers", "act",
            "--orderings", "3",
            "--points", "4",
            "--seed", "5",
            "--no-progress",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert status == 0
    expected = ablation_curve(
        model, (inputs, targets), layers=["act"], orderings=3, seed=5, points=4
    )
    summary = pd.read_csv(out / "summary.csv")
    assert summary.loc[0, "auc"] == pytest.approx(expected.auc, abs=1e-12)
    curves = pd.read_csv(out / "curves.csv")
    np.testing.assert_allclose(
        curves["accuracy"].to_numpy(), expected.scores.reshape(-1), atol=1e-12
    )
    assert (out / "figure.png").exists()
    assert json.loads((out / "run.json").read_text())["layers"] == ["act"]


def test_curve_command_unknown_function(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    status = main(
        [
            "curve",
            "--model-file",
            str(model_file),
            "--model-fn",
            "make",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert status == 1
    message = (
        f"singledir curve: error: '{model_file}' has no function 'make'. It defines: "
        "build. Pass one of them as --model-fn."
    )
    assert capsys.readouterr().err.strip() == message


def test_curve_command_unknown_layer(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    torch.save(
        (torch.randn(6, 5), torch.zeros(6, dtype=torch.long)), tmp_path / "data.pt"
    )
    args = [
        "curve",
        "--model-file",
        str(model_file),
        "--model-fn",
        "build",
        "--data",
        str(tmp_path / "data.pt"),
    ]
    status = main(
        [*args, "--layers", "relu", "--no-progress", "--out", str(tmp_path / "o")]
    )
    assert status == 1
    message = (
        "singledir curve: error: Unknown layer name 'relu'. The model has these layers: "
        "fc, act, out. Pass names from model.named_modules()."
    )
    assert capsys.readouterr().err.strip() == message


def assert_hardware_fields(info):
    assert isinstance(info["processor"], str)
    assert isinstance(info["cpu_model"], str)
    assert info["cpu_model"]
    assert info["cpu_count"] == os.cpu_count()
    memory = info["memory_total_bytes"]
    assert memory is None or (isinstance(memory, int) and memory > 0)
    assert isinstance(info["cuda_available"], bool)
    assert isinstance(info["cuda_devices"], list)
    assert all(isinstance(name, str) for name in info["cuda_devices"])
    assert len(info["cuda_devices"]) == (
        torch.cuda.device_count() if info["cuda_available"] else 0
    )
    recorded = datetime.datetime.fromisoformat(info["time_utc"])
    assert recorded.utcoffset() == datetime.timedelta(0)


def test_env_prints_versions(capsys):
    before = datetime.datetime.now(datetime.timezone.utc)
    assert main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["packages"]["torch"] == importlib.metadata.version("torch")
    assert info["python"] == platform.python_version()
    assert_hardware_fields(info)
    recorded = datetime.datetime.fromisoformat(info["time_utc"])
    assert before - datetime.timedelta(seconds=1) <= recorded
    assert recorded <= datetime.datetime.now(datetime.timezone.utc)


def test_env_reads_linux_hardware_files(tmp_path, monkeypatch):
    from singledir import provenance

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nvendor_id\t: GenuineIntel\n"
        "model name\t: Example CPU @ 2.00GHz\n\nprocessor\t: 1\n"
        "model name\t: Example CPU @ 2.00GHz\n"
    )
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:         1024 kB\n")
    monkeypatch.setattr(provenance, "_CPUINFO", cpuinfo)
    monkeypatch.setattr(provenance, "_MEMINFO", meminfo)
    assert provenance.cpu_model() == "Example CPU @ 2.00GHz"
    assert provenance.memory_total_bytes() == 16384 * 1024
    monkeypatch.setattr(provenance, "_CPUINFO", tmp_path / "missing")
    monkeypatch.setattr(provenance, "_MEMINFO", tmp_path / "missing")
    monkeypatch.setattr(provenance.platform, "processor", lambda: "arm")
    assert provenance.cpu_model() == "arm"
    assert provenance.memory_total_bytes() is None


def test_curve_command_bad_files(tmp_path, capsys):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    whole_model = tmp_path / "whole.pt"
    torch.save(load_build_function(model_file)(), whole_model)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    broken = tmp_path / "broken.py"
    broken.write_text("def build(:\n")
    base = [
        "curve",
        "--model-fn",
        "build",
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
    ]
    cases = [
        (["--model-file", str(text_file)], "is not a Python file"),
        (["--model-file", str(broken)], "failed with SyntaxError"),
        (
            ["--model-file", str(model_file), "--weights", str(whole_model)],
            "could not be read as tensors",
        ),
        (
            ["--model-file", str(model_file), "--weights", str(text_file)],
            "could not be read as tensors",
        ),
        (
            ["--model-file", str(model_file), "--data", str(text_file)],
            "could not be read as tensors",
        ),
    ]
    for extra, fragment in cases:
        assert main([*base, *extra]) == 1
        error = capsys.readouterr().err
        assert fragment in error, error
        assert "Traceback" not in error


def test_curve_command_imports_sibling_module(tmp_path):
    (tmp_path / "blocks.py").write_text(
        "from torch import nn\n\ndef head():\n    return nn.Linear(9, 3)\n"
    )
    (tmp_path / "my_model.py").write_text(
        "from torch import nn\nfrom blocks import head\n\n"
        "def build():\n    return nn.Sequential(nn.Linear(5, 9), nn.ReLU(), head())\n"
    )
    torch.save((torch.randn(8, 5), torch.randint(0, 3, (8,))), tmp_path / "data.pt")
    status = main(
        [
            "curve",
            "--model-file", str(tmp_path / "my_model.py"),
            "--model-fn", "build",
            "--data", str(tmp_path / "data.pt"),
            "--points", "3",
            "--orderings", "1",
            "--no-progress",
            "--out", str(tmp_path / "o"),
        ]
    )  # fmt: skip
    assert status == 0
    assert (tmp_path / "o" / "curve.json").exists()


def curve_command(tmp_path, data, out):
    model_file = tmp_path / "my_model.py"
    model_file.write_text(MODEL_FILE)
    torch.save(data, tmp_path / "data.pt")
    return main(
        [
            "curve",
            "--model-file", str(model_file),
            "--model-fn", "build",
            "--data", str(tmp_path / "data.pt"),
            "--orderings", "1",
            "--points", "3",
            "--no-progress",
            "--out", str(out),
        ]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("targets", "fix"),
    [
        (torch.zeros(6, 1, dtype=torch.long), "Pass targets.squeeze(1)."),
        (
            torch.eye(3, dtype=torch.long)[[0, 1, 2, 0, 1, 2]],
            "For one-hot targets, pass targets.argmax(1).",
        ),
    ],
)
def test_curve_command_2d_targets(tmp_path, capsys, targets, fix):
    out = tmp_path / "o"
    assert curve_command(tmp_path, (torch.randn(6, 5), targets), out) == 1
    message = (
        "singledir curve: error: Expected targets of shape (batch,), one class index "
        f"per example, but got a batch of shape {tuple(targets.shape)}. {fix}"
    )
    assert capsys.readouterr().err.strip() == message
    assert not out.exists()


def test_curve_command_failure_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "nested" / "o"
    data = (torch.randn(6, 5), torch.zeros(5, dtype=torch.long))
    assert curve_command(tmp_path, data, out) == 1
    message = (
        "singledir curve: error: Targets do not match the inputs: 6 inputs but 5 "
        "targets. Pass one target per input."
    )
    assert capsys.readouterr().err.strip() == message
    assert not out.exists()
    assert not out.parent.exists()


def test_curve_command_out_is_a_file(tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("")
    data = (torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    assert curve_command(tmp_path, data, out) == 1
    message = (
        f"singledir curve: error: Expected --out to be a folder, but '{out}' is a "
        "file. Pass the path of a new or existing folder."
    )
    assert capsys.readouterr().err.strip() == message
    assert out.read_text() == ""


def test_curve_command_writes_started_time(tmp_path):
    out = tmp_path / "o"
    data = (torch.randn(6, 5), torch.zeros(6, dtype=torch.long))
    before = datetime.datetime.now(datetime.timezone.utc)
    assert curve_command(tmp_path, data, out) == 0
    run = json.loads((out / "run.json").read_text())
    started = datetime.datetime.fromisoformat(run["started_utc"])
    assert before - datetime.timedelta(seconds=1) <= started
    assert started <= datetime.datetime.fromisoformat(run["environment"]["time_utc"])
    assert_hardware_fields(run["environment"])


def test_spearman_p_exact_for_few_points():
    from itertools import permutations

    from scipy import stats

    from singledir.experiments.corrupted_labels import spearman_with_p

    fractions = np.array([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    aucs = np.array([0.86, 0.70, 0.67, 0.63, 0.59, 0.57])
    rho, p_value = spearman_with_p(fractions, aucs)
    assert rho == -1.0
    # Of the 720 pairings, only the two perfect ones reach |rho| = 1.
    assert p_value == pytest.approx(2 / 720, rel=1e-12)

    # Against a naive enumeration, with a tie-free but imperfect ordering.
    aucs = np.array([0.86, 0.63, 0.70, 0.59, 0.67, 0.57])
    rho, p_value = spearman_with_p(fractions, aucs)
    observed = stats.spearmanr(fractions, aucs).statistic
    extreme = sum(
        abs(stats.spearmanr(list(order), aucs).statistic) >= abs(observed) - 1e-12
        for order in permutations(fractions)
    )
    assert rho == pytest.approx(observed)
    assert p_value == pytest.approx(extreme / 720, rel=1e-12)


def test_run_json_is_strict_json(tmp_path):
    from singledir.experiments._files import write_json

    path = tmp_path / "run.json"
    write_json(path, {"rho": float("nan"), "values": [1.0, float("inf")], "n": 2})
    text = path.read_text()
    assert "NaN" not in text
    assert "Infinity" not in text
    assert json.loads(text) == {"rho": None, "values": [1.0, None], "n": 2}


def test_progress_off_when_not_a_terminal(tmp_path, capsys, monkeypatch):
    from singledir import cli

    seen = []
    original = cli._progress_reporter

    def record(enabled):
        seen.append(enabled)
        return original(enabled)

    monkeypatch.setattr(cli, "_progress_reporter", record)
    arguments = [a for a in SMALL_RUN if a != "--no-progress"]
    assert main([*arguments, "--fractions", "0", "--out", str(tmp_path / "run")]) == 0
    # pytest captures standard error, so it is not a terminal here.
    assert seen == [False]
