"""Images in: find image files and turn them into model inputs with timm's transforms.

Everything goes through ``timm.data.resolve_data_config`` and ``create_transform`` for the
model's own data config (size, crop, interpolation, mean and std), so inputs here are
exactly what timm's own eval pipeline would give the model.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import random
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import create_transform, resolve_data_config
from torch import nn

from .errors import ArgumentTypeError, DatasetError, InputNotFoundError, UsageError

__all__ = [
    "IMAGE_SUFFIXES",
    "data_config_for",
    "eval_transform",
    "find_images",
    "image_config_for",
    "load_images",
    "open_rgb",
    "random_inputs",
]

_PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".jfif", ".jpe")
# read where this Pillow can: AVIF is built into Pillow's wheels since 11.3; HEIC/HEIF needs the
# pillow-heif plugin, registered here when it is installed (a user who installed it expects phone photos
# to be read; registering is what its docs ask every program to do before opening images)
_IF_SUPPORTED = (".avif", ".heic", ".heif")


def _register_heif() -> None:
    try:
        if importlib.util.find_spec("pillow_heif") is None:
            return
        import pillow_heif

        pillow_heif.register_heif_opener()
    except Exception as e:  # noqa: BLE001 - a broken plugin must not stop wsurgery: HEIC is then unread
        warnings.warn(f"pillow-heif is installed but could not be registered ({e}); HEIC/HEIF files are skipped",
                      stacklevel=2)


_register_heif()
IMAGE_SUFFIXES = _PHOTO_SUFFIXES + tuple(s for s in _IF_SUPPORTED if s in Image.registered_extensions())


def find_images(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by ``spec``: files, folders (searched recursively) or glob patterns, each once.

    Raises:
        InputNotFoundError: a named path does not exist, or nothing matched.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    found: list[Path] = []
    for item in items:
        if not isinstance(item, (str, os.PathLike)):
            raise ArgumentTypeError(f"images are named by file paths, folders or glob patterns, got "
                                    f"{type(item).__name__}; save the images to files, or pass a tensor batch")
        text = os.fspath(item)
        path = Path(text)
        if path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        elif any(c in text for c in "*?["):
            found.extend(sorted(Path(p) for p in glob.glob(text, recursive=True)
                                if Path(p).suffix.lower() in IMAGE_SUFFIXES and Path(p).is_file()))
        else:
            raise InputNotFoundError(f"{text} does not exist; pass image files, a folder or a glob pattern")
    if not found:
        raise InputNotFoundError(f"no images found in {', '.join(os.fspath(i) for i in items)} "
                                 f"(looked for {', '.join(IMAGE_SUFFIXES)})")
    # a file named twice (a folder and a glob or sub-folder of it) counts once: a held-out image must
    # not also be a calibration image, nor an image count twice in an agreement
    unique, seen = [], set()
    for path in found:
        key = os.path.realpath(path)
        if key not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as 8-bit RGB, upright: grayscale, RGBA, palette, 16-bit and float images are converted.

    A camera's EXIF orientation is applied (``ImageOps.exif_transpose``), so a phone photo taken
    upright reaches the model upright. 16-bit grayscale (modes ``I;16*``) is scaled by its full range
    (65535 -> 255), as 16-bit RGB is (12-bit data stored in 16 bits reads dark: rescale it first);
    32-bit integer grayscale (mode ``I``, range unknown) so that its brightest pixel is 255; float
    grayscale (mode ``F``, e.g. a 32-bit TIFF) in [0, 1] is multiplied by 255, any other float range
    scaled by its brightest pixel (PIL's own conversion would clip at 255, turning most of such an
    image white). Negative and non-finite values become 0.

    Raises:
        DatasetError: the file is not a readable image.
    """
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # deep or float grayscale: scale to 8 bits
                arr = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0)
                top = float(arr.max()) if arr.size else 0.0
                # 16-bit: its full range, so a dark photo stays dark; others: their brightest pixel
                peak = 65535.0 if img.mode.startswith("I;16") else 1.0 if img.mode == "F" and top <= 1.0 else top or 1.0
                img = Image.fromarray(np.round(arr / peak * 255).astype(np.uint8), mode="L")
            if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                img = img.convert("RGBA")
                background = Image.new("RGBA", img.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, img)
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path} is not a readable image ({type(e).__name__})") from None


def data_config_for(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's resolved data config of ``model``, optionally at another input size."""
    if img_size is not None and (isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1):
        raise UsageError(f"img_size (--img-size) must be a positive number of pixels, got {img_size!r}")
    args = {"input_size": (3, img_size, img_size)} if img_size else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return resolve_data_config(args or {}, model=model)


def image_config_for(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """:func:`data_config_for` for reading image files, which become RGB: refuses a model that is not 3-channel."""
    from .convert import input_channels

    channels = input_channels(model)
    if channels not in (None, 3):
        raise UsageError(
            f"the model takes {channels}-channel input but image files are read as RGB; "
            "train, predict, compare and calibration need a model built with in_chans=3"
        )
    return data_config_for(model, img_size)


def eval_transform(model: nn.Module, img_size: int | None = None):
    """timm's eval transform for ``model`` (resize, center crop, normalize)."""
    return create_transform(**image_config_for(model, img_size), is_training=False)


def load_images(
    spec: str | os.PathLike | Sequence[str | os.PathLike],
    model: nn.Module,
    *,
    limit: int | None = None,
    seed: int = 0,
    img_size: int | None = None,
) -> tuple[torch.Tensor, list[Path]]:
    """Read images into one batch with the model's eval transform.

    Args:
        spec: files, folders or glob patterns.
        model: whose data config decides size and normalization.
        limit: keep at most this many, chosen at random with ``seed``.
        img_size: override the input size.

    Returns:
        ``(batch, paths)``; unreadable files are skipped (and left out of ``paths``).
    """
    paths = find_images(spec)
    if limit is not None and len(paths) > limit:
        paths = sorted(random.Random(seed).sample(paths, limit))
    transform = eval_transform(model, img_size)
    tensors, kept = [], []
    for p in paths:
        try:
            tensors.append(transform(open_rgb(p)))
            kept.append(p)
        except DatasetError:
            continue
    if not tensors:
        raise DatasetError(f"none of the {len(paths)} files could be read as images")
    return torch.stack(tensors), kept


def random_inputs(model: nn.Module, n: int = 4, seed: int = 0, img_size: int | None = None) -> torch.Tensor:
    """``n`` fixed random images (uniform pixels, then the model's normalization)."""
    from .convert import input_channels

    cfg = data_config_for(model, img_size)
    gen = torch.Generator().manual_seed(seed)
    _, h, w = cfg["input_size"]
    # the model's own channel count: timm's pretrained_cfg says 3 for a model built with in_chans=1
    c = input_channels(model) or cfg["input_size"][0]
    pixels = torch.rand(n, c, h, w, generator=gen)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    if len(mean) != c:  # one value per channel, from the RGB ones
        mean, std = mean.mean().repeat(c), std.mean().repeat(c)
    mean, std = mean.view(1, -1, 1, 1), std.view(1, -1, 1, 1)
    return (pixels - mean) / std
