"""Where a step's MLflow run goes, and how its config is recorded.

MLflow's own default tracking store is used (sqlite mlflow.db in the working directory) unless
MLFLOW_TRACKING_URI says otherwise. Every run a step starts carries its owner and a heartbeat
(pipeline.liveness), so that a run whose process died is recognised and ended by the next command.
"""

import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict

import mlflow
from mlflow.exceptions import MlflowException

from pipeline import liveness
from pipeline.config import URI_SCHEME, parameters

# MLflow 3 opens an experiment without this tag in its GenAI view (traces, an assistant panel);
# these runs are models to compare, the classic machine-learning view.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


@contextmanager
def step_run(step: str, cfg, dataset: str | None, run_id: str | None = None, run_name: str | None = None):
    """Run one step in an MLflow run and yield it; the run ends FAILED if the step raises, KILLED
    if SIGTERM or SIGINT stops it (see `ended`). Before a top-level run starts, the RUNNING runs of
    dead processes are marked FAILED (pipeline.liveness.reap).

    Inside another run (main, grid) the step's run is nested under it. Under `mlflow run` the run
    that MLflow made (MLFLOW_RUN_ID) is used. Otherwise a new run starts in the experiment
    cfg.experiment, or one named after the dataset. With run_id the step logs into that existing
    run instead, the active one or resumed (a grid point evaluates into its training run), and
    its config goes to config_<step>.json. dataset None: a step of no one dataset (predict,
    log-model), whose run is tagged with its step only.
    """
    parent = mlflow.active_run()
    if run_id and parent and parent.info.run_id == run_id:
        log_config(cfg, f"config_{step}.json")
        yield parent
        return
    if not parent:
        liveness.reap()  # runs left RUNNING by processes that are gone: FAILED, before anything starts
    resumed = bool(run_id and mlflow.get_run(run_id).data.tags.get("step"))
    if run_id:
        run = mlflow.start_run(run_id=run_id, nested=parent is not None)
    elif parent:
        run = mlflow.start_run(run_name=run_name or step, nested=True, experiment_id=parent.info.experiment_id)
    elif os.environ.get("MLFLOW_RUN_ID"):
        run = mlflow.start_run()
        _classic_view(run.info.experiment_id)
        if run.info.experiment_id == "0" and dataset and not getattr(cfg, "experiment", ""):
            print(f"note: this run is in the Default experiment; `mlflow run --experiment-name {dataset}` "
                  "groups runs per dataset", file=sys.stderr)
    else:
        _classic_view(mlflow.set_experiment(cfg.experiment or dataset).experiment_id)
        run = mlflow.start_run(run_name=run_name or step)
    with ended(run), liveness.heartbeat(run.info.run_id):  # a failure to log the config fails the run too
        mlflow.set_tags(liveness.owner_tags())
        if resumed:
            log_config(cfg, f"config_{step}.json")
        else:
            mlflow.set_tags({"step": step} | ({"dataset": dataset} if dataset else {}))
            log_config(cfg)
        yield run


@contextmanager
def entry_point_run(step: str, cfg, dataset: str | None = None):
    """The run of a step that starts none of its own (predict, report, log-model), under `mlflow
    run` only: MLflow made one (MLFLOW_RUN_ID) and the step logs what it did there, through
    step_run, which ends it FINISHED or FAILED; None otherwise (from the command line, or called
    by another step inside its run: grid and tune call log-model's function)."""
    if not os.environ.get("MLFLOW_RUN_ID") or mlflow.active_run():
        yield None
        return
    with step_run(step, cfg, dataset) as run:
        yield run


@contextmanager
def ended(run):
    """End the run FINISHED; FAILED if the block raises; KILLED if it was stopped (SIGTERM, SIGINT),
    with the reason as tag pipeline.end_reason."""
    try:
        yield
    except KeyboardInterrupt as e:
        _end(run, "KILLED", str(e) or "stopped by SIGINT")
        raise
    except BaseException as e:
        _end(run, "FAILED", f"{type(e).__name__}: {e}".splitlines()[0])
        raise
    _end(run, "FINISHED")


