"""Parity: Azure OpenAI (gateway/providers/openai.py at Azure's URLs) and Gemini (gateway/providers/gemini.py)
on the native path give the same client-visible results as `dispatch: litellm`, and send the
provider the same request, for the same requests against a fake upstream that answers in
each provider's real wire format (tests/fakes.py). tests/test_anthropic_parity.py does the
same for Anthropic."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import openai
import pytest

from gateway.config import ConfigError, load_config_data
from tests.fakes import Fault

ROOT = Path(__file__).resolve().parent.parent

AZURE = {"model": "azure/prod-gpt4o", "api_key": "azure-key-0123456789abcdef", "api_version": "2024-10-21"}
GEMINI = {"model": "gemini/gemini-2.5-flash", "api_key": "AIza-gemini-upstream-SECRET"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": {
    "type": "object", "additionalProperties": False, "required": ["city"], "properties": {
        "city": {"type": "string", "description": "City name"},
        "unit": {"type": "string", "enum": ["C", "F"]},
        "days": {"type": "array", "items": {"type": "integer"}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "on": {"type": "boolean"}}}}}}},
         {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]
TURNS = [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": "Let me look.", "tool_calls": [
             {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": ""}}]},
         {"role": "tool", "tool_call_id": "call_1", "content": '{"celsius": 18}'},
         {"role": "tool", "tool_call_id": "call_2", "content": "09:00"},
         {"role": "user", "content": "Thanks"}]
CASES = {
    "plain": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    "system and stop": {"messages": [{"role": "system", "content": "Be brief."}, {"role": "developer", "content": "Dev."},
                                     {"role": "user", "content": "hi"}],
                        "max_tokens": 50, "stop": ["\n\n", "END", "a", "b", "c"], "temperature": 0.2, "top_p": 0.9,
                        "user": "user-1"},
    "multi-turn tools": {"max_tokens": 50, "tools": TOOLS, "tool_choice": "auto", "messages": TURNS},
    "forced tool": {"max_completion_tokens": 50, "tools": TOOLS, "seed": 7,
                    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
                    "messages": [{"role": "user", "content": "Weather?"}]},
    "required tool": {"tools": TOOLS, "tool_choice": "required", "messages": [{"role": "user", "content": "Weather?"}]},
    "null assistant content": {"tools": TOOLS, "messages": TURNS[:1] + [{**TURNS[1], "content": None}] + TURNS[2:]},
    "signed tool calls sent back": {"tools": TOOLS, "messages": [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_a__thought__c2lnbmVk", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
            {"id": "call_b", "type": "function", "provider_specific_fields": {"thought_signature": "b3du"},
             "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
        {"role": "tool", "tool_call_id": "call_a__thought__c2lnbmVk", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_b", "content": "20C"}]},
    "image": {"max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
    "json mode": {"response_format": {"type": "json_object"}, "n": 1, "messages": [
        {"role": "user", "content": "JSON please"}, {"role": "assistant", "content": "{}"},
        {"role": "user", "content": [{"type": "text", "text": "again"}]}]},
}
GEMINI_3 = {**GEMINI, "model": "gemini/gemini-3-flash-preview"}  # tool call ids and thought signatures
AZURE_V1 = {**AZURE, "api_version": "v1"}  # the version-less API: /openai/v1/..., a Bearer key
MODELS = {"azure": AZURE, "azure v1": AZURE_V1, "gemini": GEMINI, "gemini 3": GEMINI_3}


@pytest.fixture
def both(gateway_factory, upstream):
    upstream.cached_tokens, upstream.reasoning_tokens = 3, 5
    models = []
    for name, params in MODELS.items():
        models.append({"name": f"{name} native", "litellm_params": {**params, "api_base": upstream.url}})
        models.append({"name": f"{name} litellm", "dispatch": "litellm",
                       "litellm_params": {**params, "api_base": upstream.url}})
    gw = gateway_factory(plugins=[], models=models, tiers={"free": {"models": ["*"]}},
                         energy={"actions": {"ai_message": {"default": 1}}})
    router = gw.state.router
    assert router.dispatcher_for(gw.config.deployments("azure native")[0]) is router.azure
    assert router.dispatcher_for(gw.config.deployments("gemini native")[0]) is router.gemini
    assert router.dispatcher_for(gw.config.deployments("gemini litellm")[0]) is router.litellm
    return gw, upstream


def _sent(upstream) -> tuple:
    """What the provider received: where, with which credential, and the body."""
    last = upstream.last
    return (last.path, last.query, last.headers.get("api-key"), last.headers.get("x-goog-api-key"),
            last.headers.get("authorization"), last.json)


def _by_gateway(upstream) -> bool:
    """Whether the gateway's own HTTP client sent the last request (else litellm's did)."""
    return upstream.last.headers.get("user-agent", "").startswith("llm-gateway/")


def _answer(answer) -> tuple:
    choice = answer.choices[0]
    calls = [(c.type, c.function.name, c.function.arguments, bool(re.fullmatch(r"call_[0-9a-f]{28}", c.id or "")))
             for c in choice.message.tool_calls or ()]
    return choice.message.content, calls, choice.finish_reason, answer.usage.model_dump()


@pytest.mark.parametrize("provider", list(MODELS))
@pytest.mark.parametrize("case", list(CASES))
def test_the_same_request_reaches_the_provider_the_same_and_answers_the_same(both, provider, case):
    gw, upstream = both
    results, sent = {}, {}
    for path in ("native", "litellm"):
        answer = gw.client().chat.completions.create(model=f"{provider} {path}", **CASES[case])
        sent[path] = _sent(upstream)
        results[path] = _answer(answer)
        # (A Gemini tool call sent to Azure goes through litellm, which cuts its signature off.)
        assert _by_gateway(upstream) == (path == "native" and not (case.startswith("signed") and "azure" in provider))
    assert results["native"] == results["litellm"]
    assert sent["native"] == sent["litellm"]


@pytest.mark.parametrize("provider", ["azure", "gemini", "gemini 3"])
def test_a_tool_call_answer_is_the_same(both, provider):
    gw, upstream = both
    upstream.tool_call = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}
    results = {path: _answer(gw.client().chat.completions.create(model=f"{provider} {path}", **CASES["forced tool"]))
               for path in ("native", "litellm")}
    assert results["native"] == results["litellm"]
    assert results["native"][1][0][1:3] == ("get_weather", '{"city": "Paris", "unit": "C"}')
    assert results["native"][2] == "tool_calls"


def _signed_calls(answer_or_chunks) -> list[tuple]:
    calls = [t for c in answer_or_chunks if c.choices for t in c.choices[0].delta.tool_calls or ()] \
        if isinstance(answer_or_chunks, list) else answer_or_chunks.choices[0].message.tool_calls
    return [(c.id.split("__thought__", 1)[1], c.id[:5], len(c.id.split("__thought__", 1)[0]),
             (c.model_extra or {}).get("provider_specific_fields")) for c in calls]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider", ["gemini", "gemini 3"])
def test_thought_signatures_come_back_in_the_tool_call_as_through_litellm(both, provider, stream):
    """So that a client sending the call back sends its signature back (Gemini 3 refuses it otherwise)."""
    gw, upstream = both
    upstream.tool_call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    upstream.gemini_thought_signature = "c2lnbmF0dXJl"
    seen = {}
    for path in ("native", "litellm"):
        result = gw.client().chat.completions.create(model=f"{provider} {path}", stream=stream, **CASES["forced tool"])
        seen[path] = _signed_calls(list(result) if stream else result)
    assert seen["native"] == seen["litellm"] == [("c2lnbmF0dXJl", "call_", 33, {"thought_signature": "c2lnbmF0dXJl"})]


@pytest.mark.parametrize("reason", ["MAX_TOKENS", "SAFETY", "RECITATION", "MALFORMED_FUNCTION_CALL", "NEW_REASON"])
def test_gemini_finish_reasons_map_the_same(both, reason):
    """(Each is mapped by litellm's table; an unknown one is "stop".)"""
    gw, upstream = both
    upstream.gemini_finish_reason = reason
    answers = {path: _answer(gw.client().chat.completions.create(model=f"gemini {path}", **CASES["plain"]))
               for path in ("native", "litellm")}
    if reason in ("SAFETY", "RECITATION"):
        # The one deliberate difference: a flagged answer's usage is whole natively (token
        # classes included, as when streamed); litellm keeps only the three plain counts.
        *native, native_usage = answers.pop("native")
        *litellm, litellm_usage = answers.pop("litellm")
        assert native == litellm
        # litellm's completion_tokens leave the thinking out (its total keeps it: the two
        # do not add up); the native count has it, as Google bills it.
        assert (native_usage["prompt_tokens"], native_usage["total_tokens"]) == \
            (litellm_usage["prompt_tokens"], litellm_usage["total_tokens"])
        assert native_usage["completion_tokens"] == native_usage["total_tokens"] - native_usage["prompt_tokens"]
    else:
        assert answers["native"] == answers["litellm"]
    upstream.chunks = 3
    streams = {path: _stream(gw, f"gemini {path}", **CASES["plain"]) for path in ("native", "litellm")}
    assert streams["native"] == streams["litellm"]


def _stream(gw, model: str, **body) -> tuple:
    chunks = list(gw.client().chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                                      **body))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    calls = [(t.index, t.function.name, t.function.arguments) for c in chunks if c.choices
             for t in c.choices[0].delta.tool_calls or ()]
    return text, finish, calls, chunks[-1].usage.model_dump()


