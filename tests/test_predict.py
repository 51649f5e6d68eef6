"""predict: top-k names and probabilities from an export, checked against the model's own softmax."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from _data import CLASSES, make_folder
from typer.testing import CliRunner
from wsurgery.cli.main import app

import wsurgery
from wsurgery.errors import InputNotFoundError, UsageError
from wsurgery.train import set_num_classes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pred")
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False)
    model, _ = wsurgery.convert(model, mode="aws", norm="gn")
    set_num_classes(model, list(CLASSES), head_init="default")  # random head: non-trivial probabilities
    model.pretrained_cfg["input_size"] = (3, 32, 32)
    wsurgery.export(model, tmp / "export")
    images = make_folder(tmp / "imgs", per_class=2)
    return model, tmp / "export", images


def _inputs(model, paths):
    """The model's inputs built here: timm's data config and eval transform on PIL images."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def test_predict_matches_softmax_of_the_model(exported):
    model, export_dir, images = exported
    preds = wsurgery.predict(export_dir, images, topk=2)
    paths = sorted(images.rglob("*.png"))
    x = _inputs(model, paths)
    with torch.no_grad():
        probs = model.eval()(x).softmax(-1)
    assert [p.path for p in preds] == paths
    for p, row in zip(preds, probs):
        top_p, top_i = row.topk(2)
        assert p.indices == top_i.tolist()
        assert p.labels == [CLASSES[i] for i in top_i.tolist()]
        torch.testing.assert_close(torch.tensor(p.probs), top_p, rtol=1e-5, atol=1e-6)
        assert p.probs[0] >= p.probs[1]


def test_topk_is_capped_and_unreadable_files_reported(exported, tmp_path):
    _, export_dir, images = exported
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    good = next(images.rglob("*.png"))
    preds = wsurgery.predict(export_dir, [good, bad], topk=10)
    assert len(preds[0].labels) == len(CLASSES)
    assert sum(preds[0].probs) == pytest.approx(1.0, abs=1e-5)
    assert preds[1].error and "not a readable image" in preds[1].error and preds[1].labels == []
    with pytest.raises(UsageError):
        wsurgery.predict(export_dir, [good], topk=0)
    with pytest.raises(InputNotFoundError):
        wsurgery.predict(export_dir, [tmp_path / "missing.png"])


def test_model_without_label_names_uses_indices(tmp_path):
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=4)
    make_folder(tmp_path, per_class=1, classes=("a",))
    preds = wsurgery.predict(model, tmp_path, topk=3)
    assert all(name.startswith("class ") for name in preds[0].labels)


def test_imagenet_models_get_imagenet_names():
    """Without label names, a 1000-class model is named with ImageNet-1k's words (timm's inference
    script does the same); other class counts keep indices."""
    from wsurgery.predict import label_names

    names = label_names(timm.create_model("test_efficientnet", pretrained=False))
    assert len(names) == 1000 and names[285] == "Egyptian cat" and names[967] == "espresso"
    assert label_names(timm.create_model("test_efficientnet", pretrained=False, num_classes=7))[0] == "class 0"


def test_cli_predict(exported):
    _, export_dir, images = exported
    res = CliRunner().invoke(app, ["predict", str(export_dir), str(images / "circle"), "--topk", "2", "--json"])
    assert res.exit_code == 0, res.output
    printed = json.loads(res.output)
    expected = wsurgery.predict(export_dir, images / "circle", topk=2)
    assert [p["path"] for p in printed] == [str(p.path) for p in expected] and len(printed) == 2
    for p, e in zip(printed, expected):
        assert p["labels"] == e.labels and p["indices"] == e.indices
        assert p["probs"] == pytest.approx(e.probs, rel=1e-6)
    res = CliRunner().invoke(app, ["predict", str(export_dir), str(images / "circle"), "--topk", "2"])
    assert res.exit_code == 0, res.output
    rank1 = [line.split("│") for line in res.output.splitlines() if "│" in line]
    rank1 = [[c.strip() for c in row] for row in rank1 if len(row) > 3 and row[2].strip() == "1"]
    assert [(row[3], row[4]) for row in rank1] == [(e.labels[0], f"{e.probs[0]:.1%}") for e in expected]
    res = CliRunner().invoke(app, ["predict", str(export_dir), "/nonexistent/x.png"])
    assert res.exit_code == 1 and "does not exist" in res.output and "Traceback" not in res.output


def test_cli_predict_takes_images_as_compare_and_verify_do(exported):
    """predict took images only as arguments, compare and verify only with --images."""
    _, export_dir, images = exported
    positional = CliRunner().invoke(app, ["predict", str(export_dir), str(images / "circle"), "--json"])
    option = CliRunner().invoke(app, ["predict", str(export_dir), "--images", str(images / "circle"), "--json"])
    assert option.exit_code == 0 and json.loads(option.stdout) == json.loads(positional.stdout)
    both = CliRunner().invoke(app, ["predict", str(export_dir), str(images / "circle"), "--images",
                                    str(images / CLASSES[1]), "--json"])
    extra = len(list((images / CLASSES[1]).iterdir()))
    assert len(json.loads(both.stdout)) == len(json.loads(positional.stdout)) + extra > extra
    none = CliRunner().invoke(app, ["predict", str(export_dir)])
    assert none.exit_code == 2 and none.stderr.strip() == (
        "error: predict needs images: name them after the model, or with --images PATH")


def test_device_and_offline_errors_are_one_line(exported, monkeypatch):
    import importlib

    _, export_dir, images = exported
    for device, fragment in (("tpu", "--device tpu is not a device torch knows"),
                             ("mps" if not torch.backends.mps.is_available() else "cuda:99", "--device")):
        res = CliRunner().invoke(app, ["predict", str(export_dir), str(images), "--device", device])
        assert res.exit_code == 2 and fragment in res.output and "Traceback" not in res.output, res.output
    load_module = importlib.import_module("wsurgery.load")

    def offline(*args, **kwargs):
        raise wsurgery.errors.NetworkUnavailableError("could not fetch pretrained weights for resnet10t")

    monkeypatch.setattr(load_module, "_create_timm", offline)
    res = CliRunner().invoke(app, ["predict", "resnet10t", str(images)])
    assert res.exit_code == 1 and "wsurgery export resnet10t --checkpoint PATH -o DIR" in res.output, res.output
    assert "--no-pretrained" not in res.output


def test_headless_models_are_refused_and_topk_is_capped_by_the_outputs(tmp_path):
    make_folder(tmp_path, per_class=1, classes=("a",))
    with pytest.raises(UsageError, match="no classifier"):
        wsurgery.predict(timm.create_model("test_efficientnet", pretrained=False, num_classes=0), tmp_path)
    four = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    (pred,) = wsurgery.predict(four, tmp_path, topk=10, img_size=32)
    assert sorted(pred.indices) == [0, 1, 2, 3] and sum(pred.probs) == pytest.approx(1.0, abs=1e-5)
