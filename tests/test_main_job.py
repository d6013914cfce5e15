"""The default corrupted-labels job, exactly as `make demo` runs it."""

import pytest

from singledir.experiments import CorruptedLabelsConfig, run_corrupted_labels


@pytest.mark.slow
def test_default_job_auc_falls_with_corruption(tmp_path):
    result = run_corrupted_labels(CorruptedLabelsConfig(), tmp_path)
    summary = result.summary()
    rho, _ = result.spearman()
    assert rho <= -0.8, summary.to_string()
    assert (summary["train_accuracy"] >= 0.99).all(), summary.to_string()
    assert (tmp_path / "figure.png").exists()
