"""Training loop: outputs, learning, exact resume, Ctrl-C/SIGTERM, NaN stop, accumulation, probe, export, CLI."""

from __future__ import annotations

import csv
import math
import os
import signal

import pytest
import timm
import torch
from _data import CLASSES, make_train_val
from typer.testing import CliRunner
from wsurgery.cli.main import app

import wsurgery
from wsurgery.io import load_safetensors, read_json
from wsurgery.train import TrainingDivergedError, TrainingInterrupted, train

FAST = ["img_size=32", "batch_size=4", "epochs=2", "lr=0.01", "warmup_steps=2", "workers=0", "label_smoothing=0",
        "aug_scale=[0.8, 1.0]"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("data"))


def tiny(mode: str | None = "aws"):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    if mode is not None:
        model, _ = wsurgery.convert(model, mode=mode, norm="gn")
    return model


def test_train_writes_a_loadable_run_and_learns(data, tmp_path):
    out = tmp_path / "run"
    events = []
    # AdamW: with the recipe's SGD at lr 0.01 this tiny model's loss wandered around chance for 4 epochs, and
    # whether epoch 4 ended below epoch 1 depended on the thread count (1.1203 vs 1.1064 on one thread).
    # Measured with AdamW over seeds 0-2 on 1 and 2 threads: the last epoch's train loss 0.63-0.92, the best
    # val loss 0.45-0.98, the best top-1 67-100%
    result = train(tiny(), data, out, "cpu-quick", overrides=FAST + ["epochs=4", "optimizer=adamw", "lr=0.003"],
                   callback=events.append)
    assert [h["epoch"] for h in result.history] == [1, 2, 3, 4]
    # the head starts at zero, so the first batch's loss is chance, ln(3); without updates every loss would be
    chance = math.log(len(CLASSES))
    first_step = next(e for e in events if e.kind == "step")
    torch.testing.assert_close(first_step.loss, chance, rtol=1e-6, atol=1e-6)
    assert result.history[-1]["train_loss"] < chance - 0.1
    assert min(h["val_loss"] for h in result.history) < chance - 0.1  # on held-out images too
    assert max(h["top1"] for h in result.history) > 100 / len(CLASSES) + 20  # clearly above chance (33%)
    for name in ("config.json", "model.safetensors", "metrics.csv", "metrics.png", "recipe.yaml", "train.json",
                 "last/model.safetensors", "last/train_state.json", "last/train_state.safetensors"):
        assert (out / name).is_file(), name
    assert (out / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4] and {"top1", "top5", "val_loss", "lr"} <= set(rows[0])
    # the run directory is a surgery directory holding the best epoch, with the class names
    best = max(result.history, key=lambda h: h["top1"])
    loaded = wsurgery.load(out)
    assert wsurgery.is_converted(loaded)
    assert loaded.pretrained_cfg["label_names"] == sorted(CLASSES)
    assert read_json(out / "config.json")["label_names"] == sorted(CLASSES)
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32)
    from wsurgery.datasets import build_datasets, eval_transform_for
    from wsurgery.train import evaluate

    val = build_datasets(data).val
    val.transform = eval_transform_for(loaded, 32)
    assert evaluate(loaded, val)["top1"] == pytest.approx(best["top1"], abs=1e-4)
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("epoch") == 4
    steps = [e for e in events if e.kind == "step"]
    assert [e.step for e in steps] == list(range(1, result.steps + 1))
    assert all(e.images_per_s > 0 and e.lr >= 0 for e in steps)


def _weights(path):
    return load_safetensors(path / "model.safetensors")


RESUME = FAST + ["accum_steps=2", "batch_size=2", "mixup_alpha=0.4", "label_smoothing=0.1", "ema=true",
                 "ema_decay=0.9"]


def test_resume_after_sigterm_is_exact(data, tmp_path):
    full = train(tiny(), data, tmp_path / "full", "micro-batch", overrides=RESUME)

    def stop_at_step(event):
        if event.kind == "step" and event.step == 9:  # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(tiny(), data, tmp_path / "cut", "micro-batch", overrides=RESUME, callback=stop_at_step)
    state = read_json(tmp_path / "cut" / "last" / "train_state.json")["state"]
    assert state["step"] == 9 and state["epoch"] == 1 and state["batch"] > 0
    resumed = train(None, None, None, resume=tmp_path / "cut")
    assert resumed.steps == full.steps
    a, b = _weights(tmp_path / "full" / "last"), _weights(tmp_path / "cut" / "last")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the EMA weights and the best model are the same too
    sa = load_safetensors(tmp_path / "full" / "last" / "train_state.safetensors")
    sb = load_safetensors(tmp_path / "cut" / "last" / "train_state.safetensors")
    assert all(torch.equal(sa[k], sb[k]) for k in sa if k.startswith("ema."))
    assert [h["top1"] for h in full.history] == [h["top1"] for h in resumed.history]


