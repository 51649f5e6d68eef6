"""Helpers shared by the core surgery tests (not a test module: its name starts with ``_``)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from wsurgery.convert import TIMM_WS_TYPES
from wsurgery.norm import is_batchnorm

__all__ = ["assert_no_standardization", "assert_rel_close", "module_types", "randomize_norms", "rel_diff"]


@torch.no_grad()
def randomize_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running stats and affine, and every timm
    ``ScaledStdConv2d`` a non-trivial gain, so folding them is really tested.

    Statistics are kept moderate (var in [0.5, 2], mean ~ N(0, 0.1)) so deep plain
    networks (vgg, densenet) neither explode nor vanish.
    """
    gen = torch.Generator().manual_seed(seed)

    def uniform(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=gen) * std)

    for m in model.modules():
        if is_batchnorm(m):
            if getattr(m, "running_mean", None) is not None:
                normal(m.running_mean, 0.1)
                uniform(m.running_var, 0.5, 2.0)
            if getattr(m, "weight", None) is not None:
                uniform(m.weight, 0.5, 1.5)
            if getattr(m, "bias", None) is not None:
                normal(m.bias, 0.1)
        elif isinstance(m, TIMM_WS_TYPES) and hasattr(m, "gain"):
            uniform(m.gain, 0.5, 1.5)
    return model


def rel_diff(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the measure ``wsurgery.verify`` uses)."""
    out, ref = out.double(), ref.double()
    scale = ref.abs().max().item()
    return (out - ref).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5, what: str = "") -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    d = rel_diff(out, ref)
    assert d <= rtol, f"{what}: relative difference {d:.3g} > {rtol:g}"


def assert_no_standardization(model: nn.Module, what: str = "") -> None:
    """No parametrization, no timm WS conv, no wsurgery parametrization class left."""
    for name, m in model.named_modules():
        assert not parametrize.is_parametrized(m), f"{what}: {name} is still parametrized"
        assert not isinstance(m, TIMM_WS_TYPES), f"{what}: {name} is still a {type(m).__name__}"
        assert "Parametrized" not in type(m).__name__, f"{what}: {name} has class {type(m).__name__}"
        assert "Standardization" not in type(m).__name__, f"{what}: {name} is a {type(m).__name__}"
    assert not any("parametrizations" in k for k in model.state_dict()), f"{what}: parametrized keys left"


def module_types(model: nn.Module) -> dict[str, type]:
    return {name: type(m) for name, m in model.named_modules()}
