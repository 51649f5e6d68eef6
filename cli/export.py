"""``wsurgery export``: fold and write plain-conv weights in timm's hub layout."""

from __future__ import annotations

from pathlib import Path

import typer

import wsurgery

from ._common import console, fail, handle_errors, kv_table


@handle_errors
def export(
    source: str = typer.Argument(..., help="A surgery directory (or a timm model name with its own StdConv2d)."),
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to write."),
    fold_bn: bool = typer.Option(False, "--fold-bn", help="Also fold each BatchNorm that follows a conv into it."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Reload the export and compare with the source."),
    force: bool = typer.Option(False, "--force", help="Overwrite the output if it exists."),
) -> None:
    """Fold the standardization into plain conv weights and export config.json + model.safetensors."""
    wsurgery.io.check_output(output, force)
    with console.status(f"loading {source}"):
        model = wsurgery.load(source, pretrained=False) if not Path(source).exists() else wsurgery.load(source)
    with console.status("folding and writing"):
        result = wsurgery.export(model, output, fold_bn=fold_bn, dtype=dtype, force=force)
    rows = [
        ("written", result.directory),
        ("dtype", result.dtype),
        ("BN folded into convs", len(result.fold_bn)),
        ("loads with", "stock timm: timm.create_model('local-dir:DIR', pretrained=True)"
         if result.timm_compatible else "wsurgery.load(DIR) (timm's constructor args cannot express it)"),
    ]
    if verify:
        check = wsurgery.verify(output, model)
        rows += [("max |diff|", f"{check.max_abs:.3g}"), ("max rel diff", f"{check.max_rel:.3g}"),
                 ("top-1 agreement", f"{check.top1_agreement:.0%}"), ("verified", "pass" if check.passed else "FAIL")]
    console.print(kv_table("export", rows))
    if verify and not check.passed:
        raise fail(f"export differs from its source: max rel diff {check.max_rel:.3g} > {check.rtol:g}")
