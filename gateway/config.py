"""The config.yaml schema: validated once, at load, with the path of every error.

Ops edit `config.yaml`; this module turns it into typed, frozen objects or a
`ConfigError` whose lines read like ``models[1].litellm_params.model: Field required``.
Unknown keys are errors everywhere except inside `litellm_params` (litellm accepts
many provider-specific parameters we do not want to enumerate).

Secrets are written as ``os.environ/NAME`` (LiteLLM's convention) and resolved here;
a missing variable is a load error naming the path, never a silent empty key.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from gateway.client_body import CHAT_PARAMS, EMBEDDINGS_PARAMS, FORBIDDEN_FIELDS
from gateway.exposure import STANDARD_CHAIN
from gateway.exposure import config_errors as exposure_errors
from gateway.hosted_tools import usd_per_use_in_map
from gateway.price_map import prices_long_prompts

ENV_PREFIX = "os.environ/"

class ConfigError(Exception):
    """config.yaml is invalid. `errors` holds one "path: message" line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid config:\n  " + "\n  ".join(errors))


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> float:
    """'300s', '5m', '1d', 2.5 -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration like 30s, 5m, 1d")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"expected a duration like 30s, 5m, 1d, got {value!r}")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(4 * 1024 * 1024, gt=0, description="413 above this")
    shutdown_grace: float = Field(30.0, ge=0, description="seconds in-flight requests get on SIGTERM")
    workers: int = Field(1, ge=1, le=64, description="processes sharing the port")
    header_timeout: float = Field(10.0, gt=0, description="seconds a client has to send a request's headers (slowloris)")
    # A chain without auth (or without energy/accounting in front of a model that calls a
    # provider) is refused unless stated here; accepted on a loopback host only
    # (gateway/exposure.py, docs/operations.md "Secure by default").
    allow_unauthenticated: bool = False


class StoreConfig(_Strict):
    # sqlite:///relative/path.db, sqlite:////absolute/path.db or postgresql://...
    url: str = "sqlite:///data/gateway.db"
    # The local endings journal (gateway/journal.py); default: beside the SQLite file, or
    # ./data/journal/<hash of the URL> for PostgreSQL.
    journal_dir: str | None = None
    # Raw usage rows older than this are dropped (e.g. 90d; PostgreSQL: whole months once
    # past it); the hourly rollup the reports read keeps their numbers. Unset: keep all.
    usage_retention: float | None = None
    # PostgreSQL only (SQLite ignores them). The pool of each gateway process: behind
    # PgBouncer, size it against PgBouncer's max_client_conn, not the server's.
    pool_min_size: int = Field(1, ge=0)
    pool_max_size: int = Field(10, ge=1)
    # Seconds a reservation may wait for the database (a pooled connection and the call);
    # past it the request fails closed with a 503 (store_unavailable).
    timeout: float = Field(5.0, gt=0)
    connect_timeout: float = Field(10.0, gt=0, description="seconds to open one connection")
    # PgBouncer in transaction pooling mode in front: no prepared statements kept across
    # transactions (statement_cache_size 0), the schema of ?schema= set by PgBouncer.
    pgbouncer: bool = False
    # asyncpg's prepared statement cache per connection; default 100, or 0 with pgbouncer.
    statement_cache_size: int | None = Field(None, ge=0)
    # Background backfills (gateway/store/backfill.py, docs/upgrades.md): the share of the
    # wall clock a serving process gives them after a migration; 0: this process runs none.
    backfill_pace: float = Field(0.25, ge=0, le=1)

    def backend_options(self) -> dict[str, Any]:
        """Keyword arguments of gateway.store.open_store for these settings."""
        return {"pool_min_size": self.pool_min_size, "pool_max_size": self.pool_max_size,
                "timeout": self.timeout, "connect_timeout": self.connect_timeout,
                "pgbouncer": self.pgbouncer, "statement_cache_size": self.statement_cache_size}

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not (v.startswith("sqlite:///") or v.startswith(("postgresql://", "postgres://"))):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return v

    @field_validator("usage_retention", mode="before")
    @classmethod
    def _retention(cls, v: Any) -> float | None:
        if v is None:
            return None
        seconds = parse_duration(v)
        if seconds < 86400:
            raise ValueError("must be at least 1d")
        return seconds


class RetryConfig(_Strict):
    max_attempts: int = Field(3, ge=1, le=10, description="attempts per model, across its deployments")
    backoff_base: float = Field(0.25, ge=0, description="first backoff, seconds; doubles each time")
    backoff_max: float = Field(8.0, ge=0)
    retry_after_max: float = Field(30.0, ge=0, description="cap on an upstream's Retry-After")
    # Circuit breaker: a deployment failing this many times in a row is skipped for `cooldown`.
    breaker_failures: int = Field(5, ge=1)
    breaker_cooldown: float = Field(30.0, ge=0)


class LitellmParams(BaseModel):
    """Passed to litellm as keyword arguments. `model` is the provider/model string."""

    model_config = ConfigDict(extra="allow", frozen=True)
    model: str
    api_base: str | None = None
    api_key: str | None = None
    timeout: float | None = Field(None, gt=0)

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class Timeouts(_Strict):
    """Seconds. connect: TCP/TLS set-up; first_byte: until the answer (or the first stream
    chunk) starts; idle: between two stream chunks; total: the whole call."""

    connect: float = Field(10.0, gt=0)
    first_byte: float = Field(120.0, gt=0)
    idle: float = Field(60.0, gt=0)
    total: float = Field(600.0, gt=0)


class TokenPrices(_Strict):
    """USD per million tokens of each token class. A class without a price of its own is
    billed at the plain input (cached, cache write, audio input) or output (reasoning,
    audio output) price (docs/billing.md)."""

    input_per_million: float = Field(ge=0)
    output_per_million: float = Field(ge=0)
    cached_input_per_million: float | None = Field(None, ge=0)  # prompt-cache reads
    cache_write_per_million: float | None = Field(None, ge=0)  # prompt-cache writes (Anthropic)
    # 1-hour prompt-cache writes (Anthropic `"ttl": "1h"`); unset: cache_write_per_million
    cache_write_1h_per_million: float | None = Field(None, ge=0)
    reasoning_per_million: float | None = Field(None, ge=0)
    audio_input_per_million: float | None = Field(None, ge=0)
    audio_output_per_million: float | None = Field(None, ge=0)


class LongContextPrices(TokenPrices):
    """Prices of every token of a request whose prompt has more than `above_tokens` tokens
    (litellm's `*_above_<N>k_tokens`)."""

    above_tokens: int = Field(ge=1)


class ServiceTierPrices(TokenPrices):
    """Prices of a service tier (`service_tier: priority` / `flex`), with its own
    long-context steps (ascending; the highest one the prompt exceeds applies)."""

    long_context: tuple[LongContextPrices, ...] = ()

    @field_validator("long_context")
    @classmethod
    def _ascending(cls, steps: tuple[LongContextPrices, ...]) -> tuple[LongContextPrices, ...]:
        thresholds = [step.above_tokens for step in steps]
        if len(set(thresholds)) != len(thresholds):
            raise ValueError("two steps have the same above_tokens")
        return tuple(sorted(steps, key=lambda step: step.above_tokens))


# The service tiers a price can be given for (litellm's `*_priority` / `*_flex` keys).
PRICED_SERVICE_TIERS = ("priority", "flex")


class Pricing(ServiceTierPrices):
    """Overrides litellm's bundled price map for a model: the standard tier's token prices,
    its long-context steps, and the prices of other service tiers. A service tier with no
    price here is refused (docs/billing.md: Price dimensions)."""

    priority: ServiceTierPrices | None = None  # `service_tier: priority`
    flex: ServiceTierPrices | None = None  # `service_tier: flex`
    batches: ServiceTierPrices | None = None  # a line of a provider batch (gateway/batches.py)

    def tier(self, name: str | None) -> ServiceTierPrices | None:
        """The prices of service tier `name` (None: the standard tier), or None if not given."""
        return self if name is None else getattr(self, name, None) if name in PRICED_SERVICE_TIERS else None


class HostedTool(_Strict):
    """A hosted tool the operator allows on a model (gateway/hosted_tools.py)."""

    # USD per use; unset: litellm's map price (check-config refuses a tool with neither).
    usd_per_use: float | None = Field(None, ge=0)
    energy_per_use: int = Field(0, ge=0)  # added to the action's energy per use
    # Uses reserved for (energy) and allowed per request: the Responses API's
    # max_tool_calls and Anthropic's max_uses are capped to it.
    max_uses: int = Field(1, ge=1, le=100)


class ModelEntry(_Strict):
    """One deployment of a public model. Several entries with the same `name` are that
    model's deployments, tried in the order listed. Model-level keys (`fallbacks`,
    `downgrade_to`, `pricing`, `description`) may be given on any of its entries but must
    not disagree."""

    name: str = Field(min_length=1)
    litellm_params: LitellmParams
    # auto: a native path for openai/, azure/, gemini/ and anthropic/ models (native_path),
    # litellm otherwise.
    dispatch: Literal["auto", "native", "litellm"] = "auto"
    timeouts: Timeouts = Timeouts()
    fallbacks: list[str] | None = None
    downgrade_to: str | None = None
    pricing: Pricing | None = None
    # Hosted tools (web_search, file_search, code_interpreter, image_generation) this model
    # may use; any other is refused (gateway/hosted_tools.py).
    hosted_tools: dict[Literal["web_search", "file_search", "code_interpreter", "image_generation"],
                       HostedTool] | None = None
    description: str | None = None
    # Output token bounds: `max_tokens_default` is sent when the client names no limit (an
    # Anthropic call without one would get litellm's, up to 128,000: unbounded cost for a
    # flat energy price); `max_tokens_cap` lowers any larger limit a client asks for.
    max_tokens_default: int | None = Field(None, ge=1)
    max_tokens_cap: int | None = Field(None, ge=1)
    # Body fields beyond the OpenAI API's that clients may send to this deployment; they
    # reach the provider as body fields (litellm: extra_body), never as litellm arguments.
    allow_extra_params: list[str] = Field(default_factory=list)
    # An http:// egress proxy for this deployment (native path; "" = direct, ignoring
    # HTTPS_PROXY). Unset: the environment's HTTPS_PROXY/HTTP_PROXY/NO_PROXY apply.
    proxy: str | None = None
    _native_path: str | None = PrivateAttr("")  # "": not decided yet

    def native_path(self) -> str | None:
        """Which native dispatcher serves this deployment: "openai" (the OpenAI-wire
        pass-through), "azure" (the same, at Azure OpenAI's URLs) or "gemini" (the native
        Gemini translation), or None: litellm, or the Anthropic translation, which
        gateway/router.py picks itself. Under `dispatch: auto` an Azure or Gemini deployment
        that sets a litellm_param its native path would not apply (azure_ad_token, ...)
        stays on litellm, as an Anthropic one does; `dispatch: native` refuses it at load.
        Decided once, at load (the router asks on every call)."""
        private = self.__pydantic_private__  # a slot: self._native_path costs pydantic's __getattr__
        path = private.get("_native_path", "") if private else ""
        return path if path != "" else self._choose_native_path()

    def _choose_native_path(self) -> str | None:
        if self.dispatch == "litellm":
            return None
        model = self.litellm_params.model
        provider = model.split("/", 1)[0] if "/" in model else "openai"
        if provider in NATIVE_PROVIDER_PARAMS:
            if self.dispatch == "native" or not self._unforwarded(provider):
                return provider
            return None
        return "openai" if self.dispatch == "native" or provider == "openai" else None

    def uses_native(self) -> bool:
        """The native OpenAI-wire pass-through (`openai/...` and bare names under `auto`)."""
        return self.native_path() == "openai"

    def _unforwarded(self, provider: str) -> list[str]:
        """The settings an Azure/Gemini native path cannot apply (it needs its own api_key:
        without one litellm reads the environment or Azure AD)."""
        allowed = NATIVE_PROVIDER_PARAMS[provider]
        names = [name for name in (self.litellm_params.model_extra or {}) if name not in allowed
                 and not (provider == "azure" and name in NATIVE_BODY_DEFAULTS)]
        if provider == "azure" and not self.litellm_params.api_base:
            names.insert(0, "api_base")  # litellm would read AZURE_API_BASE
        return names if self.litellm_params.api_key else ["api_key", *names]

    @model_validator(mode="after")
    def _native_forwards_every_param(self) -> "ModelEntry":
        """A deployment on the native path must not carry a litellm_param it would drop."""
        path = self._native_path = self._choose_native_path()
        if path is None:
            if self.proxy is not None:
                raise ValueError("proxy: only the native path takes a per-deployment proxy "
                                 "(litellm follows HTTPS_PROXY/NO_PROXY)")
            return self
        if self.proxy:
            from urllib.parse import urlsplit
            if urlsplit(self.proxy).scheme != "http" or not urlsplit(self.proxy).hostname:
                raise ValueError(f"proxy: must be an http:// URL, got {self.proxy!r}")
        if path != "openai":
            unforwarded = self._unforwarded(path)
            if unforwarded:
                name = unforwarded[0]
                what = "is required" if name in ("api_key", "api_base") else "is not forwarded"
                raise ValueError(f"litellm_params.{name}: {what} on the native {path} path (it takes api_base, "
                                 f"api_key{', ' if NATIVE_PROVIDER_PARAMS[path] else ''}"
                                 f"{', '.join(sorted(NATIVE_PROVIDER_PARAMS[path]))}); set dispatch: litellm to use it")
        for name, value in (self.litellm_params.model_extra or {}).items():
            if name in NATIVE_BODY_DEFAULTS or name == "organization" or (name == "api_version" and path == "azure"):
                continue
            if name in ("extra_headers", "headers", "extra_body"):
                if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
                    raise ValueError(f"litellm_params.{name}: must be a mapping")
                if name != "extra_body":
                    for header, text in value.items():
                        if (not _HEADER_NAME.match(header) or header.lower() in _OWN_HEADERS
                                or not isinstance(text, str) or "\r" in text or "\n" in text):
                            raise ValueError(f"litellm_params.{name}.{header}: not a header the native path can send")
                continue
            raise ValueError(f"litellm_params.{name}: the native path does not forward it (it forwards "
                             f"organization, extra_headers, headers, extra_body and OpenAI body "
                             f"defaults such as max_tokens); set dispatch: litellm to use it")
        return self

    @field_validator("allow_extra_params")
    @classmethod
    def _extra_params_are_body_fields(cls, v: list[str]) -> list[str]:
        for name in v:
            lowered = name.lower()
            if (name in FORBIDDEN_FIELDS or any(w in lowered for w in _NOT_BODY_FIELDS)
                    or lowered.endswith(("_key", "_token")) or lowered in ("key", "token")):
                raise ValueError(f"{name!r} chooses an upstream, a credential or a callback; it cannot be a client field")
            if name in CHAT_PARAMS or name in EMBEDDINGS_PARAMS:
                raise ValueError(f"{name!r} is an OpenAI parameter: it is always allowed")
        return v


# litellm_params the native path (gateway/providers/openai.py) sends as body fields when the client's
# body lacks them; organization, extra_headers/headers (headers) and extra_body (body
# defaults) are forwarded too. Anything else on a native deployment is refused at load.
NATIVE_BODY_DEFAULTS = (CHAT_PARAMS | EMBEDDINGS_PARAMS) - {"model", "messages", "input", "stream", "metadata"}
# litellm_params the Azure and Gemini native paths apply beyond api_base, api_key and
# timeout (Azure also takes the OpenAI body defaults above). Gemini's translation takes
# nothing else: its other settings stay with litellm.
NATIVE_PROVIDER_PARAMS = {"azure": frozenset({"api_version", "extra_headers", "headers", "extra_body"}),
                          "gemini": frozenset()}
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
_OWN_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "user-agent", "accept-encoding",
                "proxy-authorization", "te", "upgrade", "keep-alive"}

