"""Step 3: score a logged model on the test split. The only step that reads the test split."""

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from sklearn import metrics as skm

from pipeline import prepared
from pipeline.card import ModelCard, load_model
from pipeline.config import EvaluateConfig, PipelineError
from pipeline.data import make_dataset
from pipeline.engine import compile_classifier, resolve_engine
from pipeline.features import Backbone, split_features
from pipeline.keys import class_keys
from pipeline.model import resolve_precision
from pipeline.plots import confusion_matrix, log_figure
from pipeline.tracking import log_input, step_run

# Copied onto the model's training run so that runs compare on test figures in the MLflow UI.
SUMMARY = ("test_accuracy", "test_loss", "test_macro_f1", "test_roc_auc")
# The 8 flips and quarter turns of a batch of square images (n, size, size, channels), the identity first.
DIHEDRAL = tuple((lambda x, k=k, flip=flip: np.rot90(x[:, :, ::-1] if flip else x, k, axes=(1, 2)))
                 for flip in (False, True) for k in range(4))


def tta_views(tta: str, augment: str) -> int:
    """How many views of each test image evaluate averages: the 8 of DIHEDRAL for tta=dihedral, or
    for tta=auto and a model trained with augment=cells (it learnt that they are the same image); else 1."""
    return len(DIHEDRAL) if tta == "dihedral" or (tta == "auto" and augment == "cells") else 1


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
    """Score the logged model cfg.model on the test split of cfg.data, in a run of its own or in
    the run run_id. A frozen-backbone model runs its head on the cached features of the test
    images (pipeline.features); any other model runs whole on cfg.engine (pipeline.engine).

    Logs: the metrics of compute_metrics; confusion_matrix.csv and plots/confusion_matrix.png;
    predictions.csv (path, label, predicted, one probability column per class). The summary
    metrics also go onto the run that logged the model, with tta_views (the views scored per image)
    and, with test-time augmentation (tta_views > 1), test_accuracy_one_view: the metrics are then
    those of the views' mean probabilities, and the one-view figure is what predict and serving give.
    """
    data = prepared.load(cfg.data)
    test = _test_rows(data, cfg.data)
    model, card, source_run = load_model(cfg.model)
    if card.class_names != data.class_names:
        raise PipelineError(f"model classes {card.class_names} differ from the data's {data.class_names}: "
                            "evaluate the model on the dataset it was trained on")
    with step_run("evaluate", cfg, data.name, run_id=run_id) as run:
        probs = _model_probabilities(model, card, test, cfg, tta_views(cfg.tta, card.config.get("augment", "none")))
        scores = _log_scores(data, test, probs)
        mlflow.set_tags({"model_uri": cfg.model, "source_run_id": source_run or ""})
    if source_run and source_run != run.info.run_id:
        client = mlflow.MlflowClient()
        for key in (*SUMMARY, "tta_views", "test_accuracy_one_view"):
            if key in scores:
                client.log_metric(source_run, key, scores[key])
    return EvaluateResult(run.info.run_id, scores)


def evaluate_trained(trained, run_id: str, tta: str = "auto") -> EvaluateResult:
    """Score a model just trained (pipeline.train.Trained) on the test split of its data, into
    the run run_id (its train run): a head on the cached test features, nothing read back from
    the store. Logs as evaluate does (a head on cached features has one view: no tta)."""
    data, cfg = trained.data, trained.cfg
    test = _test_rows(data, cfg.data)
    with step_run("evaluate", cfg, data.name, run_id=run_id):
        if trained.is_head:
            features = split_features(trained.backbone, test, cfg.cache_dir, cfg.batch_size)
            probs = _head_probabilities(trained.model, features, cfg.batch_size)[None]
        else:
            probs = _run_whole(trained.model, asdict(cfg), len(data.class_names), test, cfg.engine, cfg.batch_size,
                               cache_dir=None,  # a new model: nothing will convert it again
                               views=tta_views(tta, cfg.augment))
        scores = _log_scores(data, test, probs)
    return EvaluateResult(run_id, scores)


