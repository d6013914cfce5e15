"""The experiment subcommands: their options, the paper preset and their output."""

import json

import numpy as np
import pandas as pd
import pytest

from singledir.cli import main
from singledir.experiments import (
    BatchNormConfig,
    CorruptedLabelsConfig,
    DropoutConfig,
    EnsembleConfig,
    OverTrainingConfig,
)

COMMANDS = {
    "corrupted-labels": (
        "corrupted_labels",
        "run_corrupted_labels",
        CorruptedLabelsConfig,
    ),
    "ensemble": ("ensemble", "run_ensemble", EnsembleConfig),
    "over-training": ("over_training", "run_over_training", OverTrainingConfig),
    "dropout": ("dropout", "run_dropout", DropoutConfig),
    "batchnorm": ("batchnorm", "run_batchnorm", BatchNormConfig),
}


class _Stop(Exception):
    """Raised by the stand-in run function once it has the config."""


@pytest.fixture
def captured(monkeypatch):
    """Replace every experiment's run function with one that records its config."""
    import importlib

    configs = []

    def fake_run(config, out, on_epoch=None, **sweep):
        configs.append(config)
        raise _Stop

    for module, function, _ in COMMANDS.values():
        monkeypatch.setattr(
            importlib.import_module(f"singledir.experiments.{module}"),
            function,
            fake_run,
        )
    return configs


def _config(captured, argv):
    with pytest.raises(_Stop):
        main([*argv, "--out", "unused", "--verbose"])
    return captured[-1]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_defaults_are_the_config_defaults(captured, command):
    config = _config(captured, [command])
    assert config == COMMANDS[command][2]()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_paper_preset_and_explicit_options(captured, command):
    config_type = COMMANDS[command][2]
    assert _config(captured, [command, "--preset", "paper"]) == config_type.paper()
    config = _config(
        captured,
        [command, "--preset", "paper", "--orderings", "3", "--data-root", "/data"],
    )
    assert config.orderings == 3
    assert config.data_root == "/data"
    assert config.dataset == config_type.paper().dataset


def test_every_shared_option_reaches_the_config(captured):
    config = _config(
        captured,
        [
            "ensemble",
            "--networks", "7",
            "--compared", "2",
            "--model", "cnn11",
            "--dataset", "digits",
            "--test-size", "300",
            "--train-size", "500",
            "--hidden", "64,32",
            "--width", "0.5",
            "--epochs", "9",
            "--target-accuracy", "0.95",
            "--lr", "0.01",
            "--batch-size", "32",
            "--orderings", "4",
            "--points", "11",
            "--metric", "top3",
            "--measure-size", "100",
            "--device", "cpu",
            "--seed", "5",
        ],
    )  # fmt: skip
    assert config == EnsembleConfig(
        networks=7,
        compared=2,
        model="cnn11",
        dataset="digits",
        test_size=300,
        train_size=500,
        hidden=(64, 32),
        width=0.5,
        epochs=9,
        target_train_accuracy=0.95,
        lr=0.01,
        batch_size=32,
        orderings=4,
        points=11,
        metric="top3",
        measure_size=100,
        device="cpu",
        seed=5,
    )


def test_experiment_specific_options(captured):
    assert _config(captured, ["over-training", "--every", "5"]).every == 5
    dropout = _config(
        captured, ["dropout", "--dropouts", "0.5", "--corruptions", "0,0.5"]
    )
    assert (dropout.dropouts, dropout.corruptions) == ((0.5,), (0.0, 0.5))
    assert _config(captured, ["batchnorm", "--networks", "2"]).networks == 2
    target = _config(captured, ["corrupted-labels", "--target-accuracy", "none"])
    assert target.target_train_accuracy is None
    # The option's old name still works.
    assert _config(captured, ["corrupted-labels", "--max-epochs", "3"]).epochs == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["ensemble", "--target-accuracy", "2"],
            (
                "argument --target-accuracy: expected a number in (0, 1] or 'none', but "
                "got 2.0"
            ),
        ),
        (
            ["dropout", "--dropouts", "0.1,1.5"],
            (
                "argument --dropouts: expected every dropout probability to be in the "
                "[0, 1) range, but got 1.5"
            ),
        ),
        (
            ["ensemble", "--width", "0"],
            "argument --width: expected a positive number, but got 0.0",
        ),
        (
            ["ensemble", "--points", "1"],
            (
                "argument --points: expected at least 2, so that the curve covers both no "
                "units and all units ablated, but got 1"
            ),
        ),
        (
            ["batchnorm", "--orderings", "0"],
            "argument --orderings: expected a positive integer, but got 0",
        ),
    ],
)
def test_invalid_options_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", "unused"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    command = argv[0]
    assert error == (
        f"singledir {command}: error: {message}. Run 'singledir {command} --help' to "
        "list the options."
    )


