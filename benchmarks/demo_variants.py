"""The demo (``wsurgery demo``) under several seeds and settings, to see its spread.

Presets (every one but ``gn1`` at timm's 32 GN groups, the demo's conversion before it took one group;
calibrations: ``default`` is calibrate's default, which anchors since anchoring became it;
``plain`` is gn-init + distillation without anchoring or preconditioning, the default before;
``pre`` preconditions every layer, ``anchor`` anchors, both explicitly):

* ``gpu``: CUDA with seeds 1-3, seed 0 with channels_last off and with TF32 off, and seed 0 on that
  machine's CPU, with the demo's calibration at 32 groups (``benchmarks/results/gpu/demo_ab.json`` came from
  it on the H100 before anchoring became the default: it ran ``plain``).
* ``lr``: the fine-tune's learning rate (the micro-batch recipe's ``lr``, per 32 images; the demo
  uses 0.003) ``plain`` against ``pre``, seeds 0 and 1, on the CPU: is a preconditioned model's
  worse fine-tune a matter of the learning rate?
* ``anchor``: the same learning rates and seeds, ``plain`` against ``anchor``, side by side in one run.
* ``seeds``: the demo at 32 groups (its lr 0.003), ``plain`` against ``default``, seeds 0-4.
* ``groups``: the demo's calibration at timm's 32 GN groups (``default``) against the same with one
  group (``gn1``, the demo as it is since this comparison), seeds 0-4.

Each variant's test top-1 after fine-tuning, the calibration's held-out agreement and the
fine-tune line go to the JSON, written after every variant.

Usage::

    python benchmarks/demo_variants.py --preset gpu --out benchmarks/results/gpu/demo_ab.json
    python benchmarks/demo_variants.py --preset lr --out benchmarks/results/demo_lr.json
    python benchmarks/demo_variants.py --preset anchor --out benchmarks/results/demo_anchor.json
    python benchmarks/demo_variants.py --preset seeds --threads 1 --out benchmarks/results/demo_seeds.json
    python benchmarks/demo_variants.py --preset groups --threads 2 --out benchmarks/results/demo_groups.json
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import timm
import torch

import wsurgery
from wsurgery.demo import DemoConfig, run_demo
from wsurgery.io import atomic_file, write_json

# (tag, seed, extra recipe overrides, WSURGERY_DEVICE, TF32 for cuDNN convs, calibration: a key of CALIBRATIONS)
PRESETS = {
    "gpu": [
        ("cuda_s1", 1, [], None, True, "default"), ("cuda_s2", 2, [], None, True, "default"),
        ("cuda_nocl", 0, ["channels_last=false"], None, True, "default"),
        ("cuda_notf32", 0, [], None, False, "default"),
        ("cpu_s0", 0, [], "cpu", True, "default"), ("cuda_s3", 3, [], None, True, "default"),
    ],
    **{name: [(f"{calib}_lr{lr}_s{seed}", seed, [f"lr={lr}"], "cpu", True, calib)
              for calib, lr, seed in itertools.product(("plain", other), (0.01, 0.003, 0.001), (0, 1))]
       for name, other in (("lr", "pre"), ("anchor", "anchor"))},
    "seeds": [(f"{calib}_s{seed}", seed, [], "cpu", True, calib)
              for seed, calib in itertools.product(range(5), ("plain", "default"))],
    "groups": [(f"{calib}_s{seed}", seed, [], "cpu", True, calib)
               for seed, calib in itertools.product(range(5), ("default", "gn1"))],
}
#: DemoConfig's conversion and calibration switches (gn_groups, calib_precondition, calib_anchor) for each name
#: (``default`` is calibrate's default calibration at 32 groups, not the demo's default conversion, one group)
CALIBRATIONS = {"default": (32, False, None), "plain": (32, False, False), "pre": (32, True, False),
                "anchor": (32, False, True), "gn1": (1, False, None)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default benchmarks/results/demo_PRESET.json)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where each variant's demo directory goes")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.preset == "gpu" and not torch.cuda.is_available():  # its cuda_* variants would run on the CPU
        raise SystemExit("error: the gpu preset needs CUDA (torch.cuda.is_available() is False); use --preset lr")
    out = args.out or Path(__file__).parent / "results" / f"demo_{args.preset}.json"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv[1:], "torch": torch.__version__,
            "timm": timm.__version__, "wsurgery": wsurgery.__version__, "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    rows = []
    for tag, seed, extra, device, tf32, calib in PRESETS[args.preset]:
        if device:
            os.environ["WSURGERY_DEVICE"] = device
        else:
            os.environ.pop("WSURGERY_DEVICE", None)
        torch.backends.cudnn.allow_tf32 = tf32
        groups, precondition, anchor = CALIBRATIONS[calib]
        cfg = DemoConfig(seed=seed, calib_precondition=precondition, calib_anchor=anchor, gn_groups=groups)
        cfg.overrides = list(cfg.overrides) + extra
        t = time.perf_counter()
        r = run_demo(args.workdir / f"d_{tag}", config=cfg, force=True)
        fine_tune = next(s.detail for s in r.steps if s.name.startswith("fine"))
        after = (r.calibration or {}).get("after") or {}
        rows.append({"tag": tag, "seed": seed, "overrides": extra, "calibration": calib, "gn_groups": groups,
                     "precondition": precondition, "anchor": (r.calibration or {}).get("config", {}).get("anchor"),
                     "after": r.accuracy_after, "calib_top1": after.get("top1"), "ft": fine_tune,
                     "s": time.perf_counter() - t})
        shutil.rmtree(args.workdir / f"d_{tag}", ignore_errors=True)  # ~70 MB a variant
        print(rows[-1], flush=True)
        with atomic_file(out, force=True) as tmp:  # after every variant: a long run keeps what it measured
            write_json(tmp, {"meta": meta, "rows": rows})
    print(f"{'variant':<24} {'seed':>4} {'test top-1':>10} {'calib top-1':>11} {'s':>6}")
    for r in rows:
        calib = f"{r['calib_top1']:.3f}" if r["calib_top1"] is not None else "-"
        print(f"{r['tag']:<24} {r['seed']:>4} {r['after']:>10.3f} {calib:>11} {r['s']:>6.0f}")


if __name__ == "__main__":
    main()
