"""Step 2: fine-tune the classifier on the train split, early-stopped on the validation split."""

import functools
import time
from dataclasses import asdict, dataclass, field, replace

import keras
import mlflow
import numpy as np
import pandas as pd
from sklearn.utils.class_weight import compute_class_weight

from pipeline import liveness, prepared
from pipeline.card import ModelCard, log_model
from pipeline.config import AUGMENT_OF, RECIPE_FOR_DATA, RECIPES, LogModelConfig, PipelineError, TrainConfig
from pipeline.data import load_images, make_dataset
from pipeline.features import Backbone, FeatureBatches, Features, split_features, weights_digest
from pipeline.model import (backbone_identity, build_head, build_model, builder_of, compile_for_training,
                            resolve_precision, set_fine_tune, synchronize_batchnorm)
from pipeline.plots import learning_curves, log_figure
from pipeline.reproducibility import make_deterministic, run_tags
from pipeline.tracking import entry_point_run, log_input, step_run


@dataclass
class Trained:
    """A model just trained, in memory: what evaluate scores and log_trained logs without
    reading anything back from the store."""
    model: keras.Model  # the head alone if it trained on cached features, else the whole model
    cfg: TrainConfig
    data: prepared.PreparedData
    history: dict
    seconds: float  # fit's wall clock, both phases
    phase_2: int | None  # phase 2's first epoch, with two phases
    backbone: Backbone | None = None  # the cached features' backbone, for a head
    backbone_digest: str = ""  # of those features' weights

    @property
    def engine(self) -> str:
        """The engine that computed the features the head trained on; tensorflow for a whole model."""
        return self.backbone.engine if self.backbone else "tensorflow"

    @property
    def precision(self) -> str:
        """The backbone's precision: its features' for a head (float32 where the reduced one failed
        the engine check, pipeline.features.split_features), else cfg's, resolved."""
        return self.backbone.precision if self.is_head else resolve_precision(self.cfg.precision)

    @property
    def is_head(self) -> bool:
        return self.backbone is not None and self.model.name == "head"

    @property
    def best_epoch(self) -> int:
        """The restored epoch, counted from 1 as every epoch is: each phase's early stopping
        restores its own best (_restored), and phase 2's is kept only if it beats phase 1's by min_delta."""
        losses, delta = self.history["val_loss"], self.cfg.min_delta
        split = self.phase_2 - 1 if self.phase_2 else len(losses)
        first = _restored(losses[:split], delta)
        if split == len(losses):
            return 1 + first
        second = split + _restored(losses[split:], delta)
        return 1 + (second if losses[second] < losses[first] - delta else first)

    def best(self, metric: str) -> float:
        """A history metric at the restored epoch."""
        return self.history[metric][self.best_epoch - 1]


def _restored(losses: list, min_delta: float) -> int:
    """The index of the epoch Keras' EarlyStopping restores: the first, then each one whose
    val_loss is lower than the last such epoch's by more than min_delta."""
    best = 0
    for epoch, loss in enumerate(losses):
        if loss < losses[best] - min_delta:
            best = epoch
    return best


@dataclass(frozen=True)
class TrainResult:
    run_id: str
    model_uri: str  # hand this to evaluate; "" if not logged (log_model=False): `log-model --run` logs it
    best_val_accuracy: float  # of the restored (lowest val_loss) epoch
    best_val_loss: float
    learning_time_s: float
    trained: Trained | None = field(default=None, repr=False, compare=False)


HEAD_STEPS_PER_EXECUTION = 16  # measured: 2.3-2.6 s per epoch of 7,966 flatten features at 224 px, from 5.1
# Several steps per call pay only over enough steps: tracing Keras' multi-step loop costs about 1.5 s
# more per head than tracing one step (a grid point on 200 images: 3.5 s instead of 5.1), and saves
# about 10 ms per step.
MULTI_STEP_MIN_STEPS = 200  # steps per epoch times epochs


