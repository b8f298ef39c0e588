"""Every price dimension a provider charges by is billed (docs/billing.md: Price dimensions).

Service tiers (`priority`, `flex`) at the map's `*_priority` / `*_flex` prices; long-context
steps (`*_above_<N>k_tokens`) for every token once the prompt exceeds N, held to litellm's
own cost; hosted tools refused unless the model allows them, on every surface, and billed
per use from the provider's answer. A dimension with no known price is a 400 naming the
field, before any upstream call. Real HTTP: SDK -> gateway -> fake upstream -> real store.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import litellm
import openai
import pytest

from gateway.config import ConfigError, load_config_data
from gateway.usage import token_prices
from plugins.base import Usage
from tests.test_accounting import only_row, usage_rows
from tests.test_chat import only_models

HELLO = [{"role": "user", "content": "hi"}]
ACCOUNTING = {"name": "accounting", "settings": {"flush_interval": 0.05}}
PROMPT, COMPLETION = 1000, 100


def pm(usd_per_million: float) -> float:
    return usd_per_million / 1e6


def model(name: str, upstream: Any, deployment: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "litellm_params": {"model": deployment, "api_base": upstream.openai_base,
                                             "api_key": "sk-upstream-openai-SECRET"}, **extra}


def gateway(gateway_factory: Any, upstream: Any, *models: dict[str, Any], plugins: list[Any] | None = None) -> Any:
    upstream.prompt_tokens, upstream.completion_tokens = PROMPT, COMPLETION
    return gateway_factory(plugins=[ACCOUNTING] if plugins is None else plugins, **only_models(list(models)))


def ask(gw: Any, surface: str, name: str, **params: Any) -> None:
    """One request on `surface`: chat, chat streamed, /v1/responses, streamed or not."""
    client = gw.client()
    if surface == "chat":
        client.chat.completions.create(model=name, messages=HELLO, **params)
    elif surface == "chat-stream":
        list(client.chat.completions.create(model=name, messages=HELLO, stream=True, **params))
    elif surface == "responses":
        client.responses.create(model=name, input="hi", **params)
    else:
        list(client.responses.create(model=name, input="hi", stream=True, **params))


SURFACES = ["chat", "chat-stream", "responses", "responses-stream"]


def test_the_map_prices_these_tests_compute_with():
    gpt4o, gpt5 = litellm.model_cost["gpt-4o"], litellm.model_cost["gpt-5"]
    assert (gpt4o["input_cost_per_token_priority"], gpt4o["output_cost_per_token_priority"]) == pytest.approx(
        (pm(4.25), pm(17)))
    assert "input_cost_per_token_flex" not in gpt4o
    assert (gpt5["input_cost_per_token_flex"], gpt5["output_cost_per_token_flex"]) == pytest.approx((pm(0.625), pm(5)))
    assert litellm.model_cost["gpt-5.4"]["input_cost_per_token_above_272k_tokens"] == pytest.approx(pm(5))


# ------------------------------------------------------------------------ service tiers


@pytest.mark.parametrize("surface", SURFACES)
def test_priority_is_billed_at_the_priority_price(gateway_factory, upstream, surface):
    """4.25 / 17 per million (was billed at 2.5 / 10: 41% under)."""
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    ask(gw, surface, "m", service_tier="priority")
    assert upstream.last.json["service_tier"] == "priority"
    row = only_row(gw)
    assert float(row["cost_usd"]) == pytest.approx(PROMPT * pm(4.25) + COMPLETION * pm(17), abs=1e-12)
    prices = json.loads(row["unit_prices"])
    assert (prices["service_tier"], prices["input"], prices["output"]) == ("priority", 4.25, 17)


@pytest.mark.parametrize("surface", ["chat", "responses-stream"])
def test_flex_is_billed_at_the_flex_price(gateway_factory, upstream, surface):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-5"))
    ask(gw, surface, "m", service_tier="flex")
    row = only_row(gw)
    assert float(row["cost_usd"]) == pytest.approx(PROMPT * pm(0.625) + COMPLETION * pm(5), abs=1e-12)
    assert json.loads(row["unit_prices"])["service_tier"] == "flex"


def test_the_tier_that_served_is_billed_not_the_one_asked_for(gateway_factory, upstream):
    """Asked for priority, served at default (the answer says so): the standard price."""
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    upstream.service_tier_served = "default"
    ask(gw, "chat", "m", service_tier="priority")
    row = only_row(gw)
    assert float(row["cost_usd"]) == pytest.approx(PROMPT * pm(2.5) + COMPLETION * pm(10), abs=1e-12)
    assert "service_tier" not in json.loads(row["unit_prices"])


@pytest.mark.parametrize("surface", SURFACES)
@pytest.mark.parametrize("tier", ["flex", "scale"])
def test_a_tier_without_a_price_is_refused_naming_service_tier(gateway_factory, upstream, surface, tier):
    """gpt-4o has no flex price in the map: never dispatched, never billed at the base price."""
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    with pytest.raises(openai.BadRequestError) as excinfo:
        ask(gw, surface, "m", service_tier=tier)
    assert excinfo.value.body["param"] == "service_tier"
    assert upstream.count() == 0


def test_config_pricing_prices_tiers_and_refuses_the_ones_it_omits(gateway_factory, upstream):
    pricing = {"input_per_million": 1, "output_per_million": 2,
               "priority": {"input_per_million": 3, "output_per_million": 6}}
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-5", pricing=pricing))
    ask(gw, "chat", "m", service_tier="priority")
    assert float(only_row(gw)["cost_usd"]) == pytest.approx(PROMPT * pm(3) + COMPLETION * pm(6), abs=1e-12)
    with pytest.raises(openai.BadRequestError) as excinfo:  # the map has flex; the operator's pricing does not
        ask(gw, "chat", "m", service_tier="flex")
    assert excinfo.value.body["param"] == "service_tier"


# ----------------------------------------------------------------------- long context


@pytest.mark.parametrize("tier", [None, "priority", "flex"])
@pytest.mark.parametrize("prompt", [272_000, 272_001, 400_000])
def test_long_context_prices_equal_litellms_own_cost(tier, prompt):
    """Above 272k tokens every token is billed at the higher price; at exactly 272k not."""
    config = load_config_data({"store": {"url": "sqlite:///:memory:"},
                               "models": [{"name": "m", "litellm_params": {"model": "openai/gpt-5.4"}}]})
    cached, completion = 50_000, 2_000
    prices, above = token_prices(config, "m", "openai/gpt-5.4", tier, prompt)
    ours = prices.cost(Usage(prompt, completion, prompt + completion, cached_tokens=cached))
    usage = litellm.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                          prompt_tokens_details={"cached_tokens": cached})
    theirs = sum(litellm.cost_per_token(model="gpt-5.4", custom_llm_provider="openai", usage_object=usage,
                                        service_tier=tier))
    assert float(ours) == pytest.approx(theirs, rel=1e-9)
    assert above == (272_000 if prompt > 272_000 else None)


def test_a_long_prompt_is_billed_at_the_long_context_price(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-5.4"))
    upstream.prompt_tokens = 300_000
    gw.client().chat.completions.create(model="m", messages=HELLO)
    row = only_row(gw)
    assert float(row["cost_usd"]) == pytest.approx(300_000 * pm(5) + COMPLETION * pm(22.5), abs=1e-9)
    prices = json.loads(row["unit_prices"])
    assert (prices["above_tokens"], prices["input"]) == (272_000, 5)


def test_config_long_context_steps(gateway_factory, upstream):
    pricing = {"input_per_million": 1, "output_per_million": 2,
               "long_context": [{"above_tokens": 500, "input_per_million": 4, "output_per_million": 8}]}
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o", pricing=pricing))
    gw.client().chat.completions.create(model="m", messages=HELLO)
    assert float(only_row(gw)["cost_usd"]) == pytest.approx(PROMPT * pm(4) + COMPLETION * pm(8), abs=1e-12)


# ----------------------------------------------------------------------- hosted tools

RESPONSES_TOOLS = [{"type": "web_search_preview"}, {"type": "web_search"}, {"type": "file_search",
                   "vector_store_ids": ["vs_1"]}, {"type": "code_interpreter", "container": {"type": "auto"}},
                   {"type": "image_generation"}]


@pytest.mark.parametrize("tool", RESPONSES_TOOLS, ids=lambda t: t["type"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_hosted_tool_is_refused_on_responses_unless_allowed(gateway_factory, upstream, tool, stream):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    with pytest.raises(openai.BadRequestError) as excinfo:
        ask(gw, "responses-stream" if stream else "responses", "m", tools=[tool])
    # file_search names vector stores at the shared account: the object-id rule refuses it
    # first (gateway/object_ids.py); every other tool is refused as a hosted tool.
    refused = (excinfo.value.body["param"], excinfo.value.body["code"])
    assert refused in {("tools[0]", "hosted_tool_not_allowed"), ("tools[0]", "unsupported_tool_type"),
                       ("tools[0].vector_store_ids", "object_id_not_allowed")}
    assert upstream.count() == 0


@pytest.mark.parametrize("params", [{"web_search_options": {}}, {"tools": [{"type": "web_search_preview"}]}],
                         ids=["web_search_options", "tools"])
@pytest.mark.parametrize("surface", ["chat", "chat-stream"])
def test_a_hosted_tool_is_refused_on_chat_unless_allowed(gateway_factory, upstream, params, surface):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    with pytest.raises(openai.BadRequestError):
        ask(gw, surface, "m", **params)
    assert upstream.count() == 0


def anthropic_model(upstream: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "claude", "litellm_params": {"model": "anthropic/claude-sonnet-4-5", "api_base": upstream.url,
                                                 "api_key": "sk-ant-upstream-SECRET"}, **extra}


def messages(gw: Any, **params: Any) -> Any:
    client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0)
    return client.messages.create(model="claude", max_tokens=50, messages=HELLO, **params)


WEB_SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 5}


def test_an_anthropic_server_tool_is_refused_unless_allowed(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, anthropic_model(upstream))
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        messages(gw, tools=[WEB_SEARCH_TOOL])
    assert "hosted_tool_not_allowed" in excinfo.value.body["error"]["message"]
    assert upstream.count() == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_allowed_anthropic_web_search_is_billed_per_search(gateway_factory, upstream, stream):
    """$0.01 a search (map: search_context_cost_per_query), 2 searches counted from
    usage.server_tool_use; the tool reaches Anthropic capped at max_uses."""
    gw = gateway(gateway_factory, upstream, anthropic_model(upstream, hosted_tools={"web_search": {"max_uses": 3}}))
    upstream.hosted_tool_calls = 2
    if stream:
        client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0)
        with client.messages.stream(model="claude", max_tokens=50, messages=HELLO, tools=[WEB_SEARCH_TOOL]) as s:
            "".join(s.text_stream)
    else:
        messages(gw, tools=[WEB_SEARCH_TOOL])
    assert upstream.last.json["tools"] == [{**WEB_SEARCH_TOOL, "max_uses": 3}]
    row = only_row(gw)
    tokens = PROMPT * pm(3) + COMPLETION * pm(15)
    assert float(row["cost_usd"]) == pytest.approx(tokens + 2 * 0.01, abs=1e-12)
    assert json.loads(row["unit_prices"])["usd_per_use"] == {"web_search": 0.01}


@pytest.mark.parametrize("stream", [False, True])
def test_allowed_responses_tools_are_billed_per_use_from_the_output(gateway_factory, upstream, stream):
    allowed = {"web_search": {}, "image_generation": {"usd_per_use": 0.04}, "code_interpreter": {}}
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o-mini", hosted_tools=allowed))
    upstream.hosted_tool_calls = 1
    ask(gw, "responses-stream" if stream else "responses", "m",
        tools=[{"type": "web_search", "search_context_size": "low"}, {"type": "image_generation"},
               {"type": "code_interpreter", "container": {"type": "auto"}}])
    assert upstream.last.json["max_tool_calls"] == 3  # one use of each, as reserved
    row = only_row(gw)
    tokens = PROMPT * pm(0.15) + COMPLETION * pm(0.6)
    # gpt-4o-mini web search (low): $0.025; an image: $0.04 (config); a code session: $0.03 (map: openai/container)
    assert float(row["cost_usd"]) == pytest.approx(tokens + 0.025 + 0.04 + 0.03, abs=1e-12)


def test_an_allowed_chat_web_search_is_billed_once_per_answer(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o-mini", hosted_tools={"web_search": {}}))
    gw.client().chat.completions.create(model="m", messages=HELLO, web_search_options={"search_context_size": "high"})
    assert float(only_row(gw)["cost_usd"]) == pytest.approx(PROMPT * pm(0.15) + COMPLETION * pm(0.6) + 0.025, abs=1e-12)


def test_energy_is_charged_per_use_of_a_hosted_tool(gateway_factory, upstream):
    """Reserved for max_uses (1 + 3 x 2), settled at the uses made (1 + 2 x 2)."""
    allowed = {"web_search": {"energy_per_use": 2, "max_uses": 3}}
    gw = gateway_factory(plugins=["auth", "energy", ACCOUNTING],
                         **only_models([model("m", upstream, "openai/gpt-4o-mini", hosted_tools=allowed)]))
    user_id, key = gw.make_user(energy=100)
    upstream.hosted_tool_calls = 2
    gw.client(api_key=key).responses.create(model="m", input="hi", tools=[{"type": "web_search"}])
    gw.settle()
    only_row(gw)
    assert gw.balance(user_id) == 100 - 5


@pytest.mark.parametrize("accounting_first", [False, True], ids=["energy-then-accounting", "accounting-first"])
@pytest.mark.parametrize("stream", [False, True])
def test_the_settled_energy_of_hosted_tools_is_what_the_answer_and_the_row_say(gateway_factory, upstream, stream,
                                                                               accounting_first):
    """Reserved 7 (1 + 3 uses x 2), settled 5 (2 uses made): a JSON answer's X-Energy-Cost
    says 5 and its X-Energy-Remaining the balance after the settlement; a stream's headers
    leave before the uses are known, so they say what was reserved. The usage row says 5,
    in whichever order the chain lists accounting and energy."""
    allowed = {"web_search": {"energy_per_use": 2, "max_uses": 3}}
    plugins = ["auth", ACCOUNTING, "energy"] if accounting_first else ["auth", "energy", ACCOUNTING]
    gw = gateway_factory(plugins=plugins,
                         **only_models([model("m", upstream, "openai/gpt-4o-mini", hosted_tools=allowed)]))
    user_id, key = gw.make_user(energy=100)
    upstream.hosted_tool_calls = 2
    raw = gw.client(api_key=key).responses.with_raw_response.create(model="m", input="hi", stream=stream,
                                                                    tools=[{"type": "web_search"}])
    if stream:
        list(raw.parse())
        assert (raw.headers["X-Energy-Cost"], raw.headers["X-Energy-Remaining"]) == ("7", "93")
    else:
        assert (raw.headers["X-Energy-Cost"], raw.headers["X-Energy-Remaining"]) == ("5", "95")
    gw.settle()
    assert only_row(gw)["energy_cost"] == 5
    assert gw.balance(user_id) == 100 - 5


def test_a_journaled_hosted_tool_answer_is_replayed_at_its_settled_energy(gateway_factory, upstream):
    """A process killed after the answer left: the journal's record settles the uses made
    (5), not the reservation (7); a plain record settles as reserved."""
    gw = gateway_factory(plugins=["auth", "energy"])
    user_id, _ = gw.make_user(energy=100)
    assert gw.run(gw.store.reserve_energy(user_id, 7, "req-tools")).ok
    assert gw.run(gw.store.reserve_energy(user_id, 3, "req-plain")).ok
    energy = next(p for p in gw.state.chain.plugins if p.name == "energy")
    gw.run(energy.replay([["req-tools", 5], "req-plain"]))
    assert gw.balance(user_id) == 100 - 5 - 3
    gw.run(energy.replay([["req-tools", 5]]))  # a reservation no longer open is left alone
    assert gw.balance(user_id) == 100 - 5 - 3


def test_check_config_refuses_an_allowed_tool_without_a_usd_price(upstream):
    raw = {"store": {"url": "sqlite:///:memory:"},
           "models": [model("m", upstream, "openai/gpt-4o", hosted_tools={"image_generation": {}})]}
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(raw)
    assert any(e.startswith("models[0].hosted_tools.image_generation.usd_per_use:") for e in excinfo.value.errors)
    raw["models"][0]["hosted_tools"] = {"image_generation": {"usd_per_use": 0.04}, "code_interpreter": {}}
    load_config_data(raw)


def test_an_unknown_tool_type_is_refused(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    response = httpx.post(f"{gw.url}/v1/responses", json={"model": "m", "input": "hi",
                                                                 "tools": [{"type": "computer_use_preview"}]})
    assert response.status_code == 400 and response.json()["error"]["code"] == "unsupported_tool_type"
    assert upstream.count() == 0


def gemini_model(upstream: Any, **extra: Any) -> dict[str, Any]:
    return {"name": "gem", "litellm_params": {"model": "gemini/gemini-2.5-pro", "api_base": upstream.url,
                                              "api_key": "AIza-gemini-upstream-SECRET"}, **extra}


@pytest.mark.parametrize("params", [
    {"tools": [{"googleSearch": {}}]},
    {"tools": [{"type": "function", "googleSearch": {}}]},
    {"tools": [{"google_search": {}}]},
    {"tools": [{"type": "function", "function": {"name": "f"}, "codeExecution": {}}]},
    {"tools": [{"urlContext": {}}]},
    {"functions": [{"googleSearch": {}}]},
], ids=["googleSearch", "typed-googleSearch", "google_search", "codeExecution-beside-a-function", "urlContext",
        "functions"])
def test_a_gemini_built_in_tool_in_a_client_tools_shape_is_refused(gateway_factory, upstream, params):
    """litellm turns a tool holding `googleSearch` (and its siblings) into Gemini's built-in
    tool, run and charged by Google per use: passed as a plain function tool, it reached
    Gemini unbilled. A client tool has its own fields only."""
    gw = gateway(gateway_factory, upstream, gemini_model(upstream))
    response = httpx.post(f"{gw.url}/v1/chat/completions", json={"model": "gem", "messages": HELLO, **params})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "unsupported_tool_type" and error["param"] in ("tools[0]", "functions[0]")
    assert upstream.count() == 0


def test_a_responses_function_tool_with_foreign_fields_is_refused(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, model("m", upstream, "openai/gpt-4o"))
    tool = {"type": "function", "name": "f", "parameters": {"type": "object"}, "googleSearch": {}}
    response = httpx.post(f"{gw.url}/v1/responses", json={"model": "m", "input": "hi", "tools": [tool]})
    assert response.status_code == 400 and response.json()["error"]["param"] == "tools[0]"
    assert upstream.count() == 0


def test_plain_function_tools_still_pass(gateway_factory, upstream):
    gw = gateway(gateway_factory, upstream, gemini_model(upstream))
    gw.client().chat.completions.create(model="gem", messages=HELLO, tools=[{"type": "function", "function": {
        "name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}])
    assert upstream.count() == 1


@pytest.mark.parametrize("stream", [False, True])
def test_the_tier_anthropic_says_served_a_passed_through_message_is_billed(gateway_factory, upstream, stream):
    """Anthropic's default service_tier is `auto`: a Priority Tier account serves at
    priority, and the answer's usage says so. That tier's price applies (the operator's
    `pricing.priority`); with no price for it the cost is unknown (null), never the
    standard price. `standard` is the standard price."""
    pricing = {"input_per_million": 3, "output_per_million": 15,
               "priority": {"input_per_million": 5, "output_per_million": 25}}
    gw = gateway(gateway_factory, upstream, anthropic_model(upstream, pricing=pricing),
                 {**anthropic_model(upstream), "name": "claude-map"})
    client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0)

    asked = 0

    def ask(name: str) -> dict[str, Any]:
        nonlocal asked
        asked += 1
        if stream:
            with client.messages.stream(model=name, max_tokens=50, messages=HELLO) as s:
                "".join(s.text_stream)
        else:
            client.messages.create(model=name, max_tokens=50, messages=HELLO)
        rows = usage_rows(gw, asked)
        return max(rows, key=lambda r: r["created_at"])

    upstream.service_tier_served = "priority"
    row = ask("claude")
    assert float(row["cost_usd"]) == pytest.approx(PROMPT * pm(5) + COMPLETION * pm(25), abs=1e-12)
    assert json.loads(row["unit_prices"])["service_tier"] == "priority"
    assert ask("claude-map")["cost_usd"] is None  # the map has no Claude priority price
    upstream.service_tier_served = "standard"
    assert float(ask("claude")["cost_usd"]) == pytest.approx(PROMPT * pm(3) + COMPLETION * pm(15), abs=1e-12)
