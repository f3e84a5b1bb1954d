"""One study shared by many commands against the real thing: a throw-away PostgreSQL (initdb,
pg_ctl) for Optuna and the MLflow tracking server, and a real `mlflow server` with proxied
artifacts. Skipped, with one line, where no PostgreSQL binary exists. Also: prepared data that
moves between machines (data roots), and training over several devices of one machine."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import CLASSES, free_port, make_dataset, stop_group, tiny_args, tiny_values
from optuna.trial import TrialState

from pipeline import prepared
from pipeline.config import PipelineError, PrepareConfig, TrainConfig
from pipeline.prepare import prepare
from pipeline.serving import encode_file

ROOT = Path(__file__).resolve().parent.parent


def wait_until(ready, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if ready():
            return
        time.sleep(0.3)
    raise AssertionError(f"{what} did not start within {seconds} s")


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server on 127.0.0.1 and a free port, its data in a temp folder; yields a URL
    factory url(database) that creates the database. Stopped and removed at the end."""
    if not shutil.which("initdb") or not shutil.which("pg_ctl"):
        pytest.skip("no PostgreSQL binaries (initdb, pg_ctl) on this machine")
    import psycopg

    # Not in pytest's or $TMPDIR's folders, which are root's only: the server runs as postgres.
    folder = Path(tempfile.mkdtemp(prefix="pipeline-postgres-", dir="/tmp"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_postgres:
        shutil.chown(folder, "postgres")
    port, data = free_port(), folder / "data"
    subprocess.run([*as_postgres, "initdb", "-D", str(data), "-A", "trust", "-U", "postgres"], check=True,
                   capture_output=True)
    subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-l", str(folder / "log"), "-w", "start", "-o",
                    f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c max_connections=200"],
                   check=True, capture_output=True)

    def url(database: str) -> str:
        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{database}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{port}/{database}"

    try:
        yield url
    finally:
        subprocess.run([*as_postgres, "pg_ctl", "-D", str(data), "-w", "stop", "-m", "immediate"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def tracking_server(postgres, tmp_path_factory):
    """`mlflow server` with a PostgreSQL backend and proxied artifacts in a temp folder; its URL."""
    folder, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", postgres("mlflow"),
         "--artifacts-destination", str(folder / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2"], stdout=open(folder / "log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})  # no job runner: seven idle processes
    url = f"http://127.0.0.1:{port}"

    def up():
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_until(up, 120, f"mlflow server ({(folder / 'log')})")
        yield url
    finally:
        stop_group(server)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def on_server(tracking_server):
    """This process on the tracking server for one test, then on the session's store again:
    mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which later commands and servers inherit."""
    session_store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    yield tracking_server
    mlflow.set_tracking_uri(session_store)


def command(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *args], stdout=out, stderr=out, cwd=log.parent,
                                env={**os.environ, "PYTHONPATH": str(ROOT), **env})


def finish(processes: list[subprocess.Popen], logs: list[Path], seconds: float = 900) -> None:
    deadline = time.time() + seconds
    for process, log in zip(processes, logs):
        process.wait(timeout=max(1, deadline - time.time()))
        assert process.returncode == 0, log.read_text()[-4000:]
        assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


@pytest.mark.slow
def test_three_tune_commands_on_postgres_one_killed(tmp_path, postgres, on_server):
    storage, n_trials = postgres("optuna_three"), 7
    root = make_dataset(tmp_path / "teamshapes", n=8)
    env = {"MLFLOW_TRACKING_URI": on_server}
    args = tiny_args("tune", dataset=root, storage=storage, study_name="team", n_trials=n_trials, heartbeat_interval=2,
                     grace_period=8, pruner="none", epochs=1)
    logs = [tmp_path / f"tune-{i}.log" for i in range(3)]
    processes = [command(args, env, log) for log in logs]  # within one second, on a fresh database
    try:
        victim = processes[2]
        running = f"tags.optuna_worker = '{socket.gethostname()}:{victim.pid}' and attributes.status = 'RUNNING'"
        wait_until(lambda: victim.poll() is not None or len(mlflow.search_runs(
            search_all_experiments=True, filter_string=running + " and tags.step = 'train'")), 300, "a trial")
        assert victim.poll() is None, logs[2].read_text()[-3000:]
        victim.kill()  # SIGKILL in the middle of a trial
        finish(processes[:2], logs[:2])

        study = optuna.load_study(study_name="team", storage=storage)
        trials = study.get_trials()
        finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(finished) == n_trials
        assert sorted(t.user_attrs["grid_point"] for t in finished if "grid_point" in t.user_attrs) == list(range(1, 8))
        assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        assert failed and all(t.user_attrs["worker"] == f"{socket.gethostname()}:{victim.pid}" for t in failed)
        runs = mlflow.search_runs(experiment_names=["teamshapes"])
        assert not (runs["status"] == "RUNNING").any()
        dead = runs[runs["tags.optuna_trial"].isin([str(t.number) for t in failed])]
        assert (dead["status"] == "FAILED").all() and dead["tags.pipeline.end_reason"].notna().all()
        versions = mlflow.MlflowClient().search_model_versions("name = 'teamshapes-resnet50'")
        assert len(versions) == 1
        best = study.best_trial
        assert versions[0].run_id == best.user_attrs["mlflow_run_id"]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()


@pytest.mark.slow
def test_two_grid_commands_at_once_train_seven_points_and_register_once(tmp_path, on_server):
    root = make_dataset(tmp_path / "gridtwins", n=8)
    args = tiny_args("grid", dataset=root, epochs=1)
    logs = [tmp_path / f"grid-{i}.log" for i in range(2)]
    finish([command(args, {"MLFLOW_TRACKING_URI": on_server}, log) for log in logs], logs)
    runs = mlflow.search_runs(experiment_names=["gridtwins"])
    points = runs[runs["tags.step"] == "train"]
    assert len(points) == 7 and sorted(points["tags.grid_point"].astype(int)) == list(range(1, 8))
    assert (runs["status"] == "FINISHED").all()
    assert len(mlflow.MlflowClient().search_model_versions("name = 'gridtwins-resnet50'")) == 1
    assert sum("waiting for grid run" in log.read_text() for log in logs) == 1


def test_data_prepared_under_one_root_trains_from_another(tmp_path, monkeypatch):
    root_a = tmp_path / "machine-a"
    make_dataset(root_a / "movingshapes", n=4)
    result = prepare(PrepareConfig(dataset=str(root_a / "movingshapes"), val_fraction=0.25, test_fraction=0.25))
    manifest = pd.read_csv(mlflow.artifacts.download_artifacts(f"{result.data_uri}/manifest.csv"))
    assert not manifest["path"].str.startswith("/").any()  # relative: movingshapes/<class>/<file>

    root_b = tmp_path / "machine-b"
    shutil.move(root_a, root_b)
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(root_b))
    data = prepared.load(result.data_uri)
    assert data.manifest["path"].map(os.path.isfile).all()
    assert data.manifest["path"].str.startswith(str(root_b)).all()

    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path / "machine-c"))
    with pytest.raises(PipelineError, match="set PIPELINE_DATA_DIR to the folder that holds them here") as e:
        prepared.load(result.data_uri)
    assert "machine-c" in str(e.value) and "\n" not in str(e.value)



