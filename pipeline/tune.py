"""tune: an Optuna study that starts from the studies' seven grid points and searches beyond them.

One parent run holds the prepared data and the study's results; every trial is a child run made
by train itself (params, per-epoch metrics, the model). Optuna sees validation accuracy only;
the test split is read once, at the end, for the best trial's model. The study lives in an
Optuna storage (pipeline.study), so the same command resumes it after any interruption, and
several processes, here or on other machines, can work on it at once.
"""

import multiprocessing
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow
import optuna
from optuna.trial import TrialState

from pipeline import datasets
from pipeline.config import EvaluateConfig, LogModelConfig, PipelineError, PrepareConfig, TuneConfig
from pipeline.registry import register
from pipeline.study import (Job, counted, default_study_name, die_with_parent, enqueue_grid, fail_dead_trials, is_dead,
                            open_study, worker_id)
from pipeline.tracking import step_run

FIGURES = ("plot_optimization_history", "plot_param_importances", "plot_parallel_coordinate")


@dataclass(frozen=True)
class TuneResult:
    run_id: str
    study_name: str
    best_trial: int
    best_value: float  # the best trial's validation accuracy (the objective)
    best_params: dict
    best_model_uri: str
    test_accuracy: float  # of the best trial's model, the study's only look at the test split
    registered_model_uri: str  # models:/<name>/<version>
    n_complete: int
    n_pruned: int


def tune(cfg: TuneConfig, pruner: optuna.pruners.BasePruner | None = None) -> TuneResult:
    """Prepare the data into the parent run, run the study with cfg.workers processes until it has
    cfg.n_trials finished trials, then evaluate and register the best trial's model.

    Logs on the parent: the data artifacts of prepare; tune_trials.csv (Optuna's trials table);
    plots/optimization_history.png, plots/param_importances.png, plots/parallel_coordinate.png;
    best_params.json and tags best.<param>, best_run_id, best_model_uri, optuna_study; metrics
    best_val_accuracy, best_trial, test_accuracy, n_complete, n_pruned, n_failed. Each trial is
    a train run named trial-<number>, in a process of its own (pipeline.trial), with tags
    optuna_study, optuna_trial, optuna_worker, optuna_process and optuna_state: COMPLETE (run
    FINISHED), PRUNED (run KILLED, tag pruned_at_epoch, no model) or FAIL (run FAILED); and
    metrics rss_mb and peak_rss_mb. Prints one line per trial.
    pruner: any Optuna pruner instead of cfg.pruner's (picklable: trial processes get a copy).
    """
    from pipeline.prepare import prepare

    source = datasets.locate(cfg.dataset, cfg.data_dir)
    datasets.scan(source)  # fail before any run starts
    name = default_study_name(cfg, source.name)
    study = open_study(cfg, name)  # a bad storage fails here too
    with step_run("tune", cfg, source.name, run_id=_interrupted_parent(cfg.experiment or source.name, name)) as parent:
        mlflow.set_tags({"step": "tune", "optuna_study": name})
        _fail_dead(study, parent.info.experiment_id, name)
        data = prepare(cfg.to(PrepareConfig), run_id=parent.info.run_id)
        enqueue_grid(study, cfg)
        experiment = mlflow.get_experiment(parent.info.experiment_id).name
        run_workers(Job(cfg, name, data.data_uri, parent.info.run_id, experiment, pruner))
        fail_dead_trials(study)  # a worker that crashed leaves its trial RUNNING
        best = _best_trial(study)
        model_uri = _best_model(best, cfg)
        _log_study(study, best, model_uri)
        test_accuracy = _evaluate_once(best, cfg, data.data_uri, model_uri)
        mlflow.log_metric("test_accuracy", test_accuracy)
        registered = register(model_uri, cfg.registered_model, if_new=True)
        mlflow.set_tags({"registered_model": registered.name, "model_version": registered.version,
                         "champion": str(registered.champion)})
    states = [t.state for t in study.get_trials(deepcopy=False)]
    print(f"best trial {best.number}: val_accuracy {best.value:.4f}, test_accuracy {test_accuracy:.4f}, "
          f"params {best.params}")
    return TuneResult(parent.info.run_id, name, best.number, best.value, best.params, model_uri,
                      test_accuracy, registered.uri, states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED))


def run_workers(job: Job) -> None:
    """This process and job.cfg.workers - 1 spawned ones run trials of the study until it is done."""
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked TensorFlow state
    others = [context.Process(target=_spawned_worker, args=(job, i), name=f"tune worker {i}")
              for i in range(1, job.cfg.workers)]
    for process in others:
        process.start()
    try:
        work(job, 0)
    finally:
        for process in others:
            process.join()
    failed = [p.name for p in others if p.exitcode != 0]
    if failed:
        raise PipelineError(f"{', '.join(failed)} stopped with an error (its output is above); "
                            "run the same command again to continue the study")


def _spawned_worker(job: Job, index: int) -> None:
    die_with_parent()
    work(job, index)


