"""Deployment formats: the folded model as ONNX and as a ``torch.export`` program (``.pt2``).

A folded model holds plain convs only, so it exports where timm's own ``StdConv2d`` used to
fail (timm issues #442 and #522: ``std_mean`` had no ONNX symbolic). This module writes

* **ONNX** with the TorchScript-based exporter, ``torch.onnx.export(..., dynamo=False)``.
  The newer dynamo exporter needs the ``onnxscript`` package (not part of the ``onnx`` extra,
  and not installed here); the TorchScript exporter needs nothing beyond torch, is what
  timm's own ``onnx_export`` uses, and handles every CNN of the zoo we test, including
  ``Conv2dSame``'s input-dependent padding (traced as constants for the fixed input size).
  The batch axis is dynamic; height and width are fixed at the model's data-config size
  (or ``img_size``), as ``Conv2dSame`` padding depends on them.
* **torch.export** programs (``torch.export.export`` + ``torch.export.save``) with a
  dynamic batch dimension where the model allows it.

Each writer folds first (a copy: the model passed in is unchanged), records the wsurgery
config (architecture, data config, surgery, opset ...) inside the file (ONNX
``metadata_props`` key ``wsurgery``; ``.pt2`` extra file ``wsurgery.json``), and writes
atomically. :data:`wsurgery.verify.RUNNERS` gets a runner for ``.onnx`` (onnxruntime, CPU)
and ``.pt2``, so ``wsurgery.verify("model.onnx", reference)`` works.

:func:`find_weight_standardization` inspects an ONNX graph for standardization left on the
weights: a normalization-like op (ReduceMean, Sqrt, Div, Sub, Pow, BatchNormalization ...)
that is computed from weight initializers alone.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from . import __version__
from .convert import all_finite, clone_model, unwrap, with_input_channels
from .data import data_config_for
from .errors import (
    CheckpointError,
    ConversionError,
    InputNotFoundError,
    MissingDependencyError,
    NonFiniteWeightsError,
    UnsafeCheckpointError,
    UsageError,
)
from .fold import FOLD_ATTR, fold, is_folded
from .io import atomic_file, check_output
from .save import build_config
from .verify import RUNNERS, VerifyResult, verify

__all__ = [
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "FILE_NAMES",
    "FORMATS",
    "STANDARDIZATION_OPS",
    "DeployResult",
    "StandardizationOp",
    "check_program_archive",
    "export_onnx",
    "export_program",
    "find_weight_standardization",
    "onnx_runner",
    "program_runner",
    "read_metadata",
    "recorded_img_size",
    "require_onnx",
    "verify_export",
]

Format = Literal["onnx", "torch-export"]

#: deployment formats and the file each is written to inside an export directory
FORMATS: tuple[str, ...] = ("onnx", "torch-export")
FILE_NAMES: dict[str, str] = {"onnx": "model.onnx", "torch-export": "model.pt2"}

#: ONNX opset written by default. 17 is the TorchScript exporter's own default, is read by
#: every onnxruntime since 1.11, and has everything a CNN needs (GroupNorm exports as
#: InstanceNormalization + affine; the GroupNormalization op of opset 18/21 is not needed).
DEFAULT_OPSET = 17


def supported_opsets() -> range:
    """The opsets torch's TorchScript-based ONNX exporter writes (7 to 20 in torch 2.x)."""
    from torch.onnx import _constants

    low = getattr(_constants, "ONNX_MIN_OPSET", 7)
    high = getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", getattr(_constants, "ONNX_MAX_OPSET", 20))
    return range(low, high + 1)


def check_opset(opset: int) -> None:
    """Raise :class:`UsageError` for an opset the exporter cannot write (before anything is written)."""
    ok = supported_opsets()
    if opset not in ok:
        raise UsageError(f"opset {opset} (--opset) is not supported by torch's ONNX exporter; "
                         f"use {ok.start} to {ok.stop - 1} (default {DEFAULT_OPSET})")

#: default pass threshold on ``max_rel`` by file suffix. onnxruntime is not bit-identical to
#: PyTorch: it fuses Conv+Add/Relu, uses its own MLAS conv kernels and sums in another order,
#: which moves logits by ~1e-6 relative (fp32); 1e-4 leaves headroom on deep nets and still
#: catches a wrong weight, a missing bias or a wrong padding (those are >= 1e-2). A
#: torch.export program runs the same ATen kernels as eager PyTorch, so it gets fp32's 1e-5.
DEFAULT_RTOL: dict[str, float] = {".onnx": 1e-4, ".pt2": 1e-5}

