"""Outcomes of requests (`POST /v1/feedback`) and the A/B experiments report built on them.

    POST /v1/feedback  {"request_id": "req_…", "metric": "reply_sent", "value": true}

An app reports what became of an answer ("reply sent", a rating): numbers from
-VALUE_LIMIT to VALUE_LIMIT (1e9), or booleans (stored as 1 and 0). At most
METRICS_PER_REQUEST (20) distinct metrics per request, and METRICS_PER_USER_MINUTE (50)
distinct metrics per user in any minute (counted by each gateway process); past the first
the answer is a 400, past the second a 429, and nothing is stored. The bounds keep the report's sums of squares
far from a double's overflow (PostgreSQL answers "value out of range" past 1.8e308) and
its groups few; the report also skips values stored outside them (before these limits). Only for the caller's own requests (the request id is the
`X-Request-Id` of the answer; someone else's, or an unknown one, is a 404 either way), and
idempotent per request and metric (sending it again replaces the value).

The experiments report (`usage experiments`, `GET /admin/usage/experiments`) compares the
variants of each experiment (plugins/experiments.py) over a window, computed in the
database: requests, cost, energy, tokens, latency p50/p95, error rate, and per feedback
metric the mean with a 95% confidence interval (normal approximation: mean ± 1.96·s/√n)
and its difference to the control (± 1.96·√(s²/n + s_c²/n_c)).
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from typing import Any

from aiohttp import web

from gateway.client_body import read_json
from gateway.errors import ApiError, bad_request
from gateway.money import USD_ZERO
from gateway.state import GATEWAY

_METRIC = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_FIELDS = frozenset({"request_id", "metric", "value"})
Z95 = 1.96
VALUE_LIMIT = 1e9
METRICS_PER_REQUEST = 20
METRICS_PER_USER_MINUTE = 50
MINUTE = 60.0


class MetricWindow:
    """The distinct metrics each user reported in the last minute (this process).

    `admit` checks and records in one step, with no await between: two posts of one user
    in this process cannot both pass the last free place."""

    def __init__(self, limit: int = METRICS_PER_USER_MINUTE, window: float = MINUTE):
        self.limit, self.window = limit, window
        self._seen: dict[str, dict[str, float]] = {}  # user -> metric -> last reported (monotonic)

    def admit(self, user_id: str, metric: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        metrics = self._seen.get(user_id)
        if metrics is None:
            if len(self._seen) > 10_000:  # forget users idle for a minute (bounded memory)
                self._seen = {u: m for u, m in self._seen.items() if max(m.values()) > now - self.window}
            metrics = self._seen[user_id] = {}
        for name in [name for name, seen in metrics.items() if seen <= now - self.window]:
            del metrics[name]
        if metric not in metrics and len(metrics) >= self.limit:
            return False
        metrics[metric] = now
        return True


def _token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return (request.headers.get("x-api-key") or "").strip() or None


def feedback_routes() -> list[web.RouteDef]:
    """Routes for create_app; each reads the gateway from `request.app[GATEWAY]`."""
    window = MetricWindow()
    in_flight: dict[str, list[Any]] = {}  # request id -> [its lock, posts holding or awaiting it]

    async def _record(store: Any, user_id: str, request_id: str, metric: str, value: float) -> None:
        others = await store.report_query("SELECT COUNT(*) AS n FROM feedback WHERE request_id = ? AND metric <> ?",
                                          [request_id, metric])
        if int(others[0]["n"]) >= METRICS_PER_REQUEST:
            raise bad_request(f"A request takes at most {METRICS_PER_REQUEST} distinct feedback metrics.",
                              param="metric", code="feedback_metric_limit")
        if not window.admit(user_id, metric):
            raise ApiError(429, f"At most {METRICS_PER_USER_MINUTE} distinct feedback metrics per minute; "
                                "try again later.", type="rate_limit_error", code="feedback_metric_limit",
                           param="metric", headers={"Retry-After": str(int(MINUTE))})
        await store.record_feedback(request_id, user_id, metric, value)

    async def post_feedback(request: web.Request) -> web.Response:
        gw = request.app[GATEWAY]
        store, directory, flush = gw.store, gw.directory, gw.flush_endings
        token = _token(request)
        if token is None:
            raise ApiError(401, "You didn't provide an API key.", code="invalid_api_key")
        try:
            token.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key") from None
        found = await directory.identity(token) if directory is not None else None
        if found is None or found.revoked or found.user_disabled:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        body = await read_json(request, 64 * 1024)
        for key in body:
            if key not in _FIELDS:
                raise bad_request(f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        request_id, metric, value = body.get("request_id"), body.get("metric"), body.get("value")
        if not isinstance(request_id, str) or not 0 < len(request_id) <= 128:
            raise bad_request("'request_id' is required: the X-Request-Id of one of your answers", param="request_id")
        if not isinstance(metric, str) or not _METRIC.match(metric):
            raise bad_request("'metric' is required: 1-64 letters, digits, '_', '.', ':' or '-'", param="metric")
        if isinstance(value, bool):
            value = 1.0 if value else 0.0
        if not isinstance(value, (int, float)) or abs(value) > VALUE_LIMIT or not math.isfinite(value):
            raise bad_request(f"'value' must be a number from {-VALUE_LIMIT:g} to {VALUE_LIMIT:g} or a boolean",
                              param="value")
        owner = await _owner(store, request_id)
        if owner is None:  # its usage row may still be in the write-behind batch
            await flush()
            owner = await _owner(store, request_id)
        if owner != found.user_id:
            raise ApiError(404, f"No request '{request_id}' of yours was found.", code="request_not_found",
                           param="request_id")
        # One post per request at a time in this process: the count below and the write
        # after it are not split by another post of the same request.
        held = in_flight.setdefault(request_id, [asyncio.Lock(), 0])
        held[1] += 1
        try:
            async with held[0]:
                await _record(store, found.user_id, request_id, metric, float(value))
        finally:
            held[1] -= 1
            if held[1] == 0:
                del in_flight[request_id]
        return web.json_response({"object": "feedback", "request_id": request_id, "metric": metric,
                                  "value": float(value)})

    return [web.post("/v1/feedback", post_feedback), web.post("/feedback", post_feedback)]


async def _owner(store: Any, request_id: str) -> str | None:
    rows = await store.report_query("SELECT user_id FROM ai_usage_logs WHERE request_id = ?", [request_id])
    return rows[0]["user_id"] if rows else None


# ------------------------------------------------------------------------------ report

def _interval(n: int, mean: float, mean_sq: float) -> tuple[float, float]:
    """(sample variance, half-width of the 95% interval of the mean)."""
    if n < 2:
        return 0.0, math.inf
    variance = max(0.0, mean_sq - mean * mean) * n / (n - 1)
    return variance, Z95 * math.sqrt(variance / n)


async def _percentile(store: Any, where: str, args: list[Any], count: int, q: float) -> float | None:
    if count == 0:
        return None
    rows = await store.report_query(
        f"SELECT latency_ms FROM ai_usage_logs WHERE {where} AND latency_ms IS NOT NULL"
        f" ORDER BY latency_ms LIMIT 1 OFFSET {int(q * (count - 1))}", args)
    return float(rows[0]["latency_ms"]) if rows else None


async def experiments_report(store: Any, config: Any, *, days: int = 7, workspace_id: str | None = None,
                             now: float | None = None) -> dict[str, Any]:
    since = store.report_time((time.time() if now is None else now) - days * 86400)
    scope, args = "experiment IS NOT NULL AND created_at >= ?", [since]
    if workspace_id is not None:
        scope += " AND workspace_id = ?"
        args.append(workspace_id)
    groups = await store.report_query(
        "SELECT experiment, variant, COUNT(*) AS requests, SUM(cost_usd) AS cost_usd, SUM(energy_cost) AS energy,"
        " SUM(tokens_total) AS tokens, SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) AS errors,"
        " COUNT(latency_ms) AS timed FROM ai_usage_logs"
        f" WHERE {scope} GROUP BY experiment, variant ORDER BY experiment, variant", args)
    feedback = await store.report_query(
        "SELECT u.experiment, u.variant, f.metric, COUNT(*) AS n, AVG(f.value) AS mean,"
        " AVG(f.value * f.value) AS mean_sq FROM feedback f JOIN ai_usage_logs u ON u.request_id = f.request_id"
        f" WHERE u.{scope.replace(' AND ', ' AND u.')} AND f.value BETWEEN ? AND ?"  # no stored value overflows
        " GROUP BY u.experiment, u.variant, f.metric", [*args, -VALUE_LIMIT, VALUE_LIMIT])
    controls = {e.name: e.control_variant.name for e in config.experiments}
    experiments: dict[str, dict[str, Any]] = {}
    for g in groups:
        where = f"{scope} AND experiment = ? AND variant = ?"
        cell_args = [*args, g["experiment"], g["variant"]]
        variant = {"variant": g["variant"], "requests": int(g["requests"]), "cost_usd": store.usd(g["cost_usd"]) or USD_ZERO,
                   "energy": int(g["energy"] or 0), "tokens": int(g["tokens"] or 0),
                   "error_rate": round(int(g["errors"] or 0) / int(g["requests"]), 6),
                   "latency_p50_ms": await _percentile(store, where, cell_args, int(g["timed"]), 0.5),
                   "latency_p95_ms": await _percentile(store, where, cell_args, int(g["timed"]), 0.95),
                   "feedback": {}}
        entry = experiments.setdefault(g["experiment"], {"experiment": g["experiment"],
                                                         "control": controls.get(g["experiment"]), "variants": {}})
        entry["variants"][g["variant"]] = variant
    for f in feedback:
        variant = experiments.get(f["experiment"], {}).get("variants", {}).get(f["variant"])
        if variant is None:
            continue
        n, mean = int(f["n"]), float(f["mean"])
        variance, half = _interval(n, mean, float(f["mean_sq"]))
        variant["feedback"][f["metric"]] = {"n": n, "mean": mean, "ci95": [mean - half, mean + half],
                                            "_variance": variance}
    for entry in experiments.values():
        control = entry["variants"].get(entry["control"] or "") or next(iter(entry["variants"].values()))
        entry["control"] = control["variant"]
        for variant in entry["variants"].values():
            for metric, stats in variant["feedback"].items():
                base = control["feedback"].get(metric)
                if base is None or variant is control:
                    continue
                diff = stats["mean"] - base["mean"]
                half = Z95 * math.sqrt(stats["_variance"] / stats["n"] + base["_variance"] / base["n"]) \
                    if stats["n"] > 1 and base["n"] > 1 else math.inf
                stats["vs_control"] = {"diff": diff, "ci95": [diff - half, diff + half]}
        entry["variants"] = list(entry["variants"].values())
    for entry in experiments.values():  # JSON: no infinities, no private fields
        for variant in entry["variants"]:
            for stats in variant["feedback"].values():
                stats.pop("_variance", None)
                for key in ("ci95",):
                    stats[key] = [None if not math.isfinite(x) else round(x, 6) for x in stats[key]]
                if "vs_control" in stats:
                    stats["vs_control"]["ci95"] = [None if not math.isfinite(x) else round(x, 6)
                                                   for x in stats["vs_control"]["ci95"]]
    return {"report": "experiments", "days": days, "workspace_id": workspace_id,
            "rows": list(experiments.values())}
