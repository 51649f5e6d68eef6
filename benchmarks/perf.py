"""What Weight Standardization costs, side by side in one process, as ratios.

Sections (``--sections``, all but ``compiled`` by default):

* ``kernels``: the standardization alone over every conv weight of resnet50 (forward, and
  forward + backward): the shipped kernels next to the alternatives we tried;
* ``train``: one training step (forward, cross-entropy, backward, SGD-momentum step) of the WS
  model vs the same architecture with plain convs and the same GroupNorm, at batch 8, and at
  micro-batch 1 with 8 accumulation steps (naive: standardize every micro-batch;
  ``standardize_once``: once per optimizer step), for resnet50-GN and tf_efficientnet_lite0-GN;
* ``compiled`` (opt-in): the batch-8 training step of resnet50-GN with each whole model under
  ``torch.compile`` (what a GPU user runs; compiling takes minutes on a CPU);
* ``infer``: the folded export (written with ``wsurgery.export`` and loaded back) vs the
  unfolded WS model (plain, and with the standardization cached by ``standardize_once``) vs
  the original timm model, batch 1 and 32 (adaptive WS, BatchNorm kept: same architecture);
* ``bit``: timm's ``resnetv2_50x1_bit`` (``StdConv2d`` standardizes on every call) vs its fold;
* ``fold_bn``: the ``fold_bn=True`` export vs the original BatchNorm model in eval mode, batch 1;
* ``surgery``: convert / fold / export wall time and peak memory for resnet50.

Every comparison interleaves its variants (round r runs each once, starting at a rotating
variant, then round r+1 ...), so load drifting in from other processes hits all of them alike,
and reports medians over rounds; the ratio column is median(variant) / median(reference).
Weights are random (``pretrained=False``): speed does not depend on their values.

Usage::

    python benchmarks/perf.py                 # everything, CPU, all cores torch uses (2 here)
    python benchmarks/perf.py --threads 1     # on a SHARED machine: see below
    python benchmarks/perf.py --quick         # smoke run: resnet18, 64 px, 3 rounds
    python benchmarks/perf.py --device cuda   # bf16 autocast + channels_last
    python benchmarks/perf.py --device cuda --sections compiled   # whole models under torch.compile
    python benchmarks/perf.py --sections train,infer --rounds 7

On a machine whose cores other processes are using, multi-threaded timings are dominated by
stalls: every parallel ATen op waits at its barrier for a thread that the OS has descheduled,
so a 0.5 ms op randomly takes 60 ms, and a model with more ops (WS adds two per conv) looks far
slower than it is. ``--threads 1`` removes the barrier; ratios then measure the work itself.

Writes ``benchmarks/results/perf.json`` (``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import wsurgery
from wsurgery.accumulate import standardize_once
from wsurgery.convert import clone_model
from wsurgery.io import atomic_file, write_json
from wsurgery.standardize import (
    AdaptiveWeightStandardization,
    _affine,
    _closed_form,
    get_convention,
    standardize_weight,
    standardize_weight_reference,
)

RESULTS = Path(__file__).resolve().parent / "results" / "perf.json"
SECTIONS = ("kernels", "surgery", "train", "compiled", "infer", "bit", "fold_bn")
#: run by default; ``compiled`` (minutes of compilation) only when asked for
DEFAULT_SECTIONS = tuple(s for s in SECTIONS if s != "compiled")

#: targets from the issue: (section, row, column, comparison, bound)
TARGETS = [
    ("train", "resnet50 ws b8", "ratio", "<=", 1.05),
    ("train", "tf_efficientnet_lite0 ws b8", "ratio", "<=", 1.05),
    ("train", "resnet50 ws accum8 once", "ratio", "<=", 1.03),
    ("train", "tf_efficientnet_lite0 ws accum8 once", "ratio", "<=", 1.03),
    ("infer", "resnet50 export b1", "ratio", "<=", 1.02),
    ("infer", "resnet50 export b32", "ratio", "<=", 1.02),
    ("bit", "resnetv2_50x1_bit timm/folded b1", "speedup", ">=", 1.5),
    ("fold_bn", "resnet50 fold_bn b1", "speedup", ">=", 1.1),
]


# ----------------------------------------------------------------------------- timing


class Timer:
    """Interleaved wall-clock timing (CUDA-synchronised when the device is a GPU)."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def once(self, fn: Callable[[], Any], calls: int = 1) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls

    def interleaved(
        self, fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1, calls: int = 1
    ) -> dict[str, list[float]]:
        """``rounds`` samples per variant; round r starts at variant r (mod n) to spread order effects."""
        names = list(fns)
        for _ in range(warmup):
            for name in names:
                fns[name]()
        samples: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                samples[name].append(self.once(fns[name], calls))
        return samples


