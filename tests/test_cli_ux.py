"""The CLI piped into files and scripts, from a review: JSON without colour codes, paths shown whole and
as written, `~` after `--option=`, help that keeps option names whole, notes on stderr, --version."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import timm
import torch
from _cli import invoke, ok
from wsurgery.cli.main import main

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "FORCE_COLOR": "1"}


def _run(*args: str, colour: bool = True) -> subprocess.CompletedProcess:
    """``python -m wsurgery`` with stdout a pipe, as in CI logs (and FORCE_COLOR set, as many CI set it)."""
    env = ENV if colour else {k: v for k, v in ENV.items() if k != "FORCE_COLOR"}
    return subprocess.run([sys.executable, "-m", "wsurgery", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_json_is_plain_json_when_colour_is_forced():
    """`inspect --json | python -m json.tool` failed under FORCE_COLOR: rich coloured the JSON."""
    result = _run("inspect", "resnet10t", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["architecture"] == "resnet10t" and "\x1b[" not in result.stdout


def test_piped_help_keeps_option_names_whole():
    """At the 80 columns of a pipe, `convert --help` showed `--calib-temper…`, `--remap-by-ord…`."""
    result = _run("convert", "--help", colour=False)
    assert result.returncode == 0 and "…" not in result.stdout
    assert "--calib-temperature" in result.stdout and "--remap-by-order" in result.stdout


def test_version():
    import timm as timm_module

    import wsurgery

    result = _run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == (f"wsurgery {wsurgery.__version__} (torch {torch.__version__}, "
                                     f"timm {timm_module.__version__})")


def _whole(text: str) -> str:
    """The text with table borders, spaces and line breaks removed: a folded cell reads whole again."""
    for ch in "│┃┏┓┗┛┡┩━─┌┐└┘╇┳┻┼├┤┬┴":
        text = text.replace(ch, "")
    return "".join(text.split())


def test_paths_are_shown_whole_and_as_written(tmp_path):
    """Rich read `exp[lr=0.1]` as markup (printed `exp`), `e[/]3` crashed after writing, and a long
    path was cut to `…` at 80 columns."""
    torch.manual_seed(0)
    source = tmp_path / "src"
    ok(invoke("convert", "resnet10t", "--no-pretrained", "--mode", "aws", "-o", source))
    for name in ("exp[lr=0.1]", "e[/]3", "a_rather_long_folder_name_" * 4):
        out = tmp_path / name
        result = invoke("export", source, "-o", out)
        ok(result)
        assert (out / "config.json").is_file() and _whole(str(out)) in _whole(result.stdout), result.stdout


def test_a_home_path_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch):
    """`--output=~/x` (the shell expands only a leading ~) made a folder named `~` in the current one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(["convert", "resnet10t", "--no-pretrained", "--output=~/x"])
    assert done.value.code == 0
    assert (tmp_path / "home" / "x" / "config.json").is_file() and not (tmp_path / "~").exists()


def test_notes_go_to_stderr_and_the_result_to_stdout(tmp_path):
    from safetensors.torch import save_file

    save_file(timm.create_model("resnet10t").state_dict(), tmp_path / "w.safetensors")
    result = invoke("convert", "resnet10t", "--checkpoint", tmp_path / "w.safetensors", "--norm", "gn",
                    "-o", tmp_path / "gn")
    ok(result)
    assert "saved to" in result.stdout and "note:" not in result.stdout
    assert "without calibration" in " ".join(result.stderr.split())


def test_verify_without_inputs_is_a_usage_error(tmp_path):
    """--num-random 0 and no --images exited 1 (a user error) where other bad values exit 2."""
    from _cli import one_error

    torch.manual_seed(0)
    ok(invoke("convert", "resnet10t", "--no-pretrained", "--mode", "aws", "-o", tmp_path / "c"))
    ok(invoke("export", tmp_path / "c", "-o", tmp_path / "e"))
    one_error(invoke("verify", tmp_path / "e", "--against", tmp_path / "c", "--num-random", "0"), 2, "no inputs")


def test_resuming_a_finished_run_on_the_cli_says_so(tmp_path):
    from _data import make_train_val

    data = make_train_val(tmp_path / "data")
    torch.manual_seed(0)
    ok(invoke("convert", "test_efficientnet", "--no-pretrained", "--num-classes", "3", "--mode", "aws",
              "-o", tmp_path / "c"))
    ok(invoke("train", tmp_path / "c", "--data", data, "--recipe", "cpu-quick", "--set", "epochs=1",
              "--img-size", "32", "--set", "batch_size=8", "-o", tmp_path / "run"))
    again = invoke("train", "--resume", tmp_path / "run")
    ok(again)
    assert "already complete" in again.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_predict_takes_its_device_as_train_does(tmp_path, monkeypatch):
    """predict ran on the CPU under WSURGERY_DEVICE=cuda without a word (train refused): both read it now."""
    from _cli import one_error
    from _data import make_folder

    torch.manual_seed(0)
    ok(invoke("convert", "test_efficientnet", "--no-pretrained", "--mode", "aws", "-o", tmp_path / "c"))
    images = make_folder(tmp_path / "img", per_class=1)
    monkeypatch.setenv("WSURGERY_DEVICE", "cuda")
    one_error(invoke("predict", tmp_path / "c", images), 2, "WSURGERY_DEVICE=cuda", "CUDA is not available")
    monkeypatch.setenv("WSURGERY_DEVICE", "cpu")
    assert "probability" in ok(invoke("predict", tmp_path / "c", images))


