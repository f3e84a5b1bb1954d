"""Heads trained on bfloat16-backbone features vs float32-backbone features: best val accuracy.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/precision.py [--images 2000] [--image-size 128]

The same blood_cells images, backbone weights (weights=none, seed 0) and head training
(studies' head, 1e-4, 10 epochs, early stopping on val_loss) on features extracted at each
precision; validation is a stratified 20% of the images. Last line:
precision_gap_points=<|bf16 - fp32| best validation accuracy, in percentage points>.
"""

import argparse
import tempfile

import keras
import numpy as np
from extraction import blood_cells_rows
from sklearn.model_selection import train_test_split

from pipeline.config import ModelParams
from pipeline.features import Backbone, FeatureBatches, split_features
from pipeline.model import build_head, compile_for_training


def best_val_accuracy(precision: str, rows, image_size: int, cache: str) -> float:
    cfg = ModelParams(weights="none", image_size=image_size, precision=precision, seed=0)
    features = split_features(Backbone.of(cfg), rows, cache).array
    labels = rows["label"].astype("category").cat.codes.to_numpy()
    train, val = train_test_split(np.arange(len(rows)), test_size=0.2, random_state=0, stratify=labels)
    train, val = np.sort(train), np.sort(val)
    keras.utils.set_random_seed(0)
    head = build_head(features.shape[1:], ModelParams(), 4)
    compile_for_training(head, 1e-4)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=3, restore_best_weights=True)
    history = head.fit(FeatureBatches(features[train], labels[train], 32, seed=0),
                       validation_data=FeatureBatches(features[val], labels[val], 32),
                       epochs=10, callbacks=[stop], verbose=0).history
    return max(history["val_accuracy"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--image-size", type=int, default=128)
    args = parser.parse_args()
    rows = blood_cells_rows(args.images)
    with tempfile.TemporaryDirectory() as cache:
        scores = {p: best_val_accuracy(p, rows, args.image_size, cache) for p in ("float32", "mixed_bfloat16")}
    for precision, score in scores.items():
        print(f"{precision}_best_val_accuracy={score:.4f}")
    print(f"precision_gap_points={100 * abs(scores['float32'] - scores['mixed_bfloat16']):.2f}")


if __name__ == "__main__":
    main()
