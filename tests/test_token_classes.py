"""Token classes priced correctly: cached prompt tokens, prompt-cache writes, reasoning
and audio tokens are each billed at their own unit price, never counted twice, and the
usage row keeps both the classes and the prices it was computed with.

Expected costs are computed by hand from litellm's bundled price map (the map entries are
asserted first, so a map update shows up as exactly that). Gateway tests run real HTTP:
openai SDK -> gateway -> (native pass-through | litellm) -> fake OpenAI / Anthropic
upstream reporting every class in its own wire format, into a real store.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from decimal import Decimal
from typing import Any

import anthropic
import asyncpg
import litellm
import pytest

from gateway.config import load_config_data
from gateway.store import open_store
from gateway.store.postgres import MIGRATIONS as POSTGRES_MIGRATIONS
from gateway.store.sqlite import MIGRATIONS as SQLITE_MIGRATIONS
from gateway.usage import UnitPrices, openai_usage, prices_for, usage_from_payload
from plugins.base import Usage
from tests.test_accounting import only_row, usage_rows
from tests.test_chat import only_models

HELLO = [{"role": "user", "content": "hi"}]
ACCOUNTING = {"name": "accounting", "settings": {"flush_interval": 0.05}}


def pm(usd_per_million: float) -> float:
    """USD per million tokens -> per token."""
    return usd_per_million / 1e6


# What the fake upstream reports. OpenAI: prompt 1000 of which 300 cached and 50 audio;
# completion 400 of which 120 reasoning and 30 audio. Anthropic: input_tokens 1000
# *excluding* 300 cache reads and 200 cache writes (so 1500 prompt tokens in all).
PROMPT, COMPLETION = 1000, 400
CACHED, CACHE_WRITE, REASONING, AUDIO_IN, AUDIO_OUT = 300, 200, 120, 50, 30


# ------------------------------------------------------------------- litellm's price map


def test_litellms_price_map_has_the_class_prices_these_tests_compute_with():
    """The hand-computed costs below rest on these entries (litellm 1.110.2's map)."""
    gpt4o = litellm.model_cost["gpt-4o"]
    assert (gpt4o["input_cost_per_token"], gpt4o["output_cost_per_token"]) == pytest.approx((pm(2.5), pm(10)))
    assert gpt4o["cache_read_input_token_cost"] == pytest.approx(pm(1.25))
    assert "input_cost_per_audio_token" not in gpt4o and "output_cost_per_reasoning_token" not in gpt4o
    haiku = litellm.model_cost["claude-haiku-4-5"]
    assert (haiku["input_cost_per_token"], haiku["output_cost_per_token"]) == pytest.approx((pm(1), pm(5)))
    assert (haiku["cache_read_input_token_cost"], haiku["cache_creation_input_token_cost"]) == pytest.approx((pm(0.1), pm(1.25)))
    assert haiku["cache_creation_input_token_cost_above_1hr"] == pytest.approx(pm(2))  # 1-hour writes: 2x input
    assert "cache_creation_input_token_cost_above_1hr" not in gpt4o
    audio = litellm.model_cost["gpt-4o-audio-preview-2024-12-17"]
    assert (audio["input_cost_per_audio_token"], audio["output_cost_per_audio_token"]) == pytest.approx((pm(40), pm(80)))
    assert (audio["input_cost_per_token"], audio["output_cost_per_token"]) == pytest.approx((pm(2.5), pm(10)))
    assert litellm.model_cost["gemini-2.5-flash"]["output_cost_per_reasoning_token"] == pytest.approx(pm(2.5))


def _config(models: list[dict[str, Any]]) -> Any:
    return load_config_data({"store": {"url": "sqlite:///:memory:"}, "models": models, "plugins": [],
                             "server": {"allow_unauthenticated": True}})


@pytest.mark.parametrize(("deployment", "expected"), [
    # cached reads at their own price; the other classes fall back to input / output
    ("openai/gpt-4o", UnitPrices(pm(2.5), pm(10), pm(1.25), pm(2.5), pm(10), pm(2.5), pm(10), pm(2.5))),
    # Anthropic: reads at 10% of input, writes at 125%, 1-hour writes at 200%
    ("anthropic/claude-haiku-4-5", UnitPrices(pm(1), pm(5), pm(0.1), pm(1.25), pm(5), pm(1), pm(5), pm(2))),
    # audio in and out at their own prices, no cache price: input
    ("openai/gpt-4o-audio-preview-2024-12-17",
     UnitPrices(pm(2.5), pm(10), pm(2.5), pm(2.5), pm(10), pm(40), pm(80), pm(2.5))),
    ("gemini/gemini-2.5-flash", UnitPrices(pm(0.3), pm(2.5), pm(0.03), pm(0.3), pm(2.5), pm(1), pm(2.5), pm(0.3))),
    ("demo/offline", UnitPrices(0, 0, 0, 0, 0, 0, 0, 0)),
], ids=["gpt-4o", "claude-haiku-4-5", "gpt-4o-audio", "gemini-2.5-flash", "demo"])
def test_each_class_takes_its_price_from_litellms_map_or_falls_back(deployment, expected):
    config = _config([{"name": "m", "litellm_params": {"model": deployment}}])
    assert asdict(prices_for(config, "m", deployment)) == pytest.approx(asdict(expected))


def test_config_pricing_prices_each_class_and_unpriced_classes_fall_back():
    config = _config([{"name": "m", "litellm_params": {"model": "openai/gpt-4o"},
                       "pricing": {"input_per_million": 2, "output_per_million": 8,
                                   "cached_input_per_million": 0.5, "reasoning_per_million": 12}}])
    assert asdict(prices_for(config, "m", "openai/gpt-4o")) == pytest.approx(
        asdict(UnitPrices(pm(2), pm(8), pm(0.5), pm(2), pm(12), pm(2), pm(8), pm(2))))


@pytest.mark.parametrize(("pricing", "write_1h"), [
    ({"cache_write_per_million": 3.75, "cache_write_1h_per_million": 6}, pm(6)),
    ({"cache_write_per_million": 3.75}, pm(3.75)),  # unset: a 1-hour write at the cache-write price
], ids=["own-price", "falls-back-to-cache-write"])
def test_config_pricing_prices_one_hour_cache_writes(pricing, write_1h):
    config = _config([{"name": "m", "litellm_params": {"model": "anthropic/claude-sonnet-4-5"},
                       "pricing": {"input_per_million": 3, "output_per_million": 15, **pricing}}])
    assert float(prices_for(config, "m", "anthropic/claude-sonnet-4-5").cache_write_1h) == pytest.approx(write_1h)


def test_a_negative_class_price_in_config_is_refused_with_its_path():
    with pytest.raises(Exception, match=r"models\[0\]\.pricing\.cache_write_per_million"):
        _config([{"name": "m", "litellm_params": {"model": "openai/gpt-4o"},
                  "pricing": {"input_per_million": 1, "output_per_million": 1, "cache_write_per_million": -1}}])


# ------------------------------------------------------------------------ cost of usage


GPT4O = UnitPrices.of(pm(2.5), pm(10), cached_input=pm(1.25))
HAIKU = UnitPrices.of(pm(1), pm(5), cached_input=pm(0.1), cache_write=pm(1.25))
DISTINCT = UnitPrices(pm(1), pm(2), pm(3), pm(4), pm(5), pm(6), pm(7), pm(8))  # every class its own price
HAIKU_1H = UnitPrices.of(pm(1), pm(5), cached_input=pm(0.1), cache_write=pm(1.25), cache_write_1h=pm(2))


@pytest.mark.parametrize(("prices", "usage", "expected"), [
    # plain tokens: as before the token classes
    (GPT4O, Usage(1000, 400, 1400), 1000 * pm(2.5) + 400 * pm(10)),
    # cached tokens are part of prompt_tokens: 700 plain + 300 cached, not 1000 + 300
    (GPT4O, Usage(1000, 400, 1400, cached_tokens=300), 700 * pm(2.5) + 300 * pm(1.25) + 400 * pm(10)),
    # reasoning tokens are part of completion_tokens, at the output price when unpriced
    (GPT4O, Usage(1000, 400, 1400, reasoning_tokens=120), 1000 * pm(2.5) + 400 * pm(10)),
    (HAIKU, Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200),
     1000 * pm(1) + 300 * pm(0.1) + 200 * pm(1.25) + 400 * pm(5)),
    # 1-hour writes are part of the cache writes, at their own price; the rest at 5 minutes'
    (HAIKU_1H, Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200, cache_write_1h_tokens=150),
     1000 * pm(1) + 300 * pm(0.1) + 50 * pm(1.25) + 150 * pm(2) + 400 * pm(5)),
    # more 1-hour writes claimed than writes: clamped to the writes
    (HAIKU_1H, Usage(1500, 400, 1900, cache_write_tokens=200, cache_write_1h_tokens=900),
     1300 * pm(1) + 200 * pm(2) + 400 * pm(5)),
    # a model without a 1-hour price bills them as cache writes
    (HAIKU, Usage(1500, 400, 1900, cache_write_tokens=200, cache_write_1h_tokens=150),
     1300 * pm(1) + 200 * pm(1.25) + 400 * pm(5)),
    (DISTINCT, Usage(1000, 400, 1400, cached_tokens=300, cache_write_tokens=200, audio_in_tokens=50,
                     reasoning_tokens=120, audio_out_tokens=30),
     450 * pm(1) + 300 * pm(3) + 200 * pm(4) + 50 * pm(6) + 250 * pm(2) + 120 * pm(5) + 30 * pm(7)),
    # classes that claim more than their total are clamped: never more tokens than reported
    (DISTINCT, Usage(100, 10, 110, cached_tokens=80, audio_in_tokens=80, reasoning_tokens=50),
     80 * pm(3) + 20 * pm(6) + 10 * pm(5)),
], ids=["plain", "cached", "reasoning-unpriced", "anthropic-cache", "anthropic-1h-writes", "1h-writes-clamped",
        "1h-writes-unpriced", "every-class", "clamped"])
