"""The usage rollups: what the reports and /admin/metrics read instead of raw rows.

``usage_rollup`` holds one row per UTC hour x workspace x user x model x provider x action,
``usage_rollup_daily`` the same per UTC day, with every number a report needs: requests,
errors, cache hits, downgrades, retries, tokens by class, USD cost, USD saved by the response
cache (``saved_usd``, what its hits would have cost), upstream calls whose answers were
discarded unbilled in energy (``unbilled_calls``, ``unbilled_cost_usd``), energy, latency and
time-to-first-byte sums, maxima and histograms. The store keeps both up to date in the
same transaction as the usage rows (SQLite: a trigger; PostgreSQL: the insert statement
itself), so they are never behind the log, a retried (duplicate) row is counted once, and
they outlive the raw rows that ``store.usage_retention`` drops.

A report over ``[since, now]`` reads the whole days from the daily rollup, the whole hours
around them from the hourly one, and the raw rows of the partial hour after ``since`` (at
most an hour of rows, grouped by the same SELECT): exact windows, never a whole window of
rows. The daily table is there because of the bench: with 500 users nearly every raw row
opens its own hourly row at low rates, and a 30-day /admin/metrics over the hourly rollup
alone (every measure summed) took 0.8 s on SQLite with only 20,000 rows; each query now
also sums only the measures its report shows. Measured with
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
from dataclasses import dataclass, replace
from typing import Any, Sequence

from gateway import money

# Upper bounds (ms, inclusive) of the histogram buckets; a last bucket holds the rest.
LATENCY_BOUNDS_MS: tuple[int, ...] = (
    10, 25, 50, 75, 100, 150, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000,
    7500, 10000, 15000, 20000, 30000, 60000,
)
BUCKETS = len(LATENCY_BOUNDS_MS) + 1
HOUR = 3600
DAY = 86400

# Measures summed across rollup rows (MAXIMA are combined with max()).
SUMS: tuple[str, ...] = (
    "requests", "errors", "cache_hits", "streamed", "downgrades", "retries", "retried", "estimated",
    "tokens_prompt", "tokens_completion", "tokens_total", "tokens_cached", "tokens_cache_write",
    "tokens_reasoning", "tokens_audio_in", "tokens_audio_out", "cost_usd", "unpriced", "energy",
    "latency_count", "latency_sum", "ttfb_count", "ttfb_sum",
    *(f"lat_{i}" for i in range(BUCKETS)), *(f"ttfb_{i}" for i in range(BUCKETS)),
    "saved_usd", "unbilled_calls", "unbilled_cost_usd",
)
MAXIMA = ("latency_max", "ttfb_max")
# The USD measures (the rest are counts): exact, as in the rows (gateway/money.py). PostgreSQL
# numeric; SQLite INTEGER nano-dollars, so SUM and the upserts' additions are integer sums,
# exact and as fast as the counts'. Store.usd turns a sum into a Decimal.
USD = ("cost_usd", "saved_usd", "unbilled_cost_usd")
# Measures added after migration 3 created the rollups, with the migration that added each
# (a column of its own in ai_usage_logs too): migration 3 builds and fills the tables as
# they were then (`as_of(3)`), since an older store's rows have no such column yet.
ADDED_IN: dict[str, int] = {"saved_usd": 7, "unbilled_calls": 11, "unbilled_cost_usd": 11}
# The migration that made the USD measures exact; the migrations before it made them binary
# floats (REAL / double precision), and are replayed as they were on a new database.
EXACT_USD_IN = 10


@dataclass(frozen=True)
class Family:
    """Rollups of one set of keys and measures, at an hourly and a daily grain."""

    keys: tuple[str, ...]
    sums: tuple[str, ...]
    maxima: tuple[str, ...]
    tables: dict[str, str]  # grain -> table
    exact_usd: bool = True  # USD measures exact (USD above), not floats (before EXACT_USD_IN)

    @property
    def columns(self) -> tuple[str, ...]:
        return ("period", *self.keys, *self.sums, *self.maxima)


# Everything but the user: few keys per hour (workspaces x models x providers x actions), so
# the totals, percentiles and distributions of a window read a few thousand rows at most.
MAIN = Family(("workspace_id", "model", "provider", "action"), SUMS, MAXIMA,
              {"hour": "usage_rollup", "day": "usage_rollup_daily"})
# Per user (top users): only what that report shows.
USERS = Family(("workspace_id", "user_id"), ("requests", "errors", "tokens_total", "cost_usd", "energy"), (),
               {"hour": "usage_rollup_users", "day": "usage_rollup_users_daily"})
FAMILIES = (MAIN, USERS)


def as_of(version: int) -> tuple[Family, ...]:
    """The families as migration `version` left them (without the measures added later)."""
    return tuple(replace(f, sums=tuple(m for m in f.sums if ADDED_IN.get(m, 0) <= version),
                         exact_usd=version >= EXACT_USD_IN) for f in FAMILIES)


def _column_type(dialect: str, measure: str, exact_usd: bool = True) -> str:
    if measure in USD and not exact_usd:
        return "REAL" if dialect == "sqlite" else "double precision"
    if measure in USD:
        return "INTEGER" if dialect == "sqlite" else money.SQL_TYPE
    return "INTEGER" if dialect == "sqlite" else "bigint"


def table_ddl(dialect: str, family: Family, grain: str) -> str:
    big = _column_type(dialect, "requests")
    measures = ",\n".join(f"    {m} {_column_type(dialect, m, family.exact_usd)} NOT NULL DEFAULT 0"
                           for m in (*family.sums, *family.maxima))
    keys = ",\n".join(f"    {k} text NOT NULL" for k in family.keys)
    return (f"CREATE TABLE {family.tables[grain]} (\n    period {big} NOT NULL,  -- epoch seconds of the UTC {grain}\n"
            f"{keys},\n{measures},\n    PRIMARY KEY (period, {', '.join(family.keys)})\n)")


def all_tables_ddl(dialect: str, families: tuple[Family, ...] = FAMILIES) -> list[str]:
    return [table_ddl(dialect, f, grain) for f in families for grain in f.tables]


def add_measure_ddl(dialect: str, measure: str) -> list[str]:
    """The statements adding a later measure (ADDED_IN) to the rollup tables that have it;
    the rows already there read 0, as their raw rows (NULL in the new column) sum to."""
    column = _column_type(dialect, measure, ADDED_IN.get(measure, 0) >= EXACT_USD_IN)
    return [f"ALTER TABLE {f.tables[grain]} ADD COLUMN {measure} {column} NOT NULL DEFAULT 0"
            for f in FAMILIES if measure in f.sums for grain in f.tables]


def usd_columns() -> list[tuple[str, str]]:
    """(table, measure) of every USD measure of the rollups (what EXACT_USD_IN converted)."""
    return [(f.tables[grain], m) for f in FAMILIES for grain in f.tables for m in USD
            if m in f.sums and ADDED_IN.get(m, 0) < EXACT_USD_IN]


def _buckets(column: str, prefix: str) -> dict[str, str]:
    out = {}
    for i in range(BUCKETS):
        lo = LATENCY_BOUNDS_MS[i - 1] if i else None
        hi = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else None
        cond = " AND ".join(c for c in (f"{column} > {lo}" if lo is not None else "",
                                         f"{column} <= {hi}" if hi is not None else f"{column} IS NOT NULL") if c)
        out[f"{prefix}_{i}"] = f"SUM(CASE WHEN {cond} THEN 1 ELSE 0 END)"
    return out


def period_expr(dialect: str, grain: str = "hour") -> str:
    """The UTC hour or day (epoch seconds) of a raw row's created_at."""
    if dialect == "sqlite":  # ISO-8601 text: 2024-05-01T12:34:56.000000Z
        if grain == "day":
            return "CAST(strftime('%s', substr(created_at, 1, 10)) AS INTEGER)"
        return "CAST(strftime('%s', substr(created_at, 1, 13) || ':00:00') AS INTEGER)"
    seconds = 86400 if grain == "day" else 3600
    return f"CAST(floor(extract(epoch FROM created_at) / {seconds}) * {seconds} AS bigint)"


