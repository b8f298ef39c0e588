"""accounting: exactly one `ai_usage_logs` row per request, written behind the request.

    plugins:
      - accounting                  # anywhere; list it after energy so energy_cost is final
        settings:
          queue_size: 10000         # rows waiting for the database; full = back-pressure
          batch_size: 500
          flush_interval: 1.0       # seconds; a batch is written at least this often
          analytics_events: true    # one ai_generation_completed/failed log event per call
    reports:
      weekly_cost_threshold_usd: 250   # warning event + report flag when exceeded

Every request that reached the chain (success or failure, billable endpoints) becomes one
row: the columns ops already query (`id, user_id, workspace_id, prospect_id, action,
provider, model, tokens_prompt, tokens_completion, tokens_total, cost_usd, created_at`)
plus request id, requested model, downgraded-from, status, error type, latency, time to
first byte, streamed, energy cost, cache hit, retries and whether usage was estimated,
the token classes (`tokens_cached, tokens_cache_write, tokens_reasoning, tokens_audio_in,
tokens_audio_out`: parts of the prompt / completion totals) and `unit_prices`, the USD per
million tokens of each class that `cost_usd` was computed with (gateway/usage.py). A row
served from the response cache (or an idempotent replay) has `cache_hit`, `cost_usd` 0 and
`saved_usd`, what its tokens would have cost (`unit_prices`: the prices that says).
USD amounts are `Decimal`, rounded once where they are computed (gateway/money.py).

Every upstream call is on a row, also one whose answer was discarded because the energy
reservation that overlapped it lost (docs/billing.md "Calls the gateway could not bill"):
`unbilled_calls` counts them, `unbilled_tokens` and `unbilled_cost_usd` are theirs, and
`cost_usd` includes that cost, so the sum of `cost_usd` is what the provider bills. A
request refused for it (429 `insufficient_energy`) has energy 0 and the discarded call's
tokens; a request moved to a cheaper model has the served answer's tokens.

Rows never sit on the request's hot path: the ending hook appends the row to a bounded
buffer and returns; a writer task (gateway/batcher.py) inserts batches in one transaction
each. If the database is slow the buffer fills and endings wait (back-pressure) instead of
growing memory. A failed batch is retried (rows are keyed by request id, so a retry never
writes twice). At shutdown the core first lets in-flight requests finish, then
`shutdown()` writes what is buffered: zero rows lost.

With `store.usage_retention` (e.g. 90d) a task drops older raw rows at start and hourly
(`Store.prune_usage`); reports read the hourly rollup, which keeps their numbers.
"""

from __future__ import annotations

import asyncio
import operator
import time
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field

from gateway.admin.reports import iso_week, week_start
from gateway.batcher import WriteBehind
from gateway.logs import PerRequestLog
from gateway.money import USD_ZERO
from gateway.usage import unbilled_cost_usd
from plugins.base import Plugin, RequestContext

log = structlog.get_logger("gateway.accounting")
events = structlog.get_logger("gateway.analytics")
generations = PerRequestLog("gateway.analytics")  # one event per call: the cheaper path

# The analytics event's fields, in this order: a row's columns.
EVENT_FIELDS = ("request_id", "user_id", "workspace_id", "prospect_id", "action", "provider", "model",
                "requested_model", "tokens_prompt", "tokens_completion", "tokens_total", "cost_usd",
                "energy_cost", "latency_ms", "usage_estimated", "cache_hit", "saved_usd", "streamed", "status")
event_values = operator.itemgetter(*EVENT_FIELDS)


class AccountingSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    queue_size: int = Field(10_000, ge=1)
    batch_size: int = Field(500, ge=1)
    flush_interval: float = Field(1.0, gt=0, le=60)
    analytics_events: bool = True


