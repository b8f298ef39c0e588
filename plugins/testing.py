"""Helpers to unit-test a plugin by calling its hooks on a made-up request.

Shipped with the package, like `structlog.testing`: a plugin author (built-in or third
party) tests a hook in microseconds, without starting a gateway or an upstream, beside
the end-to-end tests that do.

    from plugins.testing import make_ctx, make_plugin, run_hooks

    async def test_the_free_tier_may_not_use_claude():
        tier_policy = make_plugin("tier_policy")
        ctx = await run_hooks([tier_policy], make_ctx(model="claude", identity={"tier": "free"}))
        assert ctx.error.code == "model_not_allowed"

What each helper gives:

* `make_config(**sections)`: a validated `Config` with five priced models
  (gpt-4o -> gpt-4o-mini -> demo, claude, embed), tiers `free` (gpt-4o-mini, demo,
  embed) and `pro` (all), and an energy price book; each keyword replaces one top-level section (`tiers={...}`, `energy={...}`).
* `make_ctx(**fields)`: a `RequestContext` as the core hands it to the first request
  hook: the body read, `requested_model`/`candidates` set, an identity as auth would set
  it (`identity=None` for an anonymous request). Any other context field is a keyword.
* `make_plugin(name_or_class, settings, store=..., config=...)`: the plugin built as
  `config.yaml` would build it (settings validated by its `Settings` model), with real
  services: a store you opened (SQLite in memory is enough:
  `async with open_store("sqlite:///:memory:") as store`; never a mock) and the key and
  workspace `Directory` over it. `running(*plugins)` calls `startup()` and `shutdown()`
  for plugins that keep state (rate_limit's counters, accounting's writer, energy's
  settlement batches).
* `make_user(store, tier=..., energy=...)`: a workspace, a user and a key in that store;
  returns the `Identity` auth would set and the key.
* `run_hooks(plugins, ctx)`: one request through the plugins as the gateway runs it
  (plugins/base.py): request hooks in list order; a `Reject` stops them and is the
  request's error; any other exception fails closed (500 `internal_error`; a store that
  does not answer: 503 `store_unavailable`); a short circuit stops them and answers.
  Then a made-up dispatch to `candidates[0]` (`answer=`: the upstream's body;
  `upstream_error=`: the upstream failed instead), then exactly one ending on every
  plugin: `on_response`, or `on_error` with `ctx.error`, both failing open (logged; use
  `structlog.testing.capture_logs()` to see one). Returns the context.
  `run_request()` and `run_ending()` are its two halves, to look at state in between.

This module imports nothing from `proxy.py` (plugins never do); the chain it runs follows
the contract in `plugins/base.py` without the server's batching, journal or retries.
"""

from __future__ import annotations

import contextlib
import copy
import time
import uuid
from typing import Any, AsyncIterator, Iterable, Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.chain import Chain
from gateway.config import Config, load_config_data
from gateway.directory import Directory
from gateway.errors import ApiError
from gateway.lifecycle import choose_model
from gateway.store import Store
from gateway.usage import openai_usage, usage_from_payload
from plugins import plugin_class
from plugins.base import Identity, Plugin, RequestContext, Services, Usage

__all__ = ["DEFAULT_CONFIG", "make_config", "make_ctx", "make_identity", "make_plugin", "make_services",
           "make_user", "run_ending", "run_hooks", "run_request", "running"]


MESSAGES = [{"role": "user", "content": "Hello"}]
REPLY = "Hello from the made-up upstream"

