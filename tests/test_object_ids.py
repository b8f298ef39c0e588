"""Provider-side object ids (gateway/object_ids.py): a client cannot name an object stored at
the provider account every tenant shares (a file, vector store, stored prompt, container,
stored item, ...), at any depth of the body, on any inbound surface; a 400 names its JSON
path and the upstream is never asked. The caller's own stored responses still continue
(previous_response_id), and the client's free-form data (tool schemas, a previous tool
call's input, metadata) is not mistaken for ids."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from gateway.object_ids import ID_FIELDS, NOT_FORWARDED, SURFACES, URL_FIELDS, find_object_id
from tests.conftest import FULL_CHAIN

CHAIN = [*FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]
HEADERS = {"anthropic-version": "2023-06-01"}
STORAGE_URIS = ["gs://operator-bucket/contract.pdf", "s3://operator-bucket/contract.pdf",
                "https://generativelanguage.googleapis.com/v1beta/files/abc123"]


# --------------------------------------------------------------------------------------
# Where each surface can carry an object deep in its body: (route, model, body, path)
# --------------------------------------------------------------------------------------

def _chat(fields):
    body = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "user", "content": [{"type": "text", "text": "read this"},
                                                      {"type": "file", "file": fields}]}]}
    return "/v1/chat/completions", "gpt-4o-mini", body, "messages[1].content[1].file"


def _responses(fields):
    body = {"input": [{"role": "user", "content": "call the tool"},
                      {"type": "function_call_output", "call_id": "call_1",
                       "output": [{"type": "input_text", "text": "result"}, {"type": "input_file", **fields}]}]}
    return "/v1/responses", "gpt-4o-mini", body, "input[1].output[1]"


def _messages(fields, route="/v1/messages"):
    body = {"max_tokens": 20, "messages": [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "fetch", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [
            {"type": "text", "text": "the attachment:"}, {"type": "document", "source": {"type": "file", **fields}}]}]}]}
    return route, "claude", body, "messages[1].content[0].content[1].source"


def _count_tokens(fields):
    return _messages(fields, "/v1/messages/count_tokens")


NESTED = {"chat.completions": [_chat], "responses": [_responses], "messages": [_messages, _count_tokens]}


def post(gw, key, route, model, body, stream=False):
    body = {"model": model, **body, **({"stream": True} if stream else {})}
    headers = {"Authorization": f"Bearer {key}", **(HEADERS if route.startswith("/v1/messages") else {})}
    return httpx.post(gw.url + route, json=body, headers=headers, timeout=20)


def refused_at(response, path):
    """A 400 naming `path`: as `param` (OpenAI's shape) or in the message (Anthropic's)."""
    assert response.status_code == 400, response.text
    body = response.json()
    if body.get("type") == "error":  # /v1/messages answers in Anthropic's shape
        assert f"'{path}'" in body["error"]["message"] and "object_id_not_allowed" in body["error"]["message"]
    else:
        assert (body["error"]["param"], body["error"]["code"]) == (path, "object_id_not_allowed")
    return True


def test_every_post_route_that_reaches_a_provider_is_in_a_surfaces_table(gateway_factory):
    """A surface added later without a table entry fails here: its body would reach a
    provider unwalked."""
    gw = gateway_factory(plugins=[*CHAIN, "cache", "metrics"])
    covered = {route for surface in SURFACES.values() for route in surface.routes}
    posts = {r.resource.canonical for r in gw.app.router.routes() if r.method == "POST"}
    unwalked = {p for p in posts if not p.startswith("/admin/")} - covered - NOT_FORWARDED
    assert not unwalked
    assert set(NESTED) | {"embeddings"} == set(SURFACES)


@pytest.mark.parametrize("surface", sorted(NESTED))
@pytest.mark.parametrize("key", sorted(ID_FIELDS))
def test_every_id_field_is_refused_deep_in_every_surfaces_body(gateway_factory, upstream, surface, key):
    """Each field of the table, nested in a tool result's content (where the issue found
    Anthropic's document block passing): 400 naming the path; the upstream never asked."""
    gw = gateway_factory(plugins=CHAIN)
    _, api_key = gw.make_user(energy=100)
    for place in NESTED[surface]:
        route, model, body, path = place({key: ID_FIELDS[key].sample})
        assert refused_at(post(gw, api_key, route, model, body), f"{path}.{key}")
    assert upstream.count() == 0


