"""Long-context prices of Anthropic-direct Claude models (docs/billing.md: Price dimensions).

Anthropic bills every token of a request whose prompt (input + cache reads + cache writes)
has more than 200,000 tokens at its long-context rates: input and cache 2x, output 1.5x.
litellm's bundled map has those steps for the Bedrock and Vertex entries of Claude
Sonnet 4 / 4.5 but not for Anthropic's own `claude-sonnet-4-5`; the gateway supplements
them from the twin entry (gateway/price_map.py), and prices a prompt beyond a model's
`max_input_tokens` that has no long-context price as unknown (null), never at the base
price. Real HTTP: anthropic / openai SDK -> gateway -> fake Anthropic upstream -> store.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import litellm
import pytest

from gateway.config import ConfigError, load_config_data
from gateway.price_map import LONG_CONTEXT_TWINS, count_messages, model_info, supplement_long_context
from gateway.usage import batch_prices, estimate_usd_ceiling, token_prices
from plugins.base import Usage
from plugins.testing import make_ctx
from tests.fakes import Fault
from tests.test_accounting import only_row
from tests.test_chat import only_models

HELLO = [{"role": "user", "content": "hi"}]
ACCOUNTING = {"name": "accounting", "settings": {"flush_interval": 0.05}}
COMPLETION = 1_000
TWIN = "anthropic.claude-sonnet-4-5-20250929-v1:0"  # Bedrock's entry of the same model


def pm(usd_per_million: float) -> float:
    return usd_per_million / 1e6


# ------------------------------------------------------------------ the map and its twin


def test_the_map_lacks_the_step_its_twin_has():
    """What the supplement is for: if litellm's map gains the step, this test says so."""
    raw = litellm.model_cost
    assert not any("above_200k" in key for key in raw["claude-sonnet-4-5"])
    twin = raw[TWIN]
    assert (twin["input_cost_per_token_above_200k_tokens"], twin["output_cost_per_token_above_200k_tokens"],
            twin["cache_read_input_token_cost_above_200k_tokens"],
            twin["cache_creation_input_token_cost_above_200k_tokens"],
            twin["cache_creation_input_token_cost_above_1hr_above_200k_tokens"]) == pytest.approx(
        (pm(6), pm(22.5), pm(0.6), pm(7.5), pm(12)))


@pytest.mark.parametrize("name", ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "anthropic/claude-sonnet-4-5"])
def test_the_supplement_gives_the_anthropic_entries_their_twins_steps(name):
    info = model_info(name)
    twin = litellm.model_cost[TWIN]
    steps = {k: v for k, v in twin.items() if "_above_200k_tokens" in k}
    assert len(steps) == 5
    assert {k: info[k] for k in steps} == steps
    assert info["input_cost_per_token"] == pm(3)  # the base prices are the map's own


def test_models_without_a_twin_step_are_left_as_the_map_says():
    """Sonnet 4.6 and Opus 4.6 have a 1M window at their base price (Anthropic's model
    pages; the map and its Bedrock entries agree): nothing is added."""
    for name in ("claude-sonnet-4-6", "claude-opus-4-6", "claude-opus-4-5", "claude-haiku-4-5"):
        assert not any("_above_200k" in key for key in model_info(name))


def test_a_twin_whose_base_prices_differ_supplies_nothing():
    """The guard: a step is copied only from a twin with the very same base prices (a
    regional Bedrock entry at +10% would bill the wrong premium)."""
    base = {"input_cost_per_token": 3e-06, "output_cost_per_token": 1.5e-05, "cache_read_input_token_cost": 3e-07,
            "cache_creation_input_token_cost": 3.75e-06}
    twin = {**base, "input_cost_per_token_above_200k_tokens": 6e-06}
    prices = {"m": dict(base), "twin": twin, "dear": {**twin, "input_cost_per_token": 3.3e-06},
              "stepped": {**base, "input_cost_per_token_above_128k_tokens": 4e-06}}
    supplement_long_context(prices, {"m": "twin"})
    assert prices["m"]["input_cost_per_token_above_200k_tokens"] == 6e-06
    fresh = {"m": dict(base), "dear": prices["dear"], "stepped": prices["stepped"]}
    supplement_long_context(fresh, {"m": "dear", "stepped": "twin", "missing": "twin"})
    assert "input_cost_per_token_above_200k_tokens" not in fresh["m"]
    assert "input_cost_per_token_above_200k_tokens" not in fresh["stepped"]  # has a step of its own