# The config behind make_config(): every model priced (USD per million tokens), so cost
# is exact; `demo/` deployments, so nothing here could reach a network.
DEFAULT_CONFIG: dict[str, Any] = {
    "models": [
        {"name": "gpt-4o", "litellm_params": {"model": "demo/gpt-4o"}, "downgrade_to": "gpt-4o-mini",
         "pricing": {"input_per_million": 2.5, "output_per_million": 10.0}},
        {"name": "gpt-4o-mini", "litellm_params": {"model": "demo/gpt-4o-mini"}, "downgrade_to": "demo",
         "pricing": {"input_per_million": 0.15, "output_per_million": 0.6}},
        {"name": "demo", "litellm_params": {"model": "demo/offline"},
         "pricing": {"input_per_million": 0.0, "output_per_million": 0.0}},
        {"name": "claude", "litellm_params": {"model": "demo/claude"},
         "pricing": {"input_per_million": 3.0, "output_per_million": 15.0}},
        {"name": "embed", "litellm_params": {"model": "demo/embed"},
         "pricing": {"input_per_million": 0.02, "output_per_million": 0.0}},
    ],
    "tiers": {
        "free": {"models": ["gpt-4o-mini", "demo", "embed"]},
        "pro": {"models": ["*"]},
    },
    "energy": {
        "default_action": "ai_message",
        "actions": {
            "ai_message": {"default": 1, "models": {"gpt-4o": 5, "gpt-4o-mini": 2, "demo": 1}},
            "email_draft": {"default": 3},
        },
    },
}

_DEFAULT = object()  # "not given" where None means something
_default_config: Config | None = None


def make_config(**sections: Any) -> Config:
    """`DEFAULT_CONFIG` with each keyword replacing one top-level section, validated as
    config.yaml is (a mistake raises ConfigError naming its path)."""
    global _default_config
    if not sections:
        if _default_config is None:  # frozen: one instance serves every test
            _default_config = load_config_data(copy.deepcopy(DEFAULT_CONFIG))
        return _default_config
    return load_config_data({**copy.deepcopy(DEFAULT_CONFIG), **sections})


def make_identity(**fields: Any) -> Identity:
    """The caller as the auth plugin sets it; any field may be overridden."""
    values: dict[str, Any] = {"user_id": "usr_test", "workspace_id": "ws_test", "tier": "free",
                              "key_id": "key_test", "key_prefix": "gw-test"}
    values.update(fields)
    return Identity(**values)


def _default_body(endpoint: str, model: str) -> dict[str, Any]:
    if endpoint == "chat.completions":
        return {"model": model, "messages": copy.deepcopy(MESSAGES)}
    if endpoint == "embeddings":
        return {"model": model, "input": "Hello"}
    return {}


def make_ctx(*, config: Config | None = None, endpoint: str = "chat.completions", model: str | None = None,
             body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None,
             identity: Identity | Mapping[str, Any] | None = _DEFAULT,  # type: ignore[assignment]
             usage: Usage | None = None, **fields: Any) -> RequestContext:
    """A request as the core hands it to the first request hook.

    `model` (default: the body's, else gpt-4o-mini; embed for embeddings) becomes
    `requested_model`, `model` and, if the config serves it, `candidates`; the body gets
    it too. `identity`: an `Identity`, a dict of `make_identity` overrides
    (`{"tier": "pro"}`), or None (anonymous). `usage`: what the made-up upstream reports
    in `run_hooks`. Any other `RequestContext` field is a keyword (`stream=True`,
    `action="email_draft"`, `response_headers={...}`)."""
    config = config or make_config()
    if endpoint == "models":
        model = ""
        request: dict[str, Any] = dict(body or {})
    else:
        model = model or (body or {}).get("model") or ("embed" if endpoint == "embeddings" else "gpt-4o-mini")
        request = {**_default_body(endpoint, model), **(body or {}), "model": model}
    if identity is _DEFAULT:
        identity = make_identity()
    elif isinstance(identity, Mapping):
        identity = make_identity(**identity)
    ctx = RequestContext(request_id=f"req_test_{uuid.uuid4().hex[:16]}", endpoint=endpoint,  # type: ignore[arg-type]
                         config=config, headers=CIMultiDictProxy(CIMultiDict(headers or {})), body=request,
                         requested_model=model, model=model, identity=identity, usage=usage)
    if endpoint == "models":
        ctx.visible_models = config.model_names()
    else:
        ctx.candidates = [model] if config.deployments(model) else []
        ctx.stream = bool(request.get("stream"))
        ctx.client_wants_usage = ctx.stream and bool((request.get("stream_options") or {}).get("include_usage"))
    for name, value in fields.items():
        if name.startswith("_") or not hasattr(ctx, name) or callable(getattr(ctx, name)) \
                or name in ("latency_ms", "ttfb_ms"):
            raise TypeError(f"make_ctx() got {name!r}, which is not a RequestContext field")
        setattr(ctx, name, value)
    return ctx


