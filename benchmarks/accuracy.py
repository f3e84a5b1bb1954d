"""Honest test accuracy offline: the from-scratch recipe in a time budget, scored on the official TEST split.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py [--minutes 60] [--grid]
    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py --dataset covid19     # the recipe: 24 epochs for covid19
    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py --set label_smoothing=0   # an ablation
    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py --minutes 3 --max-per-class 100 --set epochs=2  # smoke

Prepares the dataset (blood_cells: the official TEST folder is the test split, and validation is
whole source cells of TRAIN; covid19 has no official split, so a random 20% is held out), trains
with recipe=scratch (pipeline.config.RECIPES: a ResNet50 from random weights, since these
machines cannot fetch ImageNet's; --set name=value overrides any train parameter), and scores the
restored epoch (lowest val_loss) with the pipeline's evaluate, the only step that reads the test
split (tta=auto: for blood_cells, trained with augment=cells, the mean of each image's 8 flips and
quarter turns, and the one-view accuracy printed beside it). --grid then runs the studies'
seven-point grid frozen on the backbone just trained (weights=<the trained model's URI>, the same
image size) and prints its table.

The budget covers prepare, training and evaluation (not --grid): training stops early once another
epoch plus the evaluation would not fit. Prints each epoch's time; for blood_cells, in how many of
the test's source cells more than half of the images are right (official_test_cells_right=<right>/
<cells>, 71 cells on the full TEST: README, Accuracy); last line:
official_test_accuracy=<accuracy>. Measured figures: the README's Accuracy section.
"""

import argparse
import os
import tempfile
import time
from dataclasses import fields

import keras
import mlflow
import pandas as pd

from pipeline import datasets, prepared
from pipeline.config import PRESETS, RECIPES, EvaluateConfig, GridConfig, PrepareConfig, TrainConfig, with_recipe
from pipeline.evaluate import evaluate, tta_views
from pipeline.grid import grid
from pipeline.prepare import prepare
from pipeline.train import for_data, train


class TimeBudget(keras.callbacks.Callback):
    """Stops fit when another epoch and the final evaluation would end past deadline
    (time.monotonic() seconds); prints each epoch's training and validation time."""

    def __init__(self, deadline: float, test_images: int, val_images: int):  # test_images: times the views
        super().__init__()
        self.deadline, self.test_images, self.val_images = deadline, test_images, val_images
        self.epoch_start = self.val_start = 0.0
        self.val_s = None

    def reserve(self) -> float:
        """Seconds to keep for logging, reloading and evaluating the model on the test split: 30 s
        plus the test images at the last validation's pace (before one, a guessed 20 images/s)."""
        per_image = self.val_s / self.val_images if self.val_s is not None else 1 / 20
        return 30 + per_image * self.test_images

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = time.monotonic()

    def on_train_batch_end(self, batch, logs=None):
        if time.monotonic() > self.deadline - self.reserve():  # a first epoch too long for the budget
            self.model.stop_training = True

    def on_test_begin(self, logs=None):
        self.val_start = time.monotonic()

    def on_test_end(self, logs=None):
        self.val_s = time.monotonic() - self.val_start

    def on_epoch_end(self, epoch, logs=None):
        now = time.monotonic()
        took, left = now - self.epoch_start, self.deadline - now
        print(f"epoch {epoch + 1}: {took:.0f} s ({took - (self.val_s or 0):.0f} s training, {self.val_s or 0:.0f} s "
              f"validation), val_loss={logs.get('val_loss', float('nan')):.4f} "
              f"val_accuracy={logs.get('val_accuracy', float('nan')):.4f}, {left / 60:.1f} min left", flush=True)
        if left < took + self.reserve():
            print(f"time budget: stopping after epoch {epoch + 1}", flush=True)
            self.model.stop_training = True


def arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=PRESETS, default="blood_cells")
    parser.add_argument("--minutes", type=float, default=60, help="budget of prepare, train and evaluate")
    parser.add_argument("--max-per-class", type=int, default=0, help="0: every image")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="scratch")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="a train parameter, over the recipe's (repeatable), e.g. image_size=96")
    parser.add_argument("--grid", action="store_true", help="then the seven-point grid frozen on the trained backbone")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--store", default="", help="folder for the MLflow runs; default: a temporary one")
    args = parser.parse_args()
    if unknown := {item.split("=", 1)[0] for item in args.set} - {f.name for f in fields(TrainConfig)}:
        parser.error(f"--set: no train parameter {', '.join(sorted(unknown))}")  # before any work
    return args