@pytest.mark.parametrize("provider", list(MODELS))
@pytest.mark.parametrize("case", ["plain", "system and stop", "multi-turn tools"])
def test_streams_carry_the_same_text_finish_and_usage(both, provider, case):
    gw, upstream = both
    upstream.chunks = 4
    seen, sent = {}, {}
    for path in ("native", "litellm"):
        seen[path] = _stream(gw, f"{provider} {path}", **CASES[case])
        sent[path] = _sent(upstream)
        assert _by_gateway(upstream) == (path == "native")
    assert seen["native"] == seen["litellm"]
    assert seen["native"][0] == upstream.reply
    assert sent["native"] == sent["litellm"]


def test_streamed_gemini_tool_calls_are_the_same(both):
    """(Azure streams are OpenAI's, passed through: tests/test_chat.py.)"""
    gw, upstream = both
    upstream.tool_call = {"name": "get_weather", "arguments": {"city": "Paris"}}
    seen = {path: _stream(gw, f"gemini {path}", **CASES["forced tool"]) for path in ("native", "litellm")}
    assert seen["native"] == seen["litellm"]
    assert seen["native"][1] == ["tool_calls"]


@pytest.mark.parametrize("provider", ["azure", "gemini"])
@pytest.mark.parametrize("status,expected", [(400, 400), (404, 404), (429, 503), (500, 502), (503, 503), (401, 502),
                                             (403, 502)])
