"""Files in and out: atomic writes, safe weight loading, JSON configs.

Nothing is lost: every output is written under a temporary name in the destination's own
folder, fsynced, then renamed into place (a rename within one filesystem is atomic), so a
reader sees either no file or a complete one. A directory output is assembled the same
way and renamed as a whole. An existing output is only replaced with ``force``.

Nothing untrusted is unpickled: safetensors for weights, ``torch.load(weights_only=True)``
for ``.pth/.bin/.pt``, ``json`` for configs.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pickle
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, InputNotFoundError, OutputExistsError, UnsafeCheckpointError, UsageError

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "atomic_dir",
    "atomic_file",
    "check_output",
    "check_replaceable",
    "fsync_dir",
    "load_safetensors",
    "load_state_dict_file",
    "read_json",
    "read_safetensors_metadata",
    "remove_output",
    "save_safetensors",
    "write_json",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (so a rename inside it survives a power cut)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def check_output(
    path: str | os.PathLike,
    force: bool,
    *,
    inputs: tuple[str | os.PathLike | None, ...] = (),
    markers: tuple[str, ...] = (),
    create_parent: bool = True,
) -> Path:
    """Refuse to overwrite ``path`` unless ``force``; make sure its parent exists (``create_parent``).

    With ``force``, :func:`check_replaceable` decides whether ``path`` may be replaced at all. An early
    check (before a slow load that may still fail) passes ``create_parent=False``, so a failed command
    leaves no empty folders behind.
    """
    path = Path(path)
    if os.path.lexists(path):  # lexists: a symlink to nothing is an existing entry too
        if not force:
            what = "is a symlink to a missing path" if not path.exists() else "already exists"
            raise OutputExistsError(f"{path} {what}; pass --force (force=True) to overwrite it")
        check_replaceable(path, inputs=inputs, markers=markers)
    if create_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_replaceable(
    path: str | os.PathLike,
    *,
    inputs: tuple[str | os.PathLike | None, ...] = (),
    markers: tuple[str, ...] = (),
) -> None:
    """Refuse to replace (delete) ``path`` where that would lose more than an earlier output.

    Refused: the current directory or a folder above it, the home directory, a path that is or
    holds one of ``inputs`` (``export runs/m -o runs --force`` would delete ``runs/m`` before using
    it), and, when ``markers`` are given, a non-empty directory holding none of them (not an
    earlier output of this kind: ``-o ~/projects --force`` would delete everything in it).
    """
    path = Path(path)
    if path.is_symlink() or not os.path.lexists(path):
        return  # --force replaces the link itself, never its target
    target = path.resolve()
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents or target == Path.home().resolve():
        raise UsageError(f"{path} is the current directory, a folder above it or the home directory; "
                         "--force would delete everything in it: write to a new directory (-o DIR)")
    for inp in inputs:
        if inp is None or not os.path.lexists(inp):
            continue
        source = Path(inp).resolve()
        # the input, a folder holding it, or one of the input directory's files
        if target == source or target in source.parents or (source in target.parents and not target.is_dir()):
            raise UsageError(f"{path} holds the input {inp}; --force would delete it before it is read: "
                             "write to another directory (-o)")
    if markers and not target.is_dir():  # these commands write directories: a file is no earlier output
        raise UsageError(f"{path} is a file, not an earlier output of this command (a directory), and --force "
                         "would delete it: write to a new directory (-o)")
    if markers and any(target.iterdir()) and not any((target / m).exists() for m in markers):
        raise UsageError(f"{path} is not an earlier output of this command (it has no {' or '.join(markers)}) and "
                         "--force would delete everything in it: write to a new directory (-o) or empty it yourself")


def _current_umask() -> int:
    """The process umask. Linux (4.7+) reports it in ``/proc/self/status``; elsewhere the only portable
    way is to set it and restore it, and for that instant another thread's new file would get mode 0666."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:  # the name line may not be ASCII
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _umask_mode(directory: bool) -> int:
    """The mode ``open``/``mkdir`` would give a new file or directory (mkstemp/mkdtemp use 0600/0700)."""
    return (0o777 if directory else 0o666) & ~_current_umask()


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed to ``path``."""
    path = check_output(path, force)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _umask_mode(directory=False))
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        tmp_path.unlink(missing_ok=True)


def remove_output(path: str | os.PathLike, ignore_errors: bool = False) -> None:
    """Delete an output that ``--force`` replaces: a directory with everything in it, a file, or a symlink
    (the link itself, never what it points to)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported.

    Replacing a directory otherwise takes two renames, and a kill between them would leave
    the destination missing (the old output survives under a hidden ``.old`` name).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, force: bool = False, *, markers: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; on success it replaces ``path`` whole.

    Files written into it should be fsynced by their writers (the helpers here do). ``markers``: see
    :func:`check_replaceable`.
    """
    path = check_output(path, force, markers=markers)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, _umask_mode(directory=True))
        fsync_dir(tmp)
        if os.path.lexists(path) and _exchange(tmp, path):  # --force: swap atomically, then delete the old
            remove_output(tmp, ignore_errors=True)
        elif os.path.lexists(path):  # no atomic swap here: move the old output aside, put the new one in
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            os.replace(path, old)
            os.replace(tmp, path)
            remove_output(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write sorted, indented JSON and fsync it (into a directory being assembled atomically)."""
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default) + "\n")
    _fsync_file(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (tuple, set)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    raise TypeError(f"cannot store {type(obj).__name__} in JSON")


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON object, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found; is this a wsurgery or timm model directory?")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e.__class__.__name__}: {e}); re-create it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors that own their storage, copying only those that do not already.

    safetensors refuses tensors that share memory (tied weights, views); copying every tensor
    instead would double the memory of a large model for nothing.
    """
    seen: set[int] = set()
    clean = {}
    for key, value in tensors.items():
        value = value.detach()
        storage = value.untyped_storage()
        ptr = storage.data_ptr()
        owns = value.is_contiguous() and storage.nbytes() == value.numel() * value.element_size()
        if not owns or ptr in seen:
            value = value.contiguous().clone()
        seen.add(value.untyped_storage().data_ptr())
        clean[key] = value
    return clean


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file`` with contiguous, unshared tensors and ``format: pt``; fsynced."""
    clean = _unshared(tensors)
    meta = {"format": "pt", **(metadata or {})}
    save_file(clean, str(path), metadata=meta)
    os.chmod(path, _umask_mode(directory=False))  # safetensors writes through a private (0600) temporary
    _fsync_file(Path(path))


def _not_safetensors(path: Path, e: Exception) -> CheckpointError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return CheckpointError(f"{path} is not a valid safetensors file ({msg}); it may be truncated or corrupt")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file (its header only; no tensor is read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_safetensors(path, e) from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a safetensors file; a truncated or corrupt file gives a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"{path} not found")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _not_safetensors(path, e) from None


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    # training scripts nest the weights: {"state_dict": ...}, {"model": ...}, EMA copies
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            return _unwrap(obj[key], path)
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds no state dict (found {type(obj).__name__})")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds no tensors")
    return tensors


