"""Issue 6, part 4: property tests (hypothesis).

* Folding a Weight-Standardized conv gives the same outputs as the unfolded conv, for random
  shapes, groups, dilations, strides, padding modes (zeros, reflect, replicate, circular and
  timm's TF "same"), float32 and float64, every eps convention, ws and aws. The unfolded
  output is also checked against an independent float64 computation of the formula.
* convert -> save -> load round-trips exactly: same modules, bit-identical tensors and outputs.

Examples are derandomized (the same cases on every run, so CI failures reproduce) and kept
few enough that the file runs in well under a minute.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from timm.layers import Conv2dSame
from torch import nn
from torch.nn.utils import parametrize

import wsurgery
from wsurgery.convert import get_surgery_config, ws_parametrizations
from wsurgery.errors import ConversionError
from wsurgery.standardize import CONVENTIONS, AdaptiveWeightStandardization

SETTINGS = dict(derandomize=True, deadline=None, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

PADDING_MODES = ["zeros", "reflect", "replicate", "circular", "tf-same"]


@st.composite
def conv_cases(draw):
    groups = draw(st.integers(1, 3))
    return dict(
        groups=groups,
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
        stride=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        padding=(draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        convention=draw(st.sampled_from(sorted(CONVENTIONS))),
        eps=draw(st.sampled_from([None, 1e-3])),
        mode=draw(st.sampled_from(["ws", "aws"])),
        # a tiny weight scale makes the eps (and so the convention) matter
        weight_scale=draw(st.sampled_from([1.0, 1e-3])),
        size=(draw(st.integers(5, 8)), draw(st.integers(5, 8))),
        seed=draw(st.integers(0, 2**16)),
    )


def build_conv(case: dict) -> nn.Conv2d:
    common = dict(stride=case["stride"], dilation=case["dilation"], groups=case["groups"], bias=case["bias"])
    if case["padding_mode"] == "tf-same":
        conv = Conv2dSame(case["in_channels"], case["out_channels"], case["kernel_size"], **common)
    else:
        conv = nn.Conv2d(case["in_channels"], case["out_channels"], case["kernel_size"], padding=case["padding"],
                         padding_mode=case["padding_mode"], **common)
    conv = conv.to(case["dtype"])
    gen = torch.Generator().manual_seed(case["seed"])
    with torch.no_grad():
        w = torch.randn(conv.weight.shape, generator=gen, dtype=case["dtype"])
        offset = torch.randn(conv.out_channels, 1, 1, 1, generator=gen, dtype=case["dtype"])  # non-zero filter means
        conv.weight.copy_((w + offset) * case["weight_scale"])
        if conv.bias is not None:
            conv.bias.copy_(torch.randn(conv.out_channels, generator=gen, dtype=case["dtype"]))
    return conv


def reference_weight(v: torch.Tensor, case: dict, p: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W_hat, s)`` written from the formula, in float64, independently of wsurgery's kernels."""
    conv = CONVENTIONS[case["convention"]]
    eps = case["eps"] if case["eps"] is not None else conv.eps
    w = v.detach().double().reshape(v.shape[0], -1)
    n = w.shape[1]
    centered = w - w.sum(dim=1, keepdim=True) / n
    var = (centered**2).sum(dim=1, keepdim=True) / (n - 1 if conv.unbiased else n)
    scale = torch.sqrt(var + eps) if conv.eps_in_sqrt else torch.sqrt(var) + eps
    w_hat = centered / scale
    if isinstance(p, AdaptiveWeightStandardization):
        w_hat = w_hat * (p.gain.detach().double() / math.sqrt(n)).unsqueeze(1) \
            + (p.shift.detach().double() / math.sqrt(n)).unsqueeze(1)
    return w_hat.reshape(v.shape), scale