def test_export_and_verify_print_json_a_ci_gate_can_read(tmp_path):
    torch.manual_seed(0)
    ok(invoke("convert", "resnet10t", "--no-pretrained", "--mode", "aws", "-o", tmp_path / "c"))
    exported = invoke("export", tmp_path / "c", "-o", tmp_path / "e", "--json")
    ok(exported)
    record = json.loads(exported.stdout)
    assert record["directory"] == str(tmp_path / "e") and record["verification"]["passed"] is True
    assert record["timm_compatible"] is True and record["files"][0].endswith("config.json")
    checked = invoke("verify", tmp_path / "e", "--against", tmp_path / "c", "--json")
    ok(checked)
    result = json.loads(checked.stdout)
    assert result["passed"] is True and result["num_inputs"] == 4 and result["max_rel"] <= result["rtol"]


def test_convert_and_train_print_json_with_progress_on_stderr(tmp_path):
    """--json was missing on convert and train; calibration's progress bar went to stdout (into the JSON)."""
    from _data import make_folder, make_train_val

    images = make_folder(tmp_path / "img", per_class=3)
    converted = _run("convert", "resnet10t", "--no-pretrained", "--mode", "aws", "--norm", "gn", "--calib-data",
                     str(images), "--calib-images", "8", "--calib-steps", "2", "--calib-batch", "4", "-o",
                     str(tmp_path / "c"), "--json")
    assert converted.returncode == 0, converted.stderr
    record = json.loads(converted.stdout)  # the whole of stdout is the JSON
    assert record["output"] == str(tmp_path / "c") and record["num_classes"] == 1000
    assert record["config"]["mode"] == "aws" and len(record["report"]["changes"]) > 0
    assert record["calibration"]["steps"] == 2 and record["calibration"]["phases"] == ["gn-init", "distill"]
    assert "distill" in converted.stderr  # the progress bars, on stderr
    data = make_train_val(tmp_path / "data")
    trained = _run("train", str(tmp_path / "c"), "--data", str(data), "--recipe", "cpu-quick", "--img-size", "32",
                   "--set", "epochs=2", "--set", "batch_size=4", "--set", "workers=0", "-o", str(tmp_path / "r"),
                   "--seed", "7", "--json")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["output"] == str(tmp_path / "r") and result["epochs"] == 2 == len(result["history"])
    assert result["steps"] == result["history"][-1]["step"] > 0
    assert result["recipe"]["img_size"] == 32 and result["recipe"]["seed"] == 7 and result["export"] is None
    assert result["best"]["top1"] == max(h["top1"] for h in result["history"])
    assert "epoch 2/2" in trained.stderr


@pytest.mark.parametrize("args", [["convert", "resnet10t", "--no-pretrained", "-o", "-"],
                                  ["convert", "resnet10t", "--no-pretrained", "-o-"],
                                  ["export", "x", "--output=-"], ["train", "x", "--data", "d", "-o", "r",
                                                                   "--export", "-"]])
def test_an_output_of_dash_is_refused_not_made_a_folder_named_dash(tmp_path, args):
    """`-o -` (stdout by convention) made a folder named `-`."""
    result = subprocess.run([sys.executable, "-m", "wsurgery", *args], capture_output=True, text=True, cwd=tmp_path,
                            env={**ENV, "FORCE_COLOR": ""}, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    option = "--output" if "--output=-" in args else "-o" if "-o-" in args else args[args.index("-") - 1]
    assert result.stderr.strip() == (f"error: {option} - would write to stdout, but this output is a folder or file "
                                     f"written whole; name one (e.g. {option} ./out) (see wsurgery {args[0]} --help)")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_outside_a_command_exits_143(monkeypatch):
    """typer >= 0.2x turns a KeyboardInterrupt that escapes a command (parsing, help) into exit 130."""
    import typer
    from wsurgery.cli import main as cli_main

    def boom() -> None:
        cli_main._terminate(15, None)

    monkeypatch.setattr(cli_main, "app", typer.Typer())
    cli_main.app.command("boom")(boom)
    cli_main.app.command("other")(lambda: None)
    with pytest.raises(SystemExit) as exc:
        cli_main._run(["boom"])
    assert exc.value.code == 143
    with pytest.raises(SystemExit) as exc:  # the flag does not outlive its command
        cli_main._run(["other"])
    assert exc.value.code == 0
