"""Files and batches: whose each is, the check of a batch's every line, the poller, the settlement.

OpenAI's Batch API runs many chat completions (or embeddings) at the provider for half the
price, within 24 hours. The gateway owns both ends of it (docs/batches.md):

* **Files** (`gateway/inbound/files.py`) are uploaded to the account of one deployment and
  recorded in the store with their owner (`gw_files`): a user sees and uses only their own;
  any other id is a 404 without asking the provider.
* **A batch** is created only after every line of its input file was checked like a single
  request (model allowed for the caller's tier and key, the body through
  `gateway/client_body.py`'s allowlist and object-id refusal); the file is then rewritten
  with the deployment's upstream model name and uploaded again, and that copy runs. Its
  estimated energy (the action's energy on the model, times the lines) is reserved first.
* **Anthropic's message batches** (gateway/message_batches.py) are rows of the same table
  (`endpoint` /v1/messages), polled and settled here the same way.
* **The poller** (one task per process) asks the provider about running batches. Which
  process polls a batch is decided by a lease in the store (`claim_batches`), so a batch is
  polled and settled by one process at a time, also across restarts.

Settlement invariants (a batch is billed exactly once):

* The batch's energy is ONE reservation (`request_id` = the gateway's batch id, `gwb_...`),
  settled once at `energy_per_line x lines that succeeded`; `settle_energy` returns the
  rest (lines that failed, expired or were cancelled cost nothing).
* Each input line gets exactly one usage row, keyed `<gateway batch id>:<custom_id>`
  (hashed when long): its tokens at the provider's batch prices (litellm's `*_batches`
  keys, or `models[].pricing.batches`), its energy, its status. `insert_usage` skips a key
  it has: a settlement that runs again (the process died before it marked the batch
  settled) writes nothing twice, and the reservation, already settled, is not touched again.
* Only then is the batch marked settled (`settled_at`). Until then a client sees the
  batch as `finalizing`, never `completed` before its bill is written.
* The stale-reservation sweeper (plugins/energy.py) leaves `gwb_` reservations alone: a
  batch runs for up to a day; the poller refunds one whose creation died half-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, AsyncIterator

import orjson
import structlog
from aiohttp import web

from gateway import budgets as budget_rules
from gateway.client_body import check_params, require_model, validate_chat, validate_embeddings
from gateway.config import Config, ModelEntry
from gateway.errors import ApiError, bad_request, store_unavailable
from gateway.hosted_tools import requested
from gateway.money import USD_ZERO, to_nano
from gateway.object_ids import FILE_ID_FIELDS, file_ids_in
from gateway.providers.base import UpstreamError
from gateway.providers.openai import upstream_model
from gateway.providers.anthropic_batches import (
    MessageBatchesUpstream,
    holds_message_batches,
    message_batches_account,
    message_outcome,
)
from gateway.providers.openai_files import FilesUpstream, account_of, holds_files
from gateway.router import upstream_to_api_error
from gateway.state import Gateway
from gateway.usage import batch_prices, estimate_usd_ceiling, usage_from_payload
from plugins.base import Reject

log = structlog.get_logger("gateway.batches")

RESERVATION_PREFIX = "gwb_"  # the gateway's batch ids: their energy reservations outlive the sweeper's bound
ENDPOINTS = {"/v1/chat/completions": "chat.completions", "/v1/embeddings": "embeddings"}
MESSAGES = "/v1/messages"  # a row of Anthropic's Message Batches (gateway/message_batches.py)
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
CREATE_GRACE = 3600.0  # a batch row still without an upstream id after this: its creation died
CREATE_PARAMS = frozenset({"input_file_id", "endpoint", "completion_window", "metadata"})
LINE_KEYS = frozenset({"custom_id", "method", "url", "body"})
MAX_CUSTOM_ID = 512
# The batch object fields a client gets (the provider's own, ids and model made public).
BATCH_FIELDS = ("id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
                "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at", "finalizing_at",
                "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at", "request_counts",
                "metadata", "model", "usage")
FILE_PURPOSES = frozenset({"batch", "user_data", "assistants", "vision"})
GATEWAY_FIELDS = ("action", "prospect_id")  # a batch's metadata keys that are the gateway's, not the provider's


def usage_key(batch: str, custom_id: str) -> str:
    """The usage row's request_id of one line: what makes its settlement once only."""
    if len(custom_id) > 100:
        custom_id = "sha256:" + hashlib.sha256(custom_id.encode()).hexdigest()
    return f"{batch}:{custom_id}"


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def holder(config: Config, model: str, account: str, endpoint: str | None = None) -> ModelEntry | None:
    """The deployment that reaches the account holding a file (or, for `endpoint`
    /v1/messages, running an Anthropic message batch): the first of `model`'s that does,
    else the first of any model's (the model was removed from the config)."""
    holds, account_of_ = (holds_message_batches, message_batches_account) if endpoint == MESSAGES else (
        holds_files, account_of)
    names = [model, *(m for m in config.model_names() if m != model)] if config.deployments(model) else \
        config.model_names()
    for name in names:
        for deployment in config.deployments(name):
            if holds(deployment) and account_of_(deployment) == account:
                return deployment
    return None


