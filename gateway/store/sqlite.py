"""SQLite backend: one file shared by every gateway process on one machine.

Why it is built this way:

* One plain ``sqlite3`` connection per Store, owned by one dedicated database thread.
  Every store method is ONE Python function that runs on that thread from start to end
  (all its statements, its BEGIN and its COMMIT), so a call costs one hop to the thread
  and one back, not one per statement. Because only that thread touches the connection,
  transactions of different tasks cannot interleave: the thread *is* the critical section.
* Writes are grouped. Callers put (function, future) on a queue; each time the thread
  wakes it takes everything pending (up to ``MAX_GROUP``) and runs all the writes among it
  in ONE ``BEGIN IMMEDIATE ... COMMIT``, each write inside its own SAVEPOINT and in arrival
  order. A write that raises (NotFound, StoreConflict, ...) is rolled back to its savepoint
  and gets its own exception; the others are kept. The results are exactly those of running
  the writes one by one in that order (same balances, same ledger rows in the same order);
  they are handed back only after the COMMIT, and if the COMMIT itself fails every write of
  the group gets that error and nothing of the group was stored. Under load (32 requests in
  flight) one commit carries many reserve/settle/refund calls instead of one each.
* Reads pending in the same wake-up run first, outside the write transaction (they never
  see a group's uncommitted writes). All operations pending at one moment are concurrent,
  so any order among them is a valid one; an operation submitted after another one
  *returned* always sees its effects.
* Write transactions start with ``BEGIN IMMEDIATE``: the write lock on the *file* is taken
  up front, so another process cannot slip its own debit between our read of a balance and
  our update of it (with a plain BEGIN both would read, then one would fail to upgrade).
  ``busy_timeout`` makes a waiting process wait (up to 10 s) instead of failing.
* ``isolation_level=None``: Python's sqlite3 never opens or commits transactions behind
  our back; BEGIN/COMMIT/ROLLBACK/SAVEPOINT are explicit and visible here.
* WAL lets readers in other processes proceed while a writer holds the lock. Foreign keys
  are off by default in SQLite; we turn them on.
* ``synchronous=NORMAL``, measured against FULL (bench/store_bench.py, this 2-core VM):
  FULL fsyncs the WAL on every COMMIT, ~3-4 ms and ~300 us of CPU each here. Grouping
  hides that at 32 requests in flight (one fsync per group), but at low concurrency a
  group is one operation, and FULL made reserve+settle ~6x *slower* than the old
  aiosqlite store and blew the per-request CPU budget. What NORMAL risks is bounded and
  errs in the customer's favour: a process crash loses nothing; a power cut may lose the
  last commits, whole (WAL never half-applies a transaction), so balance == sum(ledger)
  still holds, nothing is charged twice, a lost settle leaves a reservation the stale
  sweeper refunds, and a lost reserve makes its settle a no-op. The usage log is already
  buffered in memory before ``insert_usage``, so a power cut loses more there anyway.
  Set ``SYNCHRONOUS = "FULL"`` if a deployment values the last milliseconds of charges
  over throughput.
* Reservations (``reserve_energy``, on every request's critical path) skip the thread hop:
  they run on the event loop's own thread, on a second connection whose ``busy_timeout``
  is 0, so it can never block the loop waiting for a lock. All reservations requested in
  one turn of the loop are grouped into one transaction (same savepoint rules as above),
  run at the end of that turn. If the file is locked (the database thread, another
  process or the admin CLI is writing) the reservations go to the database thread
  instead, which waits for the lock as usual. Neither working connection checkpoints the
  WAL (``wal_autocheckpoint = 0``): a checkpointer thread with its own connection does,
  every 0.5 s, so no COMMIT of ours ever waits for the checkpoint's fsync. After a
  complete checkpoint the next write starts the WAL over and fsyncs its header (even with
  synchronous=NORMAL): the checkpointer makes that write itself (``user_version``), for
  the same reason. Measured with
  bench/cpu_per_request.py and the stream first-byte probe: the hop cost more than the
  transaction. In-memory databases (one per connection) keep everything on the thread.
* Write-behind batches (``settle_many``, ``insert_usage``: up to a second's requests) are
  written as short transactions of ``SETTLE_CHUNK`` / ``USAGE_CHUNK`` items, one at a
  time. On the database thread, one whole batch held the file's write lock 10-50 ms under
  load (the thread waits for the GIL between statements), and every request's
  reservation, locked out of the loop's connection, queued behind it. Settlements (small,
  every 0.1 s: the batches most requests waited behind) run on the loop's connection like
  reservations, a turn of the loop between two chunks; a locked file sends a chunk to the
  thread. Usage rows (most of the write-behind SQL) stay on the thread: on the loop they
  cost ~10% of the throughput at 32 connections (CPU per request 878 vs 799 us, medians
  of four alternated runs). Measured at 1 connection: settle batches of ~60 went from
  8-29 ms to 2-5 ms, and the fast path's p99 in `BENCH_QUICK=1 make bench` from 12.0 /
  8.7 ms to 5.2 ms. A batch that fails part-way is retried whole, which is safe: a settle
  only matches reservations still open, and usage rows are unique by request_id.
* Admin reads (reports, /admin/metrics: ``report_query``) run on a fourth connection, on a
  thread of their own, read-only: a report's GROUP BY never queues a reservation behind it
  on the database thread, and sqlite3 lets go of the GIL while a statement runs, so the
  loop keeps serving. Reports read the rollup tables a trigger keeps (gateway/store/rollup.py).
* Once an operation is queued it runs to completion even if the awaiting task is
  cancelled (its result is then dropped). A settle must not depend on the client staying
  connected; a reservation whose caller vanished is a stale reservation, refunded by the
  sweeper (``stale_reservations``).
* ``close()`` queues a stop marker behind everything already submitted: pending operations
  finish (and commit) first, then the connection is closed and the thread ends.

Time columns are REAL epoch seconds, except ``ai_usage_logs.created_at``: ISO-8601 UTC
text so ops can ``GROUP BY date(created_at)`` (see gateway.store).

USD columns (``cost_usd``, ``saved_usd``, in ``ai_usage_logs`` and the rollups) are
INTEGER nano-dollars (1e-9 USD, gateway/money.py): SQLite has no decimal type, a REAL
sum is not exact and a decimal TEXT column is summed as REAL, while an integer SUM is
exact (up to 2^63 nano-dollars, $9.2 billion per sum) and as fast as the token counts'.
``SELECT SUM(cost_usd) / 1e9`` gives dollars; the store's API gives ``Decimal``.
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import orjson

from gateway.money import from_nano, json_default, to_nano
from gateway.store import backfill, migrations
from gateway.store import rollup as usage_rollup
from gateway.store.base import (
    IN_FLIGHT_LEASE,
    USAGE_COLUMNS,
    ApiKey,
    EnergyEntry,
    IdempotencyState,
    InsufficientEnergy,
    AUDIT_COLUMNS,
    DASHBOARD_SESSION_COLUMNS,
    OIDC_LOGIN_COLUMNS,
    BUDGET_COLUMNS,
    KEY_CONTROLS,
    OUTBOX_CLAIMED,
    BATCH_COLUMNS,
    BATCH_UPDATABLE,
    FILE_COLUMNS,
    OUTBOX_LISTED,
    KeyIdentity,
    NotFound,
    Reservation,
    Store,
    StoreConflict,
    User,
    Workspace,
    check_amount,
    check_grant,
    check_role,
    check_tier,
    check_workspace_name,
    budget_row,
    compute_refill,
    hash_key,
    idempotency_decision,
    iso_utc,
    kept_by_refill_reason,
    key_control_values,
    stored_key_models,
    new_api_key,
    new_id,
    prepare_usage_rows,
    now_or,
    parse_iso_utc,
    returned_after_refills,
    settlement_return,
)

SYNCHRONOUS = "NORMAL"  # see the module docstring for why not FULL
BUSY_TIMEOUT_MS = 10_000
# Most operations one wake-up of the database thread takes: bounds a group's transaction
# (and so the wait of its first caller) when thousands are queued.
MAX_GROUP = 256
SETTLE_CHUNK = 32  # settlements per transaction of a write-behind batch (module docstring)
USAGE_CHUNK = 64  # usage rows per transaction of a write-behind batch

# Every inserted usage row (never one skipped as a duplicate) is added to its rollup rows
# (hourly and daily) in the same transaction: by insert_usage, once per chunk of rows (the
# rows with ids above the chunk's first: a write transaction has the file to itself). A
# per-row trigger (migration 3) did it first; four upserts per row cost ~40 us of CPU per
# request on the fast path (bench/cpu_per_request.py: 451 vs 493 us), so it is dropped at
# open and the statements run per chunk of up to USAGE_CHUNK rows instead.
ROLLUP_SINCE = [*usage_rollup.backfill("sqlite", where="id > ?"),
                *usage_rollup.hist_keep("sqlite", where="u.id > ?")]  # the fine latency histogram (migration 18)
# Store.backfill_latency_histogram: the usage rows with ids in [?, ?) into the fine histogram.
HIST_BACKFILL = usage_rollup.hist_keep("sqlite", where=usage_rollup.HIST_BACKFILL_WHERE)
ROLLUP_TRIGGER = (  # as migration 3 made it (dropped at open since)
    "CREATE TRIGGER ai_usage_logs_rollup AFTER INSERT ON ai_usage_logs BEGIN "
    + "; ".join(usage_rollup.backfill("sqlite", where="id = NEW.id", families=usage_rollup.as_of(3)))
    + "; END"
)



def _exact_usd(table: str, column: str, default: int | None) -> list[str]:
    """Migration 10 for one column: binary-float USD -> INTEGER nano-dollars, in place."""
    kept = "" if default is None else f" NOT NULL DEFAULT {default}"
    return [f"ALTER TABLE {table} RENAME COLUMN {column} TO {column}_float",
            f"ALTER TABLE {table} ADD COLUMN {column} INTEGER{kept}",
            f"UPDATE {table} SET {column} = gw_usd_nano({column}_float)",
            f"ALTER TABLE {table} DROP COLUMN {column}_float"]


# Each migration is a list of statements, applied in one transaction with its version row.
MIGRATIONS: list[tuple[int, list[str]]] = [
    (
        1,
        [
            """CREATE TABLE workspaces (
                id          TEXT PRIMARY KEY,
                name        TEXT NOT NULL UNIQUE,
                profile     TEXT NOT NULL DEFAULT '{}',   -- JSON
                ai_settings TEXT NOT NULL DEFAULT '{}',   -- JSON
                created_at  REAL NOT NULL
            )""",
            """CREATE TABLE users (
                id           TEXT PRIMARY KEY,
                workspace_id TEXT NOT NULL REFERENCES workspaces(id),
                name         TEXT,
                tier         TEXT NOT NULL,
                energy       INTEGER NOT NULL DEFAULT 0 CHECK (energy >= 0),
                refilled_at  REAL,
                disabled     INTEGER NOT NULL DEFAULT 0,
                created_at   REAL NOT NULL
            )""",
            "CREATE INDEX users_workspace ON users (workspace_id)",
            """CREATE TABLE api_keys (
                id           TEXT PRIMARY KEY,
                user_id      TEXT NOT NULL REFERENCES users(id),
                workspace_id TEXT NOT NULL REFERENCES workspaces(id),
                key_hash     TEXT NOT NULL UNIQUE,
                prefix       TEXT NOT NULL,
                role         TEXT NOT NULL CHECK (role IN ('user', 'workspace_admin')),
                created_at   REAL NOT NULL,
                revoked_at   REAL
            )""",
            "CREATE INDEX api_keys_user ON api_keys (user_id)",
            "CREATE INDEX api_keys_workspace ON api_keys (workspace_id)",
            """CREATE TABLE energy_ledger (
                id            INTEGER PRIMARY KEY AUTOINCREMENT,
                user_id       TEXT NOT NULL REFERENCES users(id),
                request_id    TEXT,
                kind          TEXT NOT NULL CHECK (kind IN
                                ('reserve', 'settle', 'refund', 'grant', 'refill', 'adjust')),
                amount        INTEGER NOT NULL,
                balance_after INTEGER NOT NULL CHECK (balance_after >= 0),
                reason        TEXT,
                created_at    REAL NOT NULL
            )""",
            "CREATE INDEX energy_ledger_user ON energy_ledger (user_id, id)",
            # At most one debit and one outcome per request: the last line of defence
            # against charging or refunding twice.
            """CREATE UNIQUE INDEX energy_ledger_one_reserve ON energy_ledger (request_id)
               WHERE kind = 'reserve'""",
            """CREATE UNIQUE INDEX energy_ledger_one_outcome ON energy_ledger (request_id)
               WHERE kind IN ('settle', 'refund')""",
            """CREATE TABLE reservations (
                request_id   TEXT PRIMARY KEY,
                user_id      TEXT NOT NULL REFERENCES users(id),
                amount       INTEGER NOT NULL CHECK (amount >= 0),
                status       TEXT NOT NULL CHECK (status IN ('reserved', 'settled', 'refunded')),
                final_amount INTEGER,
                created_at   REAL NOT NULL,
                finished_at  REAL
            )""",
            """CREATE INDEX reservations_open ON reservations (created_at)
               WHERE status = 'reserved'""",
            """CREATE TABLE idempotency_keys (
                user_id     TEXT NOT NULL REFERENCES users(id),
                key         TEXT NOT NULL,
                request_id  TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                status      TEXT NOT NULL CHECK (status IN ('in_flight', 'done')),
                status_code INTEGER,
                body        BLOB,
                created_at  REAL NOT NULL,
                finished_at REAL,
                PRIMARY KEY (user_id, key)
            )""",
            """CREATE TABLE ai_usage_logs (
                id                INTEGER PRIMARY KEY AUTOINCREMENT,
                request_id        TEXT UNIQUE,
                user_id           TEXT,
                workspace_id      TEXT,
                prospect_id       TEXT,
                action            TEXT,
                provider          TEXT,
                model             TEXT,
                requested_model   TEXT,
                downgraded_from   TEXT,
                tokens_prompt     INTEGER NOT NULL DEFAULT 0,
                tokens_completion INTEGER NOT NULL DEFAULT 0,
                tokens_total      INTEGER NOT NULL DEFAULT 0,
                cost_usd          REAL,            -- NULL: no known price for the model
                status            INTEGER,
                error_type        TEXT,
                latency_ms        INTEGER,
                ttfb_ms           INTEGER,
                streamed          INTEGER NOT NULL DEFAULT 0,
                energy_cost       INTEGER NOT NULL DEFAULT 0,
                cache_hit         INTEGER NOT NULL DEFAULT 0,
                retries           INTEGER NOT NULL DEFAULT 0,
                usage_estimated   INTEGER NOT NULL DEFAULT 0,
                created_at        TEXT NOT NULL   -- ISO-8601 UTC, e.g. 2024-05-01T12:00:00.000000Z
            )""",
            "CREATE INDEX ai_usage_logs_created ON ai_usage_logs (created_at)",
            """CREATE INDEX ai_usage_logs_workspace_created
               ON ai_usage_logs (workspace_id, created_at)""",
        ],
    ),
    (
        2,  # token classes and the unit prices a row was priced with (gateway/usage.py)
        [
            "ALTER TABLE ai_usage_logs ADD COLUMN tokens_cached INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN tokens_cache_write INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN tokens_reasoning INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN tokens_audio_in INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN tokens_audio_out INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN unit_prices TEXT",  # JSON: USD per million tokens
        ],
    ),
    (
        3,  # reports from the hourly rollup (gateway/store/rollup.py), kept by a trigger
        [
            *usage_rollup.all_tables_ddl("sqlite", usage_rollup.as_of(3)),
            "CREATE INDEX ai_usage_logs_user_created ON ai_usage_logs (user_id, created_at)",
            "CREATE INDEX energy_ledger_refunds ON energy_ledger (created_at) WHERE kind = 'refund'",
            *usage_rollup.backfill("sqlite", families=usage_rollup.as_of(3)),
            ROLLUP_TRIGGER,
        ],
    ),
    (
        4,  # A/B experiments (plugins/experiments.py) and feedback (gateway/feedback.py)
        [
            "ALTER TABLE ai_usage_logs ADD COLUMN experiment TEXT",
            "ALTER TABLE ai_usage_logs ADD COLUMN variant TEXT",
            "CREATE INDEX ai_usage_logs_experiment ON ai_usage_logs (experiment, variant)"
            " WHERE experiment IS NOT NULL",
            """CREATE TABLE feedback (
                request_id TEXT NOT NULL,
                metric     TEXT NOT NULL,
                user_id    TEXT NOT NULL,
                value      REAL NOT NULL,
                created_at REAL NOT NULL,
                PRIMARY KEY (request_id, metric)
            )""",
        ],
    ),
    # PostgreSQL's gw_reserve function (one call per loop turn of reservations); here the
    # loop's own connection already groups them (_write_inline): nothing to install.
    (5, []),
    (6, []),  # PostgreSQL's gw_finish (a refund or partial settlement in one call)
    (
        7,  # USD saved by the response cache: a hit's would-be cost, per row and in the rollups
        [
            "ALTER TABLE ai_usage_logs ADD COLUMN saved_usd REAL",  # NULL: not a hit, or unpriced
            *usage_rollup.add_measure_ddl("sqlite", "saved_usd"),
        ],
    ),
    (
        8,  # stored Responses API responses: whose they are, on which upstream (gateway/inbound/responses.py)
        [
            """CREATE TABLE stored_responses (
                response_id  TEXT PRIMARY KEY,
                user_id      TEXT NOT NULL,
                workspace_id TEXT NOT NULL,
                model        TEXT NOT NULL,
                upstream     TEXT NOT NULL,
                created_at   REAL NOT NULL
            )""",
        ],
    ),
    (9, []),  # PostgreSQL's gw_reserve, rewritten to write less (same outcomes)
    (
        # USD exact (gateway/money.py): cost_usd and saved_usd become INTEGER nano-dollars, in
        # the rows and the rollups (usage_rollup.EXACT_USD_IN). Every row is kept: each float
        # is converted by the money rule (gw_usd_nano, registered by _migrate). SQLite cannot
        # change a column's type: a new column takes the old one's place (the table is rewritten).
        usage_rollup.EXACT_USD_IN,
        [
            "DROP TRIGGER IF EXISTS ai_usage_logs_rollup",  # a new file's, from migration 3: reads cost_usd
            *(sql for column in ("cost_usd", "saved_usd") for sql in _exact_usd("ai_usage_logs", column, None)),
            *(sql for table, column in usage_rollup.usd_columns() for sql in _exact_usd(table, column, 0)),
        ],
    ),
    (
        11,  # upstream calls whose answers were discarded (a lost overlapped reservation): per row and rolled up
        [
            "ALTER TABLE ai_usage_logs ADD COLUMN unbilled_calls INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN unbilled_tokens INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE ai_usage_logs ADD COLUMN unbilled_cost_usd INTEGER",  # nano-USD; NULL: none, or unpriced
            *usage_rollup.add_measure_ddl("sqlite", "unbilled_calls"),
            *usage_rollup.add_measure_ddl("sqlite", "unbilled_cost_usd"),
        ],
    ),
    (
        12,  # per-key controls (docs/admin.md "Per-key controls")
        [
            "ALTER TABLE api_keys ADD COLUMN label TEXT",
            "ALTER TABLE api_keys ADD COLUMN expires_at REAL",
            "ALTER TABLE api_keys ADD COLUMN models TEXT",  # JSON list of model names; NULL: the tier's
            "ALTER TABLE api_keys ADD COLUMN rpm INTEGER",
            "ALTER TABLE api_keys ADD COLUMN tpm INTEGER",
        ],
    ),
    (
        13,  # the change counter every gateway process polls (gateway/change_feed.py)
        [
            "CREATE TABLE gw_changes (id INTEGER PRIMARY KEY CHECK (id = 1), counter INTEGER NOT NULL)",
            "INSERT INTO gw_changes (id, counter) VALUES (1, 0)",
        ],
    ),
    (
        14,  # the audit log of admin actions: append-only, the triggers refuse any change (docs/admin.md)
        [
            """CREATE TABLE audit_log (
                id               INTEGER PRIMARY KEY AUTOINCREMENT,
                created_at       REAL NOT NULL,
                actor            TEXT NOT NULL,
                actor_key_id     TEXT,
                actor_key_prefix TEXT,
                via              TEXT NOT NULL,
                action           TEXT NOT NULL,
                target           TEXT,
                workspace_id     TEXT,
                before           TEXT,
                after            TEXT,
                request_id       TEXT
            )""",
            "CREATE INDEX audit_log_time ON audit_log (created_at)",
            "CREATE INDEX audit_log_workspace ON audit_log (workspace_id, created_at)",
            "CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
            "CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log"
            " BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END",
        ],
    ),
    (
        15,  # the alerts outbox (gateway/alerts.py): one row per event and endpoint, delivered until acknowledged
        [
            """CREATE TABLE alert_outbox (
                id              INTEGER PRIMARY KEY AUTOINCREMENT,
                event_id        TEXT NOT NULL,
                endpoint        TEXT NOT NULL,
                event_type      TEXT NOT NULL,
                workspace_id    TEXT,
                payload         TEXT NOT NULL,
                status          TEXT NOT NULL DEFAULT 'pending',
                attempts        INTEGER NOT NULL DEFAULT 0,
                next_attempt_at REAL NOT NULL,
                lease_owner     TEXT,
                lease_until     REAL,
                last_status     INTEGER,
                last_error      TEXT,
                created_at      REAL NOT NULL,
                delivered_at    REAL,
                UNIQUE (event_id, endpoint)
            )""",
            "CREATE INDEX alert_outbox_due ON alert_outbox (status, next_attempt_at)",
            "CREATE INDEX alert_outbox_workspace ON alert_outbox (workspace_id, created_at)",
        ],
    ),
    (
        16,  # end users by the app's own ids (docs/admin.md "End users by your app's ids")
        [
            "ALTER TABLE api_keys ADD COLUMN service INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE users ADD COLUMN external_id TEXT",
            # One user per app id and workspace: what makes find-or-create happen once.
            "CREATE UNIQUE INDEX users_external_id ON users (workspace_id, external_id) WHERE external_id IS NOT NULL",
        ],
    ),
    (
        17,  # budgets (gateway/budgets.py, docs/budgets.md): new tables only, nothing rewritten
        [
            """CREATE TABLE budgets (
                id           TEXT PRIMARY KEY,
                workspace_id TEXT NOT NULL,
                scope        TEXT NOT NULL,      -- workspace | user | key
                scope_id     TEXT NOT NULL,
                unit         TEXT NOT NULL,      -- energy | usd (nano-dollars)
                amount       INTEGER NOT NULL,
                period       TEXT NOT NULL,      -- day | week | month | life
                timezone     TEXT NOT NULL,
                alerts       TEXT NOT NULL,      -- JSON list of percentages
                hard         TEXT NOT NULL,      -- refuse | downgrade | none
                created_at   REAL NOT NULL,
                updated_at   REAL NOT NULL,
                UNIQUE (scope, scope_id, unit, period)
            )""",
            "CREATE INDEX budgets_workspace ON budgets (workspace_id)",
            # What a budget spent in one period (held reservations included).
            """CREATE TABLE budget_spend (
                budget_id    TEXT NOT NULL,
                period_start REAL NOT NULL,
                spent        INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (budget_id, period_start)
            )""",
            # One row per reservation and budget: finished with its reservation, once.
            """CREATE TABLE budget_holds (
                request_id   TEXT NOT NULL,
                budget_id    TEXT NOT NULL,
                period_start REAL NOT NULL,
                unit         TEXT NOT NULL,
                amount       INTEGER NOT NULL,
                final_amount INTEGER,
                status       TEXT NOT NULL DEFAULT 'reserved',
                created_at   REAL NOT NULL,
                PRIMARY KEY (request_id, budget_id)
            )""",
            "CREATE INDEX budget_holds_open ON budget_holds (created_at) WHERE status = 'reserved'",
        ],
    ),
    (
        usage_rollup.HIST_IN,  # 18: the fine latency histogram (gateway/store/rollup.py), kept from the next row on
        [
            *usage_rollup.hist_ddl("sqlite"),
            # No history read here: the rows below live_from_id are the latency_histogram
            # backfill's (gateway/store/backfill.py, registered with migration 20).
            f"INSERT INTO {usage_rollup.HIST_COVERAGE} (id, live_from_id, started_at)"
            " SELECT 1, COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'ai_usage_logs'), 0) + 1,"
            " (julianday('now') - 2440587.5) * 86400.0",
        ],
    ),
    (
        19,  # files and batches: whose each is, on which upstream; a batch's lease and settlement (gateway/batches.py)
        [
            """CREATE TABLE gw_files (
                file_id      TEXT PRIMARY KEY,
                user_id      TEXT NOT NULL,
                workspace_id TEXT NOT NULL,
                purpose      TEXT NOT NULL,
                filename     TEXT,
                bytes        INTEGER,
                upstream     TEXT NOT NULL,
                model        TEXT NOT NULL,
                batch_id     TEXT,           -- a batch's output or error file: served rewritten
                created_at   REAL NOT NULL
            )""",
            "CREATE INDEX gw_files_user ON gw_files (user_id, created_at)",
            """CREATE TABLE gw_batches (
                id              TEXT PRIMARY KEY,   -- the gateway's: its energy reservation's request_id
                batch_id        TEXT UNIQUE,        -- the upstream's, once created
                user_id         TEXT NOT NULL,
                workspace_id    TEXT NOT NULL,
                model           TEXT NOT NULL,
                upstream        TEXT NOT NULL,
                endpoint        TEXT NOT NULL,
                input_file_id   TEXT NOT NULL,
                action          TEXT NOT NULL,
                energy_per_line INTEGER NOT NULL,
                status          TEXT NOT NULL,
                payload         TEXT,               -- the upstream's last batch object (JSON)
                lines           TEXT NOT NULL,      -- JSON: the input's custom_ids
                next_poll_at    REAL NOT NULL,
                lease_owner     TEXT,
                lease_until     REAL,
                settled_at      REAL,
                created_at      REAL NOT NULL
            )""",
            "CREATE INDEX gw_batches_user ON gw_batches (user_id, created_at)",
            "CREATE INDEX gw_batches_due ON gw_batches (next_poll_at) WHERE settled_at IS NULL",
        ],
    ),
    (
        20,  # background backfills (gateway/store/backfill.py): progress per backfill, with its chunks' writes
        [
            """CREATE TABLE gw_backfills (
                name          TEXT PRIMARY KEY,
                migration     INTEGER NOT NULL,
                lo            INTEGER NOT NULL,
                hi            INTEGER NOT NULL,
                next_id       INTEGER NOT NULL,
                done_rows     INTEGER NOT NULL DEFAULT 0,
                covered_since REAL,
                lease_owner   TEXT,
                lease_until   REAL,
                registered_at REAL NOT NULL,
                started_at    REAL,
                finished_at   REAL
            )""",
        ],
    ),
    (
        21,  # the usage spool (Store.spool_usage): rows refused until a shutdown, for a later process to write
        ["CREATE TABLE gw_usage_spool (id INTEGER PRIMARY KEY, row TEXT NOT NULL, spooled_at REAL NOT NULL)"],
    ),
    (
        22,  # dashboard sign-in (gateway/admin/oidc.py): sessions by the hash of their id, pending logins
        [
            """CREATE TABLE dashboard_sessions (
                id_hash      TEXT PRIMARY KEY,
                subject      TEXT NOT NULL,
                email        TEXT,
                role         TEXT NOT NULL,
                workspace_id TEXT,
                created_at   REAL NOT NULL,
                expires_at   REAL NOT NULL
            )""",
            "CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at)",
            """CREATE TABLE oidc_logins (
                state_hash    TEXT PRIMARY KEY,
                browser_hash  TEXT NOT NULL,
                nonce         TEXT NOT NULL,
                code_verifier TEXT NOT NULL,
                redirect_uri  TEXT NOT NULL,
                created_at    REAL NOT NULL,
                expires_at    REAL NOT NULL
            )""",
            "CREATE INDEX oidc_logins_expiry ON oidc_logins (expires_at)",
            "ALTER TABLE audit_log ADD COLUMN actor_subject TEXT",
            "ALTER TABLE audit_log ADD COLUMN actor_email TEXT",
        ],
    ),
]
USAGE_PRUNE_CHUNK = 2000  # raw rows deleted per transaction by prune_usage

_USER_COLS = "id, workspace_id, name, tier, energy, refilled_at, created_at, disabled, external_id"
_KEY_COLS = ("id, user_id, workspace_id, prefix, role, created_at, revoked_at, label, expires_at, models, rpm, tpm,"
             " service")
_LEDGER_COLS = "id, user_id, request_id, kind, amount, balance_after, reason, created_at"
_WORKSPACE_COLS = "id, name, profile, ai_settings, created_at"
_OUTBOX_CLAIMED = ", ".join(OUTBOX_CLAIMED)
_USAGE_BOOLS = [n for n, k in USAGE_COLUMNS.items() if k == "bool"]
_USAGE_USD = [n for n, k in USAGE_COLUMNS.items() if k == "usd"]  # stored as INTEGER nano-dollars
_USAGE_INSERT = (
    f"INSERT INTO ai_usage_logs ({', '.join(USAGE_COLUMNS)})"
    f" VALUES ({', '.join('?' for _ in USAGE_COLUMNS)}) ON CONFLICT (request_id) DO NOTHING"
)


def _workspace(r: tuple) -> Workspace:
    return Workspace(r[0], r[1], json.loads(r[2]), json.loads(r[3]), r[4])


def _user(r: tuple) -> User:
    return User(r[0], r[1], r[2], r[3], r[4], r[5], r[6], bool(r[7]), r[8])


def _key(r: tuple) -> ApiKey:
    return ApiKey(*r[:9], stored_key_models(r[9]), r[10], r[11], bool(r[12]))


def _entry(r: tuple) -> EnergyEntry:
    return EnergyEntry(*r)


def _one(db: sqlite3.Connection, sql: str, *args: Any) -> tuple | None:
    return db.execute(sql, args).fetchone()


def _ledger_row(db, user_id, request_id, kind, amount, balance_after, reason, now) -> None:
    db.execute(
        "INSERT INTO energy_ledger"
        " (user_id, request_id, kind, amount, balance_after, reason, created_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (user_id, request_id, kind, amount, balance_after, reason, now),
    )


def _connect(path: str, *, busy_timeout_ms: int = BUSY_TIMEOUT_MS, autocheckpoint: bool = True,
             set_wal: bool = True) -> sqlite3.Connection:
    """A connection with our settings. `set_wal`: switch the file to WAL (the first
    connection of a store does; WAL then stays the file's mode for every connection)."""
    db = sqlite3.connect(path, isolation_level=None, timeout=busy_timeout_ms / 1000, check_same_thread=False)
    try:
        # busy_timeout first: switching to WAL itself needs a lock another process may hold.
        db.execute(f"PRAGMA busy_timeout = {busy_timeout_ms}")
        if set_wal:
            _set_wal(db)
        db.execute(f"PRAGMA synchronous = {SYNCHRONOUS}")
        db.execute("PRAGMA foreign_keys = ON")
        _math_functions(db)
        if not autocheckpoint:
            db.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        db.close()
        raise
    return db


def _math_functions(db: sqlite3.Connection) -> None:
    """ln() and ceil() for the fine latency histogram's buckets: SQLite's own where it was
    built with its math functions (Debian's and python.org's are), Python's otherwise."""
    try:
        db.execute("SELECT ln(2), ceil(0.5)")
    except sqlite3.OperationalError:
        db.create_function("ln", 1, lambda v: None if v is None else math.log(v), deterministic=True)
        db.create_function("ceil", 1, lambda v: None if v is None else math.ceil(v), deterministic=True)


RESTART_FRAMES = 1000  # WAL frames (pages) worth starting the WAL over for (SQLite's own default)
RESTART_EVERY = 5.0  # seconds: start it over at least this often when there is anything in it


class _Checkpointer:
    """Copies the WAL back into the database file every `interval` seconds, on its own
    connection and thread. SQLite would otherwise checkpoint inside some COMMIT of ours,
    fsync included (milliseconds to tens of milliseconds on this VM), stalling the loop
    (the loop's connection) or every write queued behind it (the database thread)."""

    def __init__(self, path: str, interval: float = 0.5) -> None:
        self.path = path
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sqlite-checkpoint:{path}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        db = _connect(self.path, autocheckpoint=False, set_wal=False)
        last_restart = time.monotonic()
        try:
            while not self._stop.wait(self.interval):
                try:
                    busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    if busy or frames <= 0 or copied != frames:
                        continue
                    if frames >= RESTART_FRAMES or time.monotonic() - last_restart >= RESTART_EVERY:
                        # The whole WAL is in the database file: the next write starts it over
                        # and syncs its header (an fsync). Make that write here, so the fsync
                        # never lands on the loop's connection. user_version is otherwise unused.
                        version = db.execute("PRAGMA user_version").fetchone()[0]
                        db.execute(f"PRAGMA user_version = {(version + 1) % 2**31}")
                        last_restart = time.monotonic()
                except sqlite3.Error:
                    pass  # busy or a transient I/O error: the next round tries again
            db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()  # leave a short WAL behind
        except sqlite3.Error:
            pass
        finally:
            db.close()


_NOT_STARTED: list = []  # _run_writes: the transaction could not begin (file locked)


def _set_wal(db: sqlite3.Connection) -> None:
    # Switching a new file to WAL needs an exclusive lock, for which SQLite does not always
    # call the busy handler (two processes opening a new file at once): retry a while.
    for attempt in range(100):
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or attempt == 99:
                raise
            time.sleep(0.05)


def _in_memory(path: str) -> bool:
    return path == ":memory:" or path.startswith("file::memory:") or "mode=memory" in path


def _is_busy(exc: BaseException | None) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))


