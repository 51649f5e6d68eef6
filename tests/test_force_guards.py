"""--force replaces an earlier output, never what a command reads or a folder it did not make.

And the ways an output could be lost or left half-made: an export is checked (and its ONNX / .pt2
files written) before it is put in place, so a failed check keeps the export it would replace; a
SIGTERM cleans up like Ctrl-C; a demo that stopped part-way does not block the next one.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from _cli import invoke, ok, one_error
from _data import make_folder
from test_deploy import _broken_fold

import wsurgery
from wsurgery.errors import ConfigError, OutputExistsError, UsageError, VerificationError


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    model = wsurgery.load("test_efficientnet", pretrained=False, num_classes=3)
    return wsurgery.save(wsurgery.convert(model, mode="aws")[0], tmp_path_factory.mktemp("saved") / "m")


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_force_never_replaces_a_folder_holding_the_input(tmp_path, saved):
    project = tmp_path / "proj"
    src = _copy(saved, project / "src")
    (project / "notes.txt").write_text("mine")
    before = _snapshot(project)
    # onto the folder above the source, onto the source itself, onto a file inside it
    for out in (project, src, src / "model.safetensors"):
        one_error(invoke("export", src, "-o", out, "--force"), 2, "holds the input", "--force would delete it")
        one_error(invoke("convert", src, "-o", out, "--force"), 2, "holds the input")
    assert _snapshot(project) == before


def test_force_never_replaces_a_folder_the_command_did_not_write(tmp_path, saved):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    one_error(invoke("export", saved, "-o", mine, "--force"), 2, "not an earlier output", "config.json")
    assert (mine / "thesis.tex").read_text() == "precious"
    # an earlier export (config.json) and an empty folder are replaced
    ok(invoke("export", saved, "-o", tmp_path / "e"))
    ok(invoke("export", saved, "-o", tmp_path / "e", "--force"))
    (tmp_path / "empty").mkdir()
    ok(invoke("export", saved, "-o", tmp_path / "empty", "--force"))
    assert (tmp_path / "empty" / "config.json").is_file()
    # the library refuses the same, for save and export
    model = wsurgery.load(saved)
    with pytest.raises(UsageError, match="not an earlier output"):
        wsurgery.save(model, mine, force=True)
    with pytest.raises(UsageError, match="not an earlier output"):
        wsurgery.export(model, mine, force=True)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_force_never_replaces_the_current_directory(tmp_path, saved, monkeypatch):
    work = tmp_path / "work"
    _copy(saved, work)  # even one that looks like an output
    monkeypatch.chdir(work)
    before = _snapshot(work)
    for out in (".", str(work), str(tmp_path)):
        one_error(invoke("export", saved, "-o", out, "--force"), 2, "current directory")
    assert _snapshot(work) == before


def test_train_force_never_deletes_its_data(tmp_path, saved):
    data = make_folder(tmp_path / "runs" / "data", per_class=2, classes=("a", "b"))
    with pytest.raises(UsageError, match="holds the input"):
        wsurgery.train(saved, data, tmp_path / "runs", overrides={"epochs": 1}, force=True)
    with pytest.raises(UsageError, match="holds the input"):
        wsurgery.train(saved, data, tmp_path / "r", overrides={"epochs": 1}, export=tmp_path / "runs", force=True)
    assert len(list(data.rglob("*.png"))) == 4


def test_dangling_symlink_output(tmp_path, saved):
    link = tmp_path / "dangling"
    link.symlink_to(tmp_path / "nowhere")
    one_error(invoke("export", saved, "-o", link), 1, "symlink to a missing path", "--force")
    ok(invoke("export", saved, "-o", link, "--force"))
    assert link.is_dir() and not link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_failed_check_keeps_the_export_it_would_replace(tmp_path, saved, monkeypatch):
    model = wsurgery.load(saved)
    good = wsurgery.export(model, tmp_path / "e", verify=True)
    assert good.verification.passed
    before = _snapshot(tmp_path / "e")
    export_module = sys.modules["wsurgery.export"]  # `wsurgery.export` is the function
    monkeypatch.setattr(export_module, "fold", _broken_fold(export_module.fold))
    with pytest.raises(VerificationError, match="was left as it was"):
        wsurgery.export(model, tmp_path / "e", verify=True, force=True)
    assert _snapshot(tmp_path / "e") == before
    assert not list(tmp_path.glob(".e.*"))
    # into a new directory the failed export is written, and reported (the CLI exits 1)
    fresh = wsurgery.export(model, tmp_path / "new", verify=True)
    assert not fresh.verification.passed and fresh.verification.candidate == str(tmp_path / "new")


def test_deployment_files_are_written_and_checked_before_the_directory_appears(tmp_path, saved, monkeypatch):
    pytest.importorskip("onnxruntime")
    from wsurgery import deploy

    model = wsurgery.load(saved)
    result = wsurgery.export(model, tmp_path / "e", verify=True, formats=("onnx", "torch-export"), img_size=64)
    names = sorted(p.name for p in (tmp_path / "e").iterdir())
    assert names == ["config.json", "model.onnx", "model.pt2", "model.safetensors"]
    assert [d.path for d in result.deployments] == [tmp_path / "e" / "model.onnx", tmp_path / "e" / "model.pt2"]
    assert set(result.files) == {tmp_path / "e" / n for n in names}
    assert [name for name, check in result.checks if check.passed] == ["safetensors", "onnx", "torch-export"]
    assert all(check.candidate.startswith(str(tmp_path / "e")) for _, check in result.checks)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "export_program", interrupted)
    with pytest.raises(KeyboardInterrupt):
        wsurgery.export(model, tmp_path / "e2", formats=("onnx", "torch-export"), img_size=64)
    assert not (tmp_path / "e2").exists() and not list(tmp_path.glob(".e2.*"))
    with pytest.raises(ConfigError, match="unknown deployment format"):
        wsurgery.export(model, tmp_path / "e3", formats=("tflite",))


def test_sigterm_cleans_up_like_ctrl_c(tmp_path, saved):
    """SIGTERM (kill, timeout, docker stop) ended the process without cleanup: a hidden temporary output stayed.
    The stop is one line, and not called an error (it was "error: interrupted")."""
    from test_interrupt import caught_writing

    with caught_writing(["export", str(saved), "-o", str(tmp_path / "e")], tmp_path, "e", timeout=120) as (proc, _):
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        err = proc.stderr.read().decode()
    assert proc.returncode == 143 and err.strip() == "stopped: terminated (SIGTERM)", (proc.returncode, err)


def test_ctrl_c_is_a_stop_not_an_error(tmp_path, saved, monkeypatch):
    """Ctrl-C (a KeyboardInterrupt in the command) exits 130 with one line that does not call it an error."""
    from typer.testing import CliRunner
    from wsurgery.cli.main import app

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(wsurgery, "export", interrupted)
    res = CliRunner().invoke(app, ["export", str(saved), "-o", str(tmp_path / "e")])
    assert res.exit_code == 130 and res.output.strip() == "stopped: interrupted (Ctrl-C)", (res.exit_code, res.output)
    assert not (tmp_path / "e").exists()
    assert not list(tmp_path.glob(".e.*")) and not (tmp_path / "e").exists()


def test_demo_workdir_guards(tmp_path, monkeypatch):
    import wsurgery.demo as demo

    with pytest.raises(ConfigError, match="seed"):
        demo.DemoConfig(seed=-1)
    # the data and weights checks pass without them; the first step fails, as a broken data file would
    monkeypatch.setattr(demo, "_lite0_checkpoint", lambda: tmp_path / "ckpt.pth")
    monkeypatch.setattr(demo, "fashion_mnist_source", lambda *a, **k: tmp_path)

    def broken(*args, **kwargs):
        raise ConfigError("broken data")

    monkeypatch.setattr(demo, "fashion_mnist_folder", broken)
    work = tmp_path / "d"
    for _ in range(2):  # the unfinished workdir of the first run does not block the second
        with pytest.raises(ConfigError, match="broken data"):
            demo.run_demo(work, quick=True)
        assert (work / demo.UNFINISHED).exists()
    (work / demo.UNFINISHED).unlink()  # as a finished demo leaves it (with demo.json)
    with pytest.raises(OutputExistsError):
        demo.run_demo(work, quick=True)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    monkeypatch.chdir(mine)
    for target in (mine, Path(".")):
        with pytest.raises(UsageError, match=r"current directory|not an earlier output"):
            demo.run_demo(target, quick=True, force=True)
    assert (mine / "notes.txt").read_text() == "mine"


def test_img_size_must_be_positive(saved, tmp_path):
    wsurgery.export(wsurgery.load(saved), tmp_path / "e")
    for size in ("0", "-5"):
        one_error(invoke("verify", tmp_path / "e", "--against", saved, "--img-size", size), 2, "img_size")


@pytest.mark.parametrize("code, fix", [
    ("ENOSPC", "free space"), ("EROFS", "read-only: choose another path (-o)"),
    ("EACCES", "fix the permissions"), ("ENAMETOOLONG", "shorter path"), ("EIO", "check the path and the disk"),
])
def test_system_errors_are_one_line_with_a_fix(tmp_path, saved, monkeypatch, code, fix):
    """A full disk or a read-only folder printed e.g. `OSError: [Errno 30] ...` with no fix named; the fix
    fits the error (a read-only disk is not fixed by freeing space)."""
    import errno

    export_module = sys.modules["wsurgery.export"]
    number = getattr(errno, code)

    def failing(*args, **kwargs):
        raise OSError(number, os.strerror(number), str(tmp_path / ".e.tmp"))

    monkeypatch.setattr(export_module, "save_safetensors", failing)
    line = one_error(invoke("export", saved, "-o", tmp_path / "e"), 1, os.strerror(number), fix)
    assert str(tmp_path / ".e.tmp") in line and not list(tmp_path.glob(".e.*"))
    for advice in ("free space", "permissions", "shorter path", "read-only: "):
        assert (advice in line) == (advice in fix), line


def test_damaged_fashion_mnist_names_the_fix(tmp_path):
    from wsurgery.demo import read_idx
    from wsurgery.errors import DatasetError

    (tmp_path / "x.gz").write_bytes(b"not gzip at all")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x03\x00")
    for name in ("x.gz", "short"):
        with pytest.raises(DatasetError, match="reinstall"):
            read_idx(tmp_path / name)


def test_a_failed_command_leaves_no_empty_folders(tmp_path, saved):
    one_error(invoke("export", saved, "-o", tmp_path / "new" / "a" / "e", "--dtype", "fp64"), 2, "--dtype")
    one_error(invoke("convert", "no_such_model_xyz", "-o", tmp_path / "new" / "b" / "c", "--no-pretrained"), 1)
    assert not (tmp_path / "new").exists()
    ok(invoke("export", saved, "-o", tmp_path / "new" / "a" / "e"))  # a command that works makes them


def test_train_force_over_its_own_runs_and_never_onto_its_checkpoint(tmp_path, saved):
    data = make_folder(tmp_path / "data", per_class=2, classes=("a", "b"))
    fast = {"epochs": 1, "img_size": 32, "workers": 0, "val_split": 0}
    # a run that failed before its first checkpoint holds only recipe.yaml: --force may replace it
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "recipe.yaml").write_text("lr: 1.0e+30\n")
    wsurgery.train(saved, data, tmp_path / "failed", overrides=fast, force=True)
    assert (tmp_path / "failed" / "train.json").is_file()
    # a timm/HF model directory (config.json only) is no run
    with pytest.raises(UsageError, match="not an earlier output"):
        wsurgery.train(saved, data, _copy(saved, tmp_path / "model2"), overrides=fast, force=True)
    # the export never replaces the checkpoint that resumes the run
    for target in (tmp_path / "failed" / "last", tmp_path / "failed" / "last" / "x"):
        with pytest.raises(UsageError, match="checkpoint"):
            wsurgery.train(None, None, None, resume=tmp_path / "failed", export=target, force=True)
    assert (tmp_path / "failed" / "last" / "train_state.json").is_file()
    # -o a symlink with --force replaces the link, not the run it points to
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "failed")
    wsurgery.train(saved, data, link, overrides=fast, force=True)
    assert not link.is_symlink() and (link / "train.json").is_file()
    assert (tmp_path / "failed" / "train.json").is_file()
    # a plain file is no earlier output of a command that writes directories
    (tmp_path / "notes.txt").write_text("mine")
    one_error(invoke("export", saved, "-o", tmp_path / "notes.txt", "--force"), 2, "is a file")
    assert (tmp_path / "notes.txt").read_text() == "mine"
