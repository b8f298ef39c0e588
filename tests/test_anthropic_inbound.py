"""POST /v1/messages with the real `anthropic` SDK: the whole chain (auth by x-api-key,
energy, accounting) around any upstream, answers and errors in Anthropic's shapes."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from tests.conftest import FULL_CHAIN
from tests.fakes import Fault

MSGS = [{"role": "user", "content": "hi"}]
REPLY = "Hello from fake upstream"
CHAIN = [*FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]


def client(gw, key: str, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=kw.pop("max_retries", 0), timeout=20, **kw)


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude"], ids=["openai-upstream", "anthropic-upstream"])
def test_a_message_is_answered_charged_and_logged(gateway_factory, upstream, model):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    message = client(gw, key).messages.create(model=model, max_tokens=50, system="Be brief.", messages=MSGS)
    assert message.type == "message" and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"] and message.content[0].text == REPLY
    assert message.stop_reason == "end_turn" and message.model == model
    assert (message.usage.input_tokens, message.usage.output_tokens) == (11, 7)
    sent = upstream.last.json
    if model == "gpt-4o-mini":  # translated to OpenAI's chat shape on the way out
        assert sent["messages"][0] == {"role": "system", "content": "Be brief."} and sent["max_tokens"] == 50
    gw.settle()
    assert gw.balance(user_id) == 100 - (2 if model == "gpt-4o-mini" else 1)
    rows = gw.run(gw.store.usage_rows())
    assert [(r["status"], r["tokens_prompt"], r["tokens_completion"]) for r in rows] == [(200, 11, 7)]


async def test_a_streamed_message_arrives_as_anthropic_events(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    upstream.chunks = 3
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as sdk:
        async with sdk.messages.stream(model="gpt-4o-mini", max_tokens=50, messages=MSGS) as stream:
            text = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
    assert text == REPLY
    assert final.stop_reason == "end_turn" and final.usage.output_tokens == 7


def test_the_raw_stream_is_anthropics_event_sequence(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    with httpx.stream("POST", gw.url + "/v1/messages", headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
                      json={"model": "gpt-4o-mini", "max_tokens": 20, "messages": MSGS, "stream": True}) as r:
        events = [line.split(": ", 1)[1] for line in r.iter_lines() if line.startswith("event: ")]
    assert events[0] == "message_start" and events[1] == "content_block_start"
    assert set(events[2:-3]) == {"content_block_delta"}
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tools_and_tool_results_translate_both_ways(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    upstream.tool_call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    message = client(gw, key).messages.create(model="gpt-4o-mini", max_tokens=50, tools=tools,
                                              tool_choice={"type": "any"}, messages=MSGS)
    assert message.stop_reason == "tool_use"
    call = message.content[0]
    assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
    sent = upstream.last.json
    assert sent["tools"][0]["function"]["parameters"]["properties"]["city"] == {"type": "string"}
    assert sent["tool_choice"] == "required"
    upstream.tool_call = None
    client(gw, key).messages.create(model="gpt-4o-mini", max_tokens=50, tools=tools, messages=[
        *MSGS, {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": call.name,
                                                  "input": call.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C, sunny"}]}])
    turn = upstream.last.json["messages"]
    assert turn[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert turn[2] == {"role": "tool", "tool_call_id": call.id, "content": "18C, sunny"}


def test_errors_are_anthropic_shaped_and_insufficient_energy_is_not_retried(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=0)
    with pytest.raises(anthropic.AuthenticationError) as excinfo:
        client(gw, "gw-nobody").messages.create(model="gpt-4o-mini", max_tokens=5, messages=MSGS)
    assert excinfo.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.RateLimitError) as excinfo:  # the SDK's own retries left on
        client(gw, key, max_retries=2).messages.create(model="gpt-4o-mini", max_tokens=5, messages=MSGS)
    assert excinfo.value.body["type"] == "error" and "energy" in excinfo.value.body["error"]["message"]
    gw.settle()
    assert [r["status"] for r in gw.run(gw.store.usage_rows())].count(429) == 1  # x-should-retry: false held
    assert upstream.count() == 0
    _, rich = gw.make_user(energy=10)
    for bad in ({"top_a": 1}, {"max_tokens": None}):
        with pytest.raises(anthropic.BadRequestError) as excinfo:
            body = {"model": "gpt-4o-mini", "max_tokens": 5, "messages": MSGS, **bad}
            client(gw, rich).post("/v1/messages", cast_to=object, body={k: v for k, v in body.items() if v is not None})
        assert excinfo.value.body["error"]["type"] == "invalid_request_error"


def test_count_tokens_needs_a_key_and_costs_nothing(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=10)
    counted = client(gw, key).messages.count_tokens(model="gpt-4o-mini", messages=MSGS)
    assert counted.input_tokens > 0
    with pytest.raises(anthropic.AuthenticationError):
        client(gw, "gw-nobody").messages.count_tokens(model="gpt-4o-mini", messages=MSGS)
    assert gw.balance(user_id) == 10 and upstream.count() == 0


def test_count_tokens_for_a_claude_model_is_claudes_own_count(gateway_factory, upstream):
    """Anthropic counts its own tokens (the client's system, tools, thinking as sent); when
    it cannot answer, the gateway's estimate stands in."""
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=10)
    upstream.prompt_tokens = 4321
    counted = client(gw, key).messages.count_tokens(model="claude", system="Be brief.", messages=MSGS)
    assert counted.input_tokens == 4321
    sent = upstream.last
    assert sent.path.endswith("/v1/messages/count_tokens") and sent.headers["x-api-key"] == "sk-ant-upstream-SECRET"
    assert sent.json == {"model": "claude-haiku-4-5", "system": "Be brief.", "messages": MSGS}
    upstream.push(Fault.status(500))
    assert 0 < client(gw, key).messages.count_tokens(model="claude", messages=MSGS).input_tokens < 100
    assert gw.balance(user_id) == 10