def _rollback_quietly(db: sqlite3.Connection) -> None:
    """Undo an open transaction after a failure; a failing ROLLBACK adds nothing to report."""
    if db.in_transaction:
        try:
            db.execute("ROLLBACK")
        except sqlite3.Error:
            pass


def _map_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        msg = str(exc)
        if "UNIQUE" in msg:
            return StoreConflict(msg)
        if "FOREIGN KEY" in msg:
            return NotFound(msg)
    return exc  # CHECK / NOT NULL: a bug, raised as is


# ------------------------------------------------------------- the database thread

# A queued operation: (function run on the thread as fn(db, *args), its args, is_write,
# the caller's loop, the caller's future). The stop marker has fn=None.
_Job = tuple[Callable[..., Any] | None, tuple, bool, asyncio.AbstractEventLoop, asyncio.Future]


def _resolve(outcomes: list[tuple[asyncio.Future, Any, BaseException | None]]) -> None:
    """Runs on the caller's loop: hand each operation its own result or exception."""
    for fut, result, exc in outcomes:
        if fut.done():  # the caller was cancelled; the operation ran anyway
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


def _deliver(outcomes: list[tuple[_Job, Any, BaseException | None]]) -> None:
    """From the database thread: one wake-up per event loop for a whole group."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for job, result, exc in outcomes:
        by_loop.setdefault(job[3], []).append((job[4], result, exc))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:
            pass  # that loop is closed: nobody is waiting any more


class _Database:
    """One sqlite3 connection and the one thread allowed to use it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name=f"sqlite-store:{path}",
                                       daemon=True)
        self._ready: tuple[asyncio.AbstractEventLoop, asyncio.Future] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = (loop, loop.create_future())
        self.thread.start()
        await self._ready[1]

    def submit(self, fn: Callable[..., Any], args: tuple, write: bool) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((fn, args, write, loop, fut))
        return fut

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.jobs.put((None, (), True, loop, fut))
        await asyncio.shield(fut)

    # ---- everything below runs on the database thread

    def _connect(self) -> sqlite3.Connection:
        return _connect(self.path)

    def _serve(self) -> None:
        loop, ready = self._ready
        try:
            db = self._connect()
        except BaseException as exc:
            loop.call_soon_threadsafe(_resolve, [(ready, None, exc)])
            return
        loop.call_soon_threadsafe(_resolve, [(ready, None, None)])
        stop: _Job | None = None
        try:
            while stop is None:
                group = [self.jobs.get()]
                while len(group) < MAX_GROUP and group[-1][0] is not None:
                    try:
                        group.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
                if group[-1][0] is None:
                    stop = group.pop()
                try:
                    self._run_group(db, group)
                except Exception as exc:  # a bug here must not strand the callers
                    _deliver([(job, None, exc) for job in group])
        finally:
            db.close()
            # Anything queued after the stop marker (a call racing close()) fails cleanly.
            late = []
            while True:
                try:
                    late.append((self.jobs.get_nowait(), None, RuntimeError("store is closed")))
                except queue.Empty:
                    break
            if stop is not None:
                late.append((stop, None, None))
            _deliver(late)

    def _run_group(self, db: sqlite3.Connection, group: list[_Job]) -> None:
        reads = [job for job in group if not job[2]]
        writes = [job for job in group if job[2]]
        if reads:
            _deliver([self._run_read(db, job) for job in reads])
        if writes:
            _deliver(self._run_writes(db, writes))

    @staticmethod
    def _run_read(db: sqlite3.Connection, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        try:
            return job, job[0](db, *job[1]), None
        except Exception as exc:
            return job, None, _map_error(exc)

    @staticmethod
    def _run_writes(db: sqlite3.Connection, writes: list[_Job], busy: list | None = None) -> list:
        """All `writes` in one BEGIN IMMEDIATE ... COMMIT, each in its own savepoint.
        With `busy` given, a BEGIN that finds the file locked returns `busy` instead:
        nothing ran, the caller may take the writes elsewhere."""
        try:
            db.execute("BEGIN IMMEDIATE")
        except Exception as exc:  # e.g. busy_timeout exceeded: nothing ran
            if busy is not None and _is_busy(exc):
                return busy
            return [(job, None, exc) for job in writes]
        if len(writes) == 1:  # alone in its transaction: no savepoint needed to undo it alone
            job = writes[0]
            try:
                result = job[0](db, *job[1])
                db.execute("COMMIT")
            except Exception as exc:
                _rollback_quietly(db)
                return [(job, None, _map_error(exc))]
            return [(job, result, None)]
        outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            for job in writes:
                db.execute("SAVEPOINT op")
                try:
                    result = job[0](db, *job[1])
                except Exception as exc:
                    # Undo this operation only; the group's earlier ones stay.
                    db.execute("ROLLBACK TO op")
                    db.execute("RELEASE op")
                    outcomes.append((job, None, _map_error(exc)))
                else:
                    db.execute("RELEASE op")
                    outcomes.append((job, result, None))
            db.execute("COMMIT")
        except Exception as exc:
            # The transaction itself failed (disk full, I/O error, COMMIT refused, ...):
            # nothing of the group is stored, so no operation may report success.
            _rollback_quietly(db)
            failed = {id(job): e for job, _, e in outcomes if e is not None}
            return [(job, None, failed.get(id(job), exc)) for job in writes]
        return outcomes


class _ReportReader:
    """Admin reads (reports, /admin/metrics) on a connection and thread of their own: a
    report's seconds of SQL never queue a reservation behind them on the store thread, and
    sqlite3 releases the GIL while a statement runs, so the event loop keeps serving. WAL
    lets it read while the other connections write."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"sqlite-reports:{path}")
        self._db: sqlite3.Connection | None = None

    def _call(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._db is None:
            self._db = _connect(self.path, autocheckpoint=False, set_wal=False)
            self._db.execute("PRAGMA query_only = ON")
        return fn(self._db)

    async def run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._call, fn)

    async def stop(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)


# ----------------------------------------------------------------------- the Store


class SQLiteStore(Store):
    schema_known: tuple[int, ...] = tuple(v for v, _ in MIGRATIONS)
    def __init__(self, path: str, *, url: str | None = None, loop_writes: bool = True) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self.loop_writes = loop_writes  # reservations on the loop's thread (module docstring)
        self._database: _Database | None = None
        # The loop-thread connection for reservations (see the module docstring).
        self._inline: sqlite3.Connection | None = None
        self._inline_loop: asyncio.AbstractEventLoop | None = None
        self._inline_jobs: list[_Job] = []
        self._checkpointer: _Checkpointer | None = None
        self._reports: _ReportReader | None = None
        self.inline_fallbacks = 0  # groups handed to the thread because the file was locked

    # ------------------------------------------------------------------ plumbing

    async def open(self, *, migrate: bool = True) -> None:
        if self._database is not None:
            return
        database = _Database(self.path)
        await database.start()
        self._database = database
        try:
            if migrate:
                await self.migrate()
            if self.loop_writes and not _in_memory(self.path):
                self._inline = _connect(self.path, busy_timeout_ms=0, autocheckpoint=False, set_wal=False)
                self._inline_loop = asyncio.get_running_loop()
                # Checkpoints (with their fsync) move off both working connections.
                await database.submit(lambda db: db.execute("PRAGMA wal_autocheckpoint = 0"), (), False)
                self._checkpointer = _Checkpointer(self.path)
                self._checkpointer.start()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._reports is not None:
            reports, self._reports = self._reports, None
            await reports.stop()
        if self._checkpointer is not None:
            checkpointer, self._checkpointer = self._checkpointer, None
            await asyncio.get_running_loop().run_in_executor(None, checkpointer.stop)
        if self._inline is not None:
            self._run_inline()  # reservations queued this turn run before the connection closes
            inline, self._inline, self._inline_loop = self._inline, None, None
            inline.close()
        if self._database is not None:
            database, self._database = self._database, None
            await database.stop()

    def _write_inline(self, fn: Callable[..., Any], args: tuple) -> asyncio.Future:
        """A write on the loop's connection, grouped with the others of this loop turn;
        on the database thread when that is not possible (see the module docstring)."""
        loop = asyncio.get_running_loop()
        if self._inline is None or loop is not self._inline_loop:
            return self._submit(fn, args, True)
        fut = loop.create_future()
        if not self._inline_jobs:
            loop.call_soon(self._run_inline)
        self._inline_jobs.append((fn, args, True, loop, fut))
        return fut

    def _run_inline(self) -> None:
        jobs, self._inline_jobs = self._inline_jobs, []
        if not jobs:
            return
        if self._inline is None:  # closed meanwhile: the thread (or its "closed" error) has them
            self._hand_to_thread(jobs)
            return
        for start in range(0, len(jobs), MAX_GROUP):
            group = jobs[start:start + MAX_GROUP]
            outcomes = _Database._run_writes(self._inline, group, busy=_NOT_STARTED)
            if outcomes is _NOT_STARTED:  # BEGIN found the file locked: nothing ran
                self.inline_fallbacks += 1
                self._hand_to_thread(group)
                continue
            _resolve([(job[4], result, exc) for job, result, exc in outcomes])

    def _hand_to_thread(self, jobs: list[_Job]) -> None:
        if self._database is None:
            _resolve([(job[4], None, RuntimeError("store is closed")) for job in jobs])
            return
        for job in jobs:
            self._database.jobs.put(job)

    async def ping(self) -> bool:
        try:
            return await self._read(lambda db: _one(db, "SELECT 1")[0]) == 1
        except Exception:
            return False

    def _submit(self, fn: Callable[..., Any], args: tuple, write: bool) -> asyncio.Future:
        if self._database is None:
            raise RuntimeError("store is not open")
        return self._database.submit(fn, args, write)

    async def _write(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(db, *args) on the database thread as one atomic write (see module doc)."""
        return await self._submit(fn, args, True)

    async def _write_chunks(self, tx: Callable[[sqlite3.Connection, list], int], items: list, size: int,
                            *, inline: bool) -> int:
        """A write-behind batch as several short transactions, on the loop's connection
        (a turn of the loop between two) or on the thread (module docstring): the sum of
        what each returns."""
        done = 0
        for start in range(0, len(items), size):
            part = items[start:start + size]
            if not inline:
                done += await self._write(tx, part)
                continue
            if start:
                await asyncio.sleep(0)  # requests first, between two chunks
            done += await self._write_inline(tx, (part,))
        return done

    async def _read(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run fn(db, *args) on the database thread, outside any write transaction."""
        return await self._submit(fn, args, False)

    async def _fetchone(self, sql: str, *args: Any) -> tuple | None:
        return await self._read(_one, sql, *args)

    async def _fetchall(self, sql: str, *args: Any) -> list[tuple]:
        return await self._read(lambda db: db.execute(sql, args).fetchall())

    async def migrate(self) -> list[int]:
        return await self._write(_migrate)

    async def schema_versions(self) -> dict[int, int | None]:
        return await self._read(_schema_versions)

    # ----------------------------------------------------------------- backfills

    async def backfill_states(self):
        return await self._read(_backfill_states)

    async def backfill_step(self, job, owner, rows, *, lease, now=None):
        return await self._write(_backfill_step, job, owner, rows, lease, now_or(now))

    async def spool_usage(self, rows, *, now=None):
        texts = [(orjson.dumps(r, default=json_default).decode(), now_or(now)) for r in rows]
        await self._write(lambda db: db.executemany("INSERT INTO gw_usage_spool (row, spooled_at) VALUES (?, ?)",
                                                    texts))
        return len(texts)

    async def drain_usage_spool(self, limit=500):
        spooled = await self._fetchall("SELECT id, row FROM gw_usage_spool ORDER BY id LIMIT ?", limit)
        if not spooled:
            return 0
        await self.insert_usage([orjson.loads(row) for _, row in spooled])
        ids = [(i,) for i, _ in spooled]
        await self._write(lambda db: db.executemany("DELETE FROM gw_usage_spool WHERE id = ?", ids))
        return len(spooled)

    async def usage_id_rows(self, lo=None, hi=None):
        row = await self._fetchone("SELECT count(*) FROM ai_usage_logs WHERE (?1 IS NULL OR id >= ?1)"
                                   " AND (?2 IS NULL OR id < ?2)", lo, hi)
        return row[0]

    # ---------------------------------------------------------------- workspaces

    async def create_workspace(self, name, profile=None, ai_settings=None, *, now=None):
        check_workspace_name(name)
        ws = Workspace(new_id("ws"), name, dict(profile or {}), dict(ai_settings or {}),
                       now_or(now))

        def tx(db):
            if _one(db, "SELECT 1 FROM workspaces WHERE name = ?", name):
                raise StoreConflict(f"workspace name {name!r} is taken")
            db.execute(
                f"INSERT INTO workspaces ({_WORKSPACE_COLS}) VALUES (?, ?, ?, ?, ?)",
                (ws.id, ws.name, json.dumps(ws.profile), json.dumps(ws.ai_settings),
                 ws.created_at),
            )

        await self._write(tx)
        return ws

    async def get_workspace(self, id_or_name):
        r = await self._fetchone(
            f"SELECT {_WORKSPACE_COLS} FROM workspaces WHERE id = ? OR name = ?",
            id_or_name, id_or_name,
        )
        return None if r is None else _workspace(r)

    async def list_workspaces(self):
        return [_workspace(r) for r in await self._fetchall(
            f"SELECT {_WORKSPACE_COLS} FROM workspaces ORDER BY created_at, id")]

    async def update_workspace(self, workspace_id, profile=None, ai_settings=None):
        def tx(db):
            if not _one(db, "SELECT 1 FROM workspaces WHERE id = ?", workspace_id):
                raise NotFound(f"workspace {workspace_id!r}")
            if profile is not None:
                db.execute("UPDATE workspaces SET profile = ? WHERE id = ?",
                           (json.dumps(profile), workspace_id))
            if ai_settings is not None:
                db.execute("UPDATE workspaces SET ai_settings = ? WHERE id = ?",
                           (json.dumps(ai_settings), workspace_id))
            return _one(db, f"SELECT {_WORKSPACE_COLS} FROM workspaces WHERE id = ?",
                        workspace_id)

        return _workspace(await self._write(tx))

    # --------------------------------------------------------------------- users

    async def create_user(self, workspace_id, tier, *, name=None, energy=0,
                          start_refill_period=False, now=None):
        check_tier(tier)
        check_amount(energy, "energy")
        created_at = now_or(now)
        user = User(new_id("usr"), workspace_id, name, tier, energy,
                    created_at if start_refill_period else None, created_at, False)

        await self._write(_insert_user, user)
        return user

    async def end_user(self, workspace_id, external_id, *, tier, energy, start_refill_period=False, now=None):
        check_tier(tier)
        check_amount(energy, "energy")
        select = f"SELECT {_USER_COLS} FROM users WHERE workspace_id = ? AND external_id = ?"
        found = await self._fetchone(select, workspace_id, external_id)
        if found is not None:
            return _user(found), False
        created_at = now_or(now)
        user = User(new_id("usr"), workspace_id, None, tier, energy,
                    created_at if start_refill_period else None, created_at, False, external_id)

        def tx(db):  # one writer at a time: whoever comes second finds the first's user
            r = _one(db, select, workspace_id, external_id)
            if r is not None:
                return _user(r), False
            _insert_user(db, user)
            return user, True

        return await self._write(tx)

    async def get_user(self, user_id):
        r = await self._fetchone(f"SELECT {_USER_COLS} FROM users WHERE id = ?", user_id)
        return None if r is None else _user(r)

    async def list_users(self, workspace_id=None):
        if workspace_id is None:
            rows = await self._fetchall(f"SELECT {_USER_COLS} FROM users ORDER BY created_at, id")
        else:
            rows = await self._fetchall(
                f"SELECT {_USER_COLS} FROM users WHERE workspace_id = ? ORDER BY created_at, id",
                workspace_id,
            )
        return [_user(r) for r in rows]

    async def _update_user(self, user_id: str, sql: str, *args: Any) -> User:
        def tx(db):
            r = _one(db, f"{sql} WHERE id = ? RETURNING {_USER_COLS}", *args, user_id)
            if r is None:
                raise NotFound(f"user {user_id!r}")
            return r

        return _user(await self._write(tx))

    async def set_tier(self, user_id, tier):
        check_tier(tier)
        return await self._update_user(user_id, "UPDATE users SET tier = ?", tier)

    async def set_user_disabled(self, user_id, disabled):
        return await self._update_user(user_id, "UPDATE users SET disabled = ?",
                                       int(bool(disabled)))

    # ---------------------------------------------------------------------- keys

    async def create_key(self, user_id, role="user", *, service=False, now=None, **controls):
        check_role(role)
        return await self._write(_insert_key, user_id, role, now_or(now), key_control_values(controls), bool(service))

    async def update_key(self, key_id, **controls):
        values = key_control_values(controls)

        def tx(db):
            if values:
                sets = ", ".join(f"{name} = ?" for name in values)
                r = _one(db, f"UPDATE api_keys SET {sets} WHERE id = ? RETURNING {_KEY_COLS}", *values.values(), key_id)
            else:
                r = _one(db, f"SELECT {_KEY_COLS} FROM api_keys WHERE id = ?", key_id)
            if r is None:
                raise NotFound(f"key {key_id!r}")
            return r

        return _key(await self._write(tx))

    async def lookup_key(self, plaintext):
        r = await self._fetchone(
            """SELECT k.id, k.prefix, k.role, k.user_id, k.workspace_id, u.tier, u.disabled,
                      k.revoked_at, k.expires_at, k.models, k.rpm, k.tpm, k.service
                 FROM api_keys k JOIN users u ON u.id = k.user_id
                WHERE k.key_hash = ?""",
            hash_key(plaintext),
        )
        if r is None:
            return None
        return KeyIdentity(r[0], r[1], r[2], r[3], r[4], r[5], bool(r[6]), r[7] is not None,
                           r[8], stored_key_models(r[9]), r[10], r[11], bool(r[12]))

    async def revoke_key(self, key_id, *, now=None):
        now = now_or(now)

        def tx(db):
            r = _one(db, f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
                         f" RETURNING {_KEY_COLS}", now, key_id)
            if r is None:
                raise NotFound(f"key {key_id!r}")
            return r

        return _key(await self._write(tx))

    async def rotate_key(self, key_id, *, now=None):
        now = now_or(now)

        def tx(db):
            old = _one(db, f"SELECT user_id, role, revoked_at, service, {', '.join(KEY_CONTROLS)} FROM api_keys"
                           " WHERE id = ?", key_id)
            if old is None:
                raise NotFound(f"key {key_id!r}")
            if old[2] is not None:
                raise StoreConflict(f"key {key_id!r} is revoked and cannot be rotated")
            db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, key_id))
            return _insert_key(db, old[0], old[1], now, dict(zip(KEY_CONTROLS, old[4:])),  # the same controls
                               bool(old[3]))

        return await self._write(tx)

    async def list_keys(self, user_id=None, workspace_id=None):
        where, args = [], []
        if user_id is not None:
            where.append("user_id = ?")
            args.append(user_id)
        if workspace_id is not None:
            where.append("workspace_id = ?")
            args.append(workspace_id)
        sql = f"SELECT {_KEY_COLS} FROM api_keys"
        if where:
            sql += " WHERE " + " AND ".join(where)
        return [_key(r) for r in await self._fetchall(sql + " ORDER BY created_at, id", *args)]

    # --------------------------------------------------------------------- audit

    async def append_audit(self, entry, *, now=None):
        values = [json.dumps(entry.get(c)) if c in ("before", "after") else entry.get(c) for c in AUDIT_COLUMNS]
        await self._write(lambda db: db.execute(
            f"INSERT INTO audit_log (created_at, {', '.join(AUDIT_COLUMNS)})"
            f" VALUES (?, {', '.join('?' for _ in AUDIT_COLUMNS)})", (now_or(now), *values)))

    async def audit_entries(self, *, workspace_id=None, since=None, limit=100):
        rows = await self._fetchall(
            f"SELECT id, created_at, {', '.join(AUDIT_COLUMNS)} FROM audit_log"
            " WHERE (? IS NULL OR workspace_id = ?) AND (? IS NULL OR created_at >= ?)"
            " ORDER BY id DESC LIMIT ?", workspace_id, workspace_id, since, since, limit)
        out = []
        for r in rows:
            entry = dict(zip(("id", "created_at", *AUDIT_COLUMNS), r))
            entry["before"], entry["after"] = json.loads(entry["before"]), json.loads(entry["after"])
            out.append(entry)
        return out

    # ------------------------------------------------------ dashboard sign-in sessions

    async def create_dashboard_session(self, row):
        def tx(db):
            now = row["created_at"]
            db.execute("DELETE FROM dashboard_sessions WHERE expires_at < ?", (now,))
            db.execute("DELETE FROM oidc_logins WHERE expires_at < ?", (now,))
            db.execute(f"INSERT INTO dashboard_sessions ({', '.join(DASHBOARD_SESSION_COLUMNS)})"
                       f" VALUES ({', '.join('?' for _ in DASHBOARD_SESSION_COLUMNS)})",
                       tuple(row.get(c) for c in DASHBOARD_SESSION_COLUMNS))

        await self._write(tx)

    async def dashboard_session(self, id_hash):
        r = await self._fetchone(
            f"SELECT {', '.join(DASHBOARD_SESSION_COLUMNS)} FROM dashboard_sessions WHERE id_hash = ?", id_hash)
        return None if r is None else dict(zip(DASHBOARD_SESSION_COLUMNS, r))

    async def delete_dashboard_session(self, id_hash):
        return await self._write(
            lambda db: db.execute("DELETE FROM dashboard_sessions WHERE id_hash = ?", (id_hash,)).rowcount > 0)

    async def create_oidc_login(self, row, *, limit=None):
        def tx(db):
            db.execute("DELETE FROM oidc_logins WHERE expires_at < ?", (row["created_at"],))
            if limit is not None and db.execute("SELECT count(*) FROM oidc_logins").fetchone()[0] >= limit:
                return False
            db.execute(f"INSERT INTO oidc_logins ({', '.join(OIDC_LOGIN_COLUMNS)})"
                       f" VALUES ({', '.join('?' for _ in OIDC_LOGIN_COLUMNS)})",
                       tuple(row.get(c) for c in OIDC_LOGIN_COLUMNS))
            return True

        return await self._write(tx)

    async def take_oidc_login(self, state_hash):
        r = await self._write(lambda db: _one(
            db, f"DELETE FROM oidc_logins WHERE state_hash = ? RETURNING {', '.join(OIDC_LOGIN_COLUMNS)}", state_hash))
        return None if r is None else dict(zip(OIDC_LOGIN_COLUMNS, r))

    # -------------------------------------------------------------------- alerts

    async def enqueue_alerts(self, rows, *, now=None):
        now = now_or(now)
        values = [(r["event_id"], r["endpoint"], r["event_type"], r.get("workspace_id"), r["payload"], now, now)
                  for r in rows]

        def tx(db):
            before = db.total_changes
            db.executemany(
                "INSERT INTO alert_outbox (event_id, endpoint, event_type, workspace_id, payload, next_attempt_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (event_id, endpoint) DO NOTHING", values)
            return db.total_changes - before

        return await self._write(tx) if values else 0

    async def claim_alerts(self, owner, *, lease, limit, now=None):
        now = now_or(now)

        def tx(db):
            # BEGIN IMMEDIATE holds the file's write lock: another process's claim waits for
            # this one's commit and then sees the lease.
            rows = db.execute(
                f"SELECT {_OUTBOX_CLAIMED} FROM alert_outbox WHERE status = 'pending' AND next_attempt_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?) ORDER BY id LIMIT ?", (now, now, limit)).fetchall()
            db.executemany("UPDATE alert_outbox SET lease_owner = ?, lease_until = ? WHERE id = ?",
                           [(owner, now + lease, r[0]) for r in rows])
            return [dict(zip(OUTBOX_CLAIMED, r)) for r in rows]

        return await self._write(tx)

    async def finish_alert(self, row_id, owner, *, status, attempts, next_attempt_at, last_status=None,
                           last_error=None, now=None):
        now = now_or(now)

        def tx(db):
            cur = db.execute(
                "UPDATE alert_outbox SET status = ?, attempts = ?, next_attempt_at = ?, last_status = ?,"
                " last_error = ?, delivered_at = ?, lease_owner = NULL, lease_until = NULL"
                " WHERE id = ? AND lease_owner = ? AND status = 'pending'",
                (status, attempts, next_attempt_at, last_status, last_error,
                 now if status == "delivered" else None, row_id, owner))
            return cur.rowcount == 1

        return await self._write(tx)

    async def prune_alerts(self, *, older_than, limit, now=None):
        cutoff = now_or(now) - older_than

        def tx(db):
            # the (status, next_attempt_at) index finds them; LIMIT bounds the write lock
            return db.execute(
                "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox"
                " WHERE status IN ('delivered', 'failed') AND next_attempt_at < ? LIMIT ?)", (cutoff, limit)).rowcount

        return await self._write(tx)

    async def alert_deliveries(self, *, workspace_id=None, status=None, since=None, limit=100, event_id=None):
        rows = await self._fetchall(
            f"SELECT {', '.join(OUTBOX_LISTED)} FROM alert_outbox"
            " WHERE (? IS NULL OR workspace_id = ?) AND (? IS NULL OR status = ?) AND (? IS NULL OR created_at >= ?)"
            " AND (? IS NULL OR event_id = ?) ORDER BY id DESC LIMIT ?",
            workspace_id, workspace_id, status, status, since, since, event_id, event_id, limit)
        return [dict(zip(OUTBOX_LISTED, r)) for r in rows]

    # ------------------------------------------------------------------- changes

    async def publish_change(self, target):
        await self._write(lambda db: db.execute("UPDATE gw_changes SET counter = counter + 1 WHERE id = 1"))

    async def change_counter(self):
        r = await self._fetchone("SELECT counter FROM gw_changes WHERE id = 1")
        return r[0]

    # -------------------------------------------------------------------- energy

    async def balance(self, user_id):
        r = await self._fetchone("SELECT energy FROM users WHERE id = ?", user_id)
        if r is None:
            raise NotFound(f"user {user_id!r}")
        return r[0]

    async def ledger(self, user_id):
        rows = await self._fetchall(
            f"SELECT {_LEDGER_COLS} FROM energy_ledger WHERE user_id = ? ORDER BY id", user_id
        )
        return [_entry(r) for r in rows]

    async def reserve_energy(self, user_id, amount, request_id, *, refill=None, now=None, budgets=()):
        return await self.reserve_energy_soon(user_id, amount, request_id, refill=refill, now=now, budgets=budgets)

    def reserve_energy_soon(self, user_id, amount, request_id, *, refill=None, now=None, budgets=()):
        # The loop's own connection, at the end of this loop turn: awaited before dispatch,
        # no thread hop; overlapped with the upstream call, it runs right after the request
        # went out (the handler's first wait), while the upstream works.
        check_amount(amount)
        if budgets:
            for hold in budgets:
                check_amount(hold.amount, "budget hold")
            return self._write_inline(_reserve_with_budgets, (user_id, amount, request_id, refill, now_or(now),
                                                              tuple(budgets)))
        return self._write_inline(_reserve, (user_id, amount, request_id, refill, now_or(now)))

    async def settle_energy(self, request_id, final_amount=None, *, usd_final=None, now=None):
        if final_amount is not None:
            check_amount(final_amount, "final_amount")
        return await self._write(_finish_reservation, request_id, "settled", final_amount,
                                 "settle", None, now_or(now), usd_final)

    async def refund_energy(self, request_id, reason=None, *, now=None):
        return await self._write(_finish_reservation, request_id, "refunded", None, "refund",
                                 reason, now_or(now))

    async def settle_many(self, request_ids, *, now=None):
        if not request_ids:
            return 0
        now = now_or(now)
        usd = {item[0]: item[1] for item in request_ids if isinstance(item, tuple)}
        request_ids = [item[0] if isinstance(item, tuple) else item for item in request_ids]
        # executemany: the per-id loop runs in C. The ledger rows first, while the
        # reservations are still 'reserved' (that condition is what makes it once only),
        # so an id must appear once in the batch.
        ledger = [(now, request_id) for request_id in dict.fromkeys(request_ids)]

        def tx(db, part):
            _finish_holds(db, [request_id for _, request_id in part], "settled", None, usd)
            db.executemany(_SETTLE_LEDGER, part)
            before = db.total_changes
            db.executemany(_SETTLE_FULL, part)
            return db.total_changes - before

        return await self._write_chunks(tx, ledger, SETTLE_CHUNK, inline=True)

    async def grant_energy(self, user_id, amount, *, kind="grant", reason=None, now=None):
        check_grant(amount, kind)
        now = now_or(now)

        def tx(db):
            u = _one(db, "SELECT energy FROM users WHERE id = ?", user_id)
            if u is None:
                raise NotFound(f"user {user_id!r}")
            balance = u[0] + amount
            if balance < 0:
                raise InsufficientEnergy(f"user {user_id!r} has {u[0]}, cannot adjust by {amount}")
            db.execute("UPDATE users SET energy = ? WHERE id = ?", (balance, user_id))
            _ledger_row(db, user_id, None, kind, amount, balance, reason, now)
            return balance

        return await self._write(tx)

    # ------------------------------------------------------------------- budgets

    async def set_budget(self, *, workspace_id, scope, scope_id, unit, amount, period, timezone, alerts, hard,
                         now=None):
        now = now_or(now)
        alerts_json = json.dumps(sorted(set(alerts)))

        def tx(db):
            row = _one(db, f"SELECT {', '.join(BUDGET_COLUMNS)} FROM budgets"
                           " WHERE scope = ? AND scope_id = ? AND unit = ? AND period = ?", scope, scope_id, unit, period)
            before = None if row is None else budget_row(row)
            if before is None:
                budget_id = new_id("bud")
                db.execute(f"INSERT INTO budgets ({', '.join(BUDGET_COLUMNS)}) VALUES ({', '.join('?' * len(BUDGET_COLUMNS))})",
                           (budget_id, workspace_id, scope, scope_id, unit, amount, period, timezone, alerts_json, hard,
                            now, now))
            else:
                budget_id = before.id
                db.execute("UPDATE budgets SET amount = ?, timezone = ?, alerts = ?, hard = ?, updated_at = ?"
                           " WHERE id = ?", (amount, timezone, alerts_json, hard, now, budget_id))
            after = budget_row(_one(db, f"SELECT {', '.join(BUDGET_COLUMNS)} FROM budgets WHERE id = ?", budget_id))
            return before, after

        return await self._write(tx)

    async def delete_budget(self, budget_id):
        def tx(db):
            row = _one(db, f"SELECT {', '.join(BUDGET_COLUMNS)} FROM budgets WHERE id = ?", budget_id)
            if row is None:
                return None
            db.execute("DELETE FROM budgets WHERE id = ?", (budget_id,))
            db.execute("DELETE FROM budget_spend WHERE budget_id = ?", (budget_id,))
            return budget_row(row)

        return await self._write(tx)

    async def list_budgets(self, workspace_id=None):
        rows = await self._fetchall(
            f"SELECT {', '.join(BUDGET_COLUMNS)} FROM budgets WHERE (? IS NULL OR workspace_id = ?)"
            " ORDER BY workspace_id, scope, scope_id, unit, period", workspace_id, workspace_id)
        return [budget_row(r) for r in rows]

    async def budget_spent(self, periods):
        if not periods:
            return {}

        def read(db):
            out = {}
            for budget_id, start in periods:
                r = _one(db, "SELECT spent FROM budget_spend WHERE budget_id = ? AND period_start = ?", budget_id, start)
                out[(budget_id, start)] = r[0] if r else 0
            return out

        return await self._read(read)

    async def finish_orphan_holds(self, *, now=None):
        def tx(db):
            rows = db.execute(
                "SELECT h.request_id, r.status FROM budget_holds h LEFT JOIN reservations r ON r.request_id = h.request_id"
                " WHERE h.status = 'reserved' AND (r.status IS NULL OR r.status <> 'reserved')").fetchall()
            done = 0
            for status in ("settled", "refunded"):
                ids = [rid for rid, st in rows if (st == "settled") == (status == "settled")]
                done += _finish_holds(db, ids, status, None, {}, open_only=False)
            return done

        return await self._write(tx)

    async def stale_reservations(self, older_than):
        rows = await self._fetchall(
            "SELECT request_id FROM reservations WHERE status = 'reserved' AND created_at <= ?"
            " ORDER BY created_at",
            older_than,
        )
        return [r[0] for r in rows]

    # --------------------------------------------------------------- idempotency

    async def begin_idempotent(self, user_id, key, request_id, *, fingerprint, window,
                               lease=IN_FLIGHT_LEASE, now=None):
        now = now_or(now)

        def tx(db):
            row = _one(
                db,
                "SELECT request_id, fingerprint, status, status_code, body, created_at"
                " FROM idempotency_keys WHERE user_id = ? AND key = ?",
                user_id, key,
            )
            if row is None:
                if not _one(db, "SELECT 1 FROM users WHERE id = ?", user_id):
                    raise NotFound(f"user {user_id!r}")
                db.execute(
                    "INSERT INTO idempotency_keys"
                    " (user_id, key, request_id, fingerprint, status, created_at)"
                    " VALUES (?, ?, ?, ?, 'in_flight', ?)",
                    (user_id, key, request_id, fingerprint, now),
                )
                return IdempotencyState("new", None, None, request_id)
            stored_request, stored_fp, status, status_code, body, created_at = row
            decision = idempotency_decision(
                stored_status=status, stored_fingerprint=stored_fp,
                stored_created_at=created_at, fingerprint=fingerprint, window=window, now=now,
                lease=lease,
            )
            if decision == "reclaim":
                db.execute(
                    "UPDATE idempotency_keys SET request_id = ?, fingerprint = ?,"
                    " status = 'in_flight', status_code = NULL, body = NULL, created_at = ?,"
                    " finished_at = NULL WHERE user_id = ? AND key = ?",
                    (request_id, fingerprint, now, user_id, key),
                )
                return IdempotencyState("new", None, None, request_id)
            if decision == "done":
                return IdempotencyState("done", status_code,
                                        None if body is None else bytes(body), stored_request)
            return IdempotencyState(decision, None, None, stored_request)

        return await self._write(tx)

    async def finish_idempotent(self, user_id, key, status_code, body, *, request_id=None,
                                now=None):
        sql = ("UPDATE idempotency_keys SET status = 'done', status_code = ?, body = ?,"
               " finished_at = ? WHERE user_id = ? AND key = ? AND status = 'in_flight'")
        args: list[Any] = [int(status_code), bytes(body), now_or(now), user_id, key]
        if request_id is not None:
            sql += " AND request_id = ?"
            args.append(request_id)
        return await self._write(lambda db: db.execute(sql, args).rowcount == 1)

    async def release_idempotent(self, user_id, key, *, request_id=None):
        sql = "DELETE FROM idempotency_keys WHERE user_id = ? AND key = ? AND status = 'in_flight'"
        args: list[Any] = [user_id, key]
        if request_id is not None:
            sql += " AND request_id = ?"
            args.append(request_id)
        return await self._write(lambda db: db.execute(sql, args).rowcount == 1)

    # --------------------------------------------------------------------- usage

    async def insert_usage(self, rows, *, now=None):
        def finish(r: dict[str, Any]) -> tuple:
            r["created_at"] = iso_utc(r["created_at"])
            for name in _USAGE_USD:
                if r[name] is not None:
                    r[name] = to_nano(r[name])
            return tuple(r.values())

        values = await prepare_usage_rows(rows, now_or(now), finish)

        def tx(db, part):
            before = db.execute("SELECT COALESCE(MAX(id), 0) FROM ai_usage_logs").fetchone()[0]
            inserted = db.executemany(_USAGE_INSERT, part).rowcount
            if inserted:  # duplicates were skipped by the insert: only new rows are above `before`
                for sql in ROLLUP_SINCE:
                    db.execute(sql, (before,))
            return inserted

        return await self._write_chunks(tx, values, USAGE_CHUNK, inline=False)

    async def usage_rows(self, since=None, workspace_id=None):
        where, args = [], []
        if since is not None:
            where.append("created_at >= ?")
            args.append(iso_utc(since))
        if workspace_id is not None:
            where.append("workspace_id = ?")
            args.append(workspace_id)
        sql = "SELECT * FROM ai_usage_logs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at, id"

        def query(db):
            cur = db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

        out = await self._read(query)
        for d in out:
            d["created_at"] = parse_iso_utc(d["created_at"])
            for name in _USAGE_BOOLS:
                d[name] = bool(d[name])
            for name in _USAGE_USD:
                d[name] = from_nano(d[name])
        return out

    # ------------------------------------------------------------------- reports

    dialect = "sqlite"

    def report_time(self, epoch):
        return iso_utc(epoch)

    def usd(self, stored):
        return from_nano(stored)

    async def record_feedback(self, request_id, user_id, metric, value, *, now=None):
        def tx(db):
            db.execute("INSERT INTO feedback (request_id, metric, user_id, value, created_at) VALUES (?, ?, ?, ?, ?)"
                       " ON CONFLICT (request_id, metric) DO UPDATE SET value = excluded.value,"
                       " created_at = excluded.created_at", (request_id, metric, user_id, float(value), now_or(now)))

        await self._write(tx)

    async def remember_response(self, response_id, user_id, workspace_id, model, upstream, *, now=None):
        def tx(db):
            db.execute("INSERT INTO stored_responses (response_id, user_id, workspace_id, model, upstream, created_at)"
                       " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (response_id) DO NOTHING",
                       (response_id, user_id, workspace_id, model, upstream, now_or(now)))

        await self._write(tx)

    async def stored_response(self, response_id):
        def query(db):
            row = db.execute("SELECT user_id, workspace_id, model, upstream, created_at FROM stored_responses"
                             " WHERE response_id = ?", (response_id,)).fetchone()
            return None if row is None else dict(zip(("user_id", "workspace_id", "model", "upstream", "created_at"),
                                                      row))

        return await self._read(query)

    async def forget_response(self, response_id):
        await self._write(lambda db: db.execute("DELETE FROM stored_responses WHERE response_id = ?", (response_id,)))

    # ------------------------------------------------------------ files and batches

    async def remember_file(self, record):
        values = tuple(record.get(c) for c in FILE_COLUMNS)
        await self._write(lambda db: db.execute(
            f"INSERT INTO gw_files ({', '.join(FILE_COLUMNS)}) VALUES ({', '.join('?' for _ in FILE_COLUMNS)})"
            " ON CONFLICT (file_id) DO NOTHING", values))

    async def stored_file(self, file_id):
        row = await self._fetchone(f"SELECT {', '.join(FILE_COLUMNS)} FROM gw_files WHERE file_id = ?", file_id)
        return None if row is None else dict(zip(FILE_COLUMNS, row))

    async def list_files(self, user_id, *, purpose=None, limit=100, after=None):
        sql, args = f"SELECT {', '.join(FILE_COLUMNS)} FROM gw_files WHERE user_id = ?", [user_id]
        if purpose is not None:
            sql += " AND purpose = ?"
            args.append(purpose)
        if after is not None:
            sql += (" AND (created_at, file_id) < (SELECT created_at, file_id FROM gw_files WHERE file_id = ?"
                    " AND user_id = ?)")
            args += [after, user_id]
        rows = await self._fetchall(sql + " ORDER BY created_at DESC, file_id DESC LIMIT ?", *args, limit)
        return [dict(zip(FILE_COLUMNS, r)) for r in rows]

    async def forget_file(self, file_id):
        await self._write(lambda db: db.execute("DELETE FROM gw_files WHERE file_id = ?", (file_id,)))

    async def insert_batch(self, record, lines):
        columns = [*BATCH_COLUMNS, "lines"]
        values = tuple(record.get(c) for c in BATCH_COLUMNS) + (json.dumps(lines),)

        def tx(db):
            try:
                db.execute(f"INSERT INTO gw_batches ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})",
                           values)
            except sqlite3.IntegrityError as exc:
                raise StoreConflict(str(exc)) from None

        await self._write(tx)

    async def batch_record(self, *, batch_id=None, id=None, with_lines=False):
        columns = [*BATCH_COLUMNS, "lines"] if with_lines else list(BATCH_COLUMNS)
        key, value = ("batch_id", batch_id) if batch_id is not None else ("id", id)
        row = await self._fetchone(f"SELECT {', '.join(columns)} FROM gw_batches WHERE {key} = ?", value)
        if row is None:
            return None
        out = dict(zip(columns, row))
        if with_lines:
            out["lines"] = json.loads(out["lines"])
        return out

    async def list_batches(self, user_id, *, limit=20, after=None, messages=False):
        sql, args = f"SELECT {', '.join(BATCH_COLUMNS)} FROM gw_batches WHERE user_id = ? AND batch_id IS NOT NULL" \
            f" AND endpoint {'=' if messages else '<>'} '/v1/messages'", [user_id]
        if after is not None:
            sql += (" AND (created_at, id) < (SELECT created_at, id FROM gw_batches WHERE batch_id = ?"
                    " AND user_id = ?)")
            args += [after, user_id]
        rows = await self._fetchall(sql + " ORDER BY created_at DESC, id DESC LIMIT ?", *args, limit)
        return [dict(zip(BATCH_COLUMNS, r)) for r in rows]

    async def update_batch(self, id, fields, *, owner=None, unsettled=False):
        unknown = set(fields) - BATCH_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ?" for name in fields)
        sql, args = f"UPDATE gw_batches SET {sets} WHERE id = ?", [*fields.values(), id]
        if owner is not None:
            sql += " AND lease_owner = ?"
            args.append(owner)
        if unsettled:
            sql += " AND settled_at IS NULL"
        return await self._write(lambda db: db.execute(sql, args).rowcount == 1)

    async def claim_batches(self, owner, *, lease, limit, now=None):
        now = now_or(now)

        def tx(db):
            # BEGIN IMMEDIATE holds the file's write lock: another process's claim waits for
            # this one's commit and then sees the lease.
            rows = db.execute(
                f"SELECT {', '.join(BATCH_COLUMNS)} FROM gw_batches WHERE settled_at IS NULL AND next_poll_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_poll_at LIMIT ?",
                (now, now, limit)).fetchall()
            db.executemany("UPDATE gw_batches SET lease_owner = ?, lease_until = ? WHERE id = ?",
                           [(owner, now + lease, r[0]) for r in rows])
            out = [dict(zip(BATCH_COLUMNS, r)) for r in rows]
            for record in out:
                record["lease_owner"], record["lease_until"] = owner, now + lease
            return out

        return await self._write(tx)

    async def report_query(self, sql, args):
        def query(db: sqlite3.Connection) -> list[dict[str, Any]]:
            cur = db.execute(sql, args)
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

        if _in_memory(self.path):  # one database per connection: only the store thread's has the data
            return await self._read(query)
        if self._reports is None:
            self._reports = _ReportReader(self.path)
        return await self._reports.run(query)

    async def backfill_latency_histogram(self, lo, hi):
        def tx(db):
            live = db.execute(f"SELECT live_from_id FROM {usage_rollup.HIST_COVERAGE} WHERE id = 1").fetchone()[0]
            hi_ = min(hi, live)
            if lo >= hi_:
                return 0
            done = db.execute(f"SELECT lo, hi FROM {usage_rollup.HIST_BACKFILLED}").fetchall()
            added = 0
            for a, b in usage_rollup.hist_gaps(lo, hi_, done):
                added += db.execute("SELECT COUNT(*) FROM ai_usage_logs WHERE id >= ? AND id < ?", (a, b)).fetchone()[0]
                for sql in HIST_BACKFILL:
                    db.execute(sql, (a, b))
            replaced, (m_lo, m_hi) = usage_rollup.hist_merge(lo, hi_, done)
            db.executemany(f"DELETE FROM {usage_rollup.HIST_BACKFILLED} WHERE lo = ?", [(a,) for a in replaced])
            db.execute(f"INSERT INTO {usage_rollup.HIST_BACKFILLED} (lo, hi) VALUES (?, ?)", (m_lo, m_hi))
            return added

        return await self._write(tx)

    async def prune_usage(self, before):
        cutoff = iso_utc(before)

        def tx(db):
            return db.execute(
                "DELETE FROM ai_usage_logs WHERE id IN (SELECT id FROM ai_usage_logs WHERE created_at < ?"
                " ORDER BY created_at LIMIT ?)", (cutoff, USAGE_PRUNE_CHUNK)).rowcount

        dropped = 0
        while True:  # short transactions, so reservations queued behind one wait ~ms, not seconds
            n = await self._write(tx)
            dropped += n
            if n < USAGE_PRUNE_CHUNK:
                return dropped
            await asyncio.sleep(0.01)


# ------------------------------------------- transactions (run on the database thread)


def _migrate(db: sqlite3.Connection) -> list[int]:
    db.create_function("gw_usd_nano", 1, lambda v: None if v is None else to_nano(v), deterministic=True)
    db.execute(
        """CREATE TABLE IF NOT EXISTS schema_migrations (
               version    INTEGER PRIMARY KEY,
               applied_at REAL NOT NULL
           )"""
    )
    if "min_code" not in {r[1] for r in db.execute("PRAGMA table_info(schema_migrations)")}:
        # The lowest schema version a gateway must know to serve on it (migrations.MIN_CODE).
        db.execute("ALTER TABLE schema_migrations ADD COLUMN min_code INTEGER")
    done = dict(db.execute("SELECT version, min_code FROM schema_migrations").fetchall())
    migrations.check_compatible(done, migrations.latest(v for v, _ in MIGRATIONS))
    applied: list[int] = []
    for version, statements in MIGRATIONS:
        if version in done:
            continue
        for sql in statements:
            db.execute(sql)
        db.execute("INSERT INTO schema_migrations (version, applied_at, min_code) VALUES (?, ?, ?)",
                   (version, time.time(), migrations.MIN_CODE.get(version)))
        applied.append(version)
    registered = [r[0] for r in db.execute("SELECT name FROM gw_backfills")] if _backfill_table(db) else []
    for job in backfill.to_register(applied, done, registered):  # the history of what these added, for later
        db.execute(backfill.registration_sql("sqlite", job, time.time()))
    db.execute("DROP TRIGGER IF EXISTS ai_usage_logs_rollup")  # insert_usage keeps the rollups (ROLLUP_SINCE)
    return applied


def _schema_versions(db: sqlite3.Connection) -> dict[int, int | None]:
    if _one(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'") is None:
        return {}
    has_min = "min_code" in {r[1] for r in db.execute("PRAGMA table_info(schema_migrations)")}
    return dict(db.execute("SELECT version, " + ("min_code" if has_min else "NULL")
                           + " FROM schema_migrations").fetchall())


def _backfill_table(db: sqlite3.Connection) -> bool:
    return _one(db, "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'gw_backfills'") is not None


def _backfill_states(db: sqlite3.Connection) -> list[dict[str, Any]]:
    if not _backfill_table(db):
        return []
    rows = db.execute(f"SELECT {', '.join(backfill.STATE_COLUMNS)} FROM gw_backfills ORDER BY name").fetchall()
    return [dict(zip(backfill.STATE_COLUMNS, r)) for r in rows]


def _backfill_step(db: sqlite3.Connection, job: Any, owner: str, rows: int, lease: float,
                   now: float) -> dict[str, Any] | None:
    """One chunk and its progress in one transaction (the caller's: a write holds the file)."""
    found = _one(db, f"SELECT {', '.join(backfill.STATE_COLUMNS)} FROM gw_backfills WHERE name = ?", job.name)
    if found is None:
        return None
    state = dict(zip(backfill.STATE_COLUMNS, found))
    if state["finished_at"] is not None:
        return state
    if state["lease_owner"] not in (None, owner) and (state["lease_until"] or 0) > now:
        return None
    hi = state["next_id"]
    lo = max(state["lo"], hi - int(rows))
    for sql in job.chunk("sqlite", lo, hi):
        db.execute(sql)
    count, oldest = _one(db, "SELECT count(*), min(created_at) FROM ai_usage_logs WHERE id >= ? AND id < ?", lo, hi)
    oldest = None if oldest is None else parse_iso_utc(oldest)
    covered = state["covered_since"] if oldest is None else min(oldest, state["covered_since"] or oldest)
    finished = now if lo <= state["lo"] else None
    db.execute("UPDATE gw_backfills SET next_id = ?, done_rows = done_rows + ?, covered_since = ?, lease_owner = ?,"
               " lease_until = ?, started_at = COALESCE(started_at, ?), finished_at = ? WHERE name = ?",
               (lo, count, covered, None if finished else owner, None if finished else now + lease, now, finished,
                job.name))
    return {**state, "next_id": lo, "done_rows": state["done_rows"] + count, "covered_since": covered,
            "lease_owner": None if finished else owner, "lease_until": None if finished else now + lease,
            "started_at": state["started_at"] or now, "finished_at": finished}


def _insert_user(db: sqlite3.Connection, user: User) -> None:
    if not _one(db, "SELECT 1 FROM workspaces WHERE id = ?", user.workspace_id):
        raise NotFound(f"workspace {user.workspace_id!r}")
    db.execute(
        f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?)",
        (user.id, user.workspace_id, user.name, user.tier, user.energy, user.refilled_at, user.created_at,
         user.external_id),
    )
    if user.energy > 0:
        _ledger_row(db, user.id, None, "grant", user.energy, user.energy, "initial energy", user.created_at)


def _insert_key(db: sqlite3.Connection, user_id: str, role: str,
                now: float, controls: dict[str, Any] | None = None, service: bool = False) -> tuple[str, ApiKey]:
    """`controls`: per-key controls as stored (key_control_values)."""
    u = _one(db, "SELECT workspace_id FROM users WHERE id = ?", user_id)
    if u is None:
        raise NotFound(f"user {user_id!r}")
    plaintext, digest, prefix = new_api_key()
    values = [(controls or {}).get(name) for name in KEY_CONTROLS]
    key_id = new_id("key")
    db.execute(
        "INSERT INTO api_keys (id, user_id, workspace_id, key_hash, prefix, role, created_at, service,"
        f" {', '.join(KEY_CONTROLS)}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, {', '.join('?' for _ in KEY_CONTROLS)})",
        (key_id, user_id, u[0], digest, prefix, role, now, int(service), *values),
    )
    return plaintext, _key((key_id, user_id, u[0], prefix, role, now, None, *values, service))


def _reserve(db: sqlite3.Connection, user_id: str, amount: int, request_id: str,
             refill: tuple[int, float] | None, now: float) -> Reservation:
    # One statement for both checks, in this order: unknown user, then duplicate request
    # (a duplicate is a conflict even when the balance could not cover it).
    u = _one(db, "SELECT energy, refilled_at,"
                 " EXISTS (SELECT 1 FROM reservations WHERE request_id = ?)"
                 " FROM users WHERE id = ?", request_id, user_id)
    if u is None:
        raise NotFound(f"user {user_id!r}")
    if u[2]:
        raise StoreConflict(f"request {request_id!r} already has a reservation")
    r = compute_refill(u[0], u[1], refill, now)
    balance = r.balance
    if r.due:
        db.execute("UPDATE users SET energy = ?, refilled_at = ? WHERE id = ?",
                   (balance, r.refilled_at, user_id))
        if r.delta > 0:
            _ledger_row(db, user_id, None, "refill", r.delta, balance, None, now)
    if balance < amount:
        return Reservation(False, balance, r.delta)  # the refill (if any) is kept
    balance -= amount
    db.execute("UPDATE users SET energy = ? WHERE id = ?", (balance, user_id))
    _ledger_row(db, user_id, request_id, "reserve", -amount, balance, None, now)
    db.execute(
        "INSERT INTO reservations (request_id, user_id, amount, status, created_at)"
        " VALUES (?, ?, ?, 'reserved', ?)",
        (request_id, user_id, amount, now),
    )
    return Reservation(True, balance, r.delta)


# settle_many: a full settlement gives nothing back, so the balance is unchanged and the
# ledger row (amount 0) records it as it is. Both statements match only open reservations.
_SETTLE_LEDGER = (
    "INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)"
    " SELECT r.user_id, r.request_id, 'settle', 0, u.energy, NULL, ?1"
    " FROM reservations r JOIN users u ON u.id = r.user_id"
    " WHERE r.request_id = ?2 AND r.status = 'reserved'"
)
_SETTLE_FULL = (
    "UPDATE reservations SET status = 'settled', finished_at = ?1, final_amount = amount"
    " WHERE request_id = ?2 AND status = 'reserved'"
)


def _reserve_with_budgets(db: sqlite3.Connection, user_id: str, amount: int, request_id: str,
                          refill: tuple[int, float] | None, now: float, holds: tuple) -> Reservation:
    """_reserve and the budget holds, in one savepoint: the budgets first (each enforced one
    must have room), then the energy; the holds are written only when both passed."""
    spent = []
    for hold in holds:
        r = _one(db, "SELECT spent FROM budget_spend WHERE budget_id = ? AND period_start = ?",
                 hold.budget_id, hold.period_start)
        current = r[0] if r else 0
        if hold.enforce and current + hold.amount > hold.limit:
            u = _one(db, "SELECT energy FROM users WHERE id = ?", user_id)
            if u is None:
                raise NotFound(f"user {user_id!r}")
            return Reservation(False, u[0], 0, budget_refused=hold.budget_id)
        spent.append(current)
    result = _reserve(db, user_id, amount, request_id, refill, now)
    if not result.ok:
        return result
    after = []
    for hold, current in zip(holds, spent):
        db.execute("INSERT INTO budget_spend (budget_id, period_start, spent) VALUES (?, ?, ?)"
                   " ON CONFLICT (budget_id, period_start) DO UPDATE SET spent = spent + excluded.spent",
                   (hold.budget_id, hold.period_start, hold.amount))
        db.execute("INSERT INTO budget_holds (request_id, budget_id, period_start, unit, amount, created_at)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (request_id, hold.budget_id, hold.period_start, hold.unit, hold.amount, now))
        after.append(current + hold.amount)
    return Reservation(True, result.balance, result.refilled, budget_spent=tuple(after))


def _finish_holds(db: sqlite3.Connection, request_ids: list[str], status: str, energy_final: int | None,
                  usd: dict[str, int | None], *, open_only: bool = True) -> int:
    """The budget holds of these requests follow their reservation (before it is finished:
    `open_only`, only those whose reservation is still reserved): refunded, each hold's
    amount leaves its period's spend; settled, an energy hold at `energy_final` (None: as
    held), a USD one at `usd[request_id]` nano-dollars (None or absent: as held)."""
    done = 0
    for request_id in request_ids:
        if open_only and not _one(db, "SELECT 1 FROM reservations WHERE request_id = ? AND status = 'reserved'",
                                  request_id):
            continue
        for budget_id, start, unit, amount in db.execute(
                "SELECT budget_id, period_start, unit, amount FROM budget_holds"
                " WHERE request_id = ? AND status = 'reserved'", (request_id,)).fetchall():
            if status == "refunded":
                final = 0
            elif unit == "usd":
                final = amount if usd.get(request_id) is None else usd[request_id]
            else:
                final = amount if energy_final is None else min(energy_final, amount)
            db.execute("UPDATE budget_holds SET status = ?, final_amount = ? WHERE request_id = ? AND budget_id = ?",
                       (status, final, request_id, budget_id))
            if final != amount:
                db.execute("UPDATE budget_spend SET spent = spent + ? WHERE budget_id = ? AND period_start = ?",
                           (final - amount, budget_id, start))
            done += 1
    return done


def _finish_reservation(db: sqlite3.Connection, request_id: str, status: str,
                        final_amount: int | None, kind: str, reason: str | None,
                        now: float, usd_final: int | None = None) -> int | None:
    """reserved -> settled/refunded, returning `back` energy; None if not reserved. The
    request's budget holds follow in the same transaction (_finish_holds)."""
    _finish_holds(db, [request_id], status, final_amount, {request_id: usd_final})
    # The conditional update is the state machine: only one caller ever sees the row in
    # 'reserved', every later settle/refund finds nothing to do.
    res = _one(db, "UPDATE reservations SET status = ?, finished_at = ?"
                   " WHERE request_id = ? AND status = 'reserved' RETURNING user_id, amount",
               status, now, request_id)
    if res is None:
        return None  # unknown, or already settled/refunded: never twice
    user_id, reserved = res
    back = reserved if status == "refunded" else settlement_return(reserved, final_amount)
    db.execute("UPDATE reservations SET final_amount = ? WHERE request_id = ?",
               (reserved - back, request_id))
    if back > 0:  # refills since the reservation cap what comes back (returned_after_refills)
        (refilled,) = _one(db, _REFILLED_SINCE, user_id, request_id)
        returned = returned_after_refills(back, refilled)
        if returned < back:
            reason = kept_by_refill_reason(reason, back - returned)
        back = returned
    (balance,) = _one(db, "UPDATE users SET energy = energy + ? WHERE id = ? RETURNING energy",
                      back, user_id)
    _ledger_row(db, user_id, request_id, kind, back, balance, reason, now)
    return balance


# Energy the user's refills added after a reservation's `reserve` row (ledger ids are in
# commit order: every write of a user's balance holds the database's write lock).
_REFILLED_SINCE = (
    "SELECT COALESCE(SUM(amount), 0) FROM energy_ledger WHERE user_id = ?1 AND kind = 'refill'"
    " AND id > (SELECT id FROM energy_ledger WHERE request_id = ?2 AND kind = 'reserve')"
)