def train_config(args, data_uri: str, folder: str) -> TrainConfig:
    """The recipe's config, with --set's values (typed as the fields are)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    sets = dict(item.split("=", 1) for item in args.set)
    options = {"data": data_uri, "experiment": f"accuracy-{args.dataset}", "recipe": args.recipe, "seed": args.seed,
               "cache_dir": f"{folder}/cache", **{k: types[k](v) for k, v in sets.items()}}
    return with_recipe(TrainConfig, options)


def cells_right(run_id: str, group: str) -> tuple[int, int]:
    """Of the test split's source cells (pipeline.datasets.source_ids), how many the evaluate run
    classified right in more than half of their images, and how many there are."""
    table = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.csv"))
    right = (table["predicted"] == table["label"]).groupby(datasets.source_ids(table, group)).mean() > 0.5
    return int(right.sum()), len(right)


def run(args, folder: str, deadline: float) -> float:
    """Prepare, train and evaluate in folder's tracking store (then the grid, with --grid); the test accuracy."""
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    os.chdir(folder)
    experiment = f"accuracy-{args.dataset}"
    data = prepare(PrepareConfig(dataset=args.dataset, max_per_class=args.max_per_class, seed=args.seed,
                                 experiment=experiment))
    counts = data.counts.sum()
    print(f"images: train={counts['train']} val={counts['val']} test={counts['test']}", flush=True)
    cfg = for_data(train_config(args, data.data_uri, folder), prepared.load(data.data_uri))  # as train resolves it
    print("train: " + ", ".join(f"{k}={getattr(cfg, k)}" for k in RECIPES[args.recipe]), flush=True)
    views = tta_views("auto", cfg.augment)
    trained = train(cfg, callbacks=[TimeBudget(deadline, counts["test"] * views, counts["val"])])
    epochs = len(mlflow.MlflowClient().get_metric_history(trained.run_id, "val_loss"))
    best = int(mlflow.get_run(trained.run_id).data.metrics["best_epoch"])
    print(f"epochs={epochs} best_epoch={best} best_val_accuracy={trained.best_val_accuracy:.4f} "
          f"learning_minutes={trained.learning_time_s / 60:.1f}", flush=True)
    scores = evaluate(EvaluateConfig(model=trained.model_uri, data=data.data_uri, experiment=experiment,
                                     batch_size=cfg.batch_size, cache_dir=f"{folder}/cache"))
    if group := datasets.PRESETS[args.dataset].group:
        right, cells = cells_right(scores.run_id, group)
        print(f"official_test_cells_right={right}/{cells} (source cells with more than half of their images right)",
              flush=True)
    if args.grid:
        print(f"official_test_accuracy={scores.metrics['test_accuracy']:.4f} (recipe); the grid on its backbone:",
              flush=True)
        grid(GridConfig(dataset=args.dataset, max_per_class=args.max_per_class, seed=args.seed,
                        experiment=f"grid-on-own-backbone-{args.dataset}", weights=trained.model_uri,
                        image_size=cfg.image_size, cache_dir=f"{folder}/cache"))  # prints its table
    return scores.metrics["test_accuracy"]


def main():
    args = arguments()
    start = time.monotonic()
    if os.environ.get("PIPELINE_DATA_DIR"):  # run() changes folder: a relative path would break
        os.environ["PIPELINE_DATA_DIR"] = os.path.abspath(os.environ["PIPELINE_DATA_DIR"])
    deadline = start + 60 * args.minutes
    if args.store:
        os.makedirs(args.store, exist_ok=True)
        accuracy = run(args, os.path.abspath(args.store), deadline)
    else:
        with tempfile.TemporaryDirectory() as folder:
            accuracy = run(args, folder, deadline)
    print(f"dataset={args.dataset} recipe={args.recipe} set={','.join(args.set) or '-'} max_per_class={args.max_per_class} "
          f"wall_minutes={(time.monotonic() - start) / 60:.1f} budget_minutes={args.minutes:g}")
    print(f"official_test_accuracy={accuracy:.4f}")


if __name__ == "__main__":
    main()
