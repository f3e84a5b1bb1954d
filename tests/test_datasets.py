"""Finding datasets in each layout, checking images, and splitting (no TensorFlow)."""

import numpy as np
import pandas as pd
import pytest
from conftest import CLASSES, make_dataset, write_images
from PIL import Image

from pipeline import datasets
from pipeline.config import PipelineError


def usable(root, **split_args):
    files, _ = datasets.check_images(datasets.scan(datasets.locate(str(root))))
    return datasets.split(files, **{"how": "auto", "val_fraction": 0.25, "test_fraction": 0.25, "seed": 0,
                                    **split_args})


def test_flat_folder_of_class_subfolders(image_folder):
    source = datasets.locate(str(image_folder))
    assert (source.name, source.train, source.test) == ("shapes", image_folder.resolve(), None)
    files = datasets.scan(source)
    assert sorted(files["label"].unique()) == list(CLASSES) and len(files) == 24 and set(files["pool"]) == {"train"}


def test_train_and_test_folders_give_the_official_test_split(tmp_path):
    root = make_dataset(tmp_path / "tt", n=8, with_test=True)
    manifest = usable(root)
    test_paths = set(manifest.loc[manifest["split"] == "test", "path"])
    assert test_paths == {str(p) for p in (root / "test").resolve().rglob("*.png")}
    assert not any("/test/" in p for p in manifest.loc[manifest["split"] != "test", "path"])


def make_blood_cells(base):
    images = base / "blood_cells/dataset2-master/dataset2-master/images"
    for pool in ("TRAIN", "TEST", "TEST_SIMPLE"):
        for i, label in enumerate(("EOSINOPHIL", "LYMPHOCYTE")):
            folder = images / pool / label
            folder.mkdir(parents=True)
            for j in range(4):
                Image.new("RGB", (16, 12), (60 * i, 10 * j, 0)).save(folder / f"{j}.jpeg")
    return images


def test_blood_cells_preset_found_under_data_dir_and_pipeline_data_dir(tmp_path, monkeypatch):
    images = make_blood_cells(tmp_path)
    for found in (datasets.locate("blood_cells", str(tmp_path)),
                  datasets.locate("blood_cells", str(tmp_path / "blood_cells"))):
        assert (found.train, found.test) == (images.resolve() / "TRAIN", images.resolve() / "TEST")
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path))
    source = datasets.locate("blood_cells")
    assert source.name == "blood_cells" and source.test == images.resolve() / "TEST"
    assert set(datasets.scan(source)["pool"]) == {"train", "test"}  # TEST_SIMPLE is not an input


def test_covid19_preset_reads_images_and_ignores_masks(tmp_path, monkeypatch):
    root = tmp_path / "covid19/COVID-19_Radiography_Dataset"
    for label in ("COVID", "Normal"):
        write_images(root / label / "images", "cat", 3)
        write_images(root / label / "masks", "dog", 3)
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path))
    files = datasets.scan(datasets.locate("covid19"))
    assert len(files) == 6 and not files["path"].str.contains("masks").any()
    assert sorted(files["label"].unique()) == ["COVID", "Normal"]


def test_missing_preset_says_where_to_put_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_DATA_DIR", str(tmp_path))
    with pytest.raises(PipelineError, match="PIPELINE_DATA_DIR") as e:
        datasets.locate("covid19")
    assert "tawsifurrahman/covid19-radiography-database" in str(e.value)


@pytest.mark.parametrize("layout, message", [
    ("missing", "neither a preset"),
    ("one_class", "at least 2 are needed"),
    ("empty_class", "holds no images"),
    ("class_mismatch", "differ from test classes"),
])
def test_bad_layouts_fail_in_one_line(tmp_path, layout, message):
    root = tmp_path / "d"
    if layout == "one_class":
        write_images(root / "cat", "cat", 3)
    elif layout == "empty_class":
        make_dataset(root, n=3)
        (root / "empty").mkdir()
        (root / "empty" / ".DS_Store").write_text("hidden files do not count")
    elif layout == "class_mismatch":
        make_dataset(root, n=4, with_test=True)
        write_images(root / "train" / "emu", "owl", 4)
    with pytest.raises(PipelineError, match=message) as e:
        datasets.scan(datasets.locate(str(root)))
    assert "\n" not in str(e.value)


