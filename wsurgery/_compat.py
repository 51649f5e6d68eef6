"""The oldest timm that wsurgery runs on, checked once when ``wsurgery`` is imported.

pip enforces the same pin (pyproject.toml); this check catches environments where an older timm
came in another way (``pip install --no-deps``, a pre-built image). What wsurgery needs from
timm 1.0.31: ``model._model_args``, the constructor arguments ``timm.create_model`` records, from
which ``save`` and ``export`` rebuild a model (older timm records none, so a model built with
``in_chans=1`` or another ``act_layer`` could not be saved), and ``create_scheduler_v2``'s
``sched="constant"`` (the ``constant`` schedule of the recipes).
"""

from __future__ import annotations

import re

import timm

TIMM_MIN = (1, 0, 31)


def version_tuple(version: str, parts: int = 3) -> tuple[int, ...]:
    """``"1.0.32.dev0"`` -> ``(1, 0, 32)``: the first ``parts`` numbers of a version string."""
    return tuple(int(part) for part in re.findall(r"\d+", version)[:parts])


def check_timm(version: str) -> None:
    """Raise ImportError naming the fix if timm ``version`` is older than :data:`TIMM_MIN`."""
    if version_tuple(version) < TIMM_MIN:
        need = ".".join(map(str, TIMM_MIN))
        raise ImportError(f"wsurgery needs timm >= {need}, this environment has timm {version}: "
                          f"upgrade it with pip install -U 'timm>={need}'")


check_timm(timm.__version__)
