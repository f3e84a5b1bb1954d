"""The steps on tiny generated images, against a real sqlite tracking store."""

import json
from dataclasses import fields
from pathlib import Path

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, make_dataset
from PIL import Image

from pipeline import model as model_module
from pipeline.card import load_model
from pipeline.config import EvaluateConfig, ModelParams, PipelineError, PrepareConfig, TrainConfig
from pipeline.data import load_images
from pipeline.evaluate import compute_metrics, evaluate
from pipeline.plots import learning_curves
from pipeline.prepare import prepare
from pipeline.serving import encode_file

pytestmark = pytest.mark.slow


def runs_of(experiment: str) -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[experiment])


def runs_of_main(result) -> pd.DataFrame:
    """The shared main run and its prepare, train and evaluate runs (other tests add runs beside them)."""
    runs = mlflow.search_runs([mlflow.get_run(result.run_id).info.experiment_id])
    return runs[(runs["run_id"] == result.run_id) | (runs["tags.mlflow.parentRunId"] == result.run_id)]


def test_main_nests_prepare_train_and_evaluate_under_one_run(trained):
    _, result = trained
    runs = runs_of_main(result)
    assert (runs["status"] == "FINISHED").all() and len(runs) == 4
    children = runs[runs["tags.mlflow.parentRunId"] == result.run_id]
    assert sorted(children["tags.step"]) == ["evaluate", "prepare", "train"]
    parent = runs[runs["run_id"] == result.run_id].iloc[0]
    assert parent["tags.model_uri"] == result.model_uri and 0 <= parent["metrics.test_accuracy"] <= 1


def test_train_logs_params_epochs_time_curves_and_model(trained):
    cfg, result = trained
    runs = runs_of_main(result)
    train_run = mlflow.get_run(runs[runs["tags.step"] == "train"]["run_id"].iloc[0])
    expected = {f.name for f in fields(TrainConfig)} - {"data"}  # a URI: a tag, not a param to compare on
    assert set(train_run.data.params) == expected and train_run.data.tags["data_uri"].startswith("runs:/")
    assert train_run.data.params["learning_rate"] == str(cfg.learning_rate)
    client = mlflow.MlflowClient()
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert [m.step for m in client.get_metric_history(train_run.info.run_id, key)] == [1, 2], key
    metrics = train_run.data.metrics
    assert metrics["best_epoch"] in (1, 2)  # epochs count from 1, as the steps do
    assert metrics["learning_time_s"] > 0 and "learning_time_ms" not in metrics  # one learning-time metric
    assert "test_accuracy" in metrics  # copied back by evaluate, for side-by-side comparison
    # the UI's compare view plots the first metric the store returns: sqlite returns them as logged
    assert next(iter(metrics)) == "val_accuracy"
    artifacts = [a.path for a in client.list_artifacts(train_run.info.run_id, "plots")]
    assert artifacts == ["plots/learning_curves.png"]
    config = json.loads(Path(mlflow.artifacts.download_artifacts(f"runs:/{train_run.info.run_id}/config.json")).read_text())
    assert config["units"] == cfg.units and config["data"].startswith("runs:/")


def test_learning_curves_count_epochs_from_1_and_mark_phase_2_at_its_first_epoch():
    history = {key: [0.9, 0.6, 0.5] for key in ("loss", "val_loss", "accuracy", "val_accuracy")}
    fig = learning_curves(history, phase_2=3)
    for ax in fig.axes:
        train_line, *_, phase_line = ax.lines
        assert list(train_line.get_xdata()) == [1, 2, 3] and list(phase_line.get_xdata()) == [2.5, 2.5]
    plt.close(fig)


def test_logged_model_classifies_raw_images_and_describes_itself(trained, tmp_path):
    _, result = trained
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    meta = pyfunc.metadata.metadata["card"]
    assert meta["class_names"] == list(CLASSES) and meta["image_size"] == 32
    path = tmp_path / "any_size.png"
    Image.new("RGB", (50, 70), (200, 40, 40)).save(path)
    [row] = pyfunc.predict(pd.DataFrame({"image": [encode_file(path)]})).to_dict("records")
    assert row["predicted"] in CLASSES and sum(row[f"p_{c}"] for c in CLASSES) == pytest.approx(1, abs=1e-5)
    assert pyfunc.metadata.get_input_schema().input_names() == ["image"]


