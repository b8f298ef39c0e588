"""Security: provider keys and users' keys never show in logs, error bodies, /admin/config
or /metrics; an oversized body is a 413; a client can never choose the upstream.
"""

from __future__ import annotations

import http.client
import json
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from structlog.testing import capture_logs

from tests.conftest import FULL_CHAIN, MASTER_KEY
from tests.fakes import Fault

MSGS = [{"role": "user", "content": "hi"}]
PROVIDER_KEYS = ("sk-upstream-openai-SECRET", "sk-ant-upstream-SECRET")
CHAIN = ["metrics", *FULL_CHAIN, {"name": "accounting", "settings": {"flush_interval": 0.05}}]


def raw_post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("POST", parts.path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"{}")
    finally:
        conn.close()


def test_no_key_ever_reaches_logs_errors_admin_config_or_metrics(gateway_factory, upstream):
    gw = gateway_factory(plugins=CHAIN)
    _, key = gw.make_user(energy=1000)
    client = gw.client(key)
    seen: list[str] = []
    with capture_logs() as logs:
        client.chat.completions.create(model="gpt-4o", messages=MSGS)
        list(client.chat.completions.create(model="claude", messages=MSGS, max_tokens=10, stream=True))
        # Upstreams that echo the key they were given, on every path and status.
        for model, fault in [("gpt-4o", Fault.status(401, "Incorrect API key provided: sk-upstream-openai-SECRET")),
                             ("gpt-4o", Fault.status(400, "bad key sk-upstream-openai-SECRET")),
                             ("claude", Fault.status(400, "invalid x-api-key sk-ant-upstream-SECRET"))]:
            upstream.push(*[fault] * 3)
            with pytest.raises(openai.APIStatusError) as excinfo:
                client.chat.completions.create(model=model, messages=MSGS, max_tokens=10)
            seen.append(excinfo.value.response.text)
        upstream.push(Fault.stream_error(after_chunks=1, message="quota for sk-upstream-openai-SECRET"))
        with pytest.raises(openai.APIError) as excinfo:
            list(client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True))
        seen.append(repr(excinfo.value.body))
        for bad_key in (key + "x", key):  # unknown key; the master key on a model endpoint
            with pytest.raises(openai.AuthenticationError) as excinfo:
                gw.client(bad_key if bad_key != key else MASTER_KEY).models.list()
            seen.append(excinfo.value.response.text)
        gw.settle()
    seen.append(httpx.get(gw.url + "/metrics").text)
    seen.append(httpx.get(gw.url + "/admin/config", headers={"Authorization": f"Bearer {MASTER_KEY}"}).text)
    seen.append(repr(logs))
    seen.append(repr(gw.run(gw.store.usage_rows())))
    everything = "\n".join(seen)
    for secret in (*PROVIDER_KEYS, key, MASTER_KEY):
        assert secret not in everything
    assert all(r.headers.get("authorization") != f"Bearer {key}" for r in upstream.requests)


async def test_a_body_over_max_body_bytes_is_a_413(gateway_factory):
    gw = gateway_factory(plugins=[])
    limit = gw.config.server.max_body_bytes
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * limit}]}).encode()
    status, payload = raw_post(gw.base_url + "/chat/completions", body)
    assert status == 413
    assert payload["error"]["code"] == "request_too_large"


def test_a_body_just_under_max_body_bytes_is_accepted(gateway_factory):
    gw = gateway_factory(plugins=[])
    limit = gw.config.server.max_body_bytes
    template = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": ""}]}
    body = json.dumps({**template, "messages": [{"role": "user", "content": "x" * (limit - 100)}]}).encode()
    assert len(body) <= limit
    status, _ = raw_post(gw.base_url + "/chat/completions", body)
    assert status == 200


@pytest.mark.parametrize("field", ["api_base", "base_url", "api_key", "custom_llm_provider", "litellm_params",
                                   "extra_headers", "headers", "api_version", "organization"])
@pytest.mark.parametrize("dispatch", ["native", "litellm"])
def test_a_client_cannot_choose_the_upstream(gateway_factory, upstream, second_upstream, field, dispatch):
    evil = second_upstream.openai_base
    gw = gateway_factory(plugins=[], models=[{"name": "m", "dispatch": dispatch, "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}}],
        tiers={"free": {"models": ["*"]}}, energy={"default_action": "a", "actions": {"a": {"default": 1}}})
    value: Any = {"api_base": evil} if field in ("litellm_params", "extra_headers", "headers") else evil
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client().chat.completions.create(model="m", messages=MSGS, extra_body={field: value})
    assert excinfo.value.body["code"] == "forbidden_parameter"
    assert upstream.count() == 0 and second_upstream.count() == 0


def test_a_provider_prefixed_model_name_is_not_a_way_around_the_config(gateway_factory, upstream, second_upstream):
    gw = gateway_factory(plugins=[])
    for name in ("openai/gpt-4o-mini", f"openai/{second_upstream.openai_base}", "anthropic/claude-haiku-4-5"):
        with pytest.raises(openai.NotFoundError):
            gw.client().chat.completions.create(model=name, messages=MSGS)
    assert upstream.count() == 0 and second_upstream.count() == 0


def test_client_headers_are_not_forwarded_upstream(gateway_factory, upstream):
    gw = gateway_factory(plugins=[])
    gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, extra_headers={
        "X-Forwarded-Host": "evil.example", "OpenAI-Organization": "org-evil", "Authorization": "Bearer client"})
    sent = upstream.last.headers
    assert sent["authorization"] == "Bearer sk-upstream-openai-SECRET"
    assert "x-forwarded-host" not in sent and "openai-organization" not in sent




def test_a_client_model_list_is_refused_like_every_upstream_choosing_field(gateway_factory, upstream,
                                                                         second_upstream):
    gw = gateway_factory(plugins=[], models=[{"name": "m", "dispatch": "litellm", "litellm_params": {
        "model": "openai/gpt-4o-mini", "api_base": upstream.openai_base, "api_key": "sk-upstream-openai-SECRET"}}],
        tiers={"free": {"models": ["*"]}}, energy={"default_action": "a", "actions": {"a": {"default": 1}}})
    model_list = [{"model_name": "gpt-4o-mini", "litellm_params": {"model": "openai/gpt-4o-mini",
                                                                   "api_base": second_upstream.openai_base}}]
    with pytest.raises(openai.BadRequestError) as excinfo:
        gw.client().chat.completions.create(model="m", messages=MSGS, extra_body={"model_list": model_list})
    assert excinfo.value.body["code"] == "forbidden_parameter"
    assert upstream.count() == 0 and second_upstream.count() == 0
