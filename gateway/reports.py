"""Usage reports and the dashboard numbers, computed from `ai_usage_logs`.

Shared by `python proxy.py usage ...` and `GET /admin/usage/...`, `GET /admin/metrics`.
Rows are fetched for the window asked for and aggregated here: simple and identical on
SQLite and PostgreSQL. (At tens of millions of rows a window, move the GROUP BYs into
the store.)
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

REPORTS = ("daily", "top-users", "actions", "weekly")


def iso_week(ts: float) -> tuple[int, int]:
    year, week, _ = datetime.fromtimestamp(ts, timezone.utc).isocalendar()
    return year, week


def week_start(ts: float) -> float:
    day = datetime.fromtimestamp(ts, timezone.utc).replace(hour=0, minute=0, second=0, microsecond=0)
    return (day - timedelta(days=day.weekday())).timestamp()


def _cost(row: dict[str, Any]) -> float:
    return float(row.get("cost_usd") or 0.0)


def daily(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    days: dict[str, dict[str, Any]] = {}
    for row in rows:
        date = datetime.fromtimestamp(row["created_at"], timezone.utc).strftime("%Y-%m-%d")
        d = days.setdefault(date, {"date": date, "requests": 0, "errors": 0, "tokens": 0, "cost_usd": 0.0})
        d["requests"] += 1
        d["errors"] += 1 if row.get("error_type") else 0
        d["tokens"] += int(row.get("tokens_total") or 0)
        d["cost_usd"] += _cost(row)
    return [{**d, "cost_usd": round(d["cost_usd"], 6)} for d in sorted(days.values(), key=lambda d: d["date"])]


def top_users(rows: Iterable[dict[str, Any]], limit: int = 10) -> list[dict[str, Any]]:
    users: dict[Any, dict[str, Any]] = {}
    for row in rows:
        u = users.setdefault(row.get("user_id"), {"user_id": row.get("user_id"), "workspace_id": row.get("workspace_id"),
                                                  "requests": 0, "tokens": 0, "cost_usd": 0.0, "energy": 0})
        u["requests"] += 1
        u["tokens"] += int(row.get("tokens_total") or 0)
        u["cost_usd"] += _cost(row)
        u["energy"] += int(row.get("energy_cost") or 0)
    ranked = sorted(users.values(), key=lambda u: (-u["cost_usd"], -u["requests"]))[:limit]
    return [{**u, "cost_usd": round(u["cost_usd"], 6)} for u in ranked]


def actions(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    acc: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        acc[row.get("action")].append(row)
    out = []
    for action, items in acc.items():
        total = sum(_cost(r) for r in items)
        out.append({"action": action, "count": len(items), "total_cost_usd": round(total, 6),
                    "avg_cost_usd": round(total / len(items), 8),
                    "avg_tokens": round(sum(int(r.get("tokens_total") or 0) for r in items) / len(items), 1)})
    return sorted(out, key=lambda a: (-a["avg_cost_usd"], -a["count"]))


def weekly(rows: Iterable[dict[str, Any]], threshold: float | None = None) -> list[dict[str, Any]]:
    weeks: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        year, week = iso_week(row["created_at"])
        w = weeks.setdefault((year, week), {"week": f"{year}-W{week:02d}", "requests": 0, "cost_usd": 0.0})
        w["requests"] += 1
        w["cost_usd"] += _cost(row)
    out = []
    for key in sorted(weeks):
        w = weeks[key]
        w["cost_usd"] = round(w["cost_usd"], 6)
        w["threshold_usd"] = threshold
        w["over_threshold"] = threshold is not None and w["cost_usd"] > threshold
        out.append(w)
    return out


def dashboard(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields the old in-app dashboard showed (camelCase on purpose)."""
    total = len(rows)
    latencies = [r["latency_ms"] for r in rows if r.get("latency_ms") is not None]
    return {
        "totalRequests": total,
        "totalTokens": sum(int(r.get("tokens_total") or 0) for r in rows),
        "totalCost": round(sum(_cost(r) for r in rows), 6),
        "averageLatency": round(sum(latencies) / len(latencies), 2) if latencies else 0.0,
        "errorRate": round(sum(1 for r in rows if r.get("error_type")) / total, 4) if total else 0.0,
        "cacheHitRate": round(sum(1 for r in rows if r.get("cache_hit")) / total, 4) if total else 0.0,
        "providerDistribution": dict(Counter(r.get("provider") or "none" for r in rows)),
        "modelDistribution": dict(Counter(r.get("model") or "none" for r in rows)),
    }


async def build_report(store: Any, kind: str, *, days: int = 7, workspace_id: str | None = None,
                       threshold: float | None = None, limit: int = 10, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    since = now - days * 86400
    if kind == "weekly":
        since = week_start(since)
    rows = await store.usage_rows(since=since, workspace_id=workspace_id)
    if kind == "daily":
        data: Any = daily(rows)
    elif kind == "top-users":
        data = top_users(rows, limit)
    elif kind == "actions":
        data = actions(rows)
    elif kind == "weekly":
        data = weekly(rows, threshold)
    else:
        raise ValueError(f"unknown report {kind!r} (one of {', '.join(REPORTS)})")
    report: dict[str, Any] = {"report": kind, "days": days, "workspace_id": workspace_id, "rows": data}
    if kind == "weekly" and threshold is not None:
        report["threshold_exceeded"] = [w["week"] for w in data if w["over_threshold"]]
    return report
