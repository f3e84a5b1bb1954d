"""The served model: image files in, class names out, as an MLflow pyfunc.

`mlflow models serve` of a model logged by pipeline.card.log_model takes a column `image` of
base64-encoded image files (JPEG, PNG, BMP, GIF), decodes and resizes each exactly as training
did (pipeline.data.decode_image) and answers one row per image with the columns of predict's
CSV: `predicted` (class name), `confidence`, `p_<class>` per class and `error`. A row that does
not decode gets its `error` and no prediction; the other rows of the batch are classified.

The whole Keras model (artifact `model.keras`, for those who want tensors) is converted once, at
load time, for the engine that pipeline.engine picks (OpenVINO on a CPU), in the card's precision.

A request is refused with HTTP 400 and one line, which never repeats the request, when it has no
`image` column of strings (e.g. pixels as nested lists) or more than MAX_ROWS rows; an image over MAX_IMAGE_BYTES encoded or
MAX_PIXELS decoded is a row error.
"""

import base64
import binascii
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

KERAS_ARTIFACT = "keras_model"  # the pyfunc's artifact key of the Keras model file
CARD_ARTIFACT = "card"  # ... and of the model card (card.json)
COLUMN = "image"
MAX_ROWS = 128  # images per request: 128 JPEGs at 224 px take about 4 s on 2 cores
MAX_IMAGE_BYTES = 20 * 2**20  # one encoded image file
MAX_PIXELS = 40_000_000  # one decoded image (width x height): 120 MB of uint8 RGB
EXAMPLE = f'{{"dataframe_records": [{{"{COLUMN}": "<base64 of a JPEG>"}}]}}'  # a request, for error messages


class RequestError(MlflowException):
    """A bad request: HTTP 400 with this one-line message. MLflow's scoring server prefixes a
    predict error's message with the parsed request ("Failed to predict data '<the data>'"), which
    for images is kilobytes of base64 per row: the message keeps the value it was created with."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_message"):
            self._message = value


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """The pyfunc: the Keras model and the model card (pipeline.card.ModelCard) are its artifacts."""

    def load_context(self, context):
        import keras

        from pipeline.card import ModelCard
        from pipeline.engine import compile_classifier

        self.card = ModelCard.from_metadata(json.loads(Path(context.artifacts[CARD_ARTIFACT]).read_text()))
        self.keras_model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False)
        self.runner = compile_classifier(self.keras_model, self.card.config, len(self.card.class_names), "auto",
                                         self.card.precision)

    def predict(self, context, model_input, params=None):
        images = _images_of(model_input)
        decoded, errors = zip(*(decode(value, self.card.image_size) for value in images)) if images else ((), ())
        ok = [i for i, e in enumerate(errors) if e is None]
        probs = np.full((len(images), len(self.card.class_names)), np.nan, np.float32)
        if ok:
            probs[ok] = self.runner(np.stack([decoded[i] for i in ok]))
        table = prediction_table(probs, self.card.class_names, list(errors))
        return table.astype(object).where(table.notna(), None)  # JSON null, not NaN, for failed rows


def _images_of(model_input) -> list:
    if not isinstance(model_input, pd.DataFrame) or COLUMN not in model_input.columns:
        raise RequestError(f"expected a column {COLUMN!r} of base64-encoded image files, e.g. {EXAMPLE}")
    if len(model_input) > MAX_ROWS:
        raise RequestError(f"{len(model_input)} images in one request, at most {MAX_ROWS}: send them in "
                           "several requests")
    images = model_input[COLUMN].tolist()
    wrong = next((i for i, v in enumerate(images) if not isinstance(v, str)), None)
    if wrong is not None:  # e.g. the pixels themselves, as nested lists
        raise RequestError(f"row {wrong}: {COLUMN!r} must be the base64 text of an image file, not a "
                           f"{type(images[wrong]).__name__}")
    return images


def decode(value, image_size: int) -> tuple[np.ndarray | None, str | None]:
    """(float32 (image_size, image_size, 3) RGB in [0, 255], None) for a base64 image file, or
    (None, why not)."""
    import tensorflow as tf
    from PIL import Image, UnidentifiedImageError

    from pipeline.data import decode_image

    if len(value) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        return None, f"image file over {MAX_IMAGE_BYTES // 2**20} MB"
    try:
        contents = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None, "not valid base64"
    try:  # the header only: refuse a decompression bomb before decoding it
        width, height = Image.open(io.BytesIO(contents)).size
    except (UnidentifiedImageError, OSError):
        return None, "not an image file (JPEG, PNG, BMP or GIF)"
    if width * height > MAX_PIXELS:
        return None, f"image of {width}x{height} pixels, over {MAX_PIXELS:,}"
    try:
        return decode_image(tf.constant(contents), image_size).numpy(), None
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
        return None, "the image file is corrupt or truncated: it does not decode"


def prediction_table(probs: np.ndarray, class_names: list[str], errors: list[str | None]) -> pd.DataFrame:
    """One row per image: predicted (class name), confidence (top probability), p_<class> per
    class, error. Rows with an error have it and no prediction (their probs are ignored)."""
    failed = np.array([bool(e) for e in errors], bool)
    probs = np.where(failed[:, None], np.nan, probs)
    known = np.nan_to_num(probs, nan=0.0)
    table = pd.DataFrame({"predicted": [None if f else class_names[i] for f, i in zip(failed, known.argmax(axis=1))],
                          "confidence": np.where(failed, np.nan, known.max(axis=1))})
    table[[f"p_{c}" for c in class_names]] = probs
    table["error"] = pd.Series([e or None for e in errors], dtype=object)
    return table


def encode_file(path) -> str:
    """The base64 text of an image file, as a request's `image` value."""
    with open(path, "rb") as f:
        return base64.b64encode(f.read()).decode("ascii")
