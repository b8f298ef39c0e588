"""The /admin HTTP API: the same operations as the CLI (gateway/admin/operations.py), over HTTP.

Authenticated by `Authorization: Bearer <master key>` (everything) or a workspace admin
key (its own workspace only; other workspaces' objects answer 404, so they cannot even
be probed), or by a dashboard sign-in session's cookie (gateway/admin/oidc.py: the role
its identity provider grants; changes carry X-CSRF-Token). Errors are OpenAI-shaped like
everywhere else.

    POST   /admin/workspaces                 {name, profile?, ai_settings?}
    GET    /admin/workspaces
    GET    /admin/workspaces/{workspace}
    PATCH  /admin/workspaces/{workspace}     {profile?, ai_settings?}
    POST   /admin/users                      {workspace, tier?, energy?, name?, role?}  -> api_key once
    GET    /admin/users[?workspace=W]
    GET    /admin/users?q=TEXT[&workspace=W&limit=N]  search: id, name, end-user id or key prefix
    GET    /admin/users/{user}
    PATCH  /admin/users/{user}               {tier}
    POST   /admin/users/{user}/energy        {amount, reason?, kind?: grant|adjust}
    GET    /admin/users/{user}/ledger[?limit=N]
    GET    /admin/users/{user}/requests[?limit=N]   last requests: time, status, model, tokens, cost, energy, latency
    POST   /admin/users/{user}/keys          {role?, service?, label?, expires?, models?, rpm?, tpm?} -> api_key once
    GET    /admin/keys[?user=U]
    PATCH  /admin/keys/{key}                 {label?, expires?, models?, rpm?, tpm?}  (null removes one)
    POST   /admin/keys/{key}/revoke
    POST   /admin/keys/{key}/rotate                                                     -> api_key once
    GET    /admin/usage/{daily|top-users|actions|weekly}[?days=N&workspace=W&limit=N]
    GET    /admin/metrics[?window=24h&workspace=W]     dashboard JSON (totalRequests, ...)
    GET    /admin/tiers                      configured tiers and the models each allows
    GET    /admin/audit[?limit=100&since=24h&workspace=W]  the audit log, newest first
    GET    /admin/alerts[?limit=100&since=24h&status=failed&workspace=W]  alert deliveries, newest first
    GET    /admin/budgets[?workspace=W]      budgets with their period, spent and remaining
    POST   /admin/budgets                    {workspace|user|key, unit, amount, period, timezone?, alerts?, hard?}
    DELETE /admin/budgets/{budget}

Every answer carries `X-Request-Id`; each change is written to the audit log with it.
"""

from __future__ import annotations

import re
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import web

from gateway.admin.oidc import session_scope
from gateway.admin.operations import KEY_CONTROL_FIELDS, Admin, Scope
from gateway.errors import ApiError
from gateway.lifecycle import new_request_id
from gateway.money import json_default
from gateway.state import GATEWAY
from plugins.auth import bearer_token, is_master_key



def admin_of(request: web.Request) -> Admin:
    """The admin operations on the gateway serving `request` (its store, config, directory)."""
    gw = request.app[GATEWAY]
    return Admin(gw.store, gw.config, gw.directory, via="api", request_id=new_request_id(request))


async def admin_scope(request: web.Request, admin: Admin) -> Scope:
    """Who is asking: the key in the Authorization header, or else a dashboard sign-in
    session's cookie (gateway/admin/oidc.py: the same Scope, plus its CSRF and read-only rules)."""
    header = request.headers.get("Authorization")
    if header is None:
        session = await session_scope(request)
        if session is not None:
            return session
    token = bearer_token(header)
    if token is None:
        raise ApiError(401, "admin endpoints need 'Authorization: Bearer <master or workspace admin key>'",
                       code="invalid_api_key")
    if is_master_key(token, admin.config.auth.master_key):
        return Scope("master")
    found = await admin.directory.identity(token) if admin.directory is not None else None
    if found is None or found.revoked or found.user_disabled:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
    if found.role != "workspace_admin":
        raise ApiError(403, "this key is not an admin key", type="invalid_request_error", code="forbidden")
    return Scope("workspace_admin", found.workspace_id, key_id=found.key_id, key_prefix=found.prefix)


