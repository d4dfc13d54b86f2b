"""Click parameter types the commands share: file paths and finite number ranges.

`FILE` leaves folders, devices and missing files to hetsched's own checks (one line
naming the file) instead of click's. `finite_range` is click's FloatRange without its
gap: nan compares false with both bounds, so FloatRange lets it through.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import click

FILE = click.Path(path_type=Path)


class FiniteFloatRange(click.FloatRange):
    """A float in [min, max] that is finite (not nan, not inf)."""

    name = "finite float range"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


def finite_range(low: float, high: float) -> FiniteFloatRange:
    return FiniteFloatRange(low, high)
