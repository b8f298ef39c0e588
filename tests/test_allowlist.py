"""A client's body is data, never litellm's keyword arguments (gateway/client_body.py).

Both ways: every parameter the OpenAI SDK documents for an endpoint reaches the upstream;
every keyword litellm's `completion()` understands that is not an OpenAI parameter is a
400 before anything is dispatched. A canary listener stands where litellm's callbacks
would send prompts and answers: it must receive nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from openai.types import embedding_create_params
from openai.types.chat import completion_create_params

from gateway.client_body import CHAT_PARAMS, EMBEDDINGS_PARAMS
from gateway.config import ConfigError, load_config_data
from gateway.providers.litellm import LitellmDispatcher, load_litellm

MSGS = [{"role": "user", "content": "hi"}]
ROOT = Path(__file__).resolve().parent.parent
ENERGY = {"default_action": "a", "actions": {"a": {"default": 1}}}
TIERS = {"free": {"models": ["*"]}}

# A valid value for every OpenAI chat parameter the SDK documents.
CHAT_SAMPLES: dict[str, Any] = {
    "audio": {"voice": "alloy", "format": "wav"}, "frequency_penalty": 0.5, "function_call": "auto",
    "functions": [{"name": "f", "parameters": {"type": "object", "properties": {}}}],
    "logit_bias": {"50256": -100}, "logprobs": True, "max_completion_tokens": 10, "max_tokens": 10,
    "metadata": {"action": "a"}, "modalities": ["text"], "moderation": {"model": "omni-moderation-latest"},
    "n": 1, "parallel_tool_calls": True, "prediction": {"type": "content", "content": "x"},
    "presence_penalty": 0.1, "prompt_cache_key": "k1", "prompt_cache_options": {"mode": "implicit"},
    "prompt_cache_retention": "24h", "reasoning_effort": "low",
    "response_format": {"type": "text"}, "safety_identifier": "u1", "seed": 7, "service_tier": "auto",
    "stop": ["\n\n"], "store": False, "stream_options": {"include_usage": True}, "temperature": 0.2,
    "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "t", "parameters": {}}}],
    "top_logprobs": 2, "top_p": 0.9, "user": "end-user-1", "verbosity": "low",
    "web_search_options": {"search_context_size": "low"},
}
# web_search_options is a hosted tool: sent only to a model that allows it (gateway/hosted_tools.py).
WEB_SEARCH = {"web_search": {}}
# Read by the gateway and removed (metadata: action, prospect_id); stream_options only with stream.
NOT_FORWARDED = {"metadata", "stream_options"}


def sdk_params(typed_dict: type) -> set[str]:
    return set(typed_dict.__annotations__)


def one_model(upstream: Any, dispatch: str, **entry: Any) -> list[dict[str, Any]]:
    return [{"name": "m", "dispatch": dispatch, **entry, "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}}]


def test_the_allowlists_are_exactly_the_sdks_documented_parameters():
    assert CHAT_PARAMS == sdk_params(completion_create_params.CompletionCreateParamsBase) | {"stream"}
    assert EMBEDDINGS_PARAMS == sdk_params(embedding_create_params.EmbeddingCreateParams) | {"metadata"}
    assert set(CHAT_SAMPLES) == CHAT_PARAMS - {"model", "messages", "stream"}
    from openai.types.responses import response_create_params

    from gateway.client_body import RESPONSES_PARAMS
    assert RESPONSES_PARAMS == sdk_params(response_create_params.ResponseCreateParamsBase) | {"stream"}


def test_every_documented_chat_parameter_reaches_a_native_upstream(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], models=one_model(upstream, "native", hosted_tools=WEB_SEARCH), tiers=TIERS,
                         energy=ENERGY)
    gw.client().chat.completions.create(model="m", messages=MSGS, extra_body=CHAT_SAMPLES)
    sent = upstream.last.json
    for name, value in CHAT_SAMPLES.items():
        if name not in NOT_FORWARDED:
            assert sent.get(name) == value, name
    assert "metadata" not in sent


def test_every_chat_parameter_litellm_supports_reaches_it_and_none_is_refused(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], models=one_model(upstream, "litellm", hosted_tools=WEB_SEARCH), tiers=TIERS,
                         energy=ENERGY)
    gw.client().chat.completions.create(model="m", messages=MSGS, extra_body=CHAT_SAMPLES)
    sent = upstream.last.json
    supported = set(load_litellm().get_supported_openai_params("gpt-4o-mini", "openai"))
    # litellm rewrites a few (max_tokens -> max_completion_tokens for some models, functions...)
    for name in sorted(set(CHAT_SAMPLES) & supported - NOT_FORWARDED - {"max_tokens", "functions", "function_call"}):
        assert name in sent, name
    assert "metadata" not in sent


def test_every_embeddings_parameter_reaches_the_upstream(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY)
    gw.client().embeddings.create(model="embed", input=["a", "b"], dimensions=8, encoding_format="float",
                                  user="u1", extra_body={"metadata": {"action": "a"}})
    sent = upstream.last.json
    assert sent["dimensions"] == 8 and sent["encoding_format"] == "float" and sent["user"] == "u1"
    assert "metadata" not in sent


def litellm_keywords() -> list[str]:
    """Every keyword litellm's completion() takes or interprets, minus the OpenAI ones."""
    import inspect

    from litellm.types.utils import all_litellm_params

    litellm = load_litellm()
    names = set(inspect.signature(litellm.completion).parameters) | set(all_litellm_params)
    names |= {"success_callback", "failure_callback", "callbacks", "langsmith_base_url", "langsmith_api_key",
              "langfuse_host", "langfuse_public_key", "mock_timeout", "mock_delay", "caching", "cache",
              "extra_body", "extra_query", "max_retries", "request_timeout", "stream_timeout", "drop_params",
              "model_info", "litellm_metadata", "litellm_call_id", "tenant_id", "disable_add_prefix_to_prompt"}
    return sorted(n for n in names - CHAT_PARAMS if not n.startswith("*") and n not in ("args", "kwargs"))


