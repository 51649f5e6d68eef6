"""Issue 6, part 5: fuzzing the loaders.

Random byte corruption of a safetensors header, and of ``config.json``, fed to the real CLI
(``wsurgery export DIR -o OUT``), must only ever give the one-line error: exit code 1, one
line on stderr, no traceback, no output written. A corruption the loaders cannot notice
(bytes that do not change what is loaded) may succeed, but then the export must be exactly
the model that was saved: never a silently different one.

Seeds are fixed and the number of cases bounded, so every run tests the same corruptions.
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from typer.testing import CliRunner
from wsurgery.cli._common import DEBUG_ENV
from wsurgery.cli.main import app

import wsurgery

runner = CliRunner()
NUM_CASES = 40


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, report = wsurgery.convert(timm.create_model("test_resnet", pretrained=False), mode="aws", norm="gn",
                                     convention="paper", trace=False)
    return wsurgery.save(model, tmp_path_factory.mktemp("fuzz") / "saved", report=report)


@pytest.fixture(scope="module")
def reference(saved):
    return wsurgery.load(saved)


def mutate(data: bytes, lo: int, hi: int, rng: random.Random) -> bytes:
    """One random corruption of ``data[lo:hi]``: overwrite, flip bits, delete, insert or truncate bytes."""
    buf = bytearray(data)
    kind = rng.choice(["overwrite", "bitflip", "delete", "insert", "truncate"])
    pos = rng.randrange(lo, hi)
    if kind == "overwrite":
        for _ in range(rng.randint(1, 3)):
            buf[rng.randrange(lo, hi)] = rng.randrange(256)
    elif kind == "bitflip":
        buf[pos] ^= 1 << rng.randrange(8)
    elif kind == "delete":
        del buf[pos:pos + rng.randint(1, 4)]
    elif kind == "insert":
        buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    else:
        del buf[pos:]
    return bytes(buf)


def run_export(source: Path, out: Path):
    return runner.invoke(app, ["export", str(source), "-o", str(out), "--no-verify"])


def check_outcome(result, out: Path, reference, case: str) -> str:
    """Either the one-line error and no output, or a success that equals the saved model."""
    assert "Traceback" not in result.stderr + result.stdout, case
    if result.exit_code == 0:
        check = wsurgery.verify(out, reference, num_random=1)
        assert check.max_abs == 0.0, f"{case}: corrupted input loaded as a different model ({check})"
        return "harmless"
    assert result.exit_code == 1, (case, result.exit_code, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (case, result.stderr)
    assert "(set WSURGERY_DEBUG" not in lines[0], f"{case}: an unexpected exception leaked: {lines[0]}"
    assert not out.exists(), f"{case}: output written despite the error"
    return lines[0].split(":", 2)[1].strip()[:40]


def corrupt_copy(saved: Path, dest: Path, name: str, data: bytes) -> Path:
    shutil.copytree(saved, dest)
    (dest / name).write_bytes(data)
    return dest


def fuzz_file(tmp_path, saved, reference, name, data, end, seed_base):
    """Export NUM_CASES copies of ``saved`` whose ``name`` has bytes [0, end) corrupted (seeded).

    Each must give the one-line error or the exact saved model; at least half must be refused.
    """
    outcomes = Counter()
    for seed in range(NUM_CASES):
        bad = mutate(data, 0, end, random.Random(seed_base + seed))
        src = corrupt_copy(saved, tmp_path / f"src{seed}", name, bad)
        out = tmp_path / f"out{seed}"
        outcomes[check_outcome(run_export(src, out), out, reference, f"{name} seed {seed_base + seed}")] += 1
        shutil.rmtree(src)
        shutil.rmtree(out, ignore_errors=True)
    assert sum(n for k, n in outcomes.items() if k != "harmless") >= NUM_CASES // 2, outcomes


def test_fuzz_safetensors_header(tmp_path, saved, reference):
    data = (saved / "model.safetensors").read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    fuzz_file(tmp_path, saved, reference, "model.safetensors", data, 8 + header_len, seed_base=0)


def test_fuzz_config_json(tmp_path, saved, reference):
    data = (saved / "config.json").read_bytes()
    fuzz_file(tmp_path, saved, reference, "config.json", data, len(data), seed_base=1000)


@pytest.mark.parametrize("field,value", [
    (("wsurgery", "surgery", "eps"), 0.5),
    (("wsurgery", "surgery", "gn_groups"), 4),
    (("wsurgery", "surgery", "convention"), "timm"),
    (("wsurgery", "surgery", "mode"), "ws"),
    (("wsurgery", "stage"), "folded"),
    (("wsurgery", "surgery", "gn_groups"), "32"),
    (("wsurgery", "surgery"), [1, 2]),
    (("wsurgery",), "text"),
    (("model_args",), {"num_classes": 3}),
    (("model_args",), {"no_such_arg": 1}),
    (("architecture",), 42),
])
def test_valid_json_with_wrong_values(tmp_path, saved, reference, field, value):
    """Edits that keep the JSON valid but change what it says are caught too, not loaded silently."""
    config = json.loads((saved / "config.json").read_text())
    node = config
    for key in field[:-1]:
        node = node[key]
    node[field[-1]] = value
    src = corrupt_copy(saved, tmp_path / "src", "config.json", json.dumps(config).encode())
    out = tmp_path / "out"
    assert check_outcome(run_export(src, out), out, reference, f"{field}={value!r}") != "harmless"
