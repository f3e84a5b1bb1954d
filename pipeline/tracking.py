"""Where a step's MLflow run goes, and how its config is recorded.

MLflow's own default tracking store is used (sqlite mlflow.db in the working directory) unless
MLFLOW_TRACKING_URI says otherwise.
"""

import os
import sys
from contextlib import contextmanager
from dataclasses import asdict

import mlflow

from pipeline.config import URI_SCHEME, parameters

# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant panel);
# these runs are models to compare, the classic machine-learning view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@contextmanager
def step_run(step: str, cfg, dataset: str, run_id: str | None = None, run_name: str | None = None):
    """Run one step in an MLflow run and yield it; the run ends FAILED if the step raises.

    Inside another run (main, grid) the step's run is nested under it. Under `mlflow run` the run
    that MLflow made (MLFLOW_RUN_ID) is used. Otherwise a new run starts in the experiment
    cfg.experiment, or one named after the dataset. With run_id the step logs into that existing
    run instead, the active one or resumed (a grid point evaluates into its training run), and
    its config goes to config_<step>.json.
    """
    parent = mlflow.active_run()
    if run_id and parent and parent.info.run_id == run_id:
        log_config(cfg, f"config_{step}.json")
        yield parent
        return
    if run_id:
        run = mlflow.start_run(run_id=run_id, nested=parent is not None)
    elif parent:
        run = mlflow.start_run(run_name=run_name or step, nested=True, experiment_id=parent.info.experiment_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()
        _classic_view(run.info.experiment_id)
        if run.info.experiment_id == "0" and not cfg.experiment:
            print(f"note: this run is in the Default experiment; `mlflow run --experiment-name {dataset}` "
                  "groups runs per dataset", file=sys.stderr)
    else:
        _classic_view(mlflow.set_experiment(cfg.experiment or dataset).experiment_id)
        run = mlflow.start_run(run_name=run_name or step)
    with run:
        if run_id:
            log_config(cfg, f"config_{step}.json")
        else:
            mlflow.set_tags({"step": step, "dataset": dataset})
            log_config(cfg)
        yield run


def _classic_view(experiment_id: str) -> None:
    """Tag the experiment for MLflow's classic machine-learning view, once."""
    client = mlflow.MlflowClient()
    if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
        for key, value in EXPERIMENT_KIND.items():
            client.set_experiment_tag(experiment_id, key, value)


def log_config(cfg, artifact: str = "config.json") -> None:
    """Log a config as params and tags, and whole as config.json.

    Params are what runs are compared on: the step's parameters (pipeline.config.parameters: a
    grid's or a study's parent leaves out what its children vary), but URIs (data, model, weights
    from a run), which go to tags <name>_uri, so that plots and the compare view never take a run
    id for a setting. Params that `mlflow run` already logged from the command line are left as
    they are: MLflow refuses to change a param, and "1e-5" and "1e-05" are the same value.
    """
    values = asdict(cfg)
    run = mlflow.get_run(mlflow.active_run().info.run_id)
    taken = {f.name: values[f.name] for f in parameters(type(cfg))}
    uris = {k: v for k, v in taken.items() if isinstance(v, str) and URI_SCHEME.match(v)}
    mlflow.log_params({k: v for k, v in taken.items() if k not in uris and k not in run.data.params})
    mlflow.set_tags({f"{k.removesuffix('_uri')}_uri": v for k, v in uris.items()
                     if f"{k.removesuffix('_uri')}_uri" not in run.data.tags})
    mlflow.log_dict(values, artifact)