def test_evaluate_logs_metrics_confusion_matrix_and_predictions(trained):
    _, result = trained
    runs = runs_of_main(result)
    run = mlflow.get_run(runs[runs["tags.step"] == "evaluate"]["run_id"].iloc[0])
    for key in ("test_loss", "test_accuracy", "test_macro_f1", "test_roc_auc", "test_recall/owl"):
        assert key in run.data.metrics, key
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/"))
    cm = pd.read_csv(folder / "confusion_matrix.csv", index_col=0)
    predictions = pd.read_csv(folder / "predictions.csv")
    manifest = pd.read_csv(Path(mlflow.artifacts.download_artifacts(result.data_uri)) / "manifest.csv")
    assert cm.to_numpy().sum() == len(predictions) == (manifest["split"] == "test").sum()
    assert (folder / "plots" / "confusion_matrix.png").stat().st_size > 0
    accuracy = (predictions["label"] == predictions["predicted"]).mean()
    assert run.data.metrics["test_accuracy"] == pytest.approx(accuracy)


def test_compute_metrics_on_a_known_case():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[.8, .1, .1], [.6, .3, .1], [.2, .7, .1], [.5, .4, .1], [.1, .1, .8], [.1, .2, .7]])
    m, cm = compute_metrics(y, probs, ["a", "b", "c"])
    assert m["test_accuracy"] == pytest.approx(5 / 6)
    assert cm.to_numpy().tolist() == [[2, 0, 0], [1, 1, 0], [0, 0, 2]]
    assert (m["test_precision/a"], m["test_recall/a"], m["test_recall/b"]) == pytest.approx((2 / 3, 1, 1 / 2))
    assert m["test_macro_f1"] == pytest.approx(np.mean([0.8, 2 / 3, 1]))
    assert m["test_loss"] == pytest.approx(-np.mean(np.log([.8, .6, .7, .4, .8, .7])))
    assert m["test_roc_auc"] == pytest.approx(np.mean([1, 1, 1]))
    binary, _ = compute_metrics(np.array([0, 1, 1]), np.array([[.9, .1], [.2, .8], [.6, .4]]), ["n", "p"])
    assert binary["test_roc_auc"] == pytest.approx(1.0) and binary["test_accuracy"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("weights, fine_tune", [("imagenet", "none"), ("imagenet", "all"), ("imagenet", "5"),
                                                ("none", "all"), ("none", "5")])
def test_model_head_and_trainable_layers(weights, fine_tune):
    cfg = ModelParams(weights=weights, image_size=32, fine_tune=fine_tune, units=16, hidden_layers=2)
    with pytest.MonkeyPatch.context() as mp:  # stands in for the download, which is offline here
        mp.setattr(keras.applications, "ResNet50", _random_resnet)
        model = model_module.build_model(cfg, n_classes=3)
    head, backbone = model.get_layer("head"), model.get_layer("resnet50")
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == ["Flatten", "Dense", "Dense", "Dropout", "Dense"]
    assert [layer.units for layer in head.layers if hasattr(layer, "units")] == [16, 16, 3]
    assert model.get_layer("preprocess").trainable is False and not model.get_layer("preprocess").trainable_weights
    trainable = [layer for layer in backbone.layers if layer.trainable and layer.weights]
    # A pretrained backbone's BatchNorm layers stay frozen (inference mode); from scratch they learn.
    unfrozen = {"none": [], "all": backbone.layers}.get(fine_tune, backbone.layers[-5:])
    expected = [la for la in unfrozen if la.weights
                and not (weights != "none" and isinstance(la, keras.layers.BatchNormalization))]
    assert [la.name for la in trainable] == [la.name for la in expected]
    # what the BatchNorm rule above is checked on: unfrozen BatchNorm layers, whenever any layer is unfrozen
    assert any(isinstance(la, keras.layers.BatchNormalization) for la in unfrozen) == (fine_tune != "none")
    assert len(model.trainable_weights) == len(head.trainable_weights) + sum(len(la.trainable_weights) for la in trainable)


def _random_resnet(**kwargs):
    return keras.applications.resnet.ResNet50(**{**kwargs, "weights": None})


def test_avg_pooling_head():
    model = model_module.build_model(ModelParams(weights="none", image_size=32, pooling="avg", hidden_layers=0), 2)
    assert [type(layer).__name__ for layer in model.get_layer("head").layers] == [
        "GlobalAveragePooling2D", "Dropout", "Dense"]


def test_preprocess_layer_is_resnet50_preprocess_input():
    images = np.random.default_rng(0).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    expected = keras.applications.resnet50.preprocess_input(images.copy())
    np.testing.assert_allclose(model_module.preprocess_layer()(images), expected, atol=1e-4)


def test_imagenet_offline_names_the_alternatives(monkeypatch):
    def offline(*args, **kwargs):
        raise Exception("URL fetch failure: no network")
    monkeypatch.setattr(keras.utils, "get_file", offline)
    monkeypatch.setattr("keras.src.applications.resnet.file_utils.get_file", offline)
    with pytest.raises(PipelineError, match="weights=none, a weights .h5 file, or a model URI"):
        model_module.load_backbone("imagenet", 32, seed=0)


def test_weights_from_an_earlier_model_uri(trained):
    _, result = trained
    backbone = model_module.load_backbone(result.model_uri, 32, seed=0)
    earlier = load_model(result.model_uri)[0].get_layer("resnet50")
    for a, b in zip(backbone.get_weights(), earlier.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(PipelineError, match="cannot take backbone weights"):
        model_module.load_backbone("runs:/0123456789abcdef/model", 32, seed=0)


def test_image_modes_become_rgb_of_image_size(tmp_path):
    paths = []
    for name, image in {
        "gray": Image.new("L", (30, 20), 100),
        "rgba": Image.new("RGBA", (30, 20), (10, 20, 30, 40)),
        "palette": Image.new("RGB", (30, 20), (10, 20, 30)).convert("P"),
        "sixteen": Image.fromarray(np.full((20, 30), 40000, "uint16")),
    }.items():
        paths.append(tmp_path / f"{name}.png")
        image.save(paths[-1])
    images = load_images(paths, 24)
    assert images.shape == (4, 24, 24, 3) and images.dtype == np.float32
    np.testing.assert_allclose(images[0], 100, atol=0.5)  # gray replicated to three channels
    np.testing.assert_allclose(images[1], np.broadcast_to([10, 20, 30], (24, 24, 3)), atol=0.5)
    np.testing.assert_allclose(images[3], 40000 / 257, atol=1)  # 16-bit scaled to 8-bit


def test_prepare_reports_skipped_files_and_logs_dataset(tmp_path):
    root = make_dataset(tmp_path / "messy", n=8)
    (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    (root / "dog" / "readme.txt").write_text("hello")
    Image.new("L", (20, 20), 50).save(root / "owl" / "gray.png")
    result = prepare(PrepareConfig(dataset=str(root), experiment="prepare-messy", val_fraction=0.25))
    assert result.skipped == 2 and result.counts.to_numpy().sum() == 25
    run = mlflow.get_run(result.run_id)
    assert run.data.metrics["n_skipped"] == 2 and run.data.metrics["count/train/owl"] > 0
    folder = Path(mlflow.artifacts.download_artifacts(result.data_uri))
    skipped = pd.read_csv(folder / "skipped.csv")
    assert sorted(Path(p).name for p in skipped["path"]) == ["broken.jpg", "readme.txt"]
    assert run.inputs.dataset_inputs[0].dataset.digest == result.digest


def test_a_failing_step_leaves_no_run_running(tmp_path):
    root = make_dataset(tmp_path / "dead", n=4)
    for image in (root / "owl").iterdir():
        image.write_bytes(b"corrupt")
    with pytest.raises(PipelineError, match="class 'owl' has no readable image"):
        prepare(PrepareConfig(dataset=str(root), experiment="prepare-dead"))
    assert runs_of("prepare-dead")["status"].tolist() == ["FAILED"]
    with pytest.raises(PipelineError, match="cannot read prepared data"):
        evaluate(EvaluateConfig(model="runs:/nope/model", data=str(tmp_path / "nothing")))
    assert mlflow.active_run() is None
