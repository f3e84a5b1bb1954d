"""Every parameter of every step, with its default and its check, in one place.

The click CLI builds its options from these dataclasses and MLproject declares the same names
(a test keeps the three in step), so a parameter has one name and one default everywhere.
Configs check themselves on construction: a bad value fails in one line before any run starts.
"""

import dataclasses
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

PRESETS = ("blood_cells", "covid19")
SPLITS = ("auto", "official", "random")
POOLINGS = ("flatten", "avg")
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
FEATURE_CACHE = ("auto", "off")
AUGMENTS = ("none", "cells", "xray", "auto")
AUGMENT_OF = {"blood_cells": "cells", "covid19": "xray"}  # augment=auto, by preset; other data: none
TTAS = ("auto", "none", "dihedral")
SCHEDULES = ("constant", "cosine")
# A recipe: values for the parameters a command leaves at their defaults (pipeline.cli). scratch:
# ResNet50 from random weights, for machines that cannot fetch ImageNet's (benchmarks/accuracy.py).
RECIPES = {
    "scratch": {"weights": "none", "fine_tune": "all", "pooling": "avg", "hidden_layers": 0, "dropout": 0.2,
                "image_size": 112, "batch_size": 64, "learning_rate": 2e-3, "epochs": 8, "patience": 10,
                "augment": "auto", "label_smoothing": 0.1, "weight_decay": 0.05, "schedule": "cosine"},
}
# A recipe's values for one preset, over its own where those were left (pipeline.train.for_data): covid19's
# 1,280 training images give 8 epochs only 160 steps, which left validation at chance (README, Accuracy).
RECIPE_FOR_DATA = {"scratch": {"covid19": {"epochs": 24}}}
CLASS_WEIGHTS = ("none", "balanced")
PRUNERS = ("median", "hyperband", "none")
ENGINES = ("auto", "openvino", "tensorflow")
LOG_MODELS = ("best", "all")
URI_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


def cache_folder(cache_dir: str = "") -> Path:
    """cache_dir, else $PIPELINE_CACHE_DIR, else ~/.cache/resnet50-pipeline."""
    default = os.environ.get("PIPELINE_CACHE_DIR") or Path.home() / ".cache" / "resnet50-pipeline"
    return Path(cache_dir or default)


