"""Paths no other test reached: --calib-seconds, CutMix, `python -m wsurgery`, SIGTERM on the CLI, bit-hyperrule."""

from __future__ import annotations

import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import pytest
import torch
from _data import make_train_val, tiny_aws_gn
from test_calibrate import _images, make_teacher
from timm.data import Mixup

import wsurgery
from wsurgery.train import train

# the modules (wsurgery.train and wsurgery.calibrate are also the package's functions of those names)
train_module = importlib.import_module("wsurgery.train")
calibrate_module = importlib.import_module("wsurgery.calibrate")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread

FAST = ["img_size=32", "batch_size=4", "workers=0", "label_smoothing=0", "aug_scale=[0.8, 1.0]"]
ONE_THREAD = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("data"))


_tiny = tiny_aws_gn


# --- calibrate's max_seconds (CLI --calib-seconds) ---------------------------------------------------------------


def _ticking_clock(monkeypatch) -> None:
    """calibrate's clock advances one second per reading: distillation's time limit is reached after a known
    number of steps, whatever the machine's speed."""
    now = [1000.0]

    def perf_counter() -> float:
        now[0] += 1.0
        return now[0]

    monkeypatch.setattr(calibrate_module, "time", types.SimpleNamespace(perf_counter=perf_counter))


def test_calib_max_seconds_stops_distillation_early(monkeypatch):
    teacher = make_teacher()
    images = _images(32, seed=5)

    def run(**kwargs):
        student = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=4, inplace=False)[0]
        return wsurgery.calibrate(student, teacher, images, method="distill", steps=12, batch_size=8, seed=0,
                                  **kwargs)

    _ticking_clock(monkeypatch)
    assert run().steps == 12  # no limit: every step
    # the clock reads one second later at each step's end: 3.5 s are over after the 4th step
    limited = run(max_seconds=3.5)
    assert limited.steps == len(limited.losses) == 4
    assert limited.config["max_seconds"] == 3.5


def test_cli_calib_seconds_reaches_the_calibration(tmp_path, monkeypatch):
    from _cli import invoke, ok
    from _data import make_folder

    images = make_folder(tmp_path / "images", per_class=3, size=32)
    _ticking_clock(monkeypatch)  # CliRunner runs the command in this process
    out = tmp_path / "cal"
    ok(invoke("convert", "test_efficientnet", "--no-pretrained", "--norm", "gn", "--calibrate", "distill",
              "--calib-data", images, "--calib-steps", "10", "--calib-batch", "4", "--calib-size", "32",
              "--calib-seconds", "2.5", "-o", out))
    record = json.loads((out / "config.json").read_text())["wsurgery"]["calibration"]
    assert record["steps"] == 3 and record["config"]["max_seconds"] == 2.5


# --- CutMix -----------------------------------------------------------------------------------------------------


def test_cutmix_recipe_mixes_as_timm_cutmix(data, monkeypatch):
    """cutmix_alpha builds timm's Mixup in CutMix mode: each input gets a box pasted from its partner in the
    flipped batch, and its target is the one-hot mix weighted by the box's area."""
    built, calls, seen = [], [], []

    class RecordingMixup(Mixup):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            built.append(kwargs)

        def __call__(self, x, target):
            before = x.clone(), target.clone()
            out = super().__call__(x, target)
            calls.append((*before, out[0].clone(), out[1].clone()))
            return out

    monkeypatch.setattr(train_module, "Mixup", RecordingMixup)
    model = _tiny()
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()) if m.training else None)
    result = train(model, data, None, "cpu-quick", overrides=[*FAST, "epochs=1", "cutmix_alpha=1.0", "mixup_alpha=0"])
    assert result.steps > 0
    assert len(built) == 1
    assert built[0]["cutmix_alpha"] == 1.0 and built[0]["mixup_alpha"] == 0 and built[0]["num_classes"] == 3
    assert len(calls) == len(seen) > 1
    boxes = 0
    for (x, y, mixed, soft), fed in zip(calls, seen):
        torch.testing.assert_close(fed, mixed, rtol=0, atol=0)  # the model trained on the mixed batch
        partner, y_partner = x.flip(0), y.flip(0)
        differs = (mixed != x).any(dim=(0, 1))  # the box, the same for the whole batch
        h, w = differs.shape
        if differs.any():
            rows, cols = differs.any(1).nonzero().flatten(), differs.any(0).nonzero().flatten()
            top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
            box = torch.zeros(h, w, dtype=torch.bool)
            box[top:bottom, left:right] = True
            boxes += 1
        else:
            box = differs
        expected = torch.where(box, partner, x)
        torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
        lam = 1.0 - box.sum().item() / (h * w)
        one_hot = torch.nn.functional.one_hot(y, 3).float()
        torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.flip(0), rtol=1e-6, atol=1e-6)
        assert torch.equal(y_partner, y.flip(0))
    assert boxes >= 1  # Beta(1, 1) boxes: at least one of the batches got a visible one


# --- python -m wsurgery -----------------------------------------------------------------------------------------


