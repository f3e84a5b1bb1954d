"""Shared fixtures: tiny generated image folders and a throw-away MLflow tracking store."""

import contextlib
import gc
import multiprocessing.util
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

from pipeline.cli import STEPS
from pipeline.config import MainConfig, parameters
from pipeline.workflow import main

CLASSES = ("cat", "dog", "owl")
# One colour per class, so that even a tiny model has something to learn.
COLOURS = {"cat": (200, 40, 40), "dog": (40, 200, 40), "owl": (40, 40, 200)}
# The one tiny setting of every test that trains: a random backbone at ResNet50's smallest input,
# 2 epochs, a quarter of the images each for validation and test.
TINY = {"weights": "none", "image_size": 32, "epochs": 2, "batch_size": 8, "patience": 5, "learning_rate": 1e-3,
        "val_fraction": 0.25, "test_fraction": 0.25}


def tiny_values(cls, **values) -> dict:
    """The tiny setting's values of the parameters cls takes, plus values."""
    names = {f.name for f in parameters(cls)}  # a grid's or a study's points set their own learning rates
    return {**{k: v for k, v in TINY.items() if k in names}, **values}


def tiny(cls, **values):
    """A config of class cls on the tiny setting (the parameters cls takes), plus values."""
    return cls(**tiny_values(cls, **values))


