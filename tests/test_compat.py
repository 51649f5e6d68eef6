"""The timm version check: the pin in pyproject.toml and the check at import agree, and an older timm
is refused at import with the fix, not later with a misleading error (timm 1.0.29 on a GPU image
made save/export refuse models built with in_chans=1 or another act_layer, and sched=constant crash)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from wsurgery._compat import TIMM_MIN, check_timm

ROOT = Path(__file__).resolve().parents[1]


def test_the_pin_in_pyproject_is_the_version_checked_at_import():
    pin = re.search(r'"timm>=([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert tuple(int(p) for p in pin.split(".")) == TIMM_MIN


@pytest.mark.parametrize("version", ["1.0.31", "1.0.32.dev0", "1.1.0", "2.0"])
def test_new_enough_timm_passes(version):
    check_timm(version)


@pytest.mark.parametrize("version", ["1.0.29", "1.0.16", "0.9.16", "1.0.30.post1"])
def test_older_timm_is_refused_naming_the_fix(version):
    with pytest.raises(ImportError, match=rf"needs timm >= 1\.0\.31, this environment has timm {re.escape(version)}: "
                                          r"upgrade it with pip install -U 'timm>=1\.0\.31'"):
        check_timm(version)


def test_import_wsurgery_with_an_old_timm_says_so(tmp_path):
    fake = tmp_path / "timm"
    fake.mkdir()
    (fake / "__init__.py").write_text("__version__ = '1.0.29'\n")
    proc = subprocess.run([sys.executable, "-c", "import wsurgery"], capture_output=True, text=True,
                          env={"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": ""}, cwd=tmp_path, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "ImportError: wsurgery needs timm >= 1.0.31, this environment has timm 1.0.29: "
        "upgrade it with pip install -U 'timm>=1.0.31'")
