"""The store: tenants, keys, energy (credits) and the usage log, on SQLite or PostgreSQL.

`open_store(url)` picks the backend; `gateway.store.base` is the interface and the shared,
dialect-free rules (entities, errors, refill/settlement/idempotency arithmetic);
`gateway.store.sqlite` and `gateway.store.postgres` speak their own SQL;
`gateway.store.rollup` builds the hourly rollups the reports read. The backends import
`base`, never this package, so the factory here closes no import circle.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import parse_qs, urlsplit

from gateway.store.base import (
    ApiKey,
    Budget,
    BudgetHold,
    EnergyEntry,
    IN_FLIGHT_LEASE,
    IdempotencyState,
    InsufficientEnergy,
    KeyIdentity,
    NotFound,
    Reservation,
    SCHEMA_NAME,
    Store,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    USAGE_COLUMNS,
    USAGE_SLICE,
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
    kept_by_refill_reason,
    new_api_key,
    new_id,
    now_or,
    parse_iso_utc,
    prepare_usage_rows,
    returned_after_refills,
    settlement_return,
)

__all__ = ["ApiKey", "Budget", "BudgetHold", "EnergyEntry", "IN_FLIGHT_LEASE", "IdempotencyState", "InsufficientEnergy", "KeyIdentity", "NotFound", "Reservation", "SCHEMA_NAME", "Store", "StoreConflict", "StoreError", "StoreUnavailable", "USAGE_COLUMNS", "USAGE_SLICE", "User", "Workspace", "check_amount", "check_grant", "check_role", "check_tier", "check_workspace_name", "compute_refill", "hash_key", "idempotency_decision", "iso_utc", "kept_by_refill_reason", "new_api_key", "new_id", "now_or", "parse_iso_utc", "prepare_usage_rows", "returned_after_refills", "settlement_return", "open_store"]


def open_store(url: str, **options: Any) -> Store:
    """A Store for `url` (not yet opened: call `await store.open()` or use `async with`).

    ``sqlite:///relative.db``, ``sqlite:////abs/path.db``, ``sqlite:///:memory:``,
    ``postgresql://user@host:port/db[?schema=name][&pgbouncer=true]`` (``postgres://``
    too). With ``schema``, PostgreSQL tables live in that schema (created if missing).
    `options`: PostgreSQL's pool and timeout settings (StoreConfig.backend_options);
    SQLite has none and ignores them.
    """
    if url.startswith("sqlite:///"):
        from gateway.store.sqlite import SQLiteStore

        path = url[len("sqlite:///"):].split("?", 1)[0]
        if not path:
            raise ValueError(f"sqlite URL without a path: {url!r}")
        if path != ":memory:" and os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)  # sqlite:///data/x.db on a fresh clone
        return SQLiteStore(path, url=url)
    if url.startswith(("postgresql://", "postgres://")):
        from gateway.store.postgres import PostgresStore

        parts = urlsplit(url)
        query = parse_qs(parts.query, keep_blank_values=True)
        schema = None
        if "schema" in query:
            schema = query.pop("schema")[-1]
            if not SCHEMA_NAME.match(schema):
                raise ValueError(f"invalid schema name {schema!r}")
        if "pgbouncer" in query:
            options["pgbouncer"] = query.pop("pgbouncer")[-1].lower() in ("1", "true", "yes", "on")
        rest = "&".join(f"{k}={v}" for k, vs in query.items() for v in vs)
        dsn = parts._replace(query=rest).geturl()
        return PostgresStore(dsn, schema=schema, url=url, **options)
    raise ValueError(f"unsupported store URL {url!r} (sqlite:/// or postgresql://)")
