"""What train() does to the numbers: lr schedule, weight decay groups, EMA, head init, reported top-1.

Every expected value is computed here, independently of the library: the schedules in closed form,
the SGD update by hand, the EMA recursion step by step, the validation logits from the images read
with timm's own eval transform.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from _data import CLASSES, make_folder, make_train_val
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import wsurgery
from wsurgery.io import load_safetensors
from wsurgery.train import set_num_classes, train

IMG = 16
NAMES = sorted(CLASSES)  # ImageFolder order: class index = position in the sorted folder names


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 training images (4 per class), 6 validation images."""
    return make_train_val(tmp_path_factory.mktemp("data"), 4, 2)


def tiny(mode: str | None = "aws", num_classes: int = len(CLASSES)):
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    if mode is not None:
        model, _ = wsurgery.convert(model, mode=mode, norm="gn")
    return model


@contextmanager
def optimizer_steps():
    """Yields a list that receives, for every optimizer.step() in the process, the optimizer's
    param_groups as they are when the step runs (lr, weight_decay, params)."""
    seen: list[list[dict]] = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append([dict(g.items()) for g in opt.param_groups]))
    try:
        yield seen
    finally:
        handle.remove()


def val_batch(root: Path, classes: list[str], size: int, model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of root/val read with PIL and timm's eval transform for ``model`` at ``size``."""
    cfg = resolve_data_config({"input_size": (3, size, size)}, model=model)
    transform = create_transform(**cfg, is_training=False)
    xs, ys = [], []
    for label, name in enumerate(classes):
        for path in sorted((root / "val" / name).glob("*.png")):
            with Image.open(path) as img:
                xs.append(transform(img.convert("RGB")))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


# --- 1. learning-rate schedule -----------------------------------------------------------------


def closed_form_lr(t: int, *, sched: str, peak: float, warmup: int, warmup_lr: float, total: int,
                   min_lr: float = 0.0, rate: float = 0.1, milestones: tuple[int, ...] = (),
                   period: int | None = None) -> float:
    """The lr of the optimizer update that follows ``t`` completed updates (t = 0, 1, ...):
    linear warmup from warmup_lr to the peak over ``warmup`` updates, then the schedule, whose
    clock counts from the start of the run (warmup included)."""
    if t < warmup:
        return warmup_lr + (peak - warmup_lr) * t / warmup
    if sched == "cosine":
        return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * t / total))
    if sched == "multistep":
        return peak * rate ** sum(t >= m for m in milestones)
    if sched == "step":
        return peak * rate ** (t // period)
    assert sched == "constant"
    return peak


# 12 training images. Each case: recipe overrides, the closed form's arguments, and the updates whose
# lr is not checked (none at present).
LR_CASES = {
    # batch 2: 6 updates per epoch, 12 steps = 2 epochs; weight_decay > 0 makes two param groups
    "cosine": (["sched=cosine", "batch_size=2", "steps=12", "lr=0.1", "warmup_steps=3", "warmup_lr=0.01",
                "min_lr=0.002", "weight_decay=0.0001"],
               {"sched": "cosine", "peak": 0.1, "warmup": 3, "warmup_lr": 0.01, "total": 12, "min_lr": 0.002},
               set()),
    # lr 0.4 per 16 images, effective batch 2 x 2 = 4 images per update: peak 0.4 x 4 / 16 = 0.1;
    # milestones 0.5 and 0.75 of 12 updates: x0.5 after 6 updates, again after 9
    "multistep+lr_base_batch": (
        ["sched=multistep", "batch_size=2", "accum_steps=2", "steps=12", "lr=0.4", "lr_base_batch=16",
         "warmup_steps=2", "warmup_lr=0.0", "decay_milestones=[0.5, 0.75]", "decay_rate=0.5"],
        {"sched": "multistep", "peak": 0.1, "warmup": 2, "warmup_lr": 0.0, "total": 12, "rate": 0.5,
         "milestones": (6, 9)},
        # timm's MultiStepLRScheduler alone would lower the lr one update early (at t = 5 and 8); train
        # shifts its milestones so they apply after 6 and 9 updates, as sched=step and BiT-HyperRule do
        set()),
    # step: lr x decay_rate every decay_milestones[0] x total updates (0.25 x 12 = every 3 updates)
    "step": (["sched=step", "batch_size=4", "steps=12", "lr=0.1", "warmup_steps=2", "warmup_lr=0.02",
              "decay_milestones=[0.25]", "decay_rate=0.5"],
             {"sched": "step", "peak": 0.1, "warmup": 2, "warmup_lr": 0.02, "total": 12, "rate": 0.5, "period": 3},
             set()),
    "constant": (["sched=constant", "batch_size=4", "steps=9", "lr=0.1", "warmup_steps=4", "warmup_lr=0.0"],
                 {"sched": "constant", "peak": 0.1, "warmup": 4, "warmup_lr": 0.0, "total": 9}, set()),
}


@pytest.mark.parametrize("case", list(LR_CASES))
def test_optimizer_lr_follows_the_closed_form_schedule(data, case):
    overrides, form, unchecked = LR_CASES[case]
    with optimizer_steps() as steps:
        result = train(tiny(), data, None, None, device="cpu",
                       overrides=[f"img_size={IMG}", "momentum=0.9", "head_init=default"] + overrides)
    assert result.steps == form["total"] == len(steps)
    used, expected = [], []
    for t, groups in enumerate(steps):
        assert len({g["lr"] for g in groups}) == 1, f"param groups disagree on the lr at update {t}"
        if t not in unchecked:
            used.append(groups[0]["lr"])
            expected.append(closed_form_lr(t, **form))
    if case == "cosine":
        assert len(steps[0]) == 2  # decayed and not-decayed groups: both follow the schedule
    torch.testing.assert_close(torch.tensor(used, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


# --- 2. weight decay -----------------------------------------------------------------------------


def test_weight_decay_applies_to_conv_and_linear_weights_only(data):
    """One SGD update without momentum: p <- p - lr (grad + wd p) for conv/linear weights, p - lr grad
    for every 1-D parameter (biases, GroupNorm affines, AWS gain/shift)."""
    lr, wd = 0.1, 0.5
    model = tiny("aws")
    with torch.no_grad():  # 1-D parameters away from 0 (a zero bias would hide decay)
        for p in model.parameters():
            if p.ndim <= 1:
                p.uniform_(0.5, 1.5)
    names: dict[int, str] = {}
    before: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    after: dict[str, torch.Tensor] = {}

    def pre(opt, args, kwargs):
        names.update({id(p): n for n, p in model.named_parameters()})  # the head is new by now
        for g in opt.param_groups:
            for p in g["params"]:
                before[names[id(p)]] = (p.detach().clone(), None if p.grad is None else p.grad.detach().clone())

    def post(opt, args, kwargs):
        after.update({n: p.detach().clone() for n, p in model.named_parameters()})

    h1, h2 = register_optimizer_step_pre_hook(pre), register_optimizer_step_post_hook(post)
    try:
        train(model, data, None, None, device="cpu",
              overrides=[f"img_size={IMG}", "batch_size=4", "steps=1", f"lr={lr}", f"weight_decay={wd}",
                         "optimizer=momentum", "momentum=0.0", "warmup_steps=0", "head_init=default"])
    finally:
        h1.remove()
        h2.remove()
    params = dict(model.named_parameters())
    assert set(before) == set(params)  # every parameter is in the optimizer
    kinds = {"gain": 0, "shift": 0, "bias": 0, "norm affine": 0, "conv weight": 0, "linear weight": 0}
    for name, p in params.items():
        old, grad = before[name]
        assert grad is not None, name
        decays = p.ndim > 1
        expected = old - lr * (grad + (wd * old if decays else 0.0))
        torch.testing.assert_close(after[name], expected, msg=name)
        # the test can tell the two apart: the decay term is far above assert_close's tolerance (1e-5)
        assert (lr * wd * old).abs().max() > 1e-4, name
        kind = ("gain" if name.endswith(".gain") else "shift" if name.endswith(".shift")
                else "bias" if name.endswith(".bias") and not name.startswith("bn") and ".bn" not in name
                else "norm affine" if p.ndim == 1
                else "linear weight" if p.ndim == 2 else "conv weight")
        kinds[kind] += 1
    assert all(kinds.values()), kinds  # every kind of parameter was checked


# --- 3. EMA --------------------------------------------------------------------------------------


def model_with(state: dict[str, torch.Tensor]) -> torch.nn.Module:
    m = tiny("aws")
    set_num_classes(m, NAMES)
    m.load_state_dict(state)
    return m.eval()


@torch.no_grad()
def val_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.eval()(x), y)


def test_ema_is_what_is_evaluated_checkpointed_and_returned(data, tmp_path):
    decay = 0.6
    out = tmp_path / "run"
    model = tiny("aws")
    ema: dict[str, torch.Tensor] = {}
    per_epoch: list[dict] = []

    def snapshot():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def on_event(e):
        if e.kind == "step":
            if e.step == 1:  # timm's ModelEmaV3, given step numbers, starts from the weights after update 1
                ema.update(snapshot())
            else:  # then ema <- decay x ema + (1 - decay) x weights, after every update
                for k, w in snapshot().items():
                    ema[k] = decay * ema[k] + (1 - decay) * w if w.is_floating_point() else w
        elif e.kind == "epoch":
            state = load_safetensors(out / "last" / "train_state.safetensors")
            per_epoch.append({"ema": {k: v.clone() for k, v in ema.items()}, "raw": snapshot(),
                              "saved_ema": {k[4:]: v for k, v in state.items() if k.startswith("ema.")},
                              "saved_raw": load_safetensors(out / "last" / "model.safetensors"),
                              "metrics": dict(e.metrics)})

    result = train(model, data, out, None, device="cpu", callback=on_event,
                   overrides=[f"img_size={IMG}", "batch_size=4", "epochs=2", "lr=0.05", "warmup_steps=0",
                              "ema=true", f"ema_decay={decay}", "head_init=default"])
    assert len(per_epoch) == 2
    x, y = val_batch(data, NAMES, IMG, model)
    for rec in per_epoch:
        assert rec["saved_ema"].keys() == rec["ema"].keys()
        for k, v in rec["ema"].items():
            torch.testing.assert_close(rec["saved_ema"][k], v, msg=k)  # the checkpoint's EMA is the EMA
            torch.testing.assert_close(rec["saved_raw"][k], rec["raw"][k], msg=k)  # and last/ holds the raw weights
        # the EMA really differs from the raw weights
        assert (rec["ema"]["classifier.weight"] - rec["raw"]["classifier.weight"]).abs().max() > 1e-3
        # the reported val loss is the EMA model's, not the raw model's
        ema_loss = val_loss(model_with(rec["ema"]), x, y)
        raw_loss = val_loss(model_with(rec["raw"]), x, y)
        torch.testing.assert_close(torch.tensor(rec["metrics"]["val_loss"]), ema_loss, rtol=1e-5, atol=1e-5)
        assert abs(ema_loss.item() - raw_loss.item()) > 1e-3
    # the best model (OUT/model.safetensors, and the returned model) is the EMA of the best epoch
    best = per_epoch[result.best["epoch"] - 1]["ema"]
    saved_best = load_safetensors(out / "model.safetensors")
    returned = result.model.state_dict()
    assert saved_best.keys() == returned.keys() == best.keys()
    for k, v in best.items():
        torch.testing.assert_close(saved_best[k], v, msg=k)
        torch.testing.assert_close(returned[k], v, msg=k)


# --- 4. head_init --------------------------------------------------------------------------------


def _head_at_start(model, data, overrides):
    """The classifier's parameters when training starts (before the first update), and the backbone's."""
    seen = {}

    def on_event(e):
        if e.kind == "start":
            seen["head"] = {n: p.detach().clone() for n, p in model.get_classifier().named_parameters()}
            seen["shape"] = tuple(model.get_classifier().weight.shape)

    train(model, data, None, None, device="cpu", callback=on_event,
          overrides=[f"img_size={IMG}", "batch_size=4", "steps=1"] + overrides)
    return seen


def test_new_head_starts_at_zero_by_default(data):
    model = tiny("aws", num_classes=5)  # another number of classes: the head is replaced
    backbone = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    with torch.no_grad():
        model.get_classifier().weight.normal_()
    seen = {}

    def on_event(e):
        if e.kind == "start":
            seen["head"] = {n: p.detach().clone() for n, p in model.get_classifier().named_parameters()}
            seen["backbone"] = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}

    train(model, data, None, None, device="cpu", callback=on_event,
          overrides=[f"img_size={IMG}", "batch_size=4", "steps=1"])
    assert seen["head"]["weight"].shape == (len(CLASSES), model.num_features)
    assert seen["head"]["bias"].shape == (len(CLASSES),)
    assert all(torch.count_nonzero(v) == 0 for v in seen["head"].values())
    assert seen["backbone"].keys() == backbone.keys()
    assert all(torch.equal(seen["backbone"][k], v) for k, v in backbone.items())  # only the head changed


def test_head_init_default_is_timms_random_init_under_the_run_seed(data):
    seed = 3
    seen = _head_at_start(tiny("aws"), data, ["head_init=default", f"seed={seed}"])
    reference = tiny("aws")
    torch.manual_seed(seed)
    reference.reset_classifier(len(CLASSES))  # timm's own new classifier, same seed
    ref = dict(reference.get_classifier().named_parameters())
    assert seen["head"].keys() == ref.keys()
    for n, v in seen["head"].items():
        assert torch.count_nonzero(v) == v.numel(), n
        torch.testing.assert_close(v, ref[n].detach(), rtol=0, atol=0, msg=n)
    # a plain nn.Linear init: uniform in +-1/sqrt(fan_in)
    assert seen["head"]["weight"].abs().max() <= 1 / math.sqrt(seen["shape"][1])


@pytest.mark.parametrize("head_init", ["zero", "default"])
def test_a_head_for_the_same_labels_is_kept(data, head_init):
    model = tiny("aws")
    set_num_classes(model, NAMES)  # the model already classifies exactly these labels
    with torch.no_grad():
        for p in model.get_classifier().parameters():
            p.normal_()
    kept = {n: p.detach().clone() for n, p in model.get_classifier().named_parameters()}
    assert set_num_classes(model, NAMES, head_init) is False
    seen = _head_at_start(model, data, [f"head_init={head_init}"])
    for n, v in kept.items():
        assert torch.equal(seen["head"][n], v), n


# --- 5. reported top-1 ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data7(tmp_path_factory):
    """7 classes (so that top-5 is not trivially 100%), 2 training and 2 validation images each."""
    classes = ("circle", "square", "stripes", "s2", "s3", "s4", "s5")
    root = tmp_path_factory.mktemp("data7")
    make_folder(root, per_class=2, split="train", classes=classes)
    make_folder(root, per_class=2, split="val", seed=1, classes=classes)
    return root, sorted(classes)


def test_reported_top1_top5_and_loss_match_a_hand_computation(data7):
    root, classes = data7
    model = tiny(None)  # a BatchNorm baseline: evaluating in train mode would change the numbers
    hand: list[dict[str, torch.Tensor]] = []

    def on_event(e):  # right after each evaluation: the model the library just evaluated, by hand
        if e.kind == "epoch":
            x, y = val_batch(root, classes, IMG, model)
            was_training = model.training
            with torch.no_grad():
                logits = model.eval()(x)
            model.train(was_training)
            hand.append({"reported": e.metrics, "top1": 100 * (logits.argmax(-1) == y).float().mean(),
                         "top5": 100 * (logits.topk(5, dim=-1).indices == y[:, None]).any(-1).float().mean(),
                         "val_loss": F.cross_entropy(logits, y), "distinct": len(logits.argmax(-1).unique())})

    result = train(model, root, None, None, device="cpu", callback=on_event,
                   overrides=[f"img_size={IMG}", "batch_size=4", "epochs=2", "lr=0.05", "warmup_steps=0",
                              "head_init=default", "eval_batch_size=5"])
    assert result.class_names == classes and len(hand) == 2
    # the comparison can tell a right evaluation from a wrong one: neither 0 nor 100%, varied predictions
    assert any(0 < h["top1"] < 100 and 0 < h["top5"] < 100 and h["distinct"] > 1 for h in hand)
    for h, row in zip(hand, result.history):
        assert row == h["reported"]
        for key in ("top1", "top5"):
            torch.testing.assert_close(torch.tensor(row[key]), h[key], rtol=1e-5, atol=1e-4, msg=key)
        torch.testing.assert_close(torch.tensor(row["val_loss"]), h["val_loss"], rtol=1e-5, atol=1e-5)


def test_default_device_comes_from_wsurgery_device(monkeypatch, tmp_path):
    from wsurgery.errors import UsageError
    from wsurgery.train import pick_device

    monkeypatch.setenv("WSURGERY_DEVICE", "cpu")
    assert pick_device() == torch.device("cpu") and pick_device("auto") == torch.device("cpu")
    monkeypatch.setenv("WSURGERY_DEVICE", "tpu")
    with pytest.raises(UsageError, match=r"^WSURGERY_DEVICE=tpu is not a device torch knows"):
        pick_device()
    assert pick_device("cpu") == torch.device("cpu")  # a device passed in wins over the variable
    monkeypatch.delenv("WSURGERY_DEVICE")
    best = pick_device()
    assert best.type == ("cuda" if torch.cuda.is_available() else best.type)
    monkeypatch.setenv("WSURGERY_DEVICE", "auto")
    assert pick_device() == best
    if not torch.cuda.is_available():
        monkeypatch.setenv("WSURGERY_DEVICE", "cuda")
        with pytest.raises(UsageError, match=r"WSURGERY_DEVICE=cuda was asked for .* use WSURGERY_DEVICE=cpu$"):
            pick_device()
        # and through the CLI: one line naming the variable
        from _cli import invoke, one_error

        one_error(invoke("train", "resnet10t", "--data", tmp_path, "-o", tmp_path / "run"), 2, "WSURGERY_DEVICE=cuda")
        assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_a_model_that_is_not_float32_is_refused_before_training(data, tmp_path, dtype):
    """Half weights would meet float32 images (a raw RuntimeError) and SGD on them loses small updates."""
    model = tiny().to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(wsurgery.errors.UsageError, match=f"float32 weights, this one's are {str(dtype)[6:]}.*amp="):
        train(model, data, tmp_path / "run", None, device="cpu", overrides=[f"img_size={IMG}"])
    assert not (tmp_path / "run").exists()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_preconditioned_model_gets_a_note_when_its_lr_is_high(data):
    """gn-init's preconditioning was measured to diverge at the micro-batch recipe's lr: train says so."""
    from wsurgery.convert import clone_model
    from wsurgery.train import PRECONDITIONED_MAX_LR

    teacher = tiny(mode=None).eval()
    student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", inplace=False)
    wsurgery.calibrate(student, teacher, torch.randn(8, 3, IMG, IMG), method="gn-init", held_out=None,
                       precondition=True, anchor=False)
    assert student.wsurgery_preconditioned
    notes = {}
    for lr in (PRECONDITIONED_MAX_LR * 4, PRECONDITIONED_MAX_LR):  # batch 4, lr per 4 images: lr per update
        result = train(clone_model(student), data, None, None, device="cpu",
                       overrides=[f"img_size={IMG}", "batch_size=4", "lr_base_batch=4", f"lr={lr}", "steps=1"])
        notes[lr] = [n for n in result.notes if "preconditioning" in n]
    high = notes[PRECONDITIONED_MAX_LR * 4]
    assert len(high) == 1 and "0.006 per update may diverge" in high[0]
    assert notes[PRECONDITIONED_MAX_LR] == []
    plain = train(tiny(), data, None, None, device="cpu", overrides=[f"img_size={IMG}", "lr=0.1", "steps=1"])
    assert not [n for n in plain.notes if "preconditioning" in n]  # only preconditioned models get it


def test_an_anchored_model_gets_a_note_under_bf16(data):
    """Anchoring's offsets leave bf16 too few bits for the signal beside them (measured on Lite0): train says so."""
    from wsurgery.convert import clone_model

    teacher = tiny(mode=None).eval()
    student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=1, inplace=False)
    wsurgery.calibrate(student, teacher, torch.randn(8, 3, IMG, IMG), method="gn-init", held_out=None, anchor=True)
    assert student.wsurgery_anchored
    notes = {}
    for amp in ("bf16", "fp16", "none"):
        result = train(clone_model(student), data, None, None, device="cpu",
                       overrides=[f"img_size={IMG}", "lr=0.001", "steps=1", f"amp={amp}"])
        notes[amp] = [n for n in result.notes if "bf16" in n]
    assert len(notes["bf16"]) == 1 and "anchoring" in notes["bf16"][0] and "amp=fp16 or none" in notes["bf16"][0]
    assert notes["fp16"] == notes["none"] == []
    # anchored, it is not the preconditioned model that diverged at a high lr (measured): no preconditioning note,
    # but its own above ANCHORED_MAX_LR_PER_IMAGE (0.0004 per image of an update; measured in finetune.py)
    assert set(student.wsurgery_anchored) == set(student.wsurgery_preconditioned)
    for lr, noted in ((0.1, True), (0.0016, False), (0.0017, True)):  # per update of 4 images
        result = train(clone_model(student), data, None, None, device="cpu",
                       overrides=[f"img_size={IMG}", "batch_size=4", "lr_base_batch=4", f"lr={lr}", "steps=1"])
        assert not [n for n in result.notes if "preconditioning" in n]
        lr_notes = [n for n in result.notes if "about a third of the lr" in n]
        assert len(lr_notes) == int(noted), (lr, result.notes)
        assert not noted or f"{lr:.3g} per update of 4 images may diverge" in lr_notes[0]
    # a linear probe trains the head alone: nothing anchoring changed moves
    probe = train(clone_model(student), data, None, None, device="cpu",
                  overrides=[f"img_size={IMG}", "batch_size=4", "lr_base_batch=4", "lr=0.1", "steps=1",
                             "freeze_backbone=true"])
    assert not [n for n in probe.notes if "about a third of the lr" in n]
    plain = train(tiny(), data, None, None, device="cpu",
                  overrides=[f"img_size={IMG}", "steps=1", "amp=bf16", "batch_size=4", "lr_base_batch=4", "lr=0.1"])
    assert not [n for n in plain.notes if "anchoring" in n]


