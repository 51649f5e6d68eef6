"""How closely one model follows another: top-1 agreement, top-5 overlap and KL on the same images.

These are the numbers calibration is judged by (see :mod:`wsurgery.calibrate`) and what
``wsurgery compare A B --images PATH`` prints. ``b`` is the reference ("the original"):

* ``top1``: fraction of images whose arg-max class is the same in both;
* ``top5_overlap``: mean of ``|top5(a) & top5(b)| / 5`` (1.0: the same five classes, any order);
* ``kl``: mean ``KL(softmax(b) || softmax(a))`` in nats, the loss distillation minimises;
* ``top1_confident``: top-1 agreement on the images where ``b`` gives its top class a
  probability of at least :data:`CONFIDENT` (``num_confident`` of them; None when there are none).

Why the last one: on an image the reference is unsure about, its own arg-max is fragile.
EfficientNet-Lite0 agrees with ITSELF on only 81% of random crops of real photos when the
crops are flipped horizontally (``benchmarks/calibration.py --part floor``), so plain top-1
agreement on such images mixes real differences with coin flips; on the confident images the
arg-max is a real decision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .convert import modes_kept, placement
from .errors import UsageError

__all__ = ["CONFIDENT", "Agreement", "agreement_from_logits", "compare", "predict_logits", "same_data_config"]

ImageSpec = str | os.PathLike | Sequence[str | os.PathLike]
#: reference top-1 probability from which an image counts as confident for ``top1_confident``
CONFIDENT = 0.5


@dataclass
class Agreement:
    """Agreement of a model with a reference on ``num_images`` images."""

    top1: float
    top5_overlap: float
    kl: float
    num_images: int
    #: top-1 agreement on the images where the reference's top probability is >= CONFIDENT
    top1_confident: float | None = None
    num_confident: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agreement_from_logits(logits: torch.Tensor, reference: torch.Tensor) -> Agreement:
    """Agreement of ``logits`` with ``reference`` logits (both ``(N, classes)``).

    Raises:
        UsageError: the shapes differ or the batch is empty.
    """
    if logits.shape != reference.shape or logits.dim() != 2 or logits.shape[0] == 0:
        raise UsageError(f"cannot compare outputs of shape {tuple(logits.shape)} with {tuple(reference.shape)}; "
                         "both models need the same number of classes")
    a, b = logits.detach().float(), reference.detach().float()
    k = min(5, a.shape[1])
    ta, tb = a.topk(k, dim=-1).indices, b.topk(k, dim=-1).indices
    overlap = (ta.unsqueeze(2) == tb.unsqueeze(1)).any(dim=2).float().sum(dim=1) / k
    kl = F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean").item()
    same = a.argmax(-1) == b.argmax(-1)
    confident = b.softmax(-1).amax(-1) >= CONFIDENT
    n_conf = int(confident.sum())
    top1_conf = same[confident].float().mean().item() if n_conf else None
    return Agreement(same.float().mean().item(), overlap.mean().item(), max(kl, 0.0), int(a.shape[0]),
                     top1_conf, n_conf)


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """``model``'s logits for ``images`` in eval mode, in batches; the mode is restored after."""
    device, dtype = placement(model)
    with modes_kept(model):
        model.eval()
        outs = [model(images[i:i + batch_size].to(device=device, dtype=dtype)).float().cpu()
                for i in range(0, images.shape[0], batch_size)]
    return torch.cat(outs)


def _as_model(obj: nn.Module | str | os.PathLike) -> nn.Module:
    if isinstance(obj, nn.Module):
        return obj
    from .load import load

    return load(obj)


def same_data_config(a: nn.Module, b: nn.Module, img_size: int | None = None) -> bool:
    """Whether ``a`` and ``b`` prepare images alike (timm's resolved data config: size, mean/std, crop,
    interpolation), so that one batch read from files serves both."""
    from .data import data_config_for

    return data_config_for(a, img_size) == data_config_for(b, img_size)


def compare(
    a: nn.Module | str | os.PathLike,
    b: nn.Module | str | os.PathLike,
    images: torch.Tensor | ImageSpec,
    *,
    limit: int | None = None,
    seed: int = 0,
    img_size: int | None = None,
    batch_size: int = 32,
) -> Agreement:
    """Agreement of model ``a`` with reference model ``b`` on the same images.

    Args:
        a: the model to judge: a module, a timm name, or a saved/exported directory.
        b: the reference (for example the original model before conversion).
        images: a normalized batch ``(N, 3, H, W)`` both models get, or files, a folder or a glob
            read with each model's own timm eval transform (``b``'s for both where their data
            configs agree).
        limit: use at most this many images (chosen with ``seed``).
        seed: seed of that choice.
        img_size: input size override for images read from files.
        batch_size: images per forward pass.

    Returns:
        An :class:`Agreement` (``top1``, ``top5_overlap``, ``kl``, ``num_images``,
        ``top1_confident``, ``num_confident``).

    Raises:
        UsageError: the models' outputs cannot be compared.
        InputNotFoundError: no images found.
    """
    model_a, model_b = _as_model(a), _as_model(b)
    if isinstance(images, torch.Tensor):
        x = images
        if limit is not None and x.shape[0] > limit:
            gen = torch.Generator().manual_seed(seed)
            x = x[torch.randperm(x.shape[0], generator=gen)[:limit]]
    else:
        from .data import load_images

        x, paths = load_images(images, model_b, limit=limit, seed=seed, img_size=img_size)
        if not same_data_config(model_a, model_b, img_size):
            # models with other data configs (mean/std, size, crop, interpolation) each see the files
            # as their own eval transform prepares them, as each would in use
            x_a, _ = load_images(paths, model_a, img_size=img_size)
            return agreement_from_logits(predict_logits(model_a, x_a, batch_size),
                                         predict_logits(model_b, x, batch_size))
    return agreement_from_logits(predict_logits(model_a, x, batch_size), predict_logits(model_b, x, batch_size))
