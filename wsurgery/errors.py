"""One error hierarchy for the whole library.

Every error wsurgery raises on purpose is a :class:`WSurgeryError`. Each subclass
also subclasses the builtin a caller would naturally catch (``ValueError``,
``FileNotFoundError`` ...), the way peft's ``NoMatchingPeftModuleError`` does, so
``except ValueError`` keeps working for people who do not know our types.

Messages are one line: what is wrong, then what to do about it. The CLI prints
them as they are.
"""

from __future__ import annotations

__all__ = [
    "ArgumentTypeError",
    "CheckpointError",
    "CheckpointMismatchError",
    "ConfigError",
    "ConversionError",
    "DatasetError",
    "InputNotFoundError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "NetworkUnavailableError",
    "NonFiniteWeightsError",
    "OutputExistsError",
    "RecipeError",
    "UnsafeCheckpointError",
    "UsageError",
    "VerificationError",
    "WSurgeryError",
]


class WSurgeryError(Exception):
    """Base class of every error raised on purpose by wsurgery."""

    #: exit code the CLI uses for this error: 1 for a user error, 2 for a usage error
    exit_code: int = 1


# not in __all__, which lists the error hierarchy: a signal, not an error
class Terminated(KeyboardInterrupt):
    """SIGTERM (kill, timeout, docker stop, Slurm), raised where a handler turns the signal into an
    exception. A ``KeyboardInterrupt``, so everything that cleans up on Ctrl-C cleans up on it too;
    the CLI exits with 143 (128 + SIGTERM) for it and 130 for Ctrl-C, as shells do."""

    exit_code = 143


class UsageError(WSurgeryError, ValueError):
    """The call itself is malformed (conflicting options, bad option values)."""

    exit_code = 2


class ArgumentTypeError(UsageError, TypeError):
    """An argument has the wrong type (a tensor where a model goes, a string where a number goes)."""


class ConfigError(WSurgeryError, ValueError):
    """A configuration value is invalid (negative eps, unknown mode ...)."""

    exit_code = 2


class ModelNotFoundError(WSurgeryError, ValueError):
    """A model name is neither a timm architecture, a directory nor a hub id."""


class CheckpointError(WSurgeryError, ValueError):
    """A checkpoint file is unreadable, truncated or corrupt."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint's keys or shapes do not fit the model it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint holds objects that ``weights_only=True`` refuses to build."""


class OutputExistsError(WSurgeryError, FileExistsError):
    """The output path exists and ``force`` was not given."""


class InputNotFoundError(WSurgeryError, FileNotFoundError):
    """An input path does not exist or cannot be read."""


class NonFiniteWeightsError(WSurgeryError, ValueError):
    """A weight holds NaN or inf; folding or exporting it would ship garbage."""


class ConversionError(WSurgeryError, ValueError):
    """The surgery cannot be applied to this model as configured."""


class DatasetError(WSurgeryError, ValueError):
    """A dataset is empty, malformed, or has too few classes."""


class RecipeError(WSurgeryError, ValueError):
    """A training recipe has an unknown key, a wrong type or a nonsensical value."""

    exit_code = 2


class VerificationError(WSurgeryError, AssertionError):
    """An exported model does not reproduce the model it was exported from."""


class MissingDependencyError(WSurgeryError, ImportError):
    """An optional dependency is needed; the message names the extra to install."""


class NetworkUnavailableError(WSurgeryError, ConnectionError):
    """Pretrained weights need the network and it cannot be reached."""
