"""`python -m pipeline serve`: MLflow's own scoring app, the one `mlflow models serve` runs, with
one check in front.

MLflow's scoring server refuses a body it cannot read (not UTF-8; not JSON under
application/json) before any model sees it, with a message that quotes the whole body back. No
option of `mlflow models serve` changes that, and the model cannot: so the app is wrapped, not
patched. Everything else (endpoints, parsing, answers, MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT) is
MLflow's.
"""

import json
import os
import tempfile

import mlflow

MODEL_PATH = "PIPELINE_SERVE_MODEL"  # environment: the downloaded model that each server process loads


def serve(cfg) -> None:
    """Serve the model cfg.model (a ServeConfig) over HTTP until SIGTERM or SIGINT, as `mlflow models
    serve --env-manager local` does: MLflow's scoring app (mlflow.pyfunc.scoring_server.init) under
    uvicorn, the same endpoints and answers, the model downloaded once into a temporary folder
    removed at the end. What it adds: refuse_unreadable in front of /invocations."""
    import uvicorn

    from pipeline.card import read_card
    from pipeline.liveness import stop_on_signals

    read_card(cfg.model)  # one line for a URI that is not a model of this pipeline, before any download
    # uvicorn, once shut down, raises again the SIGTERM or SIGINT it stopped on: as a KeyboardInterrupt,
    # which it catches, rather than the default SIGTERM that would end the process before the clean-up
    stop_on_signals()
    with tempfile.TemporaryDirectory() as folder:
        os.environ[MODEL_PATH] = mlflow.artifacts.download_artifacts(artifact_uri=cfg.model, dst_path=folder)
        uvicorn.run(f"{__name__}:scoring_app", factory=True, host=cfg.host, port=cfg.port, workers=cfg.workers)


def scoring_app():
    """One server process's ASGI app: MLflow's scoring app for the model at $PIPELINE_SERVE_MODEL,
    refuse_unreadable in front."""
    from mlflow.pyfunc import load_model, scoring_server

    app = scoring_server.init(load_model(os.environ[MODEL_PATH]))
    app.middleware("http")(refuse_unreadable)
    return app


async def refuse_unreadable(request, call_next):
    """HTTP middleware: a POST to /invocations whose body MLflow cannot read (see unreadable) is
    answered 400 with one line that does not quote it; any other request goes on to MLflow."""
    from fastapi.responses import JSONResponse

    if request.method == "POST" and request.url.path == "/invocations":
        why = unreadable(await request.body(), request.headers.get("content-type", ""))
        if why:
            return JSONResponse({"error_code": "BAD_REQUEST", "message": why}, status_code=400)
    return await call_next(request)


def unreadable(body: bytes, content_type: str) -> str | None:
    """Why MLflow's scoring server cannot read a JSON or CSV body, in words that never quote it, or
    None. MLflow 3.17 answers these itself with the body in the message (scoring_server's
    _decode_json_input, and its UTF-8 decoding of CSV); other content types it refuses (415)
    naming only the type."""
    from pipeline.serving import EXAMPLE

    kind = content_type.split(";")[0].strip().lower()
    if kind not in ("application/json", "text/csv"):
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"the body is not UTF-8 text (byte {e.start} of {len(body)}): send JSON such as {EXAMPLE}"
    if kind == "application/json":
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            return f"the body is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}): send e.g. {EXAMPLE}"
    return None
