"""Find a dataset on disk, check its images and split it into a manifest (path, label, split).

No TensorFlow here: this is plain file work, so prepare and the tests stay light.
"""

import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from sklearn.model_selection import train_test_split

from pipeline.config import PipelineError

# The formats TensorFlow's decode_image reads; PIL must agree that the file is one of them.
DECODABLE = {"JPEG", "PNG", "BMP", "GIF"}


@dataclass(frozen=True)
class Preset:
    kaggle: str  # Kaggle handle, for kagglehub
    root: str  # folder under the download that holds the images
    train: str = ""  # sub-folder of root with the training classes ("" : classes sit in root)
    test: str = ""  # sub-folder of root with the official test classes ("" : none)
    images: str = ""  # sub-folder of each class folder holding its images ("" : the class folder)


PRESETS = {
    "blood_cells": Preset(
        kaggle="paultimothymooney/blood-cells",
        root="dataset2-master/dataset2-master/images",
        train="TRAIN",
        test="TEST",
    ),
    "covid19": Preset(
        kaggle="tawsifurrahman/covid19-radiography-database",
        root="COVID-19_Radiography_Dataset",
        images="images",  # each class also has masks/, which are not inputs
    ),
}


@dataclass(frozen=True)
class Source:
    """Where a dataset's images are: class folders for training and, if any, for the official test."""

    name: str
    train: Path
    test: Path | None
    images: str = ""


def locate(dataset: str, data_dir: str = "") -> Source:
    """Resolve a preset name or a folder path to its class folders, or fail with where to put the data."""
    if dataset in PRESETS:
        return _preset_source(dataset, PRESETS[dataset], data_dir)
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise PipelineError(
            f"dataset {dataset!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder"
        )
    subdirs = {p.name.lower(): p for p in _visible(root) if p.is_dir()}
    if "train" in subdirs:
        return Source(root.resolve().name, subdirs["train"].resolve(), _resolved(subdirs.get("test")))
    return Source(root.resolve().name, root.resolve(), None)


def _resolved(path):
    return path.resolve() if path else None


def _preset_source(name: str, preset: Preset, data_dir: str) -> Source:
    candidates = []
    for base in (data_dir, os.environ.get("PIPELINE_DATA_DIR", "")):
        if base:
            candidates += [Path(base).expanduser() / name, Path(base).expanduser()]
    for base in candidates:
        if (base / preset.root).is_dir():
            return _preset_at(name, preset, base)
    return _preset_at(name, preset, _download(name, preset))


def _preset_at(name: str, preset: Preset, base: Path) -> Source:
    root = (base / preset.root).resolve()
    test = root / preset.test if preset.test else None
    return Source(name, root / preset.train, test, preset.images)


def _download(name: str, preset: Preset) -> Path:
    hint = (
        f"put the Kaggle dataset {preset.kaggle} so that <dir>/{name}/{preset.root} exists "
        f"and pass --data-dir <dir> or set PIPELINE_DATA_DIR=<dir>"
    )
    try:
        import kagglehub
    except ImportError:
        raise PipelineError(f"dataset {name!r} not found locally and kagglehub is not installed: {hint}") from None
    try:
        path = Path(kagglehub.dataset_download(preset.kaggle))
    except Exception as e:  # any network or auth failure: the user's fix is the same
        raise PipelineError(f"dataset {name!r} not found locally and the Kaggle download failed "
                            f"({type(e).__name__}): {hint}") from None
    if not (path / preset.root).is_dir():
        raise PipelineError(f"the Kaggle download of {preset.kaggle} at {path} has no {preset.root}: {hint}")
    return path


def _visible(folder: Path):
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _files(folder: Path):
    """Every visible file under folder, hidden files and folders skipped."""
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        yield from (Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))