def head_steps_per_execution(train_batches: int, epochs: int, replicas: int) -> int:
    """Steps per call for a head: HEAD_STEPS_PER_EXECUTION over many steps, else 1 (the same
    updates in the same order either way). Over several replicas Keras 3.15 cannot run several
    steps per call (a placeholder left unfed)."""
    return HEAD_STEPS_PER_EXECUTION if replicas == 1 and train_batches * epochs >= MULTI_STEP_MIN_STEPS else 1


class _LogEpochs(keras.callbacks.Callback):
    """Per-epoch metrics, at steps that count epochs from 1 (Keras counts from 0); Keras' loss and
    accuracy (of the training batches) as train_loss and train_accuracy, so that no one reads
    them as test figures. Validation first: the MLflow UI's compare view plots a run's first-logged
    metric by default, so the seven points' plot opens on val_accuracy."""
    def on_epoch_end(self, epoch, logs=None):
        named = {(k if k.startswith("val_") else f"train_{k}"): float(v) for k, v in (logs or {}).items()}
        mlflow.log_metrics(dict(sorted(named.items(), key=lambda kv: (not kv[0].startswith("val_"), kv[0]))),
                           step=epoch + 1)


def train(cfg: TrainConfig, callbacks=(), log_model: bool = True, run_id: str | None = None) -> TrainResult:
    """Train on the prepared data at cfg.data (train and val splits only) and log the run.

    One phase (finetune_epochs=0): up to cfg.epochs epochs with the layers of cfg.fine_tune
    trainable from the start. Two phases (finetune_epochs > 0): the head on the frozen backbone
    for up to cfg.epochs epochs, then up to finetune_epochs more with cfg.fine_tune's layers
    unfrozen at finetune_learning_rate (see _fine_tune). A frozen backbone trains only its head,
    on cached features (pipeline.features); the whole model is assembled only to be logged.

    With several GPUs it trains over all of them (_strategy), cfg.batch_size images per step in all.
    The same seed and data give the same metrics on a CPU (pipeline.reproducibility).
    Logs: tags seed, data_digest, version.<package>, version.python, platform, device, num_replicas,
    engine and precision (also printed); every parameter and config.json; per-epoch train_loss, train_accuracy, val_loss, val_accuracy
    at steps 1, 2, ... (phase 2's continue phase 1's); learning_time_s (fit's wall clock, both phases);
    best_epoch (from 1), best_val_accuracy and best_val_loss of the restored weights; with two
    phases finetune_start_epoch (phase 2's first epoch) and finetune_time_s; plots/learning_curves.png; on cached features
    feature_extraction_s, feature_cache_hits, feature_cache_mb and engine_rel_error; with
    class_weight=balanced, class_weights.json (class name -> weight); with log_model the whole
    image-to-class model (name "model", pipeline.card: signature, input example, model card).
    A run without the model keeps what rebuilds it exactly: log_trained_model_of(run id).
    callbacks: extra Keras callbacks for fit (both phases), e.g. tune's pruning. run_id: log into
    this run, made beforehand (a tune trial's, which Optuna links to before training starts).
    """
    data = prepared.load(cfg.data)
    cfg = for_data(cfg, data)
    with step_run("train", cfg, data.name, run_id=run_id) as run:
        log_input(data.mlflow_dataset("train"), "training")
        log_input(data.mlflow_dataset("val"), "validation")
        mlflow.set_tags(run_tags(cfg.seed, data.digest))
        trained = fit(cfg, data, callbacks, log=True)
        summary = {"best_val_accuracy": trained.best("val_accuracy"), "best_val_loss": trained.best("val_loss")}
        mlflow.log_metrics({**summary, "best_epoch": trained.best_epoch, "learning_time_s": trained.seconds})
        log_figure(learning_curves(trained.history, data.name, trained.phase_2), "plots/learning_curves.png")
        model_uri = log_trained(trained) if log_model else ""
    return TrainResult(run.info.run_id, model_uri, learning_time_s=trained.seconds, trained=trained, **summary)


