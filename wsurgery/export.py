"""Step 5: fold and export to timm's hub layout (``config.json`` + ``model.safetensors``).

Two cases, and the exported ``config.json`` says which (``wsurgery.timm_compatible``):

* **stock timm loads it**: timm's own constructor arguments express the folded model
  (BN kept; or GN where ``norm_layer='groupnorm'`` builds exactly our GN layers, as for
  resnet50 with 32-group GN). ``timm.create_model('local-dir:DIR', pretrained=True)`` then
  rebuilds it with no wsurgery import. We do not guess this: we build the stock model,
  compare every module's type, load the weights strictly and compare outputs.
* **wsurgery.load(DIR) rebuilds it**: everything else (GN with channel counts timm's
  ``groupnorm`` cannot split, BN folded into conv biases). The result is still plain convs
  with no standardization; only building the module tree needs the recorded surgery.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from .calibrate import anchored_convs
from .convert import all_finite, get_surgery_config, modes_kept, placement, unwrap, with_input_channels
from .errors import ConfigError, NonFiniteWeightsError, VerificationError
from .fold import FOLD_ATTR, fold, is_folded
from .io import CONFIG_NAME, WEIGHTS_NAME, atomic_dir, save_safetensors, write_json
from .load import build_on_meta, model_record
from .save import build_config, check_rebuildable, module_signature
from .verify import VerifyResult
from .verify import verify as verify_directory

__all__ = ["DTYPES", "ExportResult", "export", "stock_timm_args"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
Dtype = Literal["fp32", "fp16", "bf16"]


@dataclass
class ExportResult:
    """What :func:`export` wrote."""

    directory: Path
    timm_compatible: bool
    model_args: dict[str, Any]
    fold_bn: list[list[str]] = field(default_factory=list)
    dtype: str = "fp32"
    files: list[Path] = field(default_factory=list)
    #: the check of the written directory against the model (``export(..., verify=True)``); see ``passed``
    verification: VerifyResult | None = None
    #: the ONNX / ``.pt2`` files written into the directory (``export(..., formats=...)``)
    deployments: list[Any] = field(default_factory=list)
    #: what the caller should know about this export (the CLI prints each)
    notes: list[str] = field(default_factory=list)

    @property
    def checks(self) -> list[tuple[str, VerifyResult]]:
        """``(format, verification)`` of every file checked: safetensors first, then each deployment."""
        found = [("safetensors", self.verification)] + [(d.format, d.verification) for d in self.deployments]
        return [(name, check) for name, check in found if check is not None]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["directory"] = str(self.directory)
        d["files"] = [str(f) for f in self.files]
        d["deployments"] = [x.to_dict() for x in self.deployments]
        return d


def _materialize(stock: nn.Module, folded: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Give a meta-built stock model the folded model's tensors (shared, not copied)."""
    stock.load_state_dict(state, strict=True, assign=True)
    # buffers outside the state dict (non-persistent) are still on meta: same structure, same values
    folded_buffers = dict(folded.named_buffers())
    for name, buf in list(stock.named_buffers()):
        if buf.is_meta:
            owner, _, leaf = name.rpartition(".")
            stock.get_submodule(owner).register_buffer(leaf, folded_buffers[name], persistent=False)
    return stock


def _same_outputs(stock: nn.Module, folded: nn.Module, input_size: tuple[int, ...]) -> bool:
    """Equal outputs on a seeded batch: first at 32 px (cheap), at the model's own size if that fails."""
    device, dtype = placement(folded)
    stock.eval()
    with modes_kept(folded):
        folded.eval()
        for size in ((input_size[0], 32, 32), tuple(input_size)):
            # batch 2: GroupNorm with one channel per group on a 1x1 map (split-attention FCs) refuses batch 1
            x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=dtype)
            try:
                a, b = stock(x), folded(x)
                # NaN == NaN here: an uncalibrated plain-WS model may overflow, identically in both
                return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())
            except Exception:  # noqa: BLE001 - too small for this architecture: try its own size
                continue
        return False


