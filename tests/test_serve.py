"""`mlflow models serve` of the champion answers a real HTTP request with class probabilities."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pytest
from conftest import write_images
from PIL import Image

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_ping(url: str, server: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url + "/ping", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    pytest.fail(f"no answer on {url}/ping in {timeout} s:\n{log.read_text()[-3000:]}")


def test_serve_the_champion_over_http(trained, tracking_store, tmp_path):
    cfg, _ = trained
    port, log = free_port(), tmp_path / "serve.log"
    command = ["mlflow", "models", "serve", "-m", "models:/regshapes-resnet50@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:  # its own session, so that killing its group also ends uvicorn's workers
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tracking_store,
                                  env={**os.environ}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, server, log)
        [path] = write_images(tmp_path, "owl", 1, size=cfg.image_size)
        image = np.asarray(Image.open(path).convert("RGB"), dtype="float32")
        request = urllib.request.Request(url + "/invocations", data=json.dumps({"inputs": [image.tolist()]}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            [probabilities] = json.load(r)["predictions"]
        assert len(probabilities) == 3 and sum(probabilities) == pytest.approx(1, abs=1e-5)
        assert all(0 <= p <= 1 for p in probabilities)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
