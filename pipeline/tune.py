"""tune: an Optuna study that starts from the studies' seven grid points and searches beyond them.

One parent run holds the prepared data and the study's results; every trial is a child run made
by train itself (params, per-epoch metrics, the model). Grid points that a `grid` already
finished on the same data and settings are taken over as finished trials, not trained again.
Optuna sees validation accuracy only; the test split is read once, at the end, for the best
trial's model. The study lives in an Optuna storage (pipeline.study), so the same command
resumes it after any interruption, and several processes, here or on other machines, can work
on it at once.
"""

import importlib.util
import multiprocessing
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import optuna
from optuna.trial import TrialState

from pipeline import datasets
from pipeline.config import EvaluateConfig, LogModelConfig, PipelineError, PrepareConfig, TrainConfig, TuneConfig
from pipeline.grid import finished_point
from pipeline.plots import log_figure
from pipeline.registry import register
from pipeline.liveness import Stopped, stop_on_signals
from pipeline.study import (Job, counted, default_study_name, die_with_parent, fail_dead_trials, grid_params,
                            link_to_mlflow, locked, open_study, queue_grid, suggest, worker_id)
from pipeline.tracking import claim, step_run
from pipeline.trial import start_trial

POLL_S = 2  # how often a worker with nothing to start looks at the study again
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
    """Prepare the data into the parent run, start the study (start_study: the grid's points,
    taken over from a finished grid on the same data and settings or queued), run it with
    cfg.workers processes until it has cfg.n_trials finished trials (taken-over points count),
    then evaluate and register the best trial's model.

    Logs on the parent: the data artifacts of prepare; tune_trials.csv (Optuna's trials table);
    plots/optimization_history.png, plots/param_importances.png, plots/parallel_coordinate.png;
    best_params.json and tags best.<param>, best_run_id, best_model_uri, optuna_study; metrics
    best_val_accuracy, best_trial, test_accuracy, n_complete, n_pruned, n_failed. Each trial is
    a train run named trial-<number>, in a trial process of its worker's (pipeline.trial), with tags
    optuna_study, optuna_trial, optuna_worker, optuna_process and optuna_state: COMPLETE (run
    FINISHED), PRUNED (run KILLED, tag pruned_at_epoch, no model) or FAIL (run FAILED); and
    metrics rss_mb and peak_rss_mb; a taken-over grid point's run stays its grid's. The study
    names its objective val_accuracy, each trial has user attr mlflow_run_id and the study the
    attrs of pipeline.study.link_to_mlflow, for optuna-dashboard. Prints one line per trial, and
    one for the grid points taken over.
    pruner: any Optuna pruner instead of cfg.pruner's (picklable: trial processes get a copy).
    """
    from pipeline.prepare import prepare

    source = datasets.locate(cfg.dataset, cfg.data_dir)
    datasets.scan(source)  # fail before any run starts
    if importlib.util.find_spec("tensorflow") is None:  # trials import it, in processes of their own: the CLI's
        raise ModuleNotFoundError("No module named 'tensorflow'", name="tensorflow")  # one line, not theirs
    name = default_study_name(cfg, source.name)
    study = open_study(cfg, name)  # a bad storage fails here too
    parent_id = claim(cfg.experiment or source.name, {"step": "tune", "optuna_study": name}, "tune", exclusive=False)
    with step_run("tune", cfg, source.name, run_id=parent_id) as parent:
        mlflow.set_tags({"step": "tune", "optuna_study": name})
        data = prepare(cfg.to(PrepareConfig), run_id=parent.info.run_id)
        start_study(study, cfg, data, parent)
        experiment = mlflow.get_experiment(parent.info.experiment_id).name
        run_workers(Job(cfg, name, data.data_uri, parent.info.run_id, experiment, pruner))
        with locked(cfg.storage):  # one command at a time: the best is evaluated and registered once
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


