"""The surgery: every conv -> its Weight-Standardized equivalent, optionally BN -> GN.

Convs are converted with :func:`torch.nn.utils.parametrize.register_parametrization`, so
each module keeps its own ``forward``: timm's ``Conv2dSame`` keeps its TF padding,
``MixedConv2d`` keeps splitting channels, ``CondConv2d`` keeps routing experts. Folding is
``remove_parametrizations(..., leave_parametrized=True)``, which gives every module its
original class back (see :mod:`wsurgery.fold`).

As in peft's ``inject_adapter``, the whole plan is validated before the model is touched:
a failure never leaves a half-converted model.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from timm.layers import CondConv2d, MixedConv2d, ScaledStdConv2d, ScaledStdConv2dSame, StdConv2d, StdConv2dSame
from torch import nn
from torch.nn.utils import parametrize

from .config import SurgeryConfig, build_config_from
from .errors import ArgumentTypeError, ConversionError, NonFiniteWeightsError
from .graph import module_successors
from .norm import batchnorm_to_groupnorm, gn_num_groups, is_batchnorm
from .standardize import AdaptiveWeightStandardization, WeightStandardization

__all__ = [
    "FOLD_ATTR",
    "TIMM_WS_TYPES",
    "LayerChange",
    "SurgeryReport",
    "all_finite",
    "apply_surgery",
    "clone_model",
    "convert",
    "get_surgery_config",
    "input_channels",
    "is_converted",
    "modes_kept",
    "plan_surgery",
    "pooled_norms",
    "unwrap",
    "with_input_channels",
    "ws_parametrizations",
]

#: timm layers that already standardize their weights: recognised, left as they are, folded.
TIMM_WS_TYPES = (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)

_CONFIG_ATTR = "wsurgery_config"
#: attribute holding the list of (conv, bn) names folded by ``fold_bn`` (set by fold and load)
FOLD_ATTR = "wsurgery_folded_bn"
#: attribute holding the names of timm's own WS convs (StdConv2d ...) that fold made plain convs
FOLDED_STD_ATTR = "wsurgery_folded_std_convs"


@dataclass
class LayerChange:
    """One module the surgery changed (or recognised)."""

    name: str
    old_type: str
    new_type: str
    params_before: int
    params_after: int
    note: str = ""


@dataclass
class SurgeryReport:
    """What :func:`convert` did, for people and for the saved config."""

    changes: list[LayerChange] = field(default_factory=list)
    already_standardized: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    #: convs whose output does not go straight into a norm layer (None: model not traceable)
    convs_without_norm: list[str] | None = None
    #: converted convs the trace could not judge: called inside a module the tracer keeps whole
    #: (timm's notrace modules, e.g. NormFreeBlock) or not called as modules at all
    convs_not_traced: list[str] = field(default_factory=list)
    zero_variance_filters: dict[str, int] = field(default_factory=dict)
    #: convolutions WS does not apply to here (Conv1d, Conv3d, transposed convs), left as they are
    other_convs: list[str] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0

    @property
    def num_convs(self) -> int:
        return sum(1 for c in self.changes if "Conv" in c.old_type)

    @property
    def num_norms(self) -> int:
        return sum(1 for c in self.changes if "Norm" in c.new_type)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgeryReport:
        data = dict(data)
        data["changes"] = [LayerChange(**c) for c in data.get("changes", [])]
        return cls(**data)


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _matches(name: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def clone_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy`` that is safe for parametrized modules.

    ``deepcopy`` keeps the dynamic ``Parametrized*`` class that ``register_parametrization``
    created, shared by original and copy; ``remove_parametrizations`` on the copy then
    deletes the ``weight`` property from that shared class and breaks the original. Each
    parametrized module of the copy gets a class of its own here.
    """
    new = copy.deepcopy(model, memo)
    for module in new.modules():
        if parametrize.is_parametrized(module):
            own_class(module)
    return new


