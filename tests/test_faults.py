"""Upstream faults: every way a provider can misbehave ends in the right client status (or
stream error event), the right number of upstream attempts, energy refunded on failure
and charged on success, and exactly one usage row.

One table, run on the three dispatch paths: the native OpenAI-wire pass-through (the
default for openai/ models), litellm on the same OpenAI wire (`dispatch: litellm`), and
litellm translating for Anthropic. Real HTTP both ways: openai SDK -> gateway -> fake
upstream on 127.0.0.1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from gateway.config import load_config_data
from tests.conftest import RunningGateway, _start, base_config
from tests.fakes import FakeUpstream, Fault, free_port

MSGS = [{"role": "user", "content": "hi"}]
ACCOUNTING = {"name": "accounting", "settings": {"flush_interval": 0.05}}
PLUGINS = ["auth", "energy", ACCOUNTING]
ATTEMPTS = 3  # retries.max_attempts in base_config
FIRST_BYTE = IDLE = 0.25
TIMEOUTS = {"connect": 1, "first_byte": FIRST_BYTE, "idle": IDLE, "total": 10}
# The cases that are not about time run on "<path>-patient", the same deployment with timeouts
# far from what a loaded machine takes to answer or drop: on "<path>" a litellm call that took
# 0.25 s to see a dropped connection was a timeout (504), not the 502 the case is about.
PATIENT = {"connect": 5, "first_byte": 10, "idle": 10, "total": 30}
RETRY_AFTER_MAX = 0.3
START_ENERGY = 10

# Public model name per dispatch path; "<path>-down" is the same deployment on a dead port,
# "<path>-patient" the same with PATIENT timeouts.
PATHS = ["native", "litellm", "anthropic", "anthropic-litellm"]  # anthropic: the native translation


def _deployment(name: str, path: str, base: str, openai_base: str, timeouts: dict = TIMEOUTS) -> dict[str, Any]:
    if path.startswith("anthropic"):
        return {"name": name, "timeouts": timeouts, "dispatch": "litellm" if path == "anthropic-litellm" else "auto",
                "litellm_params": {
            "model": "anthropic/claude-haiku-4-5", "api_base": base, "api_key": "sk-ant-upstream-SECRET"}}
    return {"name": name, "timeouts": timeouts, "dispatch": "native" if path == "native" else "litellm",
            "litellm_params": {"model": "openai/gpt-4o-mini", "api_base": openai_base,
                               "api_key": "sk-upstream-openai-SECRET"}}


def fault_models(upstream: Any) -> list[dict[str, Any]]:
    dead = f"http://127.0.0.1:{free_port()}"
    out = []
    for path in PATHS:
        out.append(_deployment(path, path, upstream.url, upstream.openai_base))
        out.append(_deployment(f"{path}-down", path, dead, dead + "/v1"))
        out.append(_deployment(f"{path}-patient", path, upstream.url, upstream.openai_base, PATIENT))
    return out


def start(gateway_factory: Any, upstream: Any, **kw: Any) -> Any:
    return gateway_factory(**gateway_config(upstream, **kw))


def gateway_config(upstream: Any, **kw: Any) -> dict[str, Any]:
    retries = {"max_attempts": ATTEMPTS, "backoff_base": 0.01, "backoff_max": 0.02,
               "retry_after_max": RETRY_AFTER_MAX, **kw.pop("retries", {})}
    return dict(plugins=PLUGINS, models=kw.pop("models", None) or fault_models(upstream), retries=retries,
                tiers={"pro": {"models": ["*"]}}, auth={"master_key": "gw-master-test-0123456789abcdef",
                                                        "default_tier": "pro"},
                energy={"default_action": "ai_message", "actions": {"ai_message": {"default": 1}}}, **kw)


@pytest.fixture(scope="module")
def table(server_thread, tmp_path_factory):
    """One gateway and one fake upstream for the whole table (started once: the table is
    long). Each case uses its own user and finds its usage row by request id. The breaker
    is set out of reach here; it has its own tests below."""
    up = server_thread.run(FakeUpstream().start())
    data = base_config(up, store_url=f"sqlite:///{tmp_path_factory.mktemp('faults')}/gw.db",
                       **gateway_config(up, retries={"breaker_failures": 10_000}))
    config = load_config_data(data)
    runner, app, url = server_thread.run(_start(config), timeout=60)  # a loaded machine starts slowly
    yield RunningGateway(server_thread, runner, app, url, config), up
    server_thread.run(runner.cleanup(), timeout=30)
    server_thread.run(up.stop())


def accounting_of(gw: Any) -> Any:
    return next(p for p in gw.state.chain.plugins if p.name == "accounting")


def usage_rows_of(gw: Any, request_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Wait for the endings and the write-behind queue, then the rows of one request."""
    gw.settle()
    deadline = time.monotonic() + timeout
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        rows = [r for r in gw.run(gw.store.usage_rows()) if r["request_id"] == request_id]
        if rows and accounting_of(gw).depth == 0:
            break
        time.sleep(0.02)
    time.sleep(0.06)  # one more flush: a second row would show up now
    return [r for r in gw.run(gw.store.usage_rows()) if r["request_id"] == request_id]


