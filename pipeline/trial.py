"""Trial processes of tune's workers: each asks the study for trials and runs them
(pipeline.objective trains them), beating, and tells Optuna how each ended.

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

import optuna
from optuna.trial import TrialState

from pipeline.liveness import Stopped, beating, stop_on_signals
from pipeline.study import (Job, beat, claim_trial, counted, fail_dead_trials, locked, open_study, print_trial,
                            seed_sampler)

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
    from pipeline.objective import Objective  # TensorFlow loads here, not in the worker that starts this

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