@pytest.mark.parametrize("stream", [False, True])
def test_errors_get_the_same_status(both, provider, status, expected, stream):
    gw, upstream = both
    got = {}
    for path in ("native", "litellm"):
        upstream.push(*[Fault.status(status, "nope")] * 3)
        with pytest.raises(openai.APIStatusError) as excinfo:
            result = gw.client().chat.completions.create(model=f"{provider} {path}", stream=stream, **CASES["plain"])
            list(result) if stream else None
        got[path] = excinfo.value.status_code
        upstream.reset()
    # litellm raises Gemini's HTTP error at the stream's first chunk, wrapped in a
    # MidStreamFallbackError: LitellmDispatcher unwraps it, so both paths answer alike.
    assert got == {"native": expected, "litellm": expected}


AZURE_FILTERED = {"error": {"code": "content_filter", "param": "prompt", "status": 400, "message": "The response was "
                            "filtered due to the prompt triggering Azure OpenAI's content management policy.",
                            "innererror": {"code": "ResponsibleAIPolicyViolation"}}}


@pytest.mark.parametrize("provider,status,message,body,expected", [
    ("gemini", 400, "API key not valid. Please pass a valid API key.", None, 502),  # Google's answer to a bad key
    ("gemini", 400, "The response was blocked.", None, 400),
    ("gemini", 500, "Resource exhausted. Please try again later.", None, 503),
    ("azure", 400, None, AZURE_FILTERED, 400),
])
def test_errors_litellm_statuses_by_their_words_get_the_same_status(both, provider, status, message, body, expected):
    gw, upstream = both
    got = {}
    for path in ("native", "litellm"):
        upstream.push(*[Fault.status(status, message, body=body)] * 3)
        with pytest.raises(openai.APIStatusError) as excinfo:
            gw.client().chat.completions.create(model=f"{provider} {path}", **CASES["plain"])
        got[path] = (excinfo.value.status_code, excinfo.value.body.get("type"), excinfo.value.body.get("code"))
        assert (message or body["error"]["message"]) in excinfo.value.message or expected == 502
        upstream.reset()
    assert got["native"] == got["litellm"]
    assert got["native"][0] == expected


