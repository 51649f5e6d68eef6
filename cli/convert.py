"""``wsurgery convert``: load a timm model, convert it, optionally calibrate it, save the surgery directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from torch import nn

import wsurgery
from wsurgery.calibrate import (
    METHODS,
    CalibrationConfig,
    CalibrationProgress,
    CalibrationResult,
    anchored_convs,
    calibrate,
    calibration_split,
    dataset_train_split,
    needs_lower_lr,
)
from wsurgery.compare import CONFIDENT
from wsurgery.config import SurgeryConfig
from wsurgery.errors import CheckpointError, ConfigError, UsageError
from wsurgery.io import CONFIG_NAME
from wsurgery.load import checkpoint_num_classes

from ._common import (
    SEED_MAX,
    check_at_least,
    confident_cell,
    console,
    err_console,
    flag,
    handle_errors,
    kv_table,
    note,
    print_json,
)

#: config fields -> the flags that set them, so a bad value is reported by the name the user typed
FLAGS = {"steps": "--calib-steps", "batch_size": "--calib-batch", "train": "--calib-train", "lr": "--calib-lr",
         "distill_size": "--calib-size", "max_seconds": "--calib-seconds", "temperature": "--calib-temperature",
         **{f: "--" + f.replace("_", "-") for f in ("mode", "convention", "eps", "norm", "gn_groups", "gn_group_size",
                                                   "gn_group_rule")}}


def _flag_error(e: ConfigError) -> ConfigError:
    message = str(e)
    for field, option in FLAGS.items():
        message = message.replace(f"`{field}`", option)
    return ConfigError(message)


def report_table(report: wsurgery.SurgeryReport, limit: int = 12) -> Table:
    table = Table(title="surgery", title_justify="left")
    for col in ("module", "old type", "new type", "params", "note"):
        table.add_column(col, overflow="fold")
    for c in report.changes[:limit]:
        table.add_row(c.name, c.old_type, c.new_type, f"{c.params_before:,} -> {c.params_after:,}", c.note)
    if len(report.changes) > limit:
        table.add_row(f"... {len(report.changes) - limit} more", "", "", "", "(wsurgery inspect lists all)")
    return table


class CalibrationView:
    """Renders :class:`CalibrationProgress` as one rich progress bar per phase."""

    def __init__(self) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description:<9}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"), TimeElapsedColumn(), transient=False,
            console=err_console,  # progress on stderr, as train's: stdout holds the result (--json)
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> CalibrationView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: CalibrationProgress) -> None:
        if event.phase not in self.tasks:
            self.tasks[event.phase] = self.progress.add_task(event.phase, total=event.total, loss="")
        loss = f"KL {event.loss:.4f}" if event.loss is not None else ""
        self.progress.update(self.tasks[event.phase], completed=event.step, total=event.total, loss=loss)


def calibration_table(result: CalibrationResult) -> Table:
    table = Table(title=f"calibration ({' + '.join(result.phases) or 'none'})", title_justify="left")
    for col in ("held-out images", "top-1 agreement", f"top-1, original confident (p >= {CONFIDENT:g})",
                "top-5 overlap", "KL"):
        table.add_column(col, overflow="fold")
    for label, a in (("before", result.before), ("after", result.after)):
        if a is not None:
            table.add_row(f"{label} ({a.num_images})", f"{a.top1:.1%}", confident_cell(a), f"{a.top5_overlap:.1%}",
                          f"{a.kl:.4f}")
    return table


def _load_for_calibration(source: str, pretrained: bool | None, checkpoint: Path | None, remap_by_order: bool,
                          num_classes: int | None, calibrating: bool) -> tuple[nn.Module, int | None]:
    """The model to convert, and the classifier size to give it after calibration (None: as loaded).

    Calibration matches the original's outputs; a new ``--num-classes`` head is random, and matching
    it would match a random projection of the features. So when calibrating, the model is loaded
    with its own classifier (where it has one that loads) and gets the new head after calibration.
    """
    if calibrating and num_classes is not None:
        try:
            original = wsurgery.load(source, pretrained=pretrained, checkpoint=checkpoint,
                                     remap_by_order=remap_by_order)
        except CheckpointError:  # a fine-tuned checkpoint's head: the original is the model with that head
            classes = checkpoint_num_classes(source, checkpoint, remap_by_order=remap_by_order) if checkpoint else None
            try:
                original = None if classes in (None, num_classes) else wsurgery.load(
                    source, checkpoint=checkpoint, remap_by_order=remap_by_order, num_classes=classes)
            except CheckpointError:  # the backbone does not fit either: the load below says why
                original = None
        # a Linear head only: a conv classifier (dla, dpn) would be converted with the body, and the new
        # head put in after surgery would not be; such a model is calibrated with its new head as before
        if original is not None and isinstance(original.get_classifier(), nn.Linear):
            same = getattr(original, "num_classes", None) == num_classes
            return original, None if same else num_classes
    return wsurgery.load(source, pretrained=pretrained, checkpoint=checkpoint, remap_by_order=remap_by_order,
                         num_classes=num_classes), None


def _summary_rows(report: wsurgery.SurgeryReport, result: CalibrationResult | None,
                  classifier: tuple[int, int] | None, output: Path, anchored: int | None = 0
                  ) -> list[tuple[str, object]]:
    """The summary table's rows; ``classifier`` is (the original's classes, the new head's) when swapped,
    ``anchored`` the number of convs gn-init's anchoring changed (None: anchoring was turned off)."""
    unnormalized = report.convs_without_norm
    rows: list[tuple[str, object]] = [
        ("convs standardized", report.num_convs),
        ("norms replaced", report.num_norms),
        ("already WS (timm)", len(report.already_standardized)),
        ("convs not followed by a norm", "unknown (not traceable)" if unnormalized is None else
         f"{len(unnormalized)}" + (f" (+{len(report.convs_not_traced)} inside untraced modules, not judged)"
                                   if report.convs_not_traced else "")),
        ("params", f"{report.params_before:,} -> {report.params_after:,}"),
    ]
    if report.other_convs:  # Conv1d/Conv3d/transposed: WS is for the model's 2-D convs
        rows.insert(3, ("other convs, left as they are", f"{len(report.other_convs)} (e.g. {report.other_convs[0]})"))
    if result is not None:
        rows.append(("calibration", f"{result.num_images} images, {result.steps} distill steps, "
                                    f"{result.seconds:.1f} s"))
        if "gn-init" in result.phases:
            rows.append(("GroupNorms anchored", "off (--no-calib-anchor)" if anchored is None else
                         f"{anchored} of {report.num_norms}" + ("" if anchored else ": none it can anchor (plain WS, "
                                                                 "one-channel groups, half precision or untraceable)")))
    if classifier is not None:
        rows.append(("classifier", f"calibrated with the original's {classifier[0]} classes, then a new head "
                                   f"of {classifier[1]}"))
    rows.append(("saved to", output))
    return rows