def require_module(obj: Any) -> nn.Module:
    """``obj`` if it is a torch module, else a one-line :class:`ArgumentTypeError` saying what to pass."""
    if isinstance(obj, nn.Module):
        return obj
    hint = "; load it first: wsurgery.load(...)" if isinstance(obj, (str, os.PathLike)) else ""
    raise ArgumentTypeError(f"the model must be a torch.nn.Module (from wsurgery.load or timm.create_model), "
                            f"got {type(obj).__name__}{hint}")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside ``torch.compile`` (``_orig_mod``) and ``DataParallel``/DDP (``module``) wrappers.

    The wrappers prefix every state-dict key (``_orig_mod.``, ``module.``) and hide timm's methods, so
    what is saved, exported, calibrated or trained is the module they wrap (which they share).
    """
    model = require_module(model)
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        else:
            return model


def own_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` a ``Parametrized*`` class of its own (see :func:`clone_model`)."""
    cls = type(module)
    module.__class__ = type(cls.__name__, cls.__bases__, dict(cls.__dict__))


def ws_parametrizations(model: nn.Module):
    """Yield ``(name, module, parametrization)`` for every WS-parametrized weight in ``model``."""
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module, "weight"):
            for p in module.parametrizations.weight:
                if isinstance(p, WeightStandardization):
                    yield name, module, p


def is_converted(model: nn.Module) -> bool:
    """True if any weight in ``model`` carries a WS parametrization."""
    return next(iter(ws_parametrizations(model)), None) is not None


def _refuse_converted(model: nn.Module) -> None:
    if is_converted(model):
        raise ConversionError("this model is already converted; load the original model to convert it again")


def get_surgery_config(model: nn.Module) -> SurgeryConfig | None:
    """The config a model was converted with, or None."""
    return getattr(model, _CONFIG_ATTR, None)


def all_finite(tensor: torch.Tensor) -> bool:
    """True if ``tensor`` holds no NaN or inf.

    Fast path: one reduction (``sum`` is NaN/inf if any element is) without the boolean
    tensor ``isfinite`` allocates; a non-finite sum is confirmed element-wise, so a sum that
    merely overflows from huge finite values is not mistaken for NaN.
    """
    if tensor.numel() == 0 or tensor.is_meta:  # meta: structure only (save's rebuild check), no values
        return True
    if bool(torch.isfinite(tensor.detach().sum())):
        return True
    return bool(torch.isfinite(tensor).all())


def _is_convertible_conv(module: nn.Module) -> bool:
    if isinstance(module, TIMM_WS_TYPES):
        return False
    return isinstance(module, (nn.Conv2d, CondConv2d))


def _fan_in(module: nn.Module) -> tuple[int, int]:
    """(entries per filter, number of filters) of a conv or CondConv expert bank."""
    if isinstance(module, CondConv2d):
        kh, kw = module.kernel_size
        fan_in = module.in_channels // module.groups * kh * kw
        return fan_in, module.weight.numel() // fan_in
    return module.weight[0].numel(), module.weight.shape[0]


@dataclass
class _Plan:
    convs: list[tuple[str, nn.Module]]
    norms: list[tuple[str, nn.Module, int]]
    already: list[str]
    skipped: list[str]
    pooled: frozenset[str] = frozenset()


