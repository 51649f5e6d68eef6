"""BatchNorm -> GroupNorm replacement.

GroupNorm: Wu & He, "Group Normalization", https://arxiv.org/abs/1803.08494

Every BatchNorm flavour found in timm models is handled. The ones that carry an
activation and dropout (timm's ``BatchNormAct2d``, ``SyncBatchNormAct``,
``FrozenBatchNormAct2d``) become ``timm.layers.GroupNormAct`` holding the *same* ``act``
and ``drop`` modules: swapping them for a plain GroupNorm would silently drop the
activation. The rest become ``timm.layers.GroupNorm``, the class timm itself builds for
``norm_layer='groupnorm'``, so a converted resnet can be rebuilt by stock timm. One group gives
timm's one-group classes (``GroupNorm1``, ``GroupNorm1Act``: what ``norm_layer='groupnorm1'``
builds, the same computation), so a one-group export loads in stock timm too.
"""

from __future__ import annotations

import math

import torch
from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d, GroupNorm, GroupNorm1, GroupNormAct
from timm.layers.norm_act import GroupNorm1Act, SyncBatchNormAct
from torch import nn

from .errors import ConversionError

try:  # torchvision's FrozenBatchNorm2d is what timm's freeze_batch_norm_2d produces
    from torchvision.ops.misc import FrozenBatchNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency
    FrozenBatchNorm2d = ()  # type: ignore[assignment,misc]

__all__ = ["batchnorm_to_groupnorm", "carries_activation", "gn_num_groups", "is_batchnorm"]

_ACT_BN_TYPES = (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d)


def is_batchnorm(module: nn.Module) -> bool:
    """True for every 2-D BatchNorm flavour wsurgery converts."""
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm3d)):
        return False
    return isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d))


def carries_activation(module: nn.Module) -> bool:
    return isinstance(module, _ACT_BN_TYPES)


def gn_num_groups(
    num_channels: int, groups: int = 32, group_size: int | None = None, rule: str = "gcd"
) -> int:
    """The number of GroupNorm groups for ``num_channels`` channels.

    Args:
        num_channels: channels of the norm layer.
        groups: target number of groups.
        group_size: channels per group; when given it must divide ``num_channels``.
        rule: when ``groups`` does not divide ``num_channels``: ``gcd`` -> ``gcd(C, groups)``,
            ``divisor`` -> largest divisor of C not above ``groups``, ``error`` -> raise.

    Raises:
        ConversionError: the channels cannot be split as asked.
    """
    if rule not in ("gcd", "divisor", "error"):
        raise ConversionError(f"gn_group_rule must be gcd, divisor or error, got {rule!r}")
    if (group_size is not None and group_size < 1) or (group_size is None and groups < 1):
        raise ConversionError(f"GroupNorm groups and group sizes must be at least 1, got groups={groups}, "
                              f"group_size={group_size}")
    if group_size is not None:
        if num_channels % group_size:
            raise ConversionError(
                f"{num_channels} channels do not split into groups of {group_size}; "
                "pick a gn_group_size that divides every norm layer's channels, or use gn_groups"
            )
        return num_channels // group_size
    if num_channels % groups == 0:
        return groups
    if rule == "gcd":
        return math.gcd(num_channels, groups)
    if rule == "divisor":
        return max(d for d in range(1, min(groups, num_channels) + 1) if num_channels % d == 0)
    raise ConversionError(
        f"{num_channels} channels are not divisible by {groups} groups; "
        "use gn_group_rule 'gcd' or 'divisor', or another gn_groups"
    )


def _bn_affine(bn: nn.Module, like: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    num = bn.num_features if hasattr(bn, "num_features") else bn.weight.shape[0]
    # a BN without affine: ones and zeros where its statistics live (the model's device and dtype),
    # or, with no statistics either, where ``like`` (a tensor of the model) lives
    ref = next((t for t in (*bn.parameters(), *bn.buffers()) if t.is_floating_point()), like)
    where = {"device": ref.device, "dtype": ref.dtype} if ref is not None else {}
    weight = bn.weight if getattr(bn, "weight", None) is not None else torch.ones(num, **where)
    bias = bn.bias if getattr(bn, "bias", None) is not None else torch.zeros(num, **where)
    return weight.detach(), bias.detach()


def _num_channels(bn: nn.Module) -> int:
    return int(getattr(bn, "num_features", None) or bn.weight.shape[0])


def batchnorm_to_groupnorm(
    bn: nn.Module, num_groups: int, eps: float = 1e-5, like: torch.Tensor | None = None
) -> nn.Module:
    """A GroupNorm (or GroupNormAct) replacing ``bn``; the affine is copied.

    The activation and dropout of an act-carrying BN are moved over as they are. With one group, timm's
    ``GroupNorm1`` (``GroupNorm1Act``): the classes stock timm builds for ``norm_layer='groupnorm1'``.
    The new module is on ``bn``'s device and dtype (``like``'s, for a BN that holds no tensor at
    all) and has its ``training`` flag.
    """
    channels = _num_channels(bn)
    weight, bias = _bn_affine(bn, like)
    if carries_activation(bn):
        gn: nn.Module = (GroupNorm1Act(channels, eps=eps, affine=True, apply_act=False) if num_groups == 1 else
                         GroupNormAct(channels, num_groups, eps=eps, affine=True, apply_act=False))
        gn.act = bn.act
        gn.drop = bn.drop
    else:
        gn = (GroupNorm1(channels, eps=eps, affine=True) if num_groups == 1 else
              GroupNorm(channels, num_groups, eps=eps, affine=True))
    gn = gn.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        gn.weight.copy_(weight)
        gn.bias.copy_(bias)
    gn.train(bn.training)
    frozen = [p for p in (getattr(bn, "weight", None), getattr(bn, "bias", None))
              if isinstance(p, nn.Parameter) and not p.requires_grad]
    # a BN frozen with requires_grad_(False) gives a frozen affine; one without an affine Parameter (or
    # timm's FrozenBatchNorm2d, whose affine is a buffer) a trainable one, as a model loaded from disk has
    if frozen:
        gn.requires_grad_(False)
    return gn