@torch.no_grad()
def stock_timm_args(folded: nn.Module, record: dict[str, Any], norm: str | None) -> dict[str, Any] | None:
    """timm constructor args that rebuild ``folded`` exactly with stock timm, or None.

    Candidates are the model's own args, plus ``norm_layer='groupnorm'`` when BN was
    replaced by GN (``'groupnorm1'`` where every GroupNorm has one group). A candidate wins only if
    every module type (and GN groups/eps, conv geometry) matches, the weights load strictly, and the
    outputs are equal.

    The stock model is built on the meta device and given the folded model's tensors, so the
    check costs no weight init and no copy (a few hundred ms less for resnet50); its forward
    runs at 32 px first, the model's own input size only where 32 px does not fit.
    """
    base = dict(record["model_args"])
    candidates = [base]
    if norm == "gn":  # the model's own args still fit where no BatchNorm was there to replace (convnext)
        one_group = all(m.num_groups == 1 for m in folded.modules() if isinstance(m, nn.GroupNorm))
        candidates = [dict(base, norm_layer="groupnorm1" if one_group else "groupnorm"), base]
    target = module_signature(folded)
    state = folded.state_dict()
    for args in candidates:
        stock = build_on_meta(record["architecture"], args)
        if stock is None or module_signature(stock) != target:
            continue
        stock_state = stock.state_dict()
        if stock_state.keys() != state.keys() or any(stock_state[k].shape != v.shape for k, v in state.items()):
            continue
        _materialize(stock, folded, state)
        size = with_input_channels(folded, tuple(record["pretrained_cfg"].get("input_size", (3, 224, 224))))
        if _same_outputs(stock, folded, size):
            return args
    return None


def _check_finite_state(original: dict[str, torch.Tensor], cast: dict[str, torch.Tensor], dtype: str) -> None:
    """Refuse NaN/inf anywhere in what would be written (fold only checks the convs it folds)."""
    for key, value in cast.items():
        if value.is_floating_point() and not all_finite(value):
            if torch.isfinite(original[key]).all():  # finite in fp32, overflows in fp16
                raise NonFiniteWeightsError(
                    f"{key} overflows to inf in {dtype}; refusing to export (use --dtype fp32 or bf16)")
            raise NonFiniteWeightsError(
                f"{key} holds NaN or inf; refusing to export (resume from an earlier checkpoint)")