@pytest.mark.parametrize("fault", [Fault.truncate(after_chunks=2), Fault.stream_error(after_chunks=2)])
@pytest.mark.parametrize("provider", ["azure", "gemini"])
def test_a_stream_cut_before_its_end_ends_the_same(both, provider, fault):
    """Both paths retry it, or both end it with an error event (never a clean, short answer)."""
    gw, upstream = both
    upstream.chunks = 4
    seen = {}
    for path in ("native", "litellm"):
        upstream.push(fault)
        try:
            text = _stream(gw, f"{provider} {path}", **CASES["plain"])[0]
        except openai.APIError as exc:
            text = type(exc).__name__
        seen[path] = (text, len(upstream.requests))
        upstream.reset()
    assert seen["native"] == seen["litellm"]
    assert seen["native"] in ((upstream.reply, 2), ("APIError", 1))


def test_gemini_requests_the_translation_does_not_cover_go_through_litellm(both):
    gw, upstream = both
    answer = gw.client().chat.completions.create(model="gemini native", presence_penalty=0.5, n=1, **CASES["plain"])
    assert answer.choices[0].message.content == upstream.reply
    assert not _by_gateway(upstream)
    assert upstream.last.json["generationConfig"]["presence_penalty"] == 0.5


@pytest.mark.parametrize("model,system_instruction", [("gemini-2.5-flash-preview-05-20", True),
                                                       ("gemini-2.0-flash", False)])
def test_gemini_system_prompts_to_a_model_litellms_map_lacks_go_through_litellm(gateway_factory, upstream, model,
                                                                                 system_instruction):
    """litellm guesses whether such a model takes a systemInstruction (else the prompt joins the
    first user turn); the native path does not guess."""
    params = {**GEMINI, "model": f"gemini/{model}", "api_base": upstream.url}
    gw = gateway_factory(plugins=[], models=[{"name": "g", "litellm_params": params}], tiers={"free": {"models": ["*"]}},
                         energy={"actions": {"ai_message": {"default": 1}}})
    gw.client().chat.completions.create(model="g", **CASES["system and stop"])
    assert not _by_gateway(upstream) and ("system_instruction" in upstream.last.json) == system_instruction
    gw.client().chat.completions.create(model="g", **CASES["plain"])
    assert _by_gateway(upstream)


def test_azure_embeddings_are_the_same(both):
    gw, upstream = both
    got = {}
    for path in ("native", "litellm"):
        result = gw.client().embeddings.create(model=f"azure {path}", input=["a", "b"])
        got[path] = ([d.embedding for d in result.data], result.usage.model_dump(), upstream.last.path,
                     upstream.last.query, upstream.last.headers.get("api-key"))
    assert got["native"] == got["litellm"]
    assert got["native"][2] == "/openai/deployments/prod-gpt4o/embeddings"


def _model_entry(**entry):
    return load_config_data({"store": {"url": "sqlite:///:memory:"},
                             "models": [{"name": "m", **entry}]}).models[0]


@pytest.mark.parametrize("params,path", [
    ({**AZURE, "api_base": "https://x.openai.azure.com"}, "azure"),
    ({**AZURE, "api_base": "https://x.openai.azure.com", "max_tokens": 100, "extra_headers": {"X-Team": "a"}}, "azure"),
    ({**AZURE, "api_base": "https://x.openai.azure.com", "azure_ad_token": "ad"}, None),
    ({"model": "azure/prod", "api_base": "https://x.openai.azure.com", "api_version": "2024-10-21"}, None),
    ({**AZURE}, None),  # no api_base: litellm reads AZURE_API_BASE
    ({**GEMINI}, "gemini"),
    ({**GEMINI, "safety_settings": []}, None),
    ({"model": "gemini/gemini-2.5-flash"}, None),  # no key: litellm reads GEMINI_API_KEY
])
def test_dispatch_auto_picks_the_native_path_where_it_covers_the_deployment(params, path):
    assert _model_entry(litellm_params=params).native_path() == path


