"""report: the studies' table over finished train runs, the best run's figures, the champion."""

from pathlib import Path

import mlflow
import pytest

from pipeline.config import PipelineError, ReportConfig
from pipeline.report import report


@pytest.mark.slow
def test_report_has_the_table_figures_and_champion(trained, tmp_path):
    cfg, result = trained
    train_run_id = mlflow.get_run(result.run_id).data.tags["train_run_id"]
    experiment_id = mlflow.get_run(result.run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name="point-3") as other:  # finished, not evaluated
        mlflow.set_tag("step", "train")
        mlflow.log_params({"hidden_layers": 3, "units": 64, "learning_rate": 5e-5})
        mlflow.log_metrics({"test_accuracy": 0.125, "learning_time_s": 4.5678})
    with mlflow.start_run(experiment_id=experiment_id, run_name="train") as failed:
        mlflow.set_tag("step", "train")
    mlflow.MlflowClient().set_terminated(failed.info.run_id, "FAILED")

    out = report(ReportConfig(dataset=cfg.dataset, output=str(tmp_path / "out" / "report.md")))
    text = Path(out.output).read_text()
    train = mlflow.get_run(train_run_id).data
    assert out.runs == 2 and out.best_run_id == train_run_id
    assert "| Model | Hidden Layer | Dense Count | Learning Rate | Accuracy | Learning Time(ms) |" in text
    assert (f"| train `{train_run_id[:8]}` | 1 | 8 | 0.001 | {train.metrics['test_accuracy']:.4f} | "
            f"{train.metrics['learning_time_s'] * 1000:.0f} |") in text
    assert f"| point-3 `{other.info.run_id[:8]}` | 3 | 64 | 5e-05 | 0.1250 | 4568 |" in text
    assert failed.info.run_id[:8] not in text
    for figure in ("plots/learning_curves.png", "plots/confusion_matrix.png"):
        assert f"]({figure})" in text and (tmp_path / "out" / figure).stat().st_size > 0
    assert "`models:/regshapes-resnet50@champion` is version 1" in text


def test_report_of_a_missing_experiment_is_one_line():
    with pytest.raises(PipelineError, match="no experiment 'never-ran'") as e:
        report(ReportConfig(dataset="never-ran"))
    assert "\n" not in str(e.value)
