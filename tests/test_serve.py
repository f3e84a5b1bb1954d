"""The served model: base64 image files in, class names out, through a real `mlflow models serve`."""

import base64
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, write_images

from pipeline.serving import MAX_ROWS, RequestError, decode, encode_file, prediction_table


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


@pytest.fixture(scope="module")
def server(trained, tracking_store, tmp_path_factory):
    """`mlflow models serve` of the champion on a free port; its URL. Stopped (its whole process
    group) at the end of the module."""
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    command = ["mlflow", "models", "serve", "-m", "models:/regshapes-resnet50@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]
    with open(log, "w") as out:  # its own session, so that killing its group also ends uvicorn's workers
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=tracking_store,
                                   env={**os.environ}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, process, log)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def post(url: str, body: bytes) -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def records(*images: str) -> bytes:
    return json.dumps({"dataframe_records": [{"image": image} for image in images]}).encode()


@pytest.mark.slow
def test_served_champion_names_the_class_of_a_real_jpeg(server, tmp_path):
    [jpeg] = write_images(tmp_path, "owl", 1, size=50, fmt="jpeg")
    status, body = post(server, records(encode_file(jpeg)))
    assert status == 200, body[:500]
    [row] = json.loads(body)["predictions"]
    assert row["predicted"] in CLASSES and row["error"] is None
    assert sum(row[f"p_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-4)
    assert row["confidence"] == max(row[f"p_{c}"] for c in CLASSES)


@pytest.mark.slow
def test_a_corrupt_image_gets_its_rows_error_and_the_others_their_classes(server, tmp_path):
    images = [encode_file(p) for p in write_images(tmp_path, "cat", 1, fmt="png") + write_images(tmp_path, "dog", 1, fmt="bmp")]
    truncated = base64.b64encode(base64.b64decode(images[0])[:60]).decode()
    status, body = post(server, records(images[0], "not base64!", truncated, base64.b64encode(b"hello").decode(),
                                        images[1]))
    assert status == 200, body[:500]
    rows = json.loads(body)["predictions"]
    assert [r["error"] is None for r in rows] == [True, False, False, False, True]
    assert all(r["predicted"] in CLASSES for r in (rows[0], rows[4]))
    assert all(r["predicted"] is None and r["confidence"] is None and r["error"] for r in rows[1:4])


@pytest.mark.slow
@pytest.mark.parametrize("case", ["too many rows", "tensor form", "no image column"])
def test_a_bad_request_is_a_400_in_one_line_that_does_not_echo_it(server, tmp_path, case):
    [png] = write_images(tmp_path, "cat", 1, size=64)
    image = encode_file(png)
    body = {"too many rows": records(*[image] * (MAX_ROWS + 1)),
            "tensor form": json.dumps({"inputs": np.full((1, 32, 32, 3), 1e30).tolist()}).encode(),
            "no image column": json.dumps({"dataframe_records": [{"picture": image}]}).encode()}[case]
    status, answer = post(server, body)
    assert status == 400, answer[:500]
    assert image[:40].encode() not in answer and len(answer) < 2000, answer[:2000]
    assert b"\n" not in json.loads(answer)["message"].encode()


def test_decode_reads_images_as_training_does_and_says_why_not(tmp_path):
    from pipeline.data import load_images

    [png] = write_images(tmp_path, "dog", 1, size=40)
    image, error = decode(encode_file(png), 32)
    assert error is None and np.array_equal(image, load_images([png], 32)[0])
    assert decode("@@@", 32)[1] == "not valid base64"
    assert decode(base64.b64encode(b"GIF89a nope").decode(), 32)[1].startswith("not an image file")


def test_prediction_table_has_predicts_columns_and_no_prediction_for_failed_rows():
    probs = np.array([[0.2, 0.7, 0.1], [0.5, 0.3, 0.2]], np.float32)
    table = prediction_table(probs, list(CLASSES), [None, "not valid base64"])
    assert list(table.columns) == ["predicted", "confidence", "p_cat", "p_dog", "p_owl", "error"]
    assert table["predicted"].iloc[0] == "dog" and table["error"].iloc[1] == "not valid base64"
    assert table["predicted"].isna().tolist() == table["error"].notna().tolist() == [False, True]
    assert table["confidence"].iloc[0] == pytest.approx(0.7) and table.iloc[1, 1:5].isna().all()


def test_a_request_error_keeps_its_one_line_when_mlflow_prefixes_the_request():
    error = RequestError("129 images in one request, at most 128")
    error.message = f"Failed to predict data '{pd.DataFrame({'image': ['A' * 100]})}'. \nError: {error.message}"
    assert json.loads(error.serialize_as_json())["message"] == "129 images in one request, at most 128"
    assert error.get_http_status_code() == 400
