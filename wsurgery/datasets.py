"""Labelled images in: ImageFolder layouts and ``path,label`` CSV files, on timm's data pipeline.

Layouts :func:`build_datasets` understands:

* ``DATA/train/<class>/*.jpg`` and ``DATA/val/<class>/*.jpg`` (``validation/`` also works);
* ``DATA/<class>/*.jpg``: one folder, split into train and val with ``val_split``;
* in both, an image in a sub-folder (``DATA/train/cat/2019/a.jpg``) belongs to its top-level class folder,
  as in torchvision's ImageFolder, and hidden folders (``.ipynb_checkpoints/``) are skipped;
* ``DATA.csv`` with a ``path`` and a ``label`` column (paths relative to the CSV's folder);
  a second CSV for validation, or ``val_split``.

Folder datasets are found by timm's folder reader (``create_dataset``), CSV datasets read by a small
CSV reader (timm has none); both become timm's ``ImageDataset`` over the same list of samples.
Transforms are timm's ``create_transform`` for the model's own resolved data config
(mean, std, interpolation, crop), at ``img_size`` when given.

Unreadable files are skipped and counted, not fatal: each file's header is checked when the
dataset is built, and a file that still fails to decode while training is replaced by the
next sample (``ImageSet.load_failures`` counts those). Images are read with
:func:`wsurgery.data.open_rgb`, so grayscale, RGBA, palette, 16-bit and float files all arrive as
8-bit RGB.
"""

from __future__ import annotations

import csv
import hashlib
import multiprocessing
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import create_dataset, create_transform
from timm.data.dataset import ImageDataset
from timm.data.readers.reader import Reader
from timm.utils.misc import natural_key
from torch import nn

from .data import IMAGE_SUFFIXES, image_config_for, open_rgb
from .errors import DatasetError, InputNotFoundError

__all__ = [
    "AugmentConfig",
    "DataBundle",
    "ImageSet",
    "SeededView",
    "build_datasets",
    "data_fingerprint",
    "eval_transform_for",
    "find_split_dirs",
    "train_transform",
]

_VAL_NAMES = ("val", "validation", "valid")


class _CsvReader(Reader):
    """timm ``Reader`` over ``(path, class index)`` pairs read from a CSV file."""

    def __init__(self, samples: list[tuple[str, int]]):
        super().__init__()
        self.samples = samples

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return path, target

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        return os.path.basename(path) if basename else path


class ImageSet(ImageDataset):
    """timm's ``ImageDataset`` reading with :func:`~wsurgery.data.open_rgb`.

    timm's own loader calls ``img.convert('RGB')``, which clips 16-bit images; ours scales
    them. A file that fails to decode (a truncated JPEG passes the header check) is replaced by
    the next one (as timm does) and counted in :attr:`load_failures`, a counter in shared
    memory so that DataLoader worker processes add to the count the training process reports.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failures = multiprocessing.Value("q", 0)  # sent to DataLoader workers when they start

    @property
    def load_failures(self) -> int:
        """Decode failures so far, in this process and in the DataLoader workers started from it."""
        return int(self._failures.value)

    def __getitem__(self, index: int):
        for _ in range(len(self.reader)):
            path, target = self.reader.samples[index][:2]
            try:
                img = open_rgb(path)
                break
            except DatasetError:
                with self._failures.get_lock():
                    self._failures.value += 1
                index = (index + 1) % len(self.reader)
        else:  # pragma: no cover - every file failed after the header check passed
            raise DatasetError("no image in the dataset could be decoded")
        if self.transform is not None:
            img = self.transform(img)
        return img, target

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.reader.samples]


@dataclass
class DataBundle:
    """Train and validation sets with what was learned while building them."""

    train: ImageSet
    val: ImageSet | None
    class_names: list[str]
    #: files skipped because they are not readable images, by path
    skipped: list[str] = field(default_factory=list)
    #: where each split came from, for reports
    sources: dict[str, str] = field(default_factory=dict)
    #: (height, width) of the first training image, for resolution rules such as BiT-HyperRule
    original_size: tuple[int, int] | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def load_failures(self) -> int:
        """Decodes that failed so far in both splits (each replaced by the next sample)."""
        return self.train.load_failures + (self.val.load_failures if self.val is not None else 0)


def data_fingerprint(bundle: DataBundle) -> dict[str, dict[str, Any] | None]:
    """Each split's image count and a digest of its (file, label) list, file names relative to the split's
    common folder (a moved data folder keeps its fingerprint). ``train`` records it; a resume refuses
    data that changed, whose schedule length and split would no longer be the run's."""
    out: dict[str, dict[str, Any] | None] = {}
    for split, dataset in (("train", bundle.train), ("val", bundle.val)):
        if dataset is None:
            out[split] = None
            continue
        samples = [(os.path.abspath(s[0]), int(s[1])) for s in dataset.reader.samples]  # a CSV may mix both
        root = os.path.commonpath([p for p, _ in samples]) if len(samples) > 1 else ""
        digest = hashlib.sha256()
        for name, label in sorted((os.path.relpath(p, root) if root else os.path.basename(p), t) for p, t in samples):
            digest.update(f"{name}\0{label}\n".encode())
        out[split] = {"images": len(samples), "sha256": digest.hexdigest()}
    return out


