"""energy: reserve before dispatch, settle on success, refund on failure.

    energy:                         # top-level section of config.yaml: the price book
      default_action: ai_message
      unknown_action: reject        # or: default (price unknown actions as default_action)
      actions:
        ai_message: {default: 1, models: {gpt-4o: 5, gpt-4o-mini: 1}}
    tiers:
      free: {refill: {amount: 100, period: 1d}}   # lazy top-up, applied on the next request
    plugins:
      - auth
      - tier_policy
      - energy                      # after auth and tier_policy
      # or, to tune the sweeper of reservations orphaned by a crashed process, and the
      # batching of settlements:
      # - {name: energy, settings: {stale_after: 1h, sweep_interval: 5m,
      #                             settle_interval: 100ms, settle_batch: 500}}

The action comes from the body's `metadata.action` (openai SDK: `metadata={...}`) or an
`X-Action` header; the core strips `metadata` before the upstream call.

Money rules:
* The reservation is one atomic statement in the store: two concurrent requests can never
  spend the same energy, and no balance goes below zero (also across processes).
* Candidates (the requested model, then its downgrade ladder as tier_policy left it) are
  tried in order; the first the balance affords is reserved and serves the request.
* Success (including a client that disconnected after tokens were produced) settles the
  reservation; any failure refunds it in full. Settle and refund are idempotent in the
  store, so nothing is charged twice.
* Settlements are written behind the answer, in batches (one transaction for many
  requests): at least every `settle_interval` (default 100 ms), at once when `settle_batch`
  are pending, and all of them at shutdown (SIGTERM). A settlement returns nothing to the
  balance, so the balance a user sees is final at the reservation. A process killed before
  the write leaves the reservation open, and the sweeper below refunds it (the error is in
  the customer's favour). `settle_interval: 0` settles each request on its own instead.
* Nothing affordable: 429 `insufficient_energy` with `x-should-retry: false`, so the
  OpenAI SDKs do not retry a request that cannot succeed.
* Every answer to an authenticated request carries `X-Energy-Cost` and `X-Energy-Remaining`.
* A process killed between reserve and settle (SIGKILL, OOM, power) leaves its
  reservations `reserved` forever, and the user's energy locked. A sweeper in every
  process refunds reservations older than `stale_after` (far above any request's
  duration: a refunded reservation can no longer be settled), at start-up and then
  every `sweep_interval`. Refunds are idempotent, so several processes may sweep at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.batcher import WriteBehind
from gateway.config import parse_duration
from plugins.base import Plugin, Reject, RequestContext

BILLABLE = ("chat.completions", "embeddings")

log = structlog.get_logger("gateway.energy")


class EnergySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    stale_after: float = 3600.0  # a reservation this old belongs to a dead process
    sweep_interval: float = 300.0  # 0 disables the periodic sweep (start-up sweep still runs)
    settle_interval: float = 0.1  # settlements are written in batches at least this often; 0 = one by one
    settle_batch: int = Field(500, ge=1)

    @field_validator("stale_after", "sweep_interval", "settle_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("stale_after")
    @classmethod
    def _positive(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("settle_interval")
    @classmethod
    def _not_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be 0 (settle one by one) or positive")
        return v


class Energy(Plugin):
    name = "energy"
    Settings = EnergySettings

    def __init__(self, settings: EnergySettings, services: Any):
        super().__init__(settings, services)
        self._sweeper: asyncio.Task | None = None
        self._settles: WriteBehind[str] | None = None

    async def startup(self) -> None:
        if self.services.store is None:
            return
        if self.settings.settle_interval > 0:
            self._settles = WriteBehind("energy_settle", self.services.store.settle_many,
                                        batch_size=self.settings.settle_batch,
                                        flush_interval=self.settings.settle_interval,
                                        max_pending=50 * self.settings.settle_batch)
            self._settles.start()
        await self.sweep_stale_reservations()
        if self.settings.sweep_interval > 0:
            self._sweeper = asyncio.ensure_future(self._sweep_forever())

    async def shutdown(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._settles is not None:
            await self._settles.close()  # every settlement queued so far is written

    async def flush(self) -> None:
        if self._settles is not None:
            await self._settles.flush()

    @property
    def pending_settlements(self) -> int:
        return self._settles.depth if self._settles is not None else 0

    async def sweep_stale_reservations(self) -> int:
        """Refund reservations left behind by a dead process; returns how many."""
        store = self.services.store
        refunded = 0
        try:
            for request_id in await store.stale_reservations(time.time() - self.settings.stale_after):
                if await store.refund_energy(request_id, reason="stale") is not None:
                    refunded += 1
        except Exception:  # a sweep must never take the gateway down; the next one retries
            log.exception("energy_sweep_failed")
        if refunded:
            log.warning("energy_stale_reservations_refunded", count=refunded)
        return refunded

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            await self.sweep_stale_reservations()

    def _action(self, ctx: RequestContext) -> str:
        energy = ctx.config.energy
        action = ctx.action or energy.default_action
        if action not in energy.actions:
            if energy.unknown_action == "default":
                return energy.default_action
            raise Reject(400, f"Unknown action '{action}'. Known actions: {', '.join(sorted(energy.actions))}.",
                         type="invalid_request_error", code="unknown_action", param="metadata.action")
        return action

    async def on_request(self, ctx: RequestContext) -> None:
        if ctx.endpoint not in BILLABLE or ctx.identity is None or not ctx.candidates:
            return
        store = self.services.store
        action = self._action(ctx)
        ctx.action = action
        tier = ctx.config.tiers.get(ctx.identity.tier)
        refill = (tier.refill.amount, tier.refill.period) if tier is not None and tier.refill else None
        balance: int | None = None
        cheapest: int | None = None
        for model in ctx.candidates:
            cost = ctx.config.energy.cost(action, model)
            cheapest = cost if cheapest is None else min(cheapest, cost)
            if balance is not None and balance < cost:
                continue  # known not to be affordable; skip the round trip
            reserving = asyncio.ensure_future(
                store.reserve_energy(ctx.identity.user_id, cost, ctx.request_id, refill=refill))
            try:
                result = await asyncio.shield(reserving)
            except asyncio.CancelledError:
                # Cancelled (shutdown) while the store writes: the write completes anyway, so
                # own its outcome, or on_error would not refund an open reservation.
                with contextlib.suppress(Exception):
                    if (await reserving).ok:
                        ctx.scratch(self.name)["reserved"] = cost
                        ctx.energy_cost = cost
                raise
            balance = result.balance
            if result.ok:
                scratch = ctx.scratch(self.name)
                scratch["reserved"] = cost
                ctx.energy_cost = cost
                if model != ctx.candidates[0] and ctx.downgrade_reason is None:
                    ctx.downgrade_reason = (f"insufficient energy for {ctx.candidates[0]} "
                                            f"(needs {ctx.config.energy.cost(action, ctx.candidates[0])})")
                elif model != ctx.candidates[0]:
                    ctx.downgrade_reason += "; insufficient energy for the next step"
                ctx.candidates = [model]
                # A fallback after failures must not serve a dearer model than was paid for.
                allowed = ctx.fallback_allowed if ctx.fallback_allowed is not None else set(ctx.config.model_names())
                ctx.fallback_allowed = {m for m in allowed if ctx.config.energy.cost(action, m) <= cost}
                ctx.response_headers["X-Energy-Cost"] = str(cost)
                ctx.response_headers["X-Energy-Remaining"] = str(result.balance)
                return
        needed = ctx.config.energy.cost(action, ctx.candidates[0])
        ctx.response_headers["X-Energy-Cost"] = "0"
        ctx.response_headers["X-Energy-Remaining"] = str(balance)
        detail = f"'{action}' on {ctx.candidates[0]} needs {needed} energy, {balance} left"
        if len(ctx.candidates) > 1:
            detail += f" (the cheapest model you may use needs {cheapest})"
        raise Reject(429, f"Not enough energy: {detail}.", type="insufficient_quota", code="insufficient_energy",
                     headers={"x-should-retry": "false"})

    async def on_response(self, ctx: RequestContext) -> None:
        if "reserved" in ctx.scratch(self.name):
            if self._settles is not None:
                await self._settles.put(ctx.request_id)  # written behind the answer, in a batch
            else:
                await self.services.store.settle_energy(ctx.request_id)

    async def on_error(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch(self.name)
        store = self.services.store
        if "reserved" in scratch:
            balance = await store.refund_energy(ctx.request_id, reason=ctx.error.code if ctx.error else None)
            ctx.response_headers["X-Energy-Cost"] = "0"
            if balance is not None:
                ctx.response_headers["X-Energy-Remaining"] = str(balance)
        elif ctx.identity is not None and ctx.endpoint in BILLABLE and "X-Energy-Remaining" not in ctx.response_headers:
            ctx.response_headers["X-Energy-Cost"] = "0"
            ctx.response_headers["X-Energy-Remaining"] = str(await store.balance(ctx.identity.user_id))
