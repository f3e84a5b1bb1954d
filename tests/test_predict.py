"""predict: one CSV row per file, unreadable files listed with why, the CSV whole or absent."""

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, write_images

import pipeline.model
from pipeline.card import load_model
from pipeline.config import PipelineError, PredictConfig
from pipeline.engine import compile_classifier, compile_model
from pipeline.liveness import REASON
from pipeline.model import backbone_policy, builder_of
from pipeline.predict import _write_atomically, predict

CHAMPION = "models:/regshapes-resnet50@champion"


@pytest.mark.slow
def test_predict_writes_probabilities_and_lists_unreadable_files(trained, tmp_path):
    images = tmp_path / "incoming"
    good = write_images(images, "cat", 2, size=40, seed=7) + write_images(images / "deeper" / "more", "owl", 1, seed=7)
    (images / "deeper" / "broken.png").write_bytes(b"\x89PNG not really")
    (images / "notes.txt").write_text("not an image")
    output = tmp_path / "out" / "predictions.csv"
    result = predict(PredictConfig(model=CHAMPION, input=str(images), output=str(output), batch_size=2))
    assert (result.predicted, result.skipped) == (3, 2)
    table = pd.read_csv(output, keep_default_na=False, na_values=[""])
    probabilities = [f"p_{c}" for c in CLASSES]
    assert list(table.columns) == ["path", "predicted", "confidence", *probabilities, "error"]
    done, failed = table[table["error"].isna()], table[table["error"].notna()]
    assert sorted(done["path"]) == sorted(map(str, good)) and set(done["predicted"]) <= set(CLASSES)
    assert done[probabilities].sum(axis=1).to_numpy() == pytest.approx(1, abs=1e-5)
    assert (done["confidence"] == done[probabilities].max(axis=1)).all()
    assert (done["predicted"] == done[probabilities].idxmax(axis=1).str[2:]).all()
    assert sorted(Path(p).name for p in failed["path"]) == ["broken.png", "notes.txt"]
    assert failed[probabilities].isna().all().all() and failed["error"].str.len().gt(0).all()
    assert [p.name for p in output.parent.iterdir()] == ["predictions.csv"]  # no temporary file left


@pytest.mark.slow
def test_a_loaded_model_runs_as_it_is_where_its_backbone_computes_in_the_engines_policy(trained, monkeypatch):
    model, card, _ = load_model(CHAMPION)
    policy, n = backbone_policy(model), len(card.class_names)
    other = "float32" if policy != "float32" else "mixed_bfloat16"
    images = np.random.default_rng(0).uniform(0, 255, (4, card.image_size, card.image_size, 3)).astype("float32")
    rebuilt = compile_model(builder_of(model, card.config, n), "tensorflow", policy).run([images], np.empty((4, n)))
    built, build_model = [], pipeline.model.build_model
    monkeypatch.setattr(pipeline.model, "build_model", lambda *a, **k: built.append(k["precision"]) or build_model(*a, **k))
    as_is = compile_classifier(model, card.config, n, "tensorflow", policy).run([images], np.empty((4, n)))
    assert built == [] and as_is == pytest.approx(rebuilt, abs=1e-6)
    compile_classifier(model, card.config, n, "tensorflow", other)
    assert built == [other]


@pytest.mark.slow
def test_predict_one_file(trained, tmp_path):
    [image] = write_images(tmp_path, "dog", 1)
    result = predict(PredictConfig(model=CHAMPION, input=str(image), output=str(tmp_path / "one.csv")))
    assert result.predicted == 1 and len(pd.read_csv(tmp_path / "one.csv")) == 1


@pytest.mark.slow
def test_under_mlflow_run_its_run_gets_the_csv_and_the_counts(trained, tmp_path, mlflow_run_id):
    images = tmp_path / "incoming"
    write_images(images, "cat", 2, seed=5)
    (images / "broken.png").write_bytes(b"not an image")
    predict(PredictConfig(model=CHAMPION, input=str(images), output=str(tmp_path / "out.csv")))
    run = mlflow.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED" and run.data.tags["step"] == "predict"
    counts = run.data.metrics
    assert (counts["n_predicted"], counts["n_skipped"]) == (2, 1) and sum(counts[f"predicted/{c}"] for c in CLASSES) == 2
    logged = mlflow.artifacts.download_artifacts(run_id=mlflow_run_id, artifact_path="out.csv", dst_path=str(tmp_path / "a"))
    assert Path(logged).read_text() == (tmp_path / "out.csv").read_text()


def test_under_mlflow_run_bad_input_fails_its_run_in_one_line(tmp_path, mlflow_run_id):
    with pytest.raises(PipelineError, match="does not exist"):
        predict(PredictConfig(model=CHAMPION, input=str(tmp_path / "missing"), output=str(tmp_path / "p.csv")))
    run = mlflow.get_run(mlflow_run_id)
    assert run.info.status == "FAILED" and "does not exist" in run.data.tags[REASON]
    assert "\n" not in run.data.tags[REASON] and mlflow.active_run() is None


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "missing", "does not exist"),
    (lambda root: root, "holds no files"),
    (lambda root: (root / "a.txt").write_text("x") and root, "no readable image in"),
])
def test_predict_bad_input_fails_in_one_line_before_loading_a_model(tmp_path, make, message):
    folder = make(tmp_path)
    with pytest.raises(PipelineError, match=message) as e:
        predict(PredictConfig(model="models:/not-loaded@champion", input=str(folder), output=str(tmp_path / "p.csv")))
    assert "\n" not in str(e.value) and not (tmp_path / "p.csv").exists()


def test_a_failed_write_leaves_the_previous_csv_untouched(tmp_path, monkeypatch):
    output = tmp_path / "predictions.csv"
    output.write_text("old\n")

    def half_then_fail(self, f, **kwargs):
        f.write("path,predicted\nhalf")
        raise OSError("disk full")
    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        _write_atomically(pd.DataFrame({"path": ["x"]}), output)
    assert output.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["predictions.csv"]
