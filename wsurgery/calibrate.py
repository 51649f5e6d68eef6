"""Step 3 of the flow: give a converted model back the function of the original.

Converting a BN-pretrained CNN changes what it computes: plain WS replaces every filter
``W`` by ``(W - mean) / s``, and BN -> GN swaps fixed running statistics for per-sample group
statistics. Only adaptive WS with BN kept is exact. :func:`calibrate` closes the gap with
the original model as teacher and unlabeled images, in up to three phases:

``bn-stats``
    Re-estimate the running mean/var of every BatchNorm the student kept (cumulative
    average over the calibration images, as timm's and torchvision's "BN recalibration"
    do). Fixes scale drift; cannot undo a changed filter shape.
``gn-init``
    For adaptive-WS students, by default (``anchor=None``: wherever it applies, in float32), first
    *anchor*: where an adaptive-WS conv feeds a GroupNorm (of at least two channels a group) that
    replaced a BatchNorm directly, standardize the conv's output channels with that BatchNorm's
    running statistics (gain and shift times ``1/sigma``, a conv bias ``-mu/sigma``; this alone is
    :func:`precondition_gn_inputs`, no images needed), then hold the GroupNorm's per-image statistics
    nearly constant with channel offsets and signs fitted to the images (:func:`anchor_gn_statistics`).
    ``precondition=True`` preconditions every such conv, anchored or not; ``anchor=False`` leaves both
    out. The default anchors only a student not calibrated before whose convs are as conversion left them
    (the BatchNorm statistics describe those); elsewhere ``CalibrationResult.notes`` says why it did not.
    Then, for every GroupNorm that replaced a BatchNorm, set the GN affine so that its output
    has, per channel, the mean and variance the teacher's BN output has on the same images (an
    anchored one: the BN's affine at the average statistics it sees).
    Layer by layer in one pass: a forward pre-hook on each GN sets its affine from the
    input it actually receives, which already went through the calibrated layers before it.
``distill``
    A short label-free distillation: ``KL(teacher || student)`` at temperature 4 (times 16, as
    Hinton et al. scale it) on the calibration images, or
    on fresh random crops, flips and blends of them each step (``augment``); optionally plus a
    per-layer feature loss; training only the norm affines and the
    adaptive-WS ``gain``/``shift`` (``train="affine"``) or every parameter (``train="all"``),
    for a bounded number of steps (and optionally seconds).

With held-out images and ``keep_best`` (default), a distillation that follows another phase
and raises the held-out KL is undone (``CalibrationResult.reverted`` says so): distilling from
a few photos can fit them and lose the function elsewhere. The held-out images then act as a
validation set, so judge the final model on images outside both sets
(``benchmarks/calibration.py`` does).

``auto`` picks, from the student's surgery: adaptive WS with BN kept -> nothing (already
exact); plain WS with BN kept -> ``bn-stats`` + ``distill`` (all); GN students ->
``gn-init`` (anchored for adaptive WS) + ``distill`` (``affine`` for adaptive WS, ``all`` for plain WS).
Measured on EfficientNet-Lite0, adaptive WS + GN (README): anchoring raises top-1 agreement with the
original on whole ImageNet photos from 72.5% to 94% with one GN group (20% to 69% with 32), and the model
fine-tunes better from it, at about a third of the learning rate that suits the model calibrated without it.

Agreement with the teacher (top-1, top-5 overlap, KL; see :mod:`wsurgery.compare`) is
measured on held-out images before and after and returned in a :class:`CalibrationResult`,
which is also stored as ``student.wsurgery_calibration`` so that :func:`wsurgery.save` writes
it into the saved config. The teacher is never changed: it runs in eval mode under
``torch.no_grad`` and its mode is restored.
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import create_transform
from torch import nn

from .compare import Agreement, agreement_from_logits, predict_logits
from .config import build_config_from
from .convert import get_surgery_config, is_converted, modes_kept, placement, unwrap, ws_parametrizations
from .data import eval_transform, find_images, image_config_for, open_rgb
from .errors import ArgumentTypeError, ConfigError, ConversionError, DatasetError, UsageError
from .fold import find_conv_bn_pairs
from .norm import _bn_affine, is_batchnorm
from .standardize import AdaptiveWeightStandardization, filter_stats

__all__ = [
    "EVAL_SPLITS",
    "METHODS",
    "CalibrationConfig",
    "CalibrationProgress",
    "CalibrationResult",
    "Method",
    "anchor_gn_statistics",
    "anchored_convs",
    "calibrate",
    "calibration_files",
    "calibration_images",
    "calibration_split",
    "dataset_train_split",
    "distill",
    "init_gn_from_teacher",
    "needs_lower_lr",
    "precondition_gn_inputs",
    "preconditioned_convs",
    "reestimate_bn_stats",
    "resolve_method",
]

Method = Literal["auto", "bn-stats", "gn-init", "distill", "none"]
#: the methods :func:`calibrate` accepts, in the order the CLI lists them
METHODS: tuple[str, ...] = ("auto", "bn-stats", "gn-init", "distill", "none")
ImageSpec = str | os.PathLike | Sequence[str | os.PathLike]


@dataclass
class CalibrationConfig:
    """How :func:`calibrate` runs. Every field is validated in ``__post_init__``."""

    method: str = field(default="auto", metadata={"help": f"one of {', '.join(METHODS)}"})
    steps: int = field(default=150, metadata={"help": "distillation steps (optimizer updates)"})
    batch_size: int = field(default=32, metadata={"help": "images per distillation step"})
    lr: float | None = field(default=None, metadata={"help": "AdamW learning rate (default 5e-4 affine, 2e-4 all)"})
    train: Literal["auto", "affine", "all"] = field(
        default="auto", metadata={"help": "distill these parameters: norm affines + AWS gain/shift, or all"})
    # 4, not 1: on EfficientNet-Lite0 AWS + GN(1), 60 steps, 3 seeds, T = 1 / 2 / 4 gave held-out KL
    # 0.80 / 0.74 / 0.73 and top-1 agreement on confident crops 82 / 87 / 93% (README, calibration)
    temperature: float = field(default=4.0, metadata={"help": "softmax temperature of the KL loss"})
    feature_weight: float = field(
        default=0.0, metadata={"help": "weight of the per-norm-layer feature MSE added to the KL (0: logits only)"})
    distill_size: int | None = field(
        default=None, metadata={"help": "distill at this input resolution (bilinear resize; None: as given)"})
    max_seconds: float | None = field(default=None, metadata={"help": "stop distilling after this many seconds"})
    init_images: int = field(default=64, metadata={"help": "images in the one gn-init pass (bn-stats: every image)"})
    # off by default (anchoring preconditions the layers it anchors): alone it raises agreement with the original
    # (EfficientNet-Lite0, 2 minutes: 57.6 -> 68.2% on held-out crops) but the demo's (32 groups) fine-tune from it
    # diverges at the recipe's lr 0.01 (26% instead of 71%) and needs lr <= 0.003, where it is no better than
    # without (README, demo_variants.py --preset lr)
    precondition: bool = field(
        default=False, metadata={"help": "gn-init: standardize every adaptive-WS conv output that feeds a GN with the "
                                         "BN statistics first (anchoring does it for the layers it anchors)"})
    # None (auto): wherever it applies, as the default. On EfficientNet-Lite0 the converted model agrees with the
    # original far more closely with it (whole ImageNet photos, one GN group: 94% top-1 against 72.5%; 32 groups:
    # 69% against 20%) and fine-tunes better in
    # benchmarks/finetune.py (at about a third of the best lr without it), as well as without it in the demo at 32
    # groups (README).
    anchor: bool | None = field(
        default=None, metadata={"help": "gn-init: hold GN's per-image statistics nearly constant with channel offsets "
                                        "and signs (anchor_gn_statistics) after preconditioning the layers it "
                                        "anchors; None: wherever it applies (adaptive WS + GN, float32)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear learning-rate warm-up steps"})
    keep_best: bool = field(
        default=True, metadata={"help": "undo the distillation if it raised the KL on the held-out images"})
    augment: bool = field(
        default=False, metadata={"help": "distill on fresh random crops, flips and blends of the images each step"})
    mix_fraction: float = field(
        default=0.5, metadata={"help": "with augment: fraction of each batch blended with another image (0: none)"})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown calibration method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.train not in ("auto", "affine", "all"):
            raise ConfigError(f"`train` must be auto, affine or all, got {self.train!r}")
        for name in ("steps", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`{name}` must be non-negative, got {getattr(self, name)}")
        for name in ("batch_size", "init_images"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`{name}` must be at least 1, got {getattr(self, name)}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"`lr` must be positive, got {self.lr}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"`temperature` must be positive, got {self.temperature}")
        if not (self.feature_weight >= 0 and math.isfinite(self.feature_weight)):
            raise ConfigError(f"`feature_weight` must be non-negative, got {self.feature_weight}")
        if self.distill_size is not None and self.distill_size < 8:
            raise ConfigError(f"`distill_size` must be at least 8 pixels, got {self.distill_size}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ConfigError(f"`max_seconds` must be positive, got {self.max_seconds}")
        if not 0.0 <= self.mix_fraction <= 1.0:
            raise ConfigError(f"`mix_fraction` must be in [0, 1], got {self.mix_fraction}")
        for name in ("precondition", "anchor"):
            value = getattr(self, name)
            if not (isinstance(value, bool) or (value is None and name == "anchor")):
                raise ArgumentTypeError(f"`{name}` must be true or false{' or None (auto)' if name == 'anchor' else ''}"
                                        f", got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class CalibrationProgress:
    """What a progress callback receives: ``phase`` is one of the method names."""

    phase: str
    step: int
    total: int
    loss: float | None = None


ProgressFn = Callable[[CalibrationProgress], None]


@dataclass
class CalibrationResult:
    """What :func:`calibrate` did and how close the student got to the teacher."""

    method: str
    phases: list[str]
    train: str | None
    before: Agreement | None
    after: Agreement | None
    num_images: int
    num_held_out: int
    steps: int
    seconds: float
    seed: int
    losses: list[float] = field(default_factory=list)
    #: phases whose result was undone because the held-out KL to the teacher got worse (``keep_best``)
    reverted: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    #: what the caller should know: a step that auto left out, and why; fewer GN groups keeping more
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------- data


def _train_crop_transform(model: nn.Module, img_size: int | None):
    """timm's training transform for the model's data config, reduced to geometry.

    Random resized crops (scale 0.25-1) and horizontal flips make many distinct views of
    few photos; colour jitter, auto-augment and random erasing would change what the teacher
    sees, which a label-free calibration does not need.
    """
    cfg = image_config_for(model, img_size)
    return create_transform(**cfg, is_training=True, scale=(0.25, 1.0), hflip=0.5, color_jitter=None,
                            auto_augment=None, re_prob=0.0)


#: split folders beside ``train/`` that mark a dataset root (timm's and torchvision's names)
EVAL_SPLITS = ("val", "validation", "test")


def calibration_files(spec: ImageSpec) -> list[Path]:
    """The image files of ``spec`` to calibrate on: :func:`~wsurgery.data.find_images`, except that a
    dataset root holding ``train/`` beside ``val/``, ``validation/`` or ``test/`` stands for its
    ``train/`` folder. Calibration uses no labels, but a model calibrated on the validation or test
    images would later be judged on images it had seen.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    return find_images([dataset_train_split(item) or item for item in items])


