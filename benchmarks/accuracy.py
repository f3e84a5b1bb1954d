"""Honest test accuracy: ResNet50 from scratch, augmented, in a time budget, scored on blood_cells' official TEST split.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py [--minutes 55] [--image-size 96]
    PIPELINE_DATA_DIR=../shared/data python benchmarks/accuracy.py --minutes 3 --max-per-class 100   # smoke

Prepares the dataset (blood_cells: the official TEST folder is the test split, validation is 20%
of TRAIN; covid19 has no official split, so a random 20% is held out), trains a ResNet50 from
random weights (weights=none, fine_tune=all: these machines cannot fetch ImageNet weights) with
augmentation (cells for blood_cells, xray for covid19) on --image-size px images, early-stopped on
val_loss with the best weights restored, for as many epochs as fit in --minutes, and scores the
model with the pipeline's evaluate, the only step that reads the test split.

The budget covers the whole benchmark: training stops once another epoch plus the final
evaluation would not fit (the evaluation's time is estimated from the last validation pass).
Prints each epoch's time; last line: official_test_accuracy=<test accuracy>.

Measured on the 2-core CPU: a from-scratch training step runs ~7-30 images/s at 96 px, so a
full-data epoch (7,966 train images) takes several minutes and 55 minutes hold a handful of
epochs. Measured figures: the README's Accuracy section.
"""

import argparse
import os
import tempfile
import time

import keras
import mlflow

from pipeline.config import EvaluateConfig, PrepareConfig, TrainConfig
from pipeline.evaluate import evaluate
from pipeline.prepare import prepare
from pipeline.train import train

AUGMENT = {"blood_cells": "cells", "covid19": "xray"}


class TimeBudget(keras.callbacks.Callback):
    """Stops fit when another epoch and the final evaluation would end past deadline
    (time.monotonic() seconds); prints each epoch's training and validation time."""

    def __init__(self, deadline: float, test_images: int, val_images: int):
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
    parser.add_argument("--dataset", choices=sorted(AUGMENT), default="blood_cells")
    parser.add_argument("--minutes", type=float, default=55, help="budget of the whole benchmark")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--max-per-class", type=int, default=0, help="0: every image")
    parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam; 1e-3 suits training from scratch")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--patience", type=int, default=5, help="epochs without a lower val_loss before stopping")
    parser.add_argument("--max-epochs", type=int, default=200, help="the time budget usually ends training first")
    parser.add_argument("--augment", choices=("none", "cells", "xray"), help="default: cells or xray by dataset")
    parser.add_argument("--class-weight", choices=("none", "balanced"), default="none")
    parser.add_argument("--pooling", choices=("avg", "flatten"), default="avg",
                        help="avg: ResNet's own global average pooling")
    parser.add_argument("--hidden-layers", type=int, default=0)
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--store", default="", help="folder for the MLflow runs; default: a temporary one")
    return parser.parse_args()


def run(args, folder: str, deadline: float) -> float:
    """Prepare, train and evaluate in folder's tracking store; the test accuracy."""
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    os.chdir(folder)
    experiment = f"accuracy-{args.dataset}"
    data = prepare(PrepareConfig(dataset=args.dataset, max_per_class=args.max_per_class, seed=args.seed,
                                 experiment=experiment))
    counts = data.counts.sum()
    print(f"images: train={counts['train']} val={counts['val']} test={counts['test']}", flush=True)
    cfg = TrainConfig(data=data.data_uri, experiment=experiment, weights="none", fine_tune="all",
                      image_size=args.image_size, augment=args.augment or AUGMENT[args.dataset],
                      class_weight=args.class_weight, pooling=args.pooling, hidden_layers=args.hidden_layers,
                      units=args.units, dropout=args.dropout, learning_rate=args.learning_rate,
                      batch_size=args.batch_size, epochs=args.max_epochs, patience=args.patience, seed=args.seed,
                      cache_dir=f"{folder}/cache")
    trained = train(cfg, callbacks=[TimeBudget(deadline, counts["test"], counts["val"])])
    epochs = len(mlflow.MlflowClient().get_metric_history(trained.run_id, "val_loss"))
    best = int(mlflow.get_run(trained.run_id).data.metrics["best_epoch"])
    print(f"epochs={epochs} best_epoch={best} best_val_accuracy={trained.best_val_accuracy:.4f} "
          f"learning_minutes={trained.learning_time_s / 60:.1f}", flush=True)
    scores = evaluate(EvaluateConfig(model=trained.model_uri, data=data.data_uri, experiment=experiment,
                                     batch_size=args.batch_size, cache_dir=f"{folder}/cache"))
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
    print(f"dataset={args.dataset} image_size={args.image_size} max_per_class={args.max_per_class} "
          f"wall_minutes={(time.monotonic() - start) / 60:.1f} budget_minutes={args.minutes:g}")
    print(f"official_test_accuracy={accuracy:.4f}")


if __name__ == "__main__":
    main()
