"""gn-init with and without anchoring across timm architectures: how close the converted model stays.

For each architecture (random init; BatchNorm running statistics and affines randomized as the tests'
``randomize_norms`` does, so that a BatchNorm is not the identity): adaptive WS + GroupNorm, calibrated
with gn-init alone on 64 smooth random "photos" (low-frequency noise plus a per-image brightness), then
judged on 32 others by the relative logit error ``|student(x) - original(x)| / |original(x)|``;
``anchor=False`` (moment matching only) against ``anchor=True``. Random weights are not pretrained
ones: this checks that anchoring, gn-init's default, does no harm on blocks EfficientNet-Lite0 does not
have (residual adds, grouped convs, concatenations, SE, ...), not how much a real model keeps (README:
the calibration tables on real weights and photos).

    python benchmarks/anchor_zoo.py --groups 1 32 --threads 1   # ~7 min of one core

Prints a table and writes ``benchmarks/results/anchor_zoo.json``.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from _core_helpers import randomize_norms  # noqa: E402  (tests/: the same randomized statistics the tests use)

import wsurgery  # noqa: E402
from wsurgery.calibrate import anchored_convs, calibrate  # noqa: E402
from wsurgery.io import atomic_file, write_json  # noqa: E402

ARCHS = ["resnet10t", "resnet18", "regnetx_002", "mobilenetv3_small_050", "efficientnet_b0", "tf_efficientnet_b0",
         "mixnet_s", "densenet121", "resnext26ts", "dla34", "rexnet_100", "selecsls42b", "vgg11_bn", "cspresnet50",
         "ghostnet_100", "lcnet_050", "repvgg_a0"]


def _photos(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    low = torch.randn(n, 3, 8, 8, generator=gen)
    return F.interpolate(low, size=(size, size), mode="bilinear") + 0.5 * torch.randn(n, 1, 1, 1, generator=gen)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 32], help="GroupNorm groups (convert's gn_groups)")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "anchor_zoo.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x = _photos(96, args.size, torch.Generator().manual_seed(0))
    calib, held = x[:64], x[64:]
    rows = []
    for arch in args.archs:
        torch.manual_seed(0)
        original = randomize_norms(timm.create_model(arch, num_classes=10)).eval()
        with torch.no_grad():
            want = original(held)
        for groups in args.groups:
            row = {"arch": arch, "groups": groups}
            for anchor in (False, True):
                student = wsurgery.convert(original, mode="aws", norm="gn", gn_groups=groups, inplace=False)[0]
                t0 = time.perf_counter()
                calibrate(student, original, calib, method="gn-init", held_out=None, anchor=anchor)
                with torch.no_grad():
                    got = student.eval()(held)
                key = "anchored" if anchor else "plain"
                row[key] = float((got - want).norm() / want.norm())
                row[f"{key}_s"] = round(time.perf_counter() - t0, 2)
                if anchor:
                    row["convs_anchored"] = len(anchored_convs(student))
            rows.append(row)
            print(f"{arch:<24}{groups:>4}  gn-init {row['plain']:.3f}  anchored {row['anchored']:.3f}  "
                  f"({row['convs_anchored']} convs)", flush=True)
    print(f"\n{'arch':<24}{'groups':>7}{'gn-init':>10}{'anchored':>10}{'ratio':>8}")
    for r in rows:
        ratio = r["anchored"] / r["plain"] if r["plain"] > 1e-6 else float("nan")
        print(f"{r['arch']:<24}{r['groups']:>7}{r['plain']:>10.3f}{r['anchored']:>10.3f}{ratio:>8.2f}")
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "rows": rows,
              "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
              "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(args.out, force=True) as tmp:
        write_json(tmp, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
