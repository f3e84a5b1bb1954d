"""Step 2: fine-tune the classifier on the train split, early-stopped on the validation split."""

import os
import time
from dataclasses import asdict, dataclass

import keras
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from mlflow.models import infer_signature
from sklearn.utils.class_weight import compute_class_weight

from pipeline import prepared
from pipeline.config import TrainConfig
from pipeline.data import load_images, make_dataset
from pipeline.features import FeatureBatches, model_features
from pipeline.model import build_model, compile_for_training, resolve_precision, set_fine_tune
from pipeline.plots import learning_curves
from pipeline.reproducibility import make_deterministic, run_tags
from pipeline.tracking import step_run

MODEL_NAME = "model"


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str  # hand this to evaluate
    best_val_accuracy: float  # of the restored (lowest val_loss) epoch
    best_val_loss: float
    learning_time_s: float


class _LogEpochs(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)


def train(cfg: TrainConfig, callbacks=()) -> TrainResult:
    """Train on the prepared data at cfg.data (train and val splits only) and log the model.

    One phase (finetune_epochs=0): up to cfg.epochs epochs with the layers of cfg.fine_tune
    trainable from the start. Two phases (finetune_epochs > 0): the head on the frozen backbone
    for up to cfg.epochs epochs, then up to finetune_epochs more with cfg.fine_tune's layers
    unfrozen at finetune_learning_rate (see _fine_tune).

    The same seed and data give the same metrics on a CPU (pipeline.reproducibility).
    Logs: tags seed, data_digest, version.<package>, version.python and platform; every
    parameter and config.json; per-epoch loss, accuracy, val_loss, val_accuracy
    (phase 2's steps continue phase 1's); learning_time_s and learning_time_ms (fit's wall clock,
    both phases); best_epoch, best_val_accuracy and best_val_loss of the restored weights;
    with two phases finetune_start_epoch (the step of phase 2's first epoch) and finetune_time_s;
    plots/learning_curves.png; the whole image-to-class model (name "model") with its
    signature, an input example, and class_names, image_size, precision and config in its
    metadata; with class_weight=balanced, class_weights.json (class name -> weight). A frozen
    backbone trains its head on cached features (see pipeline.features) and also logs the
    feature_* metrics of _fit_head_on_features.
    callbacks: extra Keras callbacks for fit (both phases), e.g. tune's pruning.
    """
    data = prepared.load(cfg.data)
    train_rows = data.split("train")
    with step_run("train", cfg, data.name) as run:
        mlflow.log_input(data.mlflow_dataset("train"), context="training")
        mlflow.log_input(data.mlflow_dataset("val"), context="validation")
        mlflow.set_tags(run_tags(cfg.seed, data.digest))
        make_deterministic(cfg.seed)
        model = build_model(cfg, len(data.class_names))
        weights = class_weights(train_rows["label_index"], len(data.class_names), cfg.class_weight)
        if weights:
            mlflow.log_dict({name: weights[i] for i, name in enumerate(data.class_names)}, "class_weights.json")
        job = _Job(cfg, train_rows, data.split("val"), weights, tuple(callbacks))
        fit = _fit_head_on_features if uses_feature_cache(cfg) else _fit_on_images
        history, seconds = fit(model, job)
        phase_2 = len(history["val_loss"]) if cfg.finetune_epochs else None  # its first epoch's step
        if phase_2 is not None:
            history, finetune_s = _fine_tune(model, history, job)
            mlflow.log_metrics({"finetune_start_epoch": phase_2, "finetune_time_s": finetune_s})
            seconds += finetune_s
        best = min(range(len(history["val_loss"])), key=history["val_loss"].__getitem__)
        summary = {"best_val_accuracy": history["val_accuracy"][best], "best_val_loss": history["val_loss"][best]}
        mlflow.log_metrics({**summary, "best_epoch": best, "learning_time_s": seconds,
                            "learning_time_ms": seconds * 1000})
        mlflow.log_figure(learning_curves(history, data.name, phase_2), "plots/learning_curves.png")
        info = _log_model(model, data, cfg, example=load_images(train_rows["path"].iloc[:1], cfg.image_size))
    return TrainResult(run.info.run_id, info.model_uri, learning_time_s=seconds, **summary)


@dataclass(frozen=True)
class _Job:
    """What every fit of one train call fits on, and how."""
    cfg: TrainConfig
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    class_weight: dict | None  # class index -> weight, or None
    callbacks: tuple


def uses_feature_cache(cfg: TrainConfig) -> bool:
    """With the backbone frozen its features never change: train the head on cached features.

    The backbone is frozen with fine_tune=none, and in phase 1 of two-phase training. Augmented
    images change every epoch and cached features cannot follow, so one-phase training with
    augment != none trains on images, through the frozen backbone: slower, but augmented. Phase
    1 warms the new head up on cached features of the plain images all the same; augmentation
    acts from phase 2 on (feature_cache=off augments phase 1 too).
    """
    if cfg.feature_cache != "auto":
        return False
    return cfg.finetune_epochs > 0 or (cfg.fine_tune == "none" and cfg.augment == "none")