def may_use(ctx: Any, model: str) -> bool:
    """The tier and the key allow `model` (the single request's rule, without a ladder)."""
    identity = ctx.identity
    config = ctx.config
    if not config.deployments(model) or identity is None:
        return False
    if identity.tier not in config.tiers or model not in config.tier_models(identity.tier):
        return False
    return identity.key_models is None or model in identity.key_models


def refers_to_file(refused: ApiError) -> bool:
    """The object-id refusal of a file id (the only ids a caller may own)."""
    return refused.code == "object_id_not_allowed" and (refused.param or "").endswith(FILE_ID_FIELDS)


async def owned_files(store: Any, ctx: Any, body: dict[str, Any], model: str) -> frozenset[str]:
    """The file ids `body` names that the caller owns (uploaded through /v1/files; not a
    batch's output), all held at one upstream account: the request is then served only by
    deployments reaching it (`ctx.deployment_filter`). Empty: none is the caller's."""
    if ctx.identity is None or store is None:
        return frozenset()
    owned: dict[str, dict[str, Any]] = {}
    try:
        for file_id in file_ids_in(body):
            record = await store.stored_file(file_id) if len(file_id) <= 200 else None
            if record is not None and record["user_id"] == ctx.identity.user_id and record.get("batch_id") is None:
                owned[file_id] = record
    except Exception as exc:  # noqa: BLE001 — whatever the backend raises: the owner is unknown
        log.warning("stored_file_lookup_failed", request_id=ctx.request_id, error=type(exc).__name__)
        raise store_unavailable(ctx.request_id) from None
    if not owned:
        return frozenset()
    accounts = {record["upstream"] for record in owned.values()}
    if len(accounts) > 1:
        raise bad_request("The files named are held at different upstream accounts; one request can use the files "
                          "of one account", code="files_elsewhere")
    account = accounts.pop()

    def reaches(deployment: ModelEntry) -> bool:
        return holds_files(deployment) and account_of(deployment) == account

    if not any(reaches(d) for d in ctx.config.deployments(model)):
        raise bad_request(f"The file '{next(iter(owned))}' is held at an upstream account that the model '{model}' is "
                          f"not served from; use the model it was uploaded for", param="model", code="file_elsewhere")
    ctx.deployment_filter = reaches
    return frozenset(owned)


def line_usd_ceiling(config: Config, kind: str, model: str, body: dict[str, Any]) -> int:
    """What one line may cost, in nano-dollars, held by a USD budget: the single request's
    ceiling (its prompt, its output at its limit or the model's cap, at standard prices,
    so above the batch's); 0 without a known price."""
    shim = type("LineContext", (), {"endpoint": kind, "config": config, "body": body})()
    ceiling = estimate_usd_ceiling(shim, model)  # type: ignore[arg-type]
    return 0 if ceiling is None else max(0, to_nano(ceiling))


def bound_line(config: Config, kind: str, model: str, body: dict[str, Any], inbound: str | None = None,
               inbound_body: dict[str, Any] | None = None) -> None:
    """A line held to what a single request on `model` may make the provider bill: no
    hosted tool (charged per use; a batch's settlement bills tokens only), the output at
    the model's `max_tokens_default` / `max_tokens_cap` (config.yaml models[]). `body`
    changed in place (`inbound_body`, an Anthropic request's params, instead when given)."""
    if kind != "chat.completions":
        return
    if requested(body, inbound, inbound_body):
        raise bad_request("a hosted tool (web search, ...) is not accepted in a batch: it is charged per use, "
                          "which a batch's settlement does not bill", param="tools", code="hosted_tool_not_allowed")
    settings = config.model_settings(model)
    default, cap = settings.max_tokens_default, settings.max_tokens_cap
    target = inbound_body if inbound_body is not None else body
    keys = ("max_tokens",) if inbound_body is not None else ("max_tokens", "max_completion_tokens")
    present = [k for k in keys if target.get(k) is not None]
    if not present and default is not None:
        target["max_tokens"] = default if cap is None else min(default, cap)
    for key in present:
        if cap is not None and isinstance(target[key], int) and target[key] > cap:
            target[key] = cap