def ledger_kinds(gw: Any, user_id: str) -> list[tuple[str, int]]:
    return [(e.kind, e.amount) for e in gw.ledger(user_id)]


# ------------------------------------------------------------------------------ the table


@dataclass(frozen=True)
class Case:
    """faults: queued on the upstream, one per attempt. outcome: "ok" (200 answered),
    "status" (an HTTP error before any byte: `status`/`code`), or "event" (the stream
    started, then ended with an error event carrying `code`)."""

    faults: tuple[Fault, ...]
    stream: bool
    outcome: str
    attempts: int
    status: int = 200
    code: str | None = None
    down: bool = False  # call the model whose upstream port is closed
    native: "Case | None" = None  # where the native path rightly differs (issue 15)
    timing: bool = False  # about the gateway's timeouts: runs on "<path>" (else "<path>-patient")


def _n(fault: Fault, n: int = ATTEMPTS) -> tuple[Fault, ...]:
    return (fault,) * n


CASES: dict[str, Case] = {
    "500-retried-then-ok": Case((Fault.status(500),), False, "ok", 2),
    "500-every-attempt": Case(_n(Fault.status(500)), False, "status", 3, 502, "upstream_error"),
    "502-every-attempt": Case(_n(Fault.status(502)), False, "status", 3, 502, "upstream_error"),
    "503-every-attempt": Case(_n(Fault.status(503)), False, "status", 3, 503, "upstream_unavailable"),
    "429-no-retry-after": Case(_n(Fault.status(429)), False, "status", 3, 503, "upstream_unavailable"),
    "429-retry-after-then-ok": Case((Fault.status(429, headers={"Retry-After": "1"}),), False, "ok", 2),
    "429-retry-after-every-attempt": Case(_n(Fault.status(429, headers={"Retry-After": "1"})), False,
                                          "status", 3, 503, "upstream_unavailable"),
    "connection-refused": Case((), False, "status", 3, 502, "upstream_error", down=True),
    "connection-refused-stream": Case((), True, "status", 3, 502, "upstream_error", down=True),
    "slow-first-byte": Case(_n(Fault.slow(FIRST_BYTE * 3)), False, "status", 3, 504, "upstream_timeout", timing=True),
    "slow-first-byte-then-ok": Case((Fault.slow(FIRST_BYTE * 3),), False, "ok", 2, timing=True),
    "slow-first-byte-stream": Case(_n(Fault.slow(FIRST_BYTE * 3)), True, "status", 3, 504, "upstream_timeout", timing=True),
    "hang-no-answer": Case(_n(Fault.hang()), False, "status", 3, 504, "upstream_timeout", timing=True),
    "hang-mid-stream": Case((Fault.hang(after_chunks=1),), True, "event", 1, 504, "upstream_timeout", timing=True),
    "truncated-stream": Case((Fault.truncate(after_chunks=2),), True, "event", 1, 502,
                             "upstream_stream_truncated"),
    "truncated-body": Case(_n(Fault.truncate()), False, "status", 3, 502, "upstream_error"),
    "non-json-body": Case(_n(Fault.garbage()), False, "status", 3, 502, "upstream_error"),
    "non-json-stream": Case(_n(Fault.garbage()), True, "status", 3, 502, "upstream_error"),
    "json-without-choices": Case(_n(Fault.no_choices()), False, "status", 3, 502, "upstream_error"),
    # The request was sent, then the connection closed unanswered: the upstream may have
    # processed (and billed) it. The native client knows it was sent and does not resend it.
    "dropped-connection": Case(_n(Fault.drop()), False, "status", 3, 502, "upstream_error",
                               native=Case((Fault.drop(),), False, "status", 1, 502, "upstream_error")),
    "in-band-stream-error": Case((Fault.stream_error(after_chunks=1),), True, "event", 1, 502, None),
}


def _call(gw: Any, key: str, model: str, stream: bool) -> tuple[str, int, str | None, dict[str, str]]:
    """(outcome, status, error code, response headers) as the openai SDK saw them."""
    client = gw.client(key, timeout=15)
    try:
        if not stream:
            raw = client.chat.completions.with_raw_response.create(model=model, messages=MSGS, max_tokens=20)
            raw.parse()
            return "ok", raw.status_code, None, dict(raw.headers)
        raw = client.chat.completions.with_raw_response.create(model=model, messages=MSGS, max_tokens=20,
                                                               stream=True)
        headers = dict(raw.headers)
        try:
            for _ in raw.parse():
                pass
        except openai.APIStatusError:
            raise
        except openai.APIError as err:  # the in-band error event after the stream started
            body = err.body if isinstance(err.body, dict) else {}
            return "event", 200, body.get("code"), headers
        return "ok", 200, None, headers
    except openai.APIStatusError as err:
        body = err.body if isinstance(err.body, dict) else {}
        error = body.get("error", body) if isinstance(body, dict) else {}
        assert set(error) >= {"message", "type", "code"}, body  # OpenAI-shaped
        return "status", err.status_code, error.get("code"), dict(err.response.headers)




