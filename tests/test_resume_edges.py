"""Resume: refused when it could not continue the run exactly (data changed, checkpoint damaged), allowed
where it can (another worker count), and a second Ctrl-C or a finished run leave the run consistent."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _data import CLASSES, make_train_val, tiny_aws_gn

import wsurgery
from wsurgery.errors import CheckpointError, UsageError
from wsurgery.io import load_safetensors, read_json
from wsurgery.train import TrainingInterrupted, _Run, train

# 8 images x 3 classes / batch 4: 6 updates per epoch, 12 in all
FAST = ["img_size=32", "batch_size=4", "epochs=2", "lr=0.01", "warmup_steps=2", "workers=0", "label_smoothing=0",
        "aug_scale=[0.8, 1.0]"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("data"))


tiny = tiny_aws_gn


def _stop_at(step: int):
    def callback(event):
        if event.kind == "step" and event.step == step:
            raise KeyboardInterrupt
    return callback


def _interrupted_run(data, out, step: int = 3, overrides=FAST):
    with pytest.raises(TrainingInterrupted):
        train(tiny(), data, out, "cpu-quick", overrides=overrides, callback=_stop_at(step))
    return out


def _same_weights(a, b) -> None:
    wa, wb = load_safetensors(a / "last" / "model.safetensors"), load_safetensors(b / "last" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_changed_data_is_refused_and_moved_data_is_not(data, tmp_path):
    """Resumed onto a folder with more images, the checkpoint's 12-update schedule ran to its end at lr 0
    and a val_split would be redrawn: it continued silently. A moved (renamed) folder is the same data."""
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    run = _interrupted_run(copy, tmp_path / "r")
    extra = copy / "train" / CLASSES[0]
    shutil.copy(next(extra.glob("*.png")), extra / "extra.png")
    with pytest.raises(UsageError, match=r"data changed.*train: 24 images then, 25 now"):
        train(None, None, None, resume=run)
    (extra / "extra.png").unlink()
    moved = tmp_path / "moved"
    copy.rename(moved)
    train(None, moved, None, resume=run)  # --data names where it is now
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=FAST)
    _same_weights(tmp_path / "full", run)


@pytest.mark.parametrize("damage", ["rng", "data", "ema", "train_state.safetensors"])
def test_a_damaged_checkpoint_is_one_error_naming_it(data, tmp_path, damage):
    """A train_state.json without a key raised a bare KeyError; without the EMA tensors the EMA silently
    restarted from the current weights."""
    run = _interrupted_run(data, tmp_path / "r", overrides=[*FAST, "ema=true"])
    last = run / "last"
    if damage == "train_state.safetensors":
        (last / damage).unlink()
    elif damage == "ema":
        from wsurgery.io import save_safetensors

        tensors = load_safetensors(last / "train_state.safetensors")
        save_safetensors({k: v for k, v in tensors.items() if not k.startswith("ema.")},
                         last / "train_state.safetensors")
    else:
        state = json.loads((last / "train_state.json").read_text())
        del state[damage]
        (last / "train_state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{last}.*lacks .*{damage}.*start a new run"):
        train(None, None, None, resume=run)


def test_workers_may_change_on_resume_other_settings_may_not(data, tmp_path):
    """A run started with workers could not be finished without (--set refused on resume), although
    the worker count does not change the result."""
    run = _interrupted_run(data, tmp_path / "r")
    with pytest.raises(UsageError, match="cannot change lr of a resumed run"):
        train(None, None, None, resume=run, overrides=["lr=0.1"])
    result = train(None, None, None, resume=run, overrides=["workers=1"])
    assert "workers 0 -> 1 on resume" in result.notes
    assert wsurgery.load_recipe(run / "recipe.yaml").workers == 1
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=FAST)
    _same_weights(tmp_path / "full", run)


def test_ctrl_c_right_after_an_update_keeps_the_last_consistent_checkpoint(data, tmp_path, monkeypatch):
    """A second Ctrl-C after optimizer.step() but before the position and RNG were updated wrote a
    checkpoint with the new step and the old position: the resumed run redid a batch."""
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=FAST)
    step = _Run._optimizer_step

    def step_then_ctrl_c(self):
        step(self)
        if self.state.step == 8:  # in epoch 2: epoch 1's checkpoint (step 6) is on disk
            raise KeyboardInterrupt

    monkeypatch.setattr(_Run, "_optimizer_step", step_then_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="during an optimizer update"):
        train(tiny(), data, tmp_path / "r", "cpu-quick", overrides=FAST)
    monkeypatch.undo()
    assert read_json(tmp_path / "r" / "last" / "train_state.json")["state"]["step"] == 6
    train(None, None, None, resume=tmp_path / "r")
    _same_weights(tmp_path / "full", tmp_path / "r")


def test_resume_into_a_folder_inside_the_run_is_refused(data, tmp_path):
    run = _interrupted_run(data, tmp_path / "r")
    with pytest.raises(UsageError, match="inside the run it resumes"):
        train(None, None, run / "continued", resume=run)
    assert not (run / "continued").exists()


def test_resume_removes_what_a_killed_checkpoint_write_left(data, tmp_path):
    run = _interrupted_run(data, tmp_path / "r")
    stale = run / ".last.k1ll3d.tmp"  # a SIGKILL during save_checkpoint leaves a full-size one for good
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    (run / ".model.safetensors.abc.tmp").write_bytes(b"x")
    keep = run / ".notes.tmp"  # not a name the run writes: not ours to delete
    keep.write_text("mine")
    train(None, None, None, resume=run)
    assert not stale.exists() and not (run / ".model.safetensors.abc.tmp").exists() and keep.exists()


def test_resuming_a_finished_run_changes_nothing(data, tmp_path):
    """It showed `epoch 3/2`, rewrote train.json (its notes and seconds) as if it had run again."""
    run = tmp_path / "r"
    first = train(tiny(), data, run, "cpu-quick", overrides=FAST)
    before = {p.name: p.read_bytes() for p in (run / "train.json", run / "model.safetensors",
                                               run / "last" / "model.safetensors")}
    events = []
    again = train(None, None, None, resume=run, callback=events.append)
    assert [e.kind for e in events if e.kind == "step"] == []
    assert again.steps == first.steps == 12 and again.history == first.history
    assert any("already complete" in n for n in again.notes)
    after = {p.name: p.read_bytes() for p in (run / "train.json", run / "model.safetensors",
                                              run / "last" / "model.safetensors")}
    assert after == before


def test_train_json_seconds_cover_every_process_of_a_resumed_run(data, tmp_path, monkeypatch):
    """train.json's seconds covered the last process only (a run resumed for its last step said 0.1 s)."""
    import itertools
    import sys
    import types

    clock = itertools.count(0.0, 100.0)  # train's clock: every reading 100 s after the last
    monkeypatch.setattr(sys.modules["wsurgery.train"], "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    run = _interrupted_run(data, tmp_path / "r", step=9)
    first = read_json(run / "last" / "train_state.json")["state"]["seconds_before"]
    assert first >= 100 * 9  # at least one reading per step
    clock_at_resume = next(clock)
    train(None, None, None, resume=run)
    resumed_alone = next(clock) - clock_at_resume
    assert read_json(run / "train.json")["seconds"] > first + 100 and resumed_alone < first


def test_a_stop_during_the_last_update_still_finishes_the_run(data, tmp_path):
    """Stopped in its last update (step 12 of 12), the run's last epoch had not been evaluated or
    checkpointed; the resume took it for finished and wrote no train.json."""
    run = _interrupted_run(data, tmp_path / "r", step=12)
    state = read_json(run / "last" / "train_state.json")["state"]
    assert state["step"] == 12 and state["epoch"] == 1 and state["batch"] > 0
    resumed = train(None, None, None, resume=run)
    assert len(resumed.history) == 2 and read_json(run / "train.json")["epochs"] == 2
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=FAST)
    _same_weights(tmp_path / "full", run)