def fit(cfg: TrainConfig, data: prepared.PreparedData, callbacks=(), log: bool = False) -> Trained:
    """Seed everything and train cfg's model on data's train split (early-stopped on val); with
    log, into the active run (class weights, per-epoch and feature metrics, engine tags)."""
    cfg = for_data(cfg, data)
    make_deterministic(cfg.seed)
    train_rows, val_rows = data.split("train"), data.split("val")
    strategy = _strategy()
    weights = class_weights(train_rows["label_index"], len(data.class_names), cfg.class_weight)
    if weights and log:
        mlflow.log_dict({name: weights[i] for i, name in enumerate(data.class_names)}, "class_weights.json")
    job = _Job(cfg, train_rows, val_rows, weights, (_LogEpochs(), *callbacks) if log else tuple(callbacks), strategy)
    if uses_feature_cache(cfg):
        trained = _fit_head_on_features(job, data, log)
    else:
        with strategy.scope():
            model = build_model(cfg, len(data.class_names))
        trained = Trained(model, cfg, data, *_fit_on_images(model, job), phase_2=None)
    if log:
        used = {"device": _device(strategy), "num_replicas": job.replicas,
                "precision": trained.precision, "engine": trained.engine}
        mlflow.set_tags(used)
        print("trained on " + ", ".join(f"{k} {v}" for k, v in used.items()))
    if cfg.finetune_epochs:
        _fine_tune(trained, job)
        if log:
            mlflow.log_metrics({"finetune_start_epoch": trained.phase_2, "finetune_time_s": trained.seconds})
    return trained


def for_data(cfg: TrainConfig, data: prepared.PreparedData) -> TrainConfig:
    """cfg with augment=auto made the augmentation of data's preset (none for other data), and its
    recipe's values for that preset (RECIPE_FOR_DATA) where it has the recipe's own."""
    recipe, own = RECIPES.get(cfg.recipe, {}), RECIPE_FOR_DATA.get(cfg.recipe, {}).get(data.name, {})
    cfg = replace(cfg, **{k: v for k, v in own.items() if getattr(cfg, k) == recipe[k]})
    return replace(cfg, augment=AUGMENT_OF.get(data.name, "none")) if cfg.augment == "auto" else cfg


@functools.cache
def _strategy():
    """tf.distribute.MirroredStrategy over every GPU TensorFlow sees, when it sees several (over a
    CPU split into several logical devices if there is no GPU: how the tests stand in for GPUs);
    else the default strategy, one device, as with no strategy at all. One per process: a second
    MirroredStrategy's all-reduces collide with the first one's (their collective keys repeat)."""
    import tensorflow as tf

    devices = [d.name for d in tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")]
    return tf.distribute.MirroredStrategy(devices) if len(devices) > 1 else tf.distribute.get_strategy()


def _device(strategy) -> str:
    """Where Keras trained: CPU, or GPU:0 (where it places ops) and its name; over several
    replicas, all their devices: GPU:0+GPU:1 and the first one's name, or CPU:0+CPU:1."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    where = "GPU:0" if gpus else "CPU"
    if strategy.num_replicas_in_sync > 1:
        where = "+".join(d.split("device:")[-1] for d in strategy.extended.worker_devices)
    name = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "") if gpus else ""
    return f"{where} {name}".strip()


def log_trained(trained: Trained) -> str:
    """Assemble the whole image-to-class model of trained (a head gets its backbone) and log it
    with its model card into the active run; its model URI."""
    cfg, data = trained.cfg, trained.data
    model = _whole_model(trained)
    digest = weights_digest(model.get_layer("resnet50"))
    if trained.backbone_digest and digest != trained.backbone_digest:
        raise PipelineError(f"the backbone rebuilt for the model ({digest}) is not the one whose cached features "
                            f"trained its head ({trained.backbone_digest}): clear the feature cache "
                            "(cache_dir) and train again")
    card = ModelCard(class_names=data.class_names, image_size=cfg.image_size,
                     precision=trained.precision,
                     engine=trained.engine, dataset=data.name,
                     data_digest=data.digest, config=asdict(cfg),
                     backbone=backbone_identity(cfg.weights, cfg.seed), backbone_digest=digest)
    example = load_images(data.split("train")["path"].iloc[:1], cfg.image_size)
    info = log_model(model, card, example)
    mlflow.set_tag("model_uri", info.model_uri)
    return info.model_uri


def _whole_model(trained: Trained) -> keras.Model:
    """The whole image-to-class model of trained, uncompiled: Keras saves a compiled model's (or
    nested head's) Adam moments too, twice the size of what they train (a 512-unit flatten head
    at 224 px: 400 MB more), and clone_model keeps a nested model's optimizer. A head is copied
    into a new one inside its backbone's model; a model trained whole is rebuilt with its weights."""
    cfg, n_classes = trained.cfg, len(trained.data.class_names)
    if trained.is_head:
        head = build_head(trained.model.input_shape[1:], cfg, n_classes)
        head.set_weights(trained.model.get_weights())
        return build_model(cfg, n_classes, head=head, precision=trained.precision)
    return builder_of(trained.model, asdict(cfg), n_classes)(trained.precision)


