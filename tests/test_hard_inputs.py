"""Hard inputs (issue 14): odd folders, odd names, parameters at their edges, stores and folders
that cannot be written, and data damaged after prepare. Each case ends in correct data or one
line that says what is wrong, never a traceback or silently wrong data."""

import errno
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from conftest import make_dataset, tiny, tiny_args, write_images
from mlflow.utils.validation import _validate_metric_name

from pipeline import datasets, prepared
from pipeline.card import read_card
from pipeline.config import MainConfig, PipelineError, PrepareConfig, TuneConfig, check_memory, memory_needed
from pipeline.keys import class_keys
from pipeline.prepare import prepare
from pipeline.storage import ensure_space, write_error
from pipeline.workflow import main

ROOT = Path(__file__).resolve().parent.parent
GB = 2**30


def scanned(root, **split_args):
    files = datasets.scan(datasets.locate(str(root)))
    usable, skipped = datasets.check_images(files)
    manifest = datasets.split(usable, **{"how": "auto", "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0,
                                         **split_args})
    return manifest, skipped


def run_cli(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=300)


def assert_one_error_line(out, *fragments):
    assert out.returncode != 0
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.strip().splitlines() if " INFO mlflow." not in line]
    errors = [line for line in lines if line.startswith("Error: ")]
    assert len(errors) == 1, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


# 1. Folder walking ------------------------------------------------------------------------------

LINKS = {  # where a symbolic link inside cat/ points, and the reason its entries are skipped
    "loop to the class folder": (".", "same folder as"),
    "loop to the parent": ("..", "same folder as"),
    "link to another class": ("../dog", "same folder as"),
    "second path to a file": ("cat_0_0.png", "same file as"),
    "broken link": ("/no/such/file.png", "broken link"),
}


@pytest.mark.parametrize("kind", sorted(LINKS))
def test_links_count_each_real_file_once_under_its_own_class(tmp_path, kind):
    root = make_dataset(tmp_path / "d", n=8)
    target, reason = LINKS[kind]
    os.symlink(target, root / "cat" / "link")
    manifest, skipped = scanned(root)
    assert len(manifest) == 24 and manifest["sha1"].is_unique
    assert (manifest["path"].str.rsplit("/", n=2).str[-2] == manifest["label"]).all()  # nothing relabelled
    assert skipped["reason"].str.contains(reason).any(), skipped


def test_a_link_loop_ends_and_prepare_counts_the_real_images(tmp_path):
    """The catalogue's case: a loop inside a class folder made 20 images into 820 rows."""
    root = make_dataset(tmp_path / "loop", n=10, classes=("cat", "dog"))
    os.symlink("..", root / "cat" / "up")
    os.symlink("../..", root / "dog" / "upup")
    result = prepare(PrepareConfig(dataset=str(root), val_fraction=0.25, test_fraction=0.25))
    assert int(result.counts.to_numpy().sum()) == 20
    data = prepared.load(result.data_uri)
    assert data.manifest["sha1"].is_unique and len(data.manifest) == 20