def test_every_twin_named_exists_in_the_map_and_has_a_step():
    for twin in set(LONG_CONTEXT_TWINS.values()):
        assert any("_above_200k_tokens" in key for key in litellm.model_cost[twin]), twin


def _config(deployment: str, **extra: Any) -> Any:
    return load_config_data({"store": {"url": "sqlite:///:memory:"},
                             "models": [{"name": "m", "litellm_params": {"model": deployment}, **extra}]})


@pytest.mark.parametrize("prompt", [200_000, 200_001, 600_000])
@pytest.mark.parametrize("twin", ["vertex_ai/claude-sonnet-4-5", "bedrock/" + TWIN])
def test_the_supplemented_prices_equal_litellms_own_cost_of_the_twin(prompt, twin):
    """litellm has these prices for the twin entries: its cost_per_token there is what the
    gateway bills for Anthropic's own entry, cached and written tokens included."""
    cached, written, written_1h, completion = 40_000, 30_000, 10_000, 2_000
    config = _config("anthropic/claude-sonnet-4-5")
    prices, above = token_prices(config, "m", "anthropic/claude-sonnet-4-5", None, prompt)
    ours = prices.cost(Usage(prompt, completion, prompt + completion, cached_tokens=cached,
                             cache_write_tokens=written, cache_write_1h_tokens=written_1h))
    usage = litellm.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                          prompt_tokens_details={"cached_tokens": cached, "cache_creation_tokens": written,
                                                 "cache_creation_token_details": {
                                                     "ephemeral_5m_input_tokens": written - written_1h,
                                                     "ephemeral_1h_input_tokens": written_1h}})
    provider, name = twin.split("/", 1)
    theirs = sum(litellm.cost_per_token(model=name, custom_llm_provider=provider, usage_object=usage))
    assert float(ours) == pytest.approx(theirs, rel=1e-12)
    assert above == (200_000 if prompt > 200_000 else None)


def test_below_the_step_the_price_equals_litellms_for_the_anthropic_entry():
    config = _config("anthropic/claude-sonnet-4-5")
    prices, _ = token_prices(config, "m", "anthropic/claude-sonnet-4-5", None, 150_000)
    usage = litellm.Usage(prompt_tokens=150_000, completion_tokens=COMPLETION, total_tokens=151_000)
    theirs = sum(litellm.cost_per_token(model="claude-sonnet-4-5", custom_llm_provider="anthropic",
                                        usage_object=usage))
    assert float(prices.cost(Usage(150_000, COMPLETION, 151_000))) == pytest.approx(theirs, rel=1e-12)


def test_a_prompt_beyond_max_input_tokens_without_a_long_context_price_is_unpriced():
    """claude-opus-4-5: max_input_tokens 200,000 and no step. A reported prompt beyond it
    was served under terms the map does not know: no price (null), not the base price."""
    config = _config("anthropic/claude-opus-4-5")
    assert token_prices(config, "m", "anthropic/claude-opus-4-5", None, 200_000) is not None
    assert token_prices(config, "m", "anthropic/claude-opus-4-5", None, 200_001) is None
    # a 1M model priced flat by the map stays priced up to its window
    sonnet46 = _config("anthropic/claude-sonnet-4-6")
    prices, above = token_prices(sonnet46, "m", "anthropic/claude-sonnet-4-6", None, 900_000)
    assert (float(prices.input), above) == (pytest.approx(pm(3)), None)
    assert token_prices(sonnet46, "m", "anthropic/claude-sonnet-4-6", None, 1_000_001) is None
    # an embedding model's window is per input: many inputs together are priced as usual
    embed = _config("openai/text-embedding-3-small")
    assert token_prices(embed, "m", "openai/text-embedding-3-small", None, 50_000) is not None
    # the operator's pricing is taken as given, whatever the prompt
    priced = _config("anthropic/claude-opus-4-5", pricing={"input_per_million": 5, "output_per_million": 25})
    assert token_prices(priced, "m", "anthropic/claude-opus-4-5", None, 500_000) is not None


