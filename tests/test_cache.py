"""The response cache (plugins/cache.py): hits and misses counted at the fake upstream,
never across workspaces, streams and JSON answers served from each other, one upstream
call for a burst of identical misses, energy on hits per config, Redis shared by two
gateways."""

from __future__ import annotations

import concurrent.futures
import uuid

import httpx
import openai
import pytest

from tests.fakes import Fault

MSGS = [{"role": "user", "content": "What is the capital of France?"}]
REPLY = "Hello from fake upstream"


def chain(**settings):
    return ["auth", "tier_policy", {"name": "cache", "settings": {"models": ["gpt-4o-mini"], **settings}},
            "energy", {"name": "accounting", "settings": {"flush_interval": 0.05}}]


def energy(cache_hit_price=None):
    price = {"default": 2}
    if cache_hit_price is not None:
        price["cache_hit_price"] = cache_hit_price
    return {"default_action": "ai_message", "actions": {"ai_message": price}}


def ask(gw, key, **kw):
    kw.setdefault("temperature", 0)
    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, **kw)
    return raw.headers.get("X-Cache"), raw.parse()


def test_a_repeated_request_is_served_from_the_cache(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy())
    user_id, key = gw.make_user(energy=100)
    first, answer = ask(gw, key)
    second, again = ask(gw, key, metadata={"prospect_id": "p1"}, user="someone-else")  # fields that do not count
    assert (first, second) == ("MISS", "HIT")
    assert again.choices[0].message.content == answer.choices[0].message.content == REPLY
    assert again.usage.total_tokens == answer.usage.total_tokens
    assert upstream.count("/chat/completions") == 1
    gw.settle()
    rows = sorted(gw.run(gw.store.usage_rows()), key=lambda r: r["created_at"])
    assert [r["cache_hit"] for r in rows] == [False, True]
    assert rows[1]["cost_usd"] == 0 and rows[1]["tokens_total"] == rows[0]["tokens_total"]
    assert gw.balance(user_id) == 100 - 2 - 2  # a hit costs the full price by default


def test_energy_on_a_hit_is_the_actions_cache_hit_price(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy(cache_hit_price=0))
    user_id, key = gw.make_user(energy=100)
    ask(gw, key)
    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS, temperature=0)
    assert raw.headers["X-Cache"] == "HIT" and raw.headers["X-Energy-Cost"] == "0"
    gw.settle()
    assert gw.balance(user_id) == 98


def test_a_cached_answer_never_crosses_workspaces(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, mine = gw.make_user(workspace="acme")
    _, theirs = gw.make_user(workspace="globex")
    assert [ask(gw, k)[0] for k in (mine, theirs, mine, theirs)] == ["MISS", "MISS", "HIT", "HIT"]
    assert upstream.count("/chat/completions") == 2


def test_streams_and_json_answers_are_served_from_each_other(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    ask(gw, key)  # a JSON answer, then a stream from it, with the usage chunk asked for
    chunks = list(gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS, temperature=0,
                                                         stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    assert chunks[-1].usage is not None and chunks[0].model == "gpt-4o-mini"
    other = [{"role": "user", "content": "And of Spain?"}]  # a stream first, then JSON from it
    list(gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=other, temperature=0, stream=True))
    raw = gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=other, temperature=0)
    assert raw.headers["X-Cache"] == "HIT" and raw.parse().choices[0].message.content == REPLY
    assert raw.parse().choices[0].finish_reason == "stop"
    assert upstream.count("/chat/completions") == 2


def test_a_burst_of_identical_misses_makes_one_upstream_call(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    upstream.push(Fault.slow(0.5))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda _: ask(gw, key), range(6)))
    assert upstream.count("/chat/completions") == 1
    assert sorted(r[0] for r in results) == ["HIT"] * 5 + ["MISS"]
    assert {r[1].choices[0].message.content for r in results} == {REPLY}


@pytest.mark.parametrize("header,first,second,calls", [
    ("no-cache", "MISS", "MISS", 2),   # lookup skipped (the entry refreshed)
    ("no-store", "BYPASS", "BYPASS", 2),
])
def test_cache_control_is_honoured(gateway_factory, upstream, header, first, second, calls):
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    got = [ask(gw, key, extra_headers={"Cache-Control": header})[0] for _ in range(2)]
    assert got == [first, second] and upstream.count("/chat/completions") == calls
    assert ask(gw, key)[0] == ("HIT" if header == "no-cache" else "MISS")


