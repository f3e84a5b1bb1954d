"""The prepared data that prepare logs and train and evaluate read back, by URI.

A prepared-data folder holds manifest.csv (path, label, split, sha1) and dataset.json (name,
digest, class names, counts). Steps hand each other its URI (runs:/<prepare run>/data).
"""

import json
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
    manifest: pd.DataFrame

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split with a label_index column in class_names order; fails in one line if
        a file changed or went missing since prepare (pipeline.datasets.verify)."""
        rows = verify(self.manifest[self.manifest["split"] == name], f"the {name} split")
        return rows.assign(label_index=rows["label"].map(self.class_names.index))

    def mlflow_dataset(self, split: str | None = None):
        frame = self.manifest if split is None else self.manifest[self.manifest["split"] == split]
        return mlflow.data.from_pandas(frame, name=self.name, digest=self.digest, targets="label")

    def save(self, folder: Path) -> None:
        self.manifest.to_csv(folder / "manifest.csv", index=False)
        info = {"name": self.name, "digest": self.digest, "class_names": self.class_names}
        (folder / "dataset.json").write_text(json.dumps(info, indent=2))


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
    return PreparedData(info["name"], info["digest"], info["class_names"], manifest)