def _summary(samples: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "samples_s": samples}


def _ratio_row(name: str, samples: dict[str, list[float]], variant: str, reference: str, **extra: Any) -> dict:
    """median(variant) / median(reference), plus the median of per-round ratios (paired)."""
    v, r = samples[variant], samples[reference]
    paired = statistics.median(a / b for a, b in zip(v, r))
    return {
        "name": name,
        "variant": variant,
        "reference": reference,
        "variant_ms": 1e3 * statistics.median(v),
        "reference_ms": 1e3 * statistics.median(r),
        "ratio": statistics.median(v) / statistics.median(r),
        "paired_ratio": paired,
        "rounds": len(v),
        "samples": {variant: v, reference: r},
        **extra,
    }


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _read_hwm() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """Peak memory above the level at entry: resident set (CPU) or allocated (CUDA), in MB.

    On Linux the kernel's RSS high-water mark is reset first (``/proc/self/clear_refs``), so
    the peak is exact; elsewhere a 1 ms sampling thread approximates it. (On the CPU the surgery
    section uses ``benchmarks/surgery_speed.py``'s own measure, RSS sampled every 2 ms.)
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        yield out
        torch.cuda.synchronize(device)
        out["peak_mb"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return
    base = _rss_bytes()
    exact = False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        exact = _read_hwm() is not None
    except OSError:
        pass
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.001)

    thread = None if exact else threading.Thread(target=sample, daemon=True)
    if thread:
        thread.start()
    try:
        yield out
    finally:
        stop.set()
        if thread:
            thread.join()
        top = _read_hwm() if exact else peak[0]
        out["peak_mb"] = max(0, (top or base) - base) / 2**20
        out["method"] = "VmHWM" if exact else "sampled"


# ----------------------------------------------------------------------------- models


def _ctx(args) -> contextlib.AbstractContextManager:
    if args.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(model: nn.Module, args) -> nn.Module:
    model = model.to(args.device)
    if args.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def _input(batch: int, size: int, args, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g).to(args.device)
    if args.device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _gn_pair(arch: str, mode: str, args) -> tuple[nn.Module, nn.Module]:
    """(WS model with GroupNorm, the same architecture with plain convs and the same GroupNorm)."""
    torch.manual_seed(0)
    ws, _ = wsurgery.convert(timm.create_model(arch, pretrained=False), mode=mode, norm="gn", trace=False)
    plain = wsurgery.fold(ws)
    return _prepare(ws, args).train(), _prepare(plain, args).train()


# ----------------------------------------------------------------------------- sections


class _OldClosedForm(torch.autograd.Function):
    """The first closed-form kernel (out-of-place ops, full-size temporaries), for comparison."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fan_in: int, eps: float) -> torch.Tensor:
        f = w.reshape(-1, fan_in)
        var, mean = torch.var_mean(f, dim=1, correction=0, keepdim=True)
        scale = torch.sqrt(var + eps)
        w_hat = (f - mean) / scale
        ctx.save_for_backward(w_hat, scale)
        ctx.shape, ctx.fan_in = w.shape, fan_in
        return w_hat.reshape(w.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        w_hat, scale = ctx.saved_tensors
        g = g.reshape(-1, ctx.fan_in)
        proj = (g * w_hat).sum(dim=1, keepdim=True) / ctx.fan_in
        return ((g - g.mean(dim=1, keepdim=True) - w_hat * proj) / scale).reshape(ctx.shape), None, None


def bench_kernels(args, timer: Timer) -> list[dict]:
    """Standardize every conv weight of the model once: forward, and forward + backward."""
    model = timm.create_model(args.kernel_arch, pretrained=False)
    weights = [p.detach().to(args.device) for p in model.parameters() if p.ndim == 4]
    grads = [torch.randn_like(w) for w in weights]
    conv = get_convention("timm")
    n = [w[0].numel() for w in weights]
    aws = [AdaptiveWeightStandardization(f, conv, w.shape[0]).to(args.device) for f, w in zip(n, weights)]
    for p, w in zip(aws, weights):
        p.init_from_weight(w)

    variants: dict[str, Callable[[torch.Tensor, int, int], torch.Tensor]] = {
        "ws: batch-norm kernel (shipped, timm/bit)": lambda w, f, i: standardize_weight(w, f, conv),
        "ws: closed form, in-place (shipped, paper/seed)": lambda w, f, i: _closed_form(
            w, f, False, True, conv.eps),
        "ws: closed form, first version": lambda w, f, i: _OldClosedForm.apply(w, f, conv.eps),
        "ws: closed form in float64": lambda w, f, i: _closed_form(
            w.double(), f, False, True, conv.eps).float(),
        "ws: plain autograd ops": lambda w, f, i: standardize_weight_reference(w, f, conv),
        "aws: batch norm + affine, one kernel (shipped)": lambda w, f, i: aws[i].standardized(w),
        "aws: closed form + addcmul": lambda w, f, i: _affine(
            _closed_form(w, f, False, True, conv.eps), f, aws[i].gamma, aws[i].beta),
    }
    if args.device.type == "cuda":
        from wsurgery.accumulate import _compiled_kernel

        compiled = _compiled_kernel()
        variants["ws: torch.compile"] = lambda w, f, i: compiled(w, f, False, True, conv.eps, None, None)
        variants["aws: torch.compile"] = lambda w, f, i: compiled(w, f, False, True, conv.eps,
                                                                  aws[i].gamma, aws[i].beta)

    def run(fn, backward: bool) -> Callable[[], None]:
        def go() -> None:
            leaves = [w.requires_grad_(backward) for w in weights]
            outs = [fn(w, f, i) for i, (w, f) in enumerate(zip(leaves, n))]
            if backward:
                torch.autograd.backward(outs, grads)
                for w in leaves:
                    w.grad = None
        return go

    copy = {"memory floor: one copy of the weights": lambda: [w.clone() for w in weights]}
    fwd = timer.interleaved({**{k: run(v, False) for k, v in variants.items()}, **copy}, args.kernel_rounds)
    with torch.enable_grad():
        bwd = timer.interleaved({k: run(v, True) for k, v in variants.items()}, args.kernel_rounds)
    rows = []
    numel = sum(w.numel() for w in weights)
    for name in fwd:
        rows.append({
            "name": name,
            "forward_ms": 1e3 * statistics.median(fwd[name]),
            "forward_backward_ms": 1e3 * statistics.median(bwd[name]) if name in bwd else None,
            "weights": numel,
            "convs": len(weights),
        })
    return rows


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, batches: list, args, once: bool) -> Callable[[], None]:
    def step() -> None:
        with (standardize_once(model) if once else contextlib.nullcontext()):
            for x, y in batches:
                with _ctx(args):
                    loss = F.cross_entropy(model(x).float(), y) / len(batches)
                loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _step_setup(ws: nn.Module, plain: nn.Module, args) -> tuple[dict[str, torch.optim.Optimizer], torch.Tensor,
                                                                  torch.Tensor]:
    """SGD-momentum optimizers for the pair, and one seeded batch of ``args.batch`` images and labels."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9) for k, m in (("ws", ws), ("plain", plain))}
    return opts, _input(args.batch, args.img_size, args), torch.randint(0, 1000, (args.batch,), device=args.device)


def bench_train(args, timer: Timer) -> list[dict]:
    rows = []
    for arch in args.train_archs:
        for mode in args.modes:
            ws, plain = _gn_pair(arch, mode, args)
            opts, x8, y8 = _step_setup(ws, plain, args)
            micro = [(_input(1, args.img_size, args, seed=i), y8[i % args.batch: i % args.batch + 1])
                     for i in range(args.accum)]
            fns = {
                "plain": _train_step(plain, opts["plain"], [(x8, y8)], args, False),
                "ws": _train_step(ws, opts["ws"], [(x8, y8)], args, False),
            }
            s = timer.interleaved(fns, args.rounds)
            rows.append(_ratio_row(f"{arch} {mode} b{args.batch}", s, "ws", "plain", arch=arch, mode=mode,
                                   batch=args.batch, img_size=args.img_size))
            fns = {
                "plain": _train_step(plain, opts["plain"], micro, args, False),
                "ws naive": _train_step(ws, opts["ws"], micro, args, False),
                "ws once": _train_step(ws, opts["ws"], micro, args, True),
            }
            s = timer.interleaved(fns, args.rounds)
            for variant, tag in (("ws naive", "naive"), ("ws once", "once")):
                rows.append(_ratio_row(f"{arch} {mode} accum{args.accum} {tag}", s, variant, "plain", arch=arch,
                                       mode=mode, batch=1, accum=args.accum, img_size=args.img_size))
            del ws, plain, opts
    return rows


def bench_compiled(args, timer: Timer) -> list[dict]:
    """The batch-8 training step of ``train``, with each whole model under ``torch.compile``.

    Eager WS adds two small kernels per conv, which on a GPU at small batches costs launch time
    rather than arithmetic; compiled, the standardization joins the model's graph (fused, and
    launched with it), which is how a GPU user would run it.
    """
    rows = []
    arch = args.train_archs[0]
    for mode in args.modes:
        ws, plain = _gn_pair(arch, mode, args)
        opts, x8, y8 = _step_setup(ws, plain, args)
        compiled = {k: torch.compile(m) for k, m in (("ws", ws), ("plain", plain))}
        fns = {k: _train_step(compiled[k], opts[k], [(x8, y8)], args, False) for k in ("plain", "ws")}
        t0 = time.perf_counter()
        for fn in fns.values():  # compile outside the timed rounds
            fn()
        compile_s = time.perf_counter() - t0
        s = timer.interleaved(fns, args.rounds, warmup=2)
        rows.append(_ratio_row(f"{arch} {mode} b{args.batch} compiled", s, "ws", "plain", arch=arch, mode=mode,
                               batch=args.batch, img_size=args.img_size, compile_s=compile_s))
        del ws, plain, opts, compiled
    return rows


def _load_export(model: nn.Module, directory: Path, fold_bn: bool, args) -> tuple[nn.Module, bool]:
    result = wsurgery.export(model, directory, fold_bn=fold_bn, force=True)
    if result.timm_compatible:  # stock timm rebuilds it: exactly what a deployment would run
        loaded = timm.create_model(f"local-dir:{directory}", pretrained=True)
    else:
        loaded = wsurgery.load(directory)
    return _prepare(loaded, args).eval(), result.timm_compatible


def _infer(model: nn.Module, x: torch.Tensor, args) -> Callable[[], None]:
    def go() -> None:
        with torch.no_grad(), _ctx(args):
            model(x)
    return go


def bench_infer(args, timer: Timer, tmp: Path) -> list[dict]:
    rows = []
    arch = args.infer_arch
    torch.manual_seed(0)
    original = timm.create_model(arch, pretrained=False)
    ws, _ = wsurgery.convert(original, mode="aws", inplace=False, trace=False)
    exported, stock = _load_export(ws, tmp / f"{arch}-export", False, args)
    original, ws = _prepare(original, args).eval(), _prepare(ws, args).eval()
    for batch in args.infer_batches:
        x = _input(batch, args.infer_size, args)
        calls = max(1, 8 // batch)
        cached = clone_model(ws)
        fns = {
            "original": _infer(original, x, args),
            "export": _infer(exported, x, args),
            "unfolded ws": _infer(ws, x, args),
            "unfolded ws, cached": _infer(cached, x, args),
        }
        # the cache: W_hat computed once (no graph) and reused by every forward in the block
        with torch.no_grad(), standardize_once(cached):
            s = timer.interleaved(fns, args.infer_rounds, calls=calls)
        for variant, tag in (("export", "export"), ("unfolded ws", "unfolded"), ("unfolded ws, cached", "cached")):
            rows.append(_ratio_row(f"{arch} {tag} b{batch}", s, variant, "original", batch=batch,
                                   img_size=args.infer_size, calls_per_sample=calls, export_loaded_by_stock_timm=stock))
    return rows


def bench_bit(args, timer: Timer) -> list[dict]:
    torch.manual_seed(0)
    bit = timm.create_model("resnetv2_50x1_bit", pretrained=False)
    folded = _prepare(wsurgery.fold(bit), args).eval()
    bit = _prepare(bit, args).eval()
    x = _input(1, args.infer_size, args)
    s = timer.interleaved({"timm": _infer(bit, x, args), "folded": _infer(folded, x, args)}, args.infer_rounds, calls=4)
    row = _ratio_row("resnetv2_50x1_bit folded/timm b1", s, "folded", "timm", batch=1, img_size=args.infer_size)
    flipped = {**row, "name": "resnetv2_50x1_bit timm/folded b1", "speedup": 1.0 / row["ratio"]}
    return [row, flipped]


def bench_fold_bn(args, timer: Timer, tmp: Path) -> list[dict]:
    arch = args.infer_arch
    torch.manual_seed(0)
    original = timm.create_model(arch, pretrained=False)
    _randomize_bn(original)
    ws, _ = wsurgery.convert(original, mode="aws", inplace=False, trace=False)
    exported, _ = _load_export(ws, tmp / f"{arch}-export-foldbn", True, args)
    folded_direct = _prepare(wsurgery.fold(original, fold_bn=True), args).eval()
    original = _prepare(original, args).eval()
    x = _input(1, args.infer_size, args)
    s = timer.interleaved({
        "original (eval BN)": _infer(original, x, args),
        "fold_bn export": _infer(exported, x, args),
        "wsurgery.fold(original, fold_bn=True)": _infer(folded_direct, x, args),
    }, args.infer_rounds, calls=4)
    rows = []
    for variant, tag in (("fold_bn export", "fold_bn"),
                         ("wsurgery.fold(original, fold_bn=True)", "fold(fold_bn) of timm")):
        row = _ratio_row(f"{arch} {tag} b1", s, variant, "original (eval BN)", batch=1, img_size=args.infer_size)
        row["speedup"] = 1.0 / row["ratio"]
        rows.append(row)
    return rows


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics, so folding BN really changes the weights."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


def bench_surgery(args, timer: Timer, tmp: Path) -> list[dict]:
    """convert / fold / export of resnet50: the core benchmark's ``run`` where present (CPU)."""
    arch = args.surgery_arch
    if args.device.type == "cpu":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from surgery_speed import run as surgery_speed_run
        except ImportError:
            surgery_speed_run = None
        finally:
            sys.path.pop(0)
        if surgery_speed_run is not None:
            rows = surgery_speed_run(arch, args.surgery_rounds, "aws", "gn")
            return [{"name": f"{arch} {step}", **r, "peak_mb": r["peak_mem_mb"], "target_s": 1.0,
                     "source": "benchmarks/surgery_speed.py run()"} for step, r in rows.items()]
    rows = []
    samples: dict[str, list[float]] = {"convert": [], "fold": [], "export": []}
    peaks: dict[str, float] = {}
    for r in range(args.surgery_rounds):
        torch.manual_seed(0)
        model = timm.create_model(arch, pretrained=False).to(args.device)
        with peak_memory(args.device) as mem:
            t = time.perf_counter()
            model, _ = wsurgery.convert(model, mode="aws", norm="gn")
            timer.sync()  # the GPU's queued work belongs to the step that queued it
            samples["convert"].append(time.perf_counter() - t)
        peaks["convert"] = max(peaks.get("convert", 0.0), mem["peak_mb"])
        with peak_memory(args.device) as mem:
            t = time.perf_counter()
            folded = wsurgery.fold(model)
            timer.sync()
            samples["fold"].append(time.perf_counter() - t)
        peaks["fold"] = max(peaks.get("fold", 0.0), mem["peak_mb"])
        del folded
        with peak_memory(args.device) as mem:
            t = time.perf_counter()
            wsurgery.export(model, tmp / f"surgery-{r}", force=True)
            timer.sync()
            samples["export"].append(time.perf_counter() - t)
        peaks["export"] = max(peaks.get("export", 0.0), mem["peak_mb"])
        del model
    params = sum(p.numel() for p in timm.create_model(arch, pretrained=False).parameters())
    for step, s in samples.items():
        rows.append({"name": f"{arch} {step}", "median_s": statistics.median(s), "min_s": min(s), "samples_s": s,
                     "peak_mb": peaks[step], "model_mb": params * 4 / 2**20, "target_s": 1.0})
    return rows


