"""Step 6: verify an export against the model it came from, on fixed inputs.

Inputs are ``num_random`` seeded random images (uniform pixels, then the model's own
normalization) plus any user images. Reported:

* ``max_abs``: the largest absolute difference of the outputs (logits);
* ``max_rel``: ``max_abs`` divided by the largest absolute reference output. An
  element-wise relative difference is meaningless for logits near zero, so the scale of
  the whole output is the reference;
* ``top1_agreement``: fraction of inputs whose arg-max class is the same.

``passed`` is ``max_rel <= rtol``. Default ``rtol``: 1e-5 for fp32, 1e-2 for fp16, 5e-2 for bf16.
Besides directories and modules, other deployment formats register a runner in
:data:`RUNNERS` by file suffix (ONNX and torch.export do, see :mod:`wsurgery.deploy`).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .convert import modes_kept, placement
from .data import load_images, random_inputs
from .errors import InputNotFoundError, UsageError

__all__ = ["DEFAULT_RTOL", "RUNNERS", "VerifyResult", "compare_outputs", "verify"]

Runner = Callable[[torch.Tensor], torch.Tensor]

#: file suffix -> function(path) returning a runner; filled by optional deployment modules
RUNNERS: dict[str, Callable[[Path], Runner]] = {}

DEFAULT_RTOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 5e-2}


@dataclass
class VerifyResult:
    """Differences between an export and its reference."""

    max_abs: float
    max_rel: float
    top1_agreement: float
    num_inputs: int
    rtol: float
    passed: bool
    candidate: str = ""
    reference: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_outputs(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """``(max_abs, max_rel, top1_agreement)`` of two logit batches."""
    out, ref = out.float(), ref.float()
    max_abs = (out - ref).abs().max().item()
    scale = ref.abs().max().item()
    max_rel = max_abs / scale if scale > 0 else max_abs
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return max_abs, max_rel, agree


@contextlib.contextmanager
def allow_tf32(enabled: bool) -> Iterator[None]:
    """PyTorch's TF32 switches for CUDA convolutions and matrix products, restored after.

    PyTorch lets cuDNN run fp32 convolutions in TF32 (10 mantissa bits) by default, which moves
    a model's logits by ~1e-3 relative: more than an fp32 export may differ from its reference.
    Verification compares the arithmetic, so the reference runs with ``allow_tf32(False)``.
    """
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _module_runner(model: nn.Module) -> Runner:
    device, dtype = placement(model)

    @torch.no_grad()
    def run(x: torch.Tensor) -> torch.Tensor:
        with modes_kept(model):  # every submodule is left in the mode it was in
            model.eval()
            with allow_tf32(False):
                return model(x.to(device=device, dtype=dtype)).float().cpu()

    return run


def _resolve(obj: nn.Module | str | os.PathLike, role: str = "candidate") -> tuple[Runner, nn.Module | None, str]:
    if isinstance(obj, nn.Module):
        return _module_runner(obj), obj, type(obj).__name__
    path = Path(obj)
    if not path.exists():
        if role == "reference":
            raise InputNotFoundError(f"{path} (the reference, --against) does not exist; pass the surgery or run "
                                     "directory the export was made from")
        raise InputNotFoundError(f"{path} does not exist; pass an export directory or model file")
    if path.is_file():
        factory = RUNNERS.get(path.suffix)
        if factory is None:
            from . import deploy  # noqa: F401 - registers the ONNX / torch.export runners

            factory = RUNNERS.get(path.suffix)
        if factory is None:
            raise InputNotFoundError(f"{path}: cannot run {path.suffix or 'this'} files; "
                                     "pass a directory, .onnx or .pt2")
        return factory(path), None, str(path)
    from .load import load

    model = load(path)
    return _module_runner(model), model, str(path)


def _stored_dtype(directory: Path) -> str | None:
    """The precision of the floating-point tensors in ``directory``'s weights file, from its header.

    Read from the tensors themselves, not from config.json, so an edited config cannot loosen
    the tolerance the weights are judged by.
    """
    from safetensors import safe_open

    from .io import WEIGHTS_NAME

    names = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        return None
    with safe_open(str(weights), framework="pt") as f:
        found = {names.get(f.get_slice(k).get_dtype()) for k in f.keys()} - {None}  # noqa: SIM118 (not iterable)
    # the coarsest one decides (an fp16 export keeps nothing in fp32 but counters)
    for dtype in ("bf16", "fp16", "fp32"):
        if dtype in found:
            return dtype
    return None


def _dtype_of(candidate: nn.Module | str | os.PathLike, model: nn.Module | None) -> str:
    """The precision the candidate's weights were stored in.

    For an export directory, the dtype of the tensors in its weights file (fp16/bf16 weights are
    loaded into an fp32 model, so the parameters' dtype would say fp32); else the parameters'.
    """
    if not isinstance(candidate, nn.Module) and Path(candidate).is_dir():
        stored = _stored_dtype(Path(candidate))
        if stored is not None:
            return stored
    dtype = placement(model)[1] if model is not None else None
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def verify(
    candidate: nn.Module | str | os.PathLike,
    reference: nn.Module | str | os.PathLike,
    *,
    images: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    num_random: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    img_size: int | None = None,
) -> VerifyResult:
    """Compare an exported model with the (unfolded) model it was exported from.

    Args:
        candidate: export directory, ``.onnx``/``.pt2`` file, or module.
        reference: the unfolded model: a surgery directory or a module.
        images: user images (files, folder, glob) added to the random inputs.
        num_random: number of random inputs.
        seed: seed of the random inputs.
        rtol: pass threshold on ``max_rel`` (default by the lower of the two models' precisions,
            or for an ``.onnx`` / ``.pt2`` file its format's, :data:`wsurgery.deploy.DEFAULT_RTOL`).
        img_size: input size override (default: the reference's data config, or the size an
            ``.onnx`` / ``.pt2`` file was exported for).

    Returns:
        A :class:`VerifyResult`; check ``passed``.
    """
    if rtol is not None and not (rtol > 0 and math.isfinite(rtol)):
        raise UsageError(f"`rtol` (--rtol) must be a positive number, got {rtol}")
    if num_random < 0:
        raise UsageError(f"`num_random` (--num-random) must be 0 or more, got {num_random}")
    cand_run, cand_model, cand_name = _resolve(candidate)
    ref_run, ref_model, ref_name = _resolve(reference, "reference")
    if cand_model is None:  # an .onnx / .pt2 file: its own input size and its format's tolerance by default
        from . import deploy

        img_size = img_size if img_size is not None else deploy.recorded_img_size(candidate)
        cand_rtol = deploy.DEFAULT_RTOL.get(Path(candidate).suffix, 1e-4)
    else:
        cand_rtol = DEFAULT_RTOL[_dtype_of(candidate, cand_model)]
    data_model = ref_model if ref_model is not None else cand_model
    if data_model is None:
        raise InputNotFoundError("verify needs the reference as a model or directory (for its data config)")
    x = random_inputs(data_model, num_random, seed=seed, img_size=img_size) if num_random else None
    if images is not None:
        imgs, _ = load_images(images, data_model, img_size=img_size)
        x = imgs if x is None else torch.cat([x, imgs])
    if x is None:
        raise UsageError("no inputs: give `num_random` (--num-random) above 0 or `images` (--images PATH)")
    out, ref = cand_run(x), ref_run(x)
    if out.shape != ref.shape:
        raise UsageError(f"{cand_name} gives outputs of shape {tuple(out.shape[1:])} per input and {ref_name} "
                         f"{tuple(ref.shape[1:])}; verify an export against the model it was exported from")
    max_abs, max_rel, agree = compare_outputs(out, ref)
    if rtol is None:  # the looser of the two precisions: an fp32 export of a half model differs from it as much
        rtol = max(cand_rtol, DEFAULT_RTOL[_dtype_of(reference, ref_model)] if ref_model is not None else 0.0)
    return VerifyResult(max_abs, max_rel, agree, int(x.shape[0]), rtol, max_rel <= rtol, cand_name, ref_name)
