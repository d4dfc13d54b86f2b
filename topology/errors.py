"""Errors raised for bad input: a wrong file, a missing host, an impossible request.

The CLI turns an `InputError` into one readable line on stderr and exit status 2.
Everything else that reaches the CLI is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input named by file and field: `topology.yaml: hosts[1].name: duplicate host 'a1'`."""

    def __init__(self, message: str, path: str | Path | None = None, field: str | None = None):
        self.message = message
        self.path = str(path) if path is not None else None
        self.field = field
        super().__init__(self.render())

    def render(self) -> str:
        parts = [p for p in (self.path, self.field) if p]
        return ": ".join([*parts, self.message])
