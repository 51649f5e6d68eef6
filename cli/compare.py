"""``wsurgery compare``: how closely model A follows model B on the same images."""

from __future__ import annotations

from pathlib import Path

import typer

import wsurgery
from wsurgery.calibrate import calibration_images
from wsurgery.compare import CONFIDENT, same_data_config
from wsurgery.data import find_images
from wsurgery.errors import NetworkUnavailableError, UsageError

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


def _load(source: str, checkpoint: Path | None, remap_by_order: bool, which: str):
    try:  # --remap-by-order is about a checkpoint: it applies to the model given one (a directory has its own)
        return wsurgery.load(source, checkpoint=checkpoint, remap_by_order=remap_by_order and checkpoint is not None)
    except NetworkUnavailableError:  # load's advice names convert's flags; here the fix is per model
        raise NetworkUnavailableError(
            f"could not fetch pretrained weights for {source}; without a network pass --{which}-checkpoint PATH "
            f"(a local weights file) or a saved/exported directory as {which.upper()}") from None


@handle_errors
def compare(
    a: str = typer.Argument(..., help="Model to judge: timm name, saved/exported directory, or hf-hub id."),
    b: str = typer.Argument(..., help="Reference model (e.g. the original): timm name, directory, or hf-hub id."),
    images: list[Path] = typer.Option(
        ..., "--images", metavar="PATH", help="Images to compare on (files, folders, globs; repeatable)."),
    a_checkpoint: Path | None = typer.Option(None, "--a-checkpoint", help="Weights file for A (when A is a name)."),
    b_checkpoint: Path | None = typer.Option(None, "--b-checkpoint", help="Weights file for B (when B is a name)."),
    remap_by_order: bool = flag(False, "--remap-by-order", help="Match checkpoint tensors in order."),
    limit: int | None = typer.Option(None, "--limit", help="Use at most N images (or crops)."),
    crops_per_image: int = typer.Option(
        1, "--crops-per-image", help="1: center crop of each file; N: N random resized crops/flips of each."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size for both (default: each model's own data config; with "
        "--crops-per-image above 1, B's)."),
    seed: int = typer.Option(0, "--seed", min=0, max=SEED_MAX, help="Seeds the choice of images and the crops."),
    as_json: bool = flag(False, "--json", help="Print the agreement as JSON."),
) -> None:
    """Print top-1 agreement, top-5 overlap and KL(B || A) of model A against reference B."""
    check_at_least(("--limit", limit, 1), ("--crops-per-image", crops_per_image, 1))
    if remap_by_order and a_checkpoint is None and b_checkpoint is None:  # it would be ignored silently
        raise UsageError("--remap-by-order matches a checkpoint's tensors in order; it needs --a-checkpoint or "
                         "--b-checkpoint: pass one, or drop it")
    paths = find_images([str(i) for i in images])  # a wrong path fails before minutes of model loading
    with err_console.status("loading models"):
        model_a = _load(a, a_checkpoint, remap_by_order, "a")
        model_b = _load(b, b_checkpoint, remap_by_order, "b")
    if crops_per_image == 1:  # the library reads the files, with each model's own eval transform
        with err_console.status(f"running both models on {min(len(paths), limit or len(paths))} images"):
            agreement = wsurgery.compare(model_a, model_b, paths, limit=limit, seed=seed, img_size=img_size)
    else:  # random crops: both models see the same crops, made with B's data config
        if not same_data_config(model_a, model_b, img_size):
            note("A and B have different data configs; with --crops-per-image both see crops "
                 "prepared for B (with 1, each model gets its own eval transform)")
        x = calibration_images(paths, model_b, limit=limit, seed=seed, img_size=img_size,
                               crops_per_image=crops_per_image)
        with err_console.status(f"running both models on {x.shape[0]} images"):
            agreement = wsurgery.compare(model_a, model_b, x)
    if as_json:
        print_json(agreement.to_dict())
        return
    console.print(kv_table(f"{a} vs {b}", [
        ("images", agreement.num_images),
        ("top-1 agreement", f"{agreement.top1:.1%}"),
        (f"top-1 where B is confident (p >= {CONFIDENT:g})", confident_cell(agreement)),
        ("top-5 overlap", f"{agreement.top5_overlap:.1%}"),
        ("KL(B || A)", f"{agreement.kl:.4f} nats"),
    ]))