def test_cost_prices_each_class_once(prices, usage, expected):
    assert float(prices.cost(usage)) == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------- usage parsing


LITELLM_ANTHROPIC = {  # what litellm 1.110.2 returns for an Anthropic answer (model_dump, cleaned)
    "prompt_tokens": 1500, "completion_tokens": 400, "total_tokens": 1900,
    "prompt_tokens_details": {"cached_tokens": 300, "cache_creation_tokens": 200, "cache_write_tokens": 200,
                              "text_tokens": 1000},
    "completion_tokens_details": {"reasoning_tokens": 0, "text_tokens": 400},
    "cache_creation_input_tokens": 200, "cache_read_input_tokens": 300,
}


@pytest.mark.parametrize(("usage", "expected"), [
    ({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}, Usage(11, 7, 18)),
    ({"prompt_tokens": 11, "completion_tokens": 7}, Usage(11, 7, 18)),
    ({"prompt_tokens": 1000, "completion_tokens": 400, "total_tokens": 1400,
      "prompt_tokens_details": {"cached_tokens": 300, "audio_tokens": 50},
      "completion_tokens_details": {"reasoning_tokens": 120, "audio_tokens": 30,
                                    "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
     Usage(1000, 400, 1400, cached_tokens=300, audio_in_tokens=50, reasoning_tokens=120, audio_out_tokens=30)),
    ({"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18,
      "prompt_tokens_details": None, "completion_tokens_details": None}, Usage(11, 7, 18)),
    # litellm's Anthropic translation: prompt_tokens already includes reads and writes,
    # which it reports twice (details and top level): each is counted once
    (LITELLM_ANTHROPIC, Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200)),
    ({"prompt_tokens": 1500, "completion_tokens": 400, "total_tokens": 1900,
      "cache_read_input_tokens": 300, "cache_creation_input_tokens": 200},
     Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200)),
    # Anthropic's own shape: input_tokens excludes the cache reads and writes
    ({"input_tokens": 1000, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 200,
      "output_tokens": 400}, Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200)),
    ({"input_tokens": 1000, "cache_read_input_tokens": None, "cache_creation_input_tokens": None,
      "output_tokens": 400}, Usage(1000, 400, 1400)),
    # Anthropic's split of the writes by lifetime (the 1-hour ones are part of the writes),
    # and litellm's translation of it
    ({"input_tokens": 1000, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 200,
      "cache_creation": {"ephemeral_5m_input_tokens": 50, "ephemeral_1h_input_tokens": 150}, "output_tokens": 400},
     Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200, cache_write_1h_tokens=150)),
    ({**LITELLM_ANTHROPIC, "prompt_tokens_details": {
        **LITELLM_ANTHROPIC["prompt_tokens_details"], "cache_creation_token_details": {
            "ephemeral_5m_input_tokens": 50, "ephemeral_30m_input_tokens": None, "ephemeral_1h_input_tokens": 150,
            "ephemeral_12h_input_tokens": None}}},
     Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200, cache_write_1h_tokens=150)),
    # the Responses API shape: input_tokens includes its cached tokens
    ({"input_tokens": 1000, "input_tokens_details": {"cached_tokens": 300}, "output_tokens": 400,
      "output_tokens_details": {"reasoning_tokens": 120}, "total_tokens": 1400},
     Usage(1000, 400, 1400, cached_tokens=300, reasoning_tokens=120)),
], ids=["openai", "openai-no-total", "openai-details", "openai-null-details", "litellm-anthropic",
        "litellm-anthropic-top-level-only", "anthropic-native", "anthropic-null-cache", "anthropic-1h-writes",
        "litellm-anthropic-1h-writes", "responses-api"])
