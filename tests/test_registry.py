"""The registry: versions with where they came from, the champion rule, look-up by alias."""

import re
from collections import OrderedDict

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import make_dataset, tiny

from pipeline import card as card_module
from pipeline import cli as cli_module
from pipeline import prepared
from pipeline.card import load_model, read_card
from pipeline.config import EvaluateConfig, GridConfig, MainConfig, PipelineError
from pipeline.data import load_images
from pipeline.engine import compile_classifier
from pipeline.evaluate import evaluate
from pipeline.grid import grid
from pipeline.registry import CHAMPION, TAGS, accuracy_on, register, shared_validation_rows, versions
from pipeline.workflow import main

pytestmark = pytest.mark.slow
NAME = "regshapes-resnet50"


def champion_version(name: str) -> str:
    return str(mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION).version)


def test_main_registers_its_model_with_where_it_came_from(trained):
    cfg, result = trained
    main_run = mlflow.get_run(result.run_id)
    train_run = mlflow.get_run(main_run.data.tags["train_run_id"])
    prepare_run = mlflow.get_run(main_run.data.tags["prepare_run_id"])
    assert result.registered_model_uri == f"models:/{NAME}/1" and result.champion
    assert (main_run.data.tags["registered_model"], main_run.data.tags["model_version"]) == (NAME, "1")
    version = mlflow.MlflowClient().get_model_version(NAME, "1")
    tags = version.tags
    assert tags["data_digest"] == prepare_run.data.tags["data_digest"]
    assert version.run_id == train_run.info.run_id and version.source == result.model_uri  # MLflow's own fields
    # a few tags: parameters and the whole config are in the model card, the other metrics in the run
    assert set(tags) == {"data_digest", "best_val_accuracy", "test_accuracy", "champion_decision"}, tags
    for key in ("best_val_accuracy", "test_accuracy"):
        assert tags[key] == f"{train_run.data.metrics[key]:.6g}", key  # float32's 0.3333333432674408 as 0.333333
    table = versions(NAME)
    assert table[["learning_rate", "units"]].values.tolist() == [[str(cfg.learning_rate), str(cfg.units)]]
    assert tags["champion_decision"].startswith("champion: the first version")
    assert champion_version(NAME) == "1"


def test_champion_moves_only_when_validation_accuracy_improves_on_the_same_data(trained):
    _, result = trained
    name = "rule-resnet50"
    steps = [(0.5, True), (0.4, False), (0.5, False), (0.7, True), (0.6, False)]  # a tie does not move it
    for i, (accuracy, promoted) in enumerate(steps, start=1):
        r = register(result.model_uri, name, metrics={"best_val_accuracy": accuracy})
        assert (r.version, r.champion) == (str(i), promoted), (accuracy, r.decision)
    assert champion_version(name) == "4"
    tags = mlflow.MlflowClient().get_model_version(name, "5").tags
    assert set(tags) == set(TAGS) and tags["compared_version"] == "4"  # the champion it was compared with
    assert tags["champion_decision"] == "not champion: best_val_accuracy 0.6000 does not beat version 4's 0.7000"
    table = versions(name)
    assert table["best_val_accuracy"].tolist() == [0.5, 0.4, 0.5, 0.7, 0.6]  # every version keeps its score
    assert table["aliases"].tolist() == ["", "", "", CHAMPION, ""]
    assert "test_accuracy" in mlflow.MlflowClient().get_model_version(name, "2").tags  # read from the run


def test_scores_are_tagged_without_float_noise_and_old_noisy_tags_still_tie(trained):
    _, result = trained
    name = "noise-resnet50"
    seven = float(np.float32(0.7))  # 0.699999988079071, as Keras' float32 accuracy reaches the run
    register(result.model_uri, name, metrics={"best_val_accuracy": seven})
    assert mlflow.MlflowClient().get_model_version(name, "1").tags["best_val_accuracy"] == "0.7"
    # a version registered before, its tag written with repr: the same score read back ties
    mlflow.MlflowClient().set_model_version_tag(name, "1", "best_val_accuracy", repr(seven))
    tie = register(result.model_uri, name, metrics={"best_val_accuracy": seven})
    assert not tie.champion and "0.7000 does not beat version 1's 0.7000" in tie.decision
    assert versions(name)["best_val_accuracy"].tolist() == [0.7, 0.7]