def _table() -> list[Any]:
    params = []
    for name in CASES:
        for path in PATHS:
            params.append(pytest.param(name, path, id=f"{name}-{path}"))
    return params


@pytest.mark.parametrize("name,path", _table())
def test_an_upstream_fault_ends_in_the_right_answer_attempts_energy_and_one_usage_row(table, name, path):
    gw, upstream = table
    case = CASES[name]
    if path in ("native", "anthropic") and case.native is not None:  # the gateway's own HTTP client
        case = case.native
    upstream.reset()
    user_id, key = gw.make_user(workspace="faults", tier="pro", energy=START_ENERGY)
    upstream.push(*case.faults)
    model = f"{path}-down" if case.down else path if case.timing else f"{path}-patient"
    started = time.monotonic()

    outcome, status, code, headers = _call(gw, key, model, case.stream)

    assert (outcome, status) == (case.outcome, 200 if case.outcome != "status" else case.status)
    if case.code is not None:
        assert code == case.code
    endpoint = "/messages" if path.startswith("anthropic") else "/chat/completions"
    assert upstream.count(endpoint) == (0 if case.down else case.attempts)
    assert upstream.pending_faults == 0
    if name.startswith("429-retry-after"):
        # The upstream's Retry-After (capped by retries.retry_after_max) is honoured...
        assert time.monotonic() - started >= RETRY_AFTER_MAX * (case.attempts - 1)
        if case.outcome == "status":  # ...and passed on to the client that must give up.
            assert headers.get("retry-after") == "1"
    gw.settle()
    failed = case.outcome != "ok"
    assert gw.balance(user_id) == START_ENERGY - (0 if failed else 1)
    assert ledger_kinds(gw, user_id) == [("grant", START_ENERGY), ("reserve", -1),
                                         ("refund", 1) if failed else ("settle", 0)]
    (row,) = usage_rows_of(gw, headers["x-request-id"])
    assert row["user_id"] == user_id
    assert row["status"] == (case.status if failed else 200)
    assert row["retries"] == case.attempts - 1
    assert row["energy_cost"] == (0 if failed else 1)
    assert row["streamed"] is case.stream


# ------------------------------------------------------------------------ circuit breaker


@pytest.mark.parametrize("dispatch", ["native", "litellm"])
def test_a_deployment_failing_breaker_failures_times_is_skipped_until_its_cooldown_ends(
        gateway_factory, upstream, second_upstream, dispatch):
    cooldown = 0.8

    def deployment(up: Any) -> dict[str, Any]:
        return {"name": "pair", "dispatch": dispatch, "timeouts": TIMEOUTS, "litellm_params": {
            "model": "openai/gpt-4o-mini", "api_base": up.openai_base, "api_key": "sk-upstream-openai-SECRET"}}

    gw = start(gateway_factory, upstream, models=[deployment(upstream), deployment(second_upstream)],
               retries={"breaker_failures": 2, "breaker_cooldown": cooldown})
    _, key = gw.make_user(tier="pro", energy=100)
    client = gw.client(key)
    upstream.push(Fault.status(500), Fault.status(500))  # the first deployment fails twice, then heals

    for _ in range(2):  # each request: the broken first deployment, then the healthy second
        assert client.chat.completions.create(model="pair", messages=MSGS).choices[0].message.content
    assert (upstream.count(), second_upstream.count()) == (2, 2)

    for _ in range(3):  # open: the broken deployment is not touched at all
        client.chat.completions.create(model="pair", messages=MSGS)
    assert (upstream.count(), second_upstream.count()) == (2, 5)

    time.sleep(cooldown + 0.1)  # half-open: tried again, and it answers
    reply = client.chat.completions.create(model="pair", messages=MSGS)
    assert reply.choices[0].message.content == upstream.reply
    assert (upstream.count(), second_upstream.count()) == (3, 5)


def test_every_deployment_cooling_down_is_a_fast_503_with_retry_after(gateway_factory, upstream):
    gw = start(gateway_factory, upstream, retries={"breaker_failures": 3, "breaker_cooldown": 30})
    _, key = gw.make_user(tier="pro", energy=100)
    upstream.push(*_n(Fault.status(500)))
    with pytest.raises(openai.APIStatusError) as first:
        gw.client(key).chat.completions.create(model="native", messages=MSGS)
    assert first.value.status_code == 502
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as second:
        gw.client(key).chat.completions.create(model="native", messages=MSGS)
    assert second.value.status_code == 503
    assert second.value.body["code"] == "upstream_unavailable"
    assert 1 <= int(second.value.response.headers["retry-after"]) <= 30
    assert time.monotonic() - started < 1
    assert upstream.count() == 3  # the open circuit sent nothing upstream