def test_usage_is_read_from_every_providers_shape(usage, expected):
    assert usage_from_payload({"usage": usage}) == expected


def test_a_stored_answers_usage_reads_back_with_its_one_hour_writes():
    """A response-cache hit is priced (saved_usd) from the usage stored with the answer
    (`openai_usage`): the 1-hour part of its cache writes survives the round trip."""
    usage = Usage(1500, 400, 1900, cached_tokens=300, cache_write_tokens=200, cache_write_1h_tokens=150)
    assert usage_from_payload({"usage": openai_usage(usage)}) == usage


@pytest.mark.parametrize("payload", [{}, {"usage": None}, {"usage": "n/a"}], ids=["absent", "null", "not-object"])
def test_a_payload_without_usage_has_none(payload):
    assert usage_from_payload(payload) is None


# ------------------------------------------------------------------ through the gateway


def _models(upstream: Any) -> list[dict[str, Any]]:
    openai_params = {"api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}
    return [
        {"name": "gpt-4o-native", "dispatch": "native", "litellm_params": {"model": "openai/gpt-4o", **openai_params}},
        {"name": "gpt-4o-litellm", "dispatch": "litellm",
         "litellm_params": {"model": "openai/gpt-4o", **openai_params}},
        {"name": "audio-native", "dispatch": "native",
         "litellm_params": {"model": "openai/gpt-4o-audio-preview-2024-12-17", **openai_params}},
        {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5", "api_base": upstream.url,
                                              "api_key": "sk-ant-upstream-SECRET"}},
        {"name": "priced", "dispatch": "native", "litellm_params": {"model": "openai/gpt-4o", **openai_params},
         "pricing": {"input_per_million": 2, "output_per_million": 8, "cached_input_per_million": 0.5,
                     "reasoning_per_million": 12, "audio_input_per_million": 20, "audio_output_per_million": 40}},
    ]


