"""The backbone's engines side by side, and the pipeline's extraction against the engine it uses.

    PIPELINE_DATA_DIR=../shared/data python benchmarks/extraction.py [--images 1024] [--image-size 224]

All in this run, on the same blood_cells images, at the precision `auto` picks on this CPU:
- forward: each engine (TensorFlow compiled tf.function, OpenVINO) over images already decoded
  in memory, after a warm-up (conversion and tracing are printed apart);
- decode: tf.data reading, decoding and resizing the files alone;
- pipeline: the feature cache's extraction (read, decode, resize, engine, check against
  TensorFlow float32, float16 memmap write) with the engine `auto` picks, into an empty cache.
Last lines: engine_speedup=<OpenVINO forward / TensorFlow forward> and
extraction_efficiency=<pipeline images/s / forward images/s of the engine used>.
"""

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from pipeline import datasets
from pipeline.data import load_images, make_dataset
from pipeline.engine import compile_model, resolve_engine
from pipeline.features import Backbone, split_features
from pipeline.model import feature_model, resolve_precision


def cpu_line() -> str:
    """The CPU's model name and whether it has AMX: the figures depend on it."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = "amx" if "amx_bf16" in info else "avx512_bf16 (no amx)" if "avx512_bf16" in info else "no bf16"
    return f"cpu={name!r} bf16={flags} cores={len([line for line in info.splitlines() if line.startswith('processor')])}"


def blood_cells_rows(n: int, seed: int = 0):
    """n images of blood_cells' TRAIN folder, classes balanced, with the columns steps use."""
    files = datasets.scan(datasets.locate("blood_cells"))
    files = datasets.cap(files[files["pool"] == "train"], n // files["label"].nunique(), seed)
    return files.assign(sha1=files["path"], label_index=0).reset_index(drop=True)


def forward_images_per_s(engine: str, precision: str, images: np.ndarray, batch: int) -> tuple[float, float]:
    """(images/s of engine over in-memory images, seconds to convert and warm it up)."""
    start = time.perf_counter()
    runner = compile_model(lambda policy: feature_model("none", images.shape[1], 0, policy), engine, precision)
    runner(images[:batch])
    warm = time.perf_counter() - start
    out = np.empty((len(images), *runner.output_shape), np.float32)
    start = time.perf_counter()
    runner.run((images[i:i + batch] for i in range(0, len(images), batch)), out)
    return len(images) / (time.perf_counter() - start), warm


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    precision, used = resolve_precision("auto"), resolve_engine("auto")
    rows = blood_cells_rows(args.images)
    images = load_images(rows["path"], args.image_size)  # decoded once, outside the forward timings
    forward = {}
    for engine in ("tensorflow", "openvino"):
        forward[engine], warm = forward_images_per_s(engine, precision, images, args.batch_size)
        print(f"{engine}_forward_images_per_s={forward[engine]:.1f} (conversion and warm-up {warm:.1f} s)")

    start = time.perf_counter()
    for _ in make_dataset(rows, args.image_size, args.batch_size):
        pass
    decode = len(rows) / (time.perf_counter() - start)

    backbone = Backbone("none", args.image_size, 0, used, precision)
    with tempfile.TemporaryDirectory() as cache:
        split_features(backbone, rows.iloc[:8], cache)  # conversion, outside the timing
        start = time.perf_counter()
        split_features(backbone, rows, cache, args.batch_size)
        pipeline = len(rows) / (time.perf_counter() - start)
    print(cpu_line())
    print(f"images={len(rows)} image_size={args.image_size} precision={precision} engine={used} "
          f"keras={keras.__version__}")
    print(f"decode_images_per_s={decode:.1f}")
    print(f"pipeline_extraction_images_per_s={pipeline:.1f}")
    print(f"decode_share={pipeline / decode:.3f}  # of the pipeline's time, if decoding did not overlap the engine")
    print(f"engine_speedup={forward['openvino'] / forward['tensorflow']:.2f}")
    print(f"extraction_efficiency={pipeline / forward[used]:.3f}")


if __name__ == "__main__":
    main()
