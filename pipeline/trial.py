"""Trials of tune, in a process of the worker's: train the suggested config in a child run of the
tune run, report each epoch to Optuna, stop when pruned, record the process's memory.

A trial process runs up to job.trials_per_process trials (pipeline.study.TRIALS_PER_PROCESS),
then its worker starts a fresh one: Keras, TensorFlow (traced functions) and MLflow each keep a
little of every model, and clearing the Keras session does not give all of it back (about 30 MB
a trial), so a worker's memory stays bounded however many trials it runs. On Linux a worker's
trial processes are forked from a forkserver of its own (start_trial), a fresh interpreter that
has imported TensorFlow, Keras, MLflow and OpenVINO once (PRELOAD): its first trial process
waits for that import (about 12 s on 2 cores, as a spawned process would), every later one
starts in well under a second. Each train seeds everything itself, so a trial's result does not
depend on the trials its process ran before, nor on how the process started.
"""

import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import threading
import time
import warnings
from multiprocessing import forkserver, reduction, resource_tracker
from pathlib import Path

import keras
import mlflow
import optuna
from optuna.trial import TrialState

from pipeline.config import TrainConfig
from pipeline.liveness import REASON, Stopped, beating, owner_tags, stop_on_signals
from pipeline.study import (Job, beat, claim_trial, counted, fail_dead_trials, locked, open_study, print_trial,
                            seed_sampler, suggest, worker_id)

# What a worker's forkserver imports before it forks any trial process: the third-party packages
# whose import is a fresh process's start-up cost. Not `pipeline` itself: Python 3.11 starts the
# server with a sys.path of its own, not the worker's, so it could import another checkout of it;
# a trial process imports pipeline's modules (0.2 s) after multiprocessing has set its sys.path
# and working folder to the worker's.
PRELOAD = ("tensorflow", "keras", "mlflow", "optuna", "openvino", "sklearn.metrics", "pandas", "matplotlib.pyplot",
           "mlflow.store.tracking.sqlalchemy_store")
STOPS = {signal.SIGINT, signal.SIGTERM}


def start_trial(job: Job, worker: str, index: int, deadline: float | None) -> multiprocessing.Process:
    """A trial process of this worker's (run_trial), started: on Linux forked from this process's
    forkserver, elsewhere (macOS, where forking after the system's frameworks are loaded is
    unsafe) spawned."""
    context = _forkserver() if sys.platform == "linux" else multiprocessing.get_context("spawn")
    process = context.Process(target=run_trial, args=(job, worker, index, deadline, FromWorker()), name="tune trial")
    process.start()
    return process


