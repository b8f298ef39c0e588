"""Schema migrations that are fast and bounded, and the rules that keep them so.

A migration is ``(number, sql)`` in both backends' ``MIGRATIONS`` lists (SQLite: a list of
statements). This module holds what the two backends share about them:

* **Names** (`NAMES`), for ``./gw migrate --plan``.
* **Compatibility across releases** (`MIN_CODE`). A release is known by the highest
  migration it carries ("schema version"). Every migration of a release must be
  *expand-only*: the release before it keeps serving on the migrated schema, so a rolling
  deploy runs both at once (new tables, functions and nullable or defaulted columns; no
  renamed, retyped or dropped column, no changed constraint an older statement relies on).
  A later *contract* step (dropping what the previous release still used) records in
  ``MIN_CODE`` the lowest schema version a gateway must know to serve on it; the number is
  written into ``schema_migrations.min_code`` when the migration is applied, so a gateway
  that does not know that migration still reads the rule and refuses to start
  (`SchemaTooNew`, naming both versions) instead of serving on a schema it cannot run on.
  Without an entry a migration is expand-only and a gateway that knows an older schema
  keeps serving on it.
* **Bounded schema steps on PostgreSQL**: the migration transaction sets ``lock_timeout``
  (`LOCK_TIMEOUT`), and a timeout is retried (`LOCK_TRIES`) before failing with
  `MigrationLockTimeout`; a statement ``CREATE [UNIQUE] INDEX CONCURRENTLY ...;`` (one per
  line) is taken out of the transaction (`split_concurrent`) and run after it, checked
  valid at every start.
* **The static rules** (`forbidden`) every migration from `CHECKED_FROM` on is held to
  (tests/test_upgrades.py runs them on both lists): nothing that rewrites a table, holds a
  long lock or walks the usage history inside the schema step. History goes to a
  background backfill (gateway/store/backfill.py).
"""

from __future__ import annotations

import re
from typing import Any, Iterable

# Names of the migrations (./gw migrate --plan). A migration without one is shown by number.
NAMES: dict[int, str] = {
    1: "workspaces, users, keys, energy ledger, reservations, idempotency, usage log",
    2: "token classes and unit prices per usage row",
    3: "hourly and daily usage rollups (PostgreSQL: the usage log partitioned by month)",
    4: "A/B experiments and feedback",
    5: "gw_reserve: the reservation hot path in one call",
    6: "gw_finish: a refund or partial settlement in one call",
    7: "USD saved by the response cache",
    8: "stored Responses API responses",
    9: "gw_reserve with fewer writes",
    10: "exact USD (numeric / nano-dollars)",
    11: "unbilled upstream calls",
    12: "per-key controls",
    13: "the change counter",
    14: "the audit log (append-only)",
    15: "the alerts outbox",
    16: "end users by the app's ids",
    17: "budgets",
    18: "latency histogram",
    19: "files and batches",
    20: "background backfills (gw_backfills)",
    21: "the usage spool (rows refused until a shutdown, written by a later process)",
    22: "dashboard sessions",
}

# Migration -> the lowest schema version a gateway must know to serve once it is applied
# (a contract step). Absent: expand-only. None so far: every migration up to this release
# leaves the previous release able to serve.
MIN_CODE: dict[int, int] = {}

# The first migration held to `forbidden` (the ones before it are history, replayed as
# they were on a new database; an upgrade from the previous release never runs them).
CHECKED_FROM = 17

# PostgreSQL: how long a schema step waits for a lock before giving up (and retrying): a
# migration queued behind a long report would otherwise queue every insert behind itself.
LOCK_TIMEOUT = "2s"
LOCK_TRIES = 5

# Tables that grow with the requests: no non-concurrent index, no backfill statement on them.
USAGE_TABLES = ("ai_usage_logs", "ai_usage_request_ids", "energy_ledger", "reservations",
                "usage_rollup", "usage_rollup_daily", "usage_rollup_users", "usage_rollup_users_daily",
                "audit_log", "alert_outbox", "feedback")


class MigrationError(RuntimeError):
    """A migration could not be applied; the message says why and what to do."""


class MigrationLockTimeout(MigrationError):
    pass


class SchemaTooNew(MigrationError):
    """The store was migrated by a later release with a step this gateway cannot run on."""


def latest(versions: Iterable[int]) -> int:
    return max(versions, default=0)


def check_compatible(applied: dict[int, int | None], known: int) -> list[int]:
    """`applied`: version -> its recorded min_code. Raises SchemaTooNew when a migration
    this gateway does not know requires a newer gateway; returns the unknown (expand-only)
    migrations it serves despite."""
    unknown = sorted(v for v in applied if v > known)
    needs = max((applied[v] or 0 for v in applied), default=0)
    if needs > known:
        raise SchemaTooNew(
            f"the store's schema is at version {latest(applied)}, which needs a gateway that knows schema version"
            f" {needs} or later; this gateway knows schema version {known}. Deploy the newer release"
            " (docs/upgrades.md): a migration this gateway does not know removed or changed what it uses.")
    return unknown


_CONCURRENT = re.compile(r"^\s*CREATE\s+(UNIQUE\s+)?INDEX\s+CONCURRENTLY\b[^;]*;\s*$", re.I | re.M)


def split_concurrent(sql: str) -> tuple[str, list[str]]:
    """A PostgreSQL migration's statements that run in its transaction, and its
    ``CREATE INDEX CONCURRENTLY`` statements (one per line), which cannot."""
    concurrent = [m.group(0).strip().rstrip(";") for m in _CONCURRENT.finditer(sql)]
    return _CONCURRENT.sub("", sql), concurrent


