"""Step 1 of the flow: get a model.

:func:`load` takes any of

* a timm architecture name (``"resnet50"``), pretrained from the hub when online;
* a timm model name plus a local checkpoint (``.safetensors``, or ``.pth/.bin/.pt`` read with
  ``torch.load(weights_only=True)``), optionally remapped by order for checkpoints from
  another implementation (timm's ``remap_state_dict``);
* an ``hf-hub:org/name`` id;
* a directory written by :func:`wsurgery.save` (a converted model), by
  :func:`wsurgery.export` (a folded model), or by timm's ``save_for_hf`` (``local-dir:``).
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from timm.models import remap_state_dict
from torch import nn
from torch.overrides import TorchFunctionMode

from .calibrate import ANCHORED_ATTR, add_precondition_biases
from .config import SurgeryConfig
from .convert import apply_surgery, pin_build_args, plan_surgery, pooled_norms
from .errors import (
    ArgumentTypeError,
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    ConversionError,
    InputNotFoundError,
    ModelNotFoundError,
    NetworkUnavailableError,
    UsageError,
    WSurgeryError,
)
from .fold import fold, fold_conv_bn
from .io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    _is_safetensors,  # the same test load_state_dict_file reads a file by
    load_safetensors,
    load_state_dict_file,
    read_json,
    read_safetensors_metadata,
)

__all__ = ["SOURCE_ATTR", "checkpoint_num_classes", "load", "load_checkpoint", "model_record", "rebuild",
           "suggest_models"]

#: attribute holding where a model came from (model name, checkpoint, pretrained)
SOURCE_ATTR = "wsurgery_source"


def suggest_models(name: str, n: int = 3) -> list[str]:
    """The timm model names closest to ``name``."""
    return difflib.get_close_matches(name, timm.list_models(), n=n, cutoff=0.5)


def _unknown_model(name: str) -> ModelNotFoundError:
    close = suggest_models(name)
    hint = f"did you mean {', '.join(close)}?" if close else "`timm.list_models('*pattern*')` lists the names"
    return ModelNotFoundError(f"unknown model {name!r}: not a timm architecture, directory or hf-hub id; {hint}")


def _first_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    expected = model.state_dict()
    heads = set(_classifier_keys(model))
    for key, value in expected.items():
        if key not in state_dict:
            hint = ("a checkpoint without a classifier? pass --num-classes N for a new one, or 0 for none"
                    if key in heads else "is it for another architecture? for reordered names try --remap-by-order")
            raise CheckpointMismatchError(
                f"{source} does not fit this model: missing key {key!r} {tuple(value.shape)} ({hint})")
        if state_dict[key].shape != value.shape:
            hint = "; pass --num-classes to match the head" if key.split(".")[-1] in ("weight", "bias") and \
                value.dim() <= 2 else ""
            raise CheckpointMismatchError(
                f"{source} does not fit this model: {key!r} is {tuple(state_dict[key].shape)} in the checkpoint "
                f"but {tuple(value.shape)} in the model{hint}"
            )
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise CheckpointMismatchError(
            f"{source} does not fit this model: unexpected key {extra[0]!r} ({len(extra)} in all); "
            "is it for another architecture?"
        )


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """The key prefixes of the classifier(s) that ``pretrained_cfg['classifier']`` names (``fc.``, ``head.fc.``)."""
    heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return tuple(f"{h}." for h in heads)


def _classifier_keys(model: nn.Module) -> list[str]:
    prefixes = _classifier_prefixes(model)
    return [k for k in model.state_dict() if prefixes and k.startswith(prefixes)]


def _keep_new_head(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """--num-classes with a checkpoint: keep the checkpoint's head where it fits the model's, else the model's own.

    The model's own head is timm's fresh one of ``num_classes`` classes, or none for 0; so a head of
    another size is replaced, a head the model does not have (0 classes) dropped, and a headless
    checkpoint gets the new head. Only classifier keys are touched: the backbone must still fit.
    """
    prefixes = _classifier_prefixes(model)
    if not prefixes:
        return state_dict
    expected = model.state_dict()
    model_head = {k: v for k, v in expected.items() if k.startswith(prefixes)}
    ckpt_head = {k: v for k, v in state_dict.items() if k.startswith(prefixes)}
    if ckpt_head.keys() == model_head.keys() and all(v.shape == model_head[k].shape for k, v in ckpt_head.items()):
        return state_dict  # the same number of classes: the checkpoint's trained head stays
    body = {k: v for k, v in state_dict.items() if k not in ckpt_head}
    return {**body, **model_head}


def _headed_keys(model: nn.Module) -> list[str] | None:
    """The state-dict keys, in order, of ``model`` built with a classifier (it was built with
    ``num_classes=0``): where a full checkpoint's head tensors sit. None if it cannot be rebuilt."""
    try:
        record = model_record(model)
    except ConversionError:  # not a timm model: no head positions, the count check reports the mismatch
        return None
    args = {**record["model_args"], "num_classes": record["pretrained_cfg"].get("num_classes") or 1000}
    headed = build_on_meta(record["architecture"], args)
    return list(headed.state_dict()) if headed is not None else None


