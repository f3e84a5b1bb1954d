"""The studies' seven-point grid: one parent run, one child run per point (train + evaluate).

Every point shares the data, epochs, seed and weights; with a frozen backbone they also share
one feature extraction (pipeline.features), so the grid costs one backbone pass plus seven
small heads. A point already finished for the same data and settings (tag grid_key) is reused,
so a grid that stopped half-way continues where it stopped.

One grid runs per settings at a time, on any number of machines: the parent run is claimed
(pipeline.tracking.claim), a second command with the same settings waits for the first to end,
then reuses its points; a parent whose process died is continued by exactly one command. So a
point is never trained twice at once, and a finished search is registered once.
"""

import hashlib
import json
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import datasets
from pipeline.config import EvaluateConfig, GridConfig, PrepareConfig, TrainConfig
from pipeline.plots import grid_chart, log_figure
from pipeline.registry import register
from pipeline.tracking import claim, step_run

# (hidden layers, dense units, learning rate) of the studies' runs 1 to 7.
GRID = ((1, 8, 1e-5), (1, 16, 1e-5), (1, 32, 1e-5), (2, 8, 1e-5), (3, 8, 1e-5), (1, 8, 5e-5), (1, 8, 1e-4))
TABLE_COLUMNS = ["Model", "Hidden Layer", "Dense Count", "Learning Rate", "Accuracy", "Learning Time(ms)"]


@dataclass(frozen=True)
class GridResult:
    run_id: str
    table: pd.DataFrame  # the studies' columns, one row per point
    best_model_uri: str  # the point with the best validation accuracy
    best_run_id: str
    registered_model_uri: str  # models:/<name>/<version> of the best point


def point_configs(cfg: GridConfig, data_uri: str) -> list[TrainConfig]:
    """The seven training configs: cfg with each point's hidden_layers, units and learning_rate."""
    base = cfg.to(TrainConfig, data=data_uri)
    return [replace(base, hidden_layers=k, units=n, learning_rate=lr) for k, n, lr in GRID]


def grid(cfg: GridConfig) -> GridResult:
    """Prepare the data into the parent run, then train and evaluate each point in a child run.

    Logs on the parent: the data artifacts of prepare; grid_results.csv and grid_results.md
    (Model | Hidden Layer | Dense Count | Learning Rate | Accuracy | Learning Time(ms), Accuracy
    being test accuracy); plots/grid.png; best_grid_point, best_val_accuracy and its
    test_accuracy (the best point is chosen on validation accuracy), which is registered
    (pipeline.registry: champion only if it beats the champion). Children are named
    point-1..point-7 and tagged grid_point and grid_key. Prints the table.
    """
    from pipeline.prepare import prepare

    source = datasets.locate(cfg.dataset, cfg.data_dir)
    datasets.scan(source)  # fail before any run starts
    settings = _key(cfg, source.name)
    parent_id = claim(cfg.experiment or source.name, {"step": "grid", "grid_settings": settings}, "grid", exclusive=True)
    with step_run("grid", cfg, source.name, run_id=parent_id) as parent:
        mlflow.set_tags({"step": "grid", "grid_settings": settings})
        data = prepare(cfg.to(PrepareConfig), run_id=parent.info.run_id)
        rows, best = [], None
        for number, point in enumerate(point_configs(cfg, data.data_uri), start=1):
            row, trained = _point(number, point, data.digest, cfg)
            rows.append(row)
            if best is None or row["best_val_accuracy"] > best[0]["best_val_accuracy"]:
                best = (row, trained)
        runs = pd.DataFrame(rows)
        table = _log_table(runs)
        row = _with_model(*best)
        mlflow.log_metrics({"best_grid_point": int(row["number"]), "best_val_accuracy": row["best_val_accuracy"],
                            "test_accuracy": row["test_accuracy"]})
        mlflow.set_tags({"best_model_uri": row["model_uri"], "best_run_id": row["run_id"]})
        registered = register(row["model_uri"], cfg.registered_model, if_new=True)
        mlflow.set_tags({"registered_model": registered.name, "model_version": registered.version,
                         "champion": str(registered.champion)})
    print(table.to_string(index=False))
    return GridResult(parent.info.run_id, table, row["model_uri"], row["run_id"], registered.uri)


