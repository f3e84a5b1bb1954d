"""Where the cached grid's time goes: grid_speedup's cached grid with a timer around each step.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/grid_profile.py [--max-per-class 50] [--epochs 5]

Runs the cached grid of benchmarks/grid_speedup.py (fresh store, empty cache) once, with wall-clock
timers wrapped around the step functions named below (a function's time includes the ones it
calls), and prints each one's calls and seconds. Last line: cached_grid_s=<wall time>.
"""

import argparse
import collections
import functools
import tempfile
import time

import pipeline.evaluate
import pipeline.grid
import pipeline.prepare
import pipeline.train
from grid_speedup import timed_grid
from pipeline.config import GridConfig

TIMED = [(pipeline.train, "train"), (pipeline.train, "fit"), (pipeline.train, "_fit"),
         (pipeline.train, "split_features"), (pipeline.evaluate, "evaluate_trained"), (pipeline.train, "log_trained"),
         (pipeline.train, "_whole_model"), (pipeline.train, "log_model"), (pipeline.train, "learning_curves"),
         (pipeline.train, "log_figure"), (pipeline.prepare, "prepare"), (pipeline.grid, "_log_table"),
         (pipeline.grid, "register")]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    seconds, calls = collections.defaultdict(float), collections.Counter()
    for module, name in TIMED:
        function, label = getattr(module, name), f"{module.__name__.split('.')[-1]}.{name}"

        @functools.wraps(function)
        def timed(*a, _function=function, _label=label, **k):
            start = time.perf_counter()
            try:
                return _function(*a, **k)
            finally:
                seconds[_label] += time.perf_counter() - start
                calls[_label] += 1
        setattr(module, name, timed)
    with tempfile.TemporaryDirectory() as folder:
        cfg = GridConfig(dataset="blood_cells", weights="none", max_per_class=args.max_per_class, epochs=args.epochs,
                         patience=args.epochs, image_size=224, feature_cache="auto", cache_dir=f"{folder}/cache",
                         experiment="profile")
        total = timed_grid(cfg, folder)
    for label, s in sorted(seconds.items(), key=lambda kv: -kv[1]):
        print(f"{label:26s} {calls[label]:3d} calls {s:7.2f} s")
    print(f"cached_grid_s={total:.1f}")


if __name__ == "__main__":
    main()
