"""The studies' grid: its definition, one parent with seven children, and resuming."""

import contextlib
import io
from types import SimpleNamespace

import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import as_under_mlflow_run, eagerly, make_dataset, tiny, tiny_values

import pipeline.train
from pipeline.card import load_model
from pipeline.config import EvaluateConfig, GridConfig, LogModelConfig, PipelineError, PrepareConfig, TrainConfig, with_recipe
from pipeline.evaluate import evaluate
from pipeline.grid import GRID, grid, point_configs
from pipeline.liveness import REASON
from pipeline.prepare import prepare
from pipeline.train import log_trained_model_of, train


def test_grid_is_the_studies_table():
    studies = """1 1 8 1e-5|2 1 16 1e-5|3 1 32 1e-5|4 2 8 1e-5|5 3 8 1e-5|6 1 8 5e-5|7 1 8 1e-4"""
    expected = [tuple(float(v) for v in row.split()[1:]) for row in studies.split("|")]
    assert [tuple(map(float, point)) for point in GRID] == expected


def test_points_differ_only_in_the_grid_parameters():
    configs = point_configs(GridConfig(weights="none", epochs=3, seed=7), "runs:/x/data")
    assert [(c.hidden_layers, c.units, c.learning_rate) for c in configs] == list(GRID)
    shared = {(c.epochs, c.seed, c.weights, c.data, c.image_size, c.dropout) for c in configs}
    assert shared == {(3, 7, "none", "runs:/x/data", 224, 0.5)}


@pytest.fixture(scope="module")
def resumed_grid(tmp_path_factory):
    """One tiny grid, stopped as its fourth point starts and run again, for the tests of this module:
    its result, what the second command printed, and the experiment's runs right after it. Eager,
    as the tests that take it: grids that commands run, traced, are in test_stops and test_shared_study."""
    # A dataset name of its own: its registered model, gridshapes-resnet50, gets only this grid's version.
    dataset = make_dataset(tmp_path_factory.mktemp("grid") / "gridshapes", n=8)
    cfg = tiny(GridConfig, dataset=str(dataset), experiment="grid-e2e")
    real_train, calls = pipeline.train.train, []

    def train_then_break(point, *args, **kwargs):
        calls.append(point)
        if len(calls) == 4:
            raise KeyboardInterrupt("stopped half-way")
        return real_train(point, *args, **kwargs)

    with eagerly():
        with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
            mp.setattr(pipeline.train, "train", train_then_break)
            grid(cfg)
        [interrupted] = mlflow.search_runs(experiment_names=["grid-e2e"], filter_string="tags.step = 'grid'")["run_id"]
        figures, out = set(plt.get_fignums()), io.StringIO()
        with contextlib.redirect_stdout(out):
            result = grid(cfg)
    assert set(plt.get_fignums()) == figures  # each point's curves and matrix, and the chart, closed once logged
    return SimpleNamespace(result=result, interrupted=interrupted, out=out.getvalue(),
                           runs=mlflow.search_runs(experiment_names=["grid-e2e"]))


@pytest.mark.slow
@pytest.mark.eager
def test_grid_makes_one_parent_with_seven_children_and_resumes(resumed_grid):
    result, runs = resumed_grid.result, resumed_grid.runs
    out = resumed_grid.out
    assert result.run_id == resumed_grid.interrupted and out.count("reusing finished run") == 3 and "Model 7" in out
    children = runs[(runs["tags.mlflow.parentRunId"] == result.run_id) & (runs["status"] == "FINISHED")]
    assert len(runs) == 8 and len(children) == 7 and runs.loc[runs["run_id"] == result.run_id, "status"].item() == "FINISHED"
    assert sorted(children["tags.grid_point"].astype(int)) == list(range(1, 8))
    assert sorted(children["tags.mlflow.runName"]) == [f"point-{n}" for n in range(1, 8)]
    assert children["metrics.test_accuracy"].notna().all() and children["metrics.best_val_accuracy"].notna().all()
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/grid_results.csv"))
    assert list(table.columns) == ["Model", "Hidden Layer", "Dense Count", "Learning Rate", "Accuracy",
                                   "Learning Time(ms)"]
    assert table[["Hidden Layer", "Dense Count", "Learning Rate"]].apply(tuple, axis=1).tolist() == list(GRID)
    in_order = children.assign(point=children["tags.grid_point"].astype(int)).sort_values("point")
    best = in_order.loc[in_order["metrics.best_val_accuracy"].idxmax()]  # ties: the first point
    assert result.best_run_id == best["run_id"]
    client = mlflow.MlflowClient()
    [version] = client.search_model_versions("name = 'gridshapes-resnet50'")
    assert version.run_id == best["run_id"]
    assert client.get_model_version_by_alias("gridshapes-resnet50", "champion").version == version.version
    assert result.registered_model_uri == f"models:/gridshapes-resnet50/{version.version}"
    # Only the best point logged a whole model; the others keep what rebuilds theirs.
    assert children.loc[children["run_id"] != best["run_id"], "tags.model_uri"].isna().all()
    assert result.best_model_uri == mlflow.get_run(best["run_id"]).data.tags["model_uri"]


