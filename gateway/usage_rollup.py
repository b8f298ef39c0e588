"""The hourly usage rollup: what the reports and /admin/metrics read instead of raw rows.

``usage_rollup`` holds one row per UTC hour x workspace x user x model x provider x action
with every number a report needs: requests, errors, cache hits, downgrades, retries,
tokens by class, USD cost, energy, latency and time-to-first-byte sums, maxima and
histograms. The store keeps it up to date in the same transaction as the usage rows
(SQLite: a trigger; PostgreSQL: the insert statement itself), so it is never behind the
log, a retried (duplicate) row is counted once, and it outlives the raw rows that
``store.usage_retention`` drops.

A report over ``[since, now]`` reads the rollup from the first whole hour after ``since``
on, plus the raw rows of the partial hour before it (at most an hour of rows, grouped by
the same SELECT): exact windows, never a whole window of rows. Measured with
bench/reports_bench.py (README "Usage log, cost, metrics").

Percentiles (``latencyP50`` ...) come from the histogram: the nearest-rank percentile
(the request at rank ceil(p/100 x n) of the window's requests ordered by latency) is
reported as the upper bound of the bucket that request falls in, capped by the largest
latency seen. So a reported p95 is never below the exact p95 and at most one bucket
above it (bounds in ``LATENCY_BOUNDS_MS``, ~1.5-2x apart).

Names with no value (a 401 has no user, a replay no provider) are stored as '' in the
key columns (NULLs would never conflict in the upsert) and read back as None.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

# Upper bounds (ms, inclusive) of the histogram buckets; a last bucket holds the rest.
LATENCY_BOUNDS_MS: tuple[int, ...] = (
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000,
    7500, 10000, 15000, 20000, 30000, 60000,
)
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
HOUR = 3600

KEYS = ("workspace_id", "user_id", "model", "provider", "action")
# Measures summed across rollup rows (MAXIMA are combined with max()).
SUMS: tuple[str, ...] = (
    "requests", "errors", "cache_hits", "streamed", "downgrades", "retries", "retried", "estimated",
    "tokens_prompt", "tokens_completion", "tokens_total", "tokens_cached", "tokens_cache_write",
    "tokens_reasoning", "tokens_audio_in", "tokens_audio_out", "cost_usd", "unpriced", "energy",
    "latency_count", "latency_sum", "ttfb_count", "ttfb_sum",
    *(f"lat_{i}" for i in range(BUCKETS)), *(f"ttfb_{i}" for i in range(BUCKETS)),
)
MAXIMA = ("latency_max", "ttfb_max")
COLUMNS = ("hour", *KEYS, *SUMS, *MAXIMA)


def table_ddl(dialect: str) -> str:
    big = "INTEGER" if dialect == "sqlite" else "bigint"
    real = "REAL" if dialect == "sqlite" else "double precision"
    measures = ",\n".join(f"    {m} {real if m == 'cost_usd' else big} NOT NULL DEFAULT 0" for m in (*SUMS, *MAXIMA))
    keys = ",\n".join(f"    {k} text NOT NULL" for k in KEYS)
    return (f"CREATE TABLE usage_rollup (\n    hour {big} NOT NULL,  -- epoch seconds of the UTC hour\n{keys},\n"
            f"{measures},\n    PRIMARY KEY (hour, {', '.join(KEYS)})\n)")


def _buckets(column: str, prefix: str) -> list[str]:
    out = []
    for i in range(BUCKETS):
        lo = LATENCY_BOUNDS_MS[i - 1] if i else None
        hi = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else None
        cond = " AND ".join(c for c in (f"{column} > {lo}" if lo is not None else "",
                                         f"{column} <= {hi}" if hi is not None else f"{column} IS NOT NULL") if c)
        out.append(f"SUM(CASE WHEN {cond} THEN 1 ELSE 0 END) AS {prefix}_{i}")
    return out


def hour_expr(dialect: str) -> str:
    """The UTC hour (epoch seconds) of a raw row's created_at."""
    if dialect == "sqlite":  # ISO-8601 text: 2024-05-01T12:34:56.000000Z
        return "CAST(strftime('%s', substr(created_at, 1, 13) || ':00:00') AS INTEGER)"
    return "CAST(floor(extract(epoch FROM created_at) / 3600) * 3600 AS bigint)"