def test_every_litellm_keyword_that_is_not_an_openai_parameter_is_refused(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], models=one_model(upstream, "litellm"), tiers=TIERS, energy=ENERGY)
    client = gw.client()
    keywords = litellm_keywords()
    assert len(keywords) > 100  # the signature and litellm's own list were read
    accepted = []
    for name in keywords:
        try:
            client.chat.completions.create(model="m", messages=MSGS, extra_body={name: "x"})
            accepted.append(name)
        except openai.BadRequestError as exc:
            assert exc.body["code"] in ("unknown_parameter", "forbidden_parameter"), name
            assert exc.body["param"] == name
    assert accepted == []
    assert upstream.count() == 0


@pytest.mark.parametrize("field", ["foo", "mock_timeout", "success_callback", "extra_body"])
def test_embeddings_refuse_what_is_not_theirs(gateway_factory, upstream, field):
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY)
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client().embeddings.create(model="embed", input="x", extra_body={field: "x"})
    assert excinfo.value.body["code"] == "unknown_parameter" and excinfo.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as excinfo:  # a chat parameter is not an embeddings one
        gw.client().embeddings.create(model="embed", input="x", extra_body={"messages": MSGS})
    assert upstream.count() == 0


# ------------------------------------------------------------------------------------ canary

class Canary:
    """An HTTP listener that records whatever reaches it."""

    def __init__(self) -> None:
        self.hits: list[str] = []

    async def start(self) -> "Canary":
        async def record(request: web.Request) -> web.Response:
            self.hits.append(f"{request.method} {request.path}")
            return web.json_response({})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", record)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"
        return self

    async def stop(self) -> None:
        await self.runner.cleanup()


def callback_bodies(url: str) -> list[dict[str, Any]]:
    return [
        {"success_callback": ["langsmith"], "langsmith_base_url": url, "langsmith_api_key": "x"},
        {"failure_callback": ["langsmith"], "langsmith_base_url": url, "langsmith_api_key": "x"},
        {"callbacks": ["langsmith"], "langsmith_base_url": url, "langsmith_api_key": "x"},
        {"success_callback": ["langfuse"], "langfuse_host": url, "langfuse_public_key": "x",
         "langfuse_secret_key": "x"},
        {"success_callback": ["generic_api"], "generic_api_url": url},
    ]


