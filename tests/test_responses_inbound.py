"""POST /v1/responses with the real openai SDK's `client.responses.create`, stream and not:
passed through to OpenAI-wire upstreams, usage (cached, reasoning) accounted, energy
charged; a model served through litellm answers a clear 400."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import FULL_CHAIN
from tests.fakes import Fault

CHAIN = [*FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]
REPLY = "Hello from fake upstream"


def test_a_response_is_passed_through_charged_and_logged(gateway_factory, upstream):
    upstream.cached_tokens, upstream.reasoning_tokens = 4, 3
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    response = gw.client(key).responses.create(model="gpt-4o-mini", input="hi", instructions="Be brief.",
                                               metadata={"action": "ai_message"})
    assert response.output_text == REPLY and response.model == "gpt-4o-mini"
    assert response.usage.input_tokens_details.cached_tokens == 4
    sent = upstream.last
    assert sent.path.endswith("/responses") and sent.json["instructions"] == "Be brief."
    assert "metadata" not in sent.json and sent.json["model"] == "gpt-4o-mini"
    gw.settle()
    assert gw.balance(user_id) == 98
    row = gw.run(gw.store.usage_rows())[0]
    assert (row["status"], row["tokens_prompt"], row["tokens_cached"], row["tokens_reasoning"]) == (200, 11, 4, 3)


def test_a_streamed_response_arrives_as_its_events_and_is_billed_at_completion(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    upstream.chunks = 3
    events = list(gw.client(key).responses.create(model="gpt-4o-mini", input="hi", stream=True))
    types = [e.type for e in events]
    assert types[0] == "response.created" and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert events[-1].response.usage.output_tokens == 7
    gw.settle()
    assert gw.balance(user_id) == 98


def test_a_stream_cut_before_completion_is_refunded(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN, retries={"max_attempts": 1})
    user_id, key = gw.make_user(energy=100)
    upstream.push(Fault.truncate())
    events = list(gw.client(key).responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert [e.type for e in events] == ["response.created", "response.output_item.added", "error"]  # its own error event
    assert events[-1].code == "upstream_stream_truncated"
    gw.settle()
    assert gw.balance(user_id) == 100


def test_a_model_served_through_litellm_is_a_clear_400_and_unknown_fields_are_refused(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client(key).responses.create(model="claude", input="hi")
    assert excinfo.value.body["code"] == "responses_not_supported" and "claude" in excinfo.value.body["message"]
    for extra in ({"messages": []}, {"success_callback": ["langsmith"]}, {"background": True}):
        with pytest.raises(openai.BadRequestError):
            gw.client(key).responses.create(model="gpt-4o-mini", input="hi", extra_body=extra)
    assert upstream.count() == 0
    gw.settle()
    assert gw.balance(user_id) == 100