def rollup_select(dialect: str, source: str, where: str = "") -> str:
    """Raw usage rows of `source` grouped into rollup rows (COLUMNS order)."""
    flag = (lambda c: f"SUM(CASE WHEN {c} THEN 1 ELSE 0 END)")
    parts = [
        f"{hour_expr(dialect)} AS hour",
        *(f"COALESCE({k}, '') AS {k}" for k in KEYS),
        "COUNT(*) AS requests",
        f"{flag('error_type IS NOT NULL')} AS errors",
        f"{flag('cache_hit')} AS cache_hits",
        f"{flag('streamed')} AS streamed",
        f"{flag('downgraded_from IS NOT NULL')} AS downgrades",
        "SUM(retries) AS retries",
        f"{flag('retries > 0')} AS retried",
        f"{flag('usage_estimated')} AS estimated",
        *(f"SUM({c}) AS {c}" for c in ("tokens_prompt", "tokens_completion", "tokens_total", "tokens_cached",
                                        "tokens_cache_write", "tokens_reasoning", "tokens_audio_in",
                                        "tokens_audio_out")),
        "COALESCE(SUM(cost_usd), 0) AS cost_usd",
        f"{flag('cost_usd IS NULL')} AS unpriced",
        "SUM(energy_cost) AS energy",
        "COUNT(latency_ms) AS latency_count", "COALESCE(SUM(latency_ms), 0) AS latency_sum",
        "COUNT(ttfb_ms) AS ttfb_count", "COALESCE(SUM(ttfb_ms), 0) AS ttfb_sum",
        *_buckets("latency_ms", "lat"), *_buckets("ttfb_ms", "ttfb"),
        "COALESCE(MAX(latency_ms), 0) AS latency_max", "COALESCE(MAX(ttfb_ms), 0) AS ttfb_max",
    ]
    sql = f"SELECT {', '.join(parts)} FROM {source}"
    if where:
        sql += f" WHERE {where}"
    # Ordered: concurrent PostgreSQL inserters upsert shared rollup rows in one order (no deadlock).
    return sql + f" GROUP BY 1, {', '.join(str(i + 2) for i in range(len(KEYS)))} ORDER BY 1, 2, 3, 4, 5, 6"


def upsert(dialect: str, select_sql: str) -> str:
    """INSERT the rows of `select_sql` into the rollup, adding to the rows already there."""
    greatest = "MAX" if dialect == "sqlite" else "GREATEST"
    sets = [f"{m} = usage_rollup.{m} + excluded.{m}" for m in SUMS]
    sets += [f"{m} = {greatest}(usage_rollup.{m}, excluded.{m})" for m in MAXIMA]
    # "WHERE true": SQLite's parser needs it between an INSERT's SELECT and ON CONFLICT.
    return (f"INSERT INTO usage_rollup ({', '.join(COLUMNS)}) SELECT * FROM ({select_sql}) AS r WHERE true"
            f" ON CONFLICT (hour, {', '.join(KEYS)}) DO UPDATE SET {', '.join(sets)}")


# What a report groups by -> the expression over rollup-shaped rows.
GROUPS = {None: None, "day": "hour / 86400", "user": "user_id", "action": "action", "model": "model",
          "provider": "provider", "workspace": "workspace_id"}


def totals_query(dialect: str, by: str | None, *, edge: bool, workspace: bool, limit: bool) -> str:
    """Totals over [since, now] grouped by `by`: the rollup from hour `h0` on, plus (`edge`)
    the raw rows in [since, h0). Parameters (`?`; the PostgreSQL store numbers them), in
    order: h0, [workspace], [since, h0 as a time, [workspace]], [limit]."""

    def p() -> str:
        return "?"

    where = f"hour >= {p()}"
    if workspace:
        where += f" AND workspace_id = {p()}"
    source = f"SELECT {', '.join(COLUMNS)} FROM usage_rollup WHERE {where}"
    if edge:
        raw_where = f"created_at >= {p()} AND created_at < {p()}"
        if workspace:
            raw_where += f" AND workspace_id = {p()}"
        source += f" UNION ALL SELECT * FROM ({rollup_select(dialect, 'ai_usage_logs', raw_where)}) AS edge"
    key = GROUPS[by]
    cols = [f"{key} AS key"] if key else []
    if by == "user":
        cols.append("MAX(workspace_id) AS workspace_id")
    cols += [f"CAST(SUM({m}) AS {'DOUBLE PRECISION' if m == 'cost_usd' else 'BIGINT'}) AS {m}" for m in SUMS]
    cols += [f"CAST(MAX({m}) AS BIGINT) AS {m}" for m in MAXIMA]
    sql = f"SELECT {', '.join(cols)} FROM ({source}) AS u"
    if key:
        sql += f" GROUP BY {key}"
    if limit:  # the costliest first; ties by requests, then name, so both stores agree
        sql += f" ORDER BY cost_usd DESC, requests DESC, {key} LIMIT {p()}"
    return sql


def window_params(since: float) -> tuple[int, bool]:
    """The first whole hour of the window, and whether a partial hour of raw rows precedes it."""
    h0 = int(math.ceil(since / HOUR) * HOUR)
    return h0, h0 > since


def none_if_empty(value: Any) -> Any:
    return None if value == "" else value


def percentile(counts: Sequence[int], p: float, largest: float) -> float | None:
    """The bucket bound holding the nearest-rank p-th percentile, capped by `largest`
    (module docstring); None without a single value."""
    n = sum(counts)
    if not n:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for i, c in enumerate(counts):
        seen += c
        if seen >= rank:
            bound = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else largest
            return float(min(bound, largest))
    return float(largest)  # unreachable: seen == n >= rank at the end
