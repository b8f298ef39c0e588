"""The plugin contract: RequestContext, Plugin, Reject.

This is the one file a plugin author must read. Everything the gateway does around an
upstream call (who is calling, may they, which model, what it cost, what to log) is a
plugin with these hooks, run in the order `config.yaml` lists them:

    plugins:
      - request_log
      - auth
      - tier_policy
      - energy

Lifecycle of one request (the *chain*)::

    on_request(ctx)          in list order; may rewrite ctx.body / ctx.candidates,
                             may raise Reject, may short-circuit with ctx.short_circuit
        |
    dispatch                 the core picks ctx.model (= ctx.candidates[0] unless a
                             plugin narrowed it), retries, falls back
        |
    on_stream_chunk(ctx, c)  streaming only, per chunk, before the client sees it
        |
    on_response(ctx)   XOR   on_error(ctx)      in list order

Invariants the core guarantees (and tests):

* **Exactly one ending.** Every request whose `on_request` phase started receives either
  `on_response` or `on_error` on *every* plugin, exactly once, never both. This holds when
  a plugin rejects, when the upstream fails, when the client disconnects mid-stream and
  when the server shuts down. A plugin whose `on_request` never ran (a plugin earlier in
  the list rejected) still receives `on_error`; it must cope with finding nothing in its
  scratch space.
* **Endings run after the client has its answer** (the body is sent, or the stream is
  over) so they add no latency. Billing must not depend on the client staying connected:
  a client that disconnects after tokens were produced ends in `on_response` with
  `ctx.client_disconnected = True` and usage counted up to that point.
* **Gating fails closed.** Any exception other than `Reject` raised by `on_request`
  rejects the request with a 500 `internal_error`; it never lets the request through.
  The same holds for `ctx.gate` (a check that overlaps the upstream call): nothing of
  the answer reaches the client before it passed.
* **Observing fails open.** An exception in `on_stream_chunk`, `on_response` or
  `on_error` is logged and ignored; the client's response is unaffected.

A plugin never imports from `proxy.py` (it runs as `__main__`; a second copy would make
`except Reject` silently stop matching). Shared types live here and in `gateway/`.

To unit-test a plugin, call its hooks on a made-up request with `plugins/testing.py`
(`make_ctx`, `make_plugin`, `run_hooks`): it runs this contract without a gateway.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, AbstractSet, Any, Awaitable, Callable, ClassVar, Literal, Mapping

from pydantic import BaseModel, ConfigDict

from gateway.errors import ApiError

if TYPE_CHECKING:
    from gateway.alerts import Alerts
    from gateway.config import Config
    from gateway.directory import Directory
    from gateway.store import Store
    from gateway.usage import BilledPrices

# Every endpoint the gateway serves through the chain, as metrics and logs label it.
Endpoint = Literal[
    "chat.completions",       # POST /v1/chat/completions
    "embeddings",             # POST /v1/embeddings
    "messages",               # POST /v1/messages (Anthropic's Messages API)
    "responses",              # POST /v1/responses
    "models",                 # GET /v1/models[/{model}]
    "messages.count_tokens",  # POST /v1/messages/count_tokens
    "responses.stored",       # GET/DELETE /v1/responses/{id}[/input_items]
    "mcp.tools/call",         # an MCP tools/call on POST /mcp (gateway/inbound/mcp.py)
    "files",                  # /v1/files[/{id}[/content]] (gateway/inbound/files.py)
    "batches",                # /v1/batches[/{id}[/cancel]] (gateway/inbound/batches.py); billed per line when settled
]
# Requests that call a model: priced, billed in energy and USD, one usage row each.
# A tool call is billed too: `ctx.model` is the tool (`server__tool`), `ctx.provider` its server.
BILLED_ENDPOINTS: AbstractSet[str] = frozenset({"chat.completions", "embeddings", "messages", "responses",
                                               "mcp.tools/call"})
# Calls of an MCP tool rather than a model: priced by mcp_servers (energy and USD per call),
# without tokens, idempotency or the response cache.
TOOL_ENDPOINTS: AbstractSet[str] = frozenset({"mcp.tools/call"})
# Requests that carry a conversation (the chat chain: workspace prompt, experiments, output caps).
CONVERSATION_ENDPOINTS: AbstractSet[str] = frozenset({"chat.completions", "messages", "responses"})


class Reject(ApiError):
    """Raised by `on_request` to refuse a request with an OpenAI-shaped error.

    `Reject(429, "...", type="insufficient_quota", code="insufficient_energy",
    headers={"x-should-retry": "false"})`. Other plugins still receive `on_error`.
    """


@dataclass
class Identity:
    """Who is calling, set by the auth plugin from the API key."""

    user_id: str
    workspace_id: str
    tier: str
    key_id: str
    key_prefix: str  # safe to log: the first characters of the key, never the key
    role: Literal["user", "workspace_admin", "master"] = "user"
    # Per-key controls (docs/admin.md "Per-key controls"); None: none on this key.
    key_models: tuple[str, ...] | None = None  # narrows the tier's models (tier_policy)
    key_rpm: int | None = None  # the key's own requests and tokens per minute (rate_limit)
    key_tpm: int | None = None
    # A service key acts for its workspace's end users (docs/admin.md "End users by your
    # app's ids"): `service` says the key is one, `end_user` the app's own id of the end user
    # it acts for on this request (user_id, tier are then that end user's; key_* the key's).
    service: bool = False
    end_user: str | None = None


@dataclass
class Usage:
    """Tokens of one request, in OpenAI's convention whatever the provider: the token
    classes below are *parts of* `prompt_tokens` / `completion_tokens`, never added to
    them (gateway/usage.py turns Anthropic's exclusive `input_tokens` into this form).
    A class the provider did not report is 0, and its tokens are billed as plain text."""

    prompt_tokens: int = 0  # every input token, cached and audio ones included
    completion_tokens: int = 0  # every output token, reasoning and audio ones included
    total_tokens: int = 0
    # True when the provider reported nothing (or the stream was cut) and we counted the
    # tokens ourselves over what was actually sent.
    estimated: bool = False
    # Prompt tokens read from the provider's prompt cache (OpenAI
    # prompt_tokens_details.cached_tokens, Anthropic cache_read_input_tokens): cheaper.
    cached_tokens: int = 0
    # Prompt tokens written into the prompt cache (Anthropic cache_creation_input_tokens):
    # dearer than plain input.
    cache_write_tokens: int = 0
    # The part of cache_write_tokens written with a 1-hour lifetime (Anthropic
    # usage.cache_creation.ephemeral_1h_input_tokens): dearer again than a 5-minute write.
    cache_write_1h_tokens: int = 0
    # Hidden reasoning tokens of the completion (completion_tokens_details.reasoning_tokens).
    reasoning_tokens: int = 0
    audio_in_tokens: int = 0  # audio prompt tokens (prompt_tokens_details.audio_tokens)
    audio_out_tokens: int = 0  # audio completion tokens (completion_tokens_details.audio_tokens)
    # The service tier the provider says served the request ("priority", "flex",
    # "default", ...; the answer's `service_tier`), None when it did not say.
    service_tier: str | None = None
    # Hosted-tool uses the answer reports, as sorted (kind, count) pairs: web searches,
    # file searches, code-interpreter sessions, generated images (gateway/hosted_tools.py).
    hosted_tool_uses: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class UnbilledCall:
    """An upstream call whose answer the gateway discarded because `ctx.gate` refused the
    request (a reservation that lost: a 429) or moved it to another model (dispatched
    again). The provider bills it all the same; the usage row records it (energy 0)."""

    model: str  # the public model the call went to
    deployment: str | None  # the litellm model string that answered
    usage: Usage  # its tokens (estimated for a stream closed after its first chunk)
    cost_usd: "Decimal | None"  # their USD price (gateway/money.py); None = price unknown
    unit_prices: "BilledPrices | None" = None


@dataclass
class RequestContext:
    """One request's state as it travels the chain. Plugins read and write it."""

    request_id: str
    endpoint: Endpoint
    # Derived from `endpoint` when the context is made: whether the request calls a model and
    # is billed (BILLED_ENDPOINTS), and whether it carries a conversation.
    billed: bool = field(init=False)
    conversation: bool = field(init=False)
    config: "Config"  # the config snapshot this request started with (live reload safe)
    headers: Mapping[str, str]  # incoming HTTP headers, case-insensitive, read-only
    body: dict[str, Any]  # the OpenAI request body; request hooks may rewrite it
    requested_model: str = ""
    # Public model names that may serve this request, best first. The core starts it as
    # [requested_model]; tier_policy extends it down the downgrade ladder and filters it;
    # energy narrows it to the first affordable one. Dispatch uses candidates[0].
    candidates: list[str] = field(default_factory=list)
    # Models dispatch may fall back to when every deployment failed (None = any configured
    # fallback). tier_policy limits it to the tier's models; energy to models no dearer than
    # what was reserved, so a fallback never serves a forbidden model or costs more.
    fallback_allowed: AbstractSet[str] | None = None  # replace it, never change it in place
    model: str = ""  # the public model that served (or would have served) the request
    downgraded_from: str | None = None  # set by the core when request hooks changed the model
    downgrade_reason: str | None = None
    stream: bool = False
    client_wants_usage: bool = False  # client sent stream_options.include_usage
    # The API the client speaks: "openai", or "anthropic" on POST /v1/messages (its body is
    # translated to an OpenAI one before the plugins that need it run; ctx.body is OpenAI's).
    inbound: str = "openai"
    # On such an endpoint, the client's own body (its API's shape, allowlisted) and a copy
    # of the OpenAI body it was translated to before any plugin rewrote ctx.body: a
    # dispatcher that speaks the client's API (gateway/providers/anthropic.py) passes the
    # client's body through, applying only what the chain changed since.
    inbound_body: dict[str, Any] | None = None
    inbound_translated: dict[str, Any] | None = None
    identity: Identity | None = None
    action: str | None = None  # metadata.action / X-Action (energy price book)
    experiment: str | None = None  # the A/B experiment and variant serving it (plugins/experiments.py)
    variant: str | None = None
    prospect_id: str | None = None
    # Headers added to the client's response (success and error alike).
    response_headers: dict[str, str] = field(default_factory=dict)
    # A request hook may answer the request itself (e.g. an idempotent replay) by setting
    # this to the response body; dispatch is skipped and on_response hooks run.
    short_circuit: dict[str, Any] | None = None
    # An answer the response cache holds (plugins/cache.py), found for `cache_hit_model`
    # (candidates[0] then). Unlike short_circuit the later hooks still run (energy prices
    # it at the action's cache_hit_price); the core serves it only if candidates[0] is
    # still that model after them, else dispatches as usual.
    cache_hit: dict[str, Any] | None = None
    cache_hit_model: str | None = None
    # For GET /v1/models: the names the caller may see; request hooks may filter it.
    visible_models: list[str] = field(default_factory=list)
    # A request hook whose check is slow but almost surely passes (energy's reservation
    # commit) may let dispatch start before the check is done: it sets `gate` to a future
    # and returns. The future resolves to None (passed) or to the ApiError to fail with
    # (it never raises: the plugin turns its own failures into an error, failing closed).
    # The core sends nothing of the answer before the gate resolved; a failed gate
    # discards the upstream's answer. If the gate changed candidates[0] (a downgrade
    # decided late), the core dispatches again to the new model.
    gate: "asyncio.Future[ApiError | None] | None" = None
    # Endings of answered requests run in batches a little after the answer (they add no
    # latency). A plugin whose ending others wait for (idempotency: a retry must find the
    # stored answer) sets this to have it run at once instead.
    end_promptly: bool = False
    # A plugin that needs a chat stream's whole answer (idempotency: a retry replays it)
    # sets this to a gateway/chat_stream.py StreamAssembler before dispatch; the core adds
    # every chunk it relays to it (every choice, logprobs). None: nothing is assembled.
    stream_assembler: Any = None
    # Which deployments may serve the request, when it names objects held at one upstream
    # account (a file the caller owns: gateway/batches.py owned_files); None: any. The
    # router applies it to every model it tries, fallbacks included.
    deployment_filter: "Callable[[Any], bool] | None" = None
    # The request's spans while tracing is on (gateway/telemetry.py RequestTrace), else None:
    # the core's one check before any tracing work. Plugins may add events to it.
    trace: Any = None

    # --- outcome, filled by the core ------------------------------------------------
    status: int | None = None
    response: dict[str, Any] | None = None  # non-stream response body sent to the client
    usage: Usage | None = None
    provider: str | None = None  # e.g. "openai", "anthropic"
    deployment: str | None = None  # the litellm model string that answered
    attempts: int = 0  # upstream calls made, retries and fallbacks included
    fallbacks: int = 0  # times dispatch moved to another deployment or model
    streamed_text: list[str] = field(default_factory=list)  # content sent, for estimates
    streamed_reasoning: list[str] = field(default_factory=list)  # reasoning sent (thinking), for estimates
    stream_started: bool = False  # bytes of the stream reached the client
    finish_reason: str | None = None  # of a stream: None = it never finished (cut off)
    client_disconnected: bool = False
    error: ApiError | None = None
    energy_cost: int = 0  # energy reserved for this request (refunded if it ends in error)
    # Provider cost of the tokens, rounded once to 1e-9 USD (gateway/money.py), unbilled calls
    # included; None = price unknown.
    cost_usd: Decimal | None = None
    # An answer served without the provider (a response cache hit, an idempotent replay):
    # what it would have cost, its tokens at the model's prices (gateway/usage.py). None
    # otherwise, or when the model has no known price.
    saved_usd: Decimal | None = None
    # The USD price of each token class that cost_usd was computed with (usage rows keep
    # it, so a later price change does not rewrite history). None when nothing was priced.
    unit_prices: "BilledPrices | None" = None
    # Upstream calls whose answers a failed or moving `gate` discarded (the core records
    # them, gateway/lifecycle.py pass_gate). Their cost is part of `cost_usd`: the provider
    # bills them, the user is not charged energy for them (gateway/usage.py finalize_usage).
    unbilled_calls: list[UnbilledCall] = field(default_factory=list)
    started_at: float = field(default_factory=time.monotonic)
    first_byte_at: float | None = None
    ended_at: float | None = None

    # Set by the core while the request hooks run and the body is not read yet; see need_body().
    body_reader: Callable[[], Awaitable[None]] | None = field(default=None, repr=False)

    _scratch: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    async def need_body(self) -> None:
        """Read, parse and check the body now, if it is not yet: for a plugin that judges by
        headers (`needs_body = False`) and finds it needs the body after all (auth, for a
        service key: the end user is named in the body). Its ApiError rejects the request."""
        reader, self.body_reader = self.body_reader, None
        if reader is not None:
            await reader()

    def __post_init__(self) -> None:
        self.billed = self.endpoint in BILLED_ENDPOINTS
        self.conversation = self.endpoint in CONVERSATION_ENDPOINTS

    def scratch(self, plugin: str) -> dict[str, Any]:
        """A plugin's private, namespaced space on this request."""
        return self._scratch.setdefault(plugin, {})

    @property
    def latency_ms(self) -> float | None:
        return None if self.ended_at is None else (self.ended_at - self.started_at) * 1000

    @property
    def ttfb_ms(self) -> float | None:
        return None if self.first_byte_at is None else (self.first_byte_at - self.started_at) * 1000


class NoSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class Services:
    """What the core hands every plugin at construction."""

    store: "Store | None"  # opened at start-up: use it from hooks, not from __init__
    config: "Config"  # the config at load time; per-request code should use ctx.config
    directory: "Directory | None" = None  # cached key -> identity, workspace lookups
    plugins: list["Plugin"] = field(default_factory=list)  # the whole chain, in order
    # Pushed alerts (gateway/alerts.py): `alerts.emit(type, data)` when set; None when the
    # app is not running (unit tests of a hook) — check before emitting.
    alerts: "Alerts | None" = None


class Plugin:
    """Base class of every plugin. Override only the hooks you need: the core calls a
    hook only on plugins that override it (so an unused `on_stream_chunk` costs nothing).

    Each plugin module documents, in its docstring, the YAML that configures it.
    `Settings` is a pydantic model validated at load: a typo in a plugin's settings
    is a start-up error naming its path (`plugins[2].settings.levle: unknown key`).
    """

    name: ClassVar[str]
    Settings: ClassVar[type[BaseModel]] = NoSettings
    # False for a plugin whose on_request judges by headers alone (auth): the core reads
    # and parses the body only after such plugins ran, so an unknown caller's body is
    # never parsed. While they run, ctx.body is {} and ctx.requested_model is "".
    needs_body: ClassVar[bool] = True
    # Settings (durations, seconds) that must outlast any request, such as the age at which
    # a reservation counts as orphaned. Config load fails naming the setting when one is
    # shorter than the longest request the timeouts and retries allow (Config.longest_request).
    outlives_requests: ClassVar[tuple[str, ...]] = ()

    def __init__(self, settings: BaseModel, services: Services):
        self.settings = settings
        self.services = services

    async def startup(self) -> None:
        """Called once when the app starts, after the store is open."""

    async def shutdown(self) -> None:
        """Called once at shutdown, after in-flight requests finished (flush here)."""

    async def flush(self) -> None:
        """Write now whatever this plugin holds behind the answers (write-behind batches).
        `Chain.flush()` calls it on every plugin (tests do, to read their own writes)."""

    async def on_request(self, ctx: RequestContext) -> None:
        """Gate or rewrite the request. Raise `Reject` to refuse it (fails closed)."""

    def journal(self, ctx: RequestContext) -> Any:
        """The request is about to be answered (the body, or a stream's end): return, as
        JSON-able data, what this plugin's `on_response` will write to the store, or None.
        The core appends it to the local endings journal (gateway/journal.py) *before* the
        answer leaves, so a process killed before the write-behind ran loses nothing.
        It runs (in list order) also when no journal is kept, and the answer's headers have
        not left yet for a JSON answer: the last moment to settle what the answer says
        (energy: hosted tools used fewer times than reserved for). Synchronous and cheap:
        it runs on every answered request's path. Fails open."""
        return None

    async def replay(self, records: list[Any]) -> None:
        """At start-up, before `startup()`: the `journal()` records of answered requests
        whose process died before their endings were written. Write them; must be
        idempotent (a record may already be in the store)."""

    def pending_writes(self) -> int:
        """Items this plugin holds that are not in the store yet (write-behind batches)."""
        return 0

    async def on_stream_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        """Observe (or edit in place) one streamed chunk before it is sent. Fails open."""

    async def on_response(self, ctx: RequestContext) -> None:
        """The request succeeded; the client has its answer. Fails open."""

    async def on_error(self, ctx: RequestContext) -> None:
        """The request failed with `ctx.error` (rejected, upstream failure, ...). Fails open."""

    def routes(self) -> list[Any]:
        """Extra aiohttp routes this plugin serves (e.g. /metrics). Default none."""
        return []

    def overrides(self, hook: str) -> bool:
        return getattr(type(self), hook) is not getattr(Plugin, hook)


HOOKS = {
    "on_request": "gate or rewrite a request before dispatch; raising rejects it (fails closed)",
    "on_stream_chunk": "observe each streamed chunk before the client gets it (fails open)",
    "on_response": "the request succeeded and the client has its answer (fails open)",
    "on_error": "the request failed; ctx.error says why (fails open)",
    "journal": "what on_response will write, journaled locally before the answer leaves (fails open)",
    "replay": "at start-up, journaled records of a process that died before writing them",
    "startup": "once at start, after the store is open",
    "shutdown": "once at stop, after in-flight requests finished",
}