def _test_rows(data: prepared.PreparedData, uri: str) -> pd.DataFrame:
    test = data.split("test")
    if test.empty:
        raise PipelineError(f"the prepared data at {uri!r} has no test split")
    return test


def _log_scores(data: prepared.PreparedData, test: pd.DataFrame, probs: np.ndarray) -> dict[str, float]:
    """Log the test metrics, tables and figure of probs, (views, images, classes), into the active
    run; print the summary. The metrics are those of the views' mean, with tta_views beside them
    and, for several views, test_accuracy_one_view (the first view's)."""
    log_input(data.mlflow_dataset("test"), "test")
    labels, mean = test["label_index"].to_numpy(), probs.mean(axis=0)
    scores, cm = compute_metrics(labels, mean, data.class_names)
    scores["tta_views"] = float(len(probs))
    if len(probs) > 1:
        scores["test_accuracy_one_view"] = float(np.mean(probs[0].argmax(axis=1) == labels))
    mlflow.log_metrics(scores)
    _log_tables(cm, test, mean, data.class_names)
    print(" ".join(f"{k}={scores[k]:.4f}" for k in SUMMARY if k in scores)
          + (f" (mean of {len(probs)} flips and turns; one view: test_accuracy={scores['test_accuracy_one_view']:.4f})"
             if len(probs) > 1 else ""))
    return scores


def _model_probabilities(model, card: ModelCard, rows: pd.DataFrame, cfg: EvaluateConfig, views: int) -> np.ndarray:
    """Class probabilities for rows, (views, images, classes); a frozen-backbone model scored on one
    view runs its head on cached features of the same backbone (checked by its weights' digest),
    any other model runs whole on cfg.engine."""
    if cfg.feature_cache == "auto" and card.frozen_backbone and views == 1:
        backbone = Backbone(card.config["weights"], card.image_size, card.config["seed"], resolve_engine(cfg.engine),
                            card.precision)
        features = split_features(backbone, rows, cfg.cache_dir, cfg.batch_size)
        if features.backbone_digest == card.backbone_digest:
            return _head_probabilities(model.get_layer("head"), features, cfg.batch_size)[None]
    return _run_whole(model, card.config, len(card.class_names), rows, cfg.engine, cfg.batch_size, cfg.cache_dir,
                      views)


def _head_probabilities(head, features, batch_size: int) -> np.ndarray:
    """The head called directly on blocks of features: no predict function to trace per point."""
    step = 8 * batch_size
    return np.concatenate([np.asarray(head(features.array[i:i + step], training=False), np.float32)
                           for i in range(0, len(features.array), step)])


def _run_whole(model, config: dict, n_classes: int, rows: pd.DataFrame, engine: str, batch_size: int,
               cache_dir: str | None, views: int = 1) -> np.ndarray:
    """Probabilities of the whole image-to-class model over the first views of DIHEDRAL of rows'
    images, on engine: (views, images, classes)."""
    runner = compile_classifier(model, config, n_classes, engine, resolve_precision(config.get("precision", "auto")),
                                cache_dir)
    out = np.empty((views, len(rows), n_classes), np.float32)
    for view, probs in zip(DIHEDRAL[:views], out):  # each view decodes the images again: cheaper than holding them
        batches = (np.ascontiguousarray(view(images.numpy()))
                   for images, _ in make_dataset(rows, config["image_size"], batch_size))
        runner.run(batches, probs)
    return out


def _log_tables(cm: pd.DataFrame, test: pd.DataFrame, probs: np.ndarray, class_names: list[str]) -> None:
    predictions = test[["path", "label"]].assign(predicted=[class_names[i] for i in probs.argmax(axis=1)])
    predictions[[f"p_{c}" for c in class_names]] = probs
    with tempfile.TemporaryDirectory() as tmp:
        cm.to_csv(Path(tmp) / "confusion_matrix.csv")
        predictions.to_csv(Path(tmp) / "predictions.csv", index=False)
        mlflow.log_artifacts(tmp)
    log_figure(confusion_matrix(cm), "plots/confusion_matrix.png")
