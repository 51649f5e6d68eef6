"""``wsurgery inspect``: a per-layer table of what the surgery changed."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

import wsurgery

from ._common import console, flag, handle_errors, kv_table, print_json


@handle_errors
def inspect(
    path: str = typer.Argument(..., help="A surgery directory, an export directory, or a timm model name."),
    all_layers: bool = flag(False, "--all", help="List every layer (default: the first 40)."),
    as_json: bool = flag(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Show each conv and norm layer: type, standardization, groups; and how an export loads."""
    source = path if Path(path).exists() else wsurgery.load(path, pretrained=False)
    summary = wsurgery.inspect(source)
    if as_json:
        print_json(summary.to_dict())
        return
    table = Table(title=f"{summary.architecture} ({summary.stage})", title_justify="left")
    for col in ("layer", "type", "detail", "params"):
        table.add_column(col, overflow="fold")
    rows = summary.rows if all_layers else summary.rows[:40]
    for r in rows:
        table.add_row(r.name, r.type, r.detail, f"{r.params:,}")
    if len(rows) < len(summary.rows):
        table.add_row(f"... {len(summary.rows) - len(rows)} more (--all)", "", "", "")
    console.print(table)
    facts = [("stage", summary.stage), ("params", f"{summary.num_params:,}")]
    facts += [(k, v) for k, v in sorted(summary.counts.items())]
    if summary.surgery:
        s = summary.surgery
        facts.append(("surgery", f"mode={s['mode']} convention={s['convention']} norm={s['norm']}"))
    if summary.loader:
        facts.append(("export loads with", summary.loader))
    console.print(kv_table("summary", facts))