def make_services(*, config: Config | None = None, store: Store | None = None,
                  directory: Directory | None = _DEFAULT) -> Services:  # type: ignore[assignment]
    """What the core hands every plugin. With a store, the key and workspace Directory is
    one over it (as in the gateway), unless `directory` is given."""
    config = config or make_config()
    if directory is _DEFAULT:
        directory = Directory(store, config.auth.cache_ttl) if store is not None else None
    return Services(store=store, config=config, directory=directory)


def make_plugin(plugin: str | type[Plugin], settings: Mapping[str, Any] | None = None, *,
                config: Config | None = None, store: Store | None = None,
                services: Services | None = None) -> Plugin:
    """A plugin built as config.yaml builds it: `plugin` is a built-in name ("energy"), an
    import path ("pkg.mod:Class") or the class; `settings` are validated by its Settings
    model. Pass `services` (from `make_services`, or another plugin's) to build several
    plugins of one chain: each joins `services.plugins` in the order built."""
    if services is None:
        services = make_services(config=config, store=store)
    elif config is not None or store is not None:
        raise TypeError("make_plugin(): give either services, or config/store")
    cls = plugin if isinstance(plugin, type) else plugin_class(plugin)
    built = cls(cls.Settings.model_validate(dict(settings or {})), services)
    services.plugins.append(built)
    return built


@contextlib.asynccontextmanager
async def running(*plugins: Plugin) -> AsyncIterator[None]:
    """`startup()` each plugin in order, then `shutdown()` them in reverse order (which
    writes what they hold behind the answers)."""
    started: list[Plugin] = []
    try:
        for plugin in plugins:
            await plugin.startup()
            started.append(plugin)
        yield
    finally:
        for plugin in reversed(started):
            await plugin.shutdown()


async def make_user(store: Store, *, tier: str = "free", energy: int = 100, workspace: str | None = None,
                    role: str = "user", profile: dict[str, Any] | None = None,
                    ai_settings: dict[str, Any] | None = None) -> tuple[Identity, str]:
    """A user (in a new workspace, or the one named) with a key, in a real store. Returns
    the Identity auth sets for that key, and the key itself."""
    found = await store.get_workspace(workspace) if workspace is not None else None
    if found is None:
        found = await store.create_workspace(workspace or f"ws-{uuid.uuid4().hex[:10]}", profile, ai_settings)
    user = await store.create_user(found.id, tier, energy=energy)
    key, api_key = await store.create_key(user.id, role)
    identity = Identity(user_id=user.id, workspace_id=found.id, tier=tier, key_id=api_key.id,
                        key_prefix=api_key.prefix, role="workspace_admin" if role == "workspace_admin" else "user")
    return identity, key


def _chain(plugins: Iterable[Plugin]) -> Chain:
    return Chain(list(plugins))  # the gateway's own runner: its order and failure policy, no journal


async def run_request(plugins: Iterable[Plugin], ctx: RequestContext) -> ApiError | None:
    """The request hooks in list order, by the gateway's own chain (gateway/chain.py).
    Returns the error the request is refused with (a Reject, or a failure turned into one:
    fails closed), or None when every hook let it through or one answered it
    (`ctx.short_circuit`)."""
    try:
        await _chain(plugins).run_request(ctx)
    except ApiError as err:
        return err
    return None


async def run_ending(plugins: Iterable[Plugin], ctx: RequestContext, error: ApiError | None = None) -> None:
    """Exactly one ending on every plugin, by the gateway's own chain: `on_error` when
    `error` (or `ctx.error`) is set, else `on_response`. Usage is finalized (estimated,
    priced) first. An exception in an ending is logged and ignored (fails open)."""
    await _chain(plugins).end(ctx, error if error is not None else ctx.error)


def _made_up_answer(ctx: RequestContext, reported: Usage | None) -> dict[str, Any]:
    usage = openai_usage(reported) if reported is not None else \
        {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    if ctx.endpoint == "embeddings":
        return {"object": "list", "model": ctx.model, "usage": usage,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.0, 0.1, 0.2]}]}
    return {"id": f"chatcmpl-{ctx.request_id}", "object": "chat.completion", "created": int(time.time()),
            "model": ctx.model, "usage": usage,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": REPLY},
                         "logprobs": None, "finish_reason": "stop"}]}


