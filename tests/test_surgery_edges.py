"""Surgery edge cases found in review: tied weights and in-place fold, affine-free BN, MixedConv2d and CondConv2d."""

from __future__ import annotations

import timm
import torch
from timm.layers import MixedConv2d
from torch import nn
from torch.testing import assert_close

import wsurgery
from wsurgery.convert import clone_model, convert
from wsurgery.fold import fold


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.b.weight = self.a.weight  # tied: `a` is converted, `b` left out

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_in_place_fold_keeps_a_tied_weight_raw_where_it_was_not_converted():
    torch.manual_seed(0)
    converted, _ = convert(_Tied(), exclude=["b"], trace=False)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = converted(x)
        raw = converted.b.weight.detach().clone()
        assert_close(fold(clone_model(converted))(x), expected)
        folded = fold(clone_model(converted), inplace=True)
        assert_close(folded(x), expected)
        assert torch.equal(folded.b.weight, raw)  # b still computes with the unstandardized weight


def test_affine_free_batchnorm_becomes_a_groupnorm_on_the_models_dtype():
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False), nn.ReLU()).double()
    converted, _ = wsurgery.convert(net, norm="gn", gn_groups=4, trace=False, probe=False)
    gn = converted[1]
    assert isinstance(gn, nn.GroupNorm) and gn.weight.dtype == gn.bias.dtype == torch.float64
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = converted(x)  # raised "mixed dtype" before
    standardized = converted[0](x)
    assert_close(y, torch.relu(nn.functional.group_norm(standardized, 4, eps=gn.eps)))


def test_mixed_conv_branches_are_followed_by_the_norm_after_the_mixed_conv():
    model = timm.create_model("mixnet_s", pretrained=False)
    branches = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, MixedConv2d) for k in m._modules}
    _, report = convert(model, inplace=False)
    assert branches and not set(report.convs_without_norm) & branches
    # what is left are the squeeze-and-excitation convs, which feed an activation, not a norm
    assert report.convs_without_norm and all(".se." in name for name in report.convs_without_norm)


def test_inspect_counts_condconv_banks_plain_converted_and_folded():
    model = timm.create_model("efficientnet_cc_b0_4e", pretrained=False)
    converted, report = convert(model, inplace=False, norm="gn")
    plain = wsurgery.inspect(model, check_timm=False).counts
    ws = wsurgery.inspect(converted, check_timm=False).counts
    folded = wsurgery.inspect(fold(converted), check_timm=False).counts
    assert sum(v for k, v in plain.items() if "conv" in k) == report.num_convs
    assert sum(v for k, v in ws.items() if "conv" in k) == report.num_convs
    assert sum(v for k, v in folded.items() if "conv" in k) == report.num_convs


def test_fold_bn_leaves_a_shared_batchnorm_or_conv_alone():
    """A BN called on a conv's output and again elsewhere was folded into the conv, breaking the other call."""
    from wsurgery.fold import find_conv_bn_pairs

    class SharedBN(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.bn(x * 2)

    class SharedConv(SharedBN):
        def __init__(self):
            super().__init__()
            self.other = nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) + self.other(self.conv(x * 2))

    class Plain(SharedBN):
        def forward(self, x):
            return self.bn(self.conv(x)) + x

    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for cls, expected in ((SharedBN, []), (SharedConv, []), (Plain, [("conv", "bn")])):
        torch.manual_seed(0)
        model = cls()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2)
        model.eval()
        assert find_conv_bn_pairs(model) == expected, cls.__name__
        with torch.no_grad():
            assert_close(wsurgery.fold(model, fold_bn=True)(x), model(x), rtol=1e-5, atol=1e-5)


def test_small_api_edges_are_clear_errors():
    """From a review: each of these was a wrong result or a raw TypeError/ZeroDivisionError."""
    import pytest

    from wsurgery.errors import ArgumentTypeError, ConversionError
    from wsurgery.norm import gn_num_groups

    for kwargs in ({"groups": -8}, {"groups": 0}, {"group_size": -16}, {"group_size": 0}, {"rule": "nearest"}):
        with pytest.raises(ConversionError):
            gn_num_groups(64, **kwargs)
    assert gn_num_groups(64, groups=8) == 8 and gn_num_groups(24, 32, rule="gcd") == 8
    assert wsurgery.SurgeryConfig(include=None).include == []
    for bad in ([1], 3):
        with pytest.raises(ArgumentTypeError, match="include"):
            wsurgery.SurgeryConfig(include=bad)
    from wsurgery.weights import sample_photos

    with pytest.raises(ArgumentTypeError, match="list of photo names"):
        sample_photos("chelsea")
    # a BN with neither affine nor statistics, in a float64 model, becomes a float64 GroupNorm
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, affine=False, track_running_stats=False)).double()
    converted = convert(model, mode="ws", norm="gn", gn_groups=4, inplace=False)[0]
    assert converted[1].weight.dtype == torch.float64
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = converted[0](x)
    expected = nn.functional.group_norm(y, 4, eps=1e-5)
    assert_close(converted(x), expected)


def test_imagenet_samples_read_foolbox_names_without_importing_it(tmp_path, monkeypatch):
    """The labelled ImageNet photos the calibration target is judged on: found by file name, in index
    order (not string order), each with the class index its name carries; none where foolbox is absent."""
    import sys

    from wsurgery import weights

    data = tmp_path / "foolbox" / "data"
    data.mkdir(parents=True)
    for name in ("imagenet_10_541.jpg", "imagenet_02_438.jpg", "imagenet_1_7.jpg", "cifar10_00_3.png",
                 "imagenet_03_990.png", "imagenet_x_1.jpg"):
        (data / name).write_bytes(b"")
    (data / "__init__.py").write_text("raise RuntimeError('imported')")
    (tmp_path / "foolbox" / "__init__.py").write_text("raise RuntimeError('imported')")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = weights.imagenet_samples()
    assert [(p.name, label) for p, label in found] == [
        ("imagenet_1_7.jpg", 7), ("imagenet_02_438.jpg", 438), ("imagenet_10_541.jpg", 541)]
    assert all(p.parent == data for p, _ in found) and "foolbox" not in sys.modules
    monkeypatch.setattr(weights, "_package_dir", lambda module: None)
    assert weights.imagenet_samples() == []
