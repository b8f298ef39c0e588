"""Persistence for the gateway: tenants, keys, energy (credits) and the usage log.

Why it looks like this
----------------------
Energy is billing data. Several gateway processes share one database (one SQLite file or
one PostgreSQL database), so every rule that protects money is enforced *inside one
database transaction* and, where the database can, by a constraint as well:

* A balance is only ever changed together with an ``energy_ledger`` row carrying the
  signed delta and the balance after it, in the same transaction. So a balance always
  equals the sum of its ledger rows (a user's initial energy is a ``grant`` row, too),
  and every change can be traced to a request or a reason.
* ``users.energy >= 0`` is a CHECK constraint: the code refuses to overdraw, and the
  database refuses it again should the code ever be wrong.
* A reservation moves ``reserved -> settled`` or ``reserved -> refunded`` exactly once,
  through a conditional update on its status. Partial unique indexes on the ledger allow
  one ``reserve`` row and one ``settle``/``refund`` row per request_id, so nothing can
  be charged or returned twice, whatever the callers retry.
* Usage rows are keyed by request_id and inserted with ON CONFLICT DO NOTHING, so a
  flush that is retried after an ambiguous failure never writes a row twice.

The backends (``gateway.store.sqlite``, ``gateway.store.postgres``) each speak their own SQL; what is
shared here is what is honestly dialect-free: the entities, the errors, the URL factory,
and the arithmetic of lazy refill, settlement and idempotency decisions as pure functions
(so both backends cannot drift apart on the rules, and the rules are testable alone).

Decisions callers rely on
-------------------------
* Times are epoch seconds (float). Every method where time matters takes ``now`` so tests
  can move time; it defaults to ``time.time()``.
* Operational tables store ``created_at`` (and friends) as REAL epoch seconds in SQLite and
  ``double precision`` epoch seconds in PostgreSQL: exact round trips, simple comparisons.
  ``ai_usage_logs.created_at`` is different because ops query it by date: ISO-8601 UTC
  text (``2024-05-01T12:00:00.123456Z``, fixed width so it sorts as text) in SQLite and
  ``timestamptz`` in PostgreSQL. ``usage_rows`` returns it as epoch float either way
  (microsecond precision).
* USD amounts (``cost_usd``, ``saved_usd``, in the rows and the rollups) are ``Decimal``
  in and out, rounded by gateway/money.py's one rule: ``numeric(20, 9)`` in PostgreSQL,
  an INTEGER count of nano-dollars in SQLite (whose SUM is then exact and fast; a decimal
  text column would be summed as REAL). SQL of ours over them reads the stored form and
  converts with ``Store.usd``; an operator's own SQLite query divides by 1e9.
* Reserving 0 energy is allowed and recorded like any other reservation: a reservation
  row and a ``reserve`` ledger row of amount 0, later a ``settle``/``refund`` row of 0.
  Every request that went through energy accounting is thus visible in the ledger.
* ``settle_energy(final_amount > reserved)`` charges the reserved amount, no more: a
  reservation is the ceiling of what a request may cost (no overdraft after the fact).
  Estimate high when reserving.
* A refill is a top-up: the balance becomes ``max(balance, allowance)``; energy granted
  above the allowance is kept (a refill never takes energy away). ``refilled_at`` advances
  by whole periods (it stays on the user's schedule) even when the top-up is 0. A user
  created on a tier with a refill starts their first period at creation, with the energy
  given (``create_user(start_refill_period=True)``: ``refilled_at = created_at``).
* A refund never lifts a balance above what it would have been without the request: the
  energy returned (a refund, or the unused part of a settlement) is reduced by the refills
  since the reservation (``returned_after_refills``).
* The store does not check ``users.disabled`` or key revocation when moving energy:
  ``lookup_key`` reports both, and refusing a request is the gateway's decision.
* Idempotency claims expire ``window`` seconds after they were *claimed* (whatever their
  state); ``release_idempotent`` only deletes an in-flight claim, never a stored response.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
import math
import re
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Literal, TypeVar

from gateway.store import rollup as usage_rollup
from gateway.money import usd

# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class of the store's own errors."""


class NotFound(StoreError, LookupError):
    """An id (workspace, user, key) does not exist. Nothing was changed."""


class StoreConflict(StoreError):
    """A uniqueness rule was violated (duplicate workspace name, request_id, ...).

    Nothing was changed: the whole transaction was rolled back."""


class InsufficientEnergy(StoreError):
    """An adjustment would take a balance below zero. Nothing was changed."""


class StoreUnavailable(StoreError):
    """The database did not answer in time (store.timeout) or could not be reached. The
    request fails closed; what was written, if anything, is settled by the usual paths
    (a reservation left open is refunded by the stale-reservation sweeper)."""


# ------------------------------------------------------------------------- entities

ROLES = ("user", "workspace_admin")
LEDGER_KINDS = ("reserve", "settle", "refund", "grant", "refill", "adjust")
Role = Literal["user", "workspace_admin"]


@dataclass(frozen=True, slots=True)
class Workspace:
    id: str
    name: str
    profile: dict
    ai_settings: dict
    created_at: float


@dataclass(frozen=True, slots=True)
class User:
    id: str
    workspace_id: str
    name: str | None
    tier: str
    energy: int
    refilled_at: float | None
    created_at: float
    disabled: bool
    # The app's own id for an end user a service key provisioned (migration 16); unique in
    # its workspace. None: a user made by an admin.
    external_id: str | None = None


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    user_id: str
    workspace_id: str
    prefix: str
    role: str
    created_at: float
    revoked_at: float | None
    # Per-key controls (migration 12); None: no such control on this key.
    label: str | None = None
    expires_at: float | None = None
    models: tuple[str, ...] | None = None  # a subset of the tier's models
    rpm: int | None = None
    tpm: int | None = None
    # A service key acts for its workspace's end users, named per request (migration 16;
    # docs/admin.md "End users by your app's ids"). Set at creation; a rotation keeps it.
    service: bool = False


# The audit log's columns besides id and created_at (gateway/admin/operations.py writes them).
# actor_subject / actor_email (migration 22): who acted through a dashboard sign-in session
# (gateway/admin/oidc.py), the identity provider's subject and e-mail; NULL for a key.
AUDIT_COLUMNS = ("actor", "actor_key_id", "actor_key_prefix", "via", "action", "target", "workspace_id",
                 "before", "after", "request_id", "actor_subject", "actor_email")

