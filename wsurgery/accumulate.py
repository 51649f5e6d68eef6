"""Training-speed helpers for Weight-Standardized models.

* :func:`standardize_once`: with gradient accumulation, standardize every WS weight once per
  optimizer step instead of once per micro-batch, and push the accumulated gradient through
  the standardization once. Exactly the naive per-micro-batch gradients (the standardization
  is linear in its incoming gradient), to float rounding.
* :func:`compile_standardization`: run the standardization through :func:`torch.compile`
  (meant for CUDA, where inductor fuses it into generated kernels).

>>> import torch, timm, wsurgery
>>> from wsurgery.accumulate import standardize_once
>>> model, _ = wsurgery.convert(timm.create_model("resnet18"), norm="gn")
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> micro_batches = [torch.randn(1, 3, 32, 32) for _ in range(4)]
>>> with standardize_once(model):
...     for x in micro_batches:
...         (model(x).sum() / len(micro_batches)).backward()
>>> opt.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .convert import ws_parametrizations
from .errors import UsageError
from .standardize import WeightStandardization, _standardize_impl

__all__ = ["compile_standardization", "standardize_once"]


@dataclass
class _Frozen:
    """One WS weight while :func:`standardize_once` is active."""

    name: str
    param: WeightStandardization
    original: torch.Tensor
    version: int
    graph: torch.Tensor | None  # W_hat with its graph back to V (and gain/shift), or None
    leaf: torch.Tensor  # what the parametrization returns; collects micro-batch gradients


def _freeze(name: str, module: nn.Module, p: WeightStandardization) -> _Frozen:
    plist = module.parametrizations.weight
    original = plist.original
    weight = original
    for q in plist:  # parametrizations registered before the WS one (normally none)
        if q is p:
            break
        weight = q(weight)
    w_hat = p.standardized(weight)
    if w_hat.requires_grad:
        leaf = w_hat.detach().requires_grad_()
        graph: torch.Tensor | None = w_hat
    else:  # no grad mode, or V (and gain/shift) frozen: nothing to push back later
        leaf, graph = w_hat.detach(), None
    return _Frozen(name, p, original, original._version, graph, leaf)


def _push_gradients(frozen: list[_Frozen]) -> None:
    stale = [f.name for f in frozen if f.original._version != f.version]
    if stale:
        raise UsageError(
            f"{stale[0]}.weight changed inside standardize_once (optimizer.step() or an in-place edit); "
            "step the optimizer after the `with standardize_once(model):` block"
        )
    pairs = [(f.graph, f.leaf.grad) for f in frozen if f.graph is not None and f.leaf.grad is not None]
    if pairs:
        graphs, grads = zip(*pairs)
        # one backward through every standardization: dL/dV = J^T (sum of micro-batch dL/dW_hat)
        torch.autograd.backward(list(graphs), list(grads))


@contextlib.contextmanager
def standardize_once(model: nn.Module) -> Iterator[int]:
    """Standardize each WS weight once for a block of forward/backward passes.

    On entry ``W_hat`` is computed once per WS conv (with its autograd graph when grad is
    enabled) and a leaf tensor holding it is installed in the parametrization, so every
    forward in the block reuses it and every backward accumulates ``dL/dW_hat`` on that leaf.
    On a normal exit the accumulated gradient goes through the standardization once, into
    ``V`` (and the adaptive-WS ``gain``/``shift``), adding to any ``.grad`` already there.
    Because the standardization's backward is linear in its incoming gradient, the result
    equals doing the standardization in every micro-batch, to float rounding.

    Use it around the micro-batches of ONE optimizer step and step the optimizer after it::

        with standardize_once(model):
            for x, y in micro_batches:
                (loss_fn(model(x), y) / len(micro_batches)).backward()
        optimizer.step()

    Under ``torch.no_grad()`` it is a weight cache for inference of the unfolded model: the
    standardization runs once for all the forwards in the block.

    If the block raises, the slots are cleared and the accumulated ``dL/dW_hat`` is dropped
    (``V.grad`` is left as it was before the block); the exception propagates.

    Not for DistributedDataParallel: its gradient hooks fire on ``V`` inside the last
    micro-batch's backward, which this moves to the end of the block.

    Args:
        model: a model converted by :func:`wsurgery.convert` (other modules are unaffected;
            a model without WS convs makes this a no-op).

    Yields:
        The number of WS weights standardized.

    Raises:
        UsageError: the block is already active on this model, or a WS weight was changed
            inside the block (an ``optimizer.step()`` that belongs after it).
    """
    found = list(ws_parametrizations(model))
    if any(p._frozen is not None for _, _, p in found):
        raise UsageError("standardize_once is already active on this model; do not nest it")
    frozen: list[_Frozen] = []
    try:
        for name, module, p in found:
            f = _freeze(name, module, p)
            p._frozen = f.leaf
            frozen.append(f)
        yield len(frozen)
        _push_gradients(frozen)
    finally:
        for f in frozen:
            f.param._frozen = None


def compile_standardization(model: nn.Module, enabled: bool = True, **compile_kwargs: Any) -> int:
    """Run every WS standardization of ``model`` through :func:`torch.compile` (or back to eager).

    Meant for CUDA: inductor turns the statistics, the normalisation, the adaptive affine and
    their backward into fused generated kernels. On CPU the eager kernels (one native
    batch-norm op each way for the ``timm``/``bit`` conventions) are already a single fused
    pass and compiling only adds start-up time. The compiled function is built once (with
    ``dynamic=True`` unless given) and shared by every conv, so it does not compile once per
    layer shape. Numerics match the eager kernels to float rounding.

    Args:
        model: a converted model.
        enabled: False puts the eager kernels back.
        **compile_kwargs: passed to :func:`torch.compile` (``mode``, ``dynamic``, ``backend``...).

    Returns:
        The number of WS weights changed.
    """
    kernel = _compiled_kernel(**compile_kwargs) if enabled else None
    count = 0
    for _, _, p in ws_parametrizations(model):
        p._kernel = kernel
        count += 1
    return count


_COMPILED: dict[str, Any] = {}


def _compiled_kernel(**compile_kwargs: Any) -> Any:
    options = {"dynamic": True, **compile_kwargs}
    key = repr(sorted(options.items()))
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_standardize_impl, **options)
    return _COMPILED[key]