def usage_row(ctx: RequestContext) -> dict[str, Any]:
    usage = ctx.usage
    identity = ctx.identity
    failed = ctx.error is not None
    return {
        "request_id": ctx.request_id,
        "user_id": identity.user_id if identity else None,
        "workspace_id": identity.workspace_id if identity else None,
        "prospect_id": ctx.prospect_id,
        "action": ctx.action,
        "provider": ctx.provider,
        "model": ctx.model,
        "requested_model": ctx.requested_model,
        "downgraded_from": ctx.downgraded_from,
        "tokens_prompt": usage.prompt_tokens if usage else 0,
        "tokens_completion": usage.completion_tokens if usage else 0,
        "tokens_total": usage.total_tokens if usage else 0,
        "cost_usd": ctx.cost_usd,
        "status": ctx.status,
        "error_type": (ctx.error.code or ctx.error.type) if failed else None,
        "latency_ms": ctx.latency_ms,
        "ttfb_ms": ctx.ttfb_ms,
        "streamed": ctx.stream,
        "energy_cost": 0 if failed else ctx.energy_cost,
        "cache_hit": ctx.short_circuit is not None,
        "retries": max(0, ctx.attempts - 1),
        "usage_estimated": bool(usage and usage.estimated),
        "tokens_cached": usage.cached_tokens if usage else 0,
        "tokens_cache_write": usage.cache_write_tokens if usage else 0,
        "tokens_reasoning": usage.reasoning_tokens if usage else 0,
        "tokens_audio_in": usage.audio_in_tokens if usage else 0,
        "tokens_audio_out": usage.audio_out_tokens if usage else 0,
        "unit_prices": ctx.unit_prices.per_million_json if ctx.unit_prices is not None else None,
        "experiment": ctx.experiment,
        "variant": ctx.variant,
        "saved_usd": ctx.saved_usd,
        "unbilled_calls": len(ctx.unbilled_calls),
        "unbilled_tokens": sum(call.usage.total_tokens for call in ctx.unbilled_calls),
        "unbilled_cost_usd": unbilled_cost_usd(ctx) if ctx.unbilled_calls else None,
        "created_at": time.time(),
    }


