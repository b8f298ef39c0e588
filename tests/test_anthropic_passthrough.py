"""POST /v1/messages to an Anthropic upstream is passed through: the client's blocks reach
Anthropic as sent (cache_control, thinking, top_k), the message and the SSE events come back
as Anthropic sent them, and the chain (energy, accounting, plugins' rewrites) still applies."""

from __future__ import annotations

import asyncio
import json
import time

import anthropic
import httpx
import pytest
from aiohttp import web

from gateway.admin.operations import MASTER
from tests.conftest import FULL_CHAIN
from tests.fakes import Fault

CHAIN = [*FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]
HEADERS = {"anthropic-version": "2023-06-01"}
CACHED_SYSTEM = [{"type": "text", "text": "A long, cached instruction.", "cache_control": {"type": "ephemeral"}}]
MESSAGES = [{"role": "user", "content": [
    {"type": "text", "text": "What is in this document?", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]


ONLY_THESE = {"tiers": {"free": {"models": ["*"]}, "pro": {"models": ["*"]}},
              "energy": {"default_action": "ai_message", "actions": {"ai_message": {"default": 1}}}}


def client(gw, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)


def test_the_clients_blocks_reach_anthropic_as_sent(gateway_factory, upstream):
    """cache_control, thinking and top_k survive (a translation through OpenAI's shape
    loses them); the gateway's own metadata fields do not leave; the model is the
    deployment's."""
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    client(gw, key).messages.create(model="claude", max_tokens=2000, system=CACHED_SYSTEM, messages=MESSAGES,
                                    thinking=thinking, extra_body={"top_k": 5},
                                    metadata={"user_id": "end-user-7", "action": "ai_message"})
    sent = upstream.last.json
    assert sent["model"] == "claude-haiku-4-5"
    assert sent["system"] == CACHED_SYSTEM and sent["messages"] == MESSAGES
    assert (sent["top_k"], sent["thinking"], sent["max_tokens"]) == (5, thinking, 2000)
    assert sent["metadata"] == {"user_id": "end-user-7"}
    assert "stream" not in sent


def test_the_message_comes_back_as_anthropic_sent_it_and_is_billed(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    upstream.cached_tokens, upstream.cache_write_tokens = 40, 9
    message = client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES)
    assert message.id.startswith("msg_fake_")  # Anthropic's own id, not a translation's
    assert message.model == "claude"  # the public model name, as on every endpoint
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.cache_creation_input_tokens, message.usage.output_tokens) == (11, 40, 9, 7)
    gw.settle()
    assert gw.balance(user_id) == 99
    [row] = gw.run(gw.store.usage_rows())
    assert (row["status"], row["tokens_prompt"], row["tokens_completion"]) == (200, 11 + 40 + 9, 7)
    assert (row["tokens_cached"], row["tokens_cache_write"]) == (40, 9)


def test_the_stream_is_anthropics_own_events(gateway_factory, upstream):
    """Every event as the upstream sent it, `ping` included (a re-encoded stream has none),
    message_start naming the public model; the SDK reads it; the stream is billed."""
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    upstream.chunks = 3
    with httpx.stream("POST", gw.url + "/v1/messages", headers={"x-api-key": key, **HEADERS}, timeout=20,
                      json={"model": "claude", "max_tokens": 20, "messages": MESSAGES, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [line.split(": ", 1)[1] for line in lines if line.startswith("event: ")]
    assert events == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 3,
                      "content_block_stop", "message_delta", "message_stop"]
    assert '"model":"claude"' in lines[1] and "msg_fake_" in lines[1]
    with client(gw, key).messages.stream(model="claude", max_tokens=20, messages=MESSAGES) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Hello from fake upstream" and final.usage.output_tokens == 7
    gw.settle()
    assert gw.balance(user_id) == 98
    assert [r["status"] for r in gw.run(gw.store.usage_rows())] == [200, 200]


def test_what_the_chain_changes_is_applied_to_the_passed_through_body(gateway_factory, upstream):
    """A workspace's injected system prompt and the model's output cap reach the upstream;
    the rest of the client's body stays verbatim."""
    models = [{"name": "claude", "max_tokens_cap": 100, "litellm_params": {
        "model": "anthropic/claude-haiku-4-5", "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}}]
    gw = gateway_factory(plugins=CHAIN, models=models, **ONLY_THESE)
    _, key = gw.make_user(energy=100)
    gw.run(gw.admin().update_workspace(MASTER, "acme", ai_settings={
        "inject_system_prompt": True, "system_prompt_template": "You serve acme."}))
    client(gw, key).messages.create(model="claude", max_tokens=5000, system="Be brief.", messages=MESSAGES)
    sent = upstream.last.json
    assert sent["system"] == "You serve acme.\nBe brief."
    assert sent["max_tokens"] == 100 and sent["messages"] == MESSAGES


def test_a_fallback_to_an_openai_model_is_translated(gateway_factory, upstream):
    """The pass-through is per attempt: when Claude fails over to an OpenAI-wire model, the
    answer (streamed or not) is translated into Anthropic's shapes as before."""
    models = [{"name": "claude", "fallbacks": ["gpt-4o-mini"], "litellm_params": {
        "model": "anthropic/claude-haiku-4-5", "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}},
              {"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini",
                                                         "api_base": upstream.openai_base, "api_key": "sk-x"}}]
    gw = gateway_factory(plugins=CHAIN, models=models, retries={"max_attempts": 1}, **ONLY_THESE)
    _, key = gw.make_user(energy=100)
    upstream.push(Fault.status(500))
    message = client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES)
    assert message.model == "gpt-4o-mini" and message.id.startswith("msg_chatcmpl")
    assert message.content[0].text == "Hello from fake upstream"
    upstream.push(Fault.status(500))
    with client(gw, key).messages.stream(model="claude", max_tokens=20, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "Hello from fake upstream"
    assert [r.path.rsplit("/", 1)[-1] for r in upstream.requests] == ["messages", "completions"] * 2


def test_an_idempotent_retry_replays_the_passed_through_answer(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    sdk = client(gw, key)
    headers = {"Idempotency-Key": "claude-once"}
    first = sdk.messages.create(model="claude", max_tokens=50, messages=MESSAGES, extra_headers=headers)
    gw.settle()
    again = sdk.messages.with_raw_response.create(model="claude", max_tokens=50, messages=MESSAGES,
                                                  extra_headers=headers)
    assert again.headers["Idempotent-Replayed"] == "true"
    replayed = again.parse()
    assert replayed.content[0].text == first.content[0].text and replayed.usage.output_tokens == 7
    assert upstream.count("/messages") == 1
    gw.settle()
    assert gw.balance(user_id) == 99


@pytest.mark.parametrize("stream", [False, True])
def test_a_passed_through_answer_is_not_cached(gateway_factory, upstream, stream):
    """A hit would be the gateway's translation of Anthropic's message, not the message:
    `usage.cache_creation` (and thinking blocks, citations, stop_sequence, service_tier)
    lost. The cache stores only what it replays exactly, so every repeat reaches Anthropic
    and gets Anthropic's own answer."""
    chain = ["auth", "tier_policy", {"name": "cache", "settings": {"models": ["claude"]}}, "energy"]
    gw = gateway_factory(plugins=chain)
    _, key = gw.make_user(energy=100)
    upstream.cached_tokens, upstream.cache_write_tokens = 40, 9
    body = {"model": "claude", "max_tokens": 50, "messages": MESSAGES, "temperature": 0, "stream": stream}
    headers = {**HEADERS, "x-api-key": key}
    first = httpx.post(f"{gw.url}/v1/messages", json=body, headers=headers, timeout=20)
    second = httpx.post(f"{gw.url}/v1/messages", json=body, headers=headers, timeout=20)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "MISS")
    assert upstream.count("/messages") == 2
    if stream:
        assert second.text.replace("msg_fake_2", "msg_fake_1") == first.text
    else:
        assert {**second.json(), "id": None} == {**first.json(), "id": None}
        assert second.json()["usage"]["cache_creation"] == {"ephemeral_5m_input_tokens": 9,
                                                            "ephemeral_1h_input_tokens": 0}


def test_a_translated_messages_answer_is_cached_and_its_hit_equals_the_miss(gateway_factory, upstream):
    """/v1/messages served by an OpenAI-wire model: the client's message is the gateway's
    translation either way, so a hit equals the miss (but its id)."""
    models = [{"name": "claude", "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": upstream.openai_base,
                                                    "api_key": "sk-x"}}]
    chain = ["auth", "tier_policy", {"name": "cache", "settings": {"models": ["claude"]}}, "energy"]
    gw = gateway_factory(plugins=chain, models=models, **ONLY_THESE)
    _, key = gw.make_user(energy=100)
    body = {"model": "claude", "max_tokens": 50, "messages": MESSAGES, "temperature": 0}
    headers = {**HEADERS, "x-api-key": key}
    first = httpx.post(f"{gw.url}/v1/messages", json=body, headers=headers, timeout=20)
    second = httpx.post(f"{gw.url}/v1/messages", json=body, headers=headers, timeout=20)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert {**second.json(), "id": None} == {**first.json(), "id": None}
    assert upstream.count() == 1


def test_an_idempotency_key_reused_with_another_passed_through_field_is_refused(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    headers = {"Idempotency-Key": "claude-k"}
    client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES, extra_headers=headers,
                                    extra_body={"top_k": 5})
    gw.settle()
    with pytest.raises(anthropic.UnprocessableEntityError):
        client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES, extra_headers=headers,
                                        extra_body={"top_k": 40})
    assert upstream.count("/messages") == 1


def test_a_downgrade_decided_after_dispatch_answers_with_the_model_that_was_billed(gateway_factory, upstream):
    """The overlapped reservation fails after Claude answered (another process spent the
    energy): the request is downgraded and dispatched again to gpt-4o-mini. The client gets
    gpt-4o-mini's answer, the one it is billed for, never the discarded Claude message."""
    from gateway.store import open_store

    models = [{"name": "claude", "downgrade_to": "gpt-4o-mini", "litellm_params": {
        "model": "anthropic/claude-haiku-4-5", "api_base": upstream.url, "api_key": "sk-ant-upstream-SECRET"}},
              {"name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini",
                                                         "api_base": upstream.openai_base, "api_key": "sk-x"}}]
    gw = gateway_factory(plugins=CHAIN, models=models, tiers=ONLY_THESE["tiers"],
                         energy={"default_action": "ai_message",
                                 "actions": {"ai_message": {"default": 1, "models": {"claude": 5, "gpt-4o-mini": 2}}}})
    user_id, key = gw.make_user(energy=10)
    sdk = client(gw, key)
    sdk.messages.create(model="claude", max_tokens=50, messages=MESSAGES)  # 5 left, as this process sees it

    async def spend_elsewhere():
        async with open_store(gw.store.url) as elsewhere:
            await elsewhere.grant_energy(user_id, -2, kind="adjust", reason="spent by another process")

    gw.run(spend_elsewhere())
    raw = sdk.messages.with_raw_response.create(model="claude", max_tokens=50, messages=MESSAGES)
    assert raw.headers["X-Model-Downgraded-From"] == "claude" and raw.headers["X-Energy-Cost"] == "2"
    assert [r.path.rsplit("/", 1)[-1] for r in upstream.requests] == ["messages", "messages", "completions"]
    message = raw.parse()
    assert message.model == "gpt-4o-mini" and message.id.startswith("msg_chatcmpl")


# --- a scripted Anthropic upstream: exact bytes, pauses between them ------------------

def sse(event: str, data: dict | bytes) -> bytes:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return b"event: " + event.encode() + b"\ndata: " + raw + b"\n\n"


START = sse("message_start", {"type": "message_start", "message": {
    "id": "msg_x", "type": "message", "role": "assistant", "model": "claude-haiku-4-5", "content": [],
    "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 1}}})
TEXT_BLOCK = sse("content_block_start", {"type": "content_block_start", "index": 1,
                                         "content_block": {"type": "text", "text": ""}})
THINKING_BLOCK = sse("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "thinking", "thinking": ""}})
END = (sse("content_block_stop", {"type": "content_block_stop", "index": 1})
       + sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": 2000}})
       + sse("message_stop", {"type": "message_stop"}))


def thinking(text: str) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                       "delta": {"type": "thinking_delta", "thinking": text}})


def text_delta(text: str, index: int = 1) -> bytes:
    return sse("content_block_delta", {"type": "content_block_delta", "index": index,
                                       "delta": {"type": "text_delta", "text": text}})


class Scripted:
    """An Anthropic upstream playing a script: bytes are written, numbers are pauses."""

    def __init__(self, script: list) -> None:
        self.script = script
        self.url = ""

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for item in self.script:
            if isinstance(item, (int, float)):
                await asyncio.sleep(item)
            else:
                await resp.write(item)
        return resp

    async def start(self) -> "Scripted":
        app = web.Application()
        app.router.add_post("/v1/messages", self._handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self


@pytest.fixture
def scripted_gateway(gateway_factory, server_thread):
    """scripted_gateway(script, **model settings): a gateway whose claude plays `script`."""
    started: list[Scripted] = []

    def make(script: list, **model_settings):
        up = server_thread.run(Scripted(script).start())
        started.append(up)
        models = [{"name": "claude", **model_settings, "litellm_params": {
            "model": "anthropic/claude-haiku-4-5", "api_base": up.url, "api_key": "sk-ant-upstream-SECRET"}}]
        return gateway_factory(plugins=CHAIN, models=models, **ONLY_THESE)

    yield make
    for up in started:
        server_thread.run(up.runner.cleanup())


def test_a_long_thinking_stream_is_alive_for_the_idle_timer_and_reaches_the_client_as_it_comes(scripted_gateway):
    """Thinking deltas and pings are upstream bytes: the idle timeout (1 s here) does not
    cut a stream that thinks for 2.4 s in 0.3 s steps, and the client gets them at once."""
    script = [START, THINKING_BLOCK]
    for _ in range(8):
        script += [0.3, thinking("hmm "), sse("ping", {"type": "ping"})]
    script += [sse("content_block_stop", {"type": "content_block_stop", "index": 0}), TEXT_BLOCK, text_delta("42"),
               END]
    gw = scripted_gateway(script, timeouts={"idle": 1.0})
    _, key = gw.make_user(energy=100)
    with client(gw, key).messages.stream(model="claude", max_tokens=4000, messages=MESSAGES,
                                         thinking={"type": "enabled", "budget_tokens": 2000}) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == "hmm " * 8 and final.content[-1].text == "42"


def test_a_client_that_leaves_after_the_thinking_is_billed_for_it(scripted_gateway):
    """The prompt's tokens come from message_start (exact); the thinking and text the
    client received are estimated: a client leaving before message_delta is not billed
    for the text alone."""
    thought = "step " * 2000
    script = [START, THINKING_BLOCK, thinking(thought), sse("content_block_stop", {
        "type": "content_block_stop", "index": 0}), TEXT_BLOCK]
    for _ in range(25):
        script += [text_delta("x"), 0.2]
    gw = scripted_gateway([*script, END])
    _, key = gw.make_user(energy=100)
    got = ""
    with httpx.stream("POST", gw.url + "/v1/messages", headers={"x-api-key": key, **HEADERS}, timeout=20,
                      json={"model": "claude", "max_tokens": 4000, "messages": MESSAGES, "stream": True,
                            "thinking": {"type": "enabled", "budget_tokens": 3000}}) as r:
        for line in r.iter_lines():
            got += line
            if "text_delta" in line:
                break  # leave with the whole reasoning in hand
    assert thought.strip() in got
    deadline = time.monotonic() + 15
    while not gw.run(gw.store.usage_rows()) and time.monotonic() < deadline:
        gw.settle()
    [row] = gw.run(gw.store.usage_rows())
    assert row["tokens_prompt"] == 10 and row["tokens_completion"] >= 2000 and row["usage_estimated"]


def test_a_carriage_return_in_an_upstream_event_does_not_break_the_clients_framing(scripted_gateway):
    """A bare CR is JSON whitespace but an SSE line end: such an event is re-encoded."""
    evil = b'{"type":"content_block_delta","index":0,\r\r"delta":{"type":"text_delta","text":"42"}}'
    first = [TEXT_BLOCK.replace(b'"index":1', b'"index":0'), sse("content_block_delta", evil),
             END.replace(b'"index":1', b'"index":0')]
    gw = scripted_gateway([START, *first])
    _, key = gw.make_user(energy=100)
    with client(gw, key).messages.stream(model="claude", max_tokens=50, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "42"


def test_server_tools_are_refused_as_their_use_could_not_be_billed(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    for tool, code in (({"type": "web_search_20250305", "name": "web_search", "max_uses": 50}, "hosted_tool_not_allowed"),
                       ({"type": "code_execution_20250522", "name": "code_execution"}, "unsupported_tool_type")):
        with pytest.raises(anthropic.BadRequestError) as excinfo:
            client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES, tools=[tool])
        assert f"({code})" in excinfo.value.body["error"]["message"]  # web search: unless the model allows it
    custom = {"type": "custom", "name": "lookup", "input_schema": {"type": "object", "properties": {}}}
    client(gw, key).messages.create(model="claude", max_tokens=50, messages=MESSAGES, tools=[custom])
    assert upstream.count("/messages") == 1 and upstream.last.json["tools"] == [custom]
    gw.settle()
    assert gw.balance(user_id) == 99