#: ONNX ops that standardize or normalize; computed from weights alone they mean the
#: weight standardization was left in the graph instead of folded.
STANDARDIZATION_OPS = frozenset({
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "Sqrt", "Reciprocal", "Div", "Sub", "Pow",
    "BatchNormalization", "InstanceNormalization", "GroupNormalization", "LayerNormalization",
    "MeanVarianceNormalization",
})

METADATA_KEY = "wsurgery"
PROGRAM_EXTRA_FILE = "wsurgery.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"

Runner = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DeployResult:
    """What :func:`export_onnx` or :func:`export_program` wrote."""

    path: Path
    format: Format
    input_size: tuple[int, int, int]
    dynamic_batch: bool
    fold_bn: list[list[str]] = field(default_factory=list)
    opset: int | None = None
    exporter: str = ""
    #: the check of the written file against the model (``verify=True``); see ``passed``
    verification: VerifyResult | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass
class StandardizationOp:
    """An ONNX node that computes a normalization from weight initializers alone."""

    node: str
    op_type: str
    weights: list[str]


def require_onnx() -> tuple[Any, Any]:
    """Import ``onnx`` and ``onnxruntime``, or say which extra to install.

    Returns:
        The ``(onnx, onnxruntime)`` modules.

    Raises:
        MissingDependencyError: either package is missing.
    """
    modules = []
    for name in ("onnx", "onnxruntime"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            raise MissingDependencyError(
                f"ONNX export needs the '{name}' package; install it with: pip install 'wsurgery[onnx]'"
            ) from None
    return modules[0], modules[1]


# ---------------------------------------------------------------------------------------------
# writers


def _prepare(model: nn.Module, fold_bn: bool, img_size: int | None) -> tuple[nn.Module, tuple[int, int, int], list]:
    """A folded eval-mode fp32 copy of ``model`` and its input size."""
    model = unwrap(model)
    folded = model if is_folded(model) and not fold_bn else fold(model, fold_bn=fold_bn)
    if folded is model:  # never change the caller's model (dtype, eval mode)
        folded = clone_model(model)
    folded = folded.float().eval().cpu()  # our own copy: deployment files are traced on the CPU
    for key, value in folded.state_dict().items():  # fold checks the convs it folds; check the rest too
        if value.is_floating_point() and not all_finite(value):
            raise NonFiniteWeightsError(
                f"{key} holds NaN or inf; refusing to export (resume from an earlier checkpoint)")
    pairs = [list(p) for p in getattr(folded, FOLD_ATTR, [])]
    size = with_input_channels(folded, tuple(int(s) for s in data_config_for(model, img_size)["input_size"]))
    return folded, size, pairs  # type: ignore[return-value]


def _record(model: nn.Module, fmt: str, **fields: Any) -> dict[str, Any]:
    try:
        return build_config(model, "folded", format=fmt, **fields)
    except ConversionError:  # not a timm model: keep the deployment facts only
        return {"wsurgery": {"version": __version__, "stage": "folded", "format": fmt, **fields}}


def _example(size: tuple[int, int, int], batch: int = 2) -> torch.Tensor:
    # batch 2, not 1: exporters specialise a size-1 dimension to the constant 1
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    fold_bn: bool = False,
    img_size: int | None = None,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    verify: bool = False,
) -> DeployResult:
    """Fold ``model`` and write it as ONNX with a dynamic batch axis, atomically.

    ``model`` is not modified. The graph is fp32 (onnxruntime's CPU kernels are fp32).

    Args:
        model: a converted model, a timm model with its own ``StdConv2d``, or any timm model.
        path: the ``.onnx`` file to write.
        fold_bn: also fold each BatchNorm that directly follows a conv.
        img_size: input height and width (default: the model's data config).
        opset: ONNX opset version.
        force: replace an existing file.
        verify: run the written file and compare its outputs with ``model``'s
            (:func:`verify_export`); the result is in ``verification`` (check
            ``verification.passed``; a failed check does not raise).

    Returns:
        A :class:`DeployResult`.

    Raises:
        MissingDependencyError: ``onnx`` / ``onnxruntime`` are not installed.
        NonFiniteWeightsError: a weight is NaN or inf (nothing is written).
        ConversionError: the exporter cannot express the model.
        OutputExistsError: ``path`` exists and ``force`` is False.
    """
    onnx, _ = require_onnx()
    check_opset(opset)
    check_output(path, force)  # before the (slow) fold and trace
    folded, size, pairs = _prepare(model, fold_bn, img_size)
    config = _record(model, "onnx", fold_bn=pairs, opset=opset, input_size=list(size), exporter="torchscript",
                     dtype="fp32", dynamic_batch=True)
    with atomic_file(path, force=force) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation of the TorchScript exporter, tracer warnings
                torch.onnx.export(
                    folded, (_example(size),), str(tmp), dynamo=False, opset_version=opset,
                    input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                    dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                    do_constant_folding=True,
                )
        except Exception as e:  # noqa: BLE001 - any exporter failure is one line for the user
            raise ConversionError(
                f"ONNX export failed ({type(e).__name__}: {_first_line(e)}); "
                "try another --opset or --format torch-export"
            ) from None
        proto = onnx.load(str(tmp))
        entry = proto.metadata_props.add()
        entry.key, entry.value = METADATA_KEY, json.dumps(config, sort_keys=True, default=str)
        proto.doc_string = f"folded by wsurgery {__version__}: plain convs, no weight standardization"
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    result = DeployResult(Path(path), "onnx", size, True, pairs, opset, "torch.onnx.export(dynamo=False)")
    return _verified(result, model) if verify else result