def test_a_batch_line_above_a_step_without_a_batch_price_is_unpriced():
    """Anthropic halves the long-context price in a batch too; the map has no batch step
    for claude-sonnet-4-5, and neither the standard step (2x) nor the base batch price
    (half) is what the line costs: null. A map batch step (claude-haiku-5-5) and the
    operator's `pricing.batches.long_context` are billed."""
    config = _config("anthropic/claude-sonnet-4-5")
    below = batch_prices(config, "m", "anthropic/claude-sonnet-4-5", 150_000)
    assert (float(below.tokens.input), below.above_tokens) == (pytest.approx(pm(1.5)), None)
    assert batch_prices(config, "m", "anthropic/claude-sonnet-4-5", 250_000) is None
    haiku = batch_prices(_config("anthropic/claude-haiku-5-5"), "m", "anthropic/claude-haiku-5-5", 150_000)
    assert (float(haiku.tokens.input), haiku.above_tokens) == (pytest.approx(pm(0.25)), 100_000)
    block = {"input_per_million": 1.5, "output_per_million": 7.5,
             "long_context": [{"above_tokens": 200_000, "input_per_million": 3, "output_per_million": 11.25}]}
    priced = _config("anthropic/claude-sonnet-4-5", pricing={"input_per_million": 3, "output_per_million": 15,
                                                             "batches": block})
    line = batch_prices(priced, "m", "anthropic/claude-sonnet-4-5", 250_000)
    assert (float(line.tokens.input), line.above_tokens) == (pytest.approx(pm(3)), 200_000)


def test_a_usd_budget_holds_a_long_prompt_at_the_long_context_price():
    """The hold before the call (gateway/budgets.py) prices the counted prompt above its
    step: every token at $6 / $22.50 (it held $3 / $15: a budget overrun by half)."""
    messages = [{"role": "user", "content": "hello " * 210_000}]
    config = _config("anthropic/claude-sonnet-4-5")
    ctx = make_ctx(config=config, model="m", body={"messages": messages, "max_tokens": 100})
    prompt = count_messages(messages)
    assert prompt > 200_000
    assert float(estimate_usd_ceiling(ctx, "m")) == pytest.approx(prompt * pm(6) + 100 * pm(22.5), abs=1e-9)
    short = make_ctx(config=config, model="m", body={"messages": HELLO, "max_tokens": 100})
    assert float(estimate_usd_ceiling(short, "m")) == pytest.approx(count_messages(HELLO) * pm(3) + 100 * pm(15),
                                                                    abs=1e-9)


# ------------------------------------------------------------------------ over real HTTP


def _params(upstream: Any, model: str = "anthropic/claude-sonnet-4-5") -> dict[str, Any]:
    return {"model": model, "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}


def _models(upstream: Any, **extra: Any) -> list[dict[str, Any]]:
    return [{"name": "claude", "litellm_params": _params(upstream), **extra},
            {"name": "claude-litellm", "dispatch": "litellm", "litellm_params": _params(upstream), **extra}]


PATHS = [("messages", "claude"), ("chat", "claude"), ("chat", "claude-litellm"), ("messages", "claude-litellm")]
PATH_IDS = ["messages-passthrough", "chat-native", "chat-litellm", "messages-litellm"]


def _ask(gw: Any, endpoint: str, model: str, stream: bool, api_key: str = "no-key") -> None:
    """One answer: the anthropic SDK on /v1/messages, the openai SDK on chat."""
    if endpoint == "messages":
        client = anthropic.Anthropic(base_url=gw.url, api_key=api_key, max_retries=0, timeout=20)
        kwargs = {"model": model, "max_tokens": 50, "messages": HELLO}
        if stream:
            with client.messages.stream(**kwargs) as events:
                events.get_final_message()
        else:
            client.messages.create(**kwargs)
        return
    client = gw.client(api_key=api_key)
    if stream:
        list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=50, stream=True,
                                            stream_options={"include_usage": True}))
    else:
        client.chat.completions.create(model=model, messages=HELLO, max_tokens=50)