# ----------------------------------------------------------------------------- report


def _check_targets(results: dict[str, list[dict]]) -> list[dict]:
    out = []
    for section, row_name, column, op, bound in TARGETS:
        rows = {r["name"]: r for r in results.get(section, [])}
        if row_name not in rows:
            continue
        value = rows[row_name][column]
        met = value <= bound if op == "<=" else value >= bound
        out.append({"section": section, "row": row_name, "column": column, "target": f"{op} {bound}",
                    "value": value, "paired": rows[row_name].get("paired_ratio"), "met": met})
    return out


def _print_table(results: dict[str, list[dict]], targets: list[dict]) -> None:
    for section in SECTIONS:
        rows = results.get(section)
        if not rows:
            continue
        print(f"\n== {section}")
        if section == "kernels":
            print(f"{'kernel':52s} {'fwd ms':>9s} {'fwd+bwd ms':>11s}")
            for r in rows:
                fb = "" if r["forward_backward_ms"] is None else f"{r['forward_backward_ms']:11.1f}"
                print(f"{r['name']:52s} {r['forward_ms']:9.1f} {fb}")
        elif section == "surgery":
            print(f"{'step':30s} {'median s':>9s} {'min s':>8s} {'peak MB':>8s}")
            for r in rows:
                print(f"{r['name']:30s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['peak_mb']:8.0f}")
        else:
            print(f"{'comparison':42s} {'variant ms':>10s} {'ref ms':>9s} {'ratio':>7s} {'paired':>7s}")
            for r in rows:
                if "speedup" in r and "timm/folded" in r["name"]:
                    continue
                print(f"{r['name']:42s} {r['variant_ms']:10.1f} {r['reference_ms']:9.1f} "
                      f"{r['ratio']:7.3f} {r['paired_ratio']:7.3f}"
                      + (f"  (speedup {r['speedup']:.2f}x)" if "speedup" in r else ""))
    if targets:
        print("\n== targets")
        for t in targets:
            print(f"{t['row']:42s} {t['column']:8s} {t['value']:7.3f}  target {t['target']:8s} "
                  f"{'MET' if t['met'] else 'not met'}")


