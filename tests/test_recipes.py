"""Recipes: shipped YAML files, validation, overrides, BiT-HyperRule."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
import yaml

from wsurgery.errors import InputNotFoundError, RecipeError
from wsurgery.recipes import (
    RECIPE_DIR,
    Recipe,
    bit_hyperrule,
    builtin_recipes,
    load_recipe,
    parse_override,
    recipe_reference,
    resolve_recipe,
)
from wsurgery.train import lr_scheduler

SHIPPED = ("bit-hyperrule", "micro-batch", "linear-probe", "cpu-quick")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_recipes_load_by_name_and_path(name):
    by_name = load_recipe(name)
    by_path = load_recipe(RECIPE_DIR / f"{name}.yaml")
    assert by_name == by_path and by_name.name == name
    raw = yaml.safe_load((RECIPE_DIR / f"{name}.yaml").read_text())
    for key, value in raw.items():  # every key in the file is what the recipe holds
        assert getattr(by_name, key) == value


def test_every_key_is_documented():
    rows = recipe_reference()
    assert [r[0] for r in rows] == [f.name for f in dataclasses.fields(Recipe)]
    assert all(len(r[3]) > 10 for r in rows)
    assert set(builtin_recipes()) >= set(SHIPPED)


def test_recipe_contents_match_their_promises():
    """Every value README's recipe table states (section "Recipes": | recipe | what |)."""
    # bit-hyperrule: SGD momentum 0.9, lr 0.003 per 512 images (scaled to the effective batch), no weight
    # decay, warmup then /10 at 40/60/80% of 500 steps (under 20k images) or 30/60/90% of 10k-20k steps,
    # zero head; steps, resolution and mixup chosen from the dataset size
    bit = load_recipe("bit-hyperrule")
    assert (bit.optimizer, bit.momentum, bit.lr, bit.lr_base_batch, bit.weight_decay, bit.head_init) == \
        ("momentum", 0.9, 0.003, 512, 0.0, "zero")
    assert (bit.sched, bit.decay_rate) == ("multistep", 0.1)
    assert bit.steps == bit.warmup_steps == bit.decay_milestones == bit.img_size == bit.mixup_alpha == "auto"
    for images, steps, milestones, mixup in [(1_000, 500, [0.4, 0.6, 0.8], 0.0),
                                             (19_999, 500, [0.4, 0.6, 0.8], 0.0),
                                             (20_000, 10_000, [0.3, 0.6, 0.9], 0.1),
                                             (600_000, 20_000, [0.3, 0.6, 0.9], 0.1)]:
        resolved, _ = resolve_recipe(bit, images, (32, 32))
        assert resolved.steps == steps, images
        assert 0 < resolved.warmup_steps < resolved.steps * milestones[0], images  # warmup, then the decays
        # one update later than the percentage, as big_transfer's get_lr (test below)
        assert resolved.decay_milestones == pytest.approx([m + 1 / steps for m in milestones]), images
        assert resolved.mixup_alpha == mixup, images
    assert resolve_recipe(bit, 1_000, (32, 32))[0].img_size != resolve_recipe(bit, 1_000, (300, 300))[0].img_size
    # micro-batch: batch 2 x 8 accumulated (effective 16), lr 0.01 per 32 images, cosine, label smoothing 0.1,
    # standardize once per step
    mb = load_recipe("micro-batch")
    assert (mb.batch_size, mb.accum_steps, mb.effective_batch) == (2, 8, 16)
    assert (mb.lr, mb.lr_base_batch, mb.sched, mb.label_smoothing, mb.standardize_once) == \
        (0.01, 32, "cosine", 0.1, True)
    # linear-probe: frozen backbone, zero-initialised head, lr 0.1 per 32 images
    probe = load_recipe("linear-probe")
    assert (probe.freeze_backbone, probe.head_init, probe.lr, probe.lr_base_batch) == (True, "zero", 0.1, 32)
    # cpu-quick: 64 px, 3 epochs, batch 16, cosine
    quick = load_recipe("cpu-quick")
    assert (quick.img_size, quick.epochs, quick.batch_size, quick.sched) == (64, 3, 16, "cosine")


