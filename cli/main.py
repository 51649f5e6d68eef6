"""The ``wsurgery`` app: one module per command, combined here."""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

import typer
import typer.core
import typer.rich_utils

from wsurgery.errors import Terminated

from . import compare as _compare
from . import convert as _convert
from . import demo as _demo
from . import export as _export
from . import inspect as _inspect
from . import predict as _predict
from . import train as _train
from . import verify as _verify
from ._common import DEBUG_ENV, flag, set_debug

# typer re-exports BadParameter (a click UsageError, a ClickException) from whichever click it runs
# on (its own vendored copy since 0.2x, click itself before): the base classes are taken from it
UsageError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "UsageError")
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

class _NoTypeHelp:
    """No type beside ``--help`` (a flag takes no value): typer 0.2x's vendored click shows ``<bool>`` there,
    as it did beside every flag (``_common.flag`` gives those an empty metavar; this does the same for
    ``--help``, the one option typer makes itself)."""

    def get_help_option(self, ctx: Any) -> Any:  # click's Context and Option, vendored by typer 0.2x or not
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class _Command(_NoTypeHelp, typer.core.TyperCommand):
    pass


class _Group(_NoTypeHelp, typer.core.TyperGroup):
    pass


app = typer.Typer(
    cls=_Group,
    name="wsurgery",
    help="Weight Standardization surgery for timm models: convert, calibrate, fine-tune, fold, export, verify.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _print_version(value: bool) -> None:
    if value:
        import timm
        import torch

        import wsurgery

        print(f"wsurgery {wsurgery.__version__} (torch {torch.__version__}, timm {timm.__version__})")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = flag(False, "--debug", help=f"Show tracebacks on errors (same as {DEBUG_ENV}=1)."),
    version: bool = flag(False, "--version", callback=_print_version, is_eager=True,
                         help="Print the versions of wsurgery, torch and timm, and exit."),
) -> None:
    set_debug(debug)


def _expand_home(args: list[str], end: int) -> list[str]:
    """``~`` at the start of a value, also after ``--option=``, as the home folder.

    The shell expands ``-o ~/runs`` but not ``--output=~/runs`` or a quoted ``'~/runs'``; taken
    literally, those created a folder named ``~`` in the current one (one ``rm -rf ~`` from a disaster).
    """
    out = []
    for i, arg in enumerate(args):
        if i < end:
            if arg.startswith("~"):
                arg = os.path.expanduser(arg)
            elif arg.startswith("--") and "=~" in arg:
                option, _, value = arg.partition("=")
                arg = f"{option}={os.path.expanduser(value)}"
        out.append(arg)
    return out


OUTPUT_OPTIONS = ("-o", "--output", "--export", "--workdir")


def _stdout_output(args: list[str], end: int) -> str | None:
    """The output option given ``-`` (stdout, by convention), if any: every output here is a directory
    or file that is written atomically, and ``-o -`` made a folder named ``-``."""
    for i, arg in enumerate(args[:end]):
        if arg == "-o-":  # a short option with its value attached
            return "-o"
        option, eq, value = arg.partition("=")
        if option in OUTPUT_OPTIONS and ((eq and value == "-") or (not eq and i + 1 < end and args[i + 1] == "-")):
            return option
    return None


COMMANDS = {"convert": _convert.convert, "inspect": _inspect.inspect, "export": _export.export,
            "verify": _verify.verify, "train": _train.train, "predict": _predict.predict, "demo": _demo.demo,
            "compare": _compare.compare}
for _name, _fn in COMMANDS.items():
    app.command(_name, cls=_Command)(_fn)


_SIGNALLED: dict[str, bool] = {}


def _terminate(signum: int, frame: object) -> None:
    _SIGNALLED["term"] = True  # for _run: outside a command's own handling, typer turns it into exit 130
    raise Terminated


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point.

    ``--debug`` is an option of the app, so click accepts it only before the command name; every
    error line tells users to pass it, and appending it is what they do, so it is moved to the
    front wherever it stands (up to a ``--`` separator).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    end = args.index("--") if "--" in args else len(args)
    if "--debug" in args[:end]:
        args = ["--debug"] + [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
    args = _expand_home(args, end)
    option = _stdout_output(args, end)
    if option is not None:
        typed = next((a for a in args if a in COMMANDS), None)
        print(f"error: {option} - would write to stdout, but this output is a folder or file written whole; "
              f"name one (e.g. {option} ./out) (see wsurgery{' ' + typed if typed else ''} --help)", file=sys.stderr)
        sys.exit(2)
    if typer.rich_utils.MAX_WIDTH is None and not sys.stdout.isatty():
        # piped help (`--help | less`, docs) is 80 columns by default, which cut option names such as
        # --calib-temperature to `--calib-temper…`; a terminal keeps its own width
        typer.rich_utils.MAX_WIDTH = 120
    if not args:  # the app's no_args_is_help: the help, as `wsurgery --help` prints it
        args = ["--help"]
    # SIGTERM (kill, timeout, docker stop, Slurm) ends a command as Ctrl-C does, so the temporary
    # outputs are removed on the way out (Python's default would exit without running any cleanup)
    own_signals = threading.current_thread() is threading.main_thread()  # handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if own_signals else None
    try:
        _run(args)
    finally:
        if own_signals:  # main() called in-process (tests, a notebook) leaves SIGTERM as it found it
            signal.signal(signal.SIGTERM, previous)


def _run(args: list[str]) -> None:
    _SIGNALLED.clear()
    # click's own parse errors (unknown or missing option, a value of the wrong type) would print a
    # five-line usage box; every other error is one line (cli/_common.handle_errors), so these are too
    try:
        code = app(args=args, prog_name="wsurgery", standalone_mode=False)
    except UsageError as e:
        command = e.ctx.command_path if e.ctx is not None else "wsurgery"
        if command == "wsurgery":  # click reports an option's missing value in the app's context: name the command
            typed = next((a for a in args if a in COMMANDS), None)  # the first: options come after it
            command = f"wsurgery {typed}" if typed else command
        print(f"error: {e.format_message()} (see {command} --help)", file=sys.stderr)
        sys.exit(e.exit_code)
    except ClickException as e:  # e.g. a file option that cannot be opened
        print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except typer.Abort as e:  # Ctrl-C (130) or SIGTERM (143) outside a command's own handling (older typer)
        sys.exit(getattr(e.__cause__, "exit_code", 130))
    if code == 130 and _SIGNALLED.pop("term", False):  # typer >= 0.2x: a KeyboardInterrupt becomes Exit(130)
        code = Terminated.exit_code
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