def export_program(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    fold_bn: bool = False,
    img_size: int | None = None,
    dynamic_batch: bool = True,
    force: bool = False,
    verify: bool = False,
) -> DeployResult:
    """Fold ``model`` and write it as a ``torch.export`` program (``.pt2``), atomically.

    ``model`` is not modified. If the model cannot be exported with a dynamic batch
    dimension, it is exported for the example batch size and a warning says so.

    Args:
        model: a converted model, a timm model with its own ``StdConv2d``, or any timm model.
        path: the ``.pt2`` file to write.
        fold_bn: also fold each BatchNorm that directly follows a conv.
        img_size: input height and width (default: the model's data config).
        dynamic_batch: export the batch dimension as dynamic.
        force: replace an existing file.
        verify: run the written file and compare its outputs with ``model``'s
            (:func:`verify_export`); the result is in ``verification`` (check
            ``verification.passed``; a failed check does not raise).

    Returns:
        A :class:`DeployResult`; ``dynamic_batch`` says whether the batch is dynamic.

    Raises:
        NonFiniteWeightsError: a weight is NaN or inf (nothing is written).
        ConversionError: ``torch.export`` cannot capture the model.
        OutputExistsError: ``path`` exists and ``force`` is False.
    """
    check_output(path, force)
    folded, size, pairs = _prepare(model, fold_bn, img_size)
    example = (_example(size),)
    program, dynamic = None, False
    if dynamic_batch:
        try:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program, dynamic = torch.export.export(folded, example, dynamic_shapes=({0: batch},)), True
        except Exception as e:  # noqa: BLE001 - fall back to a static batch below
            warnings.warn(f"torch.export: no dynamic batch for this model ({_first_line(e)}); exporting batch "
                          f"{example[0].shape[0]}", stacklevel=2)
    if program is None:
        try:
            program = torch.export.export(folded, example)
        except Exception as e:  # noqa: BLE001
            raise ConversionError(
                f"torch.export failed ({type(e).__name__}: {_first_line(e)}); try --format onnx") from None
    config = _record(model, "torch-export", fold_bn=pairs, input_size=list(size), dynamic_batch=dynamic,
                     static_batch=None if dynamic else int(example[0].shape[0]), dtype="fp32", torch=torch.__version__)
    with atomic_file(path, force=force) as tmp, open(tmp, "wb") as f:
        record = json.dumps(config, sort_keys=True, default=str)
        torch.export.save(program, f, extra_files={PROGRAM_EXTRA_FILE: record})
    result = DeployResult(Path(path), "torch-export", size, dynamic, pairs, None, "torch.export.export")
    return _verified(result, model) if verify else result


def _verified(result: DeployResult, model: nn.Module) -> DeployResult:
    result.verification = verify_export(result.path, model, img_size=result.input_size[1])
    return result