# --- from a review of the recipes against timm ----------------------------------------------------


def test_adaptive_clipping_leaves_the_zero_initialised_head_free(data):
    """AGC clips a gradient to a fraction of its weight's norm: the zero-initialised head (every shipped
    recipe's head_init) got no update and the run stayed at chance. As timm's train.py does, the head
    is left out of AGC: it is what it is without clipping, the body is clipped. Two updates: the body's
    gradients are zero while the head is (the first update moves only the head)."""
    heads, bodies = [], []
    for clip in ([], ["clip_grad=0.01", "clip_mode=agc"]):
        model = tiny()
        train(model, data, None, None, device="cpu",
              overrides=[f"img_size={IMG}", "batch_size=4", "steps=2", "lr=0.1", "warmup_steps=0", "head_init=zero",
                         *clip])
        heads.append(model.get_classifier().weight.detach().clone())
        bodies.append(model.conv_stem.parametrizations.weight.original.detach().clone())
    assert heads[0].abs().max() > 1e-3  # the unclipped head moved off zero
    torch.testing.assert_close(heads[1], heads[0], rtol=0, atol=0)
    assert not torch.equal(bodies[0], bodies[1])  # and the clipping did act on the body


@pytest.mark.parametrize(("optimizer", "key", "value"), [("rmsprop", "momentum", 0.5), ("lars", "momentum", 0.0),
                                                          ("adamw", "betas", (0.5, 0.999)),
                                                          ("lookahead_adamw", "betas", (0.5, 0.999))])
