"""The main entry point: prepare, train and evaluate, each a run nested under one main run, then
register the model (pipeline.registry: a new version, champion only if it beats the champion).

The steps run in this process (one TensorFlow start-up, not three) and hand each other URIs
exactly as separate `mlflow run -e STEP` calls would.
"""

from dataclasses import dataclass

import mlflow

from pipeline import datasets
from pipeline.config import EvaluateConfig, MainConfig, PrepareConfig, TrainConfig
from pipeline.prepare import prepare
from pipeline.registry import register
from pipeline.tracking import step_run


@dataclass(frozen=True)
class MainResult:
    run_id: str
    data_uri: str
    model_uri: str
    metrics: dict[str, float]
    registered_model_uri: str  # models:/<name>/<version>
    champion: bool  # whether that version is now models:/<name>@champion


def main(cfg: MainConfig) -> MainResult:
    """Run the three steps for cfg and register the model; the main run gets their URIs as tags and the key metrics.

    Logs on the main run: best_val_accuracy, best_val_loss, learning_time_s and the test summary metrics;
    tags data_uri, model_uri, the child run ids, registered_model, model_version and champion.
    """
    source = datasets.locate(cfg.dataset, cfg.data_dir)
    datasets.scan(source)  # a missing or malformed dataset fails before any run starts
    from pipeline.evaluate import SUMMARY, evaluate  # TensorFlow: only once the data is there
    from pipeline.train import train

    with step_run("main", cfg, source.name) as run:
        p = prepare(cfg.to(PrepareConfig))
        t = train(cfg.to(TrainConfig, data=p.data_uri))
        e = evaluate(cfg.to(EvaluateConfig, model=t.model_uri, data=p.data_uri))
        metrics = {"best_val_accuracy": t.best_val_accuracy, "best_val_loss": t.best_val_loss,
                   "learning_time_s": t.learning_time_s}
        metrics |= {k: e.metrics[k] for k in SUMMARY if k in e.metrics}
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"data_uri": p.data_uri, "model_uri": t.model_uri, "prepare_run_id": p.run_id,
                         "train_run_id": t.run_id, "evaluate_run_id": e.run_id})
        r = register(t.model_uri, cfg.registered_model)  # after evaluate: the version gets test figures too
        mlflow.set_tags({"registered_model": r.name, "model_version": r.version, "champion": str(r.champion)})
    return MainResult(run.info.run_id, p.data_uri, t.model_uri, metrics, r.uri, r.champion)
