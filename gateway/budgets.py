"""Budgets: a workspace's, a user's or an API key's spending ceiling over a calendar period.

    ./gw budgets set --workspace acme --usd 50 --period week --timezone Europe/Berlin \
                     --alerts 50,80,100 --hard refuse
    ./gw budgets set --key key_... --energy 500 --period day --hard downgrade

A budget counts energy or USD (`unit`), per `period` ("day", "week" from Monday, "month",
each starting at midnight in the budget's IANA `timezone`, or "life"). This module is the
arithmetic the energy plugin (plugins/energy.py) and the admin operations share; the
money rules are the store's (gateway/store/base.py `reserve_energy(budgets=)`):

* **Held with the energy, in one transaction.** Each reservation carries a `BudgetHold` per
  budget that applies to the request (its workspace's, its user's, its key's): the store
  checks every enforced budget and the balance together and writes all or nothing, so 2N
  concurrent requests for N affordable stay exact across processes. A hold is finished with
  its reservation (settled: as held, or at the energy settled, or a USD hold at the
  request's cost; refunded: returned), in the same transaction.
* **What a request holds.** An energy budget: the request's energy (a cache hit: its
  `cache_hit_price`). A USD budget: the request's ceiling (`usage.estimate_usd_ceiling`:
  the prompt counted, the output at its `max_tokens` or the model's cap), settled at the
  request's `cost_usd` (a cache hit costs the provider nothing: 0). A model without a price
  holds 0 USD.
* **Hard limits.** `refuse`: 429 `budget_exceeded` (`x-should-retry: false`). `downgrade`:
  the request goes down its ladder (tier_policy's candidates, as when energy is short) to
  the first model whose hold fits, then 429. `none`: alerts only (the spend is counted).
* **Soft limits.** Each of `alerts` (percentages) emits one `budget.threshold_crossed` per
  period (gateway/alerts.py): the reservation that crosses it is the only one (the store
  serializes them) and the event id comes from (budget, period, percent), so a refund and a
  second crossing, or two processes, make one event.
* **The header.** `X-Budget-Remaining` is what is left of the tightest applying budget
  (smallest share left) after this request's hold, `X-Budget-Unit` its unit (`usd`,
  `energy`).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Iterable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from gateway.store.base import BUDGET_HARD, BUDGET_PERIODS, Budget, BudgetHold

NANO = Decimal(1_000_000_000)


def check_timezone(name: str) -> None:
    """ValueError unless `name` is an IANA time zone zoneinfo knows."""
    if not isinstance(name, str) or not name or len(name) > 64:
        raise ValueError("timezone must be an IANA time zone name such as 'Europe/Berlin' or 'UTC'")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone '{name}' (an IANA name such as 'Europe/Berlin')") from None


def period_bounds(period: str, timezone: str, now: float) -> tuple[float, float | None]:
    """(start, end) in epoch seconds of the period holding `now`: midnight, Monday's midnight
    or the 1st's midnight in `timezone` (wall-clock; a DST day is 23 or 25 hours), until
    the next one; (0, None) for life."""
    if period == "life":
        return 0.0, None
    if period not in BUDGET_PERIODS:
        raise ValueError(f"period must be one of {', '.join(BUDGET_PERIODS)}")
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now, zone)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, fold=0)
    if period == "day":
        start, end = day, day + timedelta(days=1)
    elif period == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    # Wall-clock arithmetic: re-attach the zone so a DST change between them is honoured.
    start = start.replace(tzinfo=zone)
    end = end.replace(tzinfo=zone)
    return start.timestamp(), end.timestamp()


def applying(budgets: Iterable[Budget], identity: Any) -> list[Budget]:
    """The budgets over a request: its workspace's, its user's and its key's."""
    mine = {("workspace", identity.workspace_id), ("user", identity.user_id), ("key", identity.key_id)}
    return [b for b in budgets if (b.scope, b.scope_id) in mine]


def holds(budgets: list[Budget], now: float, energy: int, usd_nano: int) -> tuple[BudgetHold, ...]:
    """One hold per budget: `energy` on an energy budget, `usd_nano` on a USD one."""
    out = []
    for budget in budgets:
        start, _ = period_bounds(budget.period, budget.timezone, now)
        out.append(BudgetHold(budget.id, start, budget.amount, energy if budget.unit == "energy" else usd_nano,
                              budget.hard != "none", budget.unit))
    return tuple(out)


def crossed(budget: Budget, before: int, after: int) -> list[int]:
    """The alert percentages a spend going from `before` to `after` passed (reached)."""
    return [p for p in budget.alerts if before * 100 < p * budget.amount <= after * 100]


def display(unit: str, value: int) -> str:
    """An amount as a person and a header read it: energy as is, USD in dollars."""
    if unit == "usd":
        text = format(Decimal(value) / NANO, "f")
        return text.rstrip("0").rstrip(".") if "." in text else text
    return str(value)


def tightest(budgets: list[Budget], spent: Iterable[int]) -> tuple[Budget, int] | None:
    """The budget with the smallest share left and what is left of it (never below 0)."""
    best = None
    for budget, used in zip(budgets, spent):
        left = max(0, budget.amount - used)
        share = left / budget.amount if budget.amount > 0 else 0.0
        if best is None or share < best[0]:
            best = (share, budget, left)
    return None if best is None else (best[1], best[2])


def parse_amount(unit: str, value: Any) -> int:
    """A budget's amount as stored: energy an integer, USD dollars (a number or its text,
    to the nano-dollar) as nano-dollars. ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError("amount must be a number")
    if unit == "energy":
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if not isinstance(value, int) or not 0 <= value <= 10**15:
            raise ValueError("an energy budget's amount must be an integer from 0 to 10^15")
        return value
    if unit != "usd":
        raise ValueError("unit must be 'usd' or 'energy'")
    try:
        dollars = Decimal(str(value).strip())
    except Exception:
        raise ValueError("a USD budget's amount must be a number of dollars, such as 50 or 12.5") from None
    if not dollars.is_finite() or not Decimal(0) <= dollars <= Decimal(10**9):
        raise ValueError("a USD budget's amount must be from 0 to 1000000000 dollars")
    nano = dollars * NANO
    if nano != nano.to_integral_value():
        raise ValueError("a USD budget's amount has at most 9 decimals")
    return int(nano)


def parse_alerts(value: Any) -> tuple[int, ...]:
    """Alert percentages: a list of integers 1..1000 or "50,80,100"; empty for none."""
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not all(p.isdigit() for p in parts):
            raise ValueError("alerts must be percentages such as 50,80,100")
        value = [int(p) for p in parts]
    if not isinstance(value, list) or len(value) > 20 \
            or not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 1000 for p in value):
        raise ValueError("alerts must be a list of at most 20 percentages from 1 to 1000")
    return tuple(sorted(set(value)))


def check_hard(value: Any) -> str:
    if value not in BUDGET_HARD:
        raise ValueError(f"hard must be one of {', '.join(BUDGET_HARD)}")
    return value
