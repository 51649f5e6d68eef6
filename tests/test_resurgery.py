"""Models that went through surgery before: re-export, re-convert, in-place fold, shared weights.

Each case is a round trip that must end in a directory `wsurgery.load` rebuilds and that
computes what the model written did (checked against that model's own outputs).
"""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from _core_helpers import randomize_norms
from safetensors.torch import load_file, save_file
from timm.layers import freeze_batch_norm_2d
from torch import nn
from torch.testing import assert_close

import wsurgery
from wsurgery.convert import get_surgery_config
from wsurgery.errors import ConversionError
from wsurgery.fold import FOLD_ATTR, find_conv_bn_pairs, fold
from wsurgery.norm import is_batchnorm


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _num_convs(name: str) -> int:
    return sum(isinstance(m, nn.Conv2d) for m in timm.create_model(name).modules())


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _aws_resnet(norm: str = "keep") -> nn.Module:
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet10t", num_classes=5).eval())
    return wsurgery.convert(model, mode="aws", norm=norm, gn_groups=8)[0]


def test_reexport_of_a_fold_bn_export_keeps_the_folded_pairs(tmp_path, x):
    wsurgery.export(_aws_resnet(), tmp_path / "e1", fold_bn=True)
    first = wsurgery.load(tmp_path / "e1")
    pairs = getattr(first, FOLD_ATTR)
    assert len(pairs) == _num_convs("resnet10t")  # every conv of resnet10t feeds one BN
    refolded = fold(first, fold_bn=True)
    assert getattr(refolded, FOLD_ATTR) == pairs  # nothing new to fold, nothing forgotten
    for target, kwargs in (("e2", {}), ("e3", {"fold_bn": True})):
        wsurgery.export(first, tmp_path / target, **kwargs)
        record = json.loads((tmp_path / target / "config.json").read_text())["wsurgery"]
        assert record["fold_bn"] == pairs
        again = wsurgery.load(tmp_path / target)
        assert_close(_outputs(again, x), _outputs(first, x), rtol=0, atol=0)


def test_converting_a_fold_bn_export_is_refused_with_the_reason(tmp_path):
    wsurgery.export(_aws_resnet(), tmp_path / "e", fold_bn=True)
    folded = wsurgery.load(tmp_path / "e")
    with pytest.raises(ConversionError, match=r"folded into its convs.*without --fold-bn"):
        wsurgery.convert(folded, mode="aws")
    assert not wsurgery.is_converted(folded)


def test_reconverting_a_groupnorm_export_keeps_its_groupnorms(tmp_path, x):
    # regnetx_002: its GroupNorm export is not loadable by stock timm (model_args cannot say GN),
    # so only the wsurgery record describes the GroupNorms
    torch.manual_seed(0)
    original = randomize_norms(timm.create_model("regnetx_002", num_classes=5).eval())
    converted = wsurgery.convert(original, mode="aws", norm="gn", gn_groups=8)[0]
    wsurgery.export(converted, tmp_path / "gn")
    exported = wsurgery.load(tmp_path / "gn")
    groups = {n: m.num_groups for n, m in exported.named_modules() if isinstance(m, nn.GroupNorm)}
    assert groups and not any(is_batchnorm(m) for m in exported.modules())

    again, _ = wsurgery.convert(exported, mode="ws")  # --norm keep: the GroupNorms stay, and stay recorded
    assert get_surgery_config(again).norm == "gn"
    wsurgery.save(again, tmp_path / "again")
    reloaded = wsurgery.load(tmp_path / "again")
    assert {n: m.num_groups for n, m in reloaded.named_modules() if isinstance(m, nn.GroupNorm)} == groups
    assert_close(_outputs(reloaded, x), _outputs(again, x), rtol=0, atol=0)

    with pytest.raises(ConversionError, match=r"already has GroupNorm.*gn_groups=8"):
        wsurgery.convert(wsurgery.load(tmp_path / "gn"), mode="ws", norm="gn", gn_groups=4)


