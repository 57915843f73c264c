"""How the report writes numbers and tables in markdown."""

from __future__ import annotations

import math


# -- markdown -----------------------------------------------------------------------------------------
def pct(share) -> str:
    return DASH if share is None or math.isnan(share) else f"{100 * share:.1f}"


def num(value, fmt: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return DASH
    return format(value, fmt)


def sci(value: float) -> str:
    return f"{value:.2g}" if math.isfinite(value) else str(value)


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return lines


DASH = "—"
