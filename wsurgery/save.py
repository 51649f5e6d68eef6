"""Save a converted (not yet folded) model so :func:`wsurgery.load` rebuilds it exactly.

A surgery directory holds ``model.safetensors`` (the parametrized state dict:
``conv.parametrizations.weight.original`` and, for adaptive WS, ``...weight.0.gain/shift``)
and ``config.json``: timm's fields (``architecture``, ``num_classes``, ``model_args``,
``pretrained_cfg``) plus a ``wsurgery`` record (version, stage, surgery config, report,
calibration results, where the weights came from).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .convert import FOLD_ATTR, SurgeryReport, get_surgery_config, is_converted, unwrap
from .errors import ConversionError, WSurgeryError
from .io import CONFIG_NAME, WEIGHTS_NAME, atomic_dir, save_safetensors, write_json
from .load import SOURCE_ATTR, SkipInitOnMeta, model_record, rebuild

__all__ = ["build_config", "check_rebuildable", "jsonable", "save"]


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything JSON cannot hold as its ``str``."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def build_config(model: nn.Module, stage: str, **wsurgery_fields: Any) -> dict[str, Any]:
    """The ``config.json`` content for ``model`` at ``stage`` (``converted`` or ``folded``)."""
    record = model_record(model)
    for key, value in record["model_args"].items():
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            raise ConversionError(
                f"model_args[{key!r}] = {value!r} cannot be written to {CONFIG_NAME}, so the model could not be "
                f"rebuilt from it; build the model with a name timm resolves instead (e.g. act_layer='hard_swish')"
            ) from None
    pretrained_cfg = jsonable(record["pretrained_cfg"])
    label_names = pretrained_cfg.pop("label_names", None)
    surgery = get_surgery_config(model)
    ws = {
        "version": __version__,
        "stage": stage,
        "surgery": surgery.to_dict() if surgery is not None else None,
        "source": jsonable(getattr(model, SOURCE_ATTR, {})),
    }
    for key in ("calibration", "report", "pooled_norms", "preconditioned", "anchored"):
        value = getattr(model, f"wsurgery_{key}", None)
        if value is not None:
            ws[key] = jsonable(value)
    ws.update({k: jsonable(v) for k, v in wsurgery_fields.items() if v is not None})
    config = {
        "architecture": record["architecture"],
        "num_classes": getattr(model, "num_classes", record["model_args"].get("num_classes")),
        "num_features": getattr(model, "num_features", None),
        "model_args": jsonable(record["model_args"]),
        "pretrained_cfg": pretrained_cfg,
        "wsurgery": ws,
    }
    if label_names:
        config["label_names"] = label_names
    return config


def module_signature(model: nn.Module) -> list[tuple[str, str, tuple]]:
    """Each module's name, class and the settings that change its output but are not tensors (norm eps and
    groups, conv geometry): two models with equal signatures and equal state dicts compute the same."""
    sig = []
    for name, m in model.named_modules():
        extra: tuple = ()
        if isinstance(m, nn.GroupNorm):
            extra = (m.num_groups, m.eps)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            extra = (m.eps,)
        elif isinstance(m, nn.Conv2d):
            extra = (m.stride, m.padding, m.dilation, m.groups, m.bias is not None)
        sig.append((name, type(m).__name__, extra))
    return sig


def check_rebuildable(config: dict[str, Any], state: dict[str, torch.Tensor], writer: str,
                      model: nn.Module | None = None) -> None:
    """Refuse, before anything is written, a model that :func:`wsurgery.load` could not rebuild.

    ``load`` rebuilds a directory from what ``config`` records (timm's constructor, the surgery,
    the fold) and loads the weights strictly. A model changed after it was built in a way the
    record does not hold (timm's ``freeze_batch_norm_2d``, a hand-swapped layer) would be written
    and then fail to load; so the recorded structure is built here on the meta device (no memory,
    no init) and its tensor names and shapes compared with ``state``, and with ``model`` given, its
    modules' settings (norm eps, GN groups, conv geometry): a rebuilt model whose BatchNorm eps
    differs would load and compute something else.
    """
    try:
        with torch.device("meta"), SkipInitOnMeta():
            rebuilt = rebuild(config)
            expected = rebuilt.state_dict()
    except WSurgeryError as e:
        raise ConversionError(f"{writer} would write a directory that load cannot rebuild ({e})") from None
    except Exception:  # noqa: BLE001 - a constructor that reads values at init (.item() on meta): no check
        return
    diff = ([f"{k!r} is missing from the rebuilt model" for k in state if k not in expected]
            + [f"{k!r} is missing from the model" for k in expected if k not in state]
            + [f"{k!r} is {tuple(state[k].shape)} in the model but {tuple(v.shape)} rebuilt"
               for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)])
    if not diff and model is not None:
        built = {name: (kind, extra) for name, kind, extra in module_signature(rebuilt)}
        diff = [f"{name!r} is {kind} {extra} in the model but {built[name][0]} {built[name][1]} rebuilt"
                for name, kind, extra in module_signature(model) if name in built and built[name] != (kind, extra)]
    if diff:
        raise ConversionError(
            f"{writer} refuses: the model differs from what timm's constructor and its recorded surgery rebuild "
            f"({diff[0]}; {len(diff)} difference(s)), so the written directory would not load. Was it changed "
            "after it was built (e.g. timm's freeze_batch_norm_2d: undo it with unfreeze_batch_norm_2d)?")


def save(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    report: SurgeryReport | None = None,
    force: bool = False,
) -> Path:
    """Write a converted model to ``directory`` (atomically; refuses to overwrite without ``force``).

    Args:
        model: a model converted by :func:`wsurgery.convert` (calibrated or trained or not).
        directory: output directory.
        report: the conversion report, stored in ``config.json``.
        force: replace an existing output.

    Returns:
        The directory path.
    """
    model = unwrap(model)
    if getattr(model, FOLD_ATTR, None) is not None and not is_converted(model):
        raise ConversionError("this model is folded (plain convs, no WS layers left), which save does not record; "
                              "write it with wsurgery.export (CLI: wsurgery export), or save the converted model")
    if report is not None:
        model.wsurgery_report = report.to_dict()
    config = build_config(model, "converted")
    state = model.state_dict()
    check_rebuildable(config, state, "save", model)
    with atomic_dir(directory, force=force, markers=(CONFIG_NAME,)) as tmp:
        save_safetensors(state, tmp / WEIGHTS_NAME, {"wsurgery": json.dumps(config["wsurgery"])})
        write_json(tmp / CONFIG_NAME, config)
    return Path(directory)
