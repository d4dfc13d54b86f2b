"""How the CLI reports bad input: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import click

from topology.errors import InputError

P = ParamSpec("P")
R = TypeVar("R")

EXIT_BAD_INPUT = 2
EXIT_INCOMPLETE = 1


def fail(message: str) -> None:
    """Print `error: message` to stderr as one line and exit with status 2."""
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(EXIT_BAD_INPUT)


def one_line(text: str) -> str:
    """`text` with newlines and other control characters escaped (`\\n`, `\\x1b`), so a
    hostile name in a file can neither split the error line nor drive the terminal."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def reports_input_errors(command: Callable[P, R]) -> Callable[P, R]:
    """Decorate a click command so an InputError becomes one line and exit status 2."""

    @functools.wraps(command)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except InputError as exc:
            fail(exc.render())
            raise AssertionError("unreachable") from None

    return wrapper
