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
* The reservation overlaps the upstream call (`overlap: true`, the default): when this
  process's last reservation for the user (in the last 5 s, with no other one of theirs
  in flight since) left a balance that covers the cost, dispatch starts while the
  reservation commits, and the core releases nothing of the answer before it has committed. It
  hides the commit from the latency (the bench's stream first byte). If it fails after
  all (the balance was spent by another process meanwhile), the request carries on down
  its candidates exactly as without the overlap (re-dispatched to the cheaper model), or
  gets the 429; the upstream's answer to the first attempt is discarded, with no energy
  charged, and recorded on the request's usage row (`unbilled_calls`, its cost in
  `cost_usd`: docs/billing.md "Calls the gateway could not bill"). A store error fails closed (500), and the next requests reserve before dispatch again
  until the store answers. `overlap: false` always reserves first.
* Settlements are written behind the answer, in batches (one transaction for many
  requests): at least every `settle_interval` (default 100 ms), at once when `settle_batch`
  are pending, and all of them at shutdown (SIGTERM). A settlement returns nothing to the
  balance, so the balance a user sees is final at the reservation. A process killed before
  the write leaves the reservation open, and the sweeper below refunds it (the error is in
  the customer's favour). `settle_interval: 0` settles each request on its own instead.
* Nothing affordable: 429 `insufficient_energy` with `x-should-retry: false`, so the
  OpenAI SDKs do not retry a request that cannot succeed.
* Every answer to an authenticated request carries `X-Energy-Cost` and `X-Energy-Remaining`.
* A reservation that takes the balance below `alerts.energy_low_below` emits one
  `energy.low` alert (gateway/alerts.py).
* Budgets (gateway/budgets.py, docs/budgets.md): the budgets over the request (its
  workspace's, user's, key's) are held in the same store transaction as the energy, tried
  down the candidates like the balance (`hard: downgrade`), or refused at once with 429
  `budget_exceeded` (`hard: refuse`); settled and refunded with the reservation. Every
  answer then carries `X-Budget-Remaining` and `X-Budget-Unit`. A request under a budget
  always reserves before dispatch (no overlap).
* A process killed between reserve and settle (SIGKILL, OOM, power) leaves its
  reservations `reserved` forever, and the user's energy locked. A sweeper in every
  process refunds reservations older than `stale_after` (default: an hour, or the longest
  request the config's timeouts and retries allow plus a minute; shorter than that longest
  request is a config error: a refunded reservation can no longer be settled), at start-up and then
  every `sweep_interval`. Refunds are idempotent, so several processes may sweep at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import structlog
from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway import budgets as budget_rules
from gateway.batcher import WriteBehind
from gateway.batches import RESERVATION_PREFIX as BATCH_RESERVATION
from gateway.config import parse_duration
from gateway.errors import internal_error, store_unavailable
from gateway.hosted_tools import requested
from gateway.money import to_nano
from gateway.store import StoreUnavailable
from gateway.usage import estimate_usd_ceiling
from plugins.base import TOOL_ENDPOINTS, Plugin, Reject, RequestContext

STALE_AFTER = 3600.0  # the least `stale_after` defaults to (EnergySettings)
KNOWN_BALANCE_TTL = 5.0  # seconds a balance seen by this process is trusted to decide an overlap

log = structlog.get_logger("gateway.energy")


class EnergySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # A reservation this old belongs to a dead process. None: an hour, or the longest request
    # the config allows plus a minute if that is longer. Shorter than the longest request
    # is a config error (Energy.outlives_requests).
    stale_after: float | None = None
    sweep_interval: float = 300.0  # 0 disables the periodic sweep (start-up sweep still runs)
    settle_interval: float = 0.1  # settlements are written in batches at least this often; 0 = one by one
    settle_batch: int = Field(500, ge=1)
    overlap: bool = True  # reserve while the upstream request is on its way (see the docstring)

    @field_validator("stale_after", "sweep_interval", "settle_interval", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)

    @field_validator("stale_after")
    @classmethod
    def _positive(cls, v: float | None) -> float | None:
        if v is not None and v <= 0:
            raise ValueError("must be positive")
        return v

    @field_validator("settle_interval")
    @classmethod
    def _not_negative(cls, v: float) -> float:
        if v < 0:
            raise ValueError("must be 0 (settle one by one) or positive")
        return v


def tool_energy(config: Any, tool: str) -> int:
    """The energy of one call of the MCP tool `server__tool`: mcp_servers[].tools.<name>.energy,
    else the server's `energy`. A tool no server exposes is refused before energy runs;
    should one get here, it costs the dearest server's price (never nothing)."""
    found = config.mcp_tool(tool)
    if found is None:
        return max((server.energy for server in config.mcp_servers), default=0)
    server, upstream_name = found
    return server.tool_energy(upstream_name)


class Energy(Plugin):
    name = "energy"
    Settings = EnergySettings
    outlives_requests = ("stale_after",)

    def __init__(self, settings: EnergySettings, services: Any):
        super().__init__(settings, services)
        self._sweeper: asyncio.Task | None = None
        self._settles: WriteBehind[str] | None = None
        # Overlap bookkeeping (this process only): user -> (balance after this process's
        # last reservation for them, when), and user -> [reservations in flight, started].
        self._known: dict[str, tuple[int, float]] = {}
        self._in_flight: dict[str, list[int]] = {}
        self._store_ok = False
        self._tasks: set[asyncio.Task] = set()
        # The wall clock budgets' periods are read on (tests move it to a period's boundary).
        self.clock = time.time

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
            # Every settlement queued so far is written; one the database never takes leaves
            # its reservation open, refunded by the sweeper later (never a double charge).
            await self._settles.close(timeout=self.services.config.server.shutdown_grace)

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
            stale_after = self.settings.stale_after
            if stale_after is None:
                stale_after = self.services.config.outlasting_requests(STALE_AFTER)
            for request_id in await store.stale_reservations(time.time() - stale_after):
                if request_id.startswith(BATCH_RESERVATION):
                    continue  # a provider batch runs up to a day; its poller settles it (gateway/batches.py)
                if await store.refund_energy(request_id, reason="stale") is not None:
                    refunded += 1
            # Budget holds whose reservation a process of the previous release finished
            # (it knows no budgets): they follow their reservation now.
            orphans = await store.finish_orphan_holds()
            if orphans:
                log.warning("budget_orphan_holds_finished", count=orphans)
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
        if not ctx.billed or ctx.identity is None or not ctx.candidates:
            return
        action = self._action(ctx)
        ctx.action = action
        tools = requested(ctx.body, ctx.inbound, ctx.inbound_body)
        if tools:  # hosted tools: their energy per use, reserved for max_uses (see _price)
            ctx.scratch(self.name)["tools"] = tuple(tools)
        tier = ctx.config.tiers.get(ctx.identity.tier)
        refill = (tier.refill.amount, tier.refill.period) if tier is not None and tier.refill else None
        candidates = list(ctx.candidates)
        budgets = await self._budgets(ctx)
        if budgets:
            ctx.scratch(self.name)["budgets"] = budgets
        if ctx.cache_hit is not None and await self._reserve_cache_hit(ctx, action, refill, candidates):
            return
        cost = self._price(ctx, action, candidates[0])
        if not budgets and self._may_overlap(ctx.identity.user_id, cost):
            self._overlap(ctx, action, refill, candidates, cost)
            return
        error = await self._reserve_first_affordable(ctx, action, refill, candidates, 0, None)
        if error is not None:
            raise error

    async def _reserve_cache_hit(self, ctx: RequestContext, action: str, refill: Any, candidates: list[str]) -> bool:
        """An answer from the response cache costs the action's `cache_hit_price` (by
        default the normal price). False when the balance cannot afford it: the request
        then goes the usual way (down the ladder, or a 429), without the cached answer."""
        store = self.services.store
        price = ctx.config.energy.cache_hit_cost(action, ctx.cache_hit_model or candidates[0])
        if price == 0:
            ctx.candidates = [ctx.cache_hit_model or candidates[0]]
            ctx.response_headers["X-Energy-Cost"] = "0"
            ctx.response_headers["X-Energy-Remaining"] = str(await store.balance(ctx.identity.user_id))
            return True
        budgets = ctx.scratch(self.name).get("budgets")
        holds = budget_rules.holds(budgets, self.clock(), price, 0) if budgets else ()  # a hit costs no USD
        result = await store.reserve_energy(ctx.identity.user_id, price, ctx.request_id, refill=refill, budgets=holds)
        if not result.ok:
            ctx.cache_hit = None
            return False
        self._reserved(ctx, action, candidates, candidates[0], price, result.balance)
        self._budgets_held(ctx, holds, result)
        return True

    # --- budgets (gateway/budgets.py) --------------------------------------------------

    async def _budgets(self, ctx: RequestContext) -> list[Any]:
        """The budgets over this request: its workspace's, its user's and its key's."""
        directory = self.services.directory
        workspace_id = ctx.identity.workspace_id
        found = await directory.budgets(workspace_id) if directory is not None \
            else await self.services.store.list_budgets(workspace_id)
        return budget_rules.applying(found, ctx.identity) if found else []

    def _holds(self, ctx: RequestContext, budgets: list[Any], model: str, cost: int) -> tuple:
        usd = 0
        if any(b.unit == "usd" for b in budgets):
            ceiling = estimate_usd_ceiling(ctx, model)
            usd = 0 if ceiling is None else max(0, to_nano(ceiling))
        return budget_rules.holds(budgets, self.clock(), cost, usd)

    def _budgets_held(self, ctx: RequestContext, holds: tuple, result: Any) -> None:
        """After a reservation with holds: the header, and the alerts it crossed."""
        budgets = ctx.scratch(self.name).get("budgets")
        if not budgets or not holds or result.budget_spent is None:
            return
        scratch = ctx.scratch(self.name)
        scratch["held"] = True
        scratch["usd_held"] = any(h.unit == "usd" for h in holds)
        found = budget_rules.tightest(budgets, result.budget_spent)
        if found is not None:
            ctx.response_headers["X-Budget-Remaining"] = budget_rules.display(found[0].unit, found[1])
            ctx.response_headers["X-Budget-Unit"] = found[0].unit
        alerts = self.services.alerts
        if alerts is None:
            return
        for budget, hold, after in zip(budgets, holds, result.budget_spent):
            for percent in budget_rules.crossed(budget, after - hold.amount, after):
                alerts.emit("budget.threshold_crossed", {
                    "budget": budget.id, "scope": budget.scope, "scope_id": budget.scope_id, "unit": budget.unit,
                    "amount": budget_rules.display(budget.unit, budget.amount), "period": budget.period,
                    "period_start": hold.period_start, "timezone": budget.timezone, "percent": percent,
                    "spent": budget_rules.display(budget.unit, after), "request_id": ctx.request_id},
                    workspace_id=budget.workspace_id, key=f"{budget.id}|{hold.period_start}|{percent}")

    async def _budget_refusal(self, ctx: RequestContext, budget: Any, hold: Any, balance: int) -> Reject:
        """429 budget_exceeded: the budget that refused, what it has left, what was needed."""
        spent = (await self.services.store.budget_spent([(budget.id, hold.period_start)]))[(budget.id, hold.period_start)]
        left = max(0, budget.amount - spent)
        ctx.response_headers["X-Energy-Cost"] = "0"
        ctx.response_headers["X-Energy-Remaining"] = str(balance)
        ctx.response_headers["X-Budget-Remaining"] = budget_rules.display(budget.unit, left)
        ctx.response_headers["X-Budget-Unit"] = budget.unit
        unit = "USD" if budget.unit == "usd" else "energy"
        per = "in total" if budget.period == "life" else f"per {budget.period}"
        return Reject(429, f"Budget exceeded: the {budget.scope} budget of {budget_rules.display(budget.unit, budget.amount)}"
                           f" {unit} {per} has {budget_rules.display(budget.unit, left)} left; this request needs"
                           f" {budget_rules.display(budget.unit, hold.amount)}.",
                      type="insufficient_quota", code="budget_exceeded", headers={"x-should-retry": "false"})

    # --- the reservation ---------------------------------------------------------------

    async def _reserve_first_affordable(self, ctx: RequestContext, action: str, refill: Any,
                                        candidates: list[str], start: int, balance: int | None) -> Reject | None:
        """Reserve for the first of candidates[start:] the balance affords; None when
        reserved, else the 429 to answer with. `balance`: already known to be this low."""
        store = self.services.store
        user_id = ctx.identity.user_id
        budgets = ctx.scratch(self.name).get("budgets")
        refused = None  # (budget, hold): the last refusal was a budget's
        for model in candidates[start:]:
            cost = self._price(ctx, action, model)
            if balance is not None and balance < cost:
                continue  # known not to be affordable; skip the round trip
            holds = self._holds(ctx, budgets, model, cost) if budgets else ()
            reserving = store.reserve_energy_soon(user_id, cost, ctx.request_id, refill=refill, budgets=holds)
            ticket = self._begin(user_id)
            reserving.add_done_callback(lambda done, ticket=ticket: self._end(user_id, ticket, done))
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
                if model != candidates[0] and refused is not None and ctx.downgrade_reason is None:
                    ctx.downgrade_reason = f"budget {refused[0].id} exhausted for {candidates[0]}"
                self._reserved(ctx, action, candidates, model, cost, result.balance)
                self._budgets_held(ctx, holds, result)
                return None
            refused = None
            if result.budget_refused is not None:
                budget = next(b for b in budgets if b.id == result.budget_refused)
                refused = (budget, next(h for h in holds if h.budget_id == budget.id))
                if budget.hard != "downgrade":
                    break  # refuse: no cheaper model instead
                balance = None  # the balance was not what refused: the next model is tried
        if refused is not None:
            return await self._budget_refusal(ctx, refused[0], refused[1], result.balance)
        cheapest = min(self._price(ctx, action, m) for m in candidates)
        needed = self._price(ctx, action, candidates[0])
        ctx.response_headers["X-Energy-Cost"] = "0"
        ctx.response_headers["X-Energy-Remaining"] = str(balance)
        detail = f"'{action}' on {candidates[0]} needs {needed} energy, {balance} left"
        if len(candidates) > 1:
            detail += f" (the cheapest model you may use needs {cheapest})"
        return Reject(429, f"Not enough energy: {detail}.", type="insufficient_quota", code="insufficient_energy",
                      headers={"x-should-retry": "false"})

    def _reserved(self, ctx: RequestContext, action: str, candidates: list[str], model: str, cost: int,
                  balance: int) -> None:
        ctx.scratch(self.name)["reserved"] = cost
        ctx.energy_cost = cost
        if model != candidates[0] and ctx.downgrade_reason is None:
            ctx.downgrade_reason = (f"insufficient energy for {candidates[0]} "
                                    f"(needs {self._price(ctx, action, candidates[0])})")
        elif model != candidates[0] and "budget" not in ctx.downgrade_reason:
            ctx.downgrade_reason += "; insufficient energy for the next step"
        ctx.candidates = [model]
        self._limit_fallbacks(ctx, action, cost)
        ctx.response_headers["X-Energy-Cost"] = str(cost)
        ctx.response_headers["X-Energy-Remaining"] = str(balance)
        self._alert_if_low(ctx, cost, balance)

    def _alert_if_low(self, ctx: RequestContext, cost: int, balance: int) -> None:
        """energy.low when this reservation took the balance below the threshold: the
        reservation is atomic, so exactly one request crosses it (until a grant, a refill or
        a refund lifts the balance above again)."""
        threshold = ctx.config.alerts.energy_low_below
        alerts = self.services.alerts
        if threshold is None or alerts is None or ctx.identity is None or not balance < threshold <= balance + cost:
            return
        alerts.emit("energy.low", {"user_id": ctx.identity.user_id, "balance": balance, "threshold": threshold,
                                   "request_id": ctx.request_id},
                    workspace_id=ctx.identity.workspace_id, key=f"{ctx.identity.user_id}|{ctx.request_id}")

    def _price(self, ctx: RequestContext, action: str, model: str, uses: dict[str, int] | None = None) -> int:
        """The action's energy on `model`, plus each requested hosted tool's energy per use
        (config.yaml models[].hosted_tools): for its `max_uses` when reserving, for the
        `uses` the answer reported (at most max_uses) when settling. An MCP tool call
        (`model` is `server__tool`) costs its price in mcp_servers, whatever the action."""
        if ctx.endpoint in TOOL_ENDPOINTS:
            return tool_energy(ctx.config, model)
        cost = ctx.config.energy.cost(action, model)
        tools = ctx.scratch(self.name).get("tools")
        if tools and ctx.config.deployments(model):
            allowed = ctx.config.model_settings(model).hosted_tools or {}
            for kind in tools:
                tool = allowed.get(kind)
                if tool is not None:
                    count = tool.max_uses if uses is None else min(uses.get(kind, 0), tool.max_uses)
                    cost += tool.energy_per_use * count
        return cost

    @staticmethod
    def _limit_fallbacks(ctx: RequestContext, action: str, cost: int) -> None:
        # A fallback after failures must not serve a dearer model than was paid for.
        within = ctx.config.models_within(action, cost)
        ctx.fallback_allowed = within if ctx.fallback_allowed is None else ctx.fallback_allowed & within

    # --- overlapping the reservation with the upstream call ---------------------------

    def _begin(self, user_id: str) -> int:
        """A reservation call starts; its ticket is 0 when another one is in flight."""
        entry = self._in_flight.setdefault(user_id, [0, 0])
        entry[0] += 1
        entry[1] += 1
        return entry[1] if entry[0] == 1 else 0

    def _end(self, user_id: str, ticket: int, done: asyncio.Future) -> None:
        """A reservation call finished. Its balance is trusted for the next overlap only if
        no other reservation of this user was in flight at any time during it (results of
        concurrent calls may arrive out of commit order)."""
        entry = self._in_flight[user_id]
        alone = ticket != 0 and entry[0] == 1 and entry[1] == ticket
        entry[0] -= 1
        if entry[0] == 0:
            del self._in_flight[user_id]
        failed = done.cancelled() or done.exception() is not None
        self._store_ok = not failed
        if alone and not failed:
            if len(self._known) >= 100_000:  # bounded: forgetting only means not overlapping
                self._known.clear()
            self._known[user_id] = (done.result().balance, time.monotonic())
        else:
            self._known.pop(user_id, None)

    def _may_overlap(self, user_id: str, cost: int) -> bool:
        """Overlap only when the reservation will almost surely pass: the store answered
        the last reservation, no other reservation of this user is in flight here, and
        the balance this process last saw (under KNOWN_BALANCE_TTL ago) covers the cost."""
        if not self.settings.overlap or not self._store_ok or user_id in self._in_flight:
            return False
        known = self._known.get(user_id)
        return known is not None and time.monotonic() - known[1] <= KNOWN_BALANCE_TTL and known[0] >= cost

    def _overlap(self, ctx: RequestContext, action: str, refill: Any, candidates: list[str], cost: int) -> None:
        """Start the reservation and let dispatch start too; the core waits for `ctx.gate`
        before anything reaches the client (plugins/base.py)."""
        user_id = ctx.identity.user_id
        ctx.candidates = [candidates[0]]
        self._limit_fallbacks(ctx, action, cost)
        gate: asyncio.Future = asyncio.get_running_loop().create_future()
        ctx.gate = gate
        scratch = ctx.scratch(self.name)
        scratch["gate"] = gate
        reserving = self.services.store.reserve_energy_soon(user_id, cost, ctx.request_id, refill=refill)
        ticket = self._begin(user_id)  # (a future never completes before the next loop turn)
        reserving.add_done_callback(lambda done: self._end(user_id, ticket, done))
        reserving.add_done_callback(
            lambda done: self._overlap_done(done, ctx, gate, action, refill, candidates, cost))

    def _overlap_done(self, done: asyncio.Future, ctx: RequestContext, gate: asyncio.Future, action: str,
                      refill: Any, candidates: list[str], cost: int) -> None:
        exc = None if done.cancelled() else done.exception()
        if done.cancelled() or exc is not None:  # fail closed: no answer without a reservation
            log.error("energy_reservation_failed", request_id=ctx.request_id,
                      error=type(exc).__name__ if exc else "cancelled")
            gate.set_result(store_unavailable(ctx.request_id) if isinstance(exc, StoreUnavailable)
                            else internal_error(ctx.request_id))
            return
        result = done.result()
        if result.ok:
            self._reserved(ctx, action, candidates, candidates[0], cost, result.balance)
            gate.set_result(None)
            return
        # The balance moved under us (another process, an admin): carry on down the
        # candidates exactly as without the overlap; the core re-dispatches if it downgrades.
        task = asyncio.ensure_future(self._late_reservation(ctx, gate, action, refill, candidates, result.balance))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _late_reservation(self, ctx: RequestContext, gate: asyncio.Future, action: str, refill: Any,
                                candidates: list[str], balance: int) -> None:
        try:
            error = await self._reserve_first_affordable(ctx, action, refill, candidates, 1, balance)
        except BaseException as exc:
            log.exception("energy_reservation_failed", request_id=ctx.request_id)
            error = store_unavailable(ctx.request_id) if isinstance(exc, StoreUnavailable) else internal_error(ctx.request_id)
        gate.set_result(error)

    async def _gate_settled(self, scratch: dict[str, Any]) -> None:
        """An overlapped reservation decides the ending: wait until its outcome is known."""
        gate = scratch.get("gate")
        if gate is not None and not gate.done():
            await asyncio.shield(gate)

    # --- the endings journal (gateway/journal.py) -----------------------------------------

    def journal(self, ctx: RequestContext) -> Any:
        """The request id (settled as reserved), or [id, amount] when hosted tools were used
        fewer times than reserved for. The answer is about to leave: `ctx.energy_cost` and
        the headers become the settled amount now (a JSON answer's headers have not left
        yet; every plugin's ending, accounting's row included, sees the settled amount)."""
        scratch = ctx.scratch(self.name)
        reserved = scratch.get("reserved")
        if reserved is None:
            return None
        final = self._settled(ctx, reserved)
        if final == reserved:
            return ctx.request_id
        if "settled" not in scratch:
            scratch["settled"] = final
            ctx.energy_cost = final
            ctx.response_headers["X-Energy-Cost"] = str(final)
            remaining = ctx.response_headers.get("X-Energy-Remaining")
            if remaining is not None and remaining.lstrip("-").isdigit():  # the unused part goes back
                ctx.response_headers["X-Energy-Remaining"] = str(int(remaining) + reserved - final)
        return [ctx.request_id, final]

    def _settled(self, ctx: RequestContext, reserved: int) -> int:
        """What an answer costs: as reserved, or less when its hosted tools were used fewer
        times than reserved for (at most max_uses each)."""
        if ctx.scratch(self.name).get("tools") and ctx.action is not None and ctx.usage is not None:
            return min(reserved, self._price(ctx, ctx.action, ctx.model, dict(ctx.usage.hosted_tool_uses)))
        return reserved

    async def replay(self, records: list[Any]) -> None:
        """Settle what a dead process answered (a reservation no longer open is skipped),
        before the sweeper could take them for orphans and refund them."""
        store = self.services.store
        settled = await store.settle_many([str(r) for r in records if not isinstance(r, list)])
        for request_id, amount in (r for r in records if isinstance(r, list)):
            settled += await store.settle_energy(str(request_id), int(amount)) is not None
        log.info("energy_settlements_replayed", journaled=len(records), settled=settled)

    def pending_writes(self) -> int:
        return self.pending_settlements

    # --- endings -------------------------------------------------------------------------

    async def on_response(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch(self.name)
        await self._gate_settled(scratch)
        if "reserved" in scratch and scratch.get("tools"):
            # Hosted tools were reserved for at most max_uses each: settle at the uses made
            # (journal() found it when the answer left; a client gone mid-stream never got there).
            final = scratch.get("settled", self._settled(ctx, scratch["reserved"]))
            if final < scratch["reserved"]:
                await self.services.store.settle_energy(ctx.request_id, final, usd_final=self._usd_final(ctx))
                ctx.energy_cost = final
                return
        if "reserved" in scratch:
            usd_final = self._usd_final(ctx)
            if self._settles is not None:  # written behind the answer, in a batch; with holds: finished with it
                await self._settles.put((ctx.request_id, usd_final) if scratch.get("held") else ctx.request_id)
            else:
                await self.services.store.settle_energy(ctx.request_id, usd_final=usd_final)

    def _usd_final(self, ctx: RequestContext) -> int | None:
        """A USD budget hold settles at the request's cost (nano-dollars); None: as held
        (no USD hold, or no known price)."""
        if not ctx.scratch(self.name).get("usd_held") or ctx.cost_usd is None:
            return None
        return max(0, to_nano(ctx.cost_usd))

    async def on_error(self, ctx: RequestContext) -> None:
        scratch = ctx.scratch(self.name)
        await self._gate_settled(scratch)
        store = self.services.store
        if "reserved" in scratch:
            balance = await store.refund_energy(ctx.request_id, reason=ctx.error.code if ctx.error else None)
            # The holds came back too: what the reservation's header said is no longer true.
            ctx.response_headers.pop("X-Budget-Remaining", None)
            ctx.response_headers.pop("X-Budget-Unit", None)
            ctx.response_headers["X-Energy-Cost"] = "0"
            if balance is not None:
                ctx.response_headers["X-Energy-Remaining"] = str(balance)
            self._known.pop(ctx.identity.user_id, None)  # a refund's result may arrive out of order
        elif ctx.identity is not None and ctx.billed and "X-Energy-Remaining" not in ctx.response_headers:
            ctx.response_headers["X-Energy-Cost"] = "0"
            ctx.response_headers["X-Energy-Remaining"] = str(await store.balance(ctx.identity.user_id))