def _remap_by_order(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str,
                    new_head: bool, hint: str = "") -> dict[str, torch.Tensor]:
    """Match the checkpoint's tensors to the model's in order, names ignored (timm's ``remap_state_dict``).

    With ``new_head`` the classifier tensors are set aside on both sides first (found by their
    position in the model, or in the model rebuilt with a head when it has none), so a checkpoint
    with or without a head fits a model with or without one; the backbone must match exactly.
    """
    expected = model.state_dict()
    ckpt = list(state_dict.items())
    model_keys = list(expected)
    heads = set(_classifier_keys(model)) if new_head else set()
    head_keys = [k for k in model_keys if k in heads]
    body_keys = [k for k in model_keys if k not in heads]
    ckpt_head: list[tuple[str, torch.Tensor]] = []
    ckpt_body = ckpt
    if new_head and len(ckpt) == len(model_keys):  # both with a head (or both without)
        ckpt_head = [item for key, item in zip(model_keys, ckpt) if key in heads]
        ckpt_body = [item for key, item in zip(model_keys, ckpt) if key not in heads]
    elif new_head and heads and len(ckpt) == len(body_keys):  # a headless checkpoint: the model's new head
        pass
    elif new_head and not heads and len(ckpt) > len(model_keys):  # num_classes=0: drop the checkpoint's head
        headed = _headed_keys(model)
        prefixes = _classifier_prefixes(model)
        if (headed is not None and prefixes and len(headed) == len(ckpt)
                and [k for k in headed if not k.startswith(prefixes)] == model_keys):
            ckpt_body = [item for key, item in zip(headed, ckpt) if not key.startswith(prefixes)]
    if len(ckpt_body) != len(body_keys):
        raise CheckpointMismatchError(
            f"{source} has {len(state_dict)} tensors but the model has {len(expected)}; "
            f"remapping by order needs the same number (another architecture?){hint}"
        )
    remapped = {}
    for mk, (ck, cv) in zip(body_keys, ckpt_body):
        mv = expected[mk]
        if mv.numel() != cv.numel():
            raise CheckpointMismatchError(
                f"{source} does not fit this model by order: {ck!r} {tuple(cv.shape)} lands on "
                f"{mk!r} {tuple(mv.shape)}{hint}"
            )
        remapped[mk] = cv
    head_fits = len(ckpt_head) == len(heads) and all(
        expected[mk].numel() == cv.numel() for mk, (_, cv) in zip(head_keys, ckpt_head))
    for mk, (_, cv) in zip(head_keys, ckpt_head if head_fits else []):
        remapped[mk] = cv  # the same number of classes: the checkpoint's trained head
    for mk in heads - remapped.keys():
        remapped[mk] = expected[mk]  # --num-classes: the new head keeps its own init
    return remap_state_dict({k: remapped[k] for k in model_keys}, model)  # in the model's order; reshaped


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, remap_by_order: bool = False, new_head: bool = False
) -> nn.Module:
    """Load a checkpoint file into ``model`` (in place), checking every key and shape first.

    Args:
        model: the model to fill.
        path: ``.safetensors`` or ``.pth/.bin/.pt`` file.
        remap_by_order: ignore the checkpoint's names and match tensors in order, as timm's
            ``load_checkpoint(..., remap=True)`` does; counts and element counts must agree.
        new_head: the model was built with a new ``num_classes``: keep its own classifier unless the
            checkpoint's has the same shape (a checkpoint without a head, or a model without one
            with ``num_classes=0``, also fits); only the classifier keys are exempt from the checks.

    Returns:
        ``model``, filled.

    Raises:
        CheckpointMismatchError: naming the first key or shape that does not fit.
        InputNotFoundError: ``path`` does not exist; CheckpointError: it is not a readable checkpoint
            (UnsafeCheckpointError: a pickle holding anything but tensors, never unpickled).
    """
    state_dict = load_state_dict_file(path)
    source = f"checkpoint {Path(path).name}"
    if remap_by_order:
        # safetensors stores tensors sorted by dtype and name, not in the order they were saved
        hint = ("; a .safetensors file keeps no order (its tensors are sorted by dtype and name): remap from the "
                "original .pth/.bin" if _is_safetensors(Path(path)) else "")
        state_dict = _remap_by_order(model, state_dict, source, new_head, hint)
    if new_head:
        state_dict = _keep_new_head(model, state_dict)
    _first_mismatch(model, state_dict, source)
    model.load_state_dict(state_dict, strict=True)
    return model


