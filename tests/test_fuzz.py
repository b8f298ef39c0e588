"""Fuzz: whatever bytes and headers a client sends, the gateway answers with a 4xx
OpenAI-shaped error (or a 200 when the body happens to be valid), never a 5xx, never a
hang. Raw HTTP (http.client) to one gateway started once for the module; hypothesis
generates the bodies, bounded to keep the suite fast.
"""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import load_config_data
from tests.conftest import FULL_CHAIN, MASTER_KEY, RunningGateway, _start, base_config
from tests.fakes import FakeUpstream

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
CLIENT_TIMEOUT = 15.0
MODELS = ["gpt-4o-mini", "claude", "demo", "embed", "gpt-4o"]


@pytest.fixture(scope="module")
def target(server_thread, tmp_path_factory):
    """(gateway, a user's key): the full chain in front of a fake upstream, started once."""
    up = server_thread.run(FakeUpstream().start())
    data = base_config(up, store_url=f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/gw.db",
                       plugins=[*FULL_CHAIN, "rate_limit"])
    data["tiers"]["pro"]["limits"] = {"rpm": 100_000}
    config = load_config_data(data)
    runner, app, url = server_thread.run(_start(config))
    gw = RunningGateway(server_thread, runner, app, url, config)
    _, key = gw.make_user(tier="pro", energy=10_000_000)
    yield gw, key
    server_thread.run(runner.cleanup(), timeout=30)
    server_thread.run(up.stop())


def send(gw: RunningGateway, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
    """POST raw bytes; a hang shows up as a socket timeout (a test failure)."""
    conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=CLIENT_TIMEOUT)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value.encode("latin-1"))
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def assert_well_answered(status: int, raw: bytes) -> None:
    assert status < 500, (status, raw[:500])
    if status == 200:
        return
    assert 400 <= status < 500, status
    error = json.loads(raw)["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    assert "code" in error


# ------------------------------------------------------------------------------ strategies

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                         st.floats(allow_nan=False), st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
# Scalars only: an array or object role has its own (explicit) test below.
roles = st.one_of(st.sampled_from(["user", "system", "assistant", "tool", "developer"]), json_scalars)
contents = st.one_of(st.text(max_size=200), st.just("x" * 50_000), json_values,
                     st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                              max_size=2))
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": roles, "content": contents}), max_size=3),
    st.just([]), json_values)
ints = st.one_of(st.integers(min_value=-(2**64), max_value=2**64), st.sampled_from([0, -1, 1, 2**31, 10**12]),
                 json_values)

chat_bodies = st.fixed_dictionaries(
    {"model": st.one_of(st.sampled_from(MODELS), json_values), "messages": messages},
    optional={
        "max_tokens": ints, "max_completion_tokens": ints, "n": ints,
        "temperature": json_values, "top_p": json_values, "stream": json_values,
        "stream_options": st.one_of(st.fixed_dictionaries({"include_usage": json_values}), json_values),
        "metadata": st.one_of(st.fixed_dictionaries({"action": json_values, "prospect_id": json_values}),
                              json_values),
        "tools": json_values, "tool_choice": json_values, "response_format": json_values,
        "stop": json_values, "user": json_values, "seed": json_values, "logit_bias": json_values,
        "unknown_field_" + "z": json_values,
    })
extra_fields = st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=3)


@st.composite
def chat_requests(draw: Any) -> bytes:
    body = draw(chat_bodies)
    body.update(draw(extra_fields))
    return json.dumps(body).encode()


def deep(depth: int) -> bytes:
    return b'{"model":"demo","messages":' + b"[" * depth + b"]" * depth + b"}"


raw_bodies = st.one_of(
    st.binary(max_size=400),  # random bytes, invalid UTF-8 included
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=100, max_value=3000).map(deep),  # beyond any JSON parser's depth limit
    st.just(b'{"model": "demo", "messages": [{"role": "user", "content": "\xff\xfe"}]}'),
    st.just(b'{"model": "demo", "messages": [{"role": "user", "content": "' + b"y" * 70_000 + b'"}]}'),
    st.just(b'{"model": "demo", "messages": [{"role": "user", "content": "\\ud800"}]}'),  # lone surrogate
)

# Printable ASCII: header bytes that are not UTF-8 have their own (explicit) tests below.
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@st.composite
def header_sets(draw: Any, key: str) -> dict[str, str]:
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]))}
    headers["Authorization"] = draw(st.one_of(st.just(f"Bearer {key}"), header_text,
                                              header_text.map(lambda t: "Bearer " + t)))
    for name in ("X-Action", "X-Prospect-Id", "X-Request-Id", "Idempotency-Key", "x-api-key"):
        if draw(st.booleans()):
            headers[name] = draw(header_text)
    return headers


# ------------------------------------------------------------------------------ properties


@FUZZ
@given(body=chat_requests())
def test_any_chat_body_gets_a_4xx_openai_error_or_a_200_never_a_5xx(target, body):
    gw, key = target
    assert_well_answered(*send(gw, "/v1/chat/completions", body,
                               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))


@FUZZ
@given(body=raw_bodies, path=st.sampled_from(["/v1/chat/completions", "/v1/embeddings", "/chat/completions"]))
def test_any_bytes_get_a_4xx_openai_error_never_a_5xx(target, body, path):
    gw, key = target
    assert_well_answered(*send(gw, path, body, {"Authorization": f"Bearer {key}",
                                                 "Content-Type": "application/json"}))


