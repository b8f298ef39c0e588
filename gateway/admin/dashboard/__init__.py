"""The dashboard page: GET /dashboard, static files served by the gateway itself.

    GET /dashboard                 the page (static/index.html)
    GET /dashboard/static/...      its JS and CSS, and the vendored chart library (static/vendor/)
    GET /admin/dashboard/live      in-flight count and recent errors (admin key, like /admin/...)

No build step and nothing fetched from the network at run time: the page is plain
HTML/CSS/JS and uPlot is vendored with its license (static/vendor/uplot/). The operator
signs in with an admin key (master: every workspace; workspace admin: its own); the page
keeps it in sessionStorage and sends it as a Bearer header to the same /admin JSON API the
CLI uses, so every number it shows is one the API returns. Fields the API does not return
(yet) are shown as "—". With `dashboard.oidc` set the page also offers sign-in with the
identity provider (gateway/admin/oidc.py: a session cookie instead of the key).

    static/api.js        api(method, path, body): the page's one door to the API (auth lives there)
    static/dashboard.js  the overview (totals, charts, reports), sign-in
    static/console.js    the management pages: users, a user's page, workspaces, audit, alerts
                         (docs/admin.md "Managing from the page"); every change is an /admin call
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from gateway.admin.api import admin_of, admin_scope
from gateway.state import GATEWAY

STATIC_DIR = Path(__file__).resolve().parent / "static"
RECENT_ERRORS = 20
# Recent errors are looked for in the last hour of the log: a LIMITed query on the store's
# report connection, so a busy hour costs the database a short index scan, never the loop.
RECENT_ERRORS_WINDOW = 3600.0
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self';"
            " object-src 'none'; base-uri 'none'; frame-ancestors 'none'")
ERROR_FIELDS = ("request_id", "created_at", "user_id", "workspace_id", "model", "provider", "action",
                "status", "error_type")


def _iso(ts: Any) -> Any:
    """Epoch, datetime (PostgreSQL) or the SQLite store's ISO text -> '2026-11-30T05:09:52Z'."""
    if isinstance(ts, (int, float)) and not isinstance(ts, bool):
        ts = datetime.fromtimestamp(ts, timezone.utc)
    if isinstance(ts, datetime):
        return ts.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    if isinstance(ts, str) and len(ts) > 20 and ts.endswith("Z"):
        return ts[:19] + "Z"
    return ts


async def recent_errors(store: Any, workspace_id: str | None, limit: int = RECENT_ERRORS) -> list[dict[str, Any]]:
    """The newest failed requests of the last hour, newest first."""
    since = time.time() - RECENT_ERRORS_WINDOW
    if hasattr(store, "report_query"):
        where = " AND workspace_id = ?" if workspace_id is not None else ""
        rows = await store.report_query(
            f"SELECT {', '.join(ERROR_FIELDS)} FROM ai_usage_logs WHERE created_at >= ?"
            f" AND error_type IS NOT NULL{where} ORDER BY created_at DESC LIMIT ?",
            [store.report_time(since), *([workspace_id] if workspace_id is not None else []), limit])
    else:  # a store without report queries: the hour's rows
        rows = await store.usage_rows(since=since, workspace_id=workspace_id)
        rows = [r for r in rows if r.get("error_type")][-limit:][::-1]
    return [{**{k: r.get(k) for k in ERROR_FIELDS}, "created_at": _iso(r.get("created_at"))} for r in rows]


def dashboard_routes() -> list[web.AbstractRouteDef]:
    """Routes for create_app; each reads the gateway from `request.app[GATEWAY]`. The live
    in-flight count spans every workspace, so only the master key sees it."""

    async def page(request: web.Request) -> web.FileResponse:
        response = web.FileResponse(STATIC_DIR / "index.html")
        response.headers["Cache-Control"] = "no-store"
        response.headers["X-Frame-Options"] = "DENY"
        # The page runs only its own files: text from the store that ever reached the DOM as
        # HTML could not run a script (console.js writes it as text; this is the second wall).
        response.headers["Content-Security-Policy"] = PAGE_CSP
        return response

    async def live(request: web.Request) -> web.Response:
        admin = admin_of(request)
        scope = await admin_scope(request, admin)
        workspace_id = await admin.report_workspace(scope, request.query.get("workspace"))
        payload = {
            "inFlight": request.app[GATEWAY].chain.inflight.count if scope.is_master and workspace_id is None
            else None,
            "recentErrors": await recent_errors(admin.store, workspace_id),
            "recentErrorsWindowSeconds": RECENT_ERRORS_WINDOW,
            "workspaceId": workspace_id,
            "scope": scope.role,
            "now": _iso(time.time()),
        }
        return web.Response(body=orjson.dumps(payload, default=str), content_type="application/json")

    return [
        web.get("/dashboard", page),
        web.get("/dashboard/", page),
        web.static("/dashboard/static", STATIC_DIR),
        web.get("/admin/dashboard/live", live),
    ]
