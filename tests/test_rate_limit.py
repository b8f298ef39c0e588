"""rate_limit: requests and tokens per minute per tier, per-user and per-workspace
overrides, OpenAI's x-ratelimit headers, exact counting under concurrency (in-process and
in Redis, shared by two gateways), and the Redis-down policy.

Real HTTP: openai SDK -> gateway -> fake upstream; a real Redis at 127.0.0.1:6379.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from typing import Any

import openai
import pytest

from tests.fakes import free_port

MSGS = [{"role": "user", "content": "hi"}]
REDIS_URL = "redis://127.0.0.1:6379/0"
PLUGINS = ["auth", "rate_limit", "tier_policy"]
TOKENS_PER_CALL = 11 + 7  # the fake upstream's prompt + completion tokens


def fresh_window(margin: float = 6.0) -> None:
    """Counters use fixed one-minute windows: do not start a test right before a reset."""
    left = 60 - time.time() % 60
    if left < margin:
        time.sleep(left + 0.05)


def tiers(**limits: Any) -> dict[str, Any]:
    return {"free": {"models": ["*"], "limits": limits or None}, "pro": {"models": ["*"]}}


def start(gateway_factory: Any, *, limits: dict[str, Any] | None = None, **kw: Any) -> Any:
    kw.setdefault("plugins", PLUGINS)
    return gateway_factory(tiers=tiers(**(limits or {})), **kw)


def redis_limits(**kw: Any) -> dict[str, Any]:
    """A Redis-backed rate_limits section with a key prefix of its own (no test shares counters)."""
    return {"redis_url": REDIS_URL, "key_prefix": f"gw:test:{uuid.uuid4().hex[:10]}", **kw}


def call(gw: Any, key: str) -> Any:
    return gw.client(key).chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)


def rejected(gw: Any, key: str) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as excinfo:
        call(gw, key)
    return excinfo.value


async def statuses(gw: Any, keys: list[str]) -> list[int]:
    """One concurrent request per key (keys may repeat), each status as the SDK saw it."""
    clients = {k: gw.aclient(k) for k in set(keys)}

    async def one(key: str) -> int:
        try:
            await clients[key].chat.completions.create(model="gpt-4o-mini", messages=MSGS)
            return 200
        except openai.APIStatusError as err:
            return err.status_code

    try:
        return list(await asyncio.gather(*(one(k) for k in keys)))
    finally:
        for client in clients.values():
            await client.close()


# ------------------------------------------------------------------------------ per tier


def test_the_tier_rpm_admits_that_many_requests_then_answers_429_rate_limit_exceeded(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 3})
    _, key = gw.make_user(tier="free")
    for _ in range(3):
        assert call(gw, key).status_code == 200
    err = rejected(gw, key)
    assert err.status_code == 429
    assert err.code == "rate_limit_exceeded" and err.type == "rate_limit_exceeded"
    assert "3 requests per minute" in err.message


def test_a_429_says_when_to_retry_in_retry_after_and_retry_after_ms(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 1})
    _, key = gw.make_user(tier="free")
    call(gw, key)
    headers = rejected(gw, key).response.headers
    seconds_left = 60 - time.time() % 60
    retry_after, retry_ms = int(headers["retry-after"]), int(headers["retry-after-ms"])
    assert 1 <= retry_after <= 60 and abs(retry_after - seconds_left) <= 2
    assert abs(retry_ms / 1000 - seconds_left) <= 2
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_every_answer_carries_the_requests_trio(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 5})
    _, key = gw.make_user(tier="free")
    for n in (1, 2):
        headers = call(gw, key).headers
        assert headers["x-ratelimit-limit-requests"] == "5"
        assert headers["x-ratelimit-remaining-requests"] == str(5 - n)
        assert re.fullmatch(r"(\d+s|1m0s)", headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in headers  # no tpm set: no tokens trio


def test_the_tier_tpm_refuses_once_the_windows_tokens_reach_it_and_reports_the_tokens_trio(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"tpm": TOKENS_PER_CALL + 1})
    _, key = gw.make_user(tier="free")
    first = call(gw, key)
    assert first.headers["x-ratelimit-limit-tokens"] == str(TOKENS_PER_CALL + 1)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(TOKENS_PER_CALL + 1)
    assert re.fullmatch(r"(\d+s|1m0s)", first.headers["x-ratelimit-reset-tokens"])
    gw.settle()  # tokens count when the request ends
    second = call(gw, key)
    assert second.headers["x-ratelimit-remaining-tokens"] == "1"
    gw.settle()
    err = rejected(gw, key)
    assert err.code == "rate_limit_exceeded" and "tokens per minute" in err.message
    assert err.response.headers["x-ratelimit-remaining-tokens"] == "0"


def test_a_tier_without_limits_is_not_limited_and_gets_no_headers(gateway_factory):
    gw = start(gateway_factory, limits={"rpm": 1})
    _, key = gw.make_user(tier="pro")
    for _ in range(3):
        assert "x-ratelimit-limit-requests" not in call(gw, key).headers


def test_limits_are_counted_per_user(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 1})
    _, alice = gw.make_user(tier="free")
    _, bob = gw.make_user(tier="free")
    call(gw, alice)
    assert call(gw, bob).status_code == 200
    rejected(gw, alice)


# ------------------------------------------------------------------------------ overrides


def test_a_per_user_override_replaces_the_tier_limits(gateway_factory):
    fresh_window()
    first = start(gateway_factory, limits={"rpm": 100})
    user_id, key = first.make_user(tier="free")
    _, other = first.make_user(tier="free")
    # Same store, a config naming that user (user ids exist only once the user does).
    gw = start(gateway_factory, limits={"rpm": 100}, rate_limits={"users": {user_id: {"rpm": 2}}})
    assert call(gw, key).headers["x-ratelimit-limit-requests"] == "2"
    call(gw, key)
    rejected(gw, key)
    assert call(gw, other).headers["x-ratelimit-limit-requests"] == "100"


def test_a_per_workspace_cap_limits_all_its_users_together(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 100}, rate_limits={"workspaces": {"acme": {"rpm": 3}}})
    keys = [gw.make_user(workspace="acme", tier="free")[1] for _ in range(2)]
    _, outsider = gw.make_user(workspace="globex", tier="free")
    assert [call(gw, k).status_code for k in (keys[0], keys[1], keys[0])] == [200, 200, 200]
    err = rejected(gw, keys[1])
    assert "your workspace" in err.message
    assert call(gw, outsider).status_code == 200


def test_a_request_the_workspace_refuses_does_not_use_up_the_users_own_limit(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 2}, rate_limits={"workspaces": {"acme": {"rpm": 1}}})
    _, alice = gw.make_user(workspace="acme", tier="free")
    _, bob = gw.make_user(workspace="acme", tier="free")
    call(gw, alice)
    rejected(gw, bob)
    rejected(gw, bob)
    # bob's own counter was released each time: his remaining is still his whole limit minus 0
    assert rejected(gw, bob).response.headers["x-ratelimit-remaining-requests"] == "2"


# ------------------------------------------------------------------------------ concurrency


async def test_50_concurrent_requests_with_rpm_20_admit_exactly_20_in_process(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 20})
    _, key = gw.make_user(tier="free")
    result = await statuses(gw, [key] * 50)
    assert (result.count(200), result.count(429)) == (20, 30)


async def test_50_concurrent_requests_with_rpm_20_admit_exactly_20_with_redis(gateway_factory):
    fresh_window()
    gw = start(gateway_factory, limits={"rpm": 20}, rate_limits=redis_limits())
    _, key = gw.make_user(tier="free")
    result = await statuses(gw, [key] * 50)
    assert (result.count(200), result.count(429)) == (20, 30)


async def test_more_concurrent_requests_than_the_redis_pool_has_connections_are_all_counted(gateway_factory):
    """The checks of concurrent requests go to Redis together (one connection per batch):
    150 in flight at once, beyond redis-py's pool of 100, are neither refused as "Redis
    down" nor miscounted."""
    fresh_window()
    shared = redis_limits()
    gw = start(gateway_factory, limits={"rpm": 1000}, rate_limits=shared)
    _, key = gw.make_user(tier="free")
    result = await statuses(gw, [key] * 150)
    assert result.count(200) == 150
    remaining = call(gw, key).headers["x-ratelimit-remaining-requests"]
    assert remaining == str(1000 - 151)


