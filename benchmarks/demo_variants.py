"""The demo (``wsurgery demo``) under several seeds and settings, to see its spread.

Two presets:

* ``gpu`` (what made ``benchmarks/results/gpu/demo_ab.json`` on the H100): CUDA with seeds 1-3,
  seed 0 with channels_last off and with TF32 off, and seed 0 on that machine's CPU.
* ``lr``: the fine-tune's learning rate (the micro-batch recipe's ``lr``, per 32 images; the demo
  uses 0.01) against gn-init's preconditioning (``calibrate(precondition=True)``), seeds 0 and 1,
  on the CPU: is a preconditioned model's worse fine-tune a matter of the learning rate?

Each variant's test top-1 after fine-tuning, the calibration's held-out agreement and the
fine-tune line go to the JSON, written after every variant.

Usage::

    python benchmarks/demo_variants.py --preset gpu --out benchmarks/results/gpu/demo_ab.json
    python benchmarks/demo_variants.py --preset lr --out benchmarks/results/demo_lr.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import time
from pathlib import Path

import torch

from wsurgery.demo import DemoConfig, run_demo

# (tag, seed, extra recipe overrides, WSURGERY_DEVICE, TF32 for cuDNN convs, preconditioning)
PRESETS = {
    "gpu": [
        ("cuda_s1", 1, [], None, True, False), ("cuda_s2", 2, [], None, True, False),
        ("cuda_nocl", 0, ["channels_last=false"], None, True, False),
        ("cuda_notf32", 0, [], None, False, False),
        ("cpu_s0", 0, [], "cpu", True, False), ("cuda_s3", 3, [], None, True, False),
    ],
    "lr": [(f"{'pre' if pre else 'default'}_lr{lr}_s{seed}", seed, [f"lr={lr}"], "cpu", True, pre)
           for pre, lr, seed in itertools.product((False, True), (0.01, 0.003, 0.001), (0, 1))],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpu")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default benchmarks/results/demo_PRESET.json)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where each variant's demo directory goes")
    args = p.parse_args()
    out = args.out or Path(f"benchmarks/results/demo_{args.preset}.json")
    rows = []
    for tag, seed, extra, device, tf32, precondition in PRESETS[args.preset]:
        if device:
            os.environ["WSURGERY_DEVICE"] = device
        else:
            os.environ.pop("WSURGERY_DEVICE", None)
        torch.backends.cudnn.allow_tf32 = tf32
        cfg = DemoConfig(seed=seed, calib_precondition=precondition)
        cfg.overrides = list(cfg.overrides) + extra
        t = time.perf_counter()
        r = run_demo(args.workdir / f"d_{tag}", config=cfg, force=True)
        fine_tune = next(s.detail for s in r.steps if s.name.startswith("fine"))
        after = (r.calibration or {}).get("after") or {}
        rows.append({"tag": tag, "seed": seed, "overrides": extra, "precondition": precondition,
                     "after": r.accuracy_after, "calib_top1": after.get("top1"), "ft": fine_tune,
                     "s": time.perf_counter() - t})
        print(rows[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
