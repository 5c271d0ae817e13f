"""User-facing errors: raised for bad input, printed without a traceback by the CLI."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: the CLI keeps its start-up imports light
    from collections.abc import Callable

    import pydantic


# Where a message points at the command's help without knowing the command (a config's validation runs for
# `apt-ray train`, `apt-ray sweep` and the study scripts alike); filled in where the error is printed.
HELP_POINTER = "`apt-ray <command> --help`"


class UserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix."""

    exit_code = 2


def validation_message(error: pydantic.ValidationError, allowed: list[str] | None = None,
                       hints: dict[str, str] | None = None) -> str:
    """One paragraph naming each bad field, what was given and what is allowed (did-you-mean for typos).

    ``hints``: for an unknown key (its dotted location), what to write instead, in place of the did-you-mean.
    """
    import difflib

    parts = []
    for e in error.errors():
        field = ".".join(str(x) for x in e["loc"]) or "config"
        if e["type"] == "extra_forbidden":
            hint = ""
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed or [], n=1)
            if hints and field in hints:
                hint = f" ({hints[field]})"
            elif close:
                hint = f" (did you mean '{close[0]}'?)"
            parts.append(f"unknown key '{field}'{hint}")
        else:
            parts.append(f"{field}={e.get('input')!r}: {e['msg'][0].lower() + e['msg'][1:]}")
    return "invalid configuration: " + "; ".join(parts) + f". Fix these values (see {HELP_POINTER}) and run again."


def for_command(message: str, command: str) -> str:
    """``message`` with its pointer to the help naming ``command`` (``apt-ray sweep``, a study script's name)."""
    return message.replace(HELP_POINTER, f"`{command} --help`")


def run_command(prog: str | None, fn: Callable[[], int]) -> int:
    """Run a command's body: a ``UserError`` becomes one line on stderr (``prog: error: ...``, or ``error: ...``
    without a prog) and exit code 2; Ctrl-C exit code 130."""
    import sys

    try:
        return fn()
    except UserError as e:
        print(f"{prog}: error: {for_command(str(e), prog)}" if prog else f"error: {e}", file=sys.stderr)
        return UserError.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
