"""Frozen-backbone feature cache: run ResNet50 over a split once, train heads on the result.

With the backbone frozen, its output for an image never changes, so every epoch, grid point and
trial can train the small head on stored features instead of images. Features are stored in
float16 as a .npy file that is memory-mapped, never loaded whole. An entry's key is the content
of the rows (their files' sha1 in order), the backbone's weights (a digest of the weights
themselves, so any change of weights or seed misses), the image size and the precision; a
changed input therefore never meets a stale entry. meta.json is written last and records the
file's size, so a truncated or half-written entry is detected and rebuilt. Writes go to files
named for the writing process and are renamed into place, so concurrent workers can share it.
"""

import functools
import hashlib
import json
import math
import os
import uuid
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from pipeline.data import make_dataset
from pipeline.model import feature_extractor


def cache_folder(cache_dir: str = "") -> Path:
    """cache_dir, else $PIPELINE_CACHE_DIR, else ~/.cache/resnet50-pipeline."""
    default = os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "resnet50-pipeline"
    return Path(cache_dir or default)


def model_features(model: keras.Model, rows: pd.DataFrame, precision: str, cache_dir: str = "",
                   batch_size: int = 32) -> tuple[np.ndarray, bool]:
    """The frozen backbone's features of rows for a model of pipeline.model, from the cache or extracted."""
    backbone = model.get_layer("resnet50")
    key = cache_key(rows, weights_digest(backbone), model.inputs[0].shape[1], precision)
    return cached_features(rows, feature_extractor(model), key, cache_folder(cache_dir), batch_size)


def weights_digest(model: keras.Model) -> str:
    """Digest of a model's weights (values and shapes)."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


def cache_key(rows: pd.DataFrame, backbone_digest: str, image_size: int, precision: str) -> str:
    h = hashlib.sha256("\n".join(rows["sha1"]).encode())
    h.update(f"{backbone_digest}|{image_size}|{precision}|keras {keras.__version__}".encode())
    return h.hexdigest()[:24]


def cached_features(rows: pd.DataFrame, extractor: keras.Model, key: str, cache_dir: Path,
                    batch_size: int = 32) -> tuple[np.ndarray, bool]:
    """(read-only float16 memmap of extractor's output for rows, whether it came from the cache)."""
    folder = Path(cache_dir) / key
    features = _load(folder)
    if features is not None and len(features) == len(rows):
        return features, True
    return _extract(rows, extractor, folder, batch_size), False


def _load(folder: Path):
    try:
        meta = json.loads((folder / "meta.json").read_text())
        stat = (folder / "features.npy").stat()
        if stat.st_size != meta["bytes"]:
            return None
        return _mapped(str(folder / "features.npy"), stat.st_ino, stat.st_size)
    except (OSError, ValueError, KeyError):
        return None


@functools.lru_cache(maxsize=8)
def _mapped(path: str, inode: int, size: int) -> np.ndarray:
    """One mapping per cache file (and inode: a rebuilt entry is a new file) in this process.

    Every grid point or trial that reads the same features shares it; a new mapping per point
    would count the same pages in the resident memory once per point (18 GB for the full grid)."""
    return np.load(path, mmap_mode="r")


def _extract(rows: pd.DataFrame, extractor: keras.Model, folder: Path, batch_size: int) -> np.ndarray:
    """Write the features of rows to folder, batch by batch, with a progress bar; meta.json last.

    Several processes (tune's workers) may extract the same entry at once: each writes files of
    its own (name with its pid) and renames them into place, so a reader sees a whole entry or
    none, and the last writer's identical files win. Returns the entry's memmap.
    """
    folder.mkdir(parents=True, exist_ok=True)
    shape = (len(rows), *extractor.output.shape[1:])
    own = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    partial = folder / f"features.{own}.partial.npy"
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float16, shape=shape)
    batches = make_dataset(rows.assign(label_index=0), extractor.input.shape[1], batch_size)
    progress = keras.utils.Progbar(math.ceil(len(rows) / batch_size), unit_name="batch")
    start = 0
    for images, _ in batches:
        block = np.asarray(extractor.predict_on_batch(images))
        out[start:start + len(block)] = block.astype(np.float16)
        start += len(block)
        progress.add(1)
    out.flush()
    del out
    meta = {"shape": list(shape), "bytes": partial.stat().st_size, "rows": len(rows)}
    os.replace(partial, folder / "features.npy")
    (folder / f"meta.{own}.json").write_text(json.dumps(meta))
    os.replace(folder / f"meta.{own}.json", folder / "meta.json")
    return _load(folder)  # this process's file, or another writer's identical one


class FeatureBatches(keras.utils.PyDataset):
    """(features, labels) batches from a memmap, in a new seeded order each epoch if shuffled.

    Batches stay float16 (the head's first layer casts them): converting to float32 in Python
    cost more than the whole training step."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, batch_size: int, seed: int | None = None):
        super().__init__()
        self.features, self.labels, self.batch_size = features, labels, batch_size
        self.rng = np.random.default_rng(seed) if seed is not None else None
        self.order = np.arange(len(labels))
        self.on_epoch_end()

    def __len__(self):
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, i):
        index = np.sort(self.order[i * self.batch_size:(i + 1) * self.batch_size])  # sorted: sequential reads
        return self.features[index], self.labels[index]

    def on_epoch_end(self):
        if self.rng is not None:
            self.order = self.rng.permutation(len(self.labels))
