"""The core commands through the real app (``typer.testing.CliRunner``): convert, inspect,
export, verify; ``--force``; error paths; and the README flow ending in stock timm.

Error-path tests check the exit code, exactly one ``error:`` line on stderr, no traceback,
and that no output was created.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import timm
import torch
from _cli import flat, invoke, ok, one_error, runner
from _core_helpers import assert_no_standardization, assert_rel_close
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from wsurgery.cli._common import DEBUG_ENV
from wsurgery.cli.main import app

import wsurgery


@pytest.fixture(autouse=True)
def _offline_no_debug(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")



# ------------------------------------------------------------------------- the README flow


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    """``wsurgery convert resnet50 --no-pretrained --norm gn -o X``, then export, once."""
    torch.manual_seed(0)  # module-scoped: the same random weights whichever tests ran before
    root = tmp_path_factory.mktemp("flow")
    runs, export = root / "runs" / "r50-ws", root / "export" / "r50"
    convert = runner.invoke(app, ["convert", "resnet50", "--no-pretrained", "--norm", "gn", "-o", str(runs)])
    exported = runner.invoke(app, ["export", str(runs), "-o", str(export)])
    return dict(root=root, runs=runs, export=export, convert=convert, exported=exported)


def test_convert_prints_report_and_writes_directory(flow):
    out = ok(flow["convert"])
    assert sorted(p.name for p in flow["runs"].iterdir()) == ["config.json", "model.safetensors"]
    assert "convs standardized 53" in out  # resnet50: stem + 16 blocks x 3 + 4 downsample
    assert "norms replaced 53" in out
    assert "convs not followed by a norm 0" in out
    assert "conv1 Conv2d Conv2d+Weight" in out and "ws/timm" in out and "94 more" in out
    config = json.loads((flow["runs"] / "config.json").read_text())
    assert config["architecture"] == "resnet50"
    assert config["wsurgery"]["stage"] == "converted"
    assert config["wsurgery"]["surgery"]["norm"] == "gn"
    assert config["wsurgery"]["source"]["pretrained"] is False
    assert len(config["wsurgery"]["report"]["changes"]) == 106


def test_inspect_table_and_json(flow):
    out = ok(invoke("inspect", flow["runs"], "--all"))
    assert "resnet50 (converted)" in out
    assert "layer4.2.conv3 Conv2d ws timm eps=1e-06" in out
    assert "layer4.2.bn3 GroupNorm 32 groups / 2048 ch" in out
    assert "ws convs 53" in out and "group norms 53" in out
    assert "mode=ws convention=timm norm=gn" in out
    assert "timm.create_model('local-dir:DIR', pretrained=True)" in out
    data = json.loads(ok(invoke("inspect", flow["runs"], "--json")))
    assert data["stage"] == "converted" and data["timm_compatible"] is True
    assert data["counts"] == {"ws convs": 53, "group norms": 53}
    assert len(data["rows"]) == 106
    short = ok(invoke("inspect", flow["runs"]))
    assert "66 more (--all)" in short  # first 40 rows only
    # the export, too
    exp = ok(invoke("inspect", flow["export"]))
    assert "resnet50 (folded)" in exp and "plain convs 53" in exp and "ws convs" not in exp


def test_export_writes_timm_layout_and_self_verifies(flow):
    out = ok(flow["exported"])
    assert sorted(p.name for p in flow["export"].iterdir()) == ["config.json", "model.safetensors"]
    assert "stock timm" in out and "pass" in out and "FAIL" not in out
    config = json.loads((flow["export"] / "config.json").read_text())
    assert config["wsurgery"]["stage"] == "folded" and config["wsurgery"]["timm_compatible"] is True
    assert config["model_args"]["norm_layer"] == "groupnorm"


def test_verify_passes_and_prints_differences(flow):
    out = ok(invoke("verify", flow["export"], "--against", flow["runs"], "--num-random", "2"))
    assert "inputs 2" in out and "result pass" in out
    assert "top-1 agreement 100.0%" in out
    assert "max rel diff 0 (tolerance 1e-05)" in out  # fold is bit-exact


def test_readme_flow_loads_in_stock_timm_without_wsurgery(flow):
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    save_file({"x": x}, str(flow["root"] / "x.safetensors"))
    child = textwrap.dedent(
        f"""
        import sys, timm, torch
        from safetensors.torch import load_file, save_file
        m = timm.create_model('local-dir:{flow["export"]}', pretrained=True).eval()
        with torch.no_grad():
            y = m(load_file({str(flow["root"] / "x.safetensors")!r})["x"])
        assert 'wsurgery' not in sys.modules, 'stock timm imported wsurgery'
        assert not any('Parametrized' in type(mod).__name__ for mod in m.modules())
        save_file({{"y": y}}, {str(flow["root"] / "y.safetensors")!r})
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, env=env,
                          cwd=flow["root"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    y = load_file(str(flow["root"] / "y.safetensors"))["y"]
    reference = wsurgery.load(flow["runs"])
    with torch.no_grad():
        assert_rel_close(y, reference(x), 1e-5, "stock timm vs surgery directory")


# ---------------------------------------------------------------------- small models, options


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("small")
    runs = root / "lite0"
    result = runner.invoke(app, ["convert", "tf_efficientnet_lite0", "--no-pretrained", "--mode", "aws",
                                 "--norm", "gn", "--num-classes", "5", "--exclude", "classifier*", "-o", str(runs)])
    return dict(root=root, runs=runs, result=result)


def test_convert_options_are_recorded(small):
    ok(small["result"])
    model = wsurgery.load(small["runs"])
    cfg = model.wsurgery_config
    assert (cfg.mode, cfg.norm, cfg.exclude) == ("aws", "gn", ["classifier*"])
    assert model.num_classes == 5


def test_export_wsurgery_only_and_fold_bn_and_dtype(small):
    root = small["root"]
    out = ok(invoke("export", small["runs"], "-o", root / "e"))
    assert "wsurgery.load(DIR)" in out and "pass" in out  # gn on 24/40/... channels: not stock timm
    model = wsurgery.load(root / "e")
    assert_no_standardization(model, "export")
    out = ok(invoke("export", small["runs"], "-o", root / "e16", "--dtype", "fp16"))
    assert "fp16" in out and "pass" in out
    # fold-bn on a BN-kept conversion
    runs_bn = root / "lite0-bn"
    ok(invoke("convert", "tf_efficientnet_lite0", "--no-pretrained", "--mode", "aws", "-o", runs_bn))
    out = ok(invoke("export", runs_bn, "-o", root / "efb", "--fold-bn"))
    config = json.loads((root / "efb" / "config.json").read_text())
    assert len(config["wsurgery"]["fold_bn"]) > 0 and config["wsurgery"]["timm_compatible"] is False
    ok(invoke("verify", root / "efb", "--against", runs_bn, "--num-random", "2"))


def test_force(tmp_path):
    target = tmp_path / "out"
    ok(invoke("convert", "resnet18", "--no-pretrained", "-o", target))
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    one_error(invoke("convert", "resnet18", "--no-pretrained", "--mode", "aws", "-o", target), 1,
              "already exists", "--force")
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp
    assert wsurgery.load(target).wsurgery_config.mode == "ws"
    ok(invoke("convert", "resnet18", "--no-pretrained", "--mode", "aws", "-o", target, "--force"))
    assert wsurgery.load(target).wsurgery_config.mode == "aws"
    ok(invoke("export", target, "-o", tmp_path / "e"))
    one_error(invoke("export", target, "-o", tmp_path / "e"), 1, "already exists", "--force")
    ok(invoke("export", target, "-o", tmp_path / "e", "--force"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e", "out"]  # no temporary leftovers


def test_convert_from_checkpoint_remapped_by_order(tmp_path):
    """A checkpoint from "another implementation" (renamed keys, nested, same order and shapes)."""
    from collections import OrderedDict

    import timm

    source = timm.create_model("resnet18", pretrained=False, num_classes=4)
    state = source.state_dict()
    renamed = OrderedDict((f"net.p{i}", v) for i, v in enumerate(state.values()))
    torch.save({"model": renamed, "epoch": 9}, tmp_path / "other.pth")
    out = tmp_path / "out"
    one_error(invoke("convert", "resnet18", "--checkpoint", tmp_path / "other.pth", "--num-classes", "4", "-o", out),
              1, "remap-by-order")
    assert not out.exists()
    ok(invoke("convert", "resnet18", "--checkpoint", tmp_path / "other.pth", "--remap-by-order", "--num-classes", "4",
              "--mode", "aws", "-o", out))
    model = wsurgery.load(out)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert_rel_close(model(x), source.eval()(x), 1e-5, "aws from remapped checkpoint vs source")
    config = json.loads((out / "config.json").read_text())
    assert config["wsurgery"]["source"]["remap_by_order"] is True
    assert config["wsurgery"]["source"]["pretrained"] is False


# ------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "args,code,fragments",
    [
        (["convert", "resnet5O", "--no-pretrained"], 1, ["unknown model", "resnet50"]),
        (["convert", "resnet18", "--no-pretrained", "--mode", "big"], 2, ["mode"]),
        (["convert", "resnet18", "--no-pretrained", "--convention", "mine"], 2, ["unknown WS convention"]),
        (["convert", "resnet18", "--no-pretrained", "--norm", "gn", "--gn-group-rule", "error", "--gn-groups", "48"],
         1, ["not divisible by 48"]),
        (["convert", "resnet18", "--no-pretrained", "--include", "nothing*"], 1, ["match no conv"]),
        (["convert", "resnet18", "--checkpoint", "missing.pth"], 1, ["missing.pth", "not found"]),
    ],
)
def test_convert_errors(tmp_path, args, code, fragments):
    args = [a if a != "missing.pth" else str(tmp_path / "missing.pth") for a in args]
    one_error(invoke(*args, "-o", tmp_path / "out"), code, *fragments)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model", ["resnet18", "hf-hub:timm/resnet18.a1_in1k"])
def test_pretrained_offline_is_one_clear_line(tmp_path, model):
    args = ["convert", model, "-o", tmp_path / "out"] + (["--pretrained"] if model == "resnet18" else [])
    line = one_error(invoke(*args), 1, "could not fetch pretrained weights", "--checkpoint", "--no-pretrained")
    assert len(line) < 300
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(wsurgery.errors.NetworkUnavailableError, match="could not fetch pretrained weights"):
        wsurgery.load(model, pretrained=True)


def test_hf_hub_id_offline_without_weights_is_one_clear_line(tmp_path, monkeypatch):
    # an hf-hub: id needs its config.json from the hub even with --no-pretrained or a --checkpoint:
    # offline that is one line naming the way out (the architecture's name), not a minute of retries
    import importlib

    monkeypatch.setattr(importlib.import_module("wsurgery.load"), "_hub_unreachable", lambda: True)
    line = one_error(invoke("convert", "hf-hub:timm/resnet18.a1_in1k", "--no-pretrained", "-o", tmp_path / "out"),
                     1, "could not fetch the model config of hf-hub:timm/resnet18.a1_in1k", "resnet18",
                     "--checkpoint")
    assert len(line) < 400 and "retry" not in line.lower()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("resolves", [False, True])
def test_unreachable_hub_makes_huggingface_hub_answer_from_its_cache(monkeypatch, resolves):
    """No DNS for the hub: huggingface_hub runs in offline mode for the load (no minute of retries)."""
    import socket

    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def getaddrinfo(host, *args, **kwargs):
        if not resolves:
            raise socket.gaierror(-2, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 443))]

    seen = []

    def create_model(name, pretrained=False, **kwargs):
        seen.append((pretrained, constants.is_offline_mode()))
        raise LocalEntryNotFoundError("not in the cache")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(timm, "create_model", create_model)
    with pytest.raises(wsurgery.errors.NetworkUnavailableError, match="could not fetch pretrained weights"):
        wsurgery.load("resnet18", pretrained=True)
    assert seen == [(True, not resolves)]
    assert constants.HF_HUB_OFFLINE is False  # restored


