"""The Optuna side of tune: storage and its lock, search space, the grid's points first, dead
trials, counting.

A trial records the process that runs it (user attrs `process`, host:pid, and `owner_key`, see
pipeline.liveness) and beats: Optuna's own heartbeat on an RDB storage (heartbeat_interval,
grace_period), a `heartbeat` user attr on a journal. A trial whose process died is failed
(at once on its host, after the grace period anywhere), its MLflow run ended FAILED with the
reason, and it is retried (RetryHeartbeatStaleTrialCallback) unless it is a grid point already
queued again. Everything that must happen once (tables, the study, the grid's queue, asking
for a trial, failing a dead one) happens under the storage's lock (`locked`). The study names its
metric and links to MLflow (link_to_mlflow) so that optuna-dashboard reads it by itself.
"""

import ctypes
import fcntl
import hashlib
import json
import os
import re
import signal
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlflow
import optuna
import sqlalchemy
from optuna.trial import TrialState

from pipeline import liveness

from pipeline.config import URI_SCHEME, PipelineError, TrainConfig, TuneConfig
from pipeline.grid import GRID

# The search space beyond the grid. fine_tune is searched only with pretrained weights: a
# random backbone's features are noise, and unfreezing some of its layers is training from
# scratch at full cost.
# Units per pooling, log scale. A flatten head's first kernel is 100,352 x units at 224 px: at 128
# units it is 51 MB, half of ResNet50, and a whole model to log stays under 150 MB; wider heads
# on a few thousand images only memorise. An avg head's kernel is 2,048 x units.
UNITS = {"flatten": (4, 128), "avg": (4, 512)}
HIDDEN_LAYERS = (1, 3)
LEARNING_RATE = (1e-6, 1e-2)  # log scale
DROPOUT = (0.0, 0.7)
BATCH_SIZES = (8, 16, 32, 64)
POOLINGS = ("flatten", "avg")
FINE_TUNES = ("none", "10", "32", "all")  # ResNet50's top block is 10 layers, its conv5 stage 32
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Settings that say how the study runs or where results go, not what a trial does.
RUN_ONLY = ("experiment", "registered_model", "data_dir", "cache_dir", "n_trials", "timeout", "workers", "storage",
            "study_name", "heartbeat_interval", "grace_period")
LOCK_KEY, LOCK_NAME = 0x5E5A_0050, "resnet50-pipeline"  # the storage lock's key (PostgreSQL) and name (MySQL)
MAX_RETRY = 2  # a trial whose process dies is run again at most this often
# Optuna 4.9 renamed RetryFailedTrialCallback; both retry a dead trial as a WAITING copy.
RETRY = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback


TRIALS_PER_PROCESS = 10  # then a fresh process: memory grows ~30 MB a trial; a fresh one starts in ~0.6 s (Linux)


@dataclass(frozen=True)
class Job:
    """What a worker, and each trial's process, needs: picklable, for the processes it goes to."""
    cfg: TuneConfig
    study_name: str
    data_uri: str  # the parent run's prepared data
    parent_run_id: str
    experiment: str  # the parent run's experiment, where the trials' runs go
    pruner: optuna.pruners.BasePruner | None = None  # instead of cfg.pruner's
    trials_per_process: int = TRIALS_PER_PROCESS


def default_study_name(cfg: TuneConfig, dataset: str) -> str:
    """cfg.study_name, else <dataset>-<digest of every setting that changes what trials do>: the
    same command names the same study, so it resumes; another epochs or seed starts another."""
    if cfg.study_name:
        return cfg.study_name
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    return f"{dataset}-{hashlib.sha256(json.dumps([dataset, settings], sort_keys=True).encode()).hexdigest()[:12]}"