class PipelineError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits non-zero."""


def param(default=dataclasses.MISSING, help=""):
    return field(default=default, metadata={"help": help})


def engine_param():
    return param("auto", "runs the frozen backbone and inference: openvino, tensorflow, or auto (OpenVINO on a "
                         "CPU where it is installed, else TensorFlow)")


def _fine_tune_ok(v):
    return v in ("none", "all") or (v.isdigit() and int(v) > 0)


def _weights_ok(v):
    return v in ("imagenet", "none") or bool(URI_SCHEME.match(v)) or os.path.isfile(v)


def _within(low, high):
    """A check that the value lies in [low, high] (NaN never does)."""
    return lambda v: low <= v <= high


SEED_MAX = 2**32 - 1  # NumPy, scikit-learn and TensorFlow take seeds below 2**32
IMAGE_SIZE_MAX = 2048
UNITS_MAX = 65536
HIDDEN_LAYERS_MAX = 100
BATCH_SIZE_MAX = 4096
EPOCHS_MAX = 10000

# name -> (is the value fine?, what a fine value looks like). Applied to every config that has the field.
# Every range here is the parameter's documented range (README, parameter table).
CHECKS = {
    "dataset": (bool, f"must be a preset ({', '.join(PRESETS)}) or a folder of class subfolders"),
    "split": (lambda v: v in SPLITS, f"must be one of {', '.join(SPLITS)}"),
    "val_fraction": (lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.2"),
    "test_fraction": (lambda v: 0 < v < 1, "must be between 0 and 1, e.g. 0.2"),
    "seed": (_within(0, SEED_MAX), f"must be a whole number from 0 to 2**32-1 ({SEED_MAX}), e.g. 42"),
    "max_per_class": (_within(0, 10**9), "must be 0 (no cap) or a positive number of images up to 10**9"),
    "image_size": (_within(32, IMAGE_SIZE_MAX), f"must be from 32 (ResNet50's smallest input) to "
                                                f"{IMAGE_SIZE_MAX} pixels, e.g. 224"),
    "weights": (_weights_ok, "must be imagenet, none, an existing weights file, or a model URI such as runs:/<id>/model"),
    "fine_tune": (_fine_tune_ok, "must be none (frozen backbone), all, or a positive number of top layers"),
    "pooling": (lambda v: v in POOLINGS, f"must be one of {', '.join(POOLINGS)}"),
    "precision": (lambda v: v in PRECISIONS, f"must be one of {', '.join(PRECISIONS)}"),
    "feature_cache": (lambda v: v in FEATURE_CACHE, f"must be one of {', '.join(FEATURE_CACHE)}"),
    "units": (_within(1, UNITS_MAX), f"must be from 1 to {UNITS_MAX} dense units, e.g. 8"),
    "hidden_layers": (_within(0, HIDDEN_LAYERS_MAX), f"must be from 0 to {HIDDEN_LAYERS_MAX} dense layers, e.g. 1"),
    "dropout": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.5"),
    "learning_rate": (lambda v: 0 < v < 1, "must be a positive rate below 1, e.g. 1e-5"),
    "epochs": (_within(1, EPOCHS_MAX), f"must be from 1 to {EPOCHS_MAX} epochs"),
    "batch_size": (_within(1, BATCH_SIZE_MAX), f"must be from 1 to {BATCH_SIZE_MAX} images, e.g. 32"),
    "patience": (_within(1, EPOCHS_MAX), f"must be from 1 to {EPOCHS_MAX} epochs without improvement"),
    "min_delta": (lambda v: 0 <= v < 1, "must be a val_loss drop from 0 (any drop counts) to below 1, e.g. 1e-4"),
    "augment": (lambda v: v in AUGMENTS, f"must be one of {', '.join(AUGMENTS)}"),
    "tta": (lambda v: v in TTAS, f"must be one of {', '.join(TTAS)}"),
    "class_weight": (lambda v: v in CLASS_WEIGHTS, f"must be one of {', '.join(CLASS_WEIGHTS)}"),
    "label_smoothing": (lambda v: 0 <= v < 1, "must be in [0, 1), e.g. 0.1"),
    "weight_decay": (lambda v: 0 <= v < 1, "must be in [0, 1): 0 (none) or a decoupled decay rate, e.g. 0.05"),
    "schedule": (lambda v: v in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
    "recipe": (lambda v: v in ("", *RECIPES), f"must be empty (none) or one of {', '.join(RECIPES)}"),
    "finetune_epochs": (_within(0, EPOCHS_MAX), f"must be 0 (one phase) or a number of epochs for phase 2 up to "
                                                f"{EPOCHS_MAX}, e.g. 5"),
    "finetune_learning_rate": (lambda v: 0 < v < 1, "must be a positive rate below 1, e.g. 1e-5"),
    "n_trials": (_within(1, 100000), "must be from 1 to 100000 trials for the study to reach, e.g. 50"),
    "timeout": (_within(0, 10**7), "must be 0 (no limit) or a number of seconds up to 10**7"),
    "workers": (_within(1, 64), "must be from 1 to 64 worker processes, e.g. 1"),
    "port": (_within(1, 65535), "must be a TCP port from 1 to 65535, e.g. 5000"),
    "storage": (bool, "is required: a sqlite file (optuna.db), a *.journal file or a database URL"),
    "pruner": (lambda v: v in PRUNERS, f"must be one of {', '.join(PRUNERS)}"),
    "engine": (lambda v: v in ENGINES, f"must be one of {', '.join(ENGINES)}"),
    "log_models": (lambda v: v in LOG_MODELS, "must be best (a full model for the search's best run only) or all"),
    "run": (bool, "is required: the id of a train, grid point or trial run"),
    "heartbeat_interval": (lambda v: v > 0, "must be a positive number of seconds between a trial's heartbeats, e.g. 60"),
    "grace_period": (lambda v: v > 0, "must be a positive number of seconds, longer than heartbeat_interval, e.g. 180"),
    "data": (bool, "is required: the prepared-data URI that prepare printed (runs:/<id>/data)"),
    "model": (bool, "is required: a model URI such as runs:/<id>/model or models:/<name>@champion"),
    "input": (bool, "is required: a folder of images (searched recursively) or one image file"),
    "output": (bool, "is required: the file to write, e.g. predictions.csv"),
}


def parameters(cls) -> list[dataclasses.Field]:
    """The parameters of a step (CLI options, MLproject, logged params): its config's fields but
    those its child runs set (a grid's and a study's units, hidden_layers, learning_rate)."""
    return [f for f in fields(cls) if f.name not in getattr(cls, "VARIED", ())]


@dataclass(frozen=True, kw_only=True)
class _Config:
    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            ok, hint = CHECKS.get(f.name, (None, ""))
            if ok is not None and not ok(value):
                raise PipelineError(f"invalid {f.name}={value!r}: {hint}")

    def to(self, cls, **overrides):
        """This config's values for the fields of another config class, plus overrides."""
        shared = {f.name: getattr(self, f.name) for f in fields(cls) if hasattr(self, f.name)}
        return cls(**{**shared, **overrides})


