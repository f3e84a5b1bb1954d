"""Who owns a run, whether that owner still lives, and how a run is claimed: one module for all of it.

Every MLflow run a command starts (pipeline.tracking.step_run) is tagged with its owner:
`pipeline.owner` (host:pid, for people) and `pipeline.owner_key`
(host|pid namespace|boot id|pid|process start time), and carries `pipeline.heartbeat` (unix
seconds, rewritten every HEARTBEAT_S by a thread of the owner) and `pipeline.grace` (seconds
after the last heartbeat at which another machine may declare the owner dead).

An owner is dead when
- it is of this host (same hostname and pid namespace): its pid is gone, a zombie, or another
  process now (start time differs), or the host has rebooted since (boot id differs): known at once;
- it is of another host: its heartbeat is older than its grace period.

The next command on a store (`reap`) marks the RUNNING runs of dead owners FAILED, with the reason
in the tag `pipeline.end_reason`. SIGTERM and SIGINT raise `Stopped` in the main thread (during
Keras' fit, at its next batch: stops_deferred), so the runs open in it end KILLED
(tracking.step_run), leaving the state a rerun resumes.

Claims (`take`): a run that ended without finishing is taken over by logging the param
`pipeline.taken.<its end time>` = owner key. MLflow refuses to change a param, so among
processes racing for the same ended run exactly one succeeds, on any store.
"""

import os
import signal
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException

OWNER, OWNER_KEY, HEARTBEAT, GRACE, REASON = (
    "pipeline.owner", "pipeline.owner_key", "pipeline.heartbeat", "pipeline.grace", "pipeline.end_reason")
