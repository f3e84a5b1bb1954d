"""The seven-point grid with the feature cache vs the same grid with the live backbone every epoch.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/grid_speedup.py [--max-per-class 50] [--epochs 5]

Both grids run in this process on the same blood_cells subset, settings and epochs, each in a
fresh tracking store and (for the cached grid) an empty feature cache, so the cached figure
includes its one extraction (engine conversion included). What a process pays once whatever it
runs is outside both timings: importing TensorFlow and creating the sqlite store's tables.
Last line: grid_speedup=<live wall time / cached wall time>.
"""

import argparse
import os
import tempfile
import time

import mlflow

import pipeline.evaluate  # noqa: F401  TensorFlow and the steps imported outside the timings
import pipeline.train  # noqa: F401
from pipeline.config import GridConfig
from pipeline.grid import grid


def timed_grid(cfg: GridConfig, folder: str) -> float:
    mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
    os.chdir(folder)  # artifacts next to the store
    mlflow.MlflowClient().search_experiments()  # creates the store's tables
    start = time.perf_counter()
    grid(cfg)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()
    seconds = {}
    for mode in ("auto", "off"):
        with tempfile.TemporaryDirectory() as folder:
            cfg = GridConfig(dataset="blood_cells", weights="none", max_per_class=args.max_per_class,
                             epochs=args.epochs, patience=args.epochs, image_size=args.image_size,
                             feature_cache=mode, cache_dir=f"{folder}/cache", experiment=f"speedup-{mode}")
            seconds[mode] = timed_grid(cfg, folder)
    print(f"subset: max_per_class={args.max_per_class} epochs={args.epochs} image_size={args.image_size}")
    print(f"cached_grid_s={seconds['auto']:.1f}")
    print(f"live_grid_s={seconds['off']:.1f}")
    print(f"grid_speedup={seconds['off'] / seconds['auto']:.2f}")


if __name__ == "__main__":
    main()
