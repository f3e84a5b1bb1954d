"""Augmentation, class weights, two-phase fine-tuning and reproducibility, on tiny generated images."""

from dataclasses import asdict, replace
from types import SimpleNamespace

import keras
import mlflow
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny, tiny_values, write_images
from sklearn.utils.class_weight import compute_class_weight

from pipeline import prepared
from pipeline.card import load_model
from pipeline.config import RECIPE_FOR_DATA, RECIPES, ModelParams, PipelineError, PrepareConfig, TrainConfig, with_recipe
from pipeline.data import load_images
from pipeline.engine import compile_classifier
from pipeline.evaluate import DIHEDRAL, tta_views
from pipeline.model import FusedAdam, SmoothedSparseCrossentropy, build_model, for_inference
from pipeline.prepare import prepare
from pipeline.train import _restored, class_weights, for_data, train, uses_feature_cache



@pytest.fixture(scope="module")
def lopsided(tmp_path_factory):
    """Prepared data with twice as many cats as dogs or owls."""
    root = tmp_path_factory.mktemp("accuracy") / "lopsided"
    for label, n in {"cat": 16, "dog": 8, "owl": 8}.items():
        write_images(root / label, label, n)
    return prepare(PrepareConfig(dataset=str(root), experiment="accuracy", val_fraction=0.25, test_fraction=0.2))


def split(data_uri: str, name: str):
    return prepared.load(data_uri).split(name)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in mlflow.MlflowClient().get_metric_history(run_id, key)]


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["cells", "xray"])
def test_augmentation_acts_in_training_only(augment):
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    cfg = ModelParams(weights="none", image_size=32, augment=augment, precision="float32")
    model, plain = build_model(cfg, 3), build_model(replace(cfg, augment="none"), 3)
    plain.set_weights(model.get_weights())
    layers = [layer.name for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert layers[:2] == ["augment", "preprocess"] and model.inputs[0].shape == (None, 32, 32, 3)
    first, second = model.predict(images, verbose=0), model.predict(images, verbose=0)
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, plain.predict(images, verbose=0), atol=1e-6)
    block = model.get_layer("augment")
    np.testing.assert_array_equal(block(images, training=False), images)
    assert not np.allclose(block(images, training=True), images)  # it does augment in training


@pytest.mark.slow
def test_an_augmented_model_runs_on_openvino_without_its_augmentation(tmp_path):
    """OpenVINO cannot convert the random layers' ops (ImageProjectiveTransformV3): evaluate,
    predict and serve failed on every model trained with augment."""
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    cfg = ModelParams(weights="none", image_size=32, augment="cells", precision="float32")
    model = build_model(cfg, 3)
    runner = compile_classifier(model, asdict(cfg), 3, "openvino", "float32", str(tmp_path))
    np.testing.assert_allclose(runner(images), model.predict(images, verbose=0), atol=1e-4)
    assert "augment" not in [layer.name for layer in for_inference(model).layers]


def test_balanced_class_weights_match_scikit_learn():
    labels = np.array([0] * 6 + [1] * 3 + [2])
    expected = compute_class_weight("balanced", classes=np.arange(3), y=labels)
    assert class_weights(labels, 3, "balanced") == pytest.approx(dict(enumerate(expected)))
    assert class_weights(labels, 3, "balanced") == pytest.approx({0: 10 / 18, 1: 10 / 9, 2: 10 / 3})
    assert class_weights(labels, 3, "none") is None


def test_finetune_epochs_needs_layers_to_unfreeze():
    with pytest.raises(PipelineError, match="invalid finetune_epochs=3 with fine_tune='none'") as e:
        TrainConfig(data="runs:/x/data", finetune_epochs=3)
    assert "\n" not in str(e.value)
    TrainConfig(data="runs:/x/data", fine_tune="2", finetune_epochs=3)  # with layers to unfreeze: no PipelineError