@dataclass
class AugmentConfig:
    """Training augmentation, passed to timm's ``create_transform(is_training=True)``."""

    scale: tuple[float, float] = (0.08, 1.0)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None
    re_prob: float = 0.0
    train_crop_mode: str | None = None


def _readable(path: str) -> bool:
    """Cheap check: PIL can identify the file (header only, no full decode)."""
    try:
        with Image.open(path) as img:
            img.size  # noqa: B018 - touching the header
        return True
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        return False


def _filter_readable(samples: list[tuple[str, int]], skipped: list[str]) -> list[tuple[str, int]]:
    kept = []
    for path, target in samples:
        if _readable(path):
            kept.append((path, target))
        else:
            skipped.append(path)
    return kept


def find_split_dirs(root: Path) -> tuple[Path, Path | None]:
    """``(train_dir, val_dir)`` of an ImageFolder root: ``train/`` + ``val/``, or the root itself."""
    train = root / "train"
    if train.is_dir():
        for name in _VAL_NAMES:
            if (root / name).is_dir():
                return train, root / name
        return train, None
    return root, None


def _folder_images(root: Path) -> list[tuple[str, str]]:
    """``(path, class name)`` of every image under ``root``: the class is the first folder below ``root``.

    The files come from timm's folder reader (its walk, file types and natural sort order), but not its
    labels: timm names the class after an image's innermost folder, so ``cat/2019/a.png`` and
    ``dog/2019/b.png`` would both be class ``2019``. Here, as in torchvision's ImageFolder, an image
    anywhere below ``root/cat/`` is a ``cat``. Images directly in ``root`` get the class ``""``.
    Images inside hidden folders (``.ipynb_checkpoints/``, ``.thumbnails/``) are tool copies, not data,
    and are left out.
    """
    no_images = DatasetError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)}); "
                             f"expected {root}/<class>/<images>")
    try:
        # timm's folder reader takes its extensions from `input_key` (default: jpg/jpeg/png only);
        # every format predict and calibrate read is a training image too
        base = create_dataset("", root=str(root), split="train", search_split=False,
                              input_key=";".join(IMAGE_SUFFIXES))
    except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
        raise no_images from e
    images = []
    for path, _ in base.reader.samples:
        folders = Path(os.path.relpath(path, root)).parts[:-1]
        if not any(f.startswith(".") for f in folders):
            images.append((path, folders[0] if folders else ""))
    if not images:
        raise no_images
    return images


def _check_classes(class_names: list[str], where: str) -> None:
    if not class_names:
        raise DatasetError(f"{where} holds no class folders with images; expected {where}/<class>/<image files>")
    if len(class_names) < 2:
        raise DatasetError(
            f"{where} has only one class ({class_names[0]!r}); a classifier needs at least 2 class folders"
        )


