"""Step 1: find the dataset, check every image, split it, and log the manifest."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pandas as pd

from pipeline import datasets
from pipeline.config import PipelineError, PrepareConfig
from pipeline.keys import class_keys
from pipeline.prepared import ARTIFACT_PATH, PreparedData, data_root
from pipeline.storage import ensure_space, local_folder
from pipeline.tracking import log_input, step_run


@dataclass(frozen=True)
class PrepareResult:
    run_id: str
    data_uri: str  # hand this to train and evaluate
    digest: str
    counts: pd.DataFrame  # images per class (rows) and split (columns)
    skipped: int


def prepare(cfg: PrepareConfig, run_id: str | None = None) -> PrepareResult:
    """Scan cfg.dataset, skip unreadable files, split, and log the result under data/ of a run of
    its own or of the run run_id.

    Logs: data/manifest.csv, data/dataset.json, data/counts.csv, data/skipped.csv; the manifest
    as an MLflow dataset input with its content digest; metrics n_train, n_val, n_test,
    n_skipped and count/<split>/<class> (the class's key of pipeline.keys). Fails before
    starting a run if the dataset is missing or has fewer than two classes or an empty class
    folder. An official validation folder (valid/, validation/ or val/ beside train/) is the val
    split unless split=random; the output says where each split came from.
    """
    source = datasets.locate(cfg.dataset, cfg.data_dir)
    files = datasets.scan(source)
    with step_run("prepare", cfg, source.name, run_id=run_id) as run:
        files = datasets.cap(files, cfg.max_per_class, cfg.seed)
        usable, skipped = datasets.check_images(files)
        _require_every_class(files, usable)
        manifest = datasets.split(usable, cfg.split, cfg.val_fraction, cfg.test_fraction, cfg.seed, source.group)
        data = PreparedData(source.name, datasets.digest(manifest), sorted(manifest["label"].unique()), manifest,
                            root=data_root(source))
        counts = pd.crosstab(manifest["label"], manifest["split"]).reindex(columns=["train", "val", "test"])
        _log(data, counts, skipped)
    _print(counts, datasets.split_sources(usable, cfg.split, source.group), skipped)
    return PrepareResult(run.info.run_id, f"runs:/{run.info.run_id}/{ARTIFACT_PATH}", data.digest, counts,
                         len(skipped))


def _require_every_class(files: pd.DataFrame, usable: pd.DataFrame) -> None:
    for pool, label in files[["pool", "label"]].drop_duplicates().itertuples(index=False):
        if not ((usable["pool"] == pool) & (usable["label"] == label)).any():
            raise PipelineError(f"class {label!r} has no readable image in the {pool} folder: "
                                "add images or remove the class folder")


def _log(data: PreparedData, counts: pd.DataFrame, skipped: pd.DataFrame) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data.save(Path(tmp))
        counts.to_csv(Path(tmp) / "counts.csv")
        skipped.to_csv(Path(tmp) / "skipped.csv", index=False)
        if (folder := local_folder(mlflow.get_artifact_uri())) is not None:
            ensure_space(folder, sum(f.stat().st_size for f in Path(tmp).iterdir()), "the prepared data")
        mlflow.log_artifacts(tmp, ARTIFACT_PATH)
    log_input(data.mlflow_dataset(), "prepare")
    mlflow.set_tag("data_digest", data.digest)
    totals = {f"n_{split}": int(n) for split, n in counts.sum().items()}
    keys = class_keys(counts.index)
    per_class = {f"count/{split}/{keys[label]}": int(n) for split in counts for label, n in counts[split].items()}
    mlflow.log_metrics({**totals, **per_class, "n_skipped": len(skipped)})


def _print(counts: pd.DataFrame, sources: dict[str, str], skipped: pd.DataFrame) -> None:
    print(counts.to_string())
    print("; ".join(f"{split}: {how}" for split, how in sources.items()))
    if len(skipped):
        reasons = skipped["reason"].str.split(":").str[0].value_counts()
        print(f"skipped {len(skipped)} file(s), listed in data/skipped.csv: "
              + ", ".join(f"{n} {why}" for why, n in reasons.items()))