def test_feature_cache_only_where_features_cannot_change():
    frozen = TrainConfig(data="runs:/x/data")
    assert uses_feature_cache(frozen)
    assert not uses_feature_cache(replace(frozen, augment="cells"))  # augmented images: no cached features
    assert not uses_feature_cache(replace(frozen, fine_tune="all"))
    assert not uses_feature_cache(replace(frozen, feature_cache="off"))
    two_phase = replace(frozen, fine_tune="all", finetune_epochs=2, augment="cells")
    assert uses_feature_cache(two_phase)  # phase 1 warms the head up on the frozen backbone


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A ResNet50 weights file whose BatchNorm statistics are not the fresh 0 and 1, as after
    pretraining: (path, {layer name: weights}, layer names in order, names of the BatchNorm layers)."""
    keras.utils.set_random_seed(1)
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(32, 32, 3))
    rng = np.random.default_rng(1)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([gamma, beta, rng.normal(0, 0.1, mean.shape).astype("float32"),
                               rng.uniform(0.9, 1.1, variance.shape).astype("float32")])
    path = tmp_path_factory.mktemp("weights") / "pretrained.weights.h5"
    backbone.save_weights(path)
    batchnorm = {layer.name for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)}
    weights = {layer.name: layer.get_weights() for layer in backbone.layers if layer.weights}
    return str(path), weights, [layer.name for layer in backbone.layers], batchnorm


class _BackboneSnapshots(keras.callbacks.Callback):
    """The backbone's weights after every epoch that trains the whole model (phase 2)."""

    def __init__(self):
        super().__init__()
        self.taken = []

    def on_epoch_end(self, epoch, logs=None):
        if self.model.name == "resnet50_classifier":
            self.taken.append(_weights_by_layer(self.model.get_layer("resnet50")))


def _weights_by_layer(backbone) -> dict:
    return {layer.name: [np.array(w) for w in layer.get_weights()] for layer in backbone.layers if layer.weights}


def _same(a: list, b: list) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.slow
@pytest.mark.eager  # traced on two devices in test_shared_study
def test_two_phase_training_keeps_pretrained_batchnorm_and_logs_both_phases(lopsided, pretrained, monkeypatch):
    path, before, names, batchnorm = pretrained
    fits, real_fit = [], keras.Model.fit

    def spy(self, *args, **kwargs):
        fits.append((self.name, kwargs.get("initial_epoch"), kwargs.get("class_weight")))
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    cfg = tiny(TrainConfig, data=lopsided.data_uri, experiment="accuracy-two-phase", precision="float32", epochs=1,
               weights=path, fine_tune="20", finetune_epochs=2, finetune_learning_rate=1e-3, augment="cells",
               class_weight="balanced")
    snapshots = _BackboneSnapshots()
    result = train(cfg, callbacks=[snapshots])

    weights = class_weights(split(lopsided.data_uri, "train")["label_index"], 3, "balanced")
    assert fits == [("head", 0, weights), ("resnet50_classifier", 1, weights)]  # features, then images
    logged = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/class_weights.json")
    assert logged == pytest.approx({"cat": weights[0], "dog": weights[1], "owl": weights[2]}) and logged["cat"] < 1
    assert [step for step, _ in metric_history(result.run_id, "val_loss")] == [1, 2, 3]
    assert mlflow.get_run(result.run_id).data.metrics["finetune_start_epoch"] == 2

    top = set(names[-20:])
    assert len(snapshots.taken) == 2 and len(batchnorm & top) >= 5
    model = load_model(result.model_uri)[0]
    for after in (*snapshots.taken, _weights_by_layer(model.get_layer("resnet50"))):
        assert all(_same(after[name], before[name]) for name in batchnorm)
    trained = {name for name in before if not _same(snapshots.taken[0][name], before[name])}
    assert trained == {name for name in top if name in before} - batchnorm  # phase 2 trained the rest of the top
    images = load_images(split(lopsided.data_uri, "test")["path"].iloc[:1], 32)
    assert model.predict(images, verbose=0).shape == (1, 3)  # the logged model takes raw images