def test_if_new_returns_the_version_already_registered_from_the_model(trained):
    _, result = trained
    first = register(result.model_uri, "once-resnet50", if_new=True)
    again = register(result.model_uri, "once-resnet50", if_new=True)
    assert (first.version, again.version, again.decision) == ("1", "1", "already registered") and again.champion
    assert register(result.model_uri, "once-resnet50").version == "2"


def test_a_grid_on_more_data_that_beats_the_quick_start_takes_the_champion_and_says_why(tmp_path):
    """The README's path: the quick start (main on a few images per class) is champion; a grid on
    more images of the same dataset is scored with it on validation images neither trained on,
    beats it, takes @champion, and the new version's tags say why."""
    story = {"dataset": str(make_dataset(tmp_path / "story", n=24)), "experiment": "story"}
    # the quick start's learning rate, the studies' 1e-5: one epoch of it leaves the model near chance
    quick = main(tiny(MainConfig, **story, max_per_class=4, epochs=1, learning_rate=1e-5))
    searched = grid(tiny(GridConfig, **story, epochs=30, patience=10))
    name = "story-resnet50"
    assert quick.champion and champion_version(name) == "2" and searched.registered_model_uri == f"models:/{name}/2"
    new, old = read_card(searched.best_model_uri)[0], read_card(quick.model_uri)[0]
    tags = mlflow.MlflowClient().get_model_version(name, "2").tags
    assert (tags["data_digest"], tags["compared_version"]) == (new.data_digest, "1") and new.data_digest != old.data_digest
    rows = shared_validation_rows(new, old)
    trained_or_tested = set(pd.concat([prepared.load(c.config["data"]).manifest for c in (new, old)])
                            .query("split != 'val'")["sha1"])
    assert len(rows) >= 5 and not set(rows["sha1"]) & trained_or_tested
    ours, theirs = accuracy_on(searched.best_model_uri, rows), accuracy_on(quick.model_uri, rows)
    decision = (f"champion: accuracy {ours:.4f} on {len(rows)} shared validation rows beats version 1's "
                f"{theirs:.4f} (data {new.data_digest} against version 1's {old.data_digest})")
    assert ours > theirs and tags["champion_decision"] == decision
    shown = CliRunner().invoke(cli_module.cli, ["models", "show", name]).output
    assert f"\nversion 2 ({CHAMPION})\n" in shown and f"  champion_decision: {decision}\n" in shown
    assert "  compared_version: 1\n" in shown and f"  data_digest: {new.data_digest}\n" in shown


def test_a_tie_on_shared_rows_keeps_the_alias(trained):
    _, result = trained
    name = "digest-resnet50"
    register(result.model_uri, name, metrics={"best_val_accuracy": 0.5})
    mlflow.MlflowClient().set_model_version_tag(name, "1", "data_digest", "0123456789abcdef")  # as if re-prepared
    r = register(result.model_uri, name, metrics={"best_val_accuracy": 0.99})  # the same model, so a tie
    tie = re.match(r"not champion: accuracy (\S+) on (\d+) shared validation rows does not beat version 1's (\S+) ",
                   r.decision)
    assert not r.champion and champion_version(name) == "1"
    assert tie and tie[1] == tie[3] and int(tie[2]) > 0, r.decision


def test_register_rejects_an_unknown_model_in_one_line():
    with pytest.raises(PipelineError, match="cannot read model 'runs:/0123456789abcdef/model'") as e:
        register("runs:/0123456789abcdef/model")
    assert "\n" not in str(e.value)


def test_evaluate_takes_the_champion_alias(trained):
    _, result = trained
    e = evaluate(EvaluateConfig(model=f"models:/{NAME}@{CHAMPION}", data=result.data_uri, experiment="by-alias"))
    assert e.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])
    assert mlflow.get_run(e.run_id).data.tags["source_run_id"] == mlflow.get_run(result.run_id).data.tags["train_run_id"]