async def _body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ApiError(400, "request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _json(payload: Any, status: int = 200) -> web.Response:
    # default: a Decimal (USD) as a JSON number from its digits, anything else as text.
    return web.Response(status=status, body=orjson.dumps(payload, default=json_default), content_type="application/json")


_INTEGER_TEXT = re.compile(r"^-?\d{1,18}$")


def _int_param(value: Any, name: str, default: int | None = None, *, minimum: int | None = None) -> int:
    """A JSON integer, or an integer query-string value. Never a float silently truncated
    (an energy amount of 1.5 is a client bug, not 1)."""
    if value is None:
        if default is None:
            raise ApiError(400, f"'{name}' is required", param=name)
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str) and _INTEGER_TEXT.match(value.strip()):
        number = int(value)
    else:
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    if minimum is not None and number < minimum:
        raise ApiError(400, f"'{name}' must be at least {minimum}", param=name)
    return number


def _since_param(request: web.Request) -> float | None:
    """`?since=<duration>` (e.g. `24h`, `7d`) in seconds, or None; a bad one is a 400."""
    from gateway.config import parse_duration

    since = request.query.get("since")
    if since is None:
        return None
    try:
        return parse_duration(since)
    except (ValueError, OverflowError) as exc:
        raise ApiError(400, f"since: {exc}", param="since") from None