def _report(upstream: Any, input_tokens: int, cached: int = 0, written: int = 0, written_1h: int = 0) -> None:
    """What Anthropic's usage says: `input_tokens` excludes the cache reads and writes."""
    upstream.prompt_tokens, upstream.completion_tokens = input_tokens, COMPLETION
    upstream.cached_tokens, upstream.cache_write_tokens, upstream.cache_write_1h_tokens = cached, written, written_1h


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("endpoint", "model"), PATHS, ids=PATH_IDS)
def test_a_long_prompt_is_billed_at_the_long_context_price_on_every_path(gateway_factory, upstream, endpoint,
                                                                         model, stream):
    """250,000 input tokens: $6 / $22.50 per million (was billed at $3 / $15: half)."""
    _report(upstream, 250_000)
    gw = gateway_factory(plugins=["auth", "energy", ACCOUNTING], **only_models(_models(upstream)))
    user_id, key = gw.make_user(energy=100)
    _ask(gw, endpoint, model, stream, api_key=key)
    row = only_row(gw)
    assert (row["tokens_prompt"], row["tokens_completion"]) == (250_000, COMPLETION)
    assert float(row["cost_usd"]) == pytest.approx(250_000 * pm(6) + COMPLETION * pm(22.5), abs=1e-12)
    assert float(row["cost_usd"]) == pytest.approx(1.5225, abs=1e-12)
    prices = json.loads(row["unit_prices"])
    assert (prices["above_tokens"], prices["input"], prices["output"]) == (200_000, 6, 22.5)
    assert (prices["cached_input"], prices["cache_write"], prices["cache_write_1h"]) == (0.6, 7.5, 12)
    assert row["energy_cost"] == 1 and gw.balance(user_id) == 99  # energy: the action's price


@pytest.mark.parametrize(("endpoint", "model"), [PATHS[0], PATHS[1]], ids=PATH_IDS[:2])
@pytest.mark.parametrize(("input_tokens", "expected"), [
    (200_000, 200_000 * pm(3) + COMPLETION * pm(15)),  # at the threshold: not above it
    (200_001, 200_001 * pm(6) + COMPLETION * pm(22.5)),
], ids=["200000", "200001"])
def test_the_step_applies_above_200000_prompt_tokens_not_at_them(gateway_factory, upstream, endpoint, model,
                                                                  input_tokens, expected):
    _report(upstream, input_tokens)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    _ask(gw, endpoint, model, stream=False)
    assert float(only_row(gw)["cost_usd"]) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize(("endpoint", "model"), PATHS, ids=PATH_IDS)
def test_cached_tokens_count_toward_the_threshold_and_are_billed_at_the_step(gateway_factory, upstream, endpoint,
                                                                           model, stream):
    """10,000 input + 150,000 cache reads + 60,000 cache writes (20,000 of them 1-hour) =
    220,000 prompt tokens: above the step though `input_tokens` alone is 10,000. Reads at
    $0.60, 5-minute writes at $7.50, 1-hour writes at $12 per million."""
    _report(upstream, 10_000, cached=150_000, written=60_000, written_1h=20_000)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    _ask(gw, endpoint, model, stream)
    row = only_row(gw)
    assert (row["tokens_prompt"], row["tokens_cached"], row["tokens_cache_write"]) == (220_000, 150_000, 60_000)
    expected = (10_000 * pm(6) + 150_000 * pm(0.6) + 40_000 * pm(7.5) + 20_000 * pm(12)
                + COMPLETION * pm(22.5))
    assert float(row["cost_usd"]) == pytest.approx(expected, abs=1e-12)
    assert float(row["cost_usd"]) == pytest.approx(0.7125, abs=1e-12)


@pytest.mark.parametrize(("endpoint", "model"), [PATHS[0], PATHS[2]], ids=[PATH_IDS[0], PATH_IDS[2]])
def test_the_operators_pricing_wins_over_the_supplement(gateway_factory, upstream, endpoint, model):
    pricing = {"input_per_million": 3, "output_per_million": 15,
               "long_context": [{"above_tokens": 200_000, "input_per_million": 7, "output_per_million": 30}]}
    _report(upstream, 250_000)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream, pricing=pricing)))
    _ask(gw, endpoint, model, stream=False)
    row = only_row(gw)
    assert float(row["cost_usd"]) == pytest.approx(250_000 * pm(7) + COMPLETION * pm(30), abs=1e-12)
    assert json.loads(row["unit_prices"])["above_tokens"] == 200_000


