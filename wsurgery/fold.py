"""Fold: compute the standardized weights once and leave plain convs behind.

* WS / adaptive-WS parametrizations: each standardized weight is computed once by the very
  function the forward used (so the folded conv reproduces the unfolded one bit for bit) and
  checked, then the parametrization is removed (``remove_parametrizations``, in place) or the
  module is copied without it (the default, ``inplace=False``); either way each module gets
  its original class back.
* timm's own ``StdConv2d`` / ``ScaledStdConv2d`` (and their ``Same`` variants) become
  ``nn.Conv2d`` / ``Conv2dSame`` holding the weight their forward computes (gain and
  fan-in scale included), with the same ``F.batch_norm`` call timm uses.
* Optionally (``fold_bn``), a BatchNorm fed directly by a conv is folded into that conv with
  ``torch.nn.utils.fusion.fuse_conv_bn_weights`` (running statistics, as in eval mode).

No standardization op is left in the graph; the result needs no wsurgery code to run.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2dSame
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .convert import (
    FOLD_ATTR,
    FOLDED_STD_ATTR,
    TIMM_WS_TYPES,
    all_finite,
    clone_model,
    own_class,
    require_module,
    unwrap,
    ws_parametrizations,
)
from .errors import ConversionError, NonFiniteWeightsError, UsageError
from .graph import trace_calls
from .norm import carries_activation, is_batchnorm

__all__ = ["FOLD_ATTR", "find_conv_bn_pairs", "fold", "fold_conv_bn", "is_folded", "timm_std_conv_weight"]


def timm_std_conv_weight(module: nn.Conv2d) -> torch.Tensor:
    """The weight a timm ``StdConv2d``-family module computes in its forward, exactly."""
    gain = None
    if isinstance(module, (ScaledStdConv2d, ScaledStdConv2dSame)):
        gain = (module.gain * module.scale).view(-1)
    return F.batch_norm(
        module.weight.reshape(1, module.out_channels, -1), None, None,
        weight=gain, training=True, momentum=0.0, eps=module.eps,
    ).reshape_as(module.weight)


def _plain_conv_like(module: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    same = isinstance(module, (StdConv2dSame, ScaledStdConv2dSame)) and getattr(module, "same_pad", False)
    kwargs = dict(stride=module.stride, dilation=module.dilation, groups=module.groups, bias=module.bias is not None)
    if same:
        conv: nn.Conv2d = Conv2dSame(module.in_channels, module.out_channels, module.kernel_size, **kwargs)
    else:
        conv = nn.Conv2d(module.in_channels, module.out_channels, module.kernel_size,
                         padding=module.padding, padding_mode=module.padding_mode, **kwargs)
    conv = conv.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if module.bias is not None:
            conv.bias.copy_(module.bias)
    conv.train(module.training)
    return conv


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if not all_finite(tensor):
        raise NonFiniteWeightsError(
            f"{name} holds NaN or inf after standardization; refusing to fold (resume from an earlier checkpoint)"
        )


def is_folded(model: nn.Module) -> bool:
    """True when no WS parametrization and no timm WS conv is left in ``model``."""
    return not any(True for _ in ws_parametrizations(model)) and not any(
        isinstance(m, TIMM_WS_TYPES) for m in model.modules()
    )


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where a plain conv's only consumer is a BatchNorm.

    Raises:
        ConversionError: the model cannot be traced with torch.fx.
    """
    traced = trace_calls(model)
    if traced is None:
        raise ConversionError("fold_bn needs a torch.fx trace of the model and this one cannot be traced; "
                              "export without fold_bn")
    succ, calls = traced
    modules = dict(model.named_modules())
    feeders: dict[str, int] = {}
    for users in succ.values():
        for u in users:
            feeders[u] = feeders.get(u, 0) + 1
    pairs = []
    for name, users in succ.items():
        conv = modules.get(name)
        if type(conv) not in (nn.Conv2d, Conv2dSame) or len(users) != 1:
            continue
        bn = modules.get(users[0])
        if bn is None or not is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
            continue
        # a module called twice (a BN shared by two branches) folded into one of its callers breaks the other
        if feeders.get(users[0]) != 1 or calls.get(name) != 1 or calls.get(users[0]) != 1:
            continue
        pairs.append((name, users[0]))
    return pairs


