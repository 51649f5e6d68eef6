"""Fine-tuning guards: what would lose a run, resume it wrongly, or ignore a recipe key is refused or honoured."""

from __future__ import annotations

import shutil
import sys

import pytest
import timm
import torch
from _cli import invoke, one_error
from _data import CLASSES, make_folder, make_train_val
from test_train import FAST, tiny
from torch.testing import assert_close

import wsurgery
from wsurgery.errors import RecipeError, UsageError
from wsurgery.io import read_json
from wsurgery.recipes import Recipe, load_recipe, resolve_recipe
from wsurgery.train import TrainingInterrupted, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("data"))


def _interrupted(data, run, step, overrides=FAST):
    def stop(event):
        if event.kind == "step" and event.step == step:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(tiny(), data, run, "cpu-quick", overrides=overrides, callback=stop)


def test_export_onto_the_run_directory_is_refused_before_training(data, tmp_path):
    run = tmp_path / "runs" / "a"
    for export in (run, tmp_path / "runs", tmp_path / "runs" / "a" / "."):
        with pytest.raises(UsageError, match="would replace the run directory"):
            train(tiny(), data, run, "cpu-quick", overrides=FAST, export=export, force=True)
    assert not (tmp_path / "runs").exists()  # refused before anything was written
    # an export inside the run directory is a directory of its own: allowed
    result = train(tiny(), data, run, "cpu-quick", overrides=FAST + ["epochs=1"], export=run / "export")
    assert result.verify.passed and (run / "last" / "train_state.json").is_file()


def test_resume_into_another_directory_is_a_whole_run(data, tmp_path, monkeypatch):
    # every evaluation scores lower than the one before: no epoch after the resume beats the first,
    # so the best model is the one only the first directory held
    train_module = sys.modules["wsurgery.train"]
    real, calls = train_module._evaluate_loader, []  # what the run evaluates each epoch with

    def falling(*args, **kwargs):
        calls.append(1)
        return {**real(*args, **kwargs), "top1": 100.0 - 10 * len(calls)}

    monkeypatch.setattr(train_module, "_evaluate_loader", falling)
    _interrupted(data, tmp_path / "a", step=8)  # 6 steps per epoch: in epoch 2
    result = train(None, None, tmp_path / "b", resume=tmp_path / "a")
    assert len(calls) == 2
    assert result.best["epoch"] == 1
    for name in ("config.json", "model.safetensors", "train.json", "last/train_state.json", "metrics.csv"):
        assert (tmp_path / "b" / name).is_file(), name
    assert read_json(tmp_path / "b" / "train.json")["best"]["epoch"] == 1
    assert wsurgery.load(tmp_path / "b").num_classes == len(CLASSES)
    assert read_json(tmp_path / "a" / "last" / "train_state.json")["state"]["step"] == 8  # the source is kept


def test_resume_with_data_of_other_classes_is_refused(data, tmp_path):
    _interrupted(data, tmp_path / "a", step=3)
    fewer = tmp_path / "fewer"
    shutil.copytree(data, fewer)
    for split in ("train", "val"):
        shutil.rmtree(fewer / split / sorted(CLASSES)[-1])
    with pytest.raises(UsageError, match="trained on"):
        train(None, fewer, None, resume=tmp_path / "a")
    assert read_json(tmp_path / "a" / "last" / "train_state.json")["state"]["step"] == 3