HEARTBEAT_S = 30  # how often an owner rewrites its runs' heartbeat
GRACE_S = 120  # how long another machine waits past the last heartbeat before declaring the owner dead


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGINT: the command stops; its open runs end KILLED and it can be run again."""

    def __init__(self, signame: str):
        super().__init__(f"stopped by {signame}")
        self.signame = signame


def stop_on_signals() -> None:
    """SIGTERM and SIGINT raise Stopped in the main thread (a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        return

    def stop(signum, frame):
        # Once: a second signal must not cut the clean-up short. A handler that does nothing rather
        # than SIG_IGN: one already received (Ctrl-C's SIGINT and the worker's SIGTERM come together)
        # would otherwise print "OSError: Signal 15 ignored due to race condition".
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        _stop.signame = signal.Signals(signum).name
        if not _stop.deferred:
            raise Stopped(_stop.signame)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


class _Stop:
    signame: str | None = None  # the stop signal received
    deferred = 0  # inside stops_deferred


_stop = _Stop()


@contextmanager
def stops_deferred():
    """A stop received inside raises Stopped at the next check_stop (or as the block ends), not
    wherever the signal lands: TensorFlow's context managers, entered or left half-way, raise
    their own error instead ("Exiting device scope without proper scope nesting")."""
    _stop.deferred += 1
    try:
        yield
    finally:
        _stop.deferred -= 1
    check_stop()


def check_stop() -> None:
    """Raise Stopped if a stop signal was received."""
    if _stop.signame:
        raise Stopped(_stop.signame)


def owner_key(pid: int | None = None) -> str:
    """This process (or pid, of this host) as host|pid namespace|boot id|pid|start time."""
    pid = pid or os.getpid()
    return "|".join((socket.gethostname(), _pid_namespace(), _boot_id(), str(pid), _start_time(pid)))


def owner_tags(grace: int = GRACE_S) -> dict[str, str]:
    return {OWNER: f"{socket.gethostname()}:{os.getpid()}", OWNER_KEY: owner_key(), HEARTBEAT: str(int(time.time())),
            GRACE: str(grace)}


def is_dead(key: str, heartbeat: str | float | None = None, grace: str | float | None = None) -> bool:
    """Whether the owner `key` (owner_key()) is gone: checked directly on this host, by the age of
    its heartbeat elsewhere. An owner of another host without a heartbeat is never declared dead."""
    parts = key.split("|")
    if len(parts) == 5 and parts[:2] == [socket.gethostname(), _pid_namespace()]:
        host, _, boot, pid, start = parts
        if boot != _boot_id() or not pid.isdigit():
            return True
        now = _start_time(int(pid))
        return not now or now != start
    if heartbeat in (None, "") or grace in (None, ""):
        return False
    return time.time() - float(heartbeat) > float(grace)


def run_is_dead(run) -> bool:
    tags = run.data.tags
    return OWNER_KEY in tags and is_dead(tags[OWNER_KEY], tags.get(HEARTBEAT), tags.get(GRACE))


def why_dead(tags: dict) -> str:
    key = tags.get(OWNER_KEY, "")
    if key.split("|")[:2] == [socket.gethostname(), _pid_namespace()]:
        return f"its process {tags.get(OWNER, key)} is gone"
    return f"no heartbeat from {tags.get(OWNER, key)} for over {tags.get(GRACE)} s"


def reap(experiment_ids: list[str] | None = None) -> list[str]:
    """Mark FAILED every RUNNING run (of these experiments, default all) whose owner is dead, with
    the reason as tag pipeline.end_reason (and optuna_state FAIL on a trial's run); their ids."""
    client = mlflow.MlflowClient()
    if experiment_ids is None:
        experiment_ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
    reaped = []
    for run in _search_all(client, experiment_ids, "attributes.status = 'RUNNING'"):
        if run_is_dead(run):
            end(run.info.run_id, "FAILED", f"{why_dead(run.data.tags)}: marked FAILED by {socket.gethostname()}:"
                                           f"{os.getpid()}", optuna_state=run.data.tags.get("optuna_state"))
            reaped.append(run.info.run_id)
            print(f"run {run.info.run_id} was left RUNNING by a process that is gone: marked FAILED")
    return reaped


def end(run_id: str, status: str, reason: str, optuna_state: str | None = None) -> None:
    """End a run with status and why (tag pipeline.end_reason); a trial's run also gets optuna_state FAIL.

    Several processes may end the same dead run at once (reap, a dead trial's on_dead_trial): on
    PostgreSQL their first inserts of a tag collide (UniqueViolation). The loser returns if the run
    has ended meanwhile, else ends it again, when the tags exist and are updated."""
    client = mlflow.MlflowClient()

    def once():
        client.set_tag(run_id, REASON, reason[:5000])
        if optuna_state == "RUNNING":
            client.set_tag(run_id, "optuna_state", "FAIL")
        client.set_terminated(run_id, status)

    try:
        once()
    except MlflowException:
        if client.get_run(run_id).info.status != "RUNNING":
            return
        once()


def take(run, owner: str | None = None) -> bool:
    """Claim a run that ended without finishing (FAILED or KILLED) for owner (this process): True
    for exactly one of the processes that try at once (the param pipeline.taken.<end time> can be
    logged only once; again by the same owner, it is the same value)."""
    try:
        mlflow.MlflowClient().log_param(run.info.run_id, f"pipeline.taken.{run.info.end_time}", owner or owner_key())
        return True
    except MlflowException:
        return False


def _search_all(client, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while experiment_ids:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token)
        runs += page
        token = page.token
        if not token:
            break
    return runs


@contextmanager
def heartbeat(run_id: str, interval: float = HEARTBEAT_S):
    """Rewrite the run's heartbeat tag every interval seconds while inside."""
    with beating(lambda: mlflow.MlflowClient().set_tag(run_id, HEARTBEAT, str(int(time.time()))), interval):
        yield


@contextmanager
def beating(beat, interval: float):
    """Call beat() every interval seconds from a daemon thread while inside. A failing beat (a
    busy or unreachable store) is skipped: the next one tries again, and the grace period
    covers a few misses."""
    stop = threading.Event()

    def loop():
        while not stop.wait(interval):
            try:
                beat()
            except Exception:
                pass

    thread = threading.Thread(target=loop, name="heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()[:8]
    except OSError:
        return "-"


def _pid_namespace() -> str:
    """Containers sharing a hostname but not their processes must not judge each other's pids."""
    try:
        return os.readlink("/proc/self/ns/pid").removeprefix("pid:")
    except OSError:
        return "-"


def _start_time(pid: int) -> str:
    """The process's start time (clock ticks since boot), "" if it is gone or a zombie; elsewhere
    than Linux "-" for a live pid (pid reuse goes unnoticed there)."""
    if Path("/proc/self/stat").exists():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return ""
        return "" if fields[0] in ("Z", "X") else fields[19]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return ""
    except PermissionError:
        pass
    return "-"
