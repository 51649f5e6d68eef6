"""Issue 6, parts 1 and 2: the one error path, and bad input through the CLI.

Every bad input is fed to the real ``wsurgery`` app with ``typer.testing.CliRunner``; each
test checks the exit code, that stderr holds exactly one line naming the problem and the fix,
that no traceback is shown, and that no output (not even a temporary file) appeared.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from pathlib import Path

import pytest
import timm
import torch
import typer
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from wsurgery.cli._common import DEBUG_ENV, handle_errors
from wsurgery.cli.main import app

import wsurgery
from wsurgery import errors

runner = CliRunner()


@pytest.fixture(autouse=True)
def _no_debug_env(monkeypatch):
    # `--debug` sets WSURGERY_DEBUG in os.environ; monkeypatch restores it after each test
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def invoke(*args, env: dict[str, str] | None = None):
    """Run the CLI; warnings raised on the way (which a real run prints to stderr) are kept on the result."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = runner.invoke(app, [str(a) for a in args], env=env)
    result.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    return result


def error_line(result, code: int, *fragments: str) -> str:
    """Assert a one-line error with ``code`` mentioning every fragment; return the line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert not getattr(result, "warnings", []), f"a real run would print these to stderr too: {result.warnings}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert "(set WSURGERY_DEBUG" not in lines[0], f"an unexpected exception leaked: {lines[0]}"
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def only_entries(folder: Path, *names: str) -> None:
    """``folder`` holds exactly ``names``: no output and no temporary leftovers."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def state_dict_file(tmp_path: Path, name: str, arch: str = "test_resnet", **kwargs) -> Path:
    model = timm.create_model(arch, pretrained=False, **kwargs)
    path = tmp_path / name
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save({"state_dict": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory) -> Path:
    """A converted (ws + gn) test_resnet saved by wsurgery."""
    torch.manual_seed(0)  # module-scoped: the same random weights whichever tests ran before
    root = tmp_path_factory.mktemp("saved")
    model, report = wsurgery.convert(timm.create_model("test_resnet", pretrained=False), mode="aws", norm="gn")
    return wsurgery.save(model, root / "ws", report=report)


def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# ---------------------------------------------------------------------------------------------
# Part 1: one error path


def test_every_error_is_a_wsurgery_error_and_a_builtin():
    builtin_bases = (ValueError, FileNotFoundError, FileExistsError, AssertionError, ImportError, ConnectionError)
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.WSurgeryError)
        assert cls.exit_code in (1, 2), name
        if cls is not errors.WSurgeryError:
            assert issubclass(cls, builtin_bases), f"{name} subclasses no builtin a caller would catch"
    assert errors.UsageError.exit_code == 2 and errors.ConfigError.exit_code == 2
    assert errors.OutputExistsError.exit_code == 1 and errors.CheckpointError.exit_code == 1


def _raiser_app(exc: BaseException) -> typer.Typer:
    small = typer.Typer()

    @small.command()
    @handle_errors
    def boom() -> None:
        raise exc

    return small


@pytest.mark.parametrize("name", [n for n in errors.__all__ if n != "WSurgeryError"])
def test_handle_errors_maps_each_error_to_one_line_and_its_exit_code(name):
    cls = getattr(errors, name)
    result = runner.invoke(_raiser_app(cls("the problem\n  spread over lines; the fix")), [])
    line = error_line(result, cls.exit_code, "the problem spread over lines; the fix")
    assert line == "error: the problem spread over lines; the fix"
    assert result.stdout == ""


def test_unexpected_exception_is_one_line_with_a_debug_hint():
    result = runner.invoke(_raiser_app(RuntimeError("kaput")), [])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: RuntimeError: kaput (set {DEBUG_ENV}=1 or pass --debug for the traceback)"]


def test_debug_env_shows_the_traceback_for_unexpected_exceptions():
    result = runner.invoke(_raiser_app(RuntimeError("kaput")), [], env={DEBUG_ENV: "1"})
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: RuntimeError: kaput")


def test_usage_errors_exit_2(tmp_path):
    # typer/click's own usage errors
    result = invoke("convert", "resnet18", "--no-such-option")
    assert result.exit_code == 2
    assert "No such option" in result.stderr and "Traceback" not in result.stderr
    result = invoke("convert")  # missing argument
    assert result.exit_code == 2
    # wsurgery's own ConfigError (a bad option value) is a usage error too
    result = invoke("convert", "resnet18", "--no-pretrained", "--mode", "bogus", "-o", tmp_path / "never")
    error_line(result, 2, "--mode must be 'ws' or 'aws'", "'bogus'")
    only_entries(tmp_path)