def work(job: Job, index: int) -> None:
    """A worker: run trials, each in a fresh process (pipeline.trial), until the study has
    n_trials finished or running ones (other workers' count too) or cfg.timeout has passed.
    Several processes, here or elsewhere, may work on one study at once."""
    from pipeline.trial import run_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, me = open_study(job.cfg, job.study_name), worker_id()
    context, start = multiprocessing.get_context("spawn"), time.monotonic()
    while counted(study) < job.cfg.n_trials:
        if job.cfg.timeout and time.monotonic() - start > job.cfg.timeout:
            print(f"{me}: timeout of {job.cfg.timeout} s reached, starting no more trials")
            return
        trial = context.Process(target=run_trial, args=(job, me, index), name="tune trial")
        trial.start()
        trial.join()
        if trial.exitcode != 0:
            fail_dead_trials(study)
            raise PipelineError(f"a trial's process stopped with exit code {trial.exitcode} (its output is above); "
                                "run the same command again to continue the study")


def _interrupted_parent(experiment: str, study_name: str) -> str | None:
    """The latest tune run of this study that did not finish, to continue in; None under
    `mlflow run`, which makes the parent run itself (the study resumes all the same)."""
    found = mlflow.get_experiment_by_name(experiment)
    if os.environ.get("MLFLOW_RUN_ID") or found is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [found.experiment_id], max_results=1, order_by=["attributes.start_time DESC"],
        filter_string=f"tags.step = 'tune' and tags.optuna_study = '{study_name}' and attributes.status != 'FINISHED'")
    if not runs:
        return None
    print(f"continuing the interrupted tune run {runs[0].info.run_id}")
    mlflow.set_experiment(experiment_id=found.experiment_id)  # MLflow resumes a run only in the active experiment
    return runs[0].info.run_id


def _fail_dead(study: optuna.Study, experiment_id: str, study_name: str) -> None:
    """Trials, and their runs, left RUNNING by a process of this host that died: FAIL and FAILED."""
    from pipeline.trial import end_run

    fail_dead_trials(study)
    client = mlflow.MlflowClient()
    running = f"tags.optuna_study = '{study_name}' and attributes.status = 'RUNNING'"
    for run in client.search_runs([experiment_id], filter_string=running):
        if is_dead(run.data.tags.get("optuna_process", "")):
            end_run(run.info.run_id, "FAIL", "FAILED")


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise PipelineError(f"no trial of study {study.study_name!r} completed (all pruned or failed): "
                            "raise n_trials, or use pruner=none")
    return study.best_trial


def _best_model(best: optuna.trial.FrozenTrial, cfg: TuneConfig) -> str:
    """The best trial's whole model: logged by the trial (log_models=all) or rebuilt and logged now."""
    from pipeline.train import log_trained_model_of

    if best.user_attrs.get("model_uri"):
        return best.user_attrs["model_uri"]
    run_id = best.user_attrs["mlflow_run_id"]
    return log_trained_model_of(LogModelConfig(run=run_id, cache_dir=cfg.cache_dir)).model_uri


def _log_study(study: optuna.Study, best: optuna.trial.FrozenTrial, model_uri: str) -> None:
    """The trials table, Optuna's figures and the best trial, on the active (parent) run."""
    trials = study.get_trials(deepcopy=False)
    mlflow.log_metrics({"best_val_accuracy": best.value, "best_trial": best.number,
                        **{f"n_{s.name.lower()}": sum(t.state == s for t in trials)
                           for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}})
    mlflow.set_tags({"best_run_id": best.user_attrs["mlflow_run_id"], "best_model_uri": model_uri,
                     **{f"best.{k}": str(v) for k, v in best.params.items()}})
    mlflow.log_dict(best.params, "best_params.json")
    with tempfile.TemporaryDirectory() as tmp:
        study.trials_dataframe().to_csv(Path(tmp) / "tune_trials.csv", index=False)
        mlflow.log_artifacts(tmp)
    for figure in FIGURES:
        _log_figure(study, figure)


def _log_figure(study: optuna.Study, figure: str) -> None:
    """One of optuna.visualization.matplotlib's figures as plots/<name>.png; skipped with a note
    when the study cannot draw it yet (e.g. importances need two complete trials)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            axes = getattr(optuna.visualization.matplotlib, figure)(study)
    except (ValueError, RuntimeError, ZeroDivisionError) as e:
        print(f"no {figure} figure: {e}")
        return
    fig = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
    mlflow.log_figure(fig, f"plots/{figure.removeprefix('plot_')}.png")
    plt.close(fig)


def _evaluate_once(best: optuna.trial.FrozenTrial, cfg: TuneConfig, data_uri: str, model_uri: str) -> float:
    """test_accuracy of the best trial's model, evaluated into its run unless it already was."""
    from pipeline.evaluate import evaluate

    run_id = best.user_attrs["mlflow_run_id"]
    known = mlflow.get_run(run_id).data.metrics
    if "test_accuracy" in known:
        print(f"best trial {best.number} was evaluated before: test_accuracy {known['test_accuracy']:.4f}")
        return known["test_accuracy"]
    scores = evaluate(cfg.to(EvaluateConfig, model=model_uri, data=data_uri), run_id=run_id)
    return scores.metrics["test_accuracy"]
