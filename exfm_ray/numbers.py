"""Numbers in reports: which values count (finite ones) and how a missing one reads."""

from __future__ import annotations

import math


def finite(v) -> bool:
    """A real number that is neither NaN nor infinite (None, strings and bools never are)."""
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v, spec: str = ".4f") -> str:
    """`v` formatted, or "n/a" where there is no finite value."""
    return format(v, spec) if finite(v) else "n/a"
