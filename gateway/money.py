"""Money: USD amounts are `Decimal`, rounded once, by one rule.

The rule: a cost (`cost_usd`, `saved_usd`) is rounded half-even to `USD_QUANTUM`
(1e-9 USD, a nano-dollar) once, where it is computed (`gateway/usage.py`,
`UnitPrices.cost`); unit prices are exact decimals (a float from litellm's map or the
config is read at 15 significant digits, `price`, so 0.15 / 1e6 is 1.5E-7, not
1.4999999999999999E-7); token counts are integers. Everything after that is exact
addition: the stores keep the nano-dollars exactly (PostgreSQL `numeric(20, 9)`,
SQLite an INTEGER count of nano-dollars) and a report's sum is the sum of its rows, to
the last nano-dollar. A per-token price of $0.01 per million tokens is 10 nano-dollars,
so 1e-9 loses nothing of any price in the map on a single token, and a request's cost is
off by at most half a nano-dollar. The one division, a report's average, is rounded by
the same rule.

JSON answers carry these amounts as JSON numbers written from the decimal digits
(`json_default`, for orjson), never through a binary float: `0.3`, not
`0.30000000000000004` and not `"0.3"`.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

import orjson

USD_QUANTUM = Decimal("1e-9")  # the one rounding step of every USD amount
NANO_PER_USD = 10**9
USD_ZERO = Decimal(0).quantize(USD_QUANTUM)
SQL_TYPE = "numeric(20, 9)"  # PostgreSQL: 11 integer digits (< $100 billion), the quantum's 9 decimals


def usd(value: Decimal | int | float | str) -> Decimal:
    """`value` rounded half-even to USD_QUANTUM: THE rounding rule (module docstring). A
    float is read through its shortest repr (0.1 is 0.1), never its binary expansion."""
    if not isinstance(value, Decimal):
        value = Decimal(repr(value) if isinstance(value, float) else value)
    if not value.is_finite():
        raise ValueError(f"not a USD amount: {value}")
    return value.quantize(USD_QUANTUM, rounding=ROUND_HALF_EVEN)


def price(value: float | Decimal) -> Decimal:
    """A unit price (USD per token) as an exact decimal: a float at 15 significant digits,
    which undoes the binary artefacts of a division such as 0.15 / 1e6."""
    return value if isinstance(value, Decimal) else Decimal(f"{value:.15g}")


def to_nano(value: Decimal) -> int:
    """USD -> an integer count of nano-dollars (SQLite's stored form), by the same rule."""
    return int(usd(value).scaleb(9))


def from_nano(value: int | None) -> Decimal | None:
    """An integer count of nano-dollars (or a SUM of them) -> USD."""
    return None if value is None else Decimal(int(value)).scaleb(-9)


def usd_text(value: Decimal) -> str:
    """The shortest plain decimal text of an amount: 0.3, 12, 0.000000015 (no exponent)."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def json_default(obj: Any) -> Any:
    """orjson `default=`: a Decimal as a JSON number from its digits; anything else as
    str() (what the admin API and the logs did for unknown types before)."""
    if isinstance(obj, Decimal):
        return orjson.Fragment(usd_text(obj))
    return str(obj)
