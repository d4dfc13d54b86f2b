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
    """Print `error: message` to stderr and exit with status 2."""
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_BAD_INPUT)


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