def verify_export(
    path: str | os.PathLike,
    reference: nn.Module | str | os.PathLike,
    *,
    images: Any = None,
    num_random: int = 4,
    seed: int = 0,
    rtol: float | None = None,
    img_size: int | None = None,
) -> VerifyResult:
    """:func:`wsurgery.verify` for an ``.onnx`` / ``.pt2`` file, which takes that format's defaults.

    The tolerance defaults to :data:`DEFAULT_RTOL` for the suffix and the input size to the
    size the file was exported for (recorded in it), as in :func:`wsurgery.verify` itself.

    Args:
        path: the exported ``.onnx`` or ``.pt2`` file.
        reference: the unfolded model (module or surgery directory).
        images: user images added to the random inputs (files, folder, glob).
        num_random: number of random inputs.
        seed: seed of the random inputs.
        rtol: pass threshold on the max relative difference.
        img_size: input size override.

    Returns:
        A :class:`wsurgery.VerifyResult`; check ``passed``.
    """
    return verify(Path(path), reference, images=images, num_random=num_random, seed=seed, rtol=rtol, img_size=img_size)


# ---------------------------------------------------------------------------------------------
# graph check


def find_weight_standardization(model: Any) -> list[StandardizationOp]:
    """Normalization ops in an ONNX graph that are computed from weight initializers alone.

    A value is *weight-derived* when it is an initializer, or the output of a node all of
    whose inputs are weight-derived or constants (``Constant`` nodes). Every node of
    :data:`STANDARDIZATION_OPS` whose inputs are all weight-derived and trace back to at
    least one initializer is reported: such a node recomputes a standardized weight on
    every run (``(W - mean) / sqrt(var + eps)``, or timm's ``BatchNormalization`` over the
    weight). A normalization of activations (BatchNorm / GroupNorm of a feature map) reads
    the graph input and is not reported. Subgraphs (``If``/``Loop`` bodies) are not searched.

    Args:
        model: an ``onnx.ModelProto`` or a path to an ``.onnx`` file.

    Returns:
        The offending nodes (empty when every standardization was folded).
    """
    if not hasattr(model, "graph"):
        onnx, _ = require_onnx()
        path = Path(model)
        if not path.is_file():
            raise InputNotFoundError(f"{path} not found; pass an .onnx file")
        model = onnx.load(str(path))
    graph = model.graph
    # origin[value] = initializers it is computed from (empty set: a constant, no weight)
    origin: dict[str, frozenset[str]] = {init.name: frozenset([init.name]) for init in graph.initializer}
    found = []
    for node in graph.node:  # ONNX requires topological order
        inputs = [i for i in node.input if i]
        if node.op_type == "Constant" and not inputs:
            deps: frozenset[str] | None = frozenset()
        elif inputs and all(i in origin for i in inputs):
            deps = frozenset().union(*(origin[i] for i in inputs))
        else:
            deps = None
        if deps is None:
            continue
        for out in node.output:
            origin[out] = deps
        if node.op_type in STANDARDIZATION_OPS and deps:
            found.append(StandardizationOp(node.name, node.op_type, sorted(deps)))
    return found


# ---------------------------------------------------------------------------------------------
# reading and running


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The wsurgery record stored in an exported ``.onnx`` or ``.pt2`` file (``{}`` if none)."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found")
    if path.suffix == ".onnx":
        onnx, _ = require_onnx()
        proto = onnx.load(str(path), load_external_data=False)
        text = next((p.value for p in proto.metadata_props if p.key == METADATA_KEY), "")
    elif path.suffix == ".pt2":
        text = ""
        with _open_zip(path) as z:
            for name in z.namelist():
                if name.endswith("extra/" + PROGRAM_EXTRA_FILE):
                    text = z.read(name).decode()
    else:
        raise InputNotFoundError(f"{path}: expected an .onnx or .pt2 file")
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}


def recorded_img_size(path: str | os.PathLike) -> int | None:
    """The square input size an ``.onnx``/``.pt2`` file was exported for, if recorded."""
    size = (read_metadata(path).get("wsurgery") or {}).get("input_size")
    if isinstance(size, list) and len(size) == 3 and size[1] == size[2]:
        return int(size[1])
    return None


def _run_in_chunks(fn: Runner, x: torch.Tensor, batch: int | None) -> torch.Tensor:
    if batch is None or x.shape[0] == batch:
        return fn(x)
    if x.shape[0] % batch:
        raise ConversionError(f"this export has a fixed batch of {batch}; pass a multiple of {batch} inputs")
    return torch.cat([fn(chunk) for chunk in x.split(batch)])