@pytest.mark.parametrize("surface", sorted(NESTED))
@pytest.mark.parametrize("uri", STORAGE_URIS)
def test_storage_uris_in_url_fields_are_refused(gateway_factory, upstream, surface, uri):
    gw = gateway_factory(plugins=CHAIN)
    _, api_key = gw.make_user(energy=100)
    for place in NESTED[surface]:
        route, model, body, path = place({"url": uri})
        assert refused_at(post(gw, api_key, route, model, body), f"{path}.url")
    assert upstream.count() == 0


@pytest.mark.parametrize("uri", STORAGE_URIS)
def test_an_embeddings_input_that_is_a_storage_uri_is_refused(gateway_factory, upstream, uri):
    """Vertex AI's multimodal embeddings read a gs:// input, Bedrock's Nova an s3:// one,
    with the operator's credentials."""
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    for value, path in ((uri, "input"), (["a text", uri], "input[1]")):
        with pytest.raises(openai.BadRequestError) as excinfo:
            gw.client(key).embeddings.create(model="embed", input=value)
        assert excinfo.value.body["param"] == path
    assert upstream.count() == 0


# --------------------------------------------------------------------------------------
# The leaks as clients send them
# --------------------------------------------------------------------------------------

RESPONSES_LEAKS = [
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "summarise"},
                                             {"type": "input_file", "file_id": "file-theirs"}]}]},
     "input[0].content[1].file_id"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-theirs", "detail": "auto"}]}]},
     "input[0].content[0].file_id"),
    ({"input": "what do the documents say?", "tools": [{"type": "file_search", "vector_store_ids": ["vs_theirs"]}]},
     "tools[0].vector_store_ids"),
    ({"input": "go on", "prompt": {"id": "pmpt_theirs", "version": "2"}}, "prompt"),
    ({"input": "run it", "tools": [{"type": "code_interpreter", "container": "cntr_theirs"}]}, "tools[0].container"),
    ({"input": "run it", "tools": [{"type": "code_interpreter", "container": {"type": "auto",
                                                                             "file_ids": ["file-theirs"]}}]},
     "tools[0].container.file_ids"),
    ({"input": [{"type": "reasoning", "id": "rs_theirs", "summary": []}, {"role": "user", "content": "and?"}]},
     "input[0].id"),
    ({"input": [{"type": "item_reference", "id": "msg_theirs"}]}, "input[0]"),
    ({"input": "hi", "conversation": "conv_theirs"}, "conversation"),
    ({"input": "hi", "conversation": {"id": "conv_theirs"}}, "conversation"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body,path", RESPONSES_LEAKS)
def test_responses_refuses_other_tenants_objects(gateway_factory, upstream, body, path, stream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client(key).responses.create(model="gpt-4o-mini", stream=stream, **body)
    assert (excinfo.value.body["param"], excinfo.value.body["code"]) == (path, "object_id_not_allowed")
    assert upstream.count() == 0


CHAT_LEAKS = [
    ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-theirs"}}]}],
     "messages[0].content[0].file.file_id"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "gs://operator-bucket/x.png"}}]}],
     "messages[0].content[0].image_url.url"),
    ([{"role": "user", "content": "say it again"}, {"role": "assistant", "audio": {"id": "audio_theirs"}},
      {"role": "user", "content": "again"}], "messages[1].audio"),
    ([{"role": "user", "content": "call it"},
      {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
      {"role": "tool", "tool_call_id": "c1", "content": [{"type": "file", "file": {"file_id": "file-theirs"}}]}],
     "messages[2].content[0].file.file_id"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("messages,path", CHAT_LEAKS)
def test_chat_refuses_other_tenants_objects(gateway_factory, upstream, messages, path, stream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client(key).chat.completions.create(model="gpt-4o-mini", messages=messages, stream=stream)
    assert (excinfo.value.body["param"], excinfo.value.body["code"]) == (path, "object_id_not_allowed")
    assert upstream.count() == 0


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("block", ["document", "image"])
def test_messages_refuses_a_file_nested_in_a_tool_result(gateway_factory, upstream, block, stream):
    """The block the issue found: refused at the top level (not translatable), passed
    through to Anthropic inside a tool_result. Refused at both depths now, and for
    count_tokens, whose body goes to Anthropic too."""
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    claude = anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20)
    file_block = {"type": block, "source": {"type": "file", "file_id": "file_theirs"}}
    nested = [{"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get", "input": {}}]},
              {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [file_block]}]}]
    top = [{"role": "user", "content": [file_block, {"type": "text", "text": "what is in it?"}]}]
    for messages, path in ((nested, "messages[1].content[0].content[0].source.file_id"),
                           (top, "messages[0].content[0].source.file_id")):
        with pytest.raises(anthropic.BadRequestError) as excinfo:
            if stream:
                with claude.messages.stream(model="claude", max_tokens=20, messages=messages) as events:
                    list(events)
            else:
                claude.messages.create(model="claude", max_tokens=20, messages=messages)
        assert f"'{path}'" in excinfo.value.body["error"]["message"]
        with pytest.raises(anthropic.BadRequestError):
            claude.messages.count_tokens(model="claude", messages=messages)
    assert upstream.count() == 0


