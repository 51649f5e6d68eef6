"""``standardize_once``: one standardization per optimizer step, gradients equal to the naive loop.

The reference is always the plain model run micro-batch by micro-batch (every forward
standardizes again), on an identical copy of the same weights.
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.testing import assert_close

import wsurgery
from wsurgery.accumulate import standardize_once
from wsurgery.convert import clone_model, ws_parametrizations
from wsurgery.errors import UsageError
from wsurgery.standardize import WeightStandardization


def _small_net() -> nn.Module:
    """Plain, grouped, depthwise, biased and 1x1 convs, BN (-> GN), dropout and a linear head."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=True), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 1, stride=2), nn.BatchNorm2d(32), nn.ReLU(), nn.Dropout(0.0),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 7),
    )


def _converted(mode: str, convention: str = "timm", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _small_net()
    model, _ = wsurgery.convert(net, mode=mode, convention=convention, norm="gn", gn_groups=4, trace=False)
    # move the adaptive gain/shift and the norms away from their init so every gradient term matters
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.mul_(1 + 0.1 * torch.randn_like(p)).add_(0.01 * torch.randn_like(p))
    return model


def _batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 12, 12, generator=g), torch.randint(0, 7, (2,), generator=g)) for _ in range(n)]


def _micro_step(model: nn.Module, batches) -> list[torch.Tensor]:
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y) / len(batches)
        loss.backward()
        losses.append(loss.detach())
    return losses


def _grads(model: nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: (p.grad.clone() if p.grad is not None else None) for n, p in model.named_parameters()}


