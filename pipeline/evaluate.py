"""Step 3: score a logged model on the test split. The only step that reads the test split."""

import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline import prepared
from pipeline.config import EvaluateConfig, PipelineError
from pipeline.data import make_dataset
from pipeline.features import FeatureBatches, model_features
from pipeline.keys import class_keys
from pipeline.plots import confusion_matrix
from pipeline.tracking import step_run

# Copied onto the model's training run so that runs compare on test figures in the MLflow UI.
SUMMARY = ("test_accuracy", "test_loss", "test_macro_f1", "test_roc_auc")


@dataclass(frozen=True)
class EvaluateResult:
    run_id: str
    metrics: dict[str, float]


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> tuple[dict, pd.DataFrame]:
    """Test metrics of class probabilities against integer labels, and the confusion matrix.

    Returns test_loss, test_accuracy, test_macro_f1, test_roc_auc (one-vs-rest, macro; absent
    when a class has no test image) and test_{precision,recall,f1}/<class>.
    """
    labels = list(range(len(class_names)))
    y_pred = probs.argmax(axis=1)
    p, r, f1, _ = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "test_loss": skm.log_loss(y_true, probs, labels=labels),
        "test_accuracy": skm.accuracy_score(y_true, y_pred),
        "test_macro_f1": skm.f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0),
    }
    if len(np.unique(y_true)) == len(labels):
        scores = probs[:, 1] if len(labels) == 2 else probs
        out["test_roc_auc"] = skm.roc_auc_score(y_true, scores, multi_class="ovr", labels=labels)
    keys = class_keys(class_names)
    for i, name in enumerate(class_names):
        key = keys[name]
        out |= {f"test_precision/{key}": p[i], f"test_recall/{key}": r[i], f"test_f1/{key}": f1[i]}
    cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
    return {k: float(v) for k, v in out.items()}, pd.DataFrame(cm, index=class_names, columns=class_names)


def evaluate(cfg: EvaluateConfig, run_id: str | None = None) -> EvaluateResult:
    """Score cfg.model on the test split of cfg.data, in a run of its own or in the run run_id.

    Logs: the metrics of compute_metrics; confusion_matrix.csv and plots/confusion_matrix.png;
    predictions.csv (path, label, predicted, one probability column per class). The summary
    metrics also go onto the run that logged the model.
    """
    data = prepared.load(cfg.data)
    test = data.split("test")
    if test.empty:
        raise PipelineError(f"the prepared data at {cfg.data!r} has no test split")
    model, info = load_model(cfg.model)
    if info.metadata["class_names"] != data.class_names:
        raise PipelineError(f"model classes {info.metadata['class_names']} differ from the data's "
                            f"{data.class_names}: evaluate the model on the dataset it was trained on")
    with step_run("evaluate", cfg, data.name, run_id=run_id) as run:
        mlflow.log_input(data.mlflow_dataset("test"), context="test")
        probs = _predict(model, info.metadata, test, cfg)
        scores, cm = compute_metrics(test["label_index"].to_numpy(), probs, data.class_names)
        mlflow.log_metrics(scores)
        mlflow.set_tags({"model_uri": cfg.model, "source_run_id": info.run_id or ""})
        _log_tables(cm, test, probs, data.class_names)
    if info.run_id and info.run_id != run.info.run_id:
        for key in SUMMARY:
            if key in scores:
                mlflow.tracking.MlflowClient().log_metric(info.run_id, key, scores[key])
    print(" ".join(f"{k}={scores[k]:.4f}" for k in SUMMARY if k in scores))
    return EvaluateResult(run.info.run_id, scores)


def _predict(model, metadata: dict, rows: pd.DataFrame, cfg: EvaluateConfig) -> np.ndarray:
    """Class probabilities for rows; a frozen-backbone model runs its head on cached features."""
    if cfg.feature_cache == "auto" and metadata.get("config", {}).get("fine_tune") == "none":
        features, _ = model_features(model, rows, metadata["precision"], cfg.cache_dir, cfg.batch_size)
        labels = rows["label_index"].to_numpy("int32")
        return model.get_layer("head").predict(FeatureBatches(features, labels, cfg.batch_size), verbose=0)
    return model.predict(make_dataset(rows, metadata["image_size"], cfg.batch_size), verbose=0)


def load_model(uri: str):
    """(Keras model, mlflow ModelInfo with the metadata) of a model logged by train, or a one-line error."""
    try:
        return mlflow.keras.load_model(uri), mlflow.models.get_model_info(uri)
    except Exception as e:
        raise PipelineError(f"cannot load model {uri!r} ({type(e).__name__}): pass a model URI logged by "
                            "train, e.g. runs:/<id>/model or models:/<name>@champion") from None


def _log_tables(cm: pd.DataFrame, test: pd.DataFrame, probs: np.ndarray, class_names: list[str]) -> None:
    predictions = test[["path", "label"]].assign(predicted=[class_names[i] for i in probs.argmax(axis=1)])
    predictions[[f"p_{c}" for c in class_names]] = probs
    with tempfile.TemporaryDirectory() as tmp:
        cm.to_csv(Path(tmp) / "confusion_matrix.csv")
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        mlflow.log_artifacts(tmp)
    mlflow.log_figure(confusion_matrix(cm), "plots/confusion_matrix.png")