@handle_errors
def convert(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="timm model name, hf-hub:org/name, or a saved directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the converted model to."),
    pretrained: bool | None = flag(
        None, "--pretrained/--no-pretrained", help="Fetch timm's pretrained weights (needs a network). "
        "Default: yes, unless --checkpoint is given."),
    checkpoint: Path | None = typer.Option(None, "--checkpoint", help=".safetensors, .pth, .bin or .pt weights."),
    remap_by_order: bool = flag(
        False, "--remap-by-order", help="Match checkpoint tensors to the model in order."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Replace the classifier with N classes."),
    mode: str = typer.Option("ws", "--mode", help="ws: plain standardization; aws: adaptive (exact at conversion)."),
    convention: str = typer.Option("timm", "--convention", help="WS formula: timm, bit, paper or seed."),
    eps: float | None = typer.Option(None, "--eps", help="Override the convention's eps."),
    include: list[str] = typer.Option(
        [], "--include", metavar="PATTERN", help="Only convert convs matching this pattern (repeatable)."),
    exclude: list[str] = typer.Option(
        [], "--exclude", metavar="PATTERN", help="Skip convs matching this pattern (repeatable)."),
    norm: str = typer.Option("keep", "--norm", help="keep: keep BatchNorm; gn: replace it with GroupNorm."),
    gn_groups: int = typer.Option(32, "--gn-groups", help="Target GroupNorm groups (1 keeps far more of the "
                                  "pretrained function through calibration; README: calibrate)."),
    gn_group_size: int | None = typer.Option(None, "--gn-group-size", help="Channels per group (overrides groups)."),
    gn_group_rule: str = typer.Option(
        "gcd", "--gn-group-rule", help="When channels don't divide: gcd, divisor, error."),
    calibrate_method: str | None = typer.Option(
        None, "--calibrate", help=f"Calibrate against the original: {', '.join(METHODS)} "
        "(default: auto when --calib-data is given, else none)."),
    calib_data: list[str] = typer.Option(
        [], "--calib-data", metavar="PATH",
        help="Unlabeled calibration images: files, a folder, a dataset folder or a glob (repeatable)."),
    calib_images: int = typer.Option(256, "--calib-images", help="Use at most N calibration images (or crops)."),
    calib_crops: int = typer.Option(
        1, "--calib-crops", help="1: center crop of each file; N: N random resized crops/flips of each file."),
    calib_held_out: float = typer.Option(
        0.25, "--calib-held-out", help="Fraction of the calibration images kept out to measure agreement."),
    calib_steps: int = typer.Option(150, "--calib-steps", help="Distillation steps."),
    calib_batch: int = typer.Option(32, "--calib-batch", help="Images per distillation step."),
    calib_train: str = typer.Option(
        "auto", "--calib-train", help="Distill: affine (norms + AWS gain/shift), all, or auto."),
    calib_lr: float | None = typer.Option(None, "--calib-lr", help="Distillation learning rate (AdamW)."),
    calib_size: int | None = typer.Option(
        None, "--calib-size", help="Distill at this input resolution (faster; default: the model's)."),
    calib_seconds: float | None = typer.Option(None, "--calib-seconds", help="Stop distilling after N seconds."),
    calib_temperature: float | None = typer.Option(
        None, "--calib-temperature",
        help=f"Softmax temperature of the distillation KL (default: {CalibrationConfig.temperature:g})."),
    calib_augment: bool = flag(
        False, "--calib-augment/--no-calib-augment",
        help="Distill on fresh random crops, flips and blends of the images each step instead of the fixed images."),
    calib_precondition: bool = flag(
        False, "--calib-precondition/--no-calib-precondition",
        help="gn-init: first standardize every adaptive-WS conv output that feeds a GroupNorm with the replaced "
             "BatchNorm's running statistics (adds a bias to those convs). Anchoring, the default, already does it for "
             "the layers it anchors; with --no-calib-anchor it keeps more of the original, but fine-tune it at "
             "lr <= 0.003: see the README."),
    calib_anchor: bool | None = flag(
        None, "--calib-anchor/--no-calib-anchor", show_default=False,
        help="gn-init: hold each GroupNorm's per-image statistics nearly constant with channel offsets and signs "
             "fitted to the calibration images, after preconditioning the layers it anchors (closest to the "
             "original; fine-tune it in fp32 or with amp=fp16, not bf16: see the README). Default: on wherever it "
             "applies (--mode aws --norm gn, float32); --no-calib-anchor turns it off."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX,
                             help="Seeds the image choice, crops, held-out split and batch order."),
    force: bool = flag(False, "--force", help="Overwrite the output if it exists."),
    as_json: bool = flag(False, "--json", help="Print the result as JSON (the surgery report and calibration)."),
) -> None:
    """Convert every conv of a timm model to Weight Standardization (optionally BN -> GN), calibrate, save."""
    try:
        config = SurgeryConfig(
            mode=mode, convention=convention, eps=eps, include=include, exclude=exclude, norm=norm,
            gn_groups=gn_groups, gn_group_size=gn_group_size, gn_group_rule=gn_group_rule,
        )
        calib_overrides = dict(steps=calib_steps, batch_size=calib_batch, train=calib_train, lr=calib_lr,
                               distill_size=calib_size, max_seconds=calib_seconds, augment=calib_augment,
                               precondition=calib_precondition, anchor=calib_anchor,
                               **({"temperature": calib_temperature} if calib_temperature is not None else {}))
        CalibrationConfig(**calib_overrides)  # bad values fail here, before the (slow) load
    except ConfigError as e:
        raise _flag_error(e) from None
    method = calibrate_method or ("auto" if calib_data else "none")
    if method not in METHODS:
        raise UsageError(f"--calibrate must be one of {', '.join(METHODS)}, got {method!r}")
    if method != "none" and not calib_data:
        raise UsageError(f"--calibrate {method} needs unlabeled images: pass --calib-data PATH (folder, files or glob)")
    if calibrate_method is None and method == "none":  # every calibration setting would be ignored silently
        # (an explicit --calibrate none is an off switch: scripts pass it with their usual --calib-* flags)
        # the parameters only calibration reads are the calib_* ones; their source by name: typer runs on
        # its own vendored click (0.2x) or on click itself, each with its own enum
        given = [name for name in ctx.params if name.startswith("calib_")
                 and getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]
        if given:
            flag_name = "--" + given[0].replace("_", "-")
            if ctx.params[given[0]] is False:  # an on/off switch turned off: name it as the user typed it
                flag_name = "--no-" + flag_name[2:]
            raise UsageError(f"{flag_name} has no effect: calibration is off (no --calib-data); "
                             "pass --calib-data PATH to calibrate, or drop it")
    for given, flag_name in ((calib_anchor, "--calib-anchor"), (calib_precondition, "--calib-precondition")):
        if given and method != "none" and (norm != "gn" or method not in ("auto", "gn-init")):
            # before the (slow) load; calibrate itself refuses it too
            fix = "add --norm gn" if norm != "gn" else f"--calibrate {method} does not run it: use auto or gn-init"
            raise UsageError(f"{flag_name} is a step of gn-init, for models whose BatchNorms become GroupNorm; "
                             f"{fix}, or drop it")
        if given and method != "none" and mode != "aws":  # it rescales adaptive WS gains: plain WS has none
            raise UsageError(f"{flag_name} works on adaptive WS convs, and --mode {mode} has none; "
                             "use --mode aws, or drop it")
    if not 0 <= calib_held_out < 1:
        raise UsageError(f"--calib-held-out must be a fraction in [0, 1), got {calib_held_out}")
    check_at_least(("--calib-images", calib_images, 1), ("--calib-crops", calib_crops, 1))
    # fail before the (slow) load; --force never deletes the model, checkpoint or images it reads
    wsurgery.io.check_output(output, force, inputs=(model, checkpoint, *(calib_data or ())),
                             markers=(CONFIG_NAME,), create_parent=False)
    with err_console.status(f"loading {escape(model)}"):
        net, new_head = _load_for_calibration(model, pretrained, checkpoint, remap_by_order, num_classes,
                                              calibrating=method != "none")
    images = None
    if method != "none":
        for item in calib_data:
            if (train_split := dataset_train_split(item)) is not None:
                note(f"{item} is a dataset root: calibrating on {train_split} only (its evaluation splits are left "
                     "for judging the model)")
        with err_console.status("reading calibration images"):
            # with several crops per file, the held-out crops come from photos not calibrated on
            images, held_out = calibration_split(calib_data, net, calib_held_out, limit=calib_images, seed=seed,
                                                 crops_per_image=calib_crops)
    student, report = wsurgery.convert(net, config, inplace=method == "none")
    result = None
    if images is not None:
        params = sum(p.numel() for p in student.parameters())
        with CalibrationView() as view:
            result = calibrate(student, net, images, method=method, held_out=held_out, seed=seed,
                               progress=view, **calib_overrides)
        # gn-init's anchoring or preconditioning gives convs a bias: the report counts the model as saved
        report.params_after += sum(p.numel() for p in student.parameters()) - params
    if new_head is not None:  # calibrated against the original classifier; now the one asked for
        before = sum(p.numel() for p in student.get_classifier().parameters())
        student.reset_classifier(new_head)
        change = sum(p.numel() for p in student.get_classifier().parameters()) - before
        report.params_before += change  # the report counts the model as saved
        report.params_after += change
    wsurgery.save(student, output, report=report, force=force)
    if as_json:
        print_json({"output": str(output), "config": config.to_dict(), "report": report.to_dict(),
                    "calibration": result.to_dict() if result is not None else None,
                    "num_classes": getattr(student, "num_classes", None)})
    else:
        console.print(report_table(report))
        if result is not None:
            console.print(calibration_table(result))
            for text in result.notes:
                note(text)
        classifier = (net.num_classes, new_head) if new_head is not None else None
        anchored = None if calib_anchor is False else len(anchored_convs(student))
        console.print(kv_table("summary", _summary_rows(report, result, classifier, output, anchored)))
    if needs_lower_lr(student):  # measured: calibrate.needs_lower_lr
        note("preconditioned models fine-tune at a lower learning rate: pass --set lr=0.003 "
             "(or lower) to wsurgery train")
    if result is None and config.norm == "gn" and (pretrained is not False or checkpoint is not None):
        # measured (benchmarks/calibration.py --part sgd): uncalibrated AWS + GN does not learn under SGD
        note("BN was replaced by GN without calibration, so the model has lost its pretrained "
             "function; pass --calib-data PATH (unlabeled images) to calibrate the GN layers")