def test_sampled_requests_are_not_cached_unless_configured(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    assert [ask(gw, key, temperature=0.7)[0] for _ in range(2)] == ["BYPASS", "BYPASS"]
    assert [ask(gw, key, temperature=None)[0] for _ in range(2)] == ["BYPASS", "BYPASS"]  # OpenAI's default is 1
    gw2 = gateway_factory(plugins=chain(cache_sampled=True), energy=energy())
    _, key2 = gw2.make_user(workspace="other")
    assert [ask(gw2, key2, temperature=0.7)[0] for _ in range(2)] == ["MISS", "HIT"]


def test_a_model_not_listed_and_a_workspace_switched_off_are_not_cached(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(workspaces={"quiet": {"enabled": False}}), energy=energy())
    _, key = gw.make_user(workspace="quiet")
    assert [ask(gw, key)[0] for _ in range(2)] == [None, None]
    _, loud = gw.make_user(workspace="loud")
    raw = gw.client(loud).chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS, temperature=0)
    assert raw.headers.get("X-Cache") is None


def test_a_redis_cache_is_shared_by_two_gateways(gateway_factory, upstream):
    prefix = "gw:test-cache:" + uuid.uuid4().hex[:8]
    settings = {"backend": "redis", "redis_url": "redis://127.0.0.1:6379/0", "key_prefix": prefix}
    one = gateway_factory(plugins=chain(**settings), energy=energy())
    two = gateway_factory(plugins=chain(**settings), energy=energy())  # same store, its own process state
    _, key = one.make_user()
    assert ask(one, key)[0] == "MISS"
    assert ask(two, key)[0] == "HIT"
    assert upstream.count("/chat/completions") == 1


def test_a_failed_answer_is_not_cached(gateway_factory, upstream):
    gw = gateway_factory(plugins=chain(), energy=energy(), retries={"max_attempts": 1})
    _, key = gw.make_user()
    upstream.push(Fault.status(500, "down"))
    with pytest.raises(openai.InternalServerError):
        ask(gw, key)
    assert ask(gw, key)[0] == "MISS"
    assert httpx.get(gw.url + "/health").status_code == 200


# --------------------------------------------------------------- USD saved by the cache

# The fake upstream reports token classes; gpt-4o-mini in litellm's map (the test models'
# deployment openai/gpt-4o-mini): $0.15 input, $0.075 cached input, $0.60 output (reasoning
# has no price of its own: output) per million tokens.
PROMPT, CACHED, COMPLETION, REASONING = 1000, 300, 400, 120
MINI_COST = (PROMPT - CACHED) * 0.15e-6 + CACHED * 0.075e-6 + COMPLETION * 0.6e-6


def report_token_classes(upstream):
    upstream.prompt_tokens, upstream.completion_tokens = PROMPT, COMPLETION
    upstream.cached_tokens, upstream.reasoning_tokens = CACHED, REASONING


def ask_as(gw, key, stream):
    if not stream:
        return ask(gw, key)[0]
    raw = gw.client(key).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=MSGS, temperature=0, stream=True, stream_options={"include_usage": True})
    list(raw.parse())
    return raw.headers.get("X-Cache")


