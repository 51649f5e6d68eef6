"""The demo (``wsurgery demo``) under several seeds and numerics settings, to see its spread.

Run on the H100 of ``benchmarks/results/gpu/`` (``demo_ab.json``): CUDA with seeds 1-3, seed 0 with
channels_last off and with TF32 off, and seed 0 on that machine's CPU. Each variant's test top-1
after fine-tuning and its fine-tune line go to the JSON, written after every variant.

Usage::

    python benchmarks/demo_variants.py --out benchmarks/results/gpu/demo_ab.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from wsurgery.demo import DemoConfig, run_demo

VARIANTS = [  # (tag, seed, extra recipe overrides, WSURGERY_DEVICE, TF32 for cuDNN convs)
    ("cuda_s1", 1, [], None, True), ("cuda_s2", 2, [], None, True),
    ("cuda_nocl", 0, ["channels_last=false"], None, True), ("cuda_notf32", 0, [], None, False),
    ("cpu_s0", 0, [], "cpu", True), ("cuda_s3", 3, [], None, True),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/demo_variants.json"))
    p.add_argument("--workdir", type=Path, default=Path("/tmp"), help="where each variant's demo directory goes")
    args = p.parse_args()
    rows = []
    for tag, seed, extra, device, tf32 in VARIANTS:
        if device:
            os.environ["WSURGERY_DEVICE"] = device
        else:
            os.environ.pop("WSURGERY_DEVICE", None)
        torch.backends.cudnn.allow_tf32 = tf32
        cfg = DemoConfig(seed=seed)
        cfg.overrides = list(cfg.overrides) + extra
        t = time.perf_counter()
        r = run_demo(args.workdir / f"d_{tag}", config=cfg, force=True)
        fine_tune = next(s.detail for s in r.steps if s.name.startswith("fine"))
        rows.append({"tag": tag, "seed": seed, "after": r.accuracy_after, "ft": fine_tune, "s": time.perf_counter() - t})
        print(rows[-1], flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