def index_name(statement: str) -> str:
    m = re.search(r"CONCURRENTLY\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", statement, re.I)
    if m is None:
        raise MigrationError(f"a concurrent index needs a name: {statement[:120]}")
    return m.group(1)


def if_not_exists(statement: str) -> str:
    if re.search(r"CONCURRENTLY\s+IF\s+NOT\s+EXISTS", statement, re.I):
        return statement
    return re.sub(r"CONCURRENTLY\s+", "CONCURRENTLY IF NOT EXISTS ", statement, count=1, flags=re.I)


_USAGE = "|".join(USAGE_TABLES)
# (rule, pattern): what a schema step from CHECKED_FROM on may not contain.
RULES: list[tuple[str, re.Pattern]] = [
    ("changes a column's type (rewrites the table under an exclusive lock)",
     re.compile(r"ALTER\s+COLUMN\s+\w+\s+(SET\s+DATA\s+)?TYPE\b", re.I)),
    ("adds a NOT NULL column without a DEFAULT (fails on a table with rows, or rewrites it)",
     re.compile(r"ADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?\w+\s+[\w\s(),.]*?\bNOT\s+NULL\b(?![^,;]*\bDEFAULT\b)", re.I)),
    ("adds a column with a volatile default (rewrites the table)",
     re.compile(r"ADD\s+COLUMN\b[^,;]*\bDEFAULT\s+(?:now|clock_timestamp|random|gen_random_uuid|nextval)\s*\(", re.I)),
    ("renames or drops a column or table the previous release uses (contract: a later release, MIN_CODE)",
     re.compile(r"\b(?:RENAME\s+(?:COLUMN|TO)|DROP\s+COLUMN|DROP\s+TABLE)\b", re.I)),
    ("builds an index on a usage table without CONCURRENTLY (blocks its writes)",
     re.compile(rf"CREATE\s+(?:UNIQUE\s+)?INDEX\s+(?!CONCURRENTLY)(?:IF\s+NOT\s+EXISTS\s+)?\w+\s+ON\s+(?:ONLY\s+)?(?:{_USAGE})\b",
                re.I)),
    ("writes rows from the usage history in the schema step (a background backfill's job)",
     re.compile(rf"(?:INSERT\s+INTO\s+\w+[^;]*?\bSELECT\b[^;]*?\bFROM\s+(?:{_USAGE})\b"
                rf"|UPDATE\s+(?:ONLY\s+)?(?:{_USAGE})\b|DELETE\s+FROM\s+(?:{_USAGE})\b)", re.I | re.S)),
    ("adds a constraint that is checked against every row (add it NOT VALID, validate later)",
     re.compile(r"ADD\s+(?:CONSTRAINT\s+\w+\s+)?(?:CHECK|FOREIGN\s+KEY)\b(?![^;]*\bNOT\s+VALID\b)", re.I)),
    ("sets NOT NULL on an existing column (scans the table under an exclusive lock)",
     re.compile(r"ALTER\s+COLUMN\s+\w+\s+SET\s+NOT\s+NULL", re.I)),
]


def _strip_bodies(sql: str) -> str:
    """Function bodies ($$ ... $$) run later, per row, not in the schema step."""
    return re.sub(r"\$(\w*)\$.*?\$\1\$", "$$", sql, flags=re.S)


def forbidden(sql: str | list[str]) -> list[str]:
    """The rules a migration's schema step breaks (an empty list: none)."""
    text = _strip_bodies(sql if isinstance(sql, str) else ";\n".join(sql))
    text = re.sub(r"--[^\n]*", "", text)
    return [rule for rule, pattern in RULES if pattern.search(text)]


async def plan(store: Any, pace: float) -> dict[str, Any]:
    """What ``./gw migrate`` would do on an opened (not migrated) `store`: the migrations
    to apply, the backfills then left (rows, estimated time at full pace and at `pace`).
    Raises SchemaTooNew like a start would."""
    from gateway.store import backfill  # backfill imports rollup only; kept local: a plan is rare

    applied = await store.schema_versions()
    known = latest(store.schema_known)
    check_compatible(applied, known)
    pending = [v for v in store.schema_known if v not in applied]

    def rate(name: str) -> int:  # a backfill's own measured rate, else a heavy one's
        measured = getattr(backfill.by_name(name), "rows_per_second", None) or {}
        return measured.get(store.dialect) or backfill.ROWS_PER_SECOND[store.dialect]

    jobs = []
    states = await store.backfill_states()
    for state in states:
        if state["finished_at"] is None:
            jobs.append((state["name"], state["migration"],
                         await store.usage_id_rows(state["lo"], state["next_id"])))
    fresh = backfill.to_register(pending, applied, [s["name"] for s in states])
    if fresh:
        # Every row there now (the range the migration will record: a backfill of a
        # migration before 20 applied earlier covers at most these); none: nothing to do.
        everything = await store.usage_id_rows() if applied else 0  # a new database: no usage log yet
        jobs += [(b.name, b.migration, everything) for b in fresh if everything]
    return {
        "dialect": store.dialect,
        "schema": {"applied": latest(applied), "known": known,
                   "newerExpandOnly": sorted(v for v in applied if v > known)},
        "migrations": [{"version": v, "name": NAMES.get(v, f"migration {v}"), "minCode": MIN_CODE.get(v)}
                       for v in pending],
        "backfills": [{"name": name, "migration": migration, "rows": rows,
                       "seconds": round(rows / rate(name), 1),
                       "secondsWhileServing": round(rows / rate(name) / pace, 1) if pace > 0 else None}
                      for name, migration, rows in jobs],
        "lockTimeout": LOCK_TIMEOUT if store.dialect == "postgres" else None,
    }
