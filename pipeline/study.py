"""The Optuna side of tune: storage, search space, the grid's points first, dead trials, counting.

A trial records the process that runs it (user attr `process`, host:pid), so that a later run
on the same host can tell a trial whose process died (kill -9, power loss) from one that
another worker is still running, and mark only the dead one FAIL.
"""

import ctypes
import hashlib
import json
import os
import signal
import socket
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import optuna
from optuna.trial import TrialState

from pipeline.config import URI_SCHEME, PipelineError, TrainConfig, TuneConfig
from pipeline.grid import GRID

# The search space beyond the grid. fine_tune is searched only with pretrained weights: a
# random backbone's features are noise, and unfreezing some of its layers is training from
# scratch at full cost.
UNITS = (4, 512)  # log scale
HIDDEN_LAYERS = (1, 3)
LEARNING_RATE = (1e-6, 1e-2)  # log scale
DROPOUT = (0.0, 0.7)
BATCH_SIZES = (8, 16, 32, 64)
POOLINGS = ("flatten", "avg")
FINE_TUNES = ("none", "10", "32", "all")  # ResNet50's top block is 10 layers, its conv5 stage 32
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
# Settings that say how the study runs or where results go, not what a trial does.
RUN_ONLY = ("experiment", "registered_model", "data_dir", "cache_dir", "n_trials", "timeout", "workers", "storage",
            "study_name")


@dataclass(frozen=True)
class Job:
    """What a worker, and each trial's process, needs: picklable, for spawned processes."""
    cfg: TuneConfig
    study_name: str
    data_uri: str  # the parent run's prepared data
    parent_run_id: str
    experiment: str  # the parent run's experiment, where the trials' runs go
    pruner: optuna.pruners.BasePruner | None = None  # instead of cfg.pruner's


def default_study_name(cfg: TuneConfig, dataset: str) -> str:
    """cfg.study_name, else <dataset>-<digest of every setting that changes what trials do>: the
    same command names the same study, so it resumes; another epochs or seed starts another."""
    if cfg.study_name:
        return cfg.study_name
    settings = {k: v for k, v in asdict(cfg).items() if k not in RUN_ONLY}
    return f"{dataset}-{hashlib.sha256(json.dumps([dataset, settings], sort_keys=True).encode()).hexdigest()[:12]}"


def open_storage(storage: str):
    """An Optuna storage: a *.journal path is a JournalStorage (file-locked: several processes on
    one machine); a URL (sqlite:///, postgresql://, mysql://) is used as it is; any other path is
    a sqlite file."""
    try:
        if storage.endswith(".journal") and not URI_SCHEME.match(storage):
            backend = optuna.storages.journal.JournalFileBackend(str(Path(storage).resolve()))
            return optuna.storages.JournalStorage(backend)
        url = storage if URI_SCHEME.match(storage) else f"sqlite:///{Path(storage).resolve()}"
        # A waiting writer retries for 60 s instead of failing at once when another worker holds the lock.
        kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as e:
        raise PipelineError(f"cannot open the Optuna storage {storage!r} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): pass a sqlite file such as optuna.db, "
                            "a *.journal file, or a database URL such as postgresql://host/db") from None


def open_study(cfg: TuneConfig, name: str, worker: int = 0, pruner: optuna.pruners.BasePruner | None = None
               ) -> optuna.Study:
    """Create or load the study `name` in cfg.storage: maximise validation accuracy with TPE (the
    grid's points are its start-up trials; constant liar keeps parallel workers apart) and pruner,
    by default cfg.pruner's.

    The sampler's seed follows cfg.seed, the worker and the trials so far: a fresh study is
    reproducible, while a resumed one or a second worker does not repeat the first one's draws.
    """
    study = optuna.create_study(storage=open_storage(cfg.storage), study_name=name, direction="maximize",
                                pruner=pruner or make_pruner(cfg), load_if_exists=True)
    seed = int(hashlib.sha256(f"{cfg.seed}/{worker}/{len(study.trials)}".encode()).hexdigest()[:8], 16)
    study.sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=len(GRID), constant_liar=True)
    return study


def make_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    """median: stop a trial whose val_accuracy at an epoch is below the median of earlier trials
    at that epoch (after 5 trials); hyperband: successive halving over 1..epochs; none."""
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs)
    return optuna.pruners.NopPruner()


def suggest(trial: optuna.Trial, base: TrainConfig, weights: str) -> TrainConfig:
    """base with the trial's head, learning rate, batch size, pooling and (pretrained) fine_tune."""
    values = {
        "units": trial.suggest_int("units", *UNITS, log=True),
        "hidden_layers": trial.suggest_int("hidden_layers", *HIDDEN_LAYERS),
        "learning_rate": trial.suggest_float("learning_rate", *LEARNING_RATE, log=True),
        "dropout": trial.suggest_float("dropout", *DROPOUT),
        "batch_size": trial.suggest_categorical("batch_size", batch_sizes(base.batch_size)),
        "pooling": trial.suggest_categorical("pooling", POOLINGS),
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


def enqueue_grid(study: optuna.Study, cfg: TuneConfig) -> int:
    """Queue each grid point (user attr grid_point 1..7) not yet waiting, running or finished; a
    point whose trial failed is queued again. Returns how many were queued."""
    alive = (TrialState.WAITING, TrialState.RUNNING, *FINISHED)
    present = {t.user_attrs.get("grid_point") for t in study.get_trials(deepcopy=False, states=alive)}
    queued = 0
    for number, params in enumerate(grid_params(cfg), start=1):
        if number not in present:
            study.enqueue_trial(params, user_attrs={"grid_point": number})
            queued += 1
    return queued


def worker_id() -> str:
    """This process, as trials and runs record it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def die_with_parent() -> None:
    """Linux: be killed with the worker that started this process, even by kill -9, so that no
    orphan goes on with a trial that the next run should mark FAIL and run again."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def is_dead(process: str) -> bool:
    """Whether a process recorded by worker_id() is one of this host that no longer runs. A
    process of another host is never declared dead from here."""
    host, _, pid = process.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if Path("/proc/self").exists():  # Linux: a killed process not yet reaped (a zombie) is dead too
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
        except OSError:
            return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    return False


def fail_dead_trials(study: optuna.Study) -> list[int]:
    """Mark FAIL the RUNNING trials whose process (user attr `process`, host:pid) died; their numbers."""
    dead = [t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if is_dead(t.user_attrs.get("process", ""))]
    for number in dead:
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        print(f"trial {number}: its process is gone, marked FAIL")
    return dead


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