def test_a_prompt_beyond_the_window_of_a_model_without_a_step_is_billed_null(gateway_factory, upstream):
    """claude-opus-4-5 (200,000-token window, no long-context price anywhere in the map)
    answering 250,000 prompt tokens: the row's cost is null (counted in unpricedRequests),
    never the base price; the energy is settled as usual."""
    _report(upstream, 250_000)
    models = [{"name": "opus", "litellm_params": _params(upstream, "anthropic/claude-opus-4-5")}]
    gw = gateway_factory(plugins=["auth", "energy", ACCOUNTING], **only_models(models))
    user_id, key = gw.make_user(energy=100)
    _ask(gw, "messages", "opus", stream=False, api_key=key)
    row = only_row(gw)
    assert row["tokens_prompt"] == 250_000
    assert row["cost_usd"] is None and row["unit_prices"] is None
    assert gw.balance(user_id) == 99


def test_a_clients_anthropic_beta_header_does_not_reach_anthropic(gateway_factory, upstream):
    """The 1M window is not the client's to open: its `anthropic-beta` header stays at the
    gateway (an operator opens it with the deployment's `extra_headers`, below)."""
    _report(upstream, 10)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0, timeout=20)
    client.messages.create(model="claude", max_tokens=50, messages=HELLO,
                           extra_headers={"anthropic-beta": "context-1m-2025-08-07"})
    assert "anthropic-beta" not in upstream.last.headers


def test_an_operators_context_1m_header_reaches_anthropic_and_is_billed_at_the_step(gateway_factory, upstream):
    params = {**_params(upstream), "extra_headers": {"anthropic-beta": "context-1m-2025-08-07"}}
    _report(upstream, 300_000)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models([{"name": "claude-1m", "litellm_params": params}]))
    _ask(gw, "messages", "claude-1m", stream=False)
    assert "context-1m-2025-08-07" in upstream.last.headers.get("anthropic-beta", "")
    assert float(only_row(gw)["cost_usd"]) == pytest.approx(300_000 * pm(6) + COMPLETION * pm(22.5), abs=1e-12)


@pytest.mark.parametrize(("deployment", "pricing", "refused"), [
    ("anthropic/claude-opus-4-5", None, True),  # a 200k window, no step: a longer prompt has no price
    ("anthropic/claude-opus-4-5", {"input_per_million": 5, "output_per_million": 25,
                                   "long_context": [{"above_tokens": 200_000, "input_per_million": 10,
                                                     "output_per_million": 37.5}]}, False),
    ("anthropic/claude-sonnet-4-5", None, False),  # the supplemented step
    ("anthropic/claude-sonnet-4-6", None, False),  # a 1M window at the base price
])
def test_a_deployment_opening_the_1m_window_needs_a_long_context_price(deployment, pricing, refused):
    """Refused at load (check-config), naming the header, rather than billed null later."""
    entry = {"name": "m", "litellm_params": {"model": deployment, "api_key": "sk-ant-upstream-SECRET",
                                             "extra_headers": {"anthropic-beta": "context-1m-2025-08-07"}}}
    if pricing is not None:
        entry["pricing"] = pricing
    raw = {"store": {"url": "sqlite:///:memory:"}, "models": [entry]}
    if not refused:
        load_config_data(raw)
        return
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(raw)
    assert any(e.startswith("models[0].litellm_params.extra_headers.anthropic-beta: opens Anthropic's 1M window")
               for e in excinfo.value.errors)


def test_a_cut_passed_through_stream_is_billed_at_the_step(gateway_factory, upstream):
    """Anthropic's message_start reported 250,000 prompt tokens, then the stream broke: the
    prompt is exact, the output counted (estimated), both at the long-context price."""
    _report(upstream, 250_000)
    upstream.push(Fault.truncate(after_chunks=3))
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0, timeout=20)
    with pytest.raises(anthropic.APIError):
        with client.messages.stream(model="claude", max_tokens=50, messages=HELLO) as events:
            "".join(events.text_stream)
    row = only_row(gw)
    assert (row["tokens_prompt"], row["usage_estimated"]) == (250_000, True)
    assert json.loads(row["unit_prices"])["above_tokens"] == 200_000
    assert float(row["cost_usd"]) == pytest.approx(250_000 * pm(6) + row["tokens_completion"] * pm(22.5), abs=1e-12)
