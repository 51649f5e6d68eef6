"""Datasets: ImageFolder and CSV layouts, splits, unreadable files, odd image modes, errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from _data import CLASSES, make_folder
from PIL import Image

from wsurgery.datasets import SeededView, build_datasets
from wsurgery.errors import DatasetError, InputNotFoundError


def test_train_val_folders(tmp_path):
    make_folder(tmp_path, per_class=4, split="train")
    make_folder(tmp_path, per_class=2, split="val", seed=1)
    bundle = build_datasets(tmp_path)
    assert bundle.class_names == sorted(CLASSES)
    assert len(bundle.train) == 12 and len(bundle.val) == 6
    # labels follow the folder names, identically in both splits
    for ds in (bundle.train, bundle.val):
        for path, target in ds.reader.samples:
            assert bundle.class_names[target] == type(path)(path).split("/")[-2]
    img, target = bundle.train[0]
    assert isinstance(img, Image.Image) and img.mode == "RGB"


def test_single_folder_val_split_is_stratified_and_seeded(tmp_path):
    make_folder(tmp_path, per_class=10)
    a = build_datasets(tmp_path, val_split=0.2, seed=3)
    b = build_datasets(tmp_path, val_split=0.2, seed=3)
    c = build_datasets(tmp_path, val_split=0.2, seed=4)
    train_paths = {p for p, _ in a.train.reader.samples}
    val_paths = {p for p, _ in a.val.reader.samples}
    assert not train_paths & val_paths and len(train_paths) + len(val_paths) == 30
    assert sorted(t for _, t in a.val.reader.samples) == [0, 0, 1, 1, 2, 2]  # 20% of each class
    assert a.val.reader.samples == b.val.reader.samples
    assert a.val.reader.samples != c.val.reader.samples


def test_csv_dataset(tmp_path):
    make_folder(tmp_path / "imgs", per_class=3)
    rows = ["path,label"] + [f"imgs/{k}/{k}_{i:03d}.png,{k}" for k in CLASSES for i in range(3)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "val.csv").write_text("path,label\n" + "imgs/circle/circle_000.png,circle\n")
    bundle = build_datasets(tmp_path / "train.csv", val_data=tmp_path / "val.csv")
    assert bundle.class_names == sorted(CLASSES)
    assert len(bundle.train) == 9 and len(bundle.val) == 1
    assert bundle.val.reader.samples[0][1] == bundle.class_names.index("circle")


def test_csv_errors(tmp_path):
    make_folder(tmp_path / "imgs", per_class=2)
    (tmp_path / "bad.csv").write_text("file,class\nimgs/circle/circle_000.png,circle\n")
    with pytest.raises(DatasetError, match=r"lacks the column.*path, label"):
        build_datasets(tmp_path / "bad.csv")
    (tmp_path / "train.csv").write_text(
        "path,label\nimgs/circle/circle_000.png,circle\nimgs/square/square_000.png,square\n")
    (tmp_path / "val.csv").write_text("path,label\nimgs/stripes/stripes_000.png,stripes\n")
    with pytest.raises(DatasetError, match="labels the training set does not: stripes"):
        build_datasets(tmp_path / "train.csv", val_data=tmp_path / "val.csv")


def test_unreadable_files_are_skipped_and_counted(tmp_path):
    make_folder(tmp_path, per_class=3)
    (tmp_path / "circle" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp_path / "square" / "empty.png").write_bytes(b"")
    bundle = build_datasets(tmp_path)
    assert len(bundle.train) == 9
    assert sorted(p.split("/")[-1] for p in bundle.skipped) == ["broken.jpg", "empty.png"]


def test_truncated_file_is_replaced_at_load_time(tmp_path):
    make_folder(tmp_path, per_class=2)
    good = tmp_path / "circle" / "circle_000.png"
    data = good.read_bytes()
    (tmp_path / "circle" / "circle_000_trunc.png").write_bytes(data[: len(data) // 2])  # header fine, pixels cut
    bundle = build_datasets(tmp_path)
    idx = next(i for i, (p, _) in enumerate(bundle.train.reader.samples) if p.endswith("_trunc.png"))
    img, _ = bundle.train[idx]
    assert img.mode == "RGB" and bundle.train.load_failures == 1
    # DataLoader worker processes add to the same count (shared memory), which the bundle reports
    bundle.train.transform = lambda im: torch.from_numpy(np.asarray(im).copy())
    loader = torch.utils.data.DataLoader(bundle.train, batch_size=1, num_workers=1, sampler=[idx, idx])
    assert len(list(loader)) == 2
    assert bundle.train.load_failures == 3 and bundle.load_failures == 3


def test_odd_image_modes_become_rgb(tmp_path):
    make_folder(tmp_path, per_class=2, classes=("a", "b"))
    arr16 = (np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 100)
    Image.fromarray(arr16).save(tmp_path / "a" / "gray16.png")
    Image.new("RGBA", (24, 24), (255, 0, 0, 0)).save(tmp_path / "a" / "rgba.png")
    Image.new("P", (24, 24), 3).save(tmp_path / "b" / "palette.png")
    Image.new("L", (24, 24), 77).save(tmp_path / "b" / "gray.png")
    bundle = build_datasets(tmp_path)
    by_name = {p.split("/")[-1]: i for i, (p, _) in enumerate(bundle.train.reader.samples)}
    for name in ("gray16.png", "rgba.png", "palette.png", "gray.png"):
        img, _ = bundle.train[by_name[name]]
        assert img.mode == "RGB" and img.size == (24, 24)
    img16 = np.asarray(bundle.train[by_name["gray16.png"]][0])[..., 0].astype(np.float64)
    expected = np.round(arr16 / 65535 * 255)  # scaled by the 16-bit range to 8 bits, not clipped at 255
    np.testing.assert_allclose(img16, expected, atol=1)
    assert np.asarray(bundle.train[by_name["gray.png"]][0]).tolist()[0][0] == [77, 77, 77]
    # fully transparent RGBA is composited on white
    assert np.asarray(bundle.train[by_name["rgba.png"]][0])[0, 0].tolist() == [255, 255, 255]


@pytest.mark.parametrize("layout, message", [
    ("empty", "holds no images"),
    ("one_class", "only one class"),
    ("loose", "outside class folders"),
    ("loose_val", "val has images outside class folders"),
])
def test_dataset_errors(tmp_path, layout, message):
    root = tmp_path / "d"
    root.mkdir()
    if layout == "one_class":
        make_folder(root, per_class=2, classes=("only",))
    if layout == "loose":
        make_folder(root, per_class=2, classes=("a", "b"))
        Image.new("RGB", (8, 8)).save(root / "loose.png")
    if layout == "loose_val":  # validation refuses them too (they were dropped silently)
        make_folder(root / "train", per_class=2, classes=("a", "b"))
        make_folder(root / "val", per_class=1, classes=("a", "b"))
        Image.new("RGB", (8, 8)).save(root / "val" / "loose.png")
    with pytest.raises(DatasetError, match=message):
        build_datasets(root)


def test_missing_path_and_wrong_file(tmp_path):
    with pytest.raises(InputNotFoundError):
        build_datasets(tmp_path / "nope")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DatasetError, match=r"not a .csv"):
        build_datasets(tmp_path / "x.txt")


def test_seeded_view_augmentation_depends_only_on_seed_epoch_index(tmp_path):
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3).tolist() + [random.random()]

    view = SeededView(Noise(), seed=1)
    torch.manual_seed(123)
    random.seed(5)
    before = (torch.get_rng_state(), random.getstate())
    a = view[2]
    torch.manual_seed(999)  # global RNG state does not matter
    b = view[2]
    assert a == b
    view.set_epoch(1)
    assert view[2] != a and view[1] != a
    # the caller's RNG is left as it was
    torch.manual_seed(123)
    random.seed(5)
    view[0]
    assert torch.equal(torch.get_rng_state(), before[0]) and random.getstate() == before[1]
    # (epoch, index) from the sampler is the same sample as set_epoch + index (persistent workers get the epoch so)
    assert view[(1, 2)] == view[2] and view[(0, 2)] == a


def test_seeded_view_seeds_only_the_cpu_generator(monkeypatch):
    """torch.manual_seed also seeded CUDA's generator (per sample, never restored: GPU dropout followed the
    last image read), at 0.1 ms a sample in torch's lazy CUDA seeding. The CPU stream is unchanged."""
    class Noise(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.rand(3).tolist()

    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(seed))
    view = SeededView(Noise(), seed=1)
    sample = view[3]
    assert calls == []
    torch.manual_seed(hash((1, 0, 3)) % (2**63))  # the seed SeededView gives (seed, epoch, index), independently
    assert sample == torch.rand(3).tolist()