@dataclass(frozen=True)
class _Job:
    """What every fit of one train call fits on, and how."""
    cfg: TrainConfig
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    class_weight: dict | None  # class index -> weight, or None
    callbacks: tuple
    strategy: object  # a tf.distribute.Strategy (_strategy): models are built and compiled in its scope

    def __post_init__(self):
        if self.replicas > 1 and (self.cfg.batch_size % self.replicas
                                  or min(len(self.train_rows), len(self.val_rows)) < self.replicas):
            raise PipelineError(f"training over {self.replicas} devices needs a batch_size that is a multiple of "
                                f"{self.replicas} (now {self.cfg.batch_size}) and at least {self.replicas} images in "
                                "the train and val splits: change batch_size, or make fewer GPUs visible "
                                "(CUDA_VISIBLE_DEVICES)")

    @property
    def replicas(self) -> int:
        return self.strategy.num_replicas_in_sync

    def optimization(self, steps_per_epoch: int, epochs: int | None = None) -> dict:
        """compile_for_training's loss and schedule settings for a fit of epochs (default cfg.epochs)."""
        cfg = self.cfg
        return {"label_smoothing": cfg.label_smoothing, "weight_decay": cfg.weight_decay, "schedule": cfg.schedule,
                "epochs": epochs or cfg.epochs, "steps_per_epoch": steps_per_epoch}

    def batching(self, size: int, rows: pd.DataFrame, any_size: bool = False) -> dict:
        """batch_size and drop_remainder for batches of rows: size, and every row, on one device.

        Over r replicas, each batch is split between them (a last, smaller one unevenly): the
        batch size is a multiple of r up to size and len(rows), since Keras (3.15) averages the
        first batch across the replicas to learn its shapes and fails unless it splits evenly; a
        last batch of fewer than r rows is dropped, since a replica would get none (TensorFlow's
        oneDNN convolutions fail on an empty batch). any_size (validation, whose scores do not
        depend on the batch size): the largest such multiple that leaves no row out, if any does.
        """
        r, n = self.replicas, len(rows)
        if r == 1:
            return {"batch_size": size, "drop_remainder": False}
        sizes = range(min(size, n) // r * r, 0, -r)
        batch = next((b for b in sizes if n % b == 0 or n % b >= r), sizes[0]) if any_size else sizes[0]
        return {"batch_size": batch, "drop_remainder": 0 < n % batch < r}


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
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=job.cfg.patience, min_delta=job.cfg.min_delta,
                                         restore_best_weights=True)
    start = time.perf_counter()
    with liveness.stops_deferred():
        history = model.fit(train_data, validation_data=val_data, initial_epoch=first_epoch,
                            epochs=first_epoch + (epochs or job.cfg.epochs), class_weight=job.class_weight,
                            callbacks=[stop, StopWhenSignalled(), *job.callbacks], verbose=2,
                            shuffle=False)  # the inputs shuffle themselves, seeded
    return history.history, time.perf_counter() - start


