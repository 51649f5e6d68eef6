"""onnxruntime CPU latency of the folded ONNX export vs the timm model run in PyTorch, batch 1.

For each model three runners are timed on the same input, interleaved (round r times every
runner once, then round r+1 ...), so drifting load from other processes hits all of them
alike; each round is the mean of ``--iters`` calls, and the table reports the median over
``--repeats`` rounds:

* ``timm``: the stock timm model in PyTorch eager (eval, ``torch.no_grad``). For BiT this is
  timm's own ``StdConv2d`` model, which standardizes its weights on every call;
* ``ws``: the wsurgery-converted model before folding (PyTorch, standardization per call);
* ``onnx``: the folded export (``wsurgery.export_onnx``, BN folded into the convs where the
  model has BN) in onnxruntime's CPU provider, default graph optimizations.

``ratio`` is onnx / timm (below 1: the ONNX export is faster). Both runtimes get the same
number of threads (``--threads``, default 1: with more threads than free cores, OpenMP's
spinning threads in PyTorch collapse on a shared machine and the ratio would measure the
contention, not the runtimes). The load average before and after is recorded. Weights are random
(``pretrained=False``): latency does not depend on their values.

Usage::

    python benchmarks/onnx_latency.py                      # resnet50, tf_efficientnet_lite0, resnetv2_50x1_bit
    python benchmarks/onnx_latency.py --models resnet18 --repeats 5 --iters 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch

import wsurgery
from wsurgery import deploy
from wsurgery.verify import compare_outputs

RESULTS = Path(__file__).resolve().parent / "results" / "onnx_latency.json"

#: how each benchmarked model is converted before export (None: timm's own WS, fold only)
RECIPES: dict[str, dict | None] = {
    "resnet50": {"mode": "aws"},
    "tf_efficientnet_lite0": {"mode": "aws"},
    "resnetv2_50x1_bit": None,
}


def _time_call(fn: Callable[[], object], iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def bench_model(name: str, *, img_size: int | None, threads: int, repeats: int, iters: int, warmup: int,
                workdir: Path) -> dict:
    import onnxruntime as ort

    timm_model = timm.create_model(name, pretrained=False).eval()
    recipe = RECIPES.get(name, {"mode": "aws"})
    ws_model = wsurgery.convert(timm_model, inplace=False, **recipe)[0].eval() if recipe else timm_model
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in ws_model.modules())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = deploy.export_onnx(ws_model, workdir / f"{name}.onnx", img_size=img_size, fold_bn=has_bn, force=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(result.path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    x = torch.randn(1, *result.input_size, generator=torch.Generator().manual_seed(0))
    x_np = x.numpy()

    def run_torch(model: torch.nn.Module) -> Callable[[], object]:
        def call() -> object:
            with torch.no_grad():
                return model(x)
        return call

    runners = {"timm": run_torch(timm_model), "onnx": lambda: session.run(None, {input_name: x_np})}
    if recipe:
        runners["ws"] = run_torch(ws_model)
    with torch.no_grad():
        ref = timm_model(x) if not recipe else ws_model(x)
    _, max_rel, _ = compare_outputs(torch.from_numpy(session.run(None, {input_name: x_np})[0]), ref)
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for r in range(repeats):  # each round starts with the next runner, so drift falls on all of them alike
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            samples[key].append(_time_call(runners[key], iters))
    median = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
    return {
        "model": name,
        "conversion": recipe or "timm StdConv2d (fold only)",
        "fold_bn": has_bn,
        "input_size": list(result.input_size),
        "opset": result.opset,
        "timm_ms": median["timm"],
        "ws_unfolded_ms": median.get("ws"),
        "onnx_ms": median["onnx"],
        "ratio_onnx_over_timm": median["onnx"] / median["timm"],
        "onnx_vs_pytorch_max_rel_diff": max_rel,
        "samples_ms": {k: [s * 1e3 for s in v] for k, v in samples.items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(RECIPES))
    parser.add_argument("--img-size", type=int, default=None, help="default: each model's data config")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both runtimes (default 1: batch-1 latency, and robust on a shared CPU)")
    parser.add_argument("--repeats", type=_at_least_one, default=7, help="interleaved rounds (median reported)")
    parser.add_argument("--iters", type=_at_least_one, default=10, help="calls per round")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    deploy.require_onnx()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(bench_model(name, img_size=args.img_size, threads=args.threads, repeats=args.repeats,
                                    iters=args.iters, warmup=args.warmup, workdir=Path(tmp)))
            r = rows[-1]
            print(f"  {name}: timm {r['timm_ms']:.1f} ms, onnx {r['onnx_ms']:.1f} ms", file=sys.stderr, flush=True)
    load_after = os.getloadavg()
    import onnxruntime

    header = (f"{'model':<24}{'input':>10}{'timm (ms)':>11}{'WS unfolded':>13}{'ONNX (ms)':>11}"
              f"{'ONNX/timm':>11}{'max rel':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        ws = f"{r['ws_unfolded_ms']:.1f}" if r["ws_unfolded_ms"] is not None else "(=timm)"
        size = "x".join(map(str, r["input_size"][1:]))
        print(f"{r['model']:<24}{size:>10}{r['timm_ms']:>11.1f}{ws:>13}{r['onnx_ms']:>11.1f}"
              f"{r['ratio_onnx_over_timm']:>11.2f}{r['onnx_vs_pytorch_max_rel_diff']:>10.1e}")
    print(f"batch 1, {args.threads} threads, median of {args.repeats} interleaved rounds x {args.iters} calls; "
          f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after on {os.cpu_count()} CPUs")
    report = {
        "benchmark": "onnx_latency",
        "command": "python benchmarks/onnx_latency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "batch": 1,
        "threads": args.threads,
        "repeats": args.repeats,
        "iters": args.iters,
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "timm": timm.__version__,
        "wsurgery": wsurgery.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with wsurgery.io.atomic_file(args.out, force=True) as tmp_path:
        tmp_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