@contextmanager
def locked(storage: str):
    """The storage's own lock, held by one process at a time on every machine that reaches it: a
    PostgreSQL advisory lock, a MySQL named lock, or a lock file beside a sqlite or journal file
    (<file>.pipeline-lock: <file>.lock is the journal's own, which Optuna waits for, then deletes).
    Held while tables and the study are created, while the grid's points are taken over or
    queued, while a trial is asked for, and while dead trials are failed: so each happens once
    however many commands start."""
    url = _url(storage)
    if url is None or url.startswith("sqlite"):
        path = Path(storage) if url is None else Path(sqlalchemy.engine.make_url(url).database or "memory")
        with open(f"{path.resolve()}.pipeline-lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield
        return
    statements = {"postgresql": ("SELECT pg_advisory_lock(:key)", "SELECT pg_advisory_unlock(:key)"),
                  "mysql": ("SELECT GET_LOCK(:name, 31536000)", "SELECT RELEASE_LOCK(:name)")}
    dialect = sqlalchemy.engine.make_url(url).get_backend_name()
    if dialect not in statements:
        yield
        return
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    values = {"key": LOCK_KEY, "name": LOCK_NAME}
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(statements[dialect][0]), values)
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text(statements[dialect][1]), values)
    finally:
        engine.dispose()


def _url(storage: str) -> str | None:
    """storage as a database URL; None for a journal file."""
    if storage.endswith(".journal") and not URI_SCHEME.match(storage):
        return None
    return storage if URI_SCHEME.match(storage) else f"sqlite:///{Path(storage).resolve()}"


def open_storage(storage: str, heartbeat_interval: int | None = None, grace_period: int | None = None):
    """An Optuna storage: a *.journal path is a JournalStorage (file-locked: several processes on
    one machine, or on a shared file system); a URL (sqlite:///, postgresql+psycopg://,
    mysql+pymysql://) an RDBStorage, with Optuna's trial heartbeat when heartbeat_interval is
    given; any other path a sqlite file. Opened under the storage's lock: several processes
    creating the tables of a fresh database at once would collide."""
    url = _url(storage)
    try:
        with locked(storage):
            if url is None:
                backend = optuna.storages.journal.JournalFileBackend(str(Path(storage).resolve()))
                return optuna.storages.JournalStorage(backend)
            # A waiting writer retries for 60 s instead of failing at once when another worker holds the lock.
            kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_interval,
                                                  grace_period=grace_period,
                                                  heartbeat_stale_trial_callback=on_dead_trial if heartbeat_interval
                                                  else None)
    except Exception as e:
        raise PipelineError(f"cannot open the Optuna storage {storage!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): {_storage_hint(storage)}") from None


def _storage_hint(storage: str) -> str:
    """A fix that works for this storage, not the URL that just failed."""
    if storage.startswith(("postgres", "mysql")):
        driver = "psycopg" if storage.startswith("postgres") else "pymysql"
        try:
            __import__(driver)
        except ImportError:
            extra = "postgres" if driver == "psycopg" else "mysql"
            return f"install the driver with pip install -e \".[{extra}]\" (or pip install {driver})"
        return ("check that the server runs and that host, port, user and database are right, e.g. "
                "postgresql+psycopg://optuna@dbhost:5432/optuna (password in ~/.pgpass or PGPASSWORD)")
    return ("pass a sqlite file such as optuna.db, a *.journal file, or a database URL such as "
            "postgresql+psycopg://user@host/db")


def open_study(cfg: TuneConfig, name: str, worker: int = 0, pruner: optuna.pruners.BasePruner | None = None
               ) -> optuna.Study:
    """Create or load the study `name` in cfg.storage: maximise validation accuracy (its metric
    named val_accuracy, as optuna-dashboard shows it) with TPE (the grid's points are its start-up
    trials; constant liar keeps parallel workers apart) and pruner, by default cfg.pruner's.

    Its sampler is seed_sampler's.
    """
    storage = open_storage(cfg.storage, cfg.heartbeat_interval, cfg.grace_period)
    with locked(cfg.storage):
        study = optuna.create_study(storage=storage, study_name=name, direction="maximize",
                                    pruner=pruner or make_pruner(cfg), load_if_exists=True)
        if study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(["val_accuracy"])
    seed_sampler(study, cfg, worker)
    return study


