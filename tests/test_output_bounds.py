"""models[].max_tokens_default and max_tokens_cap: an answer's length is its cost."""

from __future__ import annotations

import pytest

from gateway.config import ConfigError, load_config_data

MSGS = [{"role": "user", "content": "hi"}]


def models(upstream, **bounds):
    return [{"name": "m", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                            "api_key": "sk-x"}, **bounds},
            {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5", "api_base": upstream.url,
                                                 "api_key": "sk-ant-x"}, **bounds}]


def test_a_request_without_a_limit_gets_the_models_default(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], models=models(upstream, max_tokens_default=256),
                         tiers={"free": {"models": ["*"]}}, energy={"actions": {"ai_message": {"default": 1}}})
    gw.client().chat.completions.create(model="m", messages=MSGS)
    assert upstream.last.json["max_tokens"] == 256
    gw.client().chat.completions.create(model="claude", messages=MSGS)  # litellm -> Anthropic
    assert upstream.last.json["max_tokens"] == 256
    gw.client().chat.completions.create(model="m", messages=MSGS, max_completion_tokens=40)  # the client's own
    assert upstream.last.json["max_completion_tokens"] == 40 and "max_tokens" not in upstream.last.json


def test_a_limit_above_the_cap_is_lowered_and_said_so(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], models=models(upstream, max_tokens_cap=100),
                         tiers={"free": {"models": ["*"]}}, energy={"actions": {"ai_message": {"default": 1}}})
    raw = gw.client().chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=5000)
    assert upstream.last.json["max_tokens"] == 100 and raw.headers["X-Max-Tokens-Capped"] == "100"
    raw = gw.client().chat.completions.with_raw_response.create(model="m", messages=MSGS, max_tokens=50)
    assert upstream.last.json["max_tokens"] == 50 and "X-Max-Tokens-Capped" not in raw.headers
    gw.client().responses.create(model="m", input="hi", max_output_tokens=999)
    assert upstream.last.json["max_output_tokens"] == 100


def test_a_default_above_the_cap_is_a_config_error(upstream):
    with pytest.raises(ConfigError) as excinfo:
        load_config_data({"models": models(upstream, max_tokens_default=500, max_tokens_cap=100)})
    assert "models[0].max_tokens_default" in str(excinfo.value)
