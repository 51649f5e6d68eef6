"""``wsurgery export``: fold and write plain-conv weights in timm's hub layout (plus ONNX / torch.export)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import typer
from rich.markup import escape

import wsurgery
from wsurgery.errors import UsageError
from wsurgery.export import DTYPES
from wsurgery.io import CONFIG_NAME

from ._common import console, err_console, fail, flag, handle_errors, kv_table, note, print_json

ALL_FORMATS = ("safetensors", "onnx", "torch-export")


def parse_formats(values: list[str]) -> list[str]:
    """``--format`` values (repeatable, or comma lists) -> deployment formats besides safetensors."""
    names = [v.strip().lower() for value in values for v in value.split(",") if v.strip()]
    aliases = {"pt2": "torch-export", "torch_export": "torch-export", "torchexport": "torch-export"}
    names = [aliases.get(n, n) for n in names]
    unknown = [n for n in names if n not in ALL_FORMATS]
    if unknown:
        raise UsageError(f"unknown --format {unknown[0]!r}; choose from {', '.join(ALL_FORMATS)}")
    return [f for f in wsurgery.deploy.FORMATS if f in names]


def _add_check(rows: list[tuple[str, Any]], failures: list[str], label: str, name: str,
               check: wsurgery.VerifyResult | None) -> None:
    """The report rows of one export's verification (``label`` prefixes them); a failure is named in ``failures``."""
    if check is None:  # --no-verify
        return
    prefix = f"{label} " if label else ""
    rows += [(f"{prefix}max |diff|", f"{check.max_abs:.3g}"),
             (f"{prefix}max rel diff", f"{check.max_rel:.3g} (tolerance {check.rtol:g})"),
             (f"{prefix}top-1 agreement", f"{check.top1_agreement:.0%}"),
             (f"{prefix}verified", "pass" if check.passed else "FAIL")]
    if not check.passed:
        failures.append(f"{name} export: max rel diff {check.max_rel:.3g} > {check.rtol:g}")


@handle_errors
def export(
    source: str = typer.Argument(..., help="A surgery directory (or a timm model name with its own StdConv2d)."),
    output: Path = typer.Option(..., "--output", "-o", help="Export directory to write."),
    checkpoint: Path | None = typer.Option(
        None, "--checkpoint", help="Weights for SOURCE when it is a timm name (.safetensors/.pth/.bin)."),
    remap_by_order: bool = flag(False, "--remap-by-order", help="Match checkpoint tensors in order."),
    pretrained: bool | None = flag(
        None, "--pretrained/--no-pretrained", help="For a timm name: fetch timm's weights (needs a network), "
        "or export random weights (for testing)."),
    fold_bn: bool = flag(False, "--fold-bn", help="Also fold each BatchNorm that follows a conv into it."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, fp16 or bf16 (safetensors; ONNX and .pt2 are fp32)."),
    formats: list[str] = typer.Option(
        [], "--format", "-f", metavar="onnx,torch-export",
        help="Also write onnx (OUT/model.onnx) and/or torch-export (OUT/model.pt2); "
        "repeatable or comma-separated. safetensors is always written."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input height/width of the ONNX / .pt2 graph (default: the model's data config)."),
    opset: int = typer.Option(wsurgery.deploy.DEFAULT_OPSET, "--opset", help="ONNX opset version."),
    verify: bool = flag(True, "--verify/--no-verify", help="Reload each export and compare with the source."),
    force: bool = flag(False, "--force", help="Overwrite the output if it exists."),
    as_json: bool = flag(False, "--json", help="Print the result as JSON (files, checks, how it loads)."),
) -> None:
    """Fold the standardization into plain conv weights and export config.json + model.safetensors.

    With --format onnx / torch-export the folded model is also written as OUT/model.onnx
    (onnxruntime-verified, tolerance 1e-4 relative) and OUT/model.pt2 (1e-5).
    """
    extra = parse_formats(formats)
    if "onnx" in extra:
        wsurgery.deploy.require_onnx()  # fail before loading or writing anything
        wsurgery.deploy.check_opset(opset)
    if img_size is not None and img_size < 1:
        raise UsageError(f"--img-size must be a positive number of pixels, got {img_size}")
    if dtype not in DTYPES:  # before the (slow) load
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    wsurgery.io.check_output(output, force, inputs=(source, checkpoint), markers=(CONFIG_NAME,),
                             create_parent=False)
    if timm.is_model(source) and not Path(source).exists() and checkpoint is None and pretrained is None:
        raise UsageError(f"{source} is a model name, and exporting it needs its weights: pass --checkpoint PATH, "
                         "--pretrained (fetches timm's, needs a network) or --no-pretrained (random, for testing)")
    with err_console.status(f"loading {escape(source)}"):
        model = wsurgery.load(source, checkpoint=checkpoint, remap_by_order=remap_by_order, pretrained=pretrained)
    with err_console.status("folding and writing"):
        result = wsurgery.export(model, output, fold_bn=fold_bn, dtype=dtype, force=force, verify=verify,
                                 formats=extra, img_size=img_size, opset=opset)
    rows: list[tuple[str, Any]] = [
        ("written", result.directory),
        ("dtype", result.dtype),
        ("BN folded into convs", len(result.fold_bn)),
        ("loads with", "stock timm: timm.create_model('local-dir:DIR', pretrained=True)"
         if result.timm_compatible else "wsurgery.load(DIR) (timm's constructor args cannot express it)"),
    ]
    failures: list[str] = []
    _add_check(rows, failures, "safetensors" if extra else "", "safetensors", result.verification)
    for deployed in result.deployments:
        size = "x".join(map(str, deployed.input_size))
        detail = f"opset {deployed.opset}, " if deployed.opset else ""
        rows.append((deployed.format, f"{deployed.path} ({detail}input "
                                      f"{'N' if deployed.dynamic_batch else 'fixed batch'}x{size})"))
        _add_check(rows, failures, deployed.format, deployed.format, deployed.verification)
    if as_json:
        print_json(result.to_dict())
    else:
        console.print(kv_table("export", rows))
    for line in result.notes:
        note(line)
    if fold_bn and not result.fold_bn:
        note("--fold-bn found no BatchNorm right after a conv (a GroupNorm model has none), so "
             "nothing was folded; the export is what it would be without the flag")
    if failures:
        raise fail(f"export differs from its source: {'; '.join(failures)}")