def admin_get(gw, path, key=None):
    from tests.conftest import MASTER_KEY

    response = httpx.get(gw.url + path, headers={"Authorization": f"Bearer {key or MASTER_KEY}"}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("miss_streamed,hit_streamed", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["json-json", "stream-json", "json-stream", "stream-stream"])
def test_a_hits_usd_saved_is_exactly_what_the_miss_cost(gateway_factory, upstream, miss_streamed, hit_streamed):
    """The hit's row: cost 0, the miss's tokens (classes included) and saved_usd equal to the
    miss's cost_usd; /admin/metrics sums it (savedUsd) beside the real hit rate."""
    report_token_classes(upstream)
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    assert [ask_as(gw, key, miss_streamed), ask_as(gw, key, hit_streamed)] == ["MISS", "HIT"]
    assert upstream.count("/chat/completions") == 1
    gw.settle()
    miss, hit = sorted(gw.run(gw.store.usage_rows()), key=lambda r: r["cache_hit"])
    assert float(miss["cost_usd"]) == pytest.approx(MINI_COST, rel=1e-9) and miss["saved_usd"] is None
    assert (hit["cache_hit"], hit["cost_usd"], hit["saved_usd"]) == (True, 0.0, miss["cost_usd"])
    classes = ("tokens_prompt", "tokens_completion", "tokens_cached", "tokens_reasoning")
    assert [hit[c] for c in classes] == [miss[c] for c in classes] == [PROMPT, COMPLETION, CACHED, REASONING]
    assert hit["unit_prices"] == miss["unit_prices"]  # the prices the saving was computed with
    metrics = admin_get(gw, "/admin/metrics?window=1h")
    assert (metrics["cacheHitRate"], metrics["cacheHits"]) == (0.5, 1)
    assert metrics["savedUsd"] == metrics["totalCost"] == float(miss["cost_usd"])  # exact sums, not rounded
    (today,) = admin_get(gw, "/admin/usage/daily?days=1")["rows"]
    assert (today["cache_hits"], today["saved_usd"]) == (1, float(miss["cost_usd"]))


def test_a_workspace_admin_sees_only_its_own_workspaces_savings(gateway_factory, upstream):
    report_token_classes(upstream)
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, acme = gw.make_user(workspace="acme")
    _, globex = gw.make_user(workspace="globex")
    _, acme_admin = gw.make_user(workspace="acme", role="workspace_admin")
    assert [ask(gw, k)[0] for k in (acme, acme, acme, globex, globex)] == ["MISS", "HIT", "HIT", "MISS", "HIT"]
    gw.settle()
    everything = admin_get(gw, "/admin/metrics?window=1h")
    own = admin_get(gw, "/admin/metrics?window=1h", acme_admin)
    assert (everything["cacheHits"], own["cacheHits"], own["cacheHitRate"]) == (3, 2, round(2 / 3, 4))
    assert everything["savedUsd"] == pytest.approx(3 * MINI_COST, abs=1e-12)
    assert own["savedUsd"] == pytest.approx(2 * MINI_COST, abs=1e-12)


def test_an_answer_whose_usage_the_provider_did_not_report_is_not_cached(gateway_factory, upstream):
    """A hit's row must carry real tokens: an estimated answer is not stored."""
    upstream.report_usage = False
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    assert [ask(gw, key)[0], ask(gw, key)[0]] == ["MISS", "MISS"]
    assert upstream.count("/chat/completions") == 2


def test_prometheus_counts_the_usd_saved_per_model(gateway_factory, upstream):
    report_token_classes(upstream)
    gw = gateway_factory(plugins=["metrics", *chain()], energy=energy())
    _, key = gw.make_user()
    assert [ask(gw, key)[0] for _ in range(3)] == ["MISS", "HIT", "HIT"]
    gw.settle()
    scrape = httpx.get(gw.url + "/metrics", timeout=10).text
    (line,) = [x for x in scrape.splitlines() if x.startswith('gateway_cache_saved_usd_total{model="gpt-4o-mini"}')]
    assert float(line.split()[-1]) == pytest.approx(2 * MINI_COST, rel=1e-9)


# --------------------------------------------------------------- exact replay

# Every parameter a cached request may carry (temperature 0 throughout): the fake answers
# n choices and logprobs / top_logprobs as OpenAI does, streamed or not.
CACHEABLE = [
    {},
    {"n": 2},
    {"n": 3, "logprobs": True, "top_logprobs": 2},
    {"logprobs": True},
    {"logprobs": True, "top_logprobs": 3},
    {"logprobs": False},
    {"max_tokens": 50},
    {"max_completion_tokens": 50},
    {"stop": ["\n\n"]},
    {"seed": 7},
    {"top_p": 0.5},
    {"presence_penalty": 0.1, "frequency_penalty": 0.2},
    {"logit_bias": {"50256": -100}},
    {"response_format": {"type": "json_object"}},
    {"reasoning_effort": "low"},
    {"verbosity": "low"},
    {"prompt_cache_key": "faq"},
]


def answer_of(gw, key, stream, params, headers=None):
    """The answer as the openai SDK gives it (a stream's chunks put together, field by
    field), minus the fields a hit may change. `headers`: sent with the request."""
    client = gw.client(key).with_options(default_headers=headers or {})
    if not stream:
        out = client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, temperature=0, **params).model_dump()
        for choice in out["choices"]:
            message = choice["message"]
            choice["message"] = {k: message[k] for k in ("role", "content", "refusal", "tool_calls")}
            for call in message["tool_calls"] or ():
                call.pop("index", None)
        return {k: out[k] for k in ("object", "model", "choices", "system_fingerprint", "service_tier", "usage")}
    # Put together here: the SDK's own stream helper (chat.completions.stream) counts the
    # logprobs of the first chunk of every choice after the first twice (openai 3.57).
    out = {"object": "chat.completion", "model": None, "system_fingerprint": None, "service_tier": None,
           "usage": None}
    choices: dict[int, dict] = {}
    for chunk in client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, temperature=0, stream=True,
                                                stream_options={"include_usage": True}, **params):
        data = chunk.model_dump()
        for key in ("model", "system_fingerprint", "service_tier", "usage"):
            if data.get(key) is not None:
                out[key] = data[key]
        for choice in data.get("choices") or ():
            state = choices.setdefault(choice["index"], {
                "index": choice["index"], "finish_reason": None, "logprobs": None,
                "message": {"role": None, "content": None, "refusal": None, "tool_calls": None}})
            message, delta = state["message"], choice.get("delta") or {}
            for key in ("role",):
                message[key] = delta.get(key) or message[key]
            for key in ("content", "refusal"):
                if delta.get(key) is not None:
                    message[key] = (message[key] or "") + delta[key]
            for call in delta.get("tool_calls") or ():
                calls = message["tool_calls"] = message["tool_calls"] or []
                if call["index"] == len(calls):
                    calls.append({"id": None, "type": None, "function": {"name": None, "arguments": ""}})
                held = calls[call["index"]]
                held["id"], held["type"] = call.get("id") or held["id"], call.get("type") or held["type"]
                held["function"]["name"] = (call.get("function") or {}).get("name") or held["function"]["name"]
                held["function"]["arguments"] += (call.get("function") or {}).get("arguments") or ""
            if choice.get("logprobs") is not None:
                held = state["logprobs"] = state["logprobs"] or {"content": None, "refusal": None}
                for key in ("content", "refusal"):
                    if choice["logprobs"].get(key) is not None:
                        held[key] = (held[key] or []) + choice["logprobs"][key]
            state["finish_reason"] = choice.get("finish_reason") or state["finish_reason"]
    return {**out, "choices": [choices[i] for i in sorted(choices)]}