def test_a_process_loads_a_logged_model_once_whatever_uri_names_it(trained, monkeypatch):
    _, result = trained
    monkeypatch.setattr(card_module, "_loaded", OrderedDict())  # as in a new process
    loads, load = [], keras.saving.load_model
    monkeypatch.setattr(keras.saving, "load_model", lambda *a, **k: loads.append(a) or load(*a, **k))
    model, card, run_id = load_model(result.model_uri)
    for uri in (f"runs:/{run_id}/model", f"models:/{NAME}@{CHAMPION}"):
        again, again_card, again_run = load_model(uri)
        assert again is model and (again_card, again_run) == (card, run_id), uri
    assert len(loads) == 1
    monkeypatch.setattr(card_module, "_loaded", OrderedDict())
    monkeypatch.setattr(card_module, "KEEP_LOADED", 0)  # none kept: each load reads it again
    assert load_model(result.model_uri)[0] is not model and len(loads) == 2 and not card_module._loaded


def test_evaluate_with_dihedral_tta_scores_the_mean_of_each_images_eight_flips_and_turns(trained):
    _, result = trained
    uri = f"models:/{NAME}@{CHAMPION}"
    test = prepared.load(result.data_uri).split("test")
    model, card, _ = load_model(uri)
    runner = compile_classifier(model, card.config, len(card.class_names), "tensorflow", card.precision)
    images, labels = load_images(test["path"], card.image_size), test["label_index"].to_numpy()
    views = np.stack([runner(np.ascontiguousarray(np.rot90(x, k, axes=(1, 2))))
                      for x in (images, images[:, :, ::-1]) for k in range(4)])
    assert not np.allclose(views[0], views.mean(axis=0), atol=1e-3)  # the views do differ for this model
    try:
        e = evaluate(EvaluateConfig(model=uri, data=result.data_uri, experiment="tta", tta="dihedral",
                                    engine="tensorflow"))
        logged = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{e.run_id}/predictions.csv"))
        assert list(logged["path"]) == list(test["path"])
        np.testing.assert_allclose(logged[[f"p_{c}" for c in card.class_names]], views.mean(axis=0), atol=1e-3)
        assert e.metrics["tta_views"] == 8 and mlflow.get_run(e.run_id).data.params["tta"] == "dihedral"
        assert e.metrics["test_accuracy_one_view"] == pytest.approx(np.mean(views[0].argmax(axis=1) == labels))
        assert e.metrics["test_accuracy"] == pytest.approx(np.mean(views.mean(axis=0).argmax(axis=1) == labels))
        source = mlflow.get_run(e.run_id).data.tags["source_run_id"]
        assert mlflow.get_run(source).data.metrics["tta_views"] == 8  # the train run says which figure it holds
    finally:  # evaluate copies its figures onto the model's train run, which other tests read: back to main's
        again = evaluate(EvaluateConfig(model=uri, data=result.data_uri, experiment="tta"))
    first = mlflow.get_run(mlflow.get_run(result.run_id).data.tags["evaluate_run_id"])  # main's, at tta=auto
    assert first.data.params["tta"] == "auto" and first.data.metrics["tta_views"] == 1  # augment=none: one view
    assert again.metrics["test_accuracy"] == pytest.approx(result.metrics["test_accuracy"])


def test_models_list_and_show_print_versions_aliases_runs_and_metrics(trained):
    _, result = trained
    train_run_id = mlflow.get_run(result.run_id).data.tags["train_run_id"]
    shown = CliRunner().invoke(cli_module.cli, ["models", "show", NAME])
    assert shown.exit_code == 0, shown.output
    store, header, row, _, version, *details = shown.output.strip().splitlines()
    assert store == f"tracking store: {mlflow.get_tracking_uri()}"
    assert header.split()[:4] == ["name", "version", "aliases", "source_run"] and "test_accuracy" in header
    assert row.split()[:4] == [NAME, "1", CHAMPION, train_run_id]
    assert version == f"version 1 ({CHAMPION})"
    for key in ("metrics", "champion_decision", "class_names", "image_size", "precision", "engine", "data_digest",
                "config", "backbone"):
        assert any(line.startswith(f"  {key}: ") for line in details), key
    listed = CliRunner().invoke(cli_module.cli, ["models", "list"])
    assert listed.exit_code == 0 and re.search(rf"^\s*{NAME}\s+1\s+{CHAMPION}\s", listed.output, re.M), listed.output
    assert "class_names" not in listed.output  # the overview stays one line per version
    missing = CliRunner().invoke(cli_module.cli, ["models", "show", "no-such-model"])
    assert missing.exit_code == 1 and missing.stderr.startswith("Error: no registered model 'no-such-model'")