def test_sigterm_after_the_last_update_lets_the_run_finish(data, tmp_path):
    """A SIGTERM during the last epoch's evaluation/checkpoint raised TrainingInterrupted (exit 130)
    after every update was done, and left no train.json; resuming found nothing to do and wrote none."""
    import os
    import signal

    def term_at_last_epoch(event):
        if event.kind == "epoch" and event.epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    result = train(tiny(), data, tmp_path / "r", "cpu-quick", overrides=FAST, callback=term_at_last_epoch)
    assert result.steps == 12 and len(result.history) == 2
    assert read_json(tmp_path / "r" / "train.json")["status"] == "completed"


def test_resuming_a_finished_run_without_train_json_writes_it(data, tmp_path):
    """A run whose every epoch is checkpointed but whose train.json is missing (stopped before it was
    written, by an older version, or deleted) got none on resume."""
    run = tmp_path / "r"
    train(tiny(), data, run, "cpu-quick", overrides=FAST)
    first = read_json(run / "train.json")
    (run / "train.json").unlink()
    train(None, None, None, resume=run)
    again = read_json(run / "train.json")
    assert again["status"] == "completed" and again["steps"] == first["steps"] == 12
    assert again["best"] == first["best"]


def test_sigterm_mid_run_is_exit_code_143_and_ctrl_c_130(data, tmp_path):
    import os
    import signal

    def term(event):
        if event.kind == "step" and event.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="--resume") as info:
        train(tiny(), data, tmp_path / "t", "cpu-quick", overrides=FAST, callback=term)
    assert info.value.exit_code == 143
    with pytest.raises(TrainingInterrupted) as info:
        train(tiny(), data, tmp_path / "c", "cpu-quick", overrides=FAST, callback=_stop_at(3))
    assert info.value.exit_code == 130