def _report_every_class(upstream: Any) -> None:
    upstream.prompt_tokens, upstream.completion_tokens = PROMPT, COMPLETION
    upstream.cached_tokens, upstream.cache_write_tokens = CACHED, CACHE_WRITE
    upstream.reasoning_tokens, upstream.audio_in_tokens, upstream.audio_out_tokens = REASONING, AUDIO_IN, AUDIO_OUT


# OpenAI-wire: 650 plain prompt + 300 cached + 50 audio; 250 plain completion + 120
# reasoning + 30 audio (cache writes are Anthropic's: the fake sends none on OpenAI).
OPENAI_CLASSES = (PROMPT, COMPLETION, CACHED, 0, REASONING, AUDIO_IN, AUDIO_OUT)
GPT4O_COST = 650 * pm(2.5) + 300 * pm(1.25) + 50 * pm(2.5) + 250 * pm(10) + 120 * pm(10) + 30 * pm(10)
GPT4O_PRICES = {"input": 2.5, "output": 10, "cached_input": 1.25, "cache_write": 2.5, "reasoning": 10,
                "audio_input": 2.5, "audio_output": 10, "cache_write_1h": 2.5}
CASES = {
    # model: (tokens_prompt, tokens_completion, cached, cache_write, reasoning, audio_in, audio_out),
    #        cost by hand, unit prices per million
    "gpt-4o-native": (OPENAI_CLASSES, GPT4O_COST, GPT4O_PRICES),
    "gpt-4o-litellm": (OPENAI_CLASSES, GPT4O_COST, GPT4O_PRICES),
    "audio-native": (OPENAI_CLASSES,
                     650 * pm(2.5) + 300 * pm(2.5) + 50 * pm(40) + 250 * pm(10) + 120 * pm(10) + 30 * pm(80),
                     {"input": 2.5, "output": 10, "cached_input": 2.5, "cache_write": 2.5, "reasoning": 10,
                      "audio_input": 40, "audio_output": 80, "cache_write_1h": 2.5}),
    # Anthropic: input_tokens (1000) excludes reads (300) and writes (200); Anthropic
    # reports no reasoning or audio tokens here.
    "claude": ((PROMPT + CACHED + CACHE_WRITE, COMPLETION, CACHED, CACHE_WRITE, 0, 0, 0),
               1000 * pm(1) + 300 * pm(0.1) + 200 * pm(1.25) + 400 * pm(5),
               {"input": 1, "output": 5, "cached_input": 0.1, "cache_write": 1.25, "reasoning": 5,
                "audio_input": 1, "audio_output": 5, "cache_write_1h": 2}),
    "priced": (OPENAI_CLASSES, 650 * pm(2) + 300 * pm(0.5) + 50 * pm(20) + 250 * pm(8) + 120 * pm(12) + 30 * pm(40),
               {"input": 2, "output": 8, "cached_input": 0.5, "cache_write": 2, "reasoning": 12,
                "audio_input": 20, "audio_output": 40, "cache_write_1h": 2}),
}
CLASS_COLUMNS = ("tokens_prompt", "tokens_completion", "tokens_cached", "tokens_cache_write", "tokens_reasoning",
                 "tokens_audio_in", "tokens_audio_out")


