"""Parity: the native Anthropic translation (gateway/providers/anthropic.py) and litellm give
the same client-visible results and send Anthropic the same request, for the same
requests against a fake Anthropic upstream speaking the real wire format."""

from __future__ import annotations

import openai
import pytest

from tests.fakes import Fault

PARAMS = {"model": "anthropic/claude-haiku-4-5", "api_key": "sk-ant-upstream-SECRET"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CASES = {
    "plain": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    "system and stop": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
                        "max_tokens": 50, "stop": ["\n\n", "END"], "temperature": 0.2, "top_p": 0.9},
    "multi-turn tools": {"max_tokens": 50, "tools": TOOLS, "tool_choice": "auto", "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "18C"},
        {"role": "user", "content": "Thanks"}]},
    "forced tool": {"max_tokens": 50, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "messages": [{"role": "user", "content": "Weather?"}]},
    "image": {"max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
}
SENT_KEYS = ("system", "messages", "max_tokens", "stop_sequences", "temperature", "top_p", "tools", "tool_choice")


@pytest.fixture
def both(gateway_factory, upstream):
    upstream.cached_tokens, upstream.cache_write_tokens = 30, 20
    models = [{"name": "native", "litellm_params": {**PARAMS, "api_base": upstream.url}},
              {"name": "litellm", "dispatch": "litellm", "litellm_params": {**PARAMS, "api_base": upstream.url}}]
    gw = gateway_factory(plugins=[], models=models, tiers={"free": {"models": ["*"]}},
                         energy={"actions": {"ai_message": {"default": 1}}})
    assert type(gw.state.router.dispatcher_for(gw.config.deployments("native")[0])).__name__ == \
        "AnthropicNativeDispatcher"
    return gw, upstream


def _sent(upstream):
    """What Anthropic received, in one spelling: a system prompt as text (litellm sends it
    as text blocks) and tools without litellm's explicit `"type": "custom"` (the default)."""
    body = upstream.last.json
    sent = {k: body.get(k) for k in SENT_KEYS}
    if isinstance(sent["system"], list):
        sent["system"] = "\n".join(b["text"] for b in sent["system"])
    for tool in sent["tools"] or ():
        if tool.get("type") == "custom":
            del tool["type"]
    return sent


@pytest.mark.parametrize("case", list(CASES))
def test_the_same_request_reaches_anthropic_the_same_and_answers_the_same(both, case):
    gw, upstream = both
    results, sent = {}, {}
    for model in ("native", "litellm"):
        answer = gw.client().chat.completions.create(model=model, **CASES[case])
        sent[model] = _sent(upstream)
        choice = answer.choices[0]
        results[model] = (choice.message.content, choice.finish_reason, answer.usage.prompt_tokens,
                          answer.usage.completion_tokens, answer.usage.total_tokens,
                          answer.usage.prompt_tokens_details.cached_tokens)
    assert results["native"] == results["litellm"]
    assert sent["native"] == sent["litellm"]


@pytest.mark.parametrize("case", ["plain", "system and stop"])
def test_streams_carry_the_same_text_finish_and_usage(both, case):
    gw, upstream = both
    upstream.chunks = 4
    seen = {}
    for model in ("native", "litellm"):
        chunks = list(gw.client().chat.completions.create(model=model, stream=True,
                                                          stream_options={"include_usage": True}, **CASES[case]))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        seen[model] = (text, finish, usage.prompt_tokens, usage.completion_tokens)
    assert seen["native"] == seen["litellm"]


@pytest.mark.parametrize("status,expected", [(400, 400), (429, 503), (529, 502), (401, 502)])
def test_errors_get_the_same_status(both, status, expected):
    gw, upstream = both
    got = {}
    for model in ("native", "litellm"):
        upstream.push(*[Fault.status(status, "nope")] * 3)
        with pytest.raises(openai.APIStatusError) as excinfo:
            gw.client().chat.completions.create(model=model, **CASES["plain"])
        got[model] = excinfo.value.status_code
    assert got == {"native": expected, "litellm": expected}


def test_requests_the_translation_does_not_cover_go_through_litellm(both):
    gw, upstream = both
    answer = gw.client().chat.completions.create(model="native", response_format={"type": "json_object"},
                                                 **CASES["plain"])
    assert answer.choices[0].message.content is not None
    assert upstream.count("/messages") == 1
