"""Find a dataset on disk, check its images and split it into a manifest (path, label, split).

No TensorFlow here: this is plain file work, so prepare and the tests stay light.
"""

import contextlib
import functools
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from pipeline.config import PipelineError

# The formats TensorFlow's decode_image reads; PIL must agree that the file is one of them.
DECODABLE = {"JPEG", "PNG", "BMP", "GIF"}
# Names of the official validation folder beside train/ (compared in lower case).
VAL_FOLDERS = ("valid", "validation", "val")


@dataclass(frozen=True)
class Preset:
    kaggle: str  # Kaggle handle, for kagglehub
    root: str  # folder under the download that holds the images
    train: str = ""  # sub-folder of root with the training classes ("" : classes sit in root)
    test: str = ""  # sub-folder of root with the official test classes ("" : none)
    images: str = ""  # sub-folder of each class folder holding its images ("" : the class folder)
    group: str = ""  # regex whose group 1 in a file name names the source image it was made from ("" : none)


PRESETS = {
    "blood_cells": Preset(
        kaggle="paultimothymooney/blood-cells",
        root="dataset2-master/dataset2-master/images",
        train="TRAIN",
        test="TEST",
        # _<cell>_<n>.jpeg: TRAIN holds about 35 augmented crops of each of 277 cells, so a validation
        # split that shares cells with train scores some 15 points above the official TEST's cells
        group=r"^_(\d+)_",
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
    val: Path | None = None  # the official validation classes, if any
    group: str = ""  # the preset's group: images made from one source image are held out together

    def pools(self) -> dict[str, Path]:
        """Folder of each pool the dataset has: train, and val and test if it has them."""
        pools = {"train": self.train, "val": self.val, "test": self.test}
        return {pool: folder for pool, folder in pools.items() if folder is not None}


def locate(dataset: str, data_dir: str = "") -> Source:
    """Resolve a preset name or a folder path to its class folders, or fail with where to put the data.

    A folder holds class subfolders, or train/ with them and optionally test/ (the official test
    split) and one of valid/, validation/ or val/ (the official validation split), any case.
    """
    if dataset in PRESETS:
        return _preset_source(dataset, PRESETS[dataset], data_dir)
    root = Path(dataset).expanduser()
    if not root.is_dir():
        raise PipelineError(
            f"dataset {printable(dataset)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing folder"
        )
    if not _utf8(root.resolve().name):
        raise PipelineError(f"dataset folder name {printable(root.resolve().name)!r} is not valid UTF-8: rename it")
    subdirs = {p.name.lower(): p for p in _visible(root) if p.is_dir()}
    if "train" not in subdirs:
        return Source(root.resolve().name, root.resolve(), None)
    vals = [subdirs[name] for name in VAL_FOLDERS if name in subdirs]
    if len(vals) > 1:
        raise PipelineError(f"{root} has {len(vals)} validation folders ({', '.join(p.name for p in vals)}): "
                            "keep one of them")
    return Source(root.resolve().name, subdirs["train"].resolve(), _resolved(subdirs.get("test")),
                  val=_resolved(vals[0] if vals else None))


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
    return Source(name, root / preset.train, test, preset.images, group=preset.group)


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
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise PipelineError(f"cannot read folder {printable(folder)} ({e.strerror}): make it readable") from None


def printable(path) -> str:
    """A path as text that can be printed and written anywhere: bytes that are not UTF-8 as \\x.."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # os.fsdecode keeps undecodable bytes as surrogates
        return False


class Walk:
    """Every visible file under some folders, each real file once, each real folder entered once.

    Symbolic links are followed, but a folder already entered (by any path: a link loop, or a
    link to a folder walked elsewhere) is not entered again, and a file already found by
    another path is not listed again, so a loop ends and no file counts twice. What is where it
    physically lies is claimed first (claim), so a link from one class folder into another
    cannot take the other's files. What cannot be listed goes to .skipped as (path, reason):
    folders that cannot be read, names that are not UTF-8, broken links, files found twice.
    """

    def __init__(self):
        self.folders: dict[tuple, str] = {}  # (st_dev, st_ino) -> first path
        self.found: dict[tuple, str] = {}
        self.skipped: list[tuple[str, str]] = []

    def claim(self, folders) -> None:
        """Register the folders and files physically under folders (no link followed) as theirs."""
        for folder in folders:
            for dirpath, dirnames, filenames in os.walk(folder):
                for name in dirnames + filenames:
                    path = os.path.join(dirpath, name)
                    with contextlib.suppress(OSError):
                        if not os.path.islink(path):
                            st = os.stat(path)
                            (self.folders if name in dirnames else self.found).setdefault(_id(st), path)
                with contextlib.suppress(OSError):
                    self.folders.setdefault(_id(os.stat(dirpath)), dirpath)

    def files(self, folder: Path):
        """Yield the files under folder, as described above."""
        if not self._enter(str(folder)):
            return
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True, onerror=self._unreadable):
            dirnames[:] = [d for d in sorted(dirnames) if self._named(dirpath, d) and
                           self._enter(os.path.join(dirpath, d))]
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if self._named(dirpath, name) and self._first(path):
                    yield Path(path)

    def _named(self, dirpath: str, name: str) -> bool:
        """False for hidden names (skipped silently) and names that are not UTF-8 (skipped, listed)."""
        if name.startswith("."):
            return False
        if not _utf8(name):
            self.skipped.append((printable(os.path.join(dirpath, name)), "name is not valid UTF-8: rename it"))
            return False
        return True

    def _enter(self, folder: str) -> bool:
        return self._once(folder, self.folders, "cannot read folder",
                          "same folder as {} (symbolic link), walked once")

    def _first(self, path: str) -> bool:
        return self._once(path, self.found, "broken link or unreadable entry", "same file as {}, counted once")

    def _once(self, path: str, seen: dict, unreadable: str, twin: str) -> bool:
        """Whether path (a folder or file, links followed) is readable and the first path to its
        real entry in seen; otherwise it is listed as skipped with the reason."""
        try:
            st = os.stat(path)
        except OSError as e:
            self.skipped.append((printable(path), f"{unreadable}: {e.strerror}"))
            return False
        first = seen.setdefault(_id(st), path)
        if first != path:
            self.skipped.append((printable(path), twin.format(printable(first))))
            return False
        return True

    def _unreadable(self, error: OSError) -> None:
        self.skipped.append((printable(error.filename), f"cannot read folder: {error.strerror}"))


def _id(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def files_at(path: str | Path) -> pd.DataFrame:
    """Candidate files (path, reason) of one file or, for a folder, every visible file under it
    (see Walk); reason is "" for a candidate, else why the entry is skipped unread."""
    path = Path(path).expanduser()
    if not path.exists():
        raise PipelineError(f"{printable(path)} does not exist: pass a folder of images or one image file")
    walk = Walk()
    walk.claim([path] if path.is_dir() else [])
    files = [path] if path.is_file() else list(walk.files(path))
    if not files:
        raise PipelineError(f"{printable(path)} holds no files: pass a folder of images or one image file")
    return _listing([(str(f), "") for f in files] + walk.skipped, ["path", "reason"])


def _listing(rows, columns) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns).astype(str)


def scan(source: Source) -> pd.DataFrame:
    """List candidate files as a frame (path, label, pool, reason) with pool train, val or test.

    reason is "" for a file to check, else why the entry was skipped while walking (see Walk).
    Fails when there are fewer than two classes, a class folder holds no file, a class folder
    name is not UTF-8, or the val or test folder names other classes than train.
    """
    rows, classes, walk = [], {}, Walk()
    for pool, folder in source.pools().items():
        if not folder.is_dir():
            raise PipelineError(f"{folder} is missing: the {pool} images of {source.name!r} should be there")
        classes[pool] = [d.name for d in _visible(folder) if d.is_dir()]
        for label in classes[pool]:
            if not _utf8(label):
                raise PipelineError(f"class folder name {printable(folder / label)!r} is not valid UTF-8: rename it")
    walk.claim(folder / label / source.images for pool, folder in source.pools().items() for label in classes[pool])
    for pool, folder in source.pools().items():
        for label in classes[pool]:
            before = len(walk.skipped)
            files = list(walk.files(folder / label / source.images))
            rows += [(str(f), label, pool, "") for f in files]
            rows += [(path, label, pool, reason) for path, reason in walk.skipped[before:]]
            if not files:
                why = f" ({walk.skipped[before][0]}: {walk.skipped[before][1]})" if len(walk.skipped) > before else ""
                raise PipelineError(f"class folder {folder / label} holds no images{why}: add images or remove it")
        if len(classes[pool]) < 2:
            raise PipelineError(f"{folder} has {len(classes[pool])} class folder(s); at least 2 are needed")
    for pool in classes:
        if classes[pool] != classes["train"]:
            raise PipelineError(f"train classes {classes['train']} differ from {pool} classes {classes[pool]} "
                                f"in {source.name!r}: make the folders hold the same class subfolders")
    return _listing(rows, ["path", "label", "pool", "reason"])


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
    """Split files into (usable images with a sha1 column, skipped files with a reason column).

    Rows that already have a reason (skipped while walking) are not opened."""
    listed = files["reason"] if "reason" in files else pd.Series("", index=files.index)
    todo = files[listed == ""]
    with ThreadPoolExecutor(workers) as pool:
        checked = dict(zip(todo.index, pool.map(_check, todo["path"])))
    files = files.assign(sha1=[checked.get(i, ("", ""))[0] for i in files.index],
                         reason=[checked.get(i, ("", listed[i]))[1] for i in files.index])
    bad = files["reason"] != ""
    return files[~bad].drop(columns="reason").reset_index(drop=True), files[bad].drop(columns="sha1")


def verify(rows: pd.DataFrame, what: str = "the prepared data", workers: int = 8) -> pd.DataFrame:
    """rows (path and sha1 columns) if every file still has the content prepare saw, else a
    one-line error naming the changed and missing files: training on other images than the
    manifest lists would make its digest, and every result that cites it, wrong.

    A file is hashed once per process while its size, mtime and inode stay the same."""
    with ThreadPoolExecutor(workers) as pool:
        now = list(pool.map(_current_sha1, rows["path"]))
    bad = [(path, "missing" if sha1 is None else "changed")
           for path, sha1, then in zip(rows["path"], now, rows["sha1"]) if sha1 != then]
    if bad:
        examples = ", ".join(f"{printable(path)} {how}" for path, how in bad[:3])
        raise PipelineError(f"{len(bad)} of {len(rows)} image(s) of {what} changed or missing since prepare "
                            f"({examples}{', ...' if len(bad) > 3 else ''}): run prepare again")
    return rows


def _current_sha1(path: str) -> str | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _sha1(path, st.st_size, st.st_mtime_ns, st.st_ino)


@functools.lru_cache(maxsize=2**17)
def _sha1(path: str, size: int, mtime_ns: int, inode: int) -> str | None:
    try:
        return hashlib.sha1(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def cap(files: pd.DataFrame, max_per_class: int, seed: int) -> pd.DataFrame:
    """At most max_per_class images per (pool, class), sampled with seed; 0 keeps everything.
    Rows skipped while walking (a reason) are kept, to be listed."""
    if not max_per_class:
        return files
    skipped = files["reason"] != "" if "reason" in files else pd.Series(False, index=files.index)
    shuffled = files[~skipped].sample(frac=1, random_state=seed)
    capped = shuffled.groupby(["pool", "label"]).head(max_per_class)
    return pd.concat([capped, files[skipped]]).sort_values("path")


def split(files: pd.DataFrame, how: str, val_fraction: float, test_fraction: float, seed: int,
          group: str = "") -> pd.DataFrame:
    """Assign each image to train, val or test, stratified by label; returns path, label, split, sha1.

    auto/official: the official test pool (a test folder) is the test split, else (auto only)
    test_fraction of the train pool is held out; the official val pool (a valid, validation or
    val folder) is the val split, else val_fraction of what is left of the train pool.
    random: all images, official folders included, are pooled, then test_fraction of them is held
    out for test and val_fraction of the rest for validation.
    group (a regex, unless random): images whose file names give the same group 1 in one class
    come from one source image, and a held-out split takes all of them or none (scikit-learn's
    StratifiedGroupKFold: its first fold of round(1 / fraction), so the fraction is approximate).
    """
    has = set(files["pool"])
    if how == "official" and "test" not in has:
        raise PipelineError("split=official but the dataset has no official test folder: use split=random")
    files = files.sort_values("path").reset_index(drop=True)
    pool = files if how == "random" else files[files["pool"] == "train"]
    group = "" if how == "random" else group
    if how != "random" and "test" in has:
        test = files[files["pool"] == "test"]
    else:
        pool, test = _stratified(pool, test_fraction, seed, "test", group)
    if how != "random" and "val" in has:
        train, val = pool, files[files["pool"] == "val"]
    else:
        train, val = _stratified(pool, val_fraction, seed, "validation", group)
    parts = [train.assign(split="train"), val.assign(split="val"), test.assign(split="test")]
    return pd.concat(parts)[["path", "label", "split", "sha1"]].reset_index(drop=True)


def split_sources(files: pd.DataFrame, how: str, group: str = "") -> dict[str, str]:
    """How split made each split of files, in words, for prepare's output."""
    has = set(files["pool"])
    official = {name: how != "random" and name in has for name in ("val", "test")}
    held = "held out by source image, stratified" if group and how != "random" else "held out at random, stratified"
    return {"train": "the train folder" if any(official.values()) else "all images",
            "val": "the official validation folder" if official["val"] else held,
            "test": "the official test folder" if official["test"] else held}


def _stratified(frame: pd.DataFrame, fraction: float, seed: int, what: str, group: str = ""):
    if group:
        return _grouped(frame, fraction, seed, what, group)
    try:
        return train_test_split(frame, test_size=fraction, random_state=seed, stratify=frame["label"])
    except ValueError as e:
        counts = frame["label"].value_counts()
        raise PipelineError(f"cannot hold out {fraction:g} for {what} with {counts.min()} image(s) in class "
                            f"{counts.idxmin()!r} of {len(frame)} ({e}): add images or change the fractions") from None


def source_ids(frame: pd.DataFrame, group: str) -> pd.Series:
    """Each row's source image, "<label>/<group 1 of group in the file name>" (numbers restart in
    each class folder); a file whose name has no such group is its own source (its path)."""
    source = frame["path"].map(lambda path: Path(path).name).str.extract(group, expand=False)
    return frame["label"] + "/" + source.fillna(frame["path"])


def _grouped(frame: pd.DataFrame, fraction: float, seed: int, what: str, group: str):
    """Hold out about fraction of frame, stratified, keeping each source image's files together."""
    groups = source_ids(frame, group)
    folds = StratifiedGroupKFold(max(2, round(1 / fraction)), shuffle=True, random_state=seed)
    sources = groups.groupby(frame["label"]).nunique()
    try:
        kept, held = next(folds.split(frame, frame["label"], groups))
    except ValueError:  # fewer source images than folds
        kept = held = []
    if any(set(frame["label"]) - set(frame["label"].iloc[part]) for part in (kept, held)):
        raise PipelineError(f"cannot hold out {fraction:g} for {what} by source image: class {sources.idxmin()!r} has "
                            f"images of {sources.min()} source image(s), too few for both sides: add images of "
                            "other sources or change the fractions")
    return frame.iloc[kept], frame.iloc[held]


def digest(manifest: pd.DataFrame) -> str:
    """Content digest of a manifest: file bytes, labels and splits; not where the files live."""
    rows = manifest.sort_values(["sha1", "label", "split"])[["sha1", "label", "split"]]
    return hashlib.sha256(rows.to_csv(index=False).encode()).hexdigest()[:16]