@pytest.mark.parametrize("params,named", [
    ({**AZURE, "api_base": "https://x.openai.azure.com", "azure_ad_token": "ad"}, "litellm_params.azure_ad_token"),
    ({**AZURE}, "litellm_params.api_base: is required"),
    ({**GEMINI, "safety_settings": []}, "litellm_params.safety_settings"),
])
def test_dispatch_native_refuses_what_the_native_path_would_drop(params, named):
    with pytest.raises(ConfigError) as excinfo:
        _model_entry(litellm_params=params, dispatch="native")
    assert named in str(excinfo.value) and "dispatch: litellm" in str(excinfo.value)


def test_a_gateway_serving_azure_and_gemini_natively_never_imports_litellm(tmp_path):
    script = textwrap.dedent(f"""
        import asyncio, sys
        sys.path.insert(0, {str(ROOT)!r})
        import aiohttp
        from aiohttp import web
        from gateway.config import load_config_data
        from proxy import create_app
        from tests.fakes import FakeUpstream

        async def main():
            async with FakeUpstream() as up:
                config = load_config_data({{
                    "store": {{"url": "sqlite:///{tmp_path}/gw.db"}}, "plugins": [],
                    "server": {{"allow_unauthenticated": True}},
                    "models": [{{"name": "azure", "litellm_params": {{**{AZURE!r}, "api_base": up.url}}}},
                               {{"name": "gemini", "litellm_params": {{**{GEMINI!r}, "api_base": up.url}}}}]}})
                runner = web.AppRunner(create_app(config))
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = site._server.sockets[0].getsockname()[1]
                async with aiohttp.ClientSession() as session:
                    for model in ("azure", "gemini"):
                        for stream in (False, True):
                            async with session.post(f"http://127.0.0.1:{{port}}/v1/chat/completions", json={{
                                    "model": model, "stream": stream,
                                    "messages": [{{"role": "user", "content": "hi"}}]}}) as resp:
                                print("STATUS", model, stream, resp.status, len(await resp.read()) > 0)
                print("RESULT", "litellm" in sys.modules)
                await runner.cleanup()

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert [line.split()[3] for line in out.stdout.splitlines() if line.startswith("STATUS ")] == ["200"] * 4, \
        out.stdout + out.stderr[-2000:]
    assert "RESULT False" in out.stdout, out.stderr[-2000:]


def test_a_flagged_gemini_answer_is_billed_the_same_streamed_or_not(gateway_factory, upstream):
    """Its thinking (billed by Google as output) and its cached prompt count either way."""
    upstream.reasoning_tokens, upstream.cached_tokens = 900, 4
    upstream.gemini_finish_reason = "SAFETY"
    models = [{"name": "gem", "litellm_params": {"model": "gemini/gemini-2.5-flash", "api_base": upstream.url,
                                                 "api_key": "AIza-gemini-upstream-SECRET"}}]
    gw = gateway_factory(plugins=["auth", {"name": "accounting", "settings": {"flush_interval": 0.05}}],
                         models=models, tiers={"free": {"models": ["*"]}, "pro": {"models": ["*"]}},
                         energy={"default_action": "ai_message", "actions": {"ai_message": {"default": 1}}})
    _, key = gw.make_user(energy=100)
    plain = gw.client(key).chat.completions.create(model="gem", messages=[{"role": "user", "content": "hi"}])
    assert plain.choices[0].finish_reason == "content_filter"
    list(gw.client(key).chat.completions.create(model="gem", messages=[{"role": "user", "content": "hi"}],
                                                stream=True))
    gw.settle()
    json_row, stream_row = sorted(gw.run(gw.store.usage_rows()), key=lambda r: r["streamed"])
    assert json_row["tokens_completion"] == stream_row["tokens_completion"] >= 900
    assert (json_row["tokens_reasoning"], json_row["tokens_cached"]) == (900, 4)
    assert json_row["cost_usd"] == stream_row["cost_usd"]