def checkpoint_num_classes(architecture: str, path: str | os.PathLike, *, remap_by_order: bool = False) -> int | None:
    """The number of classes of the classifier in checkpoint ``path`` for timm's ``architecture``.

    Read off the first classifier weight that ``pretrained_cfg['classifier']`` names (by name, or by
    its position with ``remap_by_order``); None when the architecture is not timm's, the checkpoint
    has no such tensor, or it cannot be placed. For callers that must rebuild a model with the head a
    fine-tuned checkpoint carries (``convert --num-classes`` calibrates against it before the swap).
    """
    # with a head of 1 class: tags whose pretrained_cfg has none (.fcmae, .dinov2) would build without one
    model = build_on_meta(architecture, {"num_classes": 1}) if isinstance(architecture, str) else None
    if model is None:
        return None
    prefixes = _classifier_prefixes(model)
    expected = model.state_dict()
    weights = [k for k in expected if prefixes and k.startswith(prefixes) and k.endswith("weight")]
    if not weights or (remap_by_order and _is_safetensors(Path(path))):  # a safetensors file keeps no order
        return None
    state_dict = load_state_dict_file(path)
    if remap_by_order:
        tensors = list(state_dict.values())
        found = tensors[list(expected).index(weights[0])] if len(tensors) == len(expected) else None
    else:
        found = state_dict.get(weights[0])
    head = expected[weights[0]]
    if found is None or found.ndim != head.ndim or found.shape[1:] != head.shape[1:]:  # not a head of this model
        return None
    return int(found.shape[0])


def _hub_unreachable() -> bool:
    """True when the hub's host name does not even resolve (and no proxy would resolve it for us)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    host = urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except OSError:
        return True
    return False


@contextlib.contextmanager
def _offline_when_unreachable(pretrained: bool) -> Iterator[None]:
    """Without a network, let huggingface_hub answer from its cache at once.

    Otherwise it retries each weight file with back-off (a minute for resnet18 here) and logs a
    warning per attempt before the error; in offline mode a cached file still loads, a missing
    one fails immediately. We set the flag huggingface_hub reads (``HF_HUB_OFFLINE`` is read into
    ``constants`` at its import, so the environment variable would come too late) and restore it.
    """
    if not pretrained or not _hub_unreachable():
        yield
        return
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def _create_timm(name: str, pretrained: bool, **kwargs: Any) -> nn.Module:
    # an hf-hub: id needs the hub for its config.json even when no weights are wanted
    needs_hub = pretrained or name.startswith("hf-hub:")
    try:
        with _offline_when_unreachable(needs_hub):
            return timm.create_model(name, pretrained=pretrained, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise _unknown_model(name) from None
        if pretrained or (needs_hub and _hub_unreachable()):
            raise _network_error(name, e, pretrained) from None
        raise
    except (OSError, ConnectionError, ImportError, ValueError) as e:
        # weights are fetched with pretrained; an hf-hub: config alone is a network problem only offline
        # (online, a wrong or private repo id should say so itself)
        if pretrained or (needs_hub and _hub_unreachable()):
            raise _network_error(name, e, pretrained) from None
        raise


def _network_error(name: str, exc: Exception, pretrained: bool = True) -> NetworkUnavailableError:
    # the hub client's messages run to several sentences; keep the first, whole or cut at a word
    first = (str(exc).strip().splitlines() or [""])[0].split(". ")[0].strip()
    if len(first) > 100:
        first = first[:100].rsplit(" ", 1)[0] + "..."
    detail = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    if not pretrained:  # an hf-hub: id whose config.json could not be fetched
        arch = name.removeprefix("hf-hub:").split("/")[-1].split(".")[0]
        return NetworkUnavailableError(
            f"could not fetch the model config of {name} ({detail}); without a network name the timm "
            f"architecture instead (e.g. {arch}) with a local --checkpoint PATH"
        )
    return NetworkUnavailableError(
        f"could not fetch pretrained weights for {name} ({detail}); "
        "without a network pass a local --checkpoint PATH or --no-pretrained"
    )


class SkipInitOnMeta(TorchFunctionMode):
    """Turn random/constant weight init on meta tensors into no-ops.

    Meta tensors hold no data, yet ``normal_`` & co. on them run torch's Python reference
    decompositions (resnet50: ~0.4 s of kaiming init that produces nothing). Function modes
    are thread-local, so this affects nothing outside the ``with`` block.
    """

    _INIT_OPS = frozenset({"normal_", "uniform_", "trunc_normal_", "erfinv_", "fill_", "zero_",
                           "exponential_", "bernoulli_", "random_", "orthogonal_"})

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if (getattr(func, "__name__", "") in self._INIT_OPS and args and isinstance(args[0], torch.Tensor)
                and args[0].is_meta):
            return args[0]
        return func(*args, **(kwargs or {}))


def build_on_meta(architecture: str, args: dict[str, Any]) -> nn.Module | None:
    """The stock timm model for ``args``, built on the meta device (no memory, no init); None if refused."""
    try:
        with torch.device("meta"), SkipInitOnMeta():
            return timm.create_model(architecture, pretrained=False, **args)
    except Exception:  # noqa: BLE001 - a constructor that refuses the args is just "not compatible"
        return None


def model_record(model: nn.Module) -> dict[str, Any]:
    """The timm facts needed to rebuild ``model``: architecture, constructor args, data config."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    arch = cfg.get("architecture")
    if not arch:
        raise ConversionError("saving needs a timm model (one made by timm.create_model or wsurgery.load)")
    pin_build_args(model)
    model_args = dict(getattr(model, "_model_args", {}) or {})
    model_args.pop("pretrained_model_args", None)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None:
        model_args["num_classes"] = num_classes
    return {"architecture": arch, "model_args": model_args, "pretrained_cfg": cfg}


