"""Training recipes: YAML files validated into a :class:`Recipe` dataclass.

A recipe is every knob of a fine-tuning run in one place. Each key is a field of
:class:`Recipe` with its help text (``wsurgery train --help-recipe`` and the README print the
same table); :func:`load_recipe` reads YAML with ``yaml.safe_load``, refuses unknown keys
(naming the closest valid one), wrong types and nonsensical values, and applies
``key=value`` overrides (``--set batch_size=2``; values are parsed as YAML).

Shipped recipes live in ``recipes/`` and can be named without a path
(``load_recipe("micro-batch")``):

* ``bit-hyperrule``: BiT-HyperRule from big_transfer (Kolesnikov et al., "Big Transfer (BiT):
  General Visual Representation Learning", https://arxiv.org/abs/1912.11370): SGD at 0.003
  per 512 images, momentum 0.9, no weight decay, linear warmup then /10 steps, zero head,
  schedule length, resolution and mixup from the dataset size (:func:`bit_hyperrule`);
* ``micro-batch``: batches of 2 with gradient accumulation, for WS + GN models;
* ``linear-probe``: frozen backbone, only the new head trains;
* ``cpu-quick``: small images and a short schedule for a laptop.

Values ``auto`` (for ``steps``, ``warmup_steps``, ``decay_milestones``, ``img_size``,
``mixup_alpha``) are resolved by :func:`resolve_recipe` once the dataset is known.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from .errors import InputNotFoundError, RecipeError

__all__ = [
    "RECIPE_DIR",
    "Recipe",
    "apply_overrides",
    "bit_hyperrule",
    "builtin_recipes",
    "check_below_peak",
    "load_recipe",
    "parse_override",
    "recipe_reference",
    "resolve_recipe",
]

def _recipe_dir() -> Path:
    """The shipped recipes: ``wsurgery/_recipes`` in an installed wheel (pyproject maps the
    repository's ``recipes/`` folder there), the repository's ``recipes/`` in a checkout."""
    here = Path(__file__).resolve().parent
    packaged = here / "_recipes"
    return packaged if packaged.is_dir() else here.parent / "recipes"


#: where the shipped recipes live
RECIPE_DIR = _recipe_dir()

Auto = Literal["auto"]


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class Recipe:
    """Every setting of a fine-tuning run. See the module docstring and each field's help."""

    # --- about the recipe itself
    name: str = _help("Short name of the recipe (for reports).", "custom")
    description: str = _help("What the recipe is for.", "")

    # --- data
    img_size: int | Auto | None = _help(
        "Training/eval resolution in pixels. null: the model's own; auto: BiT-HyperRule (128 for images "
        "smaller than 96x96, else 480).", None)
    val_split: float = _help("Fraction of each class held out for validation when the data has no val set.", 0.1)
    workers: int = _help("DataLoader worker processes (0: load in the main process).", 0)
    aug_scale: list[float] = _help("RandomResizedCrop area range [min, max] (timm `scale`).",
                                   factory=lambda: [0.08, 1.0])
    train_crop_mode: Literal["rrc", "rkrc", "rkrr"] = _help(
        "timm train crop: rrc (random resized crop), rkrc (resize keep ratio + random crop), rkrr.", "rrc")
    hflip: float = _help("Probability of a horizontal flip.", 0.5)
    color_jitter: float = _help("Color jitter strength (0: off).", 0.0)
    auto_augment: str | None = _help("timm auto-augment policy, e.g. rand-m9-mstd0.5 (null: off).", None)
    re_prob: float = _help("Random erasing probability.", 0.0)

    # --- schedule
    epochs: int = _help("Passes over the training set (ignored when `steps` is set).", 10)
    steps: int | Auto | None = _help(
        "Total optimizer steps (the last epoch stops part-way when they end inside it). auto: BiT-HyperRule by "
        "dataset size (500 below 20k images, 10k below 500k, else 20k) at the effective batch.", None)
    batch_size: int = _help("Images per forward pass (per process under DDP).", 32)
    accum_steps: int = _help("Micro-batches accumulated per optimizer step (effective batch = batch_size x this).", 1)
    eval_batch_size: int | None = _help("Batch size for evaluation (null: max(batch_size, 32)).", None)

    # --- optimizer
    optimizer: str = _help(
        "timm optimizer name (create_optimizer_v2): momentum (SGD), sgd (SGD + Nesterov), adamw, lamb ...", "momentum")
    lr: float = _help("Peak learning rate (at `lr_base_batch` images per step when that is set).", 0.01)
    lr_base_batch: int | None = _help(
        "If set, lr is scaled linearly: lr x (batch_size x accum_steps x world size) / lr_base_batch.", None)
    momentum: float = _help("Momentum of the optimizers that take one (SGD, RMSprop, LARS ...), or beta1 of adam, "
                            "adamw, nadam(w), radam, adamp, lamb(w); in [0, 1).", 0.9)
    weight_decay: float = _help(
        "Weight decay. 1-D parameters (biases, norm affines, adaptive-WS gain/shift) never decay.", 0.0)
    sched: Literal["cosine", "multistep", "step", "constant"] = _help(
        "timm scheduler (create_scheduler_v2), stepped every optimizer update.", "cosine")
    warmup_steps: int | Auto = _help(
        "Linear warmup from warmup_lr towards `lr`, in optimizer steps (auto: BiT-HyperRule). As timm does by "
        "default, the warmup overlaps the schedule's first steps, which then goes on from where it is at that "
        "step: with cosine and a warmup of half the run, the lr climbs to near `lr`, then drops to half of it.", 0)
    warmup_lr: float = _help("Learning rate at the start of warmup (at most the peak lr).", 0.0)
    decay_milestones: list[float] | Auto = _help(
        "multistep: fractions of the total steps at which lr is multiplied by decay_rate (auto: BiT-HyperRule); "
        "step: the first one is the period (lr x decay_rate every that many steps), the others are unused.",
        factory=lambda: [0.3, 0.6, 0.9])
    decay_rate: float = _help("multistep/step: factor applied at each milestone, in (0, 1].", 0.1)
    min_lr: float = _help("cosine: final learning rate (at most the peak lr).", 0.0)

    # --- model
    head_init: Literal["zero", "default"] = _help(
        "New classifier initialisation: zero (BiT) or timm's default random init.", "zero")
    freeze_backbone: bool = _help("Train only the classifier (linear probe); the backbone stays in eval mode.", False)

    # --- regularisation
    label_smoothing: float = _help(
        "Label smoothing (timm LabelSmoothingCrossEntropy; with mixup, in the soft targets).", 0.0)
    mixup_alpha: float | Auto = _help("timm Mixup alpha (0: off; auto: BiT-HyperRule, 0.1 from 20k images).", 0.0)
    cutmix_alpha: float = _help("timm CutMix alpha (0: off).", 0.0)
    mixup_prob: float = _help("Probability of applying mixup/cutmix to a batch.", 1.0)
    mixup_switch_prob: float = _help("Probability of cutmix instead of mixup when both are on.", 0.5)
    clip_grad: float | None = _help("Gradient clipping threshold (null: off).", None)
    clip_mode: Literal["norm", "value", "agc"] = _help("timm clipping mode for clip_grad.", "norm")
    ema: bool = _help("Keep an exponential moving average of the weights (timm ModelEmaV3); it is evaluated, "
                      "checkpointed as best, and exported.", False)
    ema_decay: float = _help("EMA decay per optimizer step.", 0.999)

    # --- precision, speed, reproducibility
    amp: Literal["none", "bf16", "fp16"] = _help(
        "Autocast dtype on CUDA or CPU (bf16 is fast on CPUs with AVX-512 BF16/AMX; ignored on MPS, the run "
        "notes say so).", "none")
    channels_last: bool = _help("channels_last memory format on CUDA.", True)
    standardize_once: bool = _help(
        "With accum_steps > 1, standardize WS weights once per optimizer step (wsurgery.accumulate) instead of "
        "once per micro-batch; same gradients, less work.", True)
    seed: int = _help("Seed of weights init, data order, augmentation, mixup and dropout (0 or more).", 0)
    deterministic: bool = _help("torch.use_deterministic_algorithms on CPU (bitwise-reproducible runs).", True)

    def __post_init__(self) -> None:
        _check_types(self)
        _check_values(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "recipe") -> Recipe:
        """Build a recipe from a mapping, refusing unknown keys with a suggestion."""
        if not isinstance(data, dict):
            raise RecipeError(f"{source} must be a mapping of key: value, found {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                if key in _NOT_OFFERED:
                    raise RecipeError(f"{source}: unknown key `{key}`: {_NOT_OFFERED[key]} "
                                      "(`wsurgery train --help-recipe` lists the keys)")
                close = [_ALIASES[key]] if key in _ALIASES else difflib.get_close_matches(str(key), names, n=1,
                                                                                          cutoff=0.6)
                hint = f"did you mean `{close[0]}`?" if close else "`wsurgery train --help-recipe` lists the keys"
                raise RecipeError(f"{source}: unknown key `{key}`; {hint}")
        return cls(**data)

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.accum_steps


# --- validation --------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _matches(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, tp)


def _union_args(tp: Any) -> tuple[Any, ...]:
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def _accepts_float_not_int(tp: Any) -> bool:
    args = _union_args(tp)
    return float in args and int not in args


#: names other tools use for a recipe key (timm's train.py, Keras, PyTorch Lightning), for the hint
_ALIASES = {"learning_rate": "lr", "wd": "weight_decay", "bs": "batch_size", "num_epochs": "epochs",
            "opt": "optimizer", "scheduler": "sched", "lr_scheduler": "sched", "smoothing": "label_smoothing",
            "mixup": "mixup_alpha", "cutmix": "cutmix_alpha",
            "grad_accum": "accum_steps", "gradient_accumulation_steps": "accum_steps",
            "nesterov": "optimizer", "betas": "momentum", "beta1": "momentum", "clip": "clip_grad",
            "warmup": "warmup_steps", "warmup_epochs": "warmup_steps"}
#: timm training options a recipe does not offer, and what to do instead
_NOT_OFFERED = {"layer_decay": "layer-wise lr decay is not offered", "drop_path_rate": "pass drop_path_rate to the "
                "model when it is created (timm.create_model), not to the recipe", "drop_rate": "pass drop_rate to "
                "the model when it is created", "cooldown_epochs": "cooldown is not offered",
                "eps": "the optimizer's eps is timm's default", "opt_eps": "the optimizer's eps is timm's default"}


def _number(text: str) -> float | str:
    """``text`` as a float when it is one ("1e-4"), else unchanged (the type check then names it)."""
    try:
        return float(text)
    except ValueError:
        return text


def _accepts_float(tp: Any) -> bool:
    return float in _union_args(tp)


def _check_types(recipe: Recipe) -> None:
    hints = typing.get_type_hints(Recipe)
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        tp = hints[f.name]
        # YAML 1.1 (PyYAML's safe_load) reads 1e-4 and 5E-5 as strings: a dot is needed for a
        # float, but everyone writes learning rates that way
        if isinstance(value, str) and _accepts_float(tp):
            value = _number(value)
            setattr(recipe, f.name, value)
        elif isinstance(value, (list, tuple)) and any(_accepts_float(typing.get_args(a)[0]) for a in
                                                      _union_args(tp) if typing.get_origin(a) is list):
            value = [_number(v) if isinstance(v, str) else v for v in value]
            setattr(recipe, f.name, value)
        if not _matches(value, tp):
            raise RecipeError(f"`{f.name}` must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        if isinstance(value, int) and not isinstance(value, bool) and _accepts_float_not_int(tp):
            setattr(recipe, f.name, float(value))  # YAML reads `1` as int; store floats as floats
        if isinstance(value, tuple):
            setattr(recipe, f.name, list(value))


def _positive(name: str, value: Any, allow_zero: bool = False) -> None:
    if value is None or value == "auto":
        return
    bad = (value < 0) if allow_zero else (value <= 0)
    if bad or (isinstance(value, float) and not math.isfinite(value)):
        need = "zero or more" if allow_zero else "positive"
        raise RecipeError(f"`{name}` must be {need}, got {value}")


def _fraction(name: str, value: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        raise RecipeError(f"`{name}` must be a fraction in {'(' if low_open else '['}0, 1{')' if high_open else ']'}, "
                          f"got {value}")


def _check_values(r: Recipe) -> None:
    for name in ("batch_size", "accum_steps", "epochs", "lr", "steps", "img_size", "eval_batch_size",
                 "lr_base_batch", "ema_decay", "clip_grad"):
        _positive(name, getattr(r, name))
    for name in ("weight_decay", "warmup_lr", "min_lr", "label_smoothing", "mixup_alpha", "cutmix_alpha",
                 "color_jitter", "workers", "warmup_steps", "momentum", "seed"):
        _positive(name, getattr(r, name), allow_zero=True)
    _fraction("momentum", r.momentum, high_open=True)
    _fraction("decay_rate", r.decay_rate, low_open=True)  # -1 made every other phase climb the loss
    for name in ("hflip", "re_prob", "mixup_prob", "mixup_switch_prob"):
        _fraction(name, getattr(r, name))
    _fraction("val_split", r.val_split, high_open=True)
    if r.label_smoothing >= 1:
        raise RecipeError(f"`label_smoothing` must be below 1, got {r.label_smoothing}")
    if r.ema_decay >= 1:
        raise RecipeError(f"`ema_decay` must be below 1, got {r.ema_decay}")
    if r.img_size not in (None, "auto") and r.img_size < 8:
        raise RecipeError(f"`img_size` must be at least 8 pixels, got {r.img_size}")
    if r.auto_augment:
        _check_auto_augment(r.auto_augment)
    if len(r.aug_scale) != 2 or not 0 < r.aug_scale[0] <= r.aug_scale[1] <= 1:
        raise RecipeError(f"`aug_scale` must be [min, max] with 0 < min <= max <= 1, got {r.aug_scale}")
    if r.decay_milestones != "auto" and (any(not 0 < m < 1 for m in r.decay_milestones)
                                         or list(r.decay_milestones) != sorted(r.decay_milestones)):
        raise RecipeError(f"`decay_milestones` must be increasing fractions of the run in (0, 1), "
                          f"got {r.decay_milestones}")
    check_below_peak(r, r.lr)
    mixing = (r.mixup_alpha == "auto" or r.mixup_alpha > 0 or r.cutmix_alpha > 0)
    if mixing and r.batch_size % 2:
        raise RecipeError(f"mixup/cutmix mixes pairs within a batch and needs an even `batch_size`, got {r.batch_size}")


def check_below_peak(r: Recipe, peak: float, scaled: str = "") -> None:
    """``min_lr`` and ``warmup_lr`` at most the peak lr (``scaled``: how the run's lr came from ``lr``)."""
    for name in ("min_lr", "warmup_lr"):
        if getattr(r, name) > peak:
            raise RecipeError(f"`{name}` ({getattr(r, name)}) must not exceed the peak learning rate "
                              f"({peak:.3g}{scaled}); lower it, or raise `lr`")


# --- loading -----------------------------------------------------------------------------


def builtin_recipes() -> dict[str, Path]:
    """Shipped recipes by name."""
    if not RECIPE_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(RECIPE_DIR.glob("*.yaml"))}


def _recipe_path(spec: str | os.PathLike) -> Path:
    path = Path(spec)
    if path.is_file():
        return path
    if path.is_dir():
        raise InputNotFoundError(f"recipe {spec} is a directory; pass a recipe YAML file or a shipped recipe name "
                                 f"({', '.join(builtin_recipes())})")
    builtin = builtin_recipes()
    name = path.stem if path.suffix in (".yaml", ".yml") else str(spec)
    if name in builtin and (path.parent == Path(".") or path.parent.name == "recipes"):
        return builtin[name]
    close = difflib.get_close_matches(name, list(builtin), n=1, cutoff=0.4)
    hint = f"did you mean {close[0]}?" if close else f"shipped recipes: {', '.join(builtin) or 'none found'}"
    raise InputNotFoundError(f"recipe {spec} not found; pass a YAML file or a shipped recipe name ({hint})")


def _check_auto_augment(policy: str) -> None:
    """timm parses the policy string only when it builds the transform; do that now (cheap, 32 px)."""
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception as e:  # noqa: BLE001 - timm asserts, or raises KeyError/ValueError, on a bad policy string
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise RecipeError(f"`auto_augment` {policy!r} is not a timm policy ({detail}); use e.g. rand-m9-mstd0.5, "
                          "augmix-m5-w4-d2, original or v0, or null for none") from None


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> ``(key, value)`` with the value parsed as YAML (``2``, ``0.1``, ``[0.5, 1]``, ``null``)."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"an override (--set) expects key=value, got {item!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(recipe: Recipe, overrides: list[str] | dict[str, Any] | None) -> Recipe:
    """A new recipe with ``key=value`` strings (or a dict) applied and validated."""
    if not overrides:
        return recipe
    items = list(overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides])
    data = recipe.to_dict()
    for key, value in items:
        data[key] = value
    given = {key for key, _ in items}
    if "epochs" in given and "steps" not in given and data.get("steps") is not None:
        # it would be ignored silently: a run of bit-hyperrule's 500 steps where one epoch was asked for
        raise RecipeError(f"`epochs` is ignored by recipe {recipe.name or '(unnamed)'}, which counts the run in "
                          f"steps (steps={data['steps']}); set steps instead (--set steps=N), or steps=null to "
                          "count in epochs")
    return Recipe.from_dict(data, source="--set")


def load_recipe(spec: str | os.PathLike | Recipe | None = None, overrides: list[str] | dict | None = None) -> Recipe:
    """Read a recipe file (or a shipped name), then apply overrides.

    Args:
        spec: a YAML path, a shipped recipe name (``"micro-batch"``), a :class:`Recipe`, or
            None for the defaults.
        overrides: ``["key=value", ...]`` or a dict.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        InputNotFoundError: no such file or shipped recipe.
        RecipeError: invalid YAML, unknown key (with the closest valid key), wrong type or value.
    """
    if isinstance(spec, Recipe):
        recipe = spec
    elif spec is None:
        recipe = Recipe()
    else:
        path = _recipe_path(spec)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise RecipeError(f"{path} is not valid YAML ({first})") from None
        if isinstance(data, dict):
            data.setdefault("name", path.stem)
        recipe = Recipe.from_dict(data, source=str(path))
    return apply_overrides(recipe, overrides)


# --- auto values -------------------------------------------------------------------------


def bit_hyperrule(dataset_size: int, original_size: tuple[int, int] | None) -> dict[str, Any]:
    """BiT-HyperRule, as big_transfer's ``bit_hyperrule.py`` computes it.

    Returns:
        ``steps`` and ``warmup_steps``; ``decay_milestones`` as fractions of ``steps``;
        ``resize``/``crop`` resolution; ``mixup_alpha``.
    """
    if dataset_size < 20_000:
        supports = [100, 200, 300, 400, 500]
    elif dataset_size < 500_000:
        supports = [500, 3000, 6000, 9000, 10_000]
    else:
        supports = [500, 6000, 12_000, 18_000, 20_000]
    h, w = original_size or (224, 224)
    resize, crop = (160, 128) if h * w < 96 * 96 else (512, 480)
    return {
        "steps": supports[-1],
        "warmup_steps": supports[0],
        # big_transfer's get_lr divides by 10 once `s < step`: update s still runs at the old lr, the
        # lr drops after s + 1 updates (train's multistep drops it after round(m * steps) updates)
        "decay_milestones": [(s + 1) / supports[-1] for s in supports[1:-1]],
        "resize": resize,
        "crop": crop,
        "mixup_alpha": 0.0 if dataset_size < 20_000 else 0.1,
    }


def resolve_recipe(
    recipe: Recipe, dataset_size: int, original_size: tuple[int, int] | None = None
) -> tuple[Recipe, list[str]]:
    """Replace ``auto`` values using the dataset; return the new recipe and notes on each choice."""
    rule = bit_hyperrule(dataset_size, original_size)
    notes: list[str] = []
    changes: dict[str, Any] = {}
    for key in ("steps", "warmup_steps", "decay_milestones", "mixup_alpha"):
        if getattr(recipe, key) == "auto":
            changes[key] = rule[key]
            notes.append(f"{key}={rule[key]} (BiT-HyperRule, {dataset_size} training images)")
    if recipe.img_size == "auto":
        changes["img_size"] = rule["crop"]
        notes.append(f"img_size={rule['crop']} (BiT-HyperRule: resize {rule['resize']}, random crop {rule['crop']}, "
                     f"original {original_size})")
        if list(recipe.aug_scale) == Recipe().aug_scale:  # left at the default: BiT's crop of the resized image
            changes["aug_scale"] = [round((rule["crop"] / rule["resize"]) ** 2, 4), 1.0]
            notes.append(f"aug_scale={changes['aug_scale']} (BiT-HyperRule: a {rule['crop']} px crop of the image "
                         f"resized to {rule['resize']}; set aug_scale to choose another)")
    if not changes:
        return recipe, notes
    return Recipe.from_dict({**recipe.to_dict(), **changes}, source="auto"), notes


def recipe_reference() -> list[tuple[str, str, str, str]]:
    """``(key, type, default, help)`` for every recipe key, for docs and ``--help-recipe``."""
    hints = typing.get_type_hints(Recipe)
    rows = []
    for f in dataclasses.fields(Recipe):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        rows.append((f.name, _type_name(hints[f.name]), yaml.safe_dump(default, default_flow_style=True).strip()
                     .removesuffix("...").strip(), f.metadata.get("help", "")))
    return rows