def test_mixup_with_one_odd_batch_trains(data, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(data, odd)
    sorted((odd / "train").glob("*/*.png"))[0].unlink()  # 23 training images, one batch of 23
    result = train(tiny(), odd, None, "cpu-quick",
                   overrides=[*FAST, "batch_size=24", "epochs=1", "warmup_steps=0", "mixup_alpha=0.2"])
    assert result.steps == 1 and result.history[0]["train_loss"] == result.history[0]["train_loss"]  # not NaN


def test_adam_momentum_is_beta1(data, tmp_path):
    train(tiny(), data, tmp_path / "r", "cpu-quick", overrides=[*FAST, "epochs=1", "optimizer=adamw", "momentum=0.5"])
    groups = read_json(tmp_path / "r" / "last" / "train_state.json")["optimizer"]["param_groups"]
    assert groups and all(tuple(g["betas"]) == (0.5, 0.999) for g in groups)


def test_bit_hyperrule_keeps_an_aug_scale_that_was_set():
    bit = load_recipe("bit-hyperrule")
    assert bit.img_size == "auto" and list(bit.aug_scale) == Recipe().aug_scale
    derived, notes = resolve_recipe(bit, 1000, (28, 28))
    assert derived.aug_scale == [0.64, 1.0] and any(n.startswith("aug_scale=") for n in notes)
    kept, notes = resolve_recipe(load_recipe("bit-hyperrule", ["aug_scale=[0.5, 1.0]"]), 1000, (28, 28))
    assert kept.aug_scale == [0.5, 1.0] and kept.img_size == 128
    assert not any(n.startswith("aug_scale=") for n in notes)


def test_unknown_auto_augment_policy_is_a_recipe_error():
    with pytest.raises(RecipeError, match="`auto_augment` 'foo' is not a timm policy"):
        load_recipe("cpu-quick", ["auto_augment=foo"])
    assert load_recipe("cpu-quick", ["auto_augment=rand-m9-mstd0.5"]).auto_augment == "rand-m9-mstd0.5"


def test_cli_resume_names_the_flags_that_cannot_apply(data, tmp_path):
    _interrupted(data, tmp_path / "a", step=3)
    for flags, named in ((["--img-size", "64"], "--img-size"), (["--val-split", "0.2"], "--val-split"),
                         (["--recipe", "micro-batch"], "--recipe"), (["--seed", "0"], "--seed")):
        one_error(invoke("train", "--resume", tmp_path / "a", *flags), 2, named, "cannot change a resumed run")
    # --set: only keys that leave the result as it is (workers) may change
    one_error(invoke("train", "--resume", tmp_path / "a", "--set", "lr=0.1"), 2, "--set",
              "cannot change lr of a resumed run", "only workers can change")
    with pytest.raises(UsageError, match="recipe"):
        train(None, None, None, resume=tmp_path / "a", recipe="micro-batch")
    assert read_json(tmp_path / "a" / "last" / "train_state.json")["state"]["step"] == 3


def test_output_that_is_a_file_is_a_one_line_error(data, tmp_path):
    (tmp_path / "afile").write_text("keep")
    saved = wsurgery.save(tiny(), tmp_path / "model")
    one_error(invoke("train", saved, "--data", data, "-o", tmp_path / "afile", "--recipe", "cpu-quick", "--force"),
              2, "is a file")
    assert (tmp_path / "afile").read_text() == "keep"



def test_a_short_last_micro_batch_weighs_by_its_images(tmp_path):
    """Accumulated micro-batches of 2, 2, 2, 2 and 1 images take the step one batch of 9 takes (the lone
    image weighed as much as two before: each micro-batch's loss was divided by their count)."""
    data = make_folder(tmp_path / "d", per_class=3, classes=("a", "b", "c"))
    common = ["img_size=32", "workers=0", "epochs=1", "optimizer=sgd", "weight_decay=0", "lr=0.5",
              "warmup_steps=0", "label_smoothing=0", "val_split=0", "ema=false", "aug_scale=[0.8, 1.0]"]
    trained = {}
    for name, batching in {"one batch": ["batch_size=9", "accum_steps=1"],
                           "micro-batches": ["batch_size=2", "accum_steps=5"]}.items():
        torch.manual_seed(0)
        model = timm.create_model("test_efficientnet", pretrained=False, num_classes=3)
        model = wsurgery.convert(model, mode="ws", norm="gn")[0]
        result = train(model, data, None, "cpu-quick", overrides=common + batching, device="cpu")
        assert result.steps == 1, name
        trained[name] = result.model
    start = wsurgery.convert(
        (torch.manual_seed(0), timm.create_model("test_efficientnet", pretrained=False, num_classes=3))[1],
        mode="ws", norm="gn")[0]
    moved = [(a - s).abs().max().item() for a, s in zip(trained["one batch"].parameters(), start.parameters())]
    assert max(moved) > 1e-3  # the step did something
    for a, b in zip(trained["one batch"].parameters(), trained["micro-batches"].parameters(), strict=True):
        assert_close(b, a, rtol=1e-4, atol=1e-5)