class StopWhenSignalled(keras.callbacks.Callback):
    """Raises Stopped after the batch during which a stop signal came (pipeline.liveness.stops_deferred)."""

    def on_train_batch_end(self, batch, logs=None):
        liveness.check_stop()

    def on_test_batch_end(self, batch, logs=None):
        liveness.check_stop()


def _fit_on_images(model: keras.Model, job: _Job, learning_rate: float | None = None, first_epoch: int = 0,
                   epochs: int | None = None) -> tuple[dict, float]:
    """Compile the whole model at learning_rate (default cfg.learning_rate) and fit it on images."""
    cfg = job.cfg
    train_data = make_dataset(job.train_rows, cfg.image_size, shuffle_seed=cfg.seed,
                              **job.batching(cfg.batch_size, job.train_rows))
    val_data = make_dataset(job.val_rows, cfg.image_size, **job.batching(cfg.batch_size, job.val_rows, any_size=True))
    with job.strategy.scope():
        compile_for_training(model, learning_rate or cfg.learning_rate, **job.optimization(len(train_data), epochs))
    if job.replicas > 1:
        synchronize_batchnorm(model)
    return _fit(model, train_data, val_data, job, first_epoch, epochs)


def _fit_head_on_features(job: _Job, data: prepared.PreparedData, log: bool) -> Trained:
    """Train a new head on the cached backbone features of the train and val splits."""
    cfg, start = job.cfg, time.perf_counter()
    backbone = Backbone.of(cfg)
    train_f, val_f = (split_features(backbone, rows, cfg.cache_dir, cfg.batch_size)
                      for rows in (job.train_rows, job.val_rows))
    if val_f.backbone != train_f.backbone:  # val's check sent it to float32 after train's passed: train too
        train_f = split_features(val_f.backbone, job.train_rows, cfg.cache_dir, cfg.batch_size)
    checked = [f.rel_error for f in (train_f, val_f) if not f.hit]
    extraction = {"feature_extraction_s": time.perf_counter() - start, "feature_cache_hits": train_f.hit + val_f.hit,
                  "feature_cache_mb": (train_f.array.nbytes + val_f.array.nbytes) / 2**20,
                  **({"engine_rel_error": max(checked)} if checked else {})}
    y_train, y_val = (rows["label_index"].to_numpy("int32") for rows in (job.train_rows, job.val_rows))
    train_data = FeatureBatches(train_f.array, y_train, seed=cfg.seed, **job.batching(cfg.batch_size, job.train_rows))
    with job.strategy.scope():
        head = build_head(train_f.array.shape[1:], cfg, len(data.class_names))
        compile_for_training(head, cfg.learning_rate, head_steps_per_execution(len(train_data), cfg.epochs, job.replicas),
                             **job.optimization(len(train_data)))
    # Validation batches can be larger: the head has no batch statistics, so the scores are the same.
    val_data = FeatureBatches(val_f.array, y_val, **job.batching(8 * cfg.batch_size, job.val_rows, any_size=True))
    try:
        history, seconds = _fit(head, train_data, val_data, job)
    finally:  # after the epochs' metrics, which the UI's compare view should pick first (_LogEpochs); pruned too
        if log:
            mlflow.log_metrics(extraction)
    return Trained(head, cfg, data, history, seconds, None, train_f.backbone, train_f.backbone_digest)