def plan_surgery(model: nn.Module, config: SurgeryConfig, pooled: frozenset[str] = frozenset()) -> _Plan:
    """Decide every change and validate it, without touching the model.

    ``pooled`` names the BatchNorms that see 1x1 maps (see :func:`pooled_norms`): they become
    GroupNorm with ONE group (a LayerNorm over the channels), because with one value per group
    GroupNorm outputs its bias whatever the input.

    Raises:
        ConversionError: the model is already converted, patterns match nothing, or a norm
            layer's channels cannot be grouped as configured.
        NonFiniteWeightsError: a conv to convert holds NaN or inf.
    """
    if not isinstance(model, nn.Module):
        raise ConversionError(f"convert needs a torch.nn.Module, got {type(model).__name__}")
    _refuse_converted(model)
    convs, already, skipped = [], [], []
    for name, module in model.named_modules():
        if isinstance(module, TIMM_WS_TYPES):
            already.append(name)
            continue
        if not _is_convertible_conv(module):
            continue
        if (config.include and not _matches(name, config.include)) or _matches(name, config.exclude):
            skipped.append(name)
            continue
        held = getattr(getattr(module, "parametrizations", None), "weight", None)
        if held is not None and not hasattr(held, "original"):  # weight_norm: original0/original1
            raise ConversionError(
                f"{name}.weight is already parametrized with several tensors (weight_norm?), which fold cannot "
                f"turn back into one plain weight; remove it first: torch.nn.utils.parametrize."
                f"remove_parametrizations(model.get_submodule({name!r}), 'weight'), or exclude the conv")
        if held is None and "weight" not in module._parameters:  # torch.nn.utils.weight_norm (hook API): weight_g, _v
            raise ConversionError(
                f"{name}.weight is computed by a hook (torch.nn.utils.weight_norm?), not held as a parameter; "
                f"remove it first: torch.nn.utils.remove_weight_norm(model.get_submodule({name!r})), or exclude "
                "the conv")
        if isinstance(module.weight, nn.parameter.UninitializedParameter):  # LazyConv2d before its first call
            raise ConversionError(
                f"{name} is a lazy conv whose weight does not exist yet; run the model once on an input "
                "(model(torch.randn(1, 3, 224, 224))) before converting it")
        fan_in, _ = _fan_in(module)
        if config.convention == "paper" and fan_in < 2:
            raise ConversionError(f"{name}: 1 entry per filter cannot use the unbiased 'paper' convention; exclude it")
        if not all_finite(module.weight):
            raise NonFiniteWeightsError(f"{name}.weight holds NaN or inf; fix the checkpoint before converting")
        convs.append((name, module))
    if config.include and not convs:
        raise ConversionError(f"include patterns {config.include} match no conv; `wsurgery inspect` lists the names")
    norms = []
    if config.norm == "gn":
        for name, module in model.named_modules():
            if is_batchnorm(module):
                channels = int(getattr(module, "num_features", None) or module.weight.shape[0])
                if name in pooled:
                    norms.append((name, module, 1))
                    continue
                try:
                    groups = gn_num_groups(channels, config.gn_groups, config.gn_group_size, config.gn_group_rule)
                except ConversionError as e:
                    raise ConversionError(f"{name}: {e}") from None
                norms.append((name, module, groups))
    return _Plan(convs, norms, already, skipped, frozenset(pooled))


def _standardize_conv(name: str, module: nn.Module, config: SurgeryConfig) -> tuple[LayerChange, int]:
    fan_in, num_filters = _fan_in(module)
    convention = config.ws_convention
    old_type = type(module).__name__
    before = _numel(module)
    weight = module.weight.detach()
    if weight.is_meta:  # structure only (save's rebuild check): no values to count
        zero_var = 0
    elif fan_in > 1:  # a filter has zero variance exactly when its min equals its max
        lo, hi = torch.aminmax(weight.reshape(-1, fan_in), dim=1)
        zero_var = int((lo == hi).sum())
    else:
        zero_var = num_filters
    if config.mode == "aws":
        p: WeightStandardization = AdaptiveWeightStandardization(fan_in, convention, num_filters)
        p.to(device=weight.device, dtype=weight.dtype)
        p.init_from_weight(weight)
        p.requires_grad_(module.weight.requires_grad)  # a frozen conv stays frozen: gain and shift are its weight
    else:
        p = WeightStandardization(fan_in, convention)
    # unsafe=True skips the one trial evaluation register_parametrization does to check that
    # shape and dtype are kept (a full standardization of every conv); ours keep both.
    parametrize.register_parametrization(module, "weight", p, unsafe=True)
    note = f"{config.mode}/{convention.name}"
    if zero_var:
        note += f", {zero_var} zero-variance filters"
    change = LayerChange(name, old_type, f"{old_type}+{type(p).__name__}", before, _numel(module), note)
    return change, zero_var


#: timm entrypoints that build other modules with ``pretrained=True`` (``if pretrained:`` in timm's
#: models: fbnetc_100's weights were trained with BatchNorm eps 1e-3, so only then is it set).
#: ``wsurgery.load`` rebuilds with ``pretrained=False``, stock timm's ``local-dir:``/``hf-hub:`` loads
#: with ``pretrained=True``: the value the model was built with is recorded, so both build that.
PRETRAINED_DEPENDENT_ARGS = {"fbnetc_100": "bn_eps"}