@FUZZ
@given(data=st.data())
def test_any_headers_get_a_4xx_openai_error_or_a_200_never_a_5xx(target, data):
    gw, key = target
    headers = data.draw(header_sets(key))
    body = json.dumps({"model": data.draw(st.sampled_from(MODELS)), "messages": [{"role": "user", "content": "hi"}],
                       "input": "hi"}).encode()
    path = data.draw(st.sampled_from(["/v1/chat/completions", "/v1/embeddings"]))
    assert_well_answered(*send(gw, path, body, headers))


@FUZZ
@given(body=st.fixed_dictionaries({"model": st.one_of(st.sampled_from(MODELS), json_values),
                                   "input": json_values}, optional={"encoding_format": json_values,
                                                                    "dimensions": ints, "metadata": json_values,
                                                                    "user": json_values}))
def test_any_embeddings_body_gets_a_4xx_openai_error_or_a_200_never_a_5xx(target, body):
    gw, key = target
    assert_well_answered(*send(gw, "/v1/embeddings", json.dumps(body).encode(),
                               {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}))


# ------------------------------------------------------------------------------ non-UTF-8 headers
# aiohttp decodes header bytes as UTF-8 with surrogateescape, so a byte like 0x80 becomes a
# lone surrogate that breaks every later .encode() / orjson.dumps of it.



@pytest.mark.parametrize("name", ["Authorization", "Idempotency-Key", "X-Action", "X-Prospect-Id", "X-Request-Id",
                                  "x-api-key"])
def test_a_header_that_is_not_utf8_is_a_4xx_or_ignored_never_a_5xx(target, name):
    gw, key = target
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    headers[name] = ("Bearer \x80\xff" if name == "Authorization" else "\x80\xff")
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    assert_well_answered(*send(gw, "/v1/chat/completions", body, headers))


@pytest.mark.parametrize("role", [[], {"a": 1}], ids=["array", "object"])
def test_a_message_role_that_is_an_array_or_object_is_a_400(target, role):
    gw, key = target
    body = json.dumps({"model": "demo", "messages": [{"role": role, "content": "hi"}]}).encode()
    status, raw = send(gw, "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
    assert status == 400 and json.loads(raw)["error"]["param"] == "messages[0].role"


# ------------------------------------------------------------------------------ every other endpoint

ADMIN_WRITES = ["/admin/workspaces", "/admin/users", "/admin/workspaces/acme", "/admin/users/{user}",
                "/admin/users/{user}/energy", "/admin/users/{user}/keys"]
ADMIN_READS = ["/admin/usage/daily", "/admin/usage/top-users", "/admin/usage/actions", "/admin/usage/weekly",
               "/admin/metrics", "/admin/users", "/admin/keys", "/admin/workspaces", "/admin/users/{user}/ledger",
               "/v1/models", "/models", "/health", "/health/ready", "/admin/config"]
query_text = st.text(st.characters(min_codepoint=33, max_codepoint=126, exclude_characters="#&=%+"), max_size=12)


def request(gw: RunningGateway, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", int(gw.url.rsplit(":", 1)[1]), timeout=CLIENT_TIMEOUT)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@FUZZ
@given(data=st.data())
def test_any_admin_write_gets_a_4xx_or_a_2xx_never_a_5xx(target, data):
    gw, _ = target
    user_id = data.draw(st.sampled_from(["usr_missing", "x" * 300, "%00", "acme"]))
    path = data.draw(st.sampled_from(ADMIN_WRITES)).replace("{user}", user_id)
    method = "PATCH" if path.count("/") == 3 and not path.endswith(("workspaces", "users")) else "POST"
    body = data.draw(st.one_of(json_values.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200),
                               st.fixed_dictionaries({}, optional={
                                   "name": json_values, "workspace": json_values, "tier": json_values,
                                   "energy": ints, "amount": ints, "reason": json_values, "role": json_values,
                                   "disabled": json_values}).map(lambda d: json.dumps(d).encode())))
    status, raw = request(gw, method, path, body, {"Authorization": f"Bearer {MASTER_KEY}",
                                                   "Content-Type": "application/json"})
    assert status < 500, (method, path, body[:200], status, raw[:300])


@FUZZ
@given(data=st.data())
def test_any_read_with_any_query_gets_a_4xx_or_a_2xx_never_a_5xx(target, data):
    gw, key = target
    path = data.draw(st.sampled_from(ADMIN_READS)).replace("{user}", "usr_missing")
    params = data.draw(st.dictionaries(st.sampled_from(["days", "window", "workspace", "user", "limit", "since",
                                                        "weeks", "x"]), query_text, max_size=3))
    query = "&".join(f"{k}={v}" for k, v in params.items())
    auth = data.draw(st.sampled_from([f"Bearer {MASTER_KEY}", f"Bearer {key}", "Bearer nope", ""]))
    status, raw = request(gw, "GET", path + ("?" + query if query else ""), None,
                          {"Authorization": auth} if auth else {})
    assert status < 500 or (path == "/health/ready" and status == 503), (path, query, status, raw[:300])
