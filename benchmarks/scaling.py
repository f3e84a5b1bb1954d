"""Feature extraction time and head-epoch time at about 1k, 4k and 12k blood_cells images.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/scaling.py [--image-size 224] [--sizes 1000 4000 12000]

For each size: extract the frozen backbone's features (empty cache) and train the studies'
head (1 hidden layer of 8 units) for two epochs on them. Cost should grow linearly: the
seconds per image are printed for each size. Last line: scaling_ratio=<largest size's seconds
per image over the smallest's, extraction and head epoch>; 1.0 is perfectly linear.
"""

import argparse
import tempfile
import time

import numpy as np
from extraction import blood_cells_rows

from pipeline.config import ModelParams
from pipeline.features import Backbone, FeatureBatches, split_features
from pipeline.model import build_head, compile_for_training


def measure(n: int, image_size: int, cache: str) -> tuple[float, float]:
    """(extraction seconds, seconds of one head epoch) for n images."""
    rows = blood_cells_rows(n)
    cfg = ModelParams(weights="none", image_size=image_size)
    start = time.perf_counter()
    features = split_features(Backbone.of(cfg), rows, cache).array
    extraction = time.perf_counter() - start
    head = build_head(features.shape[1:], cfg, 4)
    compile_for_training(head, 1e-4)
    labels = np.arange(len(rows)) % 4
    head.fit(FeatureBatches(features, labels, 32, seed=0), epochs=1, verbose=0)  # warm-up epoch
    start = time.perf_counter()
    head.fit(FeatureBatches(features, labels, 32, seed=0), epochs=1, verbose=0)
    return extraction, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 12000])
    args = parser.parse_args()
    per_image = {}
    with tempfile.TemporaryDirectory() as cache:
        for n in args.sizes:
            extraction, epoch = measure(n, args.image_size, cache)
            per_image[n] = (extraction / n, epoch / n)
            print(f"images={n} extraction_s={extraction:.1f} head_epoch_s={epoch:.2f} "
                  f"ms_per_image={1000 * extraction / n:.2f}/{1000 * epoch / n:.3f}")
    small, large = per_image[min(per_image)], per_image[max(per_image)]
    print(f"scaling_ratio={large[0] / small[0]:.2f}/{large[1] / small[1]:.2f}")


if __name__ == "__main__":
    main()
