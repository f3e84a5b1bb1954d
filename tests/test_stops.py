"""Stops: SIGTERM and SIGINT end a command's runs KILLED with one line and no traceback; after
SIGKILL the next command marks the runs of the dead process FAILED, with the reason; nothing
takes over a live run."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from conftest import left_in, make_dataset, tiny_args

from pipeline import liveness
from pipeline.config import PrepareConfig
from pipeline.prepare import prepare
from pipeline.tracking import claim

ROOT = Path(__file__).resolve().parent.parent


def dead_owner_key() -> str:
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    key = liveness.owner_key(gone.pid)
    gone.kill()
    gone.wait()
    return key


def test_owners_are_judged_by_pid_here_and_by_heartbeat_elsewhere():
    assert not liveness.is_dead(liveness.owner_key())
    assert liveness.is_dead(dead_owner_key())
    other = "elsewhere|ns|boot|1|1"
    assert not liveness.is_dead(other) and not liveness.is_dead(other, time.time() - 50, 60)
    assert liveness.is_dead(other, time.time() - 61, 60)


def test_reap_fails_runs_of_dead_owners_only_with_the_reason():
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("reap-only-dead")
    stale = {**liveness.owner_tags(), liveness.OWNER_KEY: "elsewhere|ns|boot|7|1", liveness.OWNER: "elsewhere:7",
             liveness.HEARTBEAT: str(int(time.time()) - 600)}
    runs = {name: client.create_run(experiment, tags=tags).info.run_id for name, tags in {
        "alive": liveness.owner_tags(), "gone": {**liveness.owner_tags(), liveness.OWNER_KEY: dead_owner_key()},
        "silent": stale, "unknown": {}}.items()}
    assert sorted(liveness.reap([experiment])) == sorted([runs["gone"], runs["silent"]])
    status = {name: client.get_run(run_id) for name, run_id in runs.items()}
    assert {n: r.info.status for n, r in status.items()} == {"alive": "RUNNING", "gone": "FAILED",
                                                             "silent": "FAILED", "unknown": "RUNNING"}
    assert status["gone"].data.tags[liveness.REASON].startswith("its process ")
    assert status["silent"].data.tags[liveness.REASON].startswith("no heartbeat from elsewhere:7 for over 120 s")


def test_two_processes_ending_one_dead_run_at_once_is_no_error(monkeypatch):
    """On PostgreSQL two processes' first inserts of the end reason collide (UniqueViolation): the
    loser leaves a run the other has ended, or ends it again; a store that keeps failing is raised."""
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    experiment = client.create_experiment("reap-at-once")
    dead = {**liveness.owner_tags(), liveness.OWNER_KEY: dead_owner_key()}
    real_set_tag = mlflow.MlflowClient.set_tag

    def collide(other_finishes: bool):
        first = []

        def set_tag(self, run_id, key, value, *args, **kwargs):
            if key == liveness.REASON and not first:  # the other process inserted it a moment before
                first.append(key)
                real_set_tag(self, run_id, key, "marked FAILED by the other process")
                if other_finishes:
                    real_set_terminated(run_id, "FAILED")
                raise MlflowException('duplicate key value violates unique constraint "tag_pk"')
            return real_set_tag(self, run_id, key, value, *args, **kwargs)
        return set_tag

    real_set_terminated = client.set_terminated
    for other_finishes in (True, False):
        run_id = client.create_run(experiment, tags=dead).info.run_id
        monkeypatch.setattr(mlflow.MlflowClient, "set_tag", collide(other_finishes))
        assert liveness.reap([experiment]) == [run_id]
        assert client.get_run(run_id).info.status == "FAILED"
    run_id = client.create_run(experiment, tags=dead).info.run_id

    def down(self, *args, **kwargs):
        raise MlflowException("store is down")

    monkeypatch.setattr(mlflow.MlflowClient, "set_tag", down)
    with pytest.raises(MlflowException, match="store is down"):
        liveness.reap([experiment])
    assert client.get_run(run_id).info.status == "RUNNING"


def test_a_live_parent_is_never_taken_and_an_ended_one_by_one_command_only():
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("claims")
    tags = {"step": "tune", "optuna_study": "claims"}
    live = client.create_run(experiment, tags={**tags, **liveness.owner_tags()})
    assert claim("claims", tags, "tune", exclusive=False) is None  # a new parent, not the live one
    client.set_terminated(live.info.run_id, "KILLED")
    ended = client.get_run(live.info.run_id)
    assert liveness.take(ended) and not liveness.take(ended, owner="elsewhere|ns|boot|7|1")  # a racing command loses
    time.sleep(0.01)
    client.set_terminated(live.info.run_id, "KILLED")  # it ended again: free to take once more
    assert claim("claims", tags, "tune", exclusive=False) == live.info.run_id


def test_a_stop_during_fit_ends_it_after_the_batch_it_came_in():
    """Not wherever the signal lands: inside TensorFlow's context managers it became their own
    RuntimeError (a traceback, the run FAILED instead of KILLED). In a process of its own, which
    sends SIGTERM to itself: a test worker that did so died with it when its handler was not ours."""
    out = subprocess.run([sys.executable, "-c", SIGTERM_DURING_BATCH_2], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and out.stdout.split() == ["Stopped", "stopped", "by", "SIGTERM", "2"], out.stderr[-2000:]


SIGTERM_DURING_BATCH_2 = """
import os, signal
import keras, numpy as np
from pipeline import liveness
from pipeline.train import StopWhenSignalled

class TermDuringBatch2(keras.callbacks.Callback):
    def on_train_batch_begin(self, batch, logs=None):
        if batch == 1:
            os.kill(os.getpid(), signal.SIGTERM)