def _checked_pairs(model: nn.Module, fold_bn: Any) -> list[tuple[str, str]]:
    """``fold_bn`` as ``(conv, bn)`` name pairs that exist and fit, or :class:`UsageError` (nothing changed)."""
    if isinstance(fold_bn, (str, bytes)) or not isinstance(fold_bn, (list, tuple)):
        raise UsageError(f"fold_bn must be True/False or a list of (conv, bn) name pairs, got {fold_bn!r}")
    modules = dict(model.named_modules())
    pairs = []
    for pair in fold_bn:
        if isinstance(pair, (str, bytes)) or len(pair) != 2:
            raise UsageError(f"fold_bn entries must be (conv, bn) name pairs, got {pair!r}")
        conv, bn = (modules.get(name) for name in pair)
        if not isinstance(conv, nn.Conv2d):
            raise UsageError(f"fold_bn: {pair[0]!r} is not a conv of this model; find_conv_bn_pairs(model) lists them")
        if bn is None or not is_batchnorm(bn) or getattr(bn, "running_mean", None) is None:
            raise UsageError(f"fold_bn: {pair[1]!r} is not a BatchNorm with running statistics in this model; "
                             "find_conv_bn_pairs(model) lists the pairs that fold")
        pairs.append((str(pair[0]), str(pair[1])))
    return pairs


def _bn_replacement(bn: nn.Module) -> nn.Module:
    if carries_activation(bn):
        return nn.Sequential(OrderedDict(drop=bn.drop, act=bn.act))
    return nn.Identity()


def fold_conv_bn(model: nn.Module, pairs: list[tuple[str, str]], *, structure_only: bool = False) -> None:
    """Fold each BN of ``pairs`` into its conv, in place (eval-mode statistics).

    With ``structure_only`` the modules are reshaped (bias added, BN removed) without
    computing weights; :func:`wsurgery.load` uses it to rebuild an export before loading it.
    """
    for conv_name, bn_name in pairs:
        conv = model.get_submodule(conv_name)
        bn = model.get_submodule(bn_name)
        if structure_only:
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=conv.weight.device,
                                                     dtype=conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        else:
            w = bn.weight if bn.weight is not None else torch.ones_like(bn.running_mean)
            b = bn.bias if bn.bias is not None else torch.zeros_like(bn.running_mean)
            fused_w, fused_b = fuse_conv_bn_weights(
                conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps, w, b
            )
            conv.weight = nn.Parameter(fused_w.detach(), requires_grad=conv.weight.requires_grad)
            conv.bias = nn.Parameter(fused_b.detach(), requires_grad=conv.weight.requires_grad)
        model.set_submodule(bn_name, _bn_replacement(bn))


def _plain_copy(module: nn.Module, weight: torch.Tensor, memo: dict[int, Any]) -> nn.Module:
    """A deep copy of a parametrized ``module`` as its original class holding ``weight``.

    ``register_parametrization`` wraps the class as ``Parametrized<Cls>(Cls)`` and moves the
    weight into ``module.parametrizations``; the copy drops both, so neither the
    pre-standardization weight nor the adaptive gain/shift is copied only to be thrown away.
    """
    cls = type(module).__bases__[0]
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = dict(module.__dict__)
    state["_modules"] = OrderedDict((k, v) for k, v in module._modules.items() if k != "parametrizations")
    state["_parameters"] = OrderedDict((k, v) for k, v in module._parameters.items())
    new.__dict__.update(copy.deepcopy(state, memo))
    requires_grad = module.parametrizations.weight.original.requires_grad
    params = OrderedDict(weight=nn.Parameter(weight, requires_grad=requires_grad))
    params.update(new._parameters)  # weight first, as a plain conv registers it
    new._parameters = params
    return new