def test_decode_failures_count_every_process_of_a_resumed_run(tmp_path):
    """train.json's decode_failures counted the last process's reads only."""
    data = make_train_val(tmp_path / "data")
    first = sorted((data / "train" / CLASSES[0]).iterdir())[0]
    whole = first.read_bytes()
    (first.parent / "truncated.png").write_bytes(whole[: len(whole) // 2])  # passes the header check
    overrides = [o if not o.startswith("batch_size") else "batch_size=5" for o in FAST]  # 25 images: 5 updates/epoch
    train(tiny(), data, tmp_path / "full", "cpu-quick", overrides=overrides)
    full = read_json(tmp_path / "full" / "train.json")["decode_failures"]
    with pytest.raises(TrainingInterrupted):  # in epoch 2: its first process read the file in epoch 1
        train(tiny(), data, tmp_path / "cut", "cpu-quick", overrides=overrides, callback=_stop_at(7))
    train(None, None, None, resume=tmp_path / "cut")
    assert full >= 2 and read_json(tmp_path / "cut" / "train.json")["decode_failures"] == full


def test_the_data_fingerprint_takes_relative_and_absolute_paths_alike(tmp_path, monkeypatch):
    """A CSV mixing relative and absolute image paths crashed every new run (os.path.commonpath)."""
    from _data import make_folder

    from wsurgery.datasets import build_datasets, data_fingerprint

    make_folder(tmp_path / "imgs", per_class=2)
    files = sorted((tmp_path / "imgs").rglob("*.png"))
    monkeypatch.chdir(tmp_path)
    rows = [f"{p if i % 2 else p.relative_to(tmp_path / 'imgs')},{p.parent.name}" for i, p in enumerate(files)]
    (tmp_path / "imgs" / "mixed.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "imgs" / "absolute.csv").write_text(
        "path,label\n" + "\n".join(f"{p},{p.parent.name}" for p in files) + "\n")
    mixed = data_fingerprint(build_datasets("imgs/mixed.csv"))
    assert mixed == data_fingerprint(build_datasets(tmp_path / "imgs" / "absolute.csv"))
    assert mixed["train"]["images"] == len(files)
