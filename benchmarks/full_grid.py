"""The seven-point grid on every blood_cells image at 224 px, frozen backbone, end to end.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/full_grid.py [--epochs 10] [--precision auto]

One process, a fresh tracking store and an empty feature cache, so the figure includes
preparing the data (decode check of all 12,444 images), the one backbone pass that fills the
cache (engine `auto`), seven heads of up to 10 epochs each (early stopping allowed), seven
evaluations of those heads on the cached official TEST features, and one logged model (the best
point's). Prints the CPU, wall time, peak resident memory and the artifacts written; last line:
full_grid_minutes=<wall minutes>.
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import mlflow
from extraction import cpu_line

from pipeline.config import GridConfig
from pipeline.grid import grid


def folder_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--engine", default="auto")
    parser.add_argument("--max-per-class", type=int, default=0, help="0: every image")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mlflow.set_tracking_uri(f"sqlite:///{folder}/mlflow.db")
        os.chdir(folder)
        cfg = GridConfig(dataset="blood_cells", weights="none", epochs=args.epochs, image_size=args.image_size,
                         precision=args.precision, engine=args.engine, max_per_class=args.max_per_class,
                         cache_dir=f"{folder}/cache", experiment="full-grid")
        start = time.perf_counter()
        result = grid(cfg)
        minutes = (time.perf_counter() - start) / 60
        cache_gb = folder_mb(Path(folder, "cache")) / 1024
        artifacts_mb = sum(folder_mb(Path(folder, name)) for name in ("mlartifacts", "mlruns"))
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(cpu_line())
    print(f"points={len(result.table)} epochs<={args.epochs} image_size={args.image_size} "
          f"feature_cache_gb={cache_gb:.2f} python={sys.version.split()[0]}")
    print(f"artifacts_mb={artifacts_mb:.1f}")
    print(f"peak_rss_gb={peak_gb:.2f}")
    print(f"full_grid_minutes={minutes:.2f}")


if __name__ == "__main__":
    main()
