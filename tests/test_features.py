"""The frozen-backbone feature cache and its engines: same predictions as the live model, never
stale, never damaged, one line when the disk is full."""

import errno
import os
from dataclasses import replace

import keras
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from conftest import make_dataset

from pipeline import datasets, engine, features
from pipeline.config import ModelParams, PipelineError
from pipeline.data import _decode_jpeg, load_images
from pipeline.features import Backbone, FeatureBatches, split_features
from pipeline.model import build_model

pytestmark = pytest.mark.slow
TF = Backbone("none", 32, 0, "tensorflow", "float32")


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    root = make_dataset(tmp_path_factory.mktemp("features") / "shapes", n=4)
    files, _ = datasets.check_images(datasets.scan(datasets.locate(str(root))))
    return files.assign(label_index=files["label"].map({"cat": 0, "dog": 1, "owl": 2}))


@pytest.mark.parametrize("backbone", [TF, replace(TF, engine="openvino"), replace(TF, engine="openvino",
                                                                                 precision="mixed_bfloat16")])
def test_cached_features_of_each_engine_predict_as_the_live_model(rows, tmp_path, backbone):
    model = build_model(ModelParams(weights="none", image_size=32, precision="float32", seed=0), 3)
    live = model.predict(load_images(rows["path"], 32), verbose=0)
    found = split_features(backbone, rows, str(tmp_path))
    assert not found.hit and found.array.dtype == np.float16 and len(found.array) == len(rows)
    assert found.rel_error < engine.MAX_REL_ERROR[backbone.precision]
    cached = model.get_layer("head").predict(FeatureBatches(found.array, rows["label_index"].to_numpy(), 5), verbose=0)
    np.testing.assert_allclose(cached, live, atol=2e-3 if backbone.precision == "float32" else 3e-2)
    if backbone.precision == "float32":
        assert (cached.argmax(1) == live.argmax(1)).mean() >= 0.99
    again = split_features(backbone, rows, str(tmp_path))
    assert again.hit and again.array is found.array  # one mapping per process, however many runs read it
    assert found.backbone_digest == features.weights_digest(model.get_layer("resnet50"))


def test_changed_rows_weights_size_engine_precision_or_decoding_never_reuse_an_entry(rows, tmp_path, monkeypatch):
    split_features(TF, rows, str(tmp_path))
    changed = rows.copy()
    changed.loc[0, "sha1"] = "0" * 40  # one file's content changed
    assert not split_features(TF, changed, str(tmp_path)).hit
    # The entry's folder is its key: a change to anything the features depend on gives another one.
    inputs = [(TF, rows), (TF, changed), (TF, rows.iloc[:-1])] + [(other, rows) for other in (
        replace(TF, seed=1), replace(TF, weights="imagenet"), replace(TF, image_size=40),
        replace(TF, precision="mixed_bfloat16"), replace(TF, engine="openvino"))]
    keys = [features.cache_key(r, backbone) for backbone, r in inputs]
    monkeypatch.setattr(features, "DECODING", "another way to decode")
    keys.append(features.cache_key(rows, TF))
    assert len(set(keys)) == len(keys) == 9
    assert sorted(entry.name for entry in tmp_path.iterdir()) == sorted(keys[:2])


