"""What every command shares: consoles, the one error path, rendering helpers."""

from __future__ import annotations

import errno
import functools
import json
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from wsurgery.compare import Agreement
from wsurgery.errors import UsageError, WSurgeryError
from wsurgery.train import TrainingInterrupted

console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

DEBUG_ENV = "WSURGERY_DEBUG"


#: set by the root ``--debug`` option for the current invocation (reset on every invocation, so
#: one ``--debug`` call never leaks into the next one run in the same process, e.g. by CliRunner)
debug_flag = False


def set_debug(enabled: bool) -> None:
    global debug_flag
    debug_flag = enabled


def debug_enabled() -> bool:
    return debug_flag or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def fail(message: str, code: int = 1, label: str = "[bold red]error:[/]") -> typer.Exit:
    """Print one error line to stderr and return the Exit to raise."""
    # escape: messages hold literal brackets (pip install 'wsurgery[onnx]', shapes) that rich would eat as markup
    err_console.print(f"{label} {escape(message)}", markup=True, highlight=False)
    return typer.Exit(code)


def stopped(message: str, code: int) -> typer.Exit:
    """Like :func:`fail` for a stop the user asked for (Ctrl-C, SIGTERM): not an error, the same one line."""
    return fail(message, code, label="[bold yellow]stopped:[/]")


def check_at_least(*checks: tuple[str, int | None, int]) -> None:
    """``UsageError`` naming the first ``(flag, value, lowest)`` whose value (when given) is below ``lowest``.

    For flags checked before a slow step (a model load, deleting an old output), so the error
    names the flag the user typed rather than the library argument it becomes.
    """
    for flag, value, lowest in checks:
        if value is not None and value < lowest:
            raise UsageError(f"{flag} must be at least {lowest}, got {value}")


#: numpy's seeds are 32-bit (torch's 64-bit): --seed takes 0 to 2**32 - 1 everywhere
SEED_MAX = 2**32 - 1


def flag(*args: Any, **kwargs: Any) -> Any:
    """``typer.Option`` for an on/off flag: no ``<bool>`` in the help (typer shows each option's type, and a
    flag takes no value)."""
    return typer.Option(*args, metavar="", **kwargs)


#: the fix for an OSError the library did not turn into a WSurgeryError, by errno
_OS_FIXES = {
    errno.ENOSPC: "free space on that disk or choose another path (-o)",
    errno.EDQUOT: "free space in your quota or choose another path (-o)",
    errno.EACCES: "fix the permissions or choose another path (-o)",
    errno.EPERM: "fix the permissions or choose another path (-o)",
    errno.EROFS: "the file system is read-only: choose another path (-o)",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ENOENT: "check that the path exists",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
}


def handle_errors(fn: F) -> F:
    """Map every exception to one line on stderr and an exit code (no traceback).

    WSurgeryError subclasses carry their own exit code (1 user error, 2 usage error).
    ``--debug`` or ``WSURGERY_DEBUG=1`` prints the traceback as well.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt as e:  # Ctrl-C 130, SIGTERM (Terminated) 143, as shells report them
            code = getattr(e, "exit_code", 130)
            raise stopped("terminated (SIGTERM)" if code == 143 else "interrupted (Ctrl-C)", code) from None
        except TrainingInterrupted as e:  # the run stopped as asked, after writing its checkpoint
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            raise stopped(_one_line(e), e.exit_code) from None
        except WSurgeryError as e:
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            raise fail(_one_line(e), e.exit_code) from None
        except OSError as e:  # a full disk, a read-only folder, a name too long: the system's words, and a fix
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            where = f" ({e.filename})" if e.filename else ""
            fix = _OS_FIXES.get(e.errno, "check the path and the disk")
            raise fail(f"{e.strerror or _one_line(e)}{where}; {fix}, then run the command again "
                       f"(--debug shows the traceback)") from None
        except Exception as e:  # noqa: BLE001 - the CLI never shows a bare traceback
            if debug_enabled():
                traceback.print_exc(file=sys.stderr)
            raise fail(f"{type(e).__name__}: {_one_line(e)} "
                       f"(set {DEBUG_ENV}=1 or pass --debug for the traceback)") from None

    return wrapper  # type: ignore[return-value]


def _one_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return " ".join(text.split())


def kv_table(title: str, rows: list[tuple[str, Any]]) -> Table:
    """A two-column table; values (paths, names) are text, not rich markup, and wrap rather than
    being cut at the console's width (80 columns when piped)."""
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column(style="bold", overflow="fold")
    table.add_column(overflow="fold")
    for k, v in rows:
        table.add_row(escape(str(k)), escape(str(v)))
    return table


def print_json(data: Any) -> None:
    """JSON on stdout as plain text: no colour codes (rich adds them under FORCE_COLOR), for pipes."""
    print(json.dumps(data, indent=2, default=str))


def note(message: str) -> None:
    """A note for the person at the terminal, on stderr: stdout keeps the command's result."""
    err_console.print(f"note: {escape(message)}")


def confident_cell(a: Agreement) -> str:
    """``top1_confident`` with its image count, or a dash when the reference was confident on none."""
    return f"{a.top1_confident:.1%} of {a.num_confident}" if a.top1_confident is not None else "- (none)"


def fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)