def dataset_train_split(item: Any) -> Path | None:
    """``item/train`` where ``item`` is a dataset root (``train/`` beside ``val/``, ``validation/`` or
    ``test/``), else None."""
    if not isinstance(item, (str, os.PathLike)):
        return None
    root = Path(item)
    if root.is_dir() and (root / "train").is_dir() and any((root / split).is_dir() for split in EVAL_SPLITS):
        return root / "train"
    return None


def calibration_images(
    spec: ImageSpec,
    model: nn.Module,
    *,
    limit: int | None = 256,
    seed: int = 0,
    img_size: int | None = None,
    crops_per_image: int = 1,
) -> torch.Tensor:
    """Read unlabeled images into one normalized batch with the model's timm transforms.

    A dataset folder (``root/class/xxx.jpg``) works as well: files are found recursively and
    the class folders are ignored. A dataset root with ``train/`` beside ``val/``, ``validation/``
    or ``test/`` gives its ``train/`` images only (see :func:`calibration_files`).

    Args:
        spec: image files, folders or glob patterns.
        model: whose data config (size, crop, interpolation, mean/std) is used.
        limit: at most this many images in the batch (chosen at random with ``seed``).
        seed: seeds the choice of files and the random crops.
        img_size: input size override.
        crops_per_image: 1 reads each file with the eval transform (resize + center crop);
            more takes that many random resized crops / flips of each file (timm's training
            transform without colour augmentation), for calibrating from a few photos.

    Returns:
        A float batch ``(N, 3, H, W)``.

    Raises:
        InputNotFoundError: nothing found; DatasetError: no file readable; ConfigError: bad limit.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"the calibration image limit must be at least 1, got {limit}")
    if crops_per_image < 1:
        raise ConfigError(f"crops_per_image must be at least 1, got {crops_per_image}")
    paths = calibration_files(spec)
    rng = random.Random(seed)
    if limit is not None and len(paths) > limit:
        paths = sorted(rng.sample(paths, limit))
    transform = eval_transform(model, img_size) if crops_per_image == 1 else _train_crop_transform(model, img_size)
    state, py_state = torch.random.get_rng_state(), random.getstate()
    # timm's random resized crop draws from Python's `random`, torchvision's flip from torch's generator
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        images = []
        for path in paths:
            try:
                img = open_rgb(path)
            except DatasetError:
                continue
            images.extend(transform(img) for _ in range(crops_per_image))
    finally:
        torch.random.set_rng_state(state)
        random.setstate(py_state)
    if not images:
        raise DatasetError(f"none of the {len(paths)} files could be read as images")
    batch = torch.stack(images)
    if limit is not None and batch.shape[0] > limit:
        gen = torch.Generator().manual_seed(seed)
        batch = batch[torch.randperm(batch.shape[0], generator=gen)[:limit]]
    return batch


def calibration_split(
    spec: ImageSpec,
    model: nn.Module,
    held_out: float,
    *,
    limit: int | None = 256,
    seed: int = 0,
    img_size: int | None = None,
    crops_per_image: int = 1,
) -> tuple[torch.Tensor, torch.Tensor | float | None]:
    """:func:`calibration_images` and what to pass :func:`calibrate` as ``held_out``.

    With one image per file the fraction ``held_out`` is returned as it is (calibrate splits the
    images). With several crops per file the crops of one photo are alike, so the held-out
    images are the crops of their own photos (a ``held_out`` fraction of the files, at least one),
    never of a photo calibrated on; with a single file that is impossible and the crops are split.
    Never more than ``limit`` images in all: where ``held_out * limit`` rounds to 0 none are held out.
    """
    if held_out is not None and (isinstance(held_out, bool) or not isinstance(held_out, (int, float))
                                 or not 0 <= held_out < 1):
        raise UsageError(f"held_out must be a fraction in [0, 1) here (the images are read per photo), "
                         f"got {held_out!r}")
    # too few images to hold any out (calibrate's own split rounds the same way): all calibrate, within the limit
    if not held_out or crops_per_image == 1 or (limit is not None and round(held_out * limit) == 0):
        return calibration_images(spec, model, limit=limit, seed=seed, img_size=img_size,
                                  crops_per_image=crops_per_image), held_out if crops_per_image == 1 and held_out \
            else None
    paths = calibration_files(spec)
    if len(paths) < 2:
        return calibration_images(paths, model, limit=limit, seed=seed, img_size=img_size,
                                  crops_per_image=crops_per_image), held_out
    order = random.Random(seed + 1).sample(paths, len(paths))
    k = min(max(1, round(held_out * len(paths))), len(paths) - 1)
    held_limit = None if limit is None else min(max(1, round(held_out * limit)), limit - 1)  # 1+ left to calibrate
    calib_limit = None if limit is None else max(1, limit - held_limit)
    calib = calibration_images(sorted(order[k:]), model, limit=calib_limit, seed=seed, img_size=img_size,
                               crops_per_image=crops_per_image)
    held = calibration_images(sorted(order[:k]), model, limit=held_limit, seed=seed + 1, img_size=img_size,
                              crops_per_image=crops_per_image)
    return calib, held


def _as_batch(images: torch.Tensor | ImageSpec, model: nn.Module, seed: int) -> torch.Tensor:
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[0] == 0:
            raise UsageError(f"calibration images must be a batch (N, C, H, W), got shape {tuple(images.shape)}")
        return images
    return calibration_images(images, model, seed=seed)


def _split_held_out(
    images: torch.Tensor, held_out: float | int | torch.Tensor | ImageSpec | None, model: nn.Module, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if held_out is None or (isinstance(held_out, (int, float)) and not isinstance(held_out, bool) and held_out == 0):
        return images, None
    if isinstance(held_out, bool):
        raise UsageError("held_out must be a fraction, a count, a batch or image paths, not a bool")
    if isinstance(held_out, float) and not held_out.is_integer() and held_out > 1:
        raise UsageError(f"held_out={held_out}: give a fraction below 1 (0.25) or a whole number of images")
    if isinstance(held_out, float) and held_out == 1.0:
        raise UsageError("held_out=1.0 would hold out every image; give a fraction below 1 (0.25) or a count (1)")
    if isinstance(held_out, (int, float)):
        n = images.shape[0]
        k = round(held_out * n) if isinstance(held_out, float) and held_out < 1 else int(held_out)
        if held_out < 0 or k >= n:
            raise UsageError(f"held_out={held_out} leaves no calibration images out of {n}; hold out fewer")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
        return images[perm[k:]], images[perm[:k]] if k else None
    return images, _as_batch(held_out, model, seed + 1)


# --------------------------------------------------------------------------- method choice


def _norm_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[str, nn.GroupNorm, nn.Module]]:
    """``(name, student GroupNorm, teacher BatchNorm)`` for every BN the surgery replaced by GN."""
    teacher_modules = dict(teacher.named_modules())
    pairs = []
    for name, module in student.named_modules():
        other = teacher_modules.get(name)
        if isinstance(module, nn.GroupNorm) and other is not None and is_batchnorm(other):
            if module.num_channels != other.num_features:
                raise UsageError(f"{name}: student has {module.num_channels} channels, teacher "
                                 f"{other.num_features}; is the teacher the model the student was converted from?")
            pairs.append((name, module, other))
    return pairs


def _student_mode(student: nn.Module) -> str:
    """``aws`` when every WS parametrization is adaptive, else ``ws``."""
    params = [p for _, _, p in ws_parametrizations(student)]
    if params:
        return "aws" if all(isinstance(p, AdaptiveWeightStandardization) for p in params) else "ws"
    config = get_surgery_config(student)
    return config.mode if config is not None else "ws"


def resolve_method(student: nn.Module, teacher: nn.Module, method: str = "auto") -> list[str]:
    """The phases ``method`` runs for this student (``auto`` decided as the module docs say).

    Raises:
        UsageError: the method does not fit the student (``gn-init`` without GroupNorm that
            replaced a BatchNorm, ``bn-stats`` without BatchNorm).
    """
    has_gn = bool(_norm_pairs(student, teacher))
    has_bn = any(is_batchnorm(m) and hasattr(m, "running_mean") for m in student.modules())
    if method == "none":
        return []
    if method == "auto":
        if has_gn:
            return ["gn-init", "distill"]
        if _student_mode(student) == "aws":
            return []  # adaptive WS with BN kept computes exactly what the teacher does
        return (["bn-stats"] if has_bn else []) + ["distill"]
    if method == "gn-init" and not has_gn:
        raise UsageError("gn-init needs a student whose BatchNorms were replaced by GroupNorm "
                         "(convert with norm='gn'; CLI: --norm gn)")
    if method == "bn-stats" and not has_bn:
        raise UsageError("bn-stats needs a student that kept its BatchNorm layers; use gn-init or distill")
    if method not in METHODS:
        raise ConfigError(f"unknown calibration method {method!r}; choose one of {', '.join(METHODS)}")
    return [method]


# --------------------------------------------------------------------------- phases


@torch.no_grad()
def reestimate_bn_stats(model: nn.Module, images: torch.Tensor, batch_size: int = 64) -> int:
    """Recompute every BatchNorm's running mean/var on ``images`` (cumulative average), in place.

    Only the BN layers run in training mode (dropout and drop-path stay off); their
    momentum and mode are restored after.

    Returns:
        The number of BatchNorm layers re-estimated.
    """
    bns = [m for m in model.modules() if is_batchnorm(m) and getattr(m, "running_mean", None) is not None
           and isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    with modes_kept(model):
        model.eval()
        for m in bns:
            m.reset_running_stats()
            m.train()
        try:
            seen = 0
            # equal batches (65 images: 33 + 32, not 64 + 1): a batch of one image fails a BatchNorm on
            # pooled 1x1 maps (SE blocks) in training mode
            for batch in torch.tensor_split(images, math.ceil(images.shape[0] / batch_size)):
                for m in bns:  # each image weighs the same, the last (partial) batch included
                    m.momentum = batch.shape[0] / (seen + batch.shape[0])
                try:
                    model(batch)
                except ValueError as e:
                    if "more than 1 value per channel" not in str(e):
                        raise
                    raise UsageError(
                        "re-estimating BatchNorm statistics from one image fails for this model's BatchNorms on "
                        "pooled 1x1 maps (squeeze-excitation): give it at least 2 images (more files, or several "
                        "crops of each: `crops_per_image`, CLI --calib-crops N)") from None
                seen += batch.shape[0]
        finally:
            for m, momentum in zip(bns, saved):
                m.momentum = momentum
    return len(bns)


def _bn_output(bn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The affine BN output (before any activation a timm ``BatchNormAct2d`` adds), eval mode."""
    weight = getattr(bn, "weight", None)
    bias = getattr(bn, "bias", None)
    return F.batch_norm(x, bn.running_mean, bn.running_var, weight, bias, False, 0.0, bn.eps)