def _line_error(number: int, message: str, param: str | None = None) -> ApiError:
    return bad_request(f"line {number} of the input file: {message}", param=f"line {number}" + (
        f".{param}" if param else ""), code="invalid_batch_line")


def public_batch(record: dict[str, Any]) -> dict[str, Any]:
    """The provider's batch object as the client sees it: its own input file id, the public
    model, and `finalizing` while the gateway has not settled it yet."""
    payload = orjson.loads(record["payload"]) if record.get("payload") else {}
    out = {k: payload.get(k) for k in BATCH_FIELDS if k in payload}
    out.update(id=record["batch_id"], object="batch", input_file_id=record["input_file_id"],
               endpoint=record["endpoint"])
    if "model" in out:
        out["model"] = record["model"]
    if record.get("settled_at") is None:  # its files become the user's when it is settled
        out["output_file_id"] = out["error_file_id"] = None
        if out.get("status") in TERMINAL:
            out["status"] = "finalizing"
    return out


def public_file(record: dict[str, Any]) -> dict[str, Any]:
    return {"id": record["file_id"], "object": "file", "bytes": record["bytes"],
            "created_at": int(record["created_at"]), "filename": record["filename"], "purpose": record["purpose"],
            "status": "processed", "status_details": None}


class BatchService:
    """Files and batches of one gateway process: the upstream client and the poller."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.upstream = FilesUpstream()
        self.messages = MessageBatchesUpstream(self.upstream)
        self.owner = owner_id()
        self._task: asyncio.Task | None = None

    # --- process lifetime ------------------------------------------------------------

    def start(self) -> None:
        if self.gw.store is not None:
            self._task = asyncio.ensure_future(self._poll_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.upstream.close()

    async def _poll_forever(self) -> None:
        while True:
            config = self.gw.config.batches
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a poll must never take the gateway down; the next one retries
                log.exception("batch_poll_failed")
            await asyncio.sleep(min(config.poll_interval, 5.0))

    # --- files ------------------------------------------------------------------------

    async def owned_file(self, ctx: Any, file_id: str) -> dict[str, Any]:
        """The caller's file, or the 404 any other id gets (the provider is not asked)."""
        record = await self.gw.store.stored_file(file_id) if 0 < len(file_id) <= 200 else None
        if record is None or ctx.identity is None or record["user_id"] != ctx.identity.user_id:
            raise ApiError(404, f"No such File object: {file_id[:200]}", param="file_id", code="file_not_found")
        return record

    def file_deployment(self, ctx: Any, model: str | None) -> tuple[str, ModelEntry]:
        """Where an upload goes: the named model's first deployment that holds files, else
        `batches.files_model`'s, else the one account the caller's models reach; ambiguous
        (several accounts) is a 400 asking for `model`."""
        config = ctx.config
        model = model or config.batches.files_model
        if model is not None:
            if not may_use(ctx, model):
                raise ApiError(404, f"The model '{model}' does not exist or you do not have access to it.",
                               param="model", code="model_not_found")
            for deployment in config.deployments(model):
                if holds_files(deployment):
                    return model, deployment
            raise bad_request(f"The model '{model}' is not served by an upstream that holds files (only OpenAI "
                              f"deployments do here)", param="model", code="files_not_supported")
        accounts: dict[str, tuple[str, ModelEntry]] = {}
        for name in config.model_names():
            if may_use(ctx, name):
                for deployment in config.deployments(name):
                    if holds_files(deployment):
                        accounts.setdefault(account_of(deployment), (name, deployment))
        if len(accounts) == 1:
            return next(iter(accounts.values()))
        if not accounts:
            raise bad_request("None of your models is served by an upstream that holds files", param="model",
                              code="files_not_supported")
        raise bad_request("Your models are served by several upstream accounts: name the model the file is for "
                          "in a 'model' form field (openai SDK: extra_body={'model': ...})", param="model",
                          code="model_required")

    async def content(self, ctx: Any, record: dict[str, Any]) -> AsyncIterator[bytes]:
        """A file's bytes, line by line; a batch's output or error file with the batch's
        public model name in place of the upstream's."""
        deployment = holder(ctx.config, record["model"], record["upstream"])
        if deployment is None:
            raise ApiError(404, f"The file '{record['file_id']}' is held at an upstream no configured model uses "
                                f"any more.", code="file_not_found")
        lines = self.upstream.content(deployment, record["file_id"])
        if record.get("batch_id") is None:
            return lines
        return _public_lines(lines, record["model"])

    # --- create -----------------------------------------------------------------------

    async def create(self, ctx: Any, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/batches: check, rewrite, reserve, upload, create (see the module)."""
        store, config = self.gw.store, ctx.config
        check_params(body, CREATE_PARAMS)
        endpoint = body.get("endpoint")
        if endpoint not in ENDPOINTS:
            raise bad_request(f"'endpoint' must be one of {sorted(ENDPOINTS)}", param="endpoint",
                              code="unsupported_endpoint")
        if body.get("completion_window") != "24h":
            raise bad_request("'completion_window' must be '24h'", param="completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items())):
            raise bad_request("'metadata' must be an object of at most 16 string values", param="metadata")
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise bad_request("'input_file_id' is required", param="input_file_id")
        record = await self.owned_file(ctx, file_id)
        if record["purpose"] != "batch" or record.get("batch_id") is not None:
            raise bad_request(f"The file '{file_id}' was not uploaded with purpose 'batch'", param="input_file_id")
        action = self.action_of(ctx, metadata)
        deployment = holder(config, record["model"], record["upstream"])
        if deployment is None:
            raise ApiError(404, f"The file '{file_id}' is held at an upstream no configured model uses any more.",
                           param="input_file_id", code="file_not_found")
        with tempfile.TemporaryDirectory(prefix="gw-batch-") as folder:
            rewritten = Path(folder) / "input.jsonl"
            budgets = await self.budgets_over(ctx)
            model, custom_ids, target, usd_ceiling = await self._check_lines(
                ctx, deployment, record, ENDPOINTS[endpoint], endpoint, rewritten,
                count_usd=any(b.unit == "usd" for b in budgets))
            if batch_prices(config, model, target.litellm_params.model, 0) is None:
                raise bad_request(f"The model '{model}' has no known batch price; the gateway does not run a batch it "
                                  f"cannot bill", param="input_file_id", code="unpriced_batch")
            per_line = config.energy.cost(action, model) if self.meters_energy() else 0
            now = time.time()
            gw_id = RESERVATION_PREFIX + secrets.token_hex(12)
            row = {"id": gw_id, "batch_id": None, "user_id": ctx.identity.user_id,
                   "workspace_id": ctx.identity.workspace_id, "model": model, "upstream": account_of(target),
                   "endpoint": endpoint, "input_file_id": file_id, "action": action, "energy_per_line": per_line,
                   "status": "creating", "payload": None, "next_poll_at": now + CREATE_GRACE, "created_at": now}
            await store.insert_batch(row, custom_ids)
            reserved = await self.reserve(ctx, gw_id, per_line * len(custom_ids), usd_ceiling, budgets)
            uploaded: dict[str, Any] = {}
            try:
                uploaded = await self.upstream.upload(target, rewritten, "batch_input.jsonl", "batch")
                upstream_body = {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"}
                provider_metadata = {k: v for k, v in (metadata or {}).items() if k not in GATEWAY_FIELDS}
                if provider_metadata:
                    upstream_body["metadata"] = provider_metadata
                payload = await self.upstream.call(target, "POST", "/batches", upstream_body)
                if not isinstance(payload.get("id"), str):
                    raise UpstreamError("bad_response", "the upstream's batch had no id")
            except UpstreamError as err:
                await self.abandon(gw_id, reserved, "batch_not_created")
                if isinstance(uploaded.get("id"), str):  # the copy of a batch that was not created
                    with contextlib.suppress(UpstreamError):
                        await self.upstream.call(target, "DELETE", f"/files/{uploaded['id']}")
                raise upstream_to_api_error(err, 1) from None
            except BaseException:
                await self.abandon(gw_id, reserved, "batch_not_created")
                raise
        fields = {"batch_id": payload["id"], "status": str(payload.get("status") or "validating"),
                  "payload": orjson.dumps(payload).decode(), "next_poll_at": time.time() + config.batches.poll_interval}
        await store.update_batch(gw_id, fields)
        ctx.response_headers["X-Energy-Cost"] = str(per_line * len(custom_ids))
        log.info("batch_created", request_id=ctx.request_id, batch=gw_id, batch_id=payload["id"], model=model,
                 lines=len(custom_ids), energy=per_line * len(custom_ids), user_id=ctx.identity.user_id)
        return public_batch({**row, **fields})

    def meters_energy(self) -> bool:
        return any(plugin.name == "energy" for plugin in self.gw.chain.plugins)

    def action_of(self, ctx: Any, metadata: dict[str, Any] | None) -> str:
        energy = ctx.config.energy
        action = (metadata or {}).get("action") or ctx.headers.get("X-Action") or energy.default_action
        if action not in energy.actions:
            if energy.unknown_action == "default":
                return energy.default_action
            raise bad_request(f"Unknown action '{str(action)[:64]}'. Known actions: {', '.join(sorted(energy.actions))}.",
                              param="metadata.action", code="unknown_action")
        return action

    async def budgets_over(self, ctx: Any) -> list[Any]:
        """The budgets over the caller's batch (its workspace's, user's, key's); none
        without the energy plugin (which holds them)."""
        if not self.meters_energy():
            return []
        found = await self.gw.store.list_budgets(ctx.identity.workspace_id)
        return budget_rules.applying(found, ctx.identity) if found else []

    async def reserve(self, ctx: Any, gw_id: str, amount: int, usd_nano: int = 0,
                      budgets: list[Any] | None = None) -> bool:
        """The batch's energy reserved, with a hold on every budget over the caller (its
        workspace's, user's, key's: the batch's energy, or `usd_nano`, its lines' USD
        ceiling), as a single request's (gateway/budgets.py); a batch never downgrades, so
        any enforced budget it does not fit refuses it."""
        if not self.meters_energy():
            return False
        store = self.gw.store
        tier = ctx.config.tiers.get(ctx.identity.tier)
        refill = (tier.refill.amount, tier.refill.period) if tier is not None and tier.refill else None
        try:
            if budgets is None:
                budgets = await self.budgets_over(ctx)
            holds = budget_rules.holds(budgets, time.time(), amount, usd_nano) if budgets else ()
            reservation = await store.reserve_energy(ctx.identity.user_id, amount, gw_id, refill=refill,
                                                     budgets=holds)
        except BaseException:
            await store.update_batch(gw_id, {"status": "refused", "settled_at": time.time()})
            raise
        if not reservation.ok:
            await store.update_batch(gw_id, {"status": "refused", "settled_at": time.time()})
            if reservation.budget_refused is not None:
                budget = next(b for b in budgets if b.id == reservation.budget_refused)
                raise Reject(429, f"Budget exceeded: the {budget.scope} budget of "
                                  f"{budget_rules.display(budget.unit, budget.amount)} {budget.unit} cannot hold this "
                                  f"batch.", type="insufficient_quota", code="budget_exceeded",
                             headers={"x-should-retry": "false"})
            ctx.response_headers["X-Energy-Remaining"] = str(reservation.balance)
            raise Reject(429, f"Not enough energy for this batch: it needs {amount}, you have {reservation.balance}.",
                         type="insufficient_quota", code="insufficient_energy", headers={"x-should-retry": "false"})
        ctx.response_headers["X-Energy-Remaining"] = str(reservation.balance)
        if holds and reservation.budget_spent is not None:
            self.alert_crossings(budgets, holds, reservation.budget_spent, gw_id)
        return True

    def alert_crossings(self, budgets: list[Any], holds: tuple, spent: Any, request_id: str) -> None:
        """The `budget.threshold_crossed` alerts a batch's hold crossed, as a single
        request's (plugins/energy.py; the same event key, so sent once)."""
        energy = next((p for p in self.gw.chain.plugins if p.name == "energy"), None)
        alerts = getattr(getattr(energy, "services", None), "alerts", None)
        if alerts is None:
            return
        for budget, hold, after in zip(budgets, holds, spent):
            for percent in budget_rules.crossed(budget, after - hold.amount, after):
                alerts.emit("budget.threshold_crossed", {
                    "budget": budget.id, "scope": budget.scope, "scope_id": budget.scope_id, "unit": budget.unit,
                    "amount": budget_rules.display(budget.unit, budget.amount), "period": budget.period,
                    "period_start": hold.period_start, "timezone": budget.timezone, "percent": percent,
                    "spent": budget_rules.display(budget.unit, after), "request_id": request_id},
                    workspace_id=budget.workspace_id, key=f"{budget.id}|{hold.period_start}|{percent}")

    async def abandon(self, gw_id: str, reserved: bool, reason: str) -> None:
        """A batch that never ran: its energy back, its row closed."""
        store = self.gw.store
        if reserved:
            await store.refund_energy(gw_id, reason=reason)
        await store.update_batch(gw_id, {"status": "failed", "settled_at": time.time()})

    async def _check_lines(self, ctx: Any, deployment: ModelEntry, record: dict[str, Any], kind: str,
                           endpoint: str, out: Path, count_usd: bool = False) -> tuple[str, list[str], ModelEntry, int]:
        """Every line checked as a single request would be, written to `out` with the
        upstream's model name; (the public model, the custom_ids, its deployment, the
        lines' USD ceiling in nano-dollars for the budgets)."""
        config = ctx.config
        validate = validate_chat if kind == "chat.completions" else validate_embeddings
        seen: set[str] = set()
        custom_ids: list[str] = []
        model: str | None = None
        target: ModelEntry | None = None
        number = usd_ceiling = 0
        with out.open("wb") as sink:
            try:
                async for raw in self.upstream.content(deployment, record["file_id"]):
                    number += 1
                    if not raw.strip():
                        number -= 1
                        continue
                    if len(custom_ids) >= config.batches.max_lines:
                        raise _line_error(number, f"a batch has at most {config.batches.max_lines} lines")
                    try:
                        line = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        raise _line_error(number, "not a JSON object") from None
                    if not isinstance(line, dict):
                        raise _line_error(number, "not a JSON object")
                    unknown = set(line) - LINE_KEYS
                    if unknown:
                        raise _line_error(number, f"unknown field '{sorted(unknown)[0][:64]}'", sorted(unknown)[0][:64])
                    custom_id = line.get("custom_id")
                    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
                        raise _line_error(number, f"'custom_id' must be a string of 1 to {MAX_CUSTOM_ID} characters",
                                          "custom_id")
                    if custom_id in seen:
                        raise _line_error(number, f"the custom_id '{custom_id[:64]}' is used twice", "custom_id")
                    if line.get("method") != "POST":
                        raise _line_error(number, "'method' must be 'POST'", "method")
                    if line.get("url") != endpoint:
                        raise _line_error(number, f"'url' must be the batch's endpoint '{endpoint}'", "url")
                    body = line.get("body")
                    if not isinstance(body, dict):
                        raise _line_error(number, "'body' must be an object", "body")
                    try:
                        name = require_model(body)
                        validate(body, config.extra_params(name))
                    except ApiError as err:
                        raise _line_error(number, err.message, f"body.{err.param}" if err.param else "body") from None
                    for refused in ("stream", "service_tier"):
                        if body.get(refused) is not None:
                            raise _line_error(number, f"'{refused}' is not accepted in a batch", f"body.{refused}")
                    body.pop("metadata", None)  # the gateway's fields (action, prospect) are the batch's
                    if model is None:
                        if not may_use(ctx, name):
                            raise _line_error(number, f"the model '{name[:64]}' does not exist or you do not have "
                                                      f"access to it", "body.model")
                        target = next((d for d in config.deployments(name) if holds_files(d)
                                       and account_of(d) == record["upstream"]), None)
                        if target is None:
                            raise _line_error(number, f"the model '{name[:64]}' is not served from the upstream "
                                                      f"account that holds this file", "body.model")
                        model = name
                    elif name != model:
                        raise _line_error(number, f"every line of a batch names the same model ('{model}'), this one "
                                                  f"'{name[:64]}'", "body.model")
                    try:
                        bound_line(config, kind, model, body)
                    except ApiError as err:
                        raise _line_error(number, err.message, f"body.{err.param}" if err.param else "body") from None
                    if count_usd:  # counting a prompt's tokens costs CPU: only for a USD budget
                        usd_ceiling += line_usd_ceiling(config, kind, model, body)
                    body["model"] = upstream_model(target)
                    seen.add(custom_id)
                    custom_ids.append(custom_id)
                    sink.write(orjson.dumps({"custom_id": custom_id, "method": "POST", "url": endpoint,
                                             "body": body}) + b"\n")
                    if not number % 500:
                        await asyncio.sleep(0)  # a long file must not hold the loop
            except UpstreamError as err:
                raise upstream_to_api_error(err, 1) from None
        if model is None or target is None:
            raise bad_request("The input file has no lines", param="input_file_id", code="empty_batch")
        return model, custom_ids, target, usd_ceiling

    # --- the poller and the settlement ------------------------------------------------

    async def poll_once(self) -> int:
        """Claim the batches due for a poll and advance each; returns how many."""
        store = self.gw.store
        config = self.gw.config.batches
        claimed = await store.claim_batches(self.owner, lease=config.lease, limit=20)
        for record in claimed:
            try:
                await self.advance(record)
            except asyncio.CancelledError:
                await store.update_batch(record["id"], {"lease_owner": None, "lease_until": None}, owner=self.owner)
                raise
            except Exception:
                log.exception("batch_advance_failed", batch=record["id"])
                await store.update_batch(record["id"], {"lease_owner": None, "lease_until": None,
                                                        "next_poll_at": time.time() + config.poll_interval},
                                         owner=self.owner)
        return len(claimed)

    async def advance(self, record: dict[str, Any]) -> None:
        """One poll of a claimed batch: its status recorded, settled when it ended."""
        store = self.gw.store
        config = self.gw.config
        now = time.time()
        if record["batch_id"] is None:  # still creating after CREATE_GRACE: the process creating it died
            await store.refund_energy(record["id"], reason="batch_not_created")  # none: nothing changes
            await store.update_batch(record["id"], {"status": "failed", "settled_at": now, "lease_owner": None,
                                                    "lease_until": None}, owner=self.owner)
            log.warning("batch_creation_abandoned", batch=record["id"])
            return
        deployment = holder(config, record["model"], record["upstream"], record["endpoint"])
        if deployment is None:
            raise RuntimeError(f"no configured deployment reaches {record['upstream']}")
        if record["endpoint"] == MESSAGES:
            payload = await self.messages.call(deployment, "GET", f"/{record['batch_id']}")
            status = str(payload.get("processing_status") or "")
            ended = status == "ended"
        else:
            payload = await self.upstream.call(deployment, "GET", f"/batches/{record['batch_id']}")
            status = str(payload.get("status") or "")
            ended = status in TERMINAL
        fields: dict[str, Any] = {"status": status, "payload": orjson.dumps(payload).decode()}
        if ended:
            await self.settle(record, payload, deployment)
            fields["settled_at"] = time.time()
            copy = payload.get("input_file_id")  # the rewritten input, the gateway's own: not kept
            if record["endpoint"] != MESSAGES and isinstance(copy, str) and copy != record["input_file_id"]:
                with contextlib.suppress(UpstreamError):
                    await self.upstream.call(deployment, "DELETE", f"/files/{copy}")
        else:
            fields["next_poll_at"] = time.time() + config.batches.poll_interval
        fields.update(lease_owner=None, lease_until=None)
        await store.update_batch(record["id"], fields, owner=self.owner)

    async def settle(self, record: dict[str, Any], payload: dict[str, Any], deployment: ModelEntry) -> None:
        """One usage row per input line at the batch prices, the energy settled at the lines
        that succeeded (the rest returned). Idempotent: see the module's invariants."""
        store = self.gw.store
        # A settlement outlasting the lease would be run again by another process: harmless
        # (see the invariants), but the lease is renewed first so it does not happen.
        await store.update_batch(record["id"], {"lease_until": time.time() + self.gw.config.batches.lease},
                                 owner=self.owner)
        full = await store.batch_record(id=record["id"], with_lines=True)
        outcomes: dict[str, tuple[Any, Any, str | None]] = {}
        if record["endpoint"] == MESSAGES:
            async for raw in self.messages.results(deployment, record["batch_id"]):
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    outcomes.setdefault(line["custom_id"], message_outcome(line))
        for key in ("output_file_id", "error_file_id"):
            file_id = payload.get(key)
            if not isinstance(file_id, str) or not file_id:
                continue
            await store.remember_file({"file_id": file_id, "user_id": record["user_id"],
                                       "workspace_id": record["workspace_id"], "purpose": "batch_output",
                                       "filename": f"batch_{record['batch_id']}_{key[:-8]}.jsonl", "bytes": None,
                                       "upstream": record["upstream"], "model": record["model"],
                                       "batch_id": record["id"], "created_at": time.time()})
            async for raw in self.upstream.content(deployment, file_id):
                try:
                    line = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(line, dict) and isinstance(line.get("custom_id"), str):
                    outcomes.setdefault(line["custom_id"], _outcome(line))  # its bill only, not its answer
        per_line = record["energy_per_line"]
        rows, succeeded, now, spent = [], 0, time.time(), USD_ZERO
        status = str(payload.get("status") or payload.get("processing_status"))
        for custom_id in full["lines"]:
            row, ok = self._usage_row(record, custom_id, outcomes.get(custom_id), status, deployment, now)
            succeeded += ok
            rows.append(row)
            spent = None if spent is None or row["cost_usd"] is None else spent + row["cost_usd"]
        for start in range(0, len(rows), 500):
            await store.insert_usage(rows[start:start + 500])
        # No reservation (no energy plugin): settle_energy finds none and changes nothing.
        # A USD budget's hold settles at what the lines cost (as held when one's price is unknown).
        await store.settle_energy(record["id"], per_line * succeeded,
                                  usd_final=None if spent is None else to_nano(spent))
        log.info("batch_settled", batch=record["id"], batch_id=record["batch_id"], status=status,
                 lines=len(rows), succeeded=succeeded, energy=per_line * succeeded)

    def _usage_row(self, record: dict[str, Any], custom_id: str, outcome: tuple[Any, Any, str | None] | None,
                   status: str, deployment: ModelEntry, now: float) -> tuple[dict[str, Any], bool]:
        code, usage, error_type = outcome if outcome is not None else (None, None, None)
        ok = code == 200
        cost, prices = USD_ZERO, None
        if usage is not None:
            found = batch_prices(self.gw.config, record["model"], deployment.litellm_params.model, usage.prompt_tokens)
            if found is not None:
                prices = found
                cost = found.cost(usage)
            else:
                cost = None
        elif ok:
            cost = None  # an answer without usage: its price is unknown, not 0
        if ok:
            error_type = None
        elif outcome is None:
            error_type = f"batch_{status}" if status in ("expired", "cancelled") else "not_run"
        return {
            "request_id": usage_key(record["id"], custom_id), "user_id": record["user_id"],
            "workspace_id": record["workspace_id"], "prospect_id": None, "action": record["action"],
            "provider": "anthropic" if record["endpoint"] == MESSAGES else "openai", "model": record["model"], "requested_model": record["model"],
            "downgraded_from": None,
            "tokens_prompt": usage.prompt_tokens if usage else 0,
            "tokens_completion": usage.completion_tokens if usage else 0,
            "tokens_total": usage.total_tokens if usage else 0,
            "cost_usd": cost, "status": code if isinstance(code, int) else None, "error_type": error_type,
            "latency_ms": None, "ttfb_ms": None, "streamed": False,
            "energy_cost": record["energy_per_line"] if ok else 0, "cache_hit": False, "retries": 0,
            "usage_estimated": False,
            "tokens_cached": usage.cached_tokens if usage else 0,
            "tokens_cache_write": usage.cache_write_tokens if usage else 0,
            "tokens_reasoning": usage.reasoning_tokens if usage else 0,
            "tokens_audio_in": usage.audio_in_tokens if usage else 0,
            "tokens_audio_out": usage.audio_out_tokens if usage else 0,
            "unit_prices": prices.per_million_json if prices is not None else None,
            "experiment": None, "variant": None, "saved_usd": None,
            "unbilled_calls": 0, "unbilled_tokens": 0, "unbilled_cost_usd": None, "created_at": now,
        }, ok