# resumed into itself; and with --force into the same directory spelled differently, which must
# not delete the checkpoint it resumes from
@pytest.mark.parametrize("output,force", [(None, False), ("x/../r", True)], ids=["itself", "other-spelling-force"])
def test_keyboard_interrupt_writes_checkpoint_then_resume_completes(data, tmp_path, output, force):
    def ctrl_c(event):
        if event.kind == "step" and event.step == 3:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train(tiny(), data, tmp_path / "r", "cpu-quick", overrides=FAST, callback=ctrl_c)
    assert read_json(tmp_path / "r" / "last" / "train_state.json")["state"]["step"] == 3
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=FAST)
    (tmp_path / "x").mkdir()
    train(None, None, tmp_path / output if output else None, resume=tmp_path / "r", force=force)
    a, b = _weights(tmp_path / "full" / "last"), _weights(tmp_path / "r" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data, tmp_path):
    model = tiny()

    def poison(event):  # after epoch 1 is checkpointed, break the weights
        if event.kind == "epoch" and event.epoch == 1:
            with torch.no_grad():
                model.get_classifier().weight.fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"loss became nan.*kept the last good checkpoint \(epoch 1\)"):
        train(model, data, tmp_path / "r", "cpu-quick", overrides=FAST, callback=poison)
    kept = _weights(tmp_path / "r" / "last")
    assert all(torch.isfinite(v).all() for v in kept.values())
    assert read_json(tmp_path / "r" / "last" / "train_state.json")["state"]["epoch"] == 1


def test_gradient_accumulation_equals_the_large_batch(data, tmp_path):
    # WS + GN does not depend on the batch: 2 micro-batches of 2 give the gradient of one batch of 4
    # (two steps: a randomly initialised net amplifies float32 rounding over many steps)
    common = ["img_size=32", "steps=2", "lr=0.01", "warmup_steps=0", "momentum=0.0", "label_smoothing=0.1"]
    big = train(tiny(), data, None, "cpu-quick", overrides=common + ["batch_size=4", "accum_steps=1"])
    small = train(tiny(), data, None, "cpu-quick", overrides=common + ["batch_size=2", "accum_steps=2"])
    untrained = tiny()
    assert big.steps == small.steps == 2
    moved = [k for k, v in big.model.state_dict().items()
             if k in untrained.state_dict() and not torch.equal(v, untrained.state_dict()[k])]
    assert len(moved) > 10  # the comparison is not between two untouched models
    for (k, a), (_, b) in zip(big.model.state_dict().items(), small.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_linear_probe_trains_only_the_head(data, tmp_path):
    model = tiny("ws")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, None, "linear-probe", overrides=FAST)
    head = {f"classifier.{n}" for n, _ in model.get_classifier().named_parameters()}
    after = result.model.state_dict()
    for k, v in before.items():
        if k in head:
            assert not torch.equal(v, after[k]), k
        elif v.is_floating_point():
            assert torch.equal(v, after[k]), k


