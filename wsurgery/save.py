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

from torch import nn

from . import __version__
from .convert import SurgeryReport, get_surgery_config, unwrap
from .io import CONFIG_NAME, WEIGHTS_NAME, atomic_dir, save_safetensors, write_json
from .load import SOURCE_ATTR, model_record

__all__ = ["build_config", "jsonable", "save"]


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and anything JSON cannot hold as its ``str``."""
    try:
        return json.loads(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return str(value)


def build_config(model: nn.Module, stage: str, **wsurgery_fields: Any) -> dict[str, Any]:
    """The ``config.json`` content for ``model`` at ``stage`` (``converted`` or ``folded``)."""
    record = model_record(model)
    pretrained_cfg = jsonable(record["pretrained_cfg"])
    label_names = pretrained_cfg.pop("label_names", None)
    surgery = get_surgery_config(model)
    ws = {
        "version": __version__,
        "stage": stage,
        "surgery": surgery.to_dict() if surgery is not None else None,
        "source": jsonable(getattr(model, SOURCE_ATTR, {})),
    }
    for key in ("calibration", "report", "pooled_norms", "preconditioned"):
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
    if report is not None:
        model.wsurgery_report = report.to_dict()
    config = build_config(model, "converted")
    with atomic_dir(directory, force=force) as tmp:
        save_safetensors(model.state_dict(), tmp / WEIGHTS_NAME, {"wsurgery": json.dumps(config["wsurgery"])})
        write_json(tmp / CONFIG_NAME, config)
    return Path(directory)
