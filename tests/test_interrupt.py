"""Issue 6, part 3: nothing is lost when a run is killed part-way.

Each test starts the real ``wsurgery`` CLI in a subprocess, SIGKILLs it while it is writing
(no test hooks in the library: we watch the destination's folder for the temporary name the
atomic writers use), then checks that the destination is either absent or complete and valid,
and that a run started afterwards succeeds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
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


def kill_while_writing(args: list[str], folder: Path, name: str, timeout: float = 240.0) -> Path:
    """Run the CLI, SIGKILL it as soon as its output to ``folder/name`` is half-written."""
    proc = subprocess.Popen([*WSURGERY, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            tmp = _partial_write_in(folder, name)
            if tmp is not None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
                return tmp
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it was caught writing: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.002)
        pytest.fail("the run was never seen writing")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stderr.close()


def assert_valid_export(directory: Path, reference: Path) -> None:
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    result = wsurgery.verify(directory, reference, num_random=1)
    assert result.passed, result


def test_sigkill_during_export_leaves_no_partial_output(tmp_path, big_saved):
    out = tmp_path / "export"
    tmp = kill_while_writing(["export", str(big_saved), "-o", str(out), "--no-verify"], tmp_path, "export")
    assert tmp.name.startswith(".export.") and tmp.parent == tmp_path  # written beside the destination
    assert not out.exists(), "a killed export left a destination behind"
    # the next run needs no --force (nothing was there) and writes a complete, valid export
    wsurgery.export(wsurgery.load(big_saved), out)
    assert_valid_export(out, big_saved)


def test_sigkill_during_forced_overwrite_keeps_the_old_export(tmp_path, big_saved):
    out = tmp_path / "export"
    wsurgery.export(wsurgery.load(big_saved), out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    kill_while_writing(["export", str(big_saved), "-o", str(out), "--no-verify", "--force", "--dtype", "fp16"],
                       tmp_path, "export")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before, "the old export was damaged"
    assert_valid_export(out, big_saved)


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
