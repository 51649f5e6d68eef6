"""Step 4 of the flow: fine-tune a (converted) model on a labelled dataset.

:func:`train` runs a :class:`~wsurgery.recipes.Recipe` with timm's building blocks:
``create_optimizer_v2``, ``create_scheduler_v2`` (stepped every optimizer update),
``LabelSmoothingCrossEntropy``/``SoftTargetCrossEntropy``, ``Mixup`` (mixup and cutmix),
``ModelEmaV3``, ``dispatch_clip_grad`` and ``accuracy``. Around them:

* gradient accumulation, with the WS standardization computed once per optimizer step
  (:func:`wsurgery.accumulate.standardize_once`);
* AMP (bf16/fp16 autocast, GradScaler for fp16) on CUDA and CPU; channels_last on CUDA only;
* seeded and deterministic on CPU; DistributedDataParallel under ``torchrun`` (NCCL on
  GPU, gloo on CPU), where only rank 0 writes;
* evaluation every epoch (top-1, top-5, loss), ``metrics.csv`` and ``metrics.png``;
* checkpoints that resume exactly (see below), a stop with the last good checkpoint kept on
  a NaN/inf loss, and a checkpoint on Ctrl-C or SIGTERM.

The output directory::

    OUT/config.json, OUT/model.safetensors   best model (by val top-1): a surgery directory,
                                             so wsurgery.load(OUT) and wsurgery export work
    OUT/last/                                last checkpoint: the model (a surgery directory) plus
        train_state.safetensors              optimizer tensors, EMA weights, torch RNG state
        train_state.json                     epoch, position in the epoch, scheduler, RNG, history
    OUT/recipe.yaml                          the recipe as resolved for this dataset
    OUT/metrics.csv, OUT/metrics.png         per-epoch loss, accuracy, learning rate
    OUT/train.json                           summary: data, classes, skipped files, status

Exact resume. A checkpoint is only taken between optimizer steps. It holds the weights,
optimizer and scheduler state, EMA, the RNG states (torch, numpy, python) and the position
(epoch, batches done). Data order comes from ``DistributedSampler(seed)`` per epoch, and
each image's augmentation from its own seed (:class:`~wsurgery.datasets.SeededView`), so a
resumed run replays the same batches with the same crops, and on CPU with a fixed seed ends
with the same weights as an uninterrupted run.

The library never prints: progress goes to ``callback(TrainEvent)``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import difflib
import math
import os
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, list_optimizers
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, accuracy, dispatch_clip_grad
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from .accumulate import standardize_once
from .calibrate import anchored_convs, needs_lower_lr
from .convert import clone_model, is_converted, modes_kept, placement, unwrap
from .datasets import (
    AugmentConfig,
    DataBundle,
    SeededView,
    build_datasets,
    data_fingerprint,
    eval_transform_for,
    train_transform,
)
from .errors import CheckpointError, InputNotFoundError, OutputExistsError, RecipeError, UsageError, WSurgeryError
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_dir,
    atomic_file,
    check_replaceable,
    load_safetensors,
    read_json,
    remove_output,
    save_safetensors,
    write_json,
)
from .recipes import Recipe, apply_overrides, check_below_peak, load_recipe, resolve_recipe
from .save import build_config

__all__ = [
    "LAST_DIR",
    "TrainEvent",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "evaluate",
    "pick_device",
    "set_num_classes",
    "train",
]

LAST_DIR = "last"
TRAIN_JSON = "train.json"
RECIPE_YAML = "recipe.yaml"
STATE_JSON = "train_state.json"
STATE_TENSORS = "train_state.safetensors"
METRICS_CSV = "metrics.csv"
METRICS_PNG = "metrics.png"
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "val_loss", "top1", "top5", "seconds", "images_per_s")


class TrainingDivergedError(WSurgeryError, FloatingPointError):
    """The loss became NaN or inf; the run stopped and kept its last good checkpoint."""


class TrainingInterrupted(WSurgeryError):
    """Ctrl-C or SIGTERM stopped the run; a checkpoint was written first (resume with ``resume=``).

    ``exit_code`` is 128 + the signal, as shells report it: 130 for Ctrl-C, 143 for SIGTERM.
    """

    exit_code = 130

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        if signum is not None:
            self.exit_code = 128 + signum


@dataclass
class TrainEvent:
    """What :func:`train` reports to its callback.

    ``kind`` is ``start`` (``total_steps``, ``notes``), ``step`` (after each optimizer step:
    ``loss``, ``lr``, ``images_per_s``), ``epoch`` (after evaluation: ``metrics``), or ``end``.
    """

    kind: str
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    total_steps: int = 0
    loss: float = float("nan")
    lr: float = 0.0
    images_per_s: float = 0.0
    metrics: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class TrainResult:
    """What :func:`train` did."""

    output: Path | None
    model: nn.Module
    history: list[dict[str, float]]
    best: dict[str, float] | None
    class_names: list[str]
    recipe: Recipe
    steps: int
    skipped_files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    export: Any = None
    verify: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: everything but the model (``wsurgery train --json`` prints it)."""
        return {
            "output": str(self.output) if self.output is not None else None,
            "steps": self.steps,
            "epochs": len(self.history),
            "best": self.best,
            "class_names": list(self.class_names),
            "recipe": self.recipe.to_dict(),
            "history": self.history,
            "skipped_files": [str(f) for f in self.skipped_files],
            "notes": list(self.notes),
            "export": self.export.to_dict() if self.export is not None else None,
            "verify": self.verify.to_dict() if self.verify is not None else None,
            "seconds": round(self.seconds, 2),
        }


# --- small pieces ------------------------------------------------------------------------


#: the largest lr per optimizer update at which a model calibrated with gn-init's preconditioning
#: was measured to fine-tune (the demo: 0.003 per 32 images, 16 per update); above it train notes the risk
PRECONDITIONED_MAX_LR = 0.0015
#: the largest lr per image of an update at which a model calibrated with gn-init's anchoring was measured to
#: fine-tune well (SGD; benchmarks/finetune.py: diverged at 0.03 per update of 32 images and 0.003 of 2, fell behind
#: at 0.001 of 2, trained at 0.01 of 32 and 0.0003 of 2; the demo trained at 0.005 of 16); above it train notes it
ANCHORED_MAX_LR_PER_IMAGE = 0.0004

#: environment variable naming the default device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) where
#: none is passed; unset or ``auto``: the best available
DEVICE_ENV = "WSURGERY_DEVICE"


