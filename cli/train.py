"""``wsurgery train``: fine-tune a converted model on a labelled dataset with a recipe."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from wsurgery.recipes import recipe_reference
from wsurgery.train import TrainEvent
from wsurgery.train import train as train_model

from ._common import SEED_MAX, console, err_console, fail, flag, handle_errors, kv_table, note, print_json


def recipe_table() -> Table:
    table = Table(title="recipe keys", title_justify="left")
    for col in ("key", "type", "default", "meaning"):
        table.add_column(col, overflow="fold")
    for row in recipe_reference():
        table.add_row(*(escape(str(cell)) for cell in row))  # "[min, max]" is text, not rich markup
    return table


class ProgressView:
    """Renders :class:`TrainEvent` s as a rich progress bar (step, loss, lr, images/s, ETA) and epoch lines."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.3g}  {task.fields[ips]:.1f} img/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,  # progress on stderr: stdout holds the result
            transient=False,
        )
        self.task = None

    def __call__(self, event: TrainEvent) -> None:
        if event.kind == "start":
            for text in event.notes:
                note(text)
            self.progress.start()
            self.task = self.progress.add_task("train", total=event.total_steps, completed=event.step,
                                               epoch=event.epoch + 1, epochs=event.epochs, loss=float("nan"),
                                               lr=0.0, ips=0.0)
        elif event.kind == "step" and self.task is not None:
            self.progress.update(self.task, completed=event.step, epoch=event.epoch + 1, loss=event.loss,
                                 lr=event.lr, ips=event.images_per_s)
        elif event.kind == "epoch" and event.metrics:
            m = event.metrics
            val = (f"val loss {m['val_loss']:.4f}  top-1 {m['top1']:.2f}%  top-5 {m['top5']:.2f}%"
                   if "top1" in m else "no validation set")
            self.progress.console.print(f"epoch {event.epoch}/{event.epochs}: train loss {m['train_loss']:.4f}  "
                                        f"{val}  ({m['seconds']:.1f} s)")
        elif event.kind == "end":
            self.stop()

    def stop(self) -> None:
        if self.task is not None:
            self.progress.stop()


@handle_errors
def train(
    model: str | None = typer.Argument(None, help="Surgery directory from `wsurgery convert`, or a timm model "
                                          "name (the BatchNorm baseline). Not needed with --resume."),
    data: Path | None = typer.Option(None, "--data", "-d", help="ImageFolder root (train/ + val/, or class "
                                        "folders) or a CSV with path,label columns."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Run directory (best model, last checkpoint, "
                                          "metrics)."),
    recipe: str | None = typer.Option(None, "--recipe", "-r", help="Recipe YAML, or a shipped name: "
                                         "bit-hyperrule, micro-batch, linear-probe, cpu-quick."),
    set_: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Override a recipe key: --set batch_size=2 (repeatable)."),
    val_data: Path | None = typer.Option(None, "--val-data", help="Validation folder or CSV."),
    val_split: float | None = typer.Option(None, "--val-split", help="Hold out this fraction of each class "
                                              "when there is no validation set (recipe key val_split)."),
    img_size: int | None = typer.Option(None, "--img-size", help="Resolution (recipe key img_size)."),
    seed: int | None = typer.Option(None, "--seed", min=0, max=SEED_MAX,
                                    help="Seed of data order, augmentation, mixup and dropout (recipe key seed)."),
    device: str | None = typer.Option(
        None, "--device", help="cuda, mps or cpu (default: $WSURGERY_DEVICE, else the best available)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue an interrupted run exactly."),
    export: Path | None = typer.Option(None, "--export", help="After training, fold, export and verify here."),
    pretrained: bool | None = flag(None, "--pretrained/--no-pretrained",
                                              help="For a timm name: fetch timm's weights (needs a network)."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help="For a timm name: local weights."),
    remap_by_order: bool = flag(False, "--remap-by-order", help="For --checkpoint: match tensors in order."),
    force: bool = flag(False, "--force", help="Overwrite the output (and export) if they exist."),
    help_recipe: bool = flag(False, "--help-recipe", help="List every recipe key and exit."),
    as_json: bool = flag(False, "--json", help="Print the result as JSON (history, best, export check); "
                                               "progress stays on stderr."),
) -> None:
    """Fine-tune a model on your images; writes the best model (a surgery directory), checkpoints and metrics."""
    if help_recipe:
        console.print(recipe_table())
        return
    if resume is None and (model is None or output is None):
        raise fail("train needs MODEL and --output (or --resume RUN_DIR)", 2)
    if resume is not None:  # a resumed run continues with its own recipe: these would not apply
        # (--set may change what does not change the result, e.g. workers: the library checks the keys)
        given = [flag for flag, value in (("--recipe", recipe), ("--img-size", img_size),
                                          ("--val-split", val_split), ("--seed", seed)) if value is not None]
        if given:
            raise fail(f"{', '.join(given)} cannot change a resumed run (it continues with the recipe it was "
                       "started with); drop them, or start a new run", 2)
    overrides = list(set_)
    if val_split is not None:
        overrides.append(f"val_split={val_split}")
    if img_size is not None:
        overrides.append(f"img_size={img_size}")
    if seed is not None:
        overrides.append(f"seed={seed}")
    load_kwargs = {"pretrained": pretrained, "checkpoint": checkpoint, "remap_by_order": remap_by_order}
    if model is not None and Path(model).is_dir():
        if checkpoint is not None:  # the directory's own weights would be trained, the checkpoint never read
            raise fail(f"{model} is a saved directory and already holds its weights; drop --checkpoint", 2)
        if remap_by_order or pretrained is not None:  # they would be ignored silently
            given = "--remap-by-order" if remap_by_order else "--pretrained/--no-pretrained"
            raise fail(f"{model} is a saved directory and already holds its weights; {given} does not apply to it "
                       "(drop it)", 2)
        load_kwargs = {}
    view = ProgressView()
    try:
        result = train_model(model, data, output, recipe, overrides=overrides or None, val_data=val_data,
                             device=device, resume=resume, export=export, force=force, callback=view,
                             load_kwargs=load_kwargs)
    finally:  # on a NaN stop or Ctrl-C the library has written/kept the checkpoint; handle_errors prints why
        view.stop()
    if view.task is None:  # nothing ran (a finished run resumed): its notes were not shown at a start
        for text in result.notes:
            note(text)
    rows = [("output", result.output), ("steps", result.steps), ("classes", len(result.class_names))]
    if result.best and result.best.get("top1", -1) >= 0:
        rows.append(("best val top-1", f"{result.best['top1']:.2f}% (epoch {result.best['epoch']})"))
    if result.skipped_files:
        rows.append(("skipped files", len(result.skipped_files)))
    if result.export is not None:
        rows.append(("export", result.export.directory))
        verdict = "pass" if result.verify.passed else "FAIL"
        rows.append(("export max |diff|", f"{result.verify.max_abs:.3g} ({verdict})"))
    rows.append(("time", f"{result.seconds:.1f} s"))
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(kv_table("train", rows))
    if result.verify is not None and not result.verify.passed:
        raise fail(f"export differs from the trained model: max rel diff {result.verify.max_rel:.3g}")