def _forkserver() -> multiprocessing.context.BaseContext:
    """The forkserver context, its server running: started once per process, a fresh interpreter
    (no TensorFlow state of this one's) that imports PRELOAD before it forks anything; it ends
    when this process and its children have (EOF on multiprocessing's pipe).

    The server starts with SIGINT and SIGTERM blocked, as multiprocessing's resource tracker does:
    a stop sent to every process of the group (Ctrl-C, systemd) must not end it under a running
    trial, whose end the worker learns from it. Its children inherit the mask, which run_trial
    lifts once its handlers are in place. The tracker starts first: it unblocks both signals
    itself once started."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    resource_tracker.ensure_running()
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOPS)
    try:
        forkserver.ensure_running()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return context


class FromWorker:
    """What a trial process takes over from its worker as it starts, as a spawned process does:
    the worker's environment as it is now, and its stdout and stderr. A forkserver's child would
    otherwise have the server's, as they were when the first trial started: not a later
    MLFLOW_TRACKING_URI, PIPELINE_CACHE_DIR or TMPDIR, nor the next test's captured output.
    (multiprocessing passes the working folder and sys.path itself.) Whatever the preloaded
    packages read from the environment as they are imported (TF_CPP_MIN_LOG_LEVEL, KERAS_BACKEND,
    OMP_NUM_THREADS) stays as it was when the server started."""

    def __init__(self, environ: dict | None = None, stdout=None, stderr=None):
        self.environ, self.stdout, self.stderr = environ, stdout, stderr

    def __reduce__(self):
        """Pickled as the process starts, with the descriptors multiprocessing sends along."""
        return FromWorker, (dict(os.environ), reduction.DupFd(1), reduction.DupFd(2))

    def adopt(self) -> None:
        os.environ.clear()
        os.environ.update(self.environ)
        tempfile.tempdir = None  # the server's imports fixed it: read TMPDIR again
        for fd, duplicate in ((1, self.stdout), (2, self.stderr)):
            received = duplicate.detach()
            if received != fd:  # spawn passes the descriptor itself
                os.dup2(received, fd)
                os.close(received)


def die_with_worker() -> None:
    """Be killed (SIGKILL) when the worker that started this process ends, even by kill -9, so
    that no orphan goes on with a trial that the next run should mark FAIL and run again. The
    worker is not the parent of a forkserver's child (the server is, and PR_SET_PDEATHSIG follows
    the parent): a thread waits on multiprocessing's sentinel of the starting process instead, a
    pipe whose write end only the worker holds, which the kernel closes when the worker dies."""
    worker = multiprocessing.parent_process()

    def watch():
        multiprocessing.connection.wait([worker.sentinel])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-worker", daemon=True).start()


def run_trial(job: Job, worker: str, index: int, deadline: float | None, inherited: FromWorker) -> None:
    """Process entry point: run trials of the study, one after another, up to job.trials_per_process
    and while it has fewer than job.cfg.n_trials (finished or running, other workers' included).
    Dead trials are failed, the count taken and each trial asked for under the storage's lock, so
    that workers starting together never run more than n_trials. A trial beats
    (pipeline.study.beat) while it trains. SIGTERM or SIGINT end the running trial FAIL, its run
    KILLED, and the process with 128 + the signal's number, quietly. The process dies with its
    worker (die_with_worker).
    worker: the worker process (host:pid) that started this one; deadline: time.time() after which
    it starts no more trials (tune's timeout); inherited: the worker's environment and output."""
    inherited.adopt()
    die_with_worker()
    stop_on_signals()
    os.environ.pop("MLFLOW_RUN_ID", None)  # `mlflow run`'s run is the parent, not this trial's run
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # print_trial reports the trial instead
    # Ask-and-tell is how the lock can cover asking; the trial beats all the same (study.beat).
    warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used", UserWarning)
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOPS)  # a stop sent meanwhile arrives now, as Stopped
        study = open_study(job.cfg, job.study_name, worker=index, pruner=job.pruner)
        for _ in range(job.trials_per_process):
            if deadline is not None and time.time() > deadline:
                return
            with locked(job.cfg.storage):
                fail_dead_trials(study)
                if counted(study) >= job.cfg.n_trials:
                    return
                seed_sampler(study, job.cfg, index)  # as a process of its own per trial would draw
                trial = study.ask()
                claim_trial(trial, worker, job.cfg)
            print_trial(study, _run(trial, Objective(job, worker), job.cfg.heartbeat_interval))
    except Stopped as e:
        sys.exit(128 + getattr(signal.Signals, e.signame).value)


def _run(trial: optuna.Trial, objective, interval: int) -> optuna.trial.FrozenTrial:
    """Run the objective, beating, and tell Optuna how it ended: COMPLETE, PRUNED, or FAIL (and
    raise: a stop, or an error whose traceback the worker's output shows)."""
    try:
        with beating(beat(trial), interval):
            value = objective(trial)
    except optuna.TrialPruned:
        return trial.study.tell(trial, state=TrialState.PRUNED)
    except BaseException:
        print_trial(trial.study, trial.study.tell(trial, state=TrialState.FAIL))
        raise
    return trial.study.tell(trial, value)


class Objective:
    """Train the trial's config in a child run of the tune run; return its best_val_accuracy."""

    def __init__(self, job: Job, worker: str):
        self.job, self.worker = job, worker
        self.base = job.cfg.to(TrainConfig, data=job.data_uri, experiment=job.experiment)

    def __call__(self, trial: optuna.Trial) -> float:
        """The trial's best_val_accuracy; raises TrialPruned when pruned. Its run ends FINISHED
        (optuna_state COMPLETE), KILLED (PRUNED, or stopped by a signal: FAIL), or FAILED (FAIL)."""
        from pipeline.train import train

        point = suggest(trial, self.base, self.job.cfg.weights)
        run_id, report = self._start_run(trial), ReportEpochs(trial)
        try:
            result = train(point, callbacks=[report], log_model=self.job.cfg.log_models == "all", run_id=run_id)
        except optuna.TrialPruned:
            end_run(run_id, "PRUNED", "KILLED", pruned_at_epoch=str(max(report.reported, default=0)))
            raise
        except KeyboardInterrupt as e:  # train's step_run ended it KILLED, unless the stop came before it began
            end_run(run_id, "FAIL", "KILLED", **{REASON: str(e)})
            raise
        except BaseException:
            end_run(run_id, "FAIL", "FAILED")
            raise
        finally:
            record_memory(trial, run_id)
        trial.set_user_attr("model_uri", result.model_uri)
        end_run(run_id, "COMPLETE")
        return result.best_val_accuracy

    def _start_run(self, trial: optuna.Trial) -> str:
        """The trial's run, made before train logs into it, so that it names its trial, process and
        parent from its first moment and the trial links to it (user attr mlflow_run_id, which
        optuna-dashboard shows) however the trial ends: complete, pruned or failed."""
        tags = {"optuna_study": self.job.study_name, "optuna_trial": str(trial.number), "optuna_state": "RUNNING",
                "optuna_process": worker_id(), "optuna_worker": self.worker,
                "mlflow.parentRunId": self.job.parent_run_id, **owner_tags()}
        if "grid_point" in trial.user_attrs:
            tags["grid_point"] = str(trial.user_attrs["grid_point"])
        experiment = mlflow.get_experiment_by_name(self.job.experiment).experiment_id
        run = mlflow.MlflowClient().create_run(experiment, tags=tags, run_name=f"trial-{trial.number}")
        trial.set_user_attr("mlflow_run_id", run.info.run_id)
        return run.info.run_id


class ReportEpochs(keras.callbacks.Callback):
    """Reports each epoch's val_accuracy to the trial, at the epoch's number from 1 (as the run's
    metric steps), and raises TrialPruned when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        super().__init__()
        self.trial, self.reported = trial, []

    def on_epoch_end(self, epoch, logs=None):
        self.trial.report(float(logs["val_accuracy"]), epoch + 1)
        self.reported.append(epoch + 1)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch + 1}")


def end_run(run_id: str, state: str, status: str | None = None, **tags) -> None:
    """Tag a trial's run with its Optuna state and set its status if train did not: a pruned
    trial was stopped on purpose, before the end: KILLED, not FAILED."""
    client = mlflow.MlflowClient()
    for key, value in {"optuna_state": state, **tags}.items():
        client.set_tag(run_id, key, value)
    if status:
        client.set_terminated(run_id, status)


def record_memory(trial: optuna.Trial, run_id: str) -> None:
    """The process's memory after the trial, as trial user attrs and run metrics: rss_mb (resident
    now, the Keras session cleared) and peak_rss_mb (its high-water mark: the peak of this trial
    and of the trials its process ran before)."""
    keras.backend.clear_session(free_memory=True)
    memory = rss_mb()
    for key, value in memory.items():
        trial.set_user_attr(key, value)
        mlflow.MlflowClient().log_metric(run_id, key, value)


def rss_mb() -> dict[str, float]:
    """{"rss_mb": ..., "peak_rss_mb": ...} of this process from /proc/self/status; {} elsewhere."""
    status = Path("/proc/self/status")
    if not status.exists():
        return {}
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "peak_rss_mb": int(fields["VmHWM"].split()[0]) / 1024}
