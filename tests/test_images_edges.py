"""Reading images for predict/calibrate/compare/train, from a review: camera orientation, 16-bit grey,
files named twice; BatchNorm statistics from a batch of one; compare of models with other data configs."""

from __future__ import annotations

import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

import wsurgery
from wsurgery.calibrate import calibration_split, reestimate_bn_stats
from wsurgery.compare import agreement_from_logits
from wsurgery.data import find_images, open_rgb
from wsurgery.errors import UsageError


def test_a_phone_photo_reaches_the_model_upright(tmp_path):
    """A JPEG with EXIF Orientation 6 (the camera held upright) was read as stored: on its side."""
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, :20] = (230, 30, 30)
    pixels[:, 20:] = (30, 30, 230)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    with Image.open(path) as stored:
        upright = np.asarray(stored.convert("RGB").transpose(Image.Transpose.ROTATE_270))
    got = np.asarray(open_rgb(path))
    assert got.shape == (40, 20, 3)
    np.testing.assert_array_equal(got, upright)
    assert got[:5].mean(axis=(0, 1))[0] > 150  # red (the left of the stored image) is on top


def test_16_bit_grey_is_scaled_by_its_full_range(tmp_path):
    """Scaled by its brightest pixel, a dark 16-bit grey photo came out 5x brighter than the same
    photo stored as 16-bit RGB (one hot pixel set the exposure)."""
    values = np.linspace(0, 16383, 64).astype(np.uint16).reshape(8, 8)  # a quarter of the range
    path = tmp_path / "grey16.png"
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I;16")
    got = np.asarray(open_rgb(path))[..., 0]
    np.testing.assert_array_equal(got, np.round(values / 65535 * 255).astype(np.uint8))
    assert got.max() <= 64


