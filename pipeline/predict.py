"""Step: classify image files with a logged model and write one CSV row per file.

The model says how to read images (image_size) and what the classes are (class_names), from its
model card (pipeline.card): nothing is re-listed or re-typed here.
"""

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from tqdm import tqdm

from pipeline import datasets
from pipeline.config import PipelineError, PredictConfig
from pipeline.keys import class_keys
from pipeline.tracking import entry_point_run


@dataclass(frozen=True)
class PredictResult:
    output: str  # the CSV written
    predicted: int  # files classified
    skipped: int  # unreadable files, listed in the CSV with an error


def predict(cfg: PredictConfig) -> PredictResult:
    """Classify every image under cfg.input with cfg.model and write cfg.output.

    The CSV has path, predicted, confidence (the top probability), p_<class> per class and
    error: files that do not decode as an image have only path and error (why), in the same
    listing, never silently dropped. The file appears whole or not at all.

    Under `mlflow run -e predict` MLflow's run gets the CSV as an artifact and the counts as
    metrics: n_predicted, n_skipped, predicted/<class> (files per predicted class).
    """
    with entry_point_run("predict", cfg) as run:
        result, predicted, class_names = _classify(cfg)
        if run:
            _log_to_run(Path(cfg.output), predicted, class_names, result.skipped)
    return result


def _classify(cfg: PredictConfig) -> tuple[PredictResult, pd.Series, list[str]]:
    """(predict's result, the classified files' predicted classes, the model's class names)."""
    files = datasets.files_at(cfg.input)  # a missing input fails before TensorFlow starts
    usable, skipped = datasets.check_images(files)
    if usable.empty:
        raise PipelineError(f"no readable image in {cfg.input} ({len(skipped)} file(s) skipped, e.g. "
                            f"{skipped['path'].iloc[0]}: {skipped['reason'].iloc[0]})")
    from pipeline.card import load_model  # TensorFlow: only once there is something to classify

    model, card, _ = load_model(cfg.model)
    probs = file_probabilities(model, card, usable["path"].tolist(), cfg.engine, cfg.batch_size, progress=True)
    table = _table(usable["path"], probs, card.class_names, skipped)
    _write_atomically(table, Path(cfg.output))
    print(f"wrote {len(usable)} prediction(s) to {cfg.output}"
          + (f"; skipped {len(skipped)} unreadable file(s), listed there with an error" if len(skipped) else ""))
    return PredictResult(cfg.output, len(usable), len(skipped)), table["predicted"].iloc[:len(usable)], card.class_names


def _log_to_run(output: Path, predicted: pd.Series, class_names: list[str], skipped: int) -> None:
    """The CSV and its counts (predicted: the classified files' classes), on the active run."""
    counts, keys = predicted.value_counts(), class_keys(class_names)
    mlflow.log_metrics({"n_predicted": len(predicted), "n_skipped": skipped,
                        **{f"predicted/{keys[c]}": int(counts.get(c, 0)) for c in class_names}})
    mlflow.log_artifact(str(output))


def file_probabilities(model, card, paths: list[str], engine: str, batch_size: int, progress: bool = False
                       ) -> np.ndarray:
    """A whole model's class probabilities for image files (decoded as in training), on engine."""
    from pipeline.data import load_images
    from pipeline.engine import compile_classifier

    runner = compile_classifier(model, card.config, len(card.class_names), engine, card.precision)
    starts = range(0, len(paths), batch_size)
    starts = tqdm(starts, desc="predict", unit="batch") if progress else starts
    batches = (load_images(paths[i:i + batch_size], card.image_size) for i in starts)
    return runner.run(batches, np.empty((len(paths), len(card.class_names)), np.float32))


def _table(paths: pd.Series, probs: np.ndarray, class_names: list[str], skipped: pd.DataFrame) -> pd.DataFrame:
    """path plus the served model's columns (pipeline.serving.prediction_table): the classified
    files, then the skipped ones with their error."""
    from pipeline.serving import prediction_table

    failed = np.full((len(skipped), len(class_names)), np.nan, np.float32)
    errors = [None] * len(paths) + skipped["reason"].tolist()
    table = prediction_table(np.concatenate([probs, failed]), class_names, errors)
    return pd.concat([pd.DataFrame({"path": [*paths, *skipped["path"]]}), table], axis=1)


def _write_atomically(table: pd.DataFrame, output: Path) -> None:
    """Write to a temporary file beside output, then rename: readers never see half a CSV."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            table.to_csv(f, index=False)
        os.replace(tmp, output)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
