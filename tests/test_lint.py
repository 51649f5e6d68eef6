"""The code stays lint-clean under the rules pyproject.toml selects (ruff; pinned in the dev extra)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ruff", reason="ruff is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    command = [sys.executable, "-m", "ruff", "check", "--no-cache", "wsurgery", "cli", "tests", "benchmarks"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