# Dashboard sign-in (gateway/admin/oidc.py, migration 22). A session is found by the SHA-256
# of its cookie value (the value itself is never stored); a pending login by the SHA-256 of
# its `state`, and it is taken (deleted) by the one callback that uses it.
DASHBOARD_SESSION_COLUMNS = ("id_hash", "subject", "email", "role", "workspace_id", "created_at", "expires_at")
OIDC_LOGIN_COLUMNS = ("state_hash", "browser_hash", "nonce", "code_verifier", "redirect_uri", "created_at",
                      "expires_at")

# The alerts outbox (gateway/alerts.py): what a claim hands the deliverer, what a listing shows.
OUTBOX_CLAIMED = ("id", "event_id", "endpoint", "event_type", "workspace_id", "payload", "attempts", "created_at")
OUTBOX_LISTED = ("id", "event_id", "endpoint", "event_type", "workspace_id", "status", "attempts", "last_status",
                 "last_error", "created_at", "next_attempt_at", "delivered_at", "payload")

# Files and batches (gateway/files.py, gateway/batches.py, migration 19): whose each is and
# which upstream account holds it. A batch row's `lines` (JSON: the input's custom_ids, in
# order) is read only by `batch_record`; claims and listings leave it out.
FILE_COLUMNS = ("file_id", "user_id", "workspace_id", "purpose", "filename", "bytes", "upstream", "model",
                "batch_id", "created_at")
BATCH_COLUMNS = ("id", "batch_id", "user_id", "workspace_id", "model", "upstream", "endpoint", "input_file_id",
                 "action", "energy_per_line", "status", "payload", "next_poll_at", "lease_owner", "lease_until",
                 "settled_at", "created_at")
BATCH_UPDATABLE = frozenset({"batch_id", "status", "payload", "next_poll_at", "lease_owner", "lease_until",
                             "settled_at"})

# The per-key controls a key carries and `update_key` may change.
KEY_CONTROLS = ("label", "expires_at", "models", "rpm", "tpm")


@dataclass(frozen=True, slots=True)
class KeyIdentity:
    """What the auth path needs about a presented key, from one indexed query."""

    key_id: str
    prefix: str
    role: str
    user_id: str
    workspace_id: str
    tier: str
    user_disabled: bool
    revoked: bool
    expires_at: float | None = None
    models: tuple[str, ...] | None = None
    rpm: int | None = None
    tpm: int | None = None
    service: bool = False


@dataclass(frozen=True, slots=True)
class EnergyEntry:
    id: int
    user_id: str
    request_id: str | None
    kind: str
    amount: int  # signed delta
    balance_after: int
    reason: str | None
    created_at: float


@dataclass(frozen=True, slots=True)
class Reservation:
    ok: bool
    balance: int  # after the reservation (ok) or the current balance (not ok)
    refilled: int  # energy added by a lazy refill in the same transaction (0 if none)
    # Budgets (migration 17, gateway/budgets.py): with holds, what each budget has spent in
    # its period after this reservation (ok; in the holds' order), or the id of the first
    # budget whose hard limit refused it (not ok; nothing was written, the energy untouched).
    budget_spent: tuple[int, ...] | None = None
    budget_refused: str | None = None


@dataclass(frozen=True, slots=True)
class Budget:
    """A spending ceiling (docs/budgets.md): `amount` of `unit` ("energy", or "usd" in
    nano-dollars) per `period` ("day", "week", "month" in `timezone`, or "life") for a
    workspace, a user or an API key (`scope`, `scope_id`). `hard`: "refuse" (429
    budget_exceeded), "downgrade" (down the ladder while a cheaper model fits, then 429) or
    "none" (alerts only); `alerts`: the percentages that emit budget.threshold_crossed."""

    id: str
    workspace_id: str
    scope: str
    scope_id: str
    unit: str
    amount: int
    period: str
    timezone: str
    alerts: tuple[int, ...]
    hard: str
    created_at: float
    updated_at: float


BUDGET_SCOPES = ("workspace", "user", "key")
BUDGET_UNITS = ("energy", "usd")
BUDGET_PERIODS = ("day", "week", "month", "life")
BUDGET_HARD = ("refuse", "downgrade", "none")
BUDGET_COLUMNS = ("id", "workspace_id", "scope", "scope_id", "unit", "amount", "period", "timezone", "alerts",
                  "hard", "created_at", "updated_at")


@dataclass(frozen=True, slots=True)
class BudgetHold:
    """What one reservation holds against one budget: `amount` (the budget's unit) in the
    period that starts at `period_start` (epoch seconds; 0 for life). `enforce`: the budget
    refuses the reservation when spent + amount would pass `limit`."""

    budget_id: str
    period_start: float
    limit: int
    amount: int
    enforce: bool
    unit: str = "energy"


def budget_row(values: tuple | dict) -> Budget:
    """A budgets row (BUDGET_COLUMNS order, or a mapping) as a Budget."""
    row = dict(values) if isinstance(values, dict) else dict(zip(BUDGET_COLUMNS, values))
    row["alerts"] = tuple(json.loads(row["alerts"])) if isinstance(row["alerts"], str) else tuple(row["alerts"])
    return Budget(**row)


@dataclass(frozen=True, slots=True)
class IdempotencyState:
    status: Literal["new", "in_flight", "done", "mismatch"]
    status_code: int | None
    body: bytes | None
    request_id: str  # the claim's request: the caller's when "new", the original otherwise


# ------------------------------------------------------------------- ids and keys


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


KEY_PREFIX_LEN = 10


def new_api_key() -> tuple[str, str, str]:
    """A fresh key: (plaintext, sha256 hex to store, display prefix)."""
    plaintext = "gw-" + secrets.token_urlsafe(32)
    return plaintext, hash_key(plaintext), plaintext[:KEY_PREFIX_LEN]


def hash_key(plaintext: str) -> str:
    # Keys carry 256 bits of randomness, so a plain (unsalted, fast) hash is enough and
    # keeps lookup a single indexed equality query.
    return hashlib.sha256(plaintext.encode("utf-8")).hexdigest()


# Lowercase slug; no underscore, so a name can never look like a "ws_..." id.
_WORKSPACE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def check_workspace_name(name: str) -> None:
    if not isinstance(name, str) or not _WORKSPACE_NAME.match(name):
        raise ValueError(f"workspace name must be a lowercase slug like 'acme', got {name!r}")


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")


def key_control_values(controls: dict[str, Any]) -> dict[str, Any]:
    """Per-key controls as stored: `models` as JSON text (both backends), the rest as given."""
    unknown = set(controls) - set(KEY_CONTROLS)
    if unknown:
        raise ValueError(f"unknown key controls {sorted(unknown)} (known: {KEY_CONTROLS})")
    out = dict(controls)
    if out.get("models") is not None:
        out["models"] = json.dumps(sorted(set(out["models"])))
    return out