def _assert_same_grads(a: nn.Module, b: nn.Module) -> None:
    ga, gb = _grads(a), _grads(b)
    assert ga.keys() == gb.keys()
    for name in ga:
        assert (ga[name] is None) == (gb[name] is None), name
        if ga[name] is not None:
            # float32 rounding, which the WS backward's centring and projection amplify where entries
            # cancel: scaled to the largest entry (seen: 6e-5 on a conv_stem gradient of max 51, 2 threads)
            atol = max(1e-6, 1e-5 * ga[name].abs().max().item())
            assert_close(gb[name], ga[name], rtol=1e-4, atol=atol, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("mode", ["ws", "aws"])
@pytest.mark.parametrize("convention", ["timm", "paper"])
@pytest.mark.parametrize("n_micro", [1, 4])
def test_gradients_equal_naive_per_micro_batch(mode, convention, n_micro):
    naive = _converted(mode, convention)
    once = clone_model(naive)
    batches = _batches(n_micro)
    naive_losses = _micro_step(naive, batches)
    with standardize_once(once) as count:
        once_losses = _micro_step(once, batches)
    assert count == sum(1 for _ in ws_parametrizations(naive)) == 4
    assert_close(torch.stack(once_losses), torch.stack(naive_losses), rtol=1e-5, atol=1e-7)
    _assert_same_grads(naive, once)
    # every parameter received a real gradient: V, gain/shift, norms, head
    for name, p in once.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if mode == "aws":
        assert any(name.endswith(".gain") for name, _ in once.named_parameters())


def test_standardizes_once_per_weight_however_many_micro_batches(monkeypatch):
    model = _converted("aws")
    calls = []
    original = WeightStandardization.forward

    def counting_forward(self, weight):
        calls.append(self._frozen is None)
        return original(self, weight)

    monkeypatch.setattr(WeightStandardization, "forward", counting_forward)
    with standardize_once(model):
        _micro_step(model, _batches(5))
    # 4 convs x 5 micro-batches forwards, none of them recomputes W_hat
    assert len(calls) == 20 and not any(calls)
    calls.clear()
    _micro_step(model, _batches(2))
    assert len(calls) == 8 and all(calls)


def test_existing_grads_accumulate_like_the_naive_loop():
    naive = _converted("aws")
    once = clone_model(naive)
    first, rest = _batches(1, seed=3), _batches(3, seed=4)
    _micro_step(naive, first)
    _micro_step(once, first)
    _micro_step(naive, rest)
    with standardize_once(once):
        _micro_step(once, rest)
    _assert_same_grads(naive, once)


@pytest.mark.parametrize(
    "arch", ["test_efficientnet", pytest.param("tf_efficientnet_lite0", marks=pytest.mark.sweep)]
)
def test_timm_model_with_same_padding_and_depthwise(arch):
    """timm models: depthwise convs, SE convs with bias, TF 'same' padding (Conv2dSame, lite0)."""
    torch.manual_seed(0)
    net = timm.create_model(arch, pretrained=False, num_classes=5)
    naive, _ = wsurgery.convert(net, mode="aws", norm="gn", trace=False)
    once = clone_model(naive)
    batches = [(torch.randn(1, 3, 32, 32), torch.tensor([i % 5])) for i in range(3)]
    _micro_step(naive, batches)
    with standardize_once(once):
        _micro_step(once, batches)
    _assert_same_grads(naive, once)


def test_exception_clears_slots_and_drops_the_partial_step():
    model = _converted("aws")
    reference = clone_model(model)
    with pytest.raises(RuntimeError, match="boom"), standardize_once(model):
        _micro_step(model, _batches(1))
        raise RuntimeError("boom")
    assert all(p._frozen is None for _, _, p in ws_parametrizations(model))
    # V and gain/shift got nothing (the step was abandoned); norms/head got their direct grads
    for name, p in model.named_parameters():
        if "parametrizations" in name:
            assert p.grad is None, name
    # the model works normally afterwards: a fresh naive step matches a fresh model
    model.zero_grad(set_to_none=True)
    batches = _batches(2, seed=9)
    _micro_step(model, batches)
    _micro_step(reference, batches)
    _assert_same_grads(reference, model)


def test_optimizer_step_inside_the_block_is_refused():
    model = _converted("ws")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _micro_step(model, _batches(1, seed=5))  # V.grad exists, so a step inside the block moves V
    with pytest.raises(UsageError, match="after the"), standardize_once(model):
        _micro_step(model, _batches(1))
        opt.step()
    assert all(p._frozen is None for _, _, p in ws_parametrizations(model))


def test_nesting_is_refused():
    model = _converted("ws")
    with standardize_once(model):
        with pytest.raises(UsageError, match="already active"), standardize_once(model):
            pass
        assert all(p._frozen is not None for _, _, p in ws_parametrizations(model))
    assert all(p._frozen is None for _, _, p in ws_parametrizations(model))


@pytest.mark.parametrize("mode", ["ws", "aws"])
def test_no_grad_eval_use_is_a_weight_cache(mode):
    model = _converted(mode).eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        with standardize_once(model) as count:
            assert count == 4
            for _, _, p in ws_parametrizations(model):
                assert not p._frozen.requires_grad
            got1, got2 = model(x), model(x[:1])
    assert_close(got1, expected, rtol=0, atol=0)
    assert_close(got2, expected[:1], rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert all(p._frozen is None for _, _, p in ws_parametrizations(model))


def test_frozen_backbone_trains_only_what_requires_grad():
    naive = _converted("aws")
    for name, p in naive.named_parameters():
        if name.endswith("original"):
            p.requires_grad_(False)  # V frozen, AWS gain/shift + norms + head train
    once = clone_model(naive)
    batches = _batches(3)
    _micro_step(naive, batches)
    with standardize_once(once):
        _micro_step(once, batches)
    _assert_same_grads(naive, once)
    assert any(n.endswith(".gain") and p.grad is not None for n, p in once.named_parameters())

    for p in once.parameters():  # everything frozen: nothing to push, no error
        p.requires_grad_(False)
        p.grad = None
    with standardize_once(once), torch.no_grad():
        once(batches[0][0])
    assert all(p.grad is None for p in once.parameters())


def test_model_without_ws_convs_is_a_noop():
    net = _small_net()
    with standardize_once(net) as count:
        _micro_step(net, _batches(1))
    assert count == 0
    assert net[0].weight.grad is not None


def test_sgd_trajectory_matches_naive_over_steps():
    """Three optimizer steps of 3 micro-batches each: the weights stay equal."""
    naive = _converted("aws", "seed")
    once = clone_model(naive)
    opt_a = torch.optim.SGD(naive.parameters(), lr=0.05, momentum=0.9)
    opt_b = torch.optim.SGD(once.parameters(), lr=0.05, momentum=0.9)
    for step in range(3):
        batches = _batches(3, seed=10 + step)
        _micro_step(naive, batches)
        with standardize_once(once):
            _micro_step(once, batches)
        opt_a.step(), opt_b.step()
        opt_a.zero_grad(), opt_b.zero_grad()
    for (name, a), (_, b) in zip(naive.named_parameters(), once.named_parameters()):
        assert_close(b, a, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