def _ask(gw: Any, model: str, stream: bool) -> Any:
    """One chat completion; returns the usage the client received."""
    client = gw.client()
    if not stream:
        return client.chat.completions.create(model=model, messages=HELLO, max_tokens=50).usage
    chunks = list(client.chat.completions.create(model=model, messages=HELLO, max_tokens=50, stream=True,
                                                 stream_options={"include_usage": True}))
    return chunks[-1].usage


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize("model", list(CASES))
def test_every_token_class_is_billed_at_its_price_and_kept_on_the_row(gateway_factory, upstream, model, stream):
    tokens, cost, prices = CASES[model]
    _report_every_class(upstream)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    usage = _ask(gw, model, stream)
    row = only_row(gw)
    assert tuple(row[c] for c in CLASS_COLUMNS) == tokens
    assert row["tokens_total"] == tokens[0] + tokens[1]
    assert row["usage_estimated"] is False
    assert float(row["cost_usd"]) == pytest.approx(cost, abs=1e-12)
    assert json.loads(row["unit_prices"]) == prices
    # the client sees the classes too (on the litellm path as well: they are not stripped)
    assert usage.prompt_tokens == tokens[0]
    assert usage.prompt_tokens_details.cached_tokens == CACHED
    if model != "claude":
        assert usage.completion_tokens_details.reasoning_tokens == REASONING
    else:
        assert usage.model_extra["cache_creation_input_tokens"] == CACHE_WRITE