def stored_key_models(text: str | None) -> tuple[str, ...] | None:
    return None if text is None else tuple(json.loads(text))


def check_tier(tier: str) -> None:
    if not isinstance(tier, str) or not tier:
        raise ValueError("tier must be a non-empty string")


def check_amount(amount: int, what: str = "amount") -> None:
    # bool is an int subclass; True as an amount is a bug, not 1 energy.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ValueError(f"{what} must be an int, got {amount!r}")
    if amount < 0:
        raise ValueError(f"{what} must be >= 0, got {amount}")


def check_grant(amount: int, kind: str) -> None:
    if kind not in ("grant", "adjust"):
        raise ValueError(f"kind must be 'grant' or 'adjust', got {kind!r}")
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ValueError(f"amount must be an int, got {amount!r}")
    if kind == "grant" and amount <= 0:
        raise ValueError(f"a grant must be positive, got {amount}")
    if kind == "adjust" and amount == 0:
        raise ValueError("an adjustment of 0 changes nothing")


def now_or(now: float | None) -> float:
    return time.time() if now is None else float(now)


# ------------------------------------------------------------- shared arithmetic


@dataclass(frozen=True, slots=True)
class RefillOutcome:
    due: bool  # refilled_at moves (users row must be written)
    balance: int  # balance after the top-up
    delta: int  # energy added (a `refill` ledger row when > 0)
    refilled_at: float | None


def compute_refill(
    balance: int, refilled_at: float | None, refill: tuple[int, float] | None, now: float
) -> RefillOutcome:
    """Lazy refill: top up to the allowance once per elapsed period.

    First use (refilled_at None: a user created on a tier without a refill, then moved to
    one) refills now and starts the schedule at `now`. Later,
    refilled_at advances by whole periods so the schedule does not drift with traffic:
    with a daily period, a user seen at 09:00, 15:00 the next day and 08:00 the day after
    is refilled at the first and third visit, each time on the original 09:00 grid.
    Missed periods do not accumulate: it is a top-up, not a deposit per period.
    """
    if refill is None:
        return RefillOutcome(False, balance, 0, refilled_at)
    allowance, period = refill
    check_amount(allowance, "refill amount")
    if not period > 0:
        raise ValueError(f"refill period must be > 0, got {period!r}")
    if refilled_at is None:
        new_at = now
    elif now - refilled_at >= period:
        periods = math.floor((now - refilled_at) / period)
        new_at = refilled_at + periods * period
        # Float division can be off by one either way at an exact boundary.
        while new_at > now:
            new_at -= period
        while new_at + period <= now:
            new_at += period
    else:
        return RefillOutcome(False, balance, 0, refilled_at)
    topped = max(balance, allowance)
    return RefillOutcome(True, topped, topped - balance, new_at)


def returned_after_refills(back: int, refilled_since: int) -> int:
    """Energy a refund (or a settlement's unused part) returns when refills added
    `refilled_since` to the balance while the reservation was open.

    A refill tops up to the allowance, so one that ran while the reservation held `back`
    also topped that energy up: without the request it would have added that much less
    (nothing, when the balance was at the allowance). Returning `back` in full would put
    the balance above what it would have been without the request (allowance 10: 10,
    reserve 1 -> 9, refill +1 -> 10, refund 1 -> 11). So each refill since the reservation
    takes its top-up off what is returned: `max(0, back - refilled_since)`. A top-up of 0
    (the balance was at or above the allowance, e.g. after a grant) takes nothing off.

    Exact for one reservation across any number of refills (the difference a request
    makes to the balance is `max(0, d - top_up)` after each refill, and those compose to
    `max(0, back - sum)`). With several reservations open across one partial top-up, each
    is reduced by the whole top-up, so if they all fail together they may return less
    than the top-up would have left them: never more than without any one of them.
    """
    return max(0, back - refilled_since)


def kept_by_refill_reason(reason: str | None, kept: int) -> str:
    """The ledger reason of a refund/settle row that returned `kept` less (the row's
    amount is what came back; this says where the rest went)."""
    note = f"{kept} not returned: a refill since the reservation covered it"
    return f"{reason}; {note}" if reason else note


def settlement_return(reserved: int, final_amount: int | None) -> int:
    """Energy given back when a reservation of `reserved` is settled at `final_amount`.

    None means "as reserved". A final amount above the reservation is clamped to it: the
    reservation is the most a request can cost (see the module docstring)."""
    if final_amount is None:
        return 0
    check_amount(final_amount, "final_amount")
    return reserved - min(final_amount, reserved)


# Seconds an in-flight idempotency claim blocks retries at most, unless the caller passes
# its own `lease`: the gateway passes Config.outlasting_requests(IN_FLIGHT_LEASE), longer
# than any request its timeouts allow (README: Operating it).
IN_FLIGHT_LEASE = 900.0


def idempotency_decision(
    *,
    stored_status: str,
    stored_fingerprint: str,
    stored_created_at: float,
    fingerprint: str,
    window: float,
    now: float,
    lease: float = IN_FLIGHT_LEASE,
) -> Literal["reclaim", "mismatch", "in_flight", "done"]:
    """What an existing claim means for a new attempt with the same key."""
    if now - stored_created_at >= window:
        return "reclaim"  # expired: the key is free again
    if stored_status == "in_flight" and now - stored_created_at >= lease:
        # The process holding it died mid-request (no request lives this long: the lease is
        # longer than the longest request the config allows). Its energy is refunded by the
        # sweeper.
        return "reclaim"
    if stored_fingerprint != fingerprint:
        return "mismatch"  # same key, different request: a client bug, never replay
    return "in_flight" if stored_status == "in_flight" else "done"


# ------------------------------------------------------------------- usage rows