def test_no_traceback_by_default_and_traceback_with_debug(tmp_path):
    out = tmp_path / "out"
    plain = invoke("convert", "resnt18", "-o", out)
    error_line(plain, 1, "unknown model 'resnt18'")
    for args, env in ((("--debug", "convert", "resnt18", "-o", out), None),
                      (("convert", "resnt18", "-o", out), {DEBUG_ENV: "1"})):
        result = invoke(*args, env=env)
        assert result.exit_code == 1
        assert "Traceback (most recent call last)" in result.stderr
        assert "ModelNotFoundError" in result.stderr
        assert result.stderr.strip().splitlines()[-1] == plain.stderr.strip()
    only_entries(tmp_path)


def test_messages_are_printed_verbatim_not_as_markup(tmp_path):
    """Names with brackets (rich markup syntax) are shown as they are and never crash the error path."""
    for name in ("[red]", "my[bold]net", "resnet18[onnx]"):
        error_line(invoke("convert", name, "--no-pretrained", "-o", tmp_path / "out"), 1, f"unknown model '{name}'")
    for name in ("[/x]", "[/]", "a[/bold]b"):  # closing tags that match nothing made rich raise
        error_line(invoke("convert", name, "--no-pretrained", "-o", tmp_path / "out"), 1, f"{name} does not exist")
        error_line(invoke("export", tmp_path / name, "-o", tmp_path / "out"), 1, f"{name} does not exist")
    result = runner.invoke(_raiser_app(errors.MissingDependencyError("pip install 'wsurgery[onnx]' [/]")), [])
    error_line(result, 1, "pip install 'wsurgery[onnx]' [/]")
    only_entries(tmp_path)


# ---------------------------------------------------------------------------------------------
# Part 2: bad input


def test_unknown_model_suggests_closest_timm_names(tmp_path):
    out = tmp_path / "out"
    line = error_line(invoke("convert", "resnet_18", "--no-pretrained", "-o", out), 1,
                      "unknown model 'resnet_18'", "did you mean")
    assert "resnet18" in line.split("did you mean", 1)[1]
    line = error_line(invoke("convert", "efficientnet-lite0", "--no-pretrained", "-o", out), 1, "did you mean")
    assert "efficientnet_lite0" in line.split("did you mean", 1)[1]
    only_entries(tmp_path)


def test_checkpoint_for_another_architecture_names_first_key(tmp_path):
    ckpt = state_dict_file(tmp_path, "r18.safetensors", "resnet18")
    out = tmp_path / "out"
    line = error_line(invoke("convert", "resnet34", "--checkpoint", ckpt, "-o", out), 1,
                      "r18.safetensors does not fit this model", "missing key 'layer1.2.conv1.weight'",
                      "(64, 64, 3, 3)")
    assert "another architecture" in line
    only_entries(tmp_path, "r18.safetensors")


def test_checkpoint_with_another_class_count_names_key_and_shapes(tmp_path):
    ckpt = state_dict_file(tmp_path, "r18-10.pth", "test_resnet", num_classes=10)
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", ckpt, "-o", out), 1,
               "'fc.weight' is (10, 96) in the checkpoint but (1000, 96) in the model", "--num-classes")
    only_entries(tmp_path, "r18-10.pth")
    # the fix the message names works: the checkpoint's own head is kept ...
    result = invoke("convert", "test_resnet", "--checkpoint", ckpt, "--num-classes", "10", "--mode", "aws", "-o", out)
    assert result.exit_code == 0, result.stderr
    reference = timm.create_model("test_resnet", num_classes=10)
    reference.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    reloaded = wsurgery.load(out)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(reloaded(x), reference.eval()(x), rtol=1e-5, atol=1e-5)
    # ... and another class count drops it for a new head, keeping the backbone
    out5 = tmp_path / "out5"
    result = invoke("convert", "test_resnet", "--checkpoint", ckpt, "--num-classes", "5", "--mode", "aws", "-o", out5)
    assert result.exit_code == 0, result.stderr
    five = wsurgery.load(out5)
    assert five.fc.out_features == 5
    torch.testing.assert_close(five.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "header-length"])