@dataclass(frozen=True, kw_only=True)
class _Experiment(_Config):
    experiment: str = param("", "MLflow experiment; default: the dataset's name")


@dataclass(frozen=True, kw_only=True)
class _Evaluate(_Config):
    tta: str = param("auto", "test-time augmentation: dihedral (score the mean of each test image's 8 flips and "
                             "quarter turns), none, or auto (dihedral for a model trained with augment=cells, "
                             "whose images have no orientation; else none)")


@dataclass(frozen=True, kw_only=True)
class _Registry(_Config):
    registered_model: str = param("", "registered model name; default: <dataset>-resnet50")


@dataclass(frozen=True, kw_only=True)
class DataParams(_Config):
    dataset: str = param("blood_cells", "preset (blood_cells, covid19) or a folder of class subfolders")
    data_dir: str = param("", "folder holding the preset's data; default: $PIPELINE_DATA_DIR/<dataset>")
    split: str = param("auto", "auto: official test split if the data has one, else random; official; random")
    val_fraction: float = param(0.2, "share of the training pool held out for validation")
    test_fraction: float = param(0.2, "share of all images held out for test when the split is random")
    seed: int = param(42, "seed for splitting, sampling, initialisation and shuffling")
    max_per_class: int = param(0, "cap on images per class in each source split, for quick runs; 0: no cap")


@dataclass(frozen=True, kw_only=True)
class ModelParams(_Config):
    image_size: int = param(224, "images are resized to image_size x image_size RGB")
    weights: str = param("imagenet", "backbone weights: imagenet, none, a weights file, or a model URI")
    fine_tune: str = param("none", "backbone layers to train: none (frozen), all, or a number of top layers")
    pooling: str = param("flatten", "head input: flatten (as in the studies) or avg (global average pooling)")
    units: int = param(8, "units of each hidden dense layer")
    hidden_layers: int = param(1, "number of hidden dense layers")
    dropout: float = param(0.5, "dropout rate before the output layer")
    learning_rate: float = param(1e-5, "Adam learning rate")
    epochs: int = param(10, "maximum number of epochs")
    batch_size: int = param(32, "images per batch")
    patience: int = param(3, "epochs without a lower val_loss before early stopping")
    min_delta: float = param(1e-4, "smallest drop in val_loss that counts as lower for early stopping")
    seed: int = param(42, "seed for splitting, sampling, initialisation and shuffling")
    precision: str = param("auto", "float32, mixed_bfloat16, mixed_float16, or auto (by hardware)")
    engine: str = engine_param()
    feature_cache: str = param("auto", "auto: train a frozen backbone's head on cached features; off")
    cache_dir: str = param("", "feature cache folder; default: $PIPELINE_CACHE_DIR or ~/.cache/resnet50-pipeline")
    augment: str = param("none", "random augmentation layers, active in training only: none, cells, xray, or auto "
                                 "(cells for blood_cells, xray for covid19, none for other data)")
    class_weight: str = param("none", "none, or balanced: weigh each class by the inverse of its train-split frequency")
    finetune_epochs: int = param(0, "0: one phase; N: train the head on the frozen backbone for epochs, then "
                                    "unfreeze fine_tune's layers for up to N more epochs")
    finetune_learning_rate: float = param(1e-5, "Adam learning rate of phase 2 (finetune_epochs > 0)")
    label_smoothing: float = param(0.0, "share of each target spread evenly over the classes in the loss")
    weight_decay: float = param(0.0, "decoupled weight decay of Adam (AdamW) per step, times the learning rate")
    schedule: str = param("constant", "learning rate per step: constant, or cosine (one epoch of warm-up, then a "
                                      "cosine decay to 0 over epochs; in phase 2 over finetune_epochs)")

    def __post_init__(self):
        super().__post_init__()
        if self.finetune_epochs and self.fine_tune == "none":
            raise PipelineError(f"invalid finetune_epochs={self.finetune_epochs} with fine_tune='none': phase 2 "
                                "unfreezes fine_tune's layers; set fine_tune=all or a number of top layers")
        check_memory(self)


@dataclass(frozen=True, kw_only=True)
class _Recipe(_Config):
    recipe: str = param("", "a named set of values for the parameters left at their defaults: scratch (ResNet50 "
                            "from random weights, at 112 px, augmented; see README, Accuracy)")