@pytest.mark.slow
def test_one_seed_gives_identical_metrics(lopsided):
    # fine_tune=5 trains a convolution and a BatchNorm layer from scratch, at a third of all's time.
    cfg = tiny(TrainConfig, data=lopsided.data_uri, experiment="accuracy-seed", precision="float32", fine_tune="5",
               augment="cells", class_weight="balanced")
    runs = [train(c, log_model=False).run_id for c in (cfg, cfg, replace(cfg, seed=7))]  # metrics only
    keys = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
    first, again, other = ({key: metric_history(run, key) for key in keys} for run in runs)
    assert first == again and len(first["train_loss"]) == 2
    assert first["train_loss"] != other["train_loss"]  # the seed does decide them
    tags = mlflow.get_run(runs[0]).data.tags
    assert (tags["seed"], tags["data_digest"]) == ("42", lopsided.digest)
    assert (tags["version.tensorflow"], tags["version.keras"], tags["version.mlflow"]) == (
        tf.__version__, keras.__version__, mlflow.__version__)


@pytest.mark.parametrize("min_delta", [0.0, 1e-4, 0.05])
def test_best_epoch_is_the_epoch_early_stopping_restores(min_delta):
    """Trained.best_epoch names the weights the model holds: Keras' EarlyStopping keeps the first
    epoch, then each whose val_loss beats the kept one's by more than min_delta."""
    losses = [1.0, 0.99995, 0.96, 0.93, 0.95, 0.92, 0.91995]
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=100, min_delta=min_delta)
    stop.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    stop.on_train_begin()
    for epoch, loss in enumerate(losses):
        stop.on_epoch_end(epoch, {"val_loss": loss})
    assert _restored(losses, min_delta) == stop.best_epoch == {0.0: 6, 1e-4: 5, 0.05: 3}[min_delta]


def test_tta_views_are_the_eight_flips_and_quarter_turns_of_a_model_trained_for_them():
    image = np.zeros((1, 5, 5, 1), np.float32)
    image[0, 0, 1] = 1  # one pixel on no axis of symmetry: each flip or turn moves it somewhere else
    spots = [tuple(np.argwhere(view(image)[0, ..., 0])[0]) for view in DIHEDRAL]
    assert spots[0] == (0, 1) and len(set(spots)) == 8
    assert tta_views("auto", "cells") == tta_views("dihedral", "none") == 8
    assert tta_views("auto", "xray") == tta_views("auto", "none") == tta_views("none", "cells") == 1


def test_a_recipe_fills_only_the_parameters_left_at_their_defaults():
    options = {"data": "runs:/x/data", "recipe": "scratch", "image_size": 96, "batch_size": 32}  # 32 is the default
    cfg = with_recipe(TrainConfig, options)
    assert (cfg.image_size, cfg.batch_size) == (96, RECIPES["scratch"]["batch_size"])  # passed: kept; at the default: set
    assert (cfg.weights, cfg.fine_tune, cfg.schedule) == ("none", "all", "cosine")
    assert with_recipe(TrainConfig, {"data": "runs:/x/data", "recipe": ""}) == TrainConfig(data="runs:/x/data")
    cells = for_data(TrainConfig(data="runs:/x/data", augment="auto"), SimpleNamespace(name="blood_cells"))
    assert cells.augment == "cells"
    recipe = with_recipe(TrainConfig, {"data": "runs:/x/data", "recipe": "scratch"})
    xrays = RECIPE_FOR_DATA["scratch"]["covid19"]["epochs"]
    assert xrays != recipe.epochs == for_data(recipe, SimpleNamespace(name="blood_cells")).epochs
    assert for_data(recipe, SimpleNamespace(name="covid19")).epochs == xrays  # the recipe's own value: the preset's
    assert for_data(replace(recipe, epochs=3), SimpleNamespace(name="covid19")).epochs == 3  # the user's: kept


