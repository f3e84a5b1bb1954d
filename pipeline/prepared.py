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

ARTIFACT_PATH = "data"


@dataclass(frozen=True)
class PreparedData:
    name: str
    digest: str
    class_names: list[str]
    manifest: pd.DataFrame

    def split(self, name: str) -> pd.DataFrame:
        """Rows of one split with a label_index column in class_names order."""
        rows = self.manifest[self.manifest["split"] == name]
        return rows.assign(label_index=rows["label"].map(self.class_names.index))

    def mlflow_dataset(self, split: str | None = None):
        frame = self.manifest if split is None else self.manifest[self.manifest["split"] == split]
        return mlflow.data.from_pandas(frame, name=self.name, digest=self.digest, targets="label")

    def save(self, folder: Path) -> None:
        self.manifest.to_csv(folder / "manifest.csv", index=False)
        info = {"name": self.name, "digest": self.digest, "class_names": self.class_names}
        (folder / "dataset.json").write_text(json.dumps(info, indent=2))


def load(uri: str) -> PreparedData:
    """Read prepared data from a URI (runs:/<id>/data) or a local folder."""
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        info = json.loads((folder / "dataset.json").read_text())
        manifest = pd.read_csv(folder / "manifest.csv")
    except Exception as e:
        raise PipelineError(f"cannot read prepared data at {uri!r} ({type(e).__name__}): "
                            f"pass the data URI that prepare printed, e.g. runs:/<id>/{ARTIFACT_PATH}") from None
    return PreparedData(info["name"], info["digest"], info["class_names"], manifest)
