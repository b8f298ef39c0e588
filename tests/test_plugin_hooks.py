"""The built-in plugins, one hook behaviour per test, called directly (plugins/testing.py).

No gateway and no upstream here: `run_hooks` runs the chain's contract on a made-up
request. Where a plugin keeps state in the store, the store is a real SQLite database in
memory. Each plugin's end-to-end tests (real HTTP, real SDK) stay in its own file.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.errors import ApiError
from gateway.store import open_store
from plugins.base import Plugin, Reject, RequestContext, Usage
from plugins.experiments import assign
from plugins.testing import (
    make_config,
    make_ctx,
    make_plugin,
    make_services,
    make_user,
    run_ending,
    run_hooks,
    run_request,
    running,
)
from plugins.workspace_prompt import render_template

pytestmark = pytest.mark.timeout(30)

UPSTREAM_DOWN = ApiError(502, "The upstream failed.", type="server_error", code="upstream_error")


@pytest.fixture
async def store():
    async with open_store("sqlite:///:memory:") as opened:
        yield opened


def chat_ctx(identity: Any, **fields: Any) -> RequestContext:
    return make_ctx(identity=identity, **fields)


# --------------------------------------------------------------------------------------
# The helpers keep the chain's contract (plugins/base.py)
# --------------------------------------------------------------------------------------

class Recorder(Plugin):
    """Writes each hook call into `calls`; may reject or raise in on_request or an ending."""

    name = "recorder"

    def __init__(self, tag: str, calls: list[tuple[str, str]], *, reject: bool = False,
                 raise_in: str | None = None):
        super().__init__(None, make_services())  # type: ignore[arg-type]
        self.tag, self.calls, self.reject, self.raise_in = tag, calls, reject, raise_in

    def _call(self, hook: str) -> None:
        self.calls.append((self.tag, hook))
        if self.raise_in == hook:
            raise RuntimeError(f"{self.tag} broke in {hook}")

    async def on_request(self, ctx: RequestContext) -> None:
        self._call("on_request")
        if self.reject:
            raise Reject(403, f"{self.tag} says no", code="recorder_rejected")

    async def on_response(self, ctx: RequestContext) -> None:
        self._call("on_response")

    async def on_error(self, ctx: RequestContext) -> None:
        self._call("on_error")


@pytest.mark.parametrize("rejecting", [0, 1, 2])
async def test_a_reject_stops_the_request_hooks_and_every_plugin_gets_on_error(rejecting):
    calls: list[tuple[str, str]] = []
    plugins = [Recorder(str(i), calls, reject=i == rejecting) for i in range(3)]
    ctx = await run_hooks(plugins, make_ctx())
    assert ctx.error.code == "recorder_rejected" and ctx.status == 403
    assert calls == [(str(i), "on_request") for i in range(rejecting + 1)] + [(str(i), "on_error") for i in range(3)]


async def test_an_exception_in_a_request_hook_fails_closed_with_an_internal_error():
    calls: list[tuple[str, str]] = []
    ctx = await run_hooks([Recorder("a", calls, raise_in="on_request"), Recorder("b", calls)], make_ctx())
    assert (ctx.status, ctx.error.code) == (500, "internal_error")
    assert "broke" not in ctx.error.message
    assert calls == [("a", "on_request"), ("a", "on_error"), ("b", "on_error")]


@pytest.mark.parametrize("hook, upstream_error", [("on_response", None), ("on_error", UPSTREAM_DOWN)])
async def test_an_exception_in_an_ending_is_logged_and_the_other_plugins_still_end(hook, upstream_error):
    calls: list[tuple[str, str]] = []
    with capture_logs() as logs:
        ctx = await run_hooks([Recorder("a", calls, raise_in=hook), Recorder("b", calls)], make_ctx(),
                              upstream_error=upstream_error)
    assert ctx.status == (200 if upstream_error is None else 502)
    assert calls[-2:] == [("a", hook), ("b", hook)]
    assert [e["event"] for e in logs] == ["plugin_ending_hook_failed"]


class ChunkCounter(Plugin):
    name = "chunk_counter"

    def __init__(self) -> None:
        super().__init__(None, make_services())  # type: ignore[arg-type]
        self.chunks: list[dict[str, Any]] = []

    async def on_stream_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        self.chunks.append(chunk)


async def test_a_streamed_answer_passes_every_chunk_through_on_stream_chunk():
    counter = ChunkCounter()
    ctx = await run_hooks([counter], make_ctx(body={"stream": True}))
    assert [c["object"] for c in counter.chunks] == ["chat.completion.chunk"] * 3
    assert (ctx.streamed_text, ctx.finish_reason, ctx.usage.total_tokens) == (["Hello from the made-up upstream"],
                                                                               "stop", 15)
    assert ctx.response is None


async def test_a_request_for_a_model_the_config_does_not_serve_ends_in_a_404():
    ctx = await run_hooks([], make_ctx(model="no-such-model"))
    assert (ctx.status, ctx.error.code) == (404, "model_not_found")


async def test_make_ctx_refuses_a_field_the_context_does_not_have():
    with pytest.raises(TypeError, match="not a RequestContext field"):
        make_ctx(modle="gpt-4o")


# --------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------

MASTER_KEY = "gw-master-unit-0123456789"


@pytest.mark.parametrize("authorization", [None, "", "Bearer ", "Basic dXNlcjpwYXNz", "Bearer gw-not-a-key"])
async def test_auth_refuses_a_request_without_a_known_key(store, authorization):
    auth = make_plugin("auth", store=store)
    headers = {} if authorization is None else {"Authorization": authorization}
    ctx = await run_hooks([auth], make_ctx(identity=None, headers=headers))
    assert (ctx.status, ctx.error.code) == (401, "invalid_api_key")
    assert ctx.identity is None


@pytest.mark.parametrize("header", ["Authorization", "x-api-key"])
async def test_auth_sets_the_identity_of_the_key_the_client_sent(store, header):
    auth = make_plugin("auth", store=store)
    identity, key = await make_user(store, tier="pro")
    value = f"Bearer {key}" if header == "Authorization" else key
    ctx = await run_hooks([auth], make_ctx(identity=None, headers={header: value}))
    assert ctx.status == 200
    assert ctx.identity == identity


async def test_auth_refuses_the_master_key_on_a_model_endpoint(store):
    config = make_config(auth={"master_key": MASTER_KEY})
    auth = make_plugin("auth", store=store, config=config)
    ctx = await run_hooks([auth], make_ctx(config=config, identity=None,
                                           headers={"Authorization": f"Bearer {MASTER_KEY}"}))
    assert ctx.error.code == "invalid_api_key"
    assert "/admin" in ctx.error.message


@pytest.mark.parametrize("change, said", [("revoke", "revoked"), ("disable", "disabled")])
async def test_auth_refuses_a_revoked_key_or_a_disabled_user(store, change, said):
    auth = make_plugin("auth", store=store)
    identity, key = await make_user(store)
    if change == "revoke":
        await store.revoke_key(identity.key_id)
    else:
        await store.set_user_disabled(identity.user_id, True)
    ctx = await run_hooks([auth], make_ctx(identity=None, headers={"Authorization": f"Bearer {key}"}))
    assert ctx.error.code == "invalid_api_key"
    assert said in ctx.error.message


async def test_auth_fails_closed_when_the_store_is_not_available():
    auth = make_plugin("auth")  # no store: no Directory either
    ctx = await run_hooks([auth], make_ctx(identity=None, headers={"Authorization": "Bearer gw-anything"}))
    assert (ctx.status, ctx.error.code) == (503, "store_unavailable")


# --------------------------------------------------------------------------------------
# tier_policy
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("tier, requested, served", [
    ("pro", "gpt-4o", "gpt-4o"),
    ("pro", "claude", "claude"),
    ("free", "gpt-4o-mini", "gpt-4o-mini"),
    ("free", "demo", "demo"),
])
async def test_tier_policy_serves_a_model_the_tier_allows_as_asked(tier, requested, served):
    ctx = await run_hooks([make_plugin("tier_policy")], make_ctx(model=requested, identity={"tier": tier}))
    assert (ctx.status, ctx.model, ctx.downgraded_from) == (200, served, None)


async def test_tier_policy_downgrades_along_the_ladder_and_says_why():
    ctx = await run_hooks([make_plugin("tier_policy")], make_ctx(model="gpt-4o", identity={"tier": "free"}))
    assert (ctx.model, ctx.downgraded_from) == ("gpt-4o-mini", "gpt-4o")
    assert ctx.response_headers["X-Model-Downgraded-From"] == "gpt-4o"
    assert ctx.response_headers["X-Model-Downgrade-Reason"] == "tier 'free' does not allow gpt-4o"


async def test_tier_policy_leaves_the_whole_allowed_ladder_for_energy_to_choose_from():
    ctx = make_ctx(model="gpt-4o", identity={"tier": "free"})
    assert await run_request([make_plugin("tier_policy")], ctx) is None
    assert ctx.candidates == ["gpt-4o-mini", "demo"]


@pytest.mark.parametrize("tier, model", [("free", "claude"), ("free", "embed"), ("basic", "gpt-4o")])
async def test_tier_policy_rejects_a_model_the_tier_may_not_use(tier, model):
    config = make_config(tiers={"free": {"models": ["gpt-4o-mini", "demo"]}, "basic": {"models": ["claude"]}})
    ctx = await run_hooks([make_plugin("tier_policy", config=config)],
                          make_ctx(config=config, model=model, identity={"tier": tier}))
    assert (ctx.status, ctx.error.code, ctx.error.param) == (403, "model_not_allowed", "model")


async def test_tier_policy_limits_fallbacks_to_the_tiers_models():
    ctx = make_ctx(model="gpt-4o-mini", identity={"tier": "free"})
    await run_request([make_plugin("tier_policy")], ctx)
    assert ctx.fallback_allowed == {"gpt-4o-mini", "demo", "embed"}


async def test_tier_policy_rejects_a_tier_the_config_no_longer_has():
    ctx = await run_hooks([make_plugin("tier_policy")], make_ctx(identity={"tier": "gold"}))
    assert (ctx.status, ctx.error.code) == (403, "tier_not_configured")


@pytest.mark.parametrize("tier, visible", [
    ("free", ["gpt-4o-mini", "demo", "embed"]),
    ("pro", ["gpt-4o", "gpt-4o-mini", "demo", "claude", "embed"]),
])
async def test_tier_policy_lists_only_the_models_the_tier_allows(tier, visible):
    ctx = await run_hooks([make_plugin("tier_policy")], make_ctx(endpoint="models", identity={"tier": tier}))
    assert ctx.visible_models == visible


async def test_tier_policy_lets_an_anonymous_request_through():
    ctx = await run_hooks([make_plugin("tier_policy")], make_ctx(model="claude", identity=None))
    assert (ctx.status, ctx.model) == (200, "claude")


# --------------------------------------------------------------------------------------
# energy
# --------------------------------------------------------------------------------------

ENERGY_NOW = {"settle_interval": 0, "sweep_interval": 0}  # settle each request at once


@pytest.mark.parametrize("model, cost", [("gpt-4o", 5), ("gpt-4o-mini", 2), ("demo", 1), ("claude", 1)])
async def test_energy_charges_the_action_price_of_the_model_that_served(store, model, cost):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, tier="pro", energy=10)
    async with running(energy):
        ctx = await run_hooks([energy], chat_ctx(identity, model=model))
    assert ctx.status == 200 and ctx.energy_cost == cost
    assert await store.balance(identity.user_id) == 10 - cost
    assert ctx.response_headers["X-Energy-Cost"] == str(cost)
    assert ctx.response_headers["X-Energy-Remaining"] == str(10 - cost)
    assert [e.kind for e in await store.ledger(identity.user_id)][-2:] == ["reserve", "settle"]


@pytest.mark.parametrize("action, cost", [("ai_message", 2), ("email_draft", 3)])
async def test_energy_prices_the_requests_action(store, action, cost):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, tier="pro", energy=10)
    async with running(energy):
        ctx = await run_hooks([energy], chat_ctx(identity, action=action))
    assert (ctx.action, ctx.energy_cost) == (action, cost)


@pytest.mark.parametrize("failure", ["upstream", "later_plugin"])
async def test_energy_refunds_the_reservation_in_full_when_the_request_fails(store, failure):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, tier="pro", energy=10)
    plugins: list[Plugin] = [energy]
    if failure == "later_plugin":
        plugins.append(Recorder("after", [], reject=True))
    async with running(energy):
        ctx = await run_hooks(plugins, chat_ctx(identity, model="gpt-4o"),
                              upstream_error=UPSTREAM_DOWN if failure == "upstream" else None)
    assert ctx.error is not None
    assert await store.balance(identity.user_id) == 10
    assert ctx.response_headers["X-Energy-Cost"] == "0"
    assert ctx.response_headers["X-Energy-Remaining"] == "10"


@pytest.mark.parametrize("balance, served", [(5, "gpt-4o"), (4, "gpt-4o-mini"), (2, "gpt-4o-mini"), (1, "demo")])
async def test_energy_serves_the_first_candidate_the_balance_affords(store, balance, served):
    services = make_services(store=store)
    plugins = [make_plugin("tier_policy", services=services), make_plugin("energy", ENERGY_NOW, services=services)]
    identity, _ = await make_user(store, tier="pro", energy=balance)
    async with running(*plugins):
        ctx = await run_hooks(plugins, chat_ctx(identity, model="gpt-4o"))
    assert ctx.model == served
    if served != "gpt-4o":
        assert ctx.response_headers["X-Model-Downgrade-Reason"].startswith("insufficient energy for gpt-4o")


async def test_energy_rejects_with_429_when_no_candidate_is_affordable(store):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, tier="pro", energy=4)
    async with running(energy):
        ctx = await run_hooks([energy], chat_ctx(identity, model="gpt-4o"))
    assert (ctx.status, ctx.error.code, ctx.error.type) == (429, "insufficient_energy", "insufficient_quota")
    assert ctx.error.headers["x-should-retry"] == "false"
    assert ctx.attempts == 0 and await store.balance(identity.user_id) == 4


async def test_energy_rejects_an_action_the_price_book_does_not_know(store):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store)
    async with running(energy):
        ctx = await run_hooks([energy], chat_ctx(identity, action="poem"))
    assert (ctx.status, ctx.error.code, ctx.error.param) == (400, "unknown_action", "metadata.action")


async def test_energy_charges_nothing_for_the_models_listing(store):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, energy=10)
    async with running(energy):
        ctx = await run_hooks([energy], chat_ctx(identity, endpoint="models"))
    assert ctx.energy_cost == 0 and await store.balance(identity.user_id) == 10


async def test_energy_overlaps_the_reservation_once_it_knows_the_balance_covers_it(store):
    energy = make_plugin("energy", ENERGY_NOW, store=store)
    identity, _ = await make_user(store, tier="pro", energy=10)
    async with running(energy):
        first = chat_ctx(identity)
        assert await run_request([energy], first) is None and first.gate is None
        await run_ending([energy], first)
        second = chat_ctx(identity)
        assert await run_request([energy], second) is None
        assert second.gate is not None  # dispatch may start; nothing is sent before it passes
        assert await second.gate is None
        await run_ending([energy], second)
    assert await store.balance(identity.user_id) == 6


# --------------------------------------------------------------------------------------
# rate_limit
# --------------------------------------------------------------------------------------

def limited(rpm: int | None = None, tpm: int | None = None, **rate_limits: Any):
    limits = {k: v for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None}
    return make_config(tiers={"free": {"models": ["*"], "limits": limits}}, rate_limits=rate_limits)


@pytest.mark.parametrize("rpm", [1, 3])
async def test_rate_limit_refuses_the_request_beyond_the_tiers_rpm(rpm):
    config = limited(rpm=rpm)
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        outcomes = [(await run_hooks([rate_limit], make_ctx(config=config))).status for _ in range(rpm + 1)]
    assert outcomes == [200] * rpm + [429]


async def test_rate_limit_says_when_to_retry():
    config = limited(rpm=1)
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        await run_hooks([rate_limit], make_ctx(config=config))
        ctx = await run_hooks([rate_limit], make_ctx(config=config))
    assert (ctx.error.code, ctx.error.type) == ("rate_limit_exceeded", "rate_limit_exceeded")
    assert 0 < int(ctx.error.headers["Retry-After"]) <= 60
    assert "1 requests per minute" in ctx.error.message


@pytest.mark.parametrize("sent, remaining", [(1, "4"), (2, "3"), (5, "0")])
async def test_rate_limit_reports_the_requests_left_in_openais_headers(sent, remaining):
    config = limited(rpm=5)
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        for _ in range(sent):
            ctx = await run_hooks([rate_limit], make_ctx(config=config))
    assert ctx.response_headers["x-ratelimit-limit-requests"] == "5"
    assert ctx.response_headers["x-ratelimit-remaining-requests"] == remaining


async def test_rate_limit_counts_a_requests_tokens_when_it_ends():
    config = limited(tpm=20)
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        used = Usage(prompt_tokens=15, completion_tokens=10, total_tokens=25)
        assert (await run_hooks([rate_limit], make_ctx(config=config, usage=used))).status == 200
        ctx = await run_hooks([rate_limit], make_ctx(config=config))
    assert ctx.status == 429 and "20 tokens per minute" in ctx.error.message


async def test_rate_limit_applies_a_users_own_limits_instead_of_the_tiers():
    config = limited(rpm=100, users={"usr_test": {"rpm": 1}})
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        statuses = [(await run_hooks([rate_limit], make_ctx(config=config))).status for _ in range(2)]
    assert statuses == [200, 429]


@pytest.mark.parametrize("identity, endpoint", [(None, "chat.completions"), ({}, "models")])
async def test_rate_limit_does_not_count_anonymous_requests_or_the_models_listing(identity, endpoint):
    config = limited(rpm=1)
    rate_limit = make_plugin("rate_limit", config=config)
    async with running(rate_limit):
        statuses = [(await run_hooks([rate_limit], make_ctx(config=config, identity=identity, endpoint=endpoint))).status
                    for _ in range(3)]
    assert statuses == [200, 200, 200]


# --------------------------------------------------------------------------------------
# accounting
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("outcome, status, error_type", [
    ("answered", 200, None),
    ("upstream_failed", 502, "upstream_error"),
    ("rejected", 403, "recorder_rejected"),
])
async def test_accounting_writes_exactly_one_usage_row_per_request(store, outcome, status, error_type):
    accounting = make_plugin("accounting", store=store)
    plugins: list[Plugin] = [accounting]
    if outcome == "rejected":
        plugins.insert(0, Recorder("gate", [], reject=True))
    async with running(accounting):
        ctx = await run_hooks(plugins, make_ctx(),
                              upstream_error=UPSTREAM_DOWN if outcome == "upstream_failed" else None)
        await accounting.flush()
    rows = await store.usage_rows()
    assert [(r["request_id"], r["status"], r["error_type"]) for r in rows] == [(ctx.request_id, status, error_type)]


async def test_accounting_records_tokens_and_their_cost_at_the_models_prices(store):
    accounting = make_plugin("accounting", store=store)
    used = Usage(prompt_tokens=1000, completion_tokens=200, total_tokens=1200)
    async with running(accounting):
        await run_hooks([accounting], make_ctx(model="gpt-4o", usage=used, identity={"tier": "pro"}))
        await accounting.flush()
    [row] = await store.usage_rows()
    assert (row["tokens_prompt"], row["tokens_completion"], row["tokens_total"]) == (1000, 200, 1200)
    assert row["cost_usd"] == Decimal("0.0045")  # 1,000 x $2.50/M + 200 x $10/M, exact
    assert (row["model"], row["user_id"], row["workspace_id"]) == ("gpt-4o", "usr_test", "ws_test")


async def test_accounting_writes_no_row_for_the_models_listing(store):
    accounting = make_plugin("accounting", store=store)
    async with running(accounting):
        await run_hooks([accounting], make_ctx(endpoint="models"))
        await accounting.flush()
    assert await store.usage_rows() == []


# --------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------

CACHED = {"models": ["gpt-4o-mini"]}
REPEATABLE = {"temperature": 0}


async def test_cache_answers_an_identical_request_from_the_first_ones_answer():
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        first = await run_hooks([cache], make_ctx(body=REPEATABLE))
        second = await run_hooks([cache], make_ctx(body=REPEATABLE))
    assert (first.response_headers["X-Cache"], first.attempts) == ("MISS", 1)
    assert (second.response_headers["X-Cache"], second.attempts) == ("HIT", 0)
    assert second.response["choices"] == first.response["choices"]


@pytest.mark.parametrize("first_streamed, second_streamed", [(True, False), (False, True)])
async def test_cache_serves_a_streamed_answer_to_a_json_request_and_the_other_way_round(first_streamed,
                                                                                       second_streamed):
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        await run_hooks([cache], make_ctx(body={**REPEATABLE, "stream": first_streamed}))
        ctx = await run_hooks([cache], make_ctx(body={**REPEATABLE, "stream": second_streamed}))
    assert (ctx.response_headers["X-Cache"], ctx.attempts) == ("HIT", 0)
    assert ctx.response["choices"][0]["message"]["content"] == "Hello from the made-up upstream"


@pytest.mark.parametrize("body, headers", [
    ({}, {}),  # OpenAI's default temperature is 1: sampled
    ({"temperature": 0.7}, {}),
    ({"temperature": 1, "n": 2}, {}),
    (REPEATABLE, {"Cache-Control": "no-store"}),
])
async def test_cache_bypasses_a_request_whose_answer_must_not_be_repeated(body, headers):
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        for _ in range(2):
            ctx = await run_hooks([cache], make_ctx(body=body, headers=headers))
    assert (ctx.response_headers["X-Cache"], ctx.attempts) == ("BYPASS", 1)


@pytest.mark.parametrize("second_caller, second_body", [
    ({"workspace_id": "ws_other"}, REPEATABLE),  # an answer never crosses workspaces
    ({}, {**REPEATABLE, "messages": [{"role": "user", "content": "Something else"}]}),
    ({}, {**REPEATABLE, "max_tokens": 5}),
])
async def test_cache_misses_a_request_that_differs_in_workspace_or_body(second_caller, second_body):
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        await run_hooks([cache], make_ctx(body=REPEATABLE))
        ctx = await run_hooks([cache], make_ctx(body=second_body, identity=second_caller))
    assert ctx.response_headers["X-Cache"] == "MISS"


async def test_cache_does_not_store_an_answer_whose_usage_was_estimated():
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        await run_hooks([cache], make_ctx(body=REPEATABLE),
                        answer={"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                             "finish_reason": "stop"}]})  # no usage reported
        ctx = await run_hooks([cache], make_ctx(body=REPEATABLE))
    assert ctx.response_headers["X-Cache"] == "MISS"


async def test_cache_leaves_a_model_it_is_not_configured_for_alone():
    cache = make_plugin("cache", CACHED)
    async with running(cache):
        ctx = await run_hooks([cache], make_ctx(model="demo", body=REPEATABLE))
    assert "X-Cache" not in ctx.response_headers


# --------------------------------------------------------------------------------------
# experiments
# --------------------------------------------------------------------------------------

EXPERIMENT = {"name": "drafts-on-mini", "match": {"models": ["gpt-4o"]},
              "variants": [{"name": "current", "weight": 50},
                           {"name": "mini", "weight": 50, "model": "gpt-4o-mini",
                            "system_prompt": "Be brief.", "params": {"temperature": 0.3}}]}
EXPERIMENTS = make_config(experiments=[EXPERIMENT])


def user_in(variant: str, experiment: dict[str, Any] = EXPERIMENT) -> str:
    """A user id the sticky hash puts in `variant`."""
    config = make_config(experiments=[experiment]).experiments[0]
    return next(f"usr_{i}" for i in range(1000) if assign(config, f"usr_{i}").name == variant)


@pytest.mark.parametrize("variant", ["current", "mini"])
async def test_experiments_tag_the_request_with_the_users_variant(variant):
    ctx = await run_hooks([make_plugin("experiments", config=EXPERIMENTS)],
                          make_ctx(config=EXPERIMENTS, model="gpt-4o",
                                   identity={"tier": "pro", "user_id": user_in(variant)}))
    assert (ctx.experiment, ctx.variant) == ("drafts-on-mini", variant)
    assert ctx.response_headers["X-Experiment"] == f"drafts-on-mini={variant}"


async def test_experiments_apply_the_variants_model_prompt_and_parameters():
    ctx = make_ctx(config=EXPERIMENTS, model="gpt-4o", identity={"tier": "pro", "user_id": user_in("mini")},
                   body={"messages": [{"role": "system", "content": "Be verbose."}, {"role": "user", "content": "Hi"}]})
    await run_hooks([make_plugin("experiments", config=EXPERIMENTS)], ctx)
    assert ctx.model == "gpt-4o-mini" and ctx.downgraded_from is None
    assert ctx.body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert ctx.body["temperature"] == 0.3


async def test_experiments_serve_the_control_when_the_tier_may_not_use_the_variants_model():
    experiment = {**EXPERIMENT, "match": {}, "variants": [EXPERIMENT["variants"][0],
                                                          {"name": "claude", "weight": 50, "model": "claude"}]}
    config = make_config(experiments=[experiment])
    ctx = await run_hooks([make_plugin("experiments", config=config)],
                          make_ctx(config=config, identity={"tier": "free", "user_id": user_in("claude", experiment)}))
    assert (ctx.variant, ctx.model) == ("current", "gpt-4o-mini")


@pytest.mark.parametrize("fields", [
    {"model": "gpt-4o-mini"},  # the experiment matches gpt-4o only
    {"model": "gpt-4o", "identity": None},
    {"model": "embed", "endpoint": "embeddings"},
])
async def test_experiments_leave_a_request_the_experiment_does_not_match_alone(fields):
    ctx = await run_hooks([make_plugin("experiments", config=EXPERIMENTS)],
                          make_ctx(config=EXPERIMENTS, **{"identity": {"tier": "pro"}, **fields}))
    assert ctx.experiment is None and "X-Experiment" not in ctx.response_headers


# --------------------------------------------------------------------------------------
# idempotency
# --------------------------------------------------------------------------------------

def keyed(identity: Any, key: str = "retry-1", **fields: Any) -> RequestContext:
    return make_ctx(identity=identity, headers={"Idempotency-Key": key}, **fields)


async def test_idempotency_replays_the_first_answer_to_a_retry(store):
    idempotency = make_plugin("idempotency", store=store)
    identity, _ = await make_user(store)
    first = await run_hooks([idempotency], keyed(identity))
    retry = await run_hooks([idempotency], keyed(identity))
    assert retry.attempts == 0 and retry.response["choices"] == first.response["choices"]
    assert retry.response_headers["Idempotent-Replayed"] == "true"
    assert retry.response_headers["X-Original-Request-Id"] == first.request_id


async def test_idempotency_refuses_a_retry_while_the_first_request_is_running(store):
    idempotency = make_plugin("idempotency", store=store)
    identity, _ = await make_user(store)
    assert await run_request([idempotency], keyed(identity)) is None  # still running: no ending yet
    retry = await run_hooks([idempotency], keyed(identity))
    assert (retry.status, retry.error.code) == (409, "idempotency_key_in_use")


async def test_idempotency_refuses_the_same_key_with_another_body(store):
    idempotency = make_plugin("idempotency", store=store)
    identity, _ = await make_user(store)
    await run_hooks([idempotency], keyed(identity))
    other = await run_hooks([idempotency], keyed(identity, body={"messages": [{"role": "user", "content": "Bye"}]}))
    assert (other.status, other.error.code) == (422, "idempotency_key_reused")


async def test_idempotency_runs_a_retry_of_a_failed_request_again(store):
    idempotency = make_plugin("idempotency", store=store)
    identity, _ = await make_user(store)
    await run_hooks([idempotency], keyed(identity), upstream_error=UPSTREAM_DOWN)
    retry = await run_hooks([idempotency], keyed(identity))
    assert (retry.status, retry.attempts) == (200, 1)
    assert "Idempotent-Replayed" not in retry.response_headers


@pytest.mark.parametrize("key", ["x" * 256, "caf\u00e9", "tab\there"])
async def test_idempotency_refuses_a_key_that_is_not_short_printable_ascii(store, key):
    idempotency = make_plugin("idempotency", store=store)
    identity, _ = await make_user(store)
    ctx = await run_hooks([idempotency], keyed(identity, key))
    assert (ctx.status, ctx.error.code) == (400, "invalid_idempotency_key")


# --------------------------------------------------------------------------------------
# workspace_prompt
# --------------------------------------------------------------------------------------

PROFILE = {"company_name": "Acme", "industry": "Logistics", "products": ["Tracker", "Fleet"]}
TEMPLATE = "You write for {company_name} ({industry}). Products: {products}."


@pytest.mark.parametrize("template, rendered", [
    (TEMPLATE, "You write for Acme (Logistics). Products: Tracker, Fleet."),
    ("Voice: {brand_voice}.", "Voice: ."),  # an unknown placeholder renders empty
    ("No placeholders.", "No placeholders."),
])
def test_workspace_prompt_renders_the_template_from_the_profile(template, rendered):
    assert render_template(template, PROFILE) == rendered


async def test_workspace_prompt_puts_the_workspace_system_prompt_first(store):
    identity, _ = await make_user(store, profile=PROFILE,
                                  ai_settings={"inject_system_prompt": True, "system_prompt_template": TEMPLATE})
    ctx = await run_hooks([make_plugin("workspace_prompt", store=store)], make_ctx(identity=identity))
    assert ctx.body["messages"][0] == {"role": "system",
                                       "content": "You write for Acme (Logistics). Products: Tracker, Fleet."}
    assert ctx.body["messages"][1:] == [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize("sent, used", [({}, 0.4), ({"temperature": 1.2}, 1.2)])
async def test_workspace_prompt_applies_the_workspace_temperature_only_when_the_client_sent_none(store, sent, used):
    identity, _ = await make_user(store, ai_settings={"temperature": 0.4})
    ctx = await run_hooks([make_plugin("workspace_prompt", store=store)], make_ctx(identity=identity, body=sent))
    assert ctx.body["temperature"] == used


async def test_workspace_prompt_serves_model_default_with_the_workspaces_default_model(store):
    identity, _ = await make_user(store, ai_settings={"default_model": "demo"})
    ctx = await run_hooks([make_plugin("workspace_prompt", store=store)], make_ctx(identity=identity, model="default"))
    assert (ctx.status, ctx.model, ctx.requested_model) == (200, "demo", "demo")


# --------------------------------------------------------------------------------------
# request_log
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("upstream_error, event", [(None, "request_completed"), (UPSTREAM_DOWN, "request_failed")])
async def test_request_log_writes_one_line_per_request(upstream_error, event):
    with capture_logs() as logs:
        ctx = await run_hooks([make_plugin("request_log")], make_ctx(), upstream_error=upstream_error)
    [line] = logs
    assert (line["event"], line["request_id"], line["status"]) == (event, ctx.request_id, ctx.status)
    assert (line["user_id"], line["key_prefix"]) == ("usr_test", "gw-test")


async def test_request_log_never_logs_the_key_or_the_prompt():
    with capture_logs() as logs:
        await run_hooks([make_plugin("request_log")],
                        make_ctx(headers={"Authorization": "Bearer gw-secret-key-123"},
                                 body={"messages": [{"role": "user", "content": "my secret prompt"}]}))
    assert "gw-secret-key-123" not in str(logs) and "my secret prompt" not in str(logs)


@pytest.mark.parametrize("settings, lines", [({}, 0), ({"log_models_listing": True}, 1)])
async def test_request_log_logs_the_models_listing_only_when_asked(settings, lines):
    with capture_logs() as logs:
        await run_hooks([make_plugin("request_log", settings)], make_ctx(endpoint="models"))
    assert len(logs) == lines


# --------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------

def sample(metrics: Any, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("upstream_error, status", [(None, "200"), (UPSTREAM_DOWN, "502")])
async def test_metrics_count_each_request_by_model_and_status(upstream_error, status):
    metrics = make_plugin("metrics")
    await run_hooks([metrics], make_ctx(), upstream_error=upstream_error)
    labels = {"endpoint": "chat.completions", "model": "gpt-4o-mini",
              "provider": "demo" if upstream_error is None else "none", "status": status}
    assert sample(metrics, "gateway_requests_total", **labels) == 1


async def test_metrics_label_a_model_the_gateway_does_not_serve_as_unknown():
    metrics = make_plugin("metrics")
    await run_hooks([metrics], make_ctx(model="sk-pasted-secret-by-mistake"))
    assert sample(metrics, "gateway_requests_total", endpoint="chat.completions", model="unknown",
                  provider="none", status="404") == 1
    assert "sk-pasted" not in str(list(metrics.registry.collect()))


async def test_metrics_count_tokens_in_each_direction():
    metrics = make_plugin("metrics")
    await run_hooks([metrics], make_ctx(usage=Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10)))
    assert sample(metrics, "gateway_tokens_total", model="gpt-4o-mini", direction="prompt") == 7
    assert sample(metrics, "gateway_tokens_total", model="gpt-4o-mini", direction="completion") == 3


async def test_metrics_in_flight_gauge_returns_to_zero_after_the_ending():
    metrics = make_plugin("metrics")
    ctx = make_ctx()
    await run_request([metrics], ctx)
    assert sample(metrics, "gateway_in_flight_requests") == 1
    await run_ending([metrics], ctx)
    assert sample(metrics, "gateway_in_flight_requests") == 0