@pytest.mark.parametrize("data, message", [
    ({"batchsize": 2}, "unknown key `batchsize`; did you mean `batch_size`"),
    ({"learning_rate": 0.1}, "unknown key `learning_rate`"),
    ({"lr": "fast"}, "`lr` must be float"),
    ({"batch_size": 2.5}, "`batch_size` must be int"),
    ({"ema": "yes"}, "`ema` must be bool"),
    ({"lr": -0.1}, "`lr` must be positive"),
    ({"batch_size": 0}, "`batch_size` must be positive"),
    ({"accum_steps": 0}, "`accum_steps` must be positive"),
    ({"weight_decay": -1}, "`weight_decay` must be zero or more"),
    ({"val_split": 1.0}, "`val_split` must be a fraction"),
    ({"sched": "linear"}, "`sched` must be 'cosine' or 'multistep'"),
    ({"aug_scale": [0.9, 0.1]}, "`aug_scale` must be"),
    ({"decay_milestones": [0.6, 0.3]}, "`decay_milestones` must be increasing"),
    ({"mixup_alpha": 0.2, "batch_size": 3}, "even `batch_size`"),
    ({"label_smoothing": 1.0}, "`label_smoothing` must be below 1"),
])
def test_invalid_recipes(data, message):
    with pytest.raises(RecipeError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Recipe.from_dict(data)


def test_yaml_file_errors(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("lr: 0.1\nmomentun: 0.9\n")
    with pytest.raises(RecipeError, match="did you mean `momentum`"):
        load_recipe(bad)
    bad.write_text("lr: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(InputNotFoundError, match="did you mean micro-batch"):
        load_recipe("micro-bach")


def test_overrides():
    assert parse_override("batch_size=2") == ("batch_size", 2)
    assert parse_override("aug_scale=[0.5, 1.0]") == ("aug_scale", [0.5, 1.0])
    assert parse_override("auto_augment=null") == ("auto_augment", None)
    assert parse_override("optimizer=adamw") == ("optimizer", "adamw")
    r = load_recipe("micro-batch", ["batch_size=4", "lr=1", "ema=true"])
    assert r.batch_size == 4 and r.lr == 1.0 and isinstance(r.lr, float) and r.ema is True
    assert r.accum_steps == load_recipe("micro-batch").accum_steps  # untouched keys stay
    with pytest.raises(RecipeError, match="did you mean `batch_size`"):
        load_recipe("micro-batch", ["batch=4"])
    with pytest.raises(RecipeError, match="key=value"):
        load_recipe(None, ["batch_size"])


@pytest.mark.parametrize("size, steps, warmup, milestones, mixup", [
    (1_000, 500, 100, [200, 300, 400], 0.0),
    (19_999, 500, 100, [200, 300, 400], 0.0),
    (20_000, 10_000, 500, [3000, 6000, 9000], 0.1),
    (499_999, 10_000, 500, [3000, 6000, 9000], 0.1),
    (1_281_167, 20_000, 500, [6000, 12_000, 18_000], 0.1),
])
def test_bit_hyperrule_schedule(size, steps, warmup, milestones, mixup):
    # the table in big_transfer's bit_hyperrule.py (get_schedule, get_mixup)
    rule = bit_hyperrule(size, (32, 32))
    assert rule["steps"] == steps and rule["warmup_steps"] == warmup and rule["mixup_alpha"] == mixup
    # the lr drops after m + 1 updates (big_transfer's get_lr decays once `s < step`)
    assert [round(m * steps) for m in rule["decay_milestones"]] == [m + 1 for m in milestones]


def big_transfer_get_lr(step: int, dataset_size: int, base_lr: float = 0.003) -> float | None:
    """big_transfer's bit_hyperrule.get_lr, transcribed (github.com/google-research/big_transfer):
    the lr of update ``step`` (0-based), None once training is over."""
    if dataset_size < 20_000:
        supports = [100, 200, 300, 400, 500]
    elif dataset_size < 500_000:
        supports = [500, 3000, 6000, 9000, 10_000]
    else:
        supports = [500, 6000, 12_000, 18_000, 20_000]
    if step < supports[0]:
        return base_lr * step / supports[0]
    if step >= supports[-1]:
        return None
    for s in supports[1:]:
        if s < step:
            base_lr /= 10
    return base_lr


@pytest.mark.parametrize("size", [5_000, 50_000])
def test_bit_hyperrule_lr_is_big_transfers_at_every_update(size):
    """The resolved recipe through train's scheduler gives, update by update, big_transfer's lr."""
    recipe, _ = resolve_recipe(load_recipe("bit-hyperrule"), size, (28, 28))
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=0.003)
    scheduler = lr_scheduler(optimizer, recipe, recipe.steps, recipe.warmup_steps)
    got = []
    for t in range(recipe.steps):  # train calls step_update(t) once t updates are done
        scheduler.step_update(t)
        got.append(optimizer.param_groups[0]["lr"])
    expected = [big_transfer_get_lr(t, size) for t in range(recipe.steps)]
    assert big_transfer_get_lr(recipe.steps, size) is None  # same length of run
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_bit_hyperrule_resolution_and_resolve():
    assert (bit_hyperrule(100, (28, 28))["resize"], bit_hyperrule(100, (28, 28))["crop"]) == (160, 128)
    assert (bit_hyperrule(100, (96, 96))["resize"], bit_hyperrule(100, (96, 96))["crop"]) == (512, 480)
    resolved, notes = resolve_recipe(load_recipe("bit-hyperrule"), 5000, (28, 28))
    assert resolved.steps == 500 and resolved.warmup_steps == 100 and resolved.img_size == 128
    assert resolved.decay_milestones == [0.402, 0.602, 0.802] and resolved.mixup_alpha == 0.0
    assert resolved.aug_scale == [0.64, 1.0]  # a 128 crop of a 160 resize keeps (128/160)^2 of the area
    assert len(notes) == 6  # steps, warmup, milestones, mixup, img_size, aug_scale
    plain, none = resolve_recipe(load_recipe("cpu-quick"), 5000, (28, 28))
    assert plain == load_recipe("cpu-quick") and none == []


def test_wheel_ships_recipes_and_the_cli_inside_the_package(tmp_path):
    """A wheel (not only this checkout) finds the recipes by name, and installs no bare `cli`."""
    import shutil
    import subprocess
    import sys
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    # built from a copy: building in the checkout writes build/ and *.egg-info there, shared by
    # concurrent runs, and a stale build/lib could end up in the wheel
    src = tmp_path / "src"
    shutil.copytree(root, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "runs", "photos", "results", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("wsurgery-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(tmp_path / "site")
    shipped = {Path(n).stem for n in names if n.startswith("wsurgery/_recipes/") and n.endswith(".yaml")}
    assert shipped == {p.stem for p in (root / "recipes").glob("*.yaml")} and shipped
    assert "wsurgery/cli/main.py" in names
    assert not any(n.split("/")[0] in ("cli", "recipes", "tests", "benchmarks") for n in names)
    # the installed copy resolves RECIPE_DIR to its own _recipes folder
    code = "import wsurgery.recipes as r; print(r.RECIPE_DIR); print(r.load_recipe('micro-batch').batch_size)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}).stdout.split()
    assert Path(out[0]) == tmp_path / "site" / "wsurgery" / "_recipes"
    assert int(out[1]) >= 1


def test_epochs_under_a_recipe_counted_in_steps_is_refused_not_ignored():
    """--set epochs=1 with bit-hyperrule (steps=auto) ran its 500 steps without a word."""
    from wsurgery.errors import RecipeError

    with pytest.raises(RecipeError, match=r"`epochs` is ignored by recipe bit-hyperrule, which counts the run in "
                                          r"steps \(steps=auto\); set steps instead"):
        load_recipe("bit-hyperrule", ["epochs=1"])
    with pytest.raises(RecipeError, match="counts the run in steps"):
        load_recipe("bit-hyperrule", {"epochs": 1})
    assert load_recipe("bit-hyperrule", ["epochs=1", "steps=null"]).epochs == 1  # the fix the message names
    assert load_recipe("bit-hyperrule", ["steps=20"]).steps == 20
    assert load_recipe("micro-batch", ["epochs=1"]).epochs == 1  # counted in epochs: as before


@pytest.mark.parametrize("data, message", [
    ({"decay_rate": -1.0}, "`decay_rate` must be a fraction in (0, 1]"),
    ({"decay_rate": 0.0}, "`decay_rate` must be a fraction in (0, 1]"),
    ({"decay_rate": 5.0}, "`decay_rate` must be a fraction in (0, 1]"),
    ({"momentum": 1.5}, "`momentum` must be a fraction in [0, 1)"),
    ({"seed": -1}, "`seed` must be zero or more"),
    ({"warmup_lr": 0.5, "lr": 0.1}, "`warmup_lr` (0.5) must not exceed the peak learning rate (0.1)"),
    ({"layer_decay": 0.7}, "layer-wise lr decay is not offered"),
    ({"drop_path_rate": 0.1}, "pass drop_path_rate to the model when it is created"),
    ({"nesterov": True}, "did you mean `optimizer`"),
    ({"betas": [0.9, 0.99]}, "did you mean `momentum`"),
    ({"ema_dekay": 0.99}, "did you mean `ema_decay`"),
])
def test_values_and_keys_from_a_review_of_timm_semantics(data, message):
    """decay_rate -1 made every other phase climb the loss; unknown keys were matched to unrelated ones
    (layer_decay -> ema_decay, drop_path_rate -> decay_rate, nesterov/eps -> steps, betas -> ema)."""
    with pytest.raises(RecipeError, match=re.escape(message)):
        Recipe.from_dict(data)
    assert Recipe.from_dict({"decay_rate": 1.0}).decay_rate == 1.0


def test_bit_hyperrule_under_several_processes_says_how_to_keep_its_batch():
    from wsurgery.train import _world_notes

    bit = load_recipe("bit-hyperrule")
    resolved = resolve_recipe(bit, 1_000, (32, 32))[0]
    assert _world_notes(bit, resolved, 1) == []
    (note,) = _world_notes(bit, resolved, 4)
    assert "each step takes 2048 (4 x 512)" in note and "--set accum_steps=2 keeps 512" in note
    (note,) = _world_notes(bit, resolved, 3)  # 8 accumulation steps do not divide by 3
    assert "set batch_size x accum_steps x 3 processes to the 512" in note
    assert _world_notes(load_recipe("micro-batch"), load_recipe("micro-batch"), 4) == []  # steps not by the rule