def pin_build_args(model: nn.Module) -> None:
    """Record in timm's ``model._model_args`` a constructor argument that depends on ``pretrained``.

    Read from the BatchNorms, so it is called before BN -> GN replaces them (by :func:`convert`)
    and again when the record is written (``wsurgery.load``'s ``model_record``).
    """
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    key = PRETRAINED_DEPENDENT_ARGS.get(arch)
    args = getattr(model, "_model_args", None)
    if key is None or not isinstance(args, dict) or key in args:
        return
    eps = {float(m.eps) for m in model.modules() if is_batchnorm(m) and hasattr(m, "eps")}
    if len(eps) == 1:
        model._model_args = {**args, key: eps.pop()}  # a new dict: timm's may be shared


def apply_surgery(model: nn.Module, config: SurgeryConfig, plan: _Plan) -> SurgeryReport:
    """Carry out a validated plan in place. Use :func:`convert`, which plans first."""
    report = SurgeryReport(already_standardized=plan.already, skipped=plan.skipped, params_before=_numel(model))
    for name, module in plan.convs:
        change, zero_var = _standardize_conv(name, module, config)
        report.changes.append(change)
        if zero_var:
            report.zero_variance_filters[name] = zero_var
    like = next((t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()), None)
    for name, bn, groups in plan.norms:
        gn = batchnorm_to_groupnorm(bn, groups, eps=config.gn_eps, like=like)
        model.set_submodule(name, gn)
        note = "1 group (sees 1x1 maps)" if name in plan.pooled else f"{groups} groups"
        report.changes.append(LayerChange(name, type(bn).__name__, type(gn).__name__, _numel(bn), _numel(gn), note))
    report.params_after = _numel(model)
    report.other_convs = [n for n, m in model.named_modules()
                          if isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.Conv2d)]
    setattr(model, _CONFIG_ATTR, config)
    if config.norm == "gn":  # saved with the model, so a rebuild gives these layers one group too
        model.wsurgery_pooled_norms = sorted(plan.pooled)
    return report


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``model`` runs: the device and dtype of its first floating parameter (CPU, fp32 if none).

    Inputs made by wsurgery (probe batches, calibration images, example inputs) are moved here,
    so a model on a GPU, or in half precision, gets inputs it can take.
    """
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype


@contextlib.contextmanager
def modes_kept(model: nn.Module) -> Iterator[nn.Module]:
    """Give every submodule its own train/eval flag back afterwards.

    ``model.train(was_training)`` would set them all alike, unfreezing a BatchNorm the caller
    froze with ``.eval()`` inside a model in training mode.
    """
    saved = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for m, training in saved:
            m.training = training


#: class-name fragments of timm stem modules that reshape the image before the first conv
_REARRANGING_STEMS = ("SpaceToDepth", "Dct")


def input_channels(model: nn.Module) -> int | None:
    """The channels ``model`` takes.

    timm records ``in_chans`` where it was passed (``model._model_args``); ``pretrained_cfg`` keeps
    its 3 for a model built with ``in_chans=1``, so otherwise the first conv's input channels say
    it, except after a stem that rearranges the image before its first conv: TResNet's
    space-to-depth (3 channels become 48: divided back by its block size squared) and CSATv2's DCT
    stem (3 become 64: ``pretrained_cfg``'s channels).
    """
    model = unwrap(model)
    recorded = (getattr(model, "_model_args", None) or {}).get("in_chans")
    if isinstance(recorded, int) and not isinstance(recorded, bool):
        return recorded
    stem = None
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            if stem is None:
                return module.in_channels
            block = getattr(stem, "bs", None)
            if "SpaceToDepth" in type(stem).__name__ and isinstance(block, int) and block > 0:
                return module.in_channels // (block * block)
            size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size")
            return int(size[0]) if size else 3
        if stem is None and any(kind in type(module).__name__ for kind in _REARRANGING_STEMS):
            stem = module
    return None


def with_input_channels(model: nn.Module, size: tuple[int, ...]) -> tuple[int, ...]:
    """``(C, H, W)`` with ``C`` the channels ``model`` takes."""
    channels = input_channels(model)
    return (channels, *size[1:]) if channels is not None else tuple(size)


def _probe_input(model: nn.Module) -> torch.Tensor | None:
    """One zero image of the model's default input size (timm's ``pretrained_cfg``, else 224 px)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels = input_channels(model)
    if channels is None:
        return None
    size = (channels, *tuple(cfg.get("input_size") or (3, 224, 224))[1:])
    if next(model.parameters(), None) is None:
        return None
    device, dtype = placement(model)
    return torch.zeros(1, *size, device=device, dtype=dtype)