def tiny_args(step: str, **values) -> list[str]:
    """The command line of a step on the tiny setting (the options it takes), plus values."""
    settings = tiny_values(STEPS[step][0], **values)
    return [step] + [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def free_port() -> int:
    """A free TCP port on 127.0.0.1, for a server a test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def left_in(session: int, seconds: float = 30) -> list[str]:
    """The command lines of the processes of a session still there after waiting up to seconds
    for them to end (zombies' are empty)."""
    deadline = time.time() + seconds
    while True:
        left = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[3]) == session:
                    left.append((stat.parent / "cmdline").read_text().replace("\0", " ")[:200])
            except (OSError, ValueError, IndexError):
                continue
        if not left or time.time() > deadline:
            return left
        time.sleep(0.2)


def stop_group(process: subprocess.Popen, seconds: float = 20) -> None:
    """End a server started with start_new_session=True and every process of its group: SIGTERM,
    then SIGKILL after seconds. A group already gone (the server exited by itself) is no error."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=seconds)
            return
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def write_images(folder: Path, label: str, n: int, size: int = 24, fmt: str = "png", seed: int = 0) -> list[Path]:
    """n small RGB images of one class: its colour plus noise."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(100 * sorted(COLOURS).index(label) + seed)
    paths = []
    for i in range(n):
        pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype("uint8")
        paths.append(folder / f"{label}_{seed}_{i}.{fmt}")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def make_dataset(root: Path, n: int = 8, classes=CLASSES, with_test: bool = False) -> Path:
    """root/<class>/*.png, or root/{train,test}/<class>/*.png with_test."""
    for label in classes:
        if with_test:
            write_images(root / "train" / label, label, n)
            write_images(root / "test" / label, label, max(2, n // 2), seed=1)
        else:
            write_images(root / label, label, n)
    return root


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory):
    """One sqlite tracking store for the session, artifacts beside it (MLflow puts them under the
    working directory); tests keep apart by experiment name."""
    folder = tmp_path_factory.mktemp("mlflow")
    os.chdir(folder)
    # multiprocessing's own temporary folder (a forkserver's socket, pipeline.trial) stays where
    # it was: multiprocessing removes it at exit, after pytest has removed this session's folder.
    multiprocessing.util.get_temp_dir()
    # MLflow downloads artifacts into temporary folders it never removes: keep them in this
    # session's folder, which pytest deletes (tmp_path_retention_policy in pyproject.toml).
    (folder / "tmp").mkdir()
    os.environ["TMPDIR"] = str(folder / "tmp")
    tempfile.tempdir = None  # read TMPDIR again
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)
    os.environ.pop("PIPELINE_DATA_DIR", None)
    os.environ["PIPELINE_CACHE_DIR"] = str(folder / "feature-cache")
    # The store's tables, made now: a command a test starts must not create them at the moment
    # the test reads the store (MLflow's migrations of one new sqlite file at once fail).
    mlflow.search_experiments()
    return folder


@pytest.fixture(autouse=True)
def eager_if_marked(request):
    """A test marked eager runs tf.functions eagerly in this process (pyproject.toml, markers);
    every other test, and every command a test starts, runs them as users do, traced."""
    if request.node.get_closest_marker("eager") is None:
        yield
        return
    with eagerly():
        yield


@contextlib.contextmanager
def eagerly():
    """tf.functions run eagerly inside: for a fixture of eager tests, made before their own marks act."""
    import tensorflow as tf
    before = tf.config.functions_run_eagerly()
    tf.config.run_functions_eagerly(True)
    try:
        yield
    finally:
        tf.config.run_functions_eagerly(before)


@pytest.fixture(scope="session", autouse=True)
def sixteen_gb():
    """Configurations are judged against a machine with 16 GB free, not against what other
    processes leave free at that moment (a 224 px config was refused with 1.9 GB available)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("pipeline.config.available_memory", lambda: 16 * 2**30)
        yield


def as_under_mlflow_run(monkeypatch) -> str:
    """The id of a run as `mlflow run` makes one for an entry point (RUNNING, in the Default
    experiment), in MLFLOW_RUN_ID as `mlflow run` passes it to the entry point's command, and
    no experiment active, as in the fresh process it starts (MLflow resumes a run only in the
    active experiment, which an earlier test may have set)."""
    run_id = mlflow.MlflowClient().create_run("0").info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    return run_id


@pytest.fixture
def mlflow_run_id(monkeypatch) -> str:
    """as_under_mlflow_run, for the whole test."""
    return as_under_mlflow_run(monkeypatch)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_dataset(tmp_path / "shapes")


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """One tiny main run (prepare, train, evaluate, register) shared by the registry, predict, serve
    and report tests: dataset folder 'regshapes', so experiment 'regshapes' and registered model
    'regshapes-resnet50', which no other test registers to."""
    cfg = tiny(MainConfig, dataset=str(make_dataset(tmp_path_factory.mktemp("registry") / "regshapes", n=8)))
    return cfg, main(cfg)


DURATIONS = "pipeline/durations"  # pytest's cache (.pytest_cache): seconds per test in the last run


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (--dist loadgroup) the tests of the shared main run, of the PostgreSQL
    server and of test_grid's resumed grid each go to one worker, which makes it once; the others
    spread one by one (a cheap module-scoped fixture may be made by more than one worker), longest
    module first (the last run's durations, else the count of slow tests), in the order xdist
    hands them out: the short ones fill in at the end, so the workers finish together."""
    for item in items:
        for shared in ("trained", "postgres", "resumed_grid"):
            if shared in item.fixturenames:
                item.add_marker(pytest.mark.xdist_group(shared))
    last, weight = config.cache.get(DURATIONS, {}) if hasattr(config, "cache") else {}, {}  # -p no:cacheprovider
    for item in items:
        guess = 60 if item.get_closest_marker("slow") else 1
        weight[item.module] = weight.get(item.module, 0) + last.get(item.nodeid, guess)
    items.sort(key=lambda item: -weight[item.module])


def pytest_sessionfinish(session):
    """As a worker ends, pytest collects garbage five times (for exceptions raised in finalizers):
    over a session's TensorFlow objects that took seconds at the very end of the run. Frozen
    first, they are not traversed again; only a finalizer's exception in this last garbage goes
    unreported."""
    gc.freeze()


def pytest_terminal_summary(terminalreporter, config):
    """Keep each test's seconds (setup, call and teardown) for the next run's order."""
    seconds = {}
    for report in (r for reports in terminalreporter.stats.values() for r in reports):
        if getattr(report, "when", None) and getattr(report, "nodeid", None):
            node = report.nodeid.split("@")[0]  # without xdist's group suffix, as collection sees it
            seconds[node] = seconds.get(node, 0) + report.duration
    if seconds and hasattr(config, "cache") and not hasattr(config, "workerinput"):
        config.cache.set(DURATIONS, {**config.cache.get(DURATIONS, {}), **seconds})
