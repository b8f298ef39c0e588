"""Admin operations: one implementation behind both the CLI and the /admin HTTP API.

Every operation takes a `Scope`: the master key (CLI, or the master key over HTTP) may do
everything; a workspace admin key may manage and read only its own workspace. Bad input
(unknown tier, negative grant, unknown user) raises an `ApiError` before anything changes.
Changes that affect identity (tier, revoke, rotate, key controls, workspace settings) are
pushed into this process's Directory cache at once and published to every other process
through the store (gateway/change_feed.py).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any

from gateway.config import Config
from gateway.directory import Directory
from gateway.errors import ApiError
from gateway.store import NotFound, StoreConflict, backfill

# Balances are 64-bit integers in both stores; an amount past this bound is a typo, and
# past 2**63 it would surface as a database overflow (a 500 / a CLI traceback).
MAX_ENERGY_AMOUNT = 10**15

# Ranges of the report and listing parameters (docs/admin.md "Parameter limits"): past
# them a query asks the database for centuries of rows or a time before year 1 (a 500
# from a datetime overflow), never for anything an operator needs.
REPORT_DAYS = (1, 3660)               # usage reports: ten years
REPORT_LIMIT = (1, 1000)              # rows of top-users, users on the dashboard
LEDGER_LIMIT = (1, 10000)             # ledger entries shown
METRICS_WINDOW = (1.0, 3660 * 86400.0)  # /admin/metrics?window=: one second to ten years
AUDIT_LIMIT = (1, 1000)               # audit rows shown
ALERTS_LIMIT = (1, 1000)              # alert deliveries shown
SEARCH_LIMIT = (1, 200)               # users found by one search
REQUESTS_LIMIT = (1, 500)             # a user's last requests shown
# A user's last requests as the console shows them: the usage log's metadata, no content.
REQUEST_FIELDS = ("request_id", "created_at", "status", "error_type", "model", "provider", "action",
                  "tokens_prompt", "tokens_completion", "tokens_total", "cost_usd", "energy_cost",
                  "latency_ms", "ttfb_ms", "cache_hit", "streamed")
ALERT_STATUSES = ("pending", "delivered", "failed")
KEY_EXPIRES = (1.0, 3660 * 86400.0)   # keys create --expires: one second to ten years
KEY_PER_MINUTE = (1, 10**9)           # a key's rpm / tpm
KEY_MODELS_MAX = 100                  # models named on one key
KEY_CONTROL_FIELDS = ("label", "expires", "models", "rpm", "tpm")  # create_key / update_key
# Identifiers (user, workspace, key ids and names) the store is asked about: longer ones,
# or ones PostgreSQL cannot hold (NUL), name nothing there.
MAX_IDENT_CHARS = 200

_WORKSPACE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


def _delivery(row: dict) -> dict:
    """An outbox row as an admin reads it: the event's data, never the endpoint's URL or secret."""
    import json

    out = {k: v for k, v in row.items() if k != "payload"}
    event = json.loads(row["payload"])
    out["summary"], out["data"] = event.get("summary"), event.get("data")
    return out


def _budget_amount(unit: str, value: int) -> Any:
    """A budget amount as the API shows it: energy an integer, USD a Decimal of dollars."""
    from decimal import Decimal

    return Decimal(value).scaleb(-9).normalize() if unit == "usd" else value


def _budget_public(budget: Any, *, text: bool = False) -> dict:
    """A budget as the API shows it; `text`: USD as text (the audit log's JSON)."""
    from gateway.budgets import display

    row = as_dict(budget)
    row["alerts"] = list(budget.alerts)
    row["amount"] = display(budget.unit, budget.amount) if text and budget.unit == "usd" \
        else _budget_amount(budget.unit, budget.amount)
    return row


def _master_only(what: str) -> ApiError:
    # Energy and tiers are what the operator sells: a workspace admin manages its people
    # and keys, but cannot mint energy or upgrade tiers (not even its own).
    return ApiError(403, f"{what} needs the master key", type="invalid_request_error", code="forbidden")


@dataclass(frozen=True)
class Scope:
    role: str  # "master" | "workspace_admin"
    workspace_id: str | None = None
    key_id: str | None = None  # the workspace admin key acting (its id and public prefix: the audit's actor)
    key_prefix: str | None = None
    # A dashboard sign-in session (gateway/admin/oidc.py): who signed in (the identity
    # provider's subject and e-mail, the audit's actor), and whether the session only reads
    # (a viewer: the master's or a workspace admin's reads, no change; the /admin API
    # refuses its other methods before any operation runs).
    subject: str | None = None
    email: str | None = None
    read_only: bool = False

    @property
    def is_master(self) -> bool:
        return self.role == "master"


MASTER = Scope("master")


def as_dict(obj: Any) -> Any:
    if is_dataclass(obj):
        return {k: as_dict(v) for k, v in asdict(obj).items()}
    if isinstance(obj, list):
        return [as_dict(x) for x in obj]
    return obj


def _not_found(what: str, ident: str) -> ApiError:
    return ApiError(404, f"unknown {what} '{str(ident)[:MAX_IDENT_CHARS]}'", code=f"{what}_not_found")


def _nameable(ident: Any) -> bool:
    return isinstance(ident, str) and 0 < len(ident) <= MAX_IDENT_CHARS and "\x00" not in ident


def _holds_nul(node: Any) -> bool:
    stack = [node]  # a loop, not recursion: a body may nest as deep as the JSON parser allows
    while stack:
        item = stack.pop()
        if isinstance(item, str) and "\x00" in item:
            return True
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _forbidden() -> ApiError:
    # Same message whether the object exists elsewhere or not: no cross-workspace probing.
    return ApiError(404, "not found in your workspace", code="not_found")


# Fields that are secrets wherever they appear: never written to the audit log.
_SECRET_FIELDS = ("api_key", "key_hash")


def _public(value: Any) -> Any:
    """An audit value: a dataclass or dict without any secret field."""
    value = as_dict(value)
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if k not in _SECRET_FIELDS}
    if isinstance(value, (list, tuple)):
        return [_public(v) for v in value]
    return value