def with_recipe(cls, options: dict):
    """A cls config of options (field values) and, for the fields left at their defaults, their
    recipe's values: a value passed that equals the default counts as left."""
    recipe = RECIPES.get(options.get("recipe", ""), {})
    defaults = {f.name: f.default for f in fields(cls)}
    return cls(**{**options, **{k: v for k, v in recipe.items() if options.get(k, defaults[k]) == defaults[k]}})


@dataclass(frozen=True, kw_only=True)
class PrepareConfig(DataParams, _Experiment):
    pass


@dataclass(frozen=True, kw_only=True)
class TrainConfig(_Recipe, ModelParams, _Experiment):
    data: str = param(help="prepared-data URI printed by prepare, e.g. runs:/<id>/data")


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(_Evaluate, _Experiment):
    model: str = param(help="model URI: runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    data: str = param(help="prepared-data URI printed by prepare, e.g. runs:/<id>/data")
    batch_size: int = param(32, "images per batch")
    feature_cache: str = param("auto", "auto: score a frozen-backbone model on cached features; off")
    cache_dir: str = param("", "feature cache folder; default: $PIPELINE_CACHE_DIR or ~/.cache/resnet50-pipeline")
    engine: str = engine_param()


@dataclass(frozen=True, kw_only=True)
class LogModelConfig(_Config):
    run: str = param(help="id of a train, grid point or trial run whose full model was not logged")
    cache_dir: str = param("", "feature cache folder; default: $PIPELINE_CACHE_DIR or ~/.cache/resnet50-pipeline")


@dataclass(frozen=True, kw_only=True)
class _Search(_Config):
    log_models: str = param("best", "best: a full, servable model for the best point or trial only (the others "
                                    "keep params, metrics and curves; `log-model --run ID` builds one later); all")


@dataclass(frozen=True, kw_only=True)
class _Main(_Evaluate, ModelParams, DataParams, _Registry, _Experiment):
    pass


@dataclass(frozen=True, kw_only=True)
class MainConfig(_Recipe, _Main):
    pass


@dataclass(frozen=True, kw_only=True)
class GridConfig(_Search, _Main):
    """main's parameters; each grid point overrides hidden_layers, units and learning_rate."""
    VARIED: ClassVar[tuple[str, ...]] = ("hidden_layers", "units", "learning_rate")  # not parameters of the step


@dataclass(frozen=True, kw_only=True)
class TuneConfig(_Search, _Main):
    """main's parameters as the base of every trial, plus the study's own.

    The first trials are the grid's seven points (hidden_layers, units, learning_rate from
    pipeline.grid.GRID; dropout, batch_size, pooling and fine_tune from this config), taken over
    from a grid that finished them on the same data and settings, else trained; later
    trials sample units, hidden_layers, learning_rate, dropout, batch_size, pooling and, with
    pretrained weights, fine_tune. So units, hidden_layers and learning_rate here are unused.
    """
    VARIED: ClassVar[tuple[str, ...]] = ("hidden_layers", "units", "learning_rate")  # not parameters of the step
    n_trials: int = param(50, "finished (complete or pruned) trials the study should have, earlier runs and grid "
                              "points taken over from a finished grid included")
    timeout: int = param(0, "seconds after which a worker starts no new trial; 0: no limit")
    workers: int = param(1, "local worker processes sharing the study (more than 1: prefer a *.journal storage)")
    storage: str = param("optuna.db", "Optuna storage: a sqlite file, a *.journal file, or a database URL")
    study_name: str = param("", "Optuna study; default: <dataset>-<digest of the settings>, so a rerun resumes it")
    pruner: str = param("median", "stops poor trials early: median (of earlier trials, same epoch), hyperband, none")
    heartbeat_interval: int = param(60, "seconds between a running trial's heartbeats in the storage")
    grace_period: int = param(180, "seconds without a heartbeat after which a trial of any machine counts as dead, "
                                   "is failed and retried")

    def __post_init__(self):
        super().__post_init__()
        if self.grace_period <= self.heartbeat_interval:
            raise PipelineError(f"invalid grace_period={self.grace_period}: must be longer than heartbeat_interval="
                                f"{self.heartbeat_interval}, e.g. three times it")
        if self.weights == "none" and self.fine_tune != "none":
            raise PipelineError(f"invalid fine_tune={self.fine_tune!r} with weights=none: tune unfreezes only a "
                                "pretrained backbone; use fine_tune=none, or pretrained weights")


@dataclass(frozen=True, kw_only=True)
class PredictConfig(_Config):
    model: str = param(help="model URI: runs:/<id>/model, models:/<name>/<version> or models:/<name>@<alias>")
    input: str = param(help="a folder of images (searched recursively) or one image file")
    output: str = param("predictions.csv", "CSV to write: path, predicted, confidence, p_<class>, error")
    batch_size: int = param(32, "images per batch")
    engine: str = engine_param()


@dataclass(frozen=True, kw_only=True)
class ServeConfig(_Config):
    """`mlflow models serve`'s options and defaults (-m, -h, -p, -w), for pipeline.server.serve."""
    model: str = param(help="model URI: models:/<name>@champion, models:/<name>/<version> or runs:/<id>/model")
    host: str = param("127.0.0.1", "network interface to listen on; 0.0.0.0: every interface")
    port: int = param(5000, "port to listen on")
    workers: int = param(1, "server processes, each with its own copy of the model")


@dataclass(frozen=True, kw_only=True)
class ReportConfig(_Registry, _Experiment):
    dataset: str = param("blood_cells", "dataset whose experiment is reported: a preset name or a folder")
    output: str = param("report.md", "Markdown file to write; its figures go to plots/ beside it")


# ResNet50 (no top) per input pixel: the floats of all its layers' outputs, and of its largest
# one (counted from keras.applications.ResNet50 at 224 px), and its number of weights.
RESNET50_ACTIVATIONS_PER_PIXEL = 737
RESNET50_LARGEST_PER_PIXEL = 16.6
RESNET50_WEIGHTS = 23_587_712
RUNTIME_BYTES = 2**30  # TensorFlow, MLflow and the Python process itself


def memory_needed(cfg: ModelParams) -> dict[str, float]:
    """Bytes a training run of cfg needs at least, by part (float32 throughout, as a lower bound).

    backbone: its weights, plus per batch either every layer's output (kept for the gradients
    when any backbone layer trains) or a few of its largest outputs (frozen: inference only).
    head: weights, gradients and Adam's two moments of the dense layers (the first one's input
    is the flattened feature map: (image_size/32)^2 x 2048 values with pooling=flatten).
    """
    pixels = cfg.image_size ** 2
    trains_backbone = cfg.fine_tune != "none"
    per_image = RESNET50_ACTIVATIONS_PER_PIXEL if trains_backbone else 3 * RESNET50_LARGEST_PER_PIXEL
    side = -(-cfg.image_size // 32)
    features = side * side * 2048 if cfg.pooling == "flatten" else 2048
    widths = [features] + [cfg.units] * cfg.hidden_layers
    head_weights = sum(a * b for a, b in zip(widths, widths[1:])) + widths[-1] * 2  # the output layer, 2+ classes
    return {"runtime": RUNTIME_BYTES,
            "backbone": 4 * (RESNET50_WEIGHTS * (4 if trains_backbone else 1) + cfg.batch_size * per_image * pixels),
            "head": 16 * head_weights + 4 * cfg.batch_size * features}


def available_memory() -> int | None:
    """Bytes this process can still take: MemAvailable, or the cgroup's limit if lower; None if unknown."""
    values = []
    try:
        meminfo = dict(line.split(":", 1) for line in open("/proc/meminfo"))
        values.append(int(meminfo["MemAvailable"].split()[0]) * 1024)
    except (OSError, KeyError, ValueError):
        pass
    try:
        limit = open("/sys/fs/cgroup/memory.max").read().strip()
        if limit != "max":
            values.append(int(limit) - int(open("/sys/fs/cgroup/memory.current").read()))
    except (OSError, ValueError):
        pass
    return min(values) if values else None


def check_memory(cfg: ModelParams, available: int | None = None) -> None:
    """Refuse, in one line, a configuration whose memory_needed exceeds the available memory."""
    available = available_memory() if available is None else available
    parts = memory_needed(cfg)
    if available is None or sum(parts.values()) <= available:
        return
    gb = lambda n: f"{n / 2**30:,.1f} GB"  # noqa: E731
    raise PipelineError(
        f"image_size={cfg.image_size}, batch_size={cfg.batch_size}, units={cfg.units}, "
        f"hidden_layers={cfg.hidden_layers}, pooling={cfg.pooling}, fine_tune={cfg.fine_tune} need at least "
        f"{gb(sum(parts.values()))} of memory ({', '.join(f'{k} {gb(v)}' for k, v in parts.items())}) but "
        f"{gb(available)} is available: lower image_size, batch_size or units, or use pooling=avg")