def test_unreadable_files_are_skipped_with_reasons_and_odd_modes_kept(image_folder):
    cat = image_folder / "cat"
    (cat / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    good = (cat / "cat_0_0.png").read_bytes()
    Image.open(cat / "cat_0_0.png").save(cat / "whole.jpg")
    (cat / "truncated.jpg").write_bytes((cat / "whole.jpg").read_bytes()[:300])
    (cat / "notes.txt").write_text("not an image")
    (cat / ".hidden.png").write_bytes(good)
    Image.fromarray((np.arange(400).reshape(20, 20) * 150).astype("uint16")).save(cat / "sixteen.png")
    Image.new("L", (20, 20), 128).save(cat / "gray.png")
    Image.new("RGBA", (20, 20), (1, 2, 3, 4)).save(cat / "rgba.png")
    Image.new("RGB", (20, 20), (9, 9, 9)).convert("P").save(cat / "palette.png")

    files, skipped = datasets.check_images(datasets.scan(datasets.locate(str(image_folder))))
    names = lambda frame: sorted(frame["path"].str.rsplit("/", n=1).str[-1])  # noqa: E731
    assert names(skipped) == ["corrupt.jpg", "notes.txt", "truncated.jpg"]
    assert skipped["reason"].str.len().gt(0).all()
    assert {"sixteen.png", "gray.png", "rgba.png", "palette.png", "whole.jpg"} <= set(names(files))
    assert ".hidden.png" not in names(files) + names(skipped)
    assert files["sha1"].str.len().eq(40).all()


def test_split_is_stratified_disjoint_and_deterministic(tmp_path):
    root = make_dataset(tmp_path / "s", n=20)
    first = usable(root, seed=1)
    assert first["path"].is_unique
    counts = pd.crosstab(first["label"], first["split"])
    assert (counts["test"] == 5).all() and (counts["val"] == 4).all() and (counts["train"] == 11).all()
    pd.testing.assert_frame_equal(first, usable(root, seed=1))
    other = usable(root, seed=2)
    assert set(first.loc[first.split == "test", "path"]) != set(other.loc[other.split == "test", "path"])


def test_random_split_pools_the_official_test(tmp_path):
    root = make_dataset(tmp_path / "tt", n=12, with_test=True)
    manifest = usable(root, how="random")
    assert manifest.loc[manifest["split"] == "test", "path"].str.contains("/train/").any()
    with pytest.raises(PipelineError, match="no official test"):
        usable(make_dataset(tmp_path / "flat", n=4), how="official")


def crops(root, sources: int, per_source: int = 5):
    """A folder of class subfolders whose files are crops named as blood_cells': _<source>_<n>.png."""
    for label in CLASSES:
        for paths in [write_images(root / label, label, per_source, seed=s) for s in range(sources)]:
            for n, path in enumerate(paths):
                path.rename(path.with_name(f"_{paths[0].stem.split('_')[1]}_{n}.png"))
    return root


def test_a_group_pattern_holds_out_every_crop_of_a_source_together(tmp_path):
    root = crops(tmp_path / "crops", sources=10)
    source = lambda m: m["label"] + m["path"].str.extract(r"/_(\d+)_[^/]*$")[0]  # noqa: E731
    grouped = usable(root, group=r"^_(\d+)_")
    parts = {split: set(source(grouped[grouped["split"] == split])) for split in ("train", "val", "test")}
    assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"] or parts["val"] & parts["test"])
    assert pd.crosstab(grouped["label"], grouped["split"]).gt(0).all().all()  # every class on every side
    mixed = usable(root)  # no pattern: crops of one source land on both sides
    assert set(source(mixed[mixed["split"] == "train"])) & set(source(mixed[mixed["split"] == "val"]))
    with pytest.raises(PipelineError, match="cannot hold out 0.25 for test by source image: class 'cat' has images of 1"):
        usable(crops(tmp_path / "one", sources=1), group=r"^_(\d+)_")


def test_too_few_images_to_split_is_a_clear_error(tmp_path):
    root = make_dataset(tmp_path / "small", n=1)
    with pytest.raises(PipelineError, match="cannot hold out"):
        usable(root)


def test_cap_limits_each_class_and_pool_reproducibly(tmp_path):
    files = datasets.scan(datasets.locate(str(make_dataset(tmp_path / "c", n=10, with_test=True))))
    capped = datasets.cap(files, 3, seed=0)
    assert capped.groupby(["pool", "label"]).size().eq(3).all()
    assert capped["path"].tolist() == datasets.cap(files, 3, seed=0)["path"].tolist()
    assert len(datasets.cap(files, 0, seed=0)) == len(files)


def test_digest_follows_content_not_location(tmp_path):
    a = usable(make_dataset(tmp_path / "a", n=8))
    b = usable(make_dataset(tmp_path / "b", n=8))
    assert datasets.digest(a) == datasets.digest(b)
    relabelled = a.assign(label=a["label"].replace({"cat": "lion"}))
    assert datasets.digest(relabelled) != datasets.digest(a)