def test_linear_probe_keeps_batchnorm_statistics_frozen(data, tmp_path):
    """README: the probe's backbone is frozen and kept in eval mode, so BatchNorm running statistics do not move."""
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    model, _ = wsurgery.convert(model, mode="ws")  # BatchNorm kept
    bns = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert len(bns) > 5
    modes = []
    for m in bns.values():
        m.register_forward_pre_hook(lambda m, args: modes.append(m.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(model, data, None, "linear-probe", overrides=FAST)
    assert result.steps > 0 and modes  # BN ran in every training step (and in evaluation)
    assert not any(modes)  # eval mode throughout: train mode would update the statistics
    after = result.model.state_dict()
    head = {f"classifier.{n}" for n, _ in model.get_classifier().named_parameters()}
    stats = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(stats) == 3 * len(bns)
    for k, v in before.items():
        if k in head:
            assert not torch.equal(v, after[k]), k
        else:  # weights, affines and statistics (num_batches_tracked included) all as they were
            assert torch.equal(v, after[k]), k


def test_bn_baseline_from_timm_name_and_export_predict(data, tmp_path):
    out, exp = tmp_path / "bn", tmp_path / "exp"
    result = train("test_efficientnet", data, out, "cpu-quick", overrides=FAST, export=exp,
                   load_kwargs={"pretrained": False})
    assert any("no WS layers" in n for n in result.notes)
    assert result.verify.passed and result.export.timm_compatible
    preds = wsurgery.predict(exp, data / "val" / "circle", topk=2)
    assert len(preds) == 4 and all(set(p.labels) <= set(CLASSES) and len(p.labels) == 2 for p in preds)


def test_output_exists_and_bad_resume(data, tmp_path):
    (tmp_path / "r").mkdir()
    with pytest.raises(wsurgery.errors.OutputExistsError, match="--force"):
        train(tiny(), data, tmp_path / "r", "cpu-quick", overrides=FAST)
    with pytest.raises(wsurgery.errors.InputNotFoundError, match="no checkpoint"):
        train(None, None, None, resume=tmp_path / "r")


def test_cli_train_predict_and_errors(data, tmp_path):
    surgery = tmp_path / "conv"
    wsurgery.save(tiny(), surgery)
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(surgery), "--data", str(data), "-o", str(tmp_path / "run"),
                              "--recipe", "cpu-quick", "--set", "epochs=1", "--set", "batch_size=4",
                              "--img-size", "32", "--export", str(tmp_path / "exp")])
    assert res.exit_code == 0, res.output
    assert "best val top-1" in res.output and "export max |diff|" in res.output
    res = runner.invoke(app, ["predict", str(tmp_path / "exp"), str(data / "val" / "square"), "-k", "3"])
    assert res.exit_code == 0, res.output
    assert "square" in res.output and "%" in res.output
    res = runner.invoke(app, ["train", str(surgery), "--data", str(data), "-o", str(tmp_path / "x"),
                              "--set", "batchsize=2"])
    assert res.exit_code == 2 and "did you mean `batch_size`" in res.output
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["train", str(surgery), "--data", str(tmp_path / "nothing"), "-o", str(tmp_path / "y")])
    assert res.exit_code == 1 and "does not exist" in res.output


def test_gradient_clipping_bounds_the_update(data):
    # one SGD step without momentum: the update is lr x the clipped gradient, whose total norm is clip_grad
    model = tiny()
    result = train(model, data, None, "cpu-quick",
                   overrides=["img_size=32", "batch_size=4", "steps=1", "lr=0.01", "warmup_steps=0", "momentum=0.0",
                              "clip_grad=0.001", "head_init=default"])
    fresh = tiny()
    from wsurgery.train import set_num_classes

    torch.manual_seed(0)
    set_num_classes(fresh, sorted(CLASSES), "default")  # the same new head train() made (same seed)
    before, after = fresh.state_dict(), result.model.state_dict()
    delta = torch.sqrt(sum(((after[k] - before[k]).double() ** 2).sum() for k in after))
    torch.testing.assert_close(delta.item(), 0.01 * 0.001, rtol=1e-3, atol=0.0)


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_amp_autocasts_the_convs_keeps_fp32_weights_and_learns(data, tmp_path, amp, dtype):
    """AMP on the CPU runs the same code path as on CUDA (autocast; GradScaler for fp16)."""
    model = tiny()
    seen: set[torch.dtype] = set()
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda _m, _a, out: seen.add(out.dtype))
    result = train(model, data, tmp_path / "run", "cpu-quick", overrides=FAST + ["epochs=3", f"amp={amp}"])
    assert dtype in seen  # the convs really ran in reduced precision
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
    state = read_json(tmp_path / "run" / "last" / "train_state.json")
    assert (state["scaler"] is not None) == (amp == "fp16")  # fp16 scales the loss, bf16 does not
    assert not any("amp" in n for n in result.notes)


def test_worker_processes_do_not_change_the_result(data, monkeypatch):
    # every image's augmentation has its own seed (SeededView), so DataLoader workers give the same run.
    # Over three epochs with validation: the workers persist (started once per loader, as timm's; starting
    # them again each epoch costs seconds where they are spawned) and learn each epoch from the sampler
    from torch.utils.data import dataloader

    started = []
    real_init = dataloader._MultiProcessingDataLoaderIter.__init__

    def counting(self, loader):
        started.append(loader.dataset)
        real_init(self, loader)

    monkeypatch.setattr(dataloader._MultiProcessingDataLoaderIter, "__init__", counting)
    common = ["img_size=32", "batch_size=4", "epochs=3", "lr=0.01", "warmup_steps=0"]
    a = train(tiny(), data, None, "cpu-quick", overrides=common + ["workers=2"])
    assert len(started) == 2 and len(a.history) == 3  # the training loader's workers and the validation loader's
    b = train(tiny(), data, None, "cpu-quick", overrides=common + ["workers=0"])
    for (k, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), k
    assert [h["top1"] for h in a.history] == [h["top1"] for h in b.history]


