"""report: per prepared dataset its counts, the studies' table and the best run's figures; the champion; Markdown and HTML."""

from pathlib import Path

import mlflow
import pytest

from pipeline.config import PipelineError, ReportConfig
from pipeline.liveness import REASON
from pipeline.report import report


@pytest.mark.slow
def test_report_has_the_table_figures_and_champion(trained, tmp_path):
    cfg, result = trained
    train_run_id = mlflow.get_run(result.run_id).data.tags["train_run_id"]
    experiment_id = mlflow.get_run(result.run_id).info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, run_name="point-3") as other:  # finished, not evaluated
        mlflow.set_tags({"step": "train", "data_digest": mlflow.get_run(train_run_id).data.tags["data_digest"]})
        mlflow.log_params({"hidden_layers": 3, "units": 64, "learning_rate": 5e-5})
        mlflow.log_metrics({"test_accuracy": 0.125, "learning_time_s": 4.5678})
    with mlflow.start_run(experiment_id=experiment_id, run_name="train") as failed:
        mlflow.set_tag("step", "train")
    mlflow.MlflowClient().set_terminated(failed.info.run_id, "FAILED")

    out = report(ReportConfig(dataset=cfg.dataset, output=str(tmp_path / "out" / "report.md")))
    text = Path(out.output).read_text()
    rows = {cells[0]: cells[1:] for cells in _table_rows(text)}
    train = mlflow.get_run(train_run_id).data
    assert out.runs == 2 and out.best_run_id == train_run_id
    assert ["Hidden Layer", "Dense Count", "Learning Rate", "Accuracy", "Learning Time(ms)", "Val Accuracy"] == rows["Model"]
    assert rows[f"train `{train_run_id[:8]}` **champion**"][:5] == [
        "1", "8", "0.001", f"{train.metrics['test_accuracy']:.4f}", f"{train.metrics['learning_time_s'] * 1000:.0f}"]
    assert rows[f"point-3 `{other.info.run_id[:8]}`"][:5] == ["3", "64", "5e-05", "0.1250", "4568"]
    assert failed.info.run_id[:8] not in text
    # one section per prepared dataset: its name, digest and counts
    digest = train.tags["data_digest"]
    assert f"## Data: regshapes `{digest[:12]}`" in text and rows["total"] == ["13", "5", "6"]
    assert "Its model is the champion (version 1)" in text
    page = Path(out.output).with_suffix(".html").read_text()
    for figure in ("learning_curves.png", "confusion_matrix.png"):
        path = f"plots/{train_run_id[:8]}/{figure}"
        assert f"]({path})" in text and f'src="{path}"' in page and (tmp_path / "out" / path).stat().st_size > 0
    assert "`models:/regshapes-resnet50@champion` is version 1" in text


def _table_rows(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in markdown.splitlines()
            if line.startswith("|") and not line.startswith("|:")]


def test_report_of_a_missing_experiment_is_one_line():
    with pytest.raises(PipelineError, match="no experiment 'never-ran'") as e:
        report(ReportConfig(dataset="never-ran"))
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_under_mlflow_run_its_run_gets_the_report_and_its_figures(trained, tmp_path, mlflow_run_id):
    cfg, _ = trained
    out = report(ReportConfig(dataset=cfg.dataset, output=str(tmp_path / "report.md")))
    run = mlflow.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED" and (run.data.tags["step"], run.data.tags["dataset"]) == ("report", "regshapes")
    client = mlflow.MlflowClient()
    figures = [f"plots/{out.best_run_id[:8]}/{name}" for name in ("learning_curves.png", "confusion_matrix.png")]
    assert {f.path for f in client.list_artifacts(mlflow_run_id)} >= {"report.md", "report.html", "plots"}
    assert {f.path for f in client.list_artifacts(mlflow_run_id, f"plots/{out.best_run_id[:8]}")} == set(figures)
    page = mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path="report.html",
                                               dst_path=str(tmp_path / "logged"))
    assert all(f'src="{figure}"' in Path(page).read_text() for figure in figures)  # the page finds its figures


def test_under_mlflow_run_a_missing_experiment_fails_its_run_in_one_line(mlflow_run_id):
    with pytest.raises(PipelineError, match="no experiment 'never-ran'"):
        report(ReportConfig(dataset="never-ran"))
    run = mlflow.get_run(mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags[REASON].startswith("PipelineError: no experiment 'never-ran'")