def test_litellms_private_usage_fields_do_not_reach_the_client(gateway_factory, upstream):
    """litellm adds its own "cost" guess to a streamed Anthropic usage chunk: not ours to send."""
    _report_every_class(upstream)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    usage = _ask(gw, "claude", stream=True)
    assert set(usage.model_dump(exclude_none=True)) <= {
        "prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details", "completion_tokens_details",
        "cache_read_input_tokens", "cache_creation_input_tokens"}
    only_row(gw)


@pytest.mark.parametrize(("model", "deployment"), [
    ("claude", "anthropic/claude-haiku-4-5"), ("gpt-4o-litellm", "openai/gpt-4o"),
    ("audio-native", "openai/gpt-4o-audio-preview-2024-12-17")])
def test_our_cost_matches_litellms_own_over_the_same_usage(gateway_factory, upstream, model, deployment):
    """A conformance check against the library: litellm's cost_per_token over the row's
    token classes agrees with the cost we logged."""
    _report_every_class(upstream)
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_models(upstream)))
    gw.client().chat.completions.create(model=model, messages=HELLO, max_tokens=50)
    row = only_row(gw)
    usage = litellm.Usage(
        prompt_tokens=row["tokens_prompt"], completion_tokens=row["tokens_completion"],
        total_tokens=row["tokens_total"],
        prompt_tokens_details={"cached_tokens": row["tokens_cached"], "audio_tokens": row["tokens_audio_in"],
                               "cache_creation_tokens": row["tokens_cache_write"]},
        completion_tokens_details={"reasoning_tokens": row["tokens_reasoning"], "audio_tokens": row["tokens_audio_out"]})
    provider, name = deployment.split("/", 1)
    theirs = sum(litellm.cost_per_token(model=name, custom_llm_provider=provider, usage_object=usage))
    assert float(row["cost_usd"]) == pytest.approx(theirs, abs=1e-12)


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_price_change_does_not_rewrite_the_prices_of_earlier_rows(gateway_factory, upstream, store_url):
    _report_every_class(upstream)
    models = _models(upstream)
    first = gateway_factory(plugins=[ACCOUNTING], **only_models(models))
    first.client().chat.completions.create(model="priced", messages=HELLO)
    before = only_row(first)
    models[-1]["pricing"] = {"input_per_million": 4, "output_per_million": 16}
    second = gateway_factory(plugins=[ACCOUNTING], **only_models(models))
    second.client().chat.completions.create(model="priced", messages=HELLO)
    old, new = usage_rows(second, 2)
    assert (old["cost_usd"], old["unit_prices"]) == (before["cost_usd"], before["unit_prices"])
    assert json.loads(old["unit_prices"])["cached_input"] == 0.5
    assert json.loads(new["unit_prices"]) == {"input": 4, "output": 16, "cached_input": 4, "cache_write": 4,
                                              "reasoning": 16, "audio_input": 4, "audio_output": 16,
                                              "cache_write_1h": 4}
    assert float(new["cost_usd"]) == pytest.approx(PROMPT * pm(4) + COMPLETION * pm(16), abs=1e-12)


def test_an_unpriced_model_logs_neither_cost_nor_prices(gateway_factory, upstream):
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models([
        {"name": "mystery", "dispatch": "native",
         "litellm_params": {"model": "openai/no-such-model-xyz", "api_base": upstream.openai_base,
                            "api_key": "sk-upstream-openai-SECRET"}}]))
    gw.client().chat.completions.create(model="mystery", messages=HELLO)
    row = only_row(gw)
    assert (row["cost_usd"], row["unit_prices"]) == (None, None)


