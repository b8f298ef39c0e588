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

Percentiles (``latencyP50`` ...) come from the fine latency histogram (migration 18, below):
within 4% of the exact nearest-rank percentile (the request at rank ceil(p/100 x n) of the
window's requests ordered by latency), a bound, not a likelihood. Where that histogram does
not cover the window (history before migration 18 until its backfill has run; on SQLite,
rows an older release wrote after the upgrade), they come from the coarse histogram of the
rollup rows (``lat_0`` ... ``lat_23``, bounds in ``LATENCY_BOUNDS_MS``, ~1.5-2x apart),
interpolated inside the bucket as Prometheus's ``histogram_quantile`` does, and the answer
says they are approximate.

The fine histogram
------------------
``usage_latency_hist`` (hourly) and ``usage_latency_hist_daily`` hold one row per period x
workspace x measure (0 latency, 1 time to first byte) x bucket, with the count of requests in
it: only the buckets that hold a request, so ~30-80 rows per workspace and period where the
rollup would need hundreds of columns. The buckets are log-spaced by ``HIST_GAMMA`` = 13/12
(DDSketch's mapping): bucket ``b >= 1`` holds the values in (γ^(b-2), γ^(b-1)] ms, bucket 0
the values <= 0, and a bucket is reported as 2γ^(b-1)/(γ+1), at most ``HIST_ALPHA`` = 4%
(relative) from any value in it (as the one whole ms it holds where it spans only one: below
~12 ms a percentile is exact); capped by the window's largest value, which only brings it
closer. No integer lies within 3e-7 of a bucket bound on the log scale up to 3,000,000 ms,
so SQLite's, PostgreSQL's and Python's ``ln`` put every integer in the same bucket.

Kept as the rollups are: on SQLite by the statements ``insert_usage`` runs per chunk of rows
(``hist_keep``), on PostgreSQL by a statement-level trigger over the inserted rows (a
transition table), so the rows of any writer, an older release's too, are counted. (An
older release writing to a SQLite file after the upgrade leaves its rows out: ids above the
boundary are never backfilled, and the windows holding them stay approximate.)

Coverage and backfill. Migration 18 only creates the tables and starts keeping them: it
records in ``usage_latency_hist_coverage`` the first usage id kept live (``live_from_id``:
every row with an id at or above it is in the histogram, none below) and processes no
history. The rows below it are added by the ``latency_histogram`` background backfill
(gateway/store/backfill.py, ``hist_backfill_chunk``), registered with migration 20 (which
creates gw_backfills, after 18) over ``HIST_HISTORY_RANGE`` = [oldest usage id,
live_from_id): run by the gateways while they serve, or to its end by ``./gw migrate
--backfill``. One range record serves it and ``Store.backfill_latency_histogram(lo, hi)``
(an operator's or a test's call): ``usage_latency_hist_backfilled`` holds the id ranges
added. Either adds the rows with ids in [lo, min(hi, live_from_id)) that no recorded range
holds and records its range in the same transaction (merged with the ranges it touches),
so a call is idempotent, any order of chunks is fine, a crash loses at most the chunk in
flight, and the two serialise on the coverage row (PostgreSQL; SQLite: the write lock).
``Store.latency_histogram_coverage()`` says what is still pending;
``Store.run_latency_histogram_backfill()`` runs it to completion here and now (tests).

A report does not trust the boundary alone: in the same statement as the fine counts it
reads the rollup's ``latency_count`` / ``ttfb_count`` over the same periods, and uses the
fine histogram only when the two agree for the whole window (every row of the rollup is in it: the histogram
is a subset of the rollup by construction, so equal counts mean the same rows). Rows that
retention dropped before their backfill stay coarse: their periods report approximate.

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
    sums = family.sums if measures is None else tuple(dict.fromkeys(
        m for m in ("requests", *measures) if m not in family.maxima))
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


def _interpolate(lower: float, upper: float, rank: int, seen: int, count: int) -> float:
    """Where the rank-th value lies in (lower, upper], its bucket's `count` values spread evenly."""
    return lower + (upper - lower) * (rank - seen) / count


def coarse_percentile(counts: Sequence[int], p: float, largest: float) -> float | None:
    """The nearest-rank p-th percentile estimated from the coarse histogram (``lat_0`` ...):
    interpolated inside the bucket that holds its rank, as Prometheus's histogram_quantile
    does (the first bucket from 0, the last up to `largest`), capped by `largest`.
    Approximate: only bounded by the bucket's width. None without a single value."""
    n = sum(counts)
    if not n:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            lower = LATENCY_BOUNDS_MS[i - 1] if i else 0
            upper = LATENCY_BOUNDS_MS[i] if i < len(LATENCY_BOUNDS_MS) else max(largest, lower)
            return round(min(_interpolate(lower, upper, rank, seen, c), largest), 2)
        seen += c
    return float(largest)  # unreachable: seen == n >= rank at the end


# ---------------------------------------------------------------- the fine histogram

HIST_IN = 18  # the migration that made it
HIST_ALPHA = 0.04  # the largest relative error of a reported value (module docstring)
HIST_GAMMA = (1 + HIST_ALPHA) / (1 - HIST_ALPHA)  # = 13/12, the ratio of two bucket bounds
_LN_GAMMA = math.log(HIST_GAMMA)
HIST_TABLES = {"hour": "usage_latency_hist", "day": "usage_latency_hist_daily"}
HIST_COVERAGE = "usage_latency_hist_coverage"
HIST_BACKFILLED = "usage_latency_hist_backfilled"
HIST_MEASURES = ("latency_ms", "ttfb_ms")  # measure 0, 1: the raw column each counts
HIST_KEYS = ("period", "workspace_id", "measure", "bucket")
_MEASURE_CODES = "(SELECT 0 AS measure UNION ALL SELECT 1)"


def hist_bucket(value: float) -> int:
    """The fine bucket of a value (ms), as the SQL of ``hist_bucket_sql`` computes it."""
    if value <= 0:
        return 0
    return max(1, math.ceil(math.log(value) / _LN_GAMMA) + 1)


def hist_value(bucket: int) -> float:
    """What a bucket is reported as: within HIST_ALPHA of every value in it."""
    if bucket <= 0:
        return 0.0
    return 2 * HIST_GAMMA ** (bucket - 1) / (HIST_GAMMA + 1)


def hist_bucket_sql(dialect: str, column: str) -> str:
    ln = f"ln({column})" if dialect == "sqlite" else f"ln({column}::double precision)"
    greatest = "MAX" if dialect == "sqlite" else "GREATEST"
    ceil = f"CAST(ceil({ln} / {_LN_GAMMA!r}) AS INTEGER)"
    return f"CASE WHEN {column} <= 0 THEN 0 ELSE {greatest}(1, {ceil} + 1) END"


def hist_ddl(dialect: str) -> list[str]:
    """Migration 18: the tables and the coverage record; history is not read (the backfill
    below does it, off the migration). The backend adds how it keeps the tables and
    fills in live_from_id, both in the same transaction."""
    big = _column_type(dialect, "requests")
    # SQLite: the rows in their key's b-tree, not a table beside an index (a range read
    # needs no second lookup per row for `n`, an upsert touches one b-tree).
    rowid = " WITHOUT ROWID" if dialect == "sqlite" else ""
    tables = [f"CREATE TABLE {table} (\n    period {big} NOT NULL,  -- epoch seconds of the UTC {grain}\n"
              f"    workspace_id text NOT NULL,\n    measure {big} NOT NULL,  -- 0 latency_ms, 1 ttfb_ms\n"
              f"    bucket {big} NOT NULL,  -- gateway/store/rollup.py hist_bucket\n    n {big} NOT NULL,\n"
              f"    PRIMARY KEY ({', '.join(HIST_KEYS)})\n){rowid}" for grain, table in HIST_TABLES.items()]
    real = "REAL" if dialect == "sqlite" else "double precision"
    return [*tables,
            f"CREATE TABLE {HIST_COVERAGE} (\n    id {big} PRIMARY KEY CHECK (id = 1),\n"
            f"    live_from_id {big} NOT NULL,  -- usage rows with id >= this are kept live\n"
            f"    started_at {real} NOT NULL\n)",
            f"CREATE TABLE {HIST_BACKFILLED} (\n    lo {big} PRIMARY KEY,  -- usage ids [lo, hi) added by the backfill\n"
            f"    hi {big} NOT NULL\n)"]


def hist_select(dialect: str, source: str, where: str = "", grain: str = "hour") -> str:
    """The rows of `source` (usage rows) counted per period, workspace, measure and bucket:
    one scan for both measures."""
    value = "CASE m.measure WHEN 0 THEN u.latency_ms ELSE u.ttfb_ms END"
    inner = (f"SELECT {period_expr(dialect, grain)} AS period, COALESCE(u.workspace_id, '') AS workspace_id,"
             f" m.measure AS measure, {value} AS v FROM {source} AS u CROSS JOIN {_MEASURE_CODES} AS m")
    if where:
        inner += f" WHERE {where}"
    return (f"SELECT period, workspace_id, measure, {hist_bucket_sql(dialect, 'v')} AS bucket, COUNT(*) AS n"
            f" FROM ({inner}) AS x WHERE v IS NOT NULL GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4")


def hist_upsert(dialect: str, select_sql: str, grain: str) -> str:
    table = HIST_TABLES[grain]
    return (f"INSERT INTO {table} ({', '.join(HIST_KEYS)}, n) SELECT * FROM ({select_sql}) AS r WHERE true"
            f" ON CONFLICT ({', '.join(HIST_KEYS)}) DO UPDATE SET n = {table}.n + excluded.n")


def hist_keep(dialect: str, source: str = "ai_usage_logs", where: str = "") -> list[str]:
    """The statements adding the rows of `source` to both fine histograms (hour, then day:
    every writer in one order, so concurrent PostgreSQL writers cannot deadlock)."""
    return [hist_upsert(dialect, hist_select(dialect, source, where, grain), grain) for grain in HIST_TABLES]


# The backfill's statements: the usage rows with ids in [?, ?), both histograms.
HIST_BACKFILL_WHERE = "u.id >= ? AND u.id < ?"


# The ids the history backfill covers (gateway/store/backfill.py registers it with migration
# 20, in that transaction): from the oldest usage row to the boundary migration 18 recorded,
# [min id, live_from_id); an empty range (a new database: no row below it) is done at once.
HIST_HISTORY_RANGE = ("SELECT COALESCE((SELECT MIN(id) FROM ai_usage_logs WHERE id < c.live_from_id), c.live_from_id)"
                      f" AS lo, c.live_from_id AS hi FROM {HIST_COVERAGE} AS c WHERE c.id = 1")


def hist_backfill_chunk(dialect: str, lo: int, hi: int) -> list[str]:
    """The history backfill's chunk (gateway/store/backfill.py): the usage rows with ids in
    [lo, hi) added to both fine histograms, but those kept live (id >= live_from_id) and
    those a range of ``usage_latency_hist_backfilled`` already holds (an earlier
    ``Store.backfill_latency_histogram`` call), and [lo, hi) recorded there, merged with
    the range just above it (chunks run newest first, so the record stays one row). The
    same bookkeeping as ``backfill_latency_histogram``: either may run first, no row is
    counted twice."""
    lo, hi = int(lo), int(hi)
    if lo >= hi:
        return []
    done = HIST_BACKFILLED
    where = (f"u.id >= {lo} AND u.id < {hi}"
             f" AND u.id < (SELECT live_from_id FROM {HIST_COVERAGE} WHERE id = 1)"
             f" AND NOT EXISTS (SELECT 1 FROM {done} AS b WHERE b.lo <= u.id AND u.id < b.hi)")
    greatest = "MAX" if dialect == "sqlite" else "GREATEST"
    # PostgreSQL: the coverage row's lock, as backfill_latency_histogram takes it, so the
    # two never read the record at once (SQLite: the write transaction holds the file).
    lock = [f"SELECT 1 FROM {HIST_COVERAGE} WHERE id = 1 FOR UPDATE"] if dialect == "postgres" else []
    return [*lock, *hist_keep(dialect, where=where),
            f"UPDATE {done} SET lo = {lo} WHERE lo = {hi} AND NOT EXISTS (SELECT 1 FROM {done} WHERE lo = {lo})",
            f"INSERT INTO {done} (lo, hi) VALUES ({lo}, {hi})"
            f" ON CONFLICT (lo) DO UPDATE SET hi = {greatest}({done}.hi, excluded.hi)"]


def hist_gaps(lo: int, hi: int, done: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of [lo, hi) that no range of `done` covers, in order."""
    gaps, at = [], lo
    for a, b in sorted(done):
        if b <= at or a >= hi:
            continue
        if a > at:
            gaps.append((at, a))
        at = max(at, b)
    if at < hi:
        gaps.append((at, hi))
    return gaps


def hist_merge(lo: int, hi: int, done: Sequence[tuple[int, int]]) -> tuple[list[int], tuple[int, int]]:
    """Recording [lo, hi) as done: the `lo`s of the done ranges it touches (to delete) and
    the one range that replaces them, so the record stays a few rows."""
    touching = [(a, b) for a, b in done if b >= lo and a <= hi]
    merged = (min([lo, *(a for a, _ in touching)]), max([hi, *(b for _, b in touching)]))
    return [a for a, _ in touching], merged


def hist_union(done: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The recorded ranges as disjoint ones, in order (a manual call and the background
    backfill may record overlapping ones)."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(done):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def hist_pending(first_id: int, live_from_id: int, done: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The id ranges the backfill has still to add, from the oldest usage row kept."""
    return hist_gaps(first_id, live_from_id, done)


def histogram_query(dialect: str, ranges: list[tuple[str, int, int]], *, edge: bool, workspace: bool) -> str:
    """The fine counts of a window (``usage_totals``'s ranges and edge) and, from the same
    snapshot, the rollup's counts to check them against: rows (src, measure, bucket, n),
    src 0 the fine histogram over the ranges, 1 the raw rows of the edge (bucketed the same
    way), 2 the rollup's latency_count (measure 0) and ttfb_count (1) over the ranges.
    Parameters: per range (from, to, [workspace]) for src 0, again twice for src 2; if
    `edge`: since, first whole hour as a time, [workspace]. Several rows may share a key
    (one per part): the caller adds them."""
    ws = " AND workspace_id = ?" if workspace else ""
    # Each part sums its own rows (a few hundred groups), so the union carries groups, not
    # the ~10^4-10^5 histogram rows of a month: half the time on SQLite.
    parts = [f"SELECT 0 AS src, measure, bucket, SUM(n) AS n FROM {HIST_TABLES[grain]}"
             f" WHERE period >= ? AND period < ?{ws} GROUP BY measure, bucket" for grain, _, _ in ranges]
    parts += [f"SELECT 2 AS src, 0 AS measure, 0 AS bucket, SUM(latency_count) AS n FROM {MAIN.tables[grain]}"
              f" WHERE period >= ? AND period < ?{ws}" for grain, _, _ in ranges]
    parts += [f"SELECT 2 AS src, 1 AS measure, 0 AS bucket, SUM(ttfb_count) AS n FROM {MAIN.tables[grain]}"
              f" WHERE period >= ? AND period < ?{ws}" for grain, _, _ in ranges]
    if edge:
        where = "u.created_at >= ? AND u.created_at < ?" + (" AND u.workspace_id = ?" if workspace else "")
        raw = hist_select(dialect, "ai_usage_logs", where)
        parts.append(f"SELECT 1 AS src, measure, bucket, SUM(n) AS n FROM ({raw}) AS edge GROUP BY measure, bucket")
    return f"SELECT src, measure, bucket, CAST(n AS BIGINT) AS n FROM ({' UNION ALL '.join(parts)}) AS h"


def hist_percentile(counts: dict[int, int], p: float, largest: float) -> float | None:
    """The nearest-rank p-th percentile from fine bucket counts ({bucket: n}): the value of
    the bucket that holds its rank (``hist_value``; the integer itself where the bucket's
    span holds only one, as latencies are whole ms), capped by `largest`. None without a
    single value."""
    n = sum(counts.values())
    if not n:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    seen = 0
    for bucket in sorted(counts):
        seen += counts[bucket]
        if seen >= rank:
            return round(min(_whole_value(bucket), largest), 2)
    return float(largest)  # unreachable: seen == n >= rank at the end


def _whole_value(bucket: int) -> float:
    if bucket <= 0:
        return 0.0
    low, high = math.floor(HIST_GAMMA ** (bucket - 2)), math.floor(HIST_GAMMA ** (bucket - 1))
    return float(high) if high - low == 1 else hist_value(bucket)
