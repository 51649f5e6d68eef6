"""Dataset and image-finding edge cases: nested class folders, stray folders, empty labels, tiny classes,
decompression bombs, folders named like images, seeded numpy augmentation, markup in printed names."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from _cli import flat, invoke
from _data import make_folder
from PIL import Image

import wsurgery
from wsurgery.data import find_images, open_rgb
from wsurgery.datasets import AugmentConfig, SeededView, build_datasets, train_transform
from wsurgery.errors import DatasetError
from wsurgery.predict import Prediction


def _png(path: Path, size: int = 16, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (value, value, value)).save(path)
    return path


def test_images_in_subfolders_belong_to_their_top_level_class_folder(tmp_path):
    # timm's reader labels by the innermost folder: cat/2019 and dog/2019 would both be class "2019"
    for name in ("cat/2019/a.png", "cat/2020/b.png", "cat/c.png", "dog/2019/d.png", "dog/x/y/e.png"):
        _png(tmp_path / "train" / name)
    _png(tmp_path / "train" / "dog" / "2019" / "f.bmp")  # every file type, at any depth
    _png(tmp_path / "val" / "cat" / "2021" / "g.png")
    _png(tmp_path / "val" / "dog" / "h.png")
    assert build_datasets(tmp_path / "train").class_names == ["cat", "dog"]
    bundle = build_datasets(tmp_path)
    names = bundle.class_names
    assert names == ["cat", "dog"]
    assert {Path(p).name: names[t] for p, t in bundle.train.reader.samples} == {
        "a.png": "cat", "b.png": "cat", "c.png": "cat", "d.png": "dog", "e.png": "dog", "f.bmp": "dog"}
    assert {Path(p).name: names[t] for p, t in bundle.val.reader.samples} == {"g.png": "cat", "h.png": "dog"}
    # timm's natural sort order of the files is kept
    paths = [p for p, _ in bundle.train.reader.samples]
    assert [Path(p).relative_to(tmp_path / "train").as_posix() for p in paths] == [
        "cat/2019/a.png", "cat/2020/b.png", "cat/c.png", "dog/2019/d.png", "dog/2019/f.bmp", "dog/x/y/e.png"]


def test_val_ignores_hidden_and_empty_folders_like_train(tmp_path):
    make_folder(tmp_path, per_class=2, classes=("a", "b"), split="train")
    make_folder(tmp_path, per_class=1, classes=("a", "b"), split="val", seed=1)
    for split in ("train", "val"):
        (tmp_path / split / "c").mkdir()  # an empty class folder in both splits: no class
        _png(tmp_path / split / ".ipynb_checkpoints" / "a_000-checkpoint.png")  # a tool's copy: not data
        _png(tmp_path / split / "a" / ".thumbnails" / "t.png")
    bundle = build_datasets(tmp_path)
    assert bundle.class_names == ["a", "b"]
    assert len(bundle.train) == 4 and len(bundle.val) == 2
    assert not any("/." in p for ds in (bundle.train, bundle.val) for p, _ in ds.reader.samples)
    # a validation folder that holds images of a class training lacks is still refused, named alone
    _png(tmp_path / "val" / "d" / "x.png")
    with pytest.raises(DatasetError, match=r"val has class folders the training set does not: d; every"):
        build_datasets(tmp_path)


def test_csv_row_with_an_empty_label_is_named(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / name)
    (tmp_path / "train.csv").write_text("path,label\na.png,cat\nb.png,dog\nc.png,\n")
    with pytest.raises(DatasetError) as err:
        build_datasets(tmp_path / "train.csv")
    assert str(err.value) == (f"line 4 of {tmp_path / 'train.csv'} (c.png) has an empty label; "
                              "fill in the label column or remove the row")
    (tmp_path / "train.csv").write_text("path,label\na.png,cat\nb.png,dog\n")
    (tmp_path / "val.csv").write_text("path,label\nc.png, \n")
    with pytest.raises(DatasetError, match=r"line 2 of .*val\.csv \(c\.png\) has an empty label"):
        build_datasets(tmp_path / "train.csv", val_data=tmp_path / "val.csv")


def test_val_split_keeps_a_training_image_of_every_class(tmp_path):
    make_folder(tmp_path, per_class=2, classes=("small",))
    make_folder(tmp_path, per_class=10, classes=("big",))
    bundle = build_datasets(tmp_path, val_split=0.8, seed=0)
    train = [bundle.class_names[t] for _, t in bundle.train.reader.samples]
    val = [bundle.class_names[t] for _, t in bundle.val.reader.samples]
    assert sorted(train) == ["big", "big", "small"]  # round(2 * 0.8) = 2 would have left "small" no image
    assert sorted(val) == ["big"] * 8 + ["small"]


def test_val_split_that_holds_nothing_out_does_not_claim_a_split(tmp_path):
    make_folder(tmp_path, per_class=1, classes=("a", "b", "c"))
    bundle = build_datasets(tmp_path, val_split=0.5)
    assert bundle.val is None and len(bundle.train) == 3
    assert bundle.sources == {"train": str(tmp_path)}


@pytest.fixture
def bomb(tmp_path, monkeypatch):
    """A 64x64 image that PIL refuses as a decompression bomb (its pixel limit lowered for the test)."""
    path = _png(tmp_path / "a" / "bomb.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1500)  # PIL raises above twice this: 64 * 64 > 3000
    return path


def test_decompression_bombs_are_skipped_and_counted_like_unreadable_files(tmp_path, bomb):
    make_folder(tmp_path, per_class=2, classes=("a", "b"))
    with pytest.raises(Image.DecompressionBombError):
        Image.open(bomb)  # a plain Exception, not the OSError the readers caught
    with pytest.raises(DatasetError, match=r"bomb\.png is not a readable image \(DecompressionBombError\)"):
        open_rgb(bomb)
    bundle = build_datasets(tmp_path)
    assert bundle.skipped == [str(bomb)] and len(bundle.train) == 4


def test_predict_reports_a_decompression_bomb_and_goes_on(tmp_path, bomb):
    good = _png(tmp_path / "good.png", size=24)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    good_pred, bomb_pred = wsurgery.predict(model, [good, bomb], topk=2, img_size=32)
    assert good_pred.error is None and len(good_pred.labels) == 2
    assert bomb_pred.path == bomb and "DecompressionBombError" in bomb_pred.error and bomb_pred.labels == []


def test_globs_match_files_not_folders_named_like_images(tmp_path):
    image = _png(tmp_path / "pf" / "a.png")
    (tmp_path / "pf" / "x.png").mkdir()
    _png(tmp_path / "pf" / "x.png" / "inner.jpg")
    assert find_images(str(tmp_path / "pf" / "*.png")) == [image]
    assert find_images(str(tmp_path / "pf" / "**" / "*.*g")) == [image, tmp_path / "pf" / "x.png" / "inner.jpg"]


def test_seeded_view_seeds_numpy_so_randaugment_is_the_same_for_any_worker_count(tmp_path):
    make_folder(tmp_path, per_class=3, classes=("a", "b"), size=32)
    bundle = build_datasets(tmp_path)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2)
    # timm's RandAugment picks its ops with np.random
    bundle.train.transform = train_transform(model, 32, AugmentConfig(auto_augment="rand-m9-mstd0.5"))
    view = SeededView(bundle.train, seed=3)
    view.set_epoch(2)

    def read(workers: int) -> torch.Tensor:
        loader = torch.utils.data.DataLoader(view, batch_size=2, num_workers=workers)
        return torch.cat([x for x, _ in loader])

    np.random.seed(1)
    direct = torch.stack([view[i][0] for i in range(len(view))])
    np.random.seed(2)  # another global numpy state
    assert torch.equal(torch.stack([view[i][0] for i in range(len(view))]), direct)
    assert torch.equal(read(0), direct)
    assert torch.equal(read(2), direct)  # each worker process starts with its own numpy seed
    # the caller's numpy RNG is left as it was
    np.random.seed(5)
    before = np.random.get_state()
    view[0]
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1]) and before[2:] == after[2:]


def test_cli_predict_prints_file_and_class_names_with_brackets_as_they_are(monkeypatch):
    cli_predict = importlib.import_module("wsurgery.cli.predict")
    results = [Prediction(Path("[bold]red.png"), ["[b]cat", "dog"], [0, 1], [0.75, 0.25]),
               Prediction(Path("[red]bad.png"), [], [], [], error="[red]bad.png is not a readable image (OSError)")]
    monkeypatch.setattr(cli_predict, "predict_images", lambda *args, **kwargs: results)
    result = invoke("predict", "model-dir", "images")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    out = flat(result.stdout)
    assert "[bold]red.png 1 [b]cat 75.0%" in out and "2 dog 25.0%" in out
    assert flat(result.stderr) == "skipped [red]bad.png: [red]bad.png is not a readable image (OSError)"
