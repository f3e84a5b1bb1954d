"""The prepared data that prepare logs and train and evaluate read back, by URI.

A prepared-data folder holds manifest.csv (path, label, split, sha1) and dataset.json (name,
digest, class names, root). Steps hand each other its URI (runs:/<prepare run>/data).

Manifest paths are relative to the data root, the folder that holds the dataset (for a preset
the folder given as data_dir or $PIPELINE_DATA_DIR; for a folder dataset its parent), so data
prepared on one machine trains on another: each machine finds the images under its own
$PIPELINE_DATA_DIR (or $PIPELINE_DATA_DIR/<name>), else under the root recorded at prepare.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.config import PipelineError
from pipeline.datasets import digest, verify

ARTIFACT_PATH = "data"


@dataclass(frozen=True)
class PreparedData:
    name: str
    digest: str
    class_names: list[str]
    manifest: pd.DataFrame  # absolute paths on this machine
    root: str = ""  # the data root the manifest's paths were made relative to, on the preparing machine

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split with a label_index column in class_names order; fails in one line if
        a file changed or went missing since prepare (pipeline.datasets.verify)."""
        rows = verify(self.manifest[self.manifest["split"] == name], f"the {name} split")
        return rows.assign(label_index=rows["label"].map(self.class_names.index))

    def mlflow_dataset(self, split: str | None = None):
        frame = self.manifest if split is None else self.manifest[self.manifest["split"] == split]
        return mlflow.data.from_pandas(frame, name=self.name, digest=self.digest, targets="label")

    def save(self, folder: Path) -> None:
        """manifest.csv with paths relative to root, and dataset.json."""
        relative = self.manifest["path"].map(lambda p: os.path.relpath(p, self.root)) if self.root else None
        self.manifest.assign(**({"path": relative} if self.root else {})).to_csv(folder / "manifest.csv", index=False)
        info = {"name": self.name, "digest": self.digest, "class_names": self.class_names, "root": self.root}
        (folder / "dataset.json").write_text(json.dumps(info, indent=2))


def data_root(source) -> str:
    """The folder a dataset's manifest paths are relative to: for a preset the folder holding its
    Kaggle layout (<data_dir> or <data_dir>/<name>), for a folder dataset the folder's parent."""
    from pipeline.datasets import PRESETS

    top = Path(os.path.commonpath([source.train, *([source.test] if source.test else [])]))
    preset = PRESETS.get(source.name)
    layout = Path(preset.root).parts if preset else ()
    if layout and top.parts[-len(layout):] == layout:
        return str(Path(*top.parts[:-len(layout)]))
    return str(top.parent)


def _resolve(manifest: pd.DataFrame, name: str, root: str) -> pd.DataFrame:
    """The manifest with absolute paths of this machine: relative paths are looked for under
    $PIPELINE_DATA_DIR, $PIPELINE_DATA_DIR/<name>, then the root recorded at prepare."""
    if not root or manifest.empty:
        return manifest
    env = os.environ.get("PIPELINE_DATA_DIR", "")
    candidates = [*([env, os.path.join(env, name)] if env else []), root]
    first, sample = manifest["path"].iloc[0], manifest["path"].iloc[:: max(1, len(manifest) // 20)]
    for base in candidates:  # the root that holds the images (a few may be missing: verify names them)
        if any(os.path.isfile(os.path.join(base, p)) for p in sample):
            return manifest.assign(path=[os.path.join(base, p) for p in manifest["path"]])
    raise PipelineError(f"the images of prepared data {name!r} are not on this machine: {first} is under none of "
                        f"{', '.join(candidates)}; set PIPELINE_DATA_DIR to the folder that holds them here")


def load(uri: str) -> PreparedData:
    """Read prepared data from a URI (runs:/<id>/data) or a local folder; a missing, unreadable or
    damaged piece (its manifest no longer matches the digest) is named in a one-line error."""
    hint = f"pass the data URI that prepare printed, e.g. runs:/<id>/{ARTIFACT_PATH}, or run prepare again"
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
    except Exception as e:
        raise PipelineError(f"cannot read prepared data at {uri!r} ({type(e).__name__}): {hint}") from None
    try:
        info = json.loads((folder / "dataset.json").read_text())
        # Labels are text, whatever they look like ("1", "NA", "None"): no type guessing, no NaN.
        manifest = pd.read_csv(folder / "manifest.csv", dtype=str, keep_default_na=False)
        intact = info["digest"] == digest(manifest)
    except Exception as e:
        piece = getattr(e, "filename", None) or "dataset.json or manifest.csv"
        raise PipelineError(f"prepared data at {uri!r} lacks a readable {Path(str(piece)).name} "
                            f"({type(e).__name__}): {hint}") from None
    if not intact:
        raise PipelineError(f"prepared data at {uri!r}: manifest.csv does not match the digest in dataset.json "
                            f"(damaged or half-written): {hint}")
    root = info.get("root", "")  # absent in data prepared before paths were relative: absolute paths
    return PreparedData(info["name"], info["digest"], info["class_names"], _resolve(manifest, info["name"], root), root)