# Two logical CPU devices stand in for two GPUs; they must exist before TensorFlow starts, so in a
# process of their own. Trains a model in two phases (a head on cached features, then the whole model
# on images: the same build and fit on images as feature_cache=off) and a head, scores each on the
# test split in memory as grid does, and tries a batch_size that two devices cannot split.
TWO_DEVICES = """
import json, sys
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
                                           [tf.config.LogicalDeviceConfiguration()] * 2)
from pipeline.config import PipelineError, TrainConfig
from pipeline.evaluate import evaluate_trained
from pipeline.train import train
tiny = json.loads(sys.argv[1])
runs = {}
for name, extra in {"two_phase": dict(fine_tune="3", finetune_epochs=1), "head": {}}.items():
    result = train(TrainConfig(**tiny, **extra))
    runs[name] = evaluate_trained(result.trained, result.run_id).run_id
try:
    train(TrainConfig(**{**tiny, "batch_size": 3}))
except PipelineError as e:
    runs["error"] = str(e)
print("RESULT " + json.dumps(runs))
"""


@pytest.mark.slow
def test_training_over_two_devices_mirrors_the_model_and_scores_every_val_image(tmp_path):
    data = prepare(PrepareConfig(dataset=str(make_dataset(tmp_path / "mirrorshapes", n=9)), val_fraction=0.35,
                                 test_fraction=0.25))
    val = prepared.load(data.data_uri).split("val")
    # 13 train images in batches of 4 leave one that no two devices can share: dropped (another each
    # epoch); the 7 val images go in batches of 4 and 3 (split 2 and 1), so every one is scored.
    assert (len(prepared.load(data.data_uri).split("train")), len(val)) == (13, 7)
    tiny = tiny_values(TrainConfig, data=data.data_uri, experiment="two-devices", batch_size=4, precision="float32")
    done = subprocess.run([sys.executable, "-c", TWO_DEVICES, json.dumps(tiny)], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    runs = json.loads(done.stdout.split("RESULT ")[-1])
    assert "needs a batch_size that is a multiple of 2 (now 3)" in runs.pop("error")
    assert done.stdout.count("trained on device CPU:0+CPU:1, num_replicas 2,") == 2
    client = mlflow.MlflowClient()
    for name, run_id in runs.items():
        run = mlflow.get_run(run_id)
        assert (run.data.tags["num_replicas"], run.data.tags["device"]) == ("2", "CPU:0+CPU:1"), name
        losses = [m.value for key in ("train_loss", "val_loss") for m in client.get_metric_history(run_id, key)]
        assert len(losses) == (6 if name == "two_phase" else 4) and np.isfinite(losses).all(), name
        assert 0 <= run.data.metrics["test_accuracy"] <= 1, name
        # The logged model, on one device in this process, scores the 7 val images as training did
        # (a head trained on the cached features, float16: to their precision).
        pyfunc = mlflow.pyfunc.load_model(run.data.tags["model_uri"])
        probs = pyfunc.predict(pd.DataFrame({"image": [encode_file(p) for p in val["path"]]}))
        loss = -np.mean(np.log([probs[f"p_{CLASSES[y]}"][i] for i, y in enumerate(val["label_index"])]))
        assert loss == pytest.approx(run.data.metrics["best_val_loss"], rel=1e-3 if name == "head" else 1e-4), name


def test_the_image_of_compose_and_kubernetes_workers_installs_tensorflow():
    """The Dockerfile installs the package with a TensorFlow extra (the pipeline imports it), and
    compose's and the Kubernetes Job's workers run that image with the README's tune command."""
    import re
    import tomllib

    extras = re.search(r'pip install [^\n]*"\.\[([^\]]*)\]"', (ROOT / "Dockerfile").read_text()).group(1).split(",")
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(dep.startswith("tensorflow") for extra in extras for dep in optional[extra])
    assert "psycopg" in " ".join(dep for extra in extras for dep in optional[extra])
    for recipe, key in ((ROOT / "compose.yaml", "command"), (ROOT / "deploy" / "tune-job.yaml", "args")):
        assert f'{key}: ["tune", ' in recipe.read_text(), recipe  # the image's entry point is python -m pipeline