def _end(run, status: str, reason: str = "") -> None:
    run_id = run.info.run_id
    if reason:
        mlflow.MlflowClient().set_tag(run_id, liveness.REASON, reason[:5000])
    active = mlflow.active_run()
    if active and active.info.run_id == run_id:
        mlflow.end_run(status)
    else:
        mlflow.MlflowClient().set_terminated(run_id, status)


def claim(experiment: str, tags: dict[str, str], step: str, exclusive: bool, poll_s: float = 5.0) -> str | None:
    """The run a grid or tune command logs to, among the runs tagged `tags`: the one way a parent
    run is claimed. Returns its id (the experiment made active), or None for "start a new one".

    A live run (RUNNING, its owner alive: pipeline.liveness) is never taken over. The latest one
    that ended without finishing (its process stopped, died, or failed) is continued by exactly
    one command (liveness.take). exclusive (grid): while a live run holds these tags the command
    waits for it to end; otherwise it creates the run itself, and if another command did the same
    at that moment both withdraw and try again after a random pause, so only one ever runs.
    Not exclusive (tune: several commands may share a study): a new run is started instead.
    Under `mlflow run` (MLFLOW_RUN_ID) MLflow made the run: None.
    """
    if os.environ.get("MLFLOW_RUN_ID"):
        return None
    client = mlflow.MlflowClient()
    experiment_id = _experiment_id(client, experiment)
    mlflow.set_experiment(experiment_id=experiment_id)  # MLflow resumes a run only in the active experiment
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    waiting = None
    while True:
        liveness.reap([experiment_id])
        runs = client.search_runs([experiment_id], f"{query} and attributes.status != 'FINISHED'",
                                  order_by=["attributes.start_time DESC"])
        live = [r for r in runs if r.info.status == "RUNNING"]
        ended = [r for r in runs if r.info.status != "RUNNING"
                 and f"pipeline.taken.{r.info.end_time}" not in r.data.params]
        if exclusive and live:
            if waiting != live[0].info.run_id:
                waiting = live[0].info.run_id
                print(f"waiting for {step} run {waiting} of {live[0].data.tags.get(liveness.OWNER, '?')}, "
                      "which has the same settings, to end", flush=True)
            time.sleep(poll_s)
        elif ended:
            if liveness.take(ended[0]):
                print(f"continuing the interrupted {step} run {ended[0].info.run_id}")
                return ended[0].info.run_id
        elif not exclusive:
            return None
        else:
            run = client.create_run(experiment_id, tags={**tags, **liveness.owner_tags()}, run_name=step)
            rivals = client.search_runs([experiment_id], f"{query} and attributes.status = 'RUNNING'")
            if [r.info.run_id for r in rivals] == [run.info.run_id]:
                return run.info.run_id
            client.set_terminated(run.info.run_id, "KILLED")
            client.delete_run(run.info.run_id)
            time.sleep(random.uniform(0.2, 2.0))


def _experiment_id(client, name: str) -> str:
    """The id of experiment name, created if missing; another command creating it at that moment
    (RESOURCE_ALREADY_EXISTS) is not an error: its experiment is the one."""
    found = mlflow.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = mlflow.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def log_input(dataset, context: str) -> None:
    """mlflow.log_input, tried again when another process logged the same dataset at that moment:
    the store's unique key on (experiment, name, digest) makes concurrent first inserts race
    (three tune commands starting together), and the retry then links the existing dataset."""
    for attempt in range(4):
        try:
            return mlflow.log_input(dataset, context=context)
        except MlflowException as e:
            if attempt == 3 or not _another_was_first(e):
                raise
            time.sleep(random.uniform(0.2, 1.0))


def _another_was_first(error: MlflowException) -> bool:
    """Whether the store refused an insert for its unique key: another command inserted the same
    row at that moment (UniqueViolation on PostgreSQL, UNIQUE constraint on sqlite)."""
    return "unique" in str(error).lower()


def _classic_view(experiment_id: str) -> None:
    """Tag the experiment for MLflow's classic machine-learning view, once. Commands starting
    together on a new experiment may all find the tag missing: the store's unique key on (key,
    experiment) then refuses the later inserts, and the tag is there, as they wanted."""
    client = mlflow.MlflowClient()
    if "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags:
        for key, value in EXPERIMENT_KIND.items():
            try:
                client.set_experiment_tag(experiment_id, key, value)
            except MlflowException as e:
                if not _another_was_first(e):
                    raise


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