def test_an_unreadable_folder_and_file_are_listed_with_the_reason(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "perm", n=6)
    locked, secret = root / "cat" / "locked", root / "dog" / "dog_0_0.png"
    write_images(locked, "cat", 2)
    real_scandir, real_read = os.scandir, Path.read_bytes

    def scandir(path="."):
        if Path(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    def read_bytes(self):
        if self == secret:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    manifest, skipped = scanned(root)
    reasons = dict(zip(skipped["path"], skipped["reason"]))
    assert "Permission denied" in reasons[str(locked)] and "Permission denied" in reasons[str(secret)]
    assert len(manifest) == 17


@pytest.mark.parametrize("folder", ["valid", "validation", "val", "Valid"])
def test_a_validation_folder_is_the_val_split(tmp_path, folder):
    root = make_dataset(tmp_path / "tvt", n=8, with_test=True)
    for label in ("cat", "dog", "owl"):
        write_images(root / folder / label, label, 3, seed=2)
    manifest, _ = scanned(root)
    val = set(manifest.loc[manifest["split"] == "val", "path"])
    assert val == {str(p) for p in (root / folder).resolve().rglob("*.png")}
    assert set(manifest.loc[manifest["split"] == "train", "path"]) == \
        {str(p) for p in (root / "train").resolve().rglob("*.png")}
    assert datasets.split_sources(datasets.scan(datasets.locate(str(root))), "auto")["val"].startswith("the official")
    pooled, _ = scanned(root, how="random")
    assert pooled.loc[pooled["split"] == "val", "path"].str.contains("/train/").any()


@pytest.mark.parametrize("layout, message", [
    ("two_val_folders", "validation folders"),
    ("val_classes_differ", "differ from val classes"),
    ("class_is_a_link_to_another", "same folder as"),
    ("undecodable_class_name", "not valid UTF-8"),
])
def test_bad_walking_layouts_fail_in_one_line(tmp_path, layout, message):
    root = tmp_path / "bad"
    if layout == "two_val_folders":
        make_dataset(root, n=4, with_test=True)
        for folder in ("val", "valid"):
            write_images(root / folder / "cat", "cat", 2)
    elif layout == "val_classes_differ":
        make_dataset(root, n=4, with_test=True)
        for label in ("cat", "dog"):
            write_images(root / "val" / label, label, 2)
    elif layout == "class_is_a_link_to_another":
        make_dataset(root, n=4)
        os.symlink(root / "cat", root / "lion")
    else:
        make_dataset(root, n=4)
        write_images(Path(os.fsdecode(bytes(root) + b"/b\xe4r")), "cat", 2)
    with pytest.raises(PipelineError, match=message) as e:
        datasets.scan(datasets.locate(str(root)))
    assert "\n" not in str(e.value)


# 2. Names --------------------------------------------------------------------------------------

ODD_NAMES = ["cat", "it's", 'say "hi"', "big (x)", "what?", "star*", "Zelltyp größer", "日本語", "e\u0301",
             " padded ", "colon:name", "back\\slash", "new\nline", "x" * 300, "-dash", "a..b", "#1 & 2%"]


@pytest.mark.parametrize("name", ODD_NAMES)
def test_every_class_name_gives_a_valid_mlflow_key(name):
    key = class_keys([name, "other"])[name]
    for full in (f"count/train/{key}", f"test_precision/{key}"):
        _validate_metric_name(full)
        assert len(full) <= 250
    assert (key == name) == (name in ("cat", "-dash", "a..b"))


def test_names_that_map_alike_keep_distinct_keys():
    names = ["a?", "a*", "a_", "a", "é", "e\u0301", "e"]
    keys = class_keys(names)
    assert len(set(keys.values())) == len(names)
    assert class_keys(names) == keys  # the same key every time: prepare's and evaluate's agree


def test_prepare_keeps_odd_class_names_verbatim_and_logs_their_keys(tmp_path):
    names = ["it's (1)", "größer?", "1", "NA"]
    root = tmp_path / "odd"
    for name, colour in zip(names, ("cat", "dog", "owl", "cat")):
        write_images(root / name, colour, 8, seed=len(name))
    result = prepare(PrepareConfig(dataset=str(root), val_fraction=0.25, test_fraction=0.25))
    data = prepared.load(result.data_uri)
    assert data.class_names == sorted(names)
    assert sorted(data.manifest["label"].unique()) == sorted(names)  # "1" and "NA" stay text, not 1 and NaN
    assert sorted(data.split("train")["label_index"].unique()) == [0, 1, 2, 3]
    metrics = mlflow.get_run(result.run_id).data.metrics
    assert {f"count/train/{key}" for key in class_keys(names).values()} <= set(metrics)


def test_undecodable_file_names_are_listed_not_fatal(tmp_path):
    root = make_dataset(tmp_path / "bytes", n=6)
    shutil.copy(root / "cat" / "cat_0_0.png", os.fsdecode(bytes(root) + b"/cat/caf\xe9.png"))
    result = prepare(PrepareConfig(dataset=str(root), val_fraction=0.25, test_fraction=0.25))
    assert result.skipped == 1
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/data"))
    skipped = pd.read_csv(folder / "skipped.csv")
    assert skipped["path"].str.endswith("caf\\xe9.png").all() and skipped["reason"].str.contains("UTF-8").all()


@pytest.mark.slow
def test_main_on_odd_class_names_keeps_them_in_model_metrics_and_predictions(tmp_path):
    names = ["it's (1)", "größer?", "star*"]
    root = tmp_path / "oddmain"
    for name, colour in zip(names, ("cat", "dog", "owl")):
        write_images(root / name, colour, 8, seed=len(name))
    result = main(tiny(MainConfig, dataset=str(root), epochs=1))
    card, _ = read_card(result.model_uri)
    assert card.class_names == sorted(names)
    evaluate_run = mlflow.get_run(mlflow.get_run(result.run_id).data.tags["evaluate_run_id"])
    assert {f"test_f1/{key}" for key in class_keys(names).values()} <= set(evaluate_run.data.metrics)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{evaluate_run.info.run_id}/predictions.csv"))
    predictions = pd.read_csv(folder, keep_default_na=False)
    assert {f"p_{name}" for name in names} <= set(predictions.columns)
    assert set(predictions["label"]) <= set(names)


# 3. Parameters at the edges ---------------------------------------------------------------------

OUT_OF_RANGE = [("seed", -1), ("seed", 2**32), ("image_size", 10000), ("units", 10**9),
                ("hidden_layers", 1000000), ("batch_size", 10**6), ("epochs", 10**6), ("patience", 10**6),
                ("finetune_epochs", 10**6), ("max_per_class", 10**10), ("n_trials", 10**7), ("workers", 1000),
                ("timeout", 10**9)]


@pytest.mark.parametrize("name, value", OUT_OF_RANGE)
def test_values_beyond_the_documented_range_are_refused_with_the_range(name, value):
    with pytest.raises(PipelineError, match=f"invalid {name}={value}") as e:
        TuneConfig(**{name: value})
    assert "from" in str(e.value) or "up to" in str(e.value)


def test_the_ends_of_each_range_are_accepted():
    for values in ({"seed": 0}, {"seed": 2**32 - 1}, {"image_size": 32}, {"units": 1}, {"hidden_layers": 0},
                   {"batch_size": 1}, {"epochs": 1}):
        MainConfig(**values)


@pytest.mark.parametrize("values", [{"image_size": 2048}, {"units": 65536}, {"fine_tune": "all", "image_size": 512},
                                    {"hidden_layers": 100, "units": 30000, "pooling": "avg"}])
def test_a_configuration_that_cannot_fit_in_memory_is_refused(values, monkeypatch):
    monkeypatch.setattr("pipeline.config.available_memory", lambda: 16 * GB)
    with pytest.raises(PipelineError, match="need at least .* GB of memory .* but 16.0 GB is available") as e:
        MainConfig(**values)
    assert "\n" not in str(e.value)


def test_the_memory_estimate_lets_the_usual_configurations_through(monkeypatch):
    monkeypatch.setattr("pipeline.config.available_memory", lambda: 8 * GB)
    for values in ({}, {"fine_tune": "all"}, {"units": 512, "image_size": 299}, {"image_size": 1024, "pooling": "avg"}):
        check_memory(MainConfig(**values), available=8 * GB)
    assert sum(memory_needed(MainConfig()).values()) < 2 * GB


@pytest.mark.parametrize("args, message", [
    (["prepare", "--seed", "-1"], "invalid seed=-1"),
    (["prepare", "--seed", "4294967296"], "2**32-1"),
    (["main", "--image-size", "10000", "--weights", "none"], "32 (ResNet50's smallest input) to 2048"),
    (["main", "--units", "1000000000", "--weights", "none"], "invalid units=1000000000"),
    (["main", "--hidden-layers", "1000000", "--weights", "none"], "invalid hidden_layers=1000000"),
])
def test_cli_refuses_edge_parameters_in_one_line_before_any_work(args, message):
    out = run_cli(*args)
    assert_one_error_line(out, message)


# 5. Stores and folders that cannot be written ---------------------------------------------------

@pytest.mark.parametrize("exception, expected", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the disk of"),
    (OSError(errno.EROFS, "Read-only file system", "/ro/mlruns/1/x"), "cannot write /ro/mlruns/1"),
    (RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database"), "tracking store in"),
    (RuntimeError("(sqlite3.OperationalError) database or disk is full"), "no space left on the disk of"),
    (RuntimeError("(sqlite3.DatabaseError) database disk image is malformed"), "is damaged"),
    (ValueError("something else"), None),
])
def test_write_errors_become_one_line_naming_the_folder(exception, expected):
    try:
        raise RuntimeError("wrapped by MLflow") from exception
    except RuntimeError as wrapped:
        message = write_error(wrapped)
    if expected is None:
        assert message is None
    else:
        assert expected in message and "\n" not in message


def test_a_failed_artifact_write_ends_the_run_failed(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "nospace", n=6)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mlflow, "log_artifacts", full)
    with pytest.raises(OSError) as e:
        prepare(PrepareConfig(dataset=str(root), experiment="nospace"))
    assert "no space left" in write_error(e.value)
    runs = mlflow.search_runs(experiment_names=["nospace"])
    assert runs["status"].tolist() == ["FAILED"]


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MB tmpfs (root only), unmounted afterwards."""
    folder = tmp_path / "disk"
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
                                           capture_output=True).returncode:
        pytest.skip("needs root and mount to make a small or read-only disk")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def _store(folder):
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db"}


@pytest.mark.parametrize("case", ["read-only store", "full store", "full artifacts", "damaged store"])
def test_cli_on_a_store_or_folder_that_cannot_be_written(tmp_path, small_disk, case):
    data = make_dataset(tmp_path / "shapes", n=30)
    work = tmp_path / "work"
    work.mkdir()
    store = small_disk if case != "full artifacts" else tmp_path
    if case != "full artifacts":  # the store exists (made in a process of its own, which closes it)
        subprocess.run([sys.executable, "-c", "import mlflow; mlflow.search_experiments()"], check=True,
                       env={**os.environ, **_store(store)}, cwd=work, timeout=300)
    if case == "read-only store":
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        expected = ("cannot write the tracking store", str(small_disk))
    elif case == "full store":
        subprocess.run(["dd", "if=/dev/zero", f"of={small_disk}/filler", "bs=64k"], capture_output=True)
        expected = ("no space left on the disk of the tracking store", str(small_disk))
    elif case == "damaged store":
        (small_disk / "mlflow.db").write_bytes((small_disk / "mlflow.db").read_bytes()[:50000])
        expected = ("is damaged",)
    else:
        work = small_disk  # a new store's artifacts go under the working folder
        subprocess.run(["dd", "if=/dev/zero", f"of={small_disk}/filler", "bs=64k"], capture_output=True)
        expected = ("no space left on the disk of the run's artifacts", str(small_disk))
    runs_before = _statuses(store)
    out = run_cli("prepare", "--dataset", str(data), env=_store(store), cwd=work)
    assert_one_error_line(out, *expected)
    new = _statuses(store)[len(runs_before):] if case != "damaged store" else []
    assert "RUNNING" not in new and all(status == "FAILED" for status in new)


def _statuses(folder):
    try:
        with sqlite3.connect(f"file:{folder}/mlflow.db?mode=ro", uri=True) as db:
            return [row[0] for row in db.execute("select status from runs order by start_time")]
    except sqlite3.DatabaseError:
        return []


# 6. Damaged state ------------------------------------------------------------------------------

@pytest.fixture
def prepared_folder(tmp_path):
    root = make_dataset(tmp_path / "damage", n=8)
    result = prepare(PrepareConfig(dataset=str(root), val_fraction=0.25, test_fraction=0.25))
    return root, result


@pytest.mark.parametrize("damage", ["changed", "missing"])
def test_an_image_changed_or_deleted_after_prepare_is_named(prepared_folder, damage):
    root, result = prepared_folder
    data = prepared.load(result.data_uri)
    victim = Path(data.split("train")["path"].iloc[0])
    if damage == "changed":
        write_images(tmp := victim.parent / "tmp", "owl", 1)
        shutil.move(next(tmp.iterdir()), victim)
    else:
        victim.unlink()
    with pytest.raises(PipelineError, match=f"1 of .* the train split changed or missing .*{victim.name} {damage}"):
        prepared.load(result.data_uri).split("train")
    prepared.load(result.data_uri).split("test")  # the other splits are intact


@pytest.mark.parametrize("piece, message", [
    ("dataset.json", "lacks a readable dataset.json"),
    ("manifest.csv", "lacks a readable manifest.csv"),
    ("half manifest", "does not match the digest"),
    ("relabelled manifest", "does not match the digest"),
])
def test_a_damaged_piece_of_prepared_data_is_named(prepared_folder, tmp_path, piece, message):
    _, result = prepared_folder
    folder = Path(shutil.copytree(mlflow.artifacts.download_artifacts(result.data_uri), tmp_path / "copy"))
    manifest = folder / "manifest.csv"
    if piece in ("dataset.json", "manifest.csv"):
        (folder / piece).unlink()
    elif piece == "half manifest":
        manifest.write_text("\n".join(manifest.read_text().splitlines()[:10]) + "\n")
    else:
        manifest.write_text(manifest.read_text().replace(",cat,", ",dog,"))
    with pytest.raises(PipelineError, match=message):
        prepared.load(str(folder))


def test_cli_train_on_a_changed_image_stops_in_one_line(prepared_folder):
    root, result = prepared_folder
    victim = Path(prepared.load(result.data_uri).split("val")["path"].iloc[0])
    victim.write_bytes(victim.read_bytes() + b"appended")
    out = run_cli(*tiny_args("train", data=result.data_uri, epochs=1))
    assert_one_error_line(out, "the val split changed or missing", victim.name, "run prepare again")


def test_a_write_known_not_to_fit_is_refused_before_it_starts(tmp_path):
    with pytest.raises(PipelineError, match=f"no space for the prepared data in {tmp_path}: .* needed, .* free"):
        ensure_space(tmp_path / "not-yet" / "artifacts", 2**60, "the prepared data")
    ensure_space(tmp_path / "not-yet", 1, "the prepared data")