class Accounting(Plugin):
    name = "accounting"
    Settings = AccountingSettings

    def __init__(self, settings: AccountingSettings, services: Any):
        super().__init__(settings, services)
        self.rows: WriteBehind[dict[str, Any]] | None = None
        self._unpriced_warned: set[str] = set()
        self._estimate_warned: set[str] = set()
        self._week: tuple[int, int] | None = None
        self._week_span = (0.0, 0.0)  # [start, end) of self._week in epoch seconds
        self._week_cost = USD_ZERO
        self._week_warned = False
        self._pruner: asyncio.Task | None = None
        self._drainer: asyncio.Task | None = None

    @property
    def depth(self) -> int:
        return self.rows.depth if self.rows is not None else 0

    @property
    def written(self) -> int:
        return self.rows.written if self.rows is not None else 0

    async def startup(self) -> None:
        self.rows = WriteBehind("usage_log", self.services.store.insert_usage,
                                batch_size=self.settings.batch_size,
                                flush_interval=self.settings.flush_interval,
                                max_pending=self.settings.queue_size)
        self.rows.start()
        await self._load_week_cost()
        if self.services.config.store.usage_retention is not None:
            self._pruner = asyncio.create_task(self._prune_usage_hourly(), name="usage-retention")
        self._drainer = asyncio.create_task(self._drain_spool_forever(), name="usage-spool")

    SPOOL_INTERVAL = 30.0

    async def _drain_spool_forever(self) -> None:
        """Rows another process could not write before it stopped (the usage spool): written
        here, at start and every SPOOL_INTERVAL, as soon as this process's database takes them."""
        while True:
            try:
                while (drained := await self.services.store.drain_usage_spool()):
                    log.warning("usage_spool_drained", rows=drained)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 — still refused: kept, tried again later
                log.warning("usage_spool_not_drained", error=f"{type(exc).__name__}: {str(exc)[:200]}")
            await asyncio.sleep(self.SPOOL_INTERVAL)

    PRUNE_INTERVAL = 3600.0

    async def _prune_usage_hourly(self) -> None:
        while True:
            retention = self.services.config.store.usage_retention
            if retention is not None:
                try:
                    dropped = await self.services.store.prune_usage(time.time() - retention)
                    if dropped:
                        log.info("usage_rows_pruned", rows=dropped, retention_seconds=retention)
                except Exception:  # noqa: BLE001 — housekeeping fails open, retried next hour
                    log.exception("usage_prune_failed")
            await asyncio.sleep(self.PRUNE_INTERVAL)

    async def shutdown(self) -> None:
        if self._pruner is not None:
            self._pruner.cancel()
            self._pruner = None
        if self.rows is None:
            return
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
        # Everything recorded so far gets written; past the deadline the rows the database
        # still refuses go to the usage spool (docs/upgrades.md), else stay in the journal.
        await self.rows.close(timeout=self.services.config.server.shutdown_grace,
                              spill=self.services.store.spool_usage)
        log.info("usage_log_flushed", rows_written=self.written)

    async def flush(self) -> None:
        if self.rows is not None:
            await self.rows.flush()

    # --- the endings journal (gateway/journal.py) -------------------------------------

    def journal(self, ctx: RequestContext) -> Any:
        if not ctx.billed:
            return None
        row = usage_row(ctx)
        row["latency_ms"] = (time.monotonic() - ctx.started_at) * 1000  # the ending is not yet stamped
        return row

    async def replay(self, records: list[Any]) -> None:
        """A dead process's answered requests get their rows (keyed by request id: a row
        already written is not written twice)."""
        await self.services.store.insert_usage(records)
        log.info("usage_rows_replayed", journaled=len(records))

    def pending_writes(self) -> int:
        return self.depth

    # --- endings ---------------------------------------------------------------------

    async def on_response(self, ctx: RequestContext) -> None:
        await self._record(ctx)

    async def on_error(self, ctx: RequestContext) -> None:
        await self._record(ctx)

    async def _record(self, ctx: RequestContext) -> None:
        if not ctx.billed:
            return
        row = usage_row(ctx)
        if self.settings.analytics_events:
            self._emit_event(ctx, row)
        if row["cost_usd"] is None and ctx.model not in self._unpriced_warned:
            self._unpriced_warned.add(ctx.model)
            log.warning("usage_cost_unknown", model=ctx.model, deployment=ctx.deployment,
                        prompt_tokens=row["tokens_prompt"],
                        hint="add models[].pricing to config.yaml (with long_context for a prompt beyond "
                             "the price map's max_input_tokens)")
        if row["usage_estimated"] and ctx.error is None and not ctx.client_disconnected:
            # A complete answer without the provider's usage: this deployment may never report
            # it. Say so loudly (once per deployment), so nobody bills on estimates unknowingly.
            deployment = ctx.deployment or ctx.model
            if deployment not in self._estimate_warned and len(self._estimate_warned) < 1000:
                self._estimate_warned.add(deployment)
                log.warning("usage_not_reported_by_provider", model=ctx.model, deployment=deployment,
                            hint="tokens are counted by the gateway and rows marked usage_estimated")
        self._track_week(row, ctx.config.reports.weekly_cost_threshold_usd)  # the live config, not load-time
        assert self.rows is not None, "accounting used before startup"
        await self.rows.put(row)  # waits when full: back-pressure, never unbounded memory

    @staticmethod
    def _emit_event(ctx: RequestContext, row: dict[str, Any]) -> None:
        if ctx.error is not None:
            fields = {"error_type": row["error_type"]}  # first, as it always was
            fields.update(zip(EVENT_FIELDS, event_values(row)))
            generations.emit("info", "ai_generation_failed", fields)
        else:
            generations.emit("info", "ai_generation_completed", dict(zip(EVENT_FIELDS, event_values(row))))

    # --- weekly cost threshold -----------------------------------------------------------

    async def _load_week_cost(self) -> None:
        """Seed this week's running cost from the log, so a restart does not reset it."""
        try:
            now = time.time()
            totals = await self.services.store.usage_totals(None, week_start(now), measures=("cost_usd",))
            self._week = iso_week(now)
            self._week_cost = totals[0]["cost_usd"] if totals else USD_ZERO
        except Exception:  # noqa: BLE001 — reporting fails open
            log.exception("weekly_cost_load_failed")

    def _track_week(self, row: dict[str, Any], threshold: float | None) -> None:
        # The running cost is kept even without a threshold: a reload may set one mid-week.
        created = row["created_at"]
        start, end = self._week_span
        if start <= created < end:  # the week of the previous row: no calendar arithmetic per row
            week = self._week
        else:
            week = iso_week(created)
            start = week_start(created)
            self._week_span = (start, start + 7 * 86400)  # UTC: every week is 7 x 86400 s
        if week != self._week:
            self._week, self._week_cost, self._week_warned = week, USD_ZERO, False
        self._week_cost += row["cost_usd"] or USD_ZERO
        if threshold is not None and self._week_cost > threshold and not self._week_warned:
            self._week_warned = True
            week_name = f"{week[0]}-W{week[1]:02d}"
            events.warning("weekly_cost_threshold_exceeded", week=week_name,
                           week_cost_usd=self._week_cost, threshold_usd=threshold)
            if self.services.alerts is not None:
                # Keyed by the week: every process (and a restart) that sees it makes one event.
                self.services.alerts.emit("cost.weekly_over_threshold",
                                          {"week": week_name, "week_cost_usd": str(self._week_cost),
                                           "threshold_usd": threshold}, key=week_name)
