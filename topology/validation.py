"""Validation shared by every hetsched file schema: one InputError naming file and field.

Schemas derive from `Strict` (unknown keys are errors, which catches typos in hand
edits) and are loaded with `validate_as`, which turns pydantic's error list into one
`InputError`: the file, the field path (`hosts[2].nics[0].speed_gbps`) and the problem.
Cross-field validators raise `ValueError("field.path: problem")` and the path is kept.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from topology.errors import InputError

ModelT = TypeVar("ModelT", bound=BaseModel)


class Strict(BaseModel):
    """Base for every schema object: unknown keys are errors (catches typos in hand edits)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_INNER_FIELD = re.compile(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*): ")


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first problem of a pydantic error as (field path, message), plus a count of the rest."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"]).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    inner = _INNER_FIELD.match(message)
    if inner:
        field = f"{field}.{inner.group(1)}" if field else inner.group(1)
        message = message[inner.end():]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return field or "(top level)", message


def validate_as(model: type[ModelT], data: Any, path: str | Path) -> ModelT:
    """Validate `data` as `model`, or raise one InputError naming `path` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = describe_validation_error(exc)
        raise InputError(message, path, field) from None