def seed_sampler(study: optuna.Study, cfg: TuneConfig, worker: int) -> None:
    """A new TPE sampler for the study's next trial, its seed from cfg.seed, the worker and the
    trials so far: a fresh study is reproducible, whichever of a process's trials this is, while a
    resumed one or a second worker does not repeat the first one's draws."""
    seed = int(hashlib.sha256(f"{cfg.seed}/{worker}/{len(study.trials)}".encode()).hexdigest()[:8], 16)
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(GRID), constant_liar=True)


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """median: stop a trial whose val_accuracy at an epoch is below the median of earlier trials
    at that epoch (after 5 trials); hyperband: successive halving over 1..epochs; none."""
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, base: TrainConfig, weights: str) -> TrainConfig:
    """base with the trial's head, learning rate, batch size, pooling and (pretrained) fine_tune.
    The space holds base's dropout, batch size and fine_tune: the grid points' values."""
    pooling = trial.suggest_categorical("pooling", POOLINGS)
    values = {
        "pooling": pooling,
        "units": trial.suggest_int("units", *UNITS[pooling], log=True),
        "hidden_layers": trial.suggest_int("hidden_layers", *HIDDEN_LAYERS),
        "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATE, log=True),
        "dropout": trial.suggest_float("dropout", DROPOUT[0], max(DROPOUT[1], base.dropout)),  # the configured one too
        "batch_size": trial.suggest_categorical("batch_size", batch_sizes(base.batch_size)),
    }
    if weights != "none":
        choices = tuple(dict.fromkeys((*FINE_TUNES, base.fine_tune)))  # the configured one too
        values["fine_tune"] = trial.suggest_categorical("fine_tune", choices)
    return replace(base, **values)


def batch_sizes(batch_size: int) -> tuple[int, ...]:
    """The batch sizes searched, with the configured one (the grid points') among them."""
    return tuple(sorted({*BATCH_SIZES, batch_size}))


def grid_params(cfg: TuneConfig) -> list[dict]:
    """The grid's seven points as trial parameters; the other parameters are cfg's."""
    rest = {"dropout": cfg.dropout, "batch_size": cfg.batch_size, "pooling": cfg.pooling}
    if cfg.weights != "none":
        rest["fine_tune"] = cfg.fine_tune
    return [{"units": units, "hidden_layers": layers, "learning_rate": lr, **rest} for layers, units, lr in GRID]


def queue_grid(study: optuna.Study, cfg: TuneConfig, finished: dict[int, optuna.trial.FrozenTrial] | None = None
               ) -> tuple[list[int], list[int]]:
    """Give each grid point (user attr grid_point 1..7) not yet waiting, running or finished a
    trial: finished[point], a grid's run of exactly that point taken over as a finished trial
    (pipeline.tune), else a queued one; a point whose trial failed is queued again. Call under
    the storage's lock, so that commands starting together take over or queue each point once.
    Returns the points taken over and the points queued."""
    present, finished = grid_points_present(study), finished or {}
    taken, queued = [], []
    for number, params in enumerate(grid_params(cfg), start=1):
        if number in present:
            continue
        if number in finished:
            study.add_trial(finished[number])
            taken.append(number)
        else:
            study.enqueue_trial(params, user_attrs={"grid_point": number})
            queued.append(number)
    return taken, queued


def grid_points_present(study: optuna.Study) -> set[int]:
    """Grid points with a trial waiting, running or finished."""
    alive = (TrialState.WAITING, TrialState.RUNNING, *FINISHED)
    return {t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False, states=alive)} - {None}


def link_to_mlflow(study: optuna.Study, run) -> None:
    """Study user attrs that lead from optuna-dashboard to MLflow: the tracking URI (password
    hidden), the experiment's id and name, and the tune parent runs that worked on the study
    (mlflow_parent_run_ids, one per command). Each trial has its run's id (mlflow_run_id)."""
    parents = study.user_attrs.get("mlflow_parent_run_ids", [])
    attrs = {"mlflow_tracking_uri": re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", mlflow.get_tracking_uri()),
             "mlflow_experiment_id": run.info.experiment_id,
             "mlflow_experiment_name": mlflow.get_experiment(run.info.experiment_id).name,
             "mlflow_parent_run_ids": [*parents, run.info.run_id] if run.info.run_id not in parents else parents}
    for key, value in attrs.items():
        study.set_user_attr(key, value)