def test_a_file_named_twice_is_read_once(tmp_path):
    """A folder plus a glob (or a sub-folder) over it listed files twice: a held-out image was also
    calibrated on, and compare counted it twice."""
    (tmp_path / "sub").mkdir()
    for i, folder in enumerate((tmp_path, tmp_path, tmp_path / "sub")):
        Image.fromarray(np.full((16, 16, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    found = find_images([tmp_path, tmp_path / "sub", str(tmp_path / "**" / "*.png"), tmp_path / "0.png"])
    assert sorted(p.name for p in found) == ["0.png", "1.png", "2.png"]
    model = timm.create_model("test_efficientnet", pretrained=False)
    calib, held = calibration_split([tmp_path, tmp_path / "sub"], model, 0.34, crops_per_image=2, seed=0)
    assert calib.shape[0] + held.shape[0] == 6  # 3 files x 2 crops, not 5 x 2


def test_jfif_and_avif_photos_are_found_read_and_trained_on(tmp_path):
    """.jfif (a JPEG, as browsers save them) and .avif (Pillow reads it) were passed over."""
    from PIL import features

    from wsurgery.datasets import build_datasets

    rng = np.random.default_rng(0)
    kinds = [".jfif", ".jpe"] + ([".avif"] if features.check("avif") else [])
    for label in ("a", "b"):
        for i, suffix in enumerate(kinds):
            pixels = rng.integers(0, 255, size=(20, 20, 3), dtype=np.uint8)
            target = tmp_path / "data" / label / f"{i}{suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(target, format="AVIF" if suffix == ".avif" else "JPEG")
    found = find_images(tmp_path / "data")
    assert sorted(p.suffix for p in found) == sorted(kinds * 2)
    assert all(open_rgb(p).size == (20, 20) for p in found)
    bundle = build_datasets(tmp_path / "data")
    assert len(bundle.train) == len(found) and bundle.class_names == ["a", "b"]


def test_a_dataset_root_calibrates_on_its_train_split_only(tmp_path):
    """A dataset root with train/ and val/ was read whole: its validation images were calibrated on."""
    from _data import make_train_val

    from wsurgery.calibrate import calibration_files, calibration_images

    root = make_train_val(tmp_path / "data", train_per_class=4, val_per_class=2)
    train_files = find_images(root / "train")
    assert calibration_files(root) == train_files and len(find_images(root)) > len(train_files)
    model = timm.create_model("resnet10t", num_classes=3)
    assert calibration_images(root, model, limit=None, img_size=32).shape[0] == len(train_files)
    # a folder that is not a dataset root, and a named val/ folder, are read as they are
    assert calibration_files(root / "val") == find_images(root / "val")
    (tmp_path / "plain" / "train").mkdir(parents=True)  # train/ without an evaluation split beside it
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "train" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "plain" / "b.png")
    assert len(calibration_files(tmp_path / "plain")) == 2
    # the CLI says so
    from _cli import invoke

    result = invoke("convert", "resnet10t", "--no-pretrained", "--mode", "aws", "--norm", "gn", "-o", tmp_path / "c",
                    "--calib-data", root, "--calib-steps", "1", "--calib-batch", "4", "--calib-size", "32")
    assert result.exit_code == 0, result.stderr
    assert f"note: {root} is a dataset root: calibrating on {root / 'train'} only" in " ".join(result.stderr.split())


def _se_like() -> nn.Module:
    """A BatchNorm on globally pooled 1x1 maps, as in squeeze-excitation blocks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))


def test_bn_stats_of_65_images_in_batches_of_64_on_pooled_maps():
    """65 = 64 + 1: a batch of one image failed the pooled BatchNorm in training mode (ValueError)."""
    model = _se_like()
    x = torch.randn(65, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    reestimate_bn_stats(model, x, batch_size=64)
    with torch.no_grad():
        conv_out = model[0](x)
    # every image weighs the same (the first BN sees the conv's output directly)
    torch.testing.assert_close(model[1].running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert model[5].running_mean.abs().sum() > 0 and torch.isfinite(model[5].running_var).all()
    # one image: refused where a BatchNorm sees pooled 1x1 maps (naming the fix), fine elsewhere
    with pytest.raises(UsageError, match=r"pooled 1x1 maps.*--calib-crops"):
        reestimate_bn_stats(_se_like(), x[:1])
    plain = _se_like()[:3]
    reestimate_bn_stats(plain, x[:1])
    torch.testing.assert_close(plain[1].running_mean, plain[0](x[:1]).mean(dim=(0, 2, 3)).detach())


def test_compare_gives_each_model_its_own_data_config(tmp_path):
    """A model with mean/std 0.5 and 48 px was fed images prepared for B (ImageNet mean/std, B's size):
    compare reported 100% agreement for the same weights used two ways."""
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    b = timm.create_model("test_efficientnet", pretrained=False).eval()
    a = timm.create_model("test_efficientnet", pretrained=False).eval()
    a.load_state_dict(b.state_dict())
    a.pretrained_cfg = {**b.pretrained_cfg, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
                        "input_size": (3, 48, 48), "crop_pct": 1.0}

    def logits(model):  # each model's own eval transform, independently of wsurgery
        transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
        x = torch.stack([transform(Image.open(tmp_path / f"{i}.png").convert("RGB")) for i in range(4)])
        with torch.no_grad():
            return model(x)

    expected = agreement_from_logits(logits(a), logits(b))
    got = wsurgery.compare(a, b, tmp_path)
    assert got.num_images == 4
    torch.testing.assert_close(torch.tensor([got.kl, got.top1, got.top5_overlap]),
                               torch.tensor([expected.kl, expected.top1, expected.top5_overlap]))
    assert got.kl > 0
    same = wsurgery.compare(b, b, tmp_path)  # same data config: one batch for both, agreement is exact
    assert same.top1 == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)


def test_convert_calibrates_against_the_original_classifier_then_gives_the_new_head(tmp_path, monkeypatch):
    """With --num-classes the teacher had a new random head too: the distillation matched a random
    10-way projection of the features instead of the original's 1000 classes."""
    import sys

    from _cli import invoke, ok
    from safetensors.torch import save_file

    original = timm.create_model("test_efficientnet", pretrained=False).eval()  # 1000 classes
    save_file(original.state_dict(), tmp_path / "w.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    cli_convert = sys.modules["wsurgery.cli.convert"]
    seen = []

    def spy(student, teacher, *args, **kwargs):
        seen.append((student.num_classes, teacher.num_classes))
        return calibrate(student, teacher, *args, **kwargs)

    calibrate = cli_convert.calibrate
    monkeypatch.setattr(cli_convert, "calibrate", spy)
    out = ok(invoke("convert", "test_efficientnet", "--checkpoint", tmp_path / "w.safetensors", "--num-classes", "3",
                    "--mode", "aws", "--norm", "gn", "--calib-data", tmp_path / "img", "--calib-steps", "2",
                    "-o", tmp_path / "c"))
    assert seen == [(1000, 1000)] and "then a new head of 3" in out
    assert wsurgery.load(tmp_path / "c").num_classes == 3


def test_a_conv_classifier_keeps_calibrating_with_its_new_head(tmp_path):
    """dla's classifier is a 1x1 conv: converted with the body, then replaced by a plain conv after
    calibration, save refused the model. It calibrates with its new head (the way before)."""
    from _cli import invoke, ok

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    ok(invoke("convert", "dla46_c", "--no-pretrained", "--num-classes", "4", "--mode", "aws", "--norm", "gn",
              "--calib-data", tmp_path / "img", "--calib-steps", "1", "-o", tmp_path / "c"))
    loaded = wsurgery.load(tmp_path / "c")
    assert loaded.num_classes == 4 and wsurgery.is_converted(loaded)


def test_a_checkpoint_with_its_own_head_size_calibrates_with_that_head(tmp_path):
    """A 3-class checkpoint does not load without --num-classes 3: the calibration falls back to loading
    it with that size (its own trained head), and the saved model keeps that head's weights."""
    from _cli import invoke, ok
    from safetensors.torch import save_file

    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=3).eval()
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    ok(invoke("convert", "test_efficientnet", "--checkpoint", tmp_path / "w.safetensors", "--num-classes", "3",
              "--mode", "aws", "--calib-data", tmp_path / "img", "--calib-steps", "1", "-o", tmp_path / "c"))
    saved = wsurgery.load(tmp_path / "c")
    assert torch.equal(saved.get_classifier().weight, source.get_classifier().weight)


@pytest.mark.parametrize("remap", [False, True])
def test_a_checkpoint_head_of_a_third_size_is_the_calibration_teacher(tmp_path, monkeypatch, remap):
    """A 7-class fine-tuned checkpoint converted with --num-classes 3 fits neither the default head nor
    the new one: it was calibrated against a new random head (a random projection of the features).
    The teacher is now the checkpoint's own 7-class model, then the 3-class head goes in."""
    import sys

    from _cli import invoke, ok
    from safetensors.torch import save_file

    from wsurgery.load import checkpoint_num_classes

    cli_convert = sys.modules["wsurgery.cli.convert"]
    torch.manual_seed(0)
    source = timm.create_model("test_efficientnet", pretrained=False, num_classes=7).eval()
    state = source.state_dict()
    if remap:  # names lost, order kept (a .pth keeps it): what --remap-by-order is for
        state = {f"t{i}": v for i, v in enumerate(state.values())}
    ckpt = tmp_path / ("w.pth" if remap else "w.safetensors")
    torch.save(state, ckpt) if remap else save_file(state, ckpt)
    assert checkpoint_num_classes("test_efficientnet", ckpt, remap_by_order=remap) == 7
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
    seen = []

    def spy(student, teacher, *args, **kwargs):
        seen.append(teacher.get_classifier().weight.detach().clone())
        return calibrate(student, teacher, *args, **kwargs)

    calibrate = cli_convert.calibrate
    monkeypatch.setattr(cli_convert, "calibrate", spy)
    ok(invoke("convert", "test_efficientnet", "--checkpoint", ckpt, "--num-classes", "3",
              *(["--remap-by-order"] if remap else []), "--mode", "aws", "--norm", "gn",
              "--calib-data", tmp_path / "img", "--calib-steps", "1", "-o", tmp_path / "c"))
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], source.get_classifier().weight, rtol=0, atol=0)
    assert wsurgery.load(tmp_path / "c").num_classes == 3


@pytest.mark.parametrize("broken", [False, True])
def test_an_installed_pillow_heif_is_registered(tmp_path, broken):
    """HEIC photos were read only if the user registered pillow-heif before importing wsurgery; an
    installed plugin is now registered by wsurgery (a stand-in plugin here: it maps .heic to PNG).
    A plugin that fails to register is a warning, never a failed import."""
    import subprocess
    import sys

    plugin = tmp_path / "plugin"
    plugin.mkdir()
    body = "raise RuntimeError('libheif missing')" if broken else "Image.register_extension('PNG', '.heic')"
    (plugin / "pillow_heif.py").write_text(f"from PIL import Image\n\ndef register_heif_opener():\n    {body}\n")
    Image.fromarray(np.full((8, 8, 3), 200, dtype=np.uint8)).save(tmp_path / "phone.png")
    (tmp_path / "phone.png").rename(tmp_path / "phone.heic")
    code = ("import warnings; warnings.simplefilter('always')\n"
            "from wsurgery.data import IMAGE_SUFFIXES, find_images, open_rgb\n"
            f"print('.heic' in IMAGE_SUFFIXES)\n"
            f"print([open_rgb(p).size for p in find_images({str(tmp_path)!r})] if '.heic' in IMAGE_SUFFIXES else '')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    if broken:
        assert proc.stdout.split("\n")[0] == "False" and "could not be registered (libheif missing)" in proc.stderr
    else:
        assert proc.stdout.split("\n")[:2] == ["True", "[(8, 8)]"], proc.stdout


def test_checkpoint_num_classes_reads_only_a_head_of_the_model(tmp_path):
    """From a review: a tag whose pretrained_cfg has no head (convnextv2_atto.fcmae) built without one,
    so the checkpoint's head was never read; a tensor of another shape under the head's name or position
    was taken for it; a .safetensors file (no order) was read by position."""
    from safetensors.torch import save_file

    from wsurgery.load import checkpoint_num_classes

    state = timm.create_model("convnextv2_atto", pretrained=False, num_classes=7).state_dict()
    torch.save(state, tmp_path / "c.pth")
    assert checkpoint_num_classes("convnextv2_atto.fcmae", tmp_path / "c.pth") == 7
    assert checkpoint_num_classes("convnextv2_atto", tmp_path / "c.pth") == 7
    state["head.fc.weight"] = torch.zeros(7, 5)  # not a head of this model: 5 features, not 320
    torch.save(state, tmp_path / "odd.pth")
    assert checkpoint_num_classes("convnextv2_atto", tmp_path / "odd.pth") is None
    small = timm.create_model("test_efficientnet", pretrained=False, num_classes=7).state_dict()
    renamed = {f"t{i}": v for i, v in enumerate(small.values())}
    torch.save(renamed, tmp_path / "r.pth")
    save_file(renamed, tmp_path / "r.safetensors")
    assert checkpoint_num_classes("test_efficientnet", tmp_path / "r.pth", remap_by_order=True) == 7
    assert checkpoint_num_classes("test_efficientnet", tmp_path / "r.safetensors", remap_by_order=True) is None
    assert checkpoint_num_classes("not_a_timm_model", tmp_path / "r.pth") is None