#: key prefixes that wrappers add to every key: DataParallel / DDP (``module.``), torch.compile (``_orig_mod.``)
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``module.`` / ``_orig_mod.`` prefixes that DDP and torch.compile add, nested or not.

    A prefix is dropped only when every key carries it (a real submodule named ``module`` beside
    others keeps its name).
    """
    while tensors:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in tensors)), None)
        if prefix is None:
            break
        tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def _looks_unsafe(path: Path, message: str) -> bool:
    """Did ``weights_only`` refuse a real pickle (code it will not run), or just garbage?

    torch words both the same way ("Weights only load failed"); a refused global names itself,
    and a file that starts like a pickle (protocol opcode 0x80) or a torch zip archive is a
    pickle whose content the safe loader would not build.
    """
    if "GLOBAL" in message or "Unsupported global" in message or "Unsupported class" in message:
        return True
    with contextlib.suppress(OSError), open(path, "rb") as f:
        head = f.read(2)
        return head[:1] == b"\x80" or head == b"PK"
    return False


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read weights from ``.safetensors`` or a pickle checkpoint, never running code.

    Pickle files are read with ``torch.load(weights_only=True)``, which refuses anything
    but tensors and plain containers. Nested ``state_dict`` / ``model`` keys are unwrapped, and
    in either format the ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) key prefixes dropped.

    Raises:
        InputNotFoundError: the file does not exist.
        UnsafeCheckpointError: the pickle holds objects that would run code on load.
        CheckpointError: the file is corrupt, truncated, or holds no tensors.
    """
    path = Path(path)
    if path.is_dir():
        raise InputNotFoundError(f"checkpoint {path} is a directory; pass a .safetensors/.pth/.bin/.pt file "
                                 "(a saved wsurgery directory goes in the MODEL argument)")
    if not path.is_file():
        raise InputNotFoundError(f"checkpoint {path} not found; check the path")
    if path.suffix == ".safetensors" or _is_safetensors(path):  # by name, or by content under any name
        return _strip_wrapper_prefixes(load_safetensors(path))
    unreadable = (f"{path} is not a readable checkpoint; expected a .safetensors file or a PyTorch "
                  ".pth/.bin/.pt state dict (it may be truncated or corrupt)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise around a one-line error
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if _looks_unsafe(path, str(e)):
            raise UnsafeCheckpointError(
                f"{path} holds pickled objects beyond plain tensors, which could run code; refused. "
                "Convert it to .safetensors in a trusted environment"
            ) from None
        # torch's own message suggests weights_only=False: never the advice for a file we cannot read
        raise CheckpointError(unreadable) from None
    except Exception:  # noqa: BLE001 - torch.load raises KeyError, RuntimeError, ... on files that are not checkpoints
        raise CheckpointError(unreadable) from None
    return _strip_wrapper_prefixes(_unwrap(obj, path))


def _is_safetensors(path: Path) -> bool:
    """True when ``path`` starts like a safetensors file: an 8-byte header length, then ``{``."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    size = int.from_bytes(head[:8], "little")
    return 2 <= size <= path.stat().st_size - 8