# --------------------------------------------------------------------------------------
# What passes
# --------------------------------------------------------------------------------------

def test_the_clients_own_data_is_not_taken_for_ids(gateway_factory, upstream):
    """A tool whose parameters include `file_id`, a previous call's input naming one, a
    public image URL: the provider resolves nothing there, so they reach it."""
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=100)
    schema = {"type": "object", "properties": {"file_id": {"type": "string"}, "prompt": {"type": "object"},
                                               "container": {"type": "string", "default": "cntr_x"}}}
    gw.client(key).chat.completions.create(model="gpt-4o-mini", tools=[
        {"type": "function", "function": {"name": "read_file", "parameters": schema}}], messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}])
    gw.client(key).responses.create(model="gpt-4o-mini", input=[
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_mine", "summary": [], "encrypted_content": "gAAAA-carried-with-it"}],
        tools=[{"type": "function", "name": "read_file", "parameters": schema}],
        text={"format": {"type": "json_schema", "name": "out", "schema": schema}})
    anthropic.Anthropic(base_url=gw.url, api_key=key, max_retries=0, timeout=20).messages.create(
        model="claude", max_tokens=20, tools=[{"name": "read_file", "input_schema": schema}], messages=[
            {"role": "user", "content": "read it"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                               "input": {"file_id": "file-in-my-own-system"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "done"}]}])
    assert upstream.count() == 3


def test_the_callers_own_previous_response_passes_and_anothers_is_404(gateway_factory, upstream):
    """previous_response_id is the one id the gateway can check (its `owned` entry)."""
    gw = gateway_factory(plugins=CHAIN)
    _, alice = gw.make_user(energy=100)
    _, bob = gw.make_user(energy=100)
    first = gw.client(alice).responses.create(model="gpt-4o-mini", input="remember 42")
    gw.client(alice).responses.create(model="gpt-4o-mini", input="what was it?", previous_response_id=first.id)
    with pytest.raises(openai.NotFoundError):
        gw.client(bob).responses.create(model="gpt-4o-mini", input="what was it?", previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError) as excinfo:  # anywhere else it is not the caller's to name
        gw.client(alice).responses.create(model="gpt-4o-mini", input=[
            {"role": "user", "content": [{"type": "input_text", "text": "x", "previous_response_id": first.id}]}])
    assert excinfo.value.body["param"] == "input[0].content[0].previous_response_id"


# --------------------------------------------------------------------------------------
# The walker itself
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("surface", sorted(SURFACES))
@pytest.mark.parametrize("key", sorted(ID_FIELDS))
def test_the_walker_finds_each_field_at_any_depth(surface, key):
    owned = set(SURFACES[surface].owned)
    deep = {"a": [{"b": [[{"c": {key: ID_FIELDS[key].sample}}]]}]}
    assert find_object_id(surface, deep).param == f"a[0].b[0][0].c.{key}"
    found = find_object_id(surface, {key: ID_FIELDS[key].sample})
    assert (found is None) == (key in owned)


@pytest.mark.parametrize("key", sorted(URL_FIELDS))
def test_the_walker_finds_storage_uris_in_every_url_field(key):
    assert find_object_id("chat.completions", {"x": [{key: "gs://b/o"}]}).param == f"x[0].{key}"
    assert find_object_id("chat.completions", {"x": [{key: "https://example.com/o.png"}]}) is None