def class_weights(labels, n_classes: int, mode: str) -> dict[int, float] | None:
    """Per class index, the weight of its examples in the training loss: none gives None (all 1);
    balanced gives scikit-learn's n_samples / (n_classes * n_samples of the class), from labels
    (the train split's label_index), so every class weighs as much in total."""
    if mode == "none":
        return None
    classes = np.arange(n_classes)
    weights = compute_class_weight("balanced", classes=classes, y=np.asarray(labels))
    return {int(c): float(w) for c, w in zip(classes, weights)}


def _fit(model: keras.Model, train_data, val_data, job: _Job, first_epoch: int = 0,
         epochs: int | None = None) -> tuple[dict, float]:
    """Fit up to epochs (default cfg.epochs) epochs numbered from first_epoch, with early stopping
    on val_loss (best weights restored); (history, wall-clock seconds)."""
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=job.cfg.patience, restore_best_weights=True)
    start = time.perf_counter()
    history = model.fit(train_data, validation_data=val_data, initial_epoch=first_epoch,
                        epochs=first_epoch + (epochs or job.cfg.epochs), class_weight=job.class_weight,
                        callbacks=[stop, _LogEpochs(), *job.callbacks], verbose=2,
                        shuffle=False)  # the inputs shuffle themselves, seeded
    return history.history, time.perf_counter() - start


def _fit_on_images(model: keras.Model, job: _Job, learning_rate: float | None = None, first_epoch: int = 0,
                   epochs: int | None = None) -> tuple[dict, float]:
    """Compile the whole model at learning_rate (default cfg.learning_rate) and fit it on images."""
    cfg = job.cfg
    compile_for_training(model, learning_rate or cfg.learning_rate)
    return _fit(model, make_dataset(job.train_rows, cfg.image_size, cfg.batch_size, cfg.seed),
                make_dataset(job.val_rows, cfg.image_size, cfg.batch_size), job, first_epoch, epochs)


def _fit_head_on_features(model: keras.Model, job: _Job) -> tuple[dict, float]:
    """Train model's head on cached backbone features; model (which shares the head) is then trained.

    Logs feature_extraction_s, feature_cache_hits (0-2: train and val found in the cache) and
    feature_cache_mb.
    """
    cfg, start = job.cfg, time.perf_counter()
    precision = resolve_precision(cfg.precision)
    (train_f, train_hit), (val_f, val_hit) = (
        model_features(model, rows, precision, cfg.cache_dir, cfg.batch_size) for rows in (job.train_rows, job.val_rows))
    mlflow.log_metrics({"feature_extraction_s": time.perf_counter() - start,
                        "feature_cache_hits": train_hit + val_hit,
                        "feature_cache_mb": (train_f.nbytes + val_f.nbytes) / 2**20})
    head = model.get_layer("head")
    # No XLA (jit_compile=True, a third faster): Keras turns it off under the op determinism that
    # make_deterministic turns on, and says so in a warning.
    compile_for_training(head, cfg.learning_rate)
    y_train, y_val = (rows["label_index"].to_numpy("int32") for rows in (job.train_rows, job.val_rows))
    # Validation batches can be larger: the head has no batch statistics, so the scores are the same.
    return _fit(head, FeatureBatches(train_f, y_train, cfg.batch_size, cfg.seed),
                FeatureBatches(val_f, y_val, 8 * cfg.batch_size), job)


def _fine_tune(model: keras.Model, history: dict, job: _Job) -> tuple[dict, float]:
    """Phase 2: unfreeze cfg.fine_tune's layers (a pretrained backbone's BatchNorm stays frozen),
    recompile at finetune_learning_rate and train on images for up to finetune_epochs epochs,
    numbered on from phase 1's. (both phases' history, phase 2's seconds)

    If no phase-2 epoch beats phase 1's best val_loss, phase 1's weights are put back, so the
    logged model is always the epoch with the lowest val_loss of either phase.
    """
    cfg = job.cfg
    phase_1 = model.get_weights()
    set_fine_tune(model.get_layer("resnet50"), cfg.fine_tune, pretrained=cfg.weights != "none")
    more, seconds = _fit_on_images(model, job, cfg.finetune_learning_rate, len(history["val_loss"]),
                                   cfg.finetune_epochs)
    if min(more["val_loss"]) >= min(history["val_loss"]):
        model.set_weights(phase_1)
    return {k: list(history[k]) + list(more[k]) for k in history}, seconds


class _KerasFlavor:
    """mlflow.keras, whose save_model writes the input example before it creates the model's
    folder (mlflow/mlflow#16183, still open in MLflow 3.17): create the folder first.
    Once fixed upstream, _log_model becomes mlflow.keras.log_model(model, name=..., ...)."""

    @staticmethod
    def save_model(path, validate_serving_input=None, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def _log_model(model: keras.Model, data: prepared.PreparedData, cfg: TrainConfig, example):
    """Log the whole image-to-probabilities model with what later steps need to use it."""
    return mlflow.models.Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=_KerasFlavor,
        flavor_name="mlflow.keras",
        model=model,
        signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        metadata={"class_names": data.class_names, "image_size": cfg.image_size, "dataset": data.name,
                  "data_digest": data.digest, "precision": resolve_precision(cfg.precision), "config": asdict(cfg)},
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"tensorflow=={tf.__version__}",
                          f"keras=={keras.__version__}"],
        # MLflow would reload the model twice (7 s for ResNet50) to replay the input example;
        # tests/test_steps.py loads logged models with pyfunc and predicts on raw images instead.
        validate_serving_input=False,
    )
