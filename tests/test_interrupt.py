"""Issue 6, part 3: nothing is lost when a run is killed part-way.

Each test starts the real ``wsurgery`` CLI in a subprocess, SIGKILLs it while it is writing,
then checks that the destination is either absent or complete and valid, and that a run started
afterwards succeeds. No test hooks in the library: the child process gets a ``sitecustomize``
(on its PYTHONPATH only) that lets safetensors write the weights file and then holds the process
there, so the kill lands mid-output every time, whatever the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import timm
import torch

import wsurgery

pytestmark = pytest.mark.skipif(os.name != "posix", reason="SIGKILL is POSIX")

WSURGERY = [sys.executable, "-m", "wsurgery.cli.main"]


@pytest.fixture(scope="module")
def big_saved(tmp_path_factory) -> Path:
    """A converted resnet50 (about 100 MB of weights): writing it takes a moment."""
    model, report = wsurgery.convert(timm.create_model("resnet50", pretrained=False), mode="aws", norm="gn")
    return wsurgery.save(model, tmp_path_factory.mktemp("big") / "r50-ws", report=report)


def _partial_write_in(folder: Path, name: str) -> Path | None:
    """A temporary output of ``name`` in ``folder`` that already holds some bytes, if any."""
    for tmp in folder.glob(f".{name}.*.tmp"):
        files = [tmp] if tmp.is_file() else list(tmp.iterdir()) if tmp.is_dir() else []
        if any(f.is_file() and f.stat().st_size > 0 for f in files):
            return tmp
    return None


_HOLD_AFTER_WRITE = """
import os, time
import safetensors.torch as _st
_save_file = _st.save_file
def save_file(*args, **kwargs):  # write the weights file for real, then stop before anything else
    _save_file(*args, **kwargs)
    open(os.environ["WSURGERY_TEST_WRITTEN"], "w").close()
    # short sleeps: a signal the kernel hands to another thread (torch's) does not wake a long sleep of the
    # main thread, and Python runs its handler only when the main thread next runs bytecode
    for _ in range(72000):
        time.sleep(0.05)