def test_python_dash_m_wsurgery_help_and_a_bad_argument(tmp_path):
    def start(*args):
        return subprocess.Popen([sys.executable, "-m", "wsurgery", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=ONE_THREAD)

    # side by side: each start imports torch and timm
    procs = start("--help"), start("convert", "resnet18", "--mode", "sideways", "-o", str(tmp_path / "out"))
    (help_out, help_err), (bad_out, bad_err) = (p.communicate(timeout=120) for p in procs)
    assert procs[0].returncode == 0, help_err
    for command in ("convert", "train", "export", "verify"):
        assert command in help_out
    assert procs[1].returncode != 0
    lines = [line for line in bad_err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--mode" in lines[0], bad_err
    assert "Traceback" not in bad_err + bad_out


# --- SIGTERM ends `wsurgery train` as Ctrl-C does ---------------------------------------------------------------

# Loaded into the child only (sitecustomize on its PYTHONPATH): when the first checkpoint (OUT/last) is in place,
# tell the test and wait until it has sent SIGTERM, so the signal lands mid-run on any machine
_HOLD_AFTER_FIRST_CHECKPOINT = """
import os, time
_replace = os.replace
_held = []
def replace(src, dst, *args, **kwargs):
    result = _replace(src, dst, *args, **kwargs)
    if not _held and os.path.basename(os.fspath(dst)) == "last":
        _held.append(True)
        open(os.environ["WSURGERY_TEST_HELD"], "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.environ["WSURGERY_TEST_SIGNALLED"]) and time.monotonic() < deadline:
            time.sleep(0.01)
    return result
os.replace = replace
"""


def _signal_when_held(tmp_path: Path, shim_source: str, args: list[str], signum: int, *, group: bool, wait: float,
                      timeout: float) -> tuple[int, str, str]:
    """Run ``python -m wsurgery ARGS`` with ``shim_source`` as its sitecustomize; when the shim says it holds the
    run (it creates $WSURGERY_TEST_HELD and waits for $WSURGERY_TEST_SIGNALLED), send ``signum`` to the process
    (to its process group with ``group``, as a terminal's Ctrl-C or systemd's stop reach the main process and its
    workers), let the shim go on, and return the exit code, stdout and stderr."""
    shim = Path(tempfile.mkdtemp(prefix="wsurgery-shim-", dir=tmp_path))
    (shim / "sitecustomize.py").write_text(shim_source)
    held, signalled = shim / "held", shim / "signalled"
    env = {**ONE_THREAD, "PYTHONPATH": os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH")) if p),
           "WSURGERY_TEST_HELD": str(held), "WSURGERY_TEST_SIGNALLED": str(signalled)}
    proc = subprocess.Popen([sys.executable, "-m", "wsurgery", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, start_new_session=group)
    kill = (lambda sig: os.killpg(proc.pid, sig)) if group else (lambda sig: os.kill(proc.pid, sig))
    try:
        deadline = time.monotonic() + wait
        while not held.exists():
            assert proc.poll() is None, f"the run ended before it was held: {proc.communicate()}"
            assert time.monotonic() < deadline, "the run was never held"
            time.sleep(0.01)
        kill(signum)
        signalled.touch()
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            kill(signal.SIGKILL)
            proc.communicate()
    return proc.returncode, stdout, stderr


def test_sigterm_stops_cli_train_with_143_and_a_resumable_checkpoint(tmp_path, data):
    surgery = wsurgery.save(_tiny(), tmp_path / "conv")
    out = tmp_path / "run"
    args = ["train", str(surgery), "--data", str(data), "--recipe", "cpu-quick", "--img-size", "32", "--set",
            "epochs=2", "--set", "batch_size=4", "--set", "workers=0", "--set", "warmup_steps=2", "-o", str(out)]
    code, stdout, stderr = _signal_when_held(tmp_path, _HOLD_AFTER_FIRST_CHECKPOINT, args, signal.SIGTERM,
                                             group=False, wait=240, timeout=120)
    assert code == 143, (stdout, stderr)  # 128 + SIGTERM, as shells report it (Ctrl-C: 130)
    # stderr holds the progress and notes, then the stop: one line, the last, no traceback; a stop
    # the user asked for is not called an error
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("error:", "stopped:"))]
    assert errors == [lines[-1]] and errors[0].startswith("stopped: interrupted at step 6"), stderr
    assert f"--resume {out}" in " ".join(errors[0].split()) and "Traceback" not in stderr
    state = json.loads((out / "last" / "train_state.json").read_text())["state"]
    assert (state["epoch"], state["step"]) == (1, 6)  # 24 images / 4 per step: the end of epoch 1
    # resumable: it continues where it stopped and finishes the second epoch
    resumed = train(None, None, None, resume=out)
    assert resumed.steps == 12 and [h["epoch"] for h in resumed.history] == [1, 2]


# --- bit-hyperrule through train() --------------------------------------------------------------------------------


def test_bit_hyperrule_trains_end_to_end(data, tmp_path):
    """The recipe as shipped (steps, milestones and mixup chosen from the data), with a 10-step schedule."""
    events = []
    out = tmp_path / "bit"
    result = train(_tiny(), data, out, "bit-hyperrule", callback=events.append,
                   overrides=["steps=10", "warmup_steps=2", "img_size=32", "batch_size=4", "accum_steps=2",
                              "workers=0"])
    assert result.steps == 10
    recipe = wsurgery.load_recipe(out / "recipe.yaml")
    # BiT-HyperRule for 24 images: /10 after updates 201/301/401 of 500 (40/60/80% of the run), no mixup
    assert recipe.decay_milestones == pytest.approx([0.402, 0.602, 0.802]) and recipe.mixup_alpha == 0.0
    assert (recipe.sched, recipe.decay_rate, recipe.optimizer) == ("multistep", 0.1, "momentum")
    # lr 0.003 per 512 images, scaled to 4 x 2 images per step; warm-up over 2 updates, then /10 after
    # 4, 6 and 8 of the 10 updates. A step event reports the lr its update used.
    peak = 0.003 * 8 / 512
    lrs = [e.lr for e in events if e.kind == "step"]
    assert len(lrs) == 10
    expected = [0.0, peak / 2, peak, peak, peak / 10, peak / 10, peak / 100, peak / 100, peak / 1000, peak / 1000]
    torch.testing.assert_close(torch.tensor(lrs, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=0)
    assert wsurgery.is_converted(wsurgery.load(out)) and (out / "last" / "train_state.json").is_file()


# Loaded into the child (sitecustomize): DataLoader workers start with `spawn` (macOS's and Windows' default). In
# the main process, at the {at}th call of the loader iterator's {method} ({after}: after the call, else before it),
# tell the test, wait for its signal, and go on
_SPAWN_AND_HOLD = """
import multiprocessing, os, sys, time
multiprocessing.set_start_method("spawn", force=True)
if "spawn_main" not in " ".join(sys.orig_argv):  # the main process, not a worker
    from torch.utils.data import dataloader
    _real, _count = dataloader._MultiProcessingDataLoaderIter.{method}, []
    def _held(self, *args, **kwargs):
        result = _real(self, *args, **kwargs) if {after} else None
        _count.append(1)
        if len(_count) == {at}:
            open(os.environ["WSURGERY_TEST_HELD"], "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(os.environ["WSURGERY_TEST_SIGNALLED"]) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(1.0)  # the workers have had the signal by now
        return result if {after} else _real(self, *args, **kwargs)
    dataloader._MultiProcessingDataLoaderIter.{method} = _held
"""
# the signal lands while the main process fetches the 2nd micro-batch of update 2 (train fetches each micro-batch
# as the one before it has run; the workers still prefetch ahead of it), or once the first loader has started its
# workers (they import torch for seconds before their worker_init_fn runs)
_HOLDS = {"in a fetch": {"method": "_next_data", "at": 10, "after": False},
          "at worker start": {"method": "__init__", "at": 1, "after": True}}


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
@pytest.mark.parametrize(("when", "step"), [("in a fetch", 2), ("at worker start", 1)])
def test_ctrl_c_with_spawned_dataloader_workers_stops_cleanly(tmp_path, data, signum, code, when, step):
    """Ctrl-C reaches the whole foreground process group. Forked DataLoader workers inherited train's
    stop-flag handler; spawned ones (macOS, Windows) died of the KeyboardInterrupt, and the run failed
    with "DataLoader worker exited unexpectedly" instead of stopping at a checkpoint. Workers now ignore
    SIGINT and SIGTERM, and hold both while workers start (a spawned worker imports torch for seconds before
    its worker_init_fn runs): the main process finishes the update it is in (2 of 3 when the signal comes in
    a fetch, 1 when it comes as the first workers start), writes the checkpoint and exits 130 (143)."""
    surgery = wsurgery.save(_tiny(), tmp_path / "conv")
    out = tmp_path / "run"
    args = ["train", str(surgery), "--data", str(data), "--recipe", "cpu-quick", "--img-size", "32", "--set",
            "epochs=1", "--set", "batch_size=1", "--set", "accum_steps=8", "--set", "workers=2", "--set",
            "warmup_steps=1", "-o", str(out)]
    returncode, _, stderr = _signal_when_held(tmp_path, _SPAWN_AND_HOLD.format(**_HOLDS[when]), args, signum,
                                              group=True, wait=300, timeout=180)
    # Python's multiprocessing resource tracker (a process of its own under spawn) may warn at exit about a
    # semaphore of the stopped workers' queues (seen once, in a full CI run): its lines come after wsurgery's
    lines = [line for line in stderr.splitlines() if line.strip() and "resource_tracker" not in line
             and not line.strip().startswith("warnings.warn(")]
    assert returncode == code, stderr[-3000:]
    assert lines[-1].startswith(f"stopped: interrupted at step {step}") and "Traceback" not in stderr, stderr[-3000:]
    state = json.loads((out / "last" / "train_state.json").read_text())["state"]
    assert state["step"] == step
