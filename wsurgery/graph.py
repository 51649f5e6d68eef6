"""Which module feeds which: a torch.fx trace with timm's own leaf registrations.

Used to find convs that feed a BatchNorm directly (for ``fold_bn``) and convs that are
not followed by any norm layer (for the surgery report). We reuse timm's notrace
registry (``timm.layers.get_notrace_modules/functions``) instead of inventing our own, so
models timm can trace for feature extraction trace here too. Models that cannot be
traced give ``None`` and callers say so; nothing is guessed from attribute order.
"""

from __future__ import annotations

import torch.fx
from timm.layers import get_notrace_functions, get_notrace_modules
from torch import nn

from .norm import is_batchnorm

__all__ = ["module_successors", "trace_calls"]


_ALWAYS_LEAF: tuple[type, ...] = (nn.Conv2d, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


class _LeafTracer(torch.fx.Tracer):
    def __init__(self, extra_leaves: tuple[type, ...] = ()):
        fns = tuple(f for f in get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)
        # convs and norms stay whole so their names appear in the graph
        self._leaves = tuple(get_notrace_modules()) + _ALWAYS_LEAF + extra_leaves

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # is_batchnorm also covers the frozen BNs that are no _BatchNorm (torchvision's, which
        # timm's freeze_batch_norm_2d uses): traced through, their conv would seem to feed a mul
        if isinstance(m, self._leaves) or is_batchnorm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def module_successors(model: nn.Module, leaf_types: tuple[type, ...] = ()) -> dict[str, list[str]] | None:
    """Map each called module's name to the modules (or ops) that consume its output.

    Consumers that are not modules are named ``"<op:NAME>"``. A module called more than once
    lists the consumers of every call. Returns ``None`` when the model cannot be traced symbolically.

    Args:
        model: the model to trace (not modified).
        leaf_types: extra module types to keep as leaves (e.g. BatchNorm subclasses).
    """
    traced = trace_calls(model, leaf_types)
    return None if traced is None else traced[0]


def trace_calls(
    model: nn.Module, leaf_types: tuple[type, ...] = ()
) -> tuple[dict[str, list[str]], dict[str, int]] | None:
    """:func:`module_successors` and how many times each module is called, from one trace (or None)."""
    try:
        graph = _LeafTracer(leaf_types).trace(model)
    except Exception:  # noqa: BLE001 - any trace failure means "unknown", never a crash
        return None
    succ: dict[str, list[str]] = {}
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        users = []
        for user in node.users:
            if user.op == "call_module":
                users.append(str(user.target))
            else:
                users.append(f"<op:{getattr(user.target, '__name__', user.target)}>")
        succ.setdefault(str(node.target), []).extend(users)
        calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    return succ, calls