def _check_input(path: Path, expected: list, x: torch.Tensor) -> None:
    fixed = [d if isinstance(d, int) and d > 0 else None for d in expected[1:]]
    got = list(x.shape[1:])
    if any(f is not None and f != g for f, g in zip(fixed, got)):
        shown = "x".join(str(f) if f else "?" for f in fixed)
        raise ConversionError(
            f"{path.name} expects inputs of {shown}, got {'x'.join(map(str, got))}; pass --img-size {fixed[-1]}"
        )


def onnx_runner(path: str | os.PathLike) -> Runner:
    """A function running an ``.onnx`` file with onnxruntime on CPU (fp32 in, fp32 out)."""
    _, ort = require_onnx()
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found")
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise CheckpointError(f"{path} is not a loadable ONNX model ({_first_line(e)})") from None
    spec = session.get_inputs()[0]
    batch = spec.shape[0] if isinstance(spec.shape[0], int) else None

    def run_once(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {spec.name: x.detach().float().cpu().contiguous().numpy()})[:1]
        return torch.from_numpy(out).float()

    def run(x: torch.Tensor) -> torch.Tensor:
        _check_input(path, spec.shape, x)
        return _run_in_chunks(run_once, x, batch)

    return run


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a torch.export archive ({_first_line(e)}); it may be truncated") from None


def check_program_archive(path: str | os.PathLike) -> None:
    """Refuse a ``.pt2`` archive that ``torch.export.load`` would unpickle arbitrary objects from.

    ``torch.export.load`` reads weights as raw bytes, but falls back to ``torch.load(...,
    weights_only=False)`` or ``pickle.loads`` for pickled weights and constants, custom or
    opaque objects, legacy ``.pt`` weight files and sample inputs that ``weights_only``
    refuses. We write none of those; an archive holding any of them is refused before loading.

    Raises:
        CheckpointError: not a readable archive.
        UnsafeCheckpointError: the archive holds pickled payloads.
    """
    path = Path(path)
    unsafe = UnsafeCheckpointError(
        f"{path} holds pickled objects that torch.export.load would unpickle (could run code); refused. "
        "Re-export it with wsurgery export --format torch-export"
    )
    with _open_zip(path) as z:
        names = z.namelist()
        configs = [n for n in names if n.endswith(("_weights_config.json", "_constants_config.json"))]
        if not any(n.endswith("_weights_config.json") for n in configs):
            if any("/data/weights/" in n and n.endswith(".pt") for n in names):
                raise unsafe  # the legacy format: weights as one torch.save pickle
            raise CheckpointError(f"{path} is not a torch.export archive (no weights config); re-export it")
        for name in configs:
            try:
                entries = json.loads(z.read(name)).get("config", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise CheckpointError(f"{path}: {name} is malformed; re-export it") from None
            for meta in entries.values():
                if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(("custom_obj_", "opaque_obj_")):
                    raise unsafe
        for name in names:
            if "/data/sample_inputs/" in name:
                try:
                    torch.load(io.BytesIO(z.read(name)), weights_only=True)
                except Exception:  # noqa: BLE001 - whatever weights_only refuses is unsafe to load
                    raise unsafe from None


def program_runner(path: str | os.PathLike) -> Runner:
    """A function running a ``.pt2`` program (``torch.export.load(path).module()``), on CPU."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found")
    check_program_archive(path)
    extra = {PROGRAM_EXTRA_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = torch.export.load(str(path), extra_files=extra).module()
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a loadable torch.export program ({_first_line(e)})") from None
    try:
        record = json.loads(extra[PROGRAM_EXTRA_FILE] or "{}").get("wsurgery", {})
    except json.JSONDecodeError:
        record = {}
    batch = record.get("static_batch")
    size = record.get("input_size")

    @torch.no_grad()
    def run_once(x: torch.Tensor) -> torch.Tensor:
        return module(x.detach().float().cpu()).float()

    def run(x: torch.Tensor) -> torch.Tensor:
        if size:
            _check_input(path, [None, *size], x)
        return _run_in_chunks(run_once, x, int(batch) if batch else None)

    return run


RUNNERS[".onnx"] = onnx_runner
RUNNERS[".pt2"] = program_runner