def _read_csv(path: Path, class_to_idx: dict[str, int] | None) -> tuple[list[tuple[str, int]], dict[str, int]]:
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found; pass a CSV file with path,label columns")
    with path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = [c for c in ("path", "label") if c not in columns]
        if missing:
            raise DatasetError(
                f"{path} lacks the column(s) {', '.join(missing)} (found {', '.join(columns) or 'none'}); "
                "the first line must be a header with `path,label`"
            )
        rows = []
        for row in reader:
            clean = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
            if clean.get("path"):
                if not clean.get("label"):
                    raise DatasetError(f"line {reader.line_num} of {path} ({clean['path']}) has an empty label; "
                                       "fill in the label column or remove the row")
                rows.append(clean)
    if not rows:
        raise DatasetError(f"{path} has a header but no rows; add lines of `path,label`")
    labels = [r["label"] for r in rows]
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(sorted(set(labels), key=natural_key))}
    unknown = sorted(set(labels) - set(class_to_idx))
    if unknown:
        raise DatasetError(
            f"{path} has labels the training set does not: {', '.join(unknown[:5])}"
            f"{' ...' if len(unknown) > 5 else ''}; every validation label must appear in training"
        )
    base = path.parent
    samples = []
    for r in rows:
        p = Path(r["path"])
        samples.append((str(p if p.is_absolute() else base / p), class_to_idx[r["label"]]))
    return samples, class_to_idx


def _split(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list, list]:
    """Stratified split: ``fraction`` of each class goes to validation.

    Each class of two or more images gives validation at least one image and keeps at least one for
    training; a class of one image stays in training.
    """
    if not 0.0 < fraction < 1.0:
        raise DatasetError(f"val_split must be between 0 and 1 (exclusive), got {fraction}")
    by_class: dict[int, list[tuple[str, int]]] = {}
    for s in samples:
        by_class.setdefault(s[1], []).append(s)
    rng = random.Random(seed)
    train, val = [], []
    for target in sorted(by_class):
        items = sorted(by_class[target])
        rng.shuffle(items)
        n_val = min(max(1, round(len(items) * fraction)), len(items) - 1)  # 0 for a one-image class
        val.extend(items[:n_val])
        train.extend(items[n_val:])
    return sorted(train, key=lambda s: natural_key(s[0])), sorted(val, key=lambda s: natural_key(s[0]))


def _make_set(samples: list[tuple[str, int]], root: str) -> ImageSet:
    return ImageSet(root, reader=_CsvReader(samples))


def _source_of(data: str | os.PathLike) -> Path:
    path = Path(data).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"{path} does not exist; pass an ImageFolder directory or a path,label CSV")
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DatasetError(f"{path} is a file but not a .csv; pass an ImageFolder directory or a path,label CSV")
    return path


def _load_split(path: Path, class_to_idx: dict[str, int] | None) -> tuple[list[tuple[str, int]], dict[str, int]]:
    if path.suffix.lower() == ".csv":
        return _read_csv(path, class_to_idx)
    images = _folder_images(path)
    if class_to_idx is None:
        class_to_idx = {c: i for i, c in enumerate(sorted({c for _, c in images}, key=natural_key))}
    else:
        if any(c == "" for _, c in images):
            # training refuses these too; dropping them silently would shrink validation unnoticed
            raise DatasetError(f"{path} has images outside class folders; put each image in {path}/<class>/")
        # only folders holding images are classes, as in training: an empty folder is no class
        extra = sorted({c for _, c in images if c and c not in class_to_idx}, key=natural_key)
        if extra:
            raise DatasetError(
                f"{path} has class folders the training set does not: {', '.join(extra[:5])}"
                f"{' ...' if len(extra) > 5 else ''}; every validation class must appear in training"
            )
    return [(p, class_to_idx[c]) for p, c in images if c in class_to_idx], class_to_idx


