"""Frozen-backbone feature cache: run ResNet50 over a split once, train heads on the result.

With the backbone frozen, its output for an image never changes, so every epoch, grid point and
trial can train the small head on stored features instead of images. Features are computed by
the engine of pipeline.engine (OpenVINO on CPUs), checked against TensorFlow float32 on a few
images, and stored in float16 as a .npy file that is memory-mapped, never loaded whole.

An entry's key is the content of the rows (their files' sha1 in order), what the backbone's
weights are (pipeline.model.backbone_identity), the image size, the engine, the precision and how
images are decoded (pipeline.data.DECODING): a
changed input never meets a stale entry. meta.json, written last, records the file's size, an
Adler-32 checksum of its bytes and the digest of the backbone's weight values; an entry whose
file is truncated, damaged or overwritten is rebuilt (with a note). The file is allocated whole
before it is written, so a full disk is one line, not a crash. Writes go to files named for the
writing process and are renamed into place, so concurrent workers can share an entry.
"""

import errno
import functools
import hashlib
import json
import math
import os
import time
import uuid
import zlib
from dataclasses import dataclass, replace
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pipeline import engine as engines
from pipeline.config import ModelParams, PipelineError, cache_folder
from pipeline.data import DECODING, make_dataset
from pipeline.model import backbone_identity, feature_model, resolve_precision, weights_digest

CHECK_IMAGES = 2  # images per extraction checked against TensorFlow float32 (200,704 values at 224 px; each image
# costs TensorFlow float32 about 0.2 s, the engine a few ms)


@dataclass(frozen=True)
class Backbone:
    """The frozen backbone whose features a head trains on, as the cache keys it."""
    weights: str
    image_size: int
    seed: int
    engine: str  # resolved: openvino or tensorflow
    precision: str  # resolved

    @classmethod
    def of(cls, cfg: ModelParams) -> "Backbone":
        return cls(cfg.weights, cfg.image_size, cfg.seed, engines.resolve_engine(cfg.engine),
                   resolve_precision(cfg.precision))

    @functools.cached_property
    def identity(self) -> str:
        return backbone_identity(self.weights, self.seed)

    def build(self, policy: str) -> keras.Model:
        return feature_model(self.weights, self.image_size, self.seed, policy)


@dataclass(frozen=True)
class Features:
    """A split's features (read-only float16 memmap, one row per image) and where they came from."""
    array: np.ndarray
    hit: bool  # found in the cache
    backbone_digest: str  # digest of the weight values that computed them
    rel_error: float  # of the engine against TensorFlow float32 at extraction (nan if not checked)
    seconds: float  # extraction's wall clock (0 for a hit)
    backbone: Backbone  # what computed them (float32 where the reduced precision failed the check)


def split_features(backbone: Backbone, rows: pd.DataFrame, cache_dir: str = "", batch_size: int = 32) -> Features:
    """The backbone's features of rows, from the cache or extracted into it.

    Features in a reduced precision that differ from TensorFlow float32's past the engine's bound
    are extracted in float32 instead, with a note, and so are the next splits of that backbone in
    this process (Features.backbone says which): a ResNet50 trained from scratch here gave OpenVINO
    bfloat16 features 22% off (TensorFlow's own bfloat16: 1%, OpenVINO float32: 0)."""
    backbone = _FLOAT32_INSTEAD.get(backbone, backbone)
    try:
        return cached_features(rows, backbone, cache_folder(cache_dir) / cache_key(rows, backbone), batch_size)
    except engines.EngineMismatch as e:
        if backbone.precision == "float32":
            raise
        print(f"engine {backbone.engine} ({backbone.precision}) differs from TensorFlow float32 by {e.error:.1%} on "
              f"this backbone (bound {e.bound:.0%}): its features in float32 instead")
        _FLOAT32_INSTEAD[backbone] = replace(backbone, precision="float32")
        return split_features(backbone, rows, cache_dir, batch_size)


_FLOAT32_INSTEAD: dict[Backbone, Backbone] = {}  # a backbone whose reduced precision failed the check -> its float32


def cache_key(rows: pd.DataFrame, backbone: Backbone) -> str:
    h = hashlib.sha256("\n".join(rows["sha1"]).encode())
    h.update(f"{backbone.identity}|{backbone.image_size}|{backbone.engine}|{backbone.precision}|"
             f"keras {keras.__version__}|{engine_version(backbone.engine)}|{DECODING}".encode())
    return h.hexdigest()[:24]


def engine_version(engine: str) -> str:
    if engine == "openvino":
        import openvino

        return f"openvino {openvino.__version__}"
    import tensorflow as tf

    return f"tensorflow {tf.__version__}"


def cached_features(rows: pd.DataFrame, backbone: Backbone, folder: Path, batch_size: int = 32) -> Features:
    found = _load(folder)
    if found is not None and len(found[0]) == len(rows):
        return Features(found[0], True, found[1]["backbone_digest"], float("nan"), 0.0, backbone)
    return _extract(rows, backbone, folder, batch_size)