def export(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    fold_bn: bool = False,
    dtype: Dtype = "fp32",
    force: bool = False,
    verify: bool = False,
    formats: str | tuple[str, ...] | list[str] = (),
    img_size: int | None = None,
    opset: int | None = None,
) -> ExportResult:
    """Fold ``model`` and write it for deployment, atomically.

    ``model`` is not modified (a folded copy is written).

    Args:
        model: a converted model (from :func:`wsurgery.convert` or :func:`wsurgery.load` of a
            surgery directory), a timm model with its own ``StdConv2d`` (BiT, NFNet), or any
            timm model (exported as it is).
        directory: output directory (timm hub layout).
        fold_bn: also fold each BatchNorm that directly follows a conv (eval statistics).
        dtype: ``fp32``, ``fp16`` or ``bf16`` for the stored floating tensors.
        force: replace an existing output.
        verify: reload the written directory and compare its outputs with ``model``'s
            (:func:`wsurgery.verify`, the tolerance of ``dtype``); the result is in
            ``verification`` (check ``verification.passed``). Every check runs before the
            directory is put in place: a failed check does not raise, except where it would
            replace an existing output (``force``), which is then kept.
        formats: also write ``onnx`` (``model.onnx``) and/or ``torch-export`` (``model.pt2``) into the
            directory, before it is put in place (:mod:`wsurgery.deploy`; fp32 graphs, verified with
            ``verify``); ``img_size`` and ``opset`` are theirs. One name may be passed as a string.

    Returns:
        An :class:`ExportResult`; ``timm_compatible`` says whether stock timm loads it.

    Raises:
        ConfigError: an unknown ``dtype`` or format.
        MissingDependencyError: ``onnx`` without onnx/onnxruntime installed.
        NonFiniteWeightsError: a weight is NaN or inf (nothing is written).
        OutputExistsError: ``directory`` exists and ``force`` is False.
        VerificationError: with ``force``, a check failed (the existing output was kept).
    """
    from . import deploy  # deploy builds on this module

    if isinstance(formats, str):  # formats="onnx" was read letter by letter ("unknown format 'o'")
        formats = (formats,)
    if dtype not in DTYPES:
        raise ConfigError(f"`dtype` (--dtype) must be one of {', '.join(DTYPES)}, got {dtype!r}")
    unknown = [f for f in formats if f not in deploy.FORMATS]
    if unknown:
        raise ConfigError(f"unknown deployment format {unknown[0]!r}; choose from {', '.join(deploy.FORMATS)}")
    if "onnx" in formats:
        deploy.require_onnx()  # before anything is folded or written
        deploy.check_opset(opset if opset is not None else deploy.DEFAULT_OPSET)
    model = unwrap(model)
    record = model_record(model)
    folded = model if is_folded(model) and not fold_bn else fold(model, fold_bn=fold_bn)
    pairs = [list(p) for p in getattr(folded, FOLD_ATTR, [])]
    surgery = get_surgery_config(model)
    args = None if pairs else stock_timm_args(folded, record, surgery.norm if surgery else None)
    config = build_config(model, "folded", fold_bn=pairs, timm_compatible=args is not None, dtype=dtype)
    if args is not None:
        config["model_args"] = args
    target = DTYPES[dtype]
    state = {k: (v.to(target) if v.is_floating_point() else v) for k, v in folded.state_dict().items()}
    _check_finite_state(folded.state_dict(), state, dtype)
    check_rebuildable(config, state, "export", folded)
    directory = Path(directory)
    replaces = os.path.lexists(directory)
    result = ExportResult(directory=directory, timm_compatible=args is not None, model_args=config["model_args"],
                          fold_bn=pairs, dtype=dtype, files=[directory / CONFIG_NAME, directory / WEIGHTS_NAME])
    if dtype != "fp32" and anchored_convs(model):
        # measured on EfficientNet-Lite0 (benchmarks/calibration.py --part precision, anchored; KL to the original on
        # ImageNet photos): 0.076 fp32, 0.072 fp16 weights, 0.529 bf16 weights; preconditioned alone moved by 0.005
        result.notes.append(f"this model was calibrated with anchoring: its convs feed GroupNorms offsets of 30 "
                            f"channel deviations, and {dtype} keeps less of the signal beside them (measured on "
                            f"EfficientNet-Lite0: much less in bf16); compare it on your images (wsurgery verify "
                            f"DIR --against MODEL --images PATH), or export fp32")
    with atomic_dir(directory, force=force, markers=(CONFIG_NAME,)) as tmp:
        save_safetensors(state, tmp / WEIGHTS_NAME, {"wsurgery": json.dumps(config["wsurgery"], sort_keys=True)})
        write_json(tmp / CONFIG_NAME, config)
        # checked here, before the directory is put in place: a failed check never replaces a good export
        result.verification = verify_directory(tmp, model) if verify else None
        for fmt in deploy.FORMATS:
            if fmt in formats:
                kw = {"opset": opset if opset is not None else deploy.DEFAULT_OPSET} if fmt == "onnx" else {}
                write = deploy.export_onnx if fmt == "onnx" else deploy.export_program
                result.deployments.append(write(model, tmp / deploy.FILE_NAMES[fmt], fold_bn=fold_bn,
                                                img_size=img_size, verify=verify, **kw))
        failed = [f"{name} (max rel diff {check.max_rel:.3g} > {check.rtol:g})"
                  for name, check in result.checks if not check.passed]
        if failed and replaces:
            raise VerificationError(f"the new export differs from the model: {', '.join(failed)}; "
                                    f"{directory} was left as it was")
    # they were written and checked inside the temporary directory
    if result.verification is not None:
        result.verification.candidate = str(directory)
    for d in result.deployments:
        d.path = directory / d.path.name
        result.files.append(d.path)
        if d.verification is not None:
            d.verification.candidate = str(d.path)
    return result