def test_every_image_format_the_readers_know_is_a_training_image(tmp_path):
    # timm's folder reader alone would find only .jpg/.jpeg/.png
    from wsurgery.data import IMAGE_SUFFIXES

    gen = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i, ext in enumerate(IMAGE_SUFFIXES):
            array = gen.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            mode = "L" if ext == ".pgm" else "RGB"
            Image.fromarray(array[..., 0] if mode == "L" else array).save(tmp_path / cls / f"{i}{ext.upper()}")
    bundle = build_datasets(tmp_path, val_split=0.25)
    assert len(bundle.train) + len(bundle.val) == 2 * len(IMAGE_SUFFIXES) and not bundle.skipped


@pytest.mark.parametrize("scale", [1.0, 1000.0])
def test_float_tiffs_are_scaled_not_clipped(tmp_path, scale):
    """A 32-bit float grayscale TIFF ([0, 1] or any other range) reads as 8-bit RGB with its contrast kept."""
    from wsurgery.data import open_rgb

    values = np.linspace(0, scale, 64, dtype=np.float32).reshape(8, 8)
    values[0, 0] = np.nan  # non-finite and negative values read as black
    values[0, 1] = -scale
    path = tmp_path / "f.tif"
    Image.fromarray(values, mode="F").save(path)
    with Image.open(path) as check:
        assert check.mode == "F"
    got = np.asarray(open_rgb(path))
    assert got.shape == (8, 8, 3) and (got[..., 0] == got[..., 2]).all()
    expected = np.round(np.nan_to_num(values, nan=0).clip(min=0) / scale * 255).astype(np.uint8)
    assert (got[..., 0] == expected).all()
    assert got.max() == 255 and len(np.unique(got)) > 50  # the whole range, not a white image