def files_at(path: str | Path) -> pd.DataFrame:
    """Candidate files (a path column) of one file or, for a folder, every visible file under it."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PipelineError(f"{path} does not exist: pass a folder of images or one image file")
    files = [path] if path.is_file() else list(_files(path))
    if not files:
        raise PipelineError(f"{path} holds no files: pass a folder of images or one image file")
    return pd.DataFrame({"path": [str(f) for f in files]})


def scan(source: Source) -> pd.DataFrame:
    """List candidate files as a frame (path, label, pool) with pool 'train' or 'test'.

    Fails when there are fewer than two classes, a class folder holds no file, or the train and
    test folders name different classes.
    """
    pools = {"train": source.train, "test": source.test} if source.test else {"train": source.train}
    rows, classes = [], {}
    for pool, folder in pools.items():
        if not folder.is_dir():
            raise PipelineError(f"{folder} is missing: the {pool} images of {source.name!r} should be there")
        classes[pool] = [d.name for d in _visible(folder) if d.is_dir()]
        for label in classes[pool]:
            files = list(_files(folder / label / source.images))
            if not files:
                raise PipelineError(f"class folder {folder / label} holds no images: add images or remove it")
            rows += [(str(f), label, pool) for f in files]
        if len(classes[pool]) < 2:
            raise PipelineError(f"{folder} has {len(classes[pool])} class folder(s); at least 2 are needed")
    if source.test and classes["train"] != classes["test"]:
        raise PipelineError(f"train classes {classes['train']} differ from test classes {classes['test']} "
                            f"in {source.name!r}: make both folders hold the same class subfolders")
    return pd.DataFrame(rows, columns=["path", "label", "pool"])


def _check(path: str) -> tuple[str, str]:
    """(sha1 of the file, '') for an image TensorFlow can decode, else ('', why it is skipped)."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            if im.format not in DECODABLE:
                return "", f"format {im.format} is not one of {', '.join(sorted(DECODABLE))}"
            im.load()  # decodes fully: truncated and corrupt files fail here
    except Exception as e:
        return "", f"{type(e).__name__}: {e}".splitlines()[0]
    return hashlib.sha1(data).hexdigest(), ""


def check_images(files: pd.DataFrame, workers: int = 8) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split files into (usable images with a sha1 column, skipped files with a reason column)."""
    with ThreadPoolExecutor(workers) as pool:
        checked = list(pool.map(_check, files["path"]))
    files = files.assign(sha1=[c[0] for c in checked], reason=[c[1] for c in checked])
    bad = files["reason"] != ""
    return files[~bad].drop(columns="reason").reset_index(drop=True), files[bad].drop(columns="sha1")


def cap(files: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most max_per_class images per (pool, class), sampled with seed; 0 keeps everything."""
    if not max_per_class:
        return files
    shuffled = files.sample(frac=1, random_state=seed)
    return shuffled.groupby(["pool", "label"]).head(max_per_class).sort_values("path")


def split(files: pd.DataFrame, how: str, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """Assign each image to train, val or test, stratified by label; returns path, label, split, sha1.

    auto/official: the official test pool is the test split and val is carved from the train
    pool. random (or auto without an official test): all images are pooled, then test_fraction
    of them is held out for test and val_fraction of the rest for validation.
    """
    has_test = (files["pool"] == "test").any()
    if how == "official" and not has_test:
        raise PipelineError("split=official but the dataset has no official test folder: use split=random")
    files = files.sort_values("path").reset_index(drop=True)
    if how == "random" or not has_test:
        pool, test = _stratified(files, test_fraction, seed, "test")
    else:
        pool, test = files[files["pool"] == "train"], files[files["pool"] == "test"]
    train, val = _stratified(pool, val_fraction, seed, "validation")
    parts = [train.assign(split="train"), val.assign(split="val"), test.assign(split="test")]
    return pd.concat(parts)[["path", "label", "split", "sha1"]].reset_index(drop=True)


def _stratified(frame: pd.DataFrame, fraction: float, seed: int, what: str):
    try:
        return train_test_split(frame, test_size=fraction, random_state=seed, stratify=frame["label"])
    except ValueError as e:
        counts = frame["label"].value_counts()
        raise PipelineError(f"cannot hold out {fraction:g} for {what} with {counts.min()} image(s) in class "
                            f"{counts.idxmin()!r} of {len(frame)} ({e}): add images or change the fractions") from None


def digest(manifest: pd.DataFrame) -> str:
    """Content digest of a manifest: file bytes, labels and splits; not where the files live."""
    rows = manifest.sort_values(["sha1", "label", "split"])[["sha1", "label", "split"]]
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]
