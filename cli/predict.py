"""``wsurgery predict``: top-k class names and probabilities for images."""

from __future__ import annotations

import dataclasses

import typer
from rich.markup import escape
from rich.table import Table

from wsurgery.errors import DatasetError, NetworkUnavailableError, UsageError
from wsurgery.predict import predict as predict_images
from wsurgery.train import pick_device

from ._common import console, err_console, flag, handle_errors, print_json


@handle_errors
def predict(
    model: str = typer.Argument(..., help="Export directory (or a surgery / run directory)."),
    images: list[str] | None = typer.Argument(None, help="Image files, folders or glob patterns."),
    more_images: list[str] = typer.Option(
        [], "--images", metavar="PATH", help="Images as compare and verify take them (repeatable; adds to IMAGES)."),
    topk: int = typer.Option(5, "--topk", "-k", help="Classes to show per image."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input size (default: the model's)."),
    device: str | None = typer.Option(
        None, "--device", help="cuda, mps or cpu (default: $WSURGERY_DEVICE, else the best available), as train."),
    as_json: bool = flag(False, "--json", help="Print the predictions as JSON (one object per image)."),
) -> None:
    """Print the top-k class names and probabilities for each image."""
    images = [*(images or []), *more_images]
    if not images:
        raise UsageError("predict needs images: name them after the model, or with --images PATH")
    try:
        results = predict_images(model, images, topk, img_size=img_size, device=pick_device(device))
    except NetworkUnavailableError:  # load's advice names convert's flags, which predict does not have
        raise NetworkUnavailableError(
            f"could not fetch pretrained weights for {model}; without a network predict with a directory: "
            f"`wsurgery export {model} --checkpoint PATH -o DIR`, then `wsurgery predict DIR ...`"
        ) from None
    if all(r.error for r in results):
        raise DatasetError(f"none of the {len(results)} files could be read as an image ({results[0].error}); "
                           "pass image files (JPEG, PNG, ...), folders of them, or glob patterns")
    if as_json:
        print_json([dataclasses.asdict(r) for r in results])
        return
    table = Table(title=f"top-{topk} predictions", title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("rank", justify="right")
    table.add_column("class", overflow="fold")
    table.add_column("probability", justify="right")
    for r in results:
        if r.error:
            err_console.print(f"[yellow]skipped[/] {escape(str(r.path))}: {escape(r.error)}")
            continue
        for rank, (name, p) in enumerate(zip(r.labels, r.probs), 1):
            # escape: file and class names may hold brackets ([bold]red.png) that rich would take as markup
            table.add_row(escape(str(r.path)) if rank == 1 else "", str(rank), escape(name), f"{p:.1%}")
    console.print(table)