def worker_id() -> str:
    """This process, as trials and runs record it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def die_with_parent() -> None:
    """Linux: be killed with the parent process (a spawned worker: with the tune command), even
    by kill -9, so that no orphan worker goes on starting trials. Trial processes, whose parent
    is a forkserver, use pipeline.trial.die_with_worker."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def claim_trial(trial: optuna.Trial, worker: str, cfg: TuneConfig) -> None:
    """Record who runs the trial, first thing after asking (under the lock): a retried trial
    inherits its dead predecessor's attrs, which must not make it look dead itself."""
    attrs = {"process": worker_id(), "worker": worker, "owner_key": liveness.owner_key(), "grace": cfg.grace_period}
    if _optuna_beats(trial.study):
        trial.study._storage.record_heartbeat(trial._trial_id)
    else:
        attrs["heartbeat"] = time.time()
    for key, value in attrs.items():
        trial.set_user_attr(key, value)


def _optuna_beats(study: optuna.Study) -> bool:
    storage = study._storage
    return isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval() is not None


def beat(trial: optuna.Trial):
    """The trial's heartbeat: Optuna's on an RDB storage, the `heartbeat` user attr elsewhere."""
    if _optuna_beats(trial.study):
        return lambda: trial.study._storage.record_heartbeat(trial._trial_id)
    return lambda: trial.set_user_attr("heartbeat", time.time())


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose process died: of this host at once (user attr owner_key), of
    any host once their heartbeat is older than the grace period (Optuna's on an RDB storage, the
    user attr on a journal). Each goes through on_dead_trial. Call under the storage's lock.
    Returns their numbers."""
    dead = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if _trial_is_dead(t)]
    for trial in dead:
        study.tell(trial.number, state=TrialState.FAIL, skip_if_finished=True)
        on_dead_trial(study, study.get_trials(deepcopy=False)[trial.number], "its process is gone")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        before = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))}
        optuna.storages.fail_stale_trials(study)  # RDB: calls on_dead_trial for each
        stale = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))} - before
    return sorted({t.number for t in dead} | stale)


def _trial_is_dead(trial: optuna.trial.FrozenTrial) -> bool:
    """Its process is of this host and gone, or (journal) its heartbeat attr is older than its grace."""
    attrs = trial.user_attrs
    return "owner_key" in attrs and liveness.is_dead(attrs["owner_key"], attrs.get("heartbeat"), attrs.get("grace"))


def on_dead_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str = "") -> None:
    """A trial failed because its process died: end its MLflow run FAILED, tagged with why, and
    queue it again (RetryHeartbeatStaleTrialCallback, at most MAX_RETRY times) unless it is a grid
    point queued again already."""
    why = why or f"no heartbeat from {trial.user_attrs.get('process', 'its process')} within the grace period"
    print(f"trial {trial.number}: {why}, marked FAIL", flush=True)
    query = (f"tags.optuna_study = '{study.study_name}' and tags.optuna_trial = '{trial.number}' "
             "and attributes.status = 'RUNNING'")
    for run in mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list"):
        liveness.end(run.info.run_id, "FAILED", f"trial {trial.number} failed: {why}", optuna_state="RUNNING")
    if trial.user_attrs.get("grid_point") not in grid_points_present(study):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            RETRY(max_retry=MAX_RETRY)(study, trial)


def counted(study: optuna.Study) -> int:
    """Trials that count towards n_trials: finished (complete or pruned) and running ones."""
    return len(study.get_trials(deepcopy=False, states=(*FINISHED, TrialState.RUNNING)))


def print_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """One line per finished trial: number, state, value (a pruned trial's: its last epoch's), params, memory."""
    value = "-" if trial.value is None else f"{trial.value:.4f}"
    if trial.state == TrialState.PRUNED and trial.last_step is not None:
        value += f" (pruned after epoch {trial.last_step})"
    params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
    rss = trial.user_attrs.get("rss_mb")
    print(f"trial {trial.number:3d} {trial.state.name:8s} value={value} params: {params}"
          + (f" rss_mb={rss:.0f}" if rss else ""), flush=True)