def _channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    var, mean = torch.var_mean(x.double().transpose(0, 1).reshape(x.shape[1], -1), dim=1, correction=0)
    return mean, var


@torch.no_grad()
def init_gn_from_teacher(student: nn.Module, teacher: nn.Module, images: torch.Tensor,
                         anchors: dict[str, _Anchor] | None = None) -> int:
    """Set each GN affine so its output matches the teacher BN output per channel (mean and var).

    One pass over ``images`` through the teacher records, per replaced BN, the per-channel
    mean and variance of its (pre-activation) output. Then one pass of the whole batch
    through the student: a forward pre-hook on every GroupNorm computes the group-normalized
    input ``x_hat`` it is about to normalize, its per-channel mean ``m`` and variance ``v``,
    and sets ``weight = sqrt(var_t / v)``, ``bias = mean_t - weight * m`` before the layer
    runs. Later layers therefore see the already-calibrated earlier ones: layer by layer, one pass.

    A GroupNorm in ``anchors`` (from :func:`anchor_gn_statistics`) gets instead the replaced BN's
    affine rescaled by the average over ``images`` of its per-image group mean and deviation: the
    affine that computes exactly what BN did when those statistics are constant. A GroupNorm fed by
    a conv anchored before (listed in ``student.wsurgery_anchored``) and not in ``anchors`` keeps its
    affine: moment matching knows nothing of the channel signs and would invert the negative ones.

    Returns:
        The number of GroupNorm layers initialised.
    """
    pairs = _norm_pairs(student, teacher)
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def teacher_hook(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            targets[name] = _channel_moments(_bn_output(module, args[0]))
        return hook

    def anchored_hook(anchor: _Anchor):
        def hook(module: nn.GroupNorm, args: tuple) -> None:
            x = args[0].double()
            var, mean = torch.var_mean(x.reshape(x.shape[0], module.num_groups, -1), dim=2, correction=0)
            per_group = module.num_channels // module.num_groups
            mean = mean.mean(0).repeat_interleave(per_group)
            std = (var + module.eps).sqrt().mean(0).repeat_interleave(per_group)
            # GN(z)_c = (z_c - mean) / std with z_c = s_c x_c + o_c; BN computed weight_c x_c + bias_c
            module.weight.copy_((anchor.weight * std / anchor.signs).to(module.weight.dtype))
            module.bias.copy_((anchor.bias - anchor.weight * (anchor.offsets - mean) / anchor.signs)
                              .to(module.bias.dtype))
        return hook

    def student_hook(name: str):
        if anchors and name in anchors:
            return anchored_hook(anchors[name])

        def hook(module: nn.GroupNorm, args: tuple) -> None:
            x_hat = F.group_norm(args[0], module.num_groups, None, None, module.eps)
            mean_s, var_s = _channel_moments(x_hat)
            mean_t, var_t = targets[name]
            # a channel constant over the data (var_s ~ 0) keeps unit weight and just gets the mean
            scale = torch.where(var_s > 1e-12, torch.sqrt(var_t / var_s.clamp_min(1e-12)), torch.ones_like(var_s))
            module.weight.copy_(scale.to(module.weight.dtype))
            module.bias.copy_((mean_t - scale * mean_s).to(module.bias.dtype))
        return hook

    kept = _anchored_norms(student, teacher) - set(anchors or ())
    pairs = [(n, s, t) for n, s, t in pairs if n not in kept]
    _run_with_pre_hooks(teacher, [(t, teacher_hook(n)) for n, _, t in pairs], images)
    _run_with_pre_hooks(student, [(s, student_hook(n)) for n, s, _ in pairs], images)
    return len(pairs)


def _anchored_norms(student: nn.Module, teacher: nn.Module) -> set[str]:
    """The GroupNorms fed by convs :func:`anchor_gn_statistics` anchored (by the teacher's conv -> BN pairs)."""
    anchored = set(anchored_convs(student))
    if not anchored:
        return set()
    try:
        return {norm for conv, norm in find_conv_bn_pairs(teacher) if conv in anchored}
    except ConversionError:  # anchoring needed the trace; a record without one leaves every norm to moment matching
        return set()


@dataclass
class _Feed:
    """An adaptive-WS conv of the student that alone feeds a GroupNorm which replaced a BatchNorm."""

    conv_name: str
    conv: nn.Module
    aws: AdaptiveWeightStandardization
    norm_name: str
    gn: nn.GroupNorm
    bn: nn.Module  # the teacher's

    @property
    def group_channels(self) -> int:
        return self.gn.num_channels // self.gn.num_groups


def _gn_feeds(student: nn.Module, teacher: nn.Module) -> list[_Feed]:
    """What preconditioning and anchoring work on: each adaptive-WS conv that is the only input of a GroupNorm
    that replaced a BatchNorm (the conv -> BN pairs torch.fx traces in ``teacher``), channel for channel, the
    GroupNorm with an affine.

    Raises:
        ConversionError: torch.fx cannot trace ``teacher``.
    """
    pairs = find_conv_bn_pairs(teacher)
    norms = {name: (gn, bn) for name, gn, bn in _norm_pairs(student, teacher)}
    modules = dict(student.named_modules())
    adaptive = {id(m): p for _, m, p in ws_parametrizations(student) if isinstance(p, AdaptiveWeightStandardization)}
    feeds = []
    for conv_name, norm_name in pairs:
        conv = modules.get(conv_name)
        if norm_name not in norms or conv is None or id(conv) not in adaptive:
            continue
        (gn, bn), aws = norms[norm_name], adaptive[id(conv)]
        if conv.out_channels == gn.num_channels and aws.num_filters == conv.out_channels and gn.affine:
            feeds.append(_Feed(conv_name, conv, aws, norm_name, gn, bn))
    return feeds


#: the convs :func:`precondition_gn_inputs` changed; saved, so that loading rebuilds their biases
PRECONDITIONED_ATTR = "wsurgery_preconditioned"


def preconditioned_convs(model: nn.Module) -> list[str]:
    """The names of the convs :func:`precondition_gn_inputs` gave a bias (empty when none)."""
    return list(getattr(model, PRECONDITIONED_ATTR, None) or ())


@torch.no_grad()
def precondition_gn_inputs(student: nn.Module, teacher: nn.Module, min_group_channels: int = 1) -> list[str]:
    """Standardize the input channels of each GroupNorm with the replaced BatchNorm's statistics.

    A BatchNorm normalizes channel ``c`` by the mean ``mu_c`` and standard deviation ``sigma_c``
    of the data it was trained on; a GroupNorm pools the channels of a group (all of them with
    one group) for one mean and one deviation per image. Pretrained channels differ in offset
    and scale by orders of magnitude, so a few channels decide GN's statistics and those swing
    from image to image. Where an adaptive-WS conv feeds the norm directly (the only consumer of
    the conv, its only input, as torch.fx traces the teacher), the conv's output is rescaled by
    ``1/sigma_c`` (its gain and shift) and given the bias ``-mu_c/sigma_c``, and the GroupNorm gets
    the BatchNorm's affine. GN then pools channels that are zero-mean and unit-variance over the
    teacher's data, and on an image with average statistics computes exactly what BN did. It is
    still a GroupNorm: every image is normalized by its own statistics.

    Uses no images. Measured on EfficientNet-Lite0 (adaptive WS + GN with one group, crops of
    held-out photos): top-1 agreement with the original 0% -> 59% by itself, 48% -> 62% with the
    moment matching of gn-init after it, 57.6% -> 68.2% after a 2-minute calibration (README).
    By itself (``calibrate(..., precondition=True, anchor=False)``) the demo's micro-batch fine-tune on
    Fashion-MNIST from such a model diverges at the recipe's learning rate (26% instead of 71%)
    and trains at a third of it or less (69.7-73.3%, about as without it); anchoring, which starts
    from it, does not (:func:`needs_lower_lr`). Convs already
    changed (listed in ``student.wsurgery_preconditioned``) are left alone, so calibrating twice
    is safe. ``min_group_channels=2`` leaves the GroupNorms whose groups are single channels (what
    anchoring can use): such a GN normalizes each channel by itself, so standardizing it first does not
    change what the model computes, only how its gain and shift train.

    Returns:
        The names of the convs changed now.
    """
    try:
        feeds = _gn_feeds(student, teacher)
    except ConversionError:  # not traceable: gn-init's moment matching alone
        return []
    done = set(preconditioned_convs(student))
    changed = []
    for feed in feeds:
        if feed.conv_name in done or feed.group_channels < min_group_channels:
            continue
        conv, aws, gn, bn = feed.conv, feed.aws, feed.gn, feed.bn
        inv = torch.rsqrt(bn.running_var.double() + bn.eps)
        mean = bn.running_mean.double()
        aws.gain.mul_(inv.to(aws.gain.dtype))
        aws.shift.mul_(inv.to(aws.shift.dtype))
        old = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        bias = ((old - mean) * inv).to(device=aws.gain.device, dtype=aws.gain.dtype)
        if conv.bias is None:
            conv.bias = nn.Parameter(bias)
        else:
            conv.bias.copy_(bias)
        weight, shift = _bn_affine(bn)
        gn.weight.copy_(weight)
        gn.bias.copy_(shift)
        changed.append(feed.conv_name)
    if changed:
        setattr(student, PRECONDITIONED_ATTR, sorted(done | set(changed)))
    return changed


def add_precondition_biases(model: nn.Module, names: Sequence[str]) -> None:
    """Give the convs :func:`precondition_gn_inputs` changed their (zero) bias, to load weights into."""
    for name in names:
        conv = model.get_submodule(name)
        if not isinstance(conv, nn.Conv2d):
            raise ConversionError(f"{name} is not a conv; the saved record does not fit this model")
        if conv.bias is None:
            device, dtype = placement(conv)
            conv.bias = nn.Parameter(torch.zeros(conv.out_channels, device=device, dtype=dtype))
    setattr(model, PRECONDITIONED_ATTR, sorted(names))


#: the convs :func:`anchor_gn_statistics` anchored; saved, so that calibrating a loaded model again leaves them
ANCHORED_ATTR = "wsurgery_anchored"
#: anchoring's channel offset, in units of a channel's deviation over the teacher's data (preconditioned: 1).
#: Large enough that a channel's own variance barely moves GN's deviation (EfficientNet-Lite0 agreed with the
#: original as closely at 30 as at 100 and 1000), small enough for fp32 and fp16 to keep the signal beside it.
ANCHOR_OFFSET = 30.0
#: the principal directions of the per-image channel means that anchoring's signs cancel
ANCHOR_COMPONENTS = 20
#: a one-channel group carries no offset (GN normalizes that channel by itself)
ANCHOR_MIN_GROUP_CHANNELS = 2


def anchored_convs(model: nn.Module) -> list[str]:
    """The names of the convs :func:`anchor_gn_statistics` anchored (empty when none)."""
    return list(getattr(model, ANCHORED_ATTR, None) or ())


def needs_lower_lr(model: nn.Module) -> bool:
    """Whether ``model`` was calibrated with preconditioning and not anchoring: measured to fine-tune at a lower lr.

    benchmarks/demo_variants.py: preconditioned, the demo diverged at the micro-batch recipe's lr 0.01 (0.005 per
    update); anchored (``--preset anchor``, timm's 32 groups: 46 of Lite0's 49 norms anchored) it trained there as
    the calibration without anchoring does.
    """
    return bool(preconditioned_convs(model)) and not anchored_convs(model)


@dataclass
class _Anchor:
    """What the anchored affine of one GroupNorm needs: channel signs and offsets, the replaced BN's affine."""

    signs: torch.Tensor
    offsets: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor


def _cancelling_signs(directions: torch.Tensor, start: torch.Tensor, sweeps: int = 30) -> torch.Tensor:
    """Signs ``s`` (+-1) near-minimising ``|directions^T s|^2``, by greedy single flips from ``start``.

    ``directions`` (channels x k) holds the data's main directions of variation scaled by their
    deviation, so the objective is the variance over the data of ``s . x``: a signed sum of the channels
    that stays nearly constant from image to image. Exact minimisation is a max-cut problem; one-flip
    local search from a fixed start is deterministic, and cheap (O(channels * k) per sweep).
    """
    d = directions.numpy()
    s = start.numpy().copy()
    r = d.T @ s  # directions^T s, kept up to date
    norms = (d * d).sum(1)
    for _ in range(sweeps):
        flipped = False
        for c in range(d.shape[0]):
            # flipping s_c changes |r|^2 by -4 s_c (d_c . r) + 4 |d_c|^2
            if norms[c] - s[c] * float(d[c] @ r) < -1e-12:
                r -= 2 * s[c] * d[c]
                s[c] = -s[c]
                flipped = True
        if not flipped:
            break
    return torch.from_numpy(s)


def _anchor_pattern(means: torch.Tensor, components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel signs ``s`` and offset signs ``t`` for one group, from its per-image channel means (images x channels).

    GN's per-image mean of the anchored channels is ``mean(s * x) + const`` and, with offsets ``K t``,
    its deviation moves with ``mean(t * s * x)``: both signed sums should stay constant over images,
    so ``s`` and ``u = t * s`` are each chosen to cancel the data's main directions of variation. ``t``
    must mix signs (it carries GN's deviation), so ``u`` is also pushed to be orthogonal to ``s``.
    """
    n, channels = means.shape
    centred = means - means.mean(0)
    _, sv, vh = torch.linalg.svd(centred, full_matrices=False)
    k = max(1, min(components, n - 1, channels))
    directions = vh[:k].T * sv[:k] / math.sqrt(max(n - 1, 1))
    alternate = torch.ones(channels, dtype=torch.float64)
    alternate[1::2] = -1
    signs = _cancelling_signs(directions, torch.ones(channels, dtype=torch.float64))
    # balance: |s . u|^2 weighs as much as the data's whole variance per channel, so t = s * u mixes signs
    weight = math.sqrt(float((directions**2).sum()) / channels)
    u = _cancelling_signs(torch.cat([directions, weight * signs[:, None]], 1), alternate * signs)
    offsets = signs * u
    if abs(float(offsets.mean())) > 0.5:  # too few of one sign to carry the deviation: a fixed mix instead
        offsets = alternate
    return signs, offsets


@torch.no_grad()
def anchor_gn_statistics(student: nn.Module, teacher: nn.Module, images: torch.Tensor, *,
                         offset: float = ANCHOR_OFFSET, components: int = ANCHOR_COMPONENTS,
                         batch_size: int = 32) -> dict[str, _Anchor]:
    """Hold each preconditioned GroupNorm's per-image statistics nearly constant on natural images.

    After :func:`precondition_gn_inputs`, GN pools channels that are zero-mean and unit-variance over
    the teacher's data, and computes what BN did on an image whose pooled mean and deviation are the
    average ones. Natural images move both (brightness, contrast, texture), a little at each of a
    network's norms, and the losses add up with depth. Anchoring adds to each channel ``c`` a constant
    offset ``K t_c`` (``t_c = +-1``, ``K`` = ``offset``) and flips its sign ``s_c``: GN's deviation is
    then about ``K`` whatever the image, and its mean a signed sum of the channels whose signs were
    chosen (from the per-image channel means of ``images``, through the teacher) to cancel the main
    directions in which natural images vary. :func:`init_gn_from_teacher` then gives each anchored GN
    the replaced BN's affine, rescaled by the average statistics it sees: with constant statistics GN
    computes exactly what BN did. It is still a GroupNorm, and every parameter stays trainable.

    Applies to the convs :func:`precondition_gn_inputs` changed whose GroupNorm has at least two
    channels a group (a one-channel group carries no offset; :func:`calibrate` preconditions only
    those unless asked to precondition all); convs anchored before are left alone.

    Returns:
        For each GroupNorm anchored now (by name), what :func:`init_gn_from_teacher` needs for its affine.
    """
    preconditioned = set(preconditioned_convs(student)) - set(anchored_convs(student))
    if not preconditioned:
        return {}
    try:
        feeds = [f for f in _gn_feeds(student, teacher)
                 if f.conv_name in preconditioned and f.group_channels >= ANCHOR_MIN_GROUP_CHANNELS]
    except ConversionError:  # not traceable (a preconditioning record from elsewhere): nothing to anchor
        return {}
    sums: dict[str, list[torch.Tensor]] = {f.norm_name: [] for f in feeds}

    def record(name: str):
        def hook(bn: nn.Module, args: tuple) -> None:  # the BN input's channel means, standardized as BN does
            x = args[0].double().mean((2, 3))
            sums[name].append((x - bn.running_mean.double()) * torch.rsqrt(bn.running_var.double() + bn.eps))
        return hook

    hooks = [(f.bn, record(f.norm_name)) for f in feeds]
    for batch in torch.split(images, batch_size):
        _run_with_pre_hooks(teacher, hooks, batch)
    plan: dict[str, _Anchor] = {}
    for feed in feeds:
        conv, aws, gn, bn = feed.conv, feed.aws, feed.gn, feed.bn
        means = torch.cat(sums[feed.norm_name]).cpu()
        signs = torch.empty(gn.num_channels, dtype=torch.float64)
        offsets = torch.empty_like(signs)
        for group in torch.arange(gn.num_channels).chunk(gn.num_groups):
            signs[group], offsets[group] = _anchor_pattern(means[:, group], components)
        device, dtype = aws.gain.device, aws.gain.dtype
        s = signs.to(device=device, dtype=dtype)
        aws.gain.mul_(s)
        aws.shift.mul_(s)
        conv.bias.copy_(conv.bias * s + (offset * offsets).to(device=device, dtype=dtype))
        weight, bias = _bn_affine(bn)
        plan[feed.norm_name] = _Anchor(signs.to(device), (offset * offsets).to(device), weight.double(),
                                       bias.double())
    setattr(student, ANCHORED_ATTR, sorted(set(anchored_convs(student)) | {f.conv_name for f in feeds}))
    return plan


def _init_subset(images: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """The ``n`` images (a seeded random subset) the one-pass phases (gn-init) of :func:`calibrate` use.

    Random, not the first ``n``: image batches read from a folder come grouped by photo.
    """
    gen = torch.Generator().manual_seed(seed + 2)
    return images[torch.randperm(images.shape[0], generator=gen)[:n]]


def _run_with_pre_hooks(model: nn.Module, hooks: list, images: torch.Tensor) -> None:
    """One eval pass of ``model`` over ``images`` with forward pre-hooks installed, then removed."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks]
    try:
        _run_eval(model, images)
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def _run_eval(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with modes_kept(model):
        model.eval()
        return model(images)


def _trainable(student: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "all":
        return [p for p in student.parameters() if p.is_floating_point()]
    params: list[nn.Parameter] = []
    for module in student.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.modules.batchnorm._BatchNorm)) or is_batchnorm(module):
            params.extend(p for p in (getattr(module, "weight", None), getattr(module, "bias", None))
                          if isinstance(p, nn.Parameter))
        if isinstance(module, AdaptiveWeightStandardization):
            params.extend([module.gain, module.shift])
    for name in preconditioned_convs(student):  # their biases are per-channel offsets too
        bias = student.get_submodule(name).bias
        if isinstance(bias, nn.Parameter):
            params.append(bias)
    return params


def _resize(x: torch.Tensor, size: int | None) -> torch.Tensor:
    if size is None or (x.shape[-1] == size and x.shape[-2] == size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def _feature_modules(student: nn.Module, teacher: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    t = dict(teacher.named_modules())
    out = []
    for name, module in student.named_modules():
        other = t.get(name)
        if other is None:
            continue
        s_norm = isinstance(module, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or is_batchnorm(module)
        t_norm = isinstance(other, (nn.GroupNorm, nn.modules.batchnorm._BatchNorm)) or is_batchnorm(other)
        if s_norm and t_norm:
            out.append((module, other))
    return out


def _kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature ** 2


def distill(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor,
    config: CalibrationConfig,
    *,
    train: str,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> list[float]:
    """Label-free distillation of ``teacher`` into ``student`` (in place); returns the losses.

    The student runs in eval mode (BatchNorm uses its running statistics, dropout and
    drop-path are off) with gradients only for the chosen parameters; the teacher runs
    without gradients (once up front when ``config.augment`` is off and there is no
    feature loss, else on every step's views). AdamW (timm's optimizer factory) with a linear
    warm-up and a cosine decay to zero over ``config.steps``.
    """
    from timm.optim import create_optimizer_v2

    params = _trainable(student, train)
    if not params or config.steps == 0:
        return []
    # 5e-4 for the affines: on EfficientNet-Lite0 AWS + GN, 2e-3 lost held-out agreement in the first steps
    lr = config.lr if config.lr is not None else (5e-4 if train == "affine" else 2e-4)
    gen = torch.Generator().manual_seed(seed)
    x_all = images
    features = _feature_modules(student, teacher) if config.feature_weight > 0 else []
    if not features and not config.augment:  # fixed inputs: compute the teacher's logits once
        teacher_logits = torch.cat([_run_eval(teacher, _resize(x_all[i:i + 64], config.distill_size))
                                    for i in range(0, x_all.shape[0], 64)])
    saved_flags = {id(p): p.requires_grad for p in student.parameters()}
    for p in student.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = create_optimizer_v2(params, opt="adamw", lr=lr, weight_decay=0.0)
    with modes_kept(student):
        student.eval()
        losses: list[float] = []
        start = time.perf_counter()
        order = torch.empty(0, dtype=torch.long)
        try:
            for step in range(config.steps):
                for group in optimizer.param_groups:
                    group["lr"] = _lr_at(step, config.steps, config.warmup_steps, lr)
                if order.numel() < config.batch_size:
                    order = torch.cat([order, torch.randperm(x_all.shape[0], generator=gen)])
                idx, order = order[:config.batch_size], order[config.batch_size:]
                if config.augment:
                    x = _augment(x_all[idx], config.distill_size, config.mix_fraction, gen)
                else:
                    x = _resize(x_all[idx], config.distill_size)
                if features:
                    loss = _feature_step(student, teacher, x, features, config)
                elif config.augment:
                    loss = _kl(student(x), _run_eval(teacher, x), config.temperature)
                else:
                    loss = _kl(student(x), teacher_logits[idx], config.temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress(CalibrationProgress("distill", step + 1, config.steps, losses[-1]))
                if not math.isfinite(losses[-1]):
                    raise UsageError(f"distillation diverged at step {step + 1} (loss {losses[-1]}); "
                                     "lower `lr` (CLI: --calib-lr)")
                if config.max_seconds is not None and time.perf_counter() - start > config.max_seconds:
                    break
        finally:
            for p in student.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
                p.grad = None
    return losses


def _augment(x: torch.Tensor, size: int | None, mix_fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Fresh views of a calibration batch: random resized crop, horizontal flip, blends.

    Opt-in (``augment=True``): meant for calibrating from very few images, where a fixed batch
    can be memorised. New views every step, some of them blends of two images (mixup without
    labels). On EfficientNet-Lite0 with 144 crops of 12 photos it did not help (held-out KL 2.00
    with, 1.77 without; see the README), so it is off by default. Written here rather than with
    timm's transforms because the batch is already a normalized tensor and every draw must come
    from the seeded ``gen`` (timm's crops draw from Python's global ``random``; its ``Mixup``
    needs targets).
    Crop area 25-100% and aspect ratio 3/4-4/3 as in timm's ``RandomResizedCrop``.
    """
    n, _, h, w = x.shape
    out_size = (size, size) if size is not None else (h, w)
    u = torch.rand(n, 4, generator=gen).tolist()
    views = []
    for i in range(n):
        area = h * w * (0.25 + 0.75 * u[i][0])
        ratio = math.exp(math.log(3 / 4) + u[i][1] * math.log(16 / 9))
        cw = max(1, min(w, round(math.sqrt(area * ratio))))
        ch = max(1, min(h, round(math.sqrt(area / ratio))))
        top, left = int(u[i][2] * (h - ch + 1)), int(u[i][3] * (w - cw + 1))
        crop = x[i:i + 1, :, top:top + ch, left:left + cw]
        views.append(F.interpolate(crop, size=out_size, mode="bilinear", antialias=True, align_corners=False))
    out = torch.cat(views)
    # drawn on the CPU from the seeded generator (the same views on every device), then moved
    flip = (torch.rand(n, generator=gen) < 0.5).to(out.device)
    out[flip] = out[flip].flip(-1)
    k = round(mix_fraction * n)
    if k and n > 1:
        partner = torch.randperm(n, generator=gen)[:k].to(out.device)
        lam = torch.rand(k, 1, 1, 1, generator=gen).to(device=out.device, dtype=out.dtype)
        out[:k] = lam * out[:k] + (1 - lam) * out[partner]
    return out


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine to zero (the schedule timm's CosineLRScheduler gives per update)."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _feature_step(student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                  features: list[tuple[nn.Module, nn.Module]], config: CalibrationConfig) -> torch.Tensor:
    s_out: list[torch.Tensor] = []
    t_out: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _a, o: s_out.append(o)) for m, _ in features]
    handles += [m.register_forward_hook(lambda _m, _a, o: t_out.append(o)) for _, m in features]
    try:
        with torch.no_grad():
            t_logits = _run_eval(teacher, x)
        s_logits = student(x)
    finally:
        for h in handles:
            h.remove()
    feat = sum(F.mse_loss(s, t.detach()) / (t.detach().pow(2).mean() + 1e-6) for s, t in zip(s_out, t_out))
    return _kl(s_logits, t_logits, config.temperature) + config.feature_weight * feat / max(1, len(s_out))


# --------------------------------------------------------------------------- entry point


def _check_models(student: nn.Module, teacher: nn.Module) -> None:
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise UsageError("calibrate needs the student and the teacher as torch modules")
    if student is teacher:
        raise UsageError("the student and the teacher are the same object; convert a copy "
                         "(wsurgery.convert(model, inplace=False)) and calibrate that against the original")
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    if any(p.data_ptr() in teacher_ptrs for p in student.parameters()):
        raise UsageError("the student shares weights with the teacher, so calibrating would change the teacher; "
                         "convert with inplace=False")
    if not is_converted(student):  # calibrating it would train a model that was never converted
        if is_converted(teacher):
            raise UsageError("the teacher is the converted model and the student is not: the arguments are "
                             "swapped; call calibrate(converted, original, images)")
        raise UsageError("the student has no Weight Standardization layers; calibrate the model "
                         "wsurgery.convert returned, with the original as teacher")


def _check_outputs(student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> None:
    """Both models take these images and give outputs of one shape (one image each), before anything changes."""
    outputs = []
    for model in (student, teacher):
        try:
            with torch.no_grad(), modes_kept(model):
                model.eval()
                outputs.append(model(batch[:1]))
        except RuntimeError as e:
            raise UsageError(f"a calibration image of shape {tuple(batch.shape[1:])} does not fit the model "
                             f"({str(e).splitlines()[0][:160]}); pass RGB images the model's size") from None
    if outputs[0].shape != outputs[1].shape:
        raise UsageError(f"the student gives {tuple(outputs[0].shape[1:])} outputs per image and the teacher "
                         f"{tuple(outputs[1].shape[1:])}; calibrate a converted model against its own original")


def calibrate(
    student: nn.Module,
    teacher: nn.Module,
    images: torch.Tensor | ImageSpec,
    *,
    method: str | None = None,
    steps: int | None = None,
    held_out: float | int | torch.Tensor | ImageSpec | None = 0.25,
    seed: int = 0,
    progress: ProgressFn | None = None,
    config: CalibrationConfig | None = None,
    **overrides: Any,
) -> CalibrationResult:
    """Calibrate a converted ``student`` (in place) to compute what ``teacher`` (the original) does.

    Args:
        student: the converted model (``wsurgery.convert(model, inplace=False)``).
        teacher: the original model; never modified.
        images: unlabeled calibration images: a normalized batch ``(N, 3, H, W)``, or files,
            folders or globs (read with :func:`calibration_images`: eval transform, at most 256).
        method: ``auto``, ``bn-stats``, ``gn-init``, ``distill`` or ``none`` (see the module docs);
            default ``config.method``, which is ``auto``.
        steps: distillation steps (default ``config.steps``).
        held_out: images to measure agreement on, kept out of calibration: a fraction (0.25)
            or a count of ``images``, a separate batch or image spec, or None (no measurement).
        seed: seeds the held-out split, the batch order and the crops.
        progress: called with a :class:`CalibrationProgress` after every phase and step.
        config: everything else (see :class:`CalibrationConfig`); keyword ``overrides``
            update it (``calibrate(s, t, x, train="all", lr=1e-4)``).

    Returns:
        A :class:`CalibrationResult` with agreement before and after; also stored (as a
        dict) in ``student.wsurgery_calibration`` so :func:`wsurgery.save` records it.

    Raises:
        UsageError: the student is the teacher or shares its weights, or the method does
            not fit the student; ConfigError: bad settings; InputNotFoundError/DatasetError: no images.
    """
    base = config.to_dict() if config is not None else {}
    base.update(overrides)
    if method is not None:  # else config.method (CalibrationConfig's default: auto)
        base["method"] = method
    if steps is not None:
        base["steps"] = steps
    cfg = build_config_from(CalibrationConfig, base, "calibration")
    if isinstance(student, nn.Module) and isinstance(teacher, nn.Module):
        student, teacher = unwrap(student), unwrap(teacher)
    _check_models(student, teacher)
    start = time.perf_counter()
    # a diverged distillation (or any failure) leaves the student as it came, so a retry starts clean:
    # its weights, and no conv biases or record from a preconditioning that ran before the failure
    before = {k: v.detach().clone() for k, v in student.state_dict().items()}
    biasless = [m for m in student.modules() if isinstance(m, nn.Conv2d) and m.bias is None]
    records = {attr: getattr(student, attr, None) for attr in (PRECONDITIONED_ATTR, ANCHORED_ATTR)}
    with modes_kept(teacher), modes_kept(student):
        teacher.eval()
        try:
            result = _calibrate(student, teacher, images, cfg, held_out, seed, progress)
        except BaseException:
            for conv in biasless:
                conv.bias = None
            student.load_state_dict(before)
            for attr, record in records.items():
                if record is None and hasattr(student, attr):
                    delattr(student, attr)
                elif record is not None:
                    setattr(student, attr, record)
            raise
    result.seconds = time.perf_counter() - start
    student.wsurgery_calibration = result.to_dict()
    return result


def _at_conversion(conv: nn.Module, aws: AdaptiveWeightStandardization) -> bool:
    """Whether ``aws`` still holds the gain and shift conversion gave it (the conv computes what the original's did)."""
    mean, scale = filter_stats(conv.parametrizations.weight.original.detach(), aws.fan_in, aws.convention)
    want = torch.cat([scale, mean]).double() / aws.coef
    got = torch.cat([aws.gain.detach(), aws.shift.detach()]).double()
    # a model converted in half precision (then cast to float32) holds its gains rounded to that type
    rounding = next((torch.finfo(dtype).eps for dtype in (torch.bfloat16, torch.float16)
                     if torch.equal(got.to(dtype).double(), got)), torch.finfo(torch.float32).eps)
    return bool(((got - want).abs() <= 1e-4 * want.abs().max().clamp_min(1e-12) + rounding * want.abs()).all())


def _auto_anchor(student: nn.Module, teacher: nn.Module) -> tuple[bool, str | None]:
    """Whether ``anchor=None`` anchors this student, and where it could but does not, why (for a note).

    Anchoring derives each channel's standardization from the replaced BatchNorm's running statistics,
    which describe the conv as the original had it: so only convs still as conversion left them, on a
    student not calibrated before (a distillation moves the gains; measured on a TinyNet, anchoring on
    top of one was 40x further from the teacher than gn-init without it).
    """
    if _student_mode(student) != "aws":
        return False, None  # plain WS has no gains to rescale
    try:
        feeds = _gn_feeds(student, teacher)
    except ConversionError:
        return False, ("torch.fx cannot trace the original, and anchoring needs the trace to find the conv that "
                       "feeds each GroupNorm")
    done = set(anchored_convs(student))
    candidates = [f for f in feeds if f.conv_name not in done and f.group_channels >= ANCHOR_MIN_GROUP_CHANNELS]
    if not candidates:  # nothing it can anchor, or anchored before (those layers stay as they are)
        return False, None
    dtype = placement(student)[1]
    if dtype not in (torch.float32, torch.float64):
        return False, (f"the student is in {dtype}, too few bits beside anchoring's offsets; to anchor, calibrate "
                       "a fresh conversion in float32 (student.float() and teacher.float() first)")
    previous = getattr(student, "wsurgery_calibration", None)
    if isinstance(previous, dict) and previous.get("phases"):
        return False, ("this model was calibrated before, without it, and anchoring starts from the convs as "
                       "conversion left them; convert the original again to anchor")
    preconditioned = set(preconditioned_convs(student))
    moved = sum(1 for f in candidates if f.conv_name not in preconditioned and not _at_conversion(f.conv, f.aws))
    if moved:
        return False, (f"{moved} of the {len(candidates)} convs it would anchor differ from what conversion gave "
                       "them (trained since?), and anchoring starts from the convs as conversion left them; "
                       "convert the original again to anchor")
    return True, None


def _check_step_did_something(step: str, done: list[str]) -> None:
    """Refuse a gn-init step that changed no layer (now or before): it would be recorded as done."""
    if not done:
        need = "GroupNorms of at least two channels a group" if step == "anchor" else "GroupNorms"
        raise ConfigError(f"{step} (--calib-{step}) changed no layer: it needs adaptive WS convs (mode='aws'; CLI: "
                          f"--mode aws) feeding {need} that replaced BatchNorms, in a model torch.fx can trace; "
                          "drop it")


def _on_models(batch: torch.Tensor, student: nn.Module, teacher: nn.Module) -> torch.Tensor:
    """``batch`` on the device and in the dtype both models run in (one of them: refused if they differ)."""
    (device, dtype), (t_device, t_dtype) = placement(student), placement(teacher)
    if (device, dtype) != (t_device, t_dtype):
        raise UsageError(f"the student runs on {device} in {dtype} and the teacher on {t_device} in {t_dtype}; "
                         f"move both to one device and dtype first (teacher.to(device, dtype))")
    return batch.to(device=device, dtype=dtype)


def _calibrate(student, teacher, images, cfg, held_out, seed, progress) -> CalibrationResult:
    phases = resolve_method(student, teacher, cfg.method)
    for step, flag in (("anchor", "--calib-anchor"), ("precondition", "--calib-precondition")):
        if getattr(cfg, step) and "gn-init" not in phases:  # it would do nothing, and be recorded as done
            fix = ("use method 'auto' or 'gn-init' (CLI: --calibrate)" if _norm_pairs(student, teacher) else
                   "it applies to a model whose BatchNorms became GroupNorm (norm='gn'; CLI: --norm gn)")
            raise ConfigError(f"{step} ({flag}) is a step of gn-init, which method {cfg.method!r} does not run "
                              f"here ({' + '.join(phases) or 'nothing'}); {fix}, or drop it")
    full_precision = placement(student)[1] in (torch.float32, torch.float64)
    if cfg.anchor and not full_precision:
        raise ConfigError(f"anchor (--calib-anchor) needs a float32 student, this one is in {placement(student)[1]}: "
                          "its offsets of 30 channel deviations leave half precision too few bits for the signal "
                          "beside them; calibrate in float32 (student.float(), teacher.float())")
    notes: list[str] = []
    anchor = cfg.anchor
    if anchor is None:  # auto: wherever it applies (a model with nothing to anchor is left to moment matching)
        anchor, why_not = _auto_anchor(student, teacher) if "gn-init" in phases else (False, None)
        if why_not is not None:
            notes.append(f"gn-init ran without anchoring: {why_not}")
    batch = _on_models(_as_batch(images, teacher, seed), student, teacher)
    _check_outputs(student, teacher, batch)
    calib, held = _split_held_out(batch, held_out, teacher, seed)
    teacher_held = predict_logits(teacher, held) if held is not None else None

    def measure() -> Agreement | None:  # the student's agreement with the teacher on the held-out images
        return agreement_from_logits(predict_logits(student, held), teacher_held) if held is not None else None

    before = measure()
    train = cfg.train
    if train == "auto":
        train = "affine" if _student_mode(student) == "aws" else "all"
    init_batch = _init_subset(calib, cfg.init_images, seed)
    losses: list[float] = []
    reverted: list[str] = []
    anchored_now = False
    after = None  # measured already when the keep_best guard ran last
    for i, phase in enumerate(phases):
        after = None
        if progress is not None:
            progress(CalibrationProgress(phase, 0, cfg.steps if phase == "distill" else 1))
        if phase == "bn-stats":
            reestimate_bn_stats(student, calib)
        elif phase == "gn-init":
            if cfg.precondition or anchor:  # adaptive-WS convs only; no images
                # anchoring starts from preconditioned channels, and preconditions only the layers it anchors:
                # alone, preconditioning fine-tunes at a lower lr (needs_lower_lr), and anchoring cannot use
                # one-channel groups, where preconditioning does not change the function
                precondition_gn_inputs(student, teacher,
                                       min_group_channels=1 if cfg.precondition else ANCHOR_MIN_GROUP_CHANNELS)
            # anchoring's signs are fitted to every calibration image, not only gn-init's subset
            anchors = anchor_gn_statistics(student, teacher, calib) if anchor else None
            if cfg.anchor:  # what anchored is a subset of what preconditioned
                _check_step_did_something("anchor", anchored_convs(student))
            elif cfg.precondition:
                _check_step_did_something("precondition", preconditioned_convs(student))
            anchored_now = bool(anchors)
            init_gn_from_teacher(student, teacher, init_batch, anchors=anchors)
        elif phase == "distill":
            guard = cfg.keep_best and held is not None and i > 0
            if guard:  # distilling from few photos can overfit them: keep what generalises better
                prior = measure()
                snapshot = {k: v.detach().clone() for k, v in student.state_dict().items()}
            losses = distill(student, teacher, calib, cfg, train=train, seed=seed, progress=progress)
            if guard:
                after = measure()
                if after.kl > prior.kl:
                    student.load_state_dict(snapshot)
                    reverted.append(phase)
                    after = prior
        if progress is not None and phase != "distill":
            progress(CalibrationProgress(phase, 1, 1))
    if after is None:
        after = measure()
    if anchored_now:
        groups = max(gn.num_groups for _, gn, _ in _norm_pairs(student, teacher))
        if groups > 1:  # measured (benchmarks/calibration.py --part target): one group has more channels to cancel
            notes.append(f"anchored GroupNorms of up to {groups} groups; one group anchors far better "
                         "(EfficientNet-Lite0, top-1 agreement with the original on ImageNet photos: 95% with one "
                         "group, 60% with 32): to keep more of the original, convert with gn_groups=1 and no "
                         "gn_group_size (CLI: --gn-groups 1)")
    config = cfg.to_dict()
    if cfg.anchor is None:  # the record says what auto did: whether the model is anchored (now or before)
        config["anchor"] = anchored_now or bool(anchored_convs(student))
    return CalibrationResult(
        method=cfg.method, phases=phases, train=train if "distill" in phases else None, before=before, after=after,
        num_images=int(calib.shape[0]), num_held_out=int(held.shape[0]) if held is not None else 0,
        steps=len(losses), seconds=0.0, seed=seed, losses=losses, reverted=reverted, config=config, notes=notes,
    )
