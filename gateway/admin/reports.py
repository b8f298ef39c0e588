"""Usage reports and the dashboard numbers, computed by the database.

Shared by `python proxy.py usage ...` and `GET /admin/usage/...`, `GET /admin/metrics`.
Each report is one GROUP BY over the hourly rollup (gateway/store/rollup.py) plus the raw
rows of the window's first partial hour, run off the event loop (`Store.report_query`);
only the groups (days, users, actions, models) come back to Python, never a window of
rows. USD amounts are the exact sums of the rows' (`Decimal`, gateway/money.py), never
rounded again; an average is rounded by the money rule. Measured with bench/reports_bench.py (README "Usage log, cost, metrics").
"""

from __future__ import annotations

import functools
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from gateway.money import USD_ZERO, usd
from gateway.store import backfill
from gateway.store.rollup import BUCKETS, GROUPS, MAIN, coarse_percentile, hist_percentile

REPORTS = ("daily", "top-users", "actions", "weekly", "experiments")  # experiments: gateway/feedback.py
# Each query sums only what its report shows: SQLite's cost is per row *and* column summed.
USER_MEASURES = ("tokens_total", "cost_usd", "energy")


def iso_week(ts: float) -> tuple[int, int]:
    year, week, _ = datetime.fromtimestamp(ts, timezone.utc).isocalendar()
    return year, week


def week_start(ts: float) -> float:
    day = datetime.fromtimestamp(ts, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day - timedelta(days=day.weekday())).timestamp()


def _date(day_number: int) -> str:
    return datetime.fromtimestamp(day_number * 86400, timezone.utc).strftime("%Y-%m-%d")


DAILY_MEASURES = ("errors", "tokens_total", "cost_usd", "cache_hits", "saved_usd")


def daily(days: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"date": _date(d["key"]), "requests": d["requests"], "errors": d["errors"], "tokens": d["tokens_total"],
             "cost_usd": d["cost_usd"], "cache_hits": d["cache_hits"], "saved_usd": d["saved_usd"]}
            for d in sorted(days, key=lambda d: d["key"])]


def top_users(users: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"user_id": u["key"], "workspace_id": u["workspace_id"], "requests": u["requests"],
             "tokens": u["tokens_total"], "cost_usd": u["cost_usd"], "energy": u["energy"]} for u in users]