async def _stream(chain: Chain, ctx: RequestContext, answer: dict[str, Any]) -> None:
    """The answer as a stream: a content chunk, the finishing chunk, the usage chunk,
    each through on_stream_chunk (fails open) before it counts as sent."""
    choice = (answer.get("choices") or [{}])[0]
    base = {"id": answer.get("id"), "object": "chat.completion.chunk", "created": answer.get("created"),
            "model": ctx.model}
    chunks = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                    "content": (choice.get("message") or {}).get("content") or ""},
                              "finish_reason": None}]},
        {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice.get("finish_reason")}]},
    ]
    if answer.get("usage") is not None:
        chunks.append({**base, "choices": [], "usage": answer["usage"]})
    for chunk in chunks:
        await chain.run_chunk(ctx, chunk)  # fails open
        if ctx.stream_assembler is not None:
            ctx.stream_assembler.add(chunk)
        for c in chunk["choices"]:
            if c["delta"].get("content"):
                ctx.streamed_text.append(c["delta"]["content"])
            if c.get("finish_reason"):
                ctx.finish_reason = c["finish_reason"]
        if chunk.get("usage") is not None:
            ctx.usage = usage_from_payload(chunk)
        if not ctx.stream_started:
            ctx.stream_started, ctx.first_byte_at = True, time.monotonic()


async def run_hooks(plugins: Iterable[Plugin], ctx: RequestContext, *, answer: dict[str, Any] | None = None,
                    upstream_error: ApiError | None = None) -> RequestContext:
    """One request through `plugins` (see the module docstring); returns `ctx`, its
    outcome in `ctx.status`, `ctx.error`, `ctx.response` and `ctx.response_headers`.

    `answer`: the upstream's body (default: a short chat completion, or an embedding,
    reporting the `usage` given to make_ctx, else 10+5 tokens; a request refused before
    dispatch has no usage); on a `stream=True` context it is streamed. Its `model` is
    rewritten to the public model that served. `upstream_error`: the upstream failed with
    it after the request hooks let the request through."""
    plugins = list(plugins)
    reported, ctx.usage = ctx.usage, None  # what the upstream will report, once dispatched
    error = await run_request(plugins, ctx)
    if error is None and ctx.short_circuit is None and ctx.billed:
        if not ctx.candidates:
            error = ApiError(404, f"The model '{ctx.requested_model}' does not exist or you do not have access to it.",
                             code="model_not_found", param="model")
        else:
            choose_model(ctx)
            if ctx.cache_hit is not None:  # served only if energy left the request on its model
                hit = ctx.model == ctx.cache_hit_model
                ctx.short_circuit = ctx.cache_hit if hit else None
                ctx.cache_hit = ctx.cache_hit if hit else None
                ctx.response_headers["X-Cache"] = "HIT" if hit else "MISS"
    if error is None and ctx.gate is not None:
        gate, ctx.gate = ctx.gate, None
        error = await gate
        if error is None and ctx.candidates and ctx.candidates[0] != ctx.model:
            choose_model(ctx)  # the gate moved the request: it is dispatched to that model
    if error is None and ctx.billed:
        if ctx.short_circuit is not None:
            payload = ctx.short_circuit
        elif upstream_error is not None:
            ctx.attempts, error = ctx.attempts + 1, upstream_error
        else:
            ctx.attempts += 1
            deployment = ctx.config.deployments(ctx.model)[0].litellm_params.model
            ctx.deployment, ctx.provider = deployment, deployment.split("/", 1)[0]
            payload = copy.deepcopy(answer) if answer is not None else _made_up_answer(ctx, reported)
        if error is None:
            payload["model"] = ctx.model
            if ctx.stream and ctx.endpoint == "chat.completions" and ctx.short_circuit is None:
                await _stream(_chain(plugins), ctx, payload)
            else:
                ctx.response = payload
                ctx.usage = usage_from_payload(payload)
                ctx.first_byte_at = time.monotonic()
            ctx.status = 200
    await run_ending(plugins, ctx, error)
    return ctx