@pytest.mark.slow
@pytest.mark.eager
def test_the_scratch_recipe_trains_with_label_smoothing_weight_decay_and_a_cosine_schedule(lopsided):
    options = {**tiny_values(TrainConfig, data=lopsided.data_uri), "recipe": "scratch", "batch_size": 64}
    result = train(with_recipe(TrainConfig, options), log_model=False)
    params = mlflow.get_run(result.run_id).data.params
    assert (params["recipe"], params["schedule"], params["fine_tune"]) == ("scratch", "cosine", "all")
    assert params["augment"] == "none"  # auto, for a folder that is no preset
    optimizer = result.trained.model.optimizer
    assert float(optimizer.learning_rate) == pytest.approx(0, abs=1e-9)  # the cosine's end, after the last step
    assert optimizer.weight_decay == RECIPES["scratch"]["weight_decay"]
    assert result.trained.model.loss.label_smoothing == RECIPES["scratch"]["label_smoothing"]


@pytest.mark.eager
def test_a_head_whose_bfloat16_features_fail_the_check_is_trained_logged_and_tagged_in_float32(lopsided, monkeypatch):
    from pipeline import engine, features
    from pipeline.model import backbone_policy

    monkeypatch.setitem(engine.MAX_REL_ERROR, "mixed_bfloat16", 1e-9)  # any real bfloat16 error is past it
    monkeypatch.setattr(features, "_FLOAT32_INSTEAD", {})
    result = train(tiny(TrainConfig, data=lopsided.data_uri, precision="mixed_bfloat16", engine="tensorflow"))
    assert result.trained.is_head and result.trained.backbone.precision == "float32"
    model, card, _ = load_model(result.model_uri)
    assert card.precision == "float32" and backbone_policy(model) == "float32"
    assert mlflow.get_run(result.run_id).data.tags["precision"] == "float32"


@pytest.mark.parametrize("weight_decay", [None, 0.05])
def test_fused_adam_updates_weights_as_keras_adam_under_a_cosine_schedule(weight_decay):
    """pipeline.model.FusedAdam (TensorFlow's fused kernel, the rate computed once a step) trains a
    model to the weights Keras' own Adam gives, with and without decoupled weight decay."""
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int32")
    weights = []
    for optimizer in (keras.optimizers.Adam, FusedAdam):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="relu"), keras.layers.Dense(2)])
        rate = keras.optimizers.schedules.CosineDecay(0.0, 12, warmup_target=0.05, warmup_steps=4)
        model.compile(optimizer=optimizer(rate, weight_decay=weight_decay),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for fused, own in zip(weights[1], weights[0], strict=True):
        np.testing.assert_allclose(fused, own, rtol=1e-4, atol=1e-5)  # the fused kernel rounds a little differently


def test_smoothed_sparse_crossentropy_trains_as_keras_categorical_crossentropy_with_label_smoothing():
    """The recipe's loss on class indices (pipeline.model.SmoothedSparseCrossentropy), in a traced
    fit, trains a model to the weights Keras' categorical cross-entropy with the same
    label_smoothing gives on one-hot targets."""
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    y = (x[:, 0] > 0).astype("int32") + (x[:, 1] > 1).astype("int32")  # three classes
    weights = []
    for loss, targets in ((keras.losses.CategoricalCrossentropy(label_smoothing=0.2), keras.ops.one_hot(y, 3)),
                          (SmoothedSparseCrossentropy(0.2), y)):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, activation="softmax")])
        model.compile(optimizer=keras.optimizers.SGD(0.5), loss=loss)
        model.fit(x, targets, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for sparse, one_hot in zip(weights[1], weights[0], strict=True):
        np.testing.assert_allclose(sparse, one_hot, rtol=1e-5, atol=1e-6)