def actions(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = [{"action": a["key"], "count": a["requests"], "total_cost_usd": a["cost_usd"],
            "avg_cost_usd": usd(a["cost_usd"] / a["requests"]),
            "avg_tokens": round(a["tokens_total"] / a["requests"], 1)} for a in groups]
    return sorted(out, key=lambda a: (-a["avg_cost_usd"], -a["count"], a["action"] or ""))


def weekly(days: list[dict[str, Any]], threshold: float | None = None) -> list[dict[str, Any]]:
    weeks: dict[tuple[int, int], dict[str, Any]] = {}
    for d in days:
        year, week = iso_week(d["key"] * 86400)
        w = weeks.setdefault((year, week), {"week": f"{year}-W{week:02d}", "requests": 0, "cost_usd": USD_ZERO})
        w["requests"] += d["requests"]
        w["cost_usd"] += d["cost_usd"]
    out = []
    for key in sorted(weeks):
        w = weeks[key]
        w["threshold_usd"] = threshold
        w["over_threshold"] = threshold is not None and w["cost_usd"] > threshold
        out.append(w)
    return out


def _rate(part: int, whole: int) -> float:
    return round(part / whole, 4) if whole else 0.0


PERCENTILES = (50, 90, 95, 99)
# The coarse buckets: summed only when the fine histogram does not cover the window.
COARSE = tuple(f"{prefix}_{i}" for prefix in ("lat", "ttfb") for i in range(BUCKETS))
ALL_BUT_COARSE = tuple(m for m in (*MAIN.sums, *MAIN.maxima) if m not in COARSE)


def _percentiles(t: dict[str, Any] | None, fine: dict[str, Any], prefix: str,
                 largest: str) -> dict[int, float | None]:
    """From the fine histogram (within 4%) where it covers the window, else interpolated
    in the coarse buckets (approximate). gateway/store/rollup.py"""
    if t is None:
        return {p: None for p in PERCENTILES}
    if fine["covered"]:
        return {p: hist_percentile(fine["counts"], p, t[largest]) for p in PERCENTILES}
    counts = [t[f"{prefix}_{i}"] for i in range(BUCKETS)]
    return {p: coarse_percentile(counts, p, t[largest]) for p in PERCENTILES}


async def dashboard(store: Any, since: float, workspace_id: str | None = None, limit: int = 10) -> dict[str, Any]:
    """The fields the old in-app dashboard showed (camelCase on purpose), and what the
    dashboard page adds: percentiles (gateway.store.rollup), energy, balances.
    `percentilesApproximate`: some were interpolated in the coarse buckets (the fine
    histogram does not cover the window yet); otherwise each is within 4% of the exact
    nearest-rank value."""
    now = time.time()
    fine = await store.latency_histogram(since, workspace_id, now=now)
    covered = fine["latency"]["covered"] and fine["ttfb"]["covered"]
    totals = await store.usage_totals(None, since, workspace_id, now=now, measures=ALL_BUT_COARSE if covered else None)
    t = totals[0] if totals else None
    providers = await store.usage_totals("provider", since, workspace_id, measures=())
    models = await store.usage_totals("model", since, workspace_id, measures=())
    users = await store.usage_totals("user", since, workspace_id, limit=limit, measures=USER_MEASURES)
    refunded = await store.energy_refunded(since, workspace_id)
    balances = await store.energy_balances(workspace_id, [u["key"] for u in users if u["key"]], limit)
    total = t["requests"] if t else 0
    lat = _percentiles(t, fine["latency"], "lat", "latency_max")
    ttfb = _percentiles(t, fine["ttfb"], "ttfb", "ttfb_max")
    g = (lambda name: t[name] if t else 0)
    by_user = {b["user_id"]: b for b in balances["users"]}
    return {
        "totalRequests": total,
        "totalTokens": g("tokens_total"),
        "totalCost": t["cost_usd"] if t else USD_ZERO,
        "averageLatency": round(g("latency_sum") / g("latency_count"), 2) if g("latency_count") else 0.0,
        "errorRate": _rate(g("errors"), total),
        "cacheHitRate": _rate(g("cache_hits"), total),
        "cacheHits": g("cache_hits"),
        "savedUsd": t["saved_usd"] if t else USD_ZERO,  # what the cache's hits would have cost
        # Upstream calls whose answers were discarded (a lost overlapped reservation): billed by
        # the provider, not in energy; their cost is part of totalCost.
        "unbilledCalls": g("unbilled_calls"),
        "unbilledCostUsd": t["unbilled_cost_usd"] if t else USD_ZERO,
        "providerDistribution": {p["key"] or "none": p["requests"] for p in providers},
        "modelDistribution": {m["key"] or "none": m["requests"] for m in models},
        "latencyP50": lat[50], "latencyP90": lat[90], "latencyP95": lat[95], "latencyP99": lat[99],
        "ttfbP50": ttfb[50], "ttfbP90": ttfb[90], "ttfbP95": ttfb[95], "ttfbP99": ttfb[99],
        "percentilesApproximate": not covered and t is not None,
        "averageTtfb": round(g("ttfb_sum") / g("ttfb_count"), 2) if g("ttfb_count") else 0.0,
        "tokens": {name: g(f"tokens_{name}") for name in ("prompt", "completion", "cached", "cache_write",
                                                           "reasoning", "audio_in", "audio_out")},
        "errors": g("errors"),
        "energySpent": g("energy"),
        "energyRefunded": refunded,
        "downgrades": g("downgrades"),
        "retries": g("retries"),
        "retriedRequests": g("retried"),
        "streamedRequests": g("streamed"),
        "unpricedRequests": g("unpriced"),
        "topUsers": [{**top_users([u])[0], "tier": by_user.get(u["key"], {}).get("tier"),
                      "balance": by_user.get(u["key"], {}).get("energy")} for u in users],
        "workspaceBalances": balances["workspaces"],
    }


async def build_report(store: Any, kind: str, *, days: int = 7, workspace_id: str | None = None,
                       threshold: float | None = None, limit: int = 10, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    since = now - days * 86400
    if kind == "weekly":
        since = week_start(since)
    totals = functools.partial(store.usage_totals, since=since, workspace_id=workspace_id, now=now)
    if kind == "daily":
        data: Any = daily(await totals("day", measures=DAILY_MEASURES))
    elif kind == "top-users":
        data = top_users(await totals("user", limit=limit, measures=USER_MEASURES))
    elif kind == "actions":
        data = actions(await totals("action", measures=("tokens_total", "cost_usd")))
    elif kind == "weekly":
        data = weekly(await totals("day", measures=("cost_usd",)), threshold)
    else:
        raise ValueError(f"unknown report {kind!r} (one of {', '.join(REPORTS)})")
    report: dict[str, Any] = {"report": kind, "days": days, "workspace_id": workspace_id, "rows": data}
    if kind == "weekly" and threshold is not None:
        report["threshold_exceeded"] = [w["week"] for w in data if w["over_threshold"]]
    # A rollup these numbers come from still being backfilled: say so (docs/upgrades.md).
    progress = backfill.summary(await store.backfill_states())
    read = {table for family, _ in GROUPS.values() for table in family.tables.values()}
    if progress and any(read & set(b["tables"]) for b in progress["backfills"]):
        report["backfill"] = progress
    return report
