"""What a logged model is, written and read here only: the model card, and logging and loading.

A ModelCard travels in the logged MLflow model's metadata (key "card"), as timm's pretrained_cfg
travels with its model: evaluate, predict, the registry and serving read class names, image size,
precision and the rest from it, never from folders or from loose keys.
"""

import os
from dataclasses import asdict, dataclass, fields

import mlflow

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


class _KerasFlavor:
    """mlflow.keras, whose save_model writes the input example before it creates the model's
    folder (mlflow/mlflow#16183, still open in MLflow 3.17): create the folder first.
    Once fixed upstream, log_model becomes mlflow.keras.log_model(model, name=..., ...)."""

    @staticmethod
    def save_model(path, validate_serving_input=None, **kwargs):
        os.makedirs(path, exist_ok=True)
        mlflow.keras.save_model(path=path, **kwargs)


def log_model(model, card: ModelCard, example):
    """Log the whole image-to-probabilities Keras model, with its card, into the active run; its
    ModelInfo. example: a few images (float32 NHWC) for the signature and input example."""
    import keras
    import numpy as np
    import tensorflow as tf
    from mlflow.models import infer_signature

    return mlflow.models.Model.log(
        artifact_path=None,
        name=MODEL_NAME,
        flavor=_KerasFlavor,
        flavor_name="mlflow.keras",
        model=model,
        signature=infer_signature(example, np.asarray(model(example, training=False))),
        input_example=example,
        metadata=card.metadata(),
        pip_requirements=[f"mlflow=={mlflow.__version__}", f"tensorflow=={tf.__version__}",
                          f"keras=={keras.__version__}"],
        # MLflow would reload the model twice (7 s for ResNet50) to replay the input example;
        # tests/test_steps.py loads logged models with pyfunc and predicts on raw images instead.
        validate_serving_input=False,
    )


def read_card(uri: str) -> tuple[ModelCard, str | None]:
    """(the card of the model at uri, the run that logged it), without loading the model."""
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as e:
        raise PipelineError(f"cannot read model {uri!r} ({type(e).__name__}): pass a model URI logged by "
                            "train, e.g. runs:/<id>/model or models:/<name>@champion") from None
    return ModelCard.from_metadata(info.metadata, uri), info.run_id


def load_model(uri: str) -> tuple["keras.Model", ModelCard, str | None]:
    """(Keras model, its card, the run that logged it) of a model logged by log_model, or one line."""
    card, run_id = read_card(uri)
    try:
        return mlflow.keras.load_model(uri), card, run_id
    except Exception as e:
        raise PipelineError(f"cannot load model {uri!r} ({type(e).__name__}): pass a model URI logged by "
                            "train, e.g. runs:/<id>/model or models:/<name>@champion") from None
