"""Time convert, fold and export of a timm model (default resnet50), in process.

Process start, imports and building the timm model are excluded: each repetition starts
from a freshly built model and times only the wsurgery call. Reported per step: median and
min wall time over ``--repeat`` runs, median CPU time (all threads of the process), and the
peak resident memory above the step's starting point (sampled from /proc every 2 ms; falls
back to tracemalloc's Python-heap peak where /proc is missing).

Run::

    python benchmarks/surgery_speed.py                      # resnet50, 5 repeats, 2 threads
    python benchmarks/surgery_speed.py --model resnet18 --repeat 3 --norm gn

Writes benchmarks/results/surgery_speed.json (the target: each step under 1 s on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import wsurgery
from wsurgery.fold import fold

RESULTS = Path(__file__).resolve().parent / "results" / "surgery_speed.json"
TARGET_S = 1.0


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return None


class PeakMemory:
    """Peak RSS above the starting RSS while the block runs (sampling thread)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes() or 0
            self.peak = max(self.peak, rss - self.start)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start = _rss_bytes()
        if self.start is None:  # no /proc: Python heap only
            tracemalloc.start()
            return self
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.start is None:
            self.peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, (_rss_bytes() or 0) - self.start)


def _time(fn: Callable[[], Any]) -> tuple[float, float, int]:
    with PeakMemory() as mem:
        cpu0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return wall, cpu, mem.peak


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def run(model_name: str, repeat: int, mode: str, norm: str) -> dict[str, Any]:
    steps: dict[str, list[tuple[float, float, int]]] = {"convert": [], "fold": [], "export": []}
    for i in range(repeat + 1):  # the first round warms caches and is not counted
        model = timm.create_model(model_name, pretrained=False).eval()
        result: dict[str, Any] = {}
        # each closure is timed at once, inside this iteration (B023's late binding cannot bite)
        convert_t = _time(lambda: result.update(  # noqa: B023
            zip(("model", "report"), wsurgery.convert(model, mode=mode, norm=norm))))  # noqa: B023
        fold_t = _time(lambda: fold(result["model"]))  # noqa: B023
        with tempfile.TemporaryDirectory(prefix="wsurgery-bench-") as tmp:  # an export per round: ~100 MB each
            export_t = _time(lambda: wsurgery.export(result["model"], Path(tmp) / "e"))  # noqa: B023
        if i:
            steps["convert"].append(convert_t)
            steps["fold"].append(fold_t)
            steps["export"].append(export_t)
    rows = {}
    for step, samples in steps.items():
        walls = [s[0] for s in samples]
        rows[step] = {
            "median_s": statistics.median(walls),
            "min_s": min(walls),
            "median_cpu_s": statistics.median(s[1] for s in samples),
            "peak_mem_mb": max(s[2] for s in samples) / 2**20,
            "under_target": statistics.median(walls) < TARGET_S,
        }
    return rows


def _print_table(rows: dict[str, Any], meta: dict[str, Any]) -> None:
    title = f"{meta['model']} ({meta['mode']}, norm={meta['norm']}), {meta['repeat']} runs, {meta['threads']} threads"
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for col in ("step", "median s", "min s", "median CPU s", "peak MiB", f"< {TARGET_S:g} s"):
            table.add_column(col)
        for step, r in rows.items():
            table.add_row(step, f"{r['median_s']:.3f}", f"{r['min_s']:.3f}", f"{r['median_cpu_s']:.3f}",
                          f"{r['peak_mem_mb']:.0f}", "yes" if r["under_target"] else "NO")
        Console().print(table)
    except ImportError:  # plain table without rich
        print(title)
        for step, r in rows.items():
            print(f"{step:8s} {r['median_s']:.3f}s (min {r['min_s']:.3f}) cpu {r['median_cpu_s']:.3f}s "
                  f"peak {r['peak_mem_mb']:.0f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--repeat", type=_at_least_one, default=5)
    parser.add_argument("--mode", default="ws", choices=["ws", "aws"])
    parser.add_argument("--norm", default="gn", choices=["keep", "gn"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.model, args.repeat, args.mode, args.norm)
    meta = {
        "model": args.model, "mode": args.mode, "norm": args.norm, "repeat": args.repeat,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.processor() or
        platform.machine(), "torch": torch.__version__, "timm": timm.__version__,
        "wsurgery": wsurgery.__version__, "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    _print_table(rows, meta)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with wsurgery.io.atomic_file(args.output, force=True) as tmp:
        tmp.write_text(json.dumps({"meta": meta, "steps": rows}, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