def _flag(condition: str) -> str:
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


# How each measure is computed from raw rows.
_MEASURES: dict[str, str] = {
    "requests": "COUNT(*)",
    "errors": _flag("error_type IS NOT NULL"),
    "cache_hits": _flag("cache_hit"),
    "streamed": _flag("streamed"),
    "downgrades": _flag("downgraded_from IS NOT NULL"),
    "retries": "SUM(retries)",
    "retried": _flag("retries > 0"),
    "estimated": _flag("usage_estimated"),
    **{c: f"SUM({c})" for c in ("tokens_prompt", "tokens_completion", "tokens_total", "tokens_cached",
                                 "tokens_cache_write", "tokens_reasoning", "tokens_audio_in", "tokens_audio_out")},
    "cost_usd": "COALESCE(SUM(cost_usd), 0)",
    "saved_usd": "COALESCE(SUM(saved_usd), 0)",
    "unbilled_calls": "COALESCE(SUM(unbilled_calls), 0)",
    "unbilled_cost_usd": "COALESCE(SUM(unbilled_cost_usd), 0)",
    "unpriced": _flag("cost_usd IS NULL"),
    "energy": "SUM(energy_cost)",
    "latency_count": "COUNT(latency_ms)", "latency_sum": "COALESCE(SUM(latency_ms), 0)",
    "ttfb_count": "COUNT(ttfb_ms)", "ttfb_sum": "COALESCE(SUM(ttfb_ms), 0)",
    **_buckets("latency_ms", "lat"), **_buckets("ttfb_ms", "ttfb"),
    "latency_max": "COALESCE(MAX(latency_ms), 0)", "ttfb_max": "COALESCE(MAX(ttfb_ms), 0)",
}


