"""Correctness of the fast paths: batch-norm kernel, lean closed-form backward, channels_last,
adaptive WS fused into one kernel, the torch.compile path (CUDA only) and the inference cache.

Expected values come from an independent float64 autograd formula written here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

import wsurgery
from wsurgery.accumulate import compile_standardization, standardize_once
from wsurgery.convert import clone_model, ws_parametrizations
from wsurgery.standardize import AdaptiveWeightStandardization, WeightStandardization, get_convention

SPECS = {  # name: (unbiased, eps inside sqrt, eps), written out independently of wsurgery
    "timm": (False, True, 1e-6),
    "bit": (False, True, 1e-10),
    "paper": (True, False, 1e-5),
    "seed": (False, False, 1e-5),
}
CUDA = torch.cuda.is_available()


def independent(w, unbiased, in_sqrt, eps, gamma=None, beta=None):
    """W_hat (optionally gamma * W_hat + beta) per output filter, plain autograd ops."""
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).sum(1, keepdim=True) / (flat.shape[1] - (1 if unbiased else 0))
    scale = torch.sqrt(var + eps) if in_sqrt else torch.sqrt(var) + eps
    out = (flat - mean) / scale
    if gamma is not None:
        out = out * gamma[:, None] + beta[:, None]
    return out.reshape(w.shape)


def _w(shape=(12, 4, 3, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.05 + 0.02


def _check_against_independent(p, w, seed=1, rtol=1e-5, atol=1e-6):
    """Value and gradients (V, and gain/shift for AWS) of parametrization ``p`` vs float64 autograd."""
    name = p.convention.name
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(memory_format=torch.contiguous_format)
    v = w.detach().clone().requires_grad_()
    out = p(v)
    out.backward(g)
    v64 = w.detach().double().requires_grad_()
    affine = ()
    if isinstance(p, AdaptiveWeightStandardization):
        gain64 = p.gain.detach().double().requires_grad_()
        shift64 = p.shift.detach().double().requires_grad_()
        affine = (gain64 * p.coef, shift64 * p.coef)
    ref = independent(v64, *SPECS[name], *affine)
    ref.backward(g.double())
    assert_close(out.double(), ref, rtol=rtol, atol=atol)
    assert_close(v.grad.double(), v64.grad, rtol=1e-4, atol=1e-5)
    if affine:
        assert_close(p.gain.grad.double(), gain64.grad, rtol=1e-4, atol=1e-6)
        assert_close(p.shift.grad.double(), shift64.grad, rtol=1e-4, atol=1e-6)
    return out, v.grad


def _aws(name, w, seed=2):
    p = AdaptiveWeightStandardization(w[0].numel(), get_convention(name), w.shape[0])
    p.init_from_weight(w)
    with torch.no_grad():  # move gamma/beta off the identity so the affine is exercised
        p.gain.mul_(1 + 0.2 * torch.randn(p.gain.shape, generator=torch.Generator().manual_seed(seed)))
        p.shift.add_(0.1)
    return p


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("aws", [False, True])
def test_every_kernel_matches_independent_formula(name, aws):
    w = _w()
    p = _aws(name, w) if aws else WeightStandardization(w[0].numel(), get_convention(name))
    _check_against_independent(p, w)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("aws", [False, True])
def test_channels_last_weight_keeps_layout_and_values(name, aws):
    w = _w((16, 8, 3, 3), seed=3)
    p = _aws(name, w) if aws else WeightStandardization(72, get_convention(name))
    out_c, grad_c = _check_against_independent(p, w)
    if aws:
        p.gain.grad = p.shift.grad = None
    out_cl, grad_cl = _check_against_independent(p, w.to(memory_format=torch.channels_last))
    assert out_cl.is_contiguous(memory_format=torch.channels_last)
    assert_close(out_cl, out_c, rtol=1e-6, atol=1e-6)
    assert_close(grad_cl, grad_c, rtol=1e-5, atol=1e-6)


def _graph_ops(t: torch.Tensor) -> list[str]:
    names, todo = [], [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(type(fn).__name__)
            todo.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize("name", ["timm", "bit"])
def test_batch_norm_kernel_equals_closed_form_kernel(name):
    """timm/bit go through native batch norm; the closed-form function gives the same numbers."""
    from wsurgery.standardize import _closed_form, standardize_weight

    unbiased, in_sqrt, eps = SPECS[name]
    w = _w((32, 16, 3, 3), seed=4)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(5))
    a, b = w.clone().requires_grad_(), w.clone().requires_grad_()
    out_bn = standardize_weight(a, 144, get_convention(name))
    out_fn = _closed_form(b, 144, unbiased, in_sqrt, eps)
    assert any("BatchNorm" in n for n in _graph_ops(out_bn))
    assert not any("BatchNorm" in n for n in _graph_ops(out_fn))
    out_bn.backward(g)
    out_fn.backward(g)
    assert_close(out_bn, out_fn, rtol=1e-5, atol=1e-6)
    assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_depthwise_one_by_one_and_constant_filters_stay_finite():
    w = _w((8, 1, 1, 1))
    for name in ("timm", "bit", "seed"):
        v = w.clone().requires_grad_()
        out = WeightStandardization(1, get_convention(name))(v)
        assert out.abs().max() < 1e-3  # a single entry standardizes to 0 (up to rounding)
        out.backward(torch.ones_like(out))
        assert torch.isfinite(v.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_aws_uses_float32_math(dtype):
    # large mean and fan-in (see test_standardize's half-precision test): half-precision
    # statistics would miss by many units in the last place, float32 ones by at most one
    w = _w((12, 64, 3, 3)) + 3.0
    p = _aws("timm", w)
    with torch.no_grad():  # gamma = 1, beta = 0: the output is W_hat itself, not dominated by beta ~ 3
        p.gain.copy_(1 / torch.as_tensor(p.coef).expand_as(p.gain))
        p.shift.zero_()
    p = p.to(dtype)
    v = w.to(dtype).requires_grad_()
    out = p(v)
    assert out.dtype == dtype
    ref = independent(v.detach().double(), *SPECS["timm"], p.gain.double() * p.coef, p.shift.double() * p.coef)
    eps = torch.finfo(dtype).eps
    assert_close(out.double(), ref.to(dtype).double(), rtol=eps, atol=eps)
    out.float().sum().backward()
    assert v.grad.dtype == dtype and torch.isfinite(v.grad.float()).all()


def _conv_model(mode):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, groups=2), nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    model, _ = wsurgery.convert(net, mode=mode, norm="gn", gn_groups=2, trace=False)
    return model


@pytest.mark.parametrize("mode", ["ws", "aws"])
def test_channels_last_model_matches_and_folds_exactly(mode):
    model = _conv_model(mode)
    x = torch.randn(2, 3, 10, 10)
    cl = clone_model(model).to(memory_format=torch.channels_last)
    assert cl[0].parametrizations.weight.original.is_contiguous(memory_format=torch.channels_last)
    assert_close(cl(x.to(memory_format=torch.channels_last)), model(x), rtol=1e-5, atol=1e-6)
    folded = wsurgery.fold(cl)
    with torch.no_grad():
        assert_close(folded(x), cl(x), rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["ws", "aws"])
def test_parametrize_cached_gives_the_same_outputs(mode):
    # standardize_once as an inference cache: tests/test_accumulate.py::test_no_grad_eval_use_is_a_weight_cache
    model = _conv_model(mode).eval()
    x = torch.randn(2, 3, 10, 10)
    with torch.no_grad():
        expected = model(x)
        with parametrize.cached():
            got = model(x)
    assert_close(got, expected, rtol=0, atol=0)


def test_compile_standardization_toggles_every_conv():
    model = _conv_model("aws")
    x = torch.randn(2, 3, 10, 10)
    reference = model(x)
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo hands every captured graph to its backend
        graphs.append(gm)
        return gm.forward  # run it as captured: no code generation, cheap on CPU

    assert compile_standardization(model, backend=counting_backend) == 2
    kernels = [p._kernel for _, _, p in ws_parametrizations(model)]
    assert kernels[0] is not None and all(k is kernels[0] for k in kernels)  # one compiled function, shared
    assert_close(model(x), reference, rtol=1e-6, atol=1e-6)
    assert graphs  # the forward went through the compiled function
    assert compile_standardization(model, enabled=False) == 2
    assert all(p._kernel is None for _, _, p in ws_parametrizations(model))
    assert_close(model(x), reference, rtol=0, atol=0)


def test_compiled_standardization_does_not_recompile_every_step():
    """The closed-form conventions (paper, seed) made their autograd.Function inside the trace, so every call
    recompiled (17 new graphs per step for a small model); now it is made when the convention is."""
    import torch._dynamo

    torch._dynamo.reset()
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    model = wsurgery.convert(net, mode="aws", convention="paper")[0]
    assert compile_standardization(model, backend=counting_backend) == 2
    x = torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    counts = []
    for _ in range(4):
        model(x).square().sum().backward()
        counts.append(len(graphs))
    assert counts[0] > 0 and counts[1:] == counts[:1] * 3, counts
    compile_standardization(model, enabled=False)
    torch._dynamo.reset()


@pytest.mark.skipif(not CUDA, reason="torch.compile path is tested on CUDA only")
@pytest.mark.parametrize("mode", ["ws", "aws"])
@pytest.mark.parametrize("convention", ["timm", "paper"])
def test_compiled_path_matches_eager_on_cuda(mode, convention):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, groups=4), nn.BatchNorm2d(32), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    eager, _ = wsurgery.convert(net, mode=mode, convention=convention, norm="gn", gn_groups=4, trace=False)
    eager = eager.cuda()
    compiled = clone_model(eager)
    assert compile_standardization(compiled) == 2
    x = torch.randn(4, 3, 16, 16, device="cuda")
    out_e, out_c = eager(x), compiled(x)
    assert_close(out_c, out_e, rtol=1e-4, atol=1e-5)
    out_e.square().sum().backward()
    out_c.square().sum().backward()
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters()):
        assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    compile_standardization(compiled, enabled=False)
    assert_close(compiled(x), out_e, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_standardize_once_bf16_autocast_channels_last_on_cuda():
    torch.manual_seed(0)
    naive = _conv_model("aws").cuda().to(memory_format=torch.channels_last)
    once = clone_model(naive)
    xs = [torch.randn(2, 3, 12, 12, device="cuda").to(memory_format=torch.channels_last) for _ in range(3)]
    for model, ctx in ((naive, None), (once, standardize_once)):
        with (ctx(model) if ctx else torch.enable_grad()):
            for x in xs:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = model(x).float().square().mean() / len(xs)
                loss.backward()
    for (name, a), (_, b) in zip(naive.named_parameters(), once.named_parameters()):
        assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_torch_compile_of_models_with_different_eps_in_one_process():
    """torch.compile of a timm-convention model, then a paper one, failed in dynamo's recompile
    (the eps passed to the autograd.Function became a dynamic float); each convention's eps is now a
    constant of its own Function. aot_eager runs dynamo and autograd's tracing without inductor's
    slow C++ compile; the failure was in dynamo."""
    import torch._dynamo

    torch._dynamo.reset()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    for convention in ("timm", "paper", "seed", "paper:1e-4"):
        name, _, eps = convention.partition(":")
        net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
        model = wsurgery.convert(net, mode="ws", norm="gn", gn_groups=4, convention=name,
                                 eps=float(eps) if eps else None)[0].train()
        twin = clone_model(model)
        model(x).square().sum().backward()
        torch.compile(twin, backend="aot_eager")(x).square().sum().backward()
        for a, b in zip(model.parameters(), twin.parameters(), strict=True):
            assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()
