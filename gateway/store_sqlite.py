"""SQLite backend: one file shared by every gateway process on one machine.

Why it is built this way:

* One aiosqlite connection per Store, and an asyncio.Lock around every use of it. A
  connection has a single transaction state, so two tasks interleaving statements on it
  would share (and commit or roll back) each other's transactions. The lock makes each
  transaction a critical section within the process.
* Write transactions start with ``BEGIN IMMEDIATE``: the write lock on the *file* is taken
  up front, so another process cannot slip its own debit between our read of a balance and
  our update of it (with a plain BEGIN both would read, then one would fail to upgrade).
  ``busy_timeout`` makes a waiting process wait (up to 10 s) instead of failing.
* ``isolation_level=None``: Python's sqlite3 never opens or commits transactions behind
  our back; BEGIN/COMMIT/ROLLBACK are explicit and visible here.
* WAL lets readers proceed while a writer holds the lock; ``synchronous=NORMAL`` is the
  usual WAL pairing (durable against process crashes; a power cut may lose the last
  commits but never corrupts). Foreign keys are off by default in SQLite; we turn them on.

Time columns are REAL epoch seconds, except ``ai_usage_logs.created_at``: ISO-8601 UTC
text so ops can ``GROUP BY date(created_at)`` (see gateway.store).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import aiosqlite

from gateway.store import (
    USAGE_COLUMNS,
    ApiKey,
    EnergyEntry,
    IdempotencyState,
    InsufficientEnergy,
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
    compute_refill,
    hash_key,
    idempotency_decision,
    iso_utc,
    new_api_key,
    new_id,
    normalize_usage_row,
    now_or,
    parse_iso_utc,
    settlement_return,
)

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
                cost_usd          REAL NOT NULL DEFAULT 0,
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
]

_USER_COLS = "id, workspace_id, name, tier, energy, refilled_at, created_at, disabled"
_KEY_COLS = "id, user_id, workspace_id, prefix, role, created_at, revoked_at"
_LEDGER_COLS = "id, user_id, request_id, kind, amount, balance_after, reason, created_at"
_USAGE_BOOLS = [n for n, k in USAGE_COLUMNS.items() if k == "bool"]


def _workspace(r: sqlite3.Row) -> Workspace:
    return Workspace(r["id"], r["name"], json.loads(r["profile"]), json.loads(r["ai_settings"]),
                     r["created_at"])


def _user(r: sqlite3.Row) -> User:
    return User(r["id"], r["workspace_id"], r["name"], r["tier"], r["energy"], r["refilled_at"],
                r["created_at"], bool(r["disabled"]))


def _key(r: sqlite3.Row) -> ApiKey:
    return ApiKey(r["id"], r["user_id"], r["workspace_id"], r["prefix"], r["role"],
                  r["created_at"], r["revoked_at"])


def _entry(r: sqlite3.Row) -> EnergyEntry:
    return EnergyEntry(r["id"], r["user_id"], r["request_id"], r["kind"], r["amount"],
                       r["balance_after"], r["reason"], r["created_at"])


class SQLiteStore(Store):
    def __init__(self, path: str, *, url: str | None = None) -> None:
        self.path = path
        self.url = url or f"sqlite:///{path}"
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ plumbing

    async def open(self) -> None:
        if self._db is not None:
            return
        db = await aiosqlite.connect(self.path, isolation_level=None)
        db.row_factory = sqlite3.Row
        # busy_timeout first: switching to WAL itself needs a lock another process may hold.
        await db.execute("PRAGMA busy_timeout = 10000")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = NORMAL")
        await db.execute("PRAGMA foreign_keys = ON")
        self._db = db
        try:
            await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await db.close()

    async def ping(self) -> bool:
        try:
            return await self._fetchval("SELECT 1") == 1
        except Exception:
            return False

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("store is not open")
        return self._db

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """One write transaction, exclusive in this process and on the file."""
        async with self._lock:
            db = self.db
            await db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                # aiosqlite runs statements in order on its thread, so even when this task
                # is being cancelled the ROLLBACK lands before the next holder's BEGIN.
                if db.in_transaction:
                    await asyncio.shield(db.execute("ROLLBACK"))
                mapped = _map_integrity(exc) if isinstance(exc, sqlite3.IntegrityError) else None
                if mapped is not None:
                    raise mapped from exc
                raise

    @asynccontextmanager
    async def _read(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock:
            yield self.db

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        async with self._read() as db:
            async with db.execute(sql, args) as cur:
                row = await cur.fetchone()
        return None if row is None else row[0]

    async def _fetchone(self, sql: str, *args: Any) -> sqlite3.Row | None:
        async with self._read() as db:
            async with db.execute(sql, args) as cur:
                return await cur.fetchone()

    async def _fetchall(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        async with self._read() as db:
            async with db.execute(sql, args) as cur:
                return list(await cur.fetchall())

    @staticmethod
    async def _one(db: aiosqlite.Connection, sql: str, *args: Any) -> sqlite3.Row | None:
        async with db.execute(sql, args) as cur:
            return await cur.fetchone()

    async def migrate(self) -> list[int]:
        applied: list[int] = []
        async with self._write() as db:
            await db.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    INTEGER PRIMARY KEY,
                       applied_at REAL NOT NULL
                   )"""
            )
            async with db.execute("SELECT version FROM schema_migrations") as cur:
                done = {r[0] for r in await cur.fetchall()}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for sql in statements:
                    await db.execute(sql)
                await db.execute(
                    "INSERT INTO schema_migrations (version, applied_at) VALUES (?, ?)",
                    (version, time.time()),
                )
                applied.append(version)
        return applied

    # ---------------------------------------------------------------- workspaces

    async def create_workspace(self, name, profile=None, ai_settings=None, *, now=None):
        check_workspace_name(name)
        ws = Workspace(new_id("ws"), name, dict(profile or {}), dict(ai_settings or {}),
                       now_or(now))
        async with self._write() as db:
            if await self._one(db, "SELECT 1 FROM workspaces WHERE name = ?", name):
                raise StoreConflict(f"workspace name {name!r} is taken")
            await db.execute(
                "INSERT INTO workspaces (id, name, profile, ai_settings, created_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (ws.id, ws.name, json.dumps(ws.profile), json.dumps(ws.ai_settings),
                 ws.created_at),
            )
        return ws

    async def get_workspace(self, id_or_name):
        r = await self._fetchone(
            "SELECT * FROM workspaces WHERE id = ? OR name = ?", id_or_name, id_or_name
        )
        return None if r is None else _workspace(r)

    async def list_workspaces(self):
        return [_workspace(r) for r in
                await self._fetchall("SELECT * FROM workspaces ORDER BY created_at, id")]

    async def update_workspace(self, workspace_id, profile=None, ai_settings=None):
        async with self._write() as db:
            r = await self._one(db, "SELECT * FROM workspaces WHERE id = ?", workspace_id)
            if r is None:
                raise NotFound(f"workspace {workspace_id!r}")
            if profile is not None:
                await db.execute("UPDATE workspaces SET profile = ? WHERE id = ?",
                                 (json.dumps(profile), workspace_id))
            if ai_settings is not None:
                await db.execute("UPDATE workspaces SET ai_settings = ? WHERE id = ?",
                                 (json.dumps(ai_settings), workspace_id))
            r = await self._one(db, "SELECT * FROM workspaces WHERE id = ?", workspace_id)
        return _workspace(r)

    # --------------------------------------------------------------------- users

    async def create_user(self, workspace_id, tier, *, name=None, energy=0, now=None):
        check_tier(tier)
        check_amount(energy, "energy")
        user = User(new_id("usr"), workspace_id, name, tier, energy, None, now_or(now), False)
        async with self._write() as db:
            if not await self._one(db, "SELECT 1 FROM workspaces WHERE id = ?", workspace_id):
                raise NotFound(f"workspace {workspace_id!r}")
            await db.execute(
                f"INSERT INTO users ({_USER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, 0)",
                (user.id, workspace_id, name, tier, energy, None, user.created_at),
            )
            if energy > 0:
                await self._ledger_row(db, user.id, None, "grant", energy, energy,
                                       "initial energy", user.created_at)
        return user

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
        async with self._write() as db:
            r = await self._one(db, f"{sql} WHERE id = ? RETURNING {_USER_COLS}", *args, user_id)
            if r is None:
                raise NotFound(f"user {user_id!r}")
        return _user(r)

    async def set_tier(self, user_id, tier):
        check_tier(tier)
        return await self._update_user(user_id, "UPDATE users SET tier = ?", tier)

    async def set_user_disabled(self, user_id, disabled):
        return await self._update_user(user_id, "UPDATE users SET disabled = ?",
                                       int(bool(disabled)))

    # ---------------------------------------------------------------------- keys

    async def create_key(self, user_id, role="user", *, now=None):
        check_role(role)
        async with self._write() as db:
            return await self._insert_key(db, user_id, role, now_or(now))

    async def _insert_key(self, db, user_id: str, role: str, now: float) -> tuple[str, ApiKey]:
        u = await self._one(db, "SELECT workspace_id FROM users WHERE id = ?", user_id)
        if u is None:
            raise NotFound(f"user {user_id!r}")
        plaintext, digest, prefix = new_api_key()
        key = ApiKey(new_id("key"), user_id, u["workspace_id"], prefix, role, now, None)
        await db.execute(
            "INSERT INTO api_keys (id, user_id, workspace_id, key_hash, prefix, role, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (key.id, user_id, key.workspace_id, digest, prefix, role, now),
        )
        return plaintext, key

    async def lookup_key(self, plaintext):
        r = await self._fetchone(
            """SELECT k.id, k.prefix, k.role, k.user_id, k.workspace_id, k.revoked_at,
                      u.tier, u.disabled
                 FROM api_keys k JOIN users u ON u.id = k.user_id
                WHERE k.key_hash = ?""",
            hash_key(plaintext),
        )
        if r is None:
            return None
        return KeyIdentity(r["id"], r["prefix"], r["role"], r["user_id"], r["workspace_id"],
                           r["tier"], bool(r["disabled"]), r["revoked_at"] is not None)

    async def revoke_key(self, key_id, *, now=None):
        async with self._write() as db:
            r = await self._one(
                db,
                f"UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?"
                f" RETURNING {_KEY_COLS}",
                now_or(now), key_id,
            )
            if r is None:
                raise NotFound(f"key {key_id!r}")
        return _key(r)

    async def rotate_key(self, key_id, *, now=None):
        now = now_or(now)
        async with self._write() as db:
            old = await self._one(db, "SELECT user_id, role, revoked_at FROM api_keys WHERE id = ?",
                                  key_id)
            if old is None:
                raise NotFound(f"key {key_id!r}")
            if old["revoked_at"] is not None:
                raise StoreConflict(f"key {key_id!r} is revoked and cannot be rotated")
            await db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (now, key_id))
            return await self._insert_key(db, old["user_id"], old["role"], now)

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

    # -------------------------------------------------------------------- energy

    @staticmethod
    async def _ledger_row(db, user_id, request_id, kind, amount, balance_after, reason, now):
        await db.execute(
            "INSERT INTO energy_ledger"
            " (user_id, request_id, kind, amount, balance_after, reason, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (user_id, request_id, kind, amount, balance_after, reason, now),
        )

    async def balance(self, user_id):
        value = await self._fetchval("SELECT energy FROM users WHERE id = ?", user_id)
        if value is None:
            raise NotFound(f"user {user_id!r}")
        return value

    async def ledger(self, user_id):
        rows = await self._fetchall(
            f"SELECT {_LEDGER_COLS} FROM energy_ledger WHERE user_id = ? ORDER BY id", user_id
        )
        return [_entry(r) for r in rows]

    async def reserve_energy(self, user_id, amount, request_id, *, refill=None, now=None):
        check_amount(amount)
        now = now_or(now)
        async with self._write() as db:
            u = await self._one(db, "SELECT energy, refilled_at FROM users WHERE id = ?", user_id)
            if u is None:
                raise NotFound(f"user {user_id!r}")
            if await self._one(db, "SELECT 1 FROM reservations WHERE request_id = ?", request_id):
                raise StoreConflict(f"request {request_id!r} already has a reservation")
            r = compute_refill(u["energy"], u["refilled_at"], refill, now)
            balance = r.balance
            if r.due:
                await db.execute("UPDATE users SET energy = ?, refilled_at = ? WHERE id = ?",
                                 (balance, r.refilled_at, user_id))
                if r.delta > 0:
                    await self._ledger_row(db, user_id, None, "refill", r.delta, balance,
                                           None, now)
            if balance < amount:
                return Reservation(False, balance, r.delta)  # the refill (if any) is kept
            balance -= amount
            await db.execute("UPDATE users SET energy = ? WHERE id = ?", (balance, user_id))
            await self._ledger_row(db, user_id, request_id, "reserve", -amount, balance, None, now)
            await db.execute(
                "INSERT INTO reservations (request_id, user_id, amount, status, created_at)"
                " VALUES (?, ?, ?, 'reserved', ?)",
                (request_id, user_id, amount, now),
            )
        return Reservation(True, balance, r.delta)

    async def _finish_reservation(self, request_id, status, final_amount, kind, reason, now):
        """reserved -> settled/refunded, returning `back` energy; None if not reserved."""
        now = now_or(now)
        async with self._write() as db:
            # The conditional update is the state machine: only one caller ever sees the
            # row in 'reserved', every later settle/refund finds nothing to do.
            res = await self._one(
                db,
                "UPDATE reservations SET status = ?, finished_at = ?"
                " WHERE request_id = ? AND status = 'reserved' RETURNING user_id, amount",
                status, now, request_id,
            )
            if res is None:
                return None  # unknown, or already settled/refunded: never twice
            back = res["amount"] if status == "refunded" else settlement_return(res["amount"],
                                                                                  final_amount)
            await db.execute("UPDATE reservations SET final_amount = ? WHERE request_id = ?",
                             (res["amount"] - back, request_id))
            u = await self._one(db, "UPDATE users SET energy = energy + ? WHERE id = ?"
                                    " RETURNING energy", back, res["user_id"])
            await self._ledger_row(db, res["user_id"], request_id, kind, back, u["energy"],
                                   reason, now)
        return u["energy"]

    async def settle_energy(self, request_id, final_amount=None, *, now=None):
        if final_amount is not None:
            check_amount(final_amount, "final_amount")
        return await self._finish_reservation(request_id, "settled", final_amount, "settle",
                                              None, now)

    async def refund_energy(self, request_id, reason=None, *, now=None):
        return await self._finish_reservation(request_id, "refunded", None, "refund", reason, now)

    async def grant_energy(self, user_id, amount, *, kind="grant", reason=None, now=None):
        check_grant(amount, kind)
        now = now_or(now)
        async with self._write() as db:
            u = await self._one(db, "SELECT energy FROM users WHERE id = ?", user_id)
            if u is None:
                raise NotFound(f"user {user_id!r}")
            balance = u["energy"] + amount
            if balance < 0:
                raise InsufficientEnergy(
                    f"user {user_id!r} has {u['energy']}, cannot adjust by {amount}")
            await db.execute("UPDATE users SET energy = ? WHERE id = ?", (balance, user_id))
            await self._ledger_row(db, user_id, None, kind, amount, balance, reason, now)
        return balance

    async def stale_reservations(self, older_than):
        rows = await self._fetchall(
            "SELECT request_id FROM reservations WHERE status = 'reserved' AND created_at <= ?"
            " ORDER BY created_at",
            older_than,
        )
        return [r[0] for r in rows]

    # --------------------------------------------------------------- idempotency

    async def begin_idempotent(self, user_id, key, request_id, *, fingerprint, window, now=None):
        now = now_or(now)
        async with self._write() as db:
            row = await self._one(
                db,
                "SELECT request_id, fingerprint, status, status_code, body, created_at"
                " FROM idempotency_keys WHERE user_id = ? AND key = ?",
                user_id, key,
            )
            if row is None:
                if not await self._one(db, "SELECT 1 FROM users WHERE id = ?", user_id):
                    raise NotFound(f"user {user_id!r}")
                await db.execute(
                    "INSERT INTO idempotency_keys"
                    " (user_id, key, request_id, fingerprint, status, created_at)"
                    " VALUES (?, ?, ?, ?, 'in_flight', ?)",
                    (user_id, key, request_id, fingerprint, now),
                )
                return IdempotencyState("new", None, None, request_id)
            decision = idempotency_decision(
                stored_status=row["status"], stored_fingerprint=row["fingerprint"],
                stored_created_at=row["created_at"], fingerprint=fingerprint, window=window,
                now=now,
            )
            if decision == "reclaim":
                await db.execute(
                    "UPDATE idempotency_keys SET request_id = ?, fingerprint = ?,"
                    " status = 'in_flight', status_code = NULL, body = NULL, created_at = ?,"
                    " finished_at = NULL WHERE user_id = ? AND key = ?",
                    (request_id, fingerprint, now, user_id, key),
                )
                return IdempotencyState("new", None, None, request_id)
            if decision == "done":
                return IdempotencyState("done", row["status_code"],
                                        None if row["body"] is None else bytes(row["body"]),
                                        row["request_id"])
            return IdempotencyState(decision, None, None, row["request_id"])

    async def finish_idempotent(self, user_id, key, status_code, body, *, request_id=None,
                                now=None):
        sql = ("UPDATE idempotency_keys SET status = 'done', status_code = ?, body = ?,"
               " finished_at = ? WHERE user_id = ? AND key = ? AND status = 'in_flight'")
        args: list[Any] = [int(status_code), bytes(body), now_or(now), user_id, key]
        if request_id is not None:
            sql += " AND request_id = ?"
            args.append(request_id)
        async with self._write() as db:
            async with db.execute(sql, args) as cur:
                return cur.rowcount == 1

    async def release_idempotent(self, user_id, key, *, request_id=None):
        sql = "DELETE FROM idempotency_keys WHERE user_id = ? AND key = ? AND status = 'in_flight'"
        args: list[Any] = [user_id, key]
        if request_id is not None:
            sql += " AND request_id = ?"
            args.append(request_id)
        async with self._write() as db:
            async with db.execute(sql, args) as cur:
                return cur.rowcount == 1

    # --------------------------------------------------------------------- usage

    async def insert_usage(self, rows, *, now=None):
        now = now_or(now)
        values = []
        for row in rows:
            r = normalize_usage_row(row, now)
            r["created_at"] = iso_utc(r["created_at"])
            values.append(tuple(r.values()))
        if not values:
            return 0
        cols = ", ".join(USAGE_COLUMNS)
        marks = ", ".join("?" for _ in USAGE_COLUMNS)
        async with self._write() as db:
            before = (await self._one(db, "SELECT total_changes()"))[0]
            await db.executemany(
                f"INSERT INTO ai_usage_logs ({cols}) VALUES ({marks})"
                " ON CONFLICT (request_id) DO NOTHING",
                values,
            )
            after = (await self._one(db, "SELECT total_changes()"))[0]
        return after - before

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
        out = []
        for r in await self._fetchall(sql + " ORDER BY created_at, id", *args):
            d = dict(r)
            d["created_at"] = parse_iso_utc(d["created_at"])
            for name in _USAGE_BOOLS:
                d[name] = bool(d[name])
            out.append(d)
        return out


def _map_integrity(exc: sqlite3.IntegrityError) -> Exception | None:
    msg = str(exc)
    if "UNIQUE" in msg:
        return StoreConflict(msg)
    if "FOREIGN KEY" in msg:
        return NotFound(msg)
    return None  # CHECK / NOT NULL: a bug, raised as is