def _point(number: int, point: TrainConfig, digest: str, cfg: GridConfig) -> tuple[dict, object]:
    """Train and evaluate one point in a child run, or reuse its finished run: (its table row, its
    trained model in memory, None when reused). On cached features a point trains and scores only
    its head; its whole model is logged only with log_models=all (the best point's at the end)."""
    from pipeline.evaluate import evaluate_trained
    from pipeline.train import train

    run = finished_point(point, digest, mlflow.active_run().info.experiment_id)
    if run:
        print(f"point {number}: reusing finished run {run.info.run_id}")
        return _row(number, point, run.info.run_id, run.data.tags.get("model_uri", ""), run.data.metrics), None
    result = train(point, log_model=cfg.log_models == "all")
    client = mlflow.MlflowClient()
    for tag, value in {"mlflow.runName": f"point-{number}", "grid_point": str(number),
                       "grid_key": _key(point, digest)}.items():
        client.set_tag(result.run_id, tag, value)
    scores = evaluate_trained(result.trained, run_id=result.run_id, tta=cfg.tta)
    metrics = {**scores.metrics, "best_val_accuracy": result.best_val_accuracy,
               "learning_time_s": result.learning_time_s}
    return _row(number, point, result.run_id, result.model_uri, metrics), result.trained


def finished_point(point: TrainConfig, digest: str, experiment_id: str):
    """The latest finished and evaluated grid point run of the experiment that trained exactly
    point (every setting but where data, runs and cache live: tag grid_key) on prepared data of
    this content digest, or None. Training is deterministic on a CPU, so its metrics are the ones
    point would get: grid reuses it, tune takes it over as a trial."""
    query = f"tags.grid_key = '{_key(point, digest)}' and attributes.status = 'FINISHED'"
    runs = mlflow.search_runs([experiment_id], query, output_format="list", order_by=["attributes.start_time DESC"])
    return next((run for run in runs if "test_accuracy" in run.data.metrics), None)


def _with_model(row: dict, trained) -> dict:
    """The best point's row with the URI of its whole model: logged now from memory, or rebuilt
    (pipeline.train.log_trained_model_of) when the point was reused from an earlier grid run."""
    from pipeline.config import LogModelConfig
    from pipeline.train import log_trained, log_trained_model_of

    if row["model_uri"]:
        return row
    if trained is None:
        uri = log_trained_model_of(LogModelConfig(run=row["run_id"])).model_uri
    else:
        with mlflow.start_run(run_id=row["run_id"], nested=True):
            uri = log_trained(trained)
    return {**row, "model_uri": uri}


def _key(cfg, data: str) -> str:
    """Same data and same settings give the same key; data is a content digest or a dataset name."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("data", "experiment", "cache_dir")}
    return hashlib.sha256(json.dumps([data, settings], sort_keys=True).encode()).hexdigest()[:16]


def _row(number: int, point: TrainConfig, run_id: str, model_uri: str, metrics: dict) -> dict:
    return {"number": number, "hidden_layers": point.hidden_layers, "units": point.units,
            "learning_rate": point.learning_rate, "test_accuracy": metrics["test_accuracy"],
            "learning_time_ms": metrics["learning_time_s"] * 1000, "best_val_accuracy": metrics["best_val_accuracy"],
            "run_id": run_id, "model_uri": model_uri}


def _log_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The studies' result table and chart, logged on the active (parent) run."""
    table = pd.DataFrame({
        "Model": [f"Model {n}" for n in runs["number"]], "Hidden Layer": runs["hidden_layers"],
        "Dense Count": runs["units"], "Learning Rate": runs["learning_rate"],
        "Accuracy": runs["test_accuracy"].round(4), "Learning Time(ms)": runs["learning_time_ms"].round(0).astype(int),
    })
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(Path(tmp) / "grid_results.csv", index=False)
        (Path(tmp) / "grid_results.md").write_text(table.to_markdown(index=False) + "\n")
        runs.to_csv(Path(tmp) / "grid_runs.csv", index=False)
        mlflow.log_artifacts(tmp)
    chosen = int(runs["best_val_accuracy"].to_numpy().argmax())  # the first best, as grid() picks it
    log_figure(grid_chart(table, chosen), "plots/grid.png")
    return table
