"""``wsurgery convert``: load a timm model, convert it, save the surgery directory."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

import wsurgery
from wsurgery.config import SurgeryConfig

from ._common import console, handle_errors, kv_table


def report_table(report: wsurgery.SurgeryReport, limit: int = 12) -> Table:
    table = Table(title="surgery", title_justify="left")
    for col in ("module", "old type", "new type", "params", "note"):
        table.add_column(col)
    for c in report.changes[:limit]:
        table.add_row(c.name, c.old_type, c.new_type, f"{c.params_before:,} -> {c.params_after:,}", c.note)
    if len(report.changes) > limit:
        table.add_row(f"... {len(report.changes) - limit} more", "", "", "", "(wsurgery inspect lists all)")
    return table


@handle_errors
def convert(
    model: str = typer.Argument(..., help="timm model name, hf-hub:org/name, or a saved directory."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write the converted model to."),
    pretrained: Optional[bool] = typer.Option(
        None, "--pretrained/--no-pretrained", help="Fetch timm's pretrained weights (needs a network). "
        "Default: yes, unless --checkpoint is given."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help=".safetensors, .pth, .bin or .pt weights."),
    remap_by_order: bool = typer.Option(False, "--remap-by-order", help="Match checkpoint tensors to the model in order."),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="Replace the classifier with N classes."),
    mode: str = typer.Option("ws", "--mode", help="ws: plain standardization; aws: adaptive (exact at conversion)."),
    convention: str = typer.Option("timm", "--convention", help="WS formula: timm, bit, paper or seed."),
    eps: Optional[float] = typer.Option(None, "--eps", help="Override the convention's eps."),
    include: list[str] = typer.Option([], "--include", help="Only convert convs matching this pattern (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", help="Skip convs matching this pattern (repeatable)."),
    norm: str = typer.Option("keep", "--norm", help="keep: keep BatchNorm; gn: replace it with GroupNorm."),
    gn_groups: int = typer.Option(32, "--gn-groups", help="Target GroupNorm groups."),
    gn_group_size: Optional[int] = typer.Option(None, "--gn-group-size", help="Channels per group (overrides groups)."),
    gn_group_rule: str = typer.Option("gcd", "--gn-group-rule", help="When channels don't divide: gcd, divisor, error."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
) -> None:
    """Convert every conv of a timm model to Weight Standardization (optionally BN -> GN) and save it."""
    config = SurgeryConfig(
        mode=mode, convention=convention, eps=eps, include=include, exclude=exclude, norm=norm,
        gn_groups=gn_groups, gn_group_size=gn_group_size, gn_group_rule=gn_group_rule,
    )
    wsurgery.io.check_output(output, force)  # fail before the (slow) load
    with console.status(f"loading {model}"):
        net = wsurgery.load(model, pretrained=pretrained, checkpoint=checkpoint,
                            remap_by_order=remap_by_order, num_classes=num_classes)
    net, report = wsurgery.convert(net, config)
    wsurgery.save(net, output, report=report, force=force)
    console.print(report_table(report))
    unnormalized = report.convs_without_norm
    console.print(kv_table("summary", [
        ("convs standardized", report.num_convs),
        ("norms replaced", report.num_norms),
        ("already WS (timm)", len(report.already_standardized)),
        ("convs not followed by a norm", "unknown (not traceable)" if unnormalized is None else len(unnormalized)),
        ("params", f"{report.params_before:,} -> {report.params_after:,}"),
        ("saved to", output),
    ]))