def test_invalid_config_exits_1_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["ensemble", "--networks", "2", "--out", str(out)]) == 1
    assert capsys.readouterr().err == (
        "singledir ensemble: error: Expected networks to be at least 3, but got 2. A "
        "correlation needs 3 or more networks; the paper trained 200.\n"
    )
    assert not out.exists()


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["batchnorm", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--networks NETWORKS networks to train in each group (default: 4)" in text
    assert "(default: cnn11)" in text
    assert "(default: 0.125)" in text
    assert "--preset {default,paper}" in text


def test_over_training_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [
        "over-training",
        "--dataset", "digits",
        "--train-size", "300",
        "--hidden", "16,16",
        "--lr", "0.01",
        "--epochs", "4",
        "--every", "2",
        "--orderings", "2",
        "--points", "5",
        "--device", "cpu",
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    run = json.loads((out / "run.json").read_text())
    summary = pd.read_csv(out / "summary.csv")
    assert summary["epoch"].tolist() == [2, 4]
    assert printed[-3] == (
        "Spearman correlation of AUC with test loss: nan (p = n/a; the paper reports "
        "-0.728)"
    )
    assert printed[-2] == (
        f"AUC peaked at epoch {run['auc_peak_epoch']}; the test loss was lowest at "
        f"epoch {run['lowest_test_loss_epoch']}"
    )
    assert run["experiment"] == "over-training"
    assert run["device"] == "cpu"


def test_curve_named_model_weights(tmp_path):
    from singledir import ablation_curve
    from singledir.datasets import load_split
    from singledir.models import build_model

    torch = pytest.importorskip("torch")
    torch.manual_seed(3)
    model = build_model("cnn11", (1, 8, 8), 10, width=0.0625)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    out = tmp_path / "curve"
    argv = [
        "curve",
        "--model", "cnn11",
        "--width", "0.0625",
        "--weights", str(tmp_path / "weights.pt"),
        "--dataset", "digits",
        "--split", "test",
        "--orderings", "2",
        "--points", "4",
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    split = load_split("digits")
    expected = ablation_curve(
        model,
        (split.test_inputs, split.test_targets),
        layers=["relu9", "relu10", "relu11"],
        orderings=2,
        points=4,
    )
    run = json.loads((out / "run.json").read_text())
    assert run["layers"] == ["relu9", "relu10", "relu11"]
    assert run["data"] == "digits:test"
    curves = pd.read_csv(out / "curves.csv")
    assert curves["accuracy"].to_numpy() == pytest.approx(expected.scores.reshape(-1))


def test_curve_flattens_named_data_for_vector_models(tmp_path):
    model_file = tmp_path / "flat.py"
    model_file.write_text(
        "from torch import nn\n\n"
        "def build():\n"
        "    return nn.Sequential(nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10))\n"
    )
    argv = [
        "curve",
        "--model-file", str(model_file),
        "--model-fn", "build",
        "--dataset", "digits",
        "--orderings", "1",
        "--points", "3",
        "--no-progress",
    ]  # fmt: skip
    assert main([*argv, "--flatten", "--out", str(tmp_path / "flat")]) == 0
    # Without --flatten the model gets (batch, 1, 8, 8) images and fails.
    assert main([*argv, "--out", str(tmp_path / "images")]) == 1
    assert not (tmp_path / "images").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--model", "mlp", "--model-file", "x.py", "--model-fn", "build"],
            (
                "Pass either --model NAME (a built-in network) or --model-file FILE with "
                "--model-fn NAME (your own), but not both."
            ),
        ),
        (
            [],
            (
                "Pass either --model NAME (a built-in network) or --model-file FILE with "
                "--model-fn NAME (your own), but not both."
            ),
        ),
        (
            ["--model-file", "x.py"],
            (
                "--model-file needs --model-fn, the name of the function in it that "
                "returns the nn.Module."
            ),
        ),
    ],
)
def test_curve_model_options_errors(tmp_path, capsys, argv, message):
    argv = ["curve", *argv, "--dataset", "digits", "--out", str(tmp_path / "x")]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"singledir curve: error: {message}\n"


def test_curve_reads_an_image_folder(tmp_path):
    from PIL import Image

    for index, colour in enumerate(((250, 0, 0), (0, 0, 250))):
        folder = tmp_path / "imagenet" / "val" / f"n0000000{index}"
        folder.mkdir(parents=True)
        for copy in range(3):
            Image.new("RGB", (40, 30), colour).save(folder / f"{copy}.png")
    out = tmp_path / "curve"
    argv = [
        "curve",
        "--model", "resnet18",
        "--classes", "2",
        "--metric", "accuracy",
        "--dataset", "imagenet",
        "--data-root", str(tmp_path / "imagenet"),
        "--split", "test",
        "--orderings", "1",
        "--points", "3",
        "--no-progress",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["layers"] == ["layer3.1", "layer4.0", "layer4.1"]
    curves = pd.read_csv(out / "curves.csv")
    # 6 images: every accuracy is a multiple of 1/6.
    assert curves["accuracy"].to_numpy() * 6 == pytest.approx(
        np.round(curves["accuracy"].to_numpy() * 6)
    )


def test_curve_rejects_an_unknown_device(tmp_path, capsys):
    argv = ["curve", "--model", "mlp", "--dataset", "digits", "--device", "gpu"]
    assert main([*argv, "--out", str(tmp_path / "x")]) == 1
    assert capsys.readouterr().err.endswith(
        "singledir curve: error: Unknown device 'gpu'. Pass auto, cpu, cuda or "
        "cuda:N.\n"
    )
    assert not (tmp_path / "x").exists()
