"""Validation shared by every hetsched file schema: one InputError naming file and field.

Schemas derive from `Strict` (unknown keys are errors, which catches typos in hand
edits) and are loaded with `validate_as`, which turns pydantic's error list into one
`InputError`: the file, the field path (`hosts[2].nics[0].speed_gbps`) and the problem.
Cross-field validators raise `ValueError("field.path: problem")` and the path is kept.

Every number of every schema is a `bounded_float` or `bounded_int`: finite (no inf or
nan), of the right kind (a YAML number, not a string or a boolean) and inside a stated
sane range, which the error names (`must be a number in [0.001, 100000] GB, got inf`).
The range travels with the type as a `Limit`, so `limit_rows` can list every bounded
field of a schema (docs/limits.md is that list) and a test can check none is missing.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

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


@dataclass(frozen=True)
class Limit:
    """The sane range of a number: `low` to `high` inclusive (`low` excluded if low_open)."""

    low: float
    high: float
    unit: str = ""
    low_open: bool = False
    high_open: bool = False

    def describe(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        return (f"{'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                f"{')' if self.high_open else ']'}{unit}")

    def contains(self, value: float) -> bool:
        finite = not isinstance(value, float) or math.isfinite(value)
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return finite and above and below

    def check(self, value: float) -> float:
        if not self.contains(value):
            raise ValueError(f"must be a number in {self.describe()}, got {_number(value)}")
        return value


def _number(value: float) -> str:
    if isinstance(value, int) and abs(value) >= 10**15:
        return f"{float(value):g}" if abs(value) < 10**300 else "a number too large to hold"
    return f"{value:g}" if isinstance(value, float) else str(value)


def bounded_float(low: float, high: float, unit: str = "", *, low_open: bool = False,
                  high_open: bool = False) -> Any:
    """A finite float (an int is fine too) in [low, high] (an end excluded if it is open)."""
    limit = Limit(low, high, unit, low_open, high_open)
    return Annotated[float, Field(strict=True), AfterValidator(limit.check), limit]


def bounded_int(low: int, high: int, unit: str = "") -> Any:
    """A whole number (not a float, string or boolean) in [low, high]."""
    limit = Limit(low, high, unit)
    return Annotated[int, Field(strict=True), AfterValidator(limit.check), limit]


def limit_of(bounded: Any) -> Limit:
    """The Limit of a type made by `bounded_float` or `bounded_int`."""
    return next(m for m in typing.get_args(bounded)[1:] if isinstance(m, Limit))


def number_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Limit | None]]:
    """Every int/float field of `model` and of the schemas it holds, with its Limit (None:
    unbounded), by dotted path: `hosts[].devices[].memory_gb` (`{}`: a mapping's values)."""
    rows: list[tuple[str, Limit | None]] = []
    for name, info in model.model_fields.items():
        limit = next((m for m in info.metadata if isinstance(m, Limit)), None)
        rows += _numbers_in(info.annotation, f"{prefix}{name}", limit)
    return rows


def _numbers_in(annotation: Any, path: str, limit: Limit | None) -> list[tuple[str, Limit | None]]:
    if annotation in (int, float):
        return [(path, limit)]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return number_fields(annotation, f"{path}.")
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        inner = next((m for m in args[1:] if isinstance(m, Limit)), limit)
        return _numbers_in(args[0], path, inner)
    if origin in (list, tuple):
        items = [arg for arg in dict.fromkeys(args) if arg is not ...]
        return [row for arg in items for row in _numbers_in(arg, f"{path}[]", None)]
    if origin is dict:
        return _numbers_in(args[1], f"{path}{{}}", None)
    if origin in (typing.Union, types.UnionType):
        return [row for arg in args for row in _numbers_in(arg, path, limit)]
    return []