@pytest.mark.parametrize("miss_streamed,hit_streamed", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["json-json", "stream-json", "json-stream", "stream-stream"])
@pytest.mark.parametrize("params", CACHEABLE, ids=lambda p: ",".join(p) or "plain")
def test_a_hit_is_the_misss_answer_field_for_field(gateway_factory, upstream, params, miss_streamed, hit_streamed):
    """Every choice (a stream interleaves n > 1 of them), its logprobs and top_logprobs,
    finish reason, system_fingerprint, usage: all as the miss had them, whichever form
    each of them took."""
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    miss = answer_of(gw, key, miss_streamed, params)
    hit = answer_of(gw, key, hit_streamed, params)
    assert upstream.count("/chat/completions") == 1  # the second was a hit
    assert hit == miss
    assert len(miss["choices"]) == params.get("n", 1)
    assert all((c["logprobs"] is not None) == bool(params.get("logprobs")) for c in miss["choices"])


@pytest.mark.parametrize("hit_streamed", [False, True])
def test_a_stream_that_did_not_carry_the_asked_logprobs_is_not_stored(gateway_factory, upstream, hit_streamed):
    """An upstream whose streams carry no logprobs: a later request asking for them (JSON
    or stream) goes upstream rather than get `logprobs: null` from the cache."""
    upstream.stream_logprobs = False
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    answer_of(gw, key, True, {"logprobs": True})
    upstream.stream_logprobs = True
    again = answer_of(gw, key, hit_streamed, {"logprobs": True})
    assert upstream.count("/chat/completions") == 2
    assert again["choices"][0]["logprobs"]["content"]


def test_a_json_tool_call_is_replayed_to_a_stream_whole(gateway_factory, upstream):
    upstream.tool_call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    gw = gateway_factory(plugins=chain(), energy=energy())
    _, key = gw.make_user()
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    miss = answer_of(gw, key, False, {"tools": tools})
    hit = answer_of(gw, key, True, {"tools": tools})
    assert upstream.count("/chat/completions") == 1
    assert hit == miss and hit["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