def test_a_failing_setup_leaves_an_existing_run_alone(data, tmp_path):
    # everything (model, data, optimizer, scheduler) is built before --force replaces the old run
    out = tmp_path / "run"
    train(tiny(), data, out, "cpu-quick", overrides=FAST + ["epochs=1"])
    before = {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    with pytest.raises(wsurgery.errors.RecipeError, match="adamw2"):
        train(tiny(), data, out, "cpu-quick", overrides=FAST + ["optimizer=adamw2"], force=True)
    assert {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
    fresh = tmp_path / "fresh"  # and without an old run, the failure leaves no empty folder behind
    with pytest.raises(wsurgery.errors.RecipeError, match="adamw2"):
        train(tiny(), data, fresh, "cpu-quick", overrides=FAST + ["optimizer=adamw2"])
    assert not fresh.exists()


def test_scientific_notation_in_recipes(tmp_path):
    from wsurgery.recipes import Recipe, load_recipe

    recipe = load_recipe("cpu-quick", ["lr=1e-4", "weight_decay=5E-5"])
    assert recipe.lr == 1e-4 and isinstance(recipe.lr, float) and recipe.weight_decay == 5e-5
    assert load_recipe("cpu-quick", ["aug_scale=[5e-1, 1]"]).aug_scale == [0.5, 1]  # inside lists too
    path = tmp_path / "r.yaml"
    path.write_text("lr: 3e-4\nmomentum: 0.9\n")  # PyYAML reads 3e-4 as the string '3e-4'
    assert load_recipe(path).lr == 3e-4
    with pytest.raises(wsurgery.errors.RecipeError, match="`lr` must be float, got 'fast'"):
        load_recipe("cpu-quick", ["lr=fast"])
    with pytest.raises(wsurgery.errors.RecipeError, match="unknown key `learning_rate`; did you mean `lr`"):
        Recipe.from_dict({"learning_rate": 0.1})


def test_training_in_memory_returns_the_best_epoch_not_the_last(data, tmp_path):
    # a learning rate this high keeps validation top-1 at chance, so epoch 1 stays the best of 3
    settings = FAST + ["epochs=3", "lr=0.3"]
    on_disk = train(tiny(), data, tmp_path / "run", "cpu-quick", overrides=settings)
    assert on_disk.best["epoch"] == 1
    best = load_safetensors(tmp_path / "run" / "model.safetensors")
    last = load_safetensors(tmp_path / "run" / "last" / "model.safetensors")
    assert any(not torch.equal(best[k], last[k]) for k in best)
    in_memory = train(tiny(), data, None, "cpu-quick", overrides=settings)
    assert in_memory.best == on_disk.best
    state = in_memory.model.state_dict()
    for k in best:
        assert torch.equal(state[k], best[k]), k


def test_evaluate_counts_whole_images():
    """timm's accuracy is a float32 percentage per batch; summed back into counts it gave 63.99999969
    for 16 of 25 (train.json, --json). The counts are whole, so top-1 is exactly 100 * 16 / 25."""
    from wsurgery.train import evaluate

    y = torch.arange(25) % 10
    logits = torch.zeros(25, 10)
    right = torch.arange(25) < 16
    logits[right, y[right]] = 5.0  # the first 16 right
    logits[~right, (y[~right] + 1) % 10] = 5.0  # the other 9 wrong, their label last (out of the top 5 too)
    logits[~right, y[~right]] = -5.0
    in_top5 = (logits.topk(5, 1).indices == y[:, None]).any(1)

    class Lookup(torch.nn.Module):  # a model that returns the logits of the image index it is given
        num_classes = 10

        def forward(self, x):
            return logits[x[:, 0].long()]

    data = torch.utils.data.TensorDataset(torch.arange(25.0)[:, None], y)
    metrics = evaluate(Lookup(), data, batch_size=7)
    assert int((logits.argmax(1) == y).sum()) == 16
    assert metrics["top1"] == 100 * 16 / 25 and metrics["top5"] == 100 * int(in_top5.sum()) / 25


def test_deterministic_training_does_not_fill_new_tensors_with_nan(data):
    """torch.use_deterministic_algorithms also fills every new tensor with NaN, 13-15% of a lite0 step on
    CPU; train turns that fill off for the run (the weights are the same: every tensor is written before it
    is read) and restores both settings afterwards."""
    from torch.utils import deterministic

    seen = []
    before = (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)
    result = train(tiny(), data, None, "cpu-quick", callback=lambda e: seen.append(
        (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory)),
        overrides=["img_size=32", "batch_size=4", "steps=2", "deterministic=true"])
    assert result.steps == 2 and set(seen) == {(True, False)}
    assert (torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory) == before