@pytest.mark.slow
@pytest.mark.eager
def test_log_model_rebuilds_a_points_model_exactly_and_it_predicts_as_the_cached_head(resumed_grid, monkeypatch):
    """A point's whole model, built on demand, scores the test split as the point's head did on
    cached features: same classes on at least 99% of images (here all), and the same val_loss.
    Under `mlflow run -e log-model` the model still goes to the point's run, and MLflow's run says so."""
    result = resumed_grid.result
    points = mlflow.search_runs(experiment_names=["grid-e2e"], filter_string="tags.grid_point != ''",
                                output_format="list")
    point = next(run for run in points if run.info.run_id != result.best_run_id)
    entry = as_under_mlflow_run(monkeypatch)  # mlflow run . -e log-model -P run=<point's id>
    logged = log_trained_model_of(LogModelConfig(run=point.info.run_id))
    rebuilt = mlflow.get_run(point.info.run_id)
    assert logged.model_uri == rebuilt.data.tags["model_uri"] and rebuilt.data.tags["mlflow.parentRunId"] == result.run_id
    run = mlflow.get_run(entry)
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "log-model"
    assert (run.data.tags["source_run_id"], run.data.tags["model_uri"]) == (point.info.run_id, logged.model_uri)
    assert log_trained_model_of(LogModelConfig(run=point.info.run_id)) == logged  # once
    data_uri = mlflow.get_run(result.run_id).info.artifact_uri + "/data"
    whole = evaluate(EvaluateConfig(model=logged.model_uri, data=data_uri, feature_cache="off"))

    def predicted(run_id):
        path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/predictions.csv")
        return pd.read_csv(path).sort_values("path")["predicted"].to_numpy()

    assert (predicted(whole.run_id) == predicted(point.info.run_id)).mean() >= 0.99


def test_log_model_under_mlflow_run_of_an_unknown_run_fails_its_run_in_one_line(mlflow_run_id):
    with pytest.raises(PipelineError, match="no run 'nope' in the tracking store"):
        log_trained_model_of(LogModelConfig(run="nope"))
    run = mlflow.get_run(mlflow_run_id)
    assert run.info.status == "FAILED" and run.data.tags[REASON].startswith("PipelineError: no run 'nope'")


@pytest.mark.slow
@pytest.mark.eager
def test_a_grid_on_a_backbone_of_your_own_keeps_that_backbone_frozen(tmp_path):
    """The offline flow of README, Accuracy: train a backbone with recipe=scratch, then the grid on
    it with weights=<its model URI>: every point's backbone is that one, unchanged."""
    dataset = str(make_dataset(tmp_path / "ownbackbone", n=8))
    data = prepare(tiny(PrepareConfig, dataset=dataset, experiment="own-backbone"))
    options = tiny_values(TrainConfig, data=data.data_uri, experiment="own-backbone", recipe="scratch")
    backbone = train(with_recipe(TrainConfig, options)).model_uri
    result = grid(tiny(GridConfig, dataset=dataset, experiment="own-backbone", weights=backbone, image_size=32))
    assert len(result.table) == 7 and result.table["Accuracy"].notna().all()
    expected = load_model(backbone)[0].get_layer("resnet50").get_weights()
    for got, want in zip(load_model(result.best_model_uri)[0].get_layer("resnet50").get_weights(), expected, strict=True):
        np.testing.assert_array_equal(got, want)