# ------------------------------------------------------------------------- migration


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_store_of_the_old_schema_moves_forward_without_losing_a_row(store_url):
    """A database created before the token classes (migration 1 only), with a usage row,
    opens with today's code: the row is kept (classes 0, prices unknown) and new rows
    carry the classes."""
    import asyncio

    async def create_old_schema() -> None:
        if store_url.startswith("sqlite"):
            db = sqlite3.connect(store_url[len("sqlite:///"):])
            db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
            for sql in dict(SQLITE_MIGRATIONS)[1]:
                db.execute(sql)
            db.execute("INSERT INTO schema_migrations VALUES (1, 0)")
            db.execute("INSERT INTO ai_usage_logs (request_id, model, tokens_prompt, tokens_completion, tokens_total,"
                       " cost_usd, created_at) VALUES ('req-old', 'gpt-4o', 10, 5, 15, 0.000075,"
                       " '2024-05-01T12:00:00.000000Z')")
            db.commit()
            db.close()
            return
        base, schema = store_url.split("?schema=")
        conn = await asyncpg.connect(base)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"; SET search_path TO "{schema}"')
            await conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY,"
                               " applied_at double precision NOT NULL)")
            await conn.execute(dict(POSTGRES_MIGRATIONS)[1])
            await conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
            await conn.execute("INSERT INTO ai_usage_logs (request_id, model, tokens_prompt, tokens_completion,"
                               " tokens_total, cost_usd, created_at) VALUES ('req-old', 'gpt-4o', 10, 5, 15,"
                               " 0.000075, '2024-05-01T12:00:00Z')")
        finally:
            await conn.close()

    async def scenario() -> None:
        await create_old_schema()
        async with open_store(store_url) as store:
            assert await store.migrate() == []  # opening applied it; a second run finds nothing to do
            (old,) = await store.usage_rows()
            assert (old["request_id"], old["tokens_prompt"], old["cost_usd"]) == ("req-old", 10, Decimal("0.000075"))
            assert {c: old[c] for c in CLASS_COLUMNS[2:]} == dict.fromkeys(CLASS_COLUMNS[2:], 0)
            assert old["unit_prices"] is None
            await store.insert_usage([{"request_id": "req-new", "model": "gpt-4o", "tokens_prompt": 100,
                                       "tokens_cached": 40, "tokens_reasoning": 7,
                                       "unit_prices": GPT4O.per_million_json}])
            new = (await store.usage_rows())[-1]
            assert (new["request_id"], new["tokens_cached"], new["tokens_reasoning"]) == ("req-new", 40, 7)
            assert json.loads(new["unit_prices"]) == GPT4O_PRICES

    asyncio.run(scenario())


# ------------------------------------------------------------- 1-hour prompt-cache writes


WRITES = 100_000  # a large prompt written to Anthropic's cache, on top of 10 input tokens


def _haiku(key: str) -> float:
    return litellm.model_cost["claude-haiku-4-5"][key]


