"""What a logged model is, written and read here only: the model card, and logging and loading.

A ModelCard travels in the logged MLflow model's metadata (key "card"), as timm's pretrained_cfg
travels with its model: evaluate, predict, the registry and serving read class names, image size,
precision and the rest from it, never from folders or from loose keys.
"""

import base64
import json
import tempfile
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from importlib.metadata import version
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.config import PipelineError

MODEL_NAME = "model"  # the artifact name of a logged model in its run


@dataclass(frozen=True)
class ModelCard:
    class_names: list[str]
    image_size: int
    precision: str  # the backbone's compute precision in the logged Keras model
    engine: str  # the engine that computed the features the head trained on
    dataset: str
    data_digest: str  # of the prepared data the model trained on
    config: dict  # the TrainConfig, as logged in config.json
    backbone: str  # what the backbone's weights are: "imagenet", "random (seed 42)", a file's digest, a model
    backbone_digest: str  # digest of the backbone's weight values (pipeline.features.weights_digest)

    @property
    def frozen_backbone(self) -> bool:
        return self.config.get("fine_tune") == "none"

    def metadata(self) -> dict:
        return {"card": asdict(self)}

    @classmethod
    def from_metadata(cls, metadata: dict | None, uri: str = "") -> "ModelCard":
        card = (metadata or {}).get("card")
        if not isinstance(card, dict) or {f.name for f in fields(cls)} - card.keys():
            raise PipelineError(f"model {uri!r} has no model card in its metadata: it was not logged by this "
                                "pipeline's train (or by an older version): train it again, or pass another model")
        return cls(**{f.name: card[f.name] for f in fields(cls)})


class _PyfuncFlavor:
    """mlflow.pyfunc for Model.log, which takes validate_serving_input where pyfunc.save_model refuses it."""

    @staticmethod
    def save_model(path, validate_serving_input=None, **kwargs):
        mlflow.pyfunc.save_model(path=path, **kwargs)


def log_model(model, card: ModelCard, example):
    """Log model (the whole image-to-probabilities Keras model) into the active run as the served
    pyfunc of pipeline.serving (base64 image files in, class names out), the Keras model inside as
    the artifact model.keras, the card in its metadata; its ModelInfo. example: a few images
    (float32 NHWC, as pipeline.data decodes them) for the input example and signature."""
    import keras
    import tensorflow as tf

    from pipeline import serving
    from pipeline.engine import has_openvino

    with tempfile.TemporaryDirectory() as tmp:
        keras_file, card_file = Path(tmp) / "model.keras", Path(tmp) / "card.json"
        model.save(keras_file)
        card_file.write_text(json.dumps(card.metadata()))
        request = pd.DataFrame({serving.COLUMN: [_png_base64(example[0])]})
        return mlflow.models.Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=_PyfuncFlavor,
            flavor_name="mlflow.pyfunc",
            python_model=serving.ImageClassifier(),
            artifacts={serving.KERAS_ARTIFACT: str(keras_file), serving.CARD_ARTIFACT: str(card_file)},
            code_paths=[str(Path(__file__).parent)],  # the pipeline package: the served model imports it
            signature=_signature(card),
            input_example=request,
            metadata=card.metadata(),  # model_config would copy every field into the run's params
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"tensorflow=={tf.__version__}",
                              f"keras=={keras.__version__}", "pillow",
                              *([f"openvino=={version('openvino')}"] if has_openvino() else [])],
            # MLflow would load the model (and convert it for OpenVINO) to replay the input example;
            # tests/test_serve.py sends it to a real server instead.
            validate_serving_input=False,
        )


def _signature(card: ModelCard):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    from pipeline import serving

    outputs = [ColSpec("string", "predicted", required=False), ColSpec("double", "confidence", required=False)]
    outputs += [ColSpec("double", f"p_{c}", required=False) for c in card.class_names]
    # image is "optional" so that MLflow's schema check, whose message repeats the request, lets a
    # request without it through to the model's own one-line error
    return ModelSignature(Schema([ColSpec("string", serving.COLUMN, required=False)]),
                          Schema([*outputs, ColSpec("string", "error", required=False)]))


def _png_base64(image) -> str:
    import tensorflow as tf

    png = tf.io.encode_png(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)).numpy()
    return base64.b64encode(png).decode("ascii")


def read_card(uri: str) -> tuple[ModelCard, str | None]:
    """(the card of the model at uri, the run that logged it), without loading the model."""
    info = _model_info(uri)
    return ModelCard.from_metadata(info.metadata, uri), info.run_id


def _model_info(uri: str) -> mlflow.models.model.ModelInfo:
    try:
        return mlflow.models.get_model_info(uri)
    except Exception as e:
        raise PipelineError(f"cannot read model {uri!r} ({type(e).__name__}): pass a model URI logged by "
                            "train, e.g. runs:/<id>/model or models:/<name>@champion") from None


KEEP_LOADED = 2  # logged models kept loaded per process (load_model)
_loaded: OrderedDict = OrderedDict()  # model_uuid -> Keras model, the last used last


def load_model(uri: str) -> tuple["keras.Model", ModelCard, str | None]:
    """(Keras model, its card, the run that logged it) of a model logged by log_model, or one line.

    A process loads a logged model once, whatever URI names it (runs:/, models:/m-<id>, a version
    or an alias: MLflow's model_uuid): evaluate and then register both read the model a grid or
    tune command has just logged, and a ResNet50 is about 95 MB to read and build. The last
    KEEP_LOADED stay loaded. The model returned may be another caller's too: run it, read it,
    build from it, never change it."""
    import keras

    from pipeline import serving

    info = _model_info(uri)
    card = ModelCard.from_metadata(info.metadata, uri)
    if info.model_uuid and info.model_uuid in _loaded:
        _loaded.move_to_end(info.model_uuid)
        return _loaded[info.model_uuid], card, info.run_id
    try:
        folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri))
        artifacts = mlflow.models.Model.load(folder).flavors["python_function"]["artifacts"]
        model = keras.saving.load_model(folder / artifacts[serving.KERAS_ARTIFACT]["path"], compile=False)
    except Exception as e:
        raise PipelineError(f"cannot load model {uri!r} ({type(e).__name__}): pass a model URI logged by "
                            "train, e.g. runs:/<id>/model or models:/<name>@champion") from None
    if info.model_uuid:  # one logged by MLflow 3 always has one
        _loaded[info.model_uuid] = model
    while len(_loaded) > KEEP_LOADED:
        _loaded.popitem(last=False)
    return model, card, info.run_id
