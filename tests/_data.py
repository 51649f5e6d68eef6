"""Tiny labelled image folders made inside the tests (no downloads), and the tiny model they train."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("circle", "square", "stripes")


def _image(kind: str, rng: np.random.Generator, size: int) -> np.ndarray:
    img = rng.normal(90, 25, (size, size, 3)).clip(0, 255)
    c = size // 2
    yy, xx = np.mgrid[:size, :size]
    if kind == "circle":
        mask = (yy - c) ** 2 + (xx - c) ** 2 < (size // 3) ** 2
        img[mask] = [230, 40, 40]
    elif kind == "square":
        q = size // 4
        img[q:-q, q:-q] = [40, 200, 60]
    else:
        img[:, ::4] = [40, 60, 230]
    return img.astype(np.uint8)


def make_train_val(root: Path, train_per_class: int = 8, val_per_class: int = 4) -> Path:
    """``root/train/<class>/`` and ``root/val/<class>/`` (different seeds): a dataset to fine-tune on."""
    make_folder(root, per_class=train_per_class, split="train")
    make_folder(root, per_class=val_per_class, split="val", seed=1)
    return root


def make_folder(root: Path, per_class: int = 8, size: int = 24, classes=CLASSES, seed: int = 0,
                split: str | None = None) -> Path:
    """``root/<class>/<i>.png`` (or ``root/<split>/<class>/...``) with easy-to-learn synthetic images."""
    rng = np.random.default_rng(seed)
    base = root / split if split else root
    for kind in classes:
        d = base / kind
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_image(kind, rng, size)).save(d / f"{kind}_{i:03d}.png")
    return root


def tiny_aws_gn():
    """timm's ``test_efficientnet`` (seeded, one output per class of CLASSES) as adaptive WS + GN: the
    model the training tests fine-tune in seconds."""
    import timm
    import torch

    import wsurgery

    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    return wsurgery.convert(model, mode="aws", norm="gn")[0]