def build_datasets(
    data: str | os.PathLike,
    *,
    val_data: str | os.PathLike | None = None,
    val_split: float = 0.0,
    seed: int = 0,
) -> DataBundle:
    """Find and check a labelled dataset (no transforms yet: see :func:`train_transform`).

    Args:
        data: an ImageFolder root (``train/`` + ``val/`` inside, or class folders directly)
            or a CSV file with ``path,label`` columns.
        val_data: a separate validation folder or CSV (overrides a ``val/`` folder).
        val_split: when there is no validation set, hold out this fraction of each class.
        seed: seed of the split.

    Returns:
        A :class:`DataBundle`; ``val`` is None when there is no validation data at all.

    Raises:
        InputNotFoundError: a path does not exist.
        DatasetError: no images, fewer than two classes, a CSV without ``path``/``label``
            columns, or validation labels that training does not have.
    """
    source = _source_of(data)
    sources: dict[str, str] = {}
    if source.is_dir():
        train_dir, val_dir = find_split_dirs(source)
        train_samples, class_to_idx = _load_split(train_dir, None)
        sources["train"] = str(train_dir)
    else:
        val_dir = None
        train_samples, class_to_idx = _load_split(source, None)
        sources["train"] = str(source)
    if val_data is not None:
        val_dir = _source_of(val_data)
    class_names = [c for c, _ in sorted(class_to_idx.items(), key=lambda kv: kv[1])]
    where = sources["train"]
    if "" in class_to_idx:
        raise DatasetError(f"{where} has images outside class folders; put each image in {where}/<class>/")
    if not train_samples:
        raise DatasetError(f"{where} holds no images ({', '.join(IMAGE_SUFFIXES)}); expected {where}/<class>/<images>")
    _check_classes(class_names, where)
    skipped: list[str] = []
    train_samples = _filter_readable(train_samples, skipped)
    if not train_samples:
        raise DatasetError(f"none of the files in {where} is a readable image")
    val_samples: list[tuple[str, int]] | None = None
    if val_dir is not None:
        val_samples, _ = _load_split(val_dir, class_to_idx)
        val_samples = _filter_readable(val_samples, skipped)
        sources["val"] = str(val_dir)
        if not val_samples:
            raise DatasetError(f"{val_dir} holds no readable images")
    elif val_split:
        train_samples, val_samples = _split(train_samples, val_split, seed)
        if val_samples:  # empty when every class has one image: then nothing was held out
            sources["val"] = f"{val_split:.0%} of {where} (seed {seed})"
    present = {t for _, t in train_samples}
    if len(present) < 2:
        raise DatasetError(f"{where} has readable images in only {len(present)} class; a classifier needs 2 or more")
    with Image.open(train_samples[0][0]) as first:
        original_size = (first.height, first.width)
    root = sources["train"]
    return DataBundle(
        train=_make_set(train_samples, root),
        val=_make_set(val_samples, root) if val_samples else None,
        class_names=class_names,
        skipped=skipped,
        sources=sources,
        original_size=original_size,
    )


def train_transform(model: nn.Module, img_size: int | None, augment: AugmentConfig) -> Callable[[Any], torch.Tensor]:
    """timm's training transform for ``model``'s data config, at ``img_size`` if given."""
    cfg = image_config_for(model, img_size)
    return create_transform(
        input_size=cfg["input_size"],
        is_training=True,
        scale=tuple(augment.scale),
        hflip=augment.hflip,
        color_jitter=augment.color_jitter,
        auto_augment=augment.auto_augment,
        re_prob=augment.re_prob,
        train_crop_mode=augment.train_crop_mode,
        interpolation=cfg["interpolation"],
        mean=cfg["mean"],
        std=cfg["std"],
    )


def eval_transform_for(model: nn.Module, img_size: int | None) -> Callable[[Any], torch.Tensor]:
    """timm's eval transform (resize, center crop, normalize) for ``model`` at ``img_size``."""
    cfg = image_config_for(model, img_size)
    return create_transform(**cfg, is_training=False)


class SeededView(torch.utils.data.Dataset):
    """A dataset whose random augmentation depends only on ``(seed, epoch, index)``.

    Why not rely on the global RNG: DataLoader workers, DDP ranks and a run resumed mid-epoch
    would each see another random stream. Here every sample's transform runs under its own
    seed (python's, numpy's and torch's: timm's RandAugment and AugMix draw from numpy's global RNG;
    the caller's states are restored afterwards), so an image gets the same crop and augmentation
    whatever the worker count, the rank, or where a resumed run starts.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int | tuple[int, int]):
        # (epoch, index) from a sampler that knows the epoch: persistent DataLoader workers hold a copy of this
        # view made when they started, whose `epoch` a later set_epoch in the main process does not reach
        epoch, index = index if isinstance(index, tuple) else (self.epoch, index)
        sample_seed = hash((self.seed, int(epoch), int(index))) % (2**63)  # int tuples hash the same in every process
        py_state = random.getstate()
        np_state = np.random.get_state()
        torch_state = torch.get_rng_state()
        try:
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)  # numpy's global seed is 32 bits
            # the CPU generator only: torch.manual_seed also seeds CUDA's, which is not restored below (GPU dropout
            # would follow the last image read), and costs 0.1 ms a sample in torch's lazy CUDA seeding
            torch.default_generator.manual_seed(sample_seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.set_rng_state(torch_state)
