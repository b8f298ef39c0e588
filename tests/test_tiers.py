"""Tier policy: which models a tier sees and may use, and the downgrade ladder.

Ladder in the test config: gpt-4o -> gpt-4o-mini -> demo. Prices (ai_message):
gpt-4o 5, gpt-4o-mini 2, demo 1. Tier free allows gpt-4o-mini, demo, claude, embed.
"""

from __future__ import annotations

import httpx
import openai
import pytest

HELLO = [{"role": "user", "content": "hi"}]


def test_models_list_shows_only_the_models_the_tier_allows(gateway):
    _, free_key = gateway.make_user(tier="free")
    _, pro_key = gateway.make_user(tier="pro")
    free = sorted(m.id for m in gateway.client(free_key).models.list())
    pro = sorted(m.id for m in gateway.client(pro_key).models.list())
    assert free == ["claude", "demo", "embed", "gpt-4o-mini"]
    assert pro == ["claude", "demo", "embed", "gpt-4o", "gpt-4o-mini"]


def test_models_retrieve_returns_a_model_the_tier_allows_and_404s_the_others(gateway):
    _, free_key = gateway.make_user(tier="free")
    client = gateway.client(free_key)
    model = client.models.retrieve("gpt-4o-mini")
    assert (model.id, model.object, model.owned_by) == ("gpt-4o-mini", "model", "gateway")
    for hidden in ("gpt-4o", "no-such-model", "openai/gpt-4o"):  # forbidden to the tier, unknown, a path
        with pytest.raises(openai.NotFoundError) as excinfo:
            client.models.retrieve(hidden)
        assert excinfo.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        gateway.client("gw-nobody").models.retrieve("gpt-4o-mini")


def test_free_tier_asking_gpt_4o_is_served_by_gpt_4o_mini(gateway, upstream):
    _, key = gateway.make_user(tier="free", energy=100)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    completion = raw.parse()
    assert completion.model == "gpt-4o-mini"
    assert raw.headers["X-Model-Downgraded-From"] == "gpt-4o"
    assert "free" in raw.headers["X-Model-Downgrade-Reason"]
    assert upstream.last.json["model"] == "gpt-4o-mini"
    assert raw.headers["X-Energy-Cost"] == "2"


@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_pro_user_who_cannot_afford_gpt_4o_is_downgraded_by_balance(gateway, upstream):
    user_id, key = gateway.make_user(tier="pro", energy=3)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.parse().model == "gpt-4o-mini"
    assert raw.headers["X-Model-Downgraded-From"] == "gpt-4o"
    assert "energy" in raw.headers["X-Model-Downgrade-Reason"]
    assert raw.headers["X-Energy-Cost"] == "2"
    assert raw.headers["X-Energy-Remaining"] == "1"
    assert upstream.last.json["model"] == "gpt-4o-mini"
    gateway.settle()
    assert gateway.balance(user_id) == 1


def test_request_within_tier_and_budget_is_not_downgraded(gateway, upstream):
    _, key = gateway.make_user(tier="pro", energy=10)
    raw = gateway.client(key).chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.parse().model == "gpt-4o"
    assert "X-Model-Downgraded-From" not in raw.headers
    assert upstream.last.json["model"] == "gpt-4o"


def test_nothing_affordable_gets_429_insufficient_energy_that_the_sdk_does_not_retry(gateway, upstream):
    """`x-should-retry: false` must stop the SDK's default retries (max_retries=2)."""
    user_id, key = gateway.make_user(tier="pro", energy=0)
    sent: list[httpx.Request] = []
    http_client = httpx.Client(event_hooks={"request": [sent.append]})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=key, http_client=http_client)  # default retries
    assert client.max_retries == 2
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    err = info.value
    assert err.status_code == 429
    assert err.response.headers["x-should-retry"] == "false"
    body = err.response.json()["error"]
    assert body["type"] == "insufficient_quota"
    assert body["code"] == "insufficient_energy"
    assert "needs 5 energy, 0 left" in body["message"]
    assert err.response.headers["X-Energy-Remaining"] == "0"
    assert len(sent) == 1, "the SDK retried a request that cannot succeed"
    assert upstream.count() == 0
    assert gateway.balance(user_id) == 0


def test_tier_without_the_model_and_without_a_ladder_gets_403_model_not_allowed(gateway_factory, upstream):
    gw = gateway_factory(tiers={"free": {"models": ["demo"]}, "pro": {"models": ["*"]}})
    user_id, key = gw.make_user(tier="free", energy=50)
    with pytest.raises(openai.PermissionDeniedError) as info:
        gw.client(key).chat.completions.create(model="claude", messages=HELLO)
    body = info.value.response.json()["error"]
    assert info.value.status_code == 403
    assert (body["type"], body["code"], body["param"]) == ("invalid_request_error", "model_not_allowed", "model")
    assert upstream.count() == 0
    gw.settle()
    assert gw.balance(user_id) == 50


def test_tier_change_through_admin_applies_to_the_next_request(gateway, upstream):
    from gateway.admin.operations import MASTER

    user_id, key = gateway.make_user(tier="free", energy=100)
    client = gateway.client(key)
    assert client.chat.completions.create(model="gpt-4o", messages=HELLO).model == "gpt-4o-mini"
    gateway.run(gateway.admin().set_tier(MASTER, user_id, "pro"))
    assert client.chat.completions.create(model="gpt-4o", messages=HELLO).model == "gpt-4o"
