"""Alerts, pushed: events written to an outbox, delivered to webhooks until acknowledged.

    alerts:
      endpoints:
        - name: ops                                   # what /admin/alerts and the logs show (never the URL)
          url: https://hooks.example.com/gateway
          secret: os.environ/GATEWAY_ALERTS_SECRET    # HMAC-SHA256 key of the signature
          format: json                                # or slack: {"text": "..."}
          events: ["*"]                               # or a list of the EVENT_TYPES below
      energy_low_below: 50                            # energy.low when a balance falls below it
      error_rate: {threshold: 0.25, window: 5m, min_requests: 20}

The invariants (docs/admin.md "Alerts"):

* **Written before it is sent.** `emit` writes one outbox row per endpoint that takes the
  event (`Store.enqueue_alerts`); a deliverer per process claims due rows, posts them and
  records the outcome. A process killed at any point leaves the rows pending (or leased for
  `LEASE` seconds): the next process delivers them.
* **Once across processes.** A claim leases its rows (PostgreSQL: `FOR UPDATE SKIP
  LOCKED`; SQLite: the claim is one write transaction under the file's lock), so two
  processes never post the same row at the same time.
* **At least once, with one id.** Every event carries a stable `id` (also in the
  `X-Gateway-Event-Id` header), the same on every retry: a receiver drops what it saw. An
  event with a natural key (the ISO week of a weekly cost event, the request of an energy
  event) has an id derived from it, so two processes emitting it make one row.
* **Retried with exponential backoff** (`retry_base` doubled per attempt up to
  `retry_max`, a little jitter) until a 2xx, or `max_attempts` (then `failed`).
* **Pruned when finished.** The deliverer deletes delivered and failed rows older than
  `retention` (default 30 days), `PRUNE_BATCH` rows at a time; a pending row stays.
* **Signed.** `X-Gateway-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
  with the endpoint's secret (Stripe's and GitHub's scheme): a receiver checks it and the
  age of `t`. No secret is ever in a payload, a log line, an outbox row or /admin/alerts;
  the endpoint's URL (a Slack URL is a credential) is not in the last three either.
* **Emission fails open.** An alert never fails or slows a request: `emit` queues the
  write and returns; a store error is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import random
import socket
import time
import uuid
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import orjson
import structlog

if TYPE_CHECKING:
    from gateway.config import AlertEndpoint, AlertsConfig

log = structlog.get_logger("gateway.alerts")

# Every event type and when it is emitted (docs/admin.md "Alerts" has the table).
EVENT_TYPES: dict[str, str] = {
    "energy.low": "a user's energy balance fell below alerts.energy_low_below",
    "cost.weekly_over_threshold": "this week's cost passed reports.weekly_cost_threshold_usd",
    "provider.circuit_opened": "a deployment's circuit breaker opened (it is skipped for the cool-down)",
    "provider.circuit_closed": "a deployment whose breaker was open answered again",
    "errors.rate_over_threshold": "the share of 5xx answers over the window passed alerts.error_rate.threshold",
    "budget.threshold_crossed": "a budget passed one of its alert percentages (emitted once budgets exist)",
    "test": "sent by ./gw alerts test",
}

SIGNATURE_HEADER = "X-Gateway-Signature"
EVENT_ID_HEADER = "X-Gateway-Event-Id"
LEASE = 60.0          # seconds a claimed row is this process's; past it another may take it
CLAIM_BATCH = 50      # rows claimed at once
IDLE_POLL = 1.0       # seconds between two looks at the outbox with nothing due here
PRUNE_BATCH = 1000    # finished rows deleted at once (alerts.retention), so no long lock
PRUNE_EVERY = 300.0   # seconds between two prunes here, unless the last one was a full batch


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The signature header's value: t=<timestamp>,v1=<hex HMAC-SHA256 of "<t>.<body>">."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def new_event(event_type: str, data: dict[str, Any], *, workspace_id: str | None = None,
              key: str | None = None, now: float | None = None) -> dict[str, Any]:
    """An event as its JSON body says it. `key`: a natural key (the same event emitted by two
    processes, or twice, gets the same id)."""
    if event_type not in EVENT_TYPES:
        raise ValueError(f"unknown alert event type {event_type!r}")
    if key is not None:
        event_id = "evt_" + hashlib.sha256(f"{event_type}|{key}".encode()).hexdigest()[:24]
    else:
        event_id = "evt_" + uuid.uuid4().hex[:24]
    return {"id": event_id, "type": event_type, "created_at": round(now if now is not None else time.time(), 3),
            "workspace_id": workspace_id, "summary": summary(event_type, data), "data": data}


def summary(event_type: str, data: dict[str, Any]) -> str:
    """One line a person reads (Slack's text)."""
    d = data
    if event_type == "energy.low":
        return f"User {d.get('user_id')} has {d.get('balance')} energy left (below {d.get('threshold')})."
    if event_type == "cost.weekly_over_threshold":
        return f"Week {d.get('week')} cost ${d.get('week_cost_usd')}, over the ${d.get('threshold_usd')} threshold."
    if event_type == "provider.circuit_opened":
        return (f"Circuit opened for {d.get('model')} ({d.get('deployment')}) after {d.get('consecutive_failures')}"
                f" failures; skipped for {d.get('cooldown_s')} s.")
    if event_type == "provider.circuit_closed":
        return f"Circuit closed for {d.get('model')} ({d.get('deployment')}): it answers again."
    if event_type == "errors.rate_over_threshold":
        return (f"Error rate {d.get('error_rate'):.0%} over the last {d.get('window_s')} s"
                f" ({d.get('errors')} of {d.get('requests')} requests), over {d.get('threshold'):.0%}."
                if isinstance(d.get("error_rate"), float) else "Error rate over the threshold.")
    if event_type == "budget.threshold_crossed":
        return f"Budget {d.get('budget')} at {d.get('percent')}%."
    return "Test alert from the AI gateway."


def render(event: dict[str, Any], endpoint: "AlertEndpoint") -> bytes:
    """The body an endpoint receives: the event, or Slack's {"text": ...} naming its id."""
    if endpoint.format == "slack":
        return orjson.dumps({"text": f"[{event['type']}] {event['summary']} (event {event['id']})"})
    return orjson.dumps(event)


def backoff(attempts: int, base: float, cap: float) -> float:
    """Seconds before the next attempt, after `attempts` failed ones: doubled, capped, ±10%."""
    return min(cap, base * 2 ** min(attempts - 1, 40)) * random.uniform(0.9, 1.1)


class ErrorRateWindow:
    """The share of failed (5xx) answers over a sliding window, in per-second buckets. Says
    when it goes over the threshold (once), and re-arms when it is back under."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._buckets: deque[list[int]] = deque()  # [second, requests, errors]
        self._requests = 0
        self._errors = 0
        self.over = False

    def observe(self, failed: bool, *, window: float, threshold: float, min_requests: int) -> dict[str, Any] | None:
        now = int(self.clock())
        if self._buckets and self._buckets[-1][0] == now:
            bucket = self._buckets[-1]
        else:
            bucket = [now, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += failed
        self._requests += 1
        self._errors += failed
        while self._buckets and self._buckets[0][0] <= now - window:
            _, requests, errors = self._buckets.popleft()
            self._requests -= requests
            self._errors -= errors
        rate = self._errors / self._requests if self._requests else 0.0
        if self._requests >= min_requests and rate > threshold:
            if not self.over:
                self.over = True
                return {"error_rate": rate, "errors": self._errors, "requests": self._requests,
                        "window_s": window, "threshold": threshold}
        elif rate <= threshold:
            self.over = False
        return None


class Alerts:
    """This process's alerts: `emit` writes events to the outbox, `start` runs the deliverer.

    `config` is called for the current alerts settings (a live reload changes endpoints,
    thresholds and retries without a restart)."""

    def __init__(self, store: Any, config: Callable[[], "AlertsConfig"], *, logger: Any = None) -> None:
        self.store = store
        self.config = config
        self.log = logger if logger is not None else log
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.errors = ErrorRateWindow()
        self._writes: set[asyncio.Task] = set()
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._session: Any = None
        self._next_prune = 0.0  # time.monotonic() of the next prune

    # --- emitting ----------------------------------------------------------------------

    def emit(self, event_type: str, data: dict[str, Any], *, workspace_id: str | None = None,
             key: str | None = None) -> None:
        """Queue an event for every endpoint that takes it. Never raises, never waits."""
        try:
            endpoints = [e for e in self.config().endpoints if e.takes(event_type)]
            if not endpoints:
                return
            event = new_event(event_type, data, workspace_id=workspace_id, key=key)
            task = asyncio.get_running_loop().create_task(self._write(event, [e.name for e in endpoints]))
        except Exception:  # noqa: BLE001 — alerts fail open
            self.log.exception("alert_emit_failed", event_type=event_type)
            return
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def record(self, event: dict[str, Any], endpoints: list[str]) -> int:
        """Write one event's rows now (the CLI's test event)."""
        payload = orjson.dumps(event).decode()
        return await self.store.enqueue_alerts([
            {"event_id": event["id"], "endpoint": name, "event_type": event["type"],
             "workspace_id": event.get("workspace_id"), "payload": payload} for name in endpoints])

    async def _write(self, event: dict[str, Any], endpoints: list[str]) -> None:
        try:
            await self.record(event, endpoints)
        except Exception as exc:  # noqa: BLE001 — the store is away: said loudly, the request goes on
            self.log.error("alert_write_failed", event_type=event["type"], event_id=event["id"], error=type(exc).__name__)
            return
        self.log.info("alert_emitted", event_type=event["type"], event_id=event["id"], endpoints=endpoints)
        self._wake.set()

    def observe_request(self, status: int | None) -> None:
        """Feed the error-rate window with one finished request (the metrics plugin does):
        a 5xx answer is an error; a refusal (4xx) is not the gateway's failure."""
        settings = self.config().error_rate
        if settings is None:
            return
        over = self.errors.observe((status or 0) >= 500, window=settings.window, threshold=settings.threshold,
                                   min_requests=settings.min_requests)
        if over is not None:
            self.emit("errors.rate_over_threshold", over)

    # --- delivering --------------------------------------------------------------------

    def start(self) -> "Alerts":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """The queued writes first (an event emitted at shutdown still reaches the outbox),
        then the deliverer; what is not delivered stays pending for the next process."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=timeout)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            await self._prune_if_due()
            try:
                delivered_some = await self.deliver_due()
            except Exception as exc:  # noqa: BLE001 — the store is away: try again later
                self.log.warning("alert_claim_failed", error=type(exc).__name__)
                delivered_some = 0
            if delivered_some:
                continue  # there may be more due
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_POLL)

    async def _prune_if_due(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        try:
            pruned = await self.prune()
        except Exception as exc:  # noqa: BLE001 — the store is away: try again later
            self.log.warning("alert_prune_failed", error=type(exc).__name__)
            pruned = 0
        # a full batch: more may be left, the next pass takes the next batch
        self._next_prune = time.monotonic() + (0.0 if pruned >= PRUNE_BATCH else PRUNE_EVERY)

    async def prune(self, *, now: float | None = None) -> int:
        """Delete one batch of delivered and failed rows older than alerts.retention (pending
        rows stay); returns how many went."""
        pruned = await self.store.prune_alerts(older_than=self.config().retention, limit=PRUNE_BATCH, now=now)
        if pruned:
            self.log.info("alerts_pruned", rows=pruned)
        return pruned

    async def deliver_due(self) -> int:
        """Claim the due rows and post each once; returns how many were attempted."""
        config = self.config()
        rows = await self.store.claim_alerts(self.owner, lease=LEASE, limit=CLAIM_BATCH)
        if rows:
            await asyncio.gather(*(self._deliver(row, config) for row in rows))
        return len(rows)

    async def _deliver(self, row: dict[str, Any], config: "AlertsConfig") -> None:
        attempts = row["attempts"] + 1
        endpoint = next((e for e in config.endpoints if e.name == row["endpoint"]), None)
        status_code: int | None = None
        if endpoint is None:
            error = "endpoint no longer configured"
        else:
            status_code, error = await self._post(endpoint, row["event_id"], row["payload"])
        now = time.time()
        if error is None:
            outcome, due = "delivered", now
        elif attempts >= config.max_attempts or endpoint is None:
            outcome, due = "failed", now
        else:
            outcome, due = "pending", now + backoff(attempts, config.retry_base, config.retry_max)
        try:
            await self.store.finish_alert(row["id"], self.owner, status=outcome, attempts=attempts,
                                          next_attempt_at=due, last_status=status_code, last_error=error, now=now)
        except Exception as exc:  # noqa: BLE001 — the lease ends; the row is posted again (same id)
            self.log.warning("alert_finish_failed", event_id=row["event_id"], error=type(exc).__name__)
        fields = {"event_id": row["event_id"], "event_type": row["event_type"], "endpoint": row["endpoint"],
                  "attempts": attempts, "status": status_code}
        if outcome == "delivered":
            self.log.info("alert_delivered", **fields)
        elif outcome == "failed":
            self.log.error("alert_delivery_failed", error=error, **fields)
        else:
            self.log.warning("alert_delivery_retry", error=error, retry_in_s=round(due - now, 2), **fields)

    async def _post(self, endpoint: "AlertEndpoint", event_id: str, payload: str) -> tuple[int | None, str | None]:
        """(the HTTP status, an error text or None when acknowledged). The error names the
        status or the exception's type: never the URL, which may carry a credential."""
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession()
        body = render(orjson.loads(payload), endpoint)
        headers = {"Content-Type": "application/json", EVENT_ID_HEADER: event_id,
                   "User-Agent": "ai-gateway-alerts/1"}
        if endpoint.secret:
            headers[SIGNATURE_HEADER] = sign(endpoint.secret, int(time.time()), body)
        try:
            async with self._session.post(endpoint.url, data=body, headers=headers,
                                          timeout=aiohttp.ClientTimeout(total=endpoint.timeout),
                                          allow_redirects=False) as answer:
                await answer.read()
                if 200 <= answer.status < 300:
                    return answer.status, None
                return answer.status, f"HTTP {answer.status}"
        except asyncio.CancelledError:
            raise
        except asyncio.TimeoutError:
            return None, f"timeout after {endpoint.timeout:g} s"
        except Exception as exc:  # noqa: BLE001 — any failure to deliver is retried
            return None, type(exc).__name__


def alerts_cleanup(gw: Any, services: Any) -> Callable[[Any], Any]:
    """The app's cleanup context: this process's Alerts, once the store is open, handed to
    the plugins (`services.alerts`) and the router's breaker; stopped before the store closes."""

    async def ctx(app: Any) -> Any:
        alerts = Alerts(gw.store, lambda: gw.config.alerts).start()
        services.alerts = alerts
        gw.router.breaker.on_change = breaker_events(alerts)
        yield
        gw.router.breaker.on_change = None
        services.alerts = None
        await alerts.stop()

    return ctx


def breaker_events(alerts: Alerts) -> Callable[[bool, dict[str, Any]], None]:
    """The circuit breaker's callback: opened / closed events."""
    def on_change(opened: bool, data: dict[str, Any]) -> None:
        alerts.emit("provider.circuit_opened" if opened else "provider.circuit_closed", data)

    return on_change
