"""Numerics of Weight Standardization: every convention, the closed-form backward, adaptive WS.

Every expected value here is computed independently with plain torch ops (or with timm's
own ``StdConv2d``), never with wsurgery's code.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from timm.layers import StdConv2d
from torch import nn
from torch.testing import assert_close

import wsurgery
from wsurgery.errors import ConfigError, ConversionError
from wsurgery.standardize import (
    CONVENTIONS,
    AdaptiveWeightStandardization,
    WeightStandardization,
    filter_stats,
    get_convention,
    standardize_weight,
    standardize_weight_reference,
)

# (name, unbiased, eps inside sqrt, eps): written out again here, not read from wsurgery
EXPECTED = {
    "timm": (False, True, 1e-6),
    "bit": (False, True, 1e-10),
    "paper": (True, False, 1e-5),
    "seed": (False, False, 1e-5),
}


def independent_ws(w: torch.Tensor, unbiased: bool, eps_in_sqrt: bool, eps: float) -> torch.Tensor:
    """Weight Standardization of a conv weight (out, in/g, kh, kw), from the definitions."""
    w = w.double()
    n = w[0].numel()
    mean = w.sum(dim=(1, 2, 3), keepdim=True) / n
    sq = ((w - mean) ** 2).sum(dim=(1, 2, 3), keepdim=True)
    var = sq / (n - 1 if unbiased else n)
    scale = torch.sqrt(var + eps) if eps_in_sqrt else torch.sqrt(var) + eps
    return (w - mean) / scale


def _weight(shape=(8, 3, 3, 3), seed=0, scale=0.05, offset=0.01) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale + offset


def test_convention_table_matches_the_issue():
    assert set(CONVENTIONS) == set(EXPECTED)
    for name, (unbiased, in_sqrt, eps) in EXPECTED.items():
        c = CONVENTIONS[name]
        assert (c.unbiased, c.eps_in_sqrt, c.eps) == (unbiased, in_sqrt, eps), name


@pytest.mark.parametrize("name", list(EXPECTED))
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (16, 1, 3, 3), (4, 2, 1, 1), (6, 5, 1, 7)])
def test_every_convention_matches_independent_formula(name, shape):
    w = _weight(shape)
    expected = independent_ws(w, *EXPECTED[name])
    got = standardize_weight(w, w[0].numel(), get_convention(name))
    assert got.dtype == w.dtype and got.shape == w.shape
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
    # float64 input: float64 output, tighter match
    got64 = standardize_weight(w.double(), w[0].numel(), get_convention(name))
    assert got64.dtype == torch.float64
    assert_close(got64, expected, rtol=1e-12, atol=1e-12)
    # the convention may be given by name, as the README shows
    assert_close(standardize_weight(w.double(), w[0].numel(), name), expected, rtol=1e-12, atol=1e-12)


def test_unknown_convention_name_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"unknown WS convention 'tim'.*timm"):
        standardize_weight(torch.randn(2, 4), 4, "tim")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_conventions_differ_where_they_should(name):
    """Tiny filters make the eps placement visible: each convention gives its own result."""
    w = _weight((4, 2, 1, 1), scale=1e-3)
    got = standardize_weight(w, 2, get_convention(name)).double()
    for other, spec in EXPECTED.items():
        if other != name and spec != EXPECTED[name]:
            assert not torch.allclose(got, independent_ws(w, *spec), rtol=1e-4, atol=1e-6), (name, other)


def test_eps_override():
    w = _weight()
    got = standardize_weight(w, w[0].numel(), get_convention("seed", eps=0.5))
    assert_close(got.double(), independent_ws(w, False, False, 0.5), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="eps"):
        get_convention("timm", eps=-1.0)
    with pytest.raises(ConfigError, match="unknown WS convention"):
        get_convention("nope")


@pytest.mark.parametrize("name,eps", [("timm", 1e-6), ("bit", 1e-10), ("timm", 1e-8)])
def test_matches_timm_stdconv2d(name, eps):
    """``timm``/``bit`` (biased variance, eps inside the sqrt) is exactly timm's StdConv2d."""
    torch.manual_seed(0)
    ref = StdConv2d(6, 10, 3, stride=2, eps=eps, bias=True)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1, bias=True)
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(2, 6, 16, 16)
    with torch.no_grad():
        expected = ref(x)
    converted, _ = wsurgery.convert(nn.Sequential(conv), convention=name, eps=eps, trace=False)
    with torch.no_grad():
        got = converted(x)
    assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_converted_conv_weight_is_the_formula(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, groups=2)
    w = conv.weight.detach().clone()
    model, report = wsurgery.convert(nn.Sequential(conv), convention=name, trace=False)
    assert report.num_convs == 1
    assert_close(model[0].weight.double(), independent_ws(w, *EXPECTED[name]), rtol=1e-5, atol=1e-6)
    x = torch.randn(1, 4, 9, 9)
    expected = F.conv2d(x.double(), independent_ws(w, *EXPECTED[name]), conv.bias.double(), groups=2)
    assert_close(model(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_closed_form_backward_matches_autograd_reference(name):
    conv = get_convention(name)
    w = _weight((12, 4, 3, 3), seed=3)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    a = w.clone().requires_grad_()
    b = w.clone().requires_grad_()
    standardize_weight(a, 36, conv).backward(g)
    standardize_weight_reference(b, 36, conv).backward(g)
    # and a third, fully independent, autograd graph
    c = w.double().requires_grad_()
    independent_ws(c, *EXPECTED[name]).backward(g.double())
    assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
    assert_close(a.grad.double(), c.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_gradcheck_float64(name):
    conv = get_convention(name)
    w = _weight((3, 2, 2, 2), seed=5, scale=1.0).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: standardize_weight(t, 8, conv), (w,), eps=1e-6, atol=1e-5)


def test_half_precision_keeps_dtype_and_computes_in_float32():
    # a large mean and fan-in: statistics computed in fp16/bf16 themselves would be off by
    # 20 / 9 units in the last place here, float32 statistics round once, to at most 1
    w = _weight((8, 64, 3, 3), scale=0.05, offset=3.0)
    for dtype in (torch.float16, torch.bfloat16):
        half = w.to(dtype)
        expected = independent_ws(half, False, True, 1e-6).to(dtype)  # float64 from the same half input
        got = standardize_weight(half, 576, get_convention("timm"))
        assert got.dtype == dtype
        eps = torch.finfo(dtype).eps
        assert_close(got.double(), expected.double(), rtol=eps, atol=eps)
        t = w.to(dtype).requires_grad_()
        standardize_weight(t, 576, get_convention("timm")).sum().backward()
        assert t.grad.dtype == dtype and torch.isfinite(t.grad.float()).all()


def test_zero_variance_filter_is_zero_with_finite_gradient():
    w = _weight((3, 2, 3, 3))
    w[1] = 0.25  # constant filter
    for name in EXPECTED:
        t = w.clone().requires_grad_()
        out = standardize_weight(t, 18, get_convention(name))
        assert torch.count_nonzero(out[1]) == 0
        out.backward(torch.randn_like(out))
        assert torch.isfinite(t.grad).all(), name


def test_expert_bank_layout():
    """CondConv stores (experts, out*in*kh*kw): each run of fan_in entries is one filter."""
    bank = _weight((4, 8 * 3 * 3 * 3))
    got = standardize_weight(bank, 27, get_convention("timm"))
    expected = independent_ws(bank.reshape(32, 3, 3, 3), False, True, 1e-6).reshape(4, -1)
    assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_paper_convention_needs_two_entries():
    with pytest.raises(ConfigError, match="paper"):
        standardize_weight(torch.randn(4, 1, 1, 1), 1, get_convention("paper"))
    with pytest.raises(ConversionError, match="exclude"):
        wsurgery.convert(nn.Sequential(nn.Conv2d(4, 4, 1, groups=4)), convention="paper", trace=False)


# ----------------------------------------------------------------------------- adaptive WS


@pytest.mark.parametrize("name", list(EXPECTED))
def test_aws_is_exact_at_init(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4, bias=False))
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = model(x)
        weights = [m.weight.detach().clone() for m in (model[0], model[2])]
    converted, _ = wsurgery.convert(model, mode="aws", convention=name, trace=False)
    with torch.no_grad():
        assert_close(converted(x), ref, rtol=1e-5, atol=1e-6)
    for m, w in zip((converted[0], converted[2]), weights):
        assert_close(m.weight, w, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_aws_gain_and_shift_store_std_and_mean_scaled_by_sqrt_fan_in(name):
    unbiased, in_sqrt, eps = EXPECTED[name]
    w = _weight((8, 4, 3, 3), seed=7)
    n = 36
    p = AdaptiveWeightStandardization(n, get_convention(name), 8)
    p.init_from_weight(w)
    flat = w.double().reshape(8, n)
    mean = flat.mean(1)
    var = flat.var(1, correction=1 if unbiased else 0)
    std = torch.sqrt(var + eps) if in_sqrt else torch.sqrt(var) + eps
    assert_close(p.gamma.double(), std, rtol=1e-5, atol=1e-8)
    assert_close(p.beta.double(), mean, rtol=1e-5, atol=1e-8)
    assert_close(p.gain.double(), std * math.sqrt(n), rtol=1e-5, atol=1e-8)
    assert_close(p.shift.double(), mean * math.sqrt(n), rtol=1e-5, atol=1e-8)
    # and the parametrization reproduces the weight
    assert_close(p(w).double(), w.double(), rtol=1e-5, atol=1e-7)


def test_aws_sgd_step_moves_filter_mean_and_scale_like_a_plain_conv():
    """The reason for the sqrt(fan_in) scaling: one SGD step on (gain, shift) moves the filter's
    mean by -lr*mean(g) and its scale by -lr*sum(g*W_hat)/n, as the same step on a plain conv
    weight would (to first order)."""
    n, lr = 36, 0.1
    w = _weight((8, 4, 3, 3), seed=8)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(9))
    p = AdaptiveWeightStandardization(n, get_convention("timm"), 8)
    p.init_from_weight(w)
    v = w.clone().requires_grad_()
    p(v).backward(g)
    beta0, gamma0 = p.beta.detach().clone(), p.gamma.detach().clone()
    with torch.no_grad():
        p.gain -= lr * p.gain.grad
        p.shift -= lr * p.shift.grad
    w_hat = independent_ws(w, False, True, 1e-6).reshape(8, n)
    gf = g.double().reshape(8, n)
    assert_close((p.beta - beta0).double(), -lr * gf.mean(1), rtol=1e-4, atol=1e-7)
    assert_close((p.gamma - gamma0).double(), -lr * (gf * w_hat).sum(1) / n, rtol=1e-4, atol=1e-7)
    # plain conv, same step: mean moves by -lr*mean(g) too
    plain_mean_step = (w.double() - lr * g.double()).reshape(8, n).mean(1) - w.double().reshape(8, n).mean(1)
    assert_close(plain_mean_step, -lr * gf.mean(1), rtol=1e-6, atol=1e-9)


def test_parametrization_classes_and_repr():
    c = get_convention("paper")
    ws = WeightStandardization(9, c)
    aws = AdaptiveWeightStandardization(9, c, 4)
    assert ws.mode == "ws" and aws.mode == "aws"
    assert "convention=paper" in repr(ws) and "num_filters=4" in repr(aws)
    mean, scale = filter_stats(_weight((4, 1, 3, 3)), 9, c)
    assert mean.shape == scale.shape == (4,)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_second_derivatives_float64(name):
    """A Hessian through the closed-form paths (paper/seed) was silently missing every term through W."""
    conv = get_convention(name)
    w = _weight((3, 2, 2, 2), seed=6, scale=1.0).double().requires_grad_()
    assert torch.autograd.gradgradcheck(lambda t: standardize_weight(t, 8, conv), (w,), eps=1e-6, atol=1e-5)
    # a Hessian-vector product against the independent formula's
    v = torch.randn(w.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    target = torch.randn(w.shape, generator=torch.Generator().manual_seed(8), dtype=torch.float64)

    def hvp(f):
        x = w.detach().clone().requires_grad_()
        (grad,) = torch.autograd.grad((f(x) * target).sin().sum(), x, create_graph=True)
        return torch.autograd.grad((grad * v).sum(), x)[0]

    assert_close(hvp(lambda t: standardize_weight(t, 8, conv)), hvp(lambda t: independent_ws(t, *EXPECTED[name])))


@pytest.mark.parametrize("name", ["paper", "seed"])
def test_backward_inside_autocast_stays_float32(name):
    """The closed-form backward's per-filter dot product (a bmm) ran in bfloat16 under CPU autocast."""
    w = _weight((64, 64, 3, 3), seed=9, scale=1.0)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(10))
    a = w.clone().requires_grad_()
    out = standardize_weight(a, 576, name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out.backward(g)
    c = w.double().requires_grad_()
    independent_ws(c, *EXPECTED[name]).backward(g.double())
    assert_close(a.grad.double(), c.grad, rtol=1e-5, atol=2e-6)


def test_copy_made_inside_standardize_once_is_not_frozen():
    """An EMA or teacher copied inside the block kept the block's W_hat for good (and refused a later block)."""
    import copy

    from wsurgery.accumulate import standardize_once

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    converted = wsurgery.convert(model, mode="ws", convention="paper")[0]
    with standardize_once(converted):
        twin = copy.deepcopy(converted)
    with torch.no_grad():
        twin[0].parametrizations.weight.original.mul_(3).add_(1)
    expected = independent_ws(twin[0].parametrizations.weight.original.detach(), *EXPECTED["paper"])
    assert_close(twin[0].weight.double(), expected)
    with standardize_once(twin):  # refused as "already active" before
        pass