def reference_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, case: dict) -> torch.Tensor:
    """The conv written out: explicit padding for every mode, then an unpadded F.conv2d, in float64."""
    x = x.double()
    (kh, kw), (sh, sw), (dh, dw) = case["kernel_size"], case["stride"], case["dilation"]
    if case["padding_mode"] == "tf-same":  # TensorFlow SAME: total pad so out = ceil(in / stride), extra at the end
        pads = []
        for size, k, s, d in ((x.shape[-1], kw, sw, dw), (x.shape[-2], kh, sh, dh)):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads += [total // 2, total - total // 2]
        x = F.pad(x, pads)
    else:
        ph, pw = case["padding"]
        mode = {"zeros": "constant"}.get(case["padding_mode"], case["padding_mode"])
        x = F.pad(x, (pw, pw, ph, ph), mode=mode)
    b = bias.detach().double() if bias is not None else None
    return F.conv2d(x, weight, b, stride=case["stride"], dilation=case["dilation"], groups=case["groups"])


@settings(max_examples=60, **SETTINGS)
@given(case=conv_cases())
def test_fold_equals_the_unfolded_conv(case):
    conv = build_conv(case)
    model = nn.Sequential(conv).eval()
    fan_in = conv.weight[0].numel()
    kwargs = dict(mode=case["mode"], convention=case["convention"], eps=case["eps"], inplace=False, trace=False)
    if case["convention"] == "paper" and fan_in < 2:  # unbiased std of one entry is undefined: refused
        with pytest.raises(ConversionError, match="1 entry per filter"):
            wsurgery.convert(model, **kwargs)
        return
    gen = torch.Generator().manual_seed(case["seed"] + 1)
    x = torch.randn(2, case["in_channels"], *case["size"], generator=gen, dtype=case["dtype"])
    original = model(x)

    converted, _report = wsurgery.convert(model, **kwargs)
    (_, module, p), = ws_parametrizations(converted)
    if case["mode"] == "aws":  # exact at conversion ...
        torch.testing.assert_close(converted(x), original, **_tol(case["dtype"]))
        with torch.no_grad():  # ... then move gamma and beta so the fold has real work to do
            p.gain.mul_(1 + 0.2 * torch.randn(p.gain.shape, generator=gen, dtype=p.gain.dtype))
            p.shift.add_(0.1 * torch.randn(p.shift.shape, generator=gen, dtype=p.shift.dtype) * p.gain.abs().mean())
    unfolded = converted(x)
    v = module.parametrizations.weight.original
    w_ref, scale = reference_weight(v, case, p)
    # the weight against the formula: rounding of the filter mean (one ulp of |V|) is divided by s, so a
    # zero-variance filter (every filter when fan_in is 1) carries up to ulp(|V|) / s of float noise
    tol = _tol(case["dtype"])
    noise = torch.finfo(case["dtype"]).eps * v.detach().abs().max().double() / scale.min()
    if isinstance(p, AdaptiveWeightStandardization):
        noise = noise * p.gain.detach().abs().max().double() / math.sqrt(fan_in)
    w_hat = module.weight.detach()
    torch.testing.assert_close(w_hat.double(), w_ref, rtol=tol["rtol"], atol=tol["atol"] + 4 * float(noise))
    # the conv against an explicit pad + unpadded conv in float64
    torch.testing.assert_close(unfolded.double(), reference_conv(x, w_hat.double(), conv.bias, case), **tol)

    folded = wsurgery.fold(converted)
    fconv = folded[0]
    assert type(fconv) is type(conv) and not parametrize.is_parametrized(fconv)
    assert fconv.weight.dtype == case["dtype"]
    assert torch.equal(folded(x), unfolded), "fold is not bit-exact"
    assert parametrize.is_parametrized(converted[0])  # fold worked on a copy
    assert torch.equal(converted(x), unfolded)


def _tol(dtype: torch.dtype) -> dict[str, float]:
    return dict(rtol=1e-9, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


ARCHS = ["test_resnet", "test_efficientnet", "test_byobnet", "test_nfnet"]


@st.composite
def surgery_cases(draw):
    return dict(
        arch=draw(st.sampled_from(ARCHS)),
        mode=draw(st.sampled_from(["ws", "aws"])),
        convention=draw(st.sampled_from(sorted(CONVENTIONS))),
        norm=draw(st.sampled_from(["keep", "gn"])),
        gn_groups=draw(st.sampled_from([4, 8, 32])),
        gn_group_rule=draw(st.sampled_from(["gcd", "divisor"])),
        exclude=draw(st.sampled_from([[], ["*downsample*"], ["conv_stem"]])),
        num_classes=draw(st.sampled_from([None, 7])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(max_examples=8, **SETTINGS)
@given(case=surgery_cases())
def test_convert_save_load_round_trips_exactly(case):
    torch.manual_seed(case["seed"])
    kwargs = {"num_classes": case["num_classes"]} if case["num_classes"] else {}
    model = timm.create_model(case["arch"], pretrained=False, **kwargs).eval()
    model, report = wsurgery.convert(model, mode=case["mode"], convention=case["convention"], norm=case["norm"],
                                     gn_groups=case["gn_groups"], gn_group_rule=case["gn_group_rule"],
                                     exclude=case["exclude"], trace=False)
    with torch.no_grad():  # non-identity norm affines and adaptive gains, so every tensor matters
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and ("gain" in name or "shift" in name or name.endswith("bias")):
                tensor.add_(0.01 * torch.randn_like(tensor))
    x = torch.randn(2, 3, 48, 48)
    expected = model(x)
    with tempfile.TemporaryDirectory() as tmp:
        saved = wsurgery.save(model, Path(tmp) / "m", report=report)
        loaded = wsurgery.load(saved)
    assert [(n, type(m).__name__) for n, m in loaded.named_modules()] == \
        [(n, type(m).__name__) for n, m in model.named_modules()]
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert get_surgery_config(loaded) == get_surgery_config(model)
    for (n1, _, p1), (n2, _, p2) in zip(ws_parametrizations(model), ws_parametrizations(loaded), strict=True):
        assert n1 == n2 and type(p1) is type(p2) and p1.convention == p2.convention
    assert not loaded.training
    assert torch.equal(loaded(x), expected)