def pooled_norms(model: nn.Module) -> frozenset[str] | None:
    """The BatchNorms that see 1x1 maps at the model's default input size.

    Split-attention (ResNeSt) and selective-kernel (SKNet) blocks put a BatchNorm in the small
    MLP they run on globally pooled features. A GroupNorm there would normalize each group over
    ``channels / groups`` values; with one value per group it returns its bias for every input.
    Found by one eval-mode forward pass of a zero image with pre-hooks (static shapes are not in
    the fx graph), so it costs one inference. ``None`` when the forward pass fails.
    """
    x = _probe_input(model)
    if x is None:
        return None
    found: set[str] = set()
    hooks = [m.register_forward_pre_hook(lambda _m, a, n=n: found.add(n) if a[0].shape[-2:].numel() == 1 else None)
             for n, m in model.named_modules() if is_batchnorm(m)]
    try:
        with torch.no_grad(), modes_kept(model):
            model.eval()
            model(x)
    except Exception:  # noqa: BLE001 - a model that cannot run a plain image just gets no probe
        return None
    finally:
        for h in hooks:
            h.remove()
    return frozenset(found)


def _is_norm(module: nn.Module) -> bool:
    return is_batchnorm(module) or isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm))


def _convs_without_norm(model: nn.Module, conv_names: list[str]) -> tuple[list[str] | None, list[str]]:
    """``(convs not followed by a norm, convs the trace does not show)``; ``(None, [])`` if untraceable."""
    # a MixedConv2d stays whole in the trace: its branch convs feed only its torch.cat, and what
    # follows the MixedConv2d (its BN) is what follows each branch
    succ = module_successors(model, leaf_types=(MixedConv2d,))
    if succ is None:
        return None, []
    modules = dict(model.named_modules())
    out, unseen = [], []
    for name in conv_names:
        parent = name.rpartition(".")[0]
        users = succ.get(parent if isinstance(modules.get(parent), MixedConv2d) else name)
        if users is None:  # never called as a module in the trace: not judged, and reported as such
            unseen.append(name)
        elif not any(u in modules and _is_norm(modules[u]) for u in users):
            out.append(name)
    return out, unseen


