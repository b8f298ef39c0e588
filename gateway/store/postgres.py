"""PostgreSQL backend: one database shared by any number of gateway processes and hosts.

Why it is built this way:

* An asyncpg pool (``store.pool_min_size``..``store.pool_max_size``, 1..10). Unlike
  SQLite, concurrency is the database's job: each operation runs in its own transaction on
  its own pooled connection, at READ COMMITTED, and correctness comes from row locks, not
  from serializing the process. No session state (no reset query on release, only SET
  LOCAL and transaction-scoped advisory locks), so it runs behind PgBouncer in transaction
  pooling mode (``store.pgbouncer``: no prepared statement cache).
* The hot path is one round trip: the reservations of one loop turn are one call of the
  ``gw_reserve`` function (migration 5: refill, check, debit, ledger and reservation rows,
  per request, as the Python version did), at most ``RESERVE_IN_FLIGHT`` calls at once
  (the reservations arriving meanwhile go together in the next; one waiting on a row lock
  past ``RESERVE_STALLED`` stops counting, and a user's reservations wait for that user's
  call in flight, so a locked row holds back no other user); a full settlement batch
  (``settle_many``) and a usage batch are one statement each, hence one implicit
  transaction; a refund or partial settlement is one call of ``gw_finish`` (migration 6).
* Energy moves lock the user row first (``SELECT ... FOR UPDATE``), then refill, check and
  debit in the same transaction. Every balance change of one user is thus serialized,
  and ledger ids (taken under the lock) are in the same order as the changes, so
  ``balance_after`` reads as a running sum.
* Settle/refund is a conditional ``UPDATE reservations ... WHERE status = 'reserved'``: a
  concurrent second attempt waits for the first, re-checks the condition on the committed
  row and finds nothing to do.
* Idempotency claims use ``INSERT ... ON CONFLICT DO NOTHING``: of two racing claims the
  second waits on the unique index and then sees the first as existing.
* Migrations take ``pg_advisory_xact_lock`` so two processes starting at once apply them
  one after the other; the second finds nothing left to do.
* With ``?schema=NAME`` every connection gets ``search_path=NAME`` (the schema is created
  by the first migration run), so tests and tenants can share one database.

Time columns are ``double precision`` epoch seconds, except ``ai_usage_logs.created_at``:
``timestamptz`` so ops can query usage by date (see gateway.store). USD columns are
``numeric(20, 9)`` (gateway/money.py), read and written as ``Decimal``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, AsyncIterator

import asyncpg
import orjson
import structlog

from gateway import money
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
    StoreUnavailable,
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
    key_control_values,
    stored_key_models,
    new_api_key,
    new_id,
    prepare_usage_rows,
    now_or,
)

log = structlog.get_logger("gateway.store")


def _exact_usd() -> str:
    """Migration 10: binary-float USD -> numeric, one ALTER (one rewrite) per table."""
    tables: dict[str, list[str]] = {"ai_usage_logs": ["cost_usd", "saved_usd"]}
    for table, column in usage_rollup.usd_columns():
        tables.setdefault(table, []).append(column)
    return "".join(f"ALTER TABLE {table} "
                   + ", ".join(f"ALTER COLUMN {c} TYPE {money.SQL_TYPE} USING round({c}::numeric, 9)" for c in columns)
                   + ";\n" for table, columns in tables.items())


MIGRATIONS: list[tuple[int, str]] = [
    (
        1,
        """
        CREATE TABLE workspaces (
            id          text PRIMARY KEY,
            name        text NOT NULL UNIQUE,
            profile     jsonb NOT NULL DEFAULT '{}',
            ai_settings jsonb NOT NULL DEFAULT '{}',
            created_at  double precision NOT NULL
        );
        CREATE TABLE users (
            id           text PRIMARY KEY,
            workspace_id text NOT NULL REFERENCES workspaces(id),
            name         text,
            tier         text NOT NULL,
            energy       bigint NOT NULL DEFAULT 0 CHECK (energy >= 0),
            refilled_at  double precision,
            disabled     boolean NOT NULL DEFAULT false,
            created_at   double precision NOT NULL
        );
        CREATE INDEX users_workspace ON users (workspace_id);
        CREATE TABLE api_keys (
            id           text PRIMARY KEY,
            user_id      text NOT NULL REFERENCES users(id),
            workspace_id text NOT NULL REFERENCES workspaces(id),
            key_hash     text NOT NULL UNIQUE,
            prefix       text NOT NULL,
            role         text NOT NULL CHECK (role IN ('user', 'workspace_admin')),
            created_at   double precision NOT NULL,
            revoked_at   double precision
        );
        CREATE INDEX api_keys_user ON api_keys (user_id);
        CREATE INDEX api_keys_workspace ON api_keys (workspace_id);
        CREATE TABLE energy_ledger (
            id            bigserial PRIMARY KEY,
            user_id       text NOT NULL REFERENCES users(id),
            request_id    text,
            kind          text NOT NULL CHECK (kind IN
                            ('reserve', 'settle', 'refund', 'grant', 'refill', 'adjust')),
            amount        bigint NOT NULL,
            balance_after bigint NOT NULL CHECK (balance_after >= 0),
            reason        text,
            created_at    double precision NOT NULL
        );
        CREATE INDEX energy_ledger_user ON energy_ledger (user_id, id);
        -- At most one debit and one outcome per request: the last line of defence
        -- against charging or refunding twice.
        CREATE UNIQUE INDEX energy_ledger_one_reserve ON energy_ledger (request_id)
            WHERE kind = 'reserve';
        CREATE UNIQUE INDEX energy_ledger_one_outcome ON energy_ledger (request_id)
            WHERE kind IN ('settle', 'refund');
        CREATE TABLE reservations (
            request_id   text PRIMARY KEY,
            user_id      text NOT NULL REFERENCES users(id),
            amount       bigint NOT NULL CHECK (amount >= 0),
            status       text NOT NULL CHECK (status IN ('reserved', 'settled', 'refunded')),
            final_amount bigint,
            created_at   double precision NOT NULL,
            finished_at  double precision
        );
        CREATE INDEX reservations_open ON reservations (created_at) WHERE status = 'reserved';
        CREATE TABLE idempotency_keys (
            user_id     text NOT NULL REFERENCES users(id),
            key         text NOT NULL,
            request_id  text NOT NULL,
            fingerprint text NOT NULL,
            status      text NOT NULL CHECK (status IN ('in_flight', 'done')),
            status_code integer,
            body        bytea,
            created_at  double precision NOT NULL,
            finished_at double precision,
            PRIMARY KEY (user_id, key)
        );
        CREATE TABLE ai_usage_logs (
            id                bigserial PRIMARY KEY,
            request_id        text UNIQUE,
            user_id           text,
            workspace_id      text,
            prospect_id       text,
            action            text,
            provider          text,
            model             text,
            requested_model   text,
            downgraded_from   text,
            tokens_prompt     bigint NOT NULL DEFAULT 0,
            tokens_completion bigint NOT NULL DEFAULT 0,
            tokens_total      bigint NOT NULL DEFAULT 0,
            cost_usd          double precision,   -- NULL: no known price for the model
            status            integer,
            error_type        text,
            latency_ms        integer,
            ttfb_ms           integer,
            streamed          boolean NOT NULL DEFAULT false,
            energy_cost       bigint NOT NULL DEFAULT 0,
            cache_hit         boolean NOT NULL DEFAULT false,
            retries           integer NOT NULL DEFAULT 0,
            usage_estimated   boolean NOT NULL DEFAULT false,
            created_at        timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ai_usage_logs_created ON ai_usage_logs (created_at);
        CREATE INDEX ai_usage_logs_workspace_created ON ai_usage_logs (workspace_id, created_at);
        """,
    ),
    (
        2,  # token classes and the unit prices a row was priced with (gateway/usage.py)
        """
        ALTER TABLE ai_usage_logs
            ADD COLUMN tokens_cached      bigint NOT NULL DEFAULT 0,
            ADD COLUMN tokens_cache_write bigint NOT NULL DEFAULT 0,
            ADD COLUMN tokens_reasoning   bigint NOT NULL DEFAULT 0,
            ADD COLUMN tokens_audio_in    bigint NOT NULL DEFAULT 0,
            ADD COLUMN tokens_audio_out   bigint NOT NULL DEFAULT 0,
            ADD COLUMN unit_prices        text;   -- JSON, USD per million tokens
        """,
    ),
    (
        # ai_usage_logs partitioned by month (retention drops whole months); reports from
        # the hourly rollup (gateway/store/rollup.py). A unique index of a partitioned table
        # must hold the partition key, and a retried row may carry another created_at (the
        # journal's copy of a row is stamped apart from the written one): request ids are
        # claimed in ai_usage_request_ids instead, in the insert statement itself.
        3,
        """
        ALTER TABLE ai_usage_logs RENAME TO ai_usage_logs_unpartitioned;
        DROP INDEX ai_usage_logs_created;
        DROP INDEX ai_usage_logs_workspace_created;
        ALTER SEQUENCE ai_usage_logs_id_seq OWNED BY NONE;
        CREATE TABLE ai_usage_logs (
            id                bigint NOT NULL DEFAULT nextval('ai_usage_logs_id_seq'),
            request_id        text,
            user_id           text,
            workspace_id      text,
            prospect_id       text,
            action            text,
            provider          text,
            model             text,
            requested_model   text,
            downgraded_from   text,
            tokens_prompt     bigint NOT NULL DEFAULT 0,
            tokens_completion bigint NOT NULL DEFAULT 0,
            tokens_total      bigint NOT NULL DEFAULT 0,
            cost_usd          double precision,
            status            integer,
            error_type        text,
            latency_ms        integer,
            ttfb_ms           integer,
            streamed          boolean NOT NULL DEFAULT false,
            energy_cost       bigint NOT NULL DEFAULT 0,
            cache_hit         boolean NOT NULL DEFAULT false,
            retries           integer NOT NULL DEFAULT 0,
            usage_estimated   boolean NOT NULL DEFAULT false,
            created_at        timestamptz NOT NULL DEFAULT now(),
            tokens_cached      bigint NOT NULL DEFAULT 0,
            tokens_cache_write bigint NOT NULL DEFAULT 0,
            tokens_reasoning   bigint NOT NULL DEFAULT 0,
            tokens_audio_in    bigint NOT NULL DEFAULT 0,
            tokens_audio_out   bigint NOT NULL DEFAULT 0,
            unit_prices        text,
            PRIMARY KEY (id, created_at)
        ) PARTITION BY RANGE (created_at);
        ALTER SEQUENCE ai_usage_logs_id_seq OWNED BY ai_usage_logs.id;
        CREATE INDEX ai_usage_logs_created ON ai_usage_logs (created_at);
        CREATE INDEX ai_usage_logs_workspace_created ON ai_usage_logs (workspace_id, created_at);
        CREATE INDEX ai_usage_logs_user_created ON ai_usage_logs (user_id, created_at);
        CREATE INDEX ai_usage_logs_request ON ai_usage_logs (request_id);
        CREATE TABLE ai_usage_request_ids (
            request_id text PRIMARY KEY,
            created_at timestamptz NOT NULL
        );
        CREATE INDEX ai_usage_request_ids_created ON ai_usage_request_ids (created_at);
        -- The month partition holding `ts` (UTC months), created if missing.
        CREATE FUNCTION ai_usage_partition(ts timestamptz) RETURNS text LANGUAGE plpgsql AS $$
        DECLARE
            m    timestamp := date_trunc('month', ts AT TIME ZONE 'UTC');
            name text := 'ai_usage_logs_p' || to_char(m, 'YYYYMM');
        BEGIN
            IF to_regclass(name) IS NULL THEN
                PERFORM pg_advisory_xact_lock(hashtext('ai_usage_partition:' || current_schema()));
                IF to_regclass(name) IS NULL THEN
                    EXECUTE format('CREATE TABLE %I PARTITION OF ai_usage_logs FOR VALUES FROM (%L) TO (%L)',
                                   name, m AT TIME ZONE 'UTC', (m + interval '1 month') AT TIME ZONE 'UTC');
                END IF;
            END IF;
            RETURN name;
        END $$;
        SELECT ai_usage_partition(m) FROM (
            SELECT DISTINCT date_trunc('month', created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS m
            FROM ai_usage_logs_unpartitioned UNION SELECT now()) AS months;
        INSERT INTO ai_usage_logs SELECT id, request_id, user_id, workspace_id, prospect_id, action, provider,
            model, requested_model, downgraded_from, tokens_prompt, tokens_completion, tokens_total, cost_usd,
            status, error_type, latency_ms, ttfb_ms, streamed, energy_cost, cache_hit, retries, usage_estimated,
            created_at, tokens_cached, tokens_cache_write, tokens_reasoning, tokens_audio_in, tokens_audio_out,
            unit_prices
            FROM ai_usage_logs_unpartitioned;
        INSERT INTO ai_usage_request_ids (request_id, created_at)
            SELECT request_id, created_at FROM ai_usage_logs_unpartitioned WHERE request_id IS NOT NULL;
        DROP TABLE ai_usage_logs_unpartitioned;
        CREATE INDEX energy_ledger_refunds ON energy_ledger (created_at) WHERE kind = 'refund';
        """
        + ";\n".join(usage_rollup.all_tables_ddl("postgres", usage_rollup.as_of(3))) + ";\n"
        + ";\n".join(usage_rollup.backfill("postgres", families=usage_rollup.as_of(3))) + ";",
    ),
    (
        4,  # A/B experiments (plugins/experiments.py) and feedback (gateway/feedback.py)
        """
        ALTER TABLE ai_usage_logs ADD COLUMN experiment text, ADD COLUMN variant text;
        CREATE INDEX ai_usage_logs_experiment ON ai_usage_logs (experiment, variant) WHERE experiment IS NOT NULL;
        CREATE TABLE feedback (
            request_id text NOT NULL,
            metric     text NOT NULL,
            user_id    text NOT NULL,
            value      double precision NOT NULL,
            created_at double precision NOT NULL,
            PRIMARY KEY (request_id, metric)
        );
        """,
    ),
    (
        # The reservation hot path as one call (PostgresStore.reserve_energy_soon): the
        # reservations of one event-loop turn, in one statement and one transaction. Per
        # element, exactly what reserve_energy did in six statements: lock the user row,
        # refuse a duplicate request id, the lazy refill (gateway.store.compute_refill, in
        # the same float arithmetic), the balance check, the debit with its ledger rows and
        # the reservation row. The users' rows are locked first, in id order (two processes'
        # groups lock in one order: no deadlock), then the elements run in input order, so
        # the outcomes are those of reserving one after the other. An outcome
        # per element, no exception: 'ok', 'short' (the refill, if any, is kept),
        # 'not_found', 'conflict' (nothing written, as the rolled-back transaction did).
        5,
        """
        CREATE FUNCTION gw_reserve(p_users text[], p_amounts bigint[], p_requests text[],
                                   p_allowances bigint[], p_periods float8[], p_now float8[])
        RETURNS TABLE (o_n integer, o_status text, o_balance bigint, o_refilled bigint)
        LANGUAGE plpgsql AS $$
        DECLARE
            k        integer;
            v_energy bigint;
            v_at     float8;
            v_new_at float8;
            v_now    float8;
            v_period float8;
            v_due    boolean;
            v_bal    bigint;
        BEGIN
            PERFORM 1 FROM users u WHERE u.id = ANY(p_users) ORDER BY u.id FOR UPDATE;
            FOR k IN 1 .. coalesce(array_length(p_users, 1), 0) LOOP
                o_n := k;
                o_refilled := 0;
                SELECT u.energy, u.refilled_at INTO v_energy, v_at
                    FROM users u WHERE u.id = p_users[k] FOR UPDATE;
                IF NOT FOUND THEN
                    o_status := 'not_found'; o_balance := NULL; RETURN NEXT; CONTINUE;
                END IF;
                IF EXISTS (SELECT 1 FROM reservations r WHERE r.request_id = p_requests[k]) THEN
                    o_status := 'conflict'; o_balance := v_energy; RETURN NEXT; CONTINUE;
                END IF;
                v_now := p_now[k];
                v_period := p_periods[k];
                v_due := false;
                v_bal := v_energy;
                v_new_at := v_at;
                IF p_allowances[k] IS NOT NULL THEN
                    IF v_at IS NULL THEN
                        v_due := true; v_new_at := v_now;
                    ELSIF v_now - v_at >= v_period THEN
                        v_due := true;
                        v_new_at := v_at + floor((v_now - v_at) / v_period) * v_period;
                        WHILE v_new_at > v_now LOOP v_new_at := v_new_at - v_period; END LOOP;
                        WHILE v_new_at + v_period <= v_now LOOP v_new_at := v_new_at + v_period; END LOOP;
                    END IF;
                    IF v_due THEN
                        v_bal := greatest(v_energy, p_allowances[k]);
                        o_refilled := v_bal - v_energy;
                    END IF;
                END IF;
                IF v_bal < p_amounts[k] THEN
                    IF v_due THEN
                        UPDATE users SET energy = v_bal, refilled_at = v_new_at WHERE id = p_users[k];
                        IF o_refilled > 0 THEN
                            INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                            VALUES (p_users[k], NULL, 'refill', o_refilled, v_bal, NULL, v_now);
                        END IF;
                    END IF;
                    o_status := 'short'; o_balance := v_bal; RETURN NEXT; CONTINUE;
                END IF;
                -- The reservation row first: a racing transaction that reuses this request
                -- id (another user's) makes it a conflict here, before anything is written.
                INSERT INTO reservations (request_id, user_id, amount, status, created_at)
                    VALUES (p_requests[k], p_users[k], p_amounts[k], 'reserved', v_now)
                    ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    o_status := 'conflict'; o_balance := v_energy; RETURN NEXT; CONTINUE;
                END IF;
                UPDATE users SET energy = v_bal - p_amounts[k], refilled_at = v_new_at WHERE id = p_users[k];
                IF o_refilled > 0 THEN
                    INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                    VALUES (p_users[k], NULL, 'refill', o_refilled, v_bal, NULL, v_now);
                END IF;
                INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                VALUES (p_users[k], p_requests[k], 'reserve', -p_amounts[k], v_bal - p_amounts[k], NULL, v_now);
                o_status := 'ok'; o_balance := v_bal - p_amounts[k]; RETURN NEXT;
            END LOOP;
        END $$;
        """,
    ),
    (
        # A refund or a partial settlement (PostgresStore._finish_reservation) as one call:
        # the same statements in the same order (the conditional update is the state
        # machine; the user's row is locked before the refills since the reservation are
        # summed, each statement a fresh snapshot), returning the balance, NULL when the
        # reservation was not open. The reason note is gateway.store.kept_by_refill_reason's.
        6,
        """
        CREATE FUNCTION gw_finish(p_request text, p_status text, p_final bigint, p_kind text,
                                  p_reason text, p_now float8) RETURNS bigint
        LANGUAGE plpgsql AS $$
        DECLARE
            v_user     text;
            v_reserved bigint;
            v_back     bigint;
            v_refilled bigint;
            v_returned bigint;
            v_reason   text := p_reason;
            v_balance  bigint;
        BEGIN
            UPDATE reservations SET status = p_status, finished_at = p_now
                WHERE request_id = p_request AND status = 'reserved'
                RETURNING user_id, amount INTO v_user, v_reserved;
            IF NOT FOUND THEN
                RETURN NULL;
            END IF;
            IF p_status = 'refunded' THEN
                v_back := v_reserved;
            ELSIF p_final IS NULL THEN
                v_back := 0;
            ELSE
                v_back := v_reserved - least(p_final, v_reserved);
            END IF;
            UPDATE reservations SET final_amount = v_reserved - v_back WHERE request_id = p_request;
            IF v_back > 0 THEN
                PERFORM 1 FROM users WHERE id = v_user FOR NO KEY UPDATE;
                SELECT COALESCE(SUM(amount), 0)::bigint INTO v_refilled FROM energy_ledger
                    WHERE user_id = v_user AND kind = 'refill' AND id > (SELECT id FROM energy_ledger
                        WHERE request_id = p_request AND kind = 'reserve');
                v_returned := greatest(0, v_back - v_refilled);
                IF v_returned < v_back THEN
                    v_reason := CASE WHEN p_reason IS NULL OR p_reason = '' THEN '' ELSE p_reason || '; ' END
                        || (v_back - v_returned) || ' not returned: a refill since the reservation covered it';
                END IF;
                v_back := v_returned;
            END IF;
            UPDATE users SET energy = energy + v_back WHERE id = v_user RETURNING energy INTO v_balance;
            INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                VALUES (v_user, p_request, p_kind, v_back, v_balance, v_reason, p_now);
            RETURN v_balance;
        END $$;
        """,
    ),
    (
        7,  # USD saved by the response cache: a hit's would-be cost, per row and in the rollups
        "ALTER TABLE ai_usage_logs ADD COLUMN saved_usd double precision;\n"  # NULL: not a hit, or unpriced
        + ";\n".join(usage_rollup.add_measure_ddl("postgres", "saved_usd")) + ";",
    ),
    (
        8,  # stored Responses API responses: whose they are, on which upstream (gateway/inbound/responses.py)
        """
        CREATE TABLE stored_responses (
            response_id  text PRIMARY KEY,
            user_id      text NOT NULL,
            workspace_id text NOT NULL,
            model        text NOT NULL,
            upstream     text NOT NULL,
            created_at   double precision NOT NULL
        );
        """,
    ),
    (
        # gw_reserve with the same outcomes, fewer writes: the users' rows are read once
        # (locked in id order, as before) into arrays, each user's row is updated once per
        # call however many of its reservations the call carries, and the ledger rows go
        # in as one INSERT at the end, in the order the elements made them.
        9,
        """
        CREATE OR REPLACE FUNCTION gw_reserve(p_users text[], p_amounts bigint[], p_requests text[],
                                   p_allowances bigint[], p_periods float8[], p_now float8[])
        RETURNS TABLE (o_n integer, o_status text, o_balance bigint, o_refilled bigint)
        LANGUAGE plpgsql AS $$
        DECLARE
            k        integer;
            i        integer;
            v_ids    text[];
            v_energy bigint[];
            v_ats    float8[];
            v_dirty  boolean[];
            v_at     float8;
            v_new_at float8;
            v_now    float8;
            v_period float8;
            v_due    boolean;
            v_bal    bigint;
            l_user   text[] := '{}';
            l_req    text[] := '{}';
            l_kind   text[] := '{}';
            l_amount bigint[] := '{}';
            l_after  bigint[] := '{}';
            l_at     float8[] := '{}';
        BEGIN
            SELECT array_agg(id ORDER BY id), array_agg(energy ORDER BY id), array_agg(refilled_at ORDER BY id)
                INTO v_ids, v_energy, v_ats
                FROM (SELECT u.id, u.energy, u.refilled_at FROM users u WHERE u.id = ANY(p_users) ORDER BY u.id FOR UPDATE) AS locked;
            v_dirty := array_fill(false, ARRAY[coalesce(array_length(v_ids, 1), 0)]);
            FOR k IN 1 .. coalesce(array_length(p_users, 1), 0) LOOP
                o_n := k;
                o_refilled := 0;
                i := array_position(v_ids, p_users[k]);
                IF i IS NULL THEN
                    o_status := 'not_found'; o_balance := NULL; RETURN NEXT; CONTINUE;
                END IF;
                IF EXISTS (SELECT 1 FROM reservations r WHERE r.request_id = p_requests[k]) THEN
                    o_status := 'conflict'; o_balance := v_energy[i]; RETURN NEXT; CONTINUE;
                END IF;
                v_now := p_now[k];
                v_period := p_periods[k];
                v_at := v_ats[i];
                v_due := false;
                v_bal := v_energy[i];
                v_new_at := v_at;
                IF p_allowances[k] IS NOT NULL THEN
                    IF v_at IS NULL THEN
                        v_due := true; v_new_at := v_now;
                    ELSIF v_now - v_at >= v_period THEN
                        v_due := true;
                        v_new_at := v_at + floor((v_now - v_at) / v_period) * v_period;
                        WHILE v_new_at > v_now LOOP v_new_at := v_new_at - v_period; END LOOP;
                        WHILE v_new_at + v_period <= v_now LOOP v_new_at := v_new_at + v_period; END LOOP;
                    END IF;
                    IF v_due THEN
                        v_bal := greatest(v_energy[i], p_allowances[k]);
                        o_refilled := v_bal - v_energy[i];
                    END IF;
                END IF;
                IF v_bal < p_amounts[k] THEN
                    IF v_due THEN
                        v_energy[i] := v_bal; v_ats[i] := v_new_at; v_dirty[i] := true;
                        IF o_refilled > 0 THEN
                            l_user := l_user || p_users[k]; l_req := l_req || NULL::text; l_kind := l_kind || 'refill'::text;
                            l_amount := l_amount || o_refilled; l_after := l_after || v_bal; l_at := l_at || v_now;
                        END IF;
                    END IF;
                    o_status := 'short'; o_balance := v_bal; RETURN NEXT; CONTINUE;
                END IF;
                INSERT INTO reservations (request_id, user_id, amount, status, created_at)
                    VALUES (p_requests[k], p_users[k], p_amounts[k], 'reserved', v_now)
                    ON CONFLICT DO NOTHING;
                IF NOT FOUND THEN
                    o_status := 'conflict'; o_balance := v_energy[i]; RETURN NEXT; CONTINUE;
                END IF;
                v_energy[i] := v_bal - p_amounts[k]; v_ats[i] := v_new_at; v_dirty[i] := true;
                IF o_refilled > 0 THEN
                    l_user := l_user || p_users[k]; l_req := l_req || NULL::text; l_kind := l_kind || 'refill'::text;
                    l_amount := l_amount || o_refilled; l_after := l_after || v_bal; l_at := l_at || v_now;
                END IF;
                l_user := l_user || p_users[k]; l_req := l_req || p_requests[k]; l_kind := l_kind || 'reserve'::text;
                l_amount := l_amount || -p_amounts[k]; l_after := l_after || v_energy[i]; l_at := l_at || v_now;
                o_status := 'ok'; o_balance := v_energy[i]; RETURN NEXT;
            END LOOP;
            UPDATE users u SET energy = d.energy, refilled_at = d.at
                FROM unnest(v_ids, v_energy, v_ats, v_dirty) AS d(id, energy, at, dirty)
                WHERE d.dirty AND u.id = d.id;
            INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                SELECT l.u, l.r, l.k, l.a, l.b, NULL, l.t
                FROM unnest(l_user, l_req, l_kind, l_amount, l_after, l_at) WITH ORDINALITY AS l(u, r, k, a, b, t, n)
                ORDER BY l.n;
        END $$;
        """,
    ),
    (
        # USD exact (gateway/money.py): cost_usd and saved_usd become numeric(20, 9), in the
        # rows and the rollups (usage_rollup.EXACT_USD_IN). Every row is kept, each float as
        # its decimal (PostgreSQL reads 15 significant digits) rounded to 1e-9. Each ALTER
        # rewrites its table (every partition of ai_usage_logs) under an ACCESS EXCLUSIVE
        # lock: inserts and reports wait for it (seconds per million rows).
        usage_rollup.EXACT_USD_IN,
        _exact_usd(),
    ),
    (
        11,  # upstream calls whose answers were discarded (a lost overlapped reservation): per row and rolled up
        "ALTER TABLE ai_usage_logs ADD COLUMN unbilled_calls bigint NOT NULL DEFAULT 0, "
        "ADD COLUMN unbilled_tokens bigint NOT NULL DEFAULT 0, "
        f"ADD COLUMN unbilled_cost_usd {money.SQL_TYPE};\n"  # NULL: none, or unpriced
        + ";\n".join(usage_rollup.add_measure_ddl("postgres", "unbilled_calls")
                     + usage_rollup.add_measure_ddl("postgres", "unbilled_cost_usd")) + ";",
    ),
    (
        12,  # per-key controls (docs/admin.md "Per-key controls"); models: a JSON list, NULL: the tier's
        "ALTER TABLE api_keys ADD COLUMN label text, ADD COLUMN expires_at double precision,"
        " ADD COLUMN models text, ADD COLUMN rpm bigint, ADD COLUMN tpm bigint;",
    ),
    (
        13,  # the change counter (gateway/change_feed.py): polled behind PgBouncer, a fallback to LISTEN
        "CREATE TABLE gw_changes (id integer PRIMARY KEY CHECK (id = 1), counter bigint NOT NULL);"
        " INSERT INTO gw_changes (id, counter) VALUES (1, 0);",
    ),
    (
        # The audit log of admin actions. Append-only: the gateway has no statement that
        # changes or deletes a row, these triggers refuse one, and docs/admin.md shows the
        # GRANTs that keep the gateway's role from dropping them.
        14,
        """
        CREATE TABLE audit_log (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            created_at       double precision NOT NULL,
            actor            text NOT NULL,
            actor_key_id     text,
            actor_key_prefix text,
            via              text NOT NULL,
            action           text NOT NULL,
            target           text,
            workspace_id     text,
            before           jsonb,
            after            jsonb,
            request_id       text
        );
        CREATE INDEX audit_log_time ON audit_log (created_at);
        CREATE INDEX audit_log_workspace ON audit_log (workspace_id, created_at);
        CREATE FUNCTION gw_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'audit_log is append-only';
        END $$;
        CREATE TRIGGER audit_log_no_change BEFORE UPDATE OR DELETE ON audit_log
            FOR EACH ROW EXECUTE FUNCTION gw_audit_append_only();
        CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
            FOR EACH STATEMENT EXECUTE FUNCTION gw_audit_append_only();
        """,
    ),
    (
        15,  # the alerts outbox (gateway/alerts.py): one row per event and endpoint, delivered until acknowledged
        """
        CREATE TABLE alert_outbox (
            id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            event_id        text NOT NULL,
            endpoint        text NOT NULL,
            event_type      text NOT NULL,
            workspace_id    text,
            payload         text NOT NULL,
            status          text NOT NULL DEFAULT 'pending',
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at double precision NOT NULL,
            lease_owner     text,
            lease_until     double precision,
            last_status     integer,
            last_error      text,
            created_at      double precision NOT NULL,
            delivered_at    double precision,
            UNIQUE (event_id, endpoint)
        );
        CREATE INDEX alert_outbox_due ON alert_outbox (status, next_attempt_at);
        CREATE INDEX alert_outbox_workspace ON alert_outbox (workspace_id, created_at);
        """,
    ),
    (
        16,  # end users by the app's own ids (docs/admin.md "End users by your app's ids")
        "ALTER TABLE api_keys ADD COLUMN service boolean NOT NULL DEFAULT false;"
        " ALTER TABLE users ADD COLUMN external_id text;"
        # One user per app id and workspace: what makes find-or-create happen once (ON CONFLICT).
        " CREATE UNIQUE INDEX users_external_id ON users (workspace_id, external_id) WHERE external_id IS NOT NULL;",
    ),
    (
        # Budgets (gateway/budgets.py, docs/budgets.md). Rolling deploys: new tables and new
        # functions only; gw_reserve, gw_finish and the settle statement the previous release
        # calls are unchanged (the new functions call gw_reserve and gw_finish). Nothing is
        # rewritten or locked beyond the new objects. Lock order, every new function:
        # reservations, then budget_spend rows (by budget id, period), then users (by id),
        # as gw_reserve and gw_finish take them: no deadlock among them.
        17,
        """
        CREATE TABLE budgets (
            id           text PRIMARY KEY,
            workspace_id text NOT NULL,
            scope        text NOT NULL,
            scope_id     text NOT NULL,
            unit         text NOT NULL,
            amount       bigint NOT NULL,
            period       text NOT NULL,
            timezone     text NOT NULL,
            alerts       text NOT NULL,
            hard         text NOT NULL,
            created_at   double precision NOT NULL,
            updated_at   double precision NOT NULL,
            UNIQUE (scope, scope_id, unit, period)
        );
        CREATE INDEX budgets_workspace ON budgets (workspace_id);
        CREATE TABLE budget_spend (
            budget_id    text NOT NULL,
            period_start double precision NOT NULL,
            spent        bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (budget_id, period_start)
        );
        CREATE TABLE budget_holds (
            request_id   text NOT NULL,
            budget_id    text NOT NULL,
            period_start double precision NOT NULL,
            unit         text NOT NULL,
            amount       bigint NOT NULL,
            final_amount bigint,
            status       text NOT NULL DEFAULT 'reserved',
            created_at   double precision NOT NULL,
            PRIMARY KEY (request_id, budget_id)
        );
        CREATE INDEX budget_holds_open ON budget_holds (created_at) WHERE status = 'reserved';

        -- gw_reserve with budget holds: p_bk[j] names the element (1-based) hold j belongs to.
        -- Per element, in input order: its enforced budgets must have room ('budget' and the
        -- first refusing budget's id otherwise, nothing written), then gw_reserve decides the
        -- energy; when it is 'ok' the holds are written and o_spent is each hold's budget
        -- spent after it (in the element's hold order).
        CREATE FUNCTION gw_reserve_b(p_users text[], p_amounts bigint[], p_requests text[],
                                     p_allowances bigint[], p_periods float8[], p_now float8[],
                                     p_bk integer[], p_bid text[], p_bstart float8[], p_blimit bigint[],
                                     p_bamount bigint[], p_benforce boolean[], p_bunit text[])
        RETURNS TABLE (o_n integer, o_status text, o_balance bigint, o_refilled bigint, o_budget text,
                       o_spent bigint[])
        LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            k        integer;
            j        integer;
            i        integer;
            s_ids    text[];
            s_starts float8[];
            s_spent  bigint[];
            s_start  bigint[];
            s_keys   text[];
            v_refuse text;
            v_spent  bigint[];
            r        record;
        BEGIN
            INSERT INTO budget_spend (budget_id, period_start, spent)
                SELECT DISTINCT x.b, x.s, 0::bigint FROM unnest(p_bid, p_bstart) AS x(b, s) ORDER BY 1, 2
                ON CONFLICT DO NOTHING;
            SELECT array_agg(l.budget_id ORDER BY l.budget_id, l.period_start),
                   array_agg(l.period_start ORDER BY l.budget_id, l.period_start),
                   array_agg(l.spent ORDER BY l.budget_id, l.period_start),
                   array_agg(l.budget_id || '|' || l.period_start::text ORDER BY l.budget_id, l.period_start)
                INTO s_ids, s_starts, s_spent, s_keys
                FROM (SELECT bs.budget_id, bs.period_start, bs.spent FROM budget_spend bs
                      WHERE (bs.budget_id, bs.period_start) IN (SELECT x.b, x.s FROM unnest(p_bid, p_bstart) AS x(b, s))
                      ORDER BY bs.budget_id, bs.period_start FOR UPDATE) AS l;
            s_start := s_spent;
            PERFORM 1 FROM users u WHERE u.id = ANY(p_users) ORDER BY u.id FOR UPDATE;
            FOR k IN 1 .. coalesce(array_length(p_users, 1), 0) LOOP
                o_n := k; o_budget := NULL; o_spent := NULL; v_refuse := NULL; v_spent := '{}';
                FOR j IN 1 .. coalesce(array_length(p_bk, 1), 0) LOOP
                    IF p_bk[j] = k AND v_refuse IS NULL THEN
                        i := array_position(s_keys, p_bid[j] || '|' || p_bstart[j]::text);
                        IF p_benforce[j] AND s_spent[i] + p_bamount[j] > p_blimit[j] THEN
                            v_refuse := p_bid[j];
                        END IF;
                    END IF;
                END LOOP;
                IF v_refuse IS NOT NULL THEN
                    o_status := 'budget'; o_budget := v_refuse; o_refilled := 0;
                    SELECT u.energy INTO o_balance FROM users u WHERE u.id = p_users[k];
                    IF NOT FOUND THEN o_status := 'not_found'; o_balance := NULL; END IF;
                    RETURN NEXT; CONTINUE;
                END IF;
                SELECT g.o_status AS st, g.o_balance AS bal, g.o_refilled AS ref INTO r
                    FROM gw_reserve(ARRAY[p_users[k]], ARRAY[p_amounts[k]], ARRAY[p_requests[k]],
                                    ARRAY[p_allowances[k]], ARRAY[p_periods[k]], ARRAY[p_now[k]]) AS g;
                o_status := r.st; o_balance := r.bal; o_refilled := r.ref;
                IF r.st = 'ok' THEN
                    FOR j IN 1 .. coalesce(array_length(p_bk, 1), 0) LOOP
                        IF p_bk[j] = k THEN
                            i := array_position(s_keys, p_bid[j] || '|' || p_bstart[j]::text);
                            s_spent[i] := s_spent[i] + p_bamount[j];
                            v_spent := v_spent || s_spent[i];
                            INSERT INTO budget_holds (request_id, budget_id, period_start, unit, amount, created_at)
                                VALUES (p_requests[k], p_bid[j], p_bstart[j], p_bunit[j], p_bamount[j], p_now[k]);
                        END IF;
                    END LOOP;
                    o_spent := v_spent;
                END IF;
                RETURN NEXT;
            END LOOP;
            UPDATE budget_spend bs SET spent = d.spent
                FROM unnest(s_ids, s_starts, s_spent, s_start) AS d(b, s, spent, was)
                WHERE d.spent <> d.was AND bs.budget_id = d.b AND bs.period_start = d.s;
        END $$;

        -- A request's open budget holds follow its reservation, which must still be reserved
        -- (locked here first): refunded, each hold leaves its period's spend; settled, an
        -- energy hold at p_final (NULL: as held), a USD one at p_usd (NULL: as held).
        CREATE FUNCTION gw_finish_holds(p_request text, p_status text, p_final bigint, p_usd bigint)
        RETURNS integer LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            v_n integer;
        BEGIN
            PERFORM 1 FROM budget_spend bs
                WHERE (bs.budget_id, bs.period_start) IN
                    (SELECT h.budget_id, h.period_start FROM budget_holds h
                     WHERE h.request_id = p_request AND h.status = 'reserved')
                ORDER BY bs.budget_id, bs.period_start FOR UPDATE;
            WITH f AS (
                SELECT h.budget_id, h.period_start, h.amount,
                       CASE WHEN p_status = 'refunded' THEN 0
                            WHEN h.unit = 'usd' THEN coalesce(p_usd, h.amount)
                            ELSE least(coalesce(p_final, h.amount), h.amount) END AS final
                FROM budget_holds h WHERE h.request_id = p_request AND h.status = 'reserved'),
            upd AS (
                UPDATE budget_holds h SET status = p_status, final_amount = f.final FROM f
                WHERE h.request_id = p_request AND h.budget_id = f.budget_id RETURNING 1)
            UPDATE budget_spend bs SET spent = bs.spent + (f.final - f.amount) FROM f
                WHERE f.final <> f.amount AND bs.budget_id = f.budget_id AND bs.period_start = f.period_start;
            SELECT count(*) INTO v_n FROM budget_holds h WHERE h.request_id = p_request AND h.status = p_status;
            RETURN v_n;
        END $$;

        -- gw_finish with the request's budget holds, in one transaction.
        CREATE FUNCTION gw_finish_b(p_request text, p_status text, p_final bigint, p_kind text,
                                    p_reason text, p_now float8, p_usd bigint) RETURNS bigint
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM 1 FROM reservations WHERE request_id = p_request AND status = 'reserved' FOR UPDATE;
            IF NOT FOUND THEN
                RETURN NULL;
            END IF;
            PERFORM gw_finish_holds(p_request, p_status, p_final, p_usd);
            RETURN gw_finish(p_request, p_status, p_final, p_kind, p_reason, p_now);
        END $$;

        -- The settle batch (settle_many) with budget holds: p_usd_ids/p_usd the USD finals.
        CREATE FUNCTION gw_settle_b(p_ids text[], p_usd_ids text[], p_usd bigint[], p_now float8)
        RETURNS bigint LANGUAGE plpgsql AS $$
        #variable_conflict use_column
        DECLARE
            v_open text[];
            v_n    bigint;
        BEGIN
            SELECT array_agg(x.request_id ORDER BY x.request_id) INTO v_open
                FROM (SELECT r.request_id FROM reservations r WHERE r.request_id = ANY(p_ids) AND r.status = 'reserved'
                      ORDER BY r.request_id FOR UPDATE) AS x;
            IF v_open IS NULL THEN
                RETURN 0;
            END IF;
            PERFORM 1 FROM budget_spend bs
                WHERE (bs.budget_id, bs.period_start) IN
                    (SELECT h.budget_id, h.period_start FROM budget_holds h
                     WHERE h.request_id = ANY(v_open) AND h.status = 'reserved')
                ORDER BY bs.budget_id, bs.period_start FOR UPDATE;
            WITH f AS (
                SELECT h.request_id, h.budget_id, h.period_start, h.amount,
                       CASE WHEN h.unit = 'usd' THEN coalesce(u.usd, h.amount) ELSE h.amount END AS final
                FROM budget_holds h LEFT JOIN unnest(p_usd_ids, p_usd) AS u(id, usd) ON u.id = h.request_id
                WHERE h.request_id = ANY(v_open) AND h.status = 'reserved'),
            upd AS (
                UPDATE budget_holds h SET status = 'settled', final_amount = f.final FROM f
                WHERE h.request_id = f.request_id AND h.budget_id = f.budget_id RETURNING 1),
            d AS (SELECT f.budget_id, f.period_start, sum(f.final - f.amount) AS delta FROM f GROUP BY 1, 2)
            UPDATE budget_spend bs SET spent = bs.spent + d.delta FROM d
                WHERE d.delta <> 0 AND bs.budget_id = d.budget_id AND bs.period_start = d.period_start;
            WITH s AS (
                UPDATE reservations SET status = 'settled', finished_at = p_now, final_amount = amount
                WHERE request_id = ANY(v_open) AND status = 'reserved' RETURNING request_id, user_id),
            u AS (SELECT id, energy FROM users WHERE id IN (SELECT user_id FROM s) ORDER BY id FOR NO KEY UPDATE),
            l AS (INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)
                  SELECT s.user_id, s.request_id, 'settle', 0, u.energy, NULL, p_now
                  FROM s JOIN u ON u.id = s.user_id ORDER BY s.request_id RETURNING 1)
            SELECT count(*) INTO v_n FROM l;
            RETURN v_n;
        END $$;
        """,
    ),
    (
        # 18: the fine latency histogram (gateway/store/rollup.py), kept by a statement-level
        # trigger over the inserted rows, so an older release's inserts (a rolling deploy) are
        # counted too. No history is read: the rows below live_from_id are the latency_histogram
        # backfill's (gateway/store/backfill.py, registered with migration 20). CREATE TRIGGER
        # waits for the inserts in flight and holds them off until commit, so the sequence's
        # value read after it is exact:
        # every row with a higher id fires the trigger, no row at or below it did.
        usage_rollup.HIST_IN,
        ";\n".join(usage_rollup.hist_ddl("postgres")) + ";\n"
        "CREATE FUNCTION gw_usage_latency_hist() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n    "
        + ";\n    ".join(usage_rollup.hist_keep("postgres", "gw_new_usage")) + ";\n"
        "    RETURN NULL;\nEND $$;\n"
        "CREATE TRIGGER ai_usage_logs_latency_hist AFTER INSERT ON ai_usage_logs"
        " REFERENCING NEW TABLE AS gw_new_usage FOR EACH STATEMENT EXECUTE FUNCTION gw_usage_latency_hist();\n"
        f"INSERT INTO {usage_rollup.HIST_COVERAGE} (id, live_from_id, started_at)"
        " SELECT 1, CASE WHEN is_called THEN last_value + 1 ELSE last_value END, extract(epoch FROM now())"
        " FROM ai_usage_logs_id_seq;",
    ),
    (
        # files and batches: whose each is, on which upstream; a batch's lease and settlement
        # (gateway/batches.py). New tables only: no lock on a table in use.
        19,
        """
        CREATE TABLE gw_files (
            file_id      text PRIMARY KEY,
            user_id      text NOT NULL,
            workspace_id text NOT NULL,
            purpose      text NOT NULL,
            filename     text,
            bytes        bigint,
            upstream     text NOT NULL,
            model        text NOT NULL,
            batch_id     text,
            created_at   double precision NOT NULL
        );
        CREATE INDEX gw_files_user ON gw_files (user_id, created_at);
        CREATE TABLE gw_batches (
            id              text PRIMARY KEY,
            batch_id        text UNIQUE,
            user_id         text NOT NULL,
            workspace_id    text NOT NULL,
            model           text NOT NULL,
            upstream        text NOT NULL,
            endpoint        text NOT NULL,
            input_file_id   text NOT NULL,
            action          text NOT NULL,
            energy_per_line bigint NOT NULL,
            status          text NOT NULL,
            payload         text,
            lines           text NOT NULL,
            next_poll_at    double precision NOT NULL,
            lease_owner     text,
            lease_until     double precision,
            settled_at      double precision,
            created_at      double precision NOT NULL
        );
        CREATE INDEX gw_batches_user ON gw_batches (user_id, created_at);
        CREATE INDEX gw_batches_due ON gw_batches (next_poll_at) WHERE settled_at IS NULL;
        """,
    ),
    (
        # Background backfills (gateway/store/backfill.py): one row each, registered with the
        # usage id range [lo, hi) it covers in the transaction of the migration that needs it;
        # next_id moves down chunk by chunk, in the chunk's own transaction.
        20,
        """
        CREATE TABLE gw_backfills (
            name          text PRIMARY KEY,
            migration     integer NOT NULL,
            lo            bigint NOT NULL,
            hi            bigint NOT NULL,
            next_id       bigint NOT NULL,
            done_rows     bigint NOT NULL DEFAULT 0,
            covered_since double precision,
            lease_owner   text,
            lease_until   double precision,
            registered_at double precision NOT NULL,
            started_at    double precision,
            finished_at   double precision
        );
        """,
    ),
    (
        # The usage spool (Store.spool_usage): rows the database refused until a process's
        # shutdown, as JSON, for any later process (another host, a newer release) to write.
        # Never changed by a later migration: it takes what the usage log would not.
        21,
        """
        CREATE TABLE gw_usage_spool (
            id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            row        text NOT NULL,
            spooled_at double precision NOT NULL
        );
        """,
    ),
    (
        # Dashboard sign-in (gateway/admin/oidc.py): sessions by the hash of their id, pending
        # logins. A schema step only: two new tables, and two nullable columns on audit_log
        # (a catalog change, no rewrite of the table; its lock is held for an instant).
        22,
        """
        CREATE TABLE dashboard_sessions (
            id_hash      text PRIMARY KEY,
            subject      text NOT NULL,
            email        text,
            role         text NOT NULL,
            workspace_id text,
            created_at   double precision NOT NULL,
            expires_at   double precision NOT NULL
        );
        CREATE INDEX dashboard_sessions_expiry ON dashboard_sessions (expires_at);
        CREATE TABLE oidc_logins (
            state_hash    text PRIMARY KEY,
            browser_hash  text NOT NULL,
            nonce         text NOT NULL,
            code_verifier text NOT NULL,
            redirect_uri  text NOT NULL,
            created_at    double precision NOT NULL,
            expires_at    double precision NOT NULL
        );
        CREATE INDEX oidc_logins_expiry ON oidc_logins (expires_at);
        ALTER TABLE audit_log ADD COLUMN actor_subject text, ADD COLUMN actor_email text;
        """,
    ),
]

# Array types for the one-statement batch insert (unnest of one array per column).
_PG_ARRAY = {"text": "text[]", "int": "bigint[]", "usd": "numeric[]", "bool": "bool[]",
             "time": "timestamptz[]"}
_COLS = ", ".join(USAGE_COLUMNS)
# One statement per batch: claim the request ids (a retried row finds its id claimed and is
# skipped; the first of two copies in one batch wins), insert the rows, add them to the
# rollups (migration 3). Its one result is the count of rows inserted.
_USAGE_INSERT = (
    "WITH batch AS (SELECT * FROM unnest("
    + ", ".join(f"${i}::{_PG_ARRAY[kind]}" for i, kind in enumerate(USAGE_COLUMNS.values(), 1))
    + f") WITH ORDINALITY AS b({_COLS}, n)),"
    " claimed AS (INSERT INTO ai_usage_request_ids (request_id, created_at)"
    "  SELECT request_id, min(created_at) FROM batch WHERE request_id IS NOT NULL GROUP BY request_id"
    "  ON CONFLICT DO NOTHING RETURNING request_id),"
    f" ins AS (INSERT INTO ai_usage_logs ({_COLS})"
    f"  SELECT {_COLS} FROM (SELECT DISTINCT ON (request_id) * FROM batch"
    "   WHERE request_id IN (SELECT request_id FROM claimed) ORDER BY request_id, n) AS fresh"
    f"  UNION ALL SELECT {_COLS} FROM batch WHERE request_id IS NULL RETURNING *), "
    + ", ".join(f"roll_{i} AS ({sql})" for i, sql in enumerate(usage_rollup.backfill("postgres", "ins")))
    + " SELECT count(*) FROM ins"
)

# Store.backfill_latency_histogram: the usage rows with ids in [$1, $2) into the fine histogram.
_HIST_BACKFILL = usage_rollup.hist_keep("postgres", where="u.id >= $1 AND u.id < $2")

_RESERVE = "SELECT o_n, o_status, o_balance, o_refilled FROM gw_reserve($1, $2, $3, $4, $5, $6)"
_RESERVE_B = ("SELECT o_n, o_status, o_balance, o_refilled, o_budget, o_spent"
              " FROM gw_reserve_b($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)")
_CREATED_AT = list(USAGE_COLUMNS).index("created_at")
_USER_COLS = "id, workspace_id, name, tier, energy, refilled_at, created_at, disabled, external_id"
_KEY_COLS = ("id, user_id, workspace_id, prefix, role, created_at, revoked_at, label, expires_at, models, rpm, tpm,"
             " service")
_LEDGER_COLS = "id, user_id, request_id, kind, amount, balance_after, reason, created_at"


def _workspace(r: asyncpg.Record) -> Workspace:
    return Workspace(r["id"], r["name"], json.loads(r["profile"]), json.loads(r["ai_settings"]),
                     r["created_at"])


def _user(r: asyncpg.Record) -> User:
    return User(r["id"], r["workspace_id"], r["name"], r["tier"], r["energy"], r["refilled_at"],
                r["created_at"], r["disabled"], r["external_id"])


def _key(r: asyncpg.Record) -> ApiKey:
    return ApiKey(r["id"], r["user_id"], r["workspace_id"], r["prefix"], r["role"],
                  r["created_at"], r["revoked_at"], r["label"], r["expires_at"], stored_key_models(r["models"]),
                  r["rpm"], r["tpm"], r["service"])


def _entry(r: asyncpg.Record) -> EnergyEntry:
    return EnergyEntry(r["id"], r["user_id"], r["request_id"], r["kind"], r["amount"],
                       r["balance_after"], r["reason"], r["created_at"])


# Reservations sent in one gw_reserve call at most (a busier loop turn makes several).
RESERVE_GROUP = 256
# gw_reserve calls in flight at most per process; the reservations arriving meanwhile wait
# for one to return and go together. A call costs PostgreSQL ~200 us of CPU whatever its
# size, each reservation in it ~70 us: unbounded, a third of the calls carried one
# reservation (one user under load: they queue on its row lock anyway). Capped at 2,
# bench/cpu_per_request.py on PostgreSQL, same session, alternated: mean call 5.8 -> 10.5
# reservations, PostgreSQL CPU per request 208-260 -> 148-168 us, the gateway's 351-426 ->
# 266-336 us (a cap of 1: 16 per call, the same CPU, no two calls ever overlapping).
RESERVE_IN_FLIGHT = 2
# Seconds after which a call in flight no longer counts toward RESERVE_IN_FLIGHT: it waits
# on a row lock (another process's or an admin's transaction, a slow gw_finish), and the
# other users' reservations must not queue behind it until store.timeout. PostgreSQL
# answers in ~0.2-1 ms, but the loop sees the answer later when busy: bench/cpu_per_request.py
# on PostgreSQL (wrk at 32 connections, the gateway's loop saturated), from send to return:
# median 6-7 ms, p99 22-24 ms, max 39-59 ms. Well past that, so a busy loop does not pass
# for a lock (more, smaller calls), and short beside store.timeout (seconds).
RESERVE_STALLED = 0.1


class _Connection(asyncpg.Connection):
    """No reset query on release: the store keeps no session state (every setting it makes
    is SET LOCAL, every lock transaction-scoped), so asyncpg's default reset (advisory
    unlock, CLOSE ALL, UNLISTEN, RESET ALL) would only cost a round trip per operation, and
    behind PgBouncer in transaction mode it would run on whichever server it lands on. An
    open transaction is still rolled back (asyncpg does that whatever this returns)."""

    def get_reset_query(self) -> str:
        return ""


# What a database that cannot answer at all raises (refused, reset, timed out, restarting).
_UNREACHABLE = (asyncio.TimeoutError, OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError)

class PostgresStore(Store):
    schema_known: tuple[int, ...] = tuple(v for v, _ in MIGRATIONS)
    def __init__(self, dsn: str, *, schema: str | None = None, url: str | None = None,
                 pool_min_size: int = 1, pool_max_size: int = 10, timeout: float | None = None,
                 connect_timeout: float = 10.0, pgbouncer: bool = False,
                 statement_cache_size: int | None = None) -> None:
        self.dsn = dsn
        self.schema = schema
        self.url = url or dsn
        self.pool_min_size = pool_min_size
        self.pool_max_size = pool_max_size
        # Seconds a reservation may take (a pooled connection and the gw_reserve call); past
        # it the request fails (closed) with StoreUnavailable. None: no bound.
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pgbouncer = pgbouncer
        # Behind PgBouncer (transaction pooling) a named prepared statement would outlive
        # its transaction on a server connection the next transaction may not get.
        self.statement_cache_size = (0 if pgbouncer else 100) if statement_cache_size is None \
            else statement_cache_size
        self._pool: asyncpg.Pool | None = None
        self._partitions: set[tuple[int, int]] = set()  # (year, month) of the usage partitions made
        # The reservation queue (reserve_energy_soon, _send_reservations): the reservations not
        # sent yet; the gw_reserve calls in flight, each with its start (loop time) and its
        # users; the users whose last call ran out of store.timeout (a row lock held
        # elsewhere, most likely).
        self._reserving: list[tuple] = []
        self._reserve_calls: dict[asyncio.Task, tuple[float, frozenset[str]]] = {}
        self._reserve_timed_out: set[str] = set()
        self._send_handle: asyncio.Handle | None = None

    # ------------------------------------------------------------------ plumbing

    async def open(self, *, migrate: bool = True) -> None:
        if self._pool is not None:
            return
        # Behind PgBouncer a startup parameter is not carried to the server connections a
        # transaction lands on: there the schema comes from PgBouncer (connect_query) or
        # the role's search_path, and open() checks it is the configured one.
        settings = {"search_path": self.schema} if self.schema and not self.pgbouncer else None
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=min(self.pool_min_size, self.pool_max_size), max_size=self.pool_max_size,
            server_settings=settings, statement_cache_size=self.statement_cache_size,
            timeout=self.connect_timeout, connection_class=_Connection,
        )
        try:
            if self.schema and self.pgbouncer:
                path = (await self._fetchrow("SELECT current_setting('search_path') AS p"))["p"]
                if path.split(",")[0].strip().strip('"') != self.schema:
                    raise RuntimeError(
                        f"store.pgbouncer: the server connections' search_path is {path!r},"
                        f" not {self.schema!r}: set it in PgBouncer (connect_query) or on the role")
            if migrate:
                await self.migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        while self._reserving or self._reserve_calls:  # the queued ones go out before the pool closes
            self._send_reservations(force=True)
            await asyncio.gather(*self._reserve_calls, return_exceptions=True)
        if self._send_handle is not None:
            self._send_handle.cancel()
            self._send_handle = None
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    async def ping(self) -> bool:
        try:
            async with self.pool.acquire() as conn:
                return await conn.fetchval("SELECT 1") == 1
        except Exception:
            return False

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open")
        return self._pool

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[asyncpg.Connection]:
        """One transaction on one pooled connection; unique/foreign-key violations are
        reported as StoreConflict/NotFound after the rollback."""
        try:
            async with self.pool.acquire() as conn:
                async with conn.transaction():
                    yield conn
        except asyncpg.UniqueViolationError as exc:
            raise StoreConflict(exc.detail or str(exc)) from exc
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(exc.detail or str(exc)) from exc

    @asynccontextmanager
    async def _single(self) -> AsyncIterator[asyncpg.Connection]:
        """A pooled connection for one statement, its own (implicit) transaction: no
        BEGIN/COMMIT round trips. Errors reported as by _tx."""
        try:
            async with self.pool.acquire() as conn:
                yield conn
        except asyncpg.UniqueViolationError as exc:
            raise StoreConflict(exc.detail or str(exc)) from exc
        except asyncpg.ForeignKeyViolationError as exc:
            raise NotFound(exc.detail or str(exc)) from exc

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        try:
            async with self.pool.acquire() as conn:
                return await conn.fetchrow(sql, *args)
        except _UNREACHABLE as exc:  # a lookup the request needs (a key, a workspace): fail closed, say so
            raise StoreUnavailable(f"the database did not answer ({type(exc).__name__})") from exc

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        try:
            async with self.pool.acquire() as conn:
                return await conn.fetch(sql, *args)
        except _UNREACHABLE as exc:
            raise StoreUnavailable(f"the database did not answer ({type(exc).__name__})") from exc

    async def migrate(self) -> list[int]:
        """Apply the pending migrations in one transaction under the schema's advisory lock
        (gateway/store/migrations.py): with `lock_timeout`, retried LOCK_TRIES times, then
        MigrationLockTimeout; the concurrent indexes after it; SchemaTooNew when a later
        release's contract step is applied."""
        for attempt in range(1, migrations.LOCK_TRIES + 1):
            try:
                applied = await self._migrate_once()
                break
            except asyncpg.LockNotAvailableError as exc:
                if attempt == migrations.LOCK_TRIES:
                    raise migrations.MigrationLockTimeout(
                        f"the migration could not take its locks in {attempt} tries (lock_timeout"
                        f" {migrations.LOCK_TIMEOUT} each): a long transaction holds a table it changes ({exc});"
                        " find it in pg_stat_activity, then run ./gw migrate again") from exc
                log.warning("migration_lock_timeout", attempt=attempt, retry_in_s=0.5 * attempt)
                await asyncio.sleep(0.5 * attempt)
        await self._ensure_concurrent_indexes()
        return applied

    async def _migrate_once(self) -> list[int]:
        applied: list[int] = []
        async with self._tx() as conn:
            # Keyed by schema: independent schemas migrate independently.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))",
                               f"gateway.store.migrations:{self.schema or ''}")
            await conn.execute(f"SET LOCAL lock_timeout = '{migrations.LOCK_TIMEOUT}'")
            # Only what is missing is created: a gateway whose role may not create (docs/admin.md
            # "Audit log", the GRANTs) opens a schema its owner migrated.
            if self.schema and not await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
                await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                           version    integer PRIMARY KEY,
                           applied_at double precision NOT NULL
                       )"""
                )
            if not await conn.fetchval("SELECT 1 FROM pg_attribute WHERE attrelid = 'schema_migrations'::regclass"
                                       " AND attname = 'min_code'"):
                # The lowest schema version a gateway must know to serve on it (migrations.MIN_CODE).
                await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS min_code integer")
            done = {r["version"]: r["min_code"]
                    for r in await conn.fetch("SELECT version, min_code FROM schema_migrations")}
            unknown = migrations.check_compatible(done, migrations.latest(v for v, _ in MIGRATIONS))
            if unknown:
                log.warning("schema_newer_expand_only", unknown=unknown,
                            hint="a newer release migrated this store; its steps are expand-only, so this one serves")
            for version, sql in MIGRATIONS:
                if version in done:
                    continue
                await conn.execute(migrations.split_concurrent(sql)[0])
                await conn.execute(
                    "INSERT INTO schema_migrations (version, applied_at, min_code) VALUES ($1, $2, $3)",
                    version, time.time(), migrations.MIN_CODE.get(version),
                )
                applied.append(version)
            registered = ([r["name"] for r in await conn.fetch("SELECT name FROM gw_backfills")]
                          if await conn.fetchval("SELECT to_regclass('gw_backfills')") is not None else [])
            for job in backfill.to_register(applied, done, registered):  # the history of what these added
                await conn.execute(backfill.registration_sql("postgres", job, time.time()))
        return applied

    async def _ensure_concurrent_indexes(self) -> None:
        """The migrations' CREATE INDEX CONCURRENTLY statements, outside any transaction:
        built when missing, rebuilt when a build died half-way (an invalid index). A catalog
        lookup when all are there."""
        wanted = [(version, statement) for version, sql in MIGRATIONS
                  for statement in migrations.split_concurrent(sql)[1]]
        if not wanted:
            return
        async with self.pool.acquire() as conn:
            done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
            for version, statement in wanted:
                if version not in done:
                    continue
                name = migrations.index_name(statement)
                valid = await conn.fetchval("SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)",
                                            name)
                if valid:
                    continue
                if self.pgbouncer:  # a session lock would outlive its transaction on a shared server connection
                    raise migrations.MigrationError(
                        f"index {name} (migration {version}) must be built concurrently, which needs a"
                        " session of its own: run ./gw migrate with a store.url that bypasses PgBouncer")
                lock = f"gateway.store.indexes:{self.schema or ''}"
                await conn.execute("SELECT pg_advisory_lock(hashtext($1))", lock)
                try:  # under the lock, again: another process may have built it meanwhile
                    valid = await conn.fetchval(
                        "SELECT i.indisvalid FROM pg_index i WHERE i.indexrelid = to_regclass($1)", name)
                    if valid is False:
                        await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
                    if not valid:
                        log.info("index_building", index=name, migration=version)
                        await conn.execute(migrations.if_not_exists(statement))
                finally:
                    await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", lock)

    async def schema_versions(self) -> dict[int, int | None]:
        """Applied migration -> its min_code ({} for a new database); changes nothing."""
        async with self.pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
                return {}
            has_min = await conn.fetchval("SELECT 1 FROM pg_attribute WHERE attrelid = 'schema_migrations'::regclass"
                                          " AND attname = 'min_code'")
            rows = await conn.fetch("SELECT version, " + ("min_code" if has_min else "NULL::integer AS min_code")
                                    + " FROM schema_migrations")
        return {r["version"]: r["min_code"] for r in rows}

    # ----------------------------------------------------------------- backfills

    async def backfill_states(self):
        async with self.pool.acquire() as conn:
            if await conn.fetchval("SELECT to_regclass('gw_backfills')") is None:
                return []
            rows = await conn.fetch(f"SELECT {', '.join(backfill.STATE_COLUMNS)} FROM gw_backfills ORDER BY name")
        return [dict(r) for r in rows]

    async def backfill_step(self, job, owner, rows, *, lease, now=None):
        now = now_or(now)
        async with self._tx() as conn:
            state = await conn.fetchrow(f"SELECT {', '.join(backfill.STATE_COLUMNS)} FROM gw_backfills"
                                        " WHERE name = $1 FOR UPDATE", job.name)
            if state is None:
                return None
            state = dict(state)
            if state["finished_at"] is not None:
                return state
            if state["lease_owner"] not in (None, owner) and (state["lease_until"] or 0) > now:
                return None
            hi = state["next_id"]
            lo = max(state["lo"], hi - int(rows))
            for sql in job.chunk("postgres", lo, hi):
                await conn.execute(sql)
            count, oldest = await conn.fetchrow(
                "SELECT count(*), extract(epoch FROM min(created_at))::float8 FROM ai_usage_logs"
                " WHERE id >= $1 AND id < $2", lo, hi)
            covered = state["covered_since"] if oldest is None else min(oldest, state["covered_since"] or oldest)
            finished = now if lo <= state["lo"] else None
            row = await conn.fetchrow(
                "UPDATE gw_backfills SET next_id = $2, done_rows = done_rows + $3, covered_since = $4,"
                " lease_owner = $5, lease_until = $6, started_at = COALESCE(started_at, $7), finished_at = $8"
                f" WHERE name = $1 RETURNING {', '.join(backfill.STATE_COLUMNS)}",
                job.name, lo, count, covered, None if finished else owner, None if finished else now + lease,
                now, finished)
        return dict(row)

    async def spool_usage(self, rows, *, now=None):
        texts = [orjson.dumps(r, default=money.json_default).decode() for r in rows]
        async with self._single() as conn:
            await conn.execute("INSERT INTO gw_usage_spool (row, spooled_at) SELECT unnest($1::text[]), $2",
                               texts, now_or(now))
        return len(texts)

    async def drain_usage_spool(self, limit=500):
        spooled = await self._fetch("SELECT id, row FROM gw_usage_spool ORDER BY id LIMIT $1", limit)
        if not spooled:
            return 0
        await self.insert_usage([orjson.loads(r["row"]) for r in spooled])
        async with self._single() as conn:
            await conn.execute("DELETE FROM gw_usage_spool WHERE id = ANY($1::bigint[])", [r["id"] for r in spooled])
        return len(spooled)

    async def usage_id_rows(self, lo=None, hi=None):
        row = await self._fetchrow(
            "SELECT count(*) AS n FROM ai_usage_logs"
            " WHERE ($1::bigint IS NULL OR id >= $1) AND ($2::bigint IS NULL OR id < $2)", lo, hi)
        return row["n"]

    # --------------------------------------------------------------------- audit

    async def append_audit(self, entry, *, now=None):
        values = [json.dumps(entry.get(c)) if c in ("before", "after") else entry.get(c) for c in AUDIT_COLUMNS]
        async with self._single() as conn:
            await conn.execute(
                f"INSERT INTO audit_log (created_at, {', '.join(AUDIT_COLUMNS)}) VALUES ($1, "
                + ", ".join(f"${i}{'::jsonb' if c in ('before', 'after') else ''}"
                            for i, c in enumerate(AUDIT_COLUMNS, 2)) + ")",
                now_or(now), *values)

    async def audit_entries(self, *, workspace_id=None, since=None, limit=100):
        rows = await self._fetch(
            f"SELECT id, created_at, {', '.join(AUDIT_COLUMNS)} FROM audit_log"
            " WHERE ($1::text IS NULL OR workspace_id = $1) AND ($2::float8 IS NULL OR created_at >= $2)"
            " ORDER BY id DESC LIMIT $3", workspace_id, since, limit)
        out = []
        for r in rows:
            entry = dict(r)
            entry["before"], entry["after"] = json.loads(entry["before"]), json.loads(entry["after"])
            out.append(entry)
        return out

    # ------------------------------------------------------ dashboard sign-in sessions

    async def create_dashboard_session(self, row):
        async with self._tx() as conn:
            now = row["created_at"]
            await conn.execute("DELETE FROM dashboard_sessions WHERE expires_at < $1", now)
            await conn.execute("DELETE FROM oidc_logins WHERE expires_at < $1", now)
            await conn.execute(
                f"INSERT INTO dashboard_sessions ({', '.join(DASHBOARD_SESSION_COLUMNS)}) VALUES ("
                + ", ".join(f"${i}" for i in range(1, len(DASHBOARD_SESSION_COLUMNS) + 1)) + ")",
                *(row.get(c) for c in DASHBOARD_SESSION_COLUMNS))

    async def dashboard_session(self, id_hash):
        r = await self._fetchrow(
            f"SELECT {', '.join(DASHBOARD_SESSION_COLUMNS)} FROM dashboard_sessions WHERE id_hash = $1", id_hash)
        return None if r is None else dict(r)

    async def delete_dashboard_session(self, id_hash):
        async with self._single() as conn:
            done = await conn.execute("DELETE FROM dashboard_sessions WHERE id_hash = $1", id_hash)
        return done != "DELETE 0"

    async def create_oidc_login(self, row, *, limit=None):
        async with self._tx() as conn:
            await conn.execute("DELETE FROM oidc_logins WHERE expires_at < $1", row["created_at"])
            if limit is not None and await conn.fetchval("SELECT count(*) FROM oidc_logins") >= limit:
                return False
            await conn.execute(
                f"INSERT INTO oidc_logins ({', '.join(OIDC_LOGIN_COLUMNS)}) VALUES ("
                + ", ".join(f"${i}" for i in range(1, len(OIDC_LOGIN_COLUMNS) + 1)) + ")",
                *(row.get(c) for c in OIDC_LOGIN_COLUMNS))
        return True

    async def take_oidc_login(self, state_hash):
        async with self._single() as conn:
            r = await conn.fetchrow(
                f"DELETE FROM oidc_logins WHERE state_hash = $1 RETURNING {', '.join(OIDC_LOGIN_COLUMNS)}", state_hash)
        return None if r is None else dict(r)

    # -------------------------------------------------------------------- alerts

    async def enqueue_alerts(self, rows, *, now=None):
        if not rows:
            return 0
        now = now_or(now)
        async with self._single() as conn:
            inserted = await conn.fetchval(
                "WITH added AS (INSERT INTO alert_outbox (event_id, endpoint, event_type, workspace_id, payload,"
                " next_attempt_at, created_at) SELECT *, $6::float8, $6::float8 FROM"
                " unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])"
                " ON CONFLICT (event_id, endpoint) DO NOTHING RETURNING 1) SELECT count(*) FROM added",
                [r["event_id"] for r in rows], [r["endpoint"] for r in rows], [r["event_type"] for r in rows],
                [r.get("workspace_id") for r in rows], [r["payload"] for r in rows], now)
        return int(inserted)

    async def claim_alerts(self, owner, *, lease, limit, now=None):
        now = now_or(now)
        # SKIP LOCKED: two processes claiming at once take different rows, neither waits;
        # the lease keeps a claimed row from being claimed again while it is delivered.
        async with self._single() as conn:
            rows = await conn.fetch(
                f"UPDATE alert_outbox SET lease_owner = $1, lease_until = $2 + $3::float8 WHERE id IN ("
                " SELECT id FROM alert_outbox WHERE status = 'pending' AND next_attempt_at <= $2"
                " AND (lease_until IS NULL OR lease_until < $2) ORDER BY id LIMIT $4 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {', '.join(OUTBOX_CLAIMED)}", owner, now, float(lease), limit)
        return sorted((dict(r) for r in rows), key=lambda r: r["id"])

    async def finish_alert(self, row_id, owner, *, status, attempts, next_attempt_at, last_status=None,
                           last_error=None, now=None):
        now = now_or(now)
        async with self._single() as conn:
            done = await conn.execute(
                "UPDATE alert_outbox SET status = $1, attempts = $2, next_attempt_at = $3, last_status = $4,"
                " last_error = $5, delivered_at = $6, lease_owner = NULL, lease_until = NULL"
                " WHERE id = $7 AND lease_owner = $8 AND status = 'pending'",
                status, attempts, next_attempt_at, last_status, last_error,
                now if status == "delivered" else None, row_id, owner)
        return done.endswith(" 1")

    async def prune_alerts(self, *, older_than, limit, now=None):
        cutoff = now_or(now) - older_than
        # the (status, next_attempt_at) index finds them; LIMIT bounds the rows locked;
        # SKIP LOCKED: a row another process is finishing is left to the next pass
        async with self._single() as conn:
            done = await conn.execute(
                "DELETE FROM alert_outbox WHERE id IN (SELECT id FROM alert_outbox"
                " WHERE status IN ('delivered', 'failed') AND next_attempt_at < $1 LIMIT $2 FOR UPDATE SKIP LOCKED)",
                cutoff, limit)
        return int(done.split()[-1])

    async def alert_deliveries(self, *, workspace_id=None, status=None, since=None, limit=100, event_id=None):
        rows = await self._fetch(
            f"SELECT {', '.join(OUTBOX_LISTED)} FROM alert_outbox"
            " WHERE ($1::text IS NULL OR workspace_id = $1) AND ($2::text IS NULL OR status = $2)"
            " AND ($3::float8 IS NULL OR created_at >= $3) AND ($5::text IS NULL OR event_id = $5)"
            " ORDER BY id DESC LIMIT $4", workspace_id, status, since, limit, event_id)
        return [dict(r) for r in rows]

    # ------------------------------------------------------------------- changes

    @property
    def change_channel(self) -> str:
        """The NOTIFY channel of this schema's gateways (a schema's name may be longer than a channel's)."""
        return "gw_changes_" + hashlib.sha256((self.schema or "").encode()).hexdigest()[:16]

    async def publish_change(self, target):
        async with self._tx() as conn:  # NOTIFY is delivered when this commits
            await conn.execute("UPDATE gw_changes SET counter = counter + 1 WHERE id = 1")
            await conn.execute("SELECT pg_notify($1, $2)", self.change_channel, target)

    async def change_counter(self):
        return (await self._fetchrow("SELECT counter FROM gw_changes WHERE id = 1"))["counter"]

    async def listen_changes(self, on_change, on_lost):
        """LISTEN on a connection of its own (not the pool's). Behind PgBouncer's transaction
        pooling a LISTEN does not survive its transaction: None there (the counter is polled)."""
        if self.pgbouncer:
            return None
        conn = await asyncpg.connect(self.dsn, timeout=self.connect_timeout)
        conn.add_termination_listener(lambda _conn: on_lost())
        await conn.add_listener(self.change_channel, lambda _c, _pid, _channel, payload: on_change(payload))

        async def close() -> None:
            if not conn.is_closed():
                await conn.close(timeout=2)

        return close


    async def create_workspace(self, name, profile=None, ai_settings=None, *, now=None):
        check_workspace_name(name)
        ws = Workspace(new_id("ws"), name, dict(profile or {}), dict(ai_settings or {}),
                       now_or(now))
        async with self._tx() as conn:
            inserted = await conn.fetchval(
                "INSERT INTO workspaces (id, name, profile, ai_settings, created_at)"
                " VALUES ($1, $2, $3::jsonb, $4::jsonb, $5)"
                " ON CONFLICT (name) DO NOTHING RETURNING 1",
                ws.id, name, json.dumps(ws.profile), json.dumps(ws.ai_settings), ws.created_at,
            )
            if not inserted:
                raise StoreConflict(f"workspace name {name!r} is taken")
        return ws

    async def get_workspace(self, id_or_name):
        r = await self._fetchrow("SELECT * FROM workspaces WHERE id = $1 OR name = $1", id_or_name)
        return None if r is None else _workspace(r)

    async def list_workspaces(self):
        return [_workspace(r) for r in
                await self._fetch("SELECT * FROM workspaces ORDER BY created_at, id")]

    async def update_workspace(self, workspace_id, profile=None, ai_settings=None):
        async with self._tx() as conn:
            r = await conn.fetchrow(
                "UPDATE workspaces SET profile = COALESCE($2::jsonb, profile),"
                " ai_settings = COALESCE($3::jsonb, ai_settings) WHERE id = $1 RETURNING *",
                workspace_id,
                None if profile is None else json.dumps(profile),
                None if ai_settings is None else json.dumps(ai_settings),
            )
            if r is None:
                raise NotFound(f"workspace {workspace_id!r}")
        return _workspace(r)

    # --------------------------------------------------------------------- users

    async def create_user(self, workspace_id, tier, *, name=None, energy=0,
                          start_refill_period=False, now=None):
        check_tier(tier)
        check_amount(energy, "energy")
        created_at = now_or(now)
        user = User(new_id("usr"), workspace_id, name, tier, energy,
                    created_at if start_refill_period else None, created_at, False)
        async with self._tx() as conn:
            if not await conn.fetchval("SELECT 1 FROM workspaces WHERE id = $1", workspace_id):
                raise NotFound(f"workspace {workspace_id!r}")
            await conn.execute(
                f"INSERT INTO users ({_USER_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, false, NULL)",
                user.id, workspace_id, name, tier, energy, user.refilled_at, user.created_at,
            )
            if energy > 0:
                await self._ledger_row(conn, user.id, None, "grant", energy, energy,
                                       "initial energy", user.created_at)
        return user

    async def end_user(self, workspace_id, external_id, *, tier, energy, start_refill_period=False, now=None):
        check_tier(tier)
        check_amount(energy, "energy")
        select = f"SELECT {_USER_COLS} FROM users WHERE workspace_id = $1 AND external_id = $2"
        found = await self._fetchrow(select, workspace_id, external_id)
        if found is not None:
            return _user(found), False
        created_at = now_or(now)
        user = User(new_id("usr"), workspace_id, None, tier, energy,
                    created_at if start_refill_period else None, created_at, False, external_id)
        async with self._tx() as conn:
            # A concurrent insert of the same id waits for the other transaction; if it
            # committed, nothing is inserted here and the next statement (a new snapshot in
            # READ COMMITTED) reads its user.
            inserted = await conn.fetchval(
                f"INSERT INTO users ({_USER_COLS}) SELECT $1, $2, NULL, $3, $4, $5, $6, false, $7"
                "  WHERE EXISTS (SELECT 1 FROM workspaces WHERE id = $2)"
                " ON CONFLICT (workspace_id, external_id) WHERE external_id IS NOT NULL DO NOTHING RETURNING 1",
                user.id, workspace_id, tier, energy, user.refilled_at, created_at, external_id,
            )
            if inserted:
                if energy > 0:
                    await self._ledger_row(conn, user.id, None, "grant", energy, energy, "initial energy", created_at)
                return user, True
            r = await conn.fetchrow(select, workspace_id, external_id)
            if r is None:
                raise NotFound(f"workspace {workspace_id!r}")
            return _user(r), False

    async def get_user(self, user_id):
        r = await self._fetchrow(f"SELECT {_USER_COLS} FROM users WHERE id = $1", user_id)
        return None if r is None else _user(r)

    async def list_users(self, workspace_id=None):
        rows = await self._fetch(
            f"SELECT {_USER_COLS} FROM users WHERE $1::text IS NULL OR workspace_id = $1"
            " ORDER BY created_at, id",
            workspace_id,
        )
        return [_user(r) for r in rows]

    async def _update_user(self, user_id: str, assignment: str, value: Any) -> User:
        async with self._tx() as conn:
            r = await conn.fetchrow(
                f"UPDATE users SET {assignment} WHERE id = $1 RETURNING {_USER_COLS}",
                user_id, value,
            )
            if r is None:
                raise NotFound(f"user {user_id!r}")
        return _user(r)

    async def set_tier(self, user_id, tier):
        check_tier(tier)
        return await self._update_user(user_id, "tier = $2", tier)

    async def set_user_disabled(self, user_id, disabled):
        return await self._update_user(user_id, "disabled = $2", bool(disabled))

    # ---------------------------------------------------------------------- keys

    async def create_key(self, user_id, role="user", *, service=False, now=None, **controls):
        check_role(role)
        values = key_control_values(controls)
        async with self._tx() as conn:
            return await self._insert_key(conn, user_id, role, now_or(now), values, bool(service))

    async def update_key(self, key_id, **controls):
        values = key_control_values(controls)
        async with self._tx() as conn:
            if values:
                sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(values, 2))
                r = await conn.fetchrow(f"UPDATE api_keys SET {sets} WHERE id = $1 RETURNING {_KEY_COLS}",
                                        key_id, *values.values())
            else:
                r = await conn.fetchrow(f"SELECT {_KEY_COLS} FROM api_keys WHERE id = $1", key_id)
            if r is None:
                raise NotFound(f"key {key_id!r}")
        return _key(r)

    @staticmethod
    async def _insert_key(conn, user_id: str, role: str, now: float,
                          controls: dict[str, Any] | None = None, service: bool = False) -> tuple[str, ApiKey]:
        """`controls`: per-key controls as stored (key_control_values)."""
        workspace_id = await conn.fetchval("SELECT workspace_id FROM users WHERE id = $1",
                                           user_id)
        if workspace_id is None:
            raise NotFound(f"user {user_id!r}")
        plaintext, digest, prefix = new_api_key()
        values = [(controls or {}).get(name) for name in KEY_CONTROLS]
        r = await conn.fetchrow(
            "INSERT INTO api_keys (id, user_id, workspace_id, key_hash, prefix, role, created_at, service,"
            f" {', '.join(KEY_CONTROLS)}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            f" RETURNING {_KEY_COLS}",
            new_id("key"), user_id, workspace_id, digest, prefix, role, now, service, *values,
        )
        return plaintext, _key(r)

    async def lookup_key(self, plaintext):
        r = await self._fetchrow(
            """SELECT k.id, k.prefix, k.role, k.user_id, k.workspace_id, k.revoked_at,
                      k.expires_at, k.models, k.rpm, k.tpm, k.service, u.tier, u.disabled
                 FROM api_keys k JOIN users u ON u.id = k.user_id
                WHERE k.key_hash = $1""",
            hash_key(plaintext),
        )
        if r is None:
            return None
        return KeyIdentity(r["id"], r["prefix"], r["role"], r["user_id"], r["workspace_id"],
                           r["tier"], r["disabled"], r["revoked_at"] is not None,
                           r["expires_at"], stored_key_models(r["models"]), r["rpm"], r["tpm"], r["service"])

    async def revoke_key(self, key_id, *, now=None):
        async with self._tx() as conn:
            r = await conn.fetchrow(
                "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1"
                f" RETURNING {_KEY_COLS}",
                key_id, now_or(now),
            )
            if r is None:
                raise NotFound(f"key {key_id!r}")
        return _key(r)

    async def rotate_key(self, key_id, *, now=None):
        now = now_or(now)
        async with self._tx() as conn:
            old = await conn.fetchrow(
                f"SELECT user_id, role, revoked_at, service, {', '.join(KEY_CONTROLS)} FROM api_keys"
                " WHERE id = $1 FOR UPDATE",
                key_id
            )
            if old is None:
                raise NotFound(f"key {key_id!r}")
            if old["revoked_at"] is not None:
                raise StoreConflict(f"key {key_id!r} is revoked and cannot be rotated")
            await conn.execute("UPDATE api_keys SET revoked_at = $2 WHERE id = $1", key_id, now)
            return await self._insert_key(conn, old["user_id"], old["role"], now,
                                          {name: old[name] for name in KEY_CONTROLS},  # the same controls
                                          old["service"])

    async def list_keys(self, user_id=None, workspace_id=None):
        rows = await self._fetch(
            f"SELECT {_KEY_COLS} FROM api_keys"
            " WHERE ($1::text IS NULL OR user_id = $1) AND ($2::text IS NULL OR workspace_id = $2)"
            " ORDER BY created_at, id",
            user_id, workspace_id,
        )
        return [_key(r) for r in rows]

    # -------------------------------------------------------------------- energy

    @staticmethod
    async def _ledger_row(conn, user_id, request_id, kind, amount, balance_after, reason, now):
        await conn.execute(
            "INSERT INTO energy_ledger"
            " (user_id, request_id, kind, amount, balance_after, reason, created_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)",
            user_id, request_id, kind, amount, balance_after, reason, now,
        )

    async def balance(self, user_id):
        r = await self._fetchrow("SELECT energy FROM users WHERE id = $1", user_id)
        if r is None:
            raise NotFound(f"user {user_id!r}")
        return r["energy"]

    async def ledger(self, user_id):
        rows = await self._fetch(
            f"SELECT {_LEDGER_COLS} FROM energy_ledger WHERE user_id = $1 ORDER BY id", user_id
        )
        return [_entry(r) for r in rows]

    async def reserve_energy(self, user_id, amount, request_id, *, refill=None, now=None, budgets=()):
        return await self.reserve_energy_soon(user_id, amount, request_id, refill=refill, now=now, budgets=budgets)

    def reserve_energy_soon(self, user_id, amount, request_id, *, refill=None, now=None, budgets=()):
        # Queued for the end of this loop turn, then sent with the turn's other reservations
        # as one gw_reserve call (migration 5): one round trip for all of them.
        check_amount(amount)
        now = now_or(now)
        compute_refill(0, None, refill, now)  # a bad refill is the caller's error, raised here
        for hold in budgets:
            check_amount(hold.amount, "budget hold")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        if self._send_handle is None:
            self._send_handle = loop.call_soon(self._send_reservations)
        self._reserving.append((user_id, amount, request_id, refill, now, fut, loop.time(), tuple(budgets)))
        return fut

    def _send_reservations(self, force: bool = False) -> None:
        """Sends the queued reservations that may go now, as few gw_reserve calls as it can.

        * A reservation whose user is in a call in flight waits for that call to return
          (_reserve_done): it would wait on the user's row lock anyway, and so a call that
          waits on a locked row never holds back the next group of other users.
        * At most RESERVE_IN_FLIGHT calls younger than RESERVE_STALLED at once (``force``,
          at close: no cap): the others wait for one to return or to grow that old.
        * The users whose last call ran out of store.timeout go in calls of their own, one
          per user, until one returns in time: a row still locked then holds back only them.
        * One that waited out store.timeout in the queue fails (closed) without a call.

        Deadlock-free as before: each call locks all its users' rows in id order at its
        start, so two calls in flight, overlapping or not, never wait on each other in a
        circle."""
        if self._send_handle is not None:
            self._send_handle.cancel()
            self._send_handle = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = None if self.timeout is None else now - self.timeout
        queued = []
        for job in self._reserving:
            if job[5].done():  # the caller gave up while it was queued: nothing to reserve
                continue
            if expired is not None and job[6] <= expired:
                job[5].set_exception(StoreUnavailable(
                    f"the reservation waited out store.timeout ({self.timeout} s) in the queue"))
                continue
            queued.append(job)
        busy = set().union(*(users for _, users in self._reserve_calls.values()))
        ready = [job for job in queued if job[0] not in busy]
        prompt = [started for started, _ in self._reserve_calls.values()
                  if now - started < RESERVE_STALLED]
        if ready and len(prompt) >= RESERVE_IN_FLIGHT and not force:
            self._reserving = queued  # until a call returns (_reserve_done) or stalls
            self._send_handle = loop.call_at(min(prompt) + RESERVE_STALLED, self._send_reservations)
            return
        self._reserving = [job for job in queued if job[0] in busy]  # until their call returns
        together: list[tuple] = []
        alone: dict[str, list[tuple]] = {}
        for job in ready:
            if job[0] in self._reserve_timed_out:
                alone.setdefault(job[0], []).append(job)
            else:
                together.append(job)
        for jobs in (together, *alone.values()):
            for start in range(0, len(jobs), RESERVE_GROUP):
                group = jobs[start:start + RESERVE_GROUP]
                task = asyncio.ensure_future(self._reserve_group(group))
                self._reserve_calls[task] = (now, frozenset(job[0] for job in group))
                task.add_done_callback(self._reserve_done)

    def _reserve_done(self, task: asyncio.Task) -> None:
        _, users = self._reserve_calls.pop(task)
        if not task.cancelled() and task.exception() is None and task.result():
            self._reserve_timed_out -= users
        else:
            self._reserve_timed_out |= users
        if self._reserving:
            self._send_reservations()

    async def _reserve_group(self, jobs: list[tuple]) -> bool:
        """One gw_reserve call for these reservations, its outcomes set on their futures;
        False if it ran out of store.timeout (waiting on a row lock, most likely)."""
        try:
            rows = await self._call_reserve(jobs)
        except BaseException as exc:
            if isinstance(exc, asyncpg.PostgresError) and len(jobs) > 1:
                # The server refused the group, so nothing of it was written: each on its
                # own, so one bad reservation fails only its own request.
                answered = True
                for job in jobs:
                    answered = await self._reserve_group([job]) and answered
                return answered
            for job in jobs:
                if not job[5].done():
                    job[5].set_exception(self._unavailable(exc))
            if not isinstance(exc, Exception):
                raise
            return not isinstance(exc, asyncio.TimeoutError)
        for row in rows:
            user_id, _, request_id, _, _, fut, _, _ = jobs[row["o_n"] - 1]
            if fut.done():  # the caller gave up (cancelled); the sweeper refunds what it reserved
                continue
            status = row["o_status"]
            spent = row.get("o_spent") if "o_spent" in row.keys() else None
            if status == "ok":
                fut.set_result(Reservation(True, row["o_balance"], row["o_refilled"],
                                           budget_spent=None if spent is None else tuple(spent)))
            elif status == "budget":
                fut.set_result(Reservation(False, row["o_balance"], 0, budget_refused=row["o_budget"]))
            elif status == "short":
                fut.set_result(Reservation(False, row["o_balance"], row["o_refilled"]))
            elif status == "not_found":
                fut.set_exception(NotFound(f"user {user_id!r}"))
            else:
                fut.set_exception(StoreConflict(f"request {request_id!r} already has a reservation"))
        return True

    async def _call_reserve(self, jobs: list[tuple]) -> list[asyncpg.Record]:
        args = ([j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs],
                [None if j[3] is None else j[3][0] for j in jobs],
                [None if j[3] is None else float(j[3][1]) for j in jobs],
                [j[4] for j in jobs])
        sql = _RESERVE
        if any(j[7] for j in jobs):  # budget holds (migration 17): gw_reserve_b, with one row per hold
            holds = [(k, hold) for k, j in enumerate(jobs, 1) for hold in j[7]]
            args += ([k for k, _ in holds], [h.budget_id for _, h in holds], [float(h.period_start) for _, h in holds],
                     [h.limit for _, h in holds], [h.amount for _, h in holds], [h.enforce for _, h in holds],
                     [h.unit for _, h in holds])
            sql = _RESERVE_B
        # One statement is its own transaction: no BEGIN/COMMIT round trips.
        if self.timeout is None:
            async with self._single() as conn:
                return await conn.fetch(sql, *args)
        # From the oldest one's arrival: waiting for a call in flight counts too.
        async with asyncio.timeout_at(min(j[6] for j in jobs) + self.timeout):
            async with self._single() as conn:
                return await conn.fetch(sql, *args)

    def _unavailable(self, exc: BaseException) -> BaseException:
        """What a reservation that could not reach the database raises."""
        if isinstance(exc, _UNREACHABLE):
            return StoreUnavailable(f"the database did not answer the reservation"
                                    f" ({type(exc).__name__}: {exc})")
        return exc

    async def _finish_reservation(self, request_id, status, final_amount, kind, reason, now, usd_final=None):
        """reserved -> settled/refunded, returning energy; None if not reserved. One call of
        gw_finish_b (migration 17: gw_finish of migration 6 and the request's budget holds):
        one statement, one round trip."""
        async with self._single() as conn:
            return await conn.fetchval("SELECT gw_finish_b($1, $2, $3, $4, $5, $6, $7)", request_id, status,
                                       final_amount, kind, reason, now_or(now), usd_final)

    async def settle_energy(self, request_id, final_amount=None, *, usd_final=None, now=None):
        if final_amount is not None:
            check_amount(final_amount, "final_amount")
        return await self._finish_reservation(request_id, "settled", final_amount, "settle",
                                              None, now, usd_final)

    async def refund_energy(self, request_id, reason=None, *, now=None):
        return await self._finish_reservation(request_id, "refunded", None, "refund", reason, now)

    async def settle_many(self, request_ids, *, now=None):
        if not request_ids:
            return 0
        now = now_or(now)
        if any(isinstance(item, tuple) for item in request_ids):
            # Some carry budget holds: gw_settle_b (migration 17), the same settlement and the
            # holds in one transaction. (A plain id's holds, should it have any, stay counted
            # as held; the sweeper's finish_orphan_holds marks them settled.)
            ids = [item[0] if isinstance(item, tuple) else item for item in request_ids]
            usd = [item for item in request_ids if isinstance(item, tuple) and item[1] is not None]
            async with self._single() as conn:
                return await conn.fetchval("SELECT gw_settle_b($1::text[], $2::text[], $3::bigint[], $4)",
                                           list(dict.fromkeys(ids)), [i for i, _ in usd], [v for _, v in usd], now)
        async with self._single() as conn:
            # One statement, so one transaction and one round trip: close the open
            # reservations, lock their users' rows in id
            # order (two processes' batches never deadlock; balance_after is then the
            # committed balance, as in settle_energy), and write one amount-0 settle row
            # each. A full settlement gives nothing back.
            return await conn.fetchval(
                "WITH s AS ("
                "  UPDATE reservations SET status = 'settled', finished_at = $2, final_amount = amount"
                "  WHERE request_id = ANY($1::text[]) AND status = 'reserved' RETURNING request_id, user_id),"
                " u AS (SELECT id, energy FROM users WHERE id IN (SELECT user_id FROM s)"
                "  ORDER BY id FOR NO KEY UPDATE),"
                " l AS (INSERT INTO energy_ledger (user_id, request_id, kind, amount, balance_after, reason, created_at)"
                "  SELECT s.user_id, s.request_id, 'settle', 0, u.energy, NULL, $2"
                "  FROM s JOIN u ON u.id = s.user_id ORDER BY s.request_id RETURNING 1)"
                " SELECT count(*) FROM l",
                list(request_ids), now,
            )

    async def grant_energy(self, user_id, amount, *, kind="grant", reason=None, now=None):
        check_grant(amount, kind)
        now = now_or(now)
        async with self._tx() as conn:
            current = await conn.fetchval("SELECT energy FROM users WHERE id = $1 FOR UPDATE",
                                          user_id)
            if current is None:
                raise NotFound(f"user {user_id!r}")
            balance = current + amount
            if balance < 0:
                raise InsufficientEnergy(
                    f"user {user_id!r} has {current}, cannot adjust by {amount}")
            await conn.execute("UPDATE users SET energy = $2 WHERE id = $1", user_id, balance)
            await self._ledger_row(conn, user_id, None, kind, amount, balance, reason, now)
        return balance

    # ------------------------------------------------------------------- budgets

    async def set_budget(self, *, workspace_id, scope, scope_id, unit, amount, period, timezone, alerts, hard,
                         now=None):
        now = now_or(now)
        alerts_json = json.dumps(sorted(set(alerts)))
        cols = ", ".join(BUDGET_COLUMNS)
        async with self._tx() as conn:
            row = await conn.fetchrow(f"SELECT {cols} FROM budgets WHERE scope = $1 AND scope_id = $2 AND unit = $3"
                                      " AND period = $4 FOR UPDATE", scope, scope_id, unit, period)
            before = None if row is None else budget_row(dict(row))
            if before is None:
                after = await conn.fetchrow(
                    f"INSERT INTO budgets ({cols}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11)"
                    f" RETURNING {cols}", new_id("bud"), workspace_id, scope, scope_id, unit, amount, period,
                    timezone, alerts_json, hard, now)
            else:
                after = await conn.fetchrow(
                    f"UPDATE budgets SET amount = $2, timezone = $3, alerts = $4, hard = $5, updated_at = $6"
                    f" WHERE id = $1 RETURNING {cols}", before.id, amount, timezone, alerts_json, hard, now)
        return before, budget_row(dict(after))

    async def delete_budget(self, budget_id):
        async with self._tx() as conn:
            row = await conn.fetchrow(f"DELETE FROM budgets WHERE id = $1 RETURNING {', '.join(BUDGET_COLUMNS)}",
                                      budget_id)
            if row is None:
                return None
            await conn.execute("DELETE FROM budget_spend WHERE budget_id = $1", budget_id)
        return budget_row(dict(row))

    async def list_budgets(self, workspace_id=None):
        rows = await self._fetch(
            f"SELECT {', '.join(BUDGET_COLUMNS)} FROM budgets WHERE ($1::text IS NULL OR workspace_id = $1)"
            " ORDER BY workspace_id, scope, scope_id, unit, period", workspace_id)
        return [budget_row(dict(r)) for r in rows]

    async def budget_spent(self, periods):
        if not periods:
            return {}
        rows = await self._fetch(
            "SELECT budget_id, period_start, spent FROM budget_spend"
            " WHERE (budget_id, period_start) IN (SELECT * FROM unnest($1::text[], $2::float8[]))",
            [b for b, _ in periods], [float(t) for _, t in periods])
        found = {(r["budget_id"], r["period_start"]): r["spent"] for r in rows}
        return {(b, t): found.get((b, float(t)), 0) for b, t in periods}

    async def finish_orphan_holds(self, *, now=None):
        rows = await self._fetch(
            "SELECT DISTINCT h.request_id, r.status FROM budget_holds h"
            " LEFT JOIN reservations r ON r.request_id = h.request_id"
            " WHERE h.status = 'reserved' AND (r.status IS NULL OR r.status <> 'reserved')")
        done = 0
        for row in rows:
            async with self._tx() as conn:
                status = "settled" if row["status"] == "settled" else "refunded"
                done += await conn.fetchval("SELECT gw_finish_holds($1, $2, NULL, NULL)", row["request_id"], status)
        return done

    async def stale_reservations(self, older_than):
        rows = await self._fetch(
            "SELECT request_id FROM reservations WHERE status = 'reserved' AND created_at <= $1"
            " ORDER BY created_at",
            older_than,
        )
        return [r["request_id"] for r in rows]

    # --------------------------------------------------------------- idempotency

    async def begin_idempotent(self, user_id, key, request_id, *, fingerprint, window,
                               lease=IN_FLIGHT_LEASE, now=None):
        now = now_or(now)
        async with self._tx() as conn:
            if not await conn.fetchval("SELECT 1 FROM users WHERE id = $1", user_id):
                raise NotFound(f"user {user_id!r}")
            # Loop only if the claim we collided with is released before we can read it.
            while True:
                claimed = await conn.fetchval(
                    "INSERT INTO idempotency_keys"
                    " (user_id, key, request_id, fingerprint, status, created_at)"
                    " VALUES ($1, $2, $3, $4, 'in_flight', $5)"
                    " ON CONFLICT (user_id, key) DO NOTHING RETURNING 1",
                    user_id, key, request_id, fingerprint, now,
                )
                if claimed:
                    return IdempotencyState("new", None, None, request_id)
                row = await conn.fetchrow(
                    "SELECT request_id, fingerprint, status, status_code, body, created_at"
                    " FROM idempotency_keys WHERE user_id = $1 AND key = $2 FOR UPDATE",
                    user_id, key,
                )
                if row is not None:
                    break
            decision = idempotency_decision(
                stored_status=row["status"], stored_fingerprint=row["fingerprint"],
                stored_created_at=row["created_at"], fingerprint=fingerprint, window=window,
                now=now, lease=lease,
            )
            if decision == "reclaim":
                await conn.execute(
                    "UPDATE idempotency_keys SET request_id = $3, fingerprint = $4,"
                    " status = 'in_flight', status_code = NULL, body = NULL, created_at = $5,"
                    " finished_at = NULL WHERE user_id = $1 AND key = $2",
                    user_id, key, request_id, fingerprint, now,
                )
                return IdempotencyState("new", None, None, request_id)
            if decision == "done":
                return IdempotencyState("done", row["status_code"], row["body"],
                                        row["request_id"])
            return IdempotencyState(decision, None, None, row["request_id"])

    async def finish_idempotent(self, user_id, key, status_code, body, *, request_id=None,
                                now=None):
        async with self._tx() as conn:
            done = await conn.fetchval(
                "UPDATE idempotency_keys SET status = 'done', status_code = $3, body = $4,"
                " finished_at = $5"
                " WHERE user_id = $1 AND key = $2 AND status = 'in_flight'"
                " AND ($6::text IS NULL OR request_id = $6) RETURNING 1",
                user_id, key, int(status_code), bytes(body), now_or(now), request_id,
            )
        return bool(done)

    async def release_idempotent(self, user_id, key, *, request_id=None):
        async with self._tx() as conn:
            deleted = await conn.fetchval(
                "DELETE FROM idempotency_keys"
                " WHERE user_id = $1 AND key = $2 AND status = 'in_flight'"
                " AND ($3::text IS NULL OR request_id = $3) RETURNING 1",
                user_id, key, request_id,
            )
        return bool(deleted)

    # --------------------------------------------------------------------- usage

    async def insert_usage(self, rows, *, now=None):
        def finish(r: dict[str, Any]) -> tuple:
            r["created_at"] = datetime.fromtimestamp(r["created_at"], timezone.utc)
            return tuple(r.values())

        values = await prepare_usage_rows(rows, now_or(now), finish)
        if not values:
            return 0
        columns = [list(column) for column in zip(*values)]  # USAGE_COLUMNS order, as the statement
        await self._ensure_partitions(columns[_CREATED_AT])
        # One statement for the whole batch, so the count of inserted rows is exact.
        async with self._single() as conn:
            return await conn.fetchval(_USAGE_INSERT, *columns)

    async def _ensure_partitions(self, times: list[datetime]) -> None:
        """The month partitions these rows go to, in a transaction of their own (creating
        one locks the parent table): once per month and process."""
        months = {(t.year, t.month) for t in times} - self._partitions
        if not months:
            return
        async with self._tx() as conn:
            for year, month in sorted(months):
                await conn.execute("SELECT ai_usage_partition($1)", datetime(year, month, 1, tzinfo=timezone.utc))
        self._partitions |= months

    async def usage_rows(self, since=None, workspace_id=None):
        # Built per call rather than "$1 IS NULL OR ...", so the (workspace_id, created_at)
        # and created_at indexes stay usable by the prepared statement's plan.
        where, args = [], []
        if since is not None:
            args.append(datetime.fromtimestamp(since, timezone.utc))
            where.append(f"created_at >= ${len(args)}")
        if workspace_id is not None:
            args.append(workspace_id)
            where.append(f"workspace_id = ${len(args)}")
        sql = "SELECT * FROM ai_usage_logs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        rows = await self._fetch(sql + " ORDER BY created_at, id", *args)
        out = []
        for r in rows:
            d = dict(r)
            d["created_at"] = d["created_at"].timestamp()
            out.append(d)
        return out

    # ------------------------------------------------------------------- reports

    dialect = "postgres"

    def report_time(self, epoch):
        return datetime.fromtimestamp(epoch, timezone.utc)

    def usd(self, stored):
        return stored  # numeric: asyncpg already gives a Decimal (None for NULL)

    async def record_feedback(self, request_id, user_id, metric, value, *, now=None):
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO feedback (request_id, metric, user_id, value, created_at) VALUES ($1, $2, $3, $4, $5)"
                " ON CONFLICT (request_id, metric) DO UPDATE SET value = excluded.value, created_at = excluded.created_at",
                request_id, metric, user_id, float(value), now_or(now))

    async def remember_response(self, response_id, user_id, workspace_id, model, upstream, *, now=None):
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO stored_responses (response_id, user_id, workspace_id, model, upstream, created_at)"
                " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (response_id) DO NOTHING",
                response_id, user_id, workspace_id, model, upstream, now_or(now))

    async def stored_response(self, response_id):
        rows = await self._fetch("SELECT user_id, workspace_id, model, upstream, created_at FROM stored_responses"
                                 " WHERE response_id = $1", response_id)
        return dict(rows[0]) if rows else None

    async def forget_response(self, response_id):
        async with self._tx() as conn:
            await conn.execute("DELETE FROM stored_responses WHERE response_id = $1", response_id)

    # ------------------------------------------------------------ files and batches

    async def remember_file(self, record):
        async with self._single() as conn:
            await conn.execute(
                f"INSERT INTO gw_files ({', '.join(FILE_COLUMNS)}) VALUES"
                f" ({', '.join(f'${i}' for i in range(1, len(FILE_COLUMNS) + 1))}) ON CONFLICT (file_id) DO NOTHING",
                *(record.get(c) for c in FILE_COLUMNS))

    async def stored_file(self, file_id):
        rows = await self._fetch(f"SELECT {', '.join(FILE_COLUMNS)} FROM gw_files WHERE file_id = $1", file_id)
        return dict(rows[0]) if rows else None

    async def list_files(self, user_id, *, purpose=None, limit=100, after=None):
        rows = await self._fetch(
            f"SELECT {', '.join(FILE_COLUMNS)} FROM gw_files WHERE user_id = $1"
            " AND ($2::text IS NULL OR purpose = $2) AND ($3::text IS NULL OR (created_at, file_id) <"
            " (SELECT created_at, file_id FROM gw_files WHERE file_id = $3 AND user_id = $1))"
            " ORDER BY created_at DESC, file_id DESC LIMIT $4", user_id, purpose, after, limit)
        return [dict(r) for r in rows]

    async def forget_file(self, file_id):
        async with self._single() as conn:
            await conn.execute("DELETE FROM gw_files WHERE file_id = $1", file_id)

    async def insert_batch(self, record, lines):
        columns = [*BATCH_COLUMNS, "lines"]
        async with self._single() as conn:
            await conn.execute(
                f"INSERT INTO gw_batches ({', '.join(columns)}) VALUES"
                f" ({', '.join(f'${i}' for i in range(1, len(columns) + 1))})",
                *(record.get(c) for c in BATCH_COLUMNS), json.dumps(lines))

    async def batch_record(self, *, batch_id=None, id=None, with_lines=False):
        columns = [*BATCH_COLUMNS, "lines"] if with_lines else list(BATCH_COLUMNS)
        key, value = ("batch_id", batch_id) if batch_id is not None else ("id", id)
        rows = await self._fetch(f"SELECT {', '.join(columns)} FROM gw_batches WHERE {key} = $1", value)
        if not rows:
            return None
        out = dict(rows[0])
        if with_lines:
            out["lines"] = json.loads(out["lines"])
        return out

    async def list_batches(self, user_id, *, limit=20, after=None, messages=False):
        rows = await self._fetch(
            f"SELECT {', '.join(BATCH_COLUMNS)} FROM gw_batches WHERE user_id = $1 AND batch_id IS NOT NULL"
            f" AND endpoint {'=' if messages else '<>'} '/v1/messages'"
            " AND ($2::text IS NULL OR (created_at, id) <"
            " (SELECT created_at, id FROM gw_batches WHERE batch_id = $2 AND user_id = $1))"
            " ORDER BY created_at DESC, id DESC LIMIT $3", user_id, after, limit)
        return [dict(r) for r in rows]

    async def update_batch(self, id, fields, *, owner=None, unsettled=False):
        unknown = set(fields) - BATCH_UPDATABLE
        if unknown:
            raise ValueError(f"not updatable: {sorted(unknown)}")
        sets = ", ".join(f"{name} = ${i}" for i, name in enumerate(fields, 1))
        args = [*fields.values(), id]
        sql = f"UPDATE gw_batches SET {sets} WHERE id = ${len(args)}"
        if owner is not None:
            args.append(owner)
            sql += f" AND lease_owner = ${len(args)}"
        if unsettled:
            sql += " AND settled_at IS NULL"
        async with self._single() as conn:
            done = await conn.execute(sql, *args)
        return done.endswith(" 1")

    async def claim_batches(self, owner, *, lease, limit, now=None):
        now = now_or(now)
        # SKIP LOCKED: two processes claiming at once take different rows, neither waits;
        # the lease keeps a claimed batch from being polled by another while it is settled.
        async with self._single() as conn:
            rows = await conn.fetch(
                "UPDATE gw_batches SET lease_owner = $1, lease_until = $2 + $3::float8 WHERE id IN ("
                " SELECT id FROM gw_batches WHERE settled_at IS NULL AND next_poll_at <= $2"
                " AND (lease_until IS NULL OR lease_until < $2) ORDER BY next_poll_at LIMIT $4 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {', '.join(BATCH_COLUMNS)}", owner, now, float(lease), limit)
        return [dict(r) for r in rows]

    async def report_query(self, sql, args):
        parts = sql.split("?")
        numbered = "".join(f"{part}${i}" for i, part in enumerate(parts[:-1], 1)) + parts[-1]
        return [dict(r) for r in await self._fetch(numbered, *args)]

    async def backfill_latency_histogram(self, lo, hi):
        async with self._tx() as conn:
            # The coverage row's lock: concurrent calls (several processes) run one after the other.
            live = await conn.fetchval(f"SELECT live_from_id FROM {usage_rollup.HIST_COVERAGE} WHERE id = 1 FOR UPDATE")
            hi_ = min(hi, live)
            if lo >= hi_:
                return 0
            done = [(r["lo"], r["hi"]) for r in await conn.fetch(f"SELECT lo, hi FROM {usage_rollup.HIST_BACKFILLED}")]
            added = 0
            for a, b in usage_rollup.hist_gaps(lo, hi_, done):
                added += await conn.fetchval("SELECT count(*) FROM ai_usage_logs WHERE id >= $1 AND id < $2", a, b)
                for sql in _HIST_BACKFILL:
                    await conn.execute(sql, a, b)
            replaced, (m_lo, m_hi) = usage_rollup.hist_merge(lo, hi_, done)
            await conn.execute(f"DELETE FROM {usage_rollup.HIST_BACKFILLED} WHERE lo = ANY($1::bigint[])", replaced)
            await conn.execute(f"INSERT INTO {usage_rollup.HIST_BACKFILLED} (lo, hi) VALUES ($1, $2)", m_lo, m_hi)
        return added

    async def prune_usage(self, before):
        """Whole month partitions ending at or before `before`, and the request ids older than it."""
        cutoff = datetime.fromtimestamp(before, timezone.utc)
        dropped = 0
        partitions = await self._fetch(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'ai_usage_logs'::regclass ORDER BY c.relname")
        for (name,) in partitions:
            year, month = int(name[-6:-2]), int(name[-2:])
            end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=timezone.utc)
            if end > cutoff:
                continue
            try:
                async with self._tx() as conn:
                    # Dropping a partition locks the parent: behind a long report it would
                    # queue every insert and read after it, so it gives up (next hour again).
                    await conn.execute("SET LOCAL lock_timeout = '200ms'")
                    count = await conn.fetchval(f'SELECT count(*) FROM "{name}"')
                    await conn.execute(f'DROP TABLE "{name}"')
            except asyncpg.LockNotAvailableError:
                continue
            dropped += count
            self._partitions.discard((year, month))
        while True:  # the ids of dropped rows, in small transactions (no long lock)
            async with self._tx() as conn:
                status = await conn.execute(
                    "DELETE FROM ai_usage_request_ids WHERE request_id IN (SELECT request_id"
                    " FROM ai_usage_request_ids WHERE created_at < $1 LIMIT 5000)", cutoff)
            if int(status.split()[-1]) < 5000:
                return dropped