def test_the_canary_is_reached_when_litellm_is_given_callback_keywords(tmp_path):
    """The control: called directly (in a subprocess: litellm's callback state is global),
    litellm does post to a URL named by these keywords, so the test below can fail."""
    script = tmp_path / "control.py"
    script.write_text(textwrap.dedent("""
        import asyncio, sys
        sys.path.insert(0, sys.argv[1])
        from tests.test_allowlist import Canary
        async def main():
            canary = await Canary().start()
            import litellm
            await litellm.acompletion(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                      mock_response="ok", success_callback=["langsmith"],
                                      langsmith_base_url=canary.url, langsmith_api_key="x")
            for _ in range(150):
                if canary.hits:
                    break
                await asyncio.sleep(0.1)
            print(canary.hits)
        asyncio.run(main())
    """))
    out = subprocess.run([sys.executable, str(script), str(ROOT)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, cwd=ROOT)
    assert "/api/v1/runs/batch" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("stream", [False, True])
def test_callback_keywords_never_reach_litellm_and_the_canary_hears_nothing(gateway_factory, upstream,
                                                                           server_thread, stream):
    canary = server_thread.run(Canary().start())
    try:
        gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY, models=[
            *one_model(upstream, "litellm"),
            {"name": "claude", "litellm_params": {"model": "anthropic/claude-haiku-4-5", "api_base": upstream.url,
                                                  "api_key": "sk-ant-upstream-SECRET"}}])
        client = gw.client()
        for model in ("m", "claude"):
            for body in callback_bodies(canary.url):
                with pytest.raises(openai.BadRequestError):
                    client.chat.completions.create(model=model, messages=MSGS, max_tokens=5, stream=stream,
                                                   extra_body=body)
        # Defence in depth: handed straight to the dispatcher, they are still not litellm's.
        dispatcher = LitellmDispatcher()
        for entry in gw.config.models:
            for body in callback_bodies(canary.url):
                request = {"model": entry.name, "messages": MSGS, "max_tokens": 5, **body}
                gw.run(dispatcher.chat(entry, request))
        time.sleep(6.5)  # litellm's langsmith logger posts its batch ~5 s after the call
        assert canary.hits == []
        assert upstream.count() == 2 * len(callback_bodies(canary.url))
    finally:
        server_thread.run(canary.stop())


# ------------------------------------------------------------------------------ allow_extra_params

def test_an_opted_in_extra_param_reaches_the_provider_as_a_body_field(gateway_factory, upstream):
    for dispatch in ("native", "litellm"):
        gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY,
                             models=one_model(upstream, dispatch, allow_extra_params=["top_k", "min_p"]))
        gw.client().chat.completions.create(model="m", messages=MSGS, extra_body={"top_k": 5, "min_p": 0.1})
        assert upstream.last.json["top_k"] == 5 and upstream.last.json["min_p"] == 0.1, dispatch
        with pytest.raises(openai.BadRequestError) as excinfo:  # only the names listed
            gw.client().chat.completions.create(model="m", messages=MSGS, extra_body={"top_a": 1})
        assert excinfo.value.body["code"] == "unknown_parameter"


def test_a_fallback_model_does_not_get_the_requested_models_extra_params(gateway_factory, upstream):
    from tests.fakes import Fault

    models = [*one_model(upstream, "native", allow_extra_params=["top_k"], fallbacks=["n"]),
              {"name": "n", "dispatch": "native", "litellm_params": {
                  "model": "openai/gpt-4o", "api_base": upstream.openai_base, "api_key": "sk-x"}}]
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY, models=models,
                         retries={"max_attempts": 1, "backoff_base": 0.01})
    upstream.push(Fault.status(500, "down"))
    gw.client().chat.completions.create(model="m", messages=MSGS, extra_body={"top_k": 5})
    assert upstream.requests[0].json["top_k"] == 5
    assert "top_k" not in upstream.requests[1].json and upstream.requests[1].json["model"] == "gpt-4o"


@pytest.mark.parametrize("name", ["api_base", "success_callback", "langsmith_base_url", "mock_timeout",
                                  "aws_session_token", "vertex_credentials", "extra_headers", "temperature"])
def test_allow_extra_params_refuses_configuration_and_openai_names(upstream, name):
    data = {"models": one_model(upstream, "litellm", allow_extra_params=[name])}
    with pytest.raises(ConfigError) as excinfo:
        load_config_data(data)
    assert "models[0].allow_extra_params" in str(excinfo.value)


