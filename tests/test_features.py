"""The frozen-backbone feature cache: same predictions as the live model, never stale."""

import numpy as np
import pandas as pd
import pytest
from conftest import make_dataset

from pipeline import datasets
from pipeline.config import ModelParams
from pipeline.data import load_images
from pipeline.features import FeatureBatches, model_features
from pipeline.model import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("features") / "shapes", n=4)
    files, _ = datasets.check_images(datasets.scan(datasets.locate(str(root))))
    return files.assign(label_index=files["label"].map({"cat": 0, "dog": 1, "owl": 2}))


def tiny_model(seed=0, image_size=32):
    import keras

    keras.utils.set_random_seed(seed)
    return build_model(ModelParams(weights="none", image_size=image_size, precision="float32"), 3)


def test_cached_and_live_paths_predict_alike(rows, tmp_path):
    model = tiny_model()
    live = model.predict(load_images(rows["path"], 32), verbose=0)
    features, hit = model_features(model, rows, "float32", str(tmp_path))
    assert not hit and features.dtype == np.float16 and len(features) == len(rows)
    cached = model.get_layer("head").predict(FeatureBatches(features, rows["label_index"].to_numpy(), 5), verbose=0)
    np.testing.assert_allclose(cached, live, atol=2e-3)
    again, hit = model_features(model, rows, "float32", str(tmp_path))
    assert hit and again is features  # one mapping per process, however many runs read it


def test_changed_rows_weights_or_size_never_reuse_an_entry(rows, tmp_path):
    model = tiny_model()
    model_features(model, rows, "float32", str(tmp_path))
    assert model_features(model, rows.iloc[:-1], "float32", str(tmp_path))[1] is False
    changed = rows.copy()
    changed.loc[0, "sha1"] = "0" * 40  # one file's content changed
    assert model_features(model, changed, "float32", str(tmp_path))[1] is False
    assert model_features(tiny_model(seed=1), rows, "float32", str(tmp_path))[1] is False
    assert model_features(tiny_model(image_size=40), rows, "float32", str(tmp_path))[1] is False
    assert model_features(model, rows, "mixed_bfloat16", str(tmp_path))[1] is False
    assert len(list(tmp_path.iterdir())) == 6


def test_truncated_cache_file_is_rebuilt(rows, tmp_path):
    model = tiny_model()
    first, _ = model_features(model, rows, "float32", str(tmp_path))
    expected = np.array(first)
    [entry] = list(tmp_path.iterdir())
    data = (entry / "features.npy").read_bytes()
    (entry / "features.npy").write_bytes(data[: len(data) // 2])
    rebuilt, hit = model_features(model, rows, "float32", str(tmp_path))
    assert not hit and np.array_equal(np.array(rebuilt), expected)


def test_concurrent_extractions_of_one_entry_leave_it_whole(rows, tmp_path, monkeypatch):
    """Two tune workers extract one entry at once (here the second runs whole while the first is
    half-way): both get the features, and one valid entry remains, without temporary files."""
    import keras

    model = tiny_model()
    real_add, started, nested = keras.utils.Progbar.add, [], []

    def add_while_another_extracts(self, *args, **kwargs):
        if not started:
            started.append(True)
            nested.append(model_features(model, rows, "float32", str(tmp_path)))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(keras.utils.Progbar, "add", add_while_another_extracts)
    first, hit = model_features(model, rows, "float32", str(tmp_path))
    [(second, second_hit)] = nested
    assert not hit and not second_hit and np.array_equal(first, second)
    [entry] = list(tmp_path.iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]
    monkeypatch.undo()
    again, hit = model_features(model, rows, "float32", str(tmp_path))
    assert hit and np.array_equal(again, first)


def test_feature_batches_shuffle_per_epoch_and_keep_pairs():
    features = np.arange(10, dtype=np.float16)[:, None]
    labels = np.arange(10)
    batches = FeatureBatches(features, labels, 4, seed=0)
    first = np.concatenate([batches[i][1] for i in range(len(batches))])
    batches.on_epoch_end()
    second = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert sorted(first) == sorted(second) == list(range(10)) and list(first) != list(second)
    x, y = batches[0]
    assert x.dtype == np.float16 and np.array_equal(x[:, 0], y)  # the head casts
    assert pd.Series(np.concatenate([FeatureBatches(features, labels, 3)[i][1] for i in range(4)])).is_monotonic_increasing