# name -> kind; the order is the column order of inserts. `id` is assigned by the database.
USAGE_COLUMNS: dict[str, str] = {
    "request_id": "text",
    "user_id": "text",
    "workspace_id": "text",
    "prospect_id": "text",
    "action": "text",
    "provider": "text",
    "model": "text",
    "requested_model": "text",
    "downgraded_from": "text",
    "tokens_prompt": "int",
    "tokens_completion": "int",
    "tokens_total": "int",
    "cost_usd": "usd",  # Decimal; NULL: no known price
    "status": "int",
    "error_type": "text",
    "latency_ms": "int",
    "ttfb_ms": "int",
    "streamed": "bool",
    "energy_cost": "int",
    "cache_hit": "bool",
    "retries": "int",
    "usage_estimated": "bool",
    # Token classes (parts of tokens_prompt / tokens_completion, see plugins/base.py Usage)
    # and the USD per million tokens of each class that cost_usd was computed with, as JSON
    # text ({"input": 2.5, "cached_input": 1.25, ...}; NULL when nothing was priced).
    "tokens_cached": "int",
    "tokens_cache_write": "int",
    "tokens_reasoning": "int",
    "tokens_audio_in": "int",
    "tokens_audio_out": "int",
    "unit_prices": "text",
    # The A/B experiment and variant that served the request (plugins/experiments.py).
    "experiment": "text",
    "variant": "text",
    # A cache hit's (cache_hit) would-be cost: its tokens at the model's prices, what the
    # provider was not paid (gateway/usage.py). NULL on other rows and when unpriced.
    "saved_usd": "usd",
    # Upstream calls whose answers were discarded unbilled in energy (an overlapped
    # reservation lost: plugins/base.py UnbilledCall), their tokens and USD. cost_usd
    # includes unbilled_cost_usd; NULL without such a call (or when unpriced).
    "unbilled_calls": "int",
    "unbilled_tokens": "int",
    "unbilled_cost_usd": "usd",
    "created_at": "time",
}
# Columns that are NOT NULL with a default: a missing or None value becomes the default.
USAGE_DEFAULTS: dict[str, Any] = {
    "tokens_prompt": 0,
    "tokens_completion": 0,
    "tokens_total": 0,
    "energy_cost": 0,
    "retries": 0,
    "streamed": False,
    "cache_hit": False,
    "usage_estimated": False,
    "tokens_cached": 0,
    "tokens_cache_write": 0,
    "tokens_reasoning": 0,
    "tokens_audio_in": 0,
    "tokens_audio_out": 0,
    "unbilled_calls": 0,
    "unbilled_tokens": 0,
}


def _to_int(value: Any) -> int:
    return int(round(value)) if isinstance(value, float) else int(value)


class _Unrounded:
    """No value has this type: every USD amount goes through money.usd (the one rule)."""


# (column, the type a valid value already has, converter, default), in column order.
_USAGE_PLAN: list[tuple[str, type, Callable[[Any], Any], Any]] = [
    (name, {"text": str, "int": int, "usd": _Unrounded, "time": float, "bool": bool}[kind],
     {"text": str, "int": _to_int, "usd": usd, "time": float, "bool": bool}[kind],
     USAGE_DEFAULTS.get(name))
    for name, kind in USAGE_COLUMNS.items()
]
_USAGE_COLUMN_SET = frozenset(USAGE_COLUMNS)


def normalize_usage_row(row: dict[str, Any], now: float) -> dict[str, Any]:
    """Validate and coerce one usage row; `created_at` stays epoch float here.

    Unknown keys are errors: a misspelt column would otherwise vanish from billing
    reports silently. Rows without a request_id are accepted but cannot be deduplicated.
    Runs for every request's row, so a value already of its column's type is kept as is.
    """
    if not _USAGE_COLUMN_SET.issuperset(row):
        raise ValueError(f"unknown usage columns: {sorted(set(row) - _USAGE_COLUMN_SET)}")
    out: dict[str, Any] = {}
    get = row.get
    for name, kind, convert, default in _USAGE_PLAN:
        value = get(name)
        if value is None:
            value = now if name == "created_at" else default
        if value is not None and type(value) is not kind:
            value = convert(value)
        out[name] = value
    return out


USAGE_SLICE = 64  # usage rows prepared between two yields to the event loop
T = TypeVar("T")


async def prepare_usage_rows(rows: list[dict[str, Any]], now: float,
                             finish: Callable[[dict[str, Any]], T]) -> list[T]:
    """`finish(normalize_usage_row(row))` for every row of a batch, on the event loop but
    in slices: a batch holds up to a second's rows (thousands at load), and preparing it in
    one go held the loop ~10 ms per 500 rows (measured on the bench machine: the loop's
    longest stalls lined up with the usage-log flushes, and every request arriving then
    waited them out)."""
    out: list[T] = []
    for i, row in enumerate(rows):
        if i and not i % USAGE_SLICE:
            await asyncio.sleep(0)
        out.append(finish(normalize_usage_row(row, now)))
    return out