@pytest.mark.parametrize("width, height, shorter", [(1200, 900, 113), (300, 260, 65), (100, 40, 40)])
def test_decoding_resizes_like_a_whole_antialiased_decode(tmp_path, width, height, shorter):
    """A large JPEG is decoded at the smallest DCT scale (1/8 to 1) that keeps its shorter side at
    least the image size, a small one whole; either way the image comes within a few levels of
    decoding it whole and resizing it antialiased (the smooth image has no detail to alias)."""
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1).astype(np.uint8)
    path = tmp_path / "big.jpg"
    keras.utils.save_img(path, smooth, quality=95)
    assert min(_decode_jpeg(tf.io.read_file(str(path)), 64).shape[:2]) == shorter
    image = load_images([str(path)], 64)[0]
    whole = tf.image.resize(tf.io.decode_jpeg(tf.io.read_file(str(path)), channels=3), [64, 64], antialias=True)
    assert image.shape == (64, 64, 3)
    assert np.abs(image - whole.numpy()).mean() < 2.0


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_truncated_or_overwritten_cache_file_is_rebuilt(rows, tmp_path, damage, capsys):
    expected = np.array(split_features(TF, rows, str(tmp_path)).array)
    [entry] = list(tmp_path.iterdir())
    data = (entry / "features.npy").read_bytes()
    if damage == "truncate":
        (entry / "features.npy").write_bytes(data[: len(data) // 2])
    else:  # same size, NaN features: only the checksum tells
        nan = np.full(len(data) - 128, 0x7E, np.uint8).tobytes()
        with open(entry / "features.npy", "r+b") as f:
            f.seek(128)
            f.write(nan)
            os.utime(f.fileno(), ns=(1, 1))
    rebuilt = split_features(TF, rows, str(tmp_path))
    assert not rebuilt.hit and np.array_equal(np.array(rebuilt.array), expected)
    assert ("damaged" in capsys.readouterr().out) == (damage == "garbage")


def test_concurrent_extractions_of_one_entry_leave_it_whole(rows, tmp_path, monkeypatch):
    """Two tune workers extract one entry at once (here the second runs whole while the first is
    half-way): both get the features, and one valid entry remains, without temporary files."""
    real_add, started, nested = keras.utils.Progbar.add, [], []

    def add_while_another_extracts(self, *args, **kwargs):
        if not started:
            started.append(True)
            nested.append(split_features(TF, rows, str(tmp_path)))
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(keras.utils.Progbar, "add", add_while_another_extracts)
    first = split_features(TF, rows, str(tmp_path))
    [second] = nested
    assert not first.hit and not second.hit and np.array_equal(first.array, second.array)
    [entry] = list(tmp_path.iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["features.npy", "meta.json"]
    monkeypatch.undo()
    again = split_features(TF, rows, str(tmp_path))
    assert again.hit and np.array_equal(again.array, first.array)


def test_a_full_disk_is_one_line_naming_the_folder_and_the_space_and_leaves_no_entry(rows, tmp_path, monkeypatch):
    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(PipelineError, match=r"No space left on device.*needs .* MB") as e:
        split_features(TF, rows, str(tmp_path))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_a_cache_folder_that_is_a_file_is_one_line(rows, tmp_path):
    (tmp_path / "cache").write_text("not a folder")
    with pytest.raises(PipelineError, match="cannot write the feature cache.*writable folder"):
        split_features(TF, rows, str(tmp_path / "cache"))


def test_non_finite_features_are_refused(rows, tmp_path, monkeypatch):
    runner, digest, build = features._runner(TF)

    class NaNs(engine.Runner):
        engine, precision, output_shape = runner.engine, runner.precision, runner.output_shape

        def run(self, batches, out):
            runner.run(batches, out)
            if len(out) > features.CHECK_IMAGES:  # not in the check against TensorFlow
                out[-1] = np.nan
            return out

    monkeypatch.setattr(features, "_runner", lambda backbone, cache_dir: (NaNs(), digest, build))
    with pytest.raises(PipelineError, match="non-finite features"):
        split_features(TF, rows, str(tmp_path), batch_size=4)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_an_engine_past_its_error_bound_stops_in_one_line(rows):
    runner, _, build = features._runner(TF)

    class Off(engine.Runner):
        engine, precision, output_shape = "openvino", "float32", runner.output_shape

        def run(self, batches, out):
            return runner.run(batches, out) * 1.5

    images = load_images(rows["path"][:2], 32)
    assert engine.check_against_reference(runner, build, images) == 0.0
    with pytest.raises(PipelineError, match="differs from TensorFlow float32 by 50.00%"):
        engine.check_against_reference(Off(), build, images)


def test_a_reduced_precision_past_its_bound_extracts_in_float32_instead(rows, tmp_path, monkeypatch, capsys):
    bf16 = replace(TF, precision="mixed_bfloat16")
    monkeypatch.setitem(engine.MAX_REL_ERROR, "mixed_bfloat16", 1e-9)  # any real bfloat16 error is past it
    monkeypatch.setattr(features, "_FLOAT32_INSTEAD", {})
    found = split_features(bf16, rows, str(tmp_path))
    assert "its features in float32 instead" in capsys.readouterr().out
    assert found.backbone == TF and found.rel_error == 0.0 and not found.hit
    np.testing.assert_array_equal(found.array, split_features(TF, rows, str(tmp_path)).array)  # the float32 entry
    assert split_features(bf16, rows, str(tmp_path)).hit and "instead" not in capsys.readouterr().out  # remembered
    monkeypatch.setitem(engine.MAX_REL_ERROR, "float32", -1.0)  # float32 itself past its bound: no way round it
    with pytest.raises(PipelineError, match="differs from TensorFlow float32"):
        split_features(replace(TF, image_size=40), rows, str(tmp_path))


@pytest.mark.skipif(not engine.has_openvino(), reason="OpenVINO is not installed")
def test_a_converted_model_is_kept_and_read_back_instead_of_converted_again(rows, tmp_path, monkeypatch, capsys):
    images = load_images(rows["path"][:3], 32)
    first = engine.compile_model(TF.build, "openvino", "float32", tmp_path)
    [kept] = tmp_path.iterdir()
    converted, convert = [], engine._convert
    monkeypatch.setattr(engine, "_convert", lambda model: converted.append(model) or convert(model))
    again = engine.compile_model(TF.build, "openvino", "float32", tmp_path)
    assert converted == [] and np.array_equal(again(images), first(images))
    assert engine._ir_key(replace(TF, seed=1).build("float32")) != kept.name  # other weights: another entry
    weights = (kept / "model.bin").read_bytes()
    damaged = bytearray(weights)
    damaged[len(damaged) // 2] ^= 0xFF
    (kept / "model.bin").write_bytes(damaged)  # converted again, and kept whole
    assert np.array_equal(engine.compile_model(TF.build, "openvino", "float32", tmp_path)(images), first(images))
    assert len(converted) == 1 and (kept / "model.bin").read_bytes() == weights
    assert "is damaged: converting again" in capsys.readouterr().out
    (tmp_path / "file").write_text("not a folder")  # cannot keep it there: a note, not an error
    engine._keep_ir(engine._read_ir(kept), tmp_path / "file" / kept.name)
    assert "could not keep the converted model" in capsys.readouterr().out


def test_auto_engine_is_openvino_on_a_cpu_where_installed():
    assert engine.resolve_engine("auto") == ("openvino" if engine.has_openvino() else "tensorflow")
    assert engine.resolve_engine("tensorflow") == "tensorflow"


def test_feature_batches_shuffle_per_epoch_and_keep_pairs():
    values = np.arange(10, dtype=np.float16)[:, None]
    labels = np.arange(10)
    batches = FeatureBatches(values, labels, 4, seed=0)
    first = np.concatenate([batches[i][1] for i in range(len(batches))])
    batches.on_epoch_end()
    second = np.concatenate([batches[i][1] for i in range(len(batches))])
    assert sorted(first) == sorted(second) == list(range(10)) and list(first) != list(second)
    x, y = batches[0]
    assert x.dtype == np.float16 and np.array_equal(x[:, 0], y)  # the head casts
    assert pd.Series(np.concatenate([FeatureBatches(values, labels, 3)[i][1] for i in range(4)])).is_monotonic_increasing


def test_a_head_trains_the_same_one_step_or_several_steps_per_call():
    """head_steps_per_execution may pick either: they must be the same updates in the same order."""
    from pipeline.config import TrainConfig
    from pipeline.model import build_head, compile_for_training
    from pipeline.train import head_steps_per_execution

    assert head_steps_per_execution(7, 5, 1) == 1 and head_steps_per_execution(250, 10, 2) == 1
    assert head_steps_per_execution(250, 10, 1) > 1
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(70, 2, 2, 8)).astype(np.float16), rng.integers(0, 3, 70)
    weights = []
    for steps in (1, 4):
        head = build_head(x.shape[1:], TrainConfig(data="unused", seed=3), 3)
        compile_for_training(head, 1e-2, steps)
        head.fit(FeatureBatches(x, y, 16, seed=3), epochs=3, verbose=0, shuffle=False)
        weights.append(head.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    assert not np.array_equal(weights[0][0], build_head(x.shape[1:], TrainConfig(data="unused", seed=3), 3).get_weights()[0])