async def test_two_gateways_sharing_redis_admit_exactly_the_limit_between_them(gateway_factory):
    fresh_window()
    shared = redis_limits()
    one = start(gateway_factory, limits={"rpm": 20}, rate_limits=shared)
    two = start(gateway_factory, limits={"rpm": 20}, rate_limits=shared)  # same store, same Redis keys
    _, key = one.make_user(tier="free")
    first, second = await asyncio.gather(statuses(one, [key] * 25), statuses(two, [key] * 25))
    assert first.count(200) + second.count(200) == 20
    assert first.count(429) + second.count(429) == 30


def test_a_request_counted_by_one_gateway_shows_in_the_others_remaining(gateway_factory):
    fresh_window()
    shared = redis_limits()
    one = start(gateway_factory, limits={"rpm": 3}, rate_limits=shared)
    two = start(gateway_factory, limits={"rpm": 3}, rate_limits=shared)
    _, key = one.make_user(tier="free")
    assert call(one, key).headers["x-ratelimit-remaining-requests"] == "2"
    assert call(two, key).headers["x-ratelimit-remaining-requests"] == "1"
    assert call(one, key).headers["x-ratelimit-remaining-requests"] == "0"
    rejected(two, key)


async def test_two_gateways_without_redis_count_separately(gateway_factory):
    """The documented limit of in-process counters: each process has its own."""
    fresh_window()
    one = start(gateway_factory, limits={"rpm": 5})
    two = start(gateway_factory, limits={"rpm": 5})
    _, key = one.make_user(tier="free")
    first, second = await asyncio.gather(statuses(one, [key] * 8), statuses(two, [key] * 8))
    assert (first.count(200), second.count(200)) == (5, 5)


# ------------------------------------------------------------------------------ Redis down


def test_redis_down_rejects_with_503_when_on_backend_error_is_reject(gateway_factory, upstream):
    gw = start(gateway_factory, limits={"rpm": 5},
               rate_limits={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "on_backend_error": "reject"})
    _, key = gw.make_user(tier="free")
    with pytest.raises(openai.APIStatusError) as excinfo:
        call(gw, key)
    assert excinfo.value.status_code == 503
    assert excinfo.value.code == "rate_limiter_unavailable"
    assert excinfo.value.response.headers["retry-after"] == "1"
    assert upstream.count() == 0  # fails closed: nothing reached the provider


def test_redis_down_admits_when_on_backend_error_is_allow(gateway_factory, upstream):
    gw = start(gateway_factory, limits={"rpm": 5},
               rate_limits={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "on_backend_error": "allow"})
    _, key = gw.make_user(tier="free")
    assert call(gw, key).status_code == 200
    assert upstream.count() == 1
