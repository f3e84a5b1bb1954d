"""The served model: base64 image files in, class names out, through a real `mlflow models serve`."""

import base64
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, free_port, stop_group, write_images

from pipeline.data import load_images
from pipeline.server import unreadable
from pipeline.serving import MAX_ROWS, RequestError, decode, encode_file, prediction_table

CHAMPION_URI = "models:/regshapes-resnet50@champion"
MARKER = "QUOTED-BACK-7f3a"  # in every bad request below: an answer that contains it repeats the request


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
            time.sleep(0.2)
    pytest.fail(f"no answer on {url}/ping in {timeout} s:\n{log.read_text()[-3000:]}")


def serving(command: list[str], port: int, folder, log) -> Iterator[str]:
    """Run a server command (in its own session, so that killing its group also ends uvicorn's
    workers) from folder, the tracking store; yield its URL once it answers; stop its whole group."""
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=folder,
                                   env={**os.environ}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_ping(url, process, log)
        yield url
    finally:
        stop_group(process)


@pytest.fixture(scope="module")
def server(trained, tracking_store, tmp_path_factory):
    """`mlflow models serve` of the champion on a free port: its URL, until the end of the module."""
    port = free_port()
    yield from serving(["mlflow", "models", "serve", "-m", CHAMPION_URI, "--env-manager", "local", "-h", "127.0.0.1",
                        "-p", str(port)], port, tracking_store, tmp_path_factory.mktemp("serve") / "serve.log")


@pytest.fixture(scope="module")
def pipeline_server(trained, tracking_store, tmp_path_factory):
    """`python -m pipeline serve` of the champion on a free port: its URL, until the end of the module."""
    port = free_port()
    yield from serving([sys.executable, "-m", "pipeline", "serve", "--model", CHAMPION_URI, "--port", str(port)], port,
                       tracking_store, tmp_path_factory.mktemp("serve") / "pipeline-serve.log")


@pytest.fixture(params=["mlflow models serve", "python -m pipeline serve"])
def any_server(request, trained) -> str:
    """Each server in turn: they serve the same model with the same scoring app. (trained, which
    both need, named here too: it puts the tests in the worker that has it, conftest.py.)"""
    return request.getfixturevalue({"mlflow models serve": "server"}.get(request.param, "pipeline_server"))


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/invocations", data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def records(*images: str) -> bytes:
    return json.dumps({"dataframe_records": [{"image": image} for image in images]}).encode()


# Bad requests: (body, content type, what the answer must not contain)
MODEL_REFUSES = {  # MLflow parses these into a table, which the model refuses
    "too many rows": (records(*[MARKER] * (MAX_ROWS + 1)), "application/json", MARKER.encode()),
    "tensor form": (json.dumps({"inputs": np.full((1, 8, 8, 3), 1234567.25).tolist()}).encode(), "application/json",
                    b"1234567.25"),
    "no image column": (json.dumps({"dataframe_records": [{"picture": MARKER}]}).encode(), "application/json",
                        MARKER.encode()),
    "image not text": (json.dumps({"dataframe_records": [{"image": [MARKER]}]}).encode(), "application/json",
                       MARKER.encode()),
}
UNREADABLE = {  # MLflow cannot read these, and its own answer quotes them
    "invalid JSON": (b'{"dataframe_records": [{"image": "' + MARKER.encode() + b'"', "application/json"),
    "not UTF-8": (b'{"dataframe_records": [{"image": "\xff' + MARKER.encode() + b'"}]}', "application/json"),
    "CSV not UTF-8": (b"image\n\xff" + MARKER.encode() + b"\n", "text/csv"),
}


def assert_refused_in_one_line(status: int, answer: bytes, quoted: bytes) -> str:
    """The message of a 400 answer that does not contain quoted and is one short line."""
    assert status == 400, answer[:500]
    assert quoted not in answer and len(answer) < 2000, answer[:2000]
    message = json.loads(answer)["message"]
    assert "\n" not in message
    return message


@pytest.mark.slow
def test_served_champion_names_the_class_of_a_real_jpeg(any_server, tmp_path):
    [jpeg] = write_images(tmp_path, "owl", 1, size=50, fmt="jpeg")
    status, body = post(any_server, records(encode_file(jpeg)))
    assert status == 200, body[:500]
    [row] = json.loads(body)["predictions"]
    assert row["predicted"] in CLASSES and row["error"] is None
    assert sum(row[f"p_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-4)
    assert row["confidence"] == max(row[f"p_{c}"] for c in CLASSES)


@pytest.mark.slow
def test_a_corrupt_image_gets_its_rows_error_and_the_others_their_classes(server, tmp_path):
    images = [encode_file(p) for p in write_images(tmp_path, "cat", 1, fmt="png") + write_images(tmp_path, "dog", 1, fmt="bmp")]
    truncated = base64.b64encode(base64.b64decode(images[0])[:60]).decode()
    status, body = post(server, records(images[0], f"{MARKER}!", truncated, base64.b64encode(b"hello").decode(),
                                        images[1]))
    assert status == 200, body[:500]
    rows = json.loads(body)["predictions"]
    assert [r["error"] is None for r in rows] == [True, False, False, False, True]
    assert all(r["predicted"] in CLASSES for r in (rows[0], rows[4]))
    assert all(r["predicted"] is None and r["confidence"] is None and r["error"] for r in rows[1:4])
    assert rows[1]["error"] == "not valid base64" and MARKER.encode() not in body


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MODEL_REFUSES))
def test_a_request_the_model_refuses_is_a_400_in_one_line_that_does_not_quote_it(any_server, case):
    body, content_type, quoted = MODEL_REFUSES[case]
    assert_refused_in_one_line(*post(any_server, body, content_type), quoted)


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(UNREADABLE))
def test_pipeline_serve_refuses_an_unreadable_body_in_one_line_that_does_not_quote_it(pipeline_server, case):
    message = assert_refused_in_one_line(*post(pipeline_server, *UNREADABLE[case]), MARKER.encode())
    assert message.startswith("the body is not "), message


@pytest.mark.slow
def test_mlflow_models_serve_quotes_a_body_that_is_not_json(server):
    """Why `python -m pipeline serve` exists (README, Serve): MLflow's scoring server repeats such a
    body in its error, before the model sees it. Fails once MLflow stops: then drop the command."""
    status, answer = post(server, *UNREADABLE["invalid JSON"])
    assert status == 400 and MARKER.encode() in answer, answer[:500]


def test_unreadable_says_why_without_quoting_and_passes_what_mlflow_reads():
    for case, (body, content_type) in UNREADABLE.items():
        why = unreadable(body, content_type)
        assert why and MARKER not in why and "\n" not in why, case
    assert unreadable(records(MARKER), "application/json; charset=utf-8") is None
    assert unreadable(b"image\nabc\n", "text/csv") is None
    assert unreadable(b"\xff" + MARKER.encode(), "application/vnd.apache.parquet") is None  # MLflow reads bytes


def test_decode_reads_images_as_training_does_and_says_why_not(tmp_path):
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
