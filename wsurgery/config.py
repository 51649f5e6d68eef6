"""Typed configuration for the surgery, saved with every converted model.

Configs are dataclasses whose fields carry their help text (as peft's configs do);
``__post_init__`` validates every value so a bad config fails before any model is touched.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ArgumentTypeError, ConfigError
from .standardize import CONVENTIONS, WSConvention, get_convention

__all__ = ["GroupRule", "SurgeryConfig", "build_config_from"]

GroupRule = Literal["gcd", "divisor", "error"]


@dataclass
class SurgeryConfig:
    """What :func:`wsurgery.convert` does to a model.

    GroupNorm group rule: with ``gn_group_size`` set, every GN gets ``C // gn_group_size``
    groups (``C`` must divide). Otherwise the target is ``gn_groups`` groups; when ``C`` is not
    a multiple of it, ``gn_group_rule`` decides: ``gcd`` (default) uses ``gcd(C, gn_groups)``
    groups, which keeps every group at least ``C / gn_groups`` channels wide (24 channels with
    target 32 -> 8 groups of 3); ``divisor`` uses the largest divisor of ``C`` not above the
    target (24 -> 24 groups of 1, closer in count, but single-channel groups behave like
    InstanceNorm); ``error`` refuses.
    """

    mode: Literal["ws", "aws"] = field(
        default="ws", metadata={"help": "ws: plain standardization; aws: adaptive (learned gamma/beta, exact at init)"}
    )
    convention: str = field(default="timm", metadata={"help": f"WS formula: one of {', '.join(CONVENTIONS)}"})
    eps: float | None = field(default=None, metadata={"help": "override the convention's eps"})
    include: list[str] = field(
        default_factory=list, metadata={"help": "fnmatch patterns of conv names to convert (default: all)"}
    )
    exclude: list[str] = field(default_factory=list, metadata={"help": "fnmatch patterns of conv names to skip"})
    norm: Literal["keep", "gn"] = field(default="keep",
                                        metadata={"help": "keep BatchNorm, or replace it with GroupNorm"})
    gn_groups: int = field(default=32, metadata={"help": "target number of GroupNorm groups"})
    gn_group_size: int | None = field(default=None, metadata={"help": "channels per group (overrides gn_groups)"})
    gn_group_rule: GroupRule = field(
        default="gcd", metadata={"help": "what to do when channels don't divide by gn_groups: gcd, divisor, error"}
    )
    gn_eps: float = field(default=1e-5, metadata={"help": "GroupNorm eps (timm's GroupNorm default)"})

    def __post_init__(self) -> None:
        # types first: "8" for gn_groups would otherwise fail deep inside the surgery as a TypeError
        for name, kinds, text in (("gn_groups", int, "an integer"), ("gn_group_size", (int, type(None)), "an integer"),
                                  ("eps", (int, float, type(None)), "a number"), ("gn_eps", (int, float), "a number")):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ArgumentTypeError(f"`{name}` must be {text}, got {value!r} ({type(value).__name__})")
        if self.mode not in ("ws", "aws"):
            raise ConfigError(f"`mode` must be 'ws' or 'aws', got {self.mode!r}")
        if self.norm not in ("keep", "gn"):
            raise ConfigError(f"`norm` must be 'keep' or 'gn', got {self.norm!r}")
        get_convention(self.convention, self.eps)  # validates name and eps
        if self.gn_groups < 1:
            raise ConfigError(f"`gn_groups` must be at least 1, got {self.gn_groups}")
        if self.gn_group_size is not None and self.gn_group_size < 1:
            raise ConfigError(f"`gn_group_size` must be at least 1, got {self.gn_group_size}")
        if self.gn_group_rule not in ("gcd", "divisor", "error"):
            raise ConfigError(f"`gn_group_rule` must be gcd, divisor or error, got {self.gn_group_rule!r}")
        if not (self.gn_eps > 0 and math.isfinite(self.gn_eps)):
            raise ConfigError(f"`gn_eps` must be positive, got {self.gn_eps}")
        # one pattern given as a string is one pattern, not a list of its characters
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None:
                value = []
            patterns = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
            if patterns is None or not all(isinstance(p, str) for p in patterns):
                raise ArgumentTypeError(f"`{name}` must be a pattern or a list of patterns (strings), got {value!r}")
            setattr(self, name, patterns)

    @property
    def ws_convention(self) -> WSConvention:
        return get_convention(self.convention, self.eps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SurgeryConfig:
        return build_config_from(cls, data, "surgery")


def build_config_from(cls: type, values: dict[str, Any], what: str) -> Any:
    """``cls(**values)``, with an unknown key a ConfigError naming it and the known ones (a misspelled
    keyword such as ``convert(model, nrm="gn")`` was a bare TypeError from the dataclass)."""
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = [k for k in values if k not in known]
    if unknown:
        raise ConfigError(f"unknown {what} setting {unknown[0]!r}; the settings are {', '.join(known)}")
    return cls(**values)
