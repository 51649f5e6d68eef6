"""Describe a model, a surgery directory or an export: what is standardized, which norms.

:func:`inspect` is what ``wsurgery inspect`` prints: one row per conv and norm layer
(name, type, standardization / groups, parameters) and a summary (stage, surgery config,
and whether stock timm can load the export).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from timm.layers import CondConv2d
from torch import nn
from torch.nn.utils import parametrize

from .calibrate import anchored_convs, preconditioned_convs
from .convert import TIMM_WS_TYPES, get_surgery_config, is_converted
from .norm import is_batchnorm
from .standardize import WeightStandardization

__all__ = ["LayerRow", "ModelSummary", "inspect", "layer_rows"]


@dataclass
class LayerRow:
    name: str
    type: str
    detail: str
    params: int


@dataclass
class ModelSummary:
    source: str
    architecture: str
    stage: str
    num_params: int
    counts: dict[str, int] = field(default_factory=dict)
    surgery: dict[str, Any] | None = None
    timm_compatible: bool | None = None
    loader: str = ""
    calibration: dict[str, Any] | None = None
    rows: list[LayerRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def layer_rows(model: nn.Module) -> list[LayerRow]:
    """One row per conv (plain, WS, timm WS) and per norm layer; a WS conv's row says ``+bias`` where it has one,
    and ``anchored`` or ``preconditioned`` where calibration gave it that bias."""
    anchored, preconditioned = set(anchored_convs(model)), set(preconditioned_convs(model))
    rows = []
    for name, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight"):
            ps = [p for p in m.parametrizations.weight if isinstance(p, WeightStandardization)]
            if ps:
                p = ps[0]
                cls = type(m).__mro__[1].__name__  # the class parametrize wrapped
                detail = f"{p.mode} {p.convention.name} eps={p.convention.eps:g}"
                detail += " +bias" if getattr(m, "bias", None) is not None else ""
                detail += " anchored" if name in anchored else " preconditioned" if name in preconditioned else ""
                rows.append(LayerRow(name, cls, detail, _params(m)))
                continue
        if isinstance(m, TIMM_WS_TYPES):
            rows.append(LayerRow(name, type(m).__name__, f"timm WS eps={m.eps:g}", _params(m)))
        elif isinstance(m, (nn.Conv2d, CondConv2d)):  # timm's CondConv2d (expert banks) is no nn.Conv2d
            rows.append(LayerRow(name, type(m).__name__, "plain" + (" +bias" if m.bias is not None else ""),
                                 _params(m)))
        elif isinstance(m, nn.GroupNorm):
            act = getattr(m, "act", None)
            extra = f" act={type(act).__name__}" if act is not None and not isinstance(act, nn.Identity) else ""
            rows.append(LayerRow(name, type(m).__name__, f"{m.num_groups} groups / {m.num_channels} ch{extra}",
                                 _params(m)))
        elif is_batchnorm(m):
            rows.append(LayerRow(name, type(m).__name__, f"{getattr(m, 'num_features', '?')} ch", _params(m)))
    return rows


def _counts(rows: list[LayerRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in rows:
        if r.detail.startswith(("ws ", "aws ")):
            key = "ws convs"
        elif r.detail.startswith("timm WS"):
            key = "timm WS convs"
        elif r.detail.startswith("plain"):
            key = "plain convs"
        elif "groups" in r.detail:
            key = "group norms"
        else:
            key = "batch norms"
        counts[key] = counts.get(key, 0) + 1
    return counts


def inspect(source: nn.Module | str | os.PathLike, *, check_timm: bool = True) -> ModelSummary:
    """Summarize a model or a saved directory.

    Args:
        source: a module, a surgery directory or an export directory.
        check_timm: for a converted model, fold a copy and test whether stock timm could
            rebuild its export (costs one fold and one forward).
    """
    from .export import stock_timm_args
    from .fold import fold
    from .io import CONFIG_NAME, read_json
    from .load import load, model_record

    config: dict[str, Any] = {}
    if isinstance(source, nn.Module):
        model, name = source, type(source).__name__
    else:
        model, name = load(source), os.fspath(source)
        config = read_json(Path(source) / CONFIG_NAME)
    ws = config.get("wsurgery", {})
    surgery = get_surgery_config(model)
    rows = layer_rows(model)
    stage = ws.get("stage") or ("converted" if is_converted(model) else "plain")
    compatible = ws.get("timm_compatible")
    if compatible is None and check_timm and getattr(model, "pretrained_cfg", None):
        record = model_record(model)
        compatible = stock_timm_args(fold(model), record, surgery.norm if surgery else None) is not None
    loader = ""
    if compatible is not None:
        loader = "timm.create_model('local-dir:DIR', pretrained=True)" if compatible else "wsurgery.load(DIR)"
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", type(model).__name__)
    return ModelSummary(
        source=name,
        architecture=arch,
        stage=stage,
        num_params=_params(model),
        counts=_counts(rows),
        surgery=surgery.to_dict() if surgery else None,
        timm_compatible=compatible,
        loader=loader,
        calibration=ws.get("calibration") or getattr(model, "wsurgery_calibration", None),
        rows=rows,
    )
