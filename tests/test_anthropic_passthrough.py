"""POST /v1/messages to an Anthropic upstream is passed through: the client's blocks reach
Anthropic as sent (cache_control, thinking, top_k), the message and the SSE events come back
as Anthropic sent them, and the chain (energy, accounting, plugins' rewrites) still applies."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from gateway.admin import MASTER
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


def test_the_cache_keys_what_is_passed_through(gateway_factory, upstream):
    """An Anthropic client's repeat is a hit (answered in Anthropic's shape); a request that
    differs only in a field the OpenAI form lacks (`top_k`) reaches Anthropic and is a miss."""
    chain = ["auth", "tier_policy", {"name": "cache", "settings": {"models": ["claude"]}}, "energy"]
    gw = gateway_factory(plugins=chain)
    _, key = gw.make_user(energy=100)
    sdk = client(gw, key)

    def ask(**extra):
        raw = sdk.messages.with_raw_response.create(model="claude", max_tokens=50, messages=MESSAGES,
                                                    extra_body={"temperature": 0, **extra})
        return raw.headers.get("X-Cache"), raw.parse()

    first, answer = ask(top_k=5)
    second, again = ask(top_k=5)
    third, _ = ask(top_k=40)
    assert (first, second, third) == ("MISS", "HIT", "MISS")
    assert again.type == "message" and again.content[0].text == answer.content[0].text
    assert upstream.count("/messages") == 2 and upstream.last.json["top_k"] == 40


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