def _folded_copy(model: nn.Module, standardized: list[tuple[str, nn.Module, torch.Tensor]]) -> nn.Module:
    """A deep copy of ``model`` in which each WS-parametrized module is already folded.

    Faster than copying and then calling ``remove_parametrizations`` (resnet50: about half
    the time), and the result is the same: plain modules of the original class holding the
    standardized weights.
    """
    memo: dict[int, Any] = {}
    for _, module, weight in standardized:
        _plain_copy(module, weight, memo)
    return clone_model(model, memo=memo)


@torch.no_grad()
def fold(
    model: nn.Module,
    *,
    fold_bn: bool | list[tuple[str, str]] = False,
    inplace: bool = False,
) -> nn.Module:
    """Fold every Weight Standardization in ``model`` into plain conv weights.

    Works on models converted by :func:`wsurgery.convert` and on timm models that use
    ``StdConv2d`` / ``ScaledStdConv2d`` themselves (BiT, NFNet).

    Args:
        model: the model to fold.
        fold_bn: also fold each BatchNorm that directly follows a conv into it (True), or
            fold exactly the given ``(conv, bn)`` name pairs.
        inplace: fold ``model`` itself; by default a deep copy is folded and ``model`` keeps
            working unchanged (so it can be compared with the result). A model inside
            ``torch.compile`` or ``DataParallel``/DDP is folded inside its wrapper; the copy is of
            the model inside.

    Returns:
        The folded model. ``model.wsurgery_folded_bn`` lists the BN pairs folded.

    Raises:
        NonFiniteWeightsError: a standardized weight holds NaN or inf (nothing is changed).
    """
    outer = require_module(model)
    model = unwrap(outer)  # fold the model inside a torch.compile/DataParallel wrapper (save/export unwrap too)
    # compute and check everything before changing anything
    pairs_given = None if isinstance(fold_bn, bool) else _checked_pairs(model, fold_bn)
    standardized = []
    for name, module, _ in ws_parametrizations(model):
        weight = module.weight  # the parametrization's forward: the very value training used
        _check_finite(f"{name}.weight", weight)
        standardized.append((name, module, weight))
    new_convs = []
    for name, module in model.named_modules():
        if isinstance(module, TIMM_WS_TYPES):
            weight = timm_std_conv_weight(module)
            _check_finite(f"{name}.weight", weight)
            new_convs.append((name, _plain_conv_like(module, weight)))
    if inplace:
        restored: set[int] = set()
        # a Parameter tied to a module that is not WS-converted (left out with `exclude`) must keep
        # its raw value there: that conv gets a Parameter of its own instead of the shared one
        converted = {id(module) for _, module, _ in standardized}
        shared_outside = {id(p) for m in model.modules()
                          if id(m) not in converted and not isinstance(m, parametrize.ParametrizationList)
                          for p in m.parameters(recurse=False)}
        for _, module, weight in standardized:
            # what remove_parametrizations(leave_parametrized=True) does, without computing the
            # standardized weight a second time: restore the original Parameter, then point it
            # at the value computed above (bit-identical to what the forward used).
            # A class of its own first: a plain copy.deepcopy (timm's ModelEma) shares the
            # Parametrized* class, and removing the property from it would break the other copy.
            own_class(module)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
            original = module.weight
            if id(original) in restored or id(original) in shared_outside:  # shared: each gets its own value
                module.weight = nn.Parameter(weight, requires_grad=original.requires_grad)
            else:
                restored.add(id(original))
                original.set_(weight)
    else:
        model = _folded_copy(model, standardized)
    for name, conv in new_convs:
        model.set_submodule(name, conv)
    pairs: list[tuple[str, str]] = []
    if fold_bn:
        pairs = find_conv_bn_pairs(model) if pairs_given is None else pairs_given
        fold_conv_bn(model, pairs)
    # pairs folded before (a model loaded from a --fold-bn export) stay on the record: the
    # export written from this model has to rebuild them too
    earlier = [list(p) for p in getattr(model, FOLD_ATTR, None) or []]
    setattr(model, FOLD_ATTR, earlier + [list(p) for p in pairs if list(p) not in earlier])
    if new_convs:  # timm's own WS convs are plain now; a later convert must know (see convert)
        setattr(model, FOLDED_STD_ATTR, list(getattr(model, FOLDED_STD_ATTR, None) or []) + [n for n, _ in new_convs])
    return outer if inplace else model