# ------------------------------------------------------------------------------ bad input: 4xx

def raw(gw: Any, path: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(gw.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


@pytest.mark.parametrize("metadata", ["x", 5, [1], True])
def test_embeddings_with_metadata_that_is_not_an_object_is_a_400(gateway_factory, metadata):
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY)
    status, payload = raw(gw, "/v1/embeddings", json.dumps({"model": "embed", "input": "x",
                                                             "metadata": metadata}).encode())
    assert status == 400 and payload["error"]["param"] == "metadata"


@pytest.mark.parametrize("depth", [70, 260, 1000])
def test_a_body_nested_too_deep_in_a_passed_field_is_a_clear_400(gateway_factory, upstream, depth):
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY)
    nested = "[" * depth + "]" * depth
    body = ('{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "response_format": '
            '{"type": "json_schema", "json_schema": ' + nested + '}}').encode()
    status, payload = raw(gw, "/v1/chat/completions", body)
    assert status == 400 and payload["error"]["code"] == "nesting_too_deep"
    assert upstream.count() == 0


def test_a_tool_schema_of_ordinary_depth_passes(gateway_factory, upstream):
    gw = gateway_factory(plugins=[], tiers=TIERS, energy=ENERGY)
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(20):
        schema = {"type": "object", "properties": {"x": schema}}
    gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, tools=[
        {"type": "function", "function": {"name": "t", "parameters": schema}}])
    assert upstream.count() == 1


@pytest.mark.parametrize("encoding,status", [("gzip", 400), ("deflate", 400), ("zstd-x", 415), ("compress", 415)])
def test_a_body_that_is_not_what_its_content_encoding_says_is_a_4xx(gateway_factory, encoding, status):
    gw = gateway_factory()  # the full chain: also without a key, never a 5xx
    body = json.dumps({"model": "demo", "messages": MSGS}).encode()
    got, payload = raw(gw, "/v1/chat/completions", body, {"Content-Encoding": encoding})
    assert got == 401  # the caller is checked before the body is read
    _, key = gw.make_user(energy=10)
    got, payload = raw(gw, "/v1/chat/completions", body, {"Content-Encoding": encoding,
                                                          "Authorization": f"Bearer {key}"})
    assert got == status and payload["error"]["code"] in ("invalid_content_encoding", "unsupported_content_encoding")


def test_a_gzipped_body_is_accepted(gateway_factory, upstream):
    import gzip

    gw = gateway_factory(plugins=[])
    body = gzip.compress(json.dumps({"model": "gpt-4o-mini", "messages": MSGS}).encode())
    status, payload = raw(gw, "/v1/chat/completions", body, {"Content-Encoding": "gzip"})
    assert status == 200 and payload["choices"]


def test_no_key_and_a_bad_body_is_a_401_not_a_400(gateway_factory):
    gw = gateway_factory()
    for body in (b"{not json", b'{"model": 5}', b"[]", b"x" * 100):
        status, payload = raw(gw, "/v1/chat/completions", body)
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("field,value", [("user", 5), ("seed", "x"), ("tools", {"a": 1}), ("tools", [1]),
                                         ("stop", [1]), ("logprobs", "yes"), ("response_format", "json"),
                                         ("stream_options", {"include_usage": "yes"}),
                                         ("metadata", {"action": {"x": 1}})])
def test_a_wrong_type_is_a_400_naming_the_field(gateway_factory, upstream, field, value):
    gw = gateway_factory(plugins=[])
    status, payload = raw(gw, "/v1/chat/completions", json.dumps(
        {"model": "gpt-4o-mini", "messages": MSGS, field: value}).encode())
    assert status == 400 and payload["error"]["param"].startswith(field.split(".")[0])
    assert upstream.count() == 0


def test_bodies_of_every_kind_end_in_the_chain_once(gateway_factory):
    """A body refused after auth still runs the endings (metrics counts it once)."""
    gw = gateway_factory(plugins=["metrics", "auth"])
    _, key = gw.make_user(energy=10)
    status, _ = raw(gw, "/v1/chat/completions", b"{bad", {"Authorization": f"Bearer {key}"})
    assert status == 400
    deadline = time.monotonic() + 5
    while gw.state.chain.inflight.count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert gw.state.chain.inflight.count == 0