def test_momentum_reaches_every_optimizer_that_takes_one(data, optimizer, key, value):
    """`momentum` went only to the SGD family: rmsprop and lars ran at timm's default 0.9 whatever it said.
    timm's `lookahead_` prefix was refused as an unknown optimizer."""
    with optimizer_steps() as steps:
        train(tiny(), data, None, None, device="cpu",
              overrides=[f"img_size={IMG}", "batch_size=4", "steps=1", "lr=0.01", f"optimizer={optimizer}",
                         "momentum=" + str(value[0] if isinstance(value, tuple) else value)])
    assert {tuple(g[key]) if isinstance(g[key], tuple) else g[key] for g in steps[0]} == {value}
    # timm's Lookahead keeps its settings in the wrapped optimizer's groups
    assert all(("lookahead_k" in g) == optimizer.startswith("lookahead_") for g in steps[0])


def test_the_reported_lr_is_the_lr_of_that_update(data):
    """Step events and metrics.csv read the lr after the scheduler had set the next update's (a cosine
    run's last epoch showed lr 0): each is now the lr its update used."""
    events = []
    with optimizer_steps() as steps:
        result = train(tiny(), data, None, None, device="cpu", callback=events.append,
                       overrides=[f"img_size={IMG}", "batch_size=4", "steps=6", "lr=0.1", "sched=cosine",
                                  "warmup_steps=0"])
    used = [groups[0]["lr"] for groups in steps]
    assert [e.lr for e in events if e.kind == "step"] == used
    assert [h["lr"] for h in result.history] == [used[2], used[5]]  # 3 updates per epoch: each epoch's last
    assert used[-1] > 0


