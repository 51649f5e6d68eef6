"""``wsurgery demo``: the whole flow on real weights and real data, timed, with a final table."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from wsurgery.demo import DemoConfig, DemoStep, run_demo

from ._common import SEED_MAX, check_at_least, console, fail, flag, handle_errors
from .train import ProgressView


@handle_errors
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), "--workdir", "-o", help="Where data, runs and export go."),
    quick: bool = flag(False, "--quick", help="A tiny version (tests, CI): under a minute, low accuracy."),
    img_size: int | None = typer.Option(None, "--img-size", help="Resolution (default 48, quick 32)."),
    train_per_class: int | None = typer.Option(None, "--train-per-class", help="Training images per class."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=SEED_MAX,
                                    help="Seeds the data subset, calibration, fine-tune (default 0)."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; "
                                          "1 is faster on a busy machine)."),
    calib_precondition: bool = flag(
        False, "--calib-precondition", help="Calibrate with gn-init's preconditioning of every layer (see convert; "
        "the README measures what it does to this demo at --gn-groups 32 --no-calib-anchor)."),
    calib_anchor: bool | None = flag(
        None, "--calib-anchor/--no-calib-anchor", show_default=False,
        help="Calibrate with or without gn-init's anchoring (default: with; see convert; the README measures what "
        "it does to this demo at --gn-groups 32)."),
    gn_groups: int | None = typer.Option(None, "--gn-groups", help="GroupNorm groups of the conversion (default 1: "
                                         "it keeps more of the original than convert's default, timm's 32)."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE",
        help="Override a key of the fine-tune's recipe (micro-batch), after the demo's own: "
        "--set lr=0.001 (repeatable; the demo sets epochs=2, warmup_steps=5, lr=0.003; with --quick "
        "epochs=1, warmup_steps=1, accum_steps=4)."),
    force: bool = flag(False, "--force", help="Delete and redo an existing work directory."),
) -> None:
    """EfficientNet-Lite0 (real ImageNet weights) -> adaptive WS + GN -> calibrate -> micro-batch fine-tune on
    Fashion-MNIST -> export -> verify -> predict, with timings."""
    check_at_least(("--threads", threads, 1), ("--img-size", img_size, 16), ("--train-per-class", train_per_class, 1),
                   ("--gn-groups", gn_groups, 1))
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = DemoConfig.quick() if quick else DemoConfig()
    if img_size is not None:
        cfg.img_size = img_size
    if train_per_class is not None:
        cfg.train_per_class = train_per_class
    if seed is not None:
        cfg.seed = seed
    if gn_groups is not None:
        cfg.gn_groups = gn_groups
    cfg.calib_precondition = calib_precondition
    cfg.calib_anchor = calib_anchor
    cfg.overrides = list(cfg.overrides) + list(set_)
    view = ProgressView()

    def on_step(name: str, step: DemoStep | None) -> None:
        if step is None:
            console.print(f"[bold cyan]>[/] {name} ...")
        else:
            console.print(f"  [green]done[/] {name} in {step.seconds:.1f} s: {step.detail}")

    try:
        result = run_demo(workdir, config=cfg, force=force, callback=on_step, train_callback=view)
    finally:
        view.stop()
    table = Table(title="wsurgery demo: EfficientNet-Lite0 -> adaptive WS + GN -> Fashion-MNIST", title_justify="left")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    table.add_column("result", overflow="fold")
    for s in result.steps:
        table.add_row(s.name, f"{s.seconds:.1f}", s.detail)
    table.add_row("[bold]total", f"[bold]{result.seconds:.1f}", "")
    console.print(table)
    summary = Table(show_header=False, title="summary", title_justify="left")
    summary.add_row("test accuracy before fine-tuning", f"{result.accuracy_before:.1f}%")
    summary.add_row("test accuracy after fine-tuning", f"{result.accuracy_after:.1f}%")
    summary.add_row("export max |diff| (vs trained WS model)", f"{result.export_max_abs:.2e}")
    summary.add_row("export verified", "pass" if result.export_passed else "FAIL")
    summary.add_row("total time", f"{result.seconds / 60:.1f} min")
    summary.add_row("everything is in", str(result.workdir))
    console.print(summary)
    for p in result.predictions:
        top = ", ".join(f"{n} {q:.0%}" for n, q in p["top3"])
        console.print(f"  {Path(p['image']).name} (true: {p['true']}): {top}")
    if not result.export_passed:
        raise fail("the export does not reproduce the trained model")
