"""The plugin chain's contract (plugins/base.py), observed from outside over real HTTP.

`Recorder` below is an ordinary plugin loaded by import path (`tests.test_chain:Recorder`);
it writes every hook call into the module-level `EVENTS` list, which the tests read.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import aiohttp
import openai
import pytest
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from plugins.base import Plugin, Reject, RequestContext
from tests.conftest import base_config
from tests.fakes import FakeUpstream, Fault

pytestmark = pytest.mark.timeout(30)

MSGS = [{"role": "user", "content": "hi"}]
REPLY = "Hello from fake upstream"
ENDINGS = ("on_response", "on_error")

# (plugin tag, hook, request_id, details) for every hook call, in call order.
EVENTS: list[tuple[str, str, str, dict[str, Any]]] = []


class RecorderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    tag: str = "rec"
    raise_in: Literal["on_request", "on_stream_chunk", "on_response", "on_error"] | None = None
    reject: bool = False


class Recorder(Plugin):
    """Records every hook; optionally rejects, or raises a plain exception in one hook."""

    name = "recorder"
    Settings = RecorderSettings

    def _record(self, hook: str, ctx: RequestContext, **details: Any) -> None:
        EVENTS.append((self.settings.tag, hook, ctx.request_id, details))
        if self.settings.raise_in == hook:
            raise RuntimeError(f"{self.settings.tag} blew up in {hook} (kaboom-internal-detail)")

    async def on_request(self, ctx: RequestContext) -> None:
        self._record("on_request", ctx)
        if self.settings.reject:
            raise Reject(403, f"{self.settings.tag} says no", code="recorder_rejected")

    async def on_stream_chunk(self, ctx: RequestContext, chunk: dict[str, Any]) -> None:
        self._record("on_stream_chunk", ctx)

    async def on_response(self, ctx: RequestContext) -> None:
        self._record("on_response", ctx, status=ctx.status, disconnected=ctx.client_disconnected,
                     usage=ctx.usage)

    async def on_error(self, ctx: RequestContext) -> None:
        self._record("on_error", ctx, status=ctx.status, code=ctx.error.code if ctx.error else None,
                     disconnected=ctx.client_disconnected)


def recorder(tag: str, **settings: Any) -> dict[str, Any]:
    return {"name": "tests.test_chain:Recorder", "settings": {"tag": tag, **settings}}


def second(tag: str, **settings: Any) -> dict[str, Any]:
    """A second recorder in the same chain (a plugin may be listed once, so by another name)."""
    return {"name": "tests.test_chain:SecondRecorder", "settings": {"tag": tag, **settings}}


class SecondRecorder(Recorder):
    name = "second_recorder"


@pytest.fixture(autouse=True)
def clear_events():
    EVENTS.clear()
    yield
    EVENTS.clear()


def hooks(tag: str | None = None) -> list[str]:
    return [hook for t, hook, _, _ in EVENTS if tag is None or t == tag]


def endings(tag: str) -> list[tuple[str, dict[str, Any]]]:
    return [(hook, details) for t, hook, _, details in EVENTS if t == tag and hook in ENDINGS]


def wait_for_endings(gw: Any, tags: list[str], timeout: float = 5.0) -> None:
    """Endings run after the client has its answer: wait until each plugin got one, let
    anything still running finish, and leave room for a (wrong) second one to show up."""
    deadline = time.monotonic() + timeout
    while not all(endings(tag) for tag in tags):
        assert time.monotonic() < deadline, f"no ending within {timeout}s: {EVENTS}"
        time.sleep(0.02)
    gw.settle()
    time.sleep(0.2)
    gw.settle()


def assert_exactly_one_ending(tag: str, expected: str) -> dict[str, Any]:
    got = endings(tag)
    assert [hook for hook, _ in got] == [expected], got
    return got[0][1]


# --------------------------------------------------------------------------------------
# Order and failure modes of the hooks
# --------------------------------------------------------------------------------------

def test_plugins_run_in_config_order(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("b"), "request_log", second("a")])
    gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    wait_for_endings(gw, ["a", "b"])
    assert [(t, h) for t, h, _, _ in EVENTS] == [
        ("b", "on_request"), ("a", "on_request"), ("b", "on_response"), ("a", "on_response")]


def test_stream_chunk_hooks_see_every_chunk_in_order(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("a")])
    chunks = list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    wait_for_endings(gw, ["a"])
    assert hooks("a") == ["on_request"] + ["on_stream_chunk"] * len(chunks) + ["on_response"]


def test_a_request_hook_that_raises_rejects_with_500_and_never_calls_the_upstream(gateway_factory, upstream):
    """Gating fails closed."""
    gw = gateway_factory(plugins=[recorder("broken", raise_in="on_request"), second("after")])
    with pytest.raises(openai.InternalServerError) as excinfo:
        gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    body = excinfo.value.response.text
    error = json.loads(body)["error"]
    assert error["code"] == "internal_error" and error["type"] == "server_error"
    assert "kaboom" not in body and "Traceback" not in body and "RuntimeError" not in body
    assert upstream.count() == 0
    wait_for_endings(gw, ["broken", "after"])
    assert "on_request" not in hooks("after")  # the chain stopped at the broken gate
    assert assert_exactly_one_ending("after", "on_error")["status"] == 500


def test_a_request_hook_that_raises_on_a_stream_also_fails_closed(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("broken", raise_in="on_request")])
    with pytest.raises(openai.InternalServerError):
        list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    assert upstream.count() == 0


def test_a_response_hook_that_raises_does_not_affect_the_client(gateway_factory, upstream):
    """Observing fails open, and the plugins after the broken one still get their ending."""
    gw = gateway_factory(plugins=[recorder("broken", raise_in="on_response"), second("after")])
    completion = gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert completion.choices[0].message.content == REPLY
    wait_for_endings(gw, ["broken", "after"])
    assert_exactly_one_ending("after", "on_response")


def test_a_stream_chunk_hook_that_raises_does_not_affect_the_client(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("broken", raise_in="on_stream_chunk")])
    chunks = list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    wait_for_endings(gw, ["broken"])
    assert_exactly_one_ending("broken", "on_response")


def test_an_error_hook_that_raises_does_not_affect_the_client(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("broken", raise_in="on_error")])
    with pytest.raises(openai.NotFoundError) as excinfo:
        gw.client().chat.completions.create(model="no-such-model", messages=MSGS)
    assert json.loads(excinfo.value.response.text)["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------------------
# Exactly one ending per request
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_exactly_one_ending_on_success(gateway_factory, upstream, stream):
    gw = gateway_factory(plugins=[recorder("a"), second("b")])
    result = gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=stream)
    if stream:
        list(result)
    wait_for_endings(gw, ["a", "b"])
    for tag in ("a", "b"):
        details = assert_exactly_one_ending(tag, "on_response")
        assert details["status"] == 200 and details["usage"].total_tokens == 18


@pytest.mark.parametrize("stream", [False, True])
def test_exactly_one_ending_on_upstream_failure(gateway_factory, upstream, stream):
    gw = gateway_factory(plugins=[recorder("a"), second("b")])
    upstream.push(*[Fault.status(500)] * 3)
    with pytest.raises(openai.APIStatusError):
        result = gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=stream)
        list(result) if stream else None
    wait_for_endings(gw, ["a", "b"])
    for tag in ("a", "b"):
        details = assert_exactly_one_ending(tag, "on_error")
        assert details["status"] == 502 and details["code"] == "upstream_error"


def test_exactly_one_ending_on_a_reject_also_for_plugins_whose_request_hook_never_ran(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("gate", reject=True), second("later")])
    with pytest.raises(openai.PermissionDeniedError) as excinfo:
        gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert json.loads(excinfo.value.response.text)["error"]["message"] == "gate says no"
    assert upstream.count() == 0
    wait_for_endings(gw, ["gate", "later"])
    assert hooks("later") == ["on_error"]
    for tag in ("gate", "later"):
        details = assert_exactly_one_ending(tag, "on_error")
        assert details["status"] == 403 and details["code"] == "recorder_rejected"


def test_exactly_one_ending_when_the_upstream_dies_mid_stream(gateway_factory, upstream):
    gw = gateway_factory(plugins=[recorder("a")])
    upstream.push(Fault.truncate(after_chunks=2))
    with pytest.raises(openai.APIError):
        list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
    wait_for_endings(gw, ["a"])
    details = assert_exactly_one_ending("a", "on_error")
    assert details["code"] == "upstream_stream_truncated"


async def test_exactly_one_ending_when_the_client_disconnects_mid_stream(gateway_factory, server_thread, store_url):
    """Billing does not depend on the client staying: the stream ends in on_response with
    client_disconnected set, once."""
    slow = server_thread.run(FakeUpstream(chunk_delay=0.1, chunks=8).start())
    try:
        gw = gateway_factory(raw=base_config(slow, plugins=[recorder("a")], store_url=store_url))
        async with aiohttp.ClientSession() as session:
            resp = await session.post(gw.base_url + "/chat/completions",
                                      json={"model": "gpt-4o-mini", "messages": MSGS, "stream": True})
            first = await resp.content.readline()
            assert first.startswith(b"data: {")
            resp.close()  # drop the connection with the stream still running
        await asyncio.to_thread(wait_for_endings, gw, ["a"])
        details = assert_exactly_one_ending("a", "on_response")
        assert details["disconnected"] is True
    finally:
        server_thread.run(slow.stop())


@pytest.mark.parametrize("stream", [False, True])
def test_exactly_one_ending_when_the_client_gives_up_before_the_answer(gateway_factory, upstream, stream):
    """The client times out while the upstream is still thinking (no byte sent yet)."""
    gw = gateway_factory(plugins=[recorder("a")])
    upstream.push(Fault.slow(0.5))
    with pytest.raises(openai.APITimeoutError):
        result = gw.client(timeout=0.2).chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=stream)
        list(result) if stream else None
    wait_for_endings(gw, ["a"], timeout=5)
    time.sleep(0.5)  # the upstream answers meanwhile: still no second ending
    gw.settle()
    assert len(endings("a")) == 1, endings("a")


# --------------------------------------------------------------------------------------
# request_log
# --------------------------------------------------------------------------------------

def request_lines(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in logs if line.get("event") in ("request_completed", "request_failed")]


def test_request_log_emits_one_line_per_request_with_its_fields(gateway, upstream):
    _, key = gateway.make_user(tier="pro", energy=1000)
    with capture_logs() as logs:
        raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
        gateway.settle()
    lines = request_lines(logs)
    assert len(lines) == 1
    line = lines[0]
    assert line["event"] == "request_completed"
    assert line["request_id"] == raw.headers["x-request-id"]
    assert line["model_requested"] == "gpt-4o-mini" and line["model_served"] == "gpt-4o-mini"
    assert line["status"] == 200
    assert line["latency_ms"] > 0 and 0 < line["ttfb_ms"] <= line["latency_ms"]
    assert (line["tokens_prompt"], line["tokens_completion"], line["tokens_total"]) == (11, 7, 18)
    assert line["key_prefix"] and key.startswith(line["key_prefix"]) and line["key_prefix"] != key
    assert key not in json.dumps(logs, default=str)


def test_request_log_emits_one_line_for_a_failed_request_without_the_key(gateway, upstream):
    _, key = gateway.make_user(tier="pro", energy=1000)
    upstream.push(*[Fault.status(500)] * 3)
    with capture_logs() as logs:
        with pytest.raises(openai.APIStatusError):
            gateway.client(key).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
        gateway.settle()
    lines = request_lines(logs)
    assert len(lines) == 1
    assert lines[0]["event"] == "request_failed"
    assert lines[0]["status"] == 502 and lines[0]["error_code"] == "upstream_error"
    assert lines[0]["attempts"] == 3
    assert key not in json.dumps(logs, default=str)


def test_request_log_never_logs_a_rejected_key(gateway, upstream):
    bogus = "gw-not-a-real-key-0123456789abcdef"
    with capture_logs() as logs:
        with pytest.raises(openai.AuthenticationError):
            gateway.client(bogus).chat.completions.create(model="gpt-4o-mini", messages=MSGS)
        gateway.settle()
    assert len(request_lines(logs)) == 1
    assert bogus not in json.dumps(logs, default=str)


def test_request_log_emits_one_line_for_a_stream_with_ttfb_and_tokens(gateway_factory, upstream):
    gw = gateway_factory(plugins=["request_log"])
    with capture_logs() as logs:
        list(gw.client().chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True))
        wait_until = time.monotonic() + 5
        while not request_lines(logs) and time.monotonic() < wait_until:
            time.sleep(0.02)
        gw.settle()
    lines = request_lines(logs)
    assert len(lines) == 1
    assert lines[0]["stream"] is True and lines[0]["status"] == 200
    assert lines[0]["ttfb_ms"] is not None and lines[0]["tokens_total"] == 18