class Admin:
    """`via` ("cli" or "api") and `request_id` say where the actions come from, for the audit
    log: the HTTP API sets both per request; a CLI invocation has one request id."""

    def __init__(self, store: Any, config: Config, directory: Directory | None = None, *,
                 via: str = "cli", request_id: str | None = None):
        self.store = store
        self.config = config
        self.directory = directory
        self.via = via
        self.request_id = request_id or f"cli-{uuid.uuid4().hex[:16]}"

    # --- helpers ------------------------------------------------------------------

    async def _audit(self, scope: Scope, action: str, target: str | None, workspace_id: str | None,
                     before: Any = None, after: Any = None) -> None:
        """One audit row for a change that is committed (docs/admin.md "Audit log")."""
        await self.store.append_audit({
            "actor": scope.role, "actor_key_id": scope.key_id, "actor_key_prefix": scope.key_prefix,
            "via": self.via, "action": action, "target": target, "workspace_id": workspace_id,
            "before": _public(before), "after": _public(after), "request_id": self.request_id,
            "actor_subject": scope.subject, "actor_email": scope.email,
        })

    async def session_event(self, scope: Scope, action: str, detail: Any = None) -> None:
        """A dashboard sign-in or sign-out (gateway/admin/oidc.py), audited as its actor."""
        await self._audit(scope, action, scope.subject, scope.workspace_id, None, detail)

    async def _changed(self, kind: str, ident: str) -> None:
        """An identity-affecting change is committed: forget it here, tell every process."""
        if self.directory is not None:
            forget = {"workspace": self.directory.forget_workspace, "user": self.directory.forget_user,
                      "key": self.directory.forget_key}[kind]
            forget(ident)
        await self.store.publish_change(f"{kind}:{ident}")

    def _check_tier(self, tier: str) -> None:
        if not isinstance(tier, str) or tier not in self.config.tiers:
            raise ApiError(400, f"unknown tier '{tier}' (configured: {', '.join(sorted(self.config.tiers))})",
                           code="unknown_tier", param="tier")

    async def _workspace(self, scope: Scope, ident: str) -> Any:
        workspace = await self.store.get_workspace(ident) if _nameable(ident) else None
        if workspace is None:
            raise _forbidden() if not scope.is_master else _not_found("workspace", ident)
        if not scope.is_master and workspace.id != scope.workspace_id:
            raise _forbidden()
        return workspace

    async def _user(self, scope: Scope, user_id: str) -> Any:
        try:
            user = await self.store.get_user(user_id) if _nameable(user_id) else None
        except NotFound:
            user = None
        if user is None:
            raise _forbidden() if not scope.is_master else _not_found("user", user_id)
        if not scope.is_master and user.workspace_id != scope.workspace_id:
            raise _forbidden()
        return user

    async def _key(self, scope: Scope, key_id: str) -> Any:
        for key in await self.store.list_keys():
            if key.id == key_id:
                if not scope.is_master and key.workspace_id != scope.workspace_id:
                    raise _forbidden()
                return key
        raise _forbidden() if not scope.is_master else _not_found("key", key_id)

    # --- workspaces ---------------------------------------------------------------

    async def create_workspace(self, scope: Scope, name: str, profile: dict | None = None,
                               ai_settings: dict | None = None) -> dict:
        if not scope.is_master:
            raise ApiError(403, "only the master key can create workspaces", code="forbidden")
        if not isinstance(name, str) or not _WORKSPACE_NAME.match(name):
            raise ApiError(400, "workspace name must be 1-63 lowercase letters, digits or '-'",
                           param="name", code="invalid_name")
        self._check_json_object(profile, "profile")
        self._check_json_object(ai_settings, "ai_settings")
        try:
            workspace = await self.store.create_workspace(name, profile=profile, ai_settings=ai_settings)
        except StoreConflict:
            raise ApiError(409, f"workspace '{name}' already exists", code="already_exists") from None
        await self._audit(scope, "workspace.create", workspace.id, workspace.id, None, workspace)
        return as_dict(workspace)

    async def list_workspaces(self, scope: Scope) -> list[dict]:
        workspaces = await self.store.list_workspaces()
        return [as_dict(w) for w in workspaces if scope.is_master or w.id == scope.workspace_id]

    async def show_workspace(self, scope: Scope, ident: str) -> dict:
        workspace = await self._workspace(scope, ident)
        out = as_dict(workspace)
        out["users"] = len(await self.store.list_users(workspace_id=workspace.id))
        return out

    async def update_workspace(self, scope: Scope, ident: str, profile: dict | None = None,
                               ai_settings: dict | None = None) -> dict:
        workspace = await self._workspace(scope, ident)
        self._check_json_object(profile, "profile")
        self._check_json_object(ai_settings, "ai_settings")
        if ai_settings is not None:
            model = ai_settings.get("default_model")
            if model is not None and not self.config.deployments(str(model)):
                raise ApiError(400, f"ai_settings.default_model: unknown model '{model}'", param="ai_settings")
        updated = await self.store.update_workspace(workspace.id, profile=profile, ai_settings=ai_settings)
        await self._changed("workspace", workspace.id)
        changed = [name for name, value in (("profile", profile), ("ai_settings", ai_settings)) if value is not None]
        await self._audit(scope, "workspace.update", workspace.id, workspace.id,
                          {n: getattr(workspace, n) for n in changed}, {n: getattr(updated, n) for n in changed})
        return as_dict(await self.store.get_workspace(workspace.id))

    @staticmethod
    def _check_text(value: Any, name: str, limit: int = 500) -> None:
        # JSON bodies can carry anything; the store would fail to bind it (a 500).
        if value is not None and (not isinstance(value, str) or len(value) > limit or "\x00" in value):
            raise ApiError(400, f"'{name}' must be a string of at most {limit} characters (no NUL)", param=name)

    @staticmethod
    def _check_json_object(value: Any, name: str) -> None:
        if value is not None and not isinstance(value, dict):
            raise ApiError(400, f"'{name}' must be a JSON object", param=name)
        if value is not None and _holds_nul(value):  # PostgreSQL's jsonb refuses \u0000
            raise ApiError(400, f"'{name}' must not contain NUL characters", param=name)

    # --- users ----------------------------------------------------------------------

    async def create_user(self, scope: Scope, workspace: str, tier: str | None = None, energy: int | None = None,
                          name: str | None = None, role: str = "user") -> dict:
        """`energy` None: the tier's refill amount (0 on a tier without a refill)."""
        tier = tier or self.config.auth.default_tier
        self._check_tier(tier)
        refill = self.config.tiers[tier].refill
        given = energy is not None
        if energy is None:
            energy = refill.amount if refill is not None else 0
        if isinstance(energy, bool) or not isinstance(energy, int) or not 0 <= energy <= MAX_ENERGY_AMOUNT:
            raise ApiError(400, f"energy must be an integer from 0 to {MAX_ENERGY_AMOUNT}", param="energy")
        if role not in ("user", "workspace_admin"):
            raise ApiError(400, "role must be 'user' or 'workspace_admin'", param="role")
        self._check_text(name, "name")
        if not isinstance(workspace, str):
            raise ApiError(400, "'workspace' must be a workspace name or id", param="workspace")
        ws = await self._workspace(scope, workspace)
        if not scope.is_master and ((given and energy > 0) or tier != self.config.auth.default_tier):
            raise _master_only("giving a new user energy or a tier other than the default")
        # On a tier with a refill, creation starts the first period with the energy given:
        # `--energy 3` means 3 until the period ends, not a top-up at the first request.
        user = await self.store.create_user(ws.id, tier, name=name, energy=energy,
                                            start_refill_period=refill is not None)
        plaintext, key = await self.store.create_key(user.id, role=role)
        await self._audit(scope, "user.create", user.id, ws.id, None, {**as_dict(user), "key": key})
        out = as_dict(user)
        out["api_key"] = plaintext
        out["key"] = as_dict(key)
        out["workspace"] = ws.name
        return out

    async def list_users(self, scope: Scope, workspace: str | None = None) -> list[dict]:
        if workspace is not None:
            ws = await self._workspace(scope, workspace)
            users = await self.store.list_users(workspace_id=ws.id)
        elif scope.is_master:
            users = await self.store.list_users()
        else:
            users = await self.store.list_users(workspace_id=scope.workspace_id)
        return [as_dict(u) for u in users]

    async def show_user(self, scope: Scope, user_id: str) -> dict:
        user = await self._user(scope, user_id)
        out = as_dict(user)
        out["keys"] = [as_dict(k) for k in await self.store.list_keys(user_id=user.id)]
        return out

    async def set_tier(self, scope: Scope, user_id: str, tier: str) -> dict:
        self._check_tier(tier)
        user = await self._user(scope, user_id)
        if not scope.is_master:
            raise _master_only("changing a tier")
        await self.store.set_tier(user.id, tier)
        await self._changed("user", user.id)
        await self._audit(scope, "user.set_tier", user.id, user.workspace_id, {"tier": user.tier}, {"tier": tier})
        return as_dict(await self.store.get_user(user.id))

    async def grant_energy(self, scope: Scope, user_id: str, amount: int, reason: str | None = None,
                           kind: str = "grant") -> dict:
        if kind not in ("grant", "adjust"):
            raise ApiError(400, "kind must be 'grant' or 'adjust'", param="kind")
        if isinstance(amount, bool) or not isinstance(amount, int) or abs(amount) > MAX_ENERGY_AMOUNT:
            raise ApiError(400, f"amount must be an integer of at most {MAX_ENERGY_AMOUNT} in size", param="amount")
        self._check_text(reason, "reason")
        if kind == "grant" and amount <= 0:
            raise ApiError(400, "a grant must be a positive amount (use kind 'adjust' to remove energy)",
                           param="amount")
        user = await self._user(scope, user_id)
        if not scope.is_master:
            raise _master_only("granting or adjusting energy")
        try:
            balance = await self.store.grant_energy(user.id, amount, kind=kind, reason=reason)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="amount") from None
        except Exception as exc:
            if type(exc).__name__ == "InsufficientEnergy":
                raise ApiError(400, f"cannot remove {-amount} energy: the balance would go below zero",
                               param="amount", code="insufficient_energy") from None
            raise
        await self._audit(scope, f"energy.{kind}", user.id, user.workspace_id, {"energy": balance - amount},
                          {"energy": balance, "amount": amount, "reason": reason})
        return {"user_id": user.id, "energy": balance}

    async def ledger(self, scope: Scope, user_id: str, limit: int = 100) -> list[dict]:
        # entries[-0:] is the whole list: a limit below 1 must be refused, not obeyed backwards.
        if isinstance(limit, bool) or not isinstance(limit, int) or not LEDGER_LIMIT[0] <= limit <= LEDGER_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer from {LEDGER_LIMIT[0]} to {LEDGER_LIMIT[1]}", param="limit")
        user = await self._user(scope, user_id)
        entries = await self.store.ledger(user.id)
        return [as_dict(e) for e in entries[-limit:]]

    # --- keys -------------------------------------------------------------------------

    async def create_key(self, scope: Scope, user_id: str, role: str = "user", *, service: bool = False,
                         **controls: Any) -> dict:
        """`controls`: label, expires (a duration from now: "30d", or seconds), models (a
        list, a subset of the user's tier's), rpm, tpm; docs/admin.md "Per-key controls".
        `service`: the key acts for the workspace's end users (docs/admin.md "End users by
        your app's ids"); master key only, since each new end user starts with energy."""
        if role not in ("user", "workspace_admin"):
            raise ApiError(400, "role must be 'user' or 'workspace_admin'", param="role")
        if not isinstance(service, bool):
            raise ApiError(400, "service must be true or false", param="service")
        if service and role != "user":
            raise ApiError(400, "a service key acts for end users: it cannot be a workspace admin key", param="role")
        user = await self._user(scope, user_id)
        if service and not scope.is_master:
            raise _master_only("a service key (it provisions end users with energy)")
        if service and user.external_id is not None:
            raise ApiError(400, "a service key belongs to a user of the workspace, not to an end user", param="service")
        values = self._key_controls(controls, user.tier)
        plaintext, key = await self.store.create_key(user.id, role=role, service=service, **values)
        await self._audit(scope, "key.create", key.id, key.workspace_id, None, key)
        return {**as_dict(key), "api_key": plaintext}

    async def update_key(self, scope: Scope, key_id: str, **controls: Any) -> dict:
        """Set or (with None) remove per-key controls of a live or revoked key."""
        key = await self._key(scope, key_id)
        user = await self.store.get_user(key.user_id)
        values = self._key_controls(controls, user.tier if user is not None else None)
        updated = await self.store.update_key(key.id, **values)
        await self._changed("key", key.id)
        await self._audit(scope, "key.update", key.id, key.workspace_id, key, updated)
        return as_dict(updated)

    def _key_controls(self, controls: dict[str, Any], tier: str | None) -> dict[str, Any]:
        """The API's per-key controls, checked, as the store's columns (expires -> expires_at)."""
        import time

        from gateway.config import parse_duration

        unknown = set(controls) - set(KEY_CONTROL_FIELDS)
        if unknown:
            raise ApiError(400, f"unknown key control '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
        out: dict[str, Any] = {}
        if "label" in controls:
            self._check_text(controls["label"], "label", 200)
            out["label"] = controls["label"]
        if "expires" in controls:
            expires = controls["expires"]
            if expires is None:
                out["expires_at"] = None
            else:
                try:
                    seconds = parse_duration(expires)
                except (ValueError, OverflowError):
                    seconds = -1.0
                if not KEY_EXPIRES[0] <= seconds <= KEY_EXPIRES[1]:
                    raise ApiError(400, "expires must be a duration (30d, 12h, 3600s) from 1s to 3660d",
                                   param="expires")
                out["expires_at"] = time.time() + seconds
        for name in ("rpm", "tpm"):
            if name in controls:
                value = controls[name]
                if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                          or not KEY_PER_MINUTE[0] <= value <= KEY_PER_MINUTE[1]):
                    raise ApiError(400, f"{name} must be an integer from {KEY_PER_MINUTE[0]} to {KEY_PER_MINUTE[1]}",
                                   param=name)
                out[name] = value
        if "models" in controls:
            models = controls["models"]
            if models is not None:
                if not isinstance(models, list) or not 0 < len(models) <= KEY_MODELS_MAX \
                        or not all(isinstance(m, str) and 0 < len(m) <= MAX_IDENT_CHARS for m in models):
                    raise ApiError(400, f"models must be a list of 1 to {KEY_MODELS_MAX} model names", param="models")
                allowed = self.config.tier_models(tier) if tier in self.config.tiers else frozenset()
                outside = [m for m in models if m not in allowed]
                if outside:
                    raise ApiError(400, f"models: '{outside[0][:MAX_IDENT_CHARS]}' is not a model the user's tier"
                                        f" '{tier}' allows (a key narrows its tier, never widens it)", param="models")
            out["models"] = models
        return out

    async def list_keys(self, scope: Scope, user_id: str | None = None) -> list[dict]:
        if user_id is not None:
            await self._user(scope, user_id)
            keys = await self.store.list_keys(user_id=user_id)
        elif scope.is_master:
            keys = await self.store.list_keys()
        else:
            keys = await self.store.list_keys(workspace_id=scope.workspace_id)
        return [as_dict(k) for k in keys]

    async def revoke_key(self, scope: Scope, key_id: str) -> dict:
        key = await self._key(scope, key_id)
        revoked = await self.store.revoke_key(key.id)
        await self._changed("key", key.id)
        await self._audit(scope, "key.revoke", key.id, key.workspace_id, {"revoked_at": key.revoked_at},
                          {"revoked_at": revoked.revoked_at})
        return {"id": key.id, "revoked": True}

    async def rotate_key(self, scope: Scope, key_id: str) -> dict:
        key = await self._key(scope, key_id)
        try:
            plaintext, new_key = await self.store.rotate_key(key.id)
        except (NotFound, StoreConflict) as exc:
            raise ApiError(409, f"cannot rotate key '{key_id}': {exc}", code="conflict") from None
        await self._changed("key", key.id)
        await self._audit(scope, "key.rotate", key.id, key.workspace_id, key, new_key)
        return {**as_dict(new_key), "api_key": plaintext, "replaces": key.id}

    # --- budgets (gateway/budgets.py, docs/budgets.md) ------------------------------------

    async def set_budget(self, scope: Scope, *, workspace: str | None = None, user: str | None = None,
                         key: str | None = None, unit: Any = None, amount: Any = None, period: Any = None,
                         timezone: Any = "UTC", alerts: Any = None, hard: Any = "refuse") -> dict:
        """Create or change the budget of one workspace, user or key (exactly one named) for
        (unit, period): `amount` (energy, or USD dollars), `timezone` (IANA) of the period's
        midnight, `alerts` (percentages), `hard` (refuse, downgrade, none). A workspace
        admin sets its own users' and keys' budgets; a workspace's needs the master key."""
        from gateway import budgets as rules
        from gateway.store.base import BUDGET_PERIODS

        named = [(kind, ident) for kind, ident in (("workspace", workspace), ("user", user), ("key", key))
                 if ident is not None]
        if len(named) != 1:
            raise ApiError(400, "name exactly one of 'workspace', 'user' or 'key'", param="workspace")
        kind, ident = named[0]
        if unit not in ("usd", "energy"):
            raise ApiError(400, "unit must be 'usd' or 'energy'", param="unit")
        if period not in BUDGET_PERIODS:
            raise ApiError(400, f"period must be one of {', '.join(BUDGET_PERIODS)}", param="period")
        try:
            stored_amount = rules.parse_amount(unit, amount)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="amount") from None
        timezone = "UTC" if timezone is None else timezone
        try:
            rules.check_timezone(timezone)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="timezone") from None
        try:
            percents = rules.parse_alerts(alerts)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="alerts") from None
        try:
            rules.check_hard("refuse" if hard is None else hard)
        except ValueError as exc:
            raise ApiError(400, str(exc), param="hard") from None
        if not isinstance(ident, str):
            raise ApiError(400, f"'{kind}' must be a {kind} id" + (" or name" if kind == "workspace" else ""), param=kind)
        if kind == "workspace":
            target = await self._workspace(scope, ident)
            workspace_id = scope_id = target.id
            if not scope.is_master:
                raise _master_only("a workspace's budget")
        elif kind == "user":
            target = await self._user(scope, ident)
            workspace_id, scope_id = target.workspace_id, target.id
        else:
            target = await self._key(scope, ident)
            workspace_id, scope_id = target.workspace_id, target.id
        before, after = await self.store.set_budget(
            workspace_id=workspace_id, scope=kind, scope_id=scope_id, unit=unit, amount=stored_amount, period=period,
            timezone=timezone, alerts=percents, hard=hard or "refuse")
        await self._changed("workspace", workspace_id)
        await self._audit(scope, "budget.set", after.id, workspace_id,
                          None if before is None else _budget_public(before, text=True), _budget_public(after, text=True))
        return (await self._budget_rows([after]))[0]

    async def delete_budget(self, scope: Scope, budget_id: str) -> dict:
        budget = await self._budget(scope, budget_id)
        if budget.scope == "workspace" and not scope.is_master:
            raise _master_only("a workspace's budget")
        deleted = await self.store.delete_budget(budget.id)
        if deleted is None:
            raise _not_found("budget", budget_id)
        await self._changed("workspace", budget.workspace_id)
        await self._audit(scope, "budget.delete", budget.id, budget.workspace_id, _budget_public(budget, text=True), None)
        return {"id": budget.id, "deleted": True}

    async def list_budgets(self, scope: Scope, workspace: str | None = None) -> list[dict]:
        """Every budget (a workspace admin: its workspace's) with its current period, what
        it spent in it and what is left."""
        workspace_id = await self.report_workspace(scope, workspace)
        return await self._budget_rows(await self.store.list_budgets(workspace_id))

    async def _budget(self, scope: Scope, budget_id: str) -> Any:
        if _nameable(budget_id):
            for budget in await self.store.list_budgets(None if scope.is_master else scope.workspace_id):
                if budget.id == budget_id:
                    return budget
        raise _forbidden() if not scope.is_master else _not_found("budget", budget_id)

    async def _budget_rows(self, budgets: list[Any]) -> list[dict]:
        import time

        from gateway import budgets as rules

        now = time.time()
        bounds = [rules.period_bounds(b.period, b.timezone, now) for b in budgets]
        spent = await self.store.budget_spent([(b.id, start) for b, (start, _) in zip(budgets, bounds)])
        rows = []
        for budget, (start, end) in zip(budgets, bounds):
            used = spent[(budget.id, start)]
            row = _budget_public(budget)
            row.update(period_starts_at=None if budget.period == "life" else start, period_ends_at=end, spent=_budget_amount(budget.unit, used),
                       remaining=_budget_amount(budget.unit, max(0, budget.amount - used)))
            rows.append(row)
        return rows

    # --- audit log -------------------------------------------------------------------

    async def audit(self, scope: Scope, limit: int = 100, since_seconds: float | None = None,
                    workspace: str | None = None) -> list[dict]:
        """The newest audit rows first; `since_seconds`: only the last so many seconds. A
        workspace admin sees its workspace's rows only."""
        import time

        if isinstance(limit, bool) or not isinstance(limit, int) or not AUDIT_LIMIT[0] <= limit <= AUDIT_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer from {AUDIT_LIMIT[0]} to {AUDIT_LIMIT[1]}", param="limit")
        if since_seconds is not None and (isinstance(since_seconds, bool) or not isinstance(since_seconds, (int, float))
                                          or not METRICS_WINDOW[0] <= since_seconds <= METRICS_WINDOW[1]):
            raise ApiError(400, "since must be a duration from 1s to 3660d", param="since")
        workspace_id = await self.report_workspace(scope, workspace)
        since = None if since_seconds is None else time.time() - since_seconds
        return await self.store.audit_entries(workspace_id=workspace_id, since=since, limit=limit)

    # --- alerts (gateway/alerts.py) ---------------------------------------------------

    async def alerts(self, scope: Scope, limit: int = 100, since_seconds: float | None = None,
                     workspace: str | None = None, status: str | None = None) -> list[dict]:
        """The alert deliveries, newest first: each event per endpoint, its status
        (pending, delivered, failed), attempts and last error. A workspace admin sees its
        workspace's events only (system events, such as a provider's breaker, carry none)."""
        import time

        if isinstance(limit, bool) or not isinstance(limit, int) or not ALERTS_LIMIT[0] <= limit <= ALERTS_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer from {ALERTS_LIMIT[0]} to {ALERTS_LIMIT[1]}", param="limit")
        if since_seconds is not None and (isinstance(since_seconds, bool) or not isinstance(since_seconds, (int, float))
                                          or not METRICS_WINDOW[0] <= since_seconds <= METRICS_WINDOW[1]):
            raise ApiError(400, "since must be a duration from 1s to 3660d", param="since")
        if status is not None and status not in ALERT_STATUSES:
            raise ApiError(400, f"status must be one of {', '.join(ALERT_STATUSES)}", param="status")
        workspace_id = await self.report_workspace(scope, workspace)
        since = None if since_seconds is None else time.time() - since_seconds
        rows = await self.store.alert_deliveries(workspace_id=workspace_id, status=status, since=since, limit=limit)
        return [_delivery(row) for row in rows]

    async def send_test_alert(self, scope: Scope, endpoint: str | None = None) -> dict:
        """A `test` event to every endpoint that takes it (or the one named), written to the
        outbox and posted at once; what fails stays pending for the gateways to retry."""
        from gateway.alerts import Alerts, new_event

        if not scope.is_master:
            raise _master_only("sending a test alert")
        endpoints = [e.name for e in self.config.alerts.endpoints if e.takes("test") and endpoint in (None, e.name)]
        if not endpoints:
            raise ApiError(400, "no alerts endpoint takes the test event" if endpoint is None
                           else f"no alerts endpoint named '{endpoint}' takes the test event",
                           param="endpoint", code="no_alert_endpoint")
        import sys

        import structlog

        # Its delivery lines go to stderr: the CLI's stdout is the answer (--json).
        alerts = Alerts(self.store, lambda: self.config.alerts,
                        logger=structlog.wrap_logger(structlog.PrintLogger(sys.stderr)))
        event = new_event("test", {"sent_by": self.via})
        await alerts.record(event, endpoints)
        await self._audit(scope, "alerts.test", event["id"], None, None, {"endpoints": endpoints})
        try:
            for _ in range(20):  # older due rows may be claimed first; the test's are among the next
                pending = await self.store.alert_deliveries(event_id=event["id"], status="pending")
                if not pending or not any(row["attempts"] == 0 for row in pending):
                    break
                if not await alerts.deliver_due():
                    break
        finally:
            await alerts.stop()
        rows = await self.store.alert_deliveries(event_id=event["id"])
        return {"event_id": event["id"], "deliveries": [_delivery(row) for row in rows]}

    # --- usage reports ----------------------------------------------------------------

    async def usage_report(self, scope: Scope, kind: str, days: int = 7, workspace: str | None = None,
                           limit: int = 10) -> dict:
        from gateway.admin.reports import REPORTS, build_report

        if kind not in REPORTS:
            raise ApiError(404, f"unknown report '{kind}' (one of {', '.join(REPORTS)})", code="not_found")
        if isinstance(days, bool) or not isinstance(days, int) or not REPORT_DAYS[0] <= days <= REPORT_DAYS[1]:
            raise ApiError(400, f"days must be an integer between {REPORT_DAYS[0]} and {REPORT_DAYS[1]}", param="days")
        if isinstance(limit, bool) or not isinstance(limit, int) or not REPORT_LIMIT[0] <= limit <= REPORT_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer between {REPORT_LIMIT[0]} and {REPORT_LIMIT[1]}",
                           param="limit")
        workspace_id = await self.report_workspace(scope, workspace)
        if kind == "experiments":
            from gateway.feedback import experiments_report

            return await experiments_report(self.store, self.config, days=days, workspace_id=workspace_id)
        return await build_report(self.store, kind, days=days, workspace_id=workspace_id, limit=limit,
                                  threshold=self.config.reports.weekly_cost_threshold_usd)

    async def dashboard(self, scope: Scope, window_seconds: float, workspace: str | None = None) -> dict:
        import time

        from gateway.admin.reports import dashboard

        low, high = METRICS_WINDOW
        if isinstance(window_seconds, bool) or not isinstance(window_seconds, (int, float)) \
                or not low <= window_seconds <= high:
            raise ApiError(400, "window must be from 1s to 3660d", param="window")
        workspace_id = await self.report_workspace(scope, workspace)
        numbers = await dashboard(self.store, time.time() - window_seconds, workspace_id)
        # "backfilling, 42%" while a migration's history is filled in (gateway/store/backfill.py)
        progress = backfill.summary(await self.store.backfill_states())
        return {**numbers, "windowSeconds": window_seconds, "workspaceId": workspace_id, "backfill": progress}

    async def report_workspace(self, scope: Scope, workspace: str | None) -> str | None:
        if workspace is not None:
            return (await self._workspace(scope, workspace)).id
        return None if scope.is_master else scope.workspace_id

    # --- the console's reads (the dashboard's management pages) -----------------------

    async def search_users(self, scope: Scope, query: str, workspace: str | None = None,
                           limit: int = 50) -> list[dict]:
        """Users whose id is or starts with `query`, whose name contains it (any case),
        whose end-user id is it, or who own a key whose public prefix starts with it;
        newest first, at most `limit`. A workspace admin finds its own workspace's only.
        One indexed query on the store's read connection, not every user loaded."""
        if not isinstance(query, str) or "\x00" in query or not 0 < len(query.strip()) <= MAX_IDENT_CHARS:
            raise ApiError(400, f"q must be 1 to {MAX_IDENT_CHARS} characters", param="q")
        if isinstance(limit, bool) or not isinstance(limit, int) or not SEARCH_LIMIT[0] <= limit <= SEARCH_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer from {SEARCH_LIMIT[0]} to {SEARCH_LIMIT[1]}", param="limit")
        query = query.strip()
        workspace_id = await self.report_workspace(scope, workspace)
        starts = _like_escape(query) + "%"
        where = ("(u.id = ? OR u.id LIKE ? ESCAPE '\\' OR lower(coalesce(u.name, '')) LIKE ? ESCAPE '\\'"
                 " OR u.external_id = ?"
                 " OR EXISTS (SELECT 1 FROM api_keys k WHERE k.user_id = u.id AND k.prefix LIKE ? ESCAPE '\\'))")
        args: list[Any] = [query, starts, "%" + _like_escape(query.lower()) + "%", query, starts]
        if workspace_id is not None:
            where += " AND u.workspace_id = ?"
            args.append(workspace_id)
        rows = await self.store.report_query(
            f"SELECT u.id FROM users u WHERE {where} ORDER BY u.created_at DESC, u.id LIMIT ?", [*args, limit])
        found = []
        for row in rows:
            user = await self.store.get_user(row["id"])
            if user is not None and (scope.is_master or user.workspace_id == scope.workspace_id):
                found.append(as_dict(user))
        return found

    async def user_requests(self, scope: Scope, user_id: str, limit: int = 50) -> list[dict]:
        """A user's last requests, newest first: when, status, model, tokens, cost, energy,
        latency; what the usage log holds, never a prompt or an answer (it holds none)."""
        from gateway.store.base import parse_iso_utc

        if isinstance(limit, bool) or not isinstance(limit, int) or not REQUESTS_LIMIT[0] <= limit <= REQUESTS_LIMIT[1]:
            raise ApiError(400, f"limit must be an integer from {REQUESTS_LIMIT[0]} to {REQUESTS_LIMIT[1]}",
                           param="limit")
        user = await self._user(scope, user_id)
        rows = await self.store.report_query(
            f"SELECT {', '.join(REQUEST_FIELDS)} FROM ai_usage_logs WHERE user_id = ?"
            " ORDER BY created_at DESC, id DESC LIMIT ?", [user.id, limit])
        out = []
        for row in rows:
            created = row["created_at"]
            if isinstance(created, str):
                created = parse_iso_utc(created)
            elif hasattr(created, "timestamp"):
                created = created.timestamp()
            out.append({**row, "created_at": created, "cost_usd": self.store.usd(row["cost_usd"]),
                        "cache_hit": bool(row["cache_hit"]), "streamed": bool(row["streamed"])})
        return out

    def tiers(self, scope: Scope) -> list[dict]:
        """The configured tiers and the public models each allows (what a key's `models` may
        narrow to): the names the console offers in its tier and model pickers."""
        return [{"name": name, "models": sorted(self.config.tier_models(name)),
                 "refill": None if tier.refill is None else tier.refill.model_dump(),
                 "default": name == self.config.auth.default_tier}
                for name, tier in sorted(self.config.tiers.items())]



def _like_escape(text: str) -> str:
    """`text` matched literally by LIKE ... ESCAPE '\\' ('%' and '_' are not wildcards)."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
