"""Helpers shared by the CLI tests (not a test module: its name starts with ``_``)."""

from __future__ import annotations

from typer.testing import CliRunner
from wsurgery.cli.main import app

__all__ = ["flat", "invoke", "ok", "one_error", "runner"]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Table text without box drawing and line wraps, for robust substring checks."""
    for ch in "│┃┏┓┗┛┡┩┠┨━─┌┐└┘╇┳┻┼├┤┬┴╈╋═":
        text = text.replace(ch, " ")
    return " ".join(text.split())


def ok(result) -> str:
    assert result.exit_code == 0, (result.exit_code, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr
    return flat(result.stdout)


def one_error(result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stdout + result.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]