def _meta(args) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "wsurgery": wsurgery.__version__,
        "python": platform.python_version(),
        "device": str(args.device),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "argv": sys.argv[1:],
    }
    if args.device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(args.device)
        meta["autocast"] = "bf16"
        meta["memory_format"] = "channels_last"
    with contextlib.suppress(OSError):
        meta["loadavg_start"] = os.getloadavg()
    return meta


def _write(path: Path, results: dict[str, Any]) -> None:
    with atomic_file(path, force=True) as tmp:
        write_json(tmp, results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: resnet18 instead of resnet50, 64 px, 3 rounds")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: bf16 autocast, channels_last)")
    p.add_argument("--img-size", type=int, default=None, help="training image size (default 160; quick 64)")
    p.add_argument("--infer-size", type=int, default=None, help="inference image size (default: --img-size)")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds for training (default 5; quick 3)")
    p.add_argument("--infer-rounds", type=int, default=None, help="rounds for inference (default 7; quick 3)")
    p.add_argument("--modes", default="ws", help="WS modes to train: ws, aws or ws,aws (default ws)")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all but compiled)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON output (overwritten)")
    args = p.parse_args(argv)
    args.device = torch.device(args.device)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available here")
    q = args.quick
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {', '.join(SECTIONS)}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.img_size = args.img_size or (64 if q else 160)
    args.infer_size = args.infer_size or args.img_size
    args.rounds = args.rounds or (3 if q else 5)
    args.infer_rounds = args.infer_rounds or (3 if q else 7)
    args.kernel_rounds = 3 if q else 7
    args.surgery_rounds = 1 if q else 3
    args.batch, args.accum = 8, 8
    big = "resnet18" if q else "resnet50"
    args.train_archs = [big, "tf_efficientnet_lite0"]
    args.infer_arch = args.surgery_arch = args.kernel_arch = big
    args.infer_batches = [1, 8] if q else [1, 32]
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    timer = Timer(args.device)
    results: dict[str, Any] = {"meta": _meta(args)}
    with tempfile.TemporaryDirectory(prefix="wsurgery-perf-") as tmp_dir:
        tmp = Path(tmp_dir)
        runners = {
            "kernels": lambda: bench_kernels(args, timer),
            "surgery": lambda: bench_surgery(args, timer, tmp),  # first: peak memory of a fresh process
            "train": lambda: bench_train(args, timer),
            "compiled": lambda: bench_compiled(args, timer),
            "infer": lambda: bench_infer(args, timer, tmp),
            "bit": lambda: bench_bit(args, timer),
            "fold_bn": lambda: bench_fold_bn(args, timer, tmp),
        }
        for section in sorted(args.sections, key=lambda s: (s != "surgery", SECTIONS.index(s))):
            t = time.perf_counter()
            print(f"[perf] {section} ...", file=sys.stderr, flush=True)
            results[section] = runners[section]()
            results["meta"][f"{section}_wall_s"] = time.perf_counter() - t
            _write(args.out, {**results, "partial": True})  # a long run interrupted keeps what it measured
    with contextlib.suppress(OSError):
        results["meta"]["loadavg_end"] = os.getloadavg()
    results["targets"] = _check_targets(results)
    _print_table(results, results["targets"])
    _write(args.out, results)
    print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