def iso_utc(epoch: float) -> str:
    """Fixed-width ISO-8601 UTC with microseconds and 'Z' (sorts correctly as text).

    Every usage row's `created_at` goes through here: the date and time down to the second
    are formatted once per second (a row's second is mostly the previous row's), the
    microseconds rounded as `datetime.fromtimestamp` rounds them (half to even)."""
    fraction, whole = math.modf(epoch)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        micros -= 1_000_000
        whole += 1.0
    elif micros < 0:  # before 1970: what datetime does for a negative fraction
        micros += 1_000_000
        whole -= 1.0
    global _ISO_SECOND
    second = int(whole)
    cached = _ISO_SECOND  # one tuple, read once: safe from any thread
    if cached[0] != second:
        cached = _ISO_SECOND = (second, datetime.fromtimestamp(second, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{cached[1]}.{micros:06d}Z"


_ISO_SECOND: tuple[int | None, str] = (None, "")  # the last second iso_utc formatted, and its text


def parse_iso_utc(text: str) -> float:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


# ---------------------------------------------------------------------- the Store


class Store(abc.ABC):
    """The gateway's persistence API. Obtain one with `open_store(url)`, then `open()`.

    Every method is a coroutine and every write is one database transaction.
    Usable as ``async with open_store(url) as store:`` (opens and closes).
    """

    url: str

    # lifecycle
    @abc.abstractmethod
    async def open(self, *, migrate: bool = True) -> None:
        """Connect and apply pending migrations (`migrate=False`: connect only, for
        ``./gw migrate --plan``). Raises gateway.store.migrations.SchemaTooNew when a later
        release applied a step this gateway cannot serve on."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def ping(self) -> bool:
        """True when the database answers a trivial query."""

    @abc.abstractmethod
    async def migrate(self) -> list[int]:
        """Apply pending migrations (serialized across processes); return those applied."""

    @abc.abstractmethod
    async def schema_versions(self) -> dict[int, int | None]:
        """The applied migrations, each with its min_code (gateway/store/migrations.py)."""

    # background backfills (gateway/store/backfill.py)
    @abc.abstractmethod
    async def backfill_states(self) -> list[dict[str, Any]]:
        """Every registered backfill's row (backfill.STATE_COLUMNS); [] before migration 20."""

    @abc.abstractmethod
    async def backfill_step(self, job: Any, owner: str, rows: int, *, lease: float,
                            now: float | None = None) -> dict[str, Any] | None:
        """One chunk of `job` (a backfill.Backfill) over the next `rows` usage ids below its
        cursor, and the moved cursor, in one transaction; the new state, or None when
        another owner's lease holds it."""

    @abc.abstractmethod
    async def usage_id_rows(self, lo: int | None = None, hi: int | None = None) -> int:
        """Usage rows with lo <= id < hi (a bound None: open)."""

    # the usage spool (migration 21)
    @abc.abstractmethod
    async def spool_usage(self, rows: list[dict[str, Any]], *, now: float | None = None) -> int:
        """Keep usage rows the usage log refused, as JSON, for a later process (a shutdown's
        last resort before the local journal)."""

    @abc.abstractmethod
    async def drain_usage_spool(self, limit: int = 500) -> int:
        """Write up to `limit` spooled rows to the usage log (idempotent: keyed by request
        id) and delete them; the number drained. Raises what insert_usage raises."""

    async def __aenter__(self) -> "Store":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # workspaces
    @abc.abstractmethod
    async def create_workspace(
        self, name: str, profile: dict | None = None, ai_settings: dict | None = None,
        *, now: float | None = None,
    ) -> Workspace: ...

    @abc.abstractmethod
    async def get_workspace(self, id_or_name: str) -> Workspace | None: ...

    @abc.abstractmethod
    async def list_workspaces(self) -> list[Workspace]: ...

    @abc.abstractmethod
    async def update_workspace(
        self, workspace_id: str, profile: dict | None = None, ai_settings: dict | None = None
    ) -> Workspace:
        """Replace profile and/or ai_settings (None leaves a field unchanged)."""

    # users
    @abc.abstractmethod
    async def create_user(
        self, workspace_id: str, tier: str, *, name: str | None = None, energy: int = 0,
        start_refill_period: bool = False, now: float | None = None,
    ) -> User:
        """`start_refill_period`: the tier has a refill, and its first period starts now with
        `energy` (refilled_at = created_at); the first top-up comes a period later. Without
        it refilled_at stays None and the first request on a tier with a refill tops up."""

    @abc.abstractmethod
    async def end_user(
        self, workspace_id: str, external_id: str, *, tier: str, energy: int,
        start_refill_period: bool = False, now: float | None = None,
    ) -> tuple[User, bool]:
        """The workspace's user with the app's id `external_id`, created (as create_user,
        with `tier` and `energy`) when there is none: `(user, created)`. Exactly one user per
        (workspace, external id) whatever the concurrency, across processes: a unique index
        decides, and the loser of a race finds the winner's user."""

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    async def list_users(self, workspace_id: str | None = None) -> list[User]: ...

    @abc.abstractmethod
    async def set_tier(self, user_id: str, tier: str) -> User: ...

    @abc.abstractmethod
    async def set_user_disabled(self, user_id: str, disabled: bool) -> User: ...

    # keys
    @abc.abstractmethod
    async def create_key(
        self, user_id: str, role: str = "user", *, service: bool = False, now: float | None = None,
        **controls: Any
    ) -> tuple[str, ApiKey]:
        """A new key; `controls` are per-key controls (KEY_CONTROLS), None for none;
        `service`: the key acts for the workspace's end users (ApiKey.service)."""

    @abc.abstractmethod
    async def update_key(self, key_id: str, **controls: Any) -> ApiKey:
        """Set per-key controls (KEY_CONTROLS; a None value removes that control)."""

    @abc.abstractmethod
    async def lookup_key(self, plaintext: str) -> KeyIdentity | None: ...

    @abc.abstractmethod
    async def revoke_key(self, key_id: str, *, now: float | None = None) -> ApiKey:
        """Revoke (idempotent: an already revoked key keeps its first revoked_at)."""

    @abc.abstractmethod
    async def rotate_key(self, key_id: str, *, now: float | None = None) -> tuple[str, ApiKey]:
        """Revoke a live key and issue its successor (with the same controls) in one transaction.

        A revoked key cannot be rotated (StoreConflict): rotation must not resurrect access."""

    @abc.abstractmethod
    async def list_keys(
        self, user_id: str | None = None, workspace_id: str | None = None
    ) -> list[ApiKey]: ...

    # energy
    @abc.abstractmethod
    async def balance(self, user_id: str) -> int: ...

    @abc.abstractmethod
    async def ledger(self, user_id: str) -> list[EnergyEntry]: ...

    @abc.abstractmethod
    async def reserve_energy(
        self, user_id: str, amount: int, request_id: str, *,
        refill: tuple[int, float] | None = None, now: float | None = None,
        budgets: tuple[BudgetHold, ...] = (),
    ) -> Reservation:
        """Reserve `amount` energy and, in the same transaction, hold each of `budgets`
        (gateway/budgets.py): every enforced budget must have room (spent + amount <= limit)
        and the balance must cover `amount`, or nothing is written. Budgets are checked
        first: a refused budget is `Reservation(ok=False, budget_refused=id)`."""

    @abc.abstractmethod
    async def settle_energy(
        self, request_id: str, final_amount: int | None = None, *, usd_final: int | None = None,
        now: float | None = None,
    ) -> int | None:
        """Settle: energy as reserved, or `final_amount` (at most the reservation); the
        request's budget holds in the same transaction (energy ones at the energy settled, USD
        ones at `usd_final` nano-dollars, as held when None)."""

    @abc.abstractmethod
    async def refund_energy(
        self, request_id: str, reason: str | None = None, *, now: float | None = None
    ) -> int | None: ...

    def reserve_energy_soon(
        self, user_id: str, amount: int, request_id: str, *,
        refill: tuple[int, float] | None = None, now: float | None = None,
        budgets: tuple[BudgetHold, ...] = (),
    ) -> "asyncio.Future[Reservation]":
        """`reserve_energy`, started now: returns its future at once (no task hop before the
        write is queued). The energy plugin uses it to overlap the reservation with the
        upstream call."""
        return asyncio.ensure_future(self.reserve_energy(user_id, amount, request_id, refill=refill, now=now,
                                                         budgets=budgets))

    async def settle_many(self, request_ids: list[str | tuple[str, int | None]], *, now: float | None = None) -> int:
        """Settle several reservations in full (as reserved); returns how many were open.
        An item `(request_id, usd_final)` also settles the request's USD budget holds at
        `usd_final` nano-dollars (None: as held); a plain id settles its holds as held.

        The same state transition as `settle_energy(id)` for each id (a settled or refunded
        one is left alone, never settled twice), batched: the gateway settles behind the
        answer, many requests per call. Backends override this with one transaction."""
        settled = 0
        for item in request_ids:
            request_id, usd_final = item if isinstance(item, tuple) else (item, None)
            if await self.settle_energy(request_id, usd_final=usd_final, now=now) is not None:
                settled += 1
        return settled

    # budgets (gateway/budgets.py, docs/budgets.md)
    @abc.abstractmethod
    async def set_budget(self, *, workspace_id: str, scope: str, scope_id: str, unit: str, amount: int,
                         period: str, timezone: str, alerts: tuple[int, ...], hard: str,
                         now: float | None = None) -> tuple[Budget | None, Budget]:
        """Create the budget of (scope, scope_id, unit, period), or change its amount,
        timezone, alerts and hard limit: `(before, after)`. What it spent is kept."""

    @abc.abstractmethod
    async def delete_budget(self, budget_id: str) -> Budget | None:
        """Remove a budget (its spend rows go too); None when there was none."""

    @abc.abstractmethod
    async def list_budgets(self, workspace_id: str | None = None) -> list[Budget]: ...

    @abc.abstractmethod
    async def budget_spent(self, periods: list[tuple[str, float]]) -> dict[tuple[str, float], int]:
        """What each (budget id, period start) has spent, reserved holds included (0: nothing)."""

    @abc.abstractmethod
    async def finish_orphan_holds(self, *, now: float | None = None) -> int:
        """Budget holds still open whose reservation was settled or refunded without them (by
        a process of the previous release, which knows no budgets): finished as their
        reservation was (settled: as held; refunded: returned). Returns how many."""

    @abc.abstractmethod
    async def grant_energy(
        self, user_id: str, amount: int, *, kind: str = "grant", reason: str | None = None,
        now: float | None = None,
    ) -> int: ...

    @abc.abstractmethod
    async def stale_reservations(self, older_than: float) -> list[str]:
        """request_ids still `reserved` that were created at or before `older_than`.

        A process that dies between reserve and settle leaves energy locked; a sweeper
        refunds these with `refund_energy(request_id, reason="stale")`."""

    # idempotency
    @abc.abstractmethod
    async def begin_idempotent(
        self, user_id: str, key: str, request_id: str, *, fingerprint: str, window: float,
        lease: float = IN_FLIGHT_LEASE, now: float | None = None,
    ) -> IdempotencyState:
        """Claim `key` for `request_id`, or say what an existing claim means. An in-flight
        claim older than `lease` belongs to a dead process and is taken over."""

    @abc.abstractmethod
    async def finish_idempotent(
        self, user_id: str, key: str, status_code: int, body: bytes, *,
        request_id: str | None = None, now: float | None = None,
    ) -> bool:
        """Store the response of an in-flight claim. With `request_id`, only if the claim
        is still that request's (it may have expired and been re-claimed). True if stored."""

    @abc.abstractmethod
    async def release_idempotent(
        self, user_id: str, key: str, *, request_id: str | None = None
    ) -> bool:
        """Delete an in-flight claim so a retry runs again. True if one was deleted."""

    # usage
    @abc.abstractmethod
    async def insert_usage(self, rows: list[dict[str, Any]], *, now: float | None = None) -> int:
        """Insert rows in one transaction; rows whose request_id exists are skipped.
        Returns how many rows were actually inserted."""

    @abc.abstractmethod
    async def usage_rows(
        self, since: float | None = None, workspace_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Rows with created_at >= since, oldest first; created_at as epoch float.
        Tests and small tools only: reports read `usage_totals` (never a window of rows)."""

    # reports (gateway/admin/reports.py): computed by the database, off the event loop -------

    dialect = ""  # "sqlite" or "postgres": which SQL gateway.store.rollup writes

    @abc.abstractmethod
    async def record_feedback(self, request_id: str, user_id: str, metric: str, value: float,
                              *, now: float | None = None) -> None:
        """One outcome of a request (POST /v1/feedback); the same (request, metric) again
        replaces the value: idempotent."""

    @abc.abstractmethod
    async def remember_response(self, response_id: str, user_id: str, workspace_id: str, model: str,
                                upstream: str, *, now: float | None = None) -> None:
        """A Responses API response the upstream stored (POST /v1/responses): whose it is
        and which upstream account holds it (gateway/inbound/responses.py). Idempotent."""

    @abc.abstractmethod
    async def stored_response(self, response_id: str) -> dict[str, Any] | None:
        """`remember_response`'s record (user_id, workspace_id, model, upstream, created_at)."""

    @abc.abstractmethod
    async def forget_response(self, response_id: str) -> None:
        """After the upstream deleted it (DELETE /v1/responses/{id})."""

    # files and batches (gateway/files.py, gateway/batches.py)
    @abc.abstractmethod
    async def remember_file(self, record: dict[str, Any]) -> None:
        """A file the gateway uploaded for a user (FILE_COLUMNS), or a batch's output or error
        file the gateway found (`batch_id` set: its content is rewritten when served).
        Idempotent (the same file_id again is skipped)."""

    @abc.abstractmethod
    async def stored_file(self, file_id: str) -> dict[str, Any] | None:
        """`remember_file`'s record, or None."""

    @abc.abstractmethod
    async def list_files(self, user_id: str, *, purpose: str | None = None, limit: int = 100,
                         after: str | None = None) -> list[dict[str, Any]]:
        """The user's files, newest first; `after`: those listed after that file id."""

    @abc.abstractmethod
    async def forget_file(self, file_id: str) -> None:
        """After the upstream deleted it."""

    @abc.abstractmethod
    async def insert_batch(self, record: dict[str, Any], lines: list[str]) -> None:
        """A batch being created (BATCH_COLUMNS; `batch_id` None until the upstream named it),
        with its input's custom_ids (`lines`, in order)."""

    @abc.abstractmethod
    async def batch_record(self, *, batch_id: str | None = None, id: str | None = None,
                           with_lines: bool = False) -> dict[str, Any] | None:
        """A batch by the upstream's id (`batch_id`) or the gateway's (`id`); with `lines`
        (the custom_ids) if asked."""

    @abc.abstractmethod
    async def list_batches(self, user_id: str, *, limit: int = 20, after: str | None = None,
                           messages: bool = False) -> list[dict[str, Any]]:
        """The user's batches that reached the upstream, newest first; `after`: a batch_id;
        `messages`: Anthropic's message batches, else OpenAI's."""

    @abc.abstractmethod
    async def update_batch(self, id: str, fields: dict[str, Any], *, owner: str | None = None,
                           unsettled: bool = False) -> bool:
        """Set BATCH_UPDATABLE fields; with `owner`, only while that owner holds its lease;
        `unsettled`, only while the batch is not settled. True if the row was updated."""

    @abc.abstractmethod
    async def claim_batches(self, owner: str, *, lease: float, limit: int,
                            now: float | None = None) -> list[dict[str, Any]]:
        """Up to `limit` unsettled batches due for a poll (`next_poll_at` passed), leased to
        `owner` for `lease` seconds: no other claim, in any process, returns them before the
        lease ends (gateway/batches.py: one poller per batch across processes)."""

    @abc.abstractmethod
    async def report_query(self, sql: str, args: list[Any]) -> list[dict[str, Any]]:
        """One read-only query (`?` placeholders) on a connection that serves neither the
        event loop's requests nor the write path: SQLite, a read connection on its own
        thread; PostgreSQL, the pool."""

    @abc.abstractmethod
    def report_time(self, epoch: float) -> Any:
        """`epoch` as the store compares ai_usage_logs.created_at."""

    @abc.abstractmethod
    def usd(self, stored: Any) -> Decimal | None:
        """A USD column (or a SUM of one) as this store's SQL returns it, as a Decimal."""

    # the audit log (append-only: there is no method to change or delete a row)
    @abc.abstractmethod
    async def append_audit(self, entry: dict[str, Any], *, now: float | None = None) -> None:
        """One row: actor, actor_key_id, actor_key_prefix, via, action, target, workspace_id,
        before, after (JSON-able, no secret), request_id (AUDIT_COLUMNS)."""

    @abc.abstractmethod
    async def audit_entries(self, *, workspace_id: str | None = None, since: float | None = None,
                            limit: int = 100) -> list[dict[str, Any]]:
        """The newest rows first (`created_at` epoch seconds); only `workspace_id`'s if given."""

    # dashboard sign-in sessions and pending OIDC logins (gateway/admin/oidc.py)
    @abc.abstractmethod
    async def create_dashboard_session(self, row: dict[str, Any]) -> None:
        """Insert one session (DASHBOARD_SESSION_COLUMNS); sessions and logins expired before
        its `created_at` are deleted in the same transaction."""

    @abc.abstractmethod
    async def dashboard_session(self, id_hash: str) -> dict[str, Any] | None:
        """The session whose id hashes to `id_hash`, expired or not (the caller compares
        `expires_at`), or None."""

    @abc.abstractmethod
    async def delete_dashboard_session(self, id_hash: str) -> bool:
        """Sign-out: the session is gone for every process. True when there was one."""

    @abc.abstractmethod
    async def create_oidc_login(self, row: dict[str, Any], *, limit: int | None = None) -> bool:
        """A pending login (OIDC_LOGIN_COLUMNS), between the redirect to the provider and its
        callback; logins expired before its `created_at` are deleted in the same transaction.
        False (nothing written) when `limit` unexpired logins are already pending (on
        PostgreSQL, logins created at the same instant may pass it by their number)."""

    @abc.abstractmethod
    async def take_oidc_login(self, state_hash: str) -> dict[str, Any] | None:
        """Delete and return the pending login of `state_hash`: one callback can use it, a
        second (a replayed `state`) finds nothing, also in another process."""

    # the alerts outbox (gateway/alerts.py)
    @abc.abstractmethod
    async def enqueue_alerts(self, rows: list[dict[str, Any]], *, now: float | None = None) -> int:
        """Add pending deliveries (event_id, endpoint, event_type, workspace_id, payload: the
        event's JSON text, never a secret), due now. A row whose (event_id, endpoint) is
        already there is skipped: the same event emitted twice is delivered once. Returns how
        many were added."""

    @abc.abstractmethod
    async def claim_alerts(self, owner: str, *, lease: float, limit: int,
                           now: float | None = None) -> list[dict[str, Any]]:
        """Up to `limit` due pending rows (OUTBOX_CLAIMED), leased to `owner` for `lease`
        seconds: no other claim, in any process, returns them before the lease ends."""

    @abc.abstractmethod
    async def finish_alert(self, row_id: int, owner: str, *, status: str, attempts: int, next_attempt_at: float,
                           last_status: int | None = None, last_error: str | None = None,
                           now: float | None = None) -> bool:
        """Record an attempt of a row `owner` holds: `delivered`, `failed` (given up) or
        `pending` again (due at `next_attempt_at`); the lease is released. False when the
        row is no longer this owner's."""

    @abc.abstractmethod
    async def prune_alerts(self, *, older_than: float, limit: int, now: float | None = None) -> int:
        """Delete up to `limit` finished rows (`delivered`, or `failed`: given up) whose last
        attempt (`next_attempt_at`, set to the finishing time by the deliverer) is more than
        `older_than` seconds before `now`; a pending row is never deleted. Returns how many
        went (`limit` when more may be left). One short statement: no long lock."""

    @abc.abstractmethod
    async def alert_deliveries(self, *, workspace_id: str | None = None, status: str | None = None,
                               since: float | None = None, limit: int = 100,
                               event_id: str | None = None) -> list[dict[str, Any]]:
        """Outbox rows (OUTBOX_LISTED), newest first; only `workspace_id`'s, ... if given."""

    # changes pushed to every process (gateway/change_feed.py)
    @abc.abstractmethod
    async def publish_change(self, target: str) -> None:
        """Tell every gateway process that `target` ("key:<id>", "user:<id>",
        "workspace:<id>") changed: the change counter is bumped (and, on PostgreSQL, a
        NOTIFY carries the target). Called after the change is committed."""

    @abc.abstractmethod
    async def change_counter(self) -> int:
        """How many changes were published so far (compared between two reads)."""

    async def listen_changes(self, on_change: Callable[[str], None],
                             on_lost: Callable[[], None]) -> Callable[[], Any] | None:
        """Push: call `on_change(target)` for each published change, `on_lost()` if the
        subscription breaks. Returns an async `close()`, or None where this store cannot
        push (then the counter is polled)."""
        return None

    @abc.abstractmethod
    async def prune_usage(self, before: float) -> int:
        """Drop raw usage rows older than `before` (PostgreSQL: whole months, SQLite: in
        small transactions); the rollup keeps their numbers. Returns the rows dropped."""

    async def usage_totals(self, by: str | None, since: float, workspace_id: str | None = None,
                           limit: int | None = None, *, measures: tuple[str, ...] | None = None,
                           now: float | None = None) -> list[dict[str, Any]]:
        """`measures` (default: every rollup measure; "requests" always) summed over
        created_at >= since, grouped by `by` (None, "day", "user", "action", "model",
        "provider", "workspace"; the group's value as "key"); with `limit`, the costliest
        groups only. See gateway.usage_rollup."""
        ranges, edge = usage_rollup.window_plan(since, now_or(now))
        sql = usage_rollup.totals_query(self.dialect, by, ranges, edge=edge, workspace=workspace_id is not None,
                                        limit=limit is not None, measures=measures)
        ws = [workspace_id] if workspace_id is not None else []
        args: list[Any] = []
        for _, start, stop in ranges:
            args += [start, stop, *ws]
        if edge:
            args += [self.report_time(since), self.report_time(ranges[0][1]), *ws]
        if limit is not None:
            args.append(limit)
        rows = await self.report_query(sql, args)
        for row in rows:
            for name in ("key", "workspace_id"):
                if name in row:
                    row[name] = usage_rollup.none_if_empty(row[name])
            for name in usage_rollup.USD:
                if name in row:
                    row[name] = self.usd(row[name])
        return [r for r in rows if r["requests"]]  # an empty window sums to one row of NULLs/0

    async def latency_histogram(self, since: float, workspace_id: str | None = None, *,
                                now: float | None = None) -> dict[str, dict[str, Any]]:
        """The fine latency histogram of created_at >= since, per measure ("latency",
        "ttfb"): {"counts": {bucket: n}, "covered": bool}. `covered`: every request of
        the window with that measure is in it (its count equals the rollup's, read in the
        same statement); when not, the counts are partial: use the rollup's coarse buckets.
        See gateway.store.rollup, "The fine histogram"."""
        ranges, edge = usage_rollup.window_plan(since, now_or(now))
        sql = usage_rollup.histogram_query(self.dialect, ranges, edge=edge, workspace=workspace_id is not None)
        ws = [workspace_id] if workspace_id is not None else []
        args: list[Any] = []
        for _ in range(3):  # the fine counts, then the rollup's two counts, over the same ranges
            for _, start, stop in ranges:
                args += [start, stop, *ws]
        if edge:
            args += [self.report_time(since), self.report_time(ranges[0][1]), *ws]
        counts: list[dict[int, int]] = [{}, {}]
        fine, rollup = [0, 0], [0, 0]
        for row in await self.report_query(sql, args):
            measure, n = int(row["measure"]), int(row["n"] or 0)
            if row["src"] == 2:
                rollup[measure] += n
                continue
            if row["src"] == 0:
                fine[measure] += n
            bucket = int(row["bucket"])
            counts[measure][bucket] = counts[measure].get(bucket, 0) + n
        return {name: {"counts": {b: n for b, n in counts[m].items() if n}, "covered": fine[m] == rollup[m]}
                for m, name in enumerate(("latency", "ttfb"))}

    @abc.abstractmethod
    async def backfill_latency_histogram(self, lo: int, hi: int) -> int:
        """Add the usage rows with ids in [lo, hi) to the fine latency histogram, but those
        at or above the coverage boundary (kept live) and those an earlier call added: one
        transaction that also records the range, so it is idempotent, resumable, and safe
        from several processes at once, and beside the background ``latency_histogram``
        backfill (gateway/store/backfill.py), which keeps the same range record. Returns the
        usage rows added. See gateway.store.rollup, "The fine histogram"."""

    async def latency_histogram_coverage(self) -> dict[str, Any]:
        """The fine histogram's coverage: `live_from_id` (rows with an id at or above it are
        kept live, since `started_at`, epoch seconds), the id ranges `backfilled` and those
        still `pending` (from the oldest usage row kept), `complete` when none is."""
        (cov,) = await self.report_query(
            f"SELECT live_from_id, started_at FROM {usage_rollup.HIST_COVERAGE} WHERE id = 1", [])
        done = usage_rollup.hist_union([(int(r["lo"]), int(r["hi"])) for r in await self.report_query(
            f"SELECT lo, hi FROM {usage_rollup.HIST_BACKFILLED} ORDER BY lo", [])])
        (first,) = await self.report_query("SELECT MIN(id) AS id FROM ai_usage_logs", [])
        live = int(cov["live_from_id"])
        pending = usage_rollup.hist_pending(int(first["id"] if first["id"] is not None else live), live, done)
        return {"live_from_id": live, "started_at": float(cov["started_at"]), "backfilled": done,
                "pending": pending, "complete": not pending}

    async def run_latency_histogram_backfill(self, chunk: int = 5_000) -> int:
        """The whole backfill, chunk after chunk of ids, here and now (tests; ./gw migrate
        --backfill runs the background one to its end). Returns the usage rows added."""
        added = 0
        while pending := (await self.latency_histogram_coverage())["pending"]:
            lo, hi = pending[0]
            added += await self.backfill_latency_histogram(lo, min(hi, lo + chunk))
        return added

    async def energy_refunded(self, since: float, workspace_id: str | None = None) -> int:
        """Energy returned by refunds since `since` (the ledger's partial refund index)."""
        sql = "SELECT COALESCE(SUM(l.amount), 0) AS refunded FROM energy_ledger l"
        args: list[Any] = []
        if workspace_id is not None:
            sql += " JOIN users u ON u.id = l.user_id AND u.workspace_id = ?"
            args.append(workspace_id)
        rows = await self.report_query(sql + " WHERE l.kind = 'refund' AND l.created_at >= ?", [*args, since])
        return int(rows[0]["refunded"] or 0)

    async def energy_balances(self, workspace_id: str | None = None, user_ids: list[str] | None = None,
                              limit: int = 10) -> dict[str, Any]:
        """Balances: per workspace (users, energy; the largest `limit`) and of `user_ids`."""
        where, args = "", []
        if workspace_id is not None:
            where, args = " WHERE u.workspace_id = ?", [workspace_id]
        workspaces = await self.report_query(
            "SELECT u.workspace_id, w.name, COUNT(*) AS users, CAST(SUM(u.energy) AS BIGINT) AS energy"
            f" FROM users u JOIN workspaces w ON w.id = u.workspace_id{where}"
            " GROUP BY u.workspace_id, w.name ORDER BY energy DESC, u.workspace_id LIMIT ?", [*args, limit])
        users: list[dict[str, Any]] = []
        if user_ids:
            marks = ", ".join("?" for _ in user_ids)
            users = await self.report_query(
                f"SELECT id AS user_id, workspace_id, tier, energy FROM users WHERE id IN ({marks})", list(user_ids))
        return {"workspaces": workspaces, "users": users}


# ---------------------------------------------------------------------- factory

SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