def rebuild(config: dict[str, Any], state_dict: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build the modules a saved config describes, then load ``state_dict`` into them.

    Structure is deterministic given the architecture, its constructor args and the
    surgery config, so the converted (or folded) modules are recreated exactly and the
    weights loaded strictly.
    """
    arch = config.get("architecture")
    if not isinstance(arch, str):
        raise ConversionError("config.json names no architecture; is this a wsurgery or timm directory?")
    if not timm.is_model(arch):
        raise _unknown_model(arch)
    model_args = dict(config.get("model_args") or {})
    ws = config.get("wsurgery") or {}
    try:
        model = timm.create_model(arch, pretrained=False, **model_args)
    except TypeError as e:
        raise ConversionError(f"config.json model_args do not fit {arch}: {e}") from None
    surgery = ws.get("surgery")
    if surgery:
        cfg = SurgeryConfig.from_dict(surgery)
        # the norms convert gave one group (1x1 maps); records older than that field: probe again
        pooled = frozenset(ws["pooled_norms"]) if "pooled_norms" in ws else (
            (pooled_norms(model) or frozenset()) if cfg.norm == "gn" else frozenset())
        apply_surgery(model, cfg, plan_surgery(model, cfg, pooled))
    if ws.get("preconditioned"):  # the biases calibration gave some convs (calibrate.precondition_gn_inputs)
        add_precondition_biases(model, list(ws["preconditioned"]))
    if ws.get("anchored"):  # not structure: the record that a later calibration leaves these convs as they are
        if not set(ws["anchored"]) <= set(ws.get("preconditioned") or ()):
            raise CheckpointError("wsurgery.anchored names convs that wsurgery.preconditioned does not (anchoring "
                                  "preconditions first); the record is corrupt: re-create the directory")
        setattr(model, ANCHORED_ATTR, sorted(ws["anchored"]))
    if ws.get("stage") == "folded":
        model = fold(model, inplace=True)
        fold_conv_bn(model, [tuple(p) for p in ws.get("fold_bn", [])], structure_only=True)
        model.wsurgery_folded_bn = [list(p) for p in ws.get("fold_bn", [])]
    if state_dict is not None:
        _first_mismatch(model, state_dict, "saved weights")
        model.load_state_dict(state_dict, strict=True)
    pretrained_cfg = dict(model.pretrained_cfg)
    # JSON turned timm's tuples (input_size, mean, std ...) into lists; timm expects tuples
    saved = {k: tuple(v) if isinstance(v, list) and k != "label_names" else v
             for k, v in (config.get("pretrained_cfg") or {}).items()}
    pretrained_cfg.update(saved)
    if config.get("label_names"):
        pretrained_cfg["label_names"] = list(config["label_names"])
    model.pretrained_cfg = pretrained_cfg
    model.default_cfg = pretrained_cfg
    setattr(model, SOURCE_ATTR, dict(ws.get("source") or {}, directory=str(config.get("_dir", ""))))
    for key in ("calibration", "report"):
        if key in ws:
            setattr(model, f"wsurgery_{key}", ws[key])
    return model


def _load_dir(path: Path) -> nn.Module:
    config = read_json(path / CONFIG_NAME)
    config_path = path / CONFIG_NAME
    if "wsurgery" not in config:
        # a stock timm export (save_for_hf): load it the timm way, whichever weights file it wrote
        # (model.safetensors, or pytorch_model.bin, which timm reads with torch.load(weights_only=True))
        try:
            return timm.create_model(f"local-dir:{path}", pretrained=True)
        except Exception as e:  # noqa: BLE001 - whatever timm raises, the directory is what is wrong
            first = (str(e).splitlines() or [""])[0][:200]
            raise CheckpointError(f"timm cannot load {path} ({type(e).__name__}: {first}); "
                                  f"is {CONFIG_NAME} damaged or a weights file missing? re-create the directory"
                                  ) from None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise InputNotFoundError(f"{weights} not found; the directory is incomplete (re-run the command that wrote it)")
    state_dict = load_safetensors(weights)
    config["_dir"] = str(path)
    _check_record(config, read_safetensors_metadata(weights), config_path)
    try:
        return rebuild(config, state_dict)
    except ConfigError as e:  # a bad value in a file is the file's fault (exit 1), not a usage error
        raise CheckpointError(f"{config_path} holds an invalid surgery config ({e}); re-create the directory") from None
    except WSurgeryError:
        raise
    except (TypeError, AttributeError, KeyError, IndexError, ValueError) as e:
        raise CheckpointError(f"{config_path} is malformed ({type(e).__name__}: {e}); "
                              "re-create the directory") from None


#: fields of the wsurgery record that decide the module structure; save/export also store the
#: record in the weights' metadata, so an edited or corrupt config.json cannot silently change them
#: (``anchored`` is not structure, but decides what a later calibration changes: anchoring twice would apply
#: its signs and offsets twice)
_STRUCTURE_FIELDS = ("stage", "surgery", "fold_bn", "pooled_norms", "preconditioned", "anchored")


def _check_record(config: dict[str, Any], metadata: dict[str, str], config_path: Path) -> None:
    ws = config.get("wsurgery")
    if not isinstance(ws, dict):
        raise CheckpointError(f"{config_path}: `wsurgery` must be an object, found {type(ws).__name__}; "
                              "re-create the directory")
    if "wsurgery" not in metadata:  # weights written without the record (older or other writers)
        return
    try:
        stored = json.loads(metadata["wsurgery"])
    except json.JSONDecodeError:
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointError(f"{config_path.parent / WEIGHTS_NAME}: its wsurgery metadata is corrupt; "
                              "re-create the directory")
    for key in _STRUCTURE_FIELDS:
        if json.loads(json.dumps(ws.get(key), default=str)) != stored.get(key):
            raise CheckpointError(
                f"{config_path} and {WEIGHTS_NAME} disagree on wsurgery.{key} (one was edited or is corrupt); "
                "re-create the directory, or restore the original config.json")


def load(
    source: str | os.PathLike,
    *,
    pretrained: bool | None = None,
    checkpoint: str | os.PathLike | None = None,
    remap_by_order: bool = False,
    num_classes: int | None = None,
    model_args: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """Load a model from a timm name, a checkpoint, an ``hf-hub:`` id or a saved directory.

    Args:
        source: timm architecture name, ``hf-hub:org/name``, or a directory written by
            :func:`wsurgery.save`, :func:`wsurgery.export` or timm's ``save_for_hf``.
        pretrained: fetch the pretrained weights timm knows for ``source``. Default: True
            unless ``checkpoint`` is given. Needs a network.
        checkpoint: local weights to load instead (``.safetensors``/``.pth``/``.bin``/``.pt``).
        remap_by_order: match checkpoint tensors to the model's in order, ignoring names.
        num_classes: give the model a classifier with this many classes. With a checkpoint,
            its head is kept when it has that many classes, and replaced by a new one otherwise.
        model_args: extra timm constructor arguments.
        device: move the model there.

    Returns:
        The model, in eval mode. Converted/folded directories come back converted/folded.

    Raises:
        ModelNotFoundError, InputNotFoundError, CheckpointError, CheckpointMismatchError,
        NetworkUnavailableError.
    """
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise ArgumentTypeError(f"`num_classes` must be an integer, got {num_classes!r}")
    if num_classes is not None and num_classes < 0:
        raise UsageError(f"`num_classes` (--num-classes) must be 0 (no classifier) or more, got {num_classes}")
    if device is not None:  # before the (slow) load
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise UsageError(f"`device` {device!r} is not a device torch knows; use cpu, cuda, cuda:N or mps") from None
    if not isinstance(source, (str, os.PathLike)):
        raise ArgumentTypeError(f"load takes a timm name, an hf-hub: id or a path, got {type(source).__name__}")
    source_str = os.fspath(source)
    path = Path(source_str)
    if path.is_dir():
        if checkpoint is not None:
            raise ConversionError("a saved directory already holds its weights; drop `checkpoint` (--checkpoint)")
        ignored = [name for name, value in (("pretrained (--pretrained)", pretrained),
                                            ("remap_by_order (--remap-by-order)", remap_by_order),
                                            ("model_args", model_args)) if value]
        if ignored:  # they would be ignored silently: the directory's own config.json decides
            raise UsageError(f"{path} is a saved directory, rebuilt from its own config.json and weights; "
                             + (f"{' and '.join(ignored)} do not apply to it (drop them)" if len(ignored) > 1
                                else f"{ignored[0]} does not apply to it (drop it)"))
        model = _load_dir(path)
        if num_classes is not None and num_classes != getattr(model, "num_classes", num_classes):
            model.reset_classifier(num_classes)
    else:
        if remap_by_order and checkpoint is None:  # it would be ignored silently
            raise UsageError("remap_by_order (--remap-by-order) matches a checkpoint's tensors to the model in order; "
                             "it needs checkpoint (--checkpoint PATH): pass one, or drop it")
        if source_str.startswith("local-dir:"):  # timm's prefix for a saved directory: the same as its path
            target = source_str[len("local-dir:"):]
            if not Path(target).is_dir():
                raise InputNotFoundError(f"{source_str}: {target} is not a directory; local-dir: names a directory "
                                         "written by wsurgery.save/export or timm's save_for_hf")
            return load(target, pretrained=pretrained, checkpoint=checkpoint, remap_by_order=remap_by_order,
                        num_classes=num_classes, model_args=model_args, device=device)
        looks_like_path = os.sep in source_str or source_str.endswith((".safetensors", ".pth", ".bin", ".pt"))
        if path.is_file() and not timm.is_model(source_str):  # a file says nothing of the architecture
            if path.suffix.lower() in (".onnx", ".pt2"):
                raise UsageError(f"{source_str} is an ONNX/torch.export graph, which only `wsurgery verify` runs; "
                                 "pass the export directory it was written to")
            raise UsageError(f"{source_str} is a file, not a model; pass a wsurgery export or surgery directory, "
                             "or a timm model name with this file as its checkpoint (--checkpoint)")
        if looks_like_path and not source_str.startswith("hf-hub:"):
            raise InputNotFoundError(f"{source_str} does not exist; pass a timm model name or an existing directory")
        if not source_str.startswith("hf-hub:") and not timm.is_model(source_str):
            raise _unknown_model(source_str)
        if pretrained is None:
            pretrained = checkpoint is None
        kwargs = dict(model_args or {})
        if checkpoint is not None:
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            model = _create_timm(source_str, False, **kwargs)
            load_checkpoint(model, checkpoint, remap_by_order=remap_by_order, new_head=num_classes is not None)
        else:
            if num_classes is not None:
                kwargs["num_classes"] = num_classes
            model = _create_timm(source_str, bool(pretrained), **kwargs)
        setattr(model, SOURCE_ATTR, {
            "model": source_str,
            "pretrained": bool(pretrained) and checkpoint is None,
            "checkpoint": os.fspath(checkpoint) if checkpoint is not None else None,
            "remap_by_order": remap_by_order,
        })
    model.eval()
    if device is not None:
        model.to(device)
    return model