def start_study(study: optuna.Study, cfg: TuneConfig, data, parent) -> None:
    """Under the storage's lock, so that commands starting together do it once: fail dead trials,
    take over the grid points that a grid finished on the same data and settings as finished
    trials, queue the other points, and link the study to this parent run (link_to_mlflow)."""
    finished = grid_trials(cfg, data, parent.info.experiment_id)  # MLflow's searches, before the lock
    with locked(cfg.storage):
        fail_dead_trials(study)
        taken, _ = queue_grid(study, cfg, finished)
        link_to_mlflow(study, parent)
    if taken:
        grids = sorted({finished[n].user_attrs["grid_run_id"] for n in taken})
        print(f"took over grid points {', '.join(map(str, taken))} from grid run {', '.join(grids)} as finished "
              f"trials of study {study.study_name}: same data and settings, not trained again")


def grid_trials(cfg: TuneConfig, data, experiment_id: str) -> dict[int, optuna.trial.FrozenTrial]:
    """The grid points whose exact training config, the one this study's grid trial would train
    (suggest), a grid finished on data of the same content (pipeline.grid.finished_point), as
    finished trials: value best_val_accuracy, each epoch's val_accuracy, the trial's params and
    search space; user attrs grid_point, mlflow_run_id (the point's run), grid_run_id (its grid)."""
    base, client, trials = cfg.to(TrainConfig, data=data.data_uri), mlflow.MlflowClient(), {}
    for number, params in enumerate(grid_params(cfg), start=1):
        fixed = optuna.trial.FixedTrial(params)
        run = finished_point(suggest(fixed, base, cfg.weights), data.digest, experiment_id)
        if run is None:
            continue
        epochs = sorted(client.get_metric_history(run.info.run_id, "val_accuracy"), key=lambda m: m.step)
        trials[number] = optuna.trial.create_trial(
            value=run.data.metrics["best_val_accuracy"], params=fixed.params, distributions=fixed.distributions,
            intermediate_values={epoch: m.value for epoch, m in enumerate(epochs, start=1)},
            user_attrs={"grid_point": number, "mlflow_run_id": run.info.run_id,
                        "grid_run_id": run.data.tags.get("mlflow.parentRunId", "")})
    return trials


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
    stop_on_signals()
    try:
        work(job, index)
    except Stopped as e:
        sys.exit(128 + getattr(signal.Signals, e.signame).value)


def work(job: Job, index: int) -> None:
    """A worker: run trials in processes of its own (pipeline.trial: a fresh one every
    job.trials_per_process trials, forked from the worker's forkserver, which has imported
    TensorFlow and the rest once), until the study is done
    (n_trials finished, none running: other workers' trials, here or on other machines, count,
    and a worker waits for them, since a dead one is failed and retried) or cfg.timeout has passed.
    A stop (SIGTERM, SIGINT) is passed on to the running trial, which ends cleanly first."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study, me = open_study(job.cfg, job.study_name), worker_id()
    deadline = time.time() + job.cfg.timeout if job.cfg.timeout else None  # the trial processes stop there too
    while True:
        if deadline is not None and time.time() > deadline:
            print(f"{me}: timeout of {job.cfg.timeout} s reached, starting no more trials")
            return
        with locked(job.cfg.storage):
            fail_dead_trials(study)
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if counted(study) - running >= job.cfg.n_trials and not running:
            return
        if counted(study) >= job.cfg.n_trials:
            time.sleep(POLL_S)  # other workers' trials decide whether one more is needed
            continue
        trial = start_trial(job, me, index, deadline)
        try:
            trial.join()
        except KeyboardInterrupt:
            trial.terminate()  # SIGTERM: the trial ends its run and tells Optuna before it exits
            trial.join()
            raise
        if trial.exitcode != 0:
            raise PipelineError(f"a trial's process stopped with exit code {trial.exitcode} (its output is above); "
                                "run the same command again to continue the study")


def _best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise PipelineError(f"no trial of study {study.study_name!r} completed (all pruned or failed): "
                            "raise n_trials, or use pruner=none")
    return study.best_trial


def _best_model(best: optuna.trial.FrozenTrial, cfg: TuneConfig) -> str:
    """The best trial's whole model: logged by the trial (log_models=all) or by the grid whose point
    it took over, else rebuilt and logged now."""
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
    log_figure(fig, f"plots/{figure.removeprefix('plot_')}.png")


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