def admin_routes() -> list[web.RouteDef]:
    def endpoint(fn: Callable[[web.Request, Admin, Scope], Awaitable[Any]], status: int = 200):
        async def handler(request: web.Request) -> web.Response:
            admin = admin_of(request)
            scope = await admin_scope(request, admin)
            response = _json(await fn(request, admin, scope), status)
            response.headers["X-Request-Id"] = admin.request_id
            return response

        return handler

    async def create_workspace(r, a, s):
        b = await _body(r)
        return await a.create_workspace(s, b.get("name"), b.get("profile"), b.get("ai_settings"))

    async def update_workspace(r, a, s):
        b = await _body(r)
        return await a.update_workspace(s, r.match_info["workspace"], b.get("profile"), b.get("ai_settings"))

    async def create_user(r, a, s):
        b = await _body(r)
        workspace = b.get("workspace") or (s.workspace_id if not s.is_master else None)
        if not workspace:
            raise ApiError(400, "'workspace' is required", param="workspace")
        energy = None if b.get("energy") is None else _int_param(b["energy"], "energy")
        return await a.create_user(s, workspace, b.get("tier"), energy,
                                   b.get("name"), b.get("role", "user"))

    async def update_user(r, a, s):
        b = await _body(r)
        if "tier" not in b:
            raise ApiError(400, "'tier' is required", param="tier")
        return await a.set_tier(s, r.match_info["user"], b["tier"])

    async def grant(r, a, s):
        b = await _body(r)
        return await a.grant_energy(s, r.match_info["user"], _int_param(b.get("amount"), "amount"),
                                    b.get("reason"), b.get("kind", "grant"))

    async def create_key(r, a, s):
        b = await _body(r)
        controls = {name: b[name] for name in KEY_CONTROL_FIELDS if b.get(name) is not None}
        return await a.create_key(s, r.match_info["user"], b.get("role", "user"), service=b.get("service", False),
                                  **controls)

    async def update_key(r, a, s):
        b = await _body(r)
        return await a.update_key(s, r.match_info["key"], **{name: b[name] for name in KEY_CONTROL_FIELDS if name in b})

    async def usage(r, a, s):
        return await a.usage_report(s, r.match_info["report"], _int_param(r.query.get("days"), "days", 7),
                                    r.query.get("workspace"), _int_param(r.query.get("limit"), "limit", 10, minimum=1))

    async def metrics(r, a, s):
        from gateway.config import parse_duration

        try:
            window = parse_duration(r.query.get("window", "24h"))
        except ValueError as exc:
            raise ApiError(400, f"window: {exc}", param="window") from None
        return await a.dashboard(s, window, r.query.get("workspace"))

    async def audit(r, a, s):
        return await a.audit(s, _int_param(r.query.get("limit"), "limit", 100, minimum=1), _since_param(r),
                             r.query.get("workspace"))

    async def alerts(r, a, s):
        return await a.alerts(s, _int_param(r.query.get("limit"), "limit", 100, minimum=1), _since_param(r),
                              r.query.get("workspace"), r.query.get("status"))

    async def list_users(r, a, s):
        if "q" in r.query:
            return await a.search_users(s, r.query["q"], r.query.get("workspace"),
                                        _int_param(r.query.get("limit"), "limit", 50, minimum=1))
        return await a.list_users(s, r.query.get("workspace"))

    async def user_requests(r, a, s):
        return await a.user_requests(s, r.match_info["user"], _int_param(r.query.get("limit"), "limit", 50, minimum=1))

    async def tiers(r, a, s):
        return a.tiers(s)

    async def set_budget(r, a, s):
        b = await _body(r)
        unknown = set(b) - {"workspace", "user", "key", "unit", "amount", "period", "timezone", "alerts", "hard"}
        if unknown:
            raise ApiError(400, f"unknown field '{sorted(unknown)[0]}'", param=sorted(unknown)[0])
        return await a.set_budget(s, workspace=b.get("workspace"), user=b.get("user"), key=b.get("key"),
                                  unit=b.get("unit"), amount=b.get("amount"), period=b.get("period"),
                                  timezone=b.get("timezone", "UTC"), alerts=b.get("alerts"), hard=b.get("hard", "refuse"))

    return [
        web.get("/admin/tiers", endpoint(tiers)),
        web.get("/admin/users/{user}/requests", endpoint(user_requests)),
        web.get("/admin/budgets", endpoint(lambda r, a, s: a.list_budgets(s, r.query.get("workspace")))),
        web.post("/admin/budgets", endpoint(set_budget)),
        web.delete("/admin/budgets/{budget}", endpoint(lambda r, a, s: a.delete_budget(s, r.match_info["budget"]))),
        web.get("/admin/audit", endpoint(audit)),
        web.get("/admin/alerts", endpoint(alerts)),
        web.get("/admin/usage/{report}", endpoint(usage)),
        web.get("/admin/metrics", endpoint(metrics)),
        web.post("/admin/workspaces", endpoint(create_workspace, 201)),
        web.get("/admin/workspaces", endpoint(lambda r, a, s: a.list_workspaces(s))),
        web.get("/admin/workspaces/{workspace}", endpoint(lambda r, a, s: a.show_workspace(s, r.match_info["workspace"]))),
        web.patch("/admin/workspaces/{workspace}", endpoint(update_workspace)),
        web.post("/admin/users", endpoint(create_user, 201)),
        web.get("/admin/users", endpoint(list_users)),
        web.get("/admin/users/{user}", endpoint(lambda r, a, s: a.show_user(s, r.match_info["user"]))),
        web.patch("/admin/users/{user}", endpoint(update_user)),
        web.post("/admin/users/{user}/energy", endpoint(grant)),
        web.get("/admin/users/{user}/ledger", endpoint(
            lambda r, a, s: a.ledger(s, r.match_info["user"], _int_param(r.query.get("limit"), "limit", 100, minimum=1)))),
        web.post("/admin/users/{user}/keys", endpoint(create_key, 201)),
        web.get("/admin/keys", endpoint(lambda r, a, s: a.list_keys(s, r.query.get("user")))),
        web.patch("/admin/keys/{key}", endpoint(update_key)),
        web.post("/admin/keys/{key}/revoke", endpoint(lambda r, a, s: a.revoke_key(s, r.match_info["key"]))),
        web.post("/admin/keys/{key}/rotate", endpoint(lambda r, a, s: a.rotate_key(s, r.match_info["key"]), 201)),
    ]
