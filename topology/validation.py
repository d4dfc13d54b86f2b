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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

from annotated_types import MaxLen
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from topology.errors import InputError

ModelT = TypeVar("ModelT", bound=BaseModel)
Field_ = tuple[str, Any, tuple[Any, ...]]


class Strict(BaseModel):
    """Base for every schema object: unknown keys are errors (catches typos in hand edits)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


_INNER_FIELD = re.compile(r"^([A-Za-z_]+(?:\[\d+\])?(?:\.[A-Za-z_]+(?:\[\d+\])?)*): ")


def describe_validation_error(exc: ValidationError) -> tuple[str, str]:
    """The first problem of a pydantic error as (field path, message), plus a count of the rest.

    A field that may take one of several types (a union: `auto`, or a bounded number) gets
    one error per type from pydantic, each with the type's tag in its path; they count as
    one problem, the path drops the tags, and a range error (what the user most likely
    meant) is the one shown."""
    errors = exc.errors(include_url=False)
    first_loc = _field_loc(errors[0]["loc"])
    same = [e for e in errors if _related(_field_loc(e["loc"]), first_loc)]
    first = next((e for e in same if e["type"] == "value_error"), same[0])
    loc = _field_loc(first["loc"])
    field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
    message = first["msg"].removeprefix("Value error, ")
    inner = _INNER_FIELD.match(message)
    if inner:
        field = f"{field}.{inner.group(1)}" if field else inner.group(1)
        message = message[inner.end():]
    rest = len(errors) - len(same)
    if rest:
        message += f" (and {rest} more problem{'s' if rest > 1 else ''})"
    return field or "(top level)", message


_UNION_TAG = re.compile(r"[\[\]()'\"]|^(int|float|str|bool|dict|list)$")


def _field_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """`loc` without pydantic's union-member tags (`function-after[check(), float]`)."""
    return tuple(p for p in loc if not (isinstance(p, str) and _UNION_TAG.search(p)))


def _related(loc: tuple[Any, ...], first: tuple[Any, ...]) -> bool:
    """One path is the other or inside it: the errors of one union field."""
    n = min(len(loc), len(first))
    return loc == first or (n > 0 and loc[:n] == first[:n])


def validate_as(model: type[ModelT], data: Any, path: str | Path) -> ModelT:
    """Validate `data` as `model`, or raise one InputError naming `path` and the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        field, message = describe_validation_error(exc)
        raise InputError(message, path, field) from None


# A file's format version: a YAML integer (each schema checks it is the one it reads).
Version = Annotated[int, Field(strict=True)]


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


def schema_fields(model: type[BaseModel], prefix: str = "") -> Iterator[Field_]:
    """Every field of `model` and of the schemas it holds, lists and mappings included:
    (dotted path such as `hosts[].devices[].memory_gb`, `{}` for a mapping's values;
    the field's type; its constraints)."""
    for name, info in model.model_fields.items():
        yield from _walk(info.annotation, f"{prefix}{name}", tuple(info.metadata))


def _walk(annotation: Any, path: str, metadata: tuple[Any, ...]) -> Iterator[Field_]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield from schema_fields(annotation, f"{path}.")
        return
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        yield from _walk(args[0], path, metadata + args[1:])
        return
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            yield from _walk(arg, path, metadata)
        return
    yield path, annotation, metadata
    if origin in (list, tuple):
        for arg in dict.fromkeys(a for a in args if a is not ...):
            yield from _walk(arg, f"{path}[]", ())
    elif origin is dict:
        yield from _walk(args[1], f"{path}{{}}", ())


def number_fields(model: type[BaseModel]) -> list[tuple[str, Limit | None]]:
    """Every int/float field of `model` (nested schemas too) and its Limit (None: none)."""
    return [(path, next((m for m in meta if isinstance(m, Limit)), None))
            for path, kind, meta in schema_fields(model) if kind in (int, float)]


def size_fields(model: type[BaseModel]) -> list[tuple[str, int]]:
    """Every list or mapping of `model` (nested schemas too) with a largest size."""
    return [(path, m.max_length) for path, kind, meta in schema_fields(model)
            if typing.get_origin(kind) in (list, dict) for m in meta if isinstance(m, MaxLen)]


def limits_markdown(schemas: dict[str, type[BaseModel]]) -> str:
    """The tables of docs/limits.md: every bounded number, then every bounded size."""
    lines = ["| file | field | range |", "|---|---|---|"]
    for file, model in schemas.items():
        lines += [f"| {file} | `{path}` | {limit.describe()} |"
                  for path, limit in number_fields(model) if limit is not None]
    lines += ["", "| file | list | at most |", "|---|---|---|"]
    for file, model in schemas.items():
        lines += [f"| {file} | `{path}` | {size:,} |" for path, size in size_fields(model)]
    return "\n".join(lines) + "\n"