def test_export_and_verify_errors(tmp_path, small):
    one_error(invoke("export", tmp_path / "nope", "-o", tmp_path / "e"), 1, "nope")
    one_error(invoke("export", small["runs"], "-o", tmp_path / "e", "--dtype", "fp8"), 2, "dtype")
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxruntime"):
        one_error(invoke("export", small["runs"], "-o", tmp_path / "e", "--format", "onnx", "--opset", "3"), 2,
                  "opset 3 (--opset) is not supported", "default 17")
    one_error(invoke("verify", tmp_path / "nope", "--against", small["runs"]), 1, "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # a different model fails verification with exit 1
    other = tmp_path / "other"
    ok(invoke("convert", "tf_efficientnet_lite0", "--no-pretrained", "--num-classes", "5", "-o", other))
    ok(invoke("export", other, "-o", tmp_path / "other-e"))
    line = one_error(invoke("verify", tmp_path / "other-e", "--against", small["runs"], "--num-random", "2"), 1,
                     "differs")
    assert "max rel diff" in line


def test_export_of_a_timm_name_needs_its_weights_named(tmp_path):
    """A timm model with its own ScaledStdConv2d exports by name, from the weights given, never silently random."""
    line = one_error(invoke("export", "nf_regnet_b0", "-o", tmp_path / "e"), 2, "--checkpoint", "--no-pretrained")
    assert "weights" in line and not (tmp_path / "e").exists()
    torch.manual_seed(0)
    original = timm.create_model("nf_regnet_b0", pretrained=False).eval()
    ckpt = tmp_path / "nf.safetensors"
    save_file(original.state_dict(), str(ckpt))
    ok(invoke("export", "nf_regnet_b0", "--checkpoint", ckpt, "-o", tmp_path / "e"))
    assert wsurgery.verify(tmp_path / "e", original, num_random=2).passed  # the checkpoint's weights, folded
    ok(invoke("export", "nf_regnet_b0", "--no-pretrained", "-o", tmp_path / "r"))
    assert not wsurgery.verify(tmp_path / "r", original, num_random=2).passed


def test_bad_numbers_and_inputs_are_usage_errors(tmp_path, small):
    one_error(invoke("convert", "resnet18", "--no-pretrained", "--num-classes", "-3", "-o", tmp_path / "o"), 2,
              "--num-classes", "-3")
    one_error(invoke("verify", small["runs"], "--against", small["runs"], "--rtol", "-1"), 2, "--rtol")
    one_error(invoke("verify", small["runs"], "--against", small["runs"], "--num-random", "-1"), 2, "--num-random")
    # compare checks its images before loading anything (resnet18 would need the network)
    line = one_error(invoke("compare", "resnet18", "resnet18", "--images", tmp_path / "missing"), 1, "missing")
    assert "pretrained" not in line
    (tmp_path / "fake.jpg").write_text("not an image")
    one_error(invoke("predict", small["runs"], tmp_path / "fake.jpg"), 1, "could be read")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fake.jpg"]


def test_help_texts():
    # every option of every command is listed in its --help, each with a help text of its own
    import typer.main

    group = typer.main.get_command(app)
    assert {"convert", "inspect", "export", "verify", "train", "predict", "compare", "demo"} <= set(group.commands)
    for name, command in group.commands.items():
        wide = CliRunner().invoke(app, [name, "--help"], env={"COLUMNS": "200"})  # no option name cut short
        out = flat(ok(wide))
        for param in command.params:
            if param.param_type_name != "option" or param.hidden:
                continue
            assert param.help, f"{name} {param.opts[0]} has no help text"
            assert param.opts[0] in out, f"{name} --help does not list {param.opts[0]}"


def test_debug_after_the_command_name_shows_the_traceback(capfd):
    from wsurgery.cli.main import main

    for argv in (["inspect", "resnet10tt", "--debug"], ["--debug", "inspect", "resnet10tt"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 1
        err = capfd.readouterr().err
        assert "Traceback" in err and "resnet10tt" in err, err
    with pytest.raises(SystemExit) as exc:
        main(["inspect", "resnet10tt"])
    assert exc.value.code == 1 and "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    # click 8.4 words it "No such option '--bogus'."; typer >= 0.26 runs its own click, which says it as before
    (["convert", "resnet18", "--bogus"], re.compile(r"No such option(: --bogus|( '--bogus')\.) \(see wsurgery convert "
                                                    r"--help\)")),
    (["convert", "resnet18", "--gn-groups", "abc"], "Invalid value for '--gn-groups'"),
    (["verify", "somewhere"], "Missing option '--against'"),
    (["bogus"], "No such command 'bogus'. (see wsurgery --help)"),
    # click raises this one in the app's context; the pointer names the command all the same
    (["verify", "x", "--img-size"], "Option '--img-size' requires an argument. (see wsurgery verify --help)"),
    (["--debug", "convert", "r", "--mode"], "(see wsurgery convert --help)"),
    (["verify", "x", "--against", "y", "--seed", str(2**64)], "Invalid value for '--seed'"),  # was an overflow
    (["demo", "--seed", "-1"], "Invalid value for '--seed'"),  # was numpy's error, after the data was read
])
def test_command_line_parse_errors_are_one_line_with_exit_code_2(capfd, argv, fragment):
    from wsurgery.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    found = fragment.search(lines[0]) if isinstance(fragment, re.Pattern) else fragment in lines[0]
    assert len(lines) == 1 and lines[0].startswith("error: ") and found, captured.err
    assert "Usage:" not in captured.err + captured.out


def test_help_and_no_arguments_print_the_help_and_exit_0(capfd):
    from wsurgery.cli.main import main

    for argv in ([], ["--help"], ["convert", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0, argv
        assert "Usage: wsurgery" in capfd.readouterr().out


def test_help_shows_what_each_option_takes():
    """typer printed `<bool>` beside every flag (which takes no value) and `<list[str]>` beside repeatable options."""
    from wsurgery.cli.main import COMMANDS

    for command in [*COMMANDS, None]:  # None: the app's own help
        text = invoke(*([command] if command else []), "--help").stdout
        assert "--help" in text
        rows = [line for line in text.splitlines() if ("<bool>" in line or "<list[str]>" in line) and "--" in line]
        assert rows == [], (command, rows)  # typer's own --help row included
    assert "PATTERN" in invoke("convert", "--help").stdout and "KEY=VALUE" in invoke("train", "--help").stdout