def test_fold_in_place_with_a_weight_shared_by_two_convs(x):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 3, 3, padding=1)
            self.b = nn.Conv2d(3, 3, 3, padding=1)
            self.b.weight = self.a.weight

        def forward(self, inp):
            return self.b(torch.relu(self.a(inp)))

    torch.manual_seed(0)
    converted, _ = wsurgery.convert(Tied(), mode="aws", trace=False)
    with torch.no_grad():  # the two convs now standardize the shared weight differently
        converted.a.parametrizations.weight[0].gain.mul_(1.3)
    reference = _outputs(converted, x)
    # independently: each conv with its own standardized weight, by plain torch
    wa, wb = converted.a.weight.detach().clone(), converted.b.weight.detach().clone()
    assert not torch.equal(wa, wb)
    folded = fold(converted, inplace=True)
    assert_close(folded.a.weight.detach(), wa, rtol=0, atol=0)
    assert_close(folded.b.weight.detach(), wb, rtol=0, atol=0)
    assert_close(_outputs(folded, x), reference, rtol=0, atol=0)


def test_fold_in_place_of_a_deepcopy_leaves_the_original_working(x):
    converted = _aws_resnet()
    reference = _outputs(converted, x)
    ema = copy.deepcopy(converted)  # what timm's ModelEmaV3 does
    fold(ema, inplace=True)
    assert_close(_outputs(converted, x), reference, rtol=0, atol=0)
    assert wsurgery.is_converted(converted)
    assert_close(_outputs(ema, x), reference, rtol=1e-5, atol=1e-5)


def test_frozen_batchnorm_is_found_and_folded(x):
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model("resnet10t", num_classes=5).eval())
    model = freeze_batch_norm_2d(model)  # torchvision's FrozenBatchNorm2d: not a _BatchNorm
    reference = _outputs(model, x)
    pairs = find_conv_bn_pairs(model)
    assert ("conv1.0", "conv1.1") in pairs and len(pairs) == _num_convs("resnet10t")
    folded = fold(model, fold_bn=True)
    assert not any(is_batchnorm(m) for m in folded.modules())
    # verify's fp32 measure and tolerance: max |diff| <= 1e-5 x max |reference| (measured 2e-7; BN's eps left out
    # of the fold gives 4e-5)
    assert_close(_outputs(folded, x), reference, rtol=0.0, atol=1e-5 * reference.abs().max().item())


def test_verify_takes_the_tolerance_from_the_weights_not_from_config_json(tmp_path):
    source = _aws_resnet()
    wsurgery.export(source, tmp_path / "e")
    weights = tmp_path / "e" / "model.safetensors"
    state = load_file(weights)
    state["conv1.0.weight"] = state["conv1.0.weight"] + 1e-2 * torch.randn_like(state["conv1.0.weight"])
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
    save_file(state, weights, metadata)
    config_path = tmp_path / "e" / "config.json"
    config = json.loads(config_path.read_text())
    config["wsurgery"]["dtype"] = "bf16"  # claiming bf16 would loosen the check to 5e-2
    config_path.write_text(json.dumps(config))
    result = wsurgery.verify(tmp_path / "e", source, num_random=2)
    assert result.rtol == 1e-5 and 1e-5 < result.max_rel < 5e-2 and not result.passed


def test_verify_leaves_the_reference_in_its_mode(tmp_path):
    source = _aws_resnet()
    wsurgery.export(source, tmp_path / "e")
    source.train()
    assert wsurgery.verify(tmp_path / "e", source, num_random=2).passed
    assert source.training and all(m.training for m in source.modules())


def test_converting_again_is_refused_before_any_groupnorm_advice():
    converted = _aws_resnet(norm="gn")
    with pytest.raises(ConversionError, match="already converted"):
        wsurgery.convert(converted, mode="ws", norm="gn", gn_groups=4)


