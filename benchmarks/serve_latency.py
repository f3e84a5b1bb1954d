"""Latency of `mlflow models serve`: the served pyfunc (base64 JPEGs in, class names out) against
the Keras tensor form it replaces (float32 pixels as nested JSON lists), both at 224 px; and the
served pyfunc under `python -m pipeline serve` (the same scoring app, a body check in front).

    python benchmarks/serve_latency.py [--image-size 224] [--repeats 7]

A weights=none ResNet50 (3 classes) logged both ways in a temporary tracking store, each served
by a real server on 127.0.0.1; requests of 1 and 32 images, median of --repeats after one
warm-up. Prints name=value lines: <server>_images_<n>_median_s and body_bytes_per_image for each
(image, tensor: mlflow models serve; pipeline_serve_image), then speedup_32 (tensor median /
image median at 32 images).
"""

import argparse
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's pipeline, whatever is pip-installed
from test_serve import free_port, post  # noqa: E402  the same server handling as the tests


def log_both(image_size: int, folder: Path) -> tuple[str, str]:
    """(model URI of the served pyfunc, of the plain Keras flavour), logged in folder's store."""
    from pipeline.card import ModelCard, log_model
    from pipeline.config import TrainConfig
    from pipeline.model import build_model, resolve_precision

    cfg = TrainConfig(data="runs:/none/data", weights="none", image_size=image_size)
    model = build_model(cfg, 3)
    card = ModelCard(["a", "b", "c"], image_size, resolve_precision("auto"), "openvino", "bench", "0" * 16,
                     vars(cfg), "random (seed 42)", "")
    example = np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3)).astype("float32")
    with mlflow.start_run():
        served = log_model(model, card, example).model_uri
        tensor = mlflow.keras.log_model(model, name="tensor").model_uri
    return served, tensor


def serve(command: list[str], folder: Path):
    """Start command with --port PORT added, from folder (the tracking store); (process, URL) once it answers."""
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], cwd=folder, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            urllib.request.urlopen(url + "/ping", timeout=2)
            return process, url
        except OSError:
            time.sleep(1)
    raise SystemExit(f"no server on {url}")


def median_seconds(url: str, body: bytes, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        start = time.perf_counter()
        status, answer = post(url, body)
        times.append(time.perf_counter() - start)
        assert status == 200, answer[:300]
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # smooth images (8x8 random colours, upsampled) compress like photographs; noise would not
    pixels = [np.asarray(Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (args.image_size, args.image_size), Image.BICUBIC)) for _ in range(32)]
    jpegs = []
    for p in pixels:
        buffer = io.BytesIO()
        Image.fromarray(p).save(buffer, "JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    bodies = {"image": lambda n: json.dumps({"dataframe_records": [{"image": base64.b64encode(j).decode()}
                                                                    for j in jpegs[:n]]}).encode(),
              "tensor": lambda n: json.dumps({"inputs": np.stack(pixels[:n]).astype("float32").tolist()}).encode()}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder}/mlflow.db"
        os.chdir(folder)
        image, tensor = log_both(args.image_size, folder)
        mlflow_serve = ["mlflow", "models", "serve", "--env-manager", "local", "-h", "127.0.0.1", "-m"]
        servers = {"image": (mlflow_serve + [image], "image"), "tensor": (mlflow_serve + [tensor], "tensor"),
                   "pipeline_serve_image": ([sys.executable, "-m", "pipeline", "serve", "--model", image], "image")}
        medians = {}
        for name, (command, form) in servers.items():
            process, url = serve(command, folder)
            try:
                for n in (1, 32):
                    body = bodies[form](n)
                    medians[name, n] = median_seconds(url, body, args.repeats)
                    print(f"{name}_images_{n}_median_s={medians[name, n]:.3f}")
                    print(f"{name}_images_{n}_body_bytes_per_image={len(body) // n}", flush=True)
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=30)
    print(f"speedup_32={medians['tensor', 32] / medians['image', 32]:.2f}")


if __name__ == "__main__":
    main()
