"""Step 7: classify images with a trained or exported model; top-k label names and probabilities.

Label names come from the model's ``pretrained_cfg['label_names']`` (``config.json``'s
``label_names``, written by :func:`wsurgery.train` through save and export); a model without
them reports ImageNet's class descriptions when it has ImageNet's class count (as timm's
inference script does), else class indices as names (``"class 3"``). Images go through timm's eval
transform for the model's own data config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import ImageNetInfo, infer_imagenet_subset
from torch import nn

from .convert import modes_kept, placement, unwrap
from .data import eval_transform, find_images, open_rgb
from .errors import DatasetError, UsageError

__all__ = ["Prediction", "label_names", "predict"]


@dataclass
class Prediction:
    """Top-k classes of one image (``labels``/``probs`` best first); ``error`` if it could not be read."""

    path: Path
    labels: list[str]
    indices: list[int]
    probs: list[float]
    error: str | None = None


def label_names(model: nn.Module) -> list[str]:
    """The model's class names; an ImageNet model's (by its class count, as timm's inference script
    names them: 1000 -> ImageNet-1k descriptions such as ``"Egyptian cat"``); or ``class 0 .. class N-1``."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("label_names")
    n = getattr(model, "num_classes", None) or (len(names) if names else 0)
    if names and len(names) == n:
        return list(names)
    subset = infer_imagenet_subset(model)
    if subset is not None:
        descriptions = ImageNetInfo(subset).label_descriptions()
        if len(descriptions) == n:
            return list(descriptions)
    return [f"class {i}" for i in range(n)]


def _same_device(a: torch.device, b: torch.device) -> bool:
    # torch.device("cuda") means the current CUDA device; a tensor's device always names its index
    def norm(d: torch.device) -> torch.device:
        if d.index is not None or d.type == "cpu":
            return d
        return torch.device(d.type, torch.cuda.current_device() if d.type == "cuda" else 0)

    return norm(a) == norm(b)


@contextlib.contextmanager
def _borrowed(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``model`` in eval mode on ``device``, then restore every submodule's train/eval flag and,
    if it had to be moved, every parameter's and buffer's device (a model already on ``device``
    is not moved at all)."""
    homes = [(m, store, name, t.device) for m in model.modules() for store in (m._parameters, m._buffers)
             for name, t in store.items() if t is not None]
    moved = any(not _same_device(home, device) for *_, home in homes)
    with modes_kept(model):
        model.eval()
        try:
            if moved:
                model.to(device)
            yield
        finally:
            if moved:
                if len({home for *_, home in homes}) == 1:
                    model.to(homes[0][3])
                else:  # spread over several devices by the caller: each tensor goes back where it was
                    with torch.no_grad():
                        for m, store, name, home in homes:
                            if store is m._parameters:
                                store[name].data = store[name].data.to(home)
                            else:
                                store[name] = store[name].to(home)


@torch.no_grad()
def predict(
    model: nn.Module | str | os.PathLike,
    images: str | os.PathLike | Sequence[str | os.PathLike],
    topk: int = 5,
    *,
    batch_size: int = 32,
    img_size: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Prediction]:
    """Top-k predictions for each image.

    Args:
        model: a module, or a directory (export, surgery or timm ``save_for_hf``) read with
            :func:`wsurgery.load`.
        images: files, folders or glob patterns.
        topk: how many classes per image (capped at the number of classes).
        batch_size: images per forward pass.
        img_size: input size override (default: the model's data config).
        device: where to run. A module passed in is given back on its own device(s) and in
            its own train/eval mode.

    Returns:
        One :class:`Prediction` per image, in the order found; unreadable files get ``error``.

    Raises:
        InputNotFoundError: no images matched.
        UsageError: ``topk`` below 1.
    """
    if topk < 1:
        raise UsageError(f"`topk` (--topk) must be at least 1, got {topk}")
    from .train import pick_device

    device = pick_device(device)  # an unknown or absent device is one clear line
    if not isinstance(model, nn.Module):
        from .load import load

        model = load(model)
    model = unwrap(model)
    if getattr(model, "num_classes", None) == 0:
        raise UsageError("the model has no classifier (num_classes=0), so there are no classes to rank; "
                         "load it with num_classes set, or predict with a fine-tuned run or export")
    names = label_names(model)
    k = min(topk, len(names)) if names else topk
    transform = eval_transform(model, img_size)
    paths = find_images(images)
    _, dtype = placement(model)
    results: list[Prediction] = []
    with _borrowed(model, device):  # eval mode on `device`; the caller's model is given back as it was
        for start in range(0, len(paths), batch_size):
            chunk = paths[start:start + batch_size]
            tensors, ok = [], []
            for p in chunk:
                try:
                    tensors.append(transform(open_rgb(p)))
                    ok.append(p)
                except DatasetError as e:
                    results.append(Prediction(p, [], [], [], error=str(e)))
            if not tensors:
                continue
            x = torch.stack(tensors).to(device=device, dtype=dtype)
            probs = model(x).float().softmax(dim=-1)
            top_p, top_i = probs.topk(min(k, probs.shape[-1]), dim=-1)  # capped by what the model outputs
            for p, pv, iv in zip(ok, top_p.tolist(), top_i.tolist()):
                results.append(Prediction(p, [names[i] if i < len(names) else f"class {i}" for i in iv], iv, pv))
    order = {p: i for i, p in enumerate(paths)}
    results.sort(key=lambda r: order[r.path])
    return results