def test_a_folded_bit_model_is_refused_and_a_calibration_record_is_not_inherited(tmp_path):
    # BiT's own StdConv2d become plain convs when folded; rebuilding would make them StdConv2d again
    bit = timm.create_model("resnetv2_50x1_bit", num_classes=5)
    folded = fold(bit)
    with pytest.raises(ConversionError, match=r"StdConv2d/ScaledStdConv2d layers.*folded"):
        wsurgery.convert(folded, mode="aws")
    # an export carries its calibration record; converting it again is a new surgery without one
    model = _aws_resnet(norm="gn")
    model.wsurgery_calibration = {"method": "gn-init"}
    wsurgery.export(model, tmp_path / "e")
    exported = wsurgery.load(tmp_path / "e")
    assert exported.wsurgery_calibration == {"method": "gn-init"}
    again, _ = wsurgery.convert(exported, mode="aws")
    assert not hasattr(again, "wsurgery_calibration")
    wsurgery.save(again, tmp_path / "again")
    assert "calibration" not in json.loads((tmp_path / "again" / "config.json").read_text())["wsurgery"]


def test_python_api_misuse_is_caught_before_anything_changes(tmp_path, x):
    from wsurgery.errors import UsageError

    original = timm.create_model("resnet10t", num_classes=5).eval()
    # one pattern as a string is one pattern (not its characters)
    _, report = wsurgery.convert(original, inplace=False, include="layer1.*", trace=False)
    assert sorted(c.name for c in report.changes) == ["layer1.0.conv1", "layer1.0.conv2"]
    # calibrate with the arguments swapped, or against another head: refused, nothing trained
    student, _ = wsurgery.convert(original, inplace=False, norm="gn", gn_groups=8)
    before = {k: v.clone() for k, v in original.state_dict().items()}
    images = torch.randn(8, 3, 32, 32)
    with pytest.raises(UsageError, match="arguments are swapped"):
        wsurgery.calibrate(original, student, images, steps=1)
    assert all(torch.equal(v, before[k]) for k, v in original.state_dict().items())
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(UsageError, match=r"student gives \(5,\) outputs per image and the teacher \(3,\)"):
        wsurgery.calibrate(student, timm.create_model("resnet10t", num_classes=3), images, held_out=None, steps=1)
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    # fold with pairs that do not fold: refused, the model still converted
    converted = _aws_resnet()
    for bad in ([("conv1.0", "nope")], [("conv1.0", "conv1.2")], "yes"):
        with pytest.raises(UsageError, match="fold_bn"):
            fold(converted, fold_bn=bad, inplace=True)
        assert wsurgery.is_converted(converted)


def test_wrapped_models_are_saved_exported_and_calibrated_as_the_model_inside(tmp_path, x):
    converted = _aws_resnet()
    reference = _outputs(converted, x)
    compiled = torch.compile(converted)  # lazy: nothing is compiled until it runs
    wsurgery.save(compiled, tmp_path / "s")
    wsurgery.export(compiled, tmp_path / "e")
    assert_close(_outputs(wsurgery.load(tmp_path / "s"), x), reference, rtol=0, atol=0)
    assert_close(_outputs(wsurgery.load(tmp_path / "e"), x), reference, rtol=1e-5, atol=1e-5)
    # DataParallel (on CPU it just calls the module): gn-init must find the norms behind `module.`
    torch.manual_seed(0)
    original = randomize_norms(timm.create_model("resnet10t", num_classes=5).eval())
    student, _ = wsurgery.convert(original, inplace=False, mode="aws", norm="gn", gn_groups=8)
    wrapped = nn.DataParallel(student)  # with a GPU, DataParallel moves the student there: the teacher follows
    original.to(next(student.parameters()).device)
    result = wsurgery.calibrate(wrapped, original, torch.randn(8, 3, 32, 32), steps=1, batch_size=4)
    assert result.phases == ["gn-init", "distill"]