_st.save_file = save_file
"""


@contextlib.contextmanager
def caught_writing(args: list[str], folder: Path, name: str, timeout: float = 240.0) -> Iterator[
        tuple[subprocess.Popen, Path]]:
    """Run the CLI and yield ``(process, temporary output)`` once its output to ``folder/name`` is
    half-written (weights, no config), the process held there; it is killed afterwards if still alive."""
    import tempfile

    shim = Path(tempfile.mkdtemp(prefix="wsurgery-shim-"))
    (shim / "sitecustomize.py").write_text(_HOLD_AFTER_WRITE)
    written = shim / "written"
    path = os.pathsep.join(p for p in (str(shim), os.environ.get("PYTHONPATH", "")) if p)
    proc = subprocess.Popen([*WSURGERY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": path,
                                 "WSURGERY_TEST_WRITTEN": str(written)})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if written.exists():
                tmp = _partial_write_in(folder, name)
                assert tmp is not None, f"the weights were written, but not to a temporary .{name}.*.tmp in {folder}"
                yield proc, tmp
                return
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it was caught writing: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.05)
        pytest.fail("the run was never seen writing")
    finally:
        for f in shim.iterdir():
            f.unlink()
        shim.rmdir()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


def kill_while_writing(args: list[str], folder: Path, name: str, timeout: float = 240.0) -> Path:
    """Run the CLI, SIGKILL it once its output to ``folder/name`` is half-written (weights, no config)."""
    with caught_writing(args, folder, name, timeout) as (proc, tmp):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    return tmp


def assert_valid_export(directory: Path, reference: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    result = wsurgery.verify(directory, reference, num_random=1)
    assert result.passed, result


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
@pytest.mark.parametrize("old_kind", ["dir", "file"])
def test_atomic_dir_force_replaces_whole_and_failure_keeps_the_old(tmp_path, monkeypatch, exchange, old_kind):
    from wsurgery import io

    if not exchange:
        monkeypatch.setattr(io, "_exchange", lambda a, b: False)
    dest = tmp_path / "out"
    if old_kind == "dir":
        dest.mkdir()
        (dest / "old.txt").write_text("old")
    else:
        dest.write_text("old")
    # a failure half-way: the old output stays as it was
    with pytest.raises(RuntimeError, match="boom"), io.atomic_dir(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("half")
        raise RuntimeError("boom")
    assert (dest / "old.txt").read_text() == "old" if old_kind == "dir" else dest.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with io.atomic_dir(dest, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in dest.iterdir()) == ["new.txt"] and (dest / "new.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .tmp or .old left behind


def test_sigkill_during_export_leaves_no_partial_output(tmp_path, big_saved):
    out = tmp_path / "export"
    tmp = kill_while_writing(["export", str(big_saved), "-o", str(out), "--no-verify"], tmp_path, "export")
    assert tmp.name.startswith(".export.") and tmp.parent == tmp_path  # written beside the destination
    assert not out.exists(), "a killed export left a destination behind"
    # the next run needs no --force (nothing was there) and writes a complete, valid export
    wsurgery.export(wsurgery.load(big_saved), out)
    assert_valid_export(out, big_saved)


@pytest.mark.sweep  # a second resnet50 export in a subprocess: CI only
def test_sigkill_during_forced_overwrite_keeps_the_old_export(tmp_path, big_saved):
    out = tmp_path / "export"
    wsurgery.export(wsurgery.load(big_saved), out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    kill_while_writing(["export", str(big_saved), "-o", str(out), "--no-verify", "--force", "--dtype", "fp16"],
                       tmp_path, "export")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "the old export was damaged"
    assert_valid_export(out, big_saved)


@pytest.mark.sweep  # a resnet50 convert in a subprocess: CI only
def test_sigkill_during_convert_leaves_no_partial_output(tmp_path):
    out = tmp_path / "r50"
    kill_while_writing(["convert", "resnet50", "--no-pretrained", "-o", str(out)], tmp_path, "r50")
    assert not out.exists()
    # a stale temporary never blocks or leaks into the next run
    original = timm.create_model("resnet50", pretrained=False).eval()
    converted, report = wsurgery.convert(original, mode="aws", inplace=False)
    wsurgery.save(converted, out, report=report)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = wsurgery.load(out)
    assert wsurgery.is_converted(model)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(model(x), original(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# training: SIGKILL mid-run, then `wsurgery train --resume` reaches the same final weights

TRAIN_ARGS = ["--recipe", "cpu-quick", "--img-size", "32", "--set", "epochs=2", "--set", "batch_size=4",
              "--set", "workers=0", "--set", "warmup_steps=2", "--set", "seed=7"]
ONE_THREAD = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.sweep  # three training runs in subprocesses: CI only (tests/test_train.py checks resume in-process)
def test_sigkill_during_training_then_resume_gives_the_same_weights(tmp_path):
    from _data import make_folder  # the training tests' synthetic images

    data = make_folder(tmp_path / "data", per_class=6, size=24)
    torch.manual_seed(0)
    model, _ = wsurgery.convert(timm.create_model("test_efficientnet", pretrained=False, num_classes=3),
                                mode="aws", norm="gn", trace=False)
    surgery = wsurgery.save(model, tmp_path / "conv")
    full, cut = tmp_path / "full", tmp_path / "cut"
    common = ["train", str(surgery), "--data", str(data), "--val-split", "0.34", *TRAIN_ARGS]
    # the uninterrupted run, side by side with the one that gets killed
    reference = subprocess.Popen([*WSURGERY, *common, "-o", str(full)], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, env=ONE_THREAD)
    victim = subprocess.Popen([*WSURGERY, *common, "-o", str(cut)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=ONE_THREAD)
    try:
        deadline = time.monotonic() + 400
        while not (cut / "last" / "train_state.json").exists():  # first checkpoint: end of epoch 1
            assert victim.poll() is None, f"run ended before its first checkpoint: {victim.stderr.read().decode()}"
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(30)
        assert reference.wait(600) == 0, reference.stderr.read().decode()
    finally:
        for proc in (reference, victim):
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            proc.stderr.close()
    state = json.loads((cut / "last" / "train_state.json").read_text())["state"]
    assert state["epoch"] == 1, "the kill did not land mid-run"
    # what the kill left is complete and loadable: the last checkpoint and the best model so far
    assert wsurgery.is_converted(wsurgery.load(cut / "last"))
    assert wsurgery.load(cut).num_classes == 3

    resumed = subprocess.run([*WSURGERY, "train", "--resume", str(cut)], capture_output=True, text=True,
                             env=ONE_THREAD, timeout=600)
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert f"resumed at epoch {state['epoch'] + 1}" in " ".join(resumed.stderr.split())  # a note: stderr
    for name in ("last/model.safetensors", "model.safetensors"):
        a, b = _tensors(full / name), _tensors(cut / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs after resume"
    ja = json.loads((full / "last" / "train_state.json").read_text())["state"]
    jb = json.loads((cut / "last" / "train_state.json").read_text())["state"]
    assert ja["step"] == jb["step"] and ja["epoch"] == jb["epoch"] == 2
    assert [h.get("top1") for h in ja["history"]] == [h.get("top1") for h in jb["history"]]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_mode_not_the_temporary_files_0600(tmp_path, umask):
    """mkstemp/mkdtemp make 0600/0700 temporaries; a renamed output must not stay private to its writer."""
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3)
    old = os.umask(umask)
    try:
        saved = wsurgery.save(wsurgery.convert(model, mode="ws")[0], tmp_path / "saved")
        exported = wsurgery.export(wsurgery.load(saved), tmp_path / "export").directory
    finally:
        os.umask(old)
    for directory in (saved, exported):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
        files = [p for p in directory.rglob("*") if p.is_file()]
        assert files and all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in files), \
            {p.name: oct(p.stat().st_mode & 0o777) for p in files}


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_umask_is_read_without_changing_it_where_proc_reports_it(monkeypatch, umask):
    """Setting and restoring the umask to read it races with other threads' new files; Linux reports it."""
    from wsurgery import io as wio

    old = os.umask(umask)
    try:
        expected = umask
        status = Path("/proc/self/status")
        if status.exists() and "Umask:" in status.read_text(errors="replace"):
            calls = []
            monkeypatch.setattr(wio.os, "umask", lambda m: calls.append(m) or umask)
            assert wio._current_umask() == expected and calls == []
            monkeypatch.undo()
        # where /proc cannot be read: the set-and-restore fallback, which leaves the umask as it was
        real_open = open
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: (_ for _ in ()).throw(OSError("no proc"))
                            if str(f) == "/proc/self/status" else real_open(f, *a, **k))
        assert wio._current_umask() == expected
        assert wio._umask_mode(directory=False) == 0o666 & ~umask
        monkeypatch.undo()
        assert os.umask(umask) == umask
    finally:
        os.umask(old)