def _one_hour_models(upstream: Any) -> list[dict[str, Any]]:
    params = {"model": "anthropic/claude-haiku-4-5", "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}
    return [{"name": "claude", "litellm_params": params},
            {"name": "claude-litellm", "dispatch": "litellm", "litellm_params": params}]


def _ask_anthropic(gw: Any, endpoint: str, model: str, stream: bool) -> None:
    """One answer over real HTTP: the anthropic SDK on /v1/messages (passed through to
    Anthropic natively, translated by litellm), the openai SDK on /v1/chat/completions."""
    cached = [{"type": "text", "text": "A long document.", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    if endpoint == "messages":
        client = anthropic.Anthropic(base_url=gw.url, api_key="no-key", max_retries=0, timeout=20)
        kwargs = {"model": model, "max_tokens": 50, "system": cached, "messages": HELLO}
        if stream:
            with client.messages.stream(**kwargs) as events:
                assert events.get_final_message().usage.output_tokens == 5
        else:
            assert client.messages.create(**kwargs).usage.output_tokens == 5
        return
    messages = [{"role": "system", "content": cached}, *HELLO]
    if stream:
        chunks = list(gw.client().chat.completions.create(model=model, messages=messages, max_tokens=50, stream=True,
                                                          stream_options={"include_usage": True}))
        assert chunks[-1].usage.completion_tokens == 5
    else:
        assert gw.client().chat.completions.create(model=model, messages=messages, max_tokens=50).usage \
            .completion_tokens == 5


PATHS = [("messages", "claude"), ("chat", "claude"), ("chat", "claude-litellm"), ("messages", "claude-litellm")]
PATH_IDS = ["messages-passthrough", "chat-native", "chat-litellm", "messages-litellm"]


@pytest.mark.parametrize("stream", [False, True], ids=["non-stream", "stream"])
@pytest.mark.parametrize(("endpoint", "model"), PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("lifetime", ["1h", "5m"])
def test_one_hour_cache_writes_are_billed_at_their_own_price(gateway_factory, upstream, endpoint, model, stream,
                                                             lifetime):
    """Anthropic bills a 1-hour cache write at `cache_creation_input_token_cost_above_1hr`
    (2x input for claude-haiku-4-5), a 5-minute one at `cache_creation_input_token_cost`
    (1.25x): the row's cost says which, on every path, and its unit_prices name both."""
    upstream.prompt_tokens, upstream.completion_tokens = 10, 5
    upstream.cache_write_tokens = WRITES
    upstream.cache_write_1h_tokens = WRITES if lifetime == "1h" else 0
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_one_hour_models(upstream)))
    _ask_anthropic(gw, endpoint, model, stream)
    row = only_row(gw)
    write_price = _haiku("cache_creation_input_token_cost_above_1hr" if lifetime == "1h"
                         else "cache_creation_input_token_cost")
    assert (row["tokens_prompt"], row["tokens_completion"], row["tokens_cache_write"]) == (10 + WRITES, 5, WRITES)
    assert float(row["cost_usd"]) == pytest.approx(
        10 * _haiku("input_cost_per_token") + WRITES * write_price + 5 * _haiku("output_cost_per_token"), abs=1e-12)
    prices = json.loads(row["unit_prices"])
    assert (prices["cache_write"], prices["cache_write_1h"]) == pytest.approx(
        (_haiku("cache_creation_input_token_cost") * 1e6, _haiku("cache_creation_input_token_cost_above_1hr") * 1e6))


def test_the_native_translation_reports_the_write_lifetimes_as_litellm_does(gateway_factory, upstream):
    """Parity: a chat client sees the same split of the cache writes on both paths."""
    upstream.cache_write_tokens, upstream.cache_write_1h_tokens = 300, 200
    gw = gateway_factory(plugins=[], **only_models(_one_hour_models(upstream)))
    seen = {}
    for model in ("claude", "claude-litellm"):
        details = gw.client().chat.completions.create(model=model, messages=HELLO, max_tokens=50) \
            .usage.prompt_tokens_details.model_extra["cache_creation_token_details"]
        seen[model] = (details["ephemeral_5m_input_tokens"], details["ephemeral_1h_input_tokens"])
    assert seen == {"claude": (100, 200), "claude-litellm": (100, 200)}


def test_our_cost_of_one_hour_writes_matches_litellms_own(gateway_factory, upstream):
    """Conformance: litellm's cost_per_token over the same usage, its 5m/1h split included."""
    upstream.prompt_tokens, upstream.completion_tokens = 10, 5
    upstream.cached_tokens, upstream.cache_write_tokens, upstream.cache_write_1h_tokens = 300, WRITES, 60_000
    gw = gateway_factory(plugins=[ACCOUNTING], **only_models(_one_hour_models(upstream)))
    gw.client().chat.completions.create(model="claude", messages=HELLO, max_tokens=50)
    row = only_row(gw)

    def litellms_cost(**details: Any) -> float:
        usage = litellm.Usage(prompt_tokens=row["tokens_prompt"], completion_tokens=row["tokens_completion"],
                              total_tokens=row["tokens_total"], prompt_tokens_details={
                                  "cached_tokens": 300, "cache_creation_tokens": WRITES, **details})
        return sum(litellm.cost_per_token(model="claude-haiku-4-5", custom_llm_provider="anthropic",
                                          usage_object=usage))

    split = {"ephemeral_5m_input_tokens": WRITES - 60_000, "ephemeral_1h_input_tokens": 60_000}
    assert float(row["cost_usd"]) == pytest.approx(litellms_cost(cache_creation_token_details=split), abs=1e-12)
    assert row["cost_usd"] > litellms_cost()  # what every write at the 5-minute price came to