def _load(folder: Path) -> tuple[np.ndarray, dict] | None:
    """(memmap, meta) of a whole, undamaged entry; None if there is none (or a note and None if it is damaged)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
        stat = (folder / "features.npy").stat()
        if stat.st_size != meta["bytes"]:
            return None
        features = _mapped(str(folder / "features.npy"), stat.st_ino, stat.st_size)
        if _verified_checksum(str(folder / "features.npy"), stat.st_ino, stat.st_size, stat.st_mtime_ns) != meta["adler32"]:
            print(f"feature cache entry {folder} is damaged (checksum differs): extracting it again")
            return None
        return features, meta
    except (OSError, ValueError, KeyError):
        return None


@functools.lru_cache(maxsize=8)
def _mapped(path: str, inode: int, size: int) -> np.ndarray:
    """One mapping per cache file (and inode: a rebuilt entry is a new file) in this process.

    Every grid point or trial that reads the same features shares it; a new mapping per point
    would count the same pages in the resident memory once per point (18 GB for the full grid)."""
    return np.load(path, mmap_mode="r")


@functools.lru_cache(maxsize=8)
def _verified_checksum(path: str, inode: int, size: int, mtime_ns: int) -> int:
    """The checksum of a cache file, computed once per process and version of the file."""
    return _scan(_mapped(path, inode, size), check_finite=False)[0]


def _blocks(features: np.ndarray, rows: int = 256):
    for start in range(0, len(features), rows):
        yield features[start:start + rows]


def _scan(features: np.ndarray, check_finite: bool = True) -> tuple[int, bool]:
    """(Adler-32 of an array's bytes, whether every value is finite), in one pass block by block:
    a memmap is never copied whole."""
    value, finite = 1, True
    for block in _blocks(features):
        value = zlib.adler32(np.ascontiguousarray(block).view(np.uint8), value)
        finite = finite and (not check_finite or bool(np.isfinite(block).all()))
    return value, finite


@functools.lru_cache(maxsize=2)
def _runner(backbone: Backbone, cache_dir: str = "") -> tuple[engines.Runner, str, object]:
    """(compiled extractor, digest of its weights, its builder), once per process and backbone;
    converted for OpenVINO once per backbone in cache_dir's ir_cache."""
    build = functools.lru_cache(maxsize=2)(backbone.build)
    runner = engines.compile_model(build, backbone.engine, backbone.precision, engines.ir_cache(cache_dir))
    return runner, weights_digest(build("float32").get_layer("resnet50")), build


def _extract(rows: pd.DataFrame, backbone: Backbone, folder: Path, batch_size: int) -> Features:
    """Write the features of rows to folder with a progress bar, meta.json last; its Features.

    Several processes (tune's workers) may extract the same entry at once: each writes files of
    its own (name with its pid) and renames them into place, so a reader sees a whole entry or
    none, and the last writer's identical files win.
    """
    start_time = time.perf_counter()
    runner, digest, build = _runner(backbone, str(folder.parent))  # the converted backbone beside the features
    own = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = folder / f"features.{own}.partial.npy"
    out = _allocate(partial, (len(rows), *runner.output_shape))
    try:
        batches = make_dataset(rows.assign(label_index=0), backbone.image_size, batch_size)
        rel_error = float("nan")
        progress = keras.utils.Progbar(len(rows), unit_name="image")

        def images():
            nonlocal rel_error
            for i, (batch, _) in enumerate(batches):
                batch = batch.numpy()
                if i == 0:
                    rel_error = engines.check_against_reference(runner, build, batch[:CHECK_IMAGES])
                yield batch
                progress.add(len(batch))

        runner.run(images(), out)
        checksum, finite = _scan(out)
        if not finite:
            raise PipelineError(f"the backbone gave non-finite features ({backbone.engine}, {backbone.precision}): "
                                "check the weights, or use precision=float32")
        out.flush()
        meta = {"shape": list(out.shape), "bytes": partial.stat().st_size, "rows": len(rows),
                "adler32": checksum, "backbone_digest": digest, "engine": backbone.engine,
                "precision": backbone.precision, "rel_error": rel_error}
        del out
        os.replace(partial, folder / "features.npy")
        (folder / f"meta.{own}.json").write_text(json.dumps(meta))
        os.replace(folder / f"meta.{own}.json", folder / "meta.json")
    finally:
        partial.unlink(missing_ok=True)
    found = _load(folder)  # this process's file, or another writer's identical one
    if found is None:
        raise PipelineError(f"feature cache entry {folder} could not be read back after writing it: "
                            "check the folder's disk, or set cache_dir to another folder")
    return Features(found[0], False, digest, rel_error, time.perf_counter() - start_time, backbone)


def _allocate(path: Path, shape: tuple) -> np.ndarray:
    """A float16 .npy memmap of shape at path, its blocks allocated up front: a full disk fails
    here with one line instead of killing the process (SIGBUS) in the middle of writing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
        return out
    except OSError as e:
        if path.is_file():
            path.unlink()
        need = f"this entry needs {math.prod(shape) * 2 / 2**20:,.0f} MB: free space there, or "
        raise PipelineError(f"cannot write the feature cache in {path.parent.parent} ({e.strerror or e}): "
                            f"{need if e.errno == errno.ENOSPC else ''}set cache_dir (or $PIPELINE_CACHE_DIR) "
                            "to a writable folder with room") from None


class FeatureBatches(keras.utils.PyDataset):
    """(features, labels) batches from a memmap, in a new seeded order each epoch if shuffled;
    without a last, smaller batch if drop_remainder.

    Batches stay float16 (the head's first layer casts them): converting to float32 in Python
    cost more than the whole training step."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None,
                 drop_remainder: bool = False):
        super().__init__()
        self.features, self.labels, self.batch_size, self.drop_remainder = features, labels, batch_size, drop_remainder
        self.rng = np.random.default_rng(seed) if seed is not None else None
        self.order = np.arange(len(labels))
        self.on_epoch_end()

    def __len__(self):
        return (math.floor if self.drop_remainder else math.ceil)(len(self.labels) / self.batch_size)

    def __getitem__(self, i):
        index = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted: sequential reads
        return self.features[index], self.labels[index]

    def on_epoch_end(self):
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.labels))