# Words in a name that make it configuration, not a provider body field.
_NOT_BODY_FIELDS = ("api_", "secret", "password", "credential", "callback", "_url", "_base", "litellm", "mock_",
                    "header", "proxy", "logger", "logging")


# Anthropic's beta that opens the 1M-token window (Claude Sonnet 4 / 4.5), and that window.
CONTEXT_1M_BETA = "context-1m-"
CONTEXT_1M_TOKENS = 1_000_000


def _context_1m_header(params: LitellmParams) -> str | None:
    """Where a deployment sends Anthropic's `context-1m-*` beta header
    (`extra_headers.anthropic-beta`), or None."""
    for name in ("extra_headers", "headers"):
        headers = (params.model_extra or {}).get(name)
        if not isinstance(headers, dict):
            continue
        for header, value in headers.items():
            if str(header).lower() == "anthropic-beta" and CONTEXT_1M_BETA in str(value):
                return f"{name}.{header}"
    return None


class Refill(_Strict):
    amount: int = Field(ge=0)
    period: float = Field(description="e.g. 1d, 12h")

    @field_validator("period", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        seconds = parse_duration(v)
        if seconds <= 0:
            raise ValueError("must be positive")
        return seconds


class Limits(_Strict):
    """Requests and tokens per minute; None = unlimited."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)


class TierConfig(_Strict):
    models: list[str] = Field(default_factory=lambda: ["*"], description='"*" allows every model')
    # MCP tools (namespaced `server__tool`, shell-style patterns: "search__*"); "*" allows
    # every tool the mcp_servers expose. Unlike `models`, absent allows none: a tool is a
    # priced action with effects, and a newly configured server is open to no tier until one
    # lists it (fails closed, docs/mcp.md).
    mcp_tools: list[str] = Field(default_factory=list,
                                 description='MCP tools this tier may call ("*" = all; default none)')
    refill: Refill | None = None
    limits: Limits | None = None
    description: str | None = None

    def allows_tool(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.mcp_tools)

    def allows(self, model: str) -> bool:
        return "*" in self.models or model in self.models


class ActionPrice(_Strict):
    default: int = Field(ge=0, description="energy when the model has no entry")
    models: dict[str, int] = Field(default_factory=dict)
    # Energy for an answer served from the response cache (plugins/cache.py); None = the
    # same price as a fresh answer.
    cache_hit_price: int | None = Field(None, ge=0)

    @field_validator("models")
    @classmethod
    def _non_negative(cls, v: dict[str, int]) -> dict[str, int]:
        for model, cost in v.items():
            if cost < 0:
                raise ValueError(f"{model}: must not be negative")
        return v


class EnergyConfig(_Strict):
    default_action: str = "ai_message"
    actions: dict[str, ActionPrice] = Field(
        default_factory=lambda: {"ai_message": ActionPrice(default=1)}
    )
    unknown_action: Literal["reject", "default"] = "reject"
    idempotency_window: float = 86400.0

    @field_validator("idempotency_window", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @model_validator(mode="after")
    def _default_action_priced(self) -> "EnergyConfig":
        if self.default_action not in self.actions:
            raise ValueError(f"default_action {self.default_action!r} is not in actions")
        return self

    def cost(self, action: str, model: str) -> int:
        price = self.actions[action]
        return price.models.get(model, price.default)

    def cache_hit_cost(self, action: str, model: str) -> int:
        price = self.actions[action]
        return price.cache_hit_price if price.cache_hit_price is not None else self.cost(action, model)


class AuthConfig(_Strict):
    master_key: str | None = Field(None, description="os.environ/GATEWAY_MASTER_KEY")
    cache_ttl: float = 300.0
    default_tier: str = "free"

    @field_validator("cache_ttl", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class EndUserStart(_Strict):
    """What an end user a service key names for the first time starts with."""

    tier: str | None = Field(None, description="None: auth.default_tier")
    energy: int | None = Field(None, ge=0, le=10**15, description="None: the tier's refill amount (0 without one)")


class EndUsersConfig(EndUserStart):
    """End users by the app's own ids (docs/admin.md "End users by your app's ids"): the
    tier and starting energy of a user a service key provisions, per workspace (name or id)
    or for every workspace."""

    workspaces: dict[str, EndUserStart] = Field(default_factory=dict, description="per workspace name or id")

    def start(self, workspace_id: str, workspace_name: str | None, default_tier: str) -> EndUserStart:
        """The tier (resolved) and energy (None: the tier's refill amount) for a new end user."""
        own = self.workspaces.get(workspace_id) or (self.workspaces.get(workspace_name) if workspace_name else None)
        tier = (own.tier if own is not None else None) or self.tier or default_tier
        energy = own.energy if own is not None and own.energy is not None else self.energy
        return EndUserStart(tier=tier, energy=energy)


class RateLimitsConfig(_Strict):
    # Shared counters for several gateway processes; unset = counters in this process only.
    redis_url: str | None = None
    key_prefix: str = "gw:rl"
    on_backend_error: Literal["reject", "allow"] = "reject"  # gating fails closed by default
    users: dict[str, Limits] = Field(default_factory=dict, description="per user id: overrides the tier")
    workspaces: dict[str, Limits] = Field(default_factory=dict, description="per workspace name or id: a cap on the whole workspace")


class ReportsConfig(_Strict):
    weekly_cost_threshold_usd: float | None = Field(None, ge=0, description="warn when a week's cost exceeds it")


class AlertEndpoint(_Strict):
    """A webhook the alerts are posted to (gateway/alerts.py, docs/admin.md "Alerts")."""

    name: str = Field(description="what /admin/alerts and the logs show; the URL never is")
    url: str = Field(description="http:// or https://; a Slack incoming-webhook URL with format: slack")
    secret: str | None = Field(None, description="the HMAC-SHA256 key of X-Gateway-Signature (os.environ/NAME)")
    format: Literal["json", "slack"] = "json"
    events: list[str] = Field(default_factory=lambda: ["*"], min_length=1, description="event types, or *")
    timeout: float = Field(10.0, gt=0, le=300, description="seconds one delivery may take")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9_-]{0,39}$", v):
            raise ValueError("expected lowercase letters, digits, '-' or '_' (at most 40), e.g. ops")
        return v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("expected an http:// or https:// URL")
        return v

    @field_validator("events")
    @classmethod
    def _known_events(cls, v: list[str]) -> list[str]:
        from gateway.alerts import EVENT_TYPES

        unknown = [e for e in v if e != "*" and e not in EVENT_TYPES]
        if unknown:
            raise ValueError(f"unknown event type {unknown[0]!r} (one of *, {', '.join(EVENT_TYPES)})")
        return v

    @model_validator(mode="after")
    def _signed(self) -> "AlertEndpoint":
        if self.format == "json" and not self.secret:
            raise ValueError("secret: required with format json (the receiver checks the signature)")
        if self.secret is not None and len(self.secret) < 16:
            raise ValueError("secret: at least 16 characters")
        return self

    def takes(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


class ErrorRateAlert(_Strict):
    threshold: float = Field(gt=0, lt=1, description="share of 5xx answers, e.g. 0.25")
    window: float = Field(300.0, ge=1, le=86400, description="the sliding window (seconds, or 5m)")
    min_requests: int = Field(20, ge=1, description="no alert on fewer requests in the window")

    @field_validator("window", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class AlertsConfig(_Strict):
    """Pushed alerts (gateway/alerts.py, docs/admin.md "Alerts"). No endpoint: nothing is written."""

    endpoints: list[AlertEndpoint] = Field(default_factory=list)
    energy_low_below: int | None = Field(None, ge=1, description="energy.low when a balance falls below it")
    error_rate: ErrorRateAlert | None = None
    max_attempts: int = Field(20, ge=1, le=1000, description="deliveries tried before an event is failed")
    retry_base: float = Field(5.0, gt=0, description="seconds before the first retry, doubled each time")
    retry_max: float = Field(3600.0, gt=0, description="the longest wait between two attempts")
    retention: float = Field(30 * 86400.0, gt=0, description="delivered and failed outbox rows older than "
                             "this are deleted by the deliverer; pending rows never are")

    @field_validator("retry_base", "retry_max", "retention", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("endpoints")
    @classmethod
    def _unique(cls, v: list[AlertEndpoint]) -> list[AlertEndpoint]:
        names = [e.name for e in v]
        if len(set(names)) != len(names):
            raise ValueError("two endpoints with the same name")
        return v


class BatchesConfig(_Strict):
    """Files and batches (gateway/files.py, gateway/batches.py, docs/batches.md)."""

    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0, description="413 above this, enforced while uploading")
    max_user_bytes: int = Field(10 * 1024 ** 3, gt=0, description="the bytes of the files one user holds at once "
                                "(their uploads; batch outputs not counted): 413 above, nothing uploaded")
    files_model: str | None = Field(None, description="the model whose upstream an upload goes to without a "
                                                      "`model` form field")
    max_lines: int = Field(50_000, ge=1, description="lines of one batch input file")
    poll_interval: float = Field(30.0, gt=0, description="seconds between two polls of a running batch")
    lease: float = Field(300.0, gt=0, description="seconds one process holds a batch it polls or settles")

    @field_validator("poll_interval", "lease", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)


class ExperimentMatch(_Strict):
    """Which requests an experiment applies to; an empty list matches everything."""

    actions: list[str] = Field(default_factory=list)
    models: list[str] = Field(default_factory=list, description="requested public models")
    workspaces: list[str] = Field(default_factory=list, description="workspace names or ids")
    tiers: list[str] = Field(default_factory=list)


class Variant(_Strict):
    """One arm. `model` (a public model), `system_prompt` (replaces the request's system
    message, or is put first) and `params` (OpenAI chat parameters) change the request;
    a variant that sets none of them is a control."""

    name: str = Field(min_length=1, max_length=64)
    weight: float = Field(gt=0)
    model: str | None = None
    system_prompt: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params")
    @classmethod
    def _openai_params(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in v:
            if key not in CHAT_PARAMS or key in ("model", "messages", "stream", "metadata", "stream_options"):
                raise ValueError(f"{key!r} is not a chat parameter a variant may set")
        return v


class ExperimentConfig(_Strict):
    name: str = Field(min_length=1, max_length=64)
    match: ExperimentMatch = ExperimentMatch()
    variants: list[Variant] = Field(min_length=2)
    control: str | None = Field(None, description="the variant others are compared with (default: the first)")
    enabled: bool = True

    @model_validator(mode="after")
    def _names(self) -> "ExperimentConfig":
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"experiment {self.name!r}: variant names must be unique")
        if self.control is not None and self.control not in names:
            raise ValueError(f"experiment {self.name!r}: control {self.control!r} is not one of its variants")
        return self

    @property
    def control_variant(self) -> Variant:
        return next(v for v in self.variants if v.name == (self.control or self.variants[0].name))


class TelemetryConfig(_Strict):
    """OpenTelemetry traces over OTLP/HTTP (gateway/telemetry.py, docs/telemetry.md).
    Without `otlp_endpoint` nothing is traced and the request path pays nothing."""

    otlp_endpoint: str | None = Field(None, description="the collector's base URL, e.g. http://127.0.0.1:4318")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every export, e.g. a key via os.environ/")
    service_name: str = Field("ai-gateway", min_length=1)
    sample_ratio: float = Field(1.0, ge=0, le=1, description="share of traces kept")
    client_sampling: Literal["ignore", "honor"] = Field(
        "ignore", description="ignore: sample_ratio decides every request (a client's traceparent is still "
                              "continued); honor: a client's sampled flag decides (ParentBased)")
    capture_content: bool = Field(False, description="prompt and completion text in the spans")
    queue_size: int = Field(8192, ge=1, le=1_000_000, description="spans waiting for export; beyond, dropped and counted")
    batch_size: int = Field(512, ge=1, le=100_000)
    export_interval: float = Field(1.0, gt=0, description="seconds between two exports")
    export_timeout: float = Field(10.0, gt=0, description="seconds one export may take")

    @field_validator("export_interval", "export_timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("otlp_endpoint")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        error = "expected an http:// or https:// URL (OTLP/HTTP), e.g. http://127.0.0.1:4318"
        if not re.match(r"^https?://[^/\s]+", v) or re.search(r"[\s\x00-\x1f\x7f]", v):
            raise ValueError(error)
        parts = urlsplit(v)
        try:
            parts.port  # noqa: B018 — raises on a port that is not a number in 0..65535
        except ValueError:
            raise ValueError(error + " (its port is not a number in 0..65535)") from None
        if not parts.hostname:
            raise ValueError(error + " (no host)")
        if parts.username is not None or parts.password is not None:  # it would show in /admin/config
            raise ValueError("credentials belong in telemetry.headers (os.environ/ refs), not in the URL")
        return v

    @field_validator("headers")
    @classmethod
    def _http_headers(cls, v: dict[str, str]) -> dict[str, str]:
        """Header names are HTTP tokens and values hold no control character (a newline would
        fail every export, or split the header): said at load, naming the header, never its value."""
        for name, value in v.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name[:64]!r} is not a valid HTTP header name")
            if value is not None and re.search(r"[\x00-\x08\x0a-\x1f\x7f]", value):
                raise ValueError(f"the value of {name} holds a control character (a newline?)")
        return v


# --- MCP servers (gateway/providers/mcp.py, gateway/inbound/mcp.py, docs/mcp.md) -----------

TOOL_SEPARATOR = "__"  # a client sees `server__tool`; server names never contain it
_SERVER_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class McpToolConfig(_Strict):
    """One upstream tool's own settings, keyed by the name the upstream gives it."""

    energy: int | None = Field(None, ge=0, description="energy per call; default: the server's")
    cost_usd: float | None = Field(None, ge=0, description="USD per call; default: the server's")
    timeout: float | None = Field(None, gt=0, description="seconds; default: the server's")

    @field_validator("timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float | None:
        return None if v is None else parse_duration(v)


class McpServerConfig(_Strict):
    """An upstream MCP server: streamable HTTP (`url`) or a local process over stdio
    (`command`). Its credentials (`headers`, `env`, written as os.environ/NAME) are sent
    only to it, never shown to a client or written to a log."""

    name: str = Field(description="lowercase letters, digits, '-': the namespace of its tools")
    url: str | None = Field(None, description="streamable HTTP endpoint, e.g. https://mcp.example.com/mcp")
    headers: dict[str, str] = Field(default_factory=dict, description="sent with every HTTP request (credentials)")
    command: str | None = Field(None, description="stdio: the program to start")
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict, description="stdio: the process's environment (credentials)")
    timeout: float = Field(30.0, gt=0, description="seconds one tool call may take")
    connect_timeout: float = Field(10.0, gt=0, description="seconds to connect and list the tools")
    tools_ttl: float = Field(60.0, ge=0, description="seconds the upstream's tool list is cached")
    allow: list[str] = Field(default_factory=lambda: ["*"], description="upstream tool names (patterns) exposed")
    deny: list[str] = Field(default_factory=list, description="upstream tool names (patterns) hidden")
    rename: dict[str, str] = Field(default_factory=dict, description="upstream name -> the name clients see")
    energy: int = Field(1, ge=0, description="energy per call of any of its tools")
    cost_usd: float | None = Field(None, ge=0, description="USD per call (usage rows); None: unknown")
    tools: dict[str, McpToolConfig] = Field(default_factory=dict, description="per upstream tool name")

    @field_validator("timeout", "connect_timeout", "tools_ttl", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("name")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _SERVER_NAME.match(v) or TOOL_SEPARATOR in v:
            raise ValueError("expected lowercase letters, digits and '-' (at most 40), e.g. search")
        return v

    @field_validator("url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^/\s]+", v):
            raise ValueError("expected an http:// or https:// URL (streamable HTTP)")
        return v

    @field_validator("rename")
    @classmethod
    def _tool_names(cls, v: dict[str, str]) -> dict[str, str]:
        for upstream, exposed in v.items():
            if not _TOOL_NAME.match(exposed):
                raise ValueError(f"{upstream} -> {exposed!r}: letters, digits, '_', '.', '-' (at most 64)")
        if len(set(v.values())) != len(v):
            raise ValueError("two tools renamed to the same name")
        return v

    @model_validator(mode="after")
    def _one_transport(self) -> "McpServerConfig":
        if (self.url is None) == (self.command is None):
            raise ValueError("set exactly one of url (streamable HTTP) and command (stdio)")
        if self.url is None and self.headers:
            raise ValueError("headers are for url servers; a command server takes env")
        if self.command is None and (self.args or self.env):
            raise ValueError("args and env are for command servers")
        return self

    def exposes(self, upstream_name: str) -> bool:
        """The upstream tool is offered to clients (allow, then deny)."""
        return (any(fnmatch.fnmatchcase(upstream_name, p) for p in self.allow)
                and not any(fnmatch.fnmatchcase(upstream_name, p) for p in self.deny))

    def exposed_name(self, upstream_name: str) -> str:
        """`server__tool` as clients see it (after `rename`)."""
        return f"{self.name}{TOOL_SEPARATOR}{self.rename.get(upstream_name, upstream_name)}"

    def upstream_name(self, exposed: str) -> str:
        """The upstream's name of a tool clients call `exposed` (without the namespace)."""
        for upstream, renamed in self.rename.items():
            if renamed == exposed:
                return upstream
        return exposed

    def tool_settings(self, upstream_name: str) -> McpToolConfig:
        return self.tools.get(upstream_name) or McpToolConfig()

    def tool_energy(self, upstream_name: str) -> int:
        own = self.tool_settings(upstream_name).energy
        return self.energy if own is None else own

    def tool_cost_usd(self, upstream_name: str) -> float | None:
        own = self.tool_settings(upstream_name).cost_usd
        return self.cost_usd if own is None else own

    def tool_timeout(self, upstream_name: str) -> float:
        own = self.tool_settings(upstream_name).timeout
        return self.timeout if own is None else own


# The algorithms an ID token may be signed with: asymmetric only, checked against the
# provider's published keys (JWKS). `none` (unsigned) and the HMAC ones (keyed with the
# client secret, which any holder of it could forge) are refused at load.
OIDC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def _loopback_host(host: str | None) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def https_or_loopback(url: str) -> str:
    """An https:// URL, or http:// on this machine only (a provider for tests and local setups)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if not parts.hostname or parts.scheme not in ("https", "http") or parts.query or parts.fragment:
        raise ValueError("expected an https:// URL without a query, e.g. https://sso.example.com/realms/acme")
    if parts.scheme == "http" and not _loopback_host(parts.hostname):
        raise ValueError("must be https:// (http:// only on 127.0.0.1 or localhost)")
    return url


class OidcRole(_Strict):
    """What a value of the role claim grants: `master`, `viewer` (read-only; of one workspace
    or of all), or `{role: workspace_admin, workspace: NAME}`."""

    role: Literal["master", "workspace_admin", "viewer"]
    workspace: str | None = Field(None, description="a workspace name or id; required for workspace_admin")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        if isinstance(v, str):
            if v == "workspace_admin":
                raise ValueError("workspace_admin needs its workspace: {role: workspace_admin, workspace: NAME}")
            return {"role": v}
        return v

    @model_validator(mode="after")
    def _workspace(self) -> "OidcRole":
        if self.role == "workspace_admin" and not self.workspace:
            raise ValueError("workspace: required with role workspace_admin")
        if self.role == "master" and self.workspace is not None:
            raise ValueError("workspace: master is every workspace; use workspace_admin or viewer for one")
        return self


class OidcConfig(_Strict):
    """Dashboard sign-in with an OpenID Connect provider (gateway/admin/oidc.py, docs/sso.md)."""

    issuer: str = Field(description="the provider's issuer URL; its /.well-known/openid-configuration is read")
    client_id: str = Field(min_length=1)
    client_secret: str | None = Field(None, description="os.environ/NAME; unset: a public client (PKCE alone)")
    role_claim: str = Field("groups", min_length=1, description="an ID token claim (dotted path: realm_access.roles)")
    roles: dict[str, OidcRole] = Field(min_length=1, description="claim value -> role; the first listed that matches wins")
    name: str | None = Field(None, max_length=60, description="the button's 'Sign in with <name>'; unset: the issuer's host")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "email", "profile"])
    redirect_uri: str | None = Field(None, description="unset: <the gateway's origin>/dashboard/oidc/callback")
    session_ttl: float = Field(8 * 3600.0, ge=60, le=30 * 86400, description="how long a session lasts (8h)")
    max_pending_logins: int = Field(10_000, ge=1, le=1_000_000, description="unexpired sign-ins started and not "
                                    "finished, across processes; past it /dashboard/oidc/login answers 429")
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "PS256", "ES256", "EdDSA"], min_length=1)
    leeway: float = Field(60.0, ge=0, le=600, description="clock skew allowed on exp/iat (seconds)")
    timeout: float = Field(10.0, gt=0, le=120, description="seconds for one call to the provider")

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, v: str) -> str:
        # Kept as written: the ID token's `iss` must equal it exactly (Auth0's ends with "/").
        return https_or_loopback(v)

    @field_validator("redirect_uri")
    @classmethod
    def _redirect(cls, v: str | None) -> str | None:
        if v is not None:
            https_or_loopback(v)
            if not v.split("?")[0].endswith("/dashboard/oidc/callback"):
                raise ValueError("must end with /dashboard/oidc/callback (the gateway's callback route)")
        return v

    @field_validator("session_ttl", "leeway", "timeout", mode="before")
    @classmethod
    def _duration(cls, v: Any) -> float:
        return parse_duration(v)

    @field_validator("scopes")
    @classmethod
    def _openid(cls, v: list[str]) -> list[str]:
        if "openid" not in v:
            raise ValueError("must include openid")
        bad = [s for s in v if not re.match(r"^[\x21\x23-\x5b\x5d-\x7e]+$", s)]
        if bad:
            raise ValueError(f"not a scope token: {bad[0]!r}")
        return v

    @field_validator("algorithms")
    @classmethod
    def _asymmetric(cls, v: list[str]) -> list[str]:
        for alg in v:
            if alg not in OIDC_ALGORITHMS:
                raise ValueError(f"{alg!r} is not allowed (an ID token is checked against the provider's public "
                                 f"keys: one of {', '.join(OIDC_ALGORITHMS)})")
        return v

    @field_validator("roles", mode="before")
    @classmethod
    def _role_keys(cls, v: Any) -> Any:
        if isinstance(v, dict):
            for key in v:
                if not isinstance(key, str) or not key:
                    raise ValueError(f"a claim value must be a non-empty string, got {key!r}")
        return v

    @property
    def display_name(self) -> str:
        from urllib.parse import urlsplit

        return self.name or urlsplit(self.issuer).hostname or self.issuer


class DashboardConfig(_Strict):
    """The dashboard page (gateway/admin/dashboard/). `oidc`: sign-in with the company's
    identity provider besides the admin keys (docs/sso.md)."""

    oidc: OidcConfig | None = None


class PluginEntry(_Strict):
    """`- request_log` or `- {name: request_log, settings: {...}}`."""

    name: str
    enabled: bool = True
    settings: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v


# A request's time outside the router: the plugin chain and its store writes (a locked
# SQLite file is waited for up to 10 s), the answer's last bytes to the client.
REQUEST_MARGIN = 60.0


@dataclass(frozen=True)
class RequestBound:
    seconds: float
    why: str  # which request takes that long, and the config paths its time is made of


class Config(_Strict):
    # models[i] whose api_key names an unset environment variable -> that variable's name
    # (load_config_data): such a deployment is refused at dispatch, naming it.
    _missing_keys: dict[int, str] = PrivateAttr(default_factory=dict)

    server: ServerConfig = ServerConfig()
    store: StoreConfig = StoreConfig()
    auth: AuthConfig = AuthConfig()
    retries: RetryConfig = RetryConfig()
    models: list[ModelEntry] = Field(min_length=1)
    tiers: dict[str, TierConfig] = Field(default_factory=lambda: {"free": TierConfig()})
    energy: EnergyConfig = EnergyConfig()
    rate_limits: RateLimitsConfig = RateLimitsConfig()
    end_users: EndUsersConfig = EndUsersConfig()
    reports: ReportsConfig = ReportsConfig()
    alerts: AlertsConfig = AlertsConfig()
    experiments: list[ExperimentConfig] = Field(default_factory=list)
    telemetry: TelemetryConfig = TelemetryConfig()
    dashboard: DashboardConfig = DashboardConfig()
    mcp_servers: list[McpServerConfig] = Field(default_factory=list)
    batches: BatchesConfig = BatchesConfig()
    # No `plugins:` section (or an empty key): the standard chain, never an open one.
    plugins: list[PluginEntry] = Field(default_factory=lambda: [PluginEntry(name=n) for n in STANDARD_CHAIN])

    @field_validator("plugins", mode="before")
    @classmethod
    def _standard_when_unset(cls, v: Any) -> Any:
        return [{"name": n} for n in STANDARD_CHAIN] if v is None else v

    @model_validator(mode="after")
    def _cross_references(self) -> "Config":
        errors: list[str] = []
        by_name: dict[str, ModelEntry] = {}
        if self.batches.files_model is not None and not any(e.name == self.batches.files_model for e in self.models):
            errors.append(f"batches.files_model: unknown model {self.batches.files_model!r}")
        for i, entry in enumerate(self.models):
            first = by_name.setdefault(entry.name, entry)
            if first is entry:
                continue
            for key in ("fallbacks", "downgrade_to", "pricing", "description", "max_tokens_default",
                        "max_tokens_cap", "hosted_tools"):
                mine, theirs = getattr(entry, key), getattr(first, key)
                if mine is not None and theirs is not None and mine != theirs:
                    errors.append(f"models[{i}].{key}: disagrees with the first {entry.name!r} entry")
        names = set(by_name)
        seen_experiments: set[str] = set()
        for i, experiment in enumerate(self.experiments):
            if experiment.name in seen_experiments:
                errors.append(f"experiments[{i}].name: {experiment.name!r} is listed twice")
            seen_experiments.add(experiment.name)
            for j, variant in enumerate(experiment.variants):
                if variant.model is not None and variant.model not in names:
                    errors.append(f"experiments[{i}].variants[{j}].model: unknown model {variant.model!r}")
        for i, entry in enumerate(self.models):
            for j, fb in enumerate(entry.fallbacks or []):
                if fb not in names:
                    errors.append(f"models[{i}].fallbacks[{j}]: unknown model {fb!r}")
                elif fb == entry.name:
                    errors.append(f"models[{i}].fallbacks[{j}]: a model cannot fall back to itself")
            if entry.max_tokens_default and entry.max_tokens_cap and entry.max_tokens_default > entry.max_tokens_cap:
                errors.append(f"models[{i}].max_tokens_default: {entry.max_tokens_default} is above "
                              f"max_tokens_cap {entry.max_tokens_cap}")
            for kind, tool in (entry.hosted_tools or {}).items():
                model = entry.litellm_params.model
                if tool.usd_per_use is None and usd_per_use_in_map(kind, model) is None:
                    errors.append(f"models[{i}].hosted_tools.{kind}.usd_per_use: litellm's price map has no price "
                                  f"for a {kind} use on {model!r}; set usd_per_use (an allowed tool must be billed)")
            opened = _context_1m_header(entry.litellm_params)
            if opened is not None and not any(e.pricing is not None for e in self.models if e.name == entry.name):
                model = entry.litellm_params.model
                if not prices_long_prompts(model, CONTEXT_1M_TOKENS):
                    errors.append(f"models[{i}].litellm_params.{opened}: opens Anthropic's 1M window, but litellm's "
                                  f"price map has no long-context price for {model!r} (its prices stop at "
                                  f"max_input_tokens); set pricing with long_context so a longer prompt is billed")
            if entry.downgrade_to is not None and entry.downgrade_to not in names:
                errors.append(f"models[{i}].downgrade_to: unknown model {entry.downgrade_to!r}")
        for tier_name, tier in self.tiers.items():
            for j, model in enumerate(tier.models):
                if model != "*" and model not in names:
                    errors.append(f"tiers.{tier_name}.models[{j}]: unknown model {model!r}")
        seen_servers: set[str] = set()
        for i, server in enumerate(self.mcp_servers):
            if server.name in seen_servers:
                errors.append(f"mcp_servers[{i}].name: {server.name!r} is listed twice")
            seen_servers.add(server.name)
        if self.auth.default_tier not in self.tiers:
            errors.append(f"auth.default_tier: unknown tier {self.auth.default_tier!r}")
        for where, start in [("end_users", self.end_users),
                             *((f"end_users.workspaces.{name}", w) for name, w in self.end_users.workspaces.items())]:
            if start.tier is not None and start.tier not in self.tiers:
                errors.append(f"{where}.tier: unknown tier {start.tier!r}")
        for action, price in self.energy.actions.items():
            for model in price.models:
                if model not in names:
                    errors.append(f"energy.actions.{action}.models.{model}: unknown model")
        # A downgrade ladder must end: gpt-4o -> mini -> gpt-4o would loop forever.
        for name in names:
            seen, current = set(), name
            while current is not None:
                if current in seen:
                    errors.append(f"models: downgrade ladder from {name!r} loops back to {current!r}")
                    break
                seen.add(current)
                current = self.model_settings(current).downgrade_to if current in names else None
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _time_constants(self) -> "Config":
        """Durations that must outlast any request, checked against the longest one.

        An idempotency key that expires while its first request still runs lets a retry run
        (and be charged) a second time; a reservation swept as orphaned while its request
        still runs is refunded, then served for free. Plugins name such settings in
        `Plugin.outlives_requests` (the energy plugin's `stale_after`)."""
        from plugins import plugin_class  # plugins import this module: load them only now

        longest = self.longest_request
        errors: list[str] = []
        enabled = [(i, entry) for i, entry in enumerate(self.plugins) if entry.enabled]
        window = self.energy.idempotency_window
        if any(entry.name == "idempotency" for _, entry in enabled) and window < longest.seconds:
            errors.append(f"energy.idempotency_window: {window:g}s is shorter than the longest request "
                          f"({longest.why}): a retry could run and be charged again")
        for i, entry in enabled:
            try:
                cls = plugin_class(entry.name)
                settings = cls.Settings.model_validate(entry.settings)
            except (ValueError, ValidationError):
                continue  # reported by plugins.validate_plugin_settings
            for name in getattr(cls, "outlives_requests", ()):
                value = getattr(settings, name)
                if value is not None and value < longest.seconds:
                    errors.append(f"plugins[{i}].settings.{name}: {value:g}s is shorter than the longest "
                                  f"request ({longest.why})")
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _guarded_chain(self) -> "Config":
        errors = exposure_errors(self)
        if errors:
            raise ValueError("; ".join(errors))
        return self

    @functools.cached_property
    def longest_request(self) -> "RequestBound":
        """The longest the router can work on one request, by its rules (gateway/router.py):
        for the requested model, then each of its fallbacks, `retries.max_attempts` calls
        (each bounded by the deployment's timeouts) with a wait before every call to a
        deployment already tried (at most `retries.retry_after_max` or the backoff's
        ceiling, whichever is larger). An upper bound, reached by a model with one
        deployment (more deployments mean fewer waits):

        * a stream: every failed call ends by `timeouts.first_byte` (a stream is not retried
          after its first chunk), and the one that answers then streams for up to
          `timeouts.total` after its first chunk;
        * embeddings: each call ends by `timeouts.total`;
        * a chat completion without streaming: by min(first_byte, total), never longer
          than the stream, so it is not computed.
        The native pass-through's own limits can only end a call sooner."""
        worst = RequestBound(0.0, "no model")
        for model in self._index:
            chain = [model] + [fb for fb in dict.fromkeys(self.model_settings(model).fallbacks or []) if fb != model]
            for kind in ("stream", "embeddings"):
                bound = self._request_bound(kind, chain)
                if bound.seconds > worst.seconds:
                    worst = bound
        for i, server in enumerate(self.mcp_servers):  # a tool call: connect, then the call
            for upstream, path in [(None, "timeout"), *((t, f"tools.{t}.timeout") for t in server.tools)]:
                seconds = server.connect_timeout + (server.timeout if upstream is None else server.tool_timeout(upstream))
                if seconds > worst.seconds:
                    worst = RequestBound(seconds, f"{seconds:g}s: a tool call on mcp_servers[{i}]: "
                                                  f"connect_timeout + {path}")
        return worst

    def _request_bound(self, kind: str, chain: list[str]) -> "RequestBound":
        retries = self.retries
        attempts = retries.max_attempts
        waits = sum(max(retries.retry_after_max, min(retries.backoff_max, retries.backoff_base * 2 ** r))
                    for r in range(attempts - 1))
        field = "first_byte" if kind == "stream" else "total"
        positions = {id(entry): i for i, entry in enumerate(self.models)}

        def slowest(model: str, which: str) -> tuple[float, str]:
            entry = max(self.deployments(model), key=lambda e: getattr(e.timeouts, which))
            value = getattr(entry.timeouts, which)
            return value, f"models[{positions[id(entry)]}].timeouts.{which} {value:g}s"

        elapsed, parts, best, best_parts = 0.0, [], 0.0, []
        for model in chain:
            per_call, path = slowest(model, field)
            elapsed += attempts * per_call + waits
            wait_text = f" + {attempts - 1} waits {waits:g}s (retries)" if attempts > 1 else ""
            parts.append(f"{model!r} {attempts} × {path}{wait_text}")
            ending, ending_parts = elapsed, list(parts)
            if kind == "stream":
                streaming, total_path = slowest(model, "total")
                ending += streaming
                ending_parts.append(f"streaming {total_path}")
            if ending > best:
                best, best_parts = ending, ending_parts
        return RequestBound(best, f"{best:g}s: {'a stream' if kind == 'stream' else 'embeddings'} "
                                  f"on {chain[0]!r}: " + ", then ".join(best_parts))

    def outlasting_requests(self, floor: float) -> float:
        """A duration that outlasts every request: `floor`, or the longest request plus
        REQUEST_MARGIN when that is longer. The default of the settings checked above."""
        return max(floor, self.longest_request.seconds + REQUEST_MARGIN)

    # --- lookups used at request time: indexed once per config, O(1) per request ----------

    @functools.cached_property
    def _index(self) -> dict[str, tuple[list[ModelEntry], ModelEntry]]:
        """name -> (its deployments in order, its merged model-level settings)."""
        groups: dict[str, list[ModelEntry]] = {}
        for entry in self.models:
            groups.setdefault(entry.name, []).append(entry)
        index = {}
        for name, entries in groups.items():
            merged = entries[0]
            for key in ("fallbacks", "downgrade_to", "pricing", "description", "max_tokens_default",
                        "max_tokens_cap", "hosted_tools"):
                if getattr(merged, key) is None:
                    for e in entries[1:]:
                        if getattr(e, key) is not None:
                            merged = merged.model_copy(update={key: getattr(e, key)})
                            break
            index[name] = (entries, merged)
        return index

    @functools.cached_property
    def _memo(self) -> dict[tuple, frozenset[str] | tuple[str, ...]]:
        """Per-request answers that depend only on this config (bounded by its size)."""
        return {}

    def tier_models(self, tier: str) -> frozenset[str]:
        """The public models tier `tier` (a configured one) may use."""
        key = ("tier", tier)
        found = self._memo.get(key)
        if found is None:
            allows = self.tiers[tier].allows
            found = self._memo[key] = frozenset(m for m in self._index if allows(m))
        return found  # type: ignore[return-value]

    def tier_ladder(self, tier: str, model: str) -> tuple[str, ...]:
        """`model`'s downgrade ladder, only the steps tier `tier` may use."""
        key = ("ladder", tier, model)
        found = self._memo.get(key)
        if found is None:
            allows = self.tiers[tier].allows
            found = self._memo[key] = tuple(m for m in self.ladder(model) if allows(m))
        return found  # type: ignore[return-value]

    def models_within(self, action: str, cost: int) -> frozenset[str]:
        """The public models whose energy for `action` is at most `cost` (a configured
        action; `cost` is one of its prices, so the memo stays small)."""
        key = ("within", action, cost)
        found = self._memo.get(key)
        if found is None:
            if len(self._memo) > 10_000:  # a cost from outside the price book: stay bounded
                self._memo.clear()
            found = self._memo[key] = frozenset(m for m in self._index if self.energy.cost(action, m) <= cost)
        return found  # type: ignore[return-value]

    def extra_params(self, model: str) -> frozenset[str]:
        """Non-OpenAI body fields some deployment of `model` accepts (allow_extra_params)."""
        key = ("extra", model)
        found = self._memo.get(key)
        if found is None:
            found = frozenset(p for e in self.deployments(model) for p in e.allow_extra_params)
            if len(self._memo) < 10_000:
                self._memo[key] = found
        return found  # type: ignore[return-value]

    @functools.cached_property
    def _missing_by_deployment(self) -> dict[int, tuple[ModelEntry, str]]:
        # Built on the first request (load_config_data fills _missing_keys before): a plain
        # dict in __dict__, where a private attribute costs pydantic's __getattr__ per call.
        return {id(self.models[i]): (self.models[i], name) for i, name in self._missing_keys.items()}

    def missing_key(self, deployment: ModelEntry) -> str | None:
        """The unset environment variable this deployment's api_key names, if any."""
        found = self._missing_by_deployment.get(id(deployment))
        return found[1] if found is not None and found[0] is deployment else None

    def deployments(self, model: str) -> list[ModelEntry]:
        found = self._index.get(model)
        return found[0] if found is not None else []

    def model_names(self) -> list[str]:
        return list(self._index)

    @functools.cached_property
    def _mcp_index(self) -> dict[str, McpServerConfig]:
        return {server.name: server for server in self.mcp_servers}

    def mcp_server(self, name: str) -> McpServerConfig | None:
        return self._mcp_index.get(name)

    def mcp_tool(self, namespaced: str) -> tuple[McpServerConfig, str] | None:
        """`server__tool` (as clients see it) -> its server and the upstream's tool name, or
        None when no configured server exposes it. Whether the upstream has it is the
        catalog's to say (gateway/providers/mcp.py)."""
        server_name, sep, exposed = namespaced.partition(TOOL_SEPARATOR)
        server = self._mcp_index.get(server_name)
        if not sep or server is None or not exposed:
            return None
        upstream = server.upstream_name(exposed)
        if server.rename.get(upstream, upstream) != exposed:  # a renamed tool's old name
            return None
        if not server.exposes(upstream):
            return None
        return server, upstream

    def model_settings(self, model: str) -> ModelEntry:
        """The merged model-level keys of a public model (first non-null wins)."""
        return self._index[model][1]

    def ladder(self, model: str) -> list[str]:
        """`model` followed by its downgrade_to chain."""
        out = [model]
        nxt = self.model_settings(model).downgrade_to
        while nxt is not None and nxt not in out:
            out.append(nxt)
            nxt = self.model_settings(nxt).downgrade_to
        return out


def _resolve_env(node: Any, path: str, errors: list[str]) -> Any:
    if isinstance(node, dict):
        return {k: _resolve_env(v, f"{path}.{k}" if path else str(k), errors) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_env(v, f"{path}[{i}]", errors) for i, v in enumerate(node)]
    if isinstance(node, str) and node.startswith(ENV_PREFIX):
        name = node[len(ENV_PREFIX):]
        value = os.environ.get(name)
        if value is None:
            errors.append(f"{path}: environment variable {name} is not set")
            return None
        return value
    return node


def _error_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or str(part).startswith(("function-", "str")):
            continue
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def load_config_data(raw: Any) -> Config:
    """Validate an already-parsed YAML document."""
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping"])
    env_errors: list[str] = []
    resolved = _resolve_env(raw, "", env_errors)
    # A missing provider key is not fatal: that deployment is refused at dispatch with an
    # upstream_auth_error naming the variable (never a network call that trips the breaker),
    # and the gateway (and its demo model) still starts offline. An unset
    # GATEWAY_MASTER_KEY just means there is no master key.
    missing_keys: dict[int, str] = {}
    for line in env_errors:
        match = re.match(r"^models\[(\d+)\]\.litellm_params\.api_key: environment variable (\S+) is not set", line)
        if match:
            missing_keys[int(match.group(1))] = match.group(2)
    errors = [e for e in env_errors if not e.split(":")[0].endswith((".api_key", "auth.master_key"))]
    failed_paths = {e.split(":")[0] for e in errors}
    try:
        config = Config.model_validate(resolved)
    except ValidationError as exc:  # reported together with the environment's errors
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            path = _error_path(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            if not err["loc"]:  # cross-reference checks carry their own paths
                errors.extend(msg.split("; "))
            elif path not in failed_paths:
                errors.append(f"{path}: {msg}")
        raise ConfigError(errors) from None
    if errors:
        raise ConfigError(errors)
    config._missing_keys.update(missing_keys)
    return config


def load_config(path: str | Path) -> Config:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read ({exc.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # Not str(exc): PyYAML quotes the offending line, which may hold a literal key.
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([f"{path}: not valid YAML{where}: {getattr(exc, 'problem', None) or 'syntax error'}"]) from None
    return load_config_data(raw)


# --- live reload support -----------------------------------------------------------------

_SECRET_KEY_HINTS = ("api_key", "master_key", "secret", "token", "password", "credentials", "aws_", "azure_ad")


def _is_secret_key(key: str) -> bool:
    lowered = key.lower()
    return any(hint in lowered for hint in _SECRET_KEY_HINTS)


def _redact_url(url: str) -> str:
    # postgresql://user:password@host/db -> postgresql://user:***@host/db
    return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", url)


def redacted(node: Any, key: str = "") -> Any:
    """A copy of a config dump with every secret replaced by '***'."""
    if isinstance(node, dict):
        return {k: redacted(v, str(k)) for k, v in node.items()}
    if isinstance(node, list):
        return [redacted(v, key) for v in node]
    if node is not None and _is_secret_key(key):
        return "***"
    if isinstance(node, str) and "://" in node:
        return _redact_url(node)
    return node


def redacted_config(config: Config) -> dict[str, Any]:
    dump = redacted(config.model_dump(mode="json"))
    # An exporter's headers carry its credentials, whatever their names (Authorization,
    # x-honeycomb-team, DD-API-KEY, ...).
    dump["telemetry"]["headers"] = {name: "***" for name in dump["telemetry"]["headers"]}
    for endpoint in dump["alerts"]["endpoints"]:  # a webhook URL may be a credential (Slack's)
        endpoint["url"] = re.sub(r"^(https?://[^/]+).*$", r"\1/***", endpoint["url"])
    for server in dump["mcp_servers"]:  # an MCP server's credentials, whatever their names
        server["headers"] = {name: "***" for name in server["headers"]}
        server["env"] = {name: "***" for name in server["env"]}
    return dump


def config_changes(old: Config, new: Config) -> dict[str, Any]:
    """What a reload changed, by section, naming things but never showing secret values."""
    changes: dict[str, Any] = {}
    old_models, new_models = set(old.model_names()), set(new.model_names())
    changed_models = sorted(
        name for name in old_models & new_models
        if [e.model_dump() for e in old.deployments(name)] != [e.model_dump() for e in new.deployments(name)]
    )
    if old_models != new_models or changed_models:
        changes["models"] = {"added": sorted(new_models - old_models), "removed": sorted(old_models - new_models),
                             "changed": changed_models}
    if old.tiers != new.tiers:
        changes["tiers"] = sorted(t for t in set(old.tiers) | set(new.tiers) if old.tiers.get(t) != new.tiers.get(t))
    if old.energy != new.energy:
        changes["energy"] = sorted(
            a for a in set(old.energy.actions) | set(new.energy.actions)
            if old.energy.actions.get(a) != new.energy.actions.get(a)) or ["settings"]
    prices_old = {e.name: e.pricing for e in old.models}
    prices_new = {e.name: e.pricing for e in new.models}
    if prices_old != prices_new:
        changes["prices"] = sorted(n for n in set(prices_old) | set(prices_new) if prices_old.get(n) != prices_new.get(n))
    if old.experiments != new.experiments:
        before, after = {e.name: e for e in old.experiments}, {e.name: e for e in new.experiments}
        changes["experiments"] = {"started": sorted(set(after) - set(before)), "stopped": sorted(set(before) - set(after)),
                                  "changed": sorted(n for n in set(before) & set(after) if before[n] != after[n])}
    if old.plugins != new.plugins:
        changes["plugins"] = {"before": [p.name for p in old.plugins if p.enabled],
                              "after": [p.name for p in new.plugins if p.enabled]}
    if old.mcp_servers != new.mcp_servers:
        before, after = {s.name: s for s in old.mcp_servers}, {s.name: s for s in new.mcp_servers}
        changes["mcp_servers"] = {"added": sorted(set(after) - set(before)), "removed": sorted(set(before) - set(after)),
                                  "changed": sorted(n for n in set(before) & set(after) if before[n] != after[n])}
    for section in ("server", "store", "auth", "retries", "rate_limits", "reports", "alerts", "telemetry"):
        if getattr(old, section) != getattr(new, section):
            changes[section] = sorted(
                k for k in type(getattr(new, section)).model_fields
                if getattr(getattr(old, section), k) != getattr(getattr(new, section), k))
    return changes


# Settings that only take effect at start: a reload that changes them logs a warning.
RESTART_ONLY = {"server": ("host", "port", "workers"), "store": ("url",)}
