"""Feature extraction from JPEG files vs the backbone alone on in-memory tensors.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/extraction.py [--images 1024] [--precision auto]

Both are timed in this run, at the same precision and batch size, after a warm-up: the
pipeline's extraction (read, decode, resize in tf.data, backbone, float16 memmap write) and the
backbone's forward pass (pipeline.model.feature_extractor) over the same images already decoded
in memory. Last line: extraction_efficiency=<pipeline images/s divided by forward images/s>.
"""

import argparse
import tempfile
import time

import keras
import numpy as np

from pipeline import datasets
from pipeline.config import ModelParams
from pipeline.data import load_images
from pipeline.features import cached_features
from pipeline.model import build_model, feature_extractor, resolve_precision


def blood_cells_rows(n: int, seed: int = 0):
    """n images of blood_cells' TRAIN folder, classes balanced, with the columns steps use."""
    files = datasets.scan(datasets.locate("blood_cells"))
    files = datasets.cap(files[files["pool"] == "train"], n // files["label"].nunique(), seed)
    return files.assign(sha1=files["path"], label_index=0).reset_index(drop=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    precision = resolve_precision(args.precision)
    rows = blood_cells_rows(args.images)
    extractor = feature_extractor(build_model(ModelParams(weights="none", image_size=args.image_size,
                                                          precision=precision), 4))
    images = load_images(rows["path"], args.image_size)  # decoded once, outside both timings
    extractor.predict_on_batch(images[: args.batch_size])  # warm-up: tracing and one-time allocations

    start = time.perf_counter()
    for i in range(0, len(images), args.batch_size):
        extractor.predict_on_batch(images[i:i + args.batch_size])
    forward = len(images) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        features, _ = cached_features(rows, extractor, "bench", cache, args.batch_size)
        pipeline = len(rows) / (time.perf_counter() - start)
    print(f"images={len(rows)} image_size={args.image_size} precision={precision} keras={keras.__version__}")
    print(f"backbone_forward_images_per_s={forward:.1f}")
    print(f"pipeline_extraction_images_per_s={pipeline:.1f}")
    print(f"extraction_efficiency={pipeline / forward:.3f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