def pick_device(spec: str | torch.device | None = None) -> torch.device:
    """``spec``, else ``$WSURGERY_DEVICE``, else the best available: CUDA, then MPS, then CPU.

    Under torchrun, CUDA is ``cuda:LOCAL_RANK``.
    """
    asked, fix = f"--device {spec}", "--device cpu"  # how the errors name where the device came from
    if spec is None or str(spec) == "auto":
        env = os.environ.get(DEVICE_ENV, "").strip()
        if env and env != "auto":
            spec, asked, fix = env, f"{DEVICE_ENV}={env}", f"{DEVICE_ENV}=cpu"
    if spec is not None and str(spec) != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise UsageError(f"{asked} is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"{asked} was asked for but CUDA is not available; use {fix}")
        mps = getattr(torch.backends, "mps", None)
        if device.type == "mps" and not (mps is not None and mps.is_available()):
            raise UsageError(f"{asked} was asked for but MPS (Apple GPU) is not available; use {fix}")
        if device.type == "cuda" and device.index is None and _dist_env()[0] > 1:
            device = torch.device("cuda", _dist_env()[2])
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", _dist_env()[2] if _dist_env()[0] > 1 else 0)
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _dist_env() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` from torchrun's environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world, int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))


def set_num_classes(model: nn.Module, class_names: list[str], head_init: str = "zero") -> bool:
    """Give ``model`` a classifier for ``class_names`` (unless it already has exactly these labels).

    The label names go into ``pretrained_cfg['label_names']``, so save/export write them to
    ``config.json`` and predict prints names. Returns True if a new head was made.
    """
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    fresh = cfg.get("label_names") != list(class_names) or getattr(model, "num_classes", None) != len(class_names)
    if fresh:
        model.reset_classifier(len(class_names))
        head = model.get_classifier()
        if head_init == "zero":
            for p in head.parameters():
                nn.init.zeros_(p)
    cfg.update(label_names=list(class_names), num_classes=len(class_names))
    model.pretrained_cfg = cfg
    model.default_cfg = cfg
    return fresh


def _set_input_size(model: nn.Module, img_size: int | None) -> None:
    if img_size:
        cfg = dict(model.pretrained_cfg)
        cfg["input_size"] = (3, int(img_size), int(img_size))
        cfg.pop("test_input_size", None)
        model.pretrained_cfg = cfg
        model.default_cfg = cfg


class _EpochSampler(Sampler[tuple[int, int]]):
    """timm/torch's ``DistributedSampler`` order for an epoch, optionally starting part-way through.

    Yields ``(epoch, index)``: :class:`~wsurgery.datasets.SeededView` seeds each sample by both, and
    persistent DataLoader workers, started in an earlier epoch, learn the epoch from the index.
    """

    def __init__(self, n: int, world: int, rank: int, seed: int, shuffle: bool, drop_last: bool):
        self.inner = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=shuffle, seed=seed,
                                        drop_last=drop_last)
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.inner.set_epoch(epoch)
        self.epoch = epoch
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, i) for i in list(self.inner)[self.start:]])

    def __len__(self) -> int:
        return len(self.inner) - self.start


def _capture_rng(cuda: bool) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if cuda:
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rng_to_files(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """RNG states as (tensors for safetensors, plain values for JSON): nothing is pickled."""
    tensors = {"rng.torch": state["torch"].clone()}
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    for i, s in enumerate(state.get("cuda", [])):
        tensors[f"rng.cuda.{i}"] = s.clone()
    version, internal, gauss_next = state["python"]
    plain = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next], "cuda": len(state.get("cuda", []))}
    return tensors, plain


def _rng_from_files(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    kind, pos, has_gauss, gauss = plain["numpy"]
    version, internal, gauss_next = plain["python"]
    state = {
        "torch": tensors["rng.torch"],
        "numpy": (kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss),
        "python": (version, tuple(internal), gauss_next),
    }
    if plain.get("cuda"):
        state["cuda"] = [tensors[f"rng.cuda.{i}"] for i in range(plain["cuda"])]
    return state


def _split_state(prefix: str, obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested structure by a reference into ``tensors`` (for safetensors)."""
    if isinstance(obj, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = obj.detach().cpu()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {str(k): _split_state(f"{prefix}.{k}", v, tensors) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(obj)]
    return obj


def _join_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def _optimizer_state_to_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    sd = opt.state_dict()
    return {"state": _split_state("optimizer.state", sd["state"], tensors),
            "param_groups": _split_state("optimizer.groups", sd["param_groups"], tensors)}


def _optimizer_state_from_files(plain: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    state = {int(k): v for k, v in _join_state(plain["state"], tensors).items()}
    return {"state": state, "param_groups": _join_state(plain["param_groups"], tensors)}


def _worker_ignores_stops(worker_id: int) -> None:  # noqa: ARG001 - DataLoader's worker_init_fn signature
    """DataLoader workers ignore Ctrl-C and SIGTERM, which a terminal (or systemd, ``kill -- -PGID``) sends
    to the whole process group: the main process stops the run at the end of the update
    (:func:`_signals_to_flag`) and needs its workers for the micro-batches left to fetch. Forked workers
    inherited that handler; spawned ones (macOS, Windows) died and the run failed with "worker exited
    unexpectedly". The main process still ends them when the run is over (or when it exits)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def _stops_held(workers: int) -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM while DataLoader workers start, delivering them afterwards.

    A spawned worker (macOS, Windows) imports torch, timm and wsurgery for seconds before its
    ``worker_init_fn`` (:func:`_worker_ignores_stops`) runs; a signal to the process group in that
    window killed it, and the run failed with "worker exited unexpectedly". Blocked here, the signal
    waits: the workers inherit the mask and drop it once they ignore the signals; this process gets it
    when the mask is restored (its handler then stops the run at the end of the update). CPython's
    resource_tracker starts its process the same way. Where there is no signal mask (Windows), a no-op.
    """
    if not workers or not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _signals_to_flag(flag: dict[str, bool]) -> Iterator[None]:
    """First Ctrl-C/SIGTERM sets ``flag['stop']`` and ``flag['signal']`` (the loop checkpoints at the next
    step); a second one raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = True
        flag["signal"] = signum

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def _deterministic(enabled: bool) -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    before_fill = torch.utils.deterministic.fill_uninitialized_memory
    if enabled:
        torch.use_deterministic_algorithms(True, warn_only=True)
        # deterministic mode also fills every new tensor with NaN (a debugging aid): 13-15% of a lite0 step on
        # CPU, measured; the weights are bitwise the same without it (every tensor is written before it is read)
        torch.utils.deterministic.fill_uninitialized_memory = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)
        torch.utils.deterministic.fill_uninitialized_memory = before_fill


def _standardize_once_ctx(model: nn.Module, wanted: bool) -> contextlib.AbstractContextManager:
    """``wsurgery.accumulate.standardize_once(model)`` when useful, else a no-op."""
    if not wanted or not is_converted(model):
        return contextlib.nullcontext()
    return standardize_once(model)


def lr_scheduler(optimizer: torch.optim.Optimizer, r: Recipe, total: int, warmup: int) -> Any:
    """timm's scheduler for recipe ``r``, in optimizer updates: one timm "epoch" is one update.

    ``scheduler.step_update(t)`` after ``t`` completed updates sets the lr of the next one.
    """
    milestones = [max(1, round(m * total)) for m in r.decay_milestones]  # type: ignore[union-attr]
    # timm's MultiStepLRScheduler counts decays at t + 1 (bisect_right(milestones, t + 1)), so milestone m
    # would already lower the lr of update m - 1; shifted by one, the lr drops after m updates, as with
    # sched=step
    decay_at = [m + 1 for m in milestones] if r.sched == "multistep" else milestones
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=r.sched, num_epochs=total, warmup_epochs=warmup, warmup_lr=r.warmup_lr,
        min_lr=r.min_lr, decay_milestones=decay_at, decay_epochs=milestones[0] if milestones else total,
        decay_rate=r.decay_rate, step_on_epochs=False, updates_per_epoch=1,
    )
    return scheduler


def _world_notes(recipe: Recipe, resolved: Recipe, world: int) -> list[str]:
    """What changes under ``world`` processes that a recipe written for one does not say."""
    if world <= 1 or recipe.steps != "auto":
        return []
    # BiT-HyperRule's step counts are for its batch (512: 64 x 8 accumulation in bit-hyperrule); batch_size and
    # accum_steps are per process, so every process multiplies the images each step sees
    per_step = resolved.effective_batch * world
    fit = resolved.accum_steps // world if resolved.accum_steps % world == 0 else None
    fix = (f"--set accum_steps={fit} keeps {resolved.effective_batch}" if fit else
           f"set batch_size x accum_steps x {world} processes to the {resolved.effective_batch} the rule counts in")
    return [f"steps=auto counts BiT-HyperRule's steps of {resolved.effective_batch} images, but under {world} "
            f"processes each step takes {per_step} ({world} x {resolved.effective_batch}): {fix}"]


# --- evaluation --------------------------------------------------------------------------


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: torch.utils.data.Dataset,
    *,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    workers: int = 0,
    autocast: contextlib.AbstractContextManager | None = None,
) -> dict[str, float]:
    """Top-1, top-5 (percent) and mean cross-entropy of ``model`` on a labelled ``dataset``."""
    return _evaluate_loader(model, _eval_loader(dataset, batch_size, workers), device=device, autocast=autocast)


def _eval_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int,
                 persistent: bool = False) -> DataLoader:
    # persistent: a training run evaluates every epoch; starting workers again each time costs seconds where
    # they are spawned (macOS, Windows), as timm's loaders keep theirs
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, generator=torch.Generator(),
                      worker_init_fn=_worker_ignores_stops if workers else None,
                      persistent_workers=persistent and workers > 0)


@torch.no_grad()
def _evaluate_loader(model: nn.Module, loader: DataLoader, *, device: torch.device | str = "cpu",
                     autocast: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    loss_sum, top1, top5, n = 0.0, 0, 0, 0
    k = min(5, getattr(model, "num_classes", 5) or 5)
    with modes_kept(model):  # every submodule back in its own mode afterwards
        model.eval()
        with _stops_held(loader.num_workers):
            batches = iter(loader)  # starts the workers
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                out = model(x)
            out = out.float()
            loss_sum += nn.functional.cross_entropy(out, y, reduction="sum").item()
            a1, a5 = accuracy(out, y, topk=(1, k))
            # timm gives float32 percentages of whole counts: round back to the count, so 16 of 25 is 64.0
            # (not 63.99999969 in train.json and --json)
            top1 += round(a1.item() * len(y) / 100)
            top5 += round(a5.item() * len(y) / 100)
            n += len(y)
    if n == 0:
        return {"val_loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "n": 0}
    return {"val_loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n, "n": n}


# --- the run -----------------------------------------------------------------------------


@dataclass
class _State:
    epoch: int = 0
    batch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    #: running sums of the current epoch (so a run resumed mid-epoch reports the whole epoch)
    epoch_loss_sum: float = 0.0
    epoch_loss_n: int = 0
    epoch_images: int = 0
    epoch_seconds: float = 0.0
    #: wall time of the run's earlier processes (before the last resume), for train.json's total
    seconds_before: float = 0.0
    #: image reads that failed to decode in the run's earlier processes (in a distributed run, rank
    #: 0's: the other ranks' counts would need a collective in the interrupt path)
    decode_failures_before: int = 0


class _Run:
    """One training run: everything :func:`train` sets up, and the loop."""

    def __init__(self, model: nn.Module, bundle: DataBundle, recipe: Recipe, output: Path | None,
                 device: torch.device, callback: Callable[[TrainEvent], None] | None, notes: list[str],
                 data_record: dict[str, Any], t_start: float):
        self.recipe, self.bundle, self.output, self.device = recipe, bundle, output, device
        self.callback = callback or (lambda e: None)
        self.best_state: dict[str, torch.Tensor] | None = None  # the best weights, where this process writes none
        self.notes = notes
        self.data_record = data_record
        self.t_start = t_start  # when this process started the run
        self.world, self.rank, _ = _dist_env()
        self.distributed = self.world > 1 and dist.is_available() and dist.is_initialized()
        if not self.distributed:
            self.world, self.rank = 1, 0
        self.is_main = self.rank == 0
        self.cuda = device.type == "cuda"
        self.model = model
        self.state = _State()
        self.stop = {"stop": False}
        self.in_update = False
        self.rng_at_boundary: dict[str, Any] | None = None

    # setup --------------------------------------------------------------------------------

    def setup(self) -> None:
        r = self.recipe
        model = self.model.to(self.device)
        if r.channels_last and self.cuda:
            model = model.to(memory_format=torch.channels_last)
        if r.freeze_backbone:
            for p in model.parameters():
                p.requires_grad_(False)
            for p in model.get_classifier().parameters():
                p.requires_grad_(True)
        self.model = model
        self.ddp = None
        if self.distributed:
            ids = [self.device.index] if self.cuda else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.train_model = self.ddp or model
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp)
        if self.amp_dtype is not None and self.device.type not in ("cuda", "cpu"):
            self.notes.append(f"amp={r.amp} runs on CUDA and CPU; training in fp32 on {self.device.type}")
            self.amp_dtype = None
        # fp16 needs loss scaling (its range is narrow); bf16 has fp32's range and does not
        self.scaler = torch.amp.GradScaler(self.device.type) if self.amp_dtype == torch.float16 else None
        self._setup_data()
        self._setup_optim()
        self.ema = None
        if r.ema:
            self.ema = ModelEmaV3(model, decay=r.ema_decay)
            # timm deep-copies the model; a parametrized model needs clone_model (see wsurgery.convert)
            self.ema.module = clone_model(model).eval().requires_grad_(False)
        mixing = r.mixup_alpha > 0 or r.cutmix_alpha > 0
        self.mixup = Mixup(mixup_alpha=r.mixup_alpha, cutmix_alpha=r.cutmix_alpha, prob=r.mixup_prob,
                           switch_prob=r.mixup_switch_prob, label_smoothing=r.label_smoothing,
                           num_classes=self.bundle.num_classes) if mixing else None
        if self.mixup is not None:
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif r.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(smoothing=r.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    def _setup_data(self) -> None:
        r = self.recipe
        img_size = r.img_size if isinstance(r.img_size, int) else None
        augment = AugmentConfig(scale=tuple(r.aug_scale), hflip=r.hflip, color_jitter=r.color_jitter,
                                auto_augment=r.auto_augment, re_prob=r.re_prob, train_crop_mode=r.train_crop_mode)
        self.bundle.train.transform = train_transform(self.model, img_size, augment)
        if self.bundle.val is not None:
            self.bundle.val.transform = eval_transform_for(self.model, img_size)
        self.view = SeededView(self.bundle.train, r.seed)
        mixing = r.mixup_alpha > 0 or r.cutmix_alpha > 0
        n = len(self.bundle.train)
        drop_last = mixing and n // self.world >= r.batch_size
        self.sampler = _EpochSampler(n, self.world, self.rank, r.seed, shuffle=True, drop_last=drop_last)
        # persistent workers (as timm's loaders): starting them again every epoch costs seconds where they are
        # spawned (macOS, Windows); the sampler hands them the epoch with each index (SeededView), so workers
        # started in an earlier epoch augment as the epoch asks
        self.loader = DataLoader(self.view, batch_size=r.batch_size, sampler=self.sampler, drop_last=drop_last,
                                 num_workers=r.workers, generator=torch.Generator(), pin_memory=self.cuda,
                                 worker_init_fn=_worker_ignores_stops if r.workers else None,
                                 persistent_workers=r.workers > 0)
        self.val_loader = (_eval_loader(self.bundle.val, r.eval_batch_size or max(r.batch_size, 32), r.workers,
                                        persistent=True) if self.bundle.val is not None else None)
        per_rank = self.per_rank = len(self.sampler.inner)
        self.batches_per_epoch = per_rank // r.batch_size if drop_last else math.ceil(per_rank / r.batch_size)
        if self.batches_per_epoch == 0:
            raise RecipeError(f"batch_size {r.batch_size} is larger than the {per_rank} training images per process")
        if mixing and per_rank < 2:
            raise RecipeError(f"mixup/cutmix mixes pairs of images and there is {per_rank} training image per process; "
                              "set mixup_alpha=0 and cutmix_alpha=0, or add images")
        self.updates_per_epoch = math.ceil(self.batches_per_epoch / r.accum_steps)
        if r.steps is not None:
            self.total_steps = int(r.steps)
            self.epochs = math.ceil(self.total_steps / self.updates_per_epoch)
        else:
            self.epochs = r.epochs
            self.total_steps = self.epochs * self.updates_per_epoch

    def _setup_optim(self) -> None:
        r = self.recipe
        lr = r.lr
        if r.lr_base_batch:
            lr = r.lr * r.effective_batch * self.world / r.lr_base_batch
            self.notes.append(f"lr {r.lr:g} x {r.effective_batch * self.world}/{r.lr_base_batch} images per step "
                              f"= {lr:.3g}")
        self.lr = lr
        check_below_peak(r, lr, f" = lr {r.lr:g} x {r.effective_batch * self.world}/{r.lr_base_batch} images per step"
                         if r.lr_base_batch else "")
        if needs_lower_lr(self.model) and lr > PRECONDITIONED_MAX_LR:
            # measured (benchmarks/demo_variants.py --preset lr): the demo diverged at 0.005 per update
            # (the micro-batch recipe's 0.01 per 32 images, 16 per update) and trained at 0.0015 and below
            self.notes.append(f"this model was calibrated with preconditioning, which fine-tunes at a lower lr: "
                              f"{lr:.3g} per update may diverge (measured: diverged at 0.005, trained at "
                              f"{PRECONDITIONED_MAX_LR:g} and below)")
        images = r.effective_batch * self.world
        anchored = bool(anchored_convs(self.model))
        if anchored and not r.freeze_backbone and lr / images > ANCHORED_MAX_LR_PER_IMAGE:
            self.notes.append(f"this model was calibrated with anchoring, which fine-tunes at about a third of the lr "
                              f"that suits one calibrated without it: {lr:.3g} per update of {images} images may "
                              f"diverge (measured: diverged at 0.03 per 32 images and 0.003 per 2, trained at 0.01 "
                              f"per 32 and 0.0003 per 2)")
        if anchored and self.amp_dtype == torch.bfloat16:
            # measured (EfficientNet-Lite0, benchmarks/calibration.py --part precision; KL to the original on ImageNet
            # photos): 0.076 in fp32, 0.071 under fp16 autocast, 0.218 under bf16 autocast
            self.notes.append("this model was calibrated with anchoring: its GroupNorm inputs carry offsets of 30 "
                              "channel deviations, beside which bf16 rounds the signal to 1/8-1/4 of a deviation; "
                              "amp=fp16 or none keep it")
        # timm passes `momentum` to the optimizers that take one (SGD, RMSprop, LARS ...) and drops it elsewhere
        kwargs: dict[str, Any] = {"momentum": r.momentum}
        # timm wraps any optimizer in Lookahead when its name is prefixed `lookahead_`
        base = r.optimizer.lower().removeprefix("lookahead_")
        if base in _ADAM_FAMILY:  # `momentum` is Adam's beta1 (0.9 by default in both)
            kwargs["betas"] = (r.momentum, 0.999)
        known = list_optimizers()
        if base not in known:
            close = difflib.get_close_matches(base, known, n=1)
            hint = f"did you mean {close[0]}?" if close else "timm.optim.list_optimizers() lists them"
            raise RecipeError(f"`optimizer` {r.optimizer!r} is not a timm optimizer; {hint}")
        try:
            # 1-D parameters (biases, norm affines, AWS gain/shift) are kept out of weight decay by timm's
            # param_groups_weight_decay (filter_bias_and_bn=True)
            self.optimizer = create_optimizer_v2(self.model, opt=r.optimizer, lr=lr, weight_decay=r.weight_decay,
                                                 **kwargs)
        except (AssertionError, ValueError, KeyError) as e:
            raise RecipeError(f"`optimizer` {r.optimizer!r} does not accept these settings ({e})") from None
        total = self.total_steps
        warmup = int(r.warmup_steps)  # resolved from "auto" before we get here
        if warmup >= total:
            warmup = max(0, total // 10)
            self.notes.append(f"warmup_steps shortened to {warmup} (the run has only {total} steps)")
        self.scheduler = lr_scheduler(self.optimizer, r, total, warmup)
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # the lr of the latest update (after it, the next's)
        # timm's train.py leaves the classifier out of adaptive gradient clipping: AGC clips a gradient to a
        # fraction of its weight's norm, so a zero-initialised head (head_init=zero) could never move
        head = getattr(unwrap(self.model), "get_classifier", None)
        self.unclipped = ({id(p) for p in head().parameters()} if r.clip_mode == "agc" and callable(head)
                          and isinstance(head(), nn.Module) else set())

    # checkpoints ----------------------------------------------------------------------------

    def _eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    def _model_files(self, model: nn.Module, directory: Path, training: dict[str, Any]) -> None:
        config = build_config(model, "converted", training=training)
        save_safetensors(model.state_dict(), directory / WEIGHTS_NAME)
        write_json(directory / CONFIG_NAME, config)

    def _training_record(self, kind: str) -> dict[str, Any]:
        last = self.state.history[-1] if self.state.history else {}
        return {"recipe": self.recipe.name, "checkpoint": kind, "epoch": len(self.state.history),
                "step": self.state.step, "top1": last.get("top1"), "top5": last.get("top5"),
                "data": self.data_record.get("data")}

    def save_checkpoint(self) -> None:
        """Write OUT/last atomically (model + optimizer, scheduler, EMA, RNG, position)."""
        if not self.is_main or self.output is None:
            return
        tensors: dict[str, torch.Tensor] = {}
        plain: dict[str, Any] = {
            "state": asdict(self.state),
            "optimizer": _optimizer_state_to_files(self.optimizer, tensors),
            "scheduler": _split_state("scheduler", self.scheduler.state_dict(), tensors),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "data": self.data_record,
            "recipe": self.recipe.to_dict(),
            "ema": self.ema is not None,
        }
        plain["state"]["seconds_before"] = self.state.seconds_before + time.perf_counter() - self.t_start
        plain["state"]["decode_failures_before"] = self.state.decode_failures_before + self.bundle.load_failures
        rng_tensors, plain["rng"] = _rng_to_files(self.rng_at_boundary or _capture_rng(self.cuda))
        tensors.update(rng_tensors)
        if self.ema is not None:
            tensors.update({f"ema.{k}": v for k, v in self.ema.module.state_dict().items()})
        with atomic_dir(self.output / LAST_DIR, force=True) as tmp:
            self._model_files(self.model, tmp, self._training_record("last"))
            save_safetensors(tensors, tmp / STATE_TENSORS)
            write_json(tmp / STATE_JSON, plain)

    def load_checkpoint(self, directory: Path) -> None:
        plain = read_json(directory / STATE_JSON)
        tensors = load_safetensors(directory / STATE_TENSORS)
        try:
            self.state = _State(**plain["state"])
            self.optimizer.load_state_dict(_optimizer_state_from_files(plain["optimizer"], tensors))
            self.scheduler.load_state_dict(_join_state(plain["scheduler"], tensors))
            self.scheduler.step_update(self.state.step)
            if self.scaler is not None and plain.get("scaler"):
                self.scaler.load_state_dict(plain["scaler"])
            if self.ema is not None:
                ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
                if not ema_state:  # resuming with fresh EMA weights would not continue the run
                    raise KeyError("ema.*")
                self.ema.module.load_state_dict(ema_state, strict=True)
            self.rng_at_boundary = _rng_from_files(tensors, plain["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise _damaged_checkpoint(directory, e) from None
        _restore_rng(self.rng_at_boundary)

    def save_best(self) -> None:
        # training in memory, or a DDP rank that does not write (its file system may not see rank 0's):
        # keep the best weights to hand back at the end
        if self.output is None or not self.is_main:
            if self.bundle.val is not None:  # without validation the best epoch is the last: nothing to keep
                self.best_state = None  # the old copy goes before the new one is made
                self.best_state = {k: v.detach().to("cpu", copy=True)
                                   for k, v in self._eval_model().state_dict().items()}
            return
        model = self._eval_model()
        config = build_config(model, "converted", training=self._training_record("best"))
        with atomic_file(self.output / WEIGHTS_NAME, force=True) as tmp:
            save_safetensors(model.state_dict(), tmp)
        with atomic_file(self.output / CONFIG_NAME, force=True) as tmp:
            write_json(tmp, config)

    def write_metrics(self) -> None:
        if not self.is_main or self.output is None:
            return
        with atomic_file(self.output / METRICS_CSV, force=True) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(METRIC_FIELDS), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.state.history)
        try:
            _plot_metrics(self.state.history, self.output / METRICS_PNG)
        except ImportError:
            if "matplotlib missing" not in self.notes:
                self.notes.append("matplotlib missing: no metrics.png (pip install wsurgery[plot])")

    # the loop -------------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _set_train_mode(self) -> None:
        self.model.train()
        if self.recipe.freeze_backbone:  # linear probe: frozen BN statistics and no dropout in the backbone
            self.model.eval()
            self.model.get_classifier().train()

    def _forward_backward(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sizes: list[int]
                          ) -> tuple[float, int]:
        """One update's micro-batches (``sizes[i]`` images each), forward and backward, in the order they come."""
        n_micro = len(sizes)
        losses: list[torch.Tensor] = []
        images = 0
        use_once = self.recipe.standardize_once and n_micro > 1
        # standardize_once pushes the gradients to the weights after the last backward, outside DDP's
        # hooks, so under DDP the micro-batches all run without sync and the gradients are averaged here
        manual_reduce = use_once and self.ddp is not None
        # each micro-batch's mean loss weighs by its share of the step's images, so that a step is the
        # mean over all of them, as one big batch would be, also where an epoch's short last batch
        # joins full ones (loss / n_micro would give its few images the weight of a full batch)
        odd = self.mixup is not None  # timm's Mixup mixes pairs: an odd batch loses its last image
        total = sum(size - (size % 2 if odd else 0) for size in sizes)
        with _standardize_once_ctx(self.model, use_once):
            for i, (x, y) in enumerate(batches):
                if len(y) != sizes[i]:  # the loss weights above assumed it
                    raise RuntimeError(f"micro-batch {i} of the update holds {len(y)} images, {sizes[i]} expected")
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                if self.recipe.channels_last and self.cuda:
                    x = x.contiguous(memory_format=torch.channels_last)
                if self.mixup is not None:
                    if len(x) % 2:  # timm's Mixup mixes pairs: the one odd batch of a set smaller than batch_size
                        x, y = x[:-1], y[:-1]
                    if not len(y):
                        continue
                    x, y = self.mixup(x, y)
                sync = self.ddp is None or (i == n_micro - 1 and not manual_reduce)
                with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                    with self._autocast():
                        out = self.train_model(x)
                        loss = self.criterion(out.float(), y)
                    scaled = loss * (len(x) / total)
                    if self.scaler is not None:
                        self.scaler.scale(scaled).backward()
                    else:
                        scaled.backward()
                losses.append(loss.detach() * (len(x) / total))
                images += len(x)
        if manual_reduce:
            for p in self.model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= self.world
        mean_loss = torch.stack(losses).sum()
        if self.distributed:
            dist.all_reduce(mean_loss)
            mean_loss /= self.world
        return float(mean_loss.item()), images

    def _optimizer_step(self) -> None:
        r = self.recipe
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if r.clip_grad is not None:
            params = [p for p in self.model.parameters() if p.grad is not None and id(p) not in self.unclipped]
            dispatch_clip_grad(params, r.clip_grad, mode=r.clip_mode)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.last_lr = self.optimizer.param_groups[0]["lr"]  # before the scheduler sets the next update's
        self.scheduler.step_update(self.state.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.state.step)

    def _diverged(self, loss: float, epoch: int) -> TrainingDivergedError:
        where = f"{self.output / LAST_DIR}" if self.output is not None else "memory"
        kept = (f"kept the last good checkpoint (epoch {self.state.epoch}) in {where}" if self.state.epoch
                else "no checkpoint was written yet")
        self.optimizer.zero_grad(set_to_none=True)
        return TrainingDivergedError(
            f"loss became {loss} at step {self.state.step + 1} (epoch {epoch + 1}); training stopped and {kept}; "
            "lower `lr`, set `clip_grad`, or check the data"
        )

    def _interrupted(self) -> TrainingInterrupted:
        self.save_checkpoint()
        where = self.output / LAST_DIR if self.output is not None else None
        msg = f"interrupted at step {self.state.step}"
        if where is not None:
            msg += f"; checkpoint written to {where}; continue with --resume {self.output}"
        return TrainingInterrupted(msg, self.stop.get("signal"))

    def run(self) -> None:
        self.callback(TrainEvent("start", epoch=self.state.epoch, epochs=self.epochs, step=self.state.step,
                                 total_steps=self.total_steps, notes=list(self.notes)))
        if self.rng_at_boundary is None:
            self.rng_at_boundary = _capture_rng(self.cuda)
        try:
            with _signals_to_flag(self.stop):
                for epoch in range(self.state.epoch, self.epochs):
                    self._run_epoch(epoch)
                    # a stop during the last epoch's evaluation or checkpoint: the run is complete (raising
                    # would leave it without train.json, and resuming it would find nothing to do)
                    if self.stop["stop"] and epoch + 1 < self.epochs:
                        raise KeyboardInterrupt
        except KeyboardInterrupt:
            if self.in_update:  # a second Ctrl-C in the middle of an update: weights are half-updated
                raise TrainingInterrupted("interrupted during an optimizer update; the last checkpoint was kept",
                                          self.stop.get("signal")) from None
            raise self._interrupted() from None
        self.callback(TrainEvent("end", epoch=self.epochs, epochs=self.epochs, step=self.state.step,
                                 total_steps=self.total_steps, metrics=self.state.history[-1] if self.state.history
                                 else None))

    def _run_epoch(self, epoch: int) -> None:
        r = self.recipe
        t_epoch = time.perf_counter()
        self.view.set_epoch(epoch)
        start_batch = self.state.batch
        self.sampler.set_epoch(epoch, start=start_batch * r.batch_size)
        self._set_train_mode()
        with _stops_held(r.workers):
            it = iter(self.loader)  # starts the workers
        pos = start_batch
        st = self.state
        while pos < self.batches_per_epoch and self.state.step < self.total_steps:
            t0 = time.perf_counter()
            n = min(r.accum_steps, self.batches_per_epoch - pos)
            # streamed: each micro-batch is fetched as the one before it has run, so an update never holds all of
            # its inputs at once (BiT's 64 x 8 at 480 px: 1.4 GB); their sizes are known from the position alone
            # (full batches, but for an epoch's short last one; a file that fails to decode is replaced)
            sizes = [min(r.batch_size, self.per_rank - p * r.batch_size) for p in range(pos, pos + n)]
            loss, images = self._forward_backward((next(it) for _ in range(n)), sizes)
            if not math.isfinite(loss):
                raise self._diverged(loss, epoch)
            # until the step is on the books (position, RNG, loss sums), a second Ctrl-C must not write a
            # checkpoint: one would hold the new weights and step with the old position
            self.in_update = True
            self._optimizer_step()
            pos += n
            self.state.batch = pos
            self.rng_at_boundary = _capture_rng(self.cuda)
            dt = time.perf_counter() - t0
            st.epoch_loss_sum += loss * images  # per image: an epoch's short last step is not a full one
            st.epoch_loss_n += images
            st.epoch_images += images * self.world
            st.epoch_seconds += dt
            self.in_update = False
            self.callback(TrainEvent("step", epoch=epoch, epochs=self.epochs, step=self.state.step,
                                     total_steps=self.total_steps, loss=loss,
                                     lr=self.last_lr,
                                     images_per_s=images * self.world / dt if dt > 0 else 0.0))
            if self.stop["stop"]:
                raise KeyboardInterrupt
        del it
        seconds = time.perf_counter() - t_epoch
        metrics = {"epoch": epoch + 1, "step": st.step, "lr": self.last_lr,
                   "train_loss": st.epoch_loss_sum / st.epoch_loss_n if st.epoch_loss_n else float("nan"),
                   "seconds": round(seconds, 3),
                   "images_per_s": st.epoch_images / st.epoch_seconds if st.epoch_seconds > 0 else 0.0}
        st.epoch_loss_sum, st.epoch_loss_n, st.epoch_images, st.epoch_seconds = 0.0, 0, 0, 0.0
        if self.bundle.val is not None and self.is_main:
            metrics.update({k: v for k, v in _evaluate_loader(
                self._eval_model(), self.val_loader, device=self.device, autocast=self._autocast()).items()
                if k != "n"})
        if self.distributed and self.bundle.val is not None:
            # rank 0 evaluated; every rank takes its numbers, so all of them keep the same best epoch
            # (the weights are the same on every rank) and return the same model and history
            shared = [metrics]
            dist.broadcast_object_list(shared, src=0, device=self.device if self.device.type == "cuda" else None)
            metrics = shared[0]
        self.state.history.append(metrics)
        self.state.epoch = epoch + 1
        self.state.batch = 0
        top1 = metrics.get("top1", -1.0)
        if self.bundle.val is None or top1 > self.state.best_top1:
            self.state.best_top1, self.state.best_epoch = top1, epoch + 1
            self.save_best()
        self.save_checkpoint()
        self.write_metrics()
        if self.distributed:
            dist.barrier()
        self.callback(TrainEvent("epoch", epoch=epoch + 1, epochs=self.epochs, step=self.state.step,
                                 total_steps=self.total_steps, metrics=metrics))


def _plot_metrics(history: list[dict[str, float]], path: Path) -> None:
    """loss, accuracy and learning rate per epoch as one PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    axes[0].plot(epochs, [h.get("train_loss", float("nan")) for h in history], "o-", label="train")
    axes[0].plot(epochs, [h.get("val_loss", float("nan")) for h in history], "o-", label="val")
    axes[0].set_title("loss")
    axes[0].legend()
    axes[1].plot(epochs, [h.get("top1", float("nan")) for h in history], "o-", label="top-1")
    axes[1].plot(epochs, [h.get("top5", float("nan")) for h in history], "o-", label="top-5")
    axes[1].set_title("val accuracy (%)")
    axes[1].legend()
    axes[2].plot(epochs, [h["lr"] for h in history], "o-")
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_file(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


#: recipe keys a resumed run may change: they do not change what it computes (each sample's augmentation
#: is seeded by the sample, not by the worker), so a run started with workers can finish without
RESUME_SETTABLE = ("workers",)


def _resume_overrides(recipe: Recipe, overrides: list[str] | dict[str, Any]) -> tuple[Recipe, list[str]]:
    changed = apply_overrides(recipe, overrides)
    keys = [f.name for f in dataclasses.fields(Recipe) if getattr(changed, f.name) != getattr(recipe, f.name)]
    refused = [k for k in keys if k not in RESUME_SETTABLE]
    if refused:
        raise UsageError(f"`overrides` (--set) cannot change {refused[0]} of a resumed run (it continues with the "
                         f"recipe it was started with; only {', '.join(RESUME_SETTABLE)} can change); drop it, or "
                         "start a new run")
    return changed, [f"{k} {getattr(recipe, k)} -> {getattr(changed, k)} on resume" for k in keys]


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Delete what a killed process left half-written in a run directory (a SIGKILL during a checkpoint
    leaves a full-size ``.last.*.tmp``): the run's own outputs' temporary names only."""
    for name in (LAST_DIR, WEIGHTS_NAME, CONFIG_NAME, TRAIN_JSON, RECIPE_YAML, METRICS_CSV, METRICS_PNG):
        for stale in run_dir.glob(f".{name}.*.tmp"):
            remove_output(stale, ignore_errors=True)


def _damaged_checkpoint(directory: Path, error: BaseException) -> CheckpointError:
    """A checkpoint that is incomplete (a key missing) or does not fit the run: the error names the fix."""
    detail = " ".join(str(error).split())
    what = f"lacks {detail}" if isinstance(error, KeyError) else f"does not fit this run ({detail})"
    return CheckpointError(f"the checkpoint {directory} {what}, so the run cannot continue exactly; its best "
                           f"model ({directory.parent / WEIGHTS_NAME}) is intact: start a new run (--force), or "
                           "from that model")


# --- public entry point ------------------------------------------------------------------


def _load_model(source: nn.Module | str | os.PathLike, load_kwargs: dict[str, Any] | None) -> nn.Module:
    if isinstance(source, nn.Module):
        model = unwrap(source)
        dtype = placement(model)[1]
        if dtype != torch.float32:  # SGD on half weights loses small updates; autocast keeps fp32 master weights
            name = str(dtype).replace("torch.", "")
            raise UsageError(f"train needs a model with float32 weights, this one's are {name}; train it in "
                             f"float32 (model.float()) and get mixed precision from the recipe: amp=bf16 or fp16")
        return model
    from .load import load

    return load(source, **(load_kwargs or {}))


def _init_distributed(device: torch.device) -> None:
    world, _, _ = _dist_env()
    if world > 1 and dist.is_available() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL uses the current device: one GPU per rank
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


#: timm optimizers whose first moment is ``betas[0]``: the recipe's ``momentum`` sets it
_ADAM_FAMILY = frozenset({"adam", "adamw", "nadam", "nadamw", "radam", "adamp", "lamb", "lambw"})


def _same_path(a: Path | None, b: Path | None) -> bool:
    """Whether two paths name the same directory (``runs/a`` and ``./runs/a/`` and its absolute path do)."""
    return a is not None and b is not None and a.resolve() == b.resolve()


def _prepare_output(output: Path | None, resume: Path | None, force: bool, is_main: bool) -> None:
    if output is None or not is_main:
        return
    if resume is not None and _same_path(resume, output):
        return
    if output.exists():
        if not force:
            raise OutputExistsError(f"{output} already exists; pass force=True (--force) to start over, "
                                    f"or resume it (--resume {output})")
        remove_output(output)  # a symlink: the link, never what it points to
    output.mkdir(parents=True, exist_ok=True)


def train(
    model: nn.Module | str | os.PathLike | None,
    data: str | os.PathLike | None,
    output: str | os.PathLike | None,
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    overrides: list[str] | dict[str, Any] | None = None,
    val_data: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    resume: str | os.PathLike | None = None,
    export: str | os.PathLike | None = None,
    force: bool = False,
    callback: Callable[[TrainEvent], None] | None = None,
    load_kwargs: dict[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on ``data`` with ``recipe``; write checkpoints, metrics and optionally an export.

    Args:
        model: a module, a surgery directory (from ``wsurgery convert``), or a timm name (the
            BatchNorm baseline; see ``load_kwargs``). Ignored with ``resume`` (the checkpoint
            holds the model).
        data: ImageFolder root or ``path,label`` CSV (see :func:`wsurgery.datasets.build_datasets`).
            With ``resume``, defaults to the data of the interrupted run.
        output: run directory (None: train in memory, write nothing).
        recipe: a :class:`Recipe`, a YAML path or a shipped recipe name (default: ``Recipe()``).
        overrides: ``["key=value", ...]`` applied to the recipe.
        val_data: validation folder/CSV (default: ``DATA/val``, else ``val_split`` of the data).
        device: ``cuda``, ``mps``, ``cpu`` (default: ``$WSURGERY_DEVICE``, else the best available).
        resume: a run directory to continue exactly where it stopped (recipe and data come from it).
        export: after training, fold and export the best model there and verify it.
        force: replace an existing ``output`` (or ``export``).
        callback: receives a :class:`TrainEvent` at start, after every optimizer step, after
            every epoch, and at the end.
        load_kwargs: passed to :func:`wsurgery.load` when ``model`` is a name or path.

    Returns:
        A :class:`TrainResult`; ``model`` is the best model (EMA weights when ``ema``). With an
        ``output`` directory it is a fresh copy loaded from there (on the CPU); with
        ``output=None`` a module passed in is trained in place and comes back itself (with
        ``ema``, the EMA copy comes back), on the training device, holding the best epoch's
        weights (pass ``wsurgery.convert.clone_model(m)`` to keep ``m`` as it was).

    Raises:
        DatasetError, RecipeError, InputNotFoundError, OutputExistsError: bad inputs, before training.
        TrainingDivergedError: the loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C or SIGTERM (a checkpoint was written first).
    """
    t_start = time.perf_counter()
    out = Path(output) if output is not None else None
    resume_dir = Path(resume) if resume is not None else None
    state_plain: dict[str, Any] | None = None
    resume_notes: list[str] = []
    if resume_dir is not None:
        last = resume_dir / LAST_DIR
        if not resume_dir.is_dir():
            raise InputNotFoundError(f"{resume_dir} does not exist; `resume` (--resume) takes the output "
                                     "directory of an earlier `wsurgery train` run")
        if not (last / STATE_JSON).is_file():
            raise InputNotFoundError(f"{resume_dir} has no checkpoint ({LAST_DIR}/{STATE_JSON}); "
                                     "resume takes the output directory of an earlier `wsurgery train` run")
        state_plain = read_json(last / STATE_JSON)
        if not (last / STATE_TENSORS).is_file():
            raise _damaged_checkpoint(last, KeyError(STATE_TENSORS))
        saved = state_plain.get("data")
        if not isinstance(saved, dict) or "data" not in saved:
            raise _damaged_checkpoint(last, KeyError("data"))
        if not isinstance(state_plain.get("recipe"), dict):
            raise _damaged_checkpoint(last, KeyError("recipe"))
        out = out or resume_dir
        if out is not None and resume_dir.resolve() in out.resolve().parents:
            raise UsageError(f"`output` (-o) {out} is inside the run it resumes ({resume_dir}), which would be copied "
                             "into itself; continue in place (drop -o) or choose a directory outside it")
        data = data or saved["data"]
        val_data = val_data if val_data is not None else saved.get("val_data")
        if recipe is not None:
            raise UsageError("`recipe` (--recipe) cannot change a resumed run (it continues with the recipe it was "
                             "started with); drop it, or start a new run")
        recipe = Recipe.from_dict(state_plain["recipe"], source=f"{last / STATE_JSON}")
        if overrides:
            recipe, changed = _resume_overrides(recipe, overrides)
            resume_notes.extend(changed)
            overrides = None
    if data is None:
        raise UsageError("train needs `data` (--data: an ImageFolder directory or a path,label CSV)")
    if export is not None:
        for run_dir, flag in ((out, "output (-o)"), (resume_dir, "resume (--resume)")):
            # an export replaces its directory: at (or above) a run directory it would delete the run
            if run_dir is not None and (_same_path(Path(export), run_dir)
                                        or Path(export).resolve() in run_dir.resolve().parents):
                raise UsageError(f"`export` (--export) {export} would replace the run directory {run_dir} "
                                 f"(`{flag}`); export to a directory of its own, e.g. {run_dir / 'export'}")
            last_dir = run_dir.resolve() / LAST_DIR if run_dir is not None else None
            target = Path(export).resolve()
            if last_dir is not None and (target == last_dir or last_dir in target.parents):
                raise UsageError(f"`export` (--export) {export} would replace the checkpoint {run_dir / LAST_DIR} that "
                                 f"resumes the run; export to a directory of its own, e.g. {run_dir / 'export'}")
    if export is not None and not force and Path(export).exists():
        raise OutputExistsError(f"{export} already exists; pass force=True (--force) to overwrite it")
    # --force never deletes what the run reads (the model, the data), nor a folder that is no run
    inputs = (model if isinstance(model, (str, os.PathLike)) else None, data, val_data)
    if force and export is not None:
        check_replaceable(export, inputs=inputs, markers=(CONFIG_NAME,))
    if force and out is not None and not _same_path(resume_dir, out):
        # not config.json: any model directory has one; recipe.yaml is there from a run's first moment
        check_replaceable(out, inputs=(*inputs, resume_dir), markers=(TRAIN_JSON, LAST_DIR, RECIPE_YAML))
    recipe_obj = load_recipe(recipe, overrides)
    dev = pick_device(device)
    _init_distributed(dev)
    _world, rank, _ = _dist_env()
    is_main = rank == 0 or not dist.is_initialized()
    bundle = build_datasets(data, val_data=val_data, val_split=recipe_obj.val_split, seed=recipe_obj.seed)
    if state_plain is not None and bundle.class_names != state_plain["data"].get("class_names", bundle.class_names):
        raise UsageError(f"{data} has the classes {bundle.class_names} but the run in {resume_dir} trained on "
                         f"{state_plain['data']['class_names']}; resume with that run's data (drop --data) or "
                         "start a new run")
    fingerprint = data_fingerprint(bundle)
    if state_plain is not None and state_plain["data"].get("fingerprint", fingerprint) != fingerprint:
        was, now = state_plain["data"]["fingerprint"], fingerprint
        counts = ", ".join(f"{split}: {(was.get(split) or {}).get('images', 0)} images then, "
                           f"{(now.get(split) or {}).get('images', 0)} now" for split in ("train", "val"))
        raise UsageError(f"the data changed since the run in {resume_dir} started ({counts}, or other files): "
                         "resuming would not continue that run (its schedule and split were made for the old "
                         "files); restore them, or start a new run")
    resolved, notes = resolve_recipe(recipe_obj, len(bundle.train), bundle.original_size)
    notes.extend(_world_notes(recipe_obj, resolved, _world))
    notes.extend(resume_notes)
    if bundle.skipped:
        notes.append(f"skipped {len(bundle.skipped)} unreadable file(s), e.g. {bundle.skipped[0]}")
    if out is not None and out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file; `output` (-o) names the run directory to create")
    if out is not None and is_main and out.exists() and not force and not _same_path(resume_dir, out):
        raise OutputExistsError(f"{out} already exists; pass force=True (--force) to start over, "
                                f"or resume it (--resume {out})")
    # absolute paths: a resumed run may start from another working directory
    data_record = {"data": str(Path(data).resolve()),
                   "val_data": str(Path(val_data).resolve()) if val_data is not None else None,
                   "class_names": bundle.class_names, "sources": bundle.sources, "fingerprint": fingerprint}
    random.seed(resolved.seed)
    np.random.seed(resolved.seed % 2**32)
    torch.manual_seed(resolved.seed)
    with _deterministic(resolved.deterministic and dev.type == "cpu"):
        if resume_dir is not None:
            net = _load_model(resume_dir / LAST_DIR, None)
        else:
            net = _load_model(model, load_kwargs)  # type: ignore[arg-type]
            set_num_classes(net, bundle.class_names, resolved.head_init)
            _set_input_size(net, resolved.img_size if isinstance(resolved.img_size, int) else None)
        if not is_converted(net):
            notes.append("the model has no WS layers (a plain/BatchNorm baseline)")
        run = _Run(net, bundle, resolved, out, dev, callback, notes, data_record, t_start)
        run.setup()
        # only now, with the model loaded and the optimizer, scheduler and data built, is the run
        # directory created (or an old one replaced with --force): a failure before this point
        # leaves the old run as it was and nothing new behind
        _prepare_output(out, resume_dir, force, is_main)
        if resume_dir is not None and out is not None and is_main and not _same_path(resume_dir, out):
            # continuing a run into another directory: it starts as a copy of the run so far (its best
            # model, metrics and checkpoint), so that it is whole even if no later epoch beats the best
            shutil.copytree(resume_dir, out, dirs_exist_ok=True)
        finished = False
        if resume_dir is not None:
            run.load_checkpoint(resume_dir / LAST_DIR)
            # done: every epoch, or every step with the epoch it ended in closed (a stop during the last
            # update leaves that epoch's evaluation and checkpoint to do: state.batch > 0)
            finished = run.state.epoch >= run.epochs or (run.state.step >= run.total_steps and run.state.batch == 0)
            if is_main and out is not None:
                _remove_stale_temporaries(out)
            notes.append(f"the run was already complete (epoch {run.state.epoch} of {run.epochs}); nothing to do"
                         if finished else f"resumed at epoch {run.state.epoch + 1}, step {run.state.step}")
        if is_main and out is not None and not finished:
            with atomic_file(out / RECIPE_YAML, force=True) as tmp:
                tmp.write_text(yaml.safe_dump(resolved.to_dict(), sort_keys=False))
        if not finished:
            run.run()
    best_model = run._eval_model()
    if run.best_state is not None and (out is None or not is_main):
        if out is not None:  # a rank that did not write: a copy, as rank 0's load(out) is
            best_model = clone_model(best_model)
        best_model.load_state_dict(run.best_state)  # the best epoch's weights, as a run directory holds them
    decode_failures = run.state.decode_failures_before + _total_over_ranks(bundle.load_failures, run)
    if decode_failures:
        notes.append(f"{decode_failures} image read(s) failed to decode (a truncated file?) and were replaced by "
                     "the next sample")
    if is_main and out is not None:
        from .load import load

        best_model = load(out)
        if not finished or not (out / TRAIN_JSON).exists():  # a finished run's train.json stays its record
            # the seconds of every process of the run (a resumed one included)
            _write_summary(out, run, bundle, notes, decode_failures,
                           run.state.seconds_before + time.perf_counter() - t_start)
    result = TrainResult(
        output=out, model=best_model, history=run.state.history,
        best={"epoch": run.state.best_epoch, "top1": run.state.best_top1} if run.state.history else None,
        class_names=bundle.class_names, recipe=resolved, steps=run.state.step, skipped_files=bundle.skipped,
        notes=notes,
    )
    if export is not None and is_main:
        from .export import export as export_model
        from .verify import verify

        result.export = export_model(best_model, export, force=force)
        result.verify = verify(export, best_model)
    result.seconds = time.perf_counter() - t_start
    return result


def _total_over_ranks(count: int, run: _Run) -> int:
    """``count`` summed over the ranks of a distributed run (each rank reads its own share of the data)."""
    if not run.distributed:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=run.device)
    dist.all_reduce(total)
    return int(total.item())


def _write_summary(out: Path, run: _Run, bundle: DataBundle, notes: list[str], decode_failures: int,
                   seconds: float) -> None:
    summary = {
        "status": "completed",
        "steps": run.state.step,
        "epochs": run.state.epoch,
        "best": {"epoch": run.state.best_epoch, "top1": run.state.best_top1},
        "class_names": bundle.class_names,
        "train_images": len(bundle.train),
        "val_images": len(bundle.val) if bundle.val is not None else 0,
        "skipped_files": bundle.skipped,
        # files that passed the header check but failed to decode (replaced by the next sample each time)
        "decode_failures": decode_failures,  # over every rank of a distributed run
        "sources": bundle.sources,
        "notes": notes,
        "seconds": round(seconds, 2),
        "device": str(run.device),
        "world_size": run.world,
    }
    with atomic_file(out / TRAIN_JSON, force=True) as tmp:
        write_json(tmp, summary)

