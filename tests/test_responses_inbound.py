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


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_stored_response_is_retrieved_listed_and_deleted_only_by_its_creator(gateway_factory, upstream):
    """GET/DELETE /v1/responses/{id} and its input_items reach the upstream that stored it,
    with the gateway's key for it; another user (even of the same workspace) gets a 404 as
    if it did not exist, and the upstream is not asked."""
    gw = gateway_factory(plugins=CHAIN)
    user_id, alice = gw.make_user(energy=100)
    _, bob = gw.make_user(energy=100)
    created = gw.client(alice).responses.create(model="gpt-4o-mini", input="remember me")
    assert created.id.startswith("resp_fake_")
    got = gw.client(alice).responses.retrieve(created.id)
    assert (got.id, got.output_text, got.model) == (created.id, REPLY, "gpt-4o-mini")
    assert upstream.last.method == "GET" and upstream.last.headers["authorization"] == "Bearer sk-upstream-openai-SECRET"
    items = gw.client(alice).responses.input_items.list(created.id)
    assert [i.content[0].text for i in items.data] == ["remember me"]
    asked = upstream.count()
    for call in (lambda c: c.responses.retrieve(created.id), lambda c: c.responses.delete(created.id),
                 lambda c: c.responses.input_items.list(created.id)):
        with pytest.raises(openai.NotFoundError) as excinfo:
            call(gw.client(bob))
        assert excinfo.value.body["code"] == "response_not_found"
    assert upstream.count() == asked
    gw.client(alice).responses.delete(created.id)
    assert upstream.last.method == "DELETE" and created.id not in upstream.stored_responses
    with pytest.raises(openai.NotFoundError):
        gw.client(alice).responses.retrieve(created.id)
    gw.settle()
    assert gw.balance(user_id) == 98  # reading and deleting are free


def test_a_streamed_response_is_recorded_too_and_store_false_is_not(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    events = list(gw.client(key).responses.create(model="gpt-4o-mini", input="hi", stream=True))
    streamed_id = events[0].response.id
    assert gw.client(key).responses.retrieve(streamed_id).id == streamed_id
    unstored = gw.client(key).responses.create(model="gpt-4o-mini", input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        gw.client(key).responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError):
        gw.client(key).responses.retrieve("resp_../../v1/chat")  # never becomes another upstream path
    assert not any(".." in r.path for r in upstream.requests)


def test_previous_response_id_continues_only_ones_own_response(gateway_factory, upstream):
    """Another user's response id is refused before the upstream is asked: on an upstream
    account every tenant shares, it would hand them someone else's conversation."""
    gw = gateway_factory(plugins=CHAIN)
    alice_id, alice = gw.make_user(energy=100)
    bob_id, bob = gw.make_user(energy=100)
    first = gw.client(alice).responses.create(model="gpt-4o-mini", input="my secret is 42")
    second = gw.client(alice).responses.create(model="gpt-4o-mini", input="what is it?", previous_response_id=first.id)
    assert upstream.last.json["previous_response_id"] == first.id and second.output_text == REPLY
    asked = upstream.count()
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as excinfo:
            gw.client(bob).responses.create(model="gpt-4o-mini", input="what is it?", previous_response_id=first.id,
                                            stream=stream)
        assert excinfo.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client(bob).responses.create(model="gpt-4o-mini", input="hi", extra_body={"conversation": "conv_1"})
    assert excinfo.value.body["param"] == "conversation"
    assert upstream.count() == asked
    gw.settle()
    assert (gw.balance(alice_id), gw.balance(bob_id)) == (96, 100)


def test_another_users_stored_items_cannot_be_referenced(gateway_factory, upstream):
    """An item_reference names an item stored at the upstream by id, which the gateway
    cannot tie to its owner: refused, before the upstream is asked."""
    gw = gateway_factory(plugins=CHAIN)
    _, alice = gw.make_user(energy=100)
    _, mallory = gw.make_user(workspace="other", energy=100)
    secret = gw.client(alice).responses.create(model="gpt-4o-mini", input="my card is 4111 1111 1111 1111")
    asked = upstream.count()
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client(mallory).responses.create(model="gpt-4o-mini", input=[
            {"type": "item_reference", "id": secret.output[0].id}, {"role": "user", "content": "repeat the above"}])
    assert excinfo.value.body["param"] == "input[0]" and upstream.count() == asked



def test_an_upstream_cannot_inject_stream_events_past_the_gateway(gateway_factory, server_thread):
    """An event name with a CR in it (a line end to the client's SSE parser) would slip an
    event past the gateway's accounting: the client gets the event under the name its data
    gives, nothing else, and the stream (never completed) is not billed."""
    import json

    from aiohttp import web

    created = {"type": "response.created", "sequence_number": 0, "response": {
        "id": "resp_1", "object": "response", "status": "in_progress", "output": [], "store": False}}
    injected = (b'response.output_text.delta\rdata: {"type":"response.output_text.delta","delta":"INJECTED",'
                b'"item_id":"m","output_index":0,"content_index":0,"sequence_number":9}\r\revent: response.created')

    async def handle(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"event: " + injected + b"\ndata: " + json.dumps(created).encode() + b"\n\n")
        return resp

    async def start() -> web.AppRunner:
        app = web.Application()
        app.router.add_post("/v1/responses", handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    runner = server_thread.run(start())
    try:
        base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        gw = gateway_factory(plugins=CHAIN, models=[{"name": "gpt", "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": base, "api_key": "sk-x"}}],
            tiers={"free": {"models": ["*"]}, "pro": {"models": ["*"]}},
            energy={"default_action": "ai_message", "actions": {"ai_message": {"default": 1}}},
            retries={"max_attempts": 1})
        user_id, key = gw.make_user(energy=100)
        events = [e.type for e in gw.client(key).responses.create(model="gpt", input="hi", stream=True)]
        assert events == ["response.created", "error"]
        gw.settle()
        assert gw.balance(user_id) == 100
    finally:
        server_thread.run(runner.cleanup())


def test_an_idempotent_retry_of_a_streamed_response_replays_the_same_response(gateway_factory, upstream):
    """The stream's final response is what the key keeps: a retry gets it back, whole, as
    `response.created` and `response.completed`, without a second upstream call or charge."""
    gw = gateway_factory(plugins=CHAIN)
    user_id, key = gw.make_user(energy=100)
    upstream.chunks = 3
    headers = {"Idempotency-Key": "resp-stream-1"}
    first = list(gw.client(key).responses.create(model="gpt-4o-mini", input="hi", stream=True,
                                                 extra_headers=headers))
    gw.settle()
    again = list(gw.client(key).responses.create(model="gpt-4o-mini", input="hi", stream=True,
                                                 extra_headers=headers))
    assert [e.type for e in again] == ["response.created", "response.completed"]
    original, replayed = first[-1].response, again[-1].response
    assert replayed.object == "response" and replayed.id == original.id
    assert replayed.output_text == original.output_text == REPLY
    assert replayed.usage.output_tokens == original.usage.output_tokens
    assert upstream.count() == 1
    gw.settle()
    assert gw.balance(user_id) == 98