def test_min_lr_is_checked_against_the_lr_the_run_uses(data, tmp_path):
    """min_lr 0.008 under lr 0.01 per 32 images at 16 images per update (0.005): the cosine rose."""
    from wsurgery.recipes import RecipeError

    with pytest.raises(RecipeError, match=r"`min_lr` \(0.008\) must not exceed the peak learning rate \(0.005 = lr"):
        train(tiny(), data, tmp_path / "r", device="cpu",
              overrides=[f"img_size={IMG}", "batch_size=2", "accum_steps=8", "lr=0.01", "lr_base_batch=32",
                         "min_lr=0.008"])
    assert not (tmp_path / "r").exists()


def test_micro_batches_are_fetched_as_they_run(data, monkeypatch):
    """An update fetched all its micro-batches before running the first (BiT's 64 x 8 at 480 px held 1.4 GB of
    inputs at once): each forward now sees only the images of the micro-batches up to its own."""
    from wsurgery.datasets import SeededView

    fetched = []
    seen_at_forward = []
    original = SeededView.__getitem__

    def counting(self, item):
        fetched.append(item)
        return original(self, item)

    monkeypatch.setattr(SeededView, "__getitem__", counting)
    model = tiny()
    forward = model.forward

    def recording(x):
        if torch.is_grad_enabled():  # training forwards only (not validation)
            seen_at_forward.append((len(fetched), len(x)))
        return forward(x)

    model.forward = recording
    # 12 images, batches of 2, 4 accumulated: updates of 4 + 2 micro-batches (the epoch's last update is short)
    result = train(model, data, None, None, device="cpu",
                   overrides=[f"img_size={IMG}", "epochs=1", "batch_size=2", "accum_steps=4", "workers=0"])
    assert result.history[-1]["step"] == 2
    assert [n for n, _ in seen_at_forward] == [2, 4, 6, 8, 10, 12], seen_at_forward
    assert all(size == 2 for _, size in seen_at_forward)