def _outcome(line: dict[str, Any]) -> tuple[Any, Any, str | None]:
    """What settles one line of an output or error file: (HTTP status, Usage, error code)."""
    response = line.get("response") if isinstance(line.get("response"), dict) else {}
    code = response.get("status_code")
    body = response.get("body") if isinstance(response.get("body"), dict) else {}
    if code == 200:
        return code, usage_from_payload(body), None
    error = line.get("error") or body.get("error")
    kind = (error.get("code") or error.get("type")) if isinstance(error, dict) else None
    return code, None, str(kind or "failed")[:64]


async def _public_lines(lines: AsyncIterator[bytes], model: str) -> AsyncIterator[bytes]:
    """A batch's output or error lines with the public model name in each answer."""
    async for raw in lines:
        try:
            line = orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield raw
            continue
        body = ((line.get("response") or {}).get("body") if isinstance(line, dict) else None)
        if isinstance(body, dict) and "model" in body:
            body["model"] = model
        yield orjson.dumps(line) + b"\n"


BATCHES = web.AppKey("batches", BatchService)


def batches_cleanup(service: BatchService) -> Any:
    """The cleanup_ctx of files and batches: the poller runs while the app does (after the
    store opened, before it closes)."""

    async def ctx(app: web.Application) -> AsyncIterator[None]:
        service.start()
        yield
        await service.stop()

    return ctx