model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse")
liveness.stop_on_signals()
try:
    with liveness.stops_deferred():
        model.fit(np.zeros((16, 3)), np.zeros((16, 2)), batch_size=4, verbose=0,
                  callbacks=[TermDuringBatch2(), StopWhenSignalled()])
except liveness.Stopped as e:
    print(type(e).__name__, e, int(model.optimizer.iterations))  # batch 2 ran to its end
"""


def start(args: list[str], log: Path) -> subprocess.Popen:
    """The command in a session of its own, whose id is its pid: its processes can be found after it died."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=out, stderr=out, env=env,
                                start_new_session=True)


def wait_for_training(process: subprocess.Popen, experiment: str, log: Path, seconds: float = 240) -> None:
    """Until a train run of the experiment has logged an epoch."""
    deadline = time.time() + seconds
    while time.time() < deadline and process.poll() is None:
        runs = mlflow.search_runs(experiment_names=[experiment], filter_string="tags.step = 'train'")
        if len(runs) and "metrics.val_accuracy" in runs and runs["metrics.val_accuracy"].notna().any():
            return
        time.sleep(0.5)
    raise AssertionError(f"no training started: {log.read_text()[-3000:]}")


# tune's stops (a worker, its forkserver and a trial process: SIGINT reaches all of them at once,
# SIGTERM only the command, which passes it on; SIGKILL: test_tune's test_tune_resumes_after_kill_9).
# main and grid are one process each, where SIGINT and SIGTERM take the same path: one of the two
# each, and SIGKILL, which the next command repairs.
@pytest.mark.slow
@pytest.mark.parametrize("command, sig", [("main", signal.SIGTERM), ("main", signal.SIGKILL),
                                          ("grid", signal.SIGINT), ("grid", signal.SIGKILL),
                                          ("tune", signal.SIGTERM), ("tune", signal.SIGINT)])
def test_a_stopped_command_leaves_no_running_run_of_a_dead_process(tmp_path, command, sig):
    experiment = f"stops-{command}-{sig.name.lower()}"
    root = make_dataset(tmp_path / "stopshapes", n=8)
    tune = {"storage": tmp_path / "optuna.db", "n_trials": 3} if command == "tune" else {}
    # 30 epochs: still training when stopped
    args = tiny_args(command, dataset=root, experiment=experiment, epochs=30, patience=30, **tune)
    log = tmp_path / "stopped.log"
    process = start(args, log)
    wait_for_training(process, experiment, log)
    if sig == signal.SIGINT:  # Ctrl-C: the terminal signals every process of the command's group
        os.killpg(process.pid, sig)
    else:
        process.send_signal(sig)
    process.wait(timeout=120)
    # Nothing of the command stays: tune's trial process dies with its worker (its parent is the
    # worker's forkserver), then the forkserver and multiprocessing's resource tracker end.
    stray = left_in(process.pid)
    assert not stray, stray
    runs = mlflow.search_runs(experiment_names=[experiment])
    output = log.read_text()
    assert "Traceback" not in output and "OSError" not in output, output[-3000:]
    if sig != signal.SIGKILL:
        assert process.returncode == 128 + sig, output[-3000:]
        errors = [line for line in output.splitlines() if line.startswith("Error: ")]
        assert errors == [f"Error: stopped by {sig.name}: its runs are marked KILLED; "
                          "run the same command again to continue"]
        running = runs[runs["status"] == "RUNNING"]
        assert running.empty, (running.filter(regex="run_id|tags.mlflow.runName|tags.optuna|tags.step").to_dict("records"),
                               output[-3000:])
        if command != "tune":  # a stopped trial's run ends FAILED (its Optuna trial FAIL), the rest KILLED
            assert set(runs["status"]) <= {"KILLED", "FINISHED"} and (runs["status"] == "KILLED").sum() >= 2
        killed = runs[runs["status"] == "KILLED"]
        # tune passes the stop on to its running trial as SIGTERM
        reasons = {f"stopped by {sig.name}"} | ({"stopped by SIGTERM"} if command == "tune" else set())
        assert len(killed) and killed[f"tags.{liveness.REASON}"].isin(reasons).all()
        return

    left = runs[runs["status"] == "RUNNING"]
    assert len(left)  # what the next command must repair
    prepare(PrepareConfig(dataset=str(root), experiment=experiment))  # the next command, as the CLI calls it
    after = mlflow.search_runs(experiment_names=[experiment])
    assert not (after["status"] == "RUNNING").any()
    reaped = after[after["run_id"].isin(left["run_id"])]
    assert (reaped["status"] == "FAILED").all()
    assert reaped[f"tags.{liveness.REASON}"].str.startswith(f"its process {socket.gethostname()}:{process.pid}").all()
    assert reaped[f"tags.{liveness.REASON}"].str.contains(" is gone").all()


@pytest.mark.parametrize("error, raised", [
    ("(psycopg.errors.UniqueViolation) duplicate key value violates unique constraint \"experiment_tag_pk\"", False),
    ("(sqlite3.OperationalError) attempt to write a readonly database", True)])
def test_a_classic_view_tag_set_at_the_same_moment_by_another_command_is_not_an_error(monkeypatch, error, raised):
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import _classic_view

    experiment = mlflow.create_experiment(f"classic-view-race-{raised}")

    def another_command_was_first(self, experiment_id, key, value):
        raise MlflowException(f"BAD_REQUEST: {error}")

    monkeypatch.setattr(mlflow.MlflowClient, "set_experiment_tag", another_command_was_first)
    if raised:
        with pytest.raises(MlflowException, match="readonly"):
            _classic_view(experiment)
    else:
        _classic_view(experiment)