def rollup_select(dialect: str, family: Family, source: str, where: str = "", grain: str = "hour",
                  measures: tuple[str, ...] | None = None) -> str:
    """Raw usage rows of `source` grouped into rollup rows of `family` (its column order;
    only `measures` when given)."""
    measures = (*family.sums, *family.maxima) if measures is None else measures
    parts = [f"{period_expr(dialect, grain)} AS period", *(f"COALESCE({k}, '') AS {k}" for k in family.keys),
             *(f"{_MEASURES[m]} AS {m}" for m in measures)]
    sql = f"SELECT {', '.join(parts)} FROM {source}"
    if where:
        sql += f" WHERE {where}"
    positions = ", ".join(str(i + 1) for i in range(len(family.keys) + 1))
    # Ordered: concurrent PostgreSQL inserters upsert shared rollup rows in one order (no deadlock).
    return sql + f" GROUP BY {positions} ORDER BY {positions}"


def upsert(dialect: str, family: Family, select_sql: str, grain: str) -> str:
    """INSERT the rows of `select_sql` into a rollup, adding to the rows already there."""
    table = family.tables[grain]
    greatest = "MAX" if dialect == "sqlite" else "GREATEST"
    sets = [f"{m} = {table}.{m} + excluded.{m}" for m in family.sums]
    sets += [f"{m} = {greatest}({table}.{m}, excluded.{m})" for m in family.maxima]
    # "WHERE true": SQLite's parser needs it between an INSERT's SELECT and ON CONFLICT.
    return (f"INSERT INTO {table} ({', '.join(family.columns)}) SELECT * FROM ({select_sql}) AS r WHERE true"
            f" ON CONFLICT (period, {', '.join(family.keys)}) DO UPDATE SET {', '.join(sets)}")


def backfill(dialect: str, source: str = "ai_usage_logs", where: str = "",
             families: tuple[Family, ...] = FAMILIES) -> list[str]:
    """The statements adding the rows of `source` to every rollup."""
    return [upsert(dialect, f, rollup_select(dialect, f, source, where, grain), grain)
            for f in families for grain in f.tables]


# What a report groups by -> (family, expression over its rows).
GROUPS = {None: (MAIN, None), "day": (MAIN, "period / 86400"), "user": (USERS, "user_id"),
          "action": (MAIN, "action"), "model": (MAIN, "model"), "provider": (MAIN, "provider"),
          "workspace": (MAIN, "workspace_id")}
FAR = 2**62  # "no upper bound" for a period range


def window_plan(since: float, now: float) -> tuple[list[tuple[str, int, int]], bool]:
    """Where the numbers of [since, now] are read: (grain, from, to) period ranges, and
    whether the raw rows of [since, first whole hour) are read too. Whole days come from
    the daily rollup, the hours around them from the hourly one; rows stamped after `now`
    are counted, as before."""
    h0 = int(math.ceil(since / HOUR) * HOUR)
    d0 = int(math.ceil(h0 / DAY) * DAY)
    dl = int(now // DAY * DAY)
    if d0 < dl:
        ranges = [("hour", h0, d0), ("day", d0, dl), ("hour", dl, FAR)]
    else:
        ranges = [("hour", h0, FAR)]
    return ranges, h0 > since


def totals_query(dialect: str, by: str | None, ranges: list[tuple[str, int, int]], *, edge: bool,
                 workspace: bool, limit: bool, measures: tuple[str, ...] | None = None) -> str:
    """`measures` (default: all of the family's) summed over the `ranges` of the rollups
    and (`edge`) the raw rows of the first partial hour, grouped by `by`. Parameters (`?`;
    the PostgreSQL store numbers them), in order: per range (from, to, [workspace]); if
    `edge`: since, first whole hour as a time, [workspace]; [limit]."""
    family, key = GROUPS[by]
    sums = family.sums if measures is None else tuple(dict.fromkeys(("requests", *measures)))
    maxima = family.maxima if measures is None else tuple(m for m in family.maxima if m in measures)
    columns = ", ".join(("period", *family.keys, *sums, *maxima))
    ws = " AND workspace_id = ?" if workspace else ""
    sources = [f"SELECT {columns} FROM {family.tables[grain]} WHERE period >= ? AND period < ?{ws}"
               for grain, _, _ in ranges]
    if edge:
        raw = rollup_select(dialect, family, "ai_usage_logs", f"created_at >= ? AND created_at < ?{ws}",
                            measures=(*sums, *maxima))
        sources.append(f"SELECT {columns} FROM ({raw}) AS edge")
    cols = [f"{key} AS key"] if key else []
    if by == "user":
        cols.append("MAX(workspace_id) AS workspace_id")
    usd = "NUMERIC" if dialect == "postgres" else "BIGINT"
    cols += [f"CAST(SUM({m}) AS {usd if m in USD else 'BIGINT'}) AS {m}" for m in sums]
    cols += [f"CAST(MAX({m}) AS BIGINT) AS {m}" for m in maxima]
    sql = f"SELECT {', '.join(cols)} FROM ({' UNION ALL '.join(sources)}) AS u"
    if key:
        sql += f" GROUP BY {key}"
    if limit:  # the costliest first; ties by requests, then name, so both stores agree
        sql += f" ORDER BY cost_usd DESC, requests DESC, {key} LIMIT ?"
    return sql


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