def _fine_tune(trained: Trained, job: _Job) -> None:
    """Phase 2: unfreeze cfg.fine_tune's layers (a pretrained backbone's BatchNorm stays frozen),
    recompile at finetune_learning_rate and train the whole model on images for up to
    finetune_epochs epochs, numbered on from phase 1's; trained then holds the whole model, both
    phases' history and phase 2's first epoch (phase_2).

    If phase 2's best val_loss does not beat phase 1's by min_delta, phase 1's weights are put back,
    so the model is always the epoch that best_epoch names.
    """
    cfg, history = job.cfg, trained.history
    model = trained.model
    if trained.is_head:
        with job.strategy.scope():
            model = build_model(cfg, len(trained.data.class_names), head=model)
    phase_1 = model.get_weights()
    set_fine_tune(model.get_layer("resnet50"), cfg.fine_tune, pretrained=cfg.weights != "none")
    more, seconds = _fit_on_images(model, job, cfg.finetune_learning_rate, len(history["val_loss"]),
                                   cfg.finetune_epochs)
    trained.phase_2 = len(history["val_loss"]) + 1
    trained.history = {k: list(history[k]) + list(more[k]) for k in history}
    if trained.best_epoch < trained.phase_2:
        model.set_weights(phase_1)
    trained.model, trained.seconds, trained.backbone_digest = model, trained.seconds + seconds, ""


@dataclass(frozen=True)
class LogModelResult:
    run_id: str
    model_uri: str


def log_trained_model_of(cfg: LogModelConfig) -> LogModelResult:
    """Rebuild the model of a run that did not log one (a grid point or trial) and log it there.

    Trains again from the run's config.json on the same prepared data and seed (deterministic on
    a CPU; a head on cached features takes seconds), checks that the rebuilt model's
    best_val_accuracy is the run's, and logs the whole model with its card as the run's "model".
    A run that has its model already returns it. The model goes to the point's own run (its
    metrics and curves are there); under `mlflow run -e log-model` MLflow's run says where:
    tags source_run_id (cfg.run) and model_uri.
    """
    with entry_point_run("log-model", cfg) as run:
        model_uri = _logged_model_of(cfg.run, cfg.cache_dir)
        if run:
            mlflow.set_tags({"source_run_id": cfg.run, "model_uri": model_uri})
    return LogModelResult(cfg.run, model_uri)


def _logged_model_of(run_id: str, cache_dir: str) -> str:
    """The URI of run_id's whole model, logged there now if it had none (log_trained_model_of)."""
    run = _get_run(run_id)
    if run.data.tags.get("model_uri"):
        return run.data.tags["model_uri"]
    values = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/config.json")
    train_cfg = TrainConfig(**{k: v for k, v in values.items() if k in TrainConfig.__dataclass_fields__}
                            | ({"cache_dir": cache_dir} if cache_dir else {}))
    trained = fit(train_cfg, prepared.load(train_cfg.data))
    for metric in ("best_val_loss", "best_val_accuracy"):
        rebuilt, logged = trained.best(metric.removeprefix("best_")), run.data.metrics.get(metric)
        if logged is not None and abs(rebuilt - logged) > 1e-5 * max(1.0, abs(logged)):
            raise PipelineError(f"run {run_id}'s model did not rebuild exactly ({metric} {rebuilt:.6f}, logged "
                                f"{logged:.6f}): it needs the same packages, CPU kind and devices (tag num_replicas); "
                                "train it again with log_models=all")
    with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
        model_uri = log_trained(trained)
    print(f"logged the model of run {run_id}: {model_uri}")
    return model_uri


def _get_run(run_id: str):
    try:
        return mlflow.get_run(run_id)
    except Exception as e:
        raise PipelineError(f"no run {run_id!r} in the tracking store {mlflow.get_tracking_uri()} "
                            f"({type(e).__name__}): pass the id of a train, grid point or trial run") from None
