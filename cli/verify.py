"""``wsurgery verify``: compare an export with the unfolded model it came from."""

from __future__ import annotations

from pathlib import Path

import typer

import wsurgery

from ._common import SEED_MAX, console, fail, flag, handle_errors, kv_table, print_json


@handle_errors
def verify(
    export: Path = typer.Argument(..., help="Export directory (or .onnx / .pt2 file)."),
    against: Path = typer.Option(..., "--against", help="The unfolded surgery directory it was exported from."),
    images: list[Path] = typer.Option(
        [], "--images", metavar="PATH", help="Also compare on these images (files, folders, globs)."),
    num_random: int = typer.Option(4, "--num-random", help="Random inputs to compare on."),
    rtol: float | None = typer.Option(
        None, "--rtol", help="Max relative difference (default by dtype, fp32 1e-5; .onnx 1e-4; .pt2 1e-5)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seed of the random inputs."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size (default: the model's data config; for .onnx/.pt2 the exported size)."),
    as_json: bool = flag(False, "--json", help="Print the result as JSON (for a CI gate: the exit code is the same)."),
) -> None:
    """Print max absolute and relative difference and top-1 agreement; exit 1 above tolerance."""
    # an ONNX / torch.export file gets its own tolerance and the input size it was exported for
    result = wsurgery.verify(export, against, images=[str(i) for i in images] or None,
                             num_random=num_random, rtol=rtol, seed=seed, img_size=img_size)
    if as_json:
        print_json(result.to_dict())
    else:
        _table(result)
    if not result.passed:
        raise fail(f"{export} differs from {against}: max rel diff {result.max_rel:.3g} > {result.rtol:g}")


def _table(result: wsurgery.VerifyResult) -> None:
    console.print(kv_table("verify", [
        ("inputs", result.num_inputs),
        ("max |diff|", f"{result.max_abs:.3g}"),
        ("max rel diff", f"{result.max_rel:.3g} (tolerance {result.rtol:g})"),
        ("top-1 agreement", f"{result.top1_agreement:.1%}"),
        ("result", "pass" if result.passed else "FAIL"),
    ]))