def convert(
    model: nn.Module,
    config: SurgeryConfig | None = None,
    *,
    inplace: bool = True,
    trace: bool = True,
    probe: bool = True,
    **overrides: Any,
) -> tuple[nn.Module, SurgeryReport]:
    """Convert every selected conv to Weight Standardization, optionally BN -> GN.

    The plan is validated first: if anything would fail, the model is left untouched.

    Args:
        model: a timm (or any torch) model.
        config: the surgery; keyword ``overrides`` build or update one
            (``convert(m, mode="aws", norm="gn")``).
        inplace: modify ``model`` itself (default, like timm's module converters). With
            ``False`` a deep copy is converted and ``model`` is left as it was. A model inside
            ``torch.compile`` or ``DataParallel``/DDP is converted inside its wrapper (the names are
            its own, without ``_orig_mod.``/``module.``); the copy is of the model inside.
        trace: find convs not followed by a norm layer (a torch.fx trace) for the report.
        probe: with ``norm="gn"``, run one forward pass of a zero image to find BatchNorms on
            1x1 maps (:func:`pooled_norms`); they get one GroupNorm group.

    Returns:
        ``(model, report)``: the converted model (the same object when ``inplace``) and a
        :class:`SurgeryReport` listing each module's old and new type.

    Raises:
        ConversionError: see :func:`plan_surgery`.
        ConfigError: a bad or unknown setting (``mode="xx"``, a misspelled keyword such as ``nrm="gn"``).

    Example:
        >>> import timm, wsurgery
        >>> model = timm.create_model("resnet18")
        >>> model, report = wsurgery.convert(model, mode="aws", norm="gn")
        >>> report.num_convs
        20
    """
    outer = require_module(model)
    # the surgery, its record and the names in the report and in include/exclude are the wrapped
    # model's: torch.compile and DataParallel/DDP wrappers share it, and save/export unwrap too
    model = unwrap(outer)
    if config is None:
        config = build_config_from(SurgeryConfig, overrides, "surgery")
    elif overrides:
        config = build_config_from(SurgeryConfig, {**config.to_dict(), **overrides}, "surgery")
    config, pooled = _keep_earlier_structure(model, config)
    if pooled is None:
        pooled = (pooled_norms(model) or frozenset()) if config.norm == "gn" and probe else frozenset()
    plan = plan_surgery(model, config, pooled)
    unnormalized, unseen = _convs_without_norm(model, [n for n, _ in plan.convs]) if trace else (None, [])
    if not inplace:
        model = clone_model(model)
        plan = plan_surgery(model, config, pooled)
    pin_build_args(model)  # while the BatchNorms whose eps it reads are still there
    report = apply_surgery(model, config, plan)
    if hasattr(model, "wsurgery_calibration"):  # an earlier surgery's calibration (a loaded export) is not this one's
        del model.wsurgery_calibration
    report.convs_without_norm = unnormalized
    report.convs_not_traced = unseen
    return (outer if inplace else model), report


def _keep_earlier_structure(model: nn.Module, config: SurgeryConfig) -> tuple[SurgeryConfig, frozenset[str] | None]:
    """The config to record for a model whose structure an earlier surgery already changed.

    A folded model (``wsurgery.fold`` or ``wsurgery.load`` of an export) still carries the
    surgery it came from. Its GroupNorms are kept in the new record (same group settings and
    1x1-map norms), so :func:`wsurgery.load` rebuilds the same modules; otherwise the saved
    directory would describe BatchNorms the weights no longer have. Returns the config and the
    earlier 1x1-map norms (None: nothing earlier to keep, probe as usual).

    Raises:
        ConversionError: its BatchNorms were folded into the convs (``fold_bn``), or new
            GroupNorm settings contradict the ones it already has.
    """
    _refuse_converted(model)  # first: no advice about GroupNorm settings can make converting twice work
    if getattr(model, FOLDED_STD_ATTR, None):
        raise ConversionError(
            "this model's own StdConv2d/ScaledStdConv2d layers (BiT, NFNet) were folded into plain convs at export, "
            "which a new surgery record cannot describe; convert the original timm model instead (its own WS "
            "convs are kept as they are)")
    if getattr(model, FOLD_ATTR, None):
        raise ConversionError(
            "this model's BatchNorms were folded into its convs (an export made with --fold-bn), so its convs "
            "have no norm layer after them for Weight Standardization; convert the unfolded model "
            "(the surgery directory) or an export made without --fold-bn")
    earlier = get_surgery_config(model)
    if earlier is None or earlier.norm != "gn":
        return config, None
    groups = ("gn_groups", "gn_group_size", "gn_group_rule", "gn_eps")
    if config.norm == "gn" and any(getattr(config, k) != getattr(earlier, k) for k in groups):
        raise ConversionError(
            "this model already has GroupNorm from an earlier surgery ("
            + ", ".join(f"{k}={getattr(earlier, k)}" for k in groups)
            + "); convert it with the same GroupNorm settings, or with --norm keep to leave them as they are")
    keep = {k: getattr(earlier, k) for k in groups}
    config = SurgeryConfig(**{**config.to_dict(), "norm": "gn", **keep})
    return config, frozenset(getattr(model, "wsurgery_pooled_norms", ()) or ())