def test_truncated_or_corrupt_safetensors_checkpoint(tmp_path, damage):
    ckpt = state_dict_file(tmp_path, "w.safetensors", "test_resnet")
    data = ckpt.read_bytes()
    damaged = {
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(4096),
        "empty": b"",
        "header-length": (2**40).to_bytes(8, "little") + data[8:],
    }[damage]
    ckpt.write_bytes(damaged)
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", ckpt, "-o", out), 1,
               "w.safetensors is not a valid safetensors file", "truncated or corrupt")
    only_entries(tmp_path, "w.safetensors")


def test_truncated_weights_in_a_saved_directory(tmp_path, saved_dir):
    src = copy_dir(saved_dir, tmp_path / "src")
    weights = src / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    out = tmp_path / "out"
    error_line(invoke("export", src, "-o", out), 1, "model.safetensors is not a valid safetensors file")
    only_entries(tmp_path, "src")


class _MakesMarker:
    """Unpickling this runs ``os.makedirs(marker)``: code execution, but harmless."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.mark.parametrize("suffix,writer", [(".pth", "torch"), (".pt", "torch-legacy"), (".bin", "pickle")])
def test_pickle_that_would_run_code_is_refused(tmp_path, suffix, writer):
    marker = tmp_path / "code-ran"
    model = timm.create_model("test_resnet", pretrained=False)
    ckpt = tmp_path / f"evil{suffix}"
    obj = {"state_dict": model.state_dict(), "payload": _MakesMarker(marker)}
    if writer == "pickle":
        with open(ckpt, "wb") as f:
            pickle.dump(obj, f, protocol=pickle.HIGHEST_PROTOCOL)
    else:
        torch.save(obj, ckpt, _use_new_zipfile_serialization=writer == "torch")
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", ckpt, "-o", out), 1,
               f"evil{suffix} holds pickled objects beyond plain tensors", "refused", ".safetensors")
    assert not marker.exists(), "the pickle's code ran"
    only_entries(tmp_path, ckpt.name)
    # control: the payload is live, a plain unpickle does run it
    if writer == "pickle":
        with open(ckpt, "rb") as f:
            pickle.load(f)
    else:
        torch.load(ckpt, weights_only=False)
    assert marker.is_dir()


def test_missing_paths(tmp_path):
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", tmp_path / "nope.pth", "-o", out), 1,
               "nope.pth not found")
    error_line(invoke("export", tmp_path / "no-such-dir", "-o", out), 1, "no-such-dir does not exist")
    error_line(invoke("verify", tmp_path / "no-export", "--against", tmp_path / "no-ref"), 1,
               "no-export does not exist")
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    error_line(invoke("export", empty, "-o", out), 1, "config.json not found")
    only_entries(tmp_path, "empty-dir")


def test_checkpoint_that_is_a_directory_or_not_a_checkpoint(tmp_path):
    folder = tmp_path / "ckpt.pth"
    folder.mkdir()
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", folder, "-o", out), 1, "ckpt.pth is a directory")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    error_line(invoke("convert", "test_resnet", "--checkpoint", text, "-o", out), 1,
               "notes.pth is not a readable checkpoint", ".safetensors")
    # torch.load raises KeyError on some non-checkpoints; it is the same one line, never a raw KeyError
    odd = tmp_path / "notes.txt"
    odd.write_text("hello world this is text\n")
    line = error_line(invoke("convert", "test_resnet", "--checkpoint", odd, "-o", out), 1,
                      "notes.txt is not a readable checkpoint")
    assert "KeyError" not in line and "weights_only" not in line
    only_entries(tmp_path, "ckpt.pth", "notes.pth", "notes.txt")


def test_safetensors_checkpoint_under_another_name_is_read(tmp_path):
    ckpt = state_dict_file(tmp_path, "w.safetensors", "test_resnet")
    renamed = ckpt.rename(tmp_path / "w.weights")
    res = invoke("convert", "test_resnet", "--checkpoint", renamed, "--mode", "aws", "-o", tmp_path / "out")
    assert res.exit_code == 0, res.output
    expected = load_file(renamed)
    loaded = wsurgery.load(tmp_path / "out").state_dict()
    assert torch.equal(loaded["fc.weight"], expected["fc.weight"])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_checkpoint(tmp_path):
    ckpt = state_dict_file(tmp_path, "w.safetensors", "test_resnet")
    ckpt.chmod(0)
    try:
        error_line(invoke("convert", "test_resnet", "--checkpoint", ckpt, "-o", tmp_path / "out"), 1, "w.safetensors")
    finally:
        ckpt.chmod(0o600)
    only_entries(tmp_path, "w.safetensors")


def test_unreadable_directory_source(tmp_path, saved_dir):
    """A saved directory whose config.json is not a file (a dangling symlink) is reported, not crashed on."""
    src = copy_dir(saved_dir, tmp_path / "src")
    (src / "config.json").unlink()
    (src / "config.json").symlink_to(tmp_path / "gone.json")
    error_line(invoke("export", src, "-o", tmp_path / "out"), 1, "config.json not found")
    only_entries(tmp_path, "src")


def test_existing_output_needs_force(tmp_path, saved_dir):
    out = tmp_path / "exp"
    assert invoke("export", saved_dir, "-o", out).exit_code == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    error_line(invoke("export", saved_dir, "-o", out), 1, "already exists", "--force")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # untouched
    conv_out = tmp_path / "conv"
    conv_out.write_text("my notes")
    error_line(invoke("convert", "test_resnet", "--no-pretrained", "-o", conv_out), 1, "already exists", "--force")
    assert conv_out.read_text() == "my notes"
    only_entries(tmp_path, "exp", "conv")
    result = invoke("export", saved_dir, "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert wsurgery.verify(out, saved_dir).passed
    only_entries(tmp_path, "exp", "conv")


def _poison(directory: Path, key_part: str, value: float) -> str:
    weights = directory / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if key_part in k and tensors[k].is_floating_point())
    tensors[key].view(-1)[0] = value
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return key


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_refused_by_export(tmp_path, saved_dir, value):
    src = copy_dir(saved_dir, tmp_path / "src")
    key = _poison(src, "layer2.0.conv2.parametrizations.weight.original", value)
    assert key
    out = tmp_path / "out"
    error_line(invoke("export", src, "-o", out), 1, "layer2.0.conv2.weight holds NaN or inf", "refusing to fold")
    only_entries(tmp_path, "src")


def test_non_finite_weights_refused_outside_convs(tmp_path, saved_dir):
    """A NaN that no fold touches (a norm or classifier weight) must not be exported either."""
    src = copy_dir(saved_dir, tmp_path / "src")
    _poison(src, "fc.weight", float("nan"))
    out = tmp_path / "out"
    error_line(invoke("export", src, "-o", out), 1, "fc.weight holds NaN or inf")
    only_entries(tmp_path, "src")


def test_weights_that_overflow_the_export_dtype_are_refused(tmp_path, saved_dir):
    src = copy_dir(saved_dir, tmp_path / "src")
    _poison(src, "fc.weight", 1e6)  # finite in fp32, inf in fp16 (max 65504), fine in bf16
    out = tmp_path / "out"
    error_line(invoke("export", src, "-o", out, "--dtype", "fp16"), 1, "fc.weight overflows to inf in fp16",
               "--dtype fp32 or bf16")
    only_entries(tmp_path, "src")
    result = invoke("export", src, "-o", out, "--dtype", "bf16", "--no-verify")
    assert result.exit_code == 0, result.stderr
    assert load_file(str(out / "model.safetensors"))["fc.weight"].dtype == torch.bfloat16


def test_non_finite_checkpoint_refused_by_convert(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        model.layer1[0].conv1.weight[3, 0, 0, 0] = float("inf")
    ckpt = tmp_path / "inf.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    out = tmp_path / "out"
    error_line(invoke("convert", "test_resnet", "--checkpoint", ckpt, "-o", out), 1,
               "layer1.0.conv1.weight holds NaN or inf")
    only_entries(tmp_path, "inf.safetensors")


def test_zero_variance_filters_are_handled_and_reported(tmp_path):
    model = timm.create_model("test_resnet", pretrained=False)
    with torch.no_grad():
        model.conv1[0].weight[:3] = 0.25  # three constant filters: zero variance
        model.layer1[0].conv2.weight[5] = 0.0  # zero-initialised filter
    ckpt = tmp_path / "zv.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    for mode in ("ws", "aws"):
        out = tmp_path / f"out-{mode}"
        result = invoke("convert", "test_resnet", "--checkpoint", ckpt, "--mode", mode, "--convention", "paper",
                        "-o", out)
        assert result.exit_code == 0, result.stderr
        assert "zero-variance" in result.stdout  # the table note; counts are in the saved report
        report = json.loads((out / "config.json").read_text())["wsurgery"]["report"]
        assert report["zero_variance_filters"] == {"conv1.0": 3, "layer1.0.conv2": 1}
        exp = tmp_path / f"exp-{mode}"
        result = invoke("export", out, "-o", exp)
        assert result.exit_code == 0, result.stderr
        folded = load_file(str(exp / "model.safetensors"))
        assert all(torch.isfinite(t).all() for t in folded.values())
        if mode == "ws":  # a constant filter standardizes to zeros (up to float rounding), not NaN
            torch.testing.assert_close(folded["conv1.0.weight"][:3], torch.zeros_like(folded["conv1.0.weight"][:3]),
                                       rtol=0, atol=1e-2)
        else:  # adaptive WS reproduces the constant filter
            torch.testing.assert_close(folded["conv1.0.weight"], model.conv1[0].weight)


def test_channel_counts_no_group_count_divides(tmp_path):
    # test_resnet has norms of 16, 32, 48, 96 and 192 channels: none but 32 and 96 divide by 32 ... 24
    out = tmp_path / "gcd"
    result = invoke("convert", "test_resnet", "--no-pretrained", "--norm", "gn", "--gn-groups", "24", "-o", out)
    assert result.exit_code == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    notes = {c["name"]: c["note"] for c in config["wsurgery"]["report"]["changes"]
             if c["new_type"].startswith("GroupNorm")}
    assert notes["conv1.1"] == "8 groups"  # gcd(16, 24)
    assert notes["layer2.0.bn1"] == "24 groups"  # 48 divides
    assert notes["layer3.0.bn3"] == "24 groups"  # 192 divides
    assert notes["bn1"] == "8 groups"  # gcd(32, 24)
    model = wsurgery.load(out)
    assert model.conv1[1].num_groups == 8 and model.layer2[0].bn1.num_groups == 24
    out = tmp_path / "div"
    assert invoke("convert", "test_resnet", "--no-pretrained", "--norm", "gn", "--gn-groups", "24",
                  "--gn-group-rule", "divisor", "-o", out).exit_code == 0
    assert wsurgery.load(out).conv1[1].num_groups == 16  # largest divisor of 16 not above 24
    # refused when asked to, naming the layer and the fix; nothing written
    refused = tmp_path / "refused"
    error_line(invoke("convert", "test_resnet", "--no-pretrained", "--norm", "gn", "--gn-groups", "24",
                      "--gn-group-rule", "error", "-o", refused), 1,
               "conv1.1: 16 channels are not divisible by 24 groups", "gn_group_rule")
    error_line(invoke("convert", "test_resnet", "--no-pretrained", "--norm", "gn", "--gn-group-size", "5",
                      "-o", refused), 1, "16 channels do not split into groups of 5")
    only_entries(tmp_path, "gcd", "div")


# ---------------------------------------------------------------------------------------------
# Part 2, training side: datasets and recipes through `wsurgery train`

TRAIN_FAST = ["--recipe", "cpu-quick", "--img-size", "32", "--set", "epochs=1", "--set", "batch_size=4",
              "--set", "workers=0", "--set", "warmup_steps=1"]


@pytest.fixture(scope="module")
def train_model(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model, _ = wsurgery.convert(timm.create_model("test_efficientnet", pretrained=False, num_classes=3),
                                mode="aws", norm="gn", trace=False)
    return wsurgery.save(model, tmp_path_factory.mktemp("train-model") / "conv")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def train_cli(model_dir: Path, data: Path, out: Path, *extra: str):
    return invoke("train", model_dir, "--data", data, "-o", out, *TRAIN_FAST, *extra)


def images(root: Path, per_class: int = 4, classes=("circle", "square", "stripes")) -> Path:
    from _data import make_folder  # the training tests' synthetic images

    return make_folder(root, per_class=per_class, size=24, classes=classes)


def test_train_empty_dataset(tmp_path, train_model):
    data = tmp_path / "data"
    data.mkdir()
    out = tmp_path / "run"
    error_line(train_cli(train_model, data, out), 1, f"{data} holds no images", "<class>/<images>")
    (data / "circle").mkdir()
    (data / "square").mkdir()
    error_line(train_cli(train_model, data, out), 1, f"{data} holds no images")
    only_entries(tmp_path, "data")


def test_train_one_class(tmp_path, train_model):
    data = images(tmp_path / "data", classes=("circle",))
    out = tmp_path / "run"
    error_line(train_cli(train_model, data, out), 1, "one class", "'circle'", "at least 2")
    only_entries(tmp_path, "data")


def test_train_skips_and_counts_corrupt_and_non_image_files(tmp_path, train_model):
    data = images(tmp_path / "data")
    (data / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    (data / "square" / "garbage.jpg").write_bytes(os.urandom(300))
    (data / "stripes" / "notes.txt").write_text("not an image")
    (data / "stripes" / "empty.png").write_bytes(b"")
    whole = (data / "stripes" / "stripes_000.png").read_bytes()
    (data / "stripes" / "truncated.png").write_bytes(whole[: len(whole) // 2])  # passes the header check
    out = tmp_path / "run"
    result = train_cli(train_model, data, out)
    assert result.exit_code == 0, result.stderr + result.stdout
    assert "skipped 3 unreadable file(s)" in " ".join(result.stderr.split())  # a note: on stderr
    summary = json.loads((out / "train.json").read_text())
    assert sorted(Path(p).name for p in summary["skipped_files"]) == ["broken.png", "empty.png", "garbage.jpg"]
    # read once per epoch (train or val split), replaced by the next sample, counted
    assert summary["decode_failures"] == 1 and any("failed to decode" in n for n in summary["notes"])
    assert summary["status"] == "completed"
    assert wsurgery.load(out).num_classes == 3


def test_train_converts_gray_rgba_palette_and_16bit_images(tmp_path, train_model):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    made = 0
    for cls, mode in (("gray", "L"), ("rgba", "RGBA"), ("palette", "P"), ("deep", "I;16")):
        (data / cls).mkdir(parents=True)
        for i in range(3):
            if mode == "I;16":
                img = Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16))
                assert img.mode in ("I;16", "I")
            elif mode == "P":
                img = Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).convert("P")
            else:
                img = Image.fromarray(rng.integers(0, 255, (20, 20, len(mode)), dtype=np.uint8).squeeze(), mode=mode)
            img.save(data / cls / f"{i}.png")
            made += 1
    out = tmp_path / "run"
    result = train_cli(train_model, data, out, "--val-split", "0.34")
    assert result.exit_code == 0, result.stderr + result.stdout
    summary = json.loads((out / "train.json").read_text())
    assert summary["skipped_files"] == []
    assert summary["status"] == "completed"


def _csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_train_csv_with_missing_columns_or_unknown_labels(tmp_path, train_model):
    data = images(tmp_path / "imgs")
    rows = [f"{p.relative_to(data)},{p.parent.name}" for p in sorted(data.rglob("*.png"))]
    out = tmp_path / "run"
    bad_header = _csv(data / "bad.csv", "file,class\n" + "\n".join(rows) + "\n")
    error_line(train_cli(train_model, bad_header, out), 1, "bad.csv lacks the column(s) path, label",
               "found file, class", "`path,label`")
    train_csv = _csv(data / "train.csv", "path,label\n" + "\n".join(rows) + "\n")
    val_csv = _csv(data / "val.csv", "path,label\n" + f"{rows[0].split(',')[0]},triangle\n")
    error_line(train_cli(train_model, train_csv, out, "--val-data", val_csv), 1,
               "val.csv has labels the training set does not: triangle")
    only_entries(tmp_path, "imgs")


@pytest.mark.parametrize("setting,fragments", [
    ("learning_rate=0.1", ["unknown key `learning_rate`", "did you mean `"]),
    ("batchsize=2", ["unknown key `batchsize`", "did you mean `batch_size`"]),
    ("epochs=two", ["`epochs` must be", "'two'"]),
    ("lr=-0.1", ["`lr` must be", "-0.1"]),
    ("batch_size=0", ["`batch_size` must be", "0"]),
])
def test_train_recipe_errors_from_set(tmp_path, train_model, setting, fragments):
    data = images(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    error_line(train_cli(train_model, data, out, "--set", setting), 2, *fragments)
    only_entries(tmp_path, "data")


def test_train_recipe_file_errors(tmp_path, train_model):
    data = images(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    for text, fragments in (
        ("lr: 0.01\nmomentun: 0.9\n", ["unknown key `momentun`", "`momentum`"]),
        ("lr: fast\n", ["`lr` must be", "'fast'"]),
        ("batch_size: -4\n", ["`batch_size` must be", "-4"]),
        ("lr: [0.1\n", ["not valid YAML"]),
        ("- lr\n- 0.1\n", ["must be a mapping"]),
    ):
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(text)
        result = invoke("train", train_model, "--data", data, "-o", out, "--recipe", recipe)
        error_line(result, 2, *fragments)
    recipe.unlink()
    only_entries(tmp_path, "data")


def test_train_bad_model_writes_no_run_directory(tmp_path):
    data = images(tmp_path / "data", per_class=2)
    out = tmp_path / "run"
    error_line(train_cli(tmp_path / "no-such-model", data, out), 1, "no-such-model")
    error_line(train_cli("resnt18", data, out), 1, "unknown model 'resnt18'", "did you mean")
    only_entries(tmp_path, "data")


def test_a_weights_file_as_the_model_says_what_to_pass(tmp_path):
    ckpt = state_dict_file(tmp_path, "w.safetensors", "test_resnet")
    for args in (["inspect", ckpt], ["convert", ckpt, "-o", tmp_path / "out"]):
        error_line(invoke(*args), 2, "w.safetensors is a file, not a model", "as its checkpoint (--checkpoint)")
    graph = tmp_path / "model.onnx"
    graph.write_bytes(b"\0")
    error_line(invoke("inspect", graph), 2, "model.onnx is an ONNX/torch.export graph", "export directory")
    only_entries(tmp_path, "w.safetensors", "model.onnx")


def test_train_a_saved_directory_with_a_checkpoint_is_refused(tmp_path, train_model):
    ckpt = state_dict_file(tmp_path, "w.safetensors", "test_resnet")
    data = images(tmp_path / "data", per_class=2)
    error_line(train_cli(train_model, data, tmp_path / "run", "--checkpoint", str(ckpt)), 2,
               "already holds its weights; drop --checkpoint")
    only_entries(tmp_path, "w.safetensors", "data")


def test_verify_against_a_model_with_other_classes_or_a_name(tmp_path, saved_dir):
    export = tmp_path / "e"
    wsurgery.export(wsurgery.load(saved_dir), export)
    other = tmp_path / "five"
    wsurgery.save(wsurgery.convert(timm.create_model("test_resnet", num_classes=5), mode="aws")[0], other)
    error_line(invoke("verify", export, "--against", other, "--num-random", "1"), 2,
               "outputs of shape", "(5,)", "against the model it was exported from")
    error_line(invoke("verify", export, "--against", "test_resnet"), 1,
               "(the reference, --against) does not exist")
    only_entries(tmp_path, "e", "five")


@pytest.mark.parametrize("args,flag", [
    (["convert", "test_resnet", "--no-pretrained", "--calib-data", "PHOTOS", "--calib-images", "0"], "--calib-images"),
    (["convert", "test_resnet", "--no-pretrained", "--calib-data", "PHOTOS", "--calib-crops", "0"], "--calib-crops"),
    (["compare", "test_resnet", "test_resnet", "--images", "PHOTOS", "--limit", "0"], "--limit"),
    (["compare", "test_resnet", "test_resnet", "--images", "PHOTOS", "--crops-per-image", "0"], "--crops-per-image"),
])
def test_image_counts_name_their_flag(tmp_path, args, flag):
    photos = images(tmp_path / "photos", per_class=1)
    args = [str(photos) if a == "PHOTOS" else a for a in args]
    if args[0] == "convert":
        args += ["-o", str(tmp_path / "out")]
    error_line(invoke(*args), 2, f"{flag} must be at least 1, got 0")
    only_entries(tmp_path, "photos")


def test_recipe_directory_and_missing_resume_are_named(tmp_path, train_model):
    data = images(tmp_path / "data", per_class=2)
    error_line(train_cli(train_model, data, tmp_path / "run", "--recipe", str(data)), 1,
               "is a directory; pass a recipe YAML file", "micro-batch")
    error_line(invoke("train", "--resume", tmp_path / "nope"), 1, "nope does not exist", "(--resume) takes")
    only_entries(tmp_path, "data")
